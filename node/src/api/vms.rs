//! VM, operation and affinity-group routes. Every VM request that a host must carry out
//! answers `202 Accepted` with the operation that tracks it; the client polls
//! `GET /api/v1/operations/{id}`.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use keel_cluster::db::now_ms;
use keel_cluster::model::compute::{
    self, AffinityGroup, BootSource, CloudInit, ComputeCommand, DataDisk, NicSpec, OpKind,
    Operation, PowerIntent, Template, Vm, VmSpec,
};
use keel_cluster::model::network::{Network, SecurityGroup};
use keel_cluster::model::{self, Command, CommandError, Host, Outcome};

use super::extract::ApiJson;
use super::handlers::{read, ApiResult};
use super::views::{self, ComputeNames};
use super::{ApiError, AppState, Principal};
use keel_api_types::*;

/// How many operations `GET /api/v1/operations` returns.
pub const RECENT_OPERATIONS: usize = 200;

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `202 Accepted` + `Location` of the operation.
pub struct Accepted(pub OperationAccepted);

impl IntoResponse for Accepted {
    fn into_response(self) -> Response {
        let location = format!("/api/v1/operations/{}", self.0.operation.id);
        (
            StatusCode::ACCEPTED,
            [(header::LOCATION, location)],
            Json(self.0),
        )
            .into_response()
    }
}

// ---- request → command (pure, unit-tested) ----------------------------------------------

/// The command a create request stands for. Validation is the model's: it resolves the
/// template, checks sizes, allocates MACs.
pub(crate) fn create_vm_command(
    req: VmCreateRequest,
    vm_id: String,
    op_id: String,
    now_ms: u64,
) -> ComputeCommand {
    let boot = match req.boot {
        VmBoot::Disk => BootSource::Template {
            template: req.template,
        },
        VmBoot::Iso => BootSource::Iso {
            template: req.template,
        },
        VmBoot::Kernel => BootSource::Kernel {
            template: req.template,
            initrd: req.initrd,
            cmdline: req.cmdline.unwrap_or_default(),
        },
    };
    ComputeCommand::CreateVm {
        vm_id,
        name: req.name,
        spec: VmSpec {
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            boot,
            root_disk_gib: req.root_disk_gib,
            data_disks: req
                .data_disks_gib
                .into_iter()
                .map(|size_gib| DataDisk { size_gib })
                .collect(),
            nics: req.nics.into_iter().map(nic_spec).collect(),
            cloud_init: CloudInit {
                user_data: req.user_data,
                ssh_keys: req.ssh_keys,
            },
            affinity_group: req.affinity_group,
            ha: req.ha,
        },
        start: req.start,
        stop_timeout_s: req.stop_timeout_s,
        op_id,
        now_ms,
    }
}

/// The NIC a request asks for; the model resolves the network and groups, leases the
/// address and allocates the MAC.
pub(crate) fn nic_spec(n: VmNicRequest) -> NicSpec {
    NicSpec {
        bridge: n.bridge,
        mac: n.mac,
        network: n.network,
        ip: n.ip,
        security_groups: n.security_groups,
    }
}

/// A VM action other than create: what it is called and the command it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VmAction {
    Start,
    Stop,
    Reboot(VmRebootRequest),
    Resize(VmResizeRequest),
    Delete,
    /// To this host id, or where placement says.
    Migrate(Option<u64>),
    /// Add a NIC to a VM (hot-plugged while it runs).
    AttachNic(VmNicRequest),
    /// Remove a VM's NIC, by MAC (hot-unplugged while it runs).
    DetachNic(String),
}

impl VmAction {
    fn kind(&self) -> OpKind {
        match self {
            VmAction::Start => OpKind::VmStart,
            VmAction::Stop => OpKind::VmStop,
            VmAction::Reboot(_) => OpKind::VmReboot,
            VmAction::Resize(_) => OpKind::VmResize,
            VmAction::Delete => OpKind::VmDelete,
            VmAction::Migrate(_) => OpKind::VmMigrate,
            VmAction::AttachNic(_) => OpKind::NicAttach,
            VmAction::DetachNic(_) => OpKind::NicDetach,
        }
    }

