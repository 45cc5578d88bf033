//! Gratuitous ARP: telling a segment's neighbours that an address now answers at this
//! host's device.
//!
//! A floating IP answers through proxy ARP on the public device of the host that runs its
//! VM. When it moves (the VM migrated, was restarted elsewhere by HA, or the address was
//! attached to a VM on another host), the routers and hosts of the public segment still
//! hold an ARP entry naming the old host's MAC; Linux re-probes such an entry only after
//! tens of seconds, and the old host no longer answers. So the host that takes the address
//! announces it: an ARP request for the address from itself (sender = target = the address,
//! sender hardware = the device's MAC), broadcast. Linux, like most stacks, updates an
//! entry it already has on such a request even where it would never create one
//! (`arp_accept` = 0), so the move is seen at once.
//!
//! One frame can be lost: it is sent [`REPEATS`] times, [`SPACING`] apart (the first at
//! once, the rest from a short-lived thread, so the reconciler does not wait). Withdrawing
//! the address stops its repeats ([`Announcements::stop`]): a host must never announce an
//! address after it gave it up, or it would pull the neighbours back from the host that
//! took it over.
//!
//! The frame goes out a raw packet socket (`AF_PACKET`, `SOCK_RAW`, protocol 0 so that it
//! receives nothing) with the Ethernet header written here; the device's link address and
//! MAC come from `getifaddrs`, so no `unsafe` is needed. The socket belongs to the calling
//! thread's network namespace.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{mpsc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType};

/// How many times an address is announced.
pub const REPEATS: usize = 3;
/// The time between two announcements of an address.
pub const SPACING: Duration = Duration::from_secs(1);

const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ARP_HTYPE_ETHERNET: u16 = 1;
const ARP_REQUEST: u16 = 1;
/// An Ethernet header (14 bytes) and an Ethernet/IPv4 ARP packet (28).
pub const FRAME_LEN: usize = 42;

#[derive(Debug, thiserror::Error)]
pub enum ArpError {
    #[error("no link-layer address for interface index {ifindex}: is it an Ethernet device in this namespace?")]
    NoLinkAddress { ifindex: u32 },
    #[error("cannot list the interfaces' addresses")]
    Interfaces(#[source] Errno),
    #[error("cannot open a packet socket (root or CAP_NET_RAW is needed)")]
    Socket(#[source] Errno),
    #[error("cannot send the announcement of {ip} on interface index {ifindex}")]
    Send {
        ip: Ipv4Addr,
        ifindex: u32,
        #[source]
        source: Errno,
    },
}

/// The broadcast frame that announces `ip` at `mac`.
pub fn frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
    f[16..18].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&ARP_REQUEST.to_be_bytes());
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // Target hardware address: unknown (zero), as in a request.
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Announcements in progress, by address. A new one for an address replaces (stops) the
/// one before, and [`Announcements::stop`] ends the one of an address that was withdrawn,
/// so a late repeat never claims an address that has moved on to another host.
#[derive(Default)]
pub struct Announcements {
    running: Mutex<HashMap<Ipv4Addr, Repeats>>,
}

/// The thread sending an announcement's repeats; dropping `stop` ends it.
struct Repeats {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Repeats {
    fn end(self) {
        drop(self.stop);
        // Bounded: the thread wakes as soon as its stop channel closes.
        let _ = self.thread.join();
    }
}

impl std::fmt::Debug for Announcements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcements")
            .field("running", &self.running())
            .finish()
    }
}

