//! Packet filtering on this host: the narrow interface the network reconciler uses. The
//! real implementation is [`crate::firewall::nft::Nftables`]; [`crate::firewall::fake`] records the
//! last state for unit tests.
//!
//! The reconciler computes the whole desired [`FirewallState`] of the host from raft and
//! hands it over; the adapter replaces everything Keel owns in one atomic nftables
//! transaction, so a rule change is never half applied and re-applying is idempotent.
//!
//! What it enforces, per VM NIC (a tap on a network bridge):
//! - anti-spoofing: a NIC sends only from its MAC and (once it has one) its IP, and ARP
//!   only for that pair; DHCP requests from 0.0.0.0 are allowed;
//! - security groups: stateful; ingress default deny, egress default allow unless the
//!   NIC's groups have egress rules (then default deny); replies to allowed traffic pass;
//!   ARP, DHCP and DNS to the network's own gateway always pass;
//! - per network: the gateway's MAC and ARP for the gateway address, and DHCP, never
//!   cross the VXLAN device (each host answers for its own distributed gateway).

pub mod fake;
pub mod nft;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::links::MacAddr;

/// An IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// Where the other end of a rule's traffic may be.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Remote {
    Cidr(Cidr),
    /// Every address of the NICs in this security group (a key of
    /// [`FirewallState::groups`]).
    Group(String),
}

/// One allow rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub protocol: Protocol,
    /// Inclusive destination port range (TCP/UDP only); `None`: every port.
    pub ports: Option<(u16, u16)>,
    pub remote: Remote,
}

/// A VM NIC on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPolicy {
    /// The tap device (`links::tap_name`).
    pub tap: String,
    pub vni: u32,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// Allowed traffic into the VM.
    pub ingress: Vec<Rule>,
    /// Allowed traffic out of the VM; `None`: everything (no egress rules in its groups).
    pub egress: Option<Vec<Rule>>,
}

/// A network present on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub vni: u32,
    /// `links::vxlan_name`.
    pub vxlan: String,
    /// `links::gateway_host_name`: the bridge port towards the router namespace.
    pub gateway_port: String,
    pub gateway_ip: Ipv4Addr,
    pub gateway_mac: MacAddr,
}

/// Everything Keel filters on this host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FirewallState {
    pub networks: Vec<NetworkPolicy>,
    pub ports: Vec<PortPolicy>,
    /// Security group name → the addresses of its member NICs, cluster-wide.
    pub groups: BTreeMap<String, Vec<Ipv4Addr>>,
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run nft")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the ruleset: {stderr}")]
    Rejected { stderr: String },
    #[error("the firewall state is inconsistent: {0}")]
    Invalid(String),
    /// Bridged IPv4 cannot be passed through the stateful (inet) hooks of this network
    /// namespace: `net.bridge.bridge-nf-call-iptables` is missing (the `br_netfilter`
    /// module is not loaded) or cannot be set.
    #[error("cannot enable bridge netfilter at {path} (is br_netfilter loaded?)")]
    BridgeNetfilter {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One host's packet filter.
pub trait Firewall: Send + Sync + 'static {
    /// Replaces every Keel rule on the host with `state`, atomically.
    fn apply(&self, state: &FirewallState) -> Result<(), FirewallError>;
    /// Removes every Keel rule (the node leaves the cluster).
    fn clear(&self) -> Result<(), FirewallError>;
}