    pub(crate) fn command(self, vm: String, op_id: String, now_ms: u64) -> ComputeCommand {
        match self {
            VmAction::Start | VmAction::Stop => ComputeCommand::SetVmPower {
                vm,
                power: if self == VmAction::Start {
                    PowerIntent::Running
                } else {
                    PowerIntent::Stopped
                },
                op_id,
                now_ms,
            },
            VmAction::Migrate(target) => ComputeCommand::MigrateVm {
                vm,
                target,
                op_id,
                now_ms,
            },
            VmAction::Reboot(r) => ComputeCommand::RebootVm {
                vm,
                force: r.force,
                op_id,
                now_ms,
            },
            VmAction::Resize(r) => ComputeCommand::ResizeVm {
                vm,
                vcpus: r.vcpus,
                memory_mib: r.memory_mib,
                op_id,
                now_ms,
            },
            VmAction::Delete => ComputeCommand::DeleteVm { vm, op_id, now_ms },
            VmAction::AttachNic(nic) => ComputeCommand::AttachNic {
                vm,
                nic: nic_spec(nic),
                op_id,
                now_ms,
            },
            VmAction::DetachNic(mac) => ComputeCommand::DetachNic {
                vm,
                mac,
                op_id,
                now_ms,
            },
        }
    }
}

/// The operation just started, as this node's replica shows it; a replica that has not
/// applied the entry yet gets the view the command implies.
fn accepted(
    state: &AppState,
    op_id: String,
    kind: OpKind,
    vm_id: String,
    vm_name: String,
    now_ms: u64,
) -> Result<Accepted, ApiError> {
    let operation = match read(state, |c| model::get::<Operation>(c, &op_id))? {
        Some(op) => views::operation_view(op),
        None => OperationView {
            id: op_id,
            kind: views::op_kind_name(kind).into(),
            vm_id: vm_id.clone(),
            vm_name,
            state: "running".into(),
            detail: None,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        },
    };
    Ok(Accepted(OperationAccepted { operation, vm_id }))
}

fn created_id(outcome: Outcome, fallback: String) -> String {
    match outcome {
        Outcome::Created { id } => id,
        _ => fallback,
    }
}

// ---- VMs ----------------------------------------------------------------------------------

#[utoipa::path(post, path = "/api/v1/vms", tag = "vms",
    request_body = VmCreateRequest,
    responses(
        (status = 202, body = OperationAccepted, description = "accepted; poll the operation",
            headers(("Location" = String, description = "/api/v1/operations/{id}"))),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody, description = "template or affinity group unknown"),
        (status = 409, body = ErrorBody, description = "name taken"), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_vm(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<VmCreateRequest>,
) -> Result<Accepted, ApiError> {
    let (vm_id, op_id, now) = (new_id(), new_id(), now_ms());
    let name = req.name.clone();
    tracing::info!(vm = %name, vm_id = %vm_id, op_id = %op_id, principal = ?who, "creating VM");
    let command = create_vm_command(req, vm_id.clone(), op_id.clone(), now);
    let outcome = state.db.write(Command::Compute { command }).await?;
    let vm_id = created_id(outcome, vm_id);
    accepted(&state, op_id, OpKind::VmCreate, vm_id, name, now)
}

/// The names VM views show next to ids: hosts, templates, networks, security groups.
fn compute_names(c: &rusqlite::Connection) -> rusqlite::Result<ComputeNames> {
    Ok(
        ComputeNames::new(&model::list::<Host>(c)?, &model::list::<Template>(c)?).with_networking(
            &model::list::<Network>(c)?,
            &model::list::<SecurityGroup>(c)?,
        ),
    )
}

