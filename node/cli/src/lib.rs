//! The `keel` command line. Every command but `serve` talks to the node service on this
//! server through its admin socket (`--socket`, default /run/keel/keel.sock).
//!
//! VMs, operations and templates live in [`compute`]; guest networks, security groups
//! and node network roles in [`network`]; size and duration parsers in [`size`].

mod compute;
mod floating;
mod network;
mod output;
mod size;

pub use output::Output;
use output::{print, table};

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use keel_api_types::*;
use keel_client::LocalClient;
use keel_node::config::{LogFormat, NodeConfig, DEFAULT_SOCKET};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "keel", version, about = "Keel node service and cluster CLI")]
pub struct Cli {
    /// Admin socket of the node service on this server.
    #[arg(long, global = true, env = "KEEL_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the node service in the foreground.
    Serve(ServeArgs),
    /// Create, join and inspect the cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Inspect and remove nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Create and manage virtual machines and affinity groups.
    #[command(subcommand)]
    Vm(compute::VmCmd),
    /// Follow the asynchronous operations VM requests start.
    #[command(subcommand)]
    Op(compute::OpCmd),
    /// Upload, import and manage the disk images VMs boot from.
    #[command(subcommand)]
    Template(compute::TemplateCmd),
    /// Create and inspect guest networks (isolated VXLAN segments with DHCP and DNS).
    #[command(subcommand)]
    Net(network::NetCmd),
    /// Security groups: the allow rules of VM NICs on guest networks.
    #[command(subcommand)]
    Sg(network::SgCmd),
    /// Floating IPs: public addresses NATed to VMs on external networks.
    #[command(subcommand)]
    Fip(floating::FipCmd),
    /// Tools for benchmarks (built with the `bench` feature only).
    #[cfg(feature = "bench")]
    #[command(subcommand, hide = true)]
    Debug(DebugCmd),
}

