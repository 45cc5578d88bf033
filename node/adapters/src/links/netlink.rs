//! The real [`Links`]: bridges, VXLAN devices, FDB entries and router namespaces through
//! rtnetlink.
//!
//! Threads: every call runs its netlink work on threads of its own, each with a
//! current-thread tokio runtime and a fresh netlink connection, and joins them before it
//! returns. Work in the host namespace runs on a thread spawned by the caller, so it sees
//! the caller's namespace ("the host namespace" is whatever namespace the node runs in).
//! Work in a router namespace runs on a fresh thread that enters the namespace with
//! `setns` before it opens its connection; such a thread ends with the work and is never
//! reused. So the calls are safe from `spawn_blocking` threads and never nest runtimes.
//!
//! Router namespaces are bind mounts of nsfs files at `<netns_dir>/n<V>` (like
//! `ip netns`, in a directory of Keel's own): a thread `unshare`s a new network namespace
//! and bind-mounts its `/proc/thread-self/ns/net` there. The mount lives in the node's
//! mount namespace; processes the node starts (dnsmasq) see it.
//!
//! `ensure` compares before it changes: a second call with the same input sends no
//! change request (link indexes stay the same); it repairs what someone else removed or
//! changed (a deleted VXLAN device, a veth pair whose end vanished, a namespace file that
//! is no longer mounted).
//!
//! # Uplinks (external networks)
//!
//! ```text
//!  host namespace                                   router namespace n<V>
//!  public dev (eth0) ── routing ── kuh<V> ═ veth ═ kun<V> ── routing ── kgn<V>
//!   proxy ARP for each  FIP/32 via   100.64.x.1/30    100.64.x.2/30  default via
//!   floating IP         100.64.x.2                                   100.64.x.1
//! ```
//!
//! The uplink veth pair is made and repaired like the gateway's. Its MTU is the network's
//! (`net.mtu`): nothing larger can reach or leave a VM, and a packet from outside that is
//! too big is then refused at the host's edge, by the host (with its public address, which
//! the sender can route to), instead of inside the router namespace.
//!
//! Forwarding: in the router namespace `net.ipv4.ip_forward` (the namespace is Keel's
//! alone); in the host namespace only `net.ipv4.conf.<dev>.forwarding` of the public
//! device and of each `kuh<V>`, which is all the kernel consults (the input device's
//! setting decides whether a packet is forwarded, and the public device's whether proxy
//! ARP answers); `ip_forward` would switch every interface of the host to forwarding
//! (management, storage), which Keel does not need.
//!
//! Ownership of floating-IP state in the host namespace, which is shared with the rest
//! of the host: routes are Keel's when they carry the route protocol [`KEEL_RTPROT`] and
//! go out a `kuh<V>` (those of network V); proxy neighbour entries are Keel's when they
//! carry the same number as their `NDA_PROTOCOL` (a marker the kernel stores with the
//! entry and reports in dumps). A proxy entry of Keel's stays only while its address is
//! routed into some uplink: every `ensure` of any network (and every `remove`) deletes
//! Keel's proxy entries whose address is not, so an entry whose route vanished with a
//! deleted `kuh` device does not linger. Proxy entries are added after their route and
//! deleted before it, so that invariant holds at every step. A proxy entry that is added
//! is announced by gratuitous ARP ([`crate::links::arp`]): the address may have answered at
//! another host a moment ago.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{StreamExt, TryStreamExt};
use nix::errno::Errno;
use nix::sched::CloneFlags;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
};

use crate::links::arp::Announcements;
use crate::links::{
    bridge_name, gateway_host_name, gateway_ns_name, uplink_addresses, uplink_host_name,
    uplink_ns_name, vxlan_name, HostAddress, LinkError, Links, MacAddr, NetworkLinks,
    NetworkLinksState,
};

/// Where a production node keeps its router namespaces.
pub const DEFAULT_NETNS_DIR: &str = "/run/keel/netns";
/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// The route protocol of Keel's floating-IP routes and the `NDA_PROTOCOL` of its proxy
/// neighbour entries in the host namespace (`ip route` shows `proto 75`): how the adapter
/// tells its own from the host's.
pub const KEEL_RTPROT: u8 = 75;
/// The prefix of the uplink veth's host ends (`links::uplink_host_name`).
const UPLINK_HOST_PREFIX: &str = "kuh";
/// The uplink's /30.
const UPLINK_PREFIX_LEN: u8 = 30;

const ZERO_MAC: MacAddr = MacAddr([0; 6]);

/// [`Links`] through rtnetlink, in the caller's network namespace.
#[derive(Debug)]
pub struct Netlink {
    netns_dir: PathBuf,
    /// Serializes `ensure` and `remove`: two concurrent calls for one network would both
    /// create its namespace or its links.
    changes: Mutex<()>,
    /// Floating IPs being announced; shared with every connection.
    announcements: Arc<Announcements>,
}

impl Netlink {
    /// An adapter keeping router namespaces under `netns_dir` (created if missing;
    /// production: [`DEFAULT_NETNS_DIR`]).
    pub fn new(netns_dir: PathBuf) -> Result<Self, LinkError> {
        std::fs::create_dir_all(&netns_dir).map_err(|source| LinkError::NetnsDir {
            path: netns_dir.clone(),
            source,
        })?;
        Ok(Netlink {
            netns_dir,
            changes: Mutex::new(()),
            announcements: Arc::default(),
        })
    }

