//! An in-memory [`Hypervisor`] for tests of the logic above it (the compute reconciler).
//!
//! It behaves like the libvirt adapter where the reconciler can tell the difference:
//! definitions are keyed by UUID and replaced by a redefine; a redefine of a running
//! domain changes only its persistent definition (what the next start uses); start,
//! destroy and undefine are idempotent; undefining a running domain leaves it running as
//! a transient domain that vanishes when it stops; a console opened while another one is
//! open takes over (a read on the old one fails, as libvirt's "stream had I/O failure"),
//! and a console of a domain that stops reads end-of-file.
//!
//! Knobs for tests:
//! * [`FakeHypervisor::set_ignores_acpi`] — `shutdown` is accepted but the guest keeps
//!   running (tests the reconciler's shutdown timeout and destroy fallback).
//! * [`FakeHypervisor::fail_next`] — the next call of an operation fails (queued: two
//!   calls, two failures), before it changes anything.
//! * [`FakeHypervisor::calls`] — how often each operation was called, failed calls
//!   included (idempotence tests: "a second reconcile pass calls nothing").
//! * [`FakeHypervisor::set_state`] — what happens outside the reconciler's control (a
//!   guest crashes, powers itself off).
//! * [`FakeHypervisor::guest_console`] — the guest's side of the serial console.
//! * [`FakeHypervisor::set_ignores_unplug`] — the guest never releases a NIC asked to be
//!   hot-unplugged (it stays in the live XML).
//!
//! Devices (NICs only): `attach_device` adds the `<interface>` to the live XML while the
//! domain is active and to the persistent one (a MAC already there fails, before anything
//! changes); `detach_device` removes it from the persistent XML at once and, while
//! active, asks the guest, which lets go asynchronously: the device leaves the live XML
//! at the next `xml` call (never, with `set_ignores_unplug`). `set_metadata` rewrites
//! Keel's metadata element in both.
//!
//! Migration: a fake made with [`FakeRegistry::host`] moves a migrated domain into the
//! fake registered under `dest_uri` (defined there from `dest_xml`, running, persistent;
//! an unknown `dest_uri` fails like an unreachable host). A standalone fake
//! ([`FakeHypervisor::new`]) simply removes the domain. Either way the request is
//! recorded ([`FakeHypervisor::migrations`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use uuid::Uuid;

use crate::hypervisor::domain_xml::{self, DomainSummary};
use crate::hypervisor::{
    ConsoleStream, DomainInfo, DomainState, HostCapabilities, Hypervisor, HypervisorError,
    MigrationRequest,
};

/// The operations of [`Hypervisor`], for failure injection and call counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FakeOp {
    Capabilities,
    List,
    Lookup,
    Xml,
    Define,
    Start,
    Shutdown,
    Destroy,
    Reset,
    Undefine,
    Migrate,
    OpenConsole,
    AttachDevice,
    DetachDevice,
    SetMetadata,
}

impl FakeOp {
    /// The operation name used in [`HypervisorError`]s (the same as the real adapter's).
    pub fn as_str(self) -> &'static str {
        match self {
            FakeOp::Capabilities => "capabilities",
            FakeOp::List => "list",
            FakeOp::Lookup => "lookup",
            FakeOp::Xml => "xml",
            FakeOp::Define => "define",
            FakeOp::Start => "start",
            FakeOp::Shutdown => "shutdown",
            FakeOp::Destroy => "destroy",
            FakeOp::Reset => "reset",
            FakeOp::Undefine => "undefine",
            FakeOp::Migrate => "migrate",
            FakeOp::OpenConsole => "open_console",
            FakeOp::AttachDevice => "attach_device",
            FakeOp::DetachDevice => "detach_device",
            FakeOp::SetMetadata => "set_metadata",
        }
    }
}

/// Why a fake call failed (the `source` of the [`HypervisorError`] it returns).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FakeError {
    #[error("injected failure")]
    Injected,
    #[error("domain is not running")]
    NotRunning,
    #[error("domain name {name:?} is already used by domain {uuid}")]
    NameTaken { name: String, uuid: Uuid },
    #[error("no fake hypervisor is registered at {uri}")]
    UnknownHost { uri: String },
    #[error("invalid domain XML: {reason}")]
    BadXml { reason: String },
    #[error("the domain already has a NIC with MAC {mac}")]
    DeviceExists { mac: String },
}

/// One domain as the fake holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDomain {
    pub state: DomainState,
    pub persistent: bool,
    /// The persistent definition (what the next start runs).
    pub config: FakeDefinition,
    /// What runs now, while the domain is active.
    pub live: Option<FakeDefinition>,
    /// Shutdown requests received (also those the guest ignored).
    pub shutdown_requests: u32,
    /// Hard resets.
    pub resets: u32,
}

/// A definition: the XML as given and what was read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDefinition {
    pub xml: String,
    pub name: String,
    pub vcpus: u32,
    pub memory_kib: u64,
}

