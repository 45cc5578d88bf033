//! Network records: the physical networks of each host, guest networks (VXLAN segments
//! with a CIDR, a gateway and a DNS domain), IP address management, and security groups.
//!
//! ```text
//!  CreateNetwork ──► Network {cidr, gateway, vni (allocated here), mtu}
//!                        │
//!  CreateVm / AttachNic with nic.network ──► IpLease {network, ip, vm, mac} (allocated here)
//!                        │                          │
//!                        ▼                          ▼
//!   every host whose VMs have a NIC on it builds bridge + VXLAN + gateway + dnsmasq,
//!   and tears them down when its last such VM leaves (see keel-node's network reconciler)
//!
//!  DeleteNetwork ──► refused while any VM has a NIC on it (`InUse`)
//! ```
//!
//! Allocation happens while applying a raft entry, so it is serialised by the log: two
//! creates proposed at the same moment on different nodes can never get the same address
//! or VNI, and every replica computes the same answer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use super::compute::Vm;
use super::NodeId;
use super::{
    delete, invalid, list, next_counter, put, read, require_host, require_init, store_err,
    validate_name, CommandError, Host, Outcome, Record,
};

/// VNIs handed out, inclusive. Kept within 16 bits so a host can use the VNI as the
/// network's conntrack zone.
pub const VNI_FIRST: u32 = 4096;
pub const VNI_LAST: u32 = 65535;
/// VXLAN over IPv4 adds 50 bytes to every frame.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The MTU assumed for an underlay whose MTU no host has reported yet.
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;
/// Smallest MTU a network may have (IPv4's minimum reassembly size).
pub const MIN_MTU: u32 = 576;
/// Smallest and largest guest network prefix.
pub const MIN_PREFIX: u8 = 8;
pub const MAX_PREFIX: u8 = 29;
/// Most rules per security group.
pub const MAX_RULES: usize = 200;
/// Most security groups per NIC.
pub const MAX_GROUPS_PER_NIC: usize = 8;

// ---- addresses --------------------------------------------------------------------------

/// An IPv4 prefix, written `a.b.c.d/len`. The address is always the network address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

/// Why a text is not an IPv4 CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{text:?} is not a CIDR like 10.0.0.0/24")]
    Syntax { text: String },
    #[error("{text:?} has a prefix length that is not 0-32")]
    PrefixLength { text: String },
    #[error("{text:?} has host bits set: did you mean {network}/{prefix_len}?")]
    HostBits {
        text: String,
        network: Ipv4Addr,
        prefix_len: u8,
    },
}

impl Ipv4Cidr {
    fn mask(prefix_len: u8) -> u32 {
        if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - prefix_len)
        }
    }

    /// Parses `a.b.c.d/len`. `strict` (a network) refuses host bits; otherwise (an
    /// interface address like `10.0.0.5/24`) the address is kept as written.
    pub fn parse(text: &str, strict: bool) -> Result<Self, CidrError> {
        let syntax = || CidrError::Syntax {
            text: text.to_string(),
        };
        let (addr, len) = text.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        let prefix_len: u8 =
            len.parse()
                .ok()
                .filter(|l| *l <= 32)
                .ok_or_else(|| CidrError::PrefixLength {
                    text: text.to_string(),
                })?;
        let cidr = Self { addr, prefix_len };
        if strict && cidr.network() != addr {
            return Err(CidrError::HostBits {
                text: text.to_string(),
                network: cidr.network(),
                prefix_len,
            });
        }
        Ok(cidr)
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & Self::mask(self.prefix_len))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix_len) == u32::from(self.network())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !Self::mask(self.prefix_len))
    }

    /// Usable host addresses: all but the network and broadcast addresses.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network()) + 1;
        let last = u32::from(self.broadcast()).saturating_sub(1);
        (first..=last).map(Ipv4Addr::from)
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(Self::mask(self.prefix_len))
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ipv4Cidr::parse(&text, false).map_err(serde::de::Error::custom)
    }
}

// ---- physical networks ------------------------------------------------------------------

/// What a host network carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetRole {
    /// The cluster's own traffic: raft, the API, migrations.
    Management,
    /// Ceph.
    Storage,
    /// VXLAN of the guest networks.
    GuestUnderlay,
    /// Outside access: SNAT, floating IPs, port forwarding.
    Public,
}

