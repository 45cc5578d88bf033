//! The answer file: everything the installer needs to know, in TOML.
//!
//! ```toml
//! [disk]                       # filters: exactly one disk must match all of them
//! min_size = "100GB"           # "GB"/"TB" are decimal (vendor sizes), "G"/"GiB" binary
//! model = "Samsung SSD*"       # glob (* and ?), case-insensitive
//! bus = "nvme"                 # virtio, sata, scsi, nvme, usb, ide, mmc
//! wipe = true                  # required when the disk already has partitions
//!
//! [system]
//! hostname = "node1"
//! root_password_hash = "$6$..."   # from `openssl passwd -6`; never printed
//! ssh_authorized_keys = ["ssh-ed25519 AAAA... admin@site"]
//!
//! [network]                    # the management network
//! mode = "static"              # or "dhcp"
//! address = "192.168.10.11/24"
//! gateway = "192.168.10.1"
//! dns = ["192.168.10.1"]
//!
//! [cluster]
//! mode = "init"                # or "join" with token = "keel-join-v1...."
//! name = "site-a"
//! ```
//!
//! [`Answer::from_file`] reads and validates the whole file and reports every problem at
//! once ([`AnswerError::Invalid`]); nothing on a disk is touched before that. The interactive
//! dialog produces the same [`Answer`] structure. Secrets (the root password hash and the
//! join token) are [`Secret`]s: their `Debug` and `Display` never show the value.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The validated answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub disk: DiskSpec,
    pub system: SystemSpec,
    pub network: NetworkSpec,
    pub cluster: ClusterSpec,
    #[serde(default)]
    pub install: InstallSpec,
}

/// Which disk to install on (filters) and how to lay it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_size: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<Bus>,
    /// Removable disks (USB sticks) are skipped unless this is true.
    #[serde(default)]
    pub allow_removable: bool,
    /// Must be true to install over a disk that already has partitions.
    #[serde(default)]
    pub wipe: bool,
    /// Size of each of the two root partitions (A and B).
    #[serde(default = "default_root_size")]
    pub root_size: ByteSize,
}

impl Default for DiskSpec {
    fn default() -> Self {
        Self {
            path: None,
            min_size: None,
            max_size: None,
            model: None,
            serial: None,
            bus: None,
            allow_removable: false,
            wipe: false,
            root_size: default_root_size(),
        }
    }
}

fn default_root_size() -> ByteSize {
    ByteSize(DEFAULT_ROOT_SIZE)
}

/// Default size of each root partition.
pub const DEFAULT_ROOT_SIZE: u64 = 4 << 30;
/// Smallest root partition the image fits in.
pub const MIN_ROOT_SIZE: u64 = 2 << 30;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemSpec {
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_password_hash: Option<Secret>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
}

/// The management network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// An interface name (`enp1s0`) or MAC address; `None`: the first network card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(flatten)]
    pub config: IpConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum IpConfig {
    Dhcp,
    Static {
        address: IpAddr,
        prefix: u8,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gateway: Option<IpAddr>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        dns: Vec<IpAddr>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum ClusterSpec {
    /// Create a new cluster with this name.
    Init { name: String },
    /// Join an existing cluster with a token from `keel cluster token create`.
    Join { token: Secret },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AfterInstall {
    #[default]
    Reboot,
    Poweroff,
    /// Stay in the live system.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct InstallSpec {
    #[serde(default)]
    pub after: AfterInstall,
}

/// A value that is never printed: `Debug` and `Display` show `<redacted>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself; call only where it is written to its destination.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Disk bus, as seen in sysfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    Virtio,
    Sata,
    Scsi,
    Nvme,
    Usb,
    Ide,
    Mmc,
    Unknown,
}

impl Bus {
    pub const CHOICES: &'static str = "virtio, sata, scsi, nvme, usb, ide, mmc";
    pub fn name(self) -> &'static str {
        match self {
            Bus::Virtio => "virtio",
            Bus::Sata => "sata",
            Bus::Scsi => "scsi",
            Bus::Nvme => "nvme",
            Bus::Usb => "usb",
            Bus::Ide => "ide",
            Bus::Mmc => "mmc",
            Bus::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A size in bytes. Parsed from an integer (bytes) or a string such as `"8G"`, `"8GiB"`
/// (binary) or `"500GB"` (decimal, as disk vendors count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => {
                return Err(ValueError::SizeUnit {
                    text: s.to_string(),
                    unit: unit.to_string(),
                })
            }
        };
        let value: f64 = num
            .parse()
            .map_err(|_| ValueError::NotASize(s.to_string()))?;
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(ValueError::SizeRange(s.to_string()));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        // exact binary units first, then exact decimal ones (as written in "500GB")
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB")] {
            if b >= 1 << shift && b.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        for (mult, unit) in [(1_000_000_000_000u64, "TB"), (1_000_000_000, "GB")] {
            if b >= mult && b.is_multiple_of(mult) {
                return write!(f, "{}{unit}", b / mult);
            }
        }
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if b >= 1 << shift {
                if b.is_multiple_of(1 << shift) {
                    return write!(f, "{}{unit}", b >> shift);
                }
                return write!(f, "{:.1}{unit}", b as f64 / (1u64 << shift) as f64);
            }
        }
        write!(f, "{b}B")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // exact units round-trip; anything else as plain bytes
        let text = self.to_string();
        if text.contains('.') {
            s.serialize_u64(self.0)
        } else {
            s.serialize_str(&text)
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// One problem in an answer file, located by its dotted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self {
            key: key.into(),
            message: message.to_string(),
        }
    }
}