impl Announcements {
    /// Announces `ip` on the device with index `ifindex` of the calling thread's
    /// namespace: the first frame before it returns, the other [`REPEATS`] − 1 from a
    /// thread of their own (a failure there is logged).
    pub fn start(&self, ifindex: u32, ip: Ipv4Addr) -> Result<(), ArpError> {
        self.stop(ip);
        let (link, mac) = link_address(ifindex)?;
        let fd = socket::socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(ArpError::Socket)?;
        let bytes = frame(mac, ip);
        send(&fd, &link, &bytes, ip, ifindex)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("keel-garp".into())
            .spawn(move || {
                for _ in 1..REPEATS {
                    if !matches!(
                        stopped.recv_timeout(SPACING),
                        Err(mpsc::RecvTimeoutError::Timeout)
                    ) {
                        return;
                    }
                    if let Err(e) = send(&fd, &link, &bytes, ip, ifindex) {
                        tracing::warn!(
                            error = %keel_base::error_chain(&e),
                            "network: gratuitous ARP repeat"
                        );
                        return;
                    }
                }
            });
        match spawned {
            Ok(thread) => {
                let mut running = self.lock();
                running.retain(|_, r| !r.thread.is_finished());
                running.insert(ip, Repeats { stop, thread });
            }
            Err(e) => {
                tracing::warn!(error = %e, %ip, "network: no thread for gratuitous ARP repeats");
            }
        }
        Ok(())
    }

    /// Stops the announcement of `ip`, if one is running; no frame for it is sent after
    /// this returns.
    pub fn stop(&self, ip: Ipv4Addr) {
        let repeats = self.lock().remove(&ip);
        if let Some(r) = repeats {
            r.end();
        }
    }

    /// The addresses whose announcement is still being repeated.
    pub fn running(&self) -> Vec<Ipv4Addr> {
        let mut running = self.lock();
        running.retain(|_, r| !r.thread.is_finished());
        running.keys().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Ipv4Addr, Repeats>> {
        // A panic while holding the lock leaves the map usable.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn send(
    fd: &OwnedFd,
    link: &LinkAddr,
    bytes: &[u8],
    ip: Ipv4Addr,
    ifindex: u32,
) -> Result<(), ArpError> {
    socket::sendto(fd.as_raw_fd(), bytes, link, MsgFlags::empty())
        .map(drop)
        .map_err(|source| ArpError::Send {
            ip,
            ifindex,
            source,
        })
}

/// The packet-socket address and the MAC of interface `ifindex`.
fn link_address(ifindex: u32) -> Result<(LinkAddr, [u8; 6]), ArpError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(ArpError::Interfaces)?;
    addrs
        .filter_map(|a| a.address?.as_link_addr().copied())
        .find(|l| l.ifindex() == ifindex as usize && l.halen() == 6)
        .and_then(|l| Some((l, l.addr()?)))
        .ok_or(ArpError::NoLinkAddress { ifindex })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_is_a_broadcast_arp_request_for_the_address_from_itself() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let ip = Ipv4Addr::new(10, 213, 7, 100);
        let f = frame(mac, ip);
        assert_eq!(&f[0..6], &[0xff; 6], "destination: broadcast");
        assert_eq!(&f[6..12], &mac, "source: the device");
        assert_eq!(&f[12..14], &[0x08, 0x06], "EtherType ARP");
        assert_eq!(
            &f[14..22],
            &[0, 1, 0x08, 0x00, 6, 4, 0, 1],
            "Ethernet/IPv4 request"
        );
        assert_eq!(&f[22..28], &mac, "sender hardware address");
        assert_eq!(&f[28..32], &[10, 213, 7, 100], "sender protocol address");
        assert_eq!(&f[32..38], &[0; 6], "target hardware address unknown");
        assert_eq!(&f[38..42], &[10, 213, 7, 100], "target protocol address");
    }

    #[test]
    fn an_unknown_interface_is_a_clear_error() {
        let announcements = Announcements::default();
        let err = announcements
            .start(u32::MAX, Ipv4Addr::new(10, 0, 0, 1))
            .unwrap_err();
        assert!(announcements.running().is_empty());
        assert!(
            matches!(err, ArpError::NoLinkAddress { ifindex } if ifindex == u32::MAX),
            "{err:?}"
        );
        assert!(err.to_string().contains("4294967295"), "{err}");
    }
}
