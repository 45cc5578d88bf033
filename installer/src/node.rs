//! The installed node's side of the installer: what runs on every boot before and around the
//! `keel` node service.
//!
//! * `keel-installer node-env` (keel-env.service) finds the management address (static from
//!   the answer, or what DHCP gave the interface with the installed MAC) and writes
//!   `/run/keel/node.env`, which keel.service reads.
//! * `keel-installer firstboot` (keel-firstboot.service, first boot only) runs
//!   `keel cluster init` or `keel cluster join TOKEN` against the local service and deletes
//!   `/etc/keel/firstboot.toml` (which holds the token) once it has succeeded.
//! * `keel-installer banner` (keel-banner.service, and after first boot) writes the console
//!   banner: node address, HTTPS console URL and cluster status, to `/run/issue.d` (shown by
//!   agetty above the login prompt) and to the console.
//!
//! Managing units over D-Bus (zbus) belongs to the node service and comes with it later.

use std::fs;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::answer::{ClusterSpec, IpConfig, Secret};
use crate::plan::FirstBoot;

pub const NODE_CONFIG: &str = "/etc/keel/node.toml";
pub const FIRSTBOOT: &str = "/etc/keel/firstboot.toml";
pub const NODE_ENV: &str = "/run/keel/node.env";
pub const ISSUE_FILE: &str = "/run/issue.d/50-keel.issue";
/// What `keel cluster init` printed, including the one-time admin token: root only.
pub const INIT_OUTPUT: &str = "/root/keel-cluster-init.txt";
pub const DEFAULT_API_PORT: u16 = 8443;
pub const DEFAULT_PEER_PORT: u16 = 7443;

/// `/etc/keel/node.toml`: the node's configuration from the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    pub hostname: String,
    /// The management interface, by MAC address.
    pub interface_mac: String,
    /// Set for a static management address; otherwise DHCP gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_address: Option<String>,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub api_port: u16,
    pub peer_port: u16,
    pub keel_binary: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is malformed: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "no network interface has the management MAC address {mac}; the interfaces are: {found}"
    )]
    NoInterface { mac: String, found: String },
    #[error("the management interface {iface} got no address within {secs} s: is DHCP on the management network working?")]
    NoAddress { iface: String, secs: u64 },
    #[error("the keel service did not open {socket} within {secs} s: see `journalctl -u keel`")]
    NoSocket { socket: PathBuf, secs: u64 },
    #[error("`{command}` failed after {attempts} attempt(s): {detail}")]
    Cluster {
        command: String,
        attempts: u32,
        detail: String,
    },
}

impl NodeConfig {
    pub fn new(hostname: &str, mac: &str, ip: &IpConfig) -> Self {
        Self {
            hostname: hostname.to_string(),
            interface_mac: mac.to_lowercase(),
            static_address: match ip {
                IpConfig::Dhcp => None,
                IpConfig::Static { address, .. } => Some(address.to_string()),
            },
            data_dir: PathBuf::from("/var/lib/keel"),
            socket: PathBuf::from("/run/keel/keel.sock"),
            api_port: DEFAULT_API_PORT,
            peer_port: DEFAULT_PEER_PORT,
            keel_binary: PathBuf::from("/usr/bin/keel"),
        }
    }

    pub fn to_toml(&self) -> String {
        format!(
            "# Keel node configuration (written by keel-installer).\n{}",
            toml::to_string(self).unwrap_or_default()
        )
    }

    pub fn load(path: &Path) -> Result<Self, NodeError> {
        let text = fs::read_to_string(path).map_err(|source| NodeError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| NodeError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// `host:port`, with brackets for IPv6.
pub fn socket_addr(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The environment file keel.service reads.
pub fn node_env_text(cfg: &NodeConfig, addr: IpAddr) -> String {
    format!(
        "# written by keel-installer node-env at boot\nKEEL_HOSTNAME={}\nKEEL_ADDR={addr}\nKEEL_API_ADDR={}\nKEEL_PEER_ADDR={}\nKEEL_DATA_DIR={}\nKEEL_SOCKET={}\n",
        cfg.hostname,
        socket_addr(addr, cfg.api_port),
        socket_addr(addr, cfg.peer_port),
        cfg.data_dir.display(),
        cfg.socket.display()
    )
}

/// Reads `KEY=value` lines.
pub fn env_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|r| r.strip_prefix('='))
            .map(|v| v.trim().to_string())
    })
}