impl FakeDomain {
    /// The definition in effect: live while active, else the persistent one.
    pub fn current(&self) -> &FakeDefinition {
        self.live.as_ref().unwrap_or(&self.config)
    }
}

fn is_active(state: DomainState) -> bool {
    matches!(
        state,
        DomainState::Running | DomainState::Paused | DomainState::ShuttingDown
    )
}

/// Fake hosts by URI, so that a migration can find its destination.
#[derive(Debug, Clone, Default)]
pub struct FakeRegistry {
    hosts: Arc<Mutex<BTreeMap<String, Weak<FakeHypervisor>>>>,
}

impl FakeRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new fake host reachable as `uri` (replacing any earlier one there).
    pub fn host(&self, uri: &str) -> Arc<FakeHypervisor> {
        let hv = Arc::new(FakeHypervisor {
            state: Mutex::new(State::default()),
            registry: Some(self.clone()),
        });
        lock(&self.hosts).insert(uri.to_string(), Arc::downgrade(&hv));
        hv
    }

    /// The live host registered as `uri`.
    pub fn get(&self, uri: &str) -> Option<Arc<FakeHypervisor>> {
        lock(&self.hosts).get(uri).and_then(Weak::upgrade)
    }
}

#[derive(Debug, Default)]
struct State {
    domains: BTreeMap<Uuid, FakeDomain>,
    ignores_acpi: BTreeMap<Uuid, bool>,
    ignores_unplug: BTreeMap<Uuid, bool>,
    /// MACs whose hot-unplug was requested and not yet done, by domain.
    unplugs: BTreeMap<Uuid, Vec<String>>,
    fail_next: BTreeMap<FakeOp, u32>,
    calls: BTreeMap<FakeOp, u64>,
    migrations: Vec<(Uuid, MigrationRequest)>,
    capabilities: Option<HostCapabilities>,
    consoles: BTreeMap<Uuid, Arc<ConsoleSession>>,
}

/// The in-memory hypervisor. See the module header.
#[derive(Debug)]
pub struct FakeHypervisor {
    state: Mutex<State>,
    registry: Option<FakeRegistry>,
}

impl Default for FakeHypervisor {
    fn default() -> Self {
        Self::new()
    }
}

/// Locks, ignoring poisoning: a test that panicked while holding the lock has failed
/// already, and the state stays readable for its report.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn op_err(op: FakeOp, uuid: Uuid, e: FakeError) -> HypervisorError {
    HypervisorError::Operation {
        operation: op.as_str(),
        uuid,
        source: Box::new(e),
    }
}

fn host_err(op: FakeOp, e: FakeError) -> HypervisorError {
    HypervisorError::Host {
        operation: op.as_str(),
        source: Box::new(e),
    }
}

impl FakeHypervisor {
    /// A standalone fake host (a migration away from it just removes the domain).
    pub fn new() -> Self {
        FakeHypervisor {
            state: Mutex::new(State::default()),
            registry: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Counts the call and consumes an injected failure, if one is queued.
    fn enter(&self, st: &mut State, op: FakeOp) -> Result<(), FakeError> {
        *st.calls.entry(op).or_default() += 1;
        match st.fail_next.get_mut(&op) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(FakeError::Injected)
            }
            _ => Ok(()),
        }
    }

    /// Makes the next call of `op` fail with [`FakeError::Injected`] (calling this twice
    /// makes the next two calls fail).
    pub fn fail_next(&self, op: FakeOp) {
        *self.lock().fail_next.entry(op).or_default() += 1;
    }

    /// How many times `op` was called (failed calls included).
    pub fn calls(&self, op: FakeOp) -> u64 {
        self.lock().calls.get(&op).copied().unwrap_or(0)
    }

    /// Calls of every operation.
    pub fn all_calls(&self) -> BTreeMap<FakeOp, u64> {
        self.lock().calls.clone()
    }

    /// Forgets the call counts.
    pub fn reset_calls(&self) {
        self.lock().calls.clear();
    }

    /// With `true`, `shutdown` of this domain is accepted but the guest keeps running.
    pub fn set_ignores_acpi(&self, uuid: Uuid, ignores: bool) {
        self.lock().ignores_acpi.insert(uuid, ignores);
    }

    /// With `true`, the guest of this domain never releases a NIC asked to be unplugged.
    pub fn set_ignores_unplug(&self, uuid: Uuid, ignores: bool) {
        self.lock().ignores_unplug.insert(uuid, ignores);
    }

    /// Sets a domain's state as if the guest or the host did it (a crash, a power-off
    /// from inside). Leaving the active states ends a transient domain and its console.
    /// Returns false when there is no such domain.
    pub fn set_state(&self, uuid: Uuid, state: DomainState) -> bool {
        let mut st = self.lock();
        if !st.domains.contains_key(&uuid) {
            return false;
        }
        if is_active(state) {
            let Some(d) = st.domains.get_mut(&uuid) else {
                return false;
            };
            if d.live.is_none() {
                d.live = Some(d.config.clone());
            }
            d.state = state;
        } else {
            stop(&mut st, uuid, state);
        }
        true
    }

