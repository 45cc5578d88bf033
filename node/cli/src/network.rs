//! `keel net …`, `keel sg …` and `keel node network …`: guest networks, security groups
//! and their rules, and the roles of each node's interfaces. NIC attach and detach are
//! VM commands (`keel vm nic …`, in [`super::compute`]).

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use crate::output::{age, fields, or_dash, print, table, Output};
use keel_api_types::*;
use keel_client::LocalClient;

#[derive(Debug, Subcommand)]
pub enum NetCmd {
    /// Create a guest network: an isolated VXLAN segment with DHCP, DNS and a gateway on
    /// every node that runs one of its VMs.
    Create {
        /// The network's name (lowercase letters, digits and '-').
        name: String,
        /// Its prefix, e.g. 10.0.0.0/24 (/8 to /29).
        #[arg(long)]
        cidr: String,
        /// The gateway address (default: the first address of the CIDR).
        #[arg(long)]
        gateway: Option<String>,
        /// Guests get `<vm>.<domain>` (default: `<name>.internal`).
        #[arg(long)]
        dns_domain: Option<String>,
        /// The guests' MTU (default and most: the underlay's MTU minus 50).
        #[arg(long)]
        mtu: Option<u32>,
        /// Let guests reach the outside through SNAT on the nodes' public network.
        #[arg(long)]
        external: bool,
    },
    /// List the guest networks.
    List,
    /// Show one network (by name or id) and the addresses it has leased.
    Show { network: String },
    /// Delete a network no VM has a NIC on.
    Delete { network: String },
}

#[derive(Debug, Subcommand)]
pub enum SgCmd {
    /// Create an empty security group (a NIC in it accepts no inbound traffic until a
    /// rule allows some).
    Create { name: String },
    /// List the security groups.
    List,
    /// Show one security group (by name or id) with its rules.
    Show { group: String },
    /// Delete a security group no NIC and no other group's rule uses.
    Delete { group: String },
    /// Add and delete the allow rules of a group.
    #[command(subcommand)]
    Rule(RuleCmd),
}

#[derive(Debug, Subcommand)]
pub enum RuleCmd {
    /// Allow some traffic to (ingress) or from (egress) the NICs of a group.
    Add(RuleAddArgs),
    /// Delete a rule by id, or by a unique prefix of at least 4 characters.
    Delete { group: String, rule: String },
}

#[derive(Debug, Args)]
pub struct RuleAddArgs {
    /// The security group (name or id).
    pub group: String,
    #[arg(long, value_enum, default_value_t = DirectionArg::Ingress)]
    pub direction: DirectionArg,
    #[arg(long, value_enum)]
    pub protocol: ProtocolArg,
    /// A port or a range, e.g. 22 or 8000-8100 (tcp and udp only; default: every port).
    #[arg(long, value_parser = parse_ports)]
    pub port: Option<PortRange>,
    /// The other end's addresses, e.g. 192.0.2.0/24 (default: 0.0.0.0/0, anywhere).
    #[arg(long, conflicts_with = "remote_group")]
    pub remote: Option<String>,
    /// The other end: the NICs of this security group (name or id).
    #[arg(long)]
    pub remote_group: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DirectionArg {
    Ingress,
    Egress,
}

impl From<DirectionArg> for RuleDirection {
    fn from(d: DirectionArg) -> Self {
        match d {
            DirectionArg::Ingress => RuleDirection::Ingress,
            DirectionArg::Egress => RuleDirection::Egress,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    Tcp,
    Udp,
    Icmp,
    Any,
}

impl From<ProtocolArg> for RuleProtocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::Tcp => RuleProtocol::Tcp,
            ProtocolArg::Udp => RuleProtocol::Udp,
            ProtocolArg::Icmp => RuleProtocol::Icmp,
            ProtocolArg::Any => RuleProtocol::Any,
        }
    }
}

/// Ports `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

/// Parses `22` or `8000-8100`.
pub fn parse_ports(text: &str) -> Result<PortRange, String> {
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{text:?}: {p:?} is not a port 1-65535"))
    };
    let (min, max) = match text.split_once('-') {
        None => {
            let p = port(text)?;
            (p, p)
        }
        Some((lo, hi)) => (port(lo)?, port(hi)?),
    };
    if min > max {
        return Err(format!(
            "{text:?}: a range goes from low to high, e.g. {max}-{min}"
        ));
    }
    Ok(PortRange { min, max })
}

