//! Compute: virtual machines on this host's hypervisor.
//!
//! Adapters (host side effects, each behind a narrow trait with a fake beside it):
//! - [`hypervisor`]: the trait; [`libvirt`] is the real one (every `virt::` call is there),
//!   [`fake`] the in-memory one.
//! - [`domain_xml`]: domain XML from a typed spec, written with a real XML writer.
//! - [`seed`]: the NoCloud seed disk (user data, SSH keys, hostname) every VM gets.

pub mod console;
pub mod domain_xml;
pub mod fake;
pub mod hypervisor;
pub mod images;
pub mod kvm_probe;
pub mod libvirt;
pub mod migration;
pub mod reconciler;
pub mod seed;
pub mod transfer;