#[cfg(feature = "bench")]
#[derive(Debug, Subcommand)]
pub enum DebugCmd {
    /// Time writes proposed straight to raft inside the node service (no HTTP, no TLS).
    BenchRaft {
        #[arg(long, default_value_t = 200)]
        count: u32,
        #[arg(long, default_value_t = 1)]
        concurrency: u32,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// ip:port of the mTLS peer (raft) endpoint; must be reachable by the other servers.
    #[arg(long)]
    pub peer_addr: Option<SocketAddr>,
    /// ip:port of the HTTPS API.
    #[arg(long)]
    pub api_addr: Option<SocketAddr>,
    /// Node name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Vote in the cluster but never run workloads (for 2-server sites).
    #[arg(long)]
    pub witness: bool,
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Create a new cluster with this server as its first node.
    Init {
        #[arg(long, default_value = "keel")]
        name: String,
        #[arg(long, default_value = "zone1")]
        zone: String,
        #[arg(long, default_value = "cluster1")]
        compute_cluster: String,
    },
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Join this server to a cluster with a token from `keel cluster token create`.
    /// Without TOKEN (or with `-`) the token is read from standard input, which keeps it
    /// out of the process list.
    Join { token: Option<String> },
    /// Show the cluster as this node sees it.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a single-use join token.
    Create {
        /// How long it stays valid (e.g. 10m, 2h; at most 7d).
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List the nodes with their health and raft role.
    List,
    /// Show one node (by id or name): health, resources, hypervisor, guest networks and
    /// the host's systemd units.
    Show { node: String },
    /// Remove a node (by id or name) from the cluster.
    Remove { node: String },
    /// Take a node out of placement and move its VMs to other nodes (live if running).
    Drain {
        node: String,
        #[command(flatten)]
        wait: compute::WaitArgs,
    },
    /// Let a drained node take VMs again.
    Undrain { node: String },
    /// Which interface of a node carries management, storage, guest-underlay and public
    /// traffic.
    #[command(subcommand)]
    Network(network::NodeNetworkCmd),
}

impl ServeArgs {
    pub fn into_config(
        self,
        socket: PathBuf,
        socket_given: bool,
    ) -> Result<NodeConfig, keel_node::config::ConfigError> {
        let mut config = match &self.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        if let Some(v) = self.data_dir {
            config.data_dir = v;
        }
        if let Some(v) = self.peer_addr {
            config.peer_addr = v;
        }
        if let Some(v) = self.api_addr {
            config.api_addr = v;
        }
        if let Some(v) = self.name {
            config.name = Some(v);
        }
        if self.witness {
            config.witness = true;
        }
        if let Some(v) = self.log_format {
            config.log_format = v;
        }
        if socket_given || self.config.is_none() {
            config.socket = socket;
        }
        Ok(config)
    }
}

/// Runs a client command and prints its result.
pub async fn run_client(socket: PathBuf, output: Output, command: Cmd) -> anyhow::Result<()> {
    let client = LocalClient::new(&socket);
    match command {
        Cmd::Serve(_) => unreachable!("serve is dispatched by main"),
        Cmd::Cluster(ClusterCmd::Init {
            name,
            zone,
            compute_cluster,
        }) => {
            let reply = client
                .init(&InitRequest {
                    name,
                    zone,
                    compute_cluster,
                })
                .await?;
            print(output, &reply, |r| {
                format!(
                    "Cluster {} initialised; this is node {}.\n\nAdmin token (shown once, store it safely):\n  {}\n\nAPI:            https://{}\nCA fingerprint: sha256:{}\n",
                    r.cluster_id, r.node_id, r.admin_token, r.api_addr, r.ca_fingerprint
                )
            })
        }
        Cmd::Cluster(ClusterCmd::Token(TokenCmd::Create { ttl })) => {
            let reply = client
                .create_token(&CreateTokenRequest { ttl: Some(ttl) })
                .await?;
            print(output, &reply, |r| {
                format!(
                    "{}\n\nSingle use; expires at {} (ms since epoch). On the new server run:\n  keel cluster join <token>\n",
                    r.token, r.expires_at_ms
                )
            })
        }
        Cmd::Cluster(ClusterCmd::Join { token }) => {
            let token = match token.as_deref() {
                None | Some("-") => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    let line = line.trim().to_string();
                    if line.is_empty() {
                        anyhow::bail!(
                            "no join token given: pass it as an argument or on standard input"
                        );
                    }
                    line
                }
                Some(t) => t.to_string(),
            };
            let reply = client.join(&LocalJoinRequest { token }).await?;
            print(output, &reply, |r| {
                format!("Joined cluster {} as node {}.\n", r.cluster_id, r.node_id)
            })
        }
        Cmd::Cluster(ClusterCmd::Status) => {
            let view = client.cluster().await?;
            print(output, &view, |v| {
                let mut out = format!(
                    "cluster  {}\nnode     {}  ({})\nleader   {}\nterm     {}\napplied  {}\n\n",
                    v.cluster_id.as_deref().unwrap_or("-"),
                    v.node_id.map_or("-".into(), |n| n.to_string()),
                    v.state,
                    v.leader_id.map_or("-".into(), |n| n.to_string()),
                    v.term,
                    v.last_applied.map_or("-".into(), |n| n.to_string()),
                );
                let rows = v
                    .members
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.to_string(),
                            m.name.clone(),
                            m.role.clone(),
                            m.peer_addr.clone(),
                            m.api_addr.clone(),
                        ]
                    })
                    .collect();
                out.push_str(&table(&["ID", "NAME", "ROLE", "PEER", "API"], rows));
                out
            })
        }
        Cmd::Node(NodeCmd::List) => {
            let hosts = client.hosts().await?;
            print(output, &hosts, |hosts| {
                let rows = hosts
                    .iter()
                    .map(|h| {
                        vec![
                            h.id.to_string(),
                            h.name.clone(),
                            h.health.clone(),
                            format!("{}{}", h.role, if h.leader { " (leader)" } else { "" }),
                            if h.witness {
                                "witness".into()
                            } else {
                                "compute".into()
                            },
                            h.api_addr.clone(),
                            h.inventory.as_ref().map_or("-".into(), |i| {
                                format!("{} cpu / {} MiB", i.cpus, i.memory_bytes >> 20)
                            }),
                        ]
                    })
                    .collect();
                table(
                    &["ID", "NAME", "HEALTH", "ROLE", "KIND", "API", "RESOURCES"],
                    rows,
                )
            })
        }
        Cmd::Node(NodeCmd::Show { node }) => {
            let hosts = client.hosts().await?;
            let host = find_host(&hosts, &node)?;
            print(output, host, node_text)
        }
        Cmd::Vm(compute::VmCmd::Console { vm }) => keel_client::console::attach(&socket, &vm).await,
        Cmd::Vm(cmd) => compute::run_vm(&client, output, cmd).await,
        Cmd::Node(NodeCmd::Drain { node, wait }) => {
            compute::run_drain(&client, output, &node, true, &wait).await
        }
        Cmd::Node(NodeCmd::Undrain { node }) => {
            let wait = compute::WaitArgs {
                no_wait: true,
                timeout: std::time::Duration::ZERO,
            };
            compute::run_drain(&client, output, &node, false, &wait).await
        }
        Cmd::Node(NodeCmd::Network(cmd)) => network::run_node_network(&client, output, cmd).await,
        Cmd::Net(cmd) => network::run_net(&client, output, cmd).await,
        Cmd::Sg(cmd) => network::run_sg(&client, output, cmd).await,
        Cmd::Fip(cmd) => floating::run(&client, output, cmd).await,
        Cmd::Op(cmd) => compute::run_op(&client, output, cmd).await,
        Cmd::Template(cmd) => compute::run_template(&client, output, cmd).await,
        #[cfg(feature = "bench")]
        Cmd::Debug(DebugCmd::BenchRaft { count, concurrency }) => {
            let reply = client
                .bench_raft(&RaftBenchRequest { count, concurrency })
                .await?;
            print(output, &reply, |r| {
                format!(
                    "{} writes in {} us, {} errors\n",
                    r.latencies_us.len(),
                    r.elapsed_us,
                    r.errors
                )
            })
        }
        Cmd::Node(NodeCmd::Remove { node }) => {
            let id = match node.parse::<u64>() {
                Ok(id) => id,
                Err(_) => {
                    let hosts = client.hosts().await?;
                    hosts
                        .iter()
                        .find(|h| h.name == node)
                        .map(|h| h.id)
                        .ok_or_else(|| {
                            anyhow::anyhow!("no node named {node:?}: see `keel node list`")
                        })?
                }
            };
            client.remove_host(id).await?;
            print(output, &json!({"removed": id}), |_| {
                format!("Node {id} removed.\n")
            })
        }
    }
}

