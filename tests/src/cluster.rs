//! `TestCluster`: n `keel serve` hosts on a [`TestNet`], driven through the `keel` CLI
//! and the HTTPS API like an operator would.
//!
//! ```text
//!  test process ── CLI: ip netns exec kn<run>-<i+1> keel --socket <dir>/node<i+1>/keel.sock …
//!       │       ── HTTPS: https://10.213.S.<i+1>:8443 (trusts only the cluster CA)
//!       │
//!  host i: netns kn<run>-<i+1>, 10.213.S.<i+1>
//!     keel serve --data-dir <dir>/node<i+1>/data --peer-addr 10.213.S.<i+1>:7400
//!                --api-addr 10.213.S.<i+1>:8443 --socket <dir>/node<i+1>/keel.sock
//!                --name node<i+1> [--witness] [--log-format text|json]
//!     logs: <dir>/node<i+1>/node<i+1>.{stderr,stdout}.log; every CLI call: <dir>/cli.log
//! ```
//!
//! `<dir>` is a fresh temp dir per cluster. When a test fails — it panics, or any harness
//! call returned an error — dropping the cluster prints the tail of every node's log and
//! keeps `<dir>` (its path is printed); `KEEL_TEST_KEEP_DIR=1` keeps it always. (libtest
//! shows that output only for failing tests.) A test that *expects* a CLI call to fail
//! uses [`TestCluster::cli_raw`], which never counts as a failure.
//!
//! The `keel` binary is `ClusterOptions::keel_bin`, else `$KEEL_BIN`, else `keel` in the
//! cargo target directory this test binary was built into (`cargo build -p keel-cli`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::netns::TestNet;
use crate::process::{ManagedProcess, ProcessSpec, StopOutcome};
use crate::wait::{abort, millis, wait_until};

/// Peer (mTLS raft) port of every host.
pub const PEER_PORT: u16 = 7400;
/// HTTPS API port of every host.
pub const API_PORT: u16 = 8443;

/// How a cluster is started.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The `keel` binary; see the module header for the default.
    pub keel_bin: Option<PathBuf>,
    /// `--log-format` of every node (`text` or `json`).
    pub log_format: String,
    /// Hosts started with `--witness`.
    pub witness: Vec<usize>,
    /// Extra environment of every node (`RUST_LOG=info`, `RUST_BACKTRACE=1` and
    /// `NO_COLOR=1` are set unless given here or in the test's own environment).
    pub env: Vec<(String, String)>,
    /// Extra arguments after `serve …`.
    pub extra_serve_args: Vec<String>,
    /// How long a started node may take to answer on its socket.
    pub ready_timeout: Duration,
    /// How long `form` may take to converge, and `leader` to find a leader.
    pub converge_timeout: Duration,
    /// How long one CLI call may take.
    pub cli_timeout: Duration,
    /// How long a graceful stop may take before the node is killed.
    pub stop_timeout: Duration,
    /// Keep the temp dir when the test fails (off for tests that expect a failure).
    pub keep_dir_on_failure: bool,
    /// Give every host its own libvirtd (see [`crate::libvirt`]) and point the node's
    /// compute service at it.
    pub libvirt: bool,
    /// `[compute] resync_interval_ms` of every node.
    pub compute_resync_ms: u64,
    /// More of every node's `--config` file (the harness adds the `[compute]` table
    /// unless this has one).
    pub config_toml: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            keel_bin: None,
            log_format: "text".into(),
            witness: Vec::new(),
            env: Vec::new(),
            extra_serve_args: Vec::new(),
            ready_timeout: Duration::from_secs(30),
            converge_timeout: Duration::from_secs(60),
            cli_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(15),
            keep_dir_on_failure: true,
            libvirt: false,
            compute_resync_ms: 1000,
            config_toml: String::new(),
        }
    }
}

/// What `keel cluster init --output json` printed.
#[derive(Debug, Clone)]
pub struct InitOutput {
    pub cluster_id: String,
    pub node_id: u64,
    pub admin_token: String,
    /// SHA-256 of the CA certificate (DER), hex.
    pub ca_fingerprint: String,
    pub ca_pem: String,
    pub api_addr: String,
    pub raw: Value,
}

