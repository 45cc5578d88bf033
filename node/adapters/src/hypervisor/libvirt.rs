//! The real [`Hypervisor`]: libvirt through the `virt` 0.4.3 bindings. Every `virt::` call
//! of the project is in this file, so that libvirt's threading, error and lifetime rules
//! are handled in one place:
//!
//! * **Process-wide setup** (once, on the first [`Libvirt::new`]): libvirt's default error
//!   handler prints every error to stderr — it is replaced by a no-op (errors are returned,
//!   with context, instead). libvirt's default event loop is registered and run on a
//!   thread of its own (`libvirt-events`): without it the client never notices a dead
//!   daemon until a call fails, keepalive probes (which catch a hung daemon) never run,
//!   and console streams (non-blocking, see [`LibvirtConsole`]) never receive data.
//! * **Connection**: opened lazily on the first call and shared by all calls (a libvirt
//!   connection is thread-safe). Before every call it is checked with `is_alive` (a
//!   local check, no round trip; the event loop makes it notice a closed socket at once)
//!   and reopened when dead, so a restarted libvirtd is picked up. A call that fails
//!   *because* the connection died under it is run once more on a new connection: every
//!   operation here either re-reads the domain's state first or is harmless to repeat
//!   (define, shutdown, reset, detach, metadata). Migration and device attach are the
//!   exceptions (their outcome must be looked at, not repeated). Keepalive is on (every 5 s, 3 misses): a daemon that hangs
//!   instead of dying closes the connection after ~20 s rather than blocking calls
//!   forever. `virt::Connect` has no `Drop`; [`Conn`] closes it.
//! * **Idempotence**: start of an active domain, destroy/shutdown of an inactive one and
//!   undefine/destroy of an absent one succeed; the state is checked before the call and
//!   again when libvirt reports `OPERATION_INVALID` (a concurrent change between the two).
//!   Device changes (NIC hot-plug) and metadata go to the live domain while it is active
//!   and to the persistent definition (`VIR_DOMAIN_AFFECT_LIVE | CONFIG`); a detach of a
//!   device already gone from one of the two (`DEVICE_MISSING`) finishes on the other.
//!   An attach is not repeatable: the caller compares the live XML first.
//! * **Errors**: every failure becomes a [`HypervisorError`] naming the operation and the
//!   domain UUID, with the libvirt error boxed as its `source`; "no such domain" becomes
//!   [`HypervisorError::NoSuchDomain`]. `virt` panics on strings with NUL bytes
//!   (`CString::new(..).unwrap()`), so those are refused before they reach it.
//!
//! Migration uses `virDomainMigrate3` with a connection of our own to the destination
//! (`dest_uri`): "managed direct" migration, where this process drives both daemons and
//! qemu streams memory (and, with `copy_storage`, the copy-on-write overlay) straight to
//! `migrate_uri` on the destination. Peer-to-peer (`VIR_MIGRATE_PEER2PEER`) would need
//! the source libvirtd to open its own (authenticated, TLS) connection to the
//! destination libvirtd; Keel's libvirtd listens on its unix socket only.
//!
//! The console is a blocking `virStream` on a connection of its own (see [`LibvirtConsole`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use quick_xml::events::Event;
use quick_xml::reader::Reader;
use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::{Domain, MigrateParameters};
use virt::error::{Error as VirtError, ErrorNumber};
use virt::stream::Stream;

use crate::hypervisor::domain_xml;
use crate::hypervisor::{
    ConsoleStream, DomainInfo, DomainState, HostCapabilities, Hypervisor, HypervisorError,
    MigrationRequest,
};

/// Failures of this adapter that are not libvirt's own (the `source` of a
/// [`HypervisorError`]).
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("the {what} contains a NUL byte")]
    NulByte { what: &'static str },
    #[error("cannot connect to the migration destination {uri}")]
    Destination {
        uri: String,
        #[source]
        source: VirtError,
    },
    #[error("no such domain")]
    NoSuchDomain,
    #[error("cannot render Keel's metadata element")]
    Metadata {
        #[source]
        source: domain_xml::DomainXmlError,
    },
    #[error("cannot read libvirt's capabilities XML")]
    Capabilities {
        #[source]
        source: quick_xml::Error,
    },
}

/// Keepalive probe interval (seconds) and unanswered probes before the connection closes.
const KEEPALIVE_INTERVAL_S: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

