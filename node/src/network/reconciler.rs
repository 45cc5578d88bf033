//! The per-host network reconciler: makes this host's links, DHCP/DNS servers and packet
//! filter match the guest networks of the VMs the cluster placed here.
//!
//! ```text
//!  raft apply / timer ──► read networks, VMs, hosts, security groups (one snapshot)
//!        │
//!        ▼
//!  plan(this host) — pure: for every network with a VM here (or migrating here):
//!        │            links (bridge, VXLAN, peers = the other hosts of the network,
//!        │            per-MAC FDB for remote VMs, gateway), DHCP/DNS (every port of the
//!        │            network, cluster-wide), and one firewall state for the host
//!        ▼
//!  converge — idempotent: ensure each planned network's links, then its dnsmasq;
//!        │    stop dnsmasq and remove the links of networks no longer planned;
//!        │    replace the firewall state atomically
//!        └──► remember the outcome (`NetworkStatus`) for the host's report
//! ```
//!
//! Every step reads the host's actual state first (the adapters are idempotent), so a
//! restart of the node service at any point, or links flushed behind its back, converges
//! on the next pass. A failure on one network never stops the others.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_cluster::model::compute::Vm;
use keel_cluster::model::network::{
    host_networks_from, network_views_from, Direction, FloatingIp, HostNetworks, NetRole, Network,
    NetworkView, RuleProtocol, RuleRemote, SecurityGroup,
};
use keel_cluster::model::{self, Host, NetworkReport};
use keel_cluster::types::NodeId;
use keel_cluster::{error_chain, ClusterDb};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::wake::Wakeups;

use keel_adapters::dhcp::{Dhcp, DhcpHost, DhcpNetwork};
use keel_adapters::firewall::{
    Cidr, Firewall, FirewallState, NetworkPolicy, PortPolicy, Protocol, Remote, Rule,
};
use keel_adapters::links::{
    gateway_host_name, gateway_mac, gateway_ns_name, tap_name, uplink_addresses, uplink_ns_name,
    vxlan_name, GatewayLink, Links, MacAddr, NetworkLinks, Underlay, Uplink, TRANSIT,
};
use keel_adapters::nat::{FloatingNat, Forward, ForwardProtocol, HostNat, Nat, RouterNat};

/// DHCP lease time handed to guests. Leases are static, so this only bounds how long a
/// guest keeps an address after its NIC was removed.
pub const LEASE_SECS: u32 = 3600;

/// Everything the plan is computed from: one consistent read of the state.
#[derive(Debug, Clone, Default)]
pub struct PlanInput {
    pub networks: Vec<Network>,
    pub vms: Vec<Vm>,
    pub hosts: Vec<Host>,
    pub host_networks: Vec<HostNetworks>,
    pub groups: Vec<SecurityGroup>,
    pub floating_ips: Vec<FloatingIp>,
}

impl PlanInput {
    pub fn read(db: &ClusterDb) -> Result<Self, keel_cluster::store::StoreError> {
        db.reader().read(|c| {
            Ok(PlanInput {
                networks: model::list(c)?,
                vms: model::list(c)?,
                hosts: model::list(c)?,
                host_networks: model::list(c)?,
                groups: model::list(c)?,
                floating_ips: model::list(c)?,
            })
        })
    }
}

/// One network as this host must build it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedNetwork {
    pub name: String,
    pub links: NetworkLinks,
    pub dhcp: DhcpNetwork,
    /// External networks on a host with a public network.
    pub nat: Option<RouterNat>,
}

/// What this host must look like.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostPlan {
    pub networks: Vec<PlannedNetwork>,
    pub firewall: FirewallState,
    /// Masquerading of the uplinks, when any external network is here.
    pub host_nat: Option<HostNat>,
    /// Why something could not be planned (shown in the host's status and logs).
    pub problems: Vec<String>,
}

fn underlay_of(host: &Host, stored: &[HostNetworks]) -> Option<Underlay> {
    let nets = host_networks_from(host, stored.iter().find(|n| n.host_id == host.id).cloned());
    nets.roles.get(&NetRole::GuestUnderlay).map(|n| Underlay {
        dev: n.interface.clone(),
        ip: n.address.addr,
    })
}