/// Why a value is not acceptable for its setting. The text is what the operator reads
/// beside the setting's name; secrets (password hashes, join tokens) never appear in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("'' is not a host name: give one such as \"node1\"")]
    EmptyHostname,
    #[error("'{0}' is longer than 253 characters")]
    HostnameTooLong(String),
    #[error("'{0}': each dot-separated part must have 1 to 63 characters")]
    HostnameLabelLength(String),
    #[error("'{0}': use only lower-case letters, digits and '-' (for example \"node1\")")]
    HostnameCharacters(String),
    #[error("'{0}': a part may not start or end with '-'")]
    HostnameHyphen(String),
    #[error("is not a password hash (the value is not shown): give a crypt(3) hash such as the output of `openssl passwd -6`, never the password itself")]
    NotAPasswordHash,
    #[error("is not an SSH public key line (expected \"ssh-ed25519 AAAA... comment\")")]
    NotAnSshKey,
    #[error("key type '{kind}' is not supported (use one of {supported})")]
    SshKeyType { kind: String, supported: String },
    #[error("the {kind} key data is not valid base64 (was the line cut or wrapped?)")]
    SshKeyData { kind: String },
    #[error("'{0}' is neither an interface name (up to 15 characters, such as \"enp1s0\") nor a MAC address (\"52:54:00:12:34:56\")")]
    Interface(String),
    #[error("is not a Keel join token (the value is not shown): it must start with \"{JOIN_TOKEN_PREFIX}\"; copy the whole line printed by `keel cluster token create`")]
    NotAJoinToken,
    #[error("the join token is damaged (the value is not shown): was it cut or wrapped?")]
    DamagedJoinToken,
    #[error("'{text}' has an unknown unit '{unit}' (use B, K/KiB, M/MiB, G/GiB, T/TiB or decimal KB, MB, GB, TB)")]
    SizeUnit { text: String, unit: String },
    #[error("'{0}' is not a size (examples: \"500GB\", \"8GiB\", 1073741824)")]
    NotASize(String),
    #[error("'{0}' is out of range")]
    SizeRange(String),
    #[error("'{0}' is not an IP address (example: \"192.168.1.10/24\")")]
    NotAnAddress(String),
    #[error("'{text}': '{prefix}' is not a prefix length")]
    NotAPrefix { text: String, prefix: String },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Formats problems one a line, for error messages.
pub fn format_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("cannot read the answer file {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the answer file {origin} is not valid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("the answer file {origin} has {} problem(s); nothing was changed on any disk:\n{}\nFix them and check again with `keel-installer check FILE`.", problems.len(), format_problems(problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

impl Answer {
    /// Reads and validates an answer file.
    pub fn from_file(path: &Path) -> Result<Self, AnswerError> {
        let text = std::fs::read_to_string(path).map_err(|source| AnswerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates answer-file text; `origin` names it in errors.
    pub fn parse(origin: &str, text: &str) -> Result<Self, AnswerError> {
        Self::parse_with(origin, text, &|_| Vec::new())
    }

    /// Like [`Answer::parse`], plus the checks of `extra` against this machine (disk
    /// selection, network card), which run on whatever parts of the file are readable so
    /// that one run reports every problem.
    pub fn parse_with(
        origin: &str,
        text: &str,
        extra: &dyn Fn(&Partial) -> Vec<Problem>,
    ) -> Result<Self, AnswerError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| AnswerError::Syntax {
            origin: origin.to_string(),
            message: e.to_string().trim_end().replace('\n', "\n    "),
        })?;
        let mut problems = Vec::new();
        let partial = read_answer(&table, &mut problems);
        // machine checks only make sense on a section that read cleanly
        let disk_ok = !problems.iter().any(|p| p.key.starts_with("disk"));
        let net_ok = !problems.iter().any(|p| p.key.starts_with("network"));
        let checked = Partial {
            disk: partial.disk.clone().filter(|_| disk_ok),
            network: partial.network.clone().filter(|_| net_ok),
            ..Partial::default()
        };
        problems.extend(extra(&checked));
        match partial.complete() {
            Some(a) if problems.is_empty() => Ok(a),
            _ => Err(AnswerError::Invalid {
                origin: origin.to_string(),
                problems,
            }),
        }
    }

    /// The answer as TOML with the secrets left out (kept on the installed node for reference).
    pub fn to_redacted_toml(&self) -> String {
        let mut copy = self.clone();
        copy.system.root_password_hash = None;
        if let ClusterSpec::Join { token } = &mut copy.cluster {
            *token = Secret::new("<redacted>");
        }
        toml::to_string(&copy).unwrap_or_default()
    }

    /// The answer as TOML, secrets included (what the dialog could save for reuse).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks the cross-field rules of an answer built in code (the dialog).
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        check_disk(&self.disk, &mut problems);
        check_system(&self.system, &mut problems);
        check_network(&self.network, &mut problems);
        check_cluster_spec(&self.cluster, &mut problems);
        problems
    }
}

// ---------------------------------------------------------------- the tolerant reader

/// Reads the keys of one table, records type errors, missing and unknown keys as problems.
struct Fields<'a> {
    prefix: String,
    table: Option<&'a toml::Table>,
    used: BTreeSet<&'static str>,
}

