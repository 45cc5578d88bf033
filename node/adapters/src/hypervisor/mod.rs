//! The narrow interface between the compute reconciler and a hypervisor. The real
//! implementation is [`crate::hypervisor::libvirt::Libvirt`] (every `virt::` call lives there); the fake
//! in [`crate::hypervisor::fake`] keeps domains in memory for unit tests of the logic above it.
//!
//! All calls are blocking (libvirt's API is): async callers wrap them in
//! `tokio::task::spawn_blocking`. Every call is idempotent where the operation allows it:
//! destroying a stopped domain or undefining an absent one succeeds.

pub mod domain_xml;
pub mod fake;
pub mod libvirt;
pub mod seed;

use uuid::Uuid;

/// A domain's run state as the hypervisor reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    Running,
    Paused,
    /// An ACPI shutdown is in progress.
    ShuttingDown,
    ShutOff,
    Crashed,
    /// A state the reconciler does not act on (no state, suspended to memory).
    Other,
}

/// What the hypervisor knows about one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub uuid: Uuid,
    pub name: String,
    pub state: DomainState,
    /// Defined (survives a stop) rather than transient.
    pub persistent: bool,
    pub vcpus: u32,
    pub memory_kib: u64,
}

/// What the host's hypervisor offers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostCapabilities {
    pub libvirt_version: String,
    pub hypervisor_version: String,
    /// Domain types the hypervisor advertises for x86_64 (`qemu` for TCG, `kvm`).
    /// Advertised is not the same as usable: see the KVM probe.
    pub domain_types: Vec<String>,
}

/// How a live migration is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationRequest {
    /// libvirt URI of the destination host's libvirtd, as reachable from this host.
    pub dest_uri: String,
    /// Where qemu on this host sends the migration stream (`tcp://ADDR:PORT`); the
    /// destination listens on the same port.
    pub migrate_uri: String,
    /// The address qemu on the destination listens on for the migration stream and the
    /// disks (NBD), when it is not `migrate_uri`'s (Keel: loopback, the node relays).
    pub listen_address: Option<String>,
    /// The port of the destination's NBD server for the disks (default: libvirt picks one
    /// and the source connects to `migrate_uri`'s address on it).
    pub disks_port: Option<u16>,
    /// The domain XML to define on the destination (its own disk and log paths).
    pub dest_xml: String,
    /// Copy disks that are not shared (`VIR_MIGRATE_NON_SHARED_INC`: only the
    /// copy-on-write overlay; the template must already be on the destination).
    pub copy_storage: bool,
    /// Names of the disks (`vda`, …) to copy when `copy_storage` is set.
    pub disks: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot connect to the hypervisor at {uri}")]
    Connect {
        uri: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("domain {uuid} does not exist on this host")]
    NoSuchDomain { uuid: Uuid },
    #[error("{operation} of domain {uuid} failed")]
    Operation {
        operation: &'static str,
        uuid: Uuid,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{operation} failed")]
    Host {
        operation: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A bidirectional byte stream to a domain's serial console. Reads block until data arrives
/// (or return 0 at the end); both halves may be used from different threads.
pub trait ConsoleStream: Send + Sync {
    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Writes some of `data` (libvirt streams may take less than offered).
    fn write(&self, data: &[u8]) -> std::io::Result<usize>;
    fn close(&self);

    /// Writes all of `data`, however many calls it takes.
    fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            match self.write(data)? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                n => data = &data[n..],
            }
        }
        Ok(())
    }
}

/// One host's hypervisor.
pub trait Hypervisor: Send + Sync + 'static {
    /// Version and domain types; also proves the connection works.
    fn capabilities(&self) -> Result<HostCapabilities, HypervisorError>;
    /// Every domain on the host, Keel's or not.
    fn list(&self) -> Result<Vec<DomainInfo>, HypervisorError>;
    fn lookup(&self, uuid: Uuid) -> Result<Option<DomainInfo>, HypervisorError>;
    /// The domain's current (live if running, else persistent) XML.
    fn xml(&self, uuid: Uuid) -> Result<String, HypervisorError>;
    /// Defines the domain persistently, replacing an existing definition with the same UUID.
    fn define(&self, xml: &str) -> Result<DomainInfo, HypervisorError>;
    /// Starts a defined domain. Starting a running domain succeeds.
    fn start(&self, uuid: Uuid) -> Result<(), HypervisorError>;
    /// Asks the guest to power off (ACPI) and returns at once.
    fn shutdown(&self, uuid: Uuid) -> Result<(), HypervisorError>;
    /// Powers the domain off at once. Destroying a stopped domain succeeds.
    fn destroy(&self, uuid: Uuid) -> Result<(), HypervisorError>;
    /// Hard reset of a running domain.
    fn reset(&self, uuid: Uuid) -> Result<(), HypervisorError>;
    /// Removes the definition (and its managed save and NVRAM). An absent domain succeeds.
    fn undefine(&self, uuid: Uuid) -> Result<(), HypervisorError>;
    /// Adds a device (an `<interface>` from [`crate::hypervisor::domain_xml::render_nic`]) to the
    /// domain: to the running guest (hot-plug) while it is active, and to its persistent
    /// definition, in one call (`VIR_DOMAIN_AFFECT_LIVE | CONFIG`).
    fn attach_device(&self, uuid: Uuid, xml: &str) -> Result<(), HypervisorError>;
    /// Removes a device from the persistent definition and, while the domain is active,
    /// asks the guest to release it. The live removal is asynchronous (the guest
    /// acknowledges the PCI unplug, or never does): the device is gone once the live XML
    /// ([`Hypervisor::xml`]) no longer has it. A device already absent from the live or
    /// the persistent definition is removed from the other one only; absent from both
    /// succeeds. Asking again while an unplug is pending repeats the request.
    fn detach_device(&self, uuid: Uuid, xml: &str) -> Result<(), HypervisorError>;
    /// Replaces Keel's metadata element (namespace `urn:keel:vm:1`) in the live XML while
    /// the domain is active and in the persistent definition.
    fn set_metadata(
        &self,
        uuid: Uuid,
        metadata: &crate::hypervisor::domain_xml::KeelMetadata,
    ) -> Result<(), HypervisorError>;
    /// Live-migrates a running domain and blocks until it finished or failed. On success
    /// the domain runs on the destination, persistent there and undefined here.
    fn migrate(&self, uuid: Uuid, request: &MigrationRequest) -> Result<(), HypervisorError>;
    /// Opens the domain's serial console (`serial0`), taking it over from another client.
    fn open_console(&self, uuid: Uuid) -> Result<Box<dyn ConsoleStream>, HypervisorError>;
}