/// The interface of the host's public network (explicitly given: it is never guessed).
fn public_dev_of(host_id: NodeId, stored: &[HostNetworks]) -> Option<String> {
    stored
        .iter()
        .find(|n| n.host_id == host_id)
        .and_then(|n| n.roles.get(&NetRole::Public))
        .map(|p| p.interface.clone())
}

fn rule_of(rule: &model::network::SecurityRule) -> Rule {
    Rule {
        protocol: match rule.protocol {
            RuleProtocol::Any => Protocol::Any,
            RuleProtocol::Tcp => Protocol::Tcp,
            RuleProtocol::Udp => Protocol::Udp,
            RuleProtocol::Icmp => Protocol::Icmp,
        },
        ports: rule.port_min.map(|lo| (lo, rule.port_max.unwrap_or(lo))),
        remote: match &rule.remote {
            RuleRemote::Cidr { cidr } => Remote::Cidr(Cidr {
                addr: cidr.network(),
                prefix_len: cidr.prefix_len,
            }),
            RuleRemote::Group { group } => Remote::Group(group.clone()),
        },
    }
}

/// Computes what host `me` must build. Pure: the same input gives the same plan.
pub fn plan(me: NodeId, input: &PlanInput, router_netns: &dyn Fn(u32) -> PathBuf) -> HostPlan {
    let mut out = HostPlan::default();
    let views: Vec<NetworkView> = network_views_from(input.networks.clone(), &input.vms);
    let underlays: BTreeMap<NodeId, Underlay> = input
        .hosts
        .iter()
        .filter_map(|h| underlay_of(h, &input.host_networks).map(|u| (h.id, u)))
        .collect();
    let groups: BTreeMap<&str, &SecurityGroup> =
        input.groups.iter().map(|g| (g.id.as_str(), g)).collect();

    // Security group members, cluster-wide (a rule may name a group whose members run
    // anywhere).
    let mut members: BTreeMap<String, BTreeSet<Ipv4Addr>> = input
        .groups
        .iter()
        .map(|g| (g.id.clone(), BTreeSet::new()))
        .collect();
    for view in &views {
        for port in &view.ports {
            for g in &port.security_groups {
                members.entry(g.clone()).or_default().insert(port.ip);
            }
        }
    }

    for view in &views {
        let hosts = view.hosts();
        if !hosts.contains(&me) {
            continue;
        }
        let net = &view.network;
        let Some(underlay) = underlays.get(&me).cloned() else {
            out.problems.push(format!(
                "network {}: this host has no guest-underlay network (set one with `keel node network set`)",
                net.name
            ));
            continue;
        };
        let mut peers = BTreeSet::new();
        for h in &hosts {
            if *h == me {
                continue;
            }
            match underlays.get(h) {
                Some(u) => {
                    peers.insert(u.ip);
                }
                None => out.problems.push(format!(
                    "network {}: host {h} has no guest-underlay address yet",
                    net.name
                )),
            }
        }
        let mut remote_macs = BTreeMap::new();
        let mut dhcp_hosts = Vec::new();
        let mut local_taps = BTreeSet::new();
        // VMs whose name is given already: a VM's name is its first NIC's on a network.
        let mut named = BTreeSet::new();
        for port in &view.ports {
            let Ok(mac) = port.mac.parse::<MacAddr>() else {
                out.problems
                    .push(format!("VM {}: bad MAC {:?}", port.vm_name, port.mac));
                continue;
            };
            dhcp_hosts.push(DhcpHost {
                mac,
                ip: port.ip,
                hostname: named
                    .insert(port.vm_id.as_str())
                    .then(|| port.vm_name.clone()),
            });
            match port.host {
                Some(h) if h != me && port.also_on != Some(me) => {
                    if let Some(u) = underlays.get(&h) {
                        remote_macs.insert(mac, u.ip);
                    }
                }
                _ => {}
            }
            let local = port.host == Some(me) || port.also_on == Some(me);
            if local {
                local_taps.insert(tap_name(mac));
                let mut ingress = Vec::new();
                let mut egress: Option<Vec<Rule>> = None;
                for g in &port.security_groups {
                    let Some(group) = groups.get(g.as_str()) else {
                        continue;
                    };
                    for r in &group.rules {
                        match r.direction {
                            Direction::Ingress => ingress.push(rule_of(r)),
                            Direction::Egress => {
                                egress.get_or_insert_with(Vec::new).push(rule_of(r));
                            }
                        }
                    }
                }
                ingress.sort();
                ingress.dedup();
                if let Some(e) = egress.as_mut() {
                    e.sort();
                    e.dedup();
                }
                out.firewall.ports.push(PortPolicy {
                    tap: tap_name(mac),
                    vni: net.vni,
                    mac,
                    ip: port.ip,
                    ingress,
                    egress,
                });
            }
        }
        dhcp_hosts.sort();
        let mut uplink = None;
        let mut nat = None;
        if net.external {
            match public_dev_of(me, &input.host_networks) {
                None => out.problems.push(format!(
                    "network {} is external but this host has no public network (set one with `keel node network set`)",
                    net.name
                )),
                Some(public_dev) => {
                    let vm_host: BTreeMap<&str, Option<NodeId>> =
                        input.vms.iter().map(|v| (v.id.as_str(), v.host)).collect();
                    let mut floating = Vec::new();
                    for fip in &input.floating_ips {
                        let Some(t) = &fip.target else { continue };
                        if t.network_id != net.id || vm_host.get(t.vm_id.as_str()) != Some(&Some(me)) {
                            continue;
                        }
                        floating.push(FloatingNat {
                            floating_ip: fip.ip,
                            private_ip: t.private_ip,
                            forwards: t
                                .ports
                                .iter()
                                .map(|p| Forward {
                                    protocol: match p.protocol {
                                        model::network::ForwardProtocol::Tcp => ForwardProtocol::Tcp,
                                        model::network::ForwardProtocol::Udp => ForwardProtocol::Udp,
                                    },
                                    public_port: p.public_port,
                                    private_port: p.private_port,
                                })
                                .collect(),
                        });
                    }
                    floating.sort();
                    uplink = Some(Uplink {
                        public_dev: public_dev.clone(),
                        floating_ips: floating.iter().map(|f| f.floating_ip).collect(),
                    });
                    nat = Some(RouterNat {
                        vni: net.vni,
                        netns: router_netns(net.vni),
                        cidr: Cidr {
                            addr: net.cidr.network(),
                            prefix_len: net.cidr.prefix_len,
                        },
                        uplink: uplink_ns_name(net.vni),
                        uplink_ip: uplink_addresses(net.vni).1,
                        floating,
                    });
                    out.host_nat = Some(HostNat {
                        public_dev,
                        transit: Cidr {
                            addr: TRANSIT.0,
                            prefix_len: TRANSIT.1,
                        },
                    });
                }
            }
        }
        out.firewall.networks.push(NetworkPolicy {
            vni: net.vni,
            vxlan: vxlan_name(net.vni),
            gateway_port: gateway_host_name(net.vni),
            gateway_ip: net.gateway,
            gateway_mac: gateway_mac(net.vni),
        });
        out.networks.push(PlannedNetwork {
            name: net.name.clone(),
            links: NetworkLinks {
                vni: net.vni,
                mtu: net.mtu,
                underlay,
                peers,
                remote_macs,
                gateway: GatewayLink {
                    addr: net.gateway,
                    prefix_len: net.cidr.prefix_len,
                    mac: gateway_mac(net.vni),
                },
                local_taps,
                uplink,
            },
            dhcp: DhcpNetwork {
                vni: net.vni,
                netns: Some(router_netns(net.vni)),
                interface: gateway_ns_name(net.vni),
                gateway: net.gateway,
                prefix_len: net.cidr.prefix_len,
                domain: net.dns_domain.clone(),
                mtu: net.mtu,
                hosts: dhcp_hosts,
                lease_secs: LEASE_SECS,
            },
            nat,
        });
    }
    // Only groups some local rule names are needed, but every group is cheap and keeps
    // the state independent of which rules exist here.
    out.firewall.groups = members
        .into_iter()
        .map(|(g, ips)| (g, ips.into_iter().collect()))
        .collect();
    out.firewall.ports.sort_by(|a, b| a.tap.cmp(&b.tap));
    out
}