/// What `keel cluster token create --output json` printed.
#[derive(Debug, Clone)]
pub struct JoinToken {
    pub token: String,
    pub id: String,
    pub expires_at_ms: u64,
    pub raw: Value,
}

/// A finished CLI call.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn field_str(v: &Value, key: &str) -> Result<String> {
    v.get(key)
        .and_then(|x| x.as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("field `{key}` (a string) missing in {v}"))
}

fn field_u64(v: &Value, key: &str) -> Result<u64> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("field `{key}` (an integer) missing in {v}"))
}

impl InitOutput {
    pub fn from_json(v: Value) -> Result<Self> {
        Ok(InitOutput {
            cluster_id: v
                .get("cluster_id")
                .and_then(id_string)
                .ok_or_else(|| anyhow!("field `cluster_id` missing in {v}"))?,
            node_id: field_u64(&v, "node_id")?,
            admin_token: field_str(&v, "admin_token")?,
            ca_fingerprint: field_str(&v, "ca_fingerprint")?,
            ca_pem: field_str(&v, "ca_pem")?,
            api_addr: field_str(&v, "api_addr")?,
            raw: v,
        })
    }
}

impl JoinToken {
    pub fn from_json(v: Value) -> Result<Self> {
        Ok(JoinToken {
            token: field_str(&v, "token")?,
            id: v.get("id").and_then(id_string).unwrap_or_default(),
            expires_at_ms: v.get("expires_at_ms").and_then(Value::as_u64).unwrap_or(0),
            raw: v,
        })
    }
}

/// An HTTPS client for one node's API that trusts only the cluster CA and sends the
/// admin token as a bearer token.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl ApiClient {
    /// A client for `https://addr` trusting only the certificates in `ca_pem`.
    pub fn new(addr: std::net::SocketAddr, ca_pem: &str, token: Option<String>) -> Result<Self> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots
                .add(cert.context("parse the cluster CA PEM")?)
                .context("add the cluster CA to the trust store")?;
        }
        if roots.is_empty() {
            bail!("the cluster CA PEM holds no certificate");
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("rustls protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .no_proxy()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(15))
            .build()
            .context("build the HTTPS client")?;
        Ok(ApiClient {
            base: format!("https://{addr}"),
            http,
            token,
        })
    }

    /// The same client without the admin token (for authentication tests).
    pub fn anonymous(&self) -> Self {
        ApiClient {
            token: None,
            ..self.clone()
        }
    }

    /// The same client with another bearer token.
    pub fn with_token(&self, token: impl Into<String>) -> Self {
        ApiClient {
            token: Some(token.into()),
            ..self.clone()
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
    /// The underlying reqwest client (TLS already configured; no token).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// A request with the bearer token set.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn json(rb: reqwest::RequestBuilder, what: &str) -> Result<Value> {
        let resp = rb.send().await.with_context(|| what.to_string())?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .with_context(|| format!("{what}: read body"))?;
        if !status.is_success() {
            bail!("{what}: HTTP {status}: {body}");
        }
        if body.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&body).with_context(|| format!("{what}: body is not JSON: {body}"))
    }

    /// GET `path`, expecting a 2xx JSON answer.
    pub async fn get(&self, path: &str) -> Result<Value> {
        Self::json(
            self.request(reqwest::Method::GET, path),
            &format!("GET {}", self.url(path)),
        )
        .await
    }

    /// PUT `body` as JSON to `path`, expecting a 2xx answer (JSON or empty).
    pub async fn put(&self, path: &str, body: &Value) -> Result<Value> {
        Self::json(
            self.request(reqwest::Method::PUT, path).json(body),
            &format!("PUT {}", self.url(path)),
        )
        .await
    }

    /// GET `path` as text (e.g. `/metrics`), expecting a 2xx answer.
    pub async fn get_text(&self, path: &str) -> Result<String> {
        let what = format!("GET {}", self.url(path));
        let resp = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .context(what.clone())?;
        let status = resp.status();
        let body = resp.text().await.context(what.clone())?;
        if !status.is_success() {
            bail!("{what}: HTTP {status}: {body}");
        }
        Ok(body)
    }

    /// The HTTP status of GET `path` (no error for 4xx/5xx).
    pub async fn status_of(&self, path: &str) -> Result<reqwest::StatusCode> {
        let what = format!("GET {}", self.url(path));
        Ok(self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .context(what)?
            .status())
    }

    /// `GET /healthz` answered 2xx.
    pub async fn healthz(&self) -> Result<()> {
        self.get_text(keel_client::paths::HEALTHZ).await.map(drop)
    }

    /// `PUT /api/v1/settings/{key}` with `{"value": value}`.
    pub async fn put_setting(&self, key: &str, value: &str) -> Result<Value> {
        self.put(
            &keel_client::paths::setting(key),
            &serde_json::json!({ "value": value }),
        )
        .await
    }

    /// `GET /api/v1/settings/{key}`.
    pub async fn get_setting(&self, key: &str) -> Result<Value> {
        self.get(&keel_client::paths::setting(key)).await
    }
}

