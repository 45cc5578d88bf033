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

use super::compute::{NicSpec, Vm};
use super::{
    delete, list, next_counter, put, read, require_host, require_init, store_err, validate_name,
    CommandError, Host, Outcome, Record,
};
use crate::types::NodeId;

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

fn invalid(field: &str, reason: impl Into<String>) -> CommandError {
    CommandError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

// ---- addresses --------------------------------------------------------------------------

/// An IPv4 prefix, written `a.b.c.d/len`. The address is always the network address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
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
    pub fn parse(text: &str, strict: bool) -> Result<Self, String> {
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR like 10.0.0.0/24"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not a CIDR like 10.0.0.0/24"))?;
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("{text:?} has a prefix length that is not 0-32"))?;
        let cidr = Self { addr, prefix_len };
        if strict && cidr.network() != addr {
            return Err(format!(
                "{text:?} has host bits set: did you mean {}/{prefix_len}?",
                cidr.network()
            ));
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

impl Network {
    /// The host bridge of this network (the node's network reconciler creates it).
    pub fn bridge(&self) -> String {
        bridge_for_vni(self.vni)
    }
}

/// Bridge name of a VNI, as the node's link adapter names it.
pub fn bridge_for_vni(vni: u32) -> String {
    format!("kbr{vni}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NetworkName {
    name: String,
    id: String,
}
impl Record for NetworkName {
    const KIND: &'static str = "network_name";
    fn key(&self) -> String {
        self.name.clone()
    }
}
impl super::NameIndex for NetworkName {
    fn id(&self) -> &str {
        &self.id
    }
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

fn lease_key(network_id: &str, ip: Ipv4Addr) -> String {
    // Zero-padded so that the table's order is the numeric order of addresses.
    format!("{network_id}/{:010}", u32::from(ip))
}

pub fn find_network(conn: &Connection, id_or_name: &str) -> rusqlite::Result<Option<Network>> {
    super::find_by_id_or_name::<Network, NetworkName>(conn, id_or_name)
}

fn require_network(conn: &Connection, id_or_name: &str) -> Result<Network, CommandError> {
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

fn allocate_vni(conn: &Connection, network_id: &str) -> Result<u32, CommandError> {
    let span = u64::from(VNI_LAST - VNI_FIRST + 1);
    for _ in 0..span {
        // A rotating counter rather than the lowest free VNI: a VNI freed by a delete is
        // not handed out again until every other one was, so a host still tearing down
        // the old segment never meets the new one.
        let n = next_counter(conn, "vni", 0)?;
        let vni = VNI_FIRST + (n % span) as u32;
        if read::<VniUse>(conn, &format!("{vni:08}"))?.is_none() {
            put(
                conn,
                &VniUse {
                    vni,
                    network_id: network_id.to_string(),
                },
            )?;
            return Ok(vni);
        }
    }
    Err(invalid(
        "network",
        format!("every VNI ({VNI_FIRST}-{VNI_LAST}) is in use: delete unused networks first"),
    ))
}

/// Gives a VM NIC an address on its network: the one it asked for if free, else the
/// lowest free one.
fn allocate_ip(
    conn: &Connection,
    net: &Network,
    wanted: Option<Ipv4Addr>,
    vm_id: &str,
    mac: &str,
) -> Result<Ipv4Addr, CommandError> {
    let taken: BTreeSet<Ipv4Addr> = network_leases(conn, &net.id)
        .map_err(store_err)?
        .into_iter()
        .map(|l| l.ip)
        .collect();
    let ip = match wanted {
        Some(ip) => {
            if !net.cidr.contains(ip) || ip == net.cidr.addr || ip == net.cidr.broadcast() {
                return Err(invalid(
                    "ip",
                    format!(
                        "{ip} is not a host address of network {} ({})",
                        net.name, net.cidr
                    ),
                ));
            }
            if ip == net.gateway {
                return Err(invalid(
                    "ip",
                    format!("{ip} is the gateway of network {}", net.name),
                ));
            }
            if taken.contains(&ip) {
                return Err(CommandError::AddressInUse {
                    network: net.name.clone(),
                    ip: ip.to_string(),
                });
            }
            ip
        }
        None => net
            .cidr
            .hosts()
            .find(|ip| *ip != net.gateway && !taken.contains(ip))
            .ok_or_else(|| CommandError::NetworkFull {
                network: net.name.clone(),
                cidr: net.cidr.to_string(),
            })?,
    };
    put(
        conn,
        &IpLease {
            network_id: net.id.clone(),
            ip,
            vm_id: vm_id.to_string(),
            mac: mac.to_string(),
        },
    )?;
    Ok(ip)
}

/// Completes a NIC on a guest network for a new VM or a NIC attach: resolves the network,
/// names the bridge, checks the security groups and leases an address. `nic.mac` must
/// already be set.
pub(super) fn prepare_nic(
    conn: &Connection,
    nic: &mut NicSpec,
    vm_id: &str,
) -> Result<(), CommandError> {
    let mac = nic.mac.clone().unwrap_or_default();
    if nic.security_groups.len() > MAX_GROUPS_PER_NIC {
        return Err(invalid(
            "security groups",
            format!("at most {MAX_GROUPS_PER_NIC} per NIC"),
        ));
    }
    let mut groups = Vec::new();
    for g in &nic.security_groups {
        let group = require_group(conn, g)?;
        if !groups.contains(&group.id) {
            groups.push(group.id);
        }
    }
    nic.security_groups = groups;
    if nic.network.is_some() && !nic.bridge.is_empty() {
        return Err(invalid(
            "nic",
            "a NIC is on a guest network or on a host bridge, not both",
        ));
    }
    let Some(network) = nic.network.clone() else {
        if nic.bridge.starts_with("kbr") {
            return Err(invalid(
                "bridge",
                format!(
                    "{:?} is a guest network's bridge: attach the NIC to the network instead",
                    nic.bridge
                ),
            ));
        }
        if nic.ip.is_some() {
            return Err(invalid(
                "ip",
                "an address can only be given for a NIC on a guest network",
            ));
        }
        if !nic.security_groups.is_empty() {
            return Err(invalid(
                "security groups",
                "security groups apply to NICs on guest networks only",
            ));
        }
        return Ok(());
    };
    let net = require_network(conn, &network)?;
    if let Some(other) = list::<IpLease>(conn)
        .map_err(store_err)?
        .into_iter()
        .find(|l| l.mac.eq_ignore_ascii_case(&mac))
    {
        return Err(CommandError::NameTaken {
            kind: "MAC address".into(),
            name: format!("{mac} (used by VM {})", other.vm_id),
        });
    }
    let wanted = match &nic.ip {
        None => None,
        Some(text) => Some(
            text.parse::<Ipv4Addr>()
                .map_err(|_| invalid("ip", format!("{text:?} is not an IPv4 address")))?,
        ),
    };
    let ip = allocate_ip(conn, &net, wanted, vm_id, &mac)?;
    nic.network = Some(net.id.clone());
    nic.bridge = net.bridge();
    nic.ip = Some(ip.to_string());
    Ok(())
}

/// Frees every address a VM holds (it is deleted, or its creation was refused).
pub(super) fn release_vm(conn: &Connection, vm: &Vm) -> Result<(), CommandError> {
    for nic in &vm.spec.nics {
        release_nic(conn, nic)?;
    }
    Ok(())
}

pub(super) fn release_nic(conn: &Connection, nic: &NicSpec) -> Result<(), CommandError> {
    if let (Some(net), Some(ip)) = (&nic.network, &nic.ip) {
        if let Ok(ip) = ip.parse::<Ipv4Addr>() {
            delete::<IpLease>(conn, &lease_key(net, ip))?;
            // A floating IP pointing at the NIC is detached (kept allocated).
            for mut fip in list::<FloatingIp>(conn).map_err(store_err)? {
                if fip
                    .target
                    .as_ref()
                    .is_some_and(|t| t.network_id == *net && t.private_ip == ip)
                {
                    fip.target = None;
                    put(conn, &fip)?;
                }
            }
        }
    }
    Ok(())
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SecurityGroupName {
    name: String,
    id: String,
}
impl Record for SecurityGroupName {
    const KIND: &'static str = "security_group_name";
    fn key(&self) -> String {
        self.name.clone()
    }
}
impl super::NameIndex for SecurityGroupName {
    fn id(&self) -> &str {
        &self.id
    }
}

pub fn find_group(conn: &Connection, id_or_name: &str) -> rusqlite::Result<Option<SecurityGroup>> {
    super::find_by_id_or_name::<SecurityGroup, SecurityGroupName>(conn, id_or_name)
}

fn require_group(conn: &Connection, id_or_name: &str) -> Result<SecurityGroup, CommandError> {
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

pub(super) fn apply(conn: &Connection, command: &NetworkCommand) -> Result<Outcome, CommandError> {
    require_init(conn)?;
    match command {
        NetworkCommand::SetHostNetwork {
            host_id,
            role,
            network,
        } => {
            let host = require_host(conn, *host_id)?;
            let mut nets =
                read::<HostNetworks>(conn, &format!("{host_id:020}"))?.unwrap_or(HostNetworks {
                    host_id: *host_id,
                    roles: BTreeMap::new(),
                });
            match network {
                None => {
                    if nets.roles.remove(role).is_none() {
                        return Ok(Outcome::Unchanged);
                    }
                }
                Some(net) => {
                    validate_physical(&host, *role, net)?;
                    if nets.roles.get(role) == Some(net) {
                        return Ok(Outcome::Unchanged);
                    }
                    nets.roles.insert(*role, net.clone());
                }
            }
            put(conn, &nets)?;
            Ok(Outcome::Done)
        }
        NetworkCommand::CreateNetwork {
            network_id,
            name,
            cidr,
            gateway,
            dns_domain,
            mtu,
            external,
            now_ms,
        } => {
            super::require_new_named::<Network, NetworkName>(conn, "network", network_id, name)?;
            let cidr = Ipv4Cidr::parse(cidr, true).map_err(|r| invalid("cidr", r))?;
            if !(MIN_PREFIX..=MAX_PREFIX).contains(&cidr.prefix_len) {
                return Err(invalid(
                    "cidr",
                    format!("the prefix length must be /{MIN_PREFIX} to /{MAX_PREFIX}"),
                ));
            }
            let gateway = match gateway {
                Some(gw) => {
                    if !cidr.contains(*gw) || *gw == cidr.addr || *gw == cidr.broadcast() {
                        return Err(invalid(
                            "gateway",
                            format!("{gw} is not a host address of {cidr}"),
                        ));
                    }
                    *gw
                }
                None => Ipv4Addr::from(u32::from(cidr.addr) + 1),
            };
            let dns_domain = match dns_domain {
                Some(d) => {
                    let d = d.trim_end_matches('.').to_ascii_lowercase();
                    validate_domain(&d)?;
                    d
                }
                None => format!("{name}.internal"),
            };
            let max_mtu = max_guest_mtu(conn)?;
            let mtu = match mtu {
                Some(m) if *m > max_mtu => {
                    return Err(invalid(
                        "mtu",
                        format!(
                            "{m} is larger than {max_mtu}, the guest underlay's MTU minus the {VXLAN_OVERHEAD} bytes of VXLAN"
                        ),
                    ))
                }
                Some(m) if *m < MIN_MTU => {
                    return Err(invalid("mtu", format!("{m} is smaller than {MIN_MTU}")))
                }
                Some(m) => *m,
                None => max_mtu,
            };
            let vni = allocate_vni(conn, network_id)?;
            put(
                conn,
                &Network {
                    id: network_id.clone(),
                    name: name.clone(),
                    cidr,
                    gateway,
                    dns_domain,
                    vni,
                    mtu,
                    external: *external,
                    created_at_ms: *now_ms,
                },
            )?;
            put(
                conn,
                &NetworkName {
                    name: name.clone(),
                    id: network_id.clone(),
                },
            )?;
            Ok(Outcome::Created {
                id: network_id.clone(),
            })
        }
        NetworkCommand::DeleteNetwork { network } => {
            let net = require_network(conn, network)?;
            let users = network_users(conn, &net.id)?;
            if !users.is_empty() {
                return Err(CommandError::InUse {
                    what: format!("network {}", net.name),
                    users,
                });
            }
            for lease in network_leases(conn, &net.id).map_err(store_err)? {
                delete::<IpLease>(conn, &lease.key())?;
            }
            delete::<VniUse>(conn, &format!("{:08}", net.vni))?;
            delete::<NetworkName>(conn, &net.name)?;
            delete::<Network>(conn, &net.id)?;
            Ok(Outcome::Done)
        }
        NetworkCommand::CreateSecurityGroup {
            group_id,
            name,
            now_ms,
        } => {
            super::require_new_named::<SecurityGroup, SecurityGroupName>(
                conn,
                "security group",
                group_id,
                name,
            )?;
            put(
                conn,
                &SecurityGroup {
                    id: group_id.clone(),
                    name: name.clone(),
                    rules: Vec::new(),
                    created_at_ms: *now_ms,
                    revision: 1,
                },
            )?;
            put(
                conn,
                &SecurityGroupName {
                    name: name.clone(),
                    id: group_id.clone(),
                },
            )?;
            Ok(Outcome::Created {
                id: group_id.clone(),
            })
        }
        NetworkCommand::DeleteSecurityGroup { group } => {
            let g = require_group(conn, group)?;
            let mut users = BTreeSet::new();
            for vm in list::<Vm>(conn).map_err(store_err)? {
                if vm
                    .spec
                    .nics
                    .iter()
                    .any(|n| n.security_groups.contains(&g.id))
                {
                    users.insert(format!("VM {}", vm.name));
                }
            }
            for other in list::<SecurityGroup>(conn).map_err(store_err)? {
                if other.id != g.id
                    && other
                        .rules
                        .iter()
                        .any(|r| matches!(&r.remote, RuleRemote::Group { group } if *group == g.id))
                {
                    users.insert(format!("rules of security group {}", other.name));
                }
            }
            if !users.is_empty() {
                return Err(CommandError::InUse {
                    what: format!("security group {}", g.name),
                    users: users.into_iter().collect(),
                });
            }
            delete::<SecurityGroupName>(conn, &g.name)?;
            delete::<SecurityGroup>(conn, &g.id)?;
            Ok(Outcome::Done)
        }
        NetworkCommand::AddSecurityRule { group, rule } => {
            let mut g = require_group(conn, group)?;
            if g.rules.len() >= MAX_RULES {
                return Err(invalid(
                    "rule",
                    format!("security group {} already has {MAX_RULES} rules", g.name),
                ));
            }
            if g.rules.iter().any(|r| r.id == rule.id) {
                return Err(CommandError::NameTaken {
                    kind: "rule id".into(),
                    name: rule.id.clone(),
                });
            }
            let mut rule = rule.clone();
            validate_rule(conn, &mut rule)?;
            let same = |r: &SecurityRule| {
                (r.direction, r.protocol, r.port_min, r.port_max, &r.remote)
                    == (
                        rule.direction,
                        rule.protocol,
                        rule.port_min,
                        rule.port_max,
                        &rule.remote,
                    )
            };
            if let Some(existing) = g.rules.iter().find(|r| same(r)) {
                return Err(invalid(
                    "rule",
                    format!(
                        "security group {} already has this rule (rule {})",
                        g.name, existing.id
                    ),
                ));
            }
            g.rules.push(rule.clone());
            g.revision += 1;
            put(conn, &g)?;
            Ok(Outcome::Created { id: rule.id })
        }
        NetworkCommand::AllocateFloatingIp { ip, now_ms } => {
            let range = read::<super::Setting>(conn, FLOATING_IP_RANGE)?.ok_or_else(|| {
                invalid(
                    "floating IP",
                    format!(
                        "no floating-IP range is configured: set {FLOATING_IP_RANGE} to FIRST-LAST first"
                    ),
                )
            })?;
            let (first, last) =
                parse_range(&range.value).map_err(|r| invalid("floating IP range", r))?;
            let taken: BTreeSet<Ipv4Addr> = list::<FloatingIp>(conn)
                .map_err(store_err)?
                .into_iter()
                .map(|f| f.ip)
                .collect();
            let ip = match ip {
                Some(ip) => {
                    if !(u32::from(first)..=u32::from(last)).contains(&u32::from(*ip)) {
                        return Err(invalid(
                            "floating IP",
                            format!("{ip} is outside the floating-IP range {}", range.value),
                        ));
                    }
                    if taken.contains(ip) {
                        return Err(CommandError::NameTaken {
                            kind: "floating IP".into(),
                            name: ip.to_string(),
                        });
                    }
                    *ip
                }
                None => (u32::from(first)..=u32::from(last))
                    .map(Ipv4Addr::from)
                    .find(|ip| !taken.contains(ip))
                    .ok_or_else(|| {
                        invalid(
                            "floating IP",
                            format!(
                                "every address of {} is allocated: release one or widen the range",
                                range.value
                            ),
                        )
                    })?,
            };
            put(
                conn,
                &FloatingIp {
                    ip,
                    target: None,
                    allocated_at_ms: *now_ms,
                },
            )?;
            Ok(Outcome::Created { id: ip.to_string() })
        }
        NetworkCommand::AttachFloatingIp {
            ip,
            vm,
            network,
            ports,
        } => {
            let mut fip = require_fip(conn, *ip)?;
            let vm = super::compute::find_vm(conn, vm)
                .map_err(store_err)?
                .ok_or_else(|| CommandError::VmUnknown { vm: vm.clone() })?;
            if let Some(t) = &fip.target {
                if t.vm_id != vm.id {
                    return Err(CommandError::InUse {
                        what: format!("floating IP {ip}"),
                        users: vec![format!("VM {}", t.vm_id)],
                    });
                }
            }
            let wanted = match network {
                Some(n) => Some(require_network(conn, n)?.id),
                None => None,
            };
            let mut candidates = Vec::new();
            for nic in &vm.spec.nics {
                let (Some(net_id), Some(ip)) = (&nic.network, &nic.ip) else {
                    continue;
                };
                if wanted.as_ref().is_some_and(|w| w != net_id) {
                    continue;
                }
                let Some(net) = read::<Network>(conn, net_id)? else {
                    continue;
                };
                if net.external {
                    candidates.push((
                        net,
                        ip.parse::<Ipv4Addr>().map_err(|_| {
                            invalid("ip", format!("VM {} has a bad address {ip}", vm.name))
                        })?,
                    ));
                }
            }
            let (net, private_ip) = match candidates.len() {
                1 => candidates.remove(0),
                0 => {
                    return Err(invalid(
                        "floating IP",
                        format!(
                            "VM {} has no NIC on an external network{}: create the network with --external",
                            vm.name,
                            network.as_ref().map(|n| format!(" {n}")).unwrap_or_default()
                        ),
                    ))
                }
                _ => {
                    return Err(invalid(
                        "floating IP",
                        format!(
                            "VM {} has NICs on several external networks: name one with --network",
                            vm.name
                        ),
                    ))
                }
            };
            let mut ports = ports.clone();
            ports.sort();
            for pair in ports.windows(2) {
                if (pair[0].protocol, pair[0].public_port)
                    == (pair[1].protocol, pair[1].public_port)
                {
                    return Err(invalid(
                        "ports",
                        format!("public port {} is forwarded twice", pair[0].public_port),
                    ));
                }
            }
            if ports
                .iter()
                .any(|p| p.public_port == 0 || p.private_port == 0)
            {
                return Err(invalid("ports", "ports are 1-65535"));
            }
            fip.target = Some(FipTarget {
                vm_id: vm.id.clone(),
                network_id: net.id.clone(),
                private_ip,
                ports,
            });
            put(conn, &fip)?;
            Ok(Outcome::Done)
        }
        NetworkCommand::DetachFloatingIp { ip } => {
            let mut fip = require_fip(conn, *ip)?;
            if fip.target.take().is_none() {
                return Ok(Outcome::Unchanged);
            }
            put(conn, &fip)?;
            Ok(Outcome::Done)
        }
        NetworkCommand::ReleaseFloatingIp { ip } => {
            let fip = require_fip(conn, *ip)?;
            if let Some(t) = &fip.target {
                return Err(CommandError::InUse {
                    what: format!("floating IP {ip}"),
                    users: vec![format!("VM {} (detach it first)", t.vm_id)],
                });
            }
            delete::<FloatingIp>(conn, &fip.key())?;
            Ok(Outcome::Done)
        }
        NetworkCommand::DeleteSecurityRule { group, rule_id } => {
            let mut g = require_group(conn, group)?;
            // The whole id, or a prefix of at least 4 characters that names one rule.
            let exact = g.rules.iter().any(|r| r.id == *rule_id);
            let matching: Vec<String> = g
                .rules
                .iter()
                .filter(|r| {
                    r.id == *rule_id
                        || (!exact && rule_id.len() >= 4 && r.id.starts_with(rule_id.as_str()))
                })
                .map(|r| r.id.clone())
                .collect();
            match matching.as_slice() {
                [] => {
                    return Err(CommandError::RuleUnknown {
                        group: g.name.clone(),
                        rule: rule_id.clone(),
                    })
                }
                [one] => g.rules.retain(|r| r.id != *one),
                _ => {
                    return Err(invalid(
                        "rule",
                        format!(
                            "{rule_id:?} matches {} rules of {}: give more of the id",
                            matching.len(),
                            g.name
                        ),
                    ))
                }
            }
            g.revision += 1;
            put(conn, &g)?;
            Ok(Outcome::Done)
        }
    }
}

fn validate_physical(
    host: &Host,
    role: NetRole,
    net: &PhysicalNetwork,
) -> Result<(), CommandError> {
    let field = format!("{} network", role.as_str());
    let Some(inv) = &host.inventory else {
        return Err(invalid(
            &field,
            format!(
                "host {} has not reported its interfaces yet: try again in a few seconds",
                host.name
            ),
        ));
    };
    let Some(nic) = inv.nics.iter().find(|n| n.name == net.interface) else {
        let names: Vec<&str> = inv.nics.iter().map(|n| n.name.as_str()).collect();
        return Err(invalid(
            &field,
            format!(
                "host {} has no interface {:?} (it has: {})",
                host.name,
                net.interface,
                names.join(", ")
            ),
        ));
    };
    let want = net.address.to_string();
    let on_nic = nic.addresses.iter().any(|a| {
        Ipv4Cidr::parse(a, false).is_ok_and(|c| c.prefix_len == net.address.prefix_len)
            && a.split('/').next() == Some(net.address.addr.to_string().as_str())
    });
    if !on_nic {
        return Err(invalid(
            &field,
            format!(
                "address {want} is not configured on {} of host {} (it has: {}): configure it on the host first",
                net.interface,
                host.name,
                if nic.addresses.is_empty() {
                    "no address".to_string()
                } else {
                    nic.addresses.join(", ")
                }
            ),
        ));
    }
    if let Some(gw) = net.gateway {
        let subnet = Ipv4Cidr::parse(&want, false).map_err(|r| invalid(&field, r))?;
        if role != NetRole::Public {
            return Err(invalid(&field, "only the public network has a gateway"));
        }
        if !subnet.contains(gw) {
            return Err(invalid(&field, format!("gateway {gw} is not on {subnet}")));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::super::compute::{BootSource, ComputeCommand, ImageFormat, Template, VmSpec};
    use super::super::{
        apply as apply_cmd, test_init_command, Command, HypervisorReport, Inventory, Nic, SCHEMA,
    };
    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(SCHEMA).expect("schema");
        apply_cmd(&conn, &test_init_command()).expect("init");
        let mut host = super::super::host(&conn, 1).expect("read").expect("host 1");
        let ip = host.peer_addr.split(':').next().unwrap().to_string();
        host.inventory = Some(Inventory {
            cpus: 4,
            memory_bytes: 16 << 30,
            nics: vec![Nic {
                name: "eth0".into(),
                mtu: 1500,
                addresses: vec![format!("{ip}/24")],
                up: true,
                ..Default::default()
            }],
            hypervisor: Some(HypervisorReport {
                domain_type: "qemu".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        put(&conn, &host).expect("put host");
        apply_cmd(
            &conn,
            &Command::Compute {
                command: ComputeCommand::RegisterTemplate {
                    template: Template {
                        id: "t-tiny".into(),
                        name: "tiny".into(),
                        format: ImageFormat::Qcow2,
                        size_bytes: 10 << 20,
                        virtual_size_bytes: 64 << 20,
                        sha256: "a".repeat(64),
                        replicas: vec![1],
                        created_at_ms: 1,
                    },
                },
            },
        )
        .expect("template");
        conn
    }

    fn net_cmd(conn: &Connection, command: NetworkCommand) -> Result<Outcome, CommandError> {
        apply_cmd(conn, &Command::Network { command })
    }

    fn create_net(conn: &Connection, name: &str, cidr: &str) -> Result<Outcome, CommandError> {
        net_cmd(
            conn,
            NetworkCommand::CreateNetwork {
                network_id: format!("id-{name}"),
                name: name.into(),
                cidr: cidr.into(),
                gateway: None,
                dns_domain: None,
                mtu: None,
                external: false,
                now_ms: 1,
            },
        )
    }

    fn create_vm(
        conn: &Connection,
        name: &str,
        nics: Vec<NicSpec>,
    ) -> Result<Outcome, CommandError> {
        apply_cmd(
            conn,
            &Command::Compute {
                command: ComputeCommand::CreateVm {
                    vm_id: format!("vm-{name}"),
                    name: name.into(),
                    spec: VmSpec {
                        vcpus: 1,
                        memory_mib: 128,
                        boot: BootSource::Template {
                            template: "tiny".into(),
                        },
                        root_disk_gib: None,
                        data_disks: vec![],
                        nics,
                        cloud_init: Default::default(),
                        affinity_group: None,
                        ha: false,
                    },
                    start: true,
                    stop_timeout_s: 30,
                    op_id: format!("op-{name}"),
                    now_ms: 1,
                },
            },
        )
    }

    fn on(net: &str) -> NicSpec {
        NicSpec {
            network: Some(net.into()),
            ..Default::default()
        }
    }

    #[test]
    fn networks_get_unique_vnis_defaults_and_mtu_checks() {
        let conn = db();
        create_net(&conn, "blue", "10.0.0.0/24").unwrap();
        // Two tenants may use the same CIDR.
        create_net(&conn, "green", "10.0.0.0/24").unwrap();
        let blue = find_network(&conn, "blue").unwrap().unwrap();
        let green = find_network(&conn, "green").unwrap().unwrap();
        assert_ne!(blue.vni, green.vni);
        assert!((VNI_FIRST..=VNI_LAST).contains(&blue.vni));
        assert_eq!(blue.gateway.to_string(), "10.0.0.1");
        assert_eq!(blue.mtu, 1450, "underlay 1500 minus 50");
        assert_eq!(blue.dns_domain, "blue.internal");
        assert_eq!(blue.bridge(), format!("kbr{}", blue.vni));
        let e = create_net(&conn, "blue", "10.9.0.0/24").unwrap_err();
        assert!(matches!(e, CommandError::NameTaken { .. }), "{e}");
        let e = create_net(&conn, "bad", "10.0.0.5/24").unwrap_err();
        assert!(e.to_string().contains("host bits"), "{e}");
        let e = create_net(&conn, "bad", "10.0.0.0/30").unwrap_err();
        assert!(e.to_string().contains("prefix length"), "{e}");
        let e = net_cmd(
            &conn,
            NetworkCommand::CreateNetwork {
                network_id: "id-big".into(),
                name: "big".into(),
                cidr: "10.1.0.0/24".into(),
                gateway: Some("10.1.0.254".parse().unwrap()),
                dns_domain: Some("Corp.Example.".into()),
                mtu: Some(1500),
                external: false,
                now_ms: 1,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("mtu"), "{e}");
        let e = net_cmd(
            &conn,
            NetworkCommand::CreateNetwork {
                network_id: "id-big".into(),
                name: "big".into(),
                cidr: "10.1.0.0/24".into(),
                gateway: Some("10.2.0.1".parse().unwrap()),
                dns_domain: None,
                mtu: None,
                external: false,
                now_ms: 1,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a host address"), "{e}");
        // Deleting frees the VNI record but the counter moves on.
        net_cmd(
            &conn,
            NetworkCommand::DeleteNetwork {
                network: "blue".into(),
            },
        )
        .unwrap();
        create_net(&conn, "blue2", "10.0.0.0/24").unwrap();
        let blue2 = find_network(&conn, "blue2").unwrap().unwrap();
        assert_ne!(blue2.vni, blue.vni);
        assert_ne!(blue2.vni, green.vni);
    }

    #[test]
    fn ipam_leases_unique_addresses_and_frees_them() {
        let conn = db();
        create_net(&conn, "blue", "10.0.0.0/29").unwrap();
        create_vm(&conn, "a", vec![on("blue")]).unwrap();
        create_vm(&conn, "b", vec![on("blue")]).unwrap();
        let leases = network_leases(&conn, "id-blue").unwrap();
        let ips: Vec<String> = leases.iter().map(|l| l.ip.to_string()).collect();
        assert_eq!(ips, ["10.0.0.2", "10.0.0.3"], "gateway .1 skipped");
        let a = super::super::compute::find_vm(&conn, "a").unwrap().unwrap();
        assert_eq!(a.spec.nics[0].network.as_deref(), Some("id-blue"));
        assert_eq!(a.spec.nics[0].ip.as_deref(), Some("10.0.0.2"));
        assert!(a.spec.nics[0].bridge.starts_with("kbr"));
        // A fixed address: taken → clear error; outside → clear error; free → granted.
        let mut fixed = on("blue");
        fixed.ip = Some("10.0.0.3".into());
        let e = create_vm(&conn, "c", vec![fixed.clone()]).unwrap_err();
        assert!(matches!(e, CommandError::AddressInUse { .. }), "{e}");
        fixed.ip = Some("10.0.1.3".into());
        let e = create_vm(&conn, "c", vec![fixed.clone()]).unwrap_err();
        assert!(e.to_string().contains("not a host address"), "{e}");
        fixed.ip = Some("10.0.0.1".into());
        let e = create_vm(&conn, "c", vec![fixed.clone()]).unwrap_err();
        assert!(e.to_string().contains("gateway"), "{e}");
        fixed.ip = Some("10.0.0.6".into());
        create_vm(&conn, "c", vec![fixed]).unwrap();
        // A refused create leases nothing (the rejection rolls back).
        create_vm(&conn, "d", vec![on("blue")]).unwrap(); // .4
        create_vm(&conn, "e", vec![on("blue")]).unwrap(); // .5
        let e = create_vm(&conn, "f", vec![on("blue")]).unwrap_err();
        assert!(matches!(e, CommandError::NetworkFull { .. }), "{e}");
        let e = create_vm(&conn, "f", vec![on("nope")]).unwrap_err();
        assert!(matches!(e, CommandError::NetworkUnknown { .. }), "{e}");
        // The network cannot go while VMs use it.
        let e = net_cmd(
            &conn,
            NetworkCommand::DeleteNetwork {
                network: "blue".into(),
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("VM a"), "{e}");
        // Views: every port, unplaced for now.
        let views = network_views(&conn).unwrap();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].ports.len(), 5);
        assert!(views[0].hosts().is_empty());
    }

    #[test]
    fn bridges_of_guest_networks_need_the_network() {
        let conn = db();
        create_net(&conn, "blue", "10.0.0.0/24").unwrap();
        let vni = find_network(&conn, "blue").unwrap().unwrap().vni;
        let e = create_vm(
            &conn,
            "sneaky",
            vec![NicSpec {
                bridge: format!("kbr{vni}"),
                ..Default::default()
            }],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("attach the NIC to the network"),
            "{e}"
        );
        let e = create_vm(
            &conn,
            "x",
            vec![NicSpec {
                bridge: "br0".into(),
                ip: Some("10.0.0.5".into()),
                ..Default::default()
            }],
        )
        .unwrap_err();
        assert!(e.to_string().contains("guest network"), "{e}");
        // Same MAC twice on guest networks: refused.
        let mut nic = on("blue");
        nic.mac = Some("52:54:00:aa:00:01".into());
        create_vm(&conn, "m1", vec![nic.clone()]).unwrap();
        let e = create_vm(&conn, "m2", vec![nic]).unwrap_err();
        assert!(e.to_string().contains("MAC"), "{e}");
    }

    #[test]
    fn security_groups_and_rules() {
        let conn = db();
        create_net(&conn, "blue", "10.0.0.0/24").unwrap();
        for (id, name) in [("g-web", "web"), ("g-db", "db")] {
            net_cmd(
                &conn,
                NetworkCommand::CreateSecurityGroup {
                    group_id: id.into(),
                    name: name.into(),
                    now_ms: 1,
                },
            )
            .unwrap();
        }
        let rule = |id: &str, proto, lo, hi, remote| SecurityRule {
            id: id.into(),
            direction: Direction::Ingress,
            protocol: proto,
            port_min: lo,
            port_max: hi,
            remote,
        };
        let any = RuleRemote::Cidr {
            cidr: Ipv4Cidr::parse("0.0.0.0/0", true).unwrap(),
        };
        let add = |r: SecurityRule| {
            net_cmd(
                &conn,
                NetworkCommand::AddSecurityRule {
                    group: "db".into(),
                    rule: r,
                },
            )
        };
        add(rule(
            "r1aaaa",
            RuleProtocol::Tcp,
            Some(5432),
            None,
            RuleRemote::Group {
                group: "web".into(),
            },
        ))
        .unwrap();
        let g = find_group(&conn, "db").unwrap().unwrap();
        assert_eq!(g.rules[0].port_max, Some(5432));
        assert_eq!(
            g.rules[0].remote,
            RuleRemote::Group {
                group: "g-web".into()
            }
        );
        assert_eq!(g.revision, 2);
        let e = add(rule("r2", RuleProtocol::Icmp, Some(1), None, any.clone())).unwrap_err();
        assert!(e.to_string().contains("tcp and udp"), "{e}");
        let e = add(rule(
            "r2",
            RuleProtocol::Tcp,
            Some(90),
            Some(80),
            any.clone(),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("low to high"), "{e}");
        let e = add(rule(
            "r2",
            RuleProtocol::Tcp,
            None,
            None,
            RuleRemote::Group {
                group: "nope".into(),
            },
        ))
        .unwrap_err();
        assert!(
            matches!(e, CommandError::SecurityGroupUnknown { .. }),
            "{e}"
        );
        let e = add(rule(
            "r3",
            RuleProtocol::Tcp,
            Some(5432),
            Some(5432),
            RuleRemote::Group {
                group: "g-web".into(),
            },
        ))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("already has this rule (rule r1aaaa)"),
            "{e}"
        );
        // A NIC in "web"; "web" cannot go while used by a NIC and by db's rule.
        let mut nic = on("blue");
        nic.security_groups = vec!["web".into()];
        create_vm(&conn, "a", vec![nic]).unwrap();
        let a = super::super::compute::find_vm(&conn, "a").unwrap().unwrap();
        assert_eq!(a.spec.nics[0].security_groups, ["g-web"]);
        let e = net_cmd(
            &conn,
            NetworkCommand::DeleteSecurityGroup {
                group: "web".into(),
            },
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("VM a") && text.contains("rules of security group db"),
            "{text}"
        );
        // Rules are deleted by id or a unique prefix of at least 4 characters.
        let e = net_cmd(
            &conn,
            NetworkCommand::DeleteSecurityRule {
                group: "db".into(),
                rule_id: "zzzz".into(),
            },
        )
        .unwrap_err();
        assert!(matches!(e, CommandError::RuleUnknown { .. }), "{e}");
        net_cmd(
            &conn,
            NetworkCommand::DeleteSecurityRule {
                group: "db".into(),
                rule_id: "r1aa".into(),
            },
        )
        .unwrap();
        assert!(find_group(&conn, "db").unwrap().unwrap().rules.is_empty());
        let mut nic = on("blue");
        nic.security_groups = vec!["missing".into()];
        let e = create_vm(&conn, "b", vec![nic]).unwrap_err();
        assert!(
            matches!(e, CommandError::SecurityGroupUnknown { .. }),
            "{e}"
        );
    }

    #[test]
    fn floating_ips_come_from_the_range_and_attach_to_external_nics() {
        let conn = db();
        let alloc = |ip: Option<&str>| {
            net_cmd(
                &conn,
                NetworkCommand::AllocateFloatingIp {
                    ip: ip.map(|i| i.parse().unwrap()),
                    now_ms: 1,
                },
            )
        };
        let e = alloc(None).unwrap_err();
        assert!(e.to_string().contains(FLOATING_IP_RANGE), "{e}");
        apply_cmd(
            &conn,
            &Command::PutSetting {
                key: FLOATING_IP_RANGE.into(),
                value: "192.0.2.10-192.0.2.11".into(),
                now_ms: 1,
            },
        )
        .unwrap();
        let e = apply_cmd(
            &conn,
            &Command::PutSetting {
                key: FLOATING_IP_RANGE.into(),
                value: "192.0.2.11-192.0.2.10".into(),
                now_ms: 1,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("low to high"), "{e}");
        assert_eq!(
            alloc(None).unwrap(),
            Outcome::Created {
                id: "192.0.2.10".into()
            }
        );
        assert!(alloc(Some("192.0.2.10")).is_err(), "taken");
        assert!(alloc(Some("192.0.2.99"))
            .unwrap_err()
            .to_string()
            .contains("outside"));
        alloc(Some("192.0.2.11")).unwrap();
        assert!(alloc(None)
            .unwrap_err()
            .to_string()
            .contains("every address"));

        create_net(&conn, "inner", "10.0.0.0/24").unwrap();
        net_cmd(
            &conn,
            NetworkCommand::CreateNetwork {
                network_id: "id-outer".into(),
                name: "outer".into(),
                cidr: "10.1.0.0/24".into(),
                gateway: None,
                dns_domain: None,
                mtu: None,
                external: true,
                now_ms: 1,
            },
        )
        .unwrap();
        create_vm(&conn, "a", vec![on("inner")]).unwrap();
        create_vm(&conn, "b", vec![on("inner"), on("outer")]).unwrap();
        let attach = |vm: &str, ports: Vec<PortForward>| {
            net_cmd(
                &conn,
                NetworkCommand::AttachFloatingIp {
                    ip: "192.0.2.10".parse().unwrap(),
                    vm: vm.into(),
                    network: None,
                    ports,
                },
            )
        };
        let e = attach("a", vec![]).unwrap_err();
        assert!(e.to_string().contains("external network"), "{e}");
        let fwd = |p, q| PortForward {
            protocol: ForwardProtocol::Tcp,
            public_port: p,
            private_port: q,
        };
        let e = attach("b", vec![fwd(80, 8080), fwd(80, 8081)]).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        attach("b", vec![fwd(80, 8080)]).unwrap();
        let fip = require_fip(&conn, "192.0.2.10".parse().unwrap()).unwrap();
        let t = fip.target.unwrap();
        assert_eq!(t.network_id, "id-outer");
        assert_eq!(t.private_ip.to_string(), "10.1.0.2");
        let e = net_cmd(
            &conn,
            NetworkCommand::ReleaseFloatingIp {
                ip: "192.0.2.10".parse().unwrap(),
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("detach it first"), "{e}");
        // Deleting the VM's NIC detaches the floating IP; then it can be released.
        let b = super::super::compute::find_vm(&conn, "b").unwrap().unwrap();
        release_vm(&conn, &b).unwrap();
        assert!(require_fip(&conn, "192.0.2.10".parse().unwrap())
            .unwrap()
            .target
            .is_none());
        net_cmd(
            &conn,
            NetworkCommand::ReleaseFloatingIp {
                ip: "192.0.2.10".parse().unwrap(),
            },
        )
        .unwrap();
    }

    #[test]
    fn host_networks_default_and_validation() {
        let conn = db();
        let host = super::super::host(&conn, 1).unwrap().unwrap();
        let nets = host_networks(&conn, &host).unwrap();
        let underlay = &nets.roles[&NetRole::GuestUnderlay];
        assert_eq!(underlay.interface, "eth0");
        assert_eq!(underlay.address.prefix_len, 24);
        let ip = host.peer_addr.split(':').next().unwrap();
        let set = |iface: &str, addr: &str, gw: Option<&str>| {
            net_cmd(
                &conn,
                NetworkCommand::SetHostNetwork {
                    host_id: 1,
                    role: NetRole::Public,
                    network: Some(PhysicalNetwork {
                        interface: iface.into(),
                        address: Ipv4Cidr::parse(addr, false).unwrap(),
                        gateway: gw.map(|g| g.parse().unwrap()),
                    }),
                },
            )
        };
        let e = set("eth9", &format!("{ip}/24"), None).unwrap_err();
        assert!(
            e.to_string()
                .contains("has no interface \"eth9\" (it has: eth0)"),
            "{e}"
        );
        let e = set("eth0", "192.0.2.7/24", None).unwrap_err();
        assert!(e.to_string().contains("is not configured on eth0"), "{e}");
        let e = set("eth0", &format!("{ip}/24"), Some("192.0.2.1")).unwrap_err();
        assert!(e.to_string().contains("not on"), "{e}");
        set("eth0", &format!("{ip}/24"), None).unwrap();
        assert_eq!(
            set("eth0", &format!("{ip}/24"), None).unwrap(),
            Outcome::Unchanged
        );
        let nets = host_networks(&conn, &host).unwrap();
        assert_eq!(nets.roles[&NetRole::Public].interface, "eth0");
    }

    #[test]
    fn cidr_parsing() {
        let c = Ipv4Cidr::parse("10.1.2.0/24", true).unwrap();
        assert_eq!(c.to_string(), "10.1.2.0/24");
        assert!(c.contains("10.1.2.200".parse().unwrap()));
        assert!(!c.contains("10.1.3.1".parse().unwrap()));
        assert_eq!(c.broadcast().to_string(), "10.1.2.255");
        assert_eq!(c.hosts().count(), 254);
        assert_eq!(c.netmask().to_string(), "255.255.255.0");
        let e = Ipv4Cidr::parse("10.1.2.5/24", true).unwrap_err();
        assert!(e.contains("did you mean 10.1.2.0/24"), "{e}");
        assert!(Ipv4Cidr::parse("10.1.2.0", true).is_err());
        assert!(Ipv4Cidr::parse("10.1.2.0/33", true).is_err());
        assert!(Ipv4Cidr::parse("x/24", true).is_err());
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, "\"10.1.2.0/24\"");
        assert_eq!(serde_json::from_str::<Ipv4Cidr>(&json).unwrap(), c);
    }

    #[test]
    fn roles_parse() {
        assert_eq!(
            NetRole::parse("guest-underlay"),
            Some(NetRole::GuestUnderlay)
        );
        assert_eq!(NetRole::parse("public"), Some(NetRole::Public));
        assert_eq!(NetRole::parse("nope"), None);
    }
}
