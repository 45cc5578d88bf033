//! `keel serve`: binds every listener first (so an occupied port or an unwritable data
//! directory fails at once with one clear line), opens the cluster database, then runs the
//! HTTPS API, the admin socket, the member agent and the duties until SIGTERM.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use keel_cluster::db::{now_ms, ClusterDbConfig};
use keel_cluster::model::{self, Command, Host, HypervisorReport};
use keel_cluster::tls::{self, NodeIdentity};
use keel_cluster::{error_chain, ClusterDb, ClusterError};
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::compute::console::Consoles;
use crate::compute::host::{Bridges, ComputeHost};
use crate::compute::images::ImageStore;
use crate::compute::kvm_probe::ProbeGuest;
use crate::compute::migration::libvirt_socket_of;
use crate::compute::transfer::PeerTemplateSource;
use crate::config::{ConfigError, NodeConfig};
use crate::duties::{self, DutyStatus};
use crate::host::supervisor::{HostUnits, UnitReports};
use crate::network::reconciler::{NetworkAdapters, NetworkHost};
use crate::peer::NodeHostServices;
use keel_adapters::dhcp::dnsmasq::Dnsmasq;
use keel_adapters::firewall::nft::Nftables;
use keel_adapters::hypervisor::domain_xml::DomainType;
use keel_adapters::hypervisor::libvirt::Libvirt;
use keel_adapters::hypervisor::Hypervisor;
use keel_adapters::links::netlink::Netlink;
use keel_adapters::nat::nft::NftNat;
use keel_adapters::units::systemd::SystemdDbus;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {what} address {addr}: {hint}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        hint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("data directory {path} is not usable (it must be a writable directory)")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin socket {path}: {hint}")]
    Socket {
        path: PathBuf,
        hint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not open the cluster database in {path}")]
    Cluster {
        path: PathBuf,
        #[source]
        source: Box<ClusterError>,
    },
    #[error("image store {path} is not usable")]
    Images {
        path: PathBuf,
        #[source]
        source: crate::compute::images::ImageError,
    },
    #[error("guest networks cannot use {path}")]
    Network {
        path: PathBuf,
        #[source]
        source: Box<keel_adapters::links::LinkError>,
    },
    #[error("could not set up TLS for the API")]
    Tls(#[source] keel_cluster::tls::TlsError),
    #[error("could not restart the node service after a storage failure; start it again by hand")]
    Restart {
        #[source]
        source: std::io::Error,
    },
    #[error("could not install signal handlers")]
    Signals(#[source] std::io::Error),
}

fn bind(what: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, ServeError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|source| {
        let hint = match source.kind() {
            std::io::ErrorKind::AddrInUse => {
                "the port is already in use (is another keel serve running?)".to_string()
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "that address is not on this server".to_string()
            }
            _ => "check the address".to_string(),
        };
        ServeError::Bind {
            what,
            addr,
            hint,
            source,
        }
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ServeError::Bind {
            what,
            addr,
            hint: "could not make the socket non-blocking".into(),
            source,
        })?;
    Ok(listener)
}

fn prepare_data_dir(path: &Path) -> Result<(), ServeError> {
    let err = |source| ServeError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    let probe = path.join(".write-probe");
    std::fs::write(&probe, b"ok").map_err(err)?;
    std::fs::remove_file(&probe).map_err(err)?;
    Ok(())
}

fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    let err = |hint: &str| {
        let hint = hint.to_string();
        move |source| ServeError::Socket {
            path: path.to_path_buf(),
            hint,
            source,
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err("cannot create its directory"))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::Socket {
                path: path.to_path_buf(),
                hint: "another keel serve is already listening on it".into(),
                source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            });
        }
        std::fs::remove_file(path).map_err(err("cannot remove the stale socket"))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err("cannot bind"))?;
    // Root only: the socket is the CLI's whole authentication.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(err("cannot restrict its permissions"))?;
    Ok(listener)
}