    /// The capabilities `capabilities()` returns (default: libvirt 9.0.0, QEMU 10.0.2,
    /// `qemu` only).
    pub fn set_capabilities(&self, caps: HostCapabilities) {
        self.lock().capabilities = Some(caps);
    }

    /// A copy of one domain.
    pub fn domain(&self, uuid: Uuid) -> Option<FakeDomain> {
        self.lock().domains.get(&uuid).cloned()
    }

    /// Copies of every domain, by UUID.
    pub fn domains(&self) -> BTreeMap<Uuid, FakeDomain> {
        self.lock().domains.clone()
    }

    /// Every migration requested from this host, in order.
    pub fn migrations(&self) -> Vec<(Uuid, MigrationRequest)> {
        self.lock().migrations.clone()
    }

    /// The guest's end of the domain's open console, if one is open.
    pub fn guest_console(&self, uuid: Uuid) -> Option<GuestConsole> {
        let st = self.lock();
        let session = st.consoles.get(&uuid)?.clone();
        drop(st);
        let open = lock(&session.inner).end.is_none();
        open.then_some(GuestConsole { session })
    }

    fn info(uuid: Uuid, d: &FakeDomain) -> DomainInfo {
        let cur = d.current();
        DomainInfo {
            uuid,
            name: cur.name.clone(),
            state: d.state,
            persistent: d.persistent,
            vcpus: cur.vcpus,
            memory_kib: cur.memory_kib,
        }
    }

    /// Defines (or redefines) a domain from `xml` in `st`.
    fn define_in(st: &mut State, xml: &str) -> Result<DomainInfo, FakeError> {
        let DomainSummary {
            uuid,
            name,
            vcpus,
            memory_kib,
        } = domain_xml::summarize(xml).map_err(|e| FakeError::BadXml {
            reason: e.to_string(),
        })?;
        if let Some((&other, _)) = st
            .domains
            .iter()
            .find(|(u, d)| **u != uuid && (d.current().name == name || d.config.name == name))
        {
            return Err(FakeError::NameTaken { name, uuid: other });
        }
        let def = FakeDefinition {
            xml: xml.to_string(),
            name,
            vcpus,
            memory_kib,
        };
        let d = st.domains.entry(uuid).or_insert_with(|| FakeDomain {
            state: DomainState::ShutOff,
            persistent: true,
            config: def.clone(),
            live: None,
            shutdown_requests: 0,
            resets: 0,
        });
        d.config = def;
        d.persistent = true;
        Ok(Self::info(uuid, d))
    }
}

/// Stops `uuid` into `state` (an inactive one): ends its console, drops it if transient.
fn stop(st: &mut State, uuid: Uuid, state: DomainState) {
    if let Some(session) = st.consoles.remove(&uuid) {
        session.end(End::DomainStopped);
    }
    let Some(d) = st.domains.get_mut(&uuid) else {
        return;
    };
    d.state = state;
    d.live = None;
    if !d.persistent {
        st.domains.remove(&uuid);
    }
    st.unplugs.remove(&uuid);
}

/// The guest lets go of the NICs asked to be unplugged (unless it ignores such requests).
fn finish_unplugs(st: &mut State, uuid: Uuid) {
    if st.ignores_unplug.get(&uuid).copied().unwrap_or(false) {
        return;
    }
    let Some(macs) = st.unplugs.remove(&uuid) else {
        return;
    };
    if let Some(live) = st.domains.get_mut(&uuid).and_then(|d| d.live.as_mut()) {
        for mac in macs {
            if let Ok((xml, _)) = remove_interface(&live.xml, &mac) {
                live.xml = xml;
            }
        }
    }
}

fn bad_xml(e: impl std::fmt::Display) -> FakeError {
    FakeError::BadXml {
        reason: e.to_string(),
    }
}

/// The MAC of a device definition that must be exactly one `<interface>`.
fn device_mac(device: &str) -> Result<String, FakeError> {
    let nics = domain_xml::read_nics(&format!("<domain><devices>{device}</devices></domain>"))
        .map_err(bad_xml)?;
    match nics.as_slice() {
        [nic] if !nic.mac.is_empty() => Ok(nic.mac.clone()),
        _ => Err(bad_xml("expected one <interface> with a MAC address")),
    }
}

fn has_nic(xml: &str, mac: &str) -> bool {
    domain_xml::read_nics(xml).is_ok_and(|nics| nics.iter().any(|n| n.mac == mac))
}

/// `xml` with `device` added as the last element of `<devices>`.
fn insert_device(xml: &str, device: &str) -> Result<String, FakeError> {
    let at = xml
        .rfind("</devices>")
        .ok_or_else(|| bad_xml("no </devices> in the domain XML"))?;
    Ok(format!("{}{}\n  {}", &xml[..at], device.trim(), &xml[at..]))
}