#[utoipa::path(get, path = "/api/v1/vms", tag = "vms",
    responses((status = 200, body = [VmView]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_vms(State(state): State<AppState>) -> ApiResult<Vec<VmView>> {
    let (mut vms, names) = read(&state, |c| Ok((model::list::<Vm>(c)?, compute_names(c)?)))?;
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(
        vms.iter().map(|vm| views::vm_view(vm, &names)).collect(),
    ))
}

#[utoipa::path(get, path = "/api/v1/vms/{vm}", tag = "vms",
    params(("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, body = VmDetailView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_vm(
    State(state): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<VmDetailView> {
    let (found, names) = read(&state, |c| {
        Ok((compute::find_vm(c, &vm)?, compute_names(c)?))
    })?;
    let found = found.ok_or(CommandError::VmUnknown { vm })?;
    Ok(Json(views::vm_detail_view(&found, &names)))
}

async fn vm_action(
    state: &AppState,
    who: &Principal,
    vm: String,
    action: VmAction,
) -> Result<Accepted, ApiError> {
    let kind = action.kind();
    // For the answer only: the model resolves the name itself.
    let known = read(state, |c| compute::find_vm(c, &vm))?;
    let (op_id, now) = (new_id(), now_ms());
    tracing::info!(vm = %vm, op_id = %op_id, kind = views::op_kind_name(kind), principal = ?who, "VM request");
    let command = action.command(vm.clone(), op_id.clone(), now);
    let outcome = state.db.write(Command::Compute { command }).await?;
    let (fallback_id, name) = match known {
        Some(v) => (v.id, v.name),
        None => (vm.clone(), vm),
    };
    let vm_id = created_id(outcome, fallback_id);
    accepted(state, op_id, kind, vm_id, name, now)
}

#[utoipa::path(post, path = "/api/v1/vms/{vm}/start", tag = "vms",
    params(("vm" = String, Path, description = "VM name or id")),
    responses((status = 202, body = OperationAccepted,
            headers(("Location" = String, description = "/api/v1/operations/{id}"))),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn start_vm(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(vm): Path<String>,
) -> Result<Accepted, ApiError> {
    vm_action(&state, &who, vm, VmAction::Start).await
}

#[utoipa::path(post, path = "/api/v1/vms/{vm}/stop", tag = "vms",
    params(("vm" = String, Path, description = "VM name or id")),
    responses((status = 202, body = OperationAccepted,
            headers(("Location" = String, description = "/api/v1/operations/{id}"))),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn stop_vm(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(vm): Path<String>,
) -> Result<Accepted, ApiError> {
    vm_action(&state, &who, vm, VmAction::Stop).await
}

#[utoipa::path(post, path = "/api/v1/vms/{vm}/reboot", tag = "vms",
    params(("vm" = String, Path, description = "VM name or id")),
    request_body(content = Option<VmRebootRequest>, description = "optional"),
    responses((status = 202, body = OperationAccepted,
            headers(("Location" = String, description = "/api/v1/operations/{id}"))),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the VM is stopped")),
    security(("bearer" = [])))]
pub async fn reboot_vm(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(vm): Path<String>,
    body: Option<ApiJson<VmRebootRequest>>,
) -> Result<Accepted, ApiError> {
    let req = body.map(|ApiJson(b)| b).unwrap_or_default();
    vm_action(&state, &who, vm, VmAction::Reboot(req)).await
}

#[utoipa::path(post, path = "/api/v1/vms/{vm}/resize", tag = "vms",
    params(("vm" = String, Path, description = "VM name or id")),
    request_body = VmResizeRequest,
    responses((status = 202, body = OperationAccepted,
            headers(("Location" = String, description = "/api/v1/operations/{id}"))),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the VM is not stopped, or its host has no room")),
    security(("bearer" = [])))]
pub async fn resize_vm(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(vm): Path<String>,
    ApiJson(req): ApiJson<VmResizeRequest>,
) -> Result<Accepted, ApiError> {
    vm_action(&state, &who, vm, VmAction::Resize(req)).await
}

#[utoipa::path(post, path = "/api/v1/vms/{vm}/nics", tag = "vms",
    params(("vm" = String, Path, description = "VM name or id")),
    request_body = VmNicRequest,
    responses((status = 202, body = OperationAccepted,
            headers(("Location" = String, description = "/api/v1/operations/{id}"))),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody, description = "VM, network or security group unknown"),
        (status = 409, body = ErrorBody, description = "the VM is being deleted or migrated, the address or MAC is taken, or the network is full")),
    security(("bearer" = [])))]
pub async fn attach_nic(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(vm): Path<String>,
    ApiJson(req): ApiJson<VmNicRequest>,
) -> Result<Accepted, ApiError> {
    vm_action(&state, &who, vm, VmAction::AttachNic(req)).await
}

#[utoipa::path(delete, path = "/api/v1/vms/{vm}/nics/{mac}", tag = "vms",
    params(("vm" = String, Path, description = "VM name or id"),
        ("mac" = String, Path, description = "the NIC's MAC address")),
    responses((status = 202, body = OperationAccepted,
            headers(("Location" = String, description = "/api/v1/operations/{id}"))),
        (status = 400, body = ErrorBody, description = "the VM has no NIC with that MAC"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the VM is being deleted or migrated")),
    security(("bearer" = [])))]
