//! The node service's configuration: a TOML file (`--config FILE`) with flags on top.
//! Every field has a default, so a flag-only start works; unknown keys are errors, so a
//! typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use keel_cluster::db::RaftTuning;
use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/run/keel/keel.sock";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/keel";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Timing of the leader's management duties.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DutyTuning {
    /// How often members send a heartbeat to the leader.
    pub heartbeat_interval_ms: u64,
    /// A member not heard from for this long is `suspect`.
    pub suspect_after_ms: u64,
    /// ... and `down` after this long.
    pub down_after_ms: u64,
    /// A voter down for this long is replaced by a healthy learner, if there is one.
    pub voter_replace_after_ms: u64,
    /// How often the duties re-evaluate.
    pub tick_ms: u64,
}

impl Default for DutyTuning {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 1000,
            suspect_after_ms: 3000,
            down_after_ms: 10_000,
            voter_replace_after_ms: 30_000,
            tick_ms: 500,
        }
    }
}

/// This host's compute service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComputeConfig {
    /// libvirt connection URI of this host's libvirtd.
    pub libvirt_uri: String,
    /// Where templates, VM disks, seeds and console logs live. Default: `<data_dir>/images`.
    pub images_dir: Option<PathBuf>,
    /// How often every VM is reconciled even when nothing changed.
    pub resync_interval_ms: u64,
    /// The small Linux guest the KVM probe boots (the tiny template's kernel/initramfs).
    pub kvm_probe_kernel: PathBuf,
    pub kvm_probe_initrd: PathBuf,
}

impl Default for ComputeConfig {
    fn default() -> Self {
        Self {
            libvirt_uri: "qemu:///system".into(),
            images_dir: None,
            resync_interval_ms: 5000,
            kvm_probe_kernel: PathBuf::from("/usr/share/keel/probe/vmlinuz"),
            kvm_probe_initrd: PathBuf::from("/usr/share/keel/probe/initrd.img"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// Defaults to the host name.
    pub name: Option<String>,
    pub peer_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub socket: PathBuf,
    pub witness: bool,
    pub log_format: LogFormat,
    pub raft: RaftTuning,
    pub duties: DutyTuning,
    pub compute: ComputeConfig,
    pub network: NetworkConfig,
    pub host: HostConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            name: None,
            peer_addr: SocketAddr::from(([0, 0, 0, 0], 7400)),
            api_addr: SocketAddr::from(([0, 0, 0, 0], 8443)),
            socket: PathBuf::from(DEFAULT_SOCKET),
            witness: false,
            log_format: LogFormat::Text,
            raft: RaftTuning::default(),
            duties: DutyTuning::default(),
            compute: ComputeConfig::default(),
            network: NetworkConfig::default(),
            host: HostConfig::default(),
        }
    }
}

/// This host's guest-network service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Where router namespaces are kept (bind-mounted nsfs files). Default:
    /// `<data_dir>/run/netns`.
    pub netns_dir: Option<PathBuf>,
    /// Per-network dnsmasq files. Default: `<data_dir>/run/dnsmasq`.
    pub dnsmasq_dir: Option<PathBuf>,
    pub dnsmasq_binary: PathBuf,
    pub nft_binary: PathBuf,
    /// How often the host's networks are re-checked even when nothing changed.
    pub resync_interval_ms: u64,
    /// This host's interface roles (`management`, `storage`, `guest-underlay`, `public`),
    /// given to the cluster when the node first reports them (at init or join; the
    /// installer writes them from the answer file). A role already set in the cluster —
    /// by an earlier start or through the API — is left as it is.
    pub roles: std::collections::BTreeMap<String, RoleConfig>,
}

/// One interface role of this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    pub interface: String,
    /// `a.b.c.d/len`; default: the interface's first IPv4 address.
    #[serde(default)]
    pub address: Option<String>,
    /// Next hop to the outside (public role only).
    #[serde(default)]
    pub gateway: Option<std::net::Ipv4Addr>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            netns_dir: None,
            dnsmasq_dir: None,
            dnsmasq_binary: PathBuf::from("/usr/sbin/dnsmasq"),
            nft_binary: PathBuf::from("/usr/sbin/nft"),
            resync_interval_ms: 10_000,
            roles: Default::default(),
        }
    }
}

