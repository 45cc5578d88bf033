//! Address translation for external networks: the narrow interface the network reconciler
//! uses. The real implementation is [`crate::nat::nft::NftNat`]; [`crate::nat::fake`] records
//! the last state for unit tests.
//!
//! ```text
//!  VM ──► gateway (router namespace n<V>) ── kun<V> ══ veth ══ kuh<V> ──► host ──► public dev
//!         SNAT: a VM with a floating IP → the floating IP        SNAT: 100.64.0.0/10 → the
//!               every other VM of the CIDR → the uplink's               host's public address
//!               router address                                         (masquerade)
//!         DNAT: floating IP → the VM (every port, or the forwarded ones)
//! ```
//!
//! Router-namespace rules go away with the namespace; the host's table is replaced
//! atomically by every apply. Calls are blocking and idempotent.

pub mod fake;
pub mod nft;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::firewall::{Cidr, FirewallError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ForwardProtocol {
    Tcp,
    Udp,
}

/// One forwarded port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Forward {
    pub protocol: ForwardProtocol,
    pub public_port: u16,
    pub private_port: u16,
}

/// A floating IP of a VM on this host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FloatingNat {
    pub floating_ip: Ipv4Addr,
    pub private_ip: Ipv4Addr,
    /// Empty: 1:1 NAT both ways. Otherwise only these ports come in (the VM's own
    /// outbound traffic then leaves with the uplink's address like every other VM's).
    pub forwards: Vec<Forward>,
}

/// The translation inside one external network's router namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterNat {
    pub vni: u32,
    /// `Links::router_netns`.
    pub netns: PathBuf,
    /// The network's CIDR.
    pub cidr: Cidr,
    /// `links::uplink_ns_name`.
    pub uplink: String,
    /// The router end of the uplink (`links::uplink_addresses().1`).
    pub uplink_ip: Ipv4Addr,
    pub floating: Vec<FloatingNat>,
}

/// The host namespace's part: masquerade the uplinks' transit addresses out of the public
/// interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNat {
    pub public_dev: String,
    /// `links::TRANSIT`.
    pub transit: Cidr,
}

/// One host's address translation.
pub trait Nat: Send + Sync + 'static {
    /// Replaces the translation rules inside a router namespace.
    fn apply_router(&self, nat: &RouterNat) -> Result<(), FirewallError>;
    /// Replaces the host namespace's rules; `None` removes them.
    fn apply_host(&self, nat: Option<&HostNat>) -> Result<(), FirewallError>;
}