/// The first global address in `ip -o addr show` output (IPv4 preferred).
pub fn parse_ip_addr_output(text: &str) -> Option<IpAddr> {
    let mut v6 = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = words.iter().position(|w| *w == "inet" || *w == "inet6") else {
            continue;
        };
        if !line.contains("scope global") {
            continue;
        }
        let Some(ip) = words
            .get(i + 1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse::<IpAddr>().ok())
        else {
            continue;
        };
        if ip.is_ipv4() {
            return Some(ip);
        }
        v6.get_or_insert(ip);
    }
    v6
}

/// The interface with this MAC address, from sysfs.
pub fn interface_by_mac(sys: &Path, mac: &str) -> Result<String, NodeError> {
    let mut found = Vec::new();
    if let Ok(d) = fs::read_dir(sys.join("class/net")) {
        for e in d.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let m = fs::read_to_string(e.path().join("address")).unwrap_or_default();
            if m.trim().eq_ignore_ascii_case(mac) {
                return Ok(name);
            }
            found.push(format!("{name} ({})", m.trim()));
        }
    }
    found.sort();
    Err(NodeError::NoInterface {
        mac: mac.to_string(),
        found: found.join(", "),
    })
}

/// Finds the management address, waiting up to `wait` for DHCP.
pub fn management_address(cfg: &NodeConfig, wait: Duration) -> Result<IpAddr, NodeError> {
    if let Some(a) = &cfg.static_address {
        return a.parse().map_err(|_| NodeError::Parse {
            path: PathBuf::from(NODE_CONFIG),
            message: format!("static_address '{a}' is not an IP address"),
        });
    }
    let iface = interface_by_mac(Path::new("/sys"), &cfg.interface_mac)?;
    let start = Instant::now();
    loop {
        let out = Command::new("ip")
            .args(["-o", "addr", "show", "dev", &iface])
            .output();
        if let Some(ip) = out
            .ok()
            .and_then(|o| parse_ip_addr_output(&String::from_utf8_lossy(&o.stdout)))
        {
            return Ok(ip);
        }
        if start.elapsed() > wait {
            return Err(NodeError::NoAddress {
                iface,
                secs: wait.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

pub fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), NodeError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| NodeError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).map_err(err)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

/// What first boot runs: the `keel` arguments, what goes to its standard input (the join
/// token: on the command line it would be visible in the process list while the join
/// runs), and a printable form.
#[derive(Debug)]
pub struct FirstBootCommand {
    pub args: Vec<String>,
    pub stdin: Option<Secret>,
    pub shown: String,
}

/// The `keel` command line that first boot runs.
pub fn firstboot_command(cfg: &NodeConfig, fb: &FirstBoot) -> FirstBootCommand {
    let mut args = vec![
        "--socket".to_string(),
        cfg.socket.display().to_string(),
        "cluster".to_string(),
    ];
    let stdin = match &fb.cluster {
        ClusterSpec::Init { name } => {
            args.extend(["init".to_string(), "--name".to_string(), name.clone()]);
            None
        }
        ClusterSpec::Join { token } => {
            // `-`: the token comes from standard input
            args.extend(["join".to_string(), "-".to_string()]);
            Some(token.clone())
        }
    };
    let shown = match stdin {
        Some(_) => format!("keel {} (token on standard input)", args.join(" ")),
        None => format!("keel {}", args.join(" ")),
    };
    FirstBootCommand { args, stdin, shown }
}

/// Runs a program with a time limit, `input` on its standard input; returns (success,
/// combined output).
pub fn run_with_timeout(
    program: &Path,
    args: &[String],
    input: Option<&[u8]>,
    limit: Duration,
) -> (bool, String) {
    let child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot start {}: {e}", program.display())),
    };
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        // a program that exits without reading gives EPIPE here: its exit status tells
        if let Err(e) = stdin.write_all(data).and_then(|()| stdin.write_all(b"\n")) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                let _ = child.kill();
                let _ = child.wait();
                return (false, format!("cannot write to {}: {e}", program.display()));
            }
        }
        // dropped here: end of input
    }
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = String::new();
                if let Some(mut o) = child.stdout.take() {
                    let _ = o.read_to_string(&mut out);
                }
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut out);
                }
                return (status.success(), out);
            }
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return (false, format!("timed out after {} s", limit.as_secs()));
            }
        }
    }
}

