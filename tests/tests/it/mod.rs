//! Multi-host tests, by topic, plus helpers they share.
//!
//! * `plumbing` — the harness itself with stand-in processes: namespaces, bridge,
//!   partitions, heal, kill/stop/restart, cleanup.
//! * `cluster` — `TestCluster` against the real `keel` binary.

mod cluster;
mod plumbing;

use std::path::PathBuf;

use keel_tests::process::{ManagedProcess, ProcessSpec};
use keel_tests::TestNet;

/// Port the stand-in servers listen on.
pub const STAND_IN_PORT: u16 = 8000;

/// A tiny TCP server: answers every connection with its name and closes. With `forks`,
/// it first forks a child that sleeps in the same process group (and prints the child's
/// pid as `child=PID`); with `ignore_term`, it ignores SIGTERM.
const STAND_IN: &str = r#"
import os, signal, socket, sys, time
name, port, forks, ignore_term = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
if ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if forks:
    pid = os.fork()
    if pid == 0:
        while True:
            time.sleep(60)
    print(f"child={pid}", flush=True)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(64)
print(f"{name} listening on {port}", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(name.encode() + b"\n")
    c.close()
"#;

pub fn python() -> PathBuf {
    let system = PathBuf::from("/usr/bin/python3");
    if system.is_file() {
        system
    } else {
        PathBuf::from("python3")
    }
}

/// Spawns the stand-in server in host `i` of `net`, logging into `log_dir`.
pub fn stand_in(
    net: &TestNet,
    i: usize,
    log_dir: &std::path::Path,
    forks: bool,
    ignore_term: bool,
) -> ManagedProcess {
    let name = format!("standin{}", i + 1);
    let spec = ProcessSpec::new(&name, python(), log_dir)
        .netns(net.ns(i))
        .args(["-u", "-c", STAND_IN, &name, &STAND_IN_PORT.to_string()])
        .arg(if forks { "1" } else { "0" })
        .arg(if ignore_term { "1" } else { "0" });
    ManagedProcess::spawn(spec).expect("spawn stand-in")
}