impl<'a> Fields<'a> {
    fn new(prefix: &str, table: Option<&'a toml::Table>) -> Self {
        Self {
            prefix: prefix.to_string(),
            table,
            used: BTreeSet::new(),
        }
    }

    fn key(&self, k: &str) -> String {
        if self.prefix.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.prefix)
        }
    }

    fn has(&self, k: &str) -> bool {
        self.table.is_some_and(|t| t.contains_key(k))
    }

    fn opt<T: DeserializeOwned>(
        &mut self,
        k: &'static str,
        what: &str,
        problems: &mut Vec<Problem>,
    ) -> Option<T> {
        self.used.insert(k);
        let v = self.table?.get(k)?;
        match T::deserialize(v.clone()) {
            Ok(x) => Some(x),
            Err(e) => {
                let detail = e.message().trim().to_string();
                let shown = if k.contains("password") || k == "token" {
                    "the value (not shown)".to_string()
                } else {
                    format!("{v}")
                };
                problems.push(Problem::new(
                    self.key(k),
                    format!("{shown} is not {what} ({detail})"),
                ));
                None
            }
        }
    }

    fn req<T: DeserializeOwned>(
        &mut self,
        k: &'static str,
        what: &str,
        problems: &mut Vec<Problem>,
    ) -> Option<T> {
        if !self.has(k) {
            self.used.insert(k);
            problems.push(Problem::new(
                self.key(k),
                format!("missing: set it to {what}"),
            ));
            return None;
        }
        self.opt(k, what, problems)
    }

    fn finish(self, problems: &mut Vec<Problem>) {
        let Some(t) = self.table else { return };
        for k in t.keys() {
            if !self.used.contains(k.as_str()) {
                let hint = closest(k, self.used.iter().copied())
                    .map(|c| format!(" (did you mean `{c}`?)"))
                    .unwrap_or_default();
                let known = self.used.iter().copied().collect::<Vec<_>>().join(", ");
                problems.push(Problem::new(
                    self.key(k),
                    format!("unknown key{hint}; known keys here: {known}"),
                ));
            }
        }
    }
}

/// The candidate nearest to `word` by edit distance, if it is close.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min()
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn section<'a>(
    root: &'a toml::Table,
    name: &'static str,
    required: bool,
    problems: &mut Vec<Problem>,
) -> Option<&'a toml::Table> {
    match root.get(name) {
        Some(toml::Value::Table(t)) => Some(t),
        Some(other) => {
            problems.push(Problem::new(
                name,
                format!("must be a table `[{name}]`, not a {}", other.type_str()),
            ));
            None
        }
        None if required => {
            problems.push(Problem::new(
                name,
                format!("missing: the answer file needs a `[{name}]` section"),
            ));
            None
        }
        None => None,
    }
}

const SECTIONS: [&str; 5] = ["disk", "system", "network", "cluster", "install"];

/// The sections of an answer file that could be read.
#[derive(Debug, Clone, Default)]
pub struct Partial {
    pub disk: Option<DiskSpec>,
    pub system: Option<SystemSpec>,
    pub network: Option<NetworkSpec>,
    pub cluster: Option<ClusterSpec>,
    pub install: Option<InstallSpec>,
}

impl Partial {
    fn complete(self) -> Option<Answer> {
        Some(Answer {
            disk: self.disk?,
            system: self.system?,
            network: self.network?,
            cluster: self.cluster?,
            install: self.install?,
        })
    }
}

fn read_answer(root: &toml::Table, problems: &mut Vec<Problem>) -> Partial {
    for k in root.keys() {
        if !SECTIONS.contains(&k.as_str()) {
            let hint = closest(k, SECTIONS.iter().copied())
                .map(|c| format!(" (did you mean `[{c}]`?)"))
                .unwrap_or_default();
            problems.push(Problem::new(
                k.as_str(),
                format!(
                    "unknown section{hint}; the sections are [disk], [system], [network], [cluster] and [install]"
                ),
            ));
        }
    }
    Partial {
        disk: read_disk(section(root, "disk", false, problems), problems),
        system: read_system(section(root, "system", true, problems), problems),
        network: read_network(section(root, "network", true, problems), problems),
        cluster: read_cluster(section(root, "cluster", true, problems), problems),
        install: read_install(section(root, "install", false, problems), problems),
    }
}

fn read_disk(t: Option<&toml::Table>, problems: &mut Vec<Problem>) -> Option<DiskSpec> {
    let mut f = Fields::new("disk", t);
    let spec = DiskSpec {
        path: f.opt("path", "a device path such as \"/dev/sda\"", problems),
        min_size: f.opt("min_size", "a size", problems),
        max_size: f.opt("max_size", "a size", problems),
        model: f.opt("model", "a model name or glob", problems),
        serial: f.opt("serial", "a serial number or glob", problems),
        bus: f.opt("bus", &format!("a bus ({})", Bus::CHOICES), problems),
        allow_removable: f
            .opt("allow_removable", "true or false", problems)
            .unwrap_or(false),
        wipe: f.opt("wipe", "true or false", problems).unwrap_or(false),
        root_size: f
            .opt("root_size", "a size", problems)
            .unwrap_or(default_root_size()),
    };
    f.finish(problems);
    check_disk(&spec, problems);
    Some(spec)
}