    /// The directory of the router namespace files.
    pub fn netns_dir(&self) -> &Path {
        &self.netns_dir
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `work` with a netlink connection on a fresh thread in this (the caller's)
    /// namespace.
    fn in_host<T, F, Fut>(&self, work: F) -> Result<T, LinkError>
    where
        T: Send,
        F: FnOnce(Conn) -> Fut + Send,
        Fut: Future<Output = Result<T, LinkError>>,
    {
        on_thread(None, self.announcements.clone(), work)
    }

    /// Runs `work` with a netlink connection on a fresh thread inside the router
    /// namespace of network `vni` (which must exist).
    fn in_router<T, F, Fut>(&self, vni: u32, work: F) -> Result<T, LinkError>
    where
        T: Send,
        F: FnOnce(Conn) -> Fut + Send,
        Fut: Future<Output = Result<T, LinkError>>,
    {
        on_thread(
            Some((vni, &self.router_netns(vni))),
            self.announcements.clone(),
            work,
        )
    }

    /// Makes `<netns_dir>/n<V>` a mounted network namespace (a new, empty one unless it
    /// already is one).
    fn ensure_netns(&self, vni: u32) -> Result<(), LinkError> {
        let path = self.router_netns(vni);
        if is_nsfs(&path) {
            return Ok(());
        }
        let ns_err = |source: Box<dyn std::error::Error + Send + Sync>| LinkError::Namespace {
            vni,
            path: path.clone(),
            source,
        };
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| ns_err(Box::new(e)))?;
        std::thread::scope(|s| {
            let spawned = std::thread::Builder::new()
                .name(format!("keel-netns-{vni}"))
                .spawn_scoped(s, || -> Result<(), Errno> {
                    // This thread alone moves into the new namespace, and ends right after.
                    nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
                    nix::mount::mount(
                        Some("/proc/thread-self/ns/net"),
                        &path,
                        None::<&str>,
                        nix::mount::MsFlags::MS_BIND,
                        None::<&str>,
                    )
                });
            match spawned {
                Ok(handle) => match handle.join() {
                    Ok(r) => r.map_err(|e| ns_err(Box::new(e))),
                    Err(panic) => std::panic::resume_unwind(panic),
                },
                Err(e) => Err(ns_err(Box::new(e))),
            }
        })
    }

    /// Unmounts and deletes the namespace file of `vni`; absent is fine.
    fn remove_netns(&self, vni: u32) -> Result<(), LinkError> {
        let path = self.router_netns(vni);
        let ns_err = |source: Box<dyn std::error::Error + Send + Sync>| LinkError::Namespace {
            vni,
            path: path.clone(),
            source,
        };
        // Mounts may be stacked (a crash between two ensures): unmount until none is left.
        for _ in 0..16 {
            if !is_nsfs(&path) {
                break;
            }
            match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) => {}
                Err(Errno::EINVAL | Errno::ENOENT) => break,
                Err(e) => return Err(ns_err(Box::new(e))),
            }
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ns_err(Box::new(e))),
        }
    }
}

impl Netlink {
    /// Bridge, VXLAN device, FDB, router namespace and the gateway veth pair of `net`.
    fn ensure_gateway(&self, net: &NetworkLinks) -> Result<(), LinkError> {
        let vni = net.vni;
        // The host side first (a missing underlay fails before anything is created); it
        // also reports the veth's host end, the router side its router end.
        let host_end = self.in_host(|c| async move { c.ensure_host(net).await })?;
        self.ensure_netns(vni)?;
        let router_end = self.in_router(vni, |c| async move { c.ensure_router(net).await })?;
        let whole = match (host_end, router_end) {
            (Some(h), Some(r)) => h.peer == Some(r.index) && r.peer == Some(h.index),
            _ => false,
        };
        if whole {
            return Ok(());
        }
        // The veth pair is broken or missing: delete what is left of it, create it anew
        // (the router end directly inside the namespace), then configure the router end.
        let (gh, gn) = (gateway_host_name(vni), gateway_ns_name(vni));
        let ns = self.clear_veth_pair(vni, &gh, host_end, &gn)?;
        let ns_path = self.router_netns(vni);
        let ns = &ns;
        self.in_host(|c| async move { c.create_veth(net, ns).await })?;
        let router_end = self.in_router(vni, |c| async move { c.ensure_router(net).await })?;
        if router_end.is_none() {
            return Err(LinkError::Namespace {
                vni,
                path: ns_path,
                source: format!("{} did not appear in the namespace", gateway_ns_name(vni)).into(),
            });
        }
        Ok(())
    }

    /// Deletes what is left of a broken veth pair between the host and a router
    /// namespace (deleting one end of a veth deletes the other too) and opens the
    /// namespace to create the pair anew in.
    fn clear_veth_pair(
        &self,
        vni: u32,
        host_name: &str,
        host_end: Option<VethEnd>,
        router_name: &str,
    ) -> Result<File, LinkError> {
        if let Some(h) = host_end {
            self.in_host(|c| async move { c.delete(host_name, h.index).await })?;
        }
        self.in_router(vni, |c| async move {
            if let Some(l) = c.link(router_name).await? {
                c.delete(router_name, l.header.index).await?;
            }
            Ok(())
        })?;
        let ns_path = self.router_netns(vni);
        File::open(&ns_path).map_err(|e| LinkError::Namespace {
            vni,
            path: ns_path,
            source: Box::new(e),
        })
    }

