//! The loop every reconciler of this node runs, written once: wait until the node is a
//! member, then do a pass, and wait for whichever comes first of the next raft apply
//! (the desired state may have changed), the reconciler's timer (the host may have
//! drifted behind its back) or shutdown.
//!
//! ```text
//!   not a member ──membership changes──► member ──► pass ──► wait ─┬─ raft applied ──► pass
//!                                                                  ├─ timer ─────────► pass
//!                                                                  └─ stop ──────────► end
//! ```
//!
//! Its users: the compute manager and the network reconciler (from [`Wakeups::when_member`])
//! and the placement duty, which only runs on the leader and so starts as a member
//! ([`Wakeups::on_apply`]). A VM's actor does not wake on every apply but on its own
//! VM's `watch` channel, which the manager feeds; the other duties (health, voters,
//! operations) and the host-unit supervisor run on timers alone, since nothing in raft
//! asks them for a pass.

use std::time::Duration;

use keel_cluster::types::{LogId, NodeId};
use keel_cluster::ClusterDb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Wakes a reconciler for its next pass.
pub struct Wakeups {
    applied: watch::Receiver<Option<LogId>>,
    stop: CancellationToken,
}

impl Wakeups {
    /// Waits until this node is a member of a cluster; `None` when `stop` came first.
    pub async fn when_member(
        db: &ClusterDb,
        stop: &CancellationToken,
    ) -> Option<(NodeId, Wakeups)> {
        loop {
            // Subscribe before looking, so a join between the two is not missed.
            let mut membership = db.membership_watch();
            if let Some(id) = db.node_id() {
                let wakeups = Wakeups {
                    applied: db.reader().applied(),
                    stop: stop.clone(),
                };
                return Some((id, wakeups));
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = membership.changed() => {}
            }
        }
    }

    /// For a loop that only runs on a member (a duty of the leader): wakes on this node's
    /// applies from now on.
    pub fn on_apply(db: &ClusterDb, stop: &CancellationToken) -> Wakeups {
        Wakeups {
            applied: db.reader().applied(),
            stop: stop.clone(),
        }
    }

    /// Waits for the next raft apply or `timer`, whichever comes first. `false` when the
    /// reconciler must end: shutdown, or the state machine is gone.
    pub async fn next(&mut self, timer: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            r = self.applied.changed() => r.is_ok(),
            _ = tokio::time::sleep(timer) => true,
        }
    }
}
