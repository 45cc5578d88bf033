//! `keel vm …`, `keel op …` and `keel template …`: VMs, the operations that track them,
//! templates and affinity groups.
//!
//! Every VM request is asynchronous on the server: it answers with an operation at once.
//! By default the commands here wait for it (polling `GET /api/v1/operations/{id}`), so
//! that `keel vm create` returns when the VM runs and fails when it cannot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use hyper::body::Bytes;
use serde_json::json;

use super::size::{format_bytes, format_mib, parse_gib, parse_mib, parse_seconds};
use crate::output::{age, fields, or_dash, print, table, Output};
use keel_api_types::*;
use keel_client::{ClientError, LocalClient};

/// How often a waiting command polls its operation.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long a just-accepted operation may be unknown to this node's replica (the write
/// committed on the leader; the local replica applies it a moment later).
const REPLICATION_GRACE: Duration = Duration::from_secs(10);
/// Upload chunk size.
const CHUNK: usize = 1 << 20;

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Return at once with the operation id instead of waiting for the operation.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for the operation (e.g. 30s, 10m).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Create a VM from a template; it starts unless --no-start.
    Create(Box<VmCreateArgs>),
    /// List the VMs.
    List,
    /// Show one VM (by name or id).
    Show { vm: String },
    /// Start a stopped VM.
    Start {
        vm: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Stop a VM: a graceful shutdown, then power-off after its stop timeout.
    Stop {
        vm: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Reboot a running VM.
    Reboot {
        vm: String,
        /// Reset the VM instead of asking the guest to reboot.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Change the vCPUs or memory of a stopped VM.
    Resize {
        vm: String,
        #[arg(long)]
        vcpus: Option<u32>,
        /// New memory size, e.g. 2G, 512M or 1024 (MiB).
        #[arg(long, value_parser = parse_mib)]
        memory: Option<u64>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Delete a VM and its disks.
    Delete {
        vm: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Move a VM to another host: live (the guest keeps running) if it runs, cold if
    /// it is stopped.
    Migrate {
        vm: String,
        /// Target host (name or id); default: where the placement rules say.
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Attach this terminal to the VM's serial console (Ctrl-] detaches).
    Console { vm: String },
    /// Add or remove NICs of a VM, running (hot-plug) or stopped.
    #[command(subcommand)]
    Nic(NicCmd),
    /// Affinity groups: keep VMs together on one host, or apart on different hosts.
    #[command(subcommand)]
    Group(GroupCmd),
}

#[derive(Debug, Subcommand)]
pub enum NicCmd {
    /// Add a NIC to a running VM (hot-plugged) or a stopped one; on a guest network it gets
    /// an address at once.
    Attach {
        vm: String,
        /// NETWORK[,ip=IP][,sg=G1+G2][,mac=MAC] on a guest network, or
        /// bridge=BRIDGE[,mac=MAC] on an existing host bridge.
        #[arg(long, value_parser = parse_nic)]
        nic: VmNicRequest,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Remove a VM's NIC (by MAC, see `keel vm show`; hot-unplugged while it runs) and free
    /// its address.
    Detach {
        vm: String,
        mac: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Debug, Args)]
pub struct VmCreateArgs {
    /// The VM's name (lowercase letters, digits and '-').
    pub name: String,
    /// Template (name or id) to boot from.
    #[arg(long)]
    pub template: String,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Memory, e.g. 512M, 2G or 1024 (MiB).
    #[arg(long, default_value = "512M", value_parser = parse_mib)]
    pub memory: u64,
    /// Boot the template as an installer ISO (needs --disk-size for the empty root disk).
    #[arg(long, conflicts_with = "initrd")]
    pub iso: bool,
    /// Boot the template as a kernel directly, with this initrd template.
    #[arg(long)]
    pub initrd: Option<String>,
    /// Kernel command line (kernel boot: the template is a kernel).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Root disk size in whole GiB, e.g. 20G (default: the template's size).
    #[arg(long, value_parser = parse_gib)]
    pub disk_size: Option<u64>,
    /// Add an empty data disk of this size (repeatable), e.g. 5G.
    #[arg(long = "data-disk", value_parser = parse_gib)]
    pub data_disks: Vec<u64>,
    /// Add a NIC (repeatable): NETWORK[,ip=IP][,sg=G1+G2][,mac=MAC] on a guest network,
    /// or bridge=BRIDGE[,mac=MAC] on an existing host bridge.
    #[arg(long = "nic", value_parser = parse_nic)]
    pub nics: Vec<VmNicRequest>,
    /// cloud-init user data file.
    #[arg(long)]
    pub user_data: Option<PathBuf>,
    /// An SSH public key, or a file of them (repeatable).
    #[arg(long = "ssh-key")]
    pub ssh_keys: Vec<String>,
    /// Affinity group to put the VM in.
    #[arg(long)]
    pub affinity_group: Option<String>,
    /// Restart the VM on another host when its host fails.
    #[arg(long)]
    pub ha: bool,
    /// Create the VM stopped.
    #[arg(long)]
    pub no_start: bool,
    /// How long a graceful stop may take before the VM is powered off.
    #[arg(long, default_value = "60s", value_parser = parse_seconds)]
    pub stop_timeout: u32,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Create an affinity group.
    Create {
        name: String,
        #[arg(long, value_enum)]
        policy: PolicyArg,
    },
    /// List the affinity groups and their members.
    List,
    /// Delete an empty affinity group.
    Delete { name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    /// Every member on the same host.
    Affinity,
    /// Every member on a different host.
    AntiAffinity,
}

impl From<PolicyArg> for GroupPolicy {
    fn from(p: PolicyArg) -> Self {
        match p {
            PolicyArg::Affinity => GroupPolicy::Affinity,
            PolicyArg::AntiAffinity => GroupPolicy::AntiAffinity,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum OpCmd {
    /// Show one operation.
    Show { id: String },
    /// List the most recent operations, newest first.
    List,
}

#[derive(Debug, Subcommand)]
pub enum TemplateCmd {
    /// Upload an image file from this machine (streamed to the node service).
    Upload {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        format: FormatArg,
        /// Expected SHA-256; computed from the file when not given, so that the server
        /// verifies the transfer either way.
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Register an image file that is already on this server (it is copied).
    Import {
        path: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        format: FormatArg,
        #[arg(long)]
        sha256: Option<String>,
    },
    /// List the templates.
    List,
    /// Show one template (by name or id).
    Show { template: String },
    /// Delete a template no VM uses.
    Delete { template: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Qcow2,
    Raw,
    Iso,
    /// A Linux kernel for direct kernel boot.
    Kernel,
    /// An initrd for direct kernel boot.
    Initrd,
}

impl From<FormatArg> for TemplateFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Qcow2 => TemplateFormat::Qcow2,
            FormatArg::Raw => TemplateFormat::Raw,
            FormatArg::Iso => TemplateFormat::Iso,
            FormatArg::Kernel => TemplateFormat::Kernel,
            FormatArg::Initrd => TemplateFormat::Initrd,
        }
    }
}

const NIC_SYNTAX: &str =
    "use NETWORK[,ip=IP][,sg=GROUP[+GROUP…]][,mac=MAC] or bridge=BRIDGE[,mac=MAC]";

/// Parses a `--nic`: `NETWORK[,ip=IP][,sg=G1+G2][,mac=MAC]` for a guest network, or
/// `bridge=BRIDGE[,mac=MAC]` for an existing host bridge.
pub fn parse_nic(text: &str) -> Result<VmNicRequest, String> {
    let mut nic = VmNicRequest {
        network: None,
        bridge: String::new(),
        mac: None,
        ip: None,
        security_groups: Vec::new(),
    };
    for (i, part) in text.split(',').enumerate() {
        let part = part.trim();
        let dup = |set: bool| {
            if set {
                Err(format!("{text:?}: {part:?} is given twice: {NIC_SYNTAX}"))
            } else {
                Ok(())
            }
        };
        match part.split_once('=') {
            None if i == 0 && !part.is_empty() => nic.network = Some(part.to_string()),
            Some(("bridge", v)) if !v.trim().is_empty() => {
                dup(!nic.bridge.is_empty())?;
                nic.bridge = v.trim().to_string();
            }
            Some(("mac", v)) if !v.trim().is_empty() => {
                dup(nic.mac.is_some())?;
                nic.mac = Some(v.trim().to_string());
            }
            Some(("ip", v)) if !v.trim().is_empty() => {
                dup(nic.ip.is_some())?;
                nic.ip = Some(v.trim().to_string());
            }
            Some(("sg", v)) if !v.trim().is_empty() => {
                dup(!nic.security_groups.is_empty())?;
                nic.security_groups = v.split('+').map(|g| g.trim().to_string()).collect();
            }
            _ => {
                return Err(format!(
                    "{text:?}: {part:?} is not understood: {NIC_SYNTAX}"
                ))
            }
        }
    }
    match (&nic.network, nic.bridge.is_empty()) {
        (Some(_), false) => Err(format!(
            "{text:?}: a NIC is on a network or on a bridge, not both: {NIC_SYNTAX}"
        )),
        (None, true) => Err(format!("{text:?} names no network: {NIC_SYNTAX}")),
        (None, false) if nic.ip.is_some() || !nic.security_groups.is_empty() => Err(format!(
            "{text:?}: ip= and sg= apply to NICs on a guest network: {NIC_SYNTAX}"
        )),
        _ => Ok(nic),
    }
}

fn looks_like_ssh_key(text: &str) -> bool {
    let t = text.trim_start();
    (t.starts_with("ssh-") || t.starts_with("ecdsa-") || t.starts_with("sk-"))
        && t.contains(char::is_whitespace)
}

/// Each `--ssh-key` is a key or a file of keys (one per line, like authorized_keys).
fn collect_ssh_keys(args: &[String]) -> anyhow::Result<Vec<String>> {
    let mut keys = Vec::new();
    for arg in args {
        if looks_like_ssh_key(arg) {
            keys.push(arg.trim().to_string());
            continue;
        }
        let text = std::fs::read_to_string(arg).with_context(|| {
            format!("--ssh-key {arg}: not an SSH public key, and not a readable file of them")
        })?;
        let before = keys.len();
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
        if keys.len() == before {
            bail!("--ssh-key {arg}: the file holds no keys");
        }
    }
    Ok(keys)
}

fn read_user_data(path: &Path) -> anyhow::Result<String> {
    let max = keel_base::MAX_USER_DATA;
    let len = std::fs::metadata(path)
        .with_context(|| format!("--user-data {}", path.display()))?
        .len();
    if len > max as u64 {
        bail!(
            "--user-data {}: {len} bytes is more than the {max} allowed",
            path.display()
        );
    }
    std::fs::read_to_string(path)
        .with_context(|| format!("--user-data {} (must be UTF-8 text)", path.display()))
}

/// The request `keel vm create` sends.
fn create_request(args: &VmCreateArgs) -> anyhow::Result<VmCreateRequest> {
    Ok(VmCreateRequest {
        name: args.name.clone(),
        vcpus: args.vcpus,
        memory_mib: args.memory,
        template: args.template.clone(),
        boot: if args.iso {
            VmBoot::Iso
        } else if args.initrd.is_some() || args.cmdline.is_some() {
            VmBoot::Kernel
        } else {
            VmBoot::Disk
        },
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        root_disk_gib: args.disk_size,
        data_disks_gib: args.data_disks.clone(),
        nics: args.nics.clone(),
        user_data: args.user_data.as_deref().map(read_user_data).transpose()?,
        ssh_keys: collect_ssh_keys(&args.ssh_keys)?,
        affinity_group: args.affinity_group.clone(),
        ha: args.ha,
        start: !args.no_start,
        stop_timeout_s: args.stop_timeout,
    })
}

fn done_message(op: &OperationView) -> String {
    let verb = match op.kind.as_str() {
        "vm-create" => "created",
        "vm-start" => "started",
        "vm-stop" => "stopped",
        "vm-reboot" => "rebooted",
        "vm-resize" => "resized",
        "vm-delete" => "deleted",
        "vm-migrate" => "migrated",
        "nic-attach" => return format!("NIC attached to VM {}.\n", op.vm_name),
        "nic-detach" => return format!("NIC detached from VM {}.\n", op.vm_name),
        other => return format!("Operation {} ({other}) succeeded.\n", op.id),
    };
    format!("VM {} {verb}.\n", op.vm_name)
}

fn describe(op: &OperationView) -> String {
    format!("operation {} ({} of {})", op.id, op.kind, op.vm_name)
}

/// Polls the operation until it is not running, at most `timeout`; progress details go to
/// stderr in table mode. Errors unless it succeeded.
async fn wait_for(
    client: &LocalClient,
    output: Output,
    mut op: OperationView,
    timeout: Duration,
) -> anyhow::Result<OperationView> {
    let started = Instant::now();
    let mut shown: Option<String> = None;
    while op.state == "running" {
        if output == Output::Table && op.detail.is_some() && op.detail != shown {
            eprintln!(
                "{}: {}",
                op.vm_name,
                op.detail.as_deref().unwrap_or_default()
            );
            shown = op.detail.clone();
        }
        if started.elapsed() >= timeout {
            bail!(
                "{} did not finish within {}{}; it goes on in the background: `keel op show {}`",
                describe(&op),
                humantime::format_duration(timeout),
                op.detail
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default(),
                op.id
            );
        }
        tokio::time::sleep(POLL_INTERVAL.min(timeout.saturating_sub(started.elapsed()))).await;
        match client.operation(&op.id).await {
            Ok(next) => op = next,
            Err(ClientError::Api { code, .. })
                if code == "operation_unknown" && started.elapsed() < REPLICATION_GRACE => {}
            Err(e) => return Err(e.into()),
        }
    }
    let detail = op.detail.as_deref().unwrap_or("no detail given");
    match op.state.as_str() {
        "succeeded" => Ok(op),
        "failed" => bail!("{} failed: {detail}", describe(&op)),
        "cancelled" => bail!("{} was cancelled: {detail}", describe(&op)),
        other => bail!("{} ended as {other:?}: {detail}", describe(&op)),
    }
}

/// Prints an accepted operation (`--no-wait`) or waits for it and prints the outcome.
async fn finish(
    client: &LocalClient,
    output: Output,
    accepted: OperationAccepted,
    wait: &WaitArgs,
) -> anyhow::Result<()> {
    if wait.no_wait {
        return print(output, &accepted, |a| format!("{}\n", a.operation.id));
    }
    let op = wait_for(client, output, accepted.operation, wait.timeout).await?;
    print(output, &op, done_message)
}

pub async fn run_vm(client: &LocalClient, output: Output, cmd: VmCmd) -> anyhow::Result<()> {
    match cmd {
        VmCmd::Create(args) => {
            let req = create_request(&args)?;
            let accepted = client.create_vm(&req).await?;
            finish(client, output, accepted, &args.wait).await
        }
        VmCmd::List => {
            let vms = client.vms().await?;
            print(output, &vms, |vms| {
                let rows = vms
                    .iter()
                    .map(|v| {
                        vec![
                            v.name.clone(),
                            v.status.clone(),
                            v.host_name
                                .clone()
                                .or(v.host_id.map(|h| h.to_string()))
                                .unwrap_or_else(|| "-".into()),
                            v.vcpus.to_string(),
                            format_mib(v.memory_mib),
                            v.template_name
                                .clone()
                                .unwrap_or_else(|| v.template_id.clone()),
                        ]
                    })
                    .collect();
                table(
                    &["NAME", "STATUS", "HOST", "VCPUS", "MEMORY", "TEMPLATE"],
                    rows,
                )
            })
        }
        VmCmd::Show { vm } => {
            let view = client.vm(&vm).await?;
            print(output, &view, vm_fields)
        }
        VmCmd::Start { vm, wait } => {
            let a = client.start_vm(&vm).await?;
            finish(client, output, a, &wait).await
        }
        VmCmd::Stop { vm, wait } => {
            let a = client.stop_vm(&vm).await?;
            finish(client, output, a, &wait).await
        }
        VmCmd::Reboot { vm, force, wait } => {
            let a = client.reboot_vm(&vm, &VmRebootRequest { force }).await?;
            finish(client, output, a, &wait).await
        }
        VmCmd::Resize {
            vm,
            vcpus,
            memory,
            wait,
        } => {
            if vcpus.is_none() && memory.is_none() {
                bail!("nothing to resize: give --vcpus and/or --memory");
            }
            let a = client
                .resize_vm(
                    &vm,
                    &VmResizeRequest {
                        vcpus,
                        memory_mib: memory,
                    },
                )
                .await?;
            finish(client, output, a, &wait).await
        }
        VmCmd::Delete { vm, wait } => {
            let a = client.delete_vm(&vm).await?;
            finish(client, output, a, &wait).await
        }
        VmCmd::Migrate { vm, to, wait } => {
            let a = client
                .migrate_vm(&vm, &VmMigrateRequest { target: to })
                .await?;
            finish(client, output, a, &wait).await
        }
        VmCmd::Nic(NicCmd::Attach { vm, nic, wait }) => {
            let a = client.attach_nic(&vm, &nic).await?;
            finish(client, output, a, &wait).await
        }
        VmCmd::Nic(NicCmd::Detach { vm, mac, wait }) => {
            let a = client.detach_nic(&vm, &mac).await?;
            finish(client, output, a, &wait).await
        }
        VmCmd::Console { .. } => bail!("the console is attached by the caller"),
        VmCmd::Group(cmd) => run_group(client, output, cmd).await,
    }
}

/// `keel node drain|undrain`: takes a host out of placement (moving its VMs away) or puts
/// it back; `drain` waits until no VM is left on the host unless told not to.
pub async fn run_drain(
    client: &LocalClient,
    output: Output,
    node: &str,
    drain: bool,
    wait: &WaitArgs,
) -> anyhow::Result<()> {
    let view = if drain {
        client.drain_host(node).await?
    } else {
        client.undrain_host(node).await?
    };
    if drain && !wait.no_wait {
        let started = Instant::now();
        let mut shown = usize::MAX;
        loop {
            let vms = client.vms().await?;
            let left: Vec<&VmView> = vms
                .iter()
                .filter(|v| v.host_id == Some(view.host_id))
                .collect();
            if left.is_empty() {
                break;
            }
            if output == Output::Table && left.len() != shown {
                eprintln!("{} VM(s) still on host {node}", left.len());
                shown = left.len();
            }
            if started.elapsed() >= wait.timeout {
                let names: Vec<&str> = left.iter().map(|v| v.name.as_str()).collect();
                bail!(
                    "host {node} still runs {} after {}: {}; the drain goes on in the background",
                    names.len(),
                    humantime::format_duration(wait.timeout),
                    names.join(", ")
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
    print(output, &view, |v| {
        if v.maintenance {
            format!("Host {node} is drained: it takes no new VMs.\n")
        } else {
            format!("Host {node} takes VMs again.\n")
        }
    })
}

/// One NIC on one line: `52:54:00:00:00:01 on blue 10.0.0.2 (sg web+ssh)` or
/// `52:54:00:00:00:02 on bridge br0`.
fn nic_text(n: &VmNicView) -> String {
    match &n.network {
        Some(net) => {
            let mut s = format!("{} on {net}", n.mac);
            if let Some(ip) = &n.ip {
                s.push_str(&format!(" {ip}"));
            }
            if !n.security_groups.is_empty() {
                s.push_str(&format!(" (sg {})", n.security_groups.join("+")));
            }
            s
        }
        None => format!("{} on bridge {}", n.mac, n.bridge),
    }
}

fn vm_fields(v: &VmDetailView) -> String {
    let vm = &v.vm;
    let host = match (&vm.host_name, vm.host_id) {
        (Some(name), Some(id)) => format!("{name} ({id})"),
        (None, Some(id)) => id.to_string(),
        _ => "-".into(),
    };
    let template = match &vm.template_name {
        Some(name) => format!("{name} ({})", vm.template_id),
        None => vm.template_id.clone(),
    };
    let observed = vm.observed.as_ref().map(|o| {
        format!(
            "{} for {} on host {} (generation {}, reported {} ago)",
            o.state,
            age(o.since_ms),
            o.host_id,
            o.generation,
            age(o.reported_at_ms)
        )
    });
    let mut rows = vec![
        ("name", vm.name.clone()),
        ("id", vm.id.clone()),
        ("status", vm.status.clone()),
        ("power", vm.power.clone()),
        ("host", host),
        ("vcpus", vm.vcpus.to_string()),
        ("memory", format_mib(vm.memory_mib)),
        ("template", template),
        (
            "boot",
            match vm.boot {
                VmBoot::Disk => "disk".into(),
                VmBoot::Iso => "iso".into(),
                VmBoot::Kernel => "kernel".into(),
            },
        ),
        (
            "root disk",
            vm.root_disk_gib
                .map_or("template size".into(), |g| format!("{g}G")),
        ),
        (
            "data disks",
            if vm.data_disks_gib.is_empty() {
                "-".into()
            } else {
                vm.data_disks_gib
                    .iter()
                    .map(|g| format!("{g}G"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        (
            "nics",
            if vm.nics.is_empty() {
                "-".into()
            } else {
                vm.nics.iter().map(nic_text).collect::<Vec<_>>().join(", ")
            },
        ),
        ("affinity group", or_dash(vm.affinity_group.as_deref())),
        ("ha", if vm.ha { "yes" } else { "no" }.into()),
        ("stop timeout", format!("{}s", vm.stop_timeout_s)),
        ("ssh keys", v.ssh_keys.len().to_string()),
        (
            "user data",
            if v.user_data_bytes == 0 {
                "-".into()
            } else {
                format!("{} bytes", v.user_data_bytes)
            },
        ),
        ("observed", or_dash(observed)),
        ("generation", vm.generation.to_string()),
        ("created", format!("{} ago", age(vm.created_at_ms))),
    ];
    if let Some(reason) = &vm.pending_reason {
        rows.push(("pending", reason.clone()));
    }
    if let Some(e) = &vm.last_error {
        rows.push(("last error", e.clone()));
    }
    if !vm.active_operations.is_empty() {
        rows.push(("operations", vm.active_operations.join(", ")));
    }
    fields(&rows)
}

async fn run_group(client: &LocalClient, output: Output, cmd: GroupCmd) -> anyhow::Result<()> {
    match cmd {
        GroupCmd::Create { name, policy } => {
            let view = client
                .create_affinity_group(&AffinityGroupCreateRequest {
                    name,
                    policy: policy.into(),
                })
                .await?;
            print(output, &view, |g| {
                format!(
                    "Affinity group {} created ({}).\n",
                    g.name,
                    g.policy.as_str()
                )
            })
        }
        GroupCmd::List => {
            let groups = client.affinity_groups().await?;
            print(output, &groups, |groups| {
                let rows = groups
                    .iter()
                    .map(|g| {
                        vec![
                            g.name.clone(),
                            g.policy.as_str().into(),
                            if g.members.is_empty() {
                                "-".into()
                            } else {
                                g.members.join(",")
                            },
                        ]
                    })
                    .collect();
                table(&["NAME", "POLICY", "MEMBERS"], rows)
            })
        }
        GroupCmd::Delete { name } => {
            client.delete_affinity_group(&name).await?;
            print(output, &json!({ "deleted": name }), |_| {
                format!("Affinity group {name} deleted.\n")
            })
        }
    }
}

pub async fn run_op(client: &LocalClient, output: Output, cmd: OpCmd) -> anyhow::Result<()> {
    match cmd {
        OpCmd::Show { id } => {
            let op = client.operation(&id).await?;
            print(output, &op, |op| {
                fields(&[
                    ("id", op.id.clone()),
                    ("kind", op.kind.clone()),
                    ("vm", format!("{} ({})", op.vm_name, op.vm_id)),
                    ("state", op.state.clone()),
                    ("detail", or_dash(op.detail.as_deref())),
                    ("created", format!("{} ago", age(op.created_at_ms))),
                    ("updated", format!("{} ago", age(op.updated_at_ms))),
                ])
            })
        }
        OpCmd::List => {
            let ops = client.operations().await?;
            print(output, &ops, |ops| {
                let rows = ops
                    .iter()
                    .map(|op| {
                        vec![
                            op.id.clone(),
                            op.kind.clone(),
                            op.vm_name.clone(),
                            op.state.clone(),
                            age(op.created_at_ms),
                            or_dash(op.detail.as_deref()),
                        ]
                    })
                    .collect();
                table(&["ID", "KIND", "VM", "STATE", "AGE", "DETAIL"], rows)
            })
        }
    }
}

fn template_fields(t: &TemplateView) -> String {
    fields(&[
        ("name", t.name.clone()),
        ("id", t.id.clone()),
        ("format", t.format.as_str().into()),
        ("size", format_bytes(t.size_bytes)),
        ("virtual size", format_bytes(t.virtual_size_bytes)),
        ("sha256", t.sha256.clone()),
        (
            "replicas",
            t.replicas
                .iter()
                .map(|h| h.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("created", format!("{} ago", age(t.created_at_ms))),
    ])
}

/// Checks what the server would refuse before the (possibly long) hashing and upload.
async fn template_precheck(client: &LocalClient, name: &str) -> anyhow::Result<()> {
    keel_base::names::check_name(name)
        .map_err(|e| anyhow::anyhow!("invalid template name: {e}"))?;
    match client.template(name).await {
        Ok(_) => bail!(
            "a template named {name:?} already exists: `keel template list` shows the templates"
        ),
        Err(ClientError::Api { code, .. }) if code == "template_unknown" => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The file as a stream of chunks; with `progress`, a percentage on stderr.
fn file_chunks(
    file: tokio::fs::File,
    len: u64,
    progress: bool,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    use tokio::io::AsyncReadExt;
    futures::stream::try_unfold(
        (file, 0u64, u64::MAX),
        move |(mut file, sent, shown)| async move {
            let mut buf = vec![0u8; CHUNK];
            let n = file.read(&mut buf).await?;
            if n == 0 {
                if progress {
                    eprintln!();
                }
                return Ok(None);
            }
            buf.truncate(n);
            let sent = sent + n as u64;
            let percent = sent.saturating_mul(100) / len.max(1);
            let shown = if progress && percent != shown {
                eprint!(
                    "\ruploading: {percent:>3}% ({} of {})",
                    format_bytes(sent),
                    format_bytes(len)
                );
                percent
            } else {
                shown
            };
            Ok(Some((Bytes::from(buf), (file, sent, shown))))
        },
    )
}

pub async fn run_template(
    client: &LocalClient,
    output: Output,
    cmd: TemplateCmd,
) -> anyhow::Result<()> {
    match cmd {
        TemplateCmd::Upload {
            file,
            name,
            format,
            sha256,
        } => {
            template_precheck(client, &name).await?;
            let meta = tokio::fs::metadata(&file)
                .await
                .with_context(|| format!("cannot read {}", file.display()))?;
            if !meta.is_file() {
                bail!("{} is not a regular file", file.display());
            }
            let len = meta.len();
            let sha256 = match sha256 {
                Some(s) => s,
                None => {
                    if output == Output::Table {
                        eprintln!("computing the SHA-256 of {}…", file.display());
                    }
                    let path = file.clone();
                    tokio::task::spawn_blocking(move || keel_client::sha256_file(&path)).await??
                }
            };
            let reader = tokio::fs::File::open(&file)
                .await
                .with_context(|| format!("cannot open {}", file.display()))?;
            let progress = output == Output::Table && {
                use std::io::IsTerminal;
                std::io::stderr().is_terminal()
            };
            let format = TemplateFormat::from(format);
            let t = client
                .upload_template(
                    &name,
                    format,
                    &sha256,
                    len,
                    file_chunks(reader, len, progress),
                )
                .await?;
            print(output, &t, |t| {
                format!(
                    "Template {} uploaded ({}, {}, id {}).\n",
                    t.name,
                    t.format.as_str(),
                    format_bytes(t.size_bytes),
                    t.id
                )
            })
        }
        TemplateCmd::Import {
            path,
            name,
            format,
            sha256,
        } => {
            let path = std::path::absolute(&path)
                .with_context(|| format!("cannot resolve {}", path.display()))?;
            let req = TemplateImportRequest {
                name,
                path: path.to_string_lossy().into_owned(),
                format: format.into(),
                sha256,
            };
            let t = client.import_template(&req).await?;
            print(output, &t, |t| {
                format!(
                    "Template {} imported ({}, {}, id {}).\n",
                    t.name,
                    t.format.as_str(),
                    format_bytes(t.size_bytes),
                    t.id
                )
            })
        }
        TemplateCmd::List => {
            let ts = client.templates().await?;
            print(output, &ts, |ts| {
                let rows = ts
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.format.as_str().into(),
                            format_bytes(t.size_bytes),
                            format_bytes(t.virtual_size_bytes),
                            t.replicas
                                .iter()
                                .map(|h| h.to_string())
                                .collect::<Vec<_>>()
                                .join(","),
                            age(t.created_at_ms),
                        ]
                    })
                    .collect();
                table(
                    &["NAME", "FORMAT", "SIZE", "VIRTUAL", "REPLICAS", "AGE"],
                    rows,
                )
            })
        }
        TemplateCmd::Show { template } => {
            let t = client.template(&template).await?;
            print(output, &t, template_fields)
        }
        TemplateCmd::Delete { template } => {
            client.delete_template(&template).await?;
            print(output, &json!({ "deleted": template }), |_| {
                format!("Template {template} deleted.\n")
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use keel_client::paths::escape;

    #[test]
    fn nics_parse() {
        let nic = |network: Option<&str>,
                   bridge: &str,
                   mac: Option<&str>,
                   ip: Option<&str>,
                   sg: &[&str]| VmNicRequest {
            network: network.map(Into::into),
            bridge: bridge.into(),
            mac: mac.map(Into::into),
            ip: ip.map(Into::into),
            security_groups: sg.iter().map(|g| g.to_string()).collect(),
        };
        assert_eq!(
            parse_nic("blue"),
            Ok(nic(Some("blue"), "", None, None, &[]))
        );
        assert_eq!(
            parse_nic("blue,ip=10.0.0.5,sg=web+ssh,mac=52:54:00:aa:bb:cc"),
            Ok(nic(
                Some("blue"),
                "",
                Some("52:54:00:aa:bb:cc"),
                Some("10.0.0.5"),
                &["web", "ssh"]
            ))
        );
        assert_eq!(
            parse_nic("bridge=br1,mac=52:54:00:aa:bb:cc"),
            Ok(nic(None, "br1", Some("52:54:00:aa:bb:cc"), None, &[]))
        );
        for bad in [
            "",
            "mac=52:54:00:aa:bb:cc",
            "blue,vlan=5",
            "blue,mac=",
            "blue,bridge=br0",
            "bridge=br0,ip=10.0.0.5",
            "blue,ip=1.2.3.4,ip=1.2.3.5",
        ] {
            assert!(parse_nic(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn escaping_keeps_names_and_encodes_the_rest() {
        assert_eq!(escape("web-1"), "web-1");
        assert_eq!(escape("a b/c?d"), "a%20b%2Fc%3Fd");
    }

    #[test]
    fn ssh_keys_are_taken_inline_or_from_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("keys.pub");
        std::fs::write(&file, "# mine\nssh-ed25519 AAAA one\n\nssh-rsa BBBB two\n").expect("write");
        let keys =
            collect_ssh_keys(&["ssh-ed25519 CCCC inline".into(), file.display().to_string()])
                .expect("keys");
        assert_eq!(
            keys,
            [
                "ssh-ed25519 CCCC inline",
                "ssh-ed25519 AAAA one",
                "ssh-rsa BBBB two"
            ]
        );
        assert!(collect_ssh_keys(&["/nonexistent/key.pub".into()]).is_err());
    }

    #[test]
    fn vm_create_flags_become_the_request() {
        let cli = crate::Cli::try_parse_from([
            "keel",
            "vm",
            "create",
            "web-1",
            "--template",
            "debian-12",
            "--vcpus",
            "2",
            "--memory",
            "2G",
            "--disk-size",
            "20G",
            "--data-disk",
            "5G",
            "--data-disk",
            "10240",
            "--nic",
            "bridge=br0",
            "--nic",
            "bridge=br1,mac=52:54:00:aa:bb:cc",
            "--ssh-key",
            "ssh-ed25519 AAAA me",
            "--affinity-group",
            "web",
            "--ha",
            "--no-start",
            "--stop-timeout",
            "2m",
            "--no-wait",
        ])
        .expect("parse");
        let crate::Cmd::Vm(VmCmd::Create(args)) = cli.command else {
            panic!("not vm create");
        };
        assert!(args.wait.no_wait);
        assert_eq!(args.wait.timeout, Duration::from_secs(600));
        let req = create_request(&args).expect("request");
        assert_eq!(
            serde_json::to_value(&req).expect("json"),
            json!({
                "name": "web-1", "vcpus": 2, "memory_mib": 2048, "template": "debian-12",
                "boot": "disk", "root_disk_gib": 20, "data_disks_gib": [5, 10],
                "nics": [{"bridge": "br0"}, {"bridge": "br1", "mac": "52:54:00:aa:bb:cc"}],
                "ssh_keys": ["ssh-ed25519 AAAA me"], "affinity_group": "web", "ha": true,
                "start": false, "stop_timeout_s": 120,
            })
        );
    }

    #[test]
    fn vm_create_defaults() {
        let cli = crate::Cli::try_parse_from(["keel", "vm", "create", "web-1", "--template", "t"])
            .expect("parse");
        let crate::Cmd::Vm(VmCmd::Create(args)) = cli.command else {
            panic!("not vm create");
        };
        let req = create_request(&args).expect("request");
        assert_eq!((req.vcpus, req.memory_mib), (1, 512));
        assert!(req.start && !args.wait.no_wait);
        assert_eq!(req.stop_timeout_s, 60);
        assert!(crate::Cli::try_parse_from([
            "keel",
            "vm",
            "create",
            "web-1",
            "--template",
            "t",
            "--memory",
            "lots",
        ])
        .is_err());
    }

    #[test]
    fn nic_commands_parse() {
        let cli = crate::Cli::try_parse_from([
            "keel",
            "vm",
            "nic",
            "attach",
            "web-1",
            "--nic",
            "blue,ip=10.0.0.9,sg=web",
        ])
        .expect("parse");
        let crate::Cmd::Vm(VmCmd::Nic(NicCmd::Attach { vm, nic, wait })) = cli.command else {
            panic!("not vm nic attach");
        };
        assert_eq!(vm, "web-1");
        assert_eq!(nic.network.as_deref(), Some("blue"));
        assert_eq!(nic.ip.as_deref(), Some("10.0.0.9"));
        assert_eq!(nic.security_groups, ["web"]);
        assert!(!wait.no_wait);
        let cli = crate::Cli::try_parse_from([
            "keel",
            "vm",
            "nic",
            "detach",
            "web-1",
            "52:54:00:aa:bb:cc",
            "--no-wait",
        ])
        .expect("parse");
        let crate::Cmd::Vm(VmCmd::Nic(NicCmd::Detach { mac, wait, .. })) = cli.command else {
            panic!("not vm nic detach");
        };
        assert_eq!(mac, "52:54:00:aa:bb:cc");
        assert!(wait.no_wait);
        assert!(crate::Cli::try_parse_from(["keel", "vm", "nic", "attach", "web-1"]).is_err());
        assert!(escape("52:54:00:aa:bb:cc").starts_with("52%3A54"));
    }

    #[test]
    fn nics_are_shown_with_their_network() {
        let nic = |network: Option<&str>, ip: Option<&str>, sg: &[&str]| VmNicView {
            bridge: "kbr4096".into(),
            mac: "52:54:00:00:00:01".into(),
            network: network.map(Into::into),
            network_id: network.map(|_| "n-1".into()),
            ip: ip.map(Into::into),
            security_groups: sg.iter().map(|g| g.to_string()).collect(),
        };
        assert_eq!(
            nic_text(&nic(Some("blue"), Some("10.0.0.2"), &["web", "ssh"])),
            "52:54:00:00:00:01 on blue 10.0.0.2 (sg web+ssh)"
        );
        assert_eq!(
            nic_text(&nic(None, None, &[])),
            "52:54:00:00:00:01 on bridge kbr4096"
        );
    }

    #[test]
    fn done_messages_name_the_vm() {
        let op = OperationView {
            id: "op".into(),
            kind: "vm-create".into(),
            vm_id: "id".into(),
            vm_name: "web-1".into(),
            state: "succeeded".into(),
            detail: None,
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        assert_eq!(done_message(&op), "VM web-1 created.\n");
        assert_eq!(describe(&op), "operation op (vm-create of web-1)");
    }
}
