//! keel-adapters: every side effect a Keel node has on its host, one module per seam. Each
//! seam is a narrow trait (the module itself), its real implementation and an in-memory
//! fake side by side; the node's reconcilers are written against the traits, unit-tested
//! with the fakes, and the real implementations are tested against the real thing
//! (libvirtd, netlink in network namespaces, nftables, dnsmasq, D-Bus) by `keel-tests`.
//!
//! | seam | trait | real | fake |
//! |---|---|---|---|
//! | [`hypervisor`] (with domain XML and the NoCloud seed image) | `Hypervisor` | libvirt (`virt`) | `FakeHypervisor` |
//! | [`links`] (bridges, VXLAN, FDB, namespaces, ARP) | `Links` | rtnetlink | `FakeLinks` |
//! | [`dhcp`] (DHCP and DNS per guest network) | `Dhcp` | dnsmasq | `FakeDhcp` |
//! | [`firewall`] (security groups, anti-spoofing) | `Firewall` | nftables | `FakeFirewall` |
//! | [`nat`] (SNAT, floating IPs, port forwards) | `Nat` | nftables | `FakeNat` |
//! | [`units`] (the host's systemd units) | `UnitManager` | systemd over D-Bus (`zbus`) | `FakeUnits` |
//! | [`probe`] (the host's hardware inventory) | `HostProbe` | procfs and sysfs | `FakeProbe` |
//!
//! Nothing here knows the cluster model: the reconcilers translate desired state into
//! these types. Kernel-object names come from [`keel_base::names`], which the model uses too.

pub mod dhcp;
pub mod firewall;
pub mod hypervisor;
pub mod links;
pub mod nat;
pub mod nf_tables;
pub mod probe;
pub mod units;