/// The node `node` names: its id or its name.
fn find_host<'a>(hosts: &'a [HostView], node: &str) -> anyhow::Result<&'a HostView> {
    hosts
        .iter()
        .find(|h| h.id.to_string() == node)
        .or_else(|| hosts.iter().find(|h| h.name == node))
        .ok_or_else(|| anyhow::anyhow!("no node {node:?}: see `keel node list`"))
}

/// `keel node show`: the node's fields, then its host units.
fn node_text(h: &HostView) -> String {
    use output::{age, fields, or_dash};
    let mut rows = vec![
        ("name", h.name.clone()),
        ("id", h.id.to_string()),
        (
            "health",
            format!("{} for {}", h.health, age(h.health_since_ms)),
        ),
        (
            "role",
            format!("{}{}", h.role, if h.leader { " (leader)" } else { "" }),
        ),
        ("kind", if h.witness { "witness" } else { "compute" }.into()),
        ("zone", format!("{} / {}", h.zone, h.compute_cluster)),
        ("peer", h.peer_addr.clone()),
        ("api", h.api_addr.clone()),
        ("drained", if h.maintenance { "yes" } else { "no" }.into()),
    ];
    let Some(i) = &h.inventory else {
        rows.push(("inventory", "not reported yet".into()));
        return fields(&rows);
    };
    rows.push((
        "resources",
        format!(
            "{} cpu / {} MiB ({})",
            i.cpus,
            i.memory_bytes >> 20,
            i.cpu_model
        ),
    ));
    rows.push(("kernel", i.kernel.clone()));
    rows.push(("keel", i.keel_version.clone()));
    rows.push((
        "kvm",
        match i.kvm_usable {
            Some(true) => "usable".into(),
            Some(false) => format!("not usable: {}", i.kvm_detail),
            None => or_dash(Some(&i.kvm_detail).filter(|d| !d.is_empty())),
        },
    ));
    if let Some(hv) = &i.hypervisor {
        rows.push((
            "hypervisor",
            match &hv.error {
                Some(e) => format!("error: {e}"),
                None => format!("{}, libvirt {}", hv.domain_type, hv.libvirt_version),
            },
        ));
    }
    if let Some(n) = &i.network {
        let vnis = n.vnis.iter().map(u32::to_string).collect::<Vec<_>>();
        rows.push((
            "networks",
            format!(
                "{} built{}",
                n.vnis.len(),
                if vnis.is_empty() {
                    String::new()
                } else {
                    format!(" (VNI {})", vnis.join(", "))
                }
            ),
        ));
        for e in &n.errors {
            rows.push(("network error", e.clone()));
        }
    }
    rows.push((
        "host units",
        match &i.host_units {
            None => "not managed (no systemd, or [host] systemd = \"off\")".into(),
            Some(units) if units.is_empty() => "none configured".into(),
            Some(units) => {
                let down = units.iter().filter(|u| u.error.is_some()).count();
                if down == 0 {
                    format!("{} running", units.len())
                } else {
                    format!("{} of {} with problems", down, units.len())
                }
            }
        },
    ));
    rows.push((
        "reported",
        i.reported_at_ms
            .map_or("-".into(), |t| format!("{} ago", age(t))),
    ));
    let mut out = fields(&rows);
    if let Some(units) = i.host_units.as_ref().filter(|u| !u.is_empty()) {
        out.push('\n');
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        let rows = units
            .iter()
            .map(|u| {
                vec![
                    u.unit.clone(),
                    dash(&u.load_state),
                    dash(&u.active_state),
                    dash(&u.sub_state),
                    or_dash(u.error.as_deref()),
                ]
            })
            .collect();
        out.push_str(&table(&["UNIT", "LOAD", "ACTIVE", "SUB", "ERROR"], rows));
    }
    out
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=warn,h2=warn,tower=warn,hyper=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Entry point of the `keel` binary.
pub fn main() -> ExitCode {
    let socket_given = std::env::args().any(|a| a == "--socket" || a.starts_with("--socket="))
        || std::env::var_os("KEEL_SOCKET").is_some();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keel: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async move {
        match cli.command {
            Cmd::Serve(args) => {
                let config = args.into_config(cli.socket, socket_given)?;
                init_tracing(config.log_format);
                keel_node::service::serve(config).await?;
                Ok(())
            }
            command => run_client(cli.socket, cli.output, command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            let mut line = String::new();
            for part in chain {
                if !line.contains(&part) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&part);
                }
            }
            // One line, on stderr only: scripts and tests read it, and a tracing record of
            // the same text would say it twice.
            eprintln!("keel: error: {line}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(host_units: Option<Vec<HostUnitView>>) -> HostView {
        HostView {
            id: 2,
            name: "node2".into(),
            zone: "zone1".into(),
            compute_cluster: "cluster1".into(),
            peer_addr: "10.0.0.12:7400".into(),
            api_addr: "10.0.0.12:8443".into(),
            witness: false,
            health: "up".into(),
            health_since_ms: 0,
            role: "voter".into(),
            leader: false,
            joined_at_ms: 0,
            maintenance: false,
            inventory: Some(InventoryView {
                hostname: "node2".into(),
                kernel: "6.1.0".into(),
                cpus: 4,
                cpu_model: "QEMU".into(),
                memory_bytes: 8 << 30,
                disks: vec![],
                nics: vec![],
                kvm_device_present: true,
                kvm_usable: Some(true),
                kvm_detail: String::new(),
                keel_version: "0.1.0".into(),
                reported_at_ms: Some(0),
                hypervisor: None,
                network: Some(NetworkReportView {
                    vnis: vec![4096],
                    errors: vec!["network blue: dnsmasq: exited".into()],
                }),
                host_units,
            }),
        }
    }

    #[test]
    fn node_show_prints_host_units_and_their_errors() {
        let text = node_text(&host(Some(vec![
            HostUnitView {
                unit: "libvirtd.service".into(),
                load_state: "loaded".into(),
                active_state: "active".into(),
                sub_state: "running".into(),
                error: None,
            },
            HostUnitView {
                unit: "ceph-mon@node2.service".into(),
                load_state: "not-found".into(),
                active_state: "inactive".into(),
                sub_state: "dead".into(),
                error: Some("systemd has no such unit".into()),
            },
        ])));
        assert!(
            text.contains("host units     1 of 2 with problems"),
            "{text}"
        );
        assert!(
            text.contains("network error  network blue: dnsmasq: exited"),
            "{text}"
        );
        let table_lines: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("UNIT"))
            .collect();
        assert_eq!(table_lines.len(), 3, "{text}");
        let cells = |line: &str| {
            line.split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(table_lines[1]),
            ["libvirtd.service", "loaded", "active", "running", "-"],
            "{text}"
        );
        assert_eq!(
            cells(table_lines[2])[..4],
            ["ceph-mon@node2.service", "not-found", "inactive", "dead"],
            "{text}"
        );
        assert!(
            table_lines[2].ends_with("  systemd has no such unit"),
            "{text}"
        );

        let text = node_text(&host(None));
        assert!(text.contains("host units     not managed"), "{text}");
        assert!(!text.contains("UNIT"), "{text}");
    }

    #[test]
    fn nodes_are_found_by_id_or_name() {
        let hosts = vec![host(None)];
        assert_eq!(find_host(&hosts, "2").expect("id").name, "node2");
        assert_eq!(find_host(&hosts, "node2").expect("name").id, 2);
        assert!(find_host(&hosts, "node9").is_err());
    }
}