impl NetRole {
    pub const ALL: [NetRole; 4] = [
        NetRole::Management,
        NetRole::Storage,
        NetRole::GuestUnderlay,
        NetRole::Public,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NetRole::Management => "management",
            NetRole::Storage => "storage",
            NetRole::GuestUnderlay => "guest_underlay",
            NetRole::Public => "public",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == text || r.as_str().replace('_', "-") == text)
    }
}

/// A host interface given a role, with the address it uses there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhysicalNetwork {
    pub interface: String,
    /// The host's address on it (`a.b.c.d/len`); must be configured on the interface.
    pub address: Ipv4Cidr,
    /// The next hop to the outside (public network only).
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
}

/// The role assignment of one host, kept in its own record so that inventory reports and
/// role changes never overwrite each other.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostNetworks {
    pub host_id: NodeId,
    pub roles: BTreeMap<NetRole, PhysicalNetwork>,
}
impl Record for HostNetworks {
    const KIND: &'static str = "host_networks";
    fn key(&self) -> String {
        format!("{:020}", self.host_id)
    }
}

/// A host's physical networks: the roles it was given, and for the management and guest
/// underlay roles, when none was given, the interface carrying its peer address.
pub fn host_networks(conn: &Connection, host: &Host) -> Result<HostNetworks, CommandError> {
    let stored = read::<HostNetworks>(conn, &format!("{:020}", host.id))?;
    Ok(host_networks_from(host, stored))
}

/// [`host_networks`] from records already read.
pub fn host_networks_from(host: &Host, stored: Option<HostNetworks>) -> HostNetworks {
    let mut nets = stored.unwrap_or_else(|| HostNetworks {
        host_id: host.id,
        roles: BTreeMap::new(),
    });
    let peer_ip = host
        .peer_addr
        .parse::<std::net::SocketAddr>()
        .ok()
        .and_then(|a| match a.ip() {
            std::net::IpAddr::V4(ip) => Some(ip),
            std::net::IpAddr::V6(_) => None,
        });
    if let (Some(ip), Some(inv)) = (peer_ip, &host.inventory) {
        let found = inv.nics.iter().find_map(|nic| {
            nic.addresses.iter().find_map(|a| {
                let cidr = Ipv4Cidr::parse(a, false).ok()?;
                (cidr.addr == ip).then(|| PhysicalNetwork {
                    interface: nic.name.clone(),
                    address: cidr,
                    gateway: None,
                })
            })
        });
        if let Some(found) = found {
            for role in [NetRole::Management, NetRole::GuestUnderlay] {
                nets.roles.entry(role).or_insert_with(|| found.clone());
            }
        }
    }
    nets
}

/// The MTU of the interface a host uses for `role`, as last reported.
fn role_mtu(host: &Host, net: &PhysicalNetwork) -> Option<u32> {
    host.inventory
        .as_ref()?
        .nics
        .iter()
        .find(|n| n.name == net.interface)
        .map(|n| n.mtu)
        .filter(|m| *m > 0)
}

/// The largest MTU a guest network may have: the smallest guest-underlay MTU of any
/// workload host, minus the VXLAN overhead.
pub fn max_guest_mtu(conn: &Connection) -> Result<u32, CommandError> {
    let mut underlay = None::<u32>;
    for host in list::<Host>(conn).map_err(store_err)? {
        if host.witness {
            continue;
        }
        let nets = host_networks(conn, &host)?;
        if let Some(mtu) = nets
            .roles
            .get(&NetRole::GuestUnderlay)
            .and_then(|n| role_mtu(&host, n))
        {
            underlay = Some(underlay.map_or(mtu, |u| u.min(mtu)));
        }
    }
    Ok(underlay.unwrap_or(DEFAULT_UNDERLAY_MTU) - VXLAN_OVERHEAD)
}

// ---- guest networks ---------------------------------------------------------------------

