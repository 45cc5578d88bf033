//! DHCP and DNS for guest networks: the narrow interface the network reconciler uses. The
//! real implementation is [`crate::dhcp::dnsmasq::Dnsmasq`] (one supervised dnsmasq per network,
//! inside the network's router namespace); [`crate::dhcp::fake`] records calls for unit tests.
//!
//! Addresses come only from IPAM in raft: dnsmasq hands out static leases (one per known
//! MAC) and nothing else, so two hosts' servers on the same network always agree.
//! Calls are blocking; every call is idempotent.

pub mod dnsmasq;
pub mod fake;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::links::MacAddr;

/// One VM NIC's static lease and DNS name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DhcpHost {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// A DNS label (the VM's name), answered as `<hostname>` and `<hostname>.<domain>`.
    /// `None` for a VM's further NICs on the same network: a name answers with one address
    /// (that of the VM's first NIC there), and dnsmasq gives a name to one lease only.
    pub hostname: Option<String>,
}

/// What one network's DHCP/DNS server must serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpNetwork {
    pub vni: u32,
    /// The router namespace to run in (`Links::router_netns`); `None`: this namespace.
    pub netns: Option<PathBuf>,
    /// The interface to serve on (only this one), carrying `gateway`.
    pub interface: String,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
    /// DNS domain of the network (`search` domain handed to guests).
    pub domain: String,
    /// MTU handed to guests (DHCP option 26).
    pub mtu: u32,
    /// Sorted by MAC.
    pub hosts: Vec<DhcpHost>,
    pub lease_secs: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// The network cannot be served as given (a hostname or domain that is not a DNS name,
    /// a host address outside the network, duplicate hosts, …). Nothing was changed.
    #[error("network {vni} cannot be served")]
    Invalid {
        vni: u32,
        #[source]
        source: dnsmasq::InvalidNetwork,
    },
    /// A directory above the run directory is not searchable by other users: dnsmasq drops
    /// its privileges after starting and could not re-read its host lists on a reload.
    #[error("dnsmasq files of network {vni}: {dir} is not searchable by other users")]
    RunDir { vni: u32, dir: PathBuf },
    #[error("cannot write the dnsmasq files of network {vni} in {dir}")]
    Files {
        vni: u32,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start dnsmasq for network {vni}")]
    Spawn {
        vni: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("dnsmasq for network {vni} exited at start: {detail}")]
    Exited { vni: u32, detail: String },
    #[error("cannot signal dnsmasq (pid {pid}) of network {vni}")]
    Signal {
        vni: u32,
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("dnsmasq (pid {pid}) of network {vni} is still running after SIGKILL")]
    NotStopped { vni: u32, pid: i32 },
}

/// One host's DHCP/DNS servers.
pub trait Dhcp: Send + Sync + 'static {
    /// Makes the network's server run with exactly this configuration: starts it if it is
    /// not running (or died), reloads its host lists when only they changed, restarts it
    /// when anything else changed.
    fn ensure(&self, net: &DhcpNetwork) -> Result<(), DhcpError>;
    /// Stops the network's server and removes its files. Stopping an absent one succeeds.
    fn stop(&self, vni: u32) -> Result<(), DhcpError>;
    /// The networks with a running server.
    fn running(&self) -> Vec<u32>;
}