fn check_disk(d: &DiskSpec, problems: &mut Vec<Problem>) {
    if let (Some(min), Some(max)) = (d.min_size, d.max_size) {
        if min > max {
            problems.push(Problem::new(
                "disk.min_size",
                format!("{min} is larger than disk.max_size {max}: no disk can match"),
            ));
        }
    }
    if let Some(p) = &d.path {
        if !p.starts_with("/dev/") {
            problems.push(Problem::new(
                "disk.path",
                format!("'{p}' is not a device path (it must start with /dev/)"),
            ));
        }
    }
    for (key, v) in [("disk.model", &d.model), ("disk.serial", &d.serial)] {
        if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
            problems.push(Problem::new(key, "is empty: remove it or give a value"));
        }
    }
    if d.root_size.0 < MIN_ROOT_SIZE {
        problems.push(Problem::new(
            "disk.root_size",
            format!(
                "{} is too small: each root partition needs at least {}",
                d.root_size,
                ByteSize(MIN_ROOT_SIZE)
            ),
        ));
    }
}

fn read_system(t: Option<&toml::Table>, problems: &mut Vec<Problem>) -> Option<SystemSpec> {
    let t = t?;
    let mut f = Fields::new("system", Some(t));
    let hostname: Option<String> = f.req("hostname", "a host name such as \"node1\"", problems);
    let root_password_hash: Option<Secret> = f.opt(
        "root_password_hash",
        "a password hash from `openssl passwd -6`",
        problems,
    );
    let ssh_authorized_keys: Option<Vec<String>> =
        f.opt("ssh_authorized_keys", "a list of SSH public keys", problems);
    f.finish(problems);
    let spec = SystemSpec {
        hostname: hostname.clone().unwrap_or_default(),
        root_password_hash,
        ssh_authorized_keys: ssh_authorized_keys.unwrap_or_default(),
    };
    let mut more = Vec::new();
    check_system(&spec, &mut more);
    if hostname.is_none() {
        // missing or mistyped: reported by the reader already
        more.retain(|p| p.key != "system.hostname");
    }
    problems.extend(more);
    Some(spec)
}

fn check_system(s: &SystemSpec, problems: &mut Vec<Problem>) {
    if let Err(e) = check_hostname(&s.hostname) {
        problems.push(Problem::new("system.hostname", e));
    }
    if let Some(hash) = &s.root_password_hash {
        if let Err(e) = check_password_hash(hash.expose()) {
            problems.push(Problem::new("system.root_password_hash", e));
        }
    }
    for (i, key) in s.ssh_authorized_keys.iter().enumerate() {
        if let Err(e) = check_ssh_key(key) {
            problems.push(Problem::new(format!("system.ssh_authorized_keys[{i}]"), e));
        }
    }
    if s.root_password_hash.is_none() && s.ssh_authorized_keys.is_empty() {
        problems.push(Problem::new(
            "system",
            "no way to log in: set root_password_hash, ssh_authorized_keys, or both",
        ));
    }
}

/// Checks a host name (RFC 1123: dot-separated labels of `a-z 0-9 -`).
pub fn check_hostname(h: &str) -> Result<(), ValueError> {
    if h.is_empty() {
        return Err(ValueError::EmptyHostname);
    }
    if h.len() > 253 {
        return Err(ValueError::HostnameTooLong(h.to_string()));
    }
    for label in h.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(ValueError::HostnameLabelLength(h.to_string()));
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(ValueError::HostnameCharacters(h.to_string()));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(ValueError::HostnameHyphen(h.to_string()));
        }
    }
    Ok(())
}

/// Checks that a value is a crypt(3) hash; the value itself never appears in the error.
pub fn check_password_hash(h: &str) -> Result<(), ValueError> {
    const SCHEMES: [&str; 5] = ["$6$", "$5$", "$y$", "$2b$", "$gy$"];
    let fields = h.split('$').count();
    if !SCHEMES.iter().any(|s| h.starts_with(s)) || fields < 4 || h.contains(char::is_whitespace) {
        return Err(ValueError::NotAPasswordHash);
    }
    Ok(())
}

/// Checks one `authorized_keys` line: key type, base64 blob, optional comment.
pub fn check_ssh_key(line: &str) -> Result<(), ValueError> {
    use base64::Engine;
    const TYPES: [&str; 7] = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    let mut parts = line.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return Err(ValueError::NotAnSshKey);
    };
    if !TYPES.contains(&kind) {
        return Err(ValueError::SshKeyType {
            kind: kind.to_string(),
            supported: TYPES.join(", "),
        });
    }
    match base64::engine::general_purpose::STANDARD.decode(blob) {
        Ok(raw) if raw.len() > 4 => Ok(()),
        _ => Err(ValueError::SshKeyData {
            kind: kind.to_string(),
        }),
    }
}