/// Largest chunk one console `write` hands to libvirt (a stream message carries at most
/// 256 KiB; console traffic is small anyway).
const CONSOLE_WRITE_CHUNK: usize = 64 * 1024;

/// Longest pause of a console reader polling a stream with nothing queued: the added
/// latency of the first byte after a quiet spell, and how late a reader notices `close`.
const CONSOLE_POLL_MAX: Duration = Duration::from_millis(20);

static PROCESS_SETUP: OnceLock<()> = OnceLock::new();

/// Silences libvirt's stderr error printer and starts its event loop (see module header).
fn process_setup() {
    PROCESS_SETUP.get_or_init(|| {
        virt::error::clear_error_callback();
        match virt::event::event_register_default_impl() {
            Ok(()) => {
                let spawned = std::thread::Builder::new()
                    .name("libvirt-events".into())
                    .spawn(|| loop {
                        if let Err(e) = virt::event::event_run_default_impl() {
                            tracing::warn!(error = %e, "libvirt event loop iteration failed");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start the libvirt event loop thread");
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot register libvirt's event loop; dead connections are noticed late"
            ),
        }
    });
}

/// An open libvirt connection, closed when the last user drops it.
#[derive(Debug)]
struct Conn(Connect);

impl Drop for Conn {
    fn drop(&mut self) {
        if let Err(e) = self.0.close() {
            tracing::debug!(error = %e, "closing a libvirt connection failed");
        }
    }
}

impl Conn {
    fn open(uri: &str) -> Result<Conn, HypervisorError> {
        let connect_err =
            |source: Box<dyn std::error::Error + Send + Sync>| HypervisorError::Connect {
                uri: uri.to_string(),
                source,
            };
        if uri.contains('\0') {
            return Err(connect_err(Box::new(LibvirtError::NulByte {
                what: "connection URI",
            })));
        }
        let conn = Connect::open(Some(uri))
            .map(Conn)
            .map_err(|e| connect_err(Box::new(e)))?;
        conn.keepalive();
        Ok(conn)
    }

    /// Turns keepalive on (needs the event loop; without it the connection just has none).
    fn keepalive(&self) {
        if let Err(e) = self.0.set_keep_alive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT) {
            tracing::debug!(error = %e, "cannot turn on libvirt keepalive");
        }
    }

    fn alive(&self) -> bool {
        self.0.is_alive().unwrap_or(false)
    }
}

/// Why one closure run against a connection failed, before it becomes a
/// [`HypervisorError`].
enum Fail {
    Virt(VirtError),
    NoDomain,
    Other(LibvirtError),
}

impl From<VirtError> for Fail {
    fn from(e: VirtError) -> Self {
        Fail::Virt(e)
    }
}

impl From<LibvirtError> for Fail {
    fn from(e: LibvirtError) -> Self {
        Fail::Other(e)
    }
}

fn classify(operation: &'static str, uuid: Option<Uuid>, fail: Fail) -> HypervisorError {
    let source: Box<dyn std::error::Error + Send + Sync> = match fail {
        Fail::NoDomain => match uuid {
            Some(uuid) => return HypervisorError::NoSuchDomain { uuid },
            None => Box::new(LibvirtError::NoSuchDomain),
        },
        Fail::Virt(e) if e.code() == ErrorNumber::NoDomain => match uuid {
            Some(uuid) => return HypervisorError::NoSuchDomain { uuid },
            None => Box::new(e),
        },
        Fail::Virt(e) => Box::new(e),
        Fail::Other(e) => Box::new(e),
    };
    match uuid {
        Some(uuid) => HypervisorError::Operation {
            operation,
            uuid,
            source,
        },
        None => HypervisorError::Host { operation, source },
    }
}

fn no_nul(what: &'static str, s: &str) -> Result<(), Fail> {
    if s.contains('\0') {
        Err(Fail::Other(LibvirtError::NulByte { what }))
    } else {
        Ok(())
    }
}

/// The domain with `uuid`, or `None` when libvirt has none.
fn find(conn: &Connect, uuid: Uuid) -> Result<Option<Domain>, Fail> {
    match Domain::lookup_by_uuid(conn, uuid) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.code() == ErrorNumber::NoDomain => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn require(conn: &Connect, uuid: Uuid) -> Result<Domain, Fail> {
    find(conn, uuid)?.ok_or(Fail::NoDomain)
}

fn map_state(state: virt::sys::virDomainState) -> DomainState {
    match state {
        // BLOCKED: running, waiting on a resource.
        virt::sys::VIR_DOMAIN_RUNNING | virt::sys::VIR_DOMAIN_BLOCKED => DomainState::Running,
        virt::sys::VIR_DOMAIN_PAUSED => DomainState::Paused,
        virt::sys::VIR_DOMAIN_SHUTDOWN => DomainState::ShuttingDown,
        virt::sys::VIR_DOMAIN_SHUTOFF => DomainState::ShutOff,
        virt::sys::VIR_DOMAIN_CRASHED => DomainState::Crashed,
        // NOSTATE, PMSUSPENDED and anything newer.
        _ => DomainState::Other,
    }
}

/// `VIR_DOMAIN_AFFECT_*` for a change that must reach both what runs now and what the
/// next start uses: live while active, config while persistent.
fn affect_both(dom: &Domain) -> Result<u32, VirtError> {
    let mut flags = 0;
    if dom.is_active()? {
        flags |= virt::sys::VIR_DOMAIN_AFFECT_LIVE;
    }
    if dom.is_persistent()? {
        flags |= virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
    }
    Ok(flags)
}

fn domain_info(dom: &Domain) -> Result<DomainInfo, VirtError> {
    let info = dom.get_info()?;
    Ok(DomainInfo {
        uuid: dom.get_uuid()?,
        name: dom.get_name()?,
        state: map_state(info.state),
        persistent: dom.is_persistent()?,
        vcpus: info.nr_virt_cpu,
        // Configured (maximum) memory; the balloon's current size is `info.memory`.
        memory_kib: info.max_mem,
    })
}

/// libvirt's `major * 1_000_000 + minor * 1000 + release` as `major.minor.release`.
fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

/// Domain types (`qemu`, `kvm`) the capabilities XML offers for x86_64 guests
/// (`/capabilities/guest/arch[@name='x86_64']/domain/@type`), in order, once each.
fn x86_64_domain_types(caps: &str) -> Result<Vec<String>, quick_xml::Error> {
    let mut reader = Reader::from_str(caps);
    reader.config_mut().expand_empty_elements = true;
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut in_x86_64 = false;
    let mut types: Vec<String> = Vec::new();
    loop {
        match reader.read_event()? {
            Event::Start(e) => {
                let name = e.name().as_ref().to_vec();
                let parents: Vec<&[u8]> = path.iter().map(Vec::as_slice).collect();
                if parents == [b"capabilities".as_slice(), b"guest"] && name == b"arch" {
                    in_x86_64 = false;
                    for a in e.attributes() {
                        let a = a.map_err(quick_xml::Error::from)?;
                        if a.key.as_ref() == b"name" && a.unescape_value()? == "x86_64" {
                            in_x86_64 = true;
                        }
                    }
                }
                if in_x86_64
                    && parents == [b"capabilities".as_slice(), b"guest", b"arch"]
                    && name == b"domain"
                {
                    for a in e.attributes() {
                        let a = a.map_err(quick_xml::Error::from)?;
                        if a.key.as_ref() == b"type" {
                            let t = a.unescape_value()?.into_owned();
                            if !types.contains(&t) {
                                types.push(t);
                            }
                        }
                    }
                }
                path.push(name);
            }
            Event::End(_) => {
                let closed = path.pop();
                in_x86_64 &= closed.as_deref() != Some(b"arch".as_slice());
            }
            Event::Eof => return Ok(types),
            _ => {}
        }
    }
}

/// A host's libvirtd. See the module header.
#[derive(Debug)]
pub struct Libvirt {
    uri: String,
    conn: Mutex<Option<Arc<Conn>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Libvirt {
    /// An adapter for the libvirtd at `uri` (e.g. `qemu:///system`, or
    /// `qemu:///system?socket=/path/libvirt-sock`). Connects on first use.
    pub fn new(uri: &str) -> Self {
        process_setup();
        Libvirt {
            uri: uri.to_string(),
            conn: Mutex::new(None),
        }
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The shared connection, (re)opened when there is none or it is dead.
    fn connection(&self) -> Result<Arc<Conn>, HypervisorError> {
        let mut slot = lock(&self.conn);
        if let Some(c) = slot.as_ref() {
            if c.alive() {
                return Ok(c.clone());
            }
            tracing::info!(uri = %self.uri, "the libvirt connection is closed; reconnecting");
            *slot = None;
        }
        let c = Arc::new(Conn::open(&self.uri)?);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Drops `dead` as the shared connection (unless another call replaced it already).
    fn forget(&self, dead: &Arc<Conn>) {
        let mut slot = lock(&self.conn);
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, dead)) {
            *slot = None;
        }
    }

    /// Runs `f` on the connection; if it fails because the connection died under it,
    /// once more on a new one.
    fn call<T>(
        &self,
        operation: &'static str,
        uuid: Option<Uuid>,
        f: impl Fn(&Connect) -> Result<T, Fail>,
    ) -> Result<T, HypervisorError> {
        let conn = self.connection()?;
        let result = match f(&conn.0) {
            Err(_) if !conn.alive() => {
                tracing::info!(
                    uri = %self.uri,
                    operation,
                    "the libvirt connection closed during the call; retrying on a new one"
                );
                self.forget(&conn);
                drop(conn);
                let conn = self.connection()?;
                f(&conn.0)
            }
            r => r,
        };
        result.map_err(|fail| classify(operation, uuid, fail))
    }

    /// Runs `f` on the connection once, for calls that must not be repeated blindly.
    fn call_once<T>(
        &self,
        operation: &'static str,
        uuid: Option<Uuid>,
        f: impl FnOnce(&Connect) -> Result<T, Fail>,
    ) -> Result<T, HypervisorError> {
        let conn = self.connection()?;
        f(&conn.0).map_err(|fail| classify(operation, uuid, fail))
    }
}

impl Hypervisor for Libvirt {
    fn capabilities(&self) -> Result<HostCapabilities, HypervisorError> {
        let (lib, hyp, caps) = self.call("capabilities", None, |c| {
            Ok((
                c.get_lib_version()?,
                c.get_hyp_version()?,
                c.get_capabilities()?,
            ))
        })?;
        let domain_types = x86_64_domain_types(&caps).map_err(|source| HypervisorError::Host {
            operation: "capabilities",
            source: Box::new(LibvirtError::Capabilities { source }),
        })?;
        Ok(HostCapabilities {
            libvirt_version: version_string(lib),
            hypervisor_version: version_string(hyp),
            domain_types,
        })
    }

    fn list(&self) -> Result<Vec<DomainInfo>, HypervisorError> {
        self.call("list", None, |c| {
            let mut out = Vec::new();
            for dom in c.list_all_domains(0)? {
                match domain_info(&dom) {
                    Ok(info) => out.push(info),
                    // Gone between listing and asking (a transient domain stopped).
                    Err(e) if e.code() == ErrorNumber::NoDomain => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(out)
        })
    }

    fn lookup(&self, uuid: Uuid) -> Result<Option<DomainInfo>, HypervisorError> {
        self.call("lookup", Some(uuid), |c| match find(c, uuid)? {
            None => Ok(None),
            Some(dom) => match domain_info(&dom) {
                Ok(info) => Ok(Some(info)),
                Err(e) if e.code() == ErrorNumber::NoDomain => Ok(None),
                Err(e) => Err(e.into()),
            },
        })
    }

    fn xml(&self, uuid: Uuid) -> Result<String, HypervisorError> {
        self.call("xml", Some(uuid), |c| {
            // Flags 0: live XML while running, else the persistent one; never secrets
            // (VIR_DOMAIN_XML_SECURE is not asked for).
            Ok(require(c, uuid)?.get_xml_desc(0)?)
        })
    }

    fn define(&self, xml: &str) -> Result<DomainInfo, HypervisorError> {
        let uuid = domain_xml::summarize(xml).ok().map(|s| s.uuid);
        self.call("define", uuid, |c| {
            no_nul("domain XML", xml)?;
            // defineXML replaces the persistent definition of a domain with the same
            // UUID (and name); a running domain keeps its live configuration until its
            // next start.
            let dom = Domain::define_xml(c, xml)?;
            Ok(domain_info(&dom)?)
        })
    }

    fn start(&self, uuid: Uuid) -> Result<(), HypervisorError> {
        self.call("start", Some(uuid), |c| {
            let dom = require(c, uuid)?;
            if dom.is_active()? {
                return Ok(());
            }
            match dom.create() {
                Ok(_) => Ok(()),
                Err(e)
                    if e.code() == ErrorNumber::OperationInvalid
                        && dom.is_active().unwrap_or(false) =>
                {
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    fn shutdown(&self, uuid: Uuid) -> Result<(), HypervisorError> {
        self.call("shutdown", Some(uuid), |c| {
            let dom = require(c, uuid)?;
            if !dom.is_active()? {
                return Ok(());
            }
            match dom.shutdown_flags(virt::sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN) {
                Ok(_) => Ok(()),
                Err(e)
                    if e.code() == ErrorNumber::OperationInvalid
                        && !dom.is_active().unwrap_or(true) =>
                {
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    fn destroy(&self, uuid: Uuid) -> Result<(), HypervisorError> {
        self.call("destroy", Some(uuid), |c| {
            // Absent or stopped: nothing runs, as asked.
            let Some(dom) = find(c, uuid)? else {
                return Ok(());
            };
            if !dom.is_active()? {
                return Ok(());
            }
            match dom.destroy() {
                Ok(()) => Ok(()),
                Err(e) if e.code() == ErrorNumber::NoDomain => Ok(()),
                Err(e)
                    if e.code() == ErrorNumber::OperationInvalid
                        && !dom.is_active().unwrap_or(true) =>
                {
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    fn reset(&self, uuid: Uuid) -> Result<(), HypervisorError> {
        self.call("reset", Some(uuid), |c| {
            require(c, uuid)?.reset()?;
            Ok(())
        })
    }

    fn undefine(&self, uuid: Uuid) -> Result<(), HypervisorError> {
        self.call("undefine", Some(uuid), |c| {
            let Some(dom) = find(c, uuid)? else {
                return Ok(());
            };
            // A transient domain has no definition to remove.
            if !dom.is_persistent()? {
                return Ok(());
            }
            let flags = virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | virt::sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                | virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM;
            match dom.undefine_flags(flags) {
                Ok(()) => Ok(()),
                Err(e) if e.code() == ErrorNumber::NoDomain => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn attach_device(&self, uuid: Uuid, xml: &str) -> Result<(), HypervisorError> {
        // Not retried on a new connection: an attach that happened before the old one
        // died would be made twice (libvirt does not refuse a second NIC with the same
        // MAC). The caller reads the live XML again and decides.
        self.call_once("attach_device", Some(uuid), |c| {
            no_nul("device XML", xml)?;
            let dom = require(c, uuid)?;
            // libvirt applies both or neither (the persistent definition is saved only
            // once the hot-plug succeeded).
            dom.attach_device_flags(xml, affect_both(&dom)?)?;
            Ok(())
        })
    }

    fn detach_device(&self, uuid: Uuid, xml: &str) -> Result<(), HypervisorError> {
        self.call("detach_device", Some(uuid), |c| {
            no_nul("device XML", xml)?;
            let dom = require(c, uuid)?;
            let flags = affect_both(&dom)?;
            // For a live detach libvirt sends the unplug request and waits up to 5 s for
            // the guest; it returns success either way (the device then stays in the live
            // XML until the guest lets go of it).
            match dom.detach_device_flags(xml, flags) {
                Ok(_) => Ok(()),
                Err(e) if e.code() == ErrorNumber::DeviceMissing => {
                    // Gone from one of the two already (typically: an unplug the guest
                    // has not finished leaves it in the live XML only).
                    for one in [
                        virt::sys::VIR_DOMAIN_AFFECT_LIVE,
                        virt::sys::VIR_DOMAIN_AFFECT_CONFIG,
                    ] {
                        if flags & one == 0 {
                            continue;
                        }
                        match dom.detach_device_flags(xml, one) {
                            Ok(_) => {}
                            Err(e) if e.code() == ErrorNumber::DeviceMissing => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    fn set_metadata(
        &self,
        uuid: Uuid,
        metadata: &domain_xml::KeelMetadata,
    ) -> Result<(), HypervisorError> {
        let element = domain_xml::render_metadata_element(metadata).map_err(|source| {
            classify(
                "set_metadata",
                Some(uuid),
                Fail::Other(LibvirtError::Metadata { source }),
            )
        })?;
        self.call("set_metadata", Some(uuid), |c| {
            let dom = require(c, uuid)?;
            // Replaces the element libvirt holds for this namespace URI (the prefix is
            // libvirt's to choose; readers go by the URI).
            dom.set_metadata(
                virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(&element),
                Some(domain_xml::KEEL_METADATA_PREFIX),
                Some(domain_xml::KEEL_METADATA_NS),
                affect_both(&dom)?,
            )?;
            Ok(())
        })
    }

    fn migrate(&self, uuid: Uuid, request: &MigrationRequest) -> Result<(), HypervisorError> {
        let fail = |f| classify("migrate", Some(uuid), f);
        no_nul("destination URI", &request.dest_uri).map_err(fail)?;
        no_nul("migration URI", &request.migrate_uri).map_err(fail)?;
        if let Some(a) = &request.listen_address {
            no_nul("listen address", a).map_err(fail)?;
        }
        no_nul("destination XML", &request.dest_xml).map_err(fail)?;
        for d in &request.disks {
            no_nul("disk name", d).map_err(fail)?;
        }
        let dest = Connect::open(Some(&request.dest_uri))
            .map(Conn)
            .map_err(|source| {
                fail(Fail::Other(LibvirtError::Destination {
                    uri: request.dest_uri.clone(),
                    source,
                }))
            })?;
        dest.keepalive();
        let conn = self.connection()?;
        let dom = require(&conn.0, uuid).map_err(fail)?;
        let params = MigrateParameters {
            dest_xml: Some(request.dest_xml.clone()),
            uri: (!request.migrate_uri.is_empty()).then(|| request.migrate_uri.clone()),
            listen_address: request.listen_address.clone(),
            disks_port: request.disks_port.map(i32::from),
            migrate_disks: if request.copy_storage {
                request.disks.clone()
            } else {
                Vec::new()
            },
            ..MigrateParameters::default()
        };
        let mut flags = virt::sys::VIR_MIGRATE_LIVE
            | virt::sys::VIR_MIGRATE_PERSIST_DEST
            | virt::sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        if request.copy_storage {
            flags |= virt::sys::VIR_MIGRATE_NON_SHARED_INC;
        }
        // Blocks until qemu finished (or failed); not retried on a dead connection: the
        // caller must look at both hosts to learn where the domain ended up.
        dom.migrate3(&dest.0, params, flags)
            .map(drop)
            .map_err(|e| fail(e.into()))
    }

    fn open_console(&self, uuid: Uuid) -> Result<Box<dyn ConsoleStream>, HypervisorError> {
        // A connection of its own: a console lives long and its stream is aborted on
        // close; neither should touch the connection every other call shares.
        let conn = Conn::open(&self.uri)?;
        let fail = |f| classify("open_console", Some(uuid), f);
        let dom = require(&conn.0, uuid).map_err(fail)?;
        let stream =
            Stream::new(&conn.0, virt::sys::VIR_STREAM_NONBLOCK).map_err(|e| fail(e.into()))?;
        dom.open_console(None, &stream, virt::sys::VIR_DOMAIN_CONSOLE_FORCE)
            .map_err(|e| fail(e.into()))?;
        Ok(Box::new(LibvirtConsole {
            stream,
            read_lock: Mutex::new(()),
            write_lock: Mutex::new(()),
            closed: AtomicBool::new(false),
            _conn: conn,
        }))
    }
}

/// A domain's serial console as a non-blocking libvirt stream.
///
/// Why non-blocking: a blocking `virStreamRecv` with no data queued sends a "wait for
/// stream data" call and sleeps until a stream packet completes it, but libvirt's client
/// completes only the *first* pending call of that stream. When a `write` on another
/// thread is in flight at the moment the guest's answer arrives, the packet is queued and
/// the write's call is found first, so the reader keeps sleeping with data waiting for it
/// until the next packet — the tail of an echo went missing under load (CI saw
/// "after-migratio" without its "n"). Non-blocking, the data is read off the socket by
/// libvirt's event loop (`libvirt-events`, see the module header) into the stream's
/// queue; `read` takes what is queued and, when nothing is (libvirt's `-2`), sleeps a
/// little (1 ms, doubling to [`CONSOLE_POLL_MAX`]) and looks again. Writes are
/// fire-and-forget stream packets either way.
///
/// `read` and `write` each take only their own lock (readers serialised among themselves,
/// writers among themselves, as a byte stream needs), so an idle reader never holds up a
/// keystroke. `close` sets the closed flag, which a polling reader sees within
/// [`CONSOLE_POLL_MAX`], and aborts the stream (through a second reference, since `virt`
/// consumes the stream it aborts). Dropping closes, then frees the stream, then closes
/// the console's own connection.
pub struct LibvirtConsole {
    // Field order is drop order: the stream before the connection it belongs to.
    stream: Stream,
    read_lock: Mutex<()>,
    write_lock: Mutex<()>,
    closed: AtomicBool,
    _conn: Conn,
}

impl std::fmt::Debug for LibvirtConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtConsole")
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ConsoleStream for LibvirtConsole {
    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let _reader = lock(&self.read_lock);
        let mut pause = Duration::from_millis(1);
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Ok(0);
            }
            match self.stream.recv(buf) {
                Ok(n) => return Ok(n),
                Err(e) if would_block(&e) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(CONSOLE_POLL_MAX);
                }
                // Aborted by `close` from another thread.
                Err(_) if self.closed.load(Ordering::Acquire) => return Ok(0),
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
    }

    fn write(&self, data: &[u8]) -> std::io::Result<usize> {
        if self.closed.load(Ordering::Acquire) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the console is closed",
            ));
        }
        if data.is_empty() {
            return Ok(0);
        }
        let _writer = lock(&self.write_lock);
        let chunk = &data[..data.len().min(CONSOLE_WRITE_CHUNK)];
        self.stream.send(chunk).map_err(std::io::Error::other)
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.stream.clone().abort() {
            tracing::debug!(error = %e, "aborting a console stream failed");
        }
    }
}

/// Whether a failed non-blocking stream call only had nothing to do yet. libvirt returns
/// `-2` then without setting an error, which `virt` 0.4.3 turns into its catch-all error
/// with no error domain; every real libvirt error names its domain.
fn would_block(e: &VirtError) -> bool {
    matches!(e.domain(), virt::error::ErrorDomain::None) && e.code() == ErrorNumber::InternalError
}

impl Drop for LibvirtConsole {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_decoded() {
        assert_eq!(version_string(9_000_000), "9.0.0");
        assert_eq!(version_string(10_000_002), "10.0.2");
        assert_eq!(version_string(8_010_003), "8.10.3");
    }

    #[test]
    fn domain_types_of_x86_64_only() {
        let caps = r#"<capabilities>
  <host><uuid>x</uuid><cpu><arch>x86_64</arch></cpu></host>
  <guest>
    <os_type>hvm</os_type>
    <arch name='i686'>
      <wordsize>32</wordsize>
      <domain type='qemu'/>
      <domain type='xen-only-on-i686'/>
    </arch>
  </guest>
  <guest>
    <os_type>hvm</os_type>
    <arch name='x86_64'>
      <wordsize>64</wordsize>
      <emulator>/usr/bin/qemu-system-x86_64</emulator>
      <machine maxCpus='255'>pc-i440fx-10.0</machine>
      <domain type='qemu'/>
      <domain type='kvm'>
        <emulator>/usr/bin/qemu-system-x86_64</emulator>
      </domain>
    </arch>
    <features><acpi default='on' toggle='yes'/></features>
  </guest>
</capabilities>"#;
        assert_eq!(x86_64_domain_types(caps).unwrap(), vec!["qemu", "kvm"]);
        assert!(x86_64_domain_types("<capabilities/>").unwrap().is_empty());
    }

    #[test]
    fn states_map() {
        use virt::sys::*;
        assert_eq!(map_state(VIR_DOMAIN_RUNNING), DomainState::Running);
        assert_eq!(map_state(VIR_DOMAIN_BLOCKED), DomainState::Running);
        assert_eq!(map_state(VIR_DOMAIN_PAUSED), DomainState::Paused);
        assert_eq!(map_state(VIR_DOMAIN_SHUTDOWN), DomainState::ShuttingDown);
        assert_eq!(map_state(VIR_DOMAIN_SHUTOFF), DomainState::ShutOff);
        assert_eq!(map_state(VIR_DOMAIN_CRASHED), DomainState::Crashed);
        assert_eq!(map_state(VIR_DOMAIN_PMSUSPENDED), DomainState::Other);
        assert_eq!(map_state(VIR_DOMAIN_NOSTATE), DomainState::Other);
    }

    #[test]
    fn an_unreachable_daemon_is_a_connect_error_and_nul_bytes_never_reach_virt() {
        let hv = Libvirt::new("qemu:///system?socket=/nonexistent/keel-test/libvirt-sock");
        match hv.list() {
            Err(HypervisorError::Connect { uri, .. }) => assert!(uri.contains("/nonexistent/")),
            other => panic!("expected a connect error, got {other:?}"),
        }
        let hv = Libvirt::new("qemu:///system\0");
        assert!(matches!(
            hv.capabilities(),
            Err(HypervisorError::Connect { .. })
        ));
    }
}
