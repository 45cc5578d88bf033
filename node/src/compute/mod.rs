//! Compute: virtual machines on this host's hypervisor.
//!
//! The hypervisor itself (trait, libvirt, fake, domain XML, the NoCloud seed image) is an
//! adapter in `keel_adapters::hypervisor`; here is what drives it: the per-VM reconciler,
//! the image store, consoles, migration and template transfer.

pub mod console;
pub mod host;
pub mod images;
pub mod kvm_probe;
pub mod migration;
pub mod reconciler;
pub mod transfer;