/// The request `keel sg rule add` sends.
pub fn rule_request(args: &RuleAddArgs) -> SecurityRuleCreateRequest {
    SecurityRuleCreateRequest {
        direction: args.direction.into(),
        protocol: args.protocol.into(),
        port_min: args.port.map(|p| p.min),
        port_max: args.port.map(|p| p.max),
        remote_cidr: args.remote.clone(),
        remote_group: args.remote_group.clone(),
    }
}

#[derive(Debug, Subcommand)]
pub enum NodeNetworkCmd {
    /// Show which interface of a node carries each role (management, storage,
    /// guest-underlay, public).
    List { node: String },
    /// Give an interface of a node a role. The address must already be configured on it.
    Set {
        node: String,
        #[arg(value_enum)]
        role: RoleArg,
        #[arg(long)]
        interface: String,
        /// The node's address on it, with its prefix, e.g. 192.0.2.10/24.
        #[arg(long)]
        address: String,
        /// The next hop to the outside (public role only).
        #[arg(long)]
        gateway: Option<String>,
    },
    /// Take a role back (management and guest-underlay fall back to the interface of the
    /// node's peer address).
    Clear {
        node: String,
        #[arg(value_enum)]
        role: RoleArg,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// The cluster's own traffic: raft, the API, migrations.
    Management,
    /// Storage replication.
    Storage,
    /// The VXLAN of the guest networks.
    GuestUnderlay,
    /// Outside access: SNAT of external networks.
    Public,
}

impl RoleArg {
    fn path(self) -> &'static str {
        match self {
            RoleArg::Management => "management",
            RoleArg::Storage => "storage",
            RoleArg::GuestUnderlay => "guest-underlay",
            RoleArg::Public => "public",
        }
    }
}

/// Rule ids are UUIDs; tables show this much, which `keel sg rule delete` accepts.
const SHORT_ID: usize = 8;

fn short(id: &str) -> &str {
    id.get(..SHORT_ID).unwrap_or(id)
}

fn ports_text(r: &SecurityRuleView) -> String {
    match (r.port_min, r.port_max) {
        (Some(lo), Some(hi)) if lo != hi => format!("{lo}-{hi}"),
        (Some(lo), _) => lo.to_string(),
        _ => "all".into(),
    }
}

fn remote_text(r: &SecurityRuleView) -> String {
    match (&r.remote_cidr, &r.remote_group) {
        (Some(cidr), _) => cidr.clone(),
        (None, Some(group)) => format!("sg {group}"),
        (None, None) => "-".into(),
    }
}

fn rule_text(r: &SecurityRuleView) -> String {
    format!(
        "{} {} {} {} {}",
        r.direction.as_str(),
        r.protocol.as_str(),
        ports_text(r),
        if r.direction == RuleDirection::Ingress {
            "from"
        } else {
            "to"
        },
        remote_text(r)
    )
}

fn network_fields(n: &NetworkView) -> String {
    fields(&[
        ("name", n.name.clone()),
        ("id", n.id.clone()),
        ("cidr", n.cidr.clone()),
        ("gateway", n.gateway.clone()),
        ("dns domain", n.dns_domain.clone()),
        ("vni", n.vni.to_string()),
        ("mtu", n.mtu.to_string()),
        ("external", if n.external { "yes" } else { "no" }.into()),
        ("ports", n.ports.to_string()),
        ("created", format!("{} ago", age(n.created_at_ms))),
    ])
}