#[derive(Debug)]
struct Host {
    name: String,
    dir: PathBuf,
    socket: PathBuf,
    data_dir: PathBuf,
    process: tokio::sync::Mutex<ManagedProcess>,
    // After the process: the node service stops before its libvirtd.
    libvirt: Option<crate::libvirt::LibvirtHost>,
}

/// A cluster of `keel serve` hosts. See the module header.
#[derive(Debug)]
pub struct TestCluster {
    hosts: Vec<Host>,
    init: Mutex<Option<InitOutput>>,
    node_ids: Mutex<Vec<Option<u64>>>,
    failed: AtomicBool,
    opts: ClusterOptions,
    keel: PathBuf,
    root: PathBuf,
    dir: Option<tempfile::TempDir>,
    // Last: the network outlives the processes in it.
    net: TestNet,
}

/// Finds the `keel` binary: `$KEEL_BIN`, else next to this test binary's target profile
/// directory (`target/<profile>/keel`), else `$CARGO_TARGET_DIR/debug/keel`, else the
/// workspace's `target/debug/keel`. A found (not `$KEEL_BIN`) binary older than any
/// source of `node/` or `cluster/` is refused as stale.
pub fn locate_keel() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KEEL_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(anyhow!("KEEL_BIN={} is not a file", p.display()))
        };
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/deps/harness-<hash> -> target/<profile>/keel
        for dir in exe.ancestors().skip(1).take(3) {
            tried.push(dir.join("keel"));
        }
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        tried.push(PathBuf::from(t).join("debug").join("keel"));
    }
    tried.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/keel"));
    let found = tried.iter().find(|p| p.is_file()).cloned();
    if let Some(bin) = &found {
        // `cargo test` does not rebuild another package's binary: refuse a stale one
        // rather than test yesterday's node.
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new(".."));
        let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
        let newest = ["node", "cluster"]
            .iter()
            .filter_map(|d| newest_source(&workspace.join(d)))
            .max_by_key(|(t, _)| *t);
        if let (Some(built), Some((changed, file))) = (built, newest) {
            if changed > built {
                bail!(
                    "{} is older than {}: rebuild it with `cargo build -p keel-cli` (or set KEEL_BIN)",
                    bin.display(),
                    file.display()
                );
            }
        }
    }
    found.ok_or_else(|| {
            let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
            anyhow!(
                "the keel binary was not found (tried {}); build it with `cargo build -p keel-cli` or set KEEL_BIN",
                list.join(", ")
            )
        })
}

/// The most recently modified source file (`*.rs`, `*.proto`, `Cargo.toml`) under `dir`.
fn newest_source(dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs" || x == "proto")
                || p.file_name().is_some_and(|n| n == "Cargo.toml")
            {
                if let Ok(t) = meta.modified() {
                    if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                        best = Some((t, p));
                    }
                }
            }
        }
    }
    best
}

impl TestCluster {
    /// Starts `n` hosts running `keel serve` (not yet a cluster: see [`TestCluster::form`]).
    pub async fn start(n: usize) -> Result<Self> {
        Self::start_with(n, ClusterOptions::default()).await
    }