fn read_network(t: Option<&toml::Table>, problems: &mut Vec<Problem>) -> Option<NetworkSpec> {
    let t = t?;
    let mut f = Fields::new("network", Some(t));
    let interface: Option<String> =
        f.opt("interface", "an interface name or MAC address", problems);
    let mode: Option<String> = f.req("mode", "\"dhcp\" or \"static\"", problems);
    let address: Option<String> = f.opt(
        "address",
        "an address such as \"192.168.1.10/24\"",
        problems,
    );
    let prefix: Option<u8> = f.opt("prefix", "a prefix length such as 24", problems);
    let gateway: Option<String> = f.opt("gateway", "an IP address", problems);
    let dns: Option<Vec<String>> = f.opt("dns", "a list of IP addresses", problems);
    f.finish(problems);

    if let Some(i) = &interface {
        if let Err(e) = check_interface(i) {
            problems.push(Problem::new("network.interface", e));
        }
    }
    let config = match mode.as_deref() {
        Some("dhcp") => {
            for (k, present) in [
                ("address", address.is_some() || t.contains_key("address")),
                ("prefix", prefix.is_some() || t.contains_key("prefix")),
                ("gateway", gateway.is_some() || t.contains_key("gateway")),
                ("dns", dns.is_some() || t.contains_key("dns")),
            ] {
                if present {
                    problems.push(Problem::new(
                        format!("network.{k}"),
                        "is only used with mode = \"static\": remove it or set mode = \"static\"",
                    ));
                }
            }
            Some(IpConfig::Dhcp)
        }
        Some("static") => read_static(address, prefix, gateway, dns, t, problems),
        Some(other) => {
            problems.push(Problem::new(
                "network.mode",
                format!("'{other}' is not a mode: use \"dhcp\" or \"static\""),
            ));
            None
        }
        None => None,
    };
    let spec = NetworkSpec {
        interface,
        config: config?,
    };
    Some(spec)
}

fn read_static(
    address: Option<String>,
    prefix: Option<u8>,
    gateway: Option<String>,
    dns: Option<Vec<String>>,
    t: &toml::Table,
    problems: &mut Vec<Problem>,
) -> Option<IpConfig> {
    let n = problems.len();
    let mut addr = None;
    let mut pfx = prefix;
    match &address {
        None if !t.contains_key("address") => problems.push(Problem::new(
            "network.address",
            "missing: mode = \"static\" needs an address such as \"192.168.1.10/24\"",
        )),
        None => {}
        Some(a) => match parse_cidr(a) {
            Ok((ip, p)) => {
                addr = Some(ip);
                match (p, prefix) {
                    (Some(p1), Some(p2)) if p1 != p2 => problems.push(Problem::new(
                        "network.prefix",
                        format!("{p2} contradicts the /{p1} in network.address: give it once"),
                    )),
                    (Some(p1), _) => pfx = Some(p1),
                    _ => {}
                }
            }
            Err(e) => problems.push(Problem::new("network.address", e)),
        },
    }
    if addr.is_some() && pfx.is_none() && !t.contains_key("prefix") {
        problems.push(Problem::new(
            "network.prefix",
            "missing: give the prefix length, as \"address/24\" or prefix = 24",
        ));
    }
    let gw = match gateway {
        Some(g) => match g.trim().parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                problems.push(Problem::new(
                    "network.gateway",
                    format!("'{g}' is not an IP address"),
                ));
                None
            }
        },
        None => None,
    };
    let mut servers = Vec::new();
    for (i, s) in dns.unwrap_or_default().iter().enumerate() {
        match s.trim().parse::<IpAddr>() {
            Ok(ip) => servers.push(ip),
            Err(_) => problems.push(Problem::new(
                format!("network.dns[{i}]"),
                format!("'{s}' is not an IP address"),
            )),
        }
    }
    let (address, prefix) = (addr?, pfx?);
    let cfg = IpConfig::Static {
        address,
        prefix,
        gateway: gw,
        dns: servers,
    };
    check_ip_config(&cfg, problems);
    if problems.len() > n {
        return None;
    }
    Some(cfg)
}

/// Parses `a.b.c.d/p` (or an address without a prefix).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, Option<u8>), ValueError> {
    let (a, p) = match s.trim().split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s.trim(), None),
    };
    let ip: IpAddr = a
        .parse()
        .map_err(|_| ValueError::NotAnAddress(s.to_string()))?;
    let prefix = match p {
        None => None,
        Some(p) => Some(p.parse::<u8>().map_err(|_| ValueError::NotAPrefix {
            text: s.to_string(),
            prefix: p.to_string(),
        })?),
    };
    Ok((ip, prefix))
}

/// Checks a management network built in code (the dialog).
pub fn check_network(n: &NetworkSpec, problems: &mut Vec<Problem>) {
    if let Some(i) = &n.interface {
        if let Err(e) = check_interface(i) {
            problems.push(Problem::new("network.interface", e));
        }
    }
    check_ip_config(&n.config, problems);
}

fn check_ip_config(cfg: &IpConfig, problems: &mut Vec<Problem>) {
    let IpConfig::Static {
        address,
        prefix,
        gateway,
        dns,
    } = cfg
    else {
        return;
    };
    let max = if address.is_ipv4() { 32 } else { 128 };
    if *prefix == 0 || *prefix > max {
        problems.push(Problem::new(
            "network.prefix",
            format!("/{prefix} is not a usable prefix length for {address} (1 to {max})"),
        ));
        return;
    }
    if address.is_unspecified() || address.is_loopback() || address.is_multicast() {
        problems.push(Problem::new(
            "network.address",
            format!("{address} cannot be a host address"),
        ));
    }
    if let IpAddr::V4(a) = address {
        if *prefix <= 30 {
            let bits = u32::from(*a);
            let mask = u32::MAX << (32 - prefix);
            if bits & !mask == 0 {
                problems.push(Problem::new(
                    "network.address",
                    format!("{address}/{prefix} is the network address of its subnet, not a host address"),
                ));
            } else if bits & !mask == !mask {
                problems.push(Problem::new(
                    "network.address",
                    format!("{address}/{prefix} is the broadcast address of its subnet, not a host address"),
                ));
            }
        }
    }
    if let Some(gw) = gateway {
        if gw.is_ipv4() != address.is_ipv4() {
            problems.push(Problem::new(
                "network.gateway",
                format!("{gw} is not of the same IP version as the address {address}"),
            ));
        } else if !same_subnet(address, gw, *prefix) {
            problems.push(Problem::new(
                "network.gateway",
                format!("{gw} is not in the subnet {address}/{prefix}: the gateway must be reachable directly"),
            ));
        } else if gw == address {
            problems.push(Problem::new(
                "network.gateway",
                format!("{gw} is the node's own address"),
            ));
        }
    }
    for (i, d) in dns.iter().enumerate() {
        if d.is_unspecified() || d.is_multicast() {
            problems.push(Problem::new(
                format!("network.dns[{i}]"),
                format!("{d} cannot be a DNS server"),
            ));
        }
    }
}