    /// The uplink of `net` (its router namespace exists): made, repaired and configured
    /// when `net.uplink` is set, removed otherwise.
    fn ensure_uplink(&self, net: &NetworkLinks) -> Result<(), LinkError> {
        let vni = net.vni;
        let Some(uplink) = &net.uplink else {
            self.remove_uplink(vni)?;
            return self.in_router(vni, |_| async move { set_sysctl(IP_FORWARD, false) });
        };
        let (uh, un) = (uplink_host_name(vni), uplink_ns_name(vni));
        let (uh, un) = (uh.as_str(), un.as_str());
        let public = uplink.public_dev.as_str();
        let host_end = self.in_host(|c| async move {
            if c.link(public).await?.is_none() {
                return Err(LinkError::NoPublicDevice {
                    dev: public.to_string(),
                });
            }
            c.veth_end(uh, net.mtu, None).await
        })?;
        let mut router_end =
            self.in_router(vni, |c| async move { c.veth_end(un, net.mtu, None).await })?;
        let whole = match (host_end, router_end) {
            (Some(h), Some(r)) => h.peer == Some(r.index) && r.peer == Some(h.index),
            _ => false,
        };
        if !whole {
            // Broken or missing: delete what is left and create the pair anew, the router
            // end directly inside the namespace. The floating-IP routes went with a
            // deleted host end; they are added again below.
            let ns = self.clear_veth_pair(vni, uh, host_end, un)?;
            let ns = &ns;
            self.in_host(|c| async move { c.create_uplink_veth(net, ns).await })?;
            router_end =
                self.in_router(vni, |c| async move { c.veth_end(un, net.mtu, None).await })?;
        }
        let Some(router_end) = router_end else {
            return Err(LinkError::Namespace {
                vni,
                path: self.router_netns(vni),
                source: format!("{un} did not appear in the namespace").into(),
            });
        };
        self.in_router(vni, |c| async move {
            c.configure_uplink_router(net, router_end.index).await
        })?;
        self.in_host(|c| async move { c.configure_uplink_host(net, uplink).await })
    }

    /// Removes the uplink of network `vni` in the host namespace: its proxy entries, then
    /// its veth pair (which takes its routes and the router end along). Absent is fine.
    fn remove_uplink(&self, vni: u32) -> Result<(), LinkError> {
        self.in_host(|c| async move {
            c.sync_floating(vni, None).await?;
            let uh = uplink_host_name(vni);
            if let Some(l) = c.link(&uh).await? {
                c.delete(&uh, l.header.index).await?;
            }
            Ok(())
        })
    }
}

impl Links for Netlink {
    fn ensure(&self, net: &NetworkLinks) -> Result<(), LinkError> {
        let _changes = self.lock();
        self.ensure_gateway(net)?;
        self.ensure_uplink(net)
    }

    fn remove(&self, vni: u32) -> Result<(), LinkError> {
        let _changes = self.lock();
        self.remove_uplink(vni)?;
        self.in_host(|c| async move {
            // Deleting the veth's host end deletes its router end too.
            for name in [gateway_host_name(vni), vxlan_name(vni), bridge_name(vni)] {
                if let Some(l) = c.link(&name).await? {
                    c.delete(&name, l.header.index).await?;
                }
            }
            Ok(())
        })?;
        self.remove_netns(vni)
    }

    fn list(&self) -> Result<Vec<NetworkLinksState>, LinkError> {
        self.in_host(|c| async move { c.list().await })
    }

    fn router_netns(&self, vni: u32) -> PathBuf {
        self.netns_dir.join(format!("n{vni}"))
    }

    fn addresses(&self) -> Result<Vec<HostAddress>, LinkError> {
        self.in_host(|c| async move { c.addresses().await })
    }
}

/// Runs `work` on a fresh thread (inside the namespace at `netns`, if given) with its own
/// runtime and netlink connection, and waits for it.
fn on_thread<T, F, Fut>(
    netns: Option<(u32, &Path)>,
    announcements: Arc<Announcements>,
    work: F,
) -> Result<T, LinkError>
where
    T: Send,
    F: FnOnce(Conn) -> Fut + Send,
    Fut: Future<Output = Result<T, LinkError>>,
{
    let place = match netns {
        Some((vni, _)) => format!("the router namespace of network {vni}"),
        None => "the host namespace".to_string(),
    };
    let conn_err = |place: &str, source: std::io::Error| LinkError::Connection {
        netns: place.to_string(),
        source,
    };
    std::thread::scope(|s| {
        let spawned = std::thread::Builder::new()
            .name("keel-netlink".into())
            .spawn_scoped(s, || {
                if let Some((vni, path)) = netns {
                    let ns_err =
                        |source: Box<dyn std::error::Error + Send + Sync>| LinkError::Namespace {
                            vni,
                            path: path.to_path_buf(),
                            source,
                        };
                    let file = File::open(path).map_err(|e| ns_err(Box::new(e)))?;
                    if !is_nsfs(path) {
                        return Err(ns_err("not a mounted network namespace".into()));
                    }
                    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                        .map_err(|e| ns_err(Box::new(e)))?;
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| conn_err(&place, e))?;
                rt.block_on(async {
                    // The socket is made here, after setns: it belongs to that namespace.
                    let (connection, handle, _) =
                        rtnetlink::new_connection().map_err(|e| conn_err(&place, e))?;
                    let driver = tokio::spawn(connection);
                    let result = work(Conn {
                        handle,
                        announcements,
                    })
                    .await;
                    driver.abort();
                    result
                })
            });
        match spawned {
            Ok(handle) => match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            },
            Err(e) => Err(conn_err(&place, e)),
        }
    })
}

/// Whether `path` is a mounted namespace file.
fn is_nsfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false)
}

/// IPv4 forwarding of the calling thread's network namespace (every interface).
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Sets a boolean sysctl (a path under `/proc/sys/net`, which shows the network namespace
/// of the thread that opens it) unless it already has that value.
fn set_sysctl(path: &str, on: bool) -> Result<(), LinkError> {
    let err = |source| LinkError::Sysctl {
        path: PathBuf::from(path),
        source,
    };
    let want = if on { "1" } else { "0" };
    if std::fs::read_to_string(path).map_err(err)?.trim() == want {
        return Ok(());
    }
    std::fs::write(path, want).map_err(err)
}

/// `net.ipv4.conf.<dev>.forwarding` (`dev` is an existing link's name: no `/`, never `.`
/// or `..`).
fn forwarding_sysctl(dev: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{dev}/forwarding")
}

/// `net.ipv4.conf.<dev>.send_redirects`.
fn send_redirects_sysctl(dev: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{dev}/send_redirects")
}

/// The errno of a netlink error answer.
fn errno(e: &rtnetlink::Error) -> Option<Errno> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(Errno::from_raw(-m.raw_code())),
        _ => None,
    }
}