fn api_tls_config(identity: &NodeIdentity) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let mut config = tls::server_builder()
        .map_err(ServeError::Tls)?
        .with_no_client_auth()
        .with_single_cert(
            tls::parse_certs(&identity.cert_chain_pem, "node certificate")
                .map_err(ServeError::Tls)?,
            tls::parse_key(&identity.key_pem).map_err(ServeError::Tls)?,
        )
        .map_err(|e| {
            ServeError::Tls(tls::TlsError::Config {
                what: "API certificate",
                source: e,
            })
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A throwaway self-signed certificate for the API until the node is a member and has
/// a CA-signed one. Only `/healthz` is useful then.
fn bootstrap_identity() -> Result<NodeIdentity, ServeError> {
    let ca = tls::generate_ca("bootstrap").map_err(ServeError::Tls)?;
    let (key_pem, csr) = tls::generate_node_key().map_err(ServeError::Tls)?;
    let cert = tls::sign_node_cert(&ca, &csr, 0, &[]).map_err(ServeError::Tls)?;
    Ok(NodeIdentity {
        cert_chain_pem: format!("{cert}{}", ca.cert_pem),
        key_pem,
        ca_pem: ca.cert_pem,
    })
}

pub async fn serve(config: NodeConfig) -> Result<(), ServeError> {
    config.validate()?;
    prepare_data_dir(&config.data_dir)?;
    let peer_listener = bind("peer", config.peer_addr)?;
    let api_listener = bind("API", config.api_addr)?;
    let socket = bind_socket(&config.socket)?;
    let peer_listener =
        tokio::net::TcpListener::from_std(peer_listener).map_err(|source| ServeError::Bind {
            what: "peer",
            addr: config.peer_addr,
            hint: "tokio could not adopt the socket".into(),
            source,
        })?;

    let db = ClusterDb::open(
        ClusterDbConfig {
            data_dir: config.data_dir.clone(),
            name: config.node_name(),
            peer_addr: config.peer_addr,
            api_addr: config.api_addr,
            witness: config.witness,
            tuning: config.raft.clone(),
        },
        peer_listener,
    )
    .await
    .map_err(|source| ServeError::Cluster {
        path: config.data_dir.clone(),
        source: Box::new(source),
    })?;

    let images = Arc::new(ImageStore::new(config.images_dir()));
    images.prepare().map_err(|source| ServeError::Images {
        path: config.images_dir(),
        source,
    })?;

    // A witness runs no workloads, so it does not even connect to a hypervisor.
    let hypervisor: Option<Arc<dyn Hypervisor>> = (!config.witness)
        .then(|| Arc::new(Libvirt::new(&config.compute.libvirt_uri)) as Arc<dyn Hypervisor>);
    let consoles = Arc::new(Consoles {
        db: db.clone(),
        hv: hypervisor.clone(),
    });

    let shutdown = CancellationToken::new();
    // First: libvirtd must be up before the compute service connects to it.
    let host_units = start_host_units(&config, &shutdown);
    let duty_status = Arc::new(DutyStatus::default());
    let state = AppState {
        db: db.clone(),
        started: std::time::Instant::now(),
        metrics: Arc::default(),
        duties: duty_status.clone(),
        images: images.clone(),
        consoles: consoles.clone(),
        join_limiter: Arc::new(api::rate_limit::RateLimiter::new(
            api::JOIN_RATE_PER_SECOND,
            api::JOIN_BURST,
        )),
    };

    // HTTPS API.
    let identity = match db.identity() {
        Some(id) => id,
        None => bootstrap_identity()?,
    };
    let rustls_config = RustlsConfig::from_config(api_tls_config(&identity)?);
    let handle = axum_server::Handle::new();
    // TCP_NODELAY: small responses must not wait on delayed ACKs.
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(rustls_config.clone())
        .acceptor(axum_server::accept::NoDelayAcceptor::new());
    let https = axum_server::from_tcp(api_listener)
        .acceptor(acceptor)
        .handle(handle.clone())
        // The client's address reaches the handlers (the join route is limited per source).
        .serve(
            api::https_router(state.clone())
                .into_make_service_with_connect_info::<std::net::SocketAddr>(),
        );
    let https_task = tokio::spawn(async move {
        if let Err(e) = https.await {
            tracing::error!(error = %e, "HTTPS API stopped");
        }
    });
    tokio::spawn(reload_api_cert_on_membership(
        db.clone(),
        rustls_config,
        shutdown.clone(),
    ));

    // Admin socket.
    let local = api::local_router(state.clone());
    let local_shutdown = shutdown.clone();
    let local_task = tokio::spawn(async move {
        let stop = async move { local_shutdown.cancelled().await };
        if let Err(e) = axum::serve(socket, local)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "admin socket stopped");
        }
    });

    // What the host's agents observe, on watch channels: the agent folds them into the
    // host's inventory, and the compute side waits on the network's for a VM's bridges.
    let (hypervisor_report, hypervisor_rx) = tokio::sync::watch::channel(None);
    let (network_report, network_rx) = tokio::sync::watch::channel(None);
    let compute = hypervisor.clone().map(|hv| {
        Arc::new(ComputeHost {
            db: db.clone(),
            hv,
            volumes: images.clone(),
            templates: Arc::new(PeerTemplateSource::new(db.clone(), images.clone())),
            resync: Duration::from_millis(config.compute.resync_interval_ms),
            report: hypervisor_report,
            domain_type: DomainType::Qemu,
            incoming_streams: Default::default(),
            run_dir: config.data_dir.join("run"),
            libvirt_socket: libvirt_socket_of(&config.compute.libvirt_uri),
            probe_guest: ProbeGuest {
                kernel: config.compute.kvm_probe_kernel.clone(),
                initrd: config.compute.kvm_probe_initrd.clone(),
            },
            bridges: Bridges::new(network_rx.clone()),
            kvm: std::sync::Mutex::new(None),
        })
    });
    db.set_host_services(Arc::new(NodeHostServices {
        db: db.clone(),
        images: images.clone(),
        consoles: consoles.clone(),
        compute: compute.clone(),
    }));
    if let Some(compute) = compute {
        tokio::spawn(compute.run(shutdown.clone()));
    }
    // Guest networks: only hosts that run VMs build them.
    if !config.witness {
        let links = Netlink::new(config.netns_dir()).map_err(|source| ServeError::Network {
            path: config.netns_dir(),
            source: Box::new(source),
        })?;
        let network = Arc::new(NetworkHost {
            db: db.clone(),
            adapters: NetworkAdapters {
                links: Arc::new(links),
                dhcp: Arc::new(Dnsmasq::new(
                    config.dnsmasq_dir(),
                    config.network.dnsmasq_binary.clone(),
                )),
                firewall: Arc::new(Nftables::new(config.network.nft_binary.clone())),
                nat: Arc::new(NftNat::new(config.network.nft_binary.clone())),
            },
            resync: Duration::from_millis(config.network.resync_interval_ms),
            status: Default::default(),
            report: network_report,
        });
        tokio::spawn(network.run(shutdown.clone()));
    }
    tokio::spawn(agent(
        db.clone(),
        config.clone(),
        hypervisor_rx,
        network_rx,
        host_units,
        shutdown.clone(),
    ));
    tokio::spawn(duties::run(
        db.clone(),
        config.duties.clone(),
        duty_status,
        shutdown.clone(),
    ));

    tracing::info!(
        peer = %config.peer_addr, api = %config.api_addr, socket = %config.socket.display(),
        node_id = ?db.node_id(), "keel node service started"
    );

    let restart = tokio::select! {
        r = wait_for_signal() => { r?; false }
        _ = raft_failed_then_space_back(db.clone(), config.data_dir.clone()) => true,
    };
    tracing::info!(restart, "stopping");
    shutdown.cancel();
    handle.graceful_shutdown(Some(Duration::from_secs(5)));
    let _ = tokio::time::timeout(Duration::from_secs(6), https_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), local_task).await;
    // Bounded like the rest: a raft core that already stopped on a storage failure (the
    // restart path) can leave openraft's shutdown waiting for ever, and what follows is an
    // exit or an exec that drops everything anyway.
    if tokio::time::timeout(RAFT_SHUTDOWN_WAIT, db.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            waited_ms = RAFT_SHUTDOWN_WAIT.as_millis() as u64,
            "raft did not shut down in time; stopping anyway"
        );
    }
    let _ = std::fs::remove_file(&config.socket);
    if restart {
        return Err(restart_self());
    }
    tracing::info!("stopped");
    Ok(())
}

