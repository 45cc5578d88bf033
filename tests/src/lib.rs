//! Keel's multi-host test harness.
//!
//! Every simulated host is a Linux network namespace on this machine; the test process
//! itself sits on the bridge that joins them and reaches every host directly:
//!
//! ```text
//!   root namespace (the test process, 10.213.S.254)
//!   ┌───────────────────────── bridge kb<run> ─────────────────────────┐
//!   │ kv<run>-1            kv<run>-2            kv<run>-3   (veth, root side)
//!   └────┼──────────────────────┼──────────────────────┼───────────────┘
//!        │ eth0 10.213.S.1      │ eth0 10.213.S.2      │ eth0 10.213.S.3
//!   netns kn<run>-1        netns kn<run>-2        netns kn<run>-3
//!   `keel serve` node1     `keel serve` node2     `keel serve` node3
//! ```
//!
//! Host index `i` (0-based, as used by every API here) is node `node<i+1>`, namespace
//! `kn<run>-<i+1>` and address `10.213.S.<i+1>`.
//!
//! * [`netns`] — the virtual network: [`netns::TestNet`], partitions, heal, cleanup.
//! * [`process`] — processes spawned inside a namespace, with log files, kill/stop/restart.
//! * [`wait`] — bounded polling; tests never sleep blindly.
//! * [`cluster`] — [`cluster::TestCluster`]: n `keel serve` hosts plus CLI and HTTPS clients.
//! * [`libvirt`] — [`libvirt::LibvirtHost`]: a private libvirtd (and virtlogd) per host.
//! * [`standin`] — [`standin::StandIn`]: a stand-in VM (a namespace on a veth whose other
//!   end is a bridge port), nftables scripts into a host, pings from a namespace.
//! * [`cmd`] — running host tools with errors that say what failed; `which`.
//!
//! All of it needs root (namespaces, veth, bridges, nftables). Tests call
//! [`skip_reason`] (or the [`skip_unless_root!`] macro) first and skip with a printed
//! reason when the machine cannot run them.

pub mod cluster;
pub mod cmd;
pub mod libvirt;
pub mod netns;
pub mod process;
pub mod standin;
pub mod wait;

pub use cluster::{ApiClient, ClusterOptions, TestCluster};
pub use cmd::CmdError;
pub use netns::{Endpoint, NetError, TestNet};
pub use process::{ManagedProcess, ProcessSpec, StopOutcome};
pub use wait::{wait_until, wait_until_blocking, WaitError};

/// Why multi-host tests cannot run on this machine, or `None` when they can
/// (root, and `ip` and `nft` are installed).
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("multi-host tests need root (network namespaces, veth, bridges)".into());
    }
    for tool in ["ip", "nft"] {
        if cmd::which(tool).is_none() {
            return Some(format!(
                "`{tool}` is not installed (run scripts/install-deps as root)"
            ));
        }
    }
    None
}

/// [`skip_reason`], or why not when one of `tools` is not installed.
pub fn skip_reason_with(tools: &[&str]) -> Option<String> {
    skip_reason().or_else(|| {
        tools
            .iter()
            .find(|t| cmd::which(t).is_none())
            .map(|t| format!("`{t}` is not installed (run scripts/install-deps as root)"))
    })
}

/// Returns early from a test (with `Ok(())` when the test returns a `Result`, `()`
/// otherwise) after printing why, when [`skip_reason`] says multi-host tests cannot run.
///
/// ```ignore
/// #[tokio::test]
/// async fn three_hosts() -> anyhow::Result<()> {
///     keel_tests::skip_unless_root!(Ok(()));
///     // ...
///     Ok(())
/// }
/// ```
#[macro_export]
macro_rules! skip_unless_root {
    () => {
        $crate::skip_unless_root!(())
    };
    ($ret:expr) => {
        if let Some(reason) = $crate::skip_reason() {
            eprintln!("SKIPPED: {reason}");
            return $ret;
        }
    };
}