/// `xml` without the `<interface>` whose MAC is `mac`, and whether there was one.
fn remove_interface(xml: &str, mac: &str) -> Result<(String, bool), FakeError> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut start: Option<usize> = None;
    let mut matches = false;
    loop {
        let before = reader.buffer_position() as usize;
        let event = reader.read_event().map_err(bad_xml)?;
        let (name, opens) = match &event {
            Event::Start(e) => (e.local_name().as_ref().to_vec(), true),
            Event::Empty(e) => (e.local_name().as_ref().to_vec(), false),
            Event::End(_) => {
                let closed = path.pop();
                if path.len() == 2 && closed.as_deref() == Some(b"interface".as_slice()) {
                    if let Some(from) = start.take().filter(|_| matches) {
                        let to = reader.buffer_position() as usize;
                        return Ok((format!("{}{}", &xml[..from], &xml[to..]), true));
                    }
                }
                continue;
            }
            Event::Eof => return Ok((xml.to_string(), false)),
            _ => continue,
        };
        if path.len() == 2 && name == b"interface" {
            start = Some(before);
            matches = false;
        }
        if path.len() == 3 && path[2] == b"interface" && name == b"mac" {
            if let Event::Start(e) | Event::Empty(e) = &event {
                for a in e.attributes().flatten() {
                    if a.key.as_ref() == b"address"
                        && a.unescape_value()
                            .is_ok_and(|v| v.eq_ignore_ascii_case(mac))
                    {
                        matches = true;
                    }
                }
            }
        }
        if opens {
            path.push(name);
        }
    }
}

/// `xml` with Keel's metadata element replaced by one for `m`.
fn replace_metadata(xml: &str, m: &domain_xml::KeelMetadata) -> Result<String, FakeError> {
    use quick_xml::events::Event;
    use quick_xml::name::ResolveResult;
    let element = domain_xml::render_metadata_element(m).map_err(bad_xml)?;
    let element = format!(
        "<{p}:vm xmlns:{p}=\"{ns}\"{rest}",
        p = domain_xml::KEEL_METADATA_PREFIX,
        ns = domain_xml::KEEL_METADATA_NS,
        rest = element.trim_start_matches("<vm")
    );
    let mut reader = quick_xml::reader::NsReader::from_str(xml);
    let mut depth = 0usize;
    let mut start: Option<usize> = None;
    loop {
        let before = reader.buffer_position() as usize;
        let (ns, event) = reader.read_resolved_event().map_err(bad_xml)?;
        let ours = matches!(ns, ResolveResult::Bound(n) if n.as_ref() == domain_xml::KEEL_METADATA_NS.as_bytes());
        match event {
            Event::Start(e) => {
                if ours && depth == 2 && e.local_name().as_ref() == b"vm" {
                    start = Some(before);
                }
                depth += 1;
            }
            Event::Empty(e) if ours && depth == 2 && e.local_name().as_ref() == b"vm" => {
                let to = reader.buffer_position() as usize;
                return Ok(format!("{}{element}{}", &xml[..before], &xml[to..]));
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                if depth == 2 {
                    if let Some(from) = start.take() {
                        let to = reader.buffer_position() as usize;
                        return Ok(format!("{}{element}{}", &xml[..from], &xml[to..]));
                    }
                }
            }
            Event::Eof => return Err(bad_xml("the domain has no Keel metadata to replace")),
            _ => {}
        }
    }
}

impl Hypervisor for FakeHypervisor {
    fn capabilities(&self) -> Result<HostCapabilities, HypervisorError> {
        let mut st = self.lock();
        self.enter(&mut st, FakeOp::Capabilities)
            .map_err(|e| host_err(FakeOp::Capabilities, e))?;
        Ok(st.capabilities.clone().unwrap_or_else(|| HostCapabilities {
            libvirt_version: "9.0.0".into(),
            hypervisor_version: "10.0.2".into(),
            domain_types: vec!["qemu".into()],
        }))
    }

    fn list(&self) -> Result<Vec<DomainInfo>, HypervisorError> {
        let mut st = self.lock();
        self.enter(&mut st, FakeOp::List)
            .map_err(|e| host_err(FakeOp::List, e))?;
        Ok(st.domains.iter().map(|(u, d)| Self::info(*u, d)).collect())
    }

    fn lookup(&self, uuid: Uuid) -> Result<Option<DomainInfo>, HypervisorError> {
        let mut st = self.lock();
        self.enter(&mut st, FakeOp::Lookup)
            .map_err(|e| op_err(FakeOp::Lookup, uuid, e))?;
        Ok(st.domains.get(&uuid).map(|d| Self::info(uuid, d)))
    }

    fn xml(&self, uuid: Uuid) -> Result<String, HypervisorError> {
        let mut st = self.lock();
        self.enter(&mut st, FakeOp::Xml)
            .map_err(|e| op_err(FakeOp::Xml, uuid, e))?;
        finish_unplugs(&mut st, uuid);
        st.domains
            .get(&uuid)
            .map(|d| d.current().xml.clone())
            .ok_or(HypervisorError::NoSuchDomain { uuid })
    }