/// Whether the node service manages the host's systemd units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemdMode {
    /// When systemd runs the host (`/run/systemd/system` exists, sd_booted(3)).
    #[default]
    Auto,
    /// Always (without systemd, every unit reports the bus error).
    On,
    /// Never: the units are left to the host.
    Off,
}

/// Where systemd says it booted the host (sd_booted(3)).
pub const SYSTEMD_BOOTED_DIR: &str = "/run/systemd/system";

/// The host's own services (systemd units) the node service keeps running.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// Whether the node service manages `units` at all.
    pub systemd: SystemdMode,
    /// Units started when they are not running (libvirtd now; Ceph's daemons later).
    pub units: Vec<String>,
    /// How often their state is checked.
    pub units_interval_ms: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            systemd: SystemdMode::Auto,
            units: vec!["libvirtd.service".into()],
            units_interval_ms: 15_000,
        }
    }
}

impl HostConfig {
    /// Whether the node service manages `units` through systemd on this host.
    pub fn manages_units(&self) -> bool {
        self.manages_units_if_booted(Path::new(SYSTEMD_BOOTED_DIR).is_dir())
    }

    /// [`Self::manages_units`] given whether systemd booted the host.
    pub fn manages_units_if_booted(&self, systemd_booted: bool) -> bool {
        match self.systemd {
            SystemdMode::Auto => systemd_booted,
            SystemdMode::On => true,
            SystemdMode::Off => false,
        }
    }
}

/// Whether `name` can be a systemd unit name (`name.suffix`, systemd's characters).
fn valid_unit_name(name: &str) -> bool {
    let Some((stem, suffix)) = name.rsplit_once('.') else {
        return false;
    };
    name.len() <= 255
        && !stem.is_empty()
        && !suffix.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.@\\".contains(&b))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `detail` is toml's message flattened onto one line with its position.
    #[error("config file {path} is invalid: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("invalid configuration: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl NodeConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            detail: one_line(&text, &e),
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The node's name: configured, or the host name.
    pub fn node_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .map(|h| {
                    h.to_ascii_lowercase()
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                        .collect::<String>()
                })
                .unwrap_or_else(|| "keel".into())
        })
    }

    /// The image store's directory.
    pub fn images_dir(&self) -> PathBuf {
        self.compute
            .images_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("images"))
    }

    pub fn netns_dir(&self) -> PathBuf {
        self.network
            .netns_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("run/netns"))
    }

    pub fn dnsmasq_dir(&self) -> PathBuf {
        self.network
            .dnsmasq_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("run/dnsmasq"))
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        keel_cluster::model::validate_name("name", &self.node_name()).map_err(|e| {
            ConfigError::Invalid {
                field: "name",
                reason: format!("{e} (set --name)"),
            }
        })?;
        if self.peer_addr.port() == self.api_addr.port()
            && (self.peer_addr.ip() == self.api_addr.ip()
                || self.peer_addr.ip().is_unspecified()
                || self.api_addr.ip().is_unspecified())
        {
            return Err(ConfigError::Invalid {
                field: "peer_addr",
                reason: "the peer and API addresses must differ".into(),
            });
        }
        for (role, rc) in &self.network.roles {
            if keel_cluster::model::network::NetRole::parse(role).is_none() {
                return Err(ConfigError::Invalid {
                    field: "network.roles",
                    reason: format!(
                        "{role:?} is not a role: use management, storage, guest-underlay or public"
                    ),
                });
            }
            if let Some(a) = &rc.address {
                keel_cluster::model::network::Ipv4Cidr::parse(a, false).map_err(|reason| {
                    ConfigError::Invalid {
                        field: "network.roles",
                        reason: format!("{role}: {reason}"),
                    }
                })?;
            }
        }
        if let Some(bad) = self.host.units.iter().find(|u| !valid_unit_name(u)) {
            return Err(ConfigError::Invalid {
                field: "host.units",
                reason: format!("{bad:?} is not a systemd unit name (e.g. \"libvirtd.service\")"),
            });
        }
        if self.host.units_interval_ms < 100 {
            return Err(ConfigError::Invalid {
                field: "host.units_interval_ms",
                reason: "must be at least 100".into(),
            });
        }
        let d = &self.duties;
        if !(d.suspect_after_ms < d.down_after_ms && d.down_after_ms <= d.voter_replace_after_ms) {
            return Err(ConfigError::Invalid {
                field: "duties",
                reason: "need suspect_after_ms < down_after_ms <= voter_replace_after_ms".into(),
            });
        }
        if self.raft.election_timeout_min_ms <= self.raft.heartbeat_interval_ms
            || self.raft.election_timeout_max_ms <= self.raft.election_timeout_min_ms
        {
            return Err(ConfigError::Invalid {
                field: "raft",
                reason:
                    "need heartbeat_interval_ms < election_timeout_min_ms < election_timeout_max_ms"
                        .into(),
            });
        }
        Ok(())
    }
}