/// An isolated guest network: one VXLAN segment across the hosts that run its VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub cidr: Ipv4Cidr,
    /// Answered on every participating host (a distributed gateway).
    pub gateway: Ipv4Addr,
    /// Guests get `<vm name>.<dns_domain>` names.
    pub dns_domain: String,
    pub vni: u32,
    pub mtu: u32,
    /// Guests may reach the outside through SNAT on the hosts' public network.
    #[serde(default)]
    pub external: bool,
    pub created_at_ms: u64,
}
impl Record for Network {
    const KIND: &'static str = "network";
    fn key(&self) -> String {
        self.id.clone()
    }
}
impl super::Named for Network {
    const NAME_KIND: &'static str = "network_name";
    fn id(&self) -> &str {
        &self.id
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Network {
    /// The host bridge of this network (the node's network reconciler creates it).
    pub fn bridge(&self) -> String {
        bridge_for_vni(self.vni)
    }
}

/// Bridge name of a VNI, as the node's link adapter names it.
pub fn bridge_for_vni(vni: u32) -> String {
    keel_base::names::bridge_name(vni)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VniUse {
    vni: u32,
    network_id: String,
}
impl Record for VniUse {
    const KIND: &'static str = "vni";
    fn key(&self) -> String {
        format!("{:08}", self.vni)
    }
}

/// One address of a guest network given to a VM NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpLease {
    pub network_id: String,
    pub ip: Ipv4Addr,
    pub vm_id: String,
    pub mac: String,
}
impl Record for IpLease {
    const KIND: &'static str = "ip_lease";
    fn key(&self) -> String {
        lease_key(&self.network_id, self.ip)
    }
}

pub(super) fn lease_key(network_id: &str, ip: Ipv4Addr) -> String {
    // Zero-padded so that the table's order is the numeric order of addresses.
    format!("{network_id}/{:010}", u32::from(ip))
}

pub fn find_network(conn: &Connection, id_or_name: &str) -> rusqlite::Result<Option<Network>> {
    super::find_by_id_or_name::<Network>(conn, id_or_name)
}

pub(super) fn require_network(
    conn: &Connection,
    id_or_name: &str,
) -> Result<Network, CommandError> {
    find_network(conn, id_or_name)
        .map_err(store_err)?
        .ok_or_else(|| CommandError::NetworkUnknown {
            network: id_or_name.to_string(),
        })
}

/// Every lease of a network, in address order.
pub fn network_leases(conn: &Connection, network_id: &str) -> rusqlite::Result<Vec<IpLease>> {
    let mut stmt = conn.prepare_cached(
        "SELECT body FROM objects WHERE kind = ?1 AND id >= ?2 AND id < ?3 ORDER BY id",
    )?;
    let lo = format!("{network_id}/");
    let hi = format!("{network_id}0");
    let rows = stmt.query_map(rusqlite::params![IpLease::KIND, lo, hi], |row| {
        row.get::<_, String>(0)
    })?;
    rows.map(|body| serde_json::from_str(&body?).map_err(super::json_to_sql))
        .collect()
}

/// VMs with a NIC on the network (names), for "in use" errors.
fn network_users(conn: &Connection, network_id: &str) -> Result<Vec<String>, CommandError> {
    let mut users: BTreeSet<String> = BTreeSet::new();
    for vm in list::<Vm>(conn).map_err(store_err)? {
        if vm
            .spec
            .nics
            .iter()
            .any(|n| n.network.as_deref() == Some(network_id))
        {
            users.insert(format!("VM {}", vm.name));
        }
    }
    Ok(users.into_iter().collect())
}

fn validate_domain(domain: &str) -> Result<(), CommandError> {
    if domain.is_empty() || domain.len() > 200 {
        return Err(invalid("dns domain", "must be 1 to 200 characters long"));
    }
    for label in domain.split('.') {
        validate_name("dns domain", label).map_err(|_| {
            invalid(
                "dns domain",
                format!("{domain:?} must be dot-separated labels of a-z, 0-9 and '-'"),
            )
        })?;
    }
    Ok(())
}

// ---- security groups --------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Ingress,
    Egress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleProtocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// The other end of a rule's traffic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RuleRemote {
    Cidr {
        cidr: Ipv4Cidr,
    },
    /// The addresses of every NIC in this group (its id).
    Group {
        group: String,
    },
}

/// An allow rule. Ports apply to TCP and UDP only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityRule {
    pub id: String,
    pub direction: Direction,
    pub protocol: RuleProtocol,
    #[serde(default)]
    pub port_min: Option<u16>,
    #[serde(default)]
    pub port_max: Option<u16>,
    pub remote: RuleRemote,
}

/// A named set of allow rules attached to VM NICs. Ingress is denied unless a rule allows
/// it; egress is allowed unless the group has egress rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityGroup {
    pub id: String,
    pub name: String,
    pub rules: Vec<SecurityRule>,
    pub created_at_ms: u64,
    /// Bumped by every rule change (hosts report which revision they enforce).
    pub revision: u64,
}
impl Record for SecurityGroup {
    const KIND: &'static str = "security_group";
    fn key(&self) -> String {
        self.id.clone()
    }
}
impl super::Named for SecurityGroup {
    const NAME_KIND: &'static str = "security_group_name";
    fn id(&self) -> &str {
        &self.id
    }
    fn name(&self) -> &str {
        &self.name
    }
}