    fn define(&self, xml: &str) -> Result<DomainInfo, HypervisorError> {
        let mut st = self.lock();
        let uuid = domain_xml::summarize(xml).map(|s| s.uuid).ok();
        let err = |e| match uuid {
            Some(uuid) => op_err(FakeOp::Define, uuid, e),
            None => host_err(FakeOp::Define, e),
        };
        self.enter(&mut st, FakeOp::Define).map_err(err)?;
        Self::define_in(&mut st, xml).map_err(err)
    }

    fn start(&self, uuid: Uuid) -> Result<(), HypervisorError> {
        let mut st = self.lock();
        self.enter(&mut st, FakeOp::Start)
            .map_err(|e| op_err(FakeOp::Start, uuid, e))?;
        let d = st
            .domains
            .get_mut(&uuid)
            .ok_or(HypervisorError::NoSuchDomain { uuid })?;
        if !is_active(d.state) {
            d.state = DomainState::Running;
            d.live = Some(d.config.clone());
        }
        Ok(())
    }

    fn shutdown(&self, uuid: Uuid) -> Result<(), HypervisorError> {
        let mut st = self.lock();
        self.enter(&mut st, FakeOp::Shutdown)
            .map_err(|e| op_err(FakeOp::Shutdown, uuid, e))?;
        let ignores = st.ignores_acpi.get(&uuid).copied().unwrap_or(false);
        let d = st
            .domains
            .get_mut(&uuid)
            .ok_or(HypervisorError::NoSuchDomain { uuid })?;
        if !is_active(d.state) {
            return Ok(());
        }
        d.shutdown_requests += 1;
        if d.state == DomainState::Running && !ignores {
            stop(&mut st, uuid, DomainState::ShutOff);
        }
        Ok(())
    }

    fn destroy(&self, uuid: Uuid) -> Result<(), HypervisorError> {
        let mut st = self.lock();
        self.enter(&mut st, FakeOp::Destroy)
            .map_err(|e| op_err(FakeOp::Destroy, uuid, e))?;
        match st.domains.get(&uuid) {
            Some(d) if is_active(d.state) => stop(&mut st, uuid, DomainState::ShutOff),
            // Stopped or absent: nothing runs, as asked.
            _ => {}
        }
        Ok(())
    }

    fn reset(&self, uuid: Uuid) -> Result<(), HypervisorError> {
        let mut st = self.lock();
        self.enter(&mut st, FakeOp::Reset)
            .map_err(|e| op_err(FakeOp::Reset, uuid, e))?;
        let d = st
            .domains
            .get_mut(&uuid)
            .ok_or(HypervisorError::NoSuchDomain { uuid })?;
        if !is_active(d.state) {
            return Err(op_err(FakeOp::Reset, uuid, FakeError::NotRunning));
        }
        d.resets += 1;
        Ok(())
    }

    fn undefine(&self, uuid: Uuid) -> Result<(), HypervisorError> {
        let mut st = self.lock();
        self.enter(&mut st, FakeOp::Undefine)
            .map_err(|e| op_err(FakeOp::Undefine, uuid, e))?;
        let active = match st.domains.get_mut(&uuid) {
            None => return Ok(()),
            Some(d) if is_active(d.state) => {
                // Like libvirt: it keeps running, transient, and vanishes when it stops.
                d.persistent = false;
                true
            }
            Some(_) => false,
        };
        if !active {
            st.domains.remove(&uuid);
            st.ignores_acpi.remove(&uuid);
            st.ignores_unplug.remove(&uuid);
        }
        Ok(())
    }

    fn attach_device(&self, uuid: Uuid, xml: &str) -> Result<(), HypervisorError> {
        let mut st = self.lock();
        let err = |e| op_err(FakeOp::AttachDevice, uuid, e);
        self.enter(&mut st, FakeOp::AttachDevice).map_err(err)?;
        let mac = device_mac(xml).map_err(err)?;
        let d = st
            .domains
            .get_mut(&uuid)
            .ok_or(HypervisorError::NoSuchDomain { uuid })?;
        let mut defs: Vec<&mut FakeDefinition> = Vec::new();
        if d.persistent {
            defs.push(&mut d.config);
        }
        defs.extend(d.live.as_mut());
        if defs.iter().any(|def| has_nic(&def.xml, &mac)) {
            return Err(err(FakeError::DeviceExists { mac }));
        }
        let new: Vec<String> = defs
            .iter()
            .map(|def| insert_device(&def.xml, xml))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        for (def, xml) in defs.into_iter().zip(new) {
            def.xml = xml;
        }
        Ok(())
    }

    fn detach_device(&self, uuid: Uuid, xml: &str) -> Result<(), HypervisorError> {
        let mut st = self.lock();
        let err = |e| op_err(FakeOp::DetachDevice, uuid, e);
        self.enter(&mut st, FakeOp::DetachDevice).map_err(err)?;
        let mac = device_mac(xml).map_err(err)?;
        let d = st
            .domains
            .get_mut(&uuid)
            .ok_or(HypervisorError::NoSuchDomain { uuid })?;
        if d.persistent {
            let (config, _) = remove_interface(&d.config.xml, &mac).map_err(err)?;
            d.config.xml = config;
        }
        let live = d.live.as_ref().is_some_and(|l| has_nic(&l.xml, &mac));
        if live {
            let pending = st.unplugs.entry(uuid).or_default();
            if !pending.contains(&mac) {
                pending.push(mac);
            }
        }
        Ok(())
    }

