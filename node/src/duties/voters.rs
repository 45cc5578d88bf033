//! Voter management: at most 5 voters (3 until there are 5 members; every member while
//! there are fewer than 3), the rest learners. A voter that has been `down` for longer
//! than `voter_replace_after_ms` is replaced by a healthy, caught-up learner when there is
//! one; without a replacement it stays a voter, since removing it would shrink the quorum
//! without adding safety.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use keel_cluster::model::{self, Health, Host};
use keel_cluster::{error_chain, ClusterDb, NodeId};
use tokio_util::sync::CancellationToken;

use crate::config::DutyTuning;

/// How far behind the leader's log a learner may be and still be promoted.
const MAX_PROMOTION_LAG: u64 = 64;

/// Everything the voter policy looks at.
#[derive(Debug, Clone, Default)]
pub struct VoterInputs {
    pub leader: NodeId,
    pub voters: BTreeSet<NodeId>,
    /// Every member (voters and learners).
    pub members: BTreeSet<NodeId>,
    /// Per member: healthy right now.
    pub healthy: BTreeMap<NodeId, bool>,
    /// Voters down for longer than the replacement grace.
    pub lost: BTreeSet<NodeId>,
    /// Learners close enough to the leader's log to vote.
    pub caught_up: BTreeSet<NodeId>,
}

pub fn target_voters(members: usize) -> usize {
    match members {
        0..=2 => members,
        3 | 4 => 3,
        _ => 5,
    }
}

/// The voter set the cluster should have, or `None` when the current one is right.
pub fn desired_voters(input: &VoterInputs) -> Option<BTreeSet<NodeId>> {
    let target = target_voters(input.members.len());
    let mut keep: BTreeSet<NodeId> = input
        .voters
        .iter()
        .copied()
        .filter(|v| !input.lost.contains(v) && input.members.contains(v))
        .collect();
    let candidates: Vec<NodeId> = input
        .members
        .iter()
        .copied()
        .filter(|m| {
            !input.voters.contains(m)
                && input.healthy.get(m).copied().unwrap_or(false)
                && input.caught_up.contains(m)
        })
        .collect();
    for c in candidates {
        if keep.len() >= target {
            break;
        }
        keep.insert(c);
    }
    // Lost voters without a replacement keep their seat.
    for lost in &input.lost {
        if keep.len() >= target {
            break;
        }
        if input.voters.contains(lost) {
            keep.insert(*lost);
        }
    }
    // Too many voters (members were removed): drop unhealthy ones first, never the leader.
    while keep.len() > target.max(1) {
        let drop = keep
            .iter()
            .copied()
            .filter(|v| *v != input.leader)
            .min_by_key(|v| {
                (
                    input.healthy.get(v).copied().unwrap_or(false),
                    std::cmp::Reverse(*v),
                )
            });
        match drop {
            Some(v) => keep.remove(&v),
            None => break,
        };
    }
    (keep != input.voters && !keep.is_empty()).then_some(keep)
}

pub async fn run(db: ClusterDb, tuning: DutyTuning, tick: Duration, stop: CancellationToken) {
    let mut interval = tokio::time::interval(tick);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        // Read, decide and change under the lock `node remove` holds for its whole
        // sequence: never a decision from a half-removed member.
        let _voter_changes = db.voter_changes().await;
        let Some(input) = gather(&db, &tuning) else {
            continue;
        };
        if let Some(voters) = desired_voters(&input) {
            // Lost voters that lose their seat leave raft; healthy ones become learners.
            let leave: BTreeSet<NodeId> = input
                .lost
                .iter()
                .copied()
                .filter(|v| !voters.contains(v))
                .collect();
            tracing::info!(from = ?input.voters, to = ?voters, leaving = ?leave, "changing voters");
            if let Err(e) = db.set_voters(voters, leave).await {
                tracing::warn!(error = %error_chain(&e), "voter change failed; retrying next tick");
            }
        }
    }
}