fn nl(operation: &'static str, link: &str) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let link = link.to_string();
    move |e| LinkError::Netlink {
        operation,
        link,
        source: Box::new(e),
    }
}

fn name_of(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn mtu_of(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

fn controller_of(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(c) => Some(*c),
        _ => None,
    })
}

/// A veth's peer index (`IFLA_LINK`), in the peer's namespace.
fn peer_of(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

fn mac_of(l: &LinkMessage) -> Option<&[u8]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
    })
}

fn link_info(l: &LinkMessage) -> &[LinkInfo] {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(i) => Some(i.as_slice()),
            _ => None,
        })
        .unwrap_or(&[])
}

fn kind_of(l: &LinkMessage) -> Option<&InfoKind> {
    link_info(l).iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k),
        _ => None,
    })
}

fn vxlan_info(l: &LinkMessage) -> &[InfoVxlan] {
    link_info(l)
        .iter()
        .find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v.as_slice()),
            _ => None,
        })
        .unwrap_or(&[])
}

fn is_up(l: &LinkMessage) -> bool {
    l.header.flags.contains(LinkFlags::Up)
}

/// One end of the veth pair between the host and a router namespace, as its own
/// namespace sees it.
#[derive(Debug, Clone, Copy)]
struct VethEnd {
    index: u32,
    /// The index of its peer (`IFLA_LINK`), in the other namespace.
    peer: Option<u32>,
}

/// One FDB entry of a VXLAN device: MAC → remote underlay address.
type FdbEntry = (MacAddr, Ipv4Addr);

/// The floating IPs of one uplink, for [`Conn::sync_floating`].
struct Floating<'a> {
    /// Index of the uplink's host end (`kuh<V>`).
    uplink: u32,
    /// Index of the public device.
    public: u32,
    /// The uplink's router end.
    via: Ipv4Addr,
    ips: &'a BTreeSet<Ipv4Addr>,
}

fn table_of(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn oif_of(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn gateway_of(r: &RouteMessage) -> Option<Ipv4Addr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(v)) => Some(*v),
        _ => None,
    })
}

fn destination_of(r: &RouteMessage) -> Option<Ipv4Addr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v)) => Some(*v),
        _ => None,
    })
}

/// A netlink connection (in the namespace of the thread that opened it).
struct Conn {
    handle: Handle,
    /// The node's gratuitous ARP announcements (of floating IPs).
    announcements: Arc<Announcements>,
}

impl Conn {
    async fn link(&self, name: &str) -> Result<Option<LinkMessage>, LinkError> {
        let mut answers = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match answers.try_next().await {
            Ok(l) => Ok(l),
            Err(e) if errno(&e) == Some(Errno::ENODEV) => Ok(None),
            Err(e) => Err(nl("get", name)(e)),
        }
    }