pub async fn detach_nic(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((vm, mac)): Path<(String, String)>,
) -> Result<Accepted, ApiError> {
    vm_action(&state, &who, vm, VmAction::DetachNic(mac)).await
}

#[utoipa::path(delete, path = "/api/v1/vms/{vm}", tag = "vms",
    params(("vm" = String, Path, description = "VM name or id")),
    responses((status = 202, body = OperationAccepted,
            headers(("Location" = String, description = "/api/v1/operations/{id}"))),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_vm(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(vm): Path<String>,
) -> Result<Accepted, ApiError> {
    vm_action(&state, &who, vm, VmAction::Delete).await
}

// ---- operations ---------------------------------------------------------------------------

#[utoipa::path(get, path = "/api/v1/operations", tag = "operations",
    responses((status = 200, body = [OperationView], description = "the 200 most recent, newest first")),
    security(("bearer" = [])))]
pub async fn list_operations(State(state): State<AppState>) -> ApiResult<Vec<OperationView>> {
    let ops = read(&state, model::list::<Operation>)?;
    Ok(Json(views::recent_operations(ops, RECENT_OPERATIONS)))
}

#[utoipa::path(get, path = "/api/v1/operations/{id}", tag = "operations",
    params(("id" = String, Path, description = "operation id")),
    responses((status = 200, body = OperationView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_operation(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<OperationView> {
    let op = read(&state, |c| model::get::<Operation>(c, &id))?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "operation_unknown",
            format!("operation {id:?} does not exist (yet, on this node), or it finished longer ago than the setting compute.operation-retention-minutes keeps operations: `keel op list` shows the recent ones"),
        )
    })?;
    Ok(Json(views::operation_view(op)))
}

// ---- affinity groups ----------------------------------------------------------------------

