//! Networking: guest networks on this host.
//!
//! Every guest network is a VXLAN segment (VNI from the leader) that exists only on the
//! hosts with a VM on it. On such a host it looks like this:
//!
//! ```text
//!  host namespace (where libvirtd runs)          router namespace of the network
//!  ┌───────────────────────────────────┐         ┌──────────────────────────────┐
//!  │ kvx<V> (vxlan V, nolearning,      │         │ kgn<V>: gateway address and  │
//!  │   HER fdb to peers, per-MAC fdb)  │         │   the network's gateway MAC  │
//!  │        │                          │         │ dnsmasq (DHCP + DNS)         │
//!  │ kbr<V> bridge ── kgh<V> ═══ veth ═╪═════════╪═ kgn<V>                      │
//!  │        │                          │         └──────────────────────────────┘
//!  │ kt<mac> taps of the VMs (libvirt) │
//!  └───────────────────────────────────┘
//! ```
//!
//! The gateway lives in a namespace of its own per network so that two networks with the
//! same CIDR (two tenants) never share a routing table, a DNS socket or a conntrack zone.
//! The gateway address and MAC are the same on every participating host (a distributed
//! gateway): a VM's ARP entry for its gateway stays valid when it migrates, and the
//! firewall keeps each host's gateway, DHCP and DNS traffic off the VXLAN.
//!
//! The host side effects are adapters in `keel_adapters`, each a narrow trait with its
//! real implementation and a fake: `links` (bridges, VXLAN devices, FDB entries, router
//! namespaces; rtnetlink), `dhcp` (one supervised dnsmasq per network), `firewall`
//! (security groups, anti-spoofing, gateway isolation; nftables) and `nat`. The
//! [`reconciler`] here turns desired state into calls on them.

pub mod reconciler;