fn same_subnet(a: &IpAddr, b: &IpAddr, prefix: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(*a) & mask == u32::from(*b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(*a) & mask == u128::from(*b) & mask
        }
        _ => false,
    }
}

/// Checks an interface name or MAC address.
pub fn check_interface(i: &str) -> Result<(), ValueError> {
    if is_mac(i) {
        return Ok(());
    }
    if i.is_empty()
        || i.len() > 15
        || i.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(ValueError::Interface(i.to_string()));
    }
    Ok(())
}

/// True for a MAC address written as six `:`-separated hex pairs.
pub fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn read_cluster(t: Option<&toml::Table>, problems: &mut Vec<Problem>) -> Option<ClusterSpec> {
    let t = t?;
    let mut f = Fields::new("cluster", Some(t));
    let mode: Option<String> = f.req("mode", "\"init\" or \"join\"", problems);
    let name: Option<String> = f.opt("name", "a cluster name", problems);
    let token: Option<Secret> = f.opt("token", "a join token", problems);
    f.finish(problems);
    let spec = match mode.as_deref() {
        Some("init") => {
            if t.contains_key("token") {
                problems.push(Problem::new(
                    "cluster.token",
                    "is only used with mode = \"join\": remove it, or set mode = \"join\"",
                ));
            }
            match name {
                Some(name) => ClusterSpec::Init { name },
                None => {
                    if !t.contains_key("name") {
                        problems.push(Problem::new(
                            "cluster.name",
                            "missing: mode = \"init\" creates a cluster and needs its name",
                        ));
                    }
                    return None;
                }
            }
        }
        Some("join") => {
            if t.contains_key("name") {
                problems.push(Problem::new(
                    "cluster.name",
                    "is only used with mode = \"init\" (a joining node takes the cluster's name): remove it",
                ));
            }
            match token {
                Some(token) => ClusterSpec::Join { token },
                None => {
                    if !t.contains_key("token") {
                        problems.push(Problem::new(
                            "cluster.token",
                            "missing: mode = \"join\" needs the token printed by `keel cluster token create` on a member",
                        ));
                    }
                    return None;
                }
            }
        }
        Some(other) => {
            problems.push(Problem::new(
                "cluster.mode",
                format!("'{other}' is not a mode: use \"init\" (new cluster) or \"join\""),
            ));
            return None;
        }
        None => return None,
    };
    check_cluster_spec(&spec, problems);
    Some(spec)
}

pub fn check_cluster_spec(c: &ClusterSpec, problems: &mut Vec<Problem>) {
    match c {
        ClusterSpec::Init { name } => {
            let ok = !name.is_empty()
                && name.len() <= 63
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !name.starts_with('-')
                && !name.ends_with('-');
            if !ok {
                problems.push(Problem::new(
                    "cluster.name",
                    format!("'{name}' is not a cluster name: 1 to 63 lower-case letters, digits and '-'"),
                ));
            }
        }
        ClusterSpec::Join { token } => {
            if let Err(e) = check_join_token(token.expose()) {
                problems.push(Problem::new("cluster.token", e));
            }
        }
    }
}

/// Prefix of a Keel join token (see keel-cluster's `token` module).
pub const JOIN_TOKEN_PREFIX: &str = "keel-join-v1.";

/// Checks the shape of a join token (prefix, base64url JSON) without printing it.
pub fn check_join_token(t: &str) -> Result<(), ValueError> {
    use base64::Engine;
    let Some(rest) = t.trim().strip_prefix(JOIN_TOKEN_PREFIX) else {
        return Err(ValueError::NotAJoinToken);
    };
    let ok = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(rest)
        .ok()
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .is_some_and(|v| v.is_object());
    if !ok {
        return Err(ValueError::DamagedJoinToken);
    }
    Ok(())
}