fn gather(db: &ClusterDb, tuning: &DutyTuning) -> Option<VoterInputs> {
    let m = db.metrics()?;
    let leader = m.current_leader?;
    if leader != m.id {
        return None;
    }
    let membership = m.membership_config.membership();
    let hosts: Vec<Host> = db.reader().read(model::list::<Host>).ok()?;
    let now = keel_cluster::db::now_ms();
    let last = m.last_log_index.unwrap_or(0);
    let caught_up = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter(|(_, matched)| matched.map_or(0, |l| l.index) + MAX_PROMOTION_LAG >= last)
                .map(|(id, _)| *id)
                .collect()
        })
        .unwrap_or_default();
    let mut healthy = BTreeMap::new();
    let mut lost = BTreeSet::new();
    for h in &hosts {
        healthy.insert(h.id, h.health == Health::Up);
        if h.health == Health::Down
            && now.saturating_sub(h.health_since_ms) + tuning.down_after_ms
                >= tuning.voter_replace_after_ms
        {
            lost.insert(h.id);
        }
    }
    Some(VoterInputs {
        leader,
        voters: membership.voter_ids().collect(),
        members: membership.nodes().map(|(id, _)| *id).collect(),
        healthy,
        lost,
        caught_up,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(members: &[u64], voters: &[u64], down: &[u64], lost: &[u64]) -> VoterInputs {
        VoterInputs {
            leader: voters[0],
            voters: voters.iter().copied().collect(),
            members: members.iter().copied().collect(),
            healthy: members.iter().map(|m| (*m, !down.contains(m))).collect(),
            lost: lost.iter().copied().collect(),
            caught_up: members.iter().copied().collect(),
        }
    }

    fn set(ids: &[u64]) -> Option<BTreeSet<u64>> {
        Some(ids.iter().copied().collect())
    }

    #[test]
    fn grows_to_three_then_five() {
        assert_eq!(
            desired_voters(&input(&[1, 2], &[1], &[], &[])),
            set(&[1, 2])
        );
        assert_eq!(
            desired_voters(&input(&[1, 2, 3], &[1, 2], &[], &[])),
            set(&[1, 2, 3])
        );
        assert_eq!(
            desired_voters(&input(&[1, 2, 3, 4], &[1, 2, 3], &[], &[])),
            None
        );
        assert_eq!(
            desired_voters(&input(&[1, 2, 3, 4, 5], &[1, 2, 3], &[], &[])),
            set(&[1, 2, 3, 4, 5])
        );
        assert_eq!(
            desired_voters(&input(&[1, 2, 3, 4, 5, 6], &[1, 2, 3, 4, 5], &[], &[])),
            None
        );
    }

    #[test]
    fn lost_voter_is_replaced_by_a_healthy_learner_only() {
        assert_eq!(
            desired_voters(&input(&[1, 2, 3, 4], &[1, 2, 3], &[3], &[3])),
            set(&[1, 2, 4])
        );
        // Down but not yet past the grace: kept.
        assert_eq!(
            desired_voters(&input(&[1, 2, 3, 4], &[1, 2, 3], &[3], &[])),
            None
        );
        // No healthy learner: the lost voter keeps its seat.
        assert_eq!(
            desired_voters(&input(&[1, 2, 3, 4], &[1, 2, 3], &[3, 4], &[3])),
            None
        );
        assert_eq!(
            desired_voters(&input(&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5], &[5], &[5])),
            None
        );
    }

    #[test]
    fn lagging_learner_is_not_promoted() {
        let mut i = input(&[1, 2, 3], &[1], &[], &[]);
        i.caught_up = [1, 2].into_iter().collect();
        assert_eq!(desired_voters(&i), set(&[1, 2]));
    }

    #[test]
    fn never_more_than_five() {
        let i = input(&[1, 2, 3, 4, 5, 6, 7], &[1, 2, 3], &[], &[]);
        assert_eq!(desired_voters(&i).map(|v| v.len()), Some(5));
    }
}