/// Keeps the host's systemd units (`[host] units`) running when systemd runs the host
/// (`[host] systemd`). Returns the reports for the inventory, `None` when off. A system bus
/// that cannot be reached does not stop the node: the supervisor reports it and retries.
fn start_host_units(
    config: &NodeConfig,
    shutdown: &CancellationToken,
) -> Option<tokio::sync::watch::Receiver<UnitReports>> {
    // A witness runs no workloads, so it needs none of the workload units either.
    if config.witness || !config.host.manages_units() {
        tracing::debug!(mode = ?config.host.systemd,
            "host units: not managed (systemd does not run this host, or [host] systemd = \"off\")");
        return None;
    }
    let (units, reports) = HostUnits::new(
        Arc::new(SystemdDbus::system()),
        config.host.units.clone(),
        Duration::from_millis(config.host.units_interval_ms),
    );
    tokio::spawn(units.run(shutdown.clone()));
    Some(reports)
}

/// How long a stop waits for raft to shut down.
const RAFT_SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Free space the data directory needs before raft is restarted after a storage failure.
const MIN_FREE_BYTES: u64 = 64 * 1024 * 1024;

/// Resolves when raft has stopped on a storage failure (openraft treats every storage
/// error as fatal: a full disk during log append, for example) *and* the data directory
/// has room again. Nothing acknowledged was lost: the failed append was never
/// acknowledged, and the store's transactions left the files consistent.
async fn raft_failed_then_space_back(db: ClusterDb, data_dir: PathBuf) {
    let mut metrics = db.wait_for_raft().await.metrics();
    loop {
        let failure = metrics.borrow().running_state.clone().err();
        if let Some(fatal) = failure {
            tracing::error!(error = %fatal, "raft stopped on a storage failure; waiting for free space in the data directory to restart it");
            break;
        }
        if metrics.changed().await.is_err() {
            // The raft core ended without reporting a failure: an ordinary shutdown.
            return std::future::pending().await;
        }
    }
    loop {
        let free = nix::sys::statvfs::statvfs(&data_dir)
            .map(|s| s.blocks_available() * s.fragment_size())
            .unwrap_or(0);
        if free >= MIN_FREE_BYTES {
            tracing::warn!(
                free_bytes = free,
                "space is back in the data directory; restarting the node service"
            );
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Replaces this process with a fresh `keel serve` with the same arguments, so raft
/// reopens its store from disk exactly as after a crash. Only returns on failure.
fn restart_self() -> ServeError {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(source) => return ServeError::Restart { source },
    };
    let source = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .exec();
    ServeError::Restart { source }
}

async fn wait_for_signal() -> Result<(), ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signals)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

async fn reload_api_cert_on_membership(
    db: ClusterDb,
    rustls: RustlsConfig,
    stop: CancellationToken,
) {
    let mut watch = db.membership_watch();
    loop {
        if let Some(identity) = db.identity() {
            match api_tls_config(&identity) {
                Ok(cfg) => {
                    rustls.reload_from_config(cfg);
                    tracing::info!("API now serves the cluster-signed certificate");
                }
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), "API certificate reload failed");
                }
            }
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = watch.changed() => if r.is_err() { return },
        }
    }
}