fn read_install(t: Option<&toml::Table>, problems: &mut Vec<Problem>) -> Option<InstallSpec> {
    let mut f = Fields::new("install", t);
    let after = f
        .opt("after", "\"reboot\", \"poweroff\" or \"none\"", problems)
        .unwrap_or_default();
    f.finish(problems);
    Some(InstallSpec { after })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[disk]
min_size = "10G"
max_size = "2TB"
bus = "virtio"
serial = "KEEL*"
[system]
hostname = "node1"
root_password_hash = "$6$saltsalt$0123456789abcdef"
ssh_authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ3m3c0V2cmdTOw0Tz3IYQfOYeMRhKXnU3MDyNkd4bk9 a@b"]
[network]
mode = "static"
address = "10.1.2.3"
prefix = 16
gateway = "10.1.0.1"
dns = ["10.1.0.1", "fd00::53"]
[cluster]
mode = "join"
token = "keel-join-v1.eyJpZCI6IjEifQ"
[install]
after = "poweroff"
"#;

    fn problems(text: &str) -> Vec<Problem> {
        match Answer::parse("t.toml", text) {
            Err(AnswerError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    fn keys(text: &str) -> Vec<String> {
        match Answer::parse("t.toml", text) {
            Ok(_) => Vec::new(),
            Err(_) => problems(text).into_iter().map(|p| p.key).collect(),
        }
    }

    #[test]
    fn a_complete_file_parses() {
        let a = Answer::parse("t", GOOD).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.disk.min_size, Some(ByteSize(10 << 30)));
        assert_eq!(a.disk.max_size, Some(ByteSize(2_000_000_000_000)));
        assert_eq!(a.disk.bus, Some(Bus::Virtio));
        assert_eq!(a.disk.root_size, ByteSize(DEFAULT_ROOT_SIZE));
        assert_eq!(a.system.hostname, "node1");
        match &a.network.config {
            IpConfig::Static {
                address,
                prefix,
                gateway,
                dns,
            } => {
                assert_eq!(address.to_string(), "10.1.2.3");
                assert_eq!(*prefix, 16);
                assert_eq!(gateway.map(|g| g.to_string()).as_deref(), Some("10.1.0.1"));
                assert_eq!(dns.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(a.cluster, ClusterSpec::Join { .. }));
        assert_eq!(a.install.after, AfterInstall::Poweroff);
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/answer.toml");
        let a = Answer::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            a.cluster,
            ClusterSpec::Init {
                name: "site-a".into()
            }
        );
    }

    #[test]
    fn a_minimal_dhcp_file_takes_defaults() {
        let a = Answer::parse(
            "t",
            "[system]\nhostname = \"n\"\nssh_authorized_keys = [\"ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ== x\"]\n[network]\nmode = \"dhcp\"\n[cluster]\nmode = \"init\"\nname = \"c\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.disk, DiskSpec::default());
        assert_eq!(a.network.config, IpConfig::Dhcp);
        assert_eq!(a.install.after, AfterInstall::Reboot);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
[disk]
min_size = "2TB"
max_size = "1TB"
bus = "firewire"
serail = "X1"
[system]
hostname = "Node_1"
root_password_hash = "hunter2"
ssh_authorized_keys = ["ssh-dss AAAA x", "ssh-ed25519 !!!"]
[network]
mode = "static"
address = "10.0.0.5/24"
gateway = "10.9.0.1"
dns = ["1.2.3.400"]
[cluster]
mode = "init"
token = "keel-join-v1.xyz"
[extra]
"#;
        let p = problems(text);
        let k: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "extra",
            "disk.bus",
            "disk.serail",
            "disk.min_size",
            "system.hostname",
            "system.root_password_hash",
            "system.ssh_authorized_keys[0]",
            "system.ssh_authorized_keys[1]",
            "network.gateway",
            "network.dns[0]",
            "cluster.token",
            "cluster.name",
        ] {
            assert!(k.contains(&want), "{want} not reported; got {k:?}");
        }
        let all = AnswerError::Invalid {
            origin: "t.toml".into(),
            problems: p.clone(),
        }
        .to_string();
        assert!(
            all.contains(&format!("has {} problem(s); nothing was changed", p.len())),
            "{all}"
        );
        assert!(all.contains("did you mean `serial`?"), "{all}");
        assert!(
            all.contains("10.9.0.1 is not in the subnet 10.0.0.5/24"),
            "{all}"
        );
        assert!(all.contains("\"firewire\" is not a bus"), "{all}");
        // secrets never appear, even when they are wrong
        assert!(!all.contains("hunter2"), "{all}");
        assert!(!all.contains("keel-join-v1.xyz"), "{all}");
    }

    #[test]
    fn missing_sections_and_keys() {
        let k = keys("");
        assert_eq!(k, ["system", "network", "cluster"]);
        let k = keys("[system]\n[network]\n[cluster]\n");
        assert_eq!(
            k,
            ["system.hostname", "system", "network.mode", "cluster.mode"]
        );
        let k = keys("system = 3\n[network]\nmode = \"dhcp\"\n[cluster]\nmode = \"join\"\n");
        assert_eq!(k, ["system", "cluster.token"]);
    }

    #[test]
    fn syntax_errors_say_where() {
        let e = Answer::parse("a.toml", "[system\nhostname = 1").unwrap_err();
        assert!(matches!(e, AnswerError::Syntax { .. }));
        let text = e.to_string();
        assert!(
            text.starts_with("the answer file a.toml is not valid TOML"),
            "{text}"
        );
        assert!(text.contains("line 1"), "{text}");
    }

    #[test]
    fn network_rules() {
        let base = |net: &str| {
            format!("[system]\nhostname = \"n\"\nroot_password_hash = \"$6$a$b\"\n[network]\n{net}\n[cluster]\nmode = \"init\"\nname = \"c\"\n")
        };
        let k = |net: &str| keys(&base(net));
        assert_eq!(
            k("mode = \"dhcp\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\""),
            ["network.address", "network.gateway"]
        );
        assert_eq!(k("mode = \"static\""), ["network.address"]);
        assert_eq!(
            k("mode = \"static\"\naddress = \"10.0.0.2\""),
            ["network.prefix"]
        );
        assert_eq!(
            k("mode = \"static\"\naddress = \"10.0.0.2/24\"\nprefix = 16"),
            ["network.prefix"]
        );
        assert_eq!(
            k("mode = \"static\"\naddress = \"10.0.0.0/24\""),
            ["network.address"]
        );
        assert_eq!(
            k("mode = \"static\"\naddress = \"10.0.0.255/24\""),
            ["network.address"]
        );
        assert_eq!(
            k("mode = \"static\"\naddress = \"10.0.0.2/33\""),
            ["network.prefix"]
        );
        assert_eq!(
            k("mode = \"static\"\naddress = \"10.0.0.2/24\"\ngateway = \"fd00::1\""),
            ["network.gateway"]
        );
        assert_eq!(
            k("mode = \"static\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.2\""),
            ["network.gateway"]
        );
        assert_eq!(k("mode = \"bridge\""), ["network.mode"]);
        assert_eq!(
            k("mode = \"dhcp\"\ninterface = \"a/b\""),
            ["network.interface"]
        );
        assert!(k("mode = \"static\"\naddress = \"fd00::10/64\"\ngateway = \"fd00::1\"\ninterface = \"52:54:00:AA:bb:01\"").is_empty());
        assert!(k("mode = \"static\"\naddress = \"192.168.1.1/31\"").is_empty());
    }

    #[test]
    fn cluster_rules() {
        let base = |c: &str| {
            format!("[system]\nhostname = \"n\"\nroot_password_hash = \"$6$a$b\"\n[network]\nmode = \"dhcp\"\n[cluster]\n{c}\n")
        };
        let k = |c: &str| keys(&base(c));
        assert_eq!(k("mode = \"init\""), ["cluster.name"]);
        assert_eq!(k("mode = \"init\"\nname = \"Site A\""), ["cluster.name"]);
        assert_eq!(
            k("mode = \"join\"\nname = \"a\"\ntoken = \"keel-join-v1.eyJpZCI6IjEifQ\""),
            ["cluster.name"]
        );
        assert_eq!(k("mode = \"join\"\ntoken = \"abc\""), ["cluster.token"]);
        assert_eq!(
            k("mode = \"join\"\ntoken = \"keel-join-v1.@@@\""),
            ["cluster.token"]
        );
        assert_eq!(k("mode = \"leave\""), ["cluster.mode"]);
    }

    #[test]
    fn login_is_required_and_disk_rules() {
        let k = keys("[system]\nhostname = \"n\"\n[network]\nmode = \"dhcp\"\n[cluster]\nmode = \"init\"\nname = \"c\"\n");
        assert_eq!(k, ["system"]);
        let base = "[system]\nhostname = \"n\"\nroot_password_hash = \"$6$a$b\"\n[network]\nmode = \"dhcp\"\n[cluster]\nmode = \"init\"\nname = \"c\"\n";
        let k = keys(&format!(
            "[disk]\nroot_size = \"1G\"\npath = \"sda\"\nmodel = \" \"\nwipe = \"yes\"\n{base}"
        ));
        assert_eq!(
            k,
            ["disk.wipe", "disk.path", "disk.model", "disk.root_size"]
        );
        let k = keys(&format!("[disk]\nmin_size = \"ten gigs\"\n{base}"));
        assert_eq!(k, ["disk.min_size"]);
    }

    #[test]
    fn sizes() {
        let b = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(b("8G"), Ok(8 << 30));
        assert_eq!(b("8 GiB"), Ok(8 << 30));
        assert_eq!(b("500GB"), Ok(500_000_000_000));
        assert_eq!(b("1.5T"), Ok(3 << 39));
        assert_eq!(b("4096"), Ok(4096));
        assert!(b("8X").unwrap_err().to_string().contains("unknown unit"));
        assert!(b("").is_err());
        assert_eq!(ByteSize(4 << 30).to_string(), "4GiB");
        assert_eq!(ByteSize(500_000_000_000).to_string(), "500GB");
        assert_eq!(ByteSize(500_107_862_016).to_string(), "465.8GiB");
        assert_eq!(ByteSize(512).to_string(), "512B");
    }

    #[test]
    fn toml_round_trip_and_redaction() {
        let a = Answer::parse("t", GOOD).unwrap_or_else(|e| panic!("{e}"));
        let again =
            Answer::parse("again", &a.to_toml()).unwrap_or_else(|e| panic!("{e}\n{}", a.to_toml()));
        assert_eq!(again, a);
        let red = a.to_redacted_toml();
        assert!(!red.contains("$6$") && !red.contains("eyJ"), "{red}");
        let dbg = format!("{a:?}");
        assert!(!dbg.contains("$6$") && !dbg.contains("eyJ"), "{dbg}");
    }

    #[test]
    fn helpers() {
        assert!(check_hostname("node-1.site.example").is_ok());
        assert!(check_hostname("-x").is_err());
        assert!(check_hostname(&"a".repeat(64)).is_err());
        assert!(check_password_hash("$y$j9T$abc$def").is_ok());
        assert!(check_password_hash("$6$only").is_err());
        assert_eq!(
            closest("hostnme", ["hostname", "root_password_hash"].into_iter()),
            Some("hostname")
        );
        assert_eq!(closest("zzzzzz", ["hostname"].into_iter()), None);
        assert!(is_mac("52:54:00:ab:CD:ef") && !is_mac("52:54:00:ab:cd"));
    }
}
