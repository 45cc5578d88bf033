//! Management duties: cluster-wide decisions made by exactly one node, the raft leader.
//!
//! ```text
//!             metrics say "I lead"                      metrics say otherwise
//!   Idle ──────────────────────────────► Running ─────────────────────────────► Idle
//!                                         │ each duty: own task, own tick
//!                                         │ decisions written as raft commands
//! ```
//!
//! Duties start as soon as raft's metrics show this node as leader (a watch channel, so
//! within milliseconds) and are cancelled as soon as they show anything else.
//!
//! Why two nodes never act at once: a duty acts only by proposing commands through raft.
//! A deposed leader that has not noticed yet may still run its duties for a moment, but
//! none of its proposals can commit — committing needs a majority that has already moved
//! to the new term — so the state only ever holds decisions of the current leader. The
//! duties themselves are idempotent reconciliations of "what should be" against the state,
//! so the new leader simply picks up where the old one stopped.

mod health;
mod operations;
mod placement;
mod voters;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_cluster::ClusterDb;
use tokio_util::sync::CancellationToken;

use crate::config::DutyTuning;

pub use voters::{desired_voters, VoterInputs};

/// Whether this node is running the duties right now (reported by `/healthz`).
#[derive(Debug, Default)]
pub struct DutyStatus {
    running: AtomicBool,
}

impl DutyStatus {
    pub fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }
}

/// Watches leadership and starts/stops the duties until `shutdown`.
pub async fn run(
    db: ClusterDb,
    tuning: DutyTuning,
    status: Arc<DutyStatus>,
    shutdown: CancellationToken,
) {
    let raft = tokio::select! {
        _ = shutdown.cancelled() => return,
        raft = db.wait_for_raft() => raft,
    };
    let mut metrics = raft.metrics();
    let mut running: Option<CancellationToken> = None;
    loop {
        let leading = db.is_leader();
        match (leading, &running) {
            (true, None) => {
                let term = metrics.borrow().current_term;
                tracing::info!(term, "management duties started");
                let token = shutdown.child_token();
                spawn_duties(&db, &tuning, &token);
                running = Some(token);
                status.running.store(true, Ordering::Relaxed);
            }
            (false, Some(token)) => {
                tracing::info!("management duties stopped: no longer the leader");
                token.cancel();
                running = None;
                status.running.store(false, Ordering::Relaxed);
            }
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = metrics.changed() => if r.is_err() { break },
        }
    }
    if let Some(token) = running {
        token.cancel();
    }
    status.running.store(false, Ordering::Relaxed);
}

fn spawn_duties(db: &ClusterDb, tuning: &DutyTuning, token: &CancellationToken) {
    let tick = Duration::from_millis(tuning.tick_ms);
    tokio::spawn(health::run(db.clone(), tuning.clone(), tick, token.clone()));
    tokio::spawn(voters::run(db.clone(), tuning.clone(), tick, token.clone()));
    tokio::spawn(placement::run(db.clone(), tick, token.clone()));
    tokio::spawn(operations::run(db.clone(), token.clone()));
}
