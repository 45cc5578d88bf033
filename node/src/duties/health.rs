//! Host health from heartbeats: `up` → `suspect` after `suspect_after_ms` without a
//! heartbeat → `down` after `down_after_ms`; back to `up` on the next heartbeat. Only
//! transitions are written to raft.

use std::time::{Duration, Instant};

use keel_cluster::db::now_ms;
use keel_cluster::model::{self, Command, Health, Host};
use keel_cluster::{error_chain, ClusterDb};
use tokio_util::sync::CancellationToken;

use crate::config::DutyTuning;

pub fn classify(silent_for: Duration, tuning: &DutyTuning) -> Health {
    let ms = silent_for.as_millis() as u64;
    if ms >= tuning.down_after_ms {
        Health::Down
    } else if ms >= tuning.suspect_after_ms {
        Health::Suspect
    } else {
        Health::Up
    }
}

pub async fn run(db: ClusterDb, tuning: DutyTuning, tick: Duration, stop: CancellationToken) {
    // Heartbeats received before this term are stale; every member gets a full grace
    // period from now, so a leader change never marks healthy hosts down.
    db.heartbeats().clear();
    let since = Instant::now();
    let mut interval = tokio::time::interval(tick);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        if let Some(me) = db.node_id() {
            db.heartbeats().record(me);
        }
        let hosts = match db.reader().read(model::list::<Host>) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "health duty could not read hosts");
                continue;
            }
        };
        for host in hosts {
            let last = db
                .heartbeats()
                .last_seen(host.id)
                .unwrap_or(since)
                .max(since);
            let health = classify(last.elapsed(), &tuning);
            if health == host.health {
                continue;
            }
            tracing::info!(host_id = host.id, name = %host.name, from = %host.health, to = %health, "host health changed");
            let cmd = Command::SetHealth {
                host_id: host.id,
                health,
                now_ms: now_ms(),
            };
            if let Err(e) = db.write(cmd).await {
                tracing::warn!(host_id = host.id, error = %error_chain(&e), "recording host health failed; retrying next tick");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let t = DutyTuning::default();
        assert_eq!(classify(Duration::from_millis(0), &t), Health::Up);
        assert_eq!(
            classify(Duration::from_millis(t.suspect_after_ms), &t),
            Health::Suspect
        );
        assert_eq!(
            classify(Duration::from_millis(t.down_after_ms), &t),
            Health::Down
        );
    }
}