#[utoipa::path(post, path = "/api/v1/affinity-groups", tag = "affinity-groups",
    request_body = AffinityGroupCreateRequest,
    responses((status = 201, body = AffinityGroupView), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_affinity_group(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<AffinityGroupCreateRequest>,
) -> Result<(StatusCode, Json<AffinityGroupView>), ApiError> {
    let now = now_ms();
    state
        .db
        .write(Command::Compute {
            command: ComputeCommand::CreateAffinityGroup {
                name: req.name.clone(),
                policy: views::affinity_policy(req.policy),
                now_ms: now,
            },
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(AffinityGroupView {
            name: req.name,
            policy: req.policy,
            members: vec![],
            created_at_ms: now,
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/affinity-groups", tag = "affinity-groups",
    responses((status = 200, body = [AffinityGroupView])),
    security(("bearer" = [])))]
pub async fn list_affinity_groups(
    State(state): State<AppState>,
) -> ApiResult<Vec<AffinityGroupView>> {
    let (groups, vms) = read(&state, |c| {
        Ok((model::list::<AffinityGroup>(c)?, model::list::<Vm>(c)?))
    })?;
    Ok(Json(views::affinity_group_views(groups, &vms)))
}

#[utoipa::path(delete, path = "/api/v1/affinity-groups/{name}", tag = "affinity-groups",
    params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the group still has members")),
    security(("bearer" = [])))]
pub async fn delete_affinity_group(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state
        .db
        .write(Command::Compute {
            command: ComputeCommand::DeleteAffinityGroup { name },
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> VmCreateRequest {
        serde_json::from_value(serde_json::json!({
            "name": "web-1",
            "vcpus": 2,
            "memory_mib": 2048,
            "template": "debian-12",
        }))
        .expect("minimal request")
    }

    #[test]
    fn a_minimal_create_request_takes_the_defaults() {
        let req = request();
        assert_eq!(req.boot, VmBoot::Disk);
        assert!(req.start && !req.ha);
        assert_eq!(req.stop_timeout_s, 60);
        let cmd = create_vm_command(req, "vm-1".into(), "op-1".into(), 42);
        assert_eq!(
            cmd,
            ComputeCommand::CreateVm {
                vm_id: "vm-1".into(),
                name: "web-1".into(),
                spec: VmSpec {
                    vcpus: 2,
                    memory_mib: 2048,
                    boot: BootSource::Template {
                        template: "debian-12".into()
                    },
                    root_disk_gib: None,
                    data_disks: vec![],
                    nics: vec![],
                    cloud_init: CloudInit::default(),
                    affinity_group: None,
                    ha: false,
                },
                start: true,
                stop_timeout_s: 60,
                op_id: "op-1".into(),
                now_ms: 42,
            }
        );
    }

    #[test]
    fn a_full_create_request_maps_every_field() {
        let req: VmCreateRequest = serde_json::from_value(serde_json::json!({
            "name": "db-1", "vcpus": 4, "memory_mib": 8192, "template": "installer",
            "boot": "iso", "root_disk_gib": 40, "data_disks_gib": [5, 10],
            "nics": [{"bridge": "br0"}, {"bridge": "br1", "mac": "52:54:00:aa:bb:cc"}],
            "user_data": "#cloud-config\n", "ssh_keys": ["ssh-ed25519 AAAA a"],
            "affinity_group": "dbs", "ha": true, "start": false, "stop_timeout_s": 120,
        }))
        .expect("full request");
        let ComputeCommand::CreateVm {
            spec,
            start,
            stop_timeout_s,
            ..
        } = create_vm_command(req, "v".into(), "o".into(), 1)
        else {
            panic!("not a CreateVm");
        };
        assert_eq!(
            spec.boot,
            BootSource::Iso {
                template: "installer".into()
            }
        );
        assert_eq!(spec.root_disk_gib, Some(40));
        assert_eq!(
            spec.data_disks,
            vec![DataDisk { size_gib: 5 }, DataDisk { size_gib: 10 }]
        );
        assert_eq!(
            spec.nics,
            vec![
                NicSpec {
                    bridge: "br0".into(),
                    ..Default::default()
                },
                NicSpec {
                    bridge: "br1".into(),
                    mac: Some("52:54:00:aa:bb:cc".into()),
                    ..Default::default()
                },
            ]
        );
        assert_eq!(
            spec.cloud_init.user_data.as_deref(),
            Some("#cloud-config\n")
        );
        assert_eq!(spec.cloud_init.ssh_keys, vec!["ssh-ed25519 AAAA a"]);
        assert_eq!(spec.affinity_group.as_deref(), Some("dbs"));
        assert!(spec.ha && !start);
        assert_eq!(stop_timeout_s, 120);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let bad = serde_json::from_value::<VmCreateRequest>(serde_json::json!({
            "name": "web-1", "vcpus": 2, "memory_mib": 2048, "template": "t", "cpus": 4,
        }));
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("unknown field `cpus`"));
        assert!(serde_json::from_str::<VmRebootRequest>(r#"{"forced": true}"#).is_err());
    }

    #[test]
    fn actions_map_to_their_commands() {
        let cmd = |a: VmAction| a.command("web-1".into(), "op".into(), 7);
        assert_eq!(
            cmd(VmAction::Start),
            ComputeCommand::SetVmPower {
                vm: "web-1".into(),
                power: PowerIntent::Running,
                op_id: "op".into(),
                now_ms: 7
            }
        );
        assert_eq!(
            cmd(VmAction::Stop),
            ComputeCommand::SetVmPower {
                vm: "web-1".into(),
                power: PowerIntent::Stopped,
                op_id: "op".into(),
                now_ms: 7
            }
        );
        assert_eq!(
            cmd(VmAction::Reboot(VmRebootRequest { force: true })),
            ComputeCommand::RebootVm {
                vm: "web-1".into(),
                force: true,
                op_id: "op".into(),
                now_ms: 7
            }
        );
        assert_eq!(
            cmd(VmAction::Resize(VmResizeRequest {
                vcpus: Some(4),
                memory_mib: None
            })),
            ComputeCommand::ResizeVm {
                vm: "web-1".into(),
                vcpus: Some(4),
                memory_mib: None,
                op_id: "op".into(),
                now_ms: 7
            }
        );
        assert_eq!(
            cmd(VmAction::Delete),
            ComputeCommand::DeleteVm {
                vm: "web-1".into(),
                op_id: "op".into(),
                now_ms: 7
            }
        );
    }

    #[test]
    fn nic_actions_map_to_their_commands() {
        let nic: VmNicRequest = serde_json::from_value(serde_json::json!({
            "network": "blue", "ip": "10.0.0.7", "security_groups": ["web", "ssh"],
        }))
        .expect("nic");
        assert_eq!(VmAction::AttachNic(nic.clone()).kind(), OpKind::NicAttach);
        assert_eq!(
            VmAction::AttachNic(nic).command("web-1".into(), "op".into(), 7),
            ComputeCommand::AttachNic {
                vm: "web-1".into(),
                nic: NicSpec {
                    network: Some("blue".into()),
                    ip: Some("10.0.0.7".into()),
                    security_groups: vec!["web".into(), "ssh".into()],
                    ..Default::default()
                },
                op_id: "op".into(),
                now_ms: 7,
            }
        );
        let mac = "52:54:00:aa:bb:cc".to_string();
        assert_eq!(VmAction::DetachNic(mac.clone()).kind(), OpKind::NicDetach);
        assert_eq!(
            VmAction::DetachNic(mac.clone()).command("web-1".into(), "op".into(), 7),
            ComputeCommand::DetachNic {
                vm: "web-1".into(),
                mac,
                op_id: "op".into(),
                now_ms: 7,
            }
        );
        assert!(serde_json::from_value::<VmNicRequest>(
            serde_json::json!({"network": "blue", "sg": ["web"]})
        )
        .is_err());
    }

    #[test]
    fn user_data_stays_out_of_debug_output() {
        let mut req = request();
        req.user_data = Some("password: hunter2".into());
        let text = format!("{req:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("user_data_bytes: 17"), "{text}");
    }
}

#[utoipa::path(post, path = "/api/v1/vms/{vm}/migrate", tag = "vms",
    params(("vm" = String, Path, description = "VM name or id")),
    request_body(content = Option<VmMigrateRequest>, description = "optional"),
    responses((status = 202, body = OperationAccepted,
            headers(("Location" = String, description = "/api/v1/operations/{id}"))),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the VM is busy, or no host can take it")),
    security(("bearer" = [])))]
pub async fn migrate_vm(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(vm): Path<String>,
    body: Option<ApiJson<VmMigrateRequest>>,
) -> Result<Accepted, ApiError> {
    let req = body.map(|ApiJson(b)| b).unwrap_or_default();
    let target = match req.target {
        None => None,
        Some(t) => Some(resolve_host(&state, &t)?),
    };
    vm_action(&state, &who, vm, VmAction::Migrate(target)).await
}

/// A host by numeric id or by name.
pub(crate) fn resolve_host(state: &AppState, host: &str) -> Result<u64, ApiError> {
    let hosts = read(
        state,
        keel_cluster::model::list::<keel_cluster::model::Host>,
    )?;
    hosts
        .iter()
        .find(|h| h.name == host || h.id.to_string() == host)
        .map(|h| h.id)
        .ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "host_unknown",
                format!("no host named {host:?}: `keel node list` shows the hosts"),
            )
        })
}

#[utoipa::path(post, path = "/api/v1/hosts/{host}/drain", tag = "hosts",
    params(("host" = String, Path, description = "host name or id")),
    responses((status = 200, body = HostMaintenanceView, description = "the host takes no new VMs; its VMs are being moved"),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn drain_host(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(host): Path<String>,
) -> Result<Json<HostMaintenanceView>, ApiError> {
    set_maintenance(&state, &who, &host, true).await
}

#[utoipa::path(post, path = "/api/v1/hosts/{host}/undrain", tag = "hosts",
    params(("host" = String, Path, description = "host name or id")),
    responses((status = 200, body = HostMaintenanceView, description = "the host takes VMs again"),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn undrain_host(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(host): Path<String>,
) -> Result<Json<HostMaintenanceView>, ApiError> {
    set_maintenance(&state, &who, &host, false).await
}

async fn set_maintenance(
    state: &AppState,
    who: &Principal,
    host: &str,
    maintenance: bool,
) -> Result<Json<HostMaintenanceView>, ApiError> {
    let host_id = resolve_host(state, host)?;
    tracing::info!(host_id, maintenance, principal = ?who, "host maintenance");
    state
        .db
        .write(Command::Compute {
            command: ComputeCommand::SetHostMaintenance {
                host_id,
                maintenance,
                now_ms: now_ms(),
            },
        })
        .await?;
    Ok(Json(HostMaintenanceView {
        host_id,
        maintenance,
    }))
}