/// The outcome of the last pass, for the host's report and `keel node show`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetworkStatus {
    /// VNIs built on this host.
    pub networks: Vec<u32>,
    /// Problems of the last pass (empty: converged).
    pub errors: Vec<String>,
    /// How long the last pass took.
    pub last_pass_ms: u64,
}

/// The host side effects the reconciler drives.
pub struct NetworkAdapters {
    pub links: Arc<dyn Links>,
    pub dhcp: Arc<dyn Dhcp>,
    pub firewall: Arc<dyn Firewall>,
    pub nat: Arc<dyn Nat>,
}

/// What the host's network reconciler needs.
pub struct NetworkHost {
    pub db: ClusterDb,
    pub adapters: NetworkAdapters,
    pub resync: Duration,
    pub status: Mutex<NetworkStatus>,
    /// The outcome of the last pass: the agent puts it into the host's inventory, and
    /// the compute side waits on it for a VM's bridges before it starts the VM.
    pub report: watch::Sender<Option<NetworkReport>>,
}

impl NetworkHost {
    /// Runs until `stop`: a pass on every raft apply (coalesced) and on a timer.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let Some((node_id, mut wakeups)) = Wakeups::when_member(&self.db, &stop).await else {
            return;
        };
        let mut last_plan: Option<HostPlan> = None;
        let mut last_full = Instant::now();
        loop {
            let input = match PlanInput::read(&self.db) {
                Ok(input) => Some(input),
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "network: cannot read the state");
                    None
                }
            };
            if let Some(input) = input {
                let links = self.adapters.links.clone();
                let p = plan(node_id, &input, &move |vni| links.router_netns(vni));
                // An unchanged plan is re-applied on the timer only: that catches links
                // or processes changed behind our back without a netlink storm on every
                // raft entry (heartbeats apply several times a second).
                let due = last_full.elapsed() >= self.resync;
                if due || last_plan.as_ref() != Some(&p) {
                    let host = self.clone();
                    let p2 = p.clone();
                    let status =
                        tokio::task::spawn_blocking(move || host.adapters.converge(&p2)).await;
                    match status {
                        Ok(status) => {
                            if !status.errors.is_empty() {
                                tracing::warn!(errors = ?status.errors, "network: not converged");
                                last_plan = None;
                            } else {
                                last_plan = Some(p);
                            }
                            let report = NetworkReport {
                                vnis: status.networks.clone(),
                                errors: status.errors.clone(),
                            };
                            self.report.send_if_modified(|current| {
                                let changed = current.as_ref() != Some(&report);
                                *current = Some(report);
                                changed
                            });
                            *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
                        }
                        Err(e) => tracing::error!(error = %e, "network: pass panicked"),
                    }
                    if due {
                        last_full = Instant::now();
                    }
                }
            }
            let retry = if last_plan.is_none() {
                Duration::from_secs(2).min(self.resync)
            } else {
                self.resync
            };
            if !wakeups.next(retry).await {
                break;
            }
        }
    }
}