    fn set_metadata(
        &self,
        uuid: Uuid,
        metadata: &domain_xml::KeelMetadata,
    ) -> Result<(), HypervisorError> {
        let mut st = self.lock();
        let err = |e| op_err(FakeOp::SetMetadata, uuid, e);
        self.enter(&mut st, FakeOp::SetMetadata).map_err(err)?;
        let d = st
            .domains
            .get_mut(&uuid)
            .ok_or(HypervisorError::NoSuchDomain { uuid })?;
        let config = replace_metadata(&d.config.xml, metadata).map_err(err)?;
        let live = match &d.live {
            Some(l) => Some(replace_metadata(&l.xml, metadata).map_err(err)?),
            None => None,
        };
        d.config.xml = config;
        if let (Some(l), Some(xml)) = (d.live.as_mut(), live) {
            l.xml = xml;
        }
        Ok(())
    }

    fn migrate(&self, uuid: Uuid, request: &MigrationRequest) -> Result<(), HypervisorError> {
        let dest = {
            let mut st = self.lock();
            self.enter(&mut st, FakeOp::Migrate)
                .map_err(|e| op_err(FakeOp::Migrate, uuid, e))?;
            st.migrations.push((uuid, request.clone()));
            let d = st
                .domains
                .get(&uuid)
                .ok_or(HypervisorError::NoSuchDomain { uuid })?;
            if d.state != DomainState::Running {
                return Err(op_err(FakeOp::Migrate, uuid, FakeError::NotRunning));
            }
            match &self.registry {
                Some(reg) => Some(reg.get(&request.dest_uri).ok_or_else(|| {
                    op_err(
                        FakeOp::Migrate,
                        uuid,
                        FakeError::UnknownHost {
                            uri: request.dest_uri.clone(),
                        },
                    )
                })?),
                None => None,
            }
        };
        // Never hold two hosts' locks at once (two migrations in opposite directions).
        if let Some(dest) = dest {
            let mut dst = dest.lock();
            Self::define_in(&mut dst, &request.dest_xml)
                .map_err(|e| op_err(FakeOp::Migrate, uuid, e))?;
            let d = dst.domains.get_mut(&uuid).ok_or_else(|| {
                op_err(
                    FakeOp::Migrate,
                    uuid,
                    FakeError::BadXml {
                        reason: "dest_xml names another domain".into(),
                    },
                )
            })?;
            d.state = DomainState::Running;
            d.live = Some(d.config.clone());
        }
        let mut st = self.lock();
        if let Some(session) = st.consoles.remove(&uuid) {
            session.end(End::DomainStopped);
        }
        st.domains.remove(&uuid);
        Ok(())
    }

    fn open_console(&self, uuid: Uuid) -> Result<Box<dyn ConsoleStream>, HypervisorError> {
        let mut st = self.lock();
        self.enter(&mut st, FakeOp::OpenConsole)
            .map_err(|e| op_err(FakeOp::OpenConsole, uuid, e))?;
        let d = st
            .domains
            .get(&uuid)
            .ok_or(HypervisorError::NoSuchDomain { uuid })?;
        if !is_active(d.state) {
            return Err(op_err(FakeOp::OpenConsole, uuid, FakeError::NotRunning));
        }
        let session = Arc::new(ConsoleSession::default());
        // Like VIR_DOMAIN_CONSOLE_FORCE: the previous client is disconnected.
        if let Some(old) = st.consoles.insert(uuid, session.clone()) {
            old.end(End::TakenOver);
        }
        Ok(Box::new(FakeConsole { session }))
    }
}

// ---------------------------------------------------------------------------------------
// Console pipe
// ---------------------------------------------------------------------------------------

/// Why a console session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client called `close`: reads return 0 at once.
    ClosedByClient,
    /// The domain stopped: buffered output is still read, then 0.
    DomainStopped,
    /// Another client opened the console: buffered output, then an error.
    TakenOver,
}

#[derive(Debug, Default)]
struct SessionState {
    /// Guest output not yet read by the client.
    to_client: VecDeque<u8>,
    /// What the client wrote, not yet taken by the test.
    to_guest: Vec<u8>,
    end: Option<End>,
}

/// One console connection: two byte queues and a condition for blocked readers. A read
/// waits on the condition (releasing the lock), so it never blocks a write.
#[derive(Debug, Default)]
struct ConsoleSession {
    inner: Mutex<SessionState>,
    readable: Condvar,
}

impl ConsoleSession {
    /// Ends the session (the first reason sticks).
    fn end(&self, why: End) {
        lock(&self.inner).end.get_or_insert(why);
        self.readable.notify_all();
    }
}

/// The client end returned by `open_console`.
#[derive(Debug)]
struct FakeConsole {
    session: Arc<ConsoleSession>,
}