    /// [`TestCluster::start`] with options.
    pub async fn start_with(n: usize, opts: ClusterOptions) -> Result<Self> {
        let keel = match &opts.keel_bin {
            Some(p) => p.clone(),
            None => locate_keel()?,
        };
        let dir = tempfile::Builder::new()
            .prefix("keel-test-")
            .tempdir()
            .context("create the cluster's temp dir")?;
        let root = dir.path().to_path_buf();
        let net = TestNet::new(n)?;
        let mut hosts = Vec::with_capacity(n);
        let mut cluster_env: Vec<(String, String)> = Vec::new();
        for (k, v) in [
            ("RUST_LOG", "info"),
            ("RUST_BACKTRACE", "1"),
            ("NO_COLOR", "1"),
        ] {
            if std::env::var_os(k).is_none() && !opts.env.iter().any(|(ek, _)| ek == k) {
                cluster_env.push((k.into(), v.into()));
            }
        }
        cluster_env.extend(opts.env.iter().cloned());
        for i in 0..n {
            let name = format!("node{}", i + 1);
            let hdir = root.join(&name);
            let data_dir = hdir.join("data");
            let socket = hdir.join("keel.sock");
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("create {}", data_dir.display()))?;
            let ip = net.ip(i);
            let libvirt = if opts.libvirt {
                Some(crate::libvirt::LibvirtHost::start(&net, i)?)
            } else {
                None
            };
            let config = hdir.join("keel.toml");
            let mut toml = opts.config_toml.clone();
            if !toml.contains("[compute]") {
                // Without a libvirtd of its own a node must not find the machine's.
                let uri = libvirt.as_ref().map_or_else(
                    || format!("qemu:///system?socket={}/no-libvirtd", hdir.display()),
                    |l| l.uri(),
                );
                // The KVM probe boots the tiny guest's kernel (`scripts/guest-images tiny`).
                let guests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-images");
                toml.push_str(&format!(
                    "\n[compute]\nlibvirt_uri = {uri:?}\nresync_interval_ms = {}\nkvm_probe_kernel = {:?}\nkvm_probe_initrd = {:?}\n",
                    opts.compute_resync_ms,
                    guests.join("keel-tiny.vmlinuz").display().to_string(),
                    guests.join("keel-tiny.initrd").display().to_string(),
                ));
            }
            if !toml.contains("[host]") {
                // Test nodes share this machine: never let one manage the machine's own
                // systemd units (on a developer box with systemd, "auto" would).
                toml.push_str("\n[host]\nsystemd = \"off\"\n");
            }
            std::fs::write(&config, toml).with_context(|| format!("write {}", config.display()))?;
            let mut spec = ProcessSpec::new(&name, &keel, &hdir)
                .netns(net.ns(i))
                .arg("serve")
                .arg("--config")
                .arg(&config)
                .arg("--data-dir")
                .arg(&data_dir)
                .arg("--peer-addr")
                .arg(format!("{ip}:{PEER_PORT}"))
                .arg("--api-addr")
                .arg(format!("{ip}:{API_PORT}"))
                .arg("--socket")
                .arg(&socket)
                .arg("--name")
                .arg(&name)
                .arg("--log-format")
                .arg(&opts.log_format)
                .cwd(&hdir);
            if opts.witness.contains(&i) {
                spec = spec.arg("--witness");
            }
            spec = spec.args(&opts.extra_serve_args);
            for (k, v) in &cluster_env {
                spec = spec.env(k, v);
            }
            let process = ManagedProcess::spawn(spec)?;
            hosts.push(Host {
                name,
                dir: hdir,
                socket,
                data_dir,
                process: tokio::sync::Mutex::new(process),
                libvirt,
            });
        }
        let cluster = TestCluster {
            node_ids: Mutex::new(vec![None; n]),
            hosts,
            init: Mutex::new(None),
            failed: AtomicBool::new(false),
            opts,
            keel,
            root,
            dir: Some(dir),
            net,
        };
        for i in 0..n {
            cluster.wait_ready(i).await?;
        }
        Ok(cluster)
    }

    /// Starts `n` hosts, initialises the cluster on host 0, joins every other host with a
    /// fresh token from host 0, and waits until every host sees the same cluster, all `n`
    /// nodes as members and the same leader.
    pub async fn form(n: usize) -> Result<Self> {
        Self::form_with(n, ClusterOptions::default()).await
    }

    /// [`TestCluster::form`] with options.
    pub async fn form_with(n: usize, opts: ClusterOptions) -> Result<Self> {
        let c = Self::start_with(n, opts).await?;
        c.init(0).await?;
        for i in 1..n {
            let t = c.token(0).await?;
            c.join(i, &t.token).await?;
        }
        c.wait_converged().await?;
        Ok(c)
    }

    fn track<T>(&self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        r
    }

    fn host(&self, i: usize) -> Result<&Host> {
        self.hosts.get(i).ok_or_else(|| {
            anyhow!(
                "host index {i} out of range: the cluster has {} hosts",
                self.hosts.len()
            )
        })
    }

    /// Host `i`'s libvirtd, if the cluster was started with `libvirt`.
    pub fn libvirt(&self, i: usize) -> Option<&crate::libvirt::LibvirtHost> {
        self.hosts.get(i).and_then(|h| h.libvirt.as_ref())
    }

    /// Every libvirt domain on every host with a libvirtd: (host index, name, state).
    pub fn domains(&self) -> Result<Vec<(usize, String, String)>> {
        let mut all = Vec::new();
        for i in 0..self.len() {
            let Some(lv) = self.libvirt(i) else { continue };
            let out = lv.virsh(&["list", "--all"])?;
            for line in out.lines().skip(2) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                if cols.len() >= 3 {
                    all.push((i, cols[1].to_string(), cols[2..].join(" ")));
                }
            }
        }
        Ok(all)
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }
    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
    /// The network: partitions, heal, addresses, namespaces.
    pub fn net(&self) -> &TestNet {
        &self.net
    }
    /// The cluster's temp dir.
    pub fn dir(&self) -> &Path {
        &self.root
    }
    /// The `keel` binary in use.
    pub fn keel_bin(&self) -> &Path {
        &self.keel
    }
    /// `node<i+1>`.
    pub fn name(&self, i: usize) -> &str {
        &self.hosts[i].name
    }
    /// Host `i`'s `--socket`.
    pub fn socket(&self, i: usize) -> &Path {
        &self.hosts[i].socket
    }
    /// Host `i`'s `--data-dir`.
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.hosts[i].data_dir
    }
    /// Host `i`'s directory (socket, data dir, logs).
    pub fn host_dir(&self, i: usize) -> &Path {
        &self.hosts[i].dir
    }
    /// Host `i`'s API address.
    pub fn api_addr(&self, i: usize) -> std::net::SocketAddr {
        (self.net.ip(i), API_PORT).into()
    }
    /// Host `i`'s peer address.
    pub fn peer_addr(&self, i: usize) -> std::net::SocketAddr {
        (self.net.ip(i), PEER_PORT).into()
    }
    /// What `init` printed, once it ran.
    pub fn init_output(&self) -> Option<InitOutput> {
        self.init.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// The raft node id of host `i`, once init/join told it.
    pub fn node_id(&self, i: usize) -> Option<u64> {
        self.node_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(i)
            .copied()
            .flatten()
    }
    /// The host index of raft node `id`.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.node_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .position(|n| *n == Some(id))
    }
    fn set_node_id(&self, i: usize, id: u64) {
        self.node_ids.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(id);
    }

    /// Whether host `i`'s `keel serve` is running.
    pub async fn is_running(&self, i: usize) -> bool {
        self.hosts[i].process.lock().await.is_running()
    }

    /// Pid of host `i`'s `keel serve` while it runs.
    pub async fn pid(&self, i: usize) -> Option<u32> {
        self.hosts[i].process.lock().await.pid()
    }

    /// Waits until host `i` accepts connections on its socket; gives up at once if the
    /// process exits.
    pub async fn wait_ready(&self, i: usize) -> Result<()> {
        let h = self.host(i)?;
        let r = wait_until(
            format!("{} to accept connections on {}", h.name, h.socket.display()),
            self.opts.ready_timeout,
            millis(50),
            || async {
                let mut p = h.process.lock().await;
                if !p.is_running() {
                    return Err(abort(format!(
                        "{} exited ({:?}) before it was ready; log tail:\n{}",
                        h.name,
                        p.exit_status(),
                        p.log_tail(30)
                    )));
                }
                drop(p);
                tokio::net::UnixStream::connect(&h.socket)
                    .await
                    .map(|_| Some(()))
                    .with_context(|| format!("connect {}", h.socket.display()))
            },
        )
        .await
        .map_err(anyhow::Error::from);
        self.track(r)
    }

    /// Runs `keel --socket <host i's socket> ARGS… --output json` inside host i and returns
    /// the whole result, whatever the exit status.
    pub async fn cli_raw(&self, i: usize, args: &[&str]) -> Result<CliOutput> {
        let h = self.host(i)?;
        let mut full: Vec<String> = vec!["--socket".into(), h.socket.display().to_string()];
        full.extend(args.iter().map(|a| a.to_string()));
        if !args.contains(&"--output") {
            full.extend(["--output".into(), "json".into()]);
        }
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.net.ns(i)])
            .arg(&self.keel)
            .args(&full)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let shown = format!("[{}] keel {}", h.name, full.join(" "));
        let out = tokio::time::timeout(self.opts.cli_timeout, cmd.output())
            .await
            .map_err(|_| anyhow!("{shown}: no answer within {:?}", self.opts.cli_timeout))?
            .with_context(|| format!("{shown}: cannot run"))?;
        let out = CliOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        self.log_cli(&shown, &out).await;
        Ok(out)
    }

    async fn log_cli(&self, shown: &str, out: &CliOutput) {
        let entry = format!(
            "$ {shown}\n# {}\n{}{}",
            out.status,
            out.stdout,
            out.stderr
                .lines()
                .map(|l| format!("stderr: {l}\n"))
                .collect::<String>()
        );
        if let Ok(mut f) = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("cli.log"))
            .await
        {
            let _ = f.write_all(entry.as_bytes()).await;
        }
    }

    /// Runs a CLI command on host `i` (see [`TestCluster::cli_raw`]) and parses its JSON
    /// output; a non-zero exit is an error carrying the CLI's stderr.
    pub async fn cli(&self, i: usize, args: &[&str]) -> Result<Value> {
        let r = self.cli_untracked(i, args).await;
        self.track(r)
    }

    /// [`TestCluster::cli`] without marking the test failed on error (for probes that
    /// expect errors while they wait).
    async fn cli_untracked(&self, i: usize, args: &[&str]) -> Result<Value> {
        async {
            let out = self.cli_raw(i, args).await?;
            let shown = format!("[{}] keel {}", self.hosts[i].name, args.join(" "));
            if !out.success() {
                bail!("{shown}: {}: {}", out.status, out.stderr.trim());
            }
            if out.stdout.trim().is_empty() {
                return Ok(Value::Null);
            }
            serde_json::from_str(&out.stdout)
                .with_context(|| format!("{shown}: stdout is not JSON: {}", out.stdout))
        }
        .await
    }

    /// `keel cluster init` on host `i`; remembers the CA and admin token for [`TestCluster::api`].
    pub async fn init(&self, i: usize) -> Result<InitOutput> {
        let r = async {
            let v = self.cli_untracked(i, &["cluster", "init"]).await?;
            let init = InitOutput::from_json(v)?;
            self.set_node_id(i, init.node_id);
            *self.init.lock().unwrap_or_else(|e| e.into_inner()) = Some(init.clone());
            Ok(init)
        }
        .await;
        self.track(r)
    }

    /// `keel cluster token create` on host `i`.
    pub async fn token(&self, i: usize) -> Result<JoinToken> {
        let r = async {
            JoinToken::from_json(
                self.cli_untracked(i, &["cluster", "token", "create"])
                    .await?,
            )
        }
        .await;
        self.track(r)
    }

    /// `keel cluster token create --ttl TTL` on host `i`.
    pub async fn token_with_ttl(&self, i: usize, ttl: &str) -> Result<JoinToken> {
        let r = async {
            JoinToken::from_json(
                self.cli_untracked(i, &["cluster", "token", "create", "--ttl", ttl])
                    .await?,
            )
        }
        .await;
        self.track(r)
    }

    /// `keel cluster join TOKEN` on host `i`; returns (and remembers) its node id.
    pub async fn join(&self, i: usize, token: &str) -> Result<u64> {
        let r = async {
            let v = self.cli_untracked(i, &["cluster", "join", token]).await?;
            let id = field_u64(&v, "node_id")?;
            self.set_node_id(i, id);
            Ok(id)
        }
        .await;
        self.track(r)
    }

    /// `keel cluster status` on host `i`.
    pub async fn status(&self, i: usize) -> Result<Value> {
        self.cli(i, &["cluster", "status"]).await
    }

    /// `keel node list` on host `i`.
    pub async fn nodes(&self, i: usize) -> Result<Value> {
        self.cli(i, &["node", "list"]).await
    }

    /// An HTTPS client for host `i` trusting only the cluster CA, with the admin token.
    /// Needs [`TestCluster::init`] to have run.
    pub fn api(&self, i: usize) -> Result<ApiClient> {
        let r = (|| {
            let init = self.init_output().ok_or_else(|| {
                anyhow!("the cluster is not initialised: call init() (or form()) first")
            })?;
            ApiClient::new(self.api_addr(i), &init.ca_pem, Some(init.admin_token))
        })();
        self.track(r)
    }

    /// Crashes host `i`: `kill -9` of its node (and of anything else running in its
    /// namespace), waiting until all of it is reaped.
    /// `kill -9` of host `i`'s node service alone: its libvirtd and guests keep running
    /// (a crashed service, not a crashed host — for that see [`TestCluster::kill`]).
    pub async fn kill_service(&self, i: usize) -> Result<()> {
        let r = async {
            let h = self.host(i)?;
            h.process.lock().await.kill().await
        }
        .await;
        self.track(r)
    }

    pub async fn kill(&self, i: usize) -> Result<()> {
        let r = async {
            let h = self.host(i)?;
            h.process.lock().await.kill().await?;
            // Whatever the node started outside its process group is on this host too.
            let pids = self.net.pids(i)?;
            for pid in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            wait_until(
                format!("every process of {} to be gone", h.name),
                crate::process::REAP_TIMEOUT,
                millis(20),
                || async {
                    let left = self.net.pids(i)?;
                    if left.is_empty() {
                        Ok(Some(()))
                    } else {
                        Err(anyhow!("still running: {left:?}"))
                    }
                },
            )
            .await?;
            Ok(())
        }
        .await;
        self.track(r)
    }

    /// Stops host `i` gracefully (SIGTERM; killed after `stop_timeout`).
    pub async fn stop(&self, i: usize) -> Result<StopOutcome> {
        let r = async {
            let h = self.host(i)?;
            let timeout = self.opts.stop_timeout;
            h.process.lock().await.stop(timeout).await
        }
        .await;
        self.track(r)
    }

    /// Kills host `i` if it runs, starts it again with the same arguments and data dir,
    /// and waits until it is ready.
    pub async fn restart(&self, i: usize) -> Result<()> {
        let r = async {
            self.kill(i).await?;
            self.host(i)?.process.lock().await.start()?;
            self.wait_ready(i).await
        }
        .await;
        self.track(r)
    }

    /// Starts host `i` again after `stop`/`kill` and waits until it is ready.
    pub async fn start_host(&self, i: usize) -> Result<()> {
        let r = async {
            self.host(i)?.process.lock().await.start()?;
            self.wait_ready(i).await
        }
        .await;
        self.track(r)
    }

    /// Waits until every running host reports the cluster of `init`, the same leader, and
    /// every node id known to the harness among its voters or learners.
    pub async fn wait_converged(&self) -> Result<()> {
        let r = async {
            let init = self
                .init_output()
                .ok_or_else(|| anyhow!("the cluster is not initialised"))?;
            let want: Vec<u64> = self
                .node_ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .flatten()
                .copied()
                .collect();
            wait_until(
                format!(
                    "all hosts to see cluster {} with members {want:?} and one leader",
                    init.cluster_id
                ),
                self.opts.converge_timeout,
                millis(250),
                || async {
                    let mut leaders = Vec::new();
                    let mut seen = Vec::new();
                    for i in 0..self.len() {
                        if !self.is_running(i).await {
                            continue;
                        }
                        let s = self
                            .cli_untracked(i, &["cluster", "status"])
                            .await
                            .with_context(|| format!("status of {}", self.name(i)))?;
                        seen.push(format!("{}: {s}", self.name(i)));
                        let cid = s.get("cluster_id").and_then(id_string);
                        if cid.as_deref() != Some(init.cluster_id.as_str()) {
                            return Err(anyhow!("{}", seen.join("; ")));
                        }
                        let members: Vec<u64> = ["voters", "learners"]
                            .iter()
                            .filter_map(|k| s.get(*k)?.as_array().cloned())
                            .flatten()
                            .filter_map(|v| v.as_u64())
                            .collect();
                        if want.iter().any(|id| !members.contains(id)) {
                            return Err(anyhow!("{}", seen.join("; ")));
                        }
                        leaders.push(s.get("leader_id").and_then(Value::as_u64));
                    }
                    let first = leaders.first().copied().flatten();
                    if first.is_some() && leaders.iter().all(|l| *l == first) {
                        Ok(Some(()))
                    } else {
                        Err(anyhow!("{}", seen.join("; ")))
                    }
                },
            )
            .await?;
            Ok(())
        }
        .await;
        self.track(r)
    }

    /// The host index of the leader: a running host whose status names itself as leader
    /// (the highest term wins if an isolated old leader still believes it leads). Waits
    /// up to `converge_timeout` for one.
    pub async fn leader(&self) -> Result<usize> {
        let all: Vec<usize> = (0..self.len()).collect();
        self.leader_among(&all).await
    }

    /// [`TestCluster::leader`] looking only at `hosts` (e.g. the majority side of a partition).
    pub async fn leader_among(&self, hosts: &[usize]) -> Result<usize> {
        let r = wait_until(
            format!("a leader among hosts {hosts:?}"),
            self.opts.converge_timeout,
            millis(200),
            || async {
                let mut best: Option<(u64, usize)> = None;
                let mut seen = Vec::new();
                for &i in hosts {
                    if !self.is_running(i).await {
                        seen.push(format!("{}: not running", self.name(i)));
                        continue;
                    }
                    let s = match self.cli_untracked(i, &["cluster", "status"]).await {
                        Ok(s) => s,
                        Err(e) => {
                            seen.push(format!("{}: {e:#}", self.name(i)));
                            continue;
                        }
                    };
                    let me = s.get("node_id").and_then(Value::as_u64);
                    let leader = s.get("leader_id").and_then(Value::as_u64);
                    let term = s.get("term").and_then(Value::as_u64).unwrap_or(0);
                    seen.push(format!(
                        "{}: node_id {me:?} leader_id {leader:?} term {term}",
                        self.name(i)
                    ));
                    if let Some(me) = me {
                        self.set_node_id(i, me);
                    }
                    if me.is_some() && me == leader && best.is_none_or(|(t, _)| term > t) {
                        best = Some((term, i));
                    }
                }
                match best {
                    Some((_, i)) => Ok(Some(i)),
                    None => Err(anyhow!("{}", seen.join("; "))),
                }
            },
        )
        .await
        .map_err(anyhow::Error::from);
        self.track(r)
    }

    /// Prints the last `lines` lines of every node's logs to stderr.
    pub fn dump_logs(&self, lines: usize) {
        eprintln!(
            "==== keel-tests: logs of cluster in {} (network {}, 10.213.{}.0/24)",
            self.root.display(),
            self.net.run_id(),
            self.net.subnet()
        );
        for h in &self.hosts {
            match h.process.try_lock() {
                Ok(p) => eprintln!("{}", p.log_tail(lines)),
                Err(_) => eprintln!("--- {}: log busy ---", h.name),
            }
        }
        let cli = self.root.join("cli.log");
        eprintln!(
            "--- {} ---\n{}",
            cli.display(),
            crate::process::tail_file(&cli, lines)
        );
    }

    /// Marks the test as failed: logs are dumped and the temp dir kept on drop.
    pub fn mark_failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let failed = std::thread::panicking() || self.failed.load(Ordering::Relaxed);
        if failed {
            self.dump_logs(60);
        }
        for h in &mut self.hosts {
            if let Err(e) = h.process.get_mut().kill_blocking() {
                eprintln!("keel-tests: {e:#}");
            }
        }
        let keep = (failed && self.opts.keep_dir_on_failure)
            || std::env::var("KEEL_TEST_KEEP_DIR").is_ok_and(|v| v == "1");
        if keep {
            if let Some(dir) = self.dir.take() {
                let path = dir.keep();
                eprintln!("keel-tests: kept the cluster's files in {}", path.display());
            }
        }
    }
}