    async fn links(&self) -> Result<Vec<LinkMessage>, LinkError> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump", "all links"))
    }

    async fn add(&self, name: &str, msg: LinkMessage) -> Result<(), LinkError> {
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl("create", name))
    }

    async fn set(&self, name: &str, msg: LinkMessage) -> Result<(), LinkError> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nl("set", name))
    }

    /// Deletes a link; one that is already gone is fine.
    async fn delete(&self, name: &str, index: u32) -> Result<(), LinkError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(Errno::ENODEV) => Ok(()),
            Err(e) => Err(nl("delete", name)(e)),
        }
    }

    /// Sets MTU, controller (bridge) and up on `link` where they differ; returns whether
    /// anything was sent.
    async fn fix(
        &self,
        name: &str,
        link: &LinkMessage,
        mtu: u32,
        controller: Option<u32>,
    ) -> Result<bool, LinkError> {
        let mut b = LinkUnspec::new_with_index(link.header.index);
        let mut changed = false;
        if mtu_of(link) != Some(mtu) {
            b = b.mtu(mtu);
            changed = true;
        }
        if let Some(c) = controller {
            if controller_of(link) != Some(c) {
                b = b.controller(c);
                changed = true;
            }
        }
        if !is_up(link) {
            b = b.up();
            changed = true;
        }
        if changed {
            self.set(name, b.build()).await?;
        }
        Ok(changed)
    }

    /// Everything of `net` in the host namespace but the creation of the veth pair:
    /// bridge, VXLAN device, FDB, and the veth's host end fixed (MTU, bridge, up) if it
    /// exists. Returns that host end.
    async fn ensure_host(&self, net: &NetworkLinks) -> Result<Option<VethEnd>, LinkError> {
        let underlay =
            self.link(&net.underlay.dev)
                .await?
                .ok_or_else(|| LinkError::NoUnderlay {
                    dev: net.underlay.dev.clone(),
                })?;
        let br = self.ensure_bridge(net).await?;
        let vx = self.ensure_vxlan(net, underlay.header.index, br).await?;
        for tap in &net.local_taps {
            if let Some(l) = self.link(tap).await? {
                // libvirt creates a tap down, adds it to its bridge and only then brings
                // it up: a tap that is down with no bridge is being plugged right now
                // (a start or a hot-plug), and making it a port first would fail
                // libvirt's own add with EBUSY. A tap that lost its bridge stays up.
                if !is_up(&l) && controller_of(&l).is_none() {
                    tracing::debug!(
                        tap,
                        vni = net.vni,
                        "network: tap being plugged, left to libvirt"
                    );
                    continue;
                }
                let mtu = mtu_of(&l).unwrap_or(net.mtu);
                if self.fix(tap, &l, mtu, Some(br)).await? {
                    tracing::info!(tap, vni = net.vni, "network: tap put back on its bridge");
                }
            }
        }
        let mut want: BTreeSet<FdbEntry> = net.peers.iter().map(|p| (ZERO_MAC, *p)).collect();
        want.extend(net.remote_macs.iter().map(|(m, ip)| (*m, *ip)));
        self.sync_fdb(&vxlan_name(net.vni), vx, &want).await?;

        self.veth_end(&gateway_host_name(net.vni), net.mtu, Some(br))
            .await
    }

    /// One end of a veth pair, MTU, controller and up fixed if it exists; a link of that
    /// name that is not a veth is reported without a peer (the caller deletes it).
    async fn veth_end(
        &self,
        name: &str,
        mtu: u32,
        controller: Option<u32>,
    ) -> Result<Option<VethEnd>, LinkError> {
        match self.link(name).await? {
            Some(l) if kind_of(&l) == Some(&InfoKind::Veth) => {
                self.fix(name, &l, mtu, controller).await?;
                Ok(Some(VethEnd {
                    index: l.header.index,
                    peer: peer_of(&l),
                }))
            }
            // Not a veth: never the peer of anything.
            Some(l) => Ok(Some(VethEnd {
                index: l.header.index,
                peer: None,
            })),
            None => Ok(None),
        }
    }

    /// Creates or fixes the bridge; returns its index.
    async fn ensure_bridge(&self, net: &NetworkLinks) -> Result<u32, LinkError> {
        let name = bridge_name(net.vni);
        if let Some(l) = self.link(&name).await? {
            if kind_of(&l) == Some(&InfoKind::Bridge) {
                self.fix(&name, &l, net.mtu, None).await?;
                return Ok(l.header.index);
            }
            self.delete(&name, l.header.index).await?;
        }
        self.add(&name, LinkBridge::new(&name).build()).await?;
        let l = self.created(&name).await?;
        // An MTU set after creation is the bridge's own ("set by user"): ports added
        // later no longer lower it.
        self.set(
            &name,
            LinkUnspec::new_with_index(l.header.index)
                .mtu(net.mtu)
                .up()
                .build(),
        )
        .await?;
        Ok(l.header.index)
    }

    /// Creates, recreates or fixes the VXLAN device; returns its index.
    async fn ensure_vxlan(
        &self,
        net: &NetworkLinks,
        underlay: u32,
        bridge: u32,
    ) -> Result<u32, LinkError> {
        let name = vxlan_name(net.vni);
        if let Some(l) = self.link(&name).await? {
            let info = vxlan_info(&l);
            let same = kind_of(&l) == Some(&InfoKind::Vxlan)
                && info.contains(&InfoVxlan::Id(net.vni))
                && info.contains(&InfoVxlan::Local(net.underlay.ip))
                && info.contains(&InfoVxlan::Link(underlay))
                && info.contains(&InfoVxlan::Port(VXLAN_PORT))
                && info.contains(&InfoVxlan::Learning(false));
            if same {
                self.fix(&name, &l, net.mtu, Some(bridge)).await?;
                return Ok(l.header.index);
            }
            self.delete(&name, l.header.index).await?;
        }
        let msg = LinkVxlan::new(&name, net.vni)
            .dev(underlay)
            .local(net.underlay.ip)
            .port(VXLAN_PORT)
            .learning(false)
            .mtu(net.mtu)
            .controller(bridge)
            .up()
            .build();
        self.add(&name, msg).await?;
        Ok(self.created(&name).await?.header.index)
    }

    /// A link that was just created.
    async fn created(&self, name: &str) -> Result<LinkMessage, LinkError> {
        self.link(name).await?.ok_or_else(|| LinkError::Netlink {
            operation: "get",
            link: name.to_string(),
            source: "the link is missing right after its creation".into(),
        })
    }

    /// Creates the veth pair of `net`: the host end a port of the bridge, the router end
    /// (with the gateway MAC) directly inside the namespace `ns`.
    async fn create_veth(&self, net: &NetworkLinks, ns: &File) -> Result<(), LinkError> {
        let (gh, gn) = (gateway_host_name(net.vni), gateway_ns_name(net.vni));
        let bridge = self.created(&bridge_name(net.vni)).await?;
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(gn.clone())
            .mtu(net.mtu)
            .address(net.gateway.mac.0.to_vec())
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(&gh, &gn)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .mtu(net.mtu)
            .controller(bridge.header.index)
            .up()
            .build();
        self.add(&gh, msg).await
    }

    /// Inside the router namespace: `lo` up, and the router end of the veth with the
    /// gateway MAC, MTU and address (and no other IPv4 address), up. Returns the router
    /// end, or `None` when it does not exist.
    async fn ensure_router(&self, net: &NetworkLinks) -> Result<Option<VethEnd>, LinkError> {
        if let Some(lo) = self.link("lo").await? {
            if !is_up(&lo) {
                self.set(
                    "lo",
                    LinkUnspec::new_with_index(lo.header.index).up().build(),
                )
                .await?;
            }
        }
        let name = gateway_ns_name(net.vni);
        let Some(l) = self.link(&name).await? else {
            return Ok(None);
        };
        let index = l.header.index;
        let mac = net.gateway.mac.0;
        if mac_of(&l) != Some(&mac[..]) {
            // Not every driver changes the MAC of a running device.
            if is_up(&l) {
                self.set(&name, LinkUnspec::new_with_index(index).down().build())
                    .await?;
            }
            self.set(
                &name,
                LinkUnspec::new_with_index(index)
                    .address(mac.to_vec())
                    .build(),
            )
            .await?;
        }
        let l = self.created(&name).await?;
        self.fix(&name, &l, net.mtu, None).await?;
        self.only_address(&name, index, net.gateway.addr, net.gateway.prefix_len)
            .await?;
        Ok(Some(VethEnd {
            index,
            peer: peer_of(&l),
        }))
    }

    /// Makes `addr/prefix_len` the only IPv4 address of link `index`.
    async fn only_address(
        &self,
        name: &str,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), LinkError> {
        let mut present = false;
        for (a, len, msg) in self.ipv4_addresses(Some(index)).await? {
            if (a, len) == (addr, prefix_len) {
                present = true;
            } else {
                self.handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(nl("delete address", name))?;
            }
        }
        if !present {
            self.handle
                .address()
                .add(index, IpAddr::V4(addr), prefix_len)
                .execute()
                .await
                .map_err(nl("add address", name))?;
        }
        Ok(())
    }

    /// Creates the uplink veth pair of `net`: the host end up, the router end directly
    /// inside the namespace `ns` (brought up by [`Conn::veth_end`] there).
    async fn create_uplink_veth(&self, net: &NetworkLinks, ns: &File) -> Result<(), LinkError> {
        let (uh, un) = (uplink_host_name(net.vni), uplink_ns_name(net.vni));
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(un.clone())
            .mtu(net.mtu)
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(&uh, &un)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .mtu(net.mtu)
            .up()
            .build();
        self.add(&uh, msg).await
    }

    /// Inside the router namespace: the uplink's router end `index` (up, right MTU) gets
    /// its address and the default route via the host end; forwarding on.
    async fn configure_uplink_router(
        &self,
        net: &NetworkLinks,
        index: u32,
    ) -> Result<(), LinkError> {
        let un = uplink_ns_name(net.vni);
        let (host_ip, router_ip) = uplink_addresses(net.vni);
        self.only_address(&un, index, router_ip, UPLINK_PREFIX_LEN)
            .await?;
        let mut present = false;
        for r in self.main_routes().await? {
            if r.header.destination_prefix_length != 0 {
                continue;
            }
            if gateway_of(&r) == Some(host_ip) && oif_of(&r) == Some(index) && !present {
                present = true;
                continue;
            }
            self.handle
                .route()
                .del(r)
                .execute()
                .await
                .map_err(nl("delete default route", &un))?;
        }
        if !present {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(host_ip)
                .output_interface(index)
                .build();
            self.handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(nl("add default route", &un))?;
        }
        // A connection from the network to one of its own floating IPs goes back out
        // the gateway it came in on: a redirect (translated back to the floating IP by
        // conntrack) would send the VM straight to the other VM's MAC, which does not
        // own the floating IP.
        set_sysctl(&send_redirects_sysctl("all"), false)?;
        set_sysctl(&send_redirects_sysctl(&gateway_ns_name(net.vni)), false)?;
        set_sysctl(IP_FORWARD, true)
    }

    /// In the host namespace: the uplink's host end gets its address, forwarding on it
    /// and on the public device, and the floating IPs their routes and proxy entries.
    async fn configure_uplink_host(
        &self,
        net: &NetworkLinks,
        uplink: &crate::links::Uplink,
    ) -> Result<(), LinkError> {
        let uh = uplink_host_name(net.vni);
        let (host_ip, router_ip) = uplink_addresses(net.vni);
        let h = self.created(&uh).await?;
        self.only_address(&uh, h.header.index, host_ip, UPLINK_PREFIX_LEN)
            .await?;
        let public =
            self.link(&uplink.public_dev)
                .await?
                .ok_or_else(|| LinkError::NoPublicDevice {
                    dev: uplink.public_dev.clone(),
                })?;
        set_sysctl(&forwarding_sysctl(&uh), true)?;
        set_sysctl(&forwarding_sysctl(&uplink.public_dev), true)?;
        self.sync_floating(
            net.vni,
            Some(Floating {
                uplink: h.header.index,
                public: public.header.index,
                via: router_ip,
                ips: &uplink.floating_ips,
            }),
        )
        .await
    }

    /// IPv4 routes of the main table.
    async fn main_routes(&self) -> Result<Vec<RouteMessage>, LinkError> {
        let all: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump routes", "all links"))?;
        Ok(all
            .into_iter()
            .filter(|r| r.header.address_family == AddressFamily::Inet)
            .filter(|r| table_of(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
            .collect())
    }

    /// Proxy neighbour entries (IPv4) of every device: (address, device index, protocol).
    async fn proxies(&self) -> Result<Vec<(Ipv4Addr, u32, u8)>, LinkError> {
        let all: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .proxies()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump proxy entries", "all links"))?;
        Ok(all
            .into_iter()
            .filter(|m| m.header.flags.contains(NeighbourFlags::Proxy))
            .filter_map(|m| {
                let mut dst = None;
                let mut protocol = 0;
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => {
                            dst = Some(*v);
                        }
                        NeighbourAttribute::Protocol(p) => protocol = u8::from(*p),
                        _ => {}
                    }
                }
                Some((dst?, m.header.ifindex, protocol))
            })
            .collect())
    }

    /// Makes the floating-IP routes of network `vni` (a `/32` each via the router end,
    /// out `kuh<V>`) and their proxy entries on the public device what `want` says
    /// (none when `None`), and deletes Keel's proxy entries (on any device) whose address
    /// is not routed into any uplink afterwards. See the module documentation.
    async fn sync_floating(&self, vni: u32, want: Option<Floating<'_>>) -> Result<(), LinkError> {
        let links = self.links().await?;
        let uplinks: BTreeSet<u32> = links
            .iter()
            .filter(|l| {
                name_of(l)
                    .and_then(|n| n.strip_prefix(UPLINK_HOST_PREFIX))
                    .is_some_and(|v| v.parse::<u32>().is_ok())
            })
            .map(|l| l.header.index)
            .collect();
        let mine_index = want.as_ref().map(|w| w.uplink).or_else(|| {
            let name = uplink_host_name(vni);
            links
                .iter()
                .find(|l| name_of(l) == Some(name.as_str()))
                .map(|l| l.header.index)
        });
        let empty = BTreeSet::new();
        let wanted = want.as_ref().map_or(&empty, |w| w.ips);
        // Keel's /32 routes into some uplink.
        let routes: Vec<RouteMessage> = self
            .main_routes()
            .await?
            .into_iter()
            .filter(|r| u8::from(r.header.protocol) == KEEL_RTPROT)
            .filter(|r| r.header.destination_prefix_length == 32)
            .filter(|r| oif_of(r).is_some_and(|o| uplinks.contains(&o)))
            .collect();
        let is_mine = |r: &RouteMessage| mine_index.is_some() && oif_of(r) == mine_index;
        let mut routed: BTreeSet<Ipv4Addr> = routes
            .iter()
            .filter(|r| !is_mine(r) || destination_of(r).is_some_and(|d| wanted.contains(&d)))
            .filter_map(destination_of)
            .collect();
        routed.extend(wanted.iter().copied());
        let public = want.as_ref().map(|w| w.public);

        // Proxy entries first: never one of Keel's without its route.
        let proxies = self.proxies().await?;
        for &(ip, dev, protocol) in &proxies {
            let keep = routed.contains(&ip) && (!wanted.contains(&ip) || Some(dev) == public);
            if protocol == KEEL_RTPROT && !keep {
                self.announcements.stop(ip);
                self.proxy_request(dev, ip, false).await?;
            }
        }
        let Some(w) = want else {
            // The routes go with the uplink's host end, which the caller deletes.
            return Ok(());
        };
        let mut present = BTreeSet::new();
        for r in routes.into_iter().filter(|r| is_mine(r)) {
            match destination_of(&r) {
                Some(d) if wanted.contains(&d) && gateway_of(&r) == Some(w.via) => {
                    present.insert(d);
                }
                Some(d) if wanted.contains(&d) => {} // replaced below
                _ => match self.handle.route().del(r).execute().await {
                    Ok(()) => {}
                    Err(e) if errno(&e) == Some(Errno::ESRCH) => {}
                    Err(e) => {
                        return Err(nl("delete floating IP route", &uplink_host_name(vni))(e))
                    }
                },
            }
        }
        for &ip in wanted.difference(&present) {
            // Replace: a floating IP that moved from another network's uplink moves here.
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(ip, 32)
                .gateway(w.via)
                .output_interface(w.uplink)
                .protocol(RouteProtocol::from(KEEL_RTPROT))
                .build();
            self.handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(nl("add floating IP route", &uplink_host_name(vni)))?;
        }
        for &ip in wanted {
            let marked = proxies
                .iter()
                .any(|&(a, dev, p)| a == ip && dev == w.public && p == KEEL_RTPROT);
            if !marked {
                self.proxy_request(w.public, ip, true).await?;
                // The address may have answered at another host a moment ago: the
                // segment's ARP caches must follow it now, not when they expire.
                match self.announcements.start(w.public, ip) {
                    Ok(()) => tracing::info!(%ip, dev = w.public, "network: floating IP announced"),
                    Err(e) => tracing::warn!(
                        %ip,
                        error = %keel_base::error_chain(&e),
                        "network: floating IP not announced; neighbours learn it when their ARP entry expires"
                    ),
                }
            }
        }
        Ok(())
    }

    /// `ip neigh {replace,del} proxy IP dev DEV` (with Keel's protocol marker).
    async fn proxy_request(&self, dev: u32, ip: Ipv4Addr, add: bool) -> Result<(), LinkError> {
        if add {
            let mut req = self
                .handle
                .neighbours()
                .add(dev, IpAddr::V4(ip))
                .flags(NeighbourFlags::Proxy)
                .replace();
            req.message_mut()
                .attributes
                .push(NeighbourAttribute::Protocol(RouteProtocol::from(
                    KEEL_RTPROT,
                )));
            req.execute()
                .await
                .map_err(nl("add proxy entry", &format!("{ip} on link {dev}")))
        } else {
            let mut msg = NeighbourMessage::default();
            msg.header.family = AddressFamily::Inet;
            msg.header.ifindex = dev;
            msg.header.flags = NeighbourFlags::Proxy;
            msg.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
            match self.handle.neighbours().del(msg).execute().await {
                Ok(()) => Ok(()),
                Err(e) if errno(&e) == Some(Errno::ENOENT) => Ok(()),
                Err(e) => Err(nl("delete proxy entry", &format!("{ip} on link {dev}"))(e)),
            }
        }
    }

    /// IPv4 addresses (of one link, or all): address, prefix length, the message.
    async fn ipv4_addresses(
        &self,
        index: Option<u32>,
    ) -> Result<Vec<(Ipv4Addr, u8, AddressMessage)>, LinkError> {
        let mut req = self.handle.address().get();
        if let Some(i) = index {
            req = req.set_link_index_filter(i);
        }
        let all: Vec<AddressMessage> = req
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump addresses", "all links"))?;
        Ok(all
            .into_iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
            .filter_map(|m| {
                // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on
                // point-to-point links).
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(v)) => Some(*v),
                    _ => None,
                });
                let addr = local.or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(IpAddr::V4(v)) => Some(*v),
                        _ => None,
                    })
                })?;
                Some((addr, m.header.prefix_len, m))
            })
            .collect())
    }

    /// The VXLAN FDB entries (those with a remote, `NDA_DST`) of every device, by index.
    async fn fdb(&self) -> Result<BTreeMap<u32, BTreeSet<FdbEntry>>, LinkError> {
        let all: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump fdb", "all links"))?;
        let mut out: BTreeMap<u32, BTreeSet<FdbEntry>> = BTreeMap::new();
        for m in all {
            let mut mac = None;
            let mut dst = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::LinkLayerAddress(l) => {
                        mac = <[u8; 6]>::try_from(l.as_slice()).ok().map(MacAddr);
                    }
                    // Bridge-family answers carry the address raw.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from);
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => {
                        dst = Some(*v);
                    }
                    _ => {}
                }
            }
            if let (Some(mac), Some(dst)) = (mac, dst) {
                out.entry(m.header.ifindex).or_default().insert((mac, dst));
            }
        }
        Ok(out)
    }

    /// Makes the FDB of the VXLAN device `index` exactly `want`.
    async fn sync_fdb(
        &self,
        name: &str,
        index: u32,
        want: &BTreeSet<FdbEntry>,
    ) -> Result<(), LinkError> {
        let have = self.fdb().await?.remove(&index).unwrap_or_default();
        for &(mac, dst) in have.difference(want) {
            match self
                .fdb_request(index, mac, dst, RouteNetlinkMessage::DelNeighbour, 0)
                .await
            {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(Errno::ENOENT) => {}
                Err(e) => return Err(nl("delete fdb entry", name)(e)),
            }
        }
        for &(mac, dst) in want.difference(&have) {
            // All-zero entries are a list of remotes (head-end replication): append.
            // A VM's MAC has one remote: replace.
            let (flags, operation) = if mac == ZERO_MAC {
                (NLM_F_CREATE | NLM_F_APPEND, "append fdb entry")
            } else {
                (NLM_F_CREATE | NLM_F_REPLACE, "replace fdb entry")
            };
            self.fdb_request(index, mac, dst, RouteNetlinkMessage::NewNeighbour, flags)
                .await
                .map_err(nl(operation, name))?;
        }
        Ok(())
    }

    /// `bridge fdb {append,replace,del} MAC dev DEV dst DST` (self, permanent).
    async fn fdb_request(
        &self,
        index: u32,
        mac: MacAddr,
        dst: Ipv4Addr,
        kind: fn(NeighbourMessage) -> RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), rtnetlink::Error> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.flags = NeighbourFlags::Own;
        msg.header.kind = RouteType::Unspec;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        let mut req = NetlinkMessage::from(kind(msg));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut answers = self.handle.clone().request(req)?;
        while let Some(m) = answers.next().await {
            if let NetlinkPayload::Error(e) = m.payload {
                if e.code.is_some() {
                    return Err(rtnetlink::Error::NetlinkError(e));
                }
            }
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<NetworkLinksState>, LinkError> {
        let links = self.links().await?;
        let mut fdb = self.fdb().await?;
        let index_of = |name: &str| {
            links
                .iter()
                .find(|l| name_of(l) == Some(name))
                .map(|l| l.header.index)
        };
        let mut out = Vec::new();
        for br in &links {
            let Some(name) = name_of(br) else { continue };
            let Some(vni) = name.strip_prefix("kbr").and_then(|v| v.parse::<u32>().ok()) else {
                continue;
            };
            if bridge_name(vni) != name || kind_of(br) != Some(&InfoKind::Bridge) {
                continue;
            }
            let (vx, gh) = (vxlan_name(vni), gateway_host_name(vni));
            let entries = index_of(&vx)
                .and_then(|i| fdb.remove(&i))
                .unwrap_or_default();
            let mut peers = BTreeSet::new();
            let mut remote_macs = BTreeMap::new();
            for (mac, dst) in entries {
                if mac == ZERO_MAC {
                    peers.insert(dst);
                } else {
                    remote_macs.insert(mac, dst);
                }
            }
            let ports = links
                .iter()
                .filter(|l| controller_of(l) == Some(br.header.index))
                .filter_map(name_of)
                .filter(|n| *n != vx && *n != gh)
                .map(str::to_string)
                .collect();
            out.push(NetworkLinksState {
                vni,
                mtu: mtu_of(br).unwrap_or_default(),
                peers,
                remote_macs,
                ports,
            });
        }
        out.sort_by_key(|s| s.vni);
        Ok(out)
    }

    async fn addresses(&self) -> Result<Vec<HostAddress>, LinkError> {
        let links = self.links().await?;
        let by_index: BTreeMap<u32, &LinkMessage> =
            links.iter().map(|l| (l.header.index, l)).collect();
        let mut out = Vec::new();
        for (addr, prefix_len, msg) in self.ipv4_addresses(None).await? {
            let Some(l) = by_index.get(&msg.header.index) else {
                continue;
            };
            out.push(HostAddress {
                dev: name_of(l).unwrap_or_default().to_string(),
                addr,
                prefix_len,
                mtu: mtu_of(l).unwrap_or_default(),
                up: is_up(l),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_paths_are_per_network() {
        let dir = tempfile::tempdir().unwrap();
        let nl = Netlink::new(dir.path().join("netns")).unwrap();
        assert!(dir.path().join("netns").is_dir());
        assert_eq!(nl.router_netns(42), dir.path().join("netns/n42"));
        assert!(!is_nsfs(&nl.router_netns(42)));
        // Removing a namespace that was never there succeeds.
        assert!(nl.remove_netns(42).is_ok());
    }

    #[test]
    fn errno_of_a_netlink_answer() {
        let mut m = rtnetlink::packet_core::ErrorMessage::default();
        m.code = std::num::NonZeroI32::new(-19);
        assert_eq!(
            errno(&rtnetlink::Error::NetlinkError(m)),
            Some(Errno::ENODEV)
        );
        assert_eq!(errno(&rtnetlink::Error::RequestFailed), None);
    }
}