impl ConsoleStream for FakeConsole {
    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut s = lock(&self.session.inner);
        while s.to_client.is_empty() && s.end.is_none() {
            s = self
                .session
                .readable
                .wait(s)
                .unwrap_or_else(|e| e.into_inner());
        }
        if s.end == Some(End::ClosedByClient) {
            return Ok(0);
        }
        if s.to_client.is_empty() {
            return match s.end {
                Some(End::TakenOver) => Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the console was taken over by another client",
                )),
                _ => Ok(0),
            };
        }
        let n = buf.len().min(s.to_client.len());
        for (dst, src) in buf.iter_mut().zip(s.to_client.drain(..n)) {
            *dst = src;
        }
        Ok(n)
    }

    fn write(&self, data: &[u8]) -> std::io::Result<usize> {
        let mut s = lock(&self.session.inner);
        if s.end.is_some() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the console is closed",
            ));
        }
        s.to_guest.extend_from_slice(data);
        Ok(data.len())
    }

    fn close(&self) {
        self.session.end(End::ClosedByClient);
    }
}

impl Drop for FakeConsole {
    fn drop(&mut self) {
        self.close();
    }
}

/// The guest's end of an open fake console.
#[derive(Debug, Clone)]
pub struct GuestConsole {
    session: Arc<ConsoleSession>,
}

impl GuestConsole {
    /// The guest prints `data` (the client's `read` returns it).
    pub fn emit(&self, data: &[u8]) {
        let mut s = lock(&self.session.inner);
        if s.end.is_none() {
            s.to_client.extend(data);
        }
        drop(s);
        self.session.readable.notify_all();
    }

    /// Takes everything the client wrote so far.
    pub fn take_input(&self) -> Vec<u8> {
        std::mem::take(&mut lock(&self.session.inner).to_guest)
    }