/// What every member does, leader or not: heartbeat to the leader and keep its inventory
/// in the state current.
/// Gives the cluster the interface roles of this host's configuration that it does not
/// have yet (roles set through the API win). Returns whether every configured role is set.
async fn give_configured_roles(db: &ClusterDb, config: &NodeConfig, node_id: u64) -> bool {
    use keel_cluster::model::network::{
        HostNetworks, Ipv4Cidr, NetRole, NetworkCommand, PhysicalNetwork,
    };
    let read = db.reader().read(|c| {
        Ok((
            model::host(c, node_id)?,
            model::get::<HostNetworks>(c, &format!("{node_id:020}"))?,
        ))
    });
    let Ok((Some(host), stored)) = read else {
        return false;
    };
    let Some(inventory) = &host.inventory else {
        return false;
    };
    let mut done = true;
    for (name, rc) in &config.network.roles {
        let Some(role) = NetRole::parse(name) else {
            continue;
        };
        if stored.as_ref().is_some_and(|s| s.roles.contains_key(&role)) {
            continue;
        }
        let address = match &rc.address {
            Some(a) => Ipv4Cidr::parse(a, false).ok(),
            None => inventory
                .nics
                .iter()
                .find(|n| n.name == rc.interface)
                .and_then(|n| {
                    n.addresses
                        .iter()
                        .find_map(|a| Ipv4Cidr::parse(a, false).ok())
                }),
        };
        let Some(address) = address else {
            tracing::warn!(role = name, interface = %rc.interface,
                "network role from the configuration: the interface has no IPv4 address yet");
            done = false;
            continue;
        };
        let command = Command::Network {
            command: NetworkCommand::SetHostNetwork {
                host_id: node_id,
                role,
                network: Some(PhysicalNetwork {
                    interface: rc.interface.clone(),
                    address,
                    gateway: rc.gateway,
                }),
            },
        };
        match db.write(command).await {
            Ok(_) => tracing::info!(role = name, interface = %rc.interface, %address,
                "network role from the configuration given to the cluster"),
            // Refused by the model (e.g. the address is not on the interface): said once,
            // not retried; anything else (no quorum yet) is retried on the next beat.
            Err(keel_cluster::ClusterError::Rejected(e)) => {
                tracing::warn!(role = name, error = %e,
                    "network role from the configuration refused; fix [network.roles] or set it with `keel node network set`");
            }
            Err(e) => {
                tracing::debug!(role = name, error = %error_chain(&e), "network role not given yet");
                done = false;
            }
        }
    }
    done
}