impl NetworkAdapters {
    /// One idempotent pass (blocking).
    pub fn converge(&self, plan: &HostPlan) -> NetworkStatus {
        let started = Instant::now();
        let mut errors = plan.problems.clone();
        let mut built = Vec::new();
        let wanted: BTreeSet<u32> = plan.networks.iter().map(|n| n.links.vni).collect();
        for net in &plan.networks {
            if let Err(e) = self.links.ensure(&net.links) {
                errors.push(format!("network {}: links: {}", net.name, error_chain(&e)));
                continue;
            }
            if let Err(e) = self.dhcp.ensure(&net.dhcp) {
                errors.push(format!(
                    "network {}: dnsmasq: {}",
                    net.name,
                    error_chain(&e)
                ));
            }
            if let Some(nat) = &net.nat {
                if let Err(e) = self.nat.apply_router(nat) {
                    errors.push(format!("network {}: NAT: {}", net.name, error_chain(&e)));
                }
            }
            built.push(net.links.vni);
        }
        // Tear down what is no longer wanted: dnsmasq first (it lives in the router
        // namespace the links removal deletes).
        let mut stale: BTreeSet<u32> = self
            .dhcp
            .running()
            .into_iter()
            .filter(|v| !wanted.contains(v))
            .collect();
        match self.links.list() {
            Ok(present) => stale.extend(
                present
                    .into_iter()
                    .map(|n| n.vni)
                    .filter(|v| !wanted.contains(v)),
            ),
            Err(e) => errors.push(format!("listing links: {}", error_chain(&e))),
        }
        for vni in stale {
            if let Err(e) = self.dhcp.stop(vni) {
                errors.push(format!("VNI {vni}: stopping dnsmasq: {}", error_chain(&e)));
            }
            match self.links.remove(vni) {
                Ok(()) => tracing::info!(vni, "network: removed (no VM of it left here)"),
                Err(e) => errors.push(format!("VNI {vni}: removing links: {}", error_chain(&e))),
            }
        }
        if let Err(e) = self.firewall.apply(&plan.firewall) {
            errors.push(format!("firewall: {}", error_chain(&e)));
        }
        if let Err(e) = self.nat.apply_host(plan.host_nat.as_ref()) {
            errors.push(format!("host NAT: {}", error_chain(&e)));
        }
        NetworkStatus {
            networks: built,
            errors,
            last_pass_ms: started.elapsed().as_millis() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_adapters::dhcp::fake::FakeDhcp;
    use keel_adapters::firewall::fake::FakeFirewall;
    use keel_adapters::links::fake::FakeLinks;
    use keel_adapters::nat::fake::FakeNat;
    use keel_cluster::model::compute::{BootSource, NicSpec, PowerIntent, VmSpec};
    use keel_cluster::model::network::{Ipv4Cidr, SecurityRule};
    use keel_cluster::model::{Health, Inventory, Nic};

    fn host(id: NodeId, ip: &str) -> Host {
        Host {
            id,
            name: format!("n{id}"),
            zone: "z".into(),
            compute_cluster: "c".into(),
            peer_addr: format!("{ip}:7400"),
            api_addr: format!("{ip}:8443"),
            witness: false,
            joined_at_ms: 1,
            health: Health::Up,
            health_since_ms: 1,
            inventory: Some(Inventory {
                nics: vec![Nic {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: 1500,
                    addresses: vec![format!("{ip}/24")],
                    up: true,
                }],
                ..Default::default()
            }),
            inventory_at_ms: Some(1),
            maintenance: None,
        }
    }

    fn network(id: &str, vni: u32, cidr: &str) -> Network {
        let cidr = Ipv4Cidr::parse(cidr, true).unwrap();
        Network {
            id: id.into(),
            name: id.into(),
            cidr,
            gateway: Ipv4Addr::from(u32::from(cidr.addr) + 1),
            dns_domain: format!("{id}.internal"),
            vni,
            mtu: 1450,
            external: false,
            created_at_ms: 1,
        }
    }

    fn vm(name: &str, host: Option<NodeId>, nics: &[(&str, &str, &str, &[&str])]) -> Vm {
        Vm {
            id: format!("id-{name}"),
            name: name.into(),
            spec: VmSpec {
                vcpus: 1,
                memory_mib: 128,
                boot: BootSource::Template {
                    template: "t".into(),
                },
                root_disk_gib: None,
                data_disks: vec![],
                nics: nics
                    .iter()
                    .map(|(net, mac, ip, sgs)| NicSpec {
                        bridge: String::new(),
                        mac: Some(mac.to_string()),
                        network: Some(net.to_string()),
                        ip: Some(ip.to_string()),
                        security_groups: sgs.iter().map(|s| s.to_string()).collect(),
                    })
                    .collect(),
                cloud_init: Default::default(),
                affinity_group: None,
                ha: false,
            },
            generation: 1,
            power: PowerIntent::Running,
            stop_timeout_s: 30,
            reboot_seq: 0,
            reboot_forced: false,
            deleting: false,
            host,
            pending_reason: None,
            observed: None,
            active_ops: vec![],
            created_at_ms: 1,
            migration: None,
        }
    }

    fn input() -> PlanInput {
        PlanInput {
            networks: vec![
                network("blue", 5000, "10.0.0.0/24"),
                network("green", 5001, "10.0.0.0/24"),
            ],
            vms: vec![
                vm(
                    "a",
                    Some(1),
                    &[("blue", "52:54:00:00:00:0a", "10.0.0.2", &["web"])],
                ),
                vm(
                    "b",
                    Some(2),
                    &[("blue", "52:54:00:00:00:0b", "10.0.0.3", &[])],
                ),
                vm(
                    "c",
                    Some(3),
                    &[("green", "52:54:00:00:00:0c", "10.0.0.2", &[])],
                ),
                vm(
                    "d",
                    None,
                    &[("blue", "52:54:00:00:00:0d", "10.0.0.4", &["web"])],
                ),
            ],
            hosts: vec![
                host(1, "192.0.2.1"),
                host(2, "192.0.2.2"),
                host(3, "192.0.2.3"),
            ],
            host_networks: vec![],
            groups: vec![SecurityGroup {
                id: "web".into(),
                name: "web".into(),
                rules: vec![
                    SecurityRule {
                        id: "r1".into(),
                        direction: Direction::Ingress,
                        protocol: RuleProtocol::Tcp,
                        port_min: Some(80),
                        port_max: Some(80),
                        remote: RuleRemote::Cidr {
                            cidr: Ipv4Cidr::parse("0.0.0.0/0", true).unwrap(),
                        },
                    },
                    SecurityRule {
                        id: "r2".into(),
                        direction: Direction::Egress,
                        protocol: RuleProtocol::Icmp,
                        port_min: None,
                        port_max: None,
                        remote: RuleRemote::Group {
                            group: "web".into(),
                        },
                    },
                ],
                created_at_ms: 1,
                revision: 3,
            }],
            floating_ips: vec![],
        }
    }

    fn ns(vni: u32) -> PathBuf {
        PathBuf::from(format!("/run/test/n{vni}"))
    }

    #[test]
    fn a_vm_with_two_nics_on_one_network_gives_its_name_to_the_first() {
        let mut i = input();
        i.vms[0] = vm(
            "a",
            Some(1),
            &[
                ("blue", "52:54:00:00:00:0a", "10.0.0.2", &["web"]),
                ("blue", "52:54:00:00:00:1a", "10.0.0.9", &[]),
            ],
        );
        let p = plan(1, &i, &ns);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        let blue = &p.networks[0];
        let hosts: Vec<(String, Option<&str>)> = blue
            .dhcp
            .hosts
            .iter()
            .map(|h| (h.ip.to_string(), h.hostname.as_deref()))
            .collect();
        assert_eq!(
            hosts,
            [
                ("10.0.0.2".to_string(), Some("a")),
                ("10.0.0.3".to_string(), Some("b")),
                ("10.0.0.4".to_string(), Some("d")),
                ("10.0.0.9".to_string(), None),
            ]
        );
        assert_eq!(p.firewall.ports.len(), 2, "both taps are filtered");
    }

    #[test]
    fn plan_builds_only_networks_with_local_vms() {
        let p = plan(1, &input(), &ns);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(p.networks.len(), 1, "green has no VM on host 1");
        let blue = &p.networks[0];
        assert_eq!(blue.links.vni, 5000);
        assert_eq!(blue.links.underlay.ip.to_string(), "192.0.2.1");
        assert_eq!(blue.links.underlay.dev, "eth0");
        assert_eq!(
            blue.links
                .peers
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
            ["192.0.2.2"],
            "the unplaced VM d adds no peer"
        );
        let b_mac: MacAddr = "52:54:00:00:00:0b".parse().unwrap();
        assert_eq!(
            blue.links
                .remote_macs
                .get(&b_mac)
                .map(|i| i.to_string())
                .as_deref(),
            Some("192.0.2.2")
        );
        assert_eq!(blue.links.remote_macs.len(), 1);
        assert_eq!(blue.links.gateway.addr.to_string(), "10.0.0.1");
        // DHCP serves every port of the network, wherever it runs.
        let names: Vec<&str> = blue
            .dhcp
            .hosts
            .iter()
            .filter_map(|h| h.hostname.as_deref())
            .collect();
        assert_eq!(names, ["a", "b", "d"]);
        assert_eq!(blue.dhcp.netns, Some(ns(5000)));
        assert_eq!(blue.dhcp.domain, "blue.internal");
        // Firewall: only the local port, with its group's rules; group members cluster-wide.
        assert_eq!(p.firewall.ports.len(), 1);
        let a = &p.firewall.ports[0];
        assert_eq!(a.tap, "kt52540000000a");
        assert_eq!(a.ingress.len(), 1);
        assert_eq!(a.ingress[0].ports, Some((80, 80)));
        assert_eq!(
            a.egress.as_ref().map(|e| e[0].remote.clone()),
            Some(Remote::Group("web".into()))
        );
        let web: Vec<String> = p.firewall.groups["web"]
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(web, ["10.0.0.2", "10.0.0.4"]);
        // Host 3 builds only green, with no peers: the same CIDR stays a separate segment.
        let p3 = plan(3, &input(), &ns);
        assert_eq!(p3.networks.len(), 1);
        assert_eq!(p3.networks[0].links.vni, 5001);
        assert!(p3.networks[0].links.peers.is_empty());
        assert_eq!(
            p3.firewall.ports[0].egress, None,
            "no egress rules: allow all"
        );
        // Deterministic.
        assert_eq!(plan(1, &input(), &ns), p);
    }

    #[test]
    fn a_migrating_vm_puts_the_network_on_both_hosts() {
        let mut input = input();
        input.vms[1].migration = Some(keel_cluster::model::compute::VmMigration {
            target: 3,
            live: true,
            started_at_ms: 1,
        });
        let p3 = plan(3, &input, &ns);
        assert_eq!(p3.networks.len(), 2);
        let blue = p3.networks.iter().find(|n| n.links.vni == 5000).unwrap();
        let peers: Vec<String> = blue.links.peers.iter().map(|p| p.to_string()).collect();
        assert_eq!(peers, ["192.0.2.1", "192.0.2.2"]);
        assert!(p3.firewall.ports.iter().any(|p| p.tap == "kt52540000000b"));
    }

    #[test]
    fn external_networks_get_an_uplink_and_nat_where_the_host_is_public() {
        use keel_cluster::model::network::{FipTarget, PhysicalNetwork};
        let mut input = input();
        input.networks[0].external = true;
        // Without a public network on host 1: a problem, no uplink.
        let p = plan(1, &input, &ns);
        assert!(
            p.problems[0].contains("no public network"),
            "{:?}",
            p.problems
        );
        assert!(p.networks[0].links.uplink.is_none() && p.networks[0].nat.is_none());
        assert!(p.host_nat.is_none());
        input.host_networks.push(HostNetworks {
            host_id: 1,
            roles: [(
                NetRole::Public,
                PhysicalNetwork {
                    interface: "eth1".into(),
                    address: Ipv4Cidr::parse("198.51.100.1/24", false).unwrap(),
                    gateway: None,
                },
            )]
            .into(),
        });
        input.floating_ips = vec![
            FloatingIp {
                ip: "198.51.100.10".parse().unwrap(),
                target: Some(FipTarget {
                    vm_id: "id-a".into(),
                    network_id: "blue".into(),
                    private_ip: "10.0.0.2".parse().unwrap(),
                    ports: vec![],
                }),
                allocated_at_ms: 1,
            },
            // b runs on host 2: its floating IP is answered there, not here.
            FloatingIp {
                ip: "198.51.100.11".parse().unwrap(),
                target: Some(FipTarget {
                    vm_id: "id-b".into(),
                    network_id: "blue".into(),
                    private_ip: "10.0.0.3".parse().unwrap(),
                    ports: vec![],
                }),
                allocated_at_ms: 1,
            },
        ];
        let p = plan(1, &input, &ns);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        let blue = &p.networks[0];
        let up = blue.links.uplink.as_ref().unwrap();
        assert_eq!(up.public_dev, "eth1");
        let fips: Vec<String> = up.floating_ips.iter().map(|i| i.to_string()).collect();
        assert_eq!(fips, ["198.51.100.10"]);
        let nat = blue.nat.as_ref().unwrap();
        assert_eq!(nat.uplink, "kun5000");
        assert_eq!(nat.uplink_ip, uplink_addresses(5000).1);
        assert_eq!(nat.floating.len(), 1);
        assert_eq!(nat.cidr.to_string(), "10.0.0.0/24");
        assert_eq!(p.host_nat.as_ref().unwrap().public_dev, "eth1");
        // The plan reaches the adapters.
        let nat_fake = Arc::new(FakeNat::new());
        let adapters = NetworkAdapters {
            links: Arc::new(FakeLinks::new()),
            dhcp: Arc::new(FakeDhcp::new()),
            firewall: Arc::new(FakeFirewall::new()),
            nat: nat_fake.clone(),
        };
        let status = adapters.converge(&p);
        assert!(status.errors.is_empty(), "{:?}", status.errors);
        assert_eq!(nat_fake.router(5000).unwrap().floating.len(), 1);
        assert_eq!(nat_fake.host().unwrap().unwrap().public_dev, "eth1");
    }

    #[test]
    fn a_host_without_underlay_reports_a_problem() {
        let mut input = input();
        input.hosts[0].inventory = None;
        let p = plan(1, &input, &ns);
        assert!(p.networks.is_empty());
        assert!(p.problems[0].contains("guest-underlay"), "{:?}", p.problems);
    }

    #[test]
    fn converge_builds_and_tears_down() {
        let links = Arc::new(FakeLinks::new());
        let dhcp = Arc::new(FakeDhcp::new());
        let fw = Arc::new(FakeFirewall::new());
        let host = NetworkAdapters {
            links: links.clone(),
            dhcp: dhcp.clone(),
            firewall: fw.clone(),
            nat: Arc::new(FakeNat::new()),
        };
        let p = plan(1, &input(), &ns);
        let status = host.converge(&p);
        assert!(status.errors.is_empty(), "{:?}", status.errors);
        assert_eq!(status.networks, [5000]);
        assert_eq!(links.list().unwrap().len(), 1);
        assert_eq!(dhcp.running(), [5000]);
        assert_eq!(fw.state().unwrap().ports.len(), 1);
        // Again: idempotent.
        let status = host.converge(&p);
        assert!(status.errors.is_empty());
        assert_eq!(links.list().unwrap().len(), 1);
        // The VM leaves: everything goes.
        let mut input = input();
        input.vms.retain(|v| v.name != "a");
        let p = plan(1, &input, &ns);
        let status = host.converge(&p);
        assert!(status.errors.is_empty(), "{:?}", status.errors);
        assert!(links.list().unwrap().is_empty());
        assert!(dhcp.running().is_empty());
        assert!(fw.state().unwrap().ports.is_empty());
    }

    #[test]
    fn a_failing_dnsmasq_does_not_stop_other_networks() {
        let links = Arc::new(FakeLinks::new());
        let dhcp = Arc::new(FakeDhcp::new());
        let fw = Arc::new(FakeFirewall::new());
        let host = NetworkAdapters {
            links: links.clone(),
            dhcp: dhcp.clone(),
            firewall: fw.clone(),
            nat: Arc::new(FakeNat::new()),
        };
        let mut input = input();
        input.vms[2].host = Some(1);
        dhcp.fail_next_ensure(5000, "port 53 in use");
        let status = host.converge(&plan(1, &input, &ns));
        assert_eq!(status.errors.len(), 1, "{:?}", status.errors);
        assert!(status.errors[0].contains("port 53 in use"));
        assert_eq!(dhcp.running(), [5001]);
        assert_eq!(fw.apply_count(), 1, "the firewall is still applied");
        let status = host.converge(&plan(1, &input, &ns));
        assert!(status.errors.is_empty(), "{:?}", status.errors);
        assert_eq!(dhcp.running(), [5000, 5001]);
    }
}
