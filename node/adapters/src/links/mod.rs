//! The narrow interface between the network reconciler and the host's links. The real
//! implementation is [`crate::links::netlink::Netlink`] (rtnetlink); [`crate::links::fake`] keeps
//! links in memory for unit tests of the logic above it.
//!
//! Calls are blocking (the real adapter runs its netlink connections on threads of its
//! own, which it needs anyway to enter router namespaces): async callers wrap them in
//! `tokio::task::spawn_blocking`. Every call is idempotent.

pub mod arp;
pub mod fake;
pub mod netlink;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;

pub use keel_base::names::{
    bridge_name, gateway_host_name, gateway_ns_name, tap_name, uplink_host_name, uplink_ns_name,
    vxlan_name, MacAddr,
};

/// The transit prefix all uplinks come from (shared address space, RFC 6598): never a
/// tenant's or the site's.
pub const TRANSIT: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 10);
/// The uplink's /30 of a network: (host end, router end). Unique per VNI, so every
/// external network on a host has its own, whatever its CIDR.
pub fn uplink_addresses(vni: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(TRANSIT.0) + (vni << 2);
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

/// The gateway MAC of a network: locally administered, the same on every host.
pub fn gateway_mac(vni: u32) -> MacAddr {
    let [_, a, b, c] = vni.to_be_bytes();
    MacAddr([0x02, 0x6b, 0x67, a, b, c])
}

/// The underlay a VXLAN runs over: this host's address on the guest-underlay network and
/// the device that carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub dev: String,
    pub ip: Ipv4Addr,
}

/// The gateway of a network, configured inside its router namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayLink {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: MacAddr,
}

/// The way out of an external network on this host: a veth pair from its router
/// namespace to the host namespace (addresses from [`uplink_addresses`]; the router's
/// default route points at the host end), the host forwarding to and from its public
/// interface, and the floating IPs of this host's VMs routed into the router namespace and
/// answered on the public interface (proxy ARP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    pub public_dev: String,
    pub floating_ips: BTreeSet<Ipv4Addr>,
}

/// Everything one guest network needs on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkLinks {
    pub vni: u32,
    /// MTU of the bridge, the VXLAN device, the veth pair (underlay MTU − 50 or less).
    pub mtu: u32,
    pub underlay: Underlay,
    /// Underlay addresses of the other hosts on this network: one all-zero FDB entry each
    /// (head-end replication of broadcast, unknown unicast and multicast).
    pub peers: BTreeSet<Ipv4Addr>,
    /// MACs of VMs on other hosts → that host's underlay address (unicast goes straight
    /// there instead of to every peer).
    pub remote_macs: BTreeMap<MacAddr, Ipv4Addr>,
    pub gateway: GatewayLink,
    /// Taps of this host's VMs on the network: put back on the bridge if they exist but
    /// are not on it (the bridge was recreated under running VMs). Missing ones are left
    /// to libvirt, which creates them when a VM starts.
    pub local_taps: BTreeSet<String>,
    /// External networks on a host with a public network.
    pub uplink: Option<Uplink>,
}

/// What a host's links look like for one network (read back, for tests and reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkLinksState {
    pub vni: u32,
    pub mtu: u32,
    pub peers: BTreeSet<Ipv4Addr>,
    pub remote_macs: BTreeMap<MacAddr, Ipv4Addr>,
    /// Ports of the bridge other than the VXLAN and gateway devices (the VMs' taps).
    pub ports: BTreeSet<String>,
}

/// An IPv4 address configured on a host interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddress {
    pub dev: String,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub mtu: u32,
    pub up: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("netlink request {operation} on {link} failed")]
    Netlink {
        operation: &'static str,
        link: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("underlay device {dev} does not exist on this host")]
    NoUnderlay { dev: String },
    #[error("public device {dev} (of an external network's uplink) does not exist on this host")]
    NoPublicDevice { dev: String },
    #[error("cannot set {path}")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("router namespace of network {vni} at {path}")]
    Namespace {
        vni: u32,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot create the router namespace directory {path}")]
    NetnsDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open a netlink connection in {netns}")]
    Connection {
        netns: String,
        #[source]
        source: std::io::Error,
    },
}

/// One host's links.
pub trait Links: Send + Sync + 'static {
    /// Makes the network's links match `net` exactly: bridge, VXLAN device (created anew
    /// when its VNI, local address, device or port differ; MTU changed in place), FDB
    /// entries (extra ones removed), router namespace with its veth pair, gateway address
    /// and MAC. Leaves the bridge's other ports (VM taps) alone.
    ///
    /// With an [`Uplink`] also: the uplink veth pair ([`uplink_host_name`] in the host
    /// namespace, [`uplink_ns_name`] in the router namespace, addresses from
    /// [`uplink_addresses`], MTU `net.mtu`), the router namespace's default route via the
    /// host end and IPv4 forwarding there, forwarding on the host end and on the public
    /// device, and per floating IP a `/32` route via the router end and a proxy-ARP entry
    /// on the public device; routes and proxy entries of floating IPs no longer listed are
    /// removed. Without one: the uplink veth pair, its routes and proxy entries are removed
    /// (and forwarding in the router namespace is switched off). A missing public device
    /// fails with [`LinkError::NoPublicDevice`].
    fn ensure(&self, net: &NetworkLinks) -> Result<(), LinkError>;
    /// Removes the network's bridge, VXLAN device, veth pairs (gateway and uplink, with
    /// the uplink's routes and proxy entries) and router namespace. Removing an absent
    /// network succeeds.
    fn remove(&self, vni: u32) -> Result<(), LinkError>;
    /// The networks whose bridge exists on this host, read back.
    fn list(&self) -> Result<Vec<NetworkLinksState>, LinkError>;
    /// A path to the network's router namespace that `nsenter --net=PATH` and `setns`
    /// accept (valid after `ensure`).
    fn router_netns(&self, vni: u32) -> PathBuf;
    /// The host's IPv4 addresses (to validate the physical networks it is given).
    fn addresses(&self) -> Result<Vec<HostAddress>, LinkError>;
}