pub fn find_group(conn: &Connection, id_or_name: &str) -> rusqlite::Result<Option<SecurityGroup>> {
    super::find_by_id_or_name::<SecurityGroup>(conn, id_or_name)
}

pub(super) fn require_group(
    conn: &Connection,
    id_or_name: &str,
) -> Result<SecurityGroup, CommandError> {
    find_group(conn, id_or_name)
        .map_err(store_err)?
        .ok_or_else(|| CommandError::SecurityGroupUnknown {
            group: id_or_name.to_string(),
        })
}

fn validate_rule(conn: &Connection, rule: &mut SecurityRule) -> Result<(), CommandError> {
    match (rule.port_min, rule.port_max) {
        (None, None) => {}
        (Some(lo), hi) => {
            let hi = hi.unwrap_or(lo);
            if !matches!(rule.protocol, RuleProtocol::Tcp | RuleProtocol::Udp) {
                return Err(invalid("ports", "ports apply to tcp and udp rules only"));
            }
            if lo == 0 || hi < lo {
                return Err(invalid(
                    "ports",
                    format!("{lo}-{hi} is not a range of ports 1-65535 (low to high)"),
                ));
            }
            rule.port_max = Some(hi);
        }
        (None, Some(_)) => return Err(invalid("ports", "a port range needs its low end")),
    }
    if let RuleRemote::Group { group } = &mut rule.remote {
        *group = require_group(conn, group)?.id;
    }
    Ok(())
}

// ---- floating IPs -----------------------------------------------------------------------

/// The public addresses floating IPs come from: `FIRST-LAST` (inclusive), on the hosts'
/// public network.
pub const FLOATING_IP_RANGE: &str = "network.floating-ip-range";

/// Checks the value of a `network.*` setting; other keys pass.
pub fn validate_setting_value(key: &str, value: &str) -> Result<(), CommandError> {
    if key == FLOATING_IP_RANGE {
        parse_range(value).map_err(|reason| CommandError::Invalid {
            field: format!("setting {key}"),
            reason,
        })?;
    }
    Ok(())
}

fn parse_range(text: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let bad = || format!("{text:?} must be a range of IPv4 addresses like 192.0.2.10-192.0.2.50");
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let a: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
    let b: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
    if u32::from(b) < u32::from(a) || u32::from(b) - u32::from(a) > 65535 {
        return Err(format!(
            "{text:?} must go from low to high and hold at most 65536 addresses"
        ));
    }
    Ok((a, b))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardProtocol {
    Tcp,
    Udp,
}

/// One forwarded port of a floating IP.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortForward {
    pub protocol: ForwardProtocol,
    pub public_port: u16,
    pub private_port: u16,
}

/// Where a floating IP points: a VM NIC on an external network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FipTarget {
    pub vm_id: String,
    pub network_id: String,
    pub private_ip: Ipv4Addr,
    /// Empty: 1:1 NAT (every port, both ways). Otherwise only these ports come in.
    pub ports: Vec<PortForward>,
}

/// A public address from the floating-IP range, attached to a VM or free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloatingIp {
    pub ip: Ipv4Addr,
    pub target: Option<FipTarget>,
    pub allocated_at_ms: u64,
}
impl Record for FloatingIp {
    const KIND: &'static str = "floating_ip";
    fn key(&self) -> String {
        format!("{:010}", u32::from(self.ip))
    }
}

fn require_fip(conn: &Connection, ip: Ipv4Addr) -> Result<FloatingIp, CommandError> {
    read::<FloatingIp>(conn, &format!("{:010}", u32::from(ip)))?
        .ok_or_else(|| CommandError::FloatingIpUnknown { ip: ip.to_string() })
}

/// Floating IPs attached to this VM (they must be detached before it is deleted).
pub fn fips_of_vm(conn: &Connection, vm_id: &str) -> Result<Vec<FloatingIp>, CommandError> {
    Ok(list::<FloatingIp>(conn)
        .map_err(store_err)?
        .into_iter()
        .filter(|f| f.target.as_ref().is_some_and(|t| t.vm_id == vm_id))
        .collect())
}

// ---- commands ---------------------------------------------------------------------------

