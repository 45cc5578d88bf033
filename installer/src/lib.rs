//! keel-installer: installs Keel from the live ISO onto a server's disk.
//!
//! * [`answer`] — the TOML answer file: typed, validated as a whole, every problem at once.
//! * [`disk`], [`net`] — disk and network-card discovery (sysfs) and selection.
//! * [`plan`] — the installation as typed steps (partition, format, copy, configure, GRUB).
//! * [`runner`] — executes a plan on the real machine or a recording fake; dry-run prints it.
//! * [`source`] — where an unattended install finds its answer file.
//! * [`dialog`] — the interactive installer (line-based: robust on serial consoles).
//! * [`node`] — on the installed node: management address, first boot (cluster init or
//!   join), console banner.
//! * [`install`] — ties them together for the `keel-installer` binary.
//!
//! See docs/installer.md.

pub mod answer;
pub mod console;
pub mod dialog;
pub mod disk;
pub mod install;
pub mod net;
pub mod node;
pub mod plan;
pub mod runner;
pub mod source;

pub use answer::{Answer, AnswerError, Problem};
