//! The placement duty: puts every unplaced VM on a host, or records why it cannot.
//!
//! Filters and weigher live in the model (`keel_cluster::model::compute::candidate_hosts`)
//! so that the leader's decision and the state machine's re-check at apply time use the
//! same rules: free vCPUs and memory under the overcommit settings, host up, not in
//! maintenance, hypervisor available, affinity and anti-affinity groups; then spread or
//! pack. VMs are placed oldest first, one decision per raft entry, each reading the state
//! the previous one produced, so two VMs never take the last slot of the same host.

use std::time::Duration;

use keel_cluster::db::now_ms;
use keel_cluster::model::compute::{candidate_hosts, ComputeCommand, Placement, Vm};
use keel_cluster::model::{self, Command, CommandError};
use keel_cluster::store::StoreError;
use keel_cluster::{error_chain, ClusterDb};
use tokio_util::sync::CancellationToken;

use crate::wake::Wakeups;

/// Why a VM's placement could not be evaluated this tick.
#[derive(Debug, thiserror::Error)]
enum EvaluateError {
    #[error("cannot read the cluster state")]
    Store(#[from] StoreError),
    #[error("the placement rules refused to evaluate it")]
    Model(#[from] CommandError),
}

/// How long the drain waits before asking again to move a VM that could not move.
const DRAIN_RETRY: Duration = Duration::from_secs(5);

pub async fn run(db: ClusterDb, tick: Duration, stop: CancellationToken) {
    let mut wakeups = Wakeups::on_apply(&db, &stop);
    let mut drain_attempts = std::collections::HashMap::new();
    loop {
        place_pending(&db).await;
        drain_hosts(&db, &mut drain_attempts).await;
        if !wakeups.next(tick).await {
            return;
        }
    }
}

/// Moves VMs off hosts in maintenance (`keel node drain`): running VMs live, stopped VMs
/// cold. A VM that cannot move now (starting, stopping, nowhere to go) is retried on the
/// next tick; its host stays drained meanwhile.
async fn drain_hosts(
    db: &ClusterDb,
    attempts: &mut std::collections::HashMap<String, std::time::Instant>,
) {
    let Ok((hosts, vms)) = db
        .reader()
        .read(|c| Ok((model::list::<model::Host>(c)?, model::list::<Vm>(c)?)))
    else {
        return;
    };
    for host in hosts.iter().filter(|h| h.maintenance.is_some()) {
        for vm in vms
            .iter()
            .filter(|vm| vm.host == Some(host.id) && vm.migration.is_none() && !vm.deleting)
        {
            // A VM that could not move is retried every few seconds, not every tick: a
            // rejected proposal still costs a raft entry.
            if attempts
                .get(&vm.id)
                .is_some_and(|t| t.elapsed() < DRAIN_RETRY)
            {
                continue;
            }
            attempts.insert(vm.id.clone(), std::time::Instant::now());
            let command = ComputeCommand::MigrateVm {
                vm: vm.id.clone(),
                target: None,
                op_id: uuid::Uuid::new_v4().to_string(),
                now_ms: now_ms(),
            };
            match db.write(Command::Compute { command }).await {
                Ok(_) => {
                    tracing::info!(vm = %vm.name, host = host.id, "drain: moving VM off the host");
                }
                Err(e) => {
                    tracing::debug!(vm = %vm.name, error = %error_chain(&e), "drain: VM cannot move yet");
                }
            }
        }
    }
}

async fn place_pending(db: &ClusterDb) {
    let mut unplaced: Vec<Vm> = match db.reader().read(model::list::<Vm>) {
        Ok(vms) => vms
            .into_iter()
            .filter(|vm| vm.host.is_none() && !vm.deleting)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "placement: cannot read the VMs");
            return;
        }
    };
    unplaced.sort_by(|a, b| a.created_at_ms.cmp(&b.created_at_ms).then(a.id.cmp(&b.id)));
    for vm in unplaced {
        let decision = db
            .reader()
            .read_with(|c| Ok::<_, EvaluateError>(candidate_hosts(c, &vm)?));
        let command = match decision {
            Ok(Placement::Hosts(hosts)) => match hosts.first() {
                Some(&host_id) => ComputeCommand::PlaceVm {
                    vm_id: vm.id.clone(),
                    host_id,
                    now_ms: now_ms(),
                },
                None => continue,
            },
            Ok(Placement::Nowhere { reason }) => {
                if vm.pending_reason.as_deref() == Some(reason.as_str()) {
                    continue;
                }
                ComputeCommand::SetVmPending {
                    vm_id: vm.id.clone(),
                    reason,
                    now_ms: now_ms(),
                }
            }
            Err(e) => {
                tracing::warn!(vm = %vm.name, error = %error_chain(&e), "placement: cannot evaluate");
                continue;
            }
        };
        let placed_on = match &command {
            ComputeCommand::PlaceVm { host_id, .. } => Some(*host_id),
            _ => None,
        };
        match db.write(Command::Compute { command }).await {
            Ok(_) => {
                if let Some(host) = placed_on {
                    tracing::info!(vm = %vm.name, host, "placement: VM placed");
                }
            }
            Err(e) => {
                tracing::info!(vm = %vm.name, error = %error_chain(&e), "placement: decision not committed; retrying");
            }
        }
    }
}