/// toml's own Display draws a multi-line caret diagram; operators and scripts get one line.
fn one_line(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("{message} (line {line}, column {column})")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses() {
        let cfg = NodeConfig::from_toml(
            r#"
            data_dir = "/tmp/k"
            name = "n1"
            peer_addr = "10.0.0.1:7400"
            api_addr = "10.0.0.1:8443"
            witness = true
            log_format = "json"
            [raft]
            heartbeat_interval_ms = 100
            [duties]
            down_after_ms = 20000
            "#,
        )
        .expect("parse");
        assert!(cfg.witness);
        assert_eq!(cfg.raft.heartbeat_interval_ms, 100);
        assert_eq!(cfg.duties.down_after_ms, 20_000);
        cfg.validate().expect("valid");
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        assert!(NodeConfig::from_toml("data_dri = '/x'").is_err());
        assert!(NodeConfig::from_toml("peer_addr = 'nowhere'").is_err());
        let mut cfg = NodeConfig {
            name: Some("n1".into()),
            ..Default::default()
        };
        cfg.api_addr = cfg.peer_addr;
        assert!(cfg.validate().is_err());
        let cfg = NodeConfig {
            name: Some("Bad Name".into()),
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn parse_errors_are_one_line_naming_the_problem() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("keel.toml");
        std::fs::write(&path, "name = \"n1\"\nwrite_timeout = 3\n").expect("write");
        let msg = NodeConfig::from_file(&path).unwrap_err().to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains("unknown field `write_timeout`"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn host_section_parses_with_defaults() {
        let cfg = NodeConfig::from_toml("name = \"n1\"").expect("parse");
        assert_eq!(cfg.host.systemd, SystemdMode::Auto);
        assert_eq!(cfg.host.units, vec!["libvirtd.service".to_string()]);
        assert_eq!(cfg.host.units_interval_ms, 15_000);
        cfg.validate().expect("valid");

        let cfg = NodeConfig::from_toml(
            r#"
            name = "n1"
            [host]
            systemd = "on"
            units = ["libvirtd.service", "ceph-mon@n1.service"]
            units_interval_ms = 5000
            "#,
        )
        .expect("parse");
        assert_eq!(cfg.host.systemd, SystemdMode::On);
        assert_eq!(cfg.host.units.len(), 2);
        assert_eq!(cfg.host.units_interval_ms, 5000);
        cfg.validate().expect("valid");

        let cfg = NodeConfig::from_toml("[host]\nsystemd = \"off\"\nunits = []").expect("parse");
        assert_eq!(cfg.host.systemd, SystemdMode::Off);
        assert!(cfg.host.units.is_empty());
    }

    #[test]
    fn host_section_typos_and_bad_values_are_errors() {
        assert!(NodeConfig::from_toml("[host]\nsystemd = \"yes\"").is_err());
        assert!(NodeConfig::from_toml("[host]\nunit = [\"libvirtd.service\"]").is_err());
        for units in [
            "[\"libvirtd\"]",
            "[\"lib virtd.service\"]",
            "[\"\"]",
            "[\"a/b.service\"]",
        ] {
            let cfg = NodeConfig::from_toml(&format!("name = \"n1\"\n[host]\nunits = {units}"))
                .expect("parse");
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("host.units"), "{units}: {err}");
        }
        let cfg =
            NodeConfig::from_toml("name = \"n1\"\n[host]\nunits_interval_ms = 0").expect("parse");
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn systemd_auto_follows_sd_booted() {
        let mut host = HostConfig::default();
        assert!(host.manages_units_if_booted(true));
        assert!(!host.manages_units_if_booted(false));
        host.systemd = SystemdMode::On;
        assert!(host.manages_units_if_booted(false));
        host.systemd = SystemdMode::Off;
        assert!(!host.manages_units_if_booted(true));
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = NodeConfig::from_file(Path::new("/nonexistent/keel.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/keel.toml"));
    }
}