async fn agent(
    db: ClusterDb,
    config: NodeConfig,
    hypervisor: tokio::sync::watch::Receiver<Option<HypervisorReport>>,
    network: tokio::sync::watch::Receiver<Option<keel_cluster::model::NetworkReport>>,
    host_units: Option<tokio::sync::watch::Receiver<UnitReports>>,
    stop: CancellationToken,
) {
    let mut beat =
        tokio::time::interval(Duration::from_millis(config.duties.heartbeat_interval_ms));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let inventory_every = Duration::from_secs(60);
    let mut last_inventory: Option<std::time::Instant> = None;
    let mut last_hypervisor: Option<HypervisorReport> = None;
    let mut last_network = None;
    let mut last_units = None;
    let mut roles_given = config.network.roles.is_empty();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = beat.tick() => {}
        }
        let Some(node_id) = db.node_id() else {
            continue;
        };
        if let Err(e) = db.send_heartbeat().await {
            tracing::debug!(error = %error_chain(&e), "heartbeat not delivered");
        }
        if !roles_given {
            roles_given = give_configured_roles(&db, &config, node_id).await;
        }
        let hv_report = hypervisor.borrow().clone();
        let net_report = network.borrow().clone();
        let units_report = host_units.as_ref().and_then(|rx| rx.borrow().clone());
        // A change of the hypervisor's availability matters to placement at once, a
        // network or host unit problem to the operator; the rest of the inventory is
        // refreshed every minute.
        if last_inventory.is_some_and(|t| t.elapsed() < inventory_every)
            && hv_report == last_hypervisor
            && net_report == last_network
            && units_report == last_units
        {
            continue;
        }
        let mut inventory = tokio::task::spawn_blocking(|| {
            crate::inventory::probe(&keel_adapters::probe::ProcSys::default())
        })
        .await
        .unwrap_or_default();
        if let Some(hv) = &hv_report {
            if hv.kvm_usable.is_some() || !hv.kvm_detail.is_empty() {
                inventory.kvm.usable = hv.kvm_usable;
                inventory.kvm.detail = hv.kvm_detail.clone();
            }
        }
        inventory.hypervisor = hv_report.clone();
        inventory.network = net_report.clone();
        inventory.host_units = units_report.clone();
        let current = db
            .reader()
            .read(|c| model::host(c, node_id))
            .ok()
            .flatten()
            .and_then(|h: Host| h.inventory);
        if current.as_ref() == Some(&inventory) {
            last_inventory = Some(std::time::Instant::now());
            last_hypervisor = hv_report;
            last_network = net_report;
            last_units = units_report;
            continue;
        }
        match db
            .write(Command::ReportInventory {
                host_id: node_id,
                inventory,
                now_ms: now_ms(),
            })
            .await
        {
            Ok(_) => {
                last_inventory = Some(std::time::Instant::now());
                last_hypervisor = hv_report;
                last_network = net_report;
                last_units = units_report;
            }
            Err(e) => {
                tracing::debug!(error = %error_chain(&e), "inventory report failed; retrying");
            }
        }
    }
}