    /// Whether the client closed it (or it was taken over, or the domain stopped).
    pub fn is_closed(&self) -> bool {
        lock(&self.session.inner).end.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::domain_xml::{render, BootMode, DomainSpec, DomainType, KeelMetadata};

    fn xml(uuid: Uuid, name: &str, vcpus: u32) -> String {
        render(&DomainSpec {
            uuid,
            name: name.into(),
            domain_type: DomainType::Qemu,
            vcpus,
            memory_mib: 64,
            disks: vec![],
            boot: BootMode::Disk,
            nics: vec![],
            serial_log: None,
            vnc: None,
            metadata: KeelMetadata {
                vm_id: name.into(),
                generation: 1,
            },
        })
        .unwrap()
    }

    #[test]
    fn lifecycle_is_idempotent_like_libvirt() {
        let hv = FakeHypervisor::new();
        let u = Uuid::new_v4();
        let info = hv.define(&xml(u, "a", 2)).unwrap();
        assert_eq!(
            (info.state, info.persistent, info.vcpus, info.memory_kib),
            (DomainState::ShutOff, true, 2, 64 * 1024)
        );
        hv.start(u).unwrap();
        hv.start(u).unwrap();
        assert_eq!(hv.lookup(u).unwrap().unwrap().state, DomainState::Running);
        // A redefine while running changes the next start only.
        hv.define(&xml(u, "a", 4)).unwrap();
        assert_eq!(hv.list().unwrap().len(), 1);
        assert_eq!(hv.lookup(u).unwrap().unwrap().vcpus, 2);
        hv.destroy(u).unwrap();
        hv.destroy(u).unwrap();
        assert_eq!(hv.lookup(u).unwrap().unwrap().vcpus, 4);
        hv.start(u).unwrap();
        hv.shutdown(u).unwrap();
        assert_eq!(hv.lookup(u).unwrap().unwrap().state, DomainState::ShutOff);
        hv.undefine(u).unwrap();
        hv.undefine(u).unwrap();
        assert_eq!(hv.lookup(u).unwrap(), None);
        assert!(matches!(
            hv.start(u),
            Err(HypervisorError::NoSuchDomain { .. })
        ));
        assert_eq!(hv.calls(FakeOp::Start), 4);
        assert_eq!(hv.calls(FakeOp::Destroy), 2);
    }

    #[test]
    fn knobs_acpi_failures_transient() {
        let hv = FakeHypervisor::new();
        let u = Uuid::new_v4();
        hv.define(&xml(u, "b", 1)).unwrap();
        hv.start(u).unwrap();
        hv.set_ignores_acpi(u, true);
        hv.shutdown(u).unwrap();
        assert_eq!(hv.domain(u).unwrap().state, DomainState::Running);
        assert_eq!(hv.domain(u).unwrap().shutdown_requests, 1);
        hv.fail_next(FakeOp::Destroy);
        let err = hv.destroy(u).unwrap_err();
        assert!(err.to_string().contains("destroy"), "{err}");
        assert_eq!(hv.domain(u).unwrap().state, DomainState::Running);
        // Undefined while running: transient, gone once stopped.
        hv.undefine(u).unwrap();
        assert!(!hv.domain(u).unwrap().persistent);
        hv.destroy(u).unwrap();
        assert_eq!(hv.domain(u), None);
        // Another UUID may not take a used name.
        let v = Uuid::new_v4();
        hv.define(&xml(v, "c", 1)).unwrap();
        assert!(hv.define(&xml(Uuid::new_v4(), "c", 1)).is_err());
    }

    #[test]
    fn migration_moves_the_domain_between_registered_hosts() {
        let reg = FakeRegistry::new();
        let (a, b) = (reg.host("fake://a"), reg.host("fake://b"));
        let u = Uuid::new_v4();
        a.define(&xml(u, "m", 1)).unwrap();
        a.start(u).unwrap();
        let req = MigrationRequest {
            dest_uri: "fake://b".into(),
            migrate_uri: "tcp://127.0.0.1:49152".into(),
            listen_address: Some("127.0.0.1".into()),
            disks_port: Some(49153),
            dest_xml: xml(u, "m", 1),
            copy_storage: false,
            disks: vec![],
        };
        a.migrate(u, &req).unwrap();
        assert_eq!(a.lookup(u).unwrap(), None);
        let on_b = b.lookup(u).unwrap().unwrap();
        assert_eq!((on_b.state, on_b.persistent), (DomainState::Running, true));
        assert_eq!(a.migrations(), vec![(u, req.clone())]);
        let bad = MigrationRequest {
            dest_uri: "fake://nowhere".into(),
            ..req
        };
        assert!(b.migrate(u, &bad).is_err());
        assert!(b.lookup(u).unwrap().is_some());
    }

    #[test]
    fn console_pipe_reads_writes_and_takeover() {
        let hv = FakeHypervisor::new();
        let u = Uuid::new_v4();
        hv.define(&xml(u, "d", 1)).unwrap();
        hv.start(u).unwrap();
        let c1 = hv.open_console(u).unwrap();
        let guest = hv.guest_console(u).unwrap();
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut buf = [0u8; 16];
                let n = c1.read(&mut buf).unwrap();
                buf[..n].to_vec()
            });
            c1.write(b"ls\n").unwrap();
            guest.emit(b"hello");
            assert_eq!(reader.join().unwrap(), b"hello");
        });
        assert_eq!(guest.take_input(), b"ls\n");
        let c2 = hv.open_console(u).unwrap();
        assert!(guest.is_closed());
        let mut buf = [0u8; 4];
        assert!(c1.read(&mut buf).is_err(), "taken over");
        assert!(c1.write(b"x").is_err());
        let guest2 = hv.guest_console(u).unwrap();
        guest2.emit(b"bye");
        hv.destroy(u).unwrap();
        assert!(hv.guest_console(u).is_none());
        // Output printed before the stop is still read, then end-of-file.
        assert_eq!(c2.read(&mut buf).unwrap(), 3);
        assert_eq!(c2.read(&mut buf).unwrap(), 0);
        c2.close();
        assert_eq!(c2.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn nics_hot_plug_like_libvirt() {
        use crate::hypervisor::domain_xml::{read_metadata, read_nics, render_nic, NicAttachment};
        let hv = FakeHypervisor::new();
        let u = Uuid::new_v4();
        hv.define(&xml(u, "n", 1)).unwrap();
        let nic = render_nic(&NicAttachment {
            mac: "52:54:00:00:00:01".into(),
            bridge: "br0".into(),
            model: "virtio".into(),
            target_dev: None,
        })
        .unwrap();
        let macs = |xml: &str| read_nics(xml).unwrap().len();
        // Stopped: the persistent definition only.
        hv.attach_device(u, &nic).unwrap();
        assert_eq!(macs(&hv.xml(u).unwrap()), 1);
        assert!(
            hv.attach_device(u, &nic).is_err(),
            "the MAC is there already"
        );
        hv.start(u).unwrap();
        hv.detach_device(u, &nic).unwrap();
        let d = hv.domain(u).unwrap();
        assert_eq!(macs(&d.config.xml), 0, "out of the definition at once");
        assert_eq!(
            macs(&d.live.unwrap().xml),
            1,
            "the guest has not let go yet"
        );
        assert_eq!(macs(&hv.xml(u).unwrap()), 0, "gone by the next look");
        hv.detach_device(u, &nic).unwrap();
        hv.attach_device(u, &nic).unwrap();
        let d = hv.domain(u).unwrap();
        assert_eq!((macs(&d.config.xml), macs(&d.live.unwrap().xml)), (1, 1));
        let m = KeelMetadata {
            vm_id: "n".into(),
            generation: 5,
        };
        hv.set_metadata(u, &m).unwrap();
        hv.set_metadata(u, &m).unwrap();
        let d = hv.domain(u).unwrap();
        assert_eq!(read_metadata(&d.config.xml).unwrap(), Some(m.clone()));
        assert_eq!(read_metadata(&d.live.unwrap().xml).unwrap(), Some(m));
        assert!(hv.attach_device(u, "<disk/>").is_err());
    }
}