/// First boot: init or join, then delete the file that holds the token. `init_output`
/// receives what `keel cluster init` prints (it holds the one-time admin token, so it is
/// written root-only and never logged).
pub fn firstboot(
    cfg: &NodeConfig,
    firstboot_path: &Path,
    init_output: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<(), NodeError> {
    let text = fs::read_to_string(firstboot_path).map_err(|source| NodeError::Read {
        path: firstboot_path.to_path_buf(),
        source,
    })?;
    let fb: FirstBoot = toml::from_str(&text).map_err(|e| NodeError::Parse {
        path: firstboot_path.to_path_buf(),
        message: e.message().to_string(),
    })?;
    let wait = Duration::from_secs(180);
    let start = Instant::now();
    while !cfg.socket.exists() {
        if start.elapsed() > wait {
            return Err(NodeError::NoSocket {
                socket: cfg.socket.clone(),
                secs: wait.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let command = firstboot_command(cfg, &fb);
    let shown = &command.shown;
    let attempts = 10;
    let mut last = String::new();
    for attempt in 1..=attempts {
        log(&format!(
            "keel first boot: {shown} (attempt {attempt}/{attempts})"
        ));
        let (ok, out) = run_with_timeout(
            &cfg.keel_binary,
            &command.args,
            command.stdin.as_ref().map(|t| t.expose().as_bytes()),
            Duration::from_secs(120),
        );
        if ok {
            if matches!(fb.cluster, ClusterSpec::Init { .. }) {
                write_file(init_output, &out, 0o600)?;
                log(&format!(
                    "keel first boot: the admin token and CA fingerprint are in {} (root only)",
                    init_output.display()
                ));
            }
            fs::remove_file(firstboot_path).map_err(|source| NodeError::Write {
                path: firstboot_path.to_path_buf(),
                source,
            })?;
            log(&format!(
                "keel first boot: {} done; {} removed",
                match fb.cluster {
                    ClusterSpec::Init { .. } => "cluster init",
                    ClusterSpec::Join { .. } => "cluster join",
                },
                firstboot_path.display()
            ));
            return Ok(());
        }
        // the output of a failed join may echo the token back: never log it raw
        last = redact(out.trim(), &fb);
        log(&format!("keel first boot: failed: {last}"));
        std::thread::sleep(Duration::from_secs(6));
    }
    Err(NodeError::Cluster {
        command: shown.clone(),
        attempts,
        detail: last,
    })
}

fn redact(text: &str, fb: &FirstBoot) -> String {
    match &fb.cluster {
        ClusterSpec::Join { token } if !token.expose().is_empty() => {
            text.replace(token.expose(), "<token>")
        }
        _ => text.to_string(),
    }
}

/// A one-line summary of `keel cluster status --output json`.
pub fn summarize_status(json: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return "status unavailable".to_string();
    };
    let mut parts = Vec::new();
    if let Some(name) = v.get("name").and_then(|x| x.as_str()) {
        parts.push(format!("\"{name}\""));
    }
    if let Some(state) = v.get("state").and_then(|x| x.as_str()) {
        parts.push(format!("this node is {state}"));
    }
    if let Some(a) = v.get("members").and_then(|x| x.as_array()) {
        parts.push(format!("{} member(s)", a.len()));
    }
    if parts.is_empty() {
        "up".to_string()
    } else {
        parts.join(", ")
    }
}

/// The banner text (plain; [`issue_escape`] makes it safe for agetty).
pub fn banner_text(cfg: &NodeConfig, addr: Option<&str>, status: &str) -> String {
    let (a, url) = match addr {
        Some(a) => {
            let ip: Option<IpAddr> = a.parse().ok();
            let hostport = ip
                .map(|ip| socket_addr(ip, cfg.api_port))
                .unwrap_or_else(|| format!("{a}:{}", cfg.api_port));
            (a.to_string(), format!("https://{hostport}/"))
        }
        None => ("(no address yet)".to_string(), "(none yet)".to_string()),
    };
    format!(
        "\nKeel node {}\n  Address:  {a}\n  Console:  {url}\n  Cluster:  {status}\n\n",
        cfg.hostname
    )
}

/// agetty interprets backslashes in issue files.
pub fn issue_escape(text: &str) -> String {
    text.replace('\\', "\\\\")
}

/// Whether a `keel cluster status` answer names the cluster and its members. A node that has
/// just joined answers before the leader's log has reached it (no name, no members yet).
pub fn status_is_settled(json: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(json).is_ok_and(|v| {
        v.get("name").and_then(|n| n.as_str()).is_some()
            && v.get("members")
                .and_then(|m| m.as_array())
                .is_some_and(|m| !m.is_empty())
    })
}

/// Builds the banner, asking the node for its cluster status again (every 2 s, for up to
/// `patience`) until the answer is settled: right after first boot, so the banner does not
/// keep a half-known cluster until the next boot.
pub fn current_banner_within(cfg: &NodeConfig, patience: Duration) -> String {
    let env = fs::read_to_string(NODE_ENV).unwrap_or_default();
    let addr = env_value(&env, "KEEL_ADDR");
    let status = if Path::new(FIRSTBOOT).exists() {
        "first boot: joining or creating the cluster...".to_string()
    } else {
        let args: Vec<String> = [
            "--socket",
            &cfg.socket.display().to_string(),
            "cluster",
            "status",
            "--output",
            "json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let started = Instant::now();
        loop {
            let (ok, out) =
                run_with_timeout(&cfg.keel_binary, &args, None, Duration::from_secs(10));
            let settled = ok && status_is_settled(&out);
            if settled || started.elapsed() >= patience {
                break if ok {
                    summarize_status(&out)
                } else {
                    "not answering yet (see `journalctl -u keel`)".to_string()
                };
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    };
    let mut text = banner_text(cfg, addr.as_deref(), &status);
    if Path::new(INIT_OUTPUT).exists() {
        text.insert_str(
            text.trim_end().len(),
            &format!("\n  Admin:    the admin token is in {INIT_OUTPUT} (root only)"),
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NodeConfig {
        NodeConfig::new("node1", "52:54:00:AA:BB:CC", &IpConfig::Dhcp)
    }

    #[test]
    fn config_round_trips() {
        let c = cfg();
        let back: NodeConfig = toml::from_str(&c.to_toml()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, c);
        assert_eq!(back.interface_mac, "52:54:00:aa:bb:cc");
    }

    #[test]
    fn env_file_has_the_service_arguments() {
        let env = node_env_text(
            &cfg(),
            "10.0.2.15".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        );
        assert_eq!(
            env_value(&env, "KEEL_API_ADDR").as_deref(),
            Some("10.0.2.15:8443")
        );
        assert_eq!(
            env_value(&env, "KEEL_PEER_ADDR").as_deref(),
            Some("10.0.2.15:7443")
        );
        assert_eq!(
            env_value(&env, "KEEL_SOCKET").as_deref(),
            Some("/run/keel/keel.sock")
        );
        let v6: IpAddr = "fd00::5".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert_eq!(socket_addr(v6, 8443), "[fd00::5]:8443");
    }

    #[test]
    fn ip_output_parsing_prefers_global_ipv4() {
        let out = "2: ens3    inet6 fe80::5054:ff:fe12:3456/64 scope link \\       valid_lft forever\n\
                   2: ens3    inet6 fd00::15/64 scope global dynamic \\       valid_lft 86000sec\n\
                   2: ens3    inet 10.0.2.15/24 brd 10.0.2.255 scope global dynamic ens3\\       valid_lft 86000sec\n";
        assert_eq!(
            parse_ip_addr_output(out).map(|a| a.to_string()).as_deref(),
            Some("10.0.2.15")
        );
        let only6 = "2: ens3    inet6 fd00::15/64 scope global \\ x\n";
        assert_eq!(
            parse_ip_addr_output(only6)
                .map(|a| a.to_string())
                .as_deref(),
            Some("fd00::15")
        );
        assert_eq!(
            parse_ip_addr_output("2: ens3    inet6 fe80::1/64 scope link\n"),
            None
        );
    }

    #[test]
    fn firstboot_command_hides_the_token() {
        let join = FirstBoot {
            cluster: ClusterSpec::Join {
                token: Secret::new("keel-join-v1.SECRET"),
            },
        };
        let join_cmd = firstboot_command(&cfg(), &join);
        assert_eq!(
            join_cmd.args,
            ["--socket", "/run/keel/keel.sock", "cluster", "join", "-"]
        );
        assert_eq!(
            join_cmd.stdin.as_ref().map(|t| t.expose().to_string()),
            Some("keel-join-v1.SECRET".to_string())
        );
        assert!(!join_cmd.shown.contains("SECRET"), "{}", join_cmd.shown);
        assert!(!format!("{join_cmd:?}").contains("SECRET"));
        assert_eq!(
            redact("bad token keel-join-v1.SECRET", &join),
            "bad token <token>"
        );
        let init = FirstBoot {
            cluster: ClusterSpec::Init {
                name: "site-a".into(),
            },
        };
        let init_cmd = firstboot_command(&cfg(), &init);
        assert!(init_cmd.stdin.is_none());
        assert_eq!(
            init_cmd.args,
            [
                "--socket",
                "/run/keel/keel.sock",
                "cluster",
                "init",
                "--name",
                "site-a"
            ]
        );
    }

    #[test]
    fn banner_shows_address_url_and_status() {
        let b = banner_text(
            &cfg(),
            Some("10.0.2.15"),
            &summarize_status(r#"{"name":"site-a","members":[1,2,3]}"#),
        );
        assert!(b.contains("Keel node node1"), "{b}");
        assert!(b.contains("Console:  https://10.0.2.15:8443/"), "{b}");
        assert!(b.contains("Cluster:  \"site-a\", 3 member(s)"), "{b}");
        let real = r#"{"cluster_id":"b6","name":"site-a","node_id":1,"state":"leader","members":[{"id":1}]}"#;
        assert_eq!(
            summarize_status(real),
            "\"site-a\", this node is leader, 1 member(s)"
        );
        assert!(banner_text(&cfg(), None, "x").contains("(no address yet)"));
        assert_eq!(issue_escape("a\\b"), "a\\\\b");
        assert_eq!(summarize_status("not json"), "status unavailable");
        assert!(status_is_settled(real));
        // just joined: the leader's log has not reached this node yet
        assert!(!status_is_settled(r#"{"state":"learner","members":[]}"#));
        assert!(!status_is_settled(r#"{"name":"site-a","members":[]}"#));
        assert!(!status_is_settled("not json"));
    }

    #[test]
    fn interface_lookup_by_mac() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("class/net/ens3");
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{e}"));
        fs::write(p.join("address"), "52:54:00:aa:bb:cc\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            interface_by_mac(dir.path(), "52:54:00:AA:BB:CC")
                .ok()
                .as_deref(),
            Some("ens3")
        );
        let e = interface_by_mac(dir.path(), "52:54:00:00:00:00").unwrap_err();
        assert!(e.to_string().contains("ens3 (52:54:00:aa:bb:cc)"), "{e}");
    }

    #[test]
    fn firstboot_runs_keel_and_removes_the_token_file() {
        // a stand-in `keel` that records its arguments: the real binary is tested end to end
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let bin = dir.path().join("keel");
        let log = dir.path().join("args");
        let input = dir.path().join("stdin");
        write_file(
            &bin,
            &format!(
                "#!/bin/sh\necho \"$@\" > {}\ncat > {}\n",
                log.display(),
                input.display()
            ),
            0o755,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let sock = dir.path().join("keel.sock");
        fs::write(&sock, "").unwrap_or_else(|e| panic!("{e}"));
        let fbp = dir.path().join("firstboot.toml");
        fs::write(
            &fbp,
            "[cluster]\nmode = \"join\"\ntoken = \"keel-join-v1.XYZ\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let c = NodeConfig {
            socket: sock.clone(),
            keel_binary: bin.clone(),
            ..cfg()
        };
        let mut lines = Vec::new();
        let init_out = dir.path().join("init.txt");
        firstboot(&c, &fbp, &init_out, &mut |l| lines.push(l.to_string()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!fbp.exists());
        let args = fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(
            args.trim(),
            format!("--socket {} cluster join -", sock.display())
        );
        assert_eq!(
            fs::read_to_string(&input).unwrap_or_default(),
            "keel-join-v1.XYZ\n"
        );
        assert!(lines.iter().all(|l| !l.contains("XYZ")), "{lines:?}");
        assert!(!init_out.exists());

        // init: the output (with the one-time admin token) is kept root-only, never logged
        write_file(
            &bin,
            "#!/bin/sh\necho \"Admin token: keel-admin-T0K\"\n",
            0o755,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        fs::write(&fbp, "[cluster]\nmode = \"init\"\nname = \"site-a\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let mut lines = Vec::new();
        firstboot(&c, &fbp, &init_out, &mut |l| lines.push(l.to_string()))
            .unwrap_or_else(|e| panic!("{e}"));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&init_out)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o600);
        assert!(fs::read_to_string(&init_out)
            .unwrap_or_default()
            .contains("keel-admin-T0K"));
        assert!(lines.iter().all(|l| !l.contains("T0K")), "{lines:?}");
        assert!(!fbp.exists());
    }
}
