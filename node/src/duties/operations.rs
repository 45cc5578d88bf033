//! The operation-retention duty: deletes the operations that finished longer ago than
//! `compute.operation-retention-minutes` (a day by default, like CloudStack's
//! `job.expire.minutes`), so that the replicated state does not grow with every request
//! ever made. Running operations stay whatever their age.
//!
//! It looks every [`CHECK_EVERY`] and writes a raft entry only when something expired; the
//! entry carries the cutoff, so every replica deletes the same records.

use std::time::Duration;

use keel_cluster::db::now_ms;
use keel_cluster::model::compute::{expired_operations, operation_retention_ms, ComputeCommand};
use keel_cluster::model::Command;
use keel_cluster::{error_chain, ClusterDb};
use tokio_util::sync::CancellationToken;

/// How often expired operations are looked for.
pub const CHECK_EVERY: Duration = Duration::from_secs(60);

pub async fn run(db: ClusterDb, stop: CancellationToken) {
    let mut interval = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        prune(&db, now_ms()).await;
    }
}

/// Deletes the operations that expired by `now_ms`; returns how many.
pub async fn prune(db: &ClusterDb, now_ms: u64) -> usize {
    let expired = db.reader().read(|conn| {
        let cutoff = now_ms.saturating_sub(operation_retention_ms(conn)?);
        Ok((cutoff, expired_operations(conn, cutoff)?.len()))
    });
    let (cutoff, count) = match expired {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "operation duty could not read the operations");
            return 0;
        }
    };
    if count == 0 {
        return 0;
    }
    let cmd = Command::Compute {
        command: ComputeCommand::PruneOperations {
            finished_before_ms: cutoff,
        },
    };
    match db.write(cmd).await {
        Ok(_) => {
            tracing::info!(
                count,
                finished_before_ms = cutoff,
                "expired operations deleted"
            );
            count
        }
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "deleting expired operations failed; retrying at the next check");
            0
        }
    }
}