fn network_detail(d: &NetworkDetailView) -> String {
    let mut out = network_fields(&d.network);
    out.push('\n');
    if d.leases.is_empty() {
        out.push_str("No addresses leased.\n");
        return out;
    }
    let rows = d
        .leases
        .iter()
        .map(|l| {
            vec![
                l.ip.clone(),
                l.mac.clone(),
                l.vm_name.clone().unwrap_or_else(|| l.vm_id.clone()),
                l.host_name
                    .clone()
                    .or(l.host_id.map(|h| h.to_string()))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(&["IP", "MAC", "VM", "HOST"], rows));
    out
}

fn group_detail(g: &SecurityGroupView) -> String {
    let mut out = fields(&[
        ("name", g.name.clone()),
        ("id", g.id.clone()),
        (
            "vms",
            or_dash((!g.vms.is_empty()).then(|| g.vms.join(", "))),
        ),
        ("revision", g.revision.to_string()),
        ("created", format!("{} ago", age(g.created_at_ms))),
    ]);
    out.push('\n');
    if g.rules.is_empty() {
        out.push_str("No rules: inbound traffic is dropped, outbound allowed.\n");
        return out;
    }
    let rows = g
        .rules
        .iter()
        .map(|r| {
            vec![
                short(&r.id).to_string(),
                r.direction.as_str().into(),
                r.protocol.as_str().into(),
                ports_text(r),
                remote_text(r),
            ]
        })
        .collect();
    out.push_str(&table(
        &["RULE", "DIRECTION", "PROTOCOL", "PORTS", "REMOTE"],
        rows,
    ));
    out
}

pub async fn run_net(client: &LocalClient, output: Output, cmd: NetCmd) -> anyhow::Result<()> {
    match cmd {
        NetCmd::Create {
            name,
            cidr,
            gateway,
            dns_domain,
            mtu,
            external,
        } => {
            let req = NetworkCreateRequest {
                name,
                cidr,
                gateway,
                dns_domain,
                mtu,
                external,
            };
            let n = client.create_network(&req).await?;
            print(output, &n, |n| {
                format!(
                    "Network {} created: {}, gateway {}, VNI {}, MTU {}.\n",
                    n.name, n.cidr, n.gateway, n.vni, n.mtu
                )
            })
        }
        NetCmd::List => {
            let nets = client.networks().await?;
            print(output, &nets, |nets| {
                let rows = nets
                    .iter()
                    .map(|n| {
                        vec![
                            n.name.clone(),
                            n.cidr.clone(),
                            n.gateway.clone(),
                            n.vni.to_string(),
                            n.mtu.to_string(),
                            if n.external { "yes" } else { "no" }.into(),
                            n.ports.to_string(),
                            n.dns_domain.clone(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "NAME", "CIDR", "GATEWAY", "VNI", "MTU", "EXTERNAL", "PORTS", "DNS",
                    ],
                    rows,
                )
            })
        }
        NetCmd::Show { network } => {
            let d = client.network(&network).await?;
            print(output, &d, network_detail)
        }
        NetCmd::Delete { network } => {
            client.delete_network(&network).await?;
            print(output, &json!({ "deleted": network }), |_| {
                format!("Network {network} deleted.\n")
            })
        }
    }
}

pub async fn run_sg(client: &LocalClient, output: Output, cmd: SgCmd) -> anyhow::Result<()> {
    match cmd {
        SgCmd::Create { name } => {
            let g = client
                .create_security_group(&SecurityGroupCreateRequest { name })
                .await?;
            print(output, &g, |g| {
                format!(
                    "Security group {} created; add rules with `keel sg rule add {} …`.\n",
                    g.name, g.name
                )
            })
        }
        SgCmd::List => {
            let groups = client.security_groups().await?;
            print(output, &groups, |groups| {
                let rows = groups
                    .iter()
                    .map(|g| {
                        vec![
                            g.name.clone(),
                            g.rules.len().to_string(),
                            or_dash((!g.vms.is_empty()).then(|| g.vms.join(","))),
                            age(g.created_at_ms),
                        ]
                    })
                    .collect();
                table(&["NAME", "RULES", "VMS", "AGE"], rows)
            })
        }
        SgCmd::Show { group } => {
            let g = client.security_group(&group).await?;
            print(output, &g, group_detail)
        }
        SgCmd::Delete { group } => {
            client.delete_security_group(&group).await?;
            print(output, &json!({ "deleted": group }), |_| {
                format!("Security group {group} deleted.\n")
            })
        }
        SgCmd::Rule(RuleCmd::Add(args)) => {
            let req = rule_request(&args);
            let r = client.add_security_rule(&args.group, &req).await?;
            print(output, &r, |r| {
                format!(
                    "Rule {} added to security group {}: {}.\n",
                    short(&r.id),
                    args.group,
                    rule_text(r)
                )
            })
        }
        SgCmd::Rule(RuleCmd::Delete { group, rule }) => {
            client.delete_security_rule(&group, &rule).await?;
            print(output, &json!({ "group": group, "deleted": rule }), |_| {
                format!("Rule {rule} deleted from security group {group}.\n")
            })
        }
    }
}

pub async fn run_node_network(
    client: &LocalClient,
    output: Output,
    cmd: NodeNetworkCmd,
) -> anyhow::Result<()> {
    match cmd {
        NodeNetworkCmd::List { node } => {
            let v = client.host_networks(&node).await?;
            print(output, &v, |v| {
                if v.networks.is_empty() {
                    return format!(
                        "Node {} has no network roles: none was set, and no interface it reported holds its peer address. Set them with `keel node network set`.\n",
                        v.host_name
                    );
                }
                let rows = v
                    .networks
                    .iter()
                    .map(|n| {
                        vec![
                            n.role.clone(),
                            n.interface.clone(),
                            n.address.clone(),
                            or_dash(n.gateway.as_deref()),
                            if n.derived { "peer address" } else { "set" }.into(),
                        ]
                    })
                    .collect();
                table(&["ROLE", "INTERFACE", "ADDRESS", "GATEWAY", "FROM"], rows)
            })
        }
        NodeNetworkCmd::Set {
            node,
            role,
            interface,
            address,
            gateway,
        } => {
            if gateway.is_some() && role != RoleArg::Public {
                bail!("--gateway applies to the public role only");
            }
            let v = client
                .set_host_network(
                    &node,
                    role.path(),
                    &HostNetworkSetRequest {
                        interface,
                        address,
                        gateway,
                    },
                )
                .await?;
            print(output, &v, |v| {
                format!(
                    "Node {node}: {} network on {} ({}{}).\n",
                    v.role,
                    v.interface,
                    v.address,
                    v.gateway
                        .as_deref()
                        .map(|g| format!(", gateway {g}"))
                        .unwrap_or_default()
                )
            })
        }
        NodeNetworkCmd::Clear { node, role } => {
            client.clear_host_network(&node, role.path()).await?;
            print(
                output,
                &json!({ "node": node, "cleared": role.path() }),
                |_| format!("Node {node}: the {} role is no longer set.\n", role.path()),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Cmd};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("keel").chain(args.iter().copied()))
    }

    fn rule_args(args: &[&str]) -> Result<RuleAddArgs, clap::Error> {
        let full: Vec<&str> = ["sg", "rule", "add"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        match parse(&full)?.command {
            Cmd::Sg(SgCmd::Rule(RuleCmd::Add(a))) => Ok(a),
            other => panic!("not sg rule add: {other:?}"),
        }
    }

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_ports("22"), Ok(PortRange { min: 22, max: 22 }));
        assert_eq!(
            parse_ports("8000-8100"),
            Ok(PortRange {
                min: 8000,
                max: 8100
            })
        );
        assert_eq!(parse_ports("1-65535"), Ok(PortRange { min: 1, max: 65535 }));
        for bad in ["", "0", "65536", "http", "10-", "-10", "100-90", "1-2-3"] {
            assert!(parse_ports(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse_ports("100-90").unwrap_err().contains("low to high"));
    }

    #[test]
    fn rule_add_defaults_to_ingress_from_anywhere() {
        let a = rule_args(&["web", "--protocol", "tcp", "--port", "22"]).expect("parse");
        assert_eq!(
            serde_json::to_value(rule_request(&a)).expect("json"),
            json!({"direction": "ingress", "protocol": "tcp", "port_min": 22, "port_max": 22})
        );
        let a = rule_args(&[
            "db",
            "--direction",
            "egress",
            "--protocol",
            "udp",
            "--port",
            "8000-8100",
            "--remote-group",
            "web",
        ])
        .expect("parse");
        assert_eq!(
            serde_json::to_value(rule_request(&a)).expect("json"),
            json!({"direction": "egress", "protocol": "udp", "port_min": 8000,
                   "port_max": 8100, "remote_group": "web"})
        );
        let a =
            rule_args(&["web", "--protocol", "icmp", "--remote", "192.0.2.0/24"]).expect("parse");
        assert_eq!(
            serde_json::to_value(rule_request(&a)).expect("json"),
            json!({"direction": "ingress", "protocol": "icmp", "remote_cidr": "192.0.2.0/24"})
        );
    }

    #[test]
    fn rule_add_refuses_two_remotes_and_bad_values() {
        assert!(rule_args(&[
            "web",
            "--protocol",
            "tcp",
            "--remote",
            "10.0.0.0/8",
            "--remote-group",
            "db",
        ])
        .is_err());
        assert!(rule_args(&["web"]).is_err(), "--protocol is required");
        assert!(rule_args(&["web", "--protocol", "sctp"]).is_err());
        assert!(rule_args(&["web", "--protocol", "tcp", "--direction", "in"]).is_err());
        assert!(rule_args(&["web", "--protocol", "tcp", "--port", "99999"]).is_err());
    }

    #[test]
    fn net_and_node_network_commands_parse() {
        let cli = parse(&[
            "net",
            "create",
            "blue",
            "--cidr",
            "10.0.0.0/24",
            "--gateway",
            "10.0.0.254",
            "--dns-domain",
            "blue.corp",
            "--mtu",
            "1400",
            "--external",
        ])
        .expect("parse");
        let Cmd::Net(NetCmd::Create {
            name,
            cidr,
            gateway,
            dns_domain,
            mtu,
            external,
        }) = cli.command
        else {
            panic!("not net create");
        };
        assert_eq!((name.as_str(), cidr.as_str()), ("blue", "10.0.0.0/24"));
        assert_eq!(gateway.as_deref(), Some("10.0.0.254"));
        assert_eq!(dns_domain.as_deref(), Some("blue.corp"));
        assert_eq!((mtu, external), (Some(1400), true));
        assert!(
            parse(&["net", "create", "blue"]).is_err(),
            "--cidr required"
        );
        let cli = parse(&[
            "node",
            "network",
            "set",
            "node-1",
            "guest-underlay",
            "--interface",
            "eth1",
            "--address",
            "192.0.2.10/24",
        ])
        .expect("parse");
        let Cmd::Node(crate::NodeCmd::Network(NodeNetworkCmd::Set { role, .. })) = cli.command
        else {
            panic!("not node network set");
        };
        assert_eq!(role.path(), "guest-underlay");
        assert!(parse(&["node", "network", "clear", "node-1", "dmz"]).is_err());
        assert!(parse(&["node", "network", "list", "node-1", "-o", "json"]).is_ok());
    }

    #[test]
    fn tables_show_rules_and_leases() {
        let rule = SecurityRuleView {
            id: "0123456789abcdef".into(),
            direction: RuleDirection::Ingress,
            protocol: RuleProtocol::Tcp,
            port_min: Some(8000),
            port_max: Some(8100),
            remote_cidr: None,
            remote_group: Some("web".into()),
            remote_group_id: Some("g-1".into()),
        };
        assert_eq!(rule_text(&rule), "ingress tcp 8000-8100 from sg web");
        let g = SecurityGroupView {
            id: "g-2".into(),
            name: "db".into(),
            rules: vec![rule],
            vms: vec![],
            revision: 2,
            created_at_ms: 0,
        };
        let text = group_detail(&g);
        assert!(text.contains("01234567  ingress"), "{text}");
        assert!(!text.contains("0123456789"), "{text}");
        let d = NetworkDetailView {
            network: NetworkView {
                id: "n-1".into(),
                name: "blue".into(),
                cidr: "10.0.0.0/24".into(),
                gateway: "10.0.0.1".into(),
                dns_domain: "blue.internal".into(),
                vni: 4096,
                mtu: 1450,
                external: false,
                ports: 1,
                created_at_ms: 0,
            },
            leases: vec![NetworkLeaseView {
                ip: "10.0.0.2".into(),
                mac: "52:54:00:00:00:01".into(),
                vm_id: "v-1".into(),
                vm_name: Some("web-1".into()),
                host_id: None,
                host_name: None,
            }],
        };
        let text = network_detail(&d);
        assert!(text.contains("IP        MAC"), "{text}");
        assert!(
            text.contains("10.0.0.2  52:54:00:00:00:01  web-1  -"),
            "{text}"
        );
    }
}