/// Network commands; see [`super::Command`] for how they are carried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NetworkCommand {
    /// Gives a host interface a role (`network: None` clears it).
    SetHostNetwork {
        host_id: NodeId,
        role: NetRole,
        network: Option<PhysicalNetwork>,
    },
    CreateNetwork {
        network_id: String,
        name: String,
        cidr: String,
        gateway: Option<Ipv4Addr>,
        dns_domain: Option<String>,
        mtu: Option<u32>,
        external: bool,
        now_ms: u64,
    },
    DeleteNetwork {
        network: String,
    },
    CreateSecurityGroup {
        group_id: String,
        name: String,
        now_ms: u64,
    },
    DeleteSecurityGroup {
        group: String,
    },
    AddSecurityRule {
        group: String,
        rule: SecurityRule,
    },
    DeleteSecurityRule {
        group: String,
        rule_id: String,
    },
    /// Takes an address from the floating-IP range (`ip`: that one).
    AllocateFloatingIp {
        ip: Option<Ipv4Addr>,
        now_ms: u64,
    },
    /// Points a floating IP at a VM's NIC on an external network.
    AttachFloatingIp {
        ip: Ipv4Addr,
        vm: String,
        /// The VM's network (name or id); `None`: its only external network.
        network: Option<String>,
        ports: Vec<PortForward>,
    },
    DetachFloatingIp {
        ip: Ipv4Addr,
    },
    ReleaseFloatingIp {
        ip: Ipv4Addr,
    },
}

impl NetworkCommand {
    pub fn kind(&self) -> &'static str {
        match self {
            NetworkCommand::SetHostNetwork { .. } => "set_host_network",
            NetworkCommand::CreateNetwork { .. } => "create_network",
            NetworkCommand::DeleteNetwork { .. } => "delete_network",
            NetworkCommand::CreateSecurityGroup { .. } => "create_security_group",
            NetworkCommand::DeleteSecurityGroup { .. } => "delete_security_group",
            NetworkCommand::AddSecurityRule { .. } => "add_security_rule",
            NetworkCommand::DeleteSecurityRule { .. } => "delete_security_rule",
            NetworkCommand::AllocateFloatingIp { .. } => "allocate_floating_ip",
            NetworkCommand::AttachFloatingIp { .. } => "attach_floating_ip",
            NetworkCommand::DetachFloatingIp { .. } => "detach_floating_ip",
            NetworkCommand::ReleaseFloatingIp { .. } => "release_floating_ip",
        }
    }
}

// ---- what a host must build -------------------------------------------------------------

/// A VM NIC on a guest network, wherever it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPort {
    pub vm_id: String,
    pub vm_name: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub security_groups: Vec<String>,
    /// The host that runs (or is about to run) the VM; `None` while unplaced.
    pub host: Option<NodeId>,
    /// The migration target as well, while a VM moves (both hosts need the segment).
    pub also_on: Option<NodeId>,
}

/// A guest network with its ports, as every host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkView {
    pub network: Network,
    pub ports: Vec<GuestPort>,
}

impl NetworkView {
    /// Hosts that need the network's segment.
    pub fn hosts(&self) -> BTreeSet<NodeId> {
        self.ports
            .iter()
            .flat_map(|p| p.host.into_iter().chain(p.also_on))
            .collect()
    }
}

/// Every guest network with its ports.
pub fn network_views(conn: &Connection) -> Result<Vec<NetworkView>, CommandError> {
    Ok(network_views_from(
        list::<Network>(conn).map_err(store_err)?,
        &list::<Vm>(conn).map_err(store_err)?,
    ))
}

/// [`network_views`] from records already read.
pub fn network_views_from(networks: Vec<Network>, vms: &[Vm]) -> Vec<NetworkView> {
    let mut views: BTreeMap<String, NetworkView> = networks
        .into_iter()
        .map(|n| {
            (
                n.id.clone(),
                NetworkView {
                    network: n,
                    ports: Vec::new(),
                },
            )
        })
        .collect();
    for vm in vms {
        for nic in &vm.spec.nics {
            let (Some(net), Some(ip), Some(mac)) = (&nic.network, &nic.ip, &nic.mac) else {
                continue;
            };
            let (Some(view), Ok(ip)) = (views.get_mut(net), ip.parse()) else {
                continue;
            };
            view.ports.push(GuestPort {
                vm_id: vm.id.clone(),
                vm_name: vm.name.clone(),
                mac: mac.clone(),
                ip,
                security_groups: nic.security_groups.clone(),
                host: vm.host,
                also_on: vm.migration.as_ref().map(|m| m.target),
            });
        }
    }
    views.into_values().collect()
}

mod apply;
pub(super) use apply::apply;

#[cfg(test)]
mod tests;
