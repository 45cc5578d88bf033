//! libvirt domain XML from a typed [`DomainSpec`], and Keel's metadata read back from the
//! XML libvirt returns.
//!
//! Why a writer and a typed spec: every value in a domain definition comes from an API
//! request or the cluster state (VM names, kernel command lines, paths). Building the XML
//! by string formatting would let one of them close a tag and add devices of its own
//! (a host disk, a second serial line, a `<qemu:commandline>`). Here the XML is written
//! with `quick_xml::Writer` only: element names are constants, values go through the
//! writer's escaping, and [`render`] validates every value first so that what libvirt
//! would reject anyway (or silently reinterpret) is refused with a typed error instead.
//!
//! The shape is deliberately small: i440fx (`pc`) machine, ACPI, UTC clock, a pty serial
//! console on `isa-serial` port 0 (optionally logged to a file by virtlogd), virtio
//! balloon and RNG, file disks, bridged NICs and an optional VNC display. `<emulator>`
//! is omitted so libvirt picks the host's qemu. Under TCG (`DomainType::Qemu`) no
//! `<cpu>` element is written (libvirt's default CPU model for TCG works everywhere);
//! under KVM the guest gets `host-model`.
//!
//! [`read_metadata`] resolves namespaces instead of matching the `keel:` prefix: libvirt
//! keeps a metadata element's namespace URI but not necessarily the prefix it was written
//! with (its metadata API rewrites prefixes), so only the URI `urn:keel:vm:1` is trusted.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use quick_xml::events::{BytesText, Event};
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;
use quick_xml::Writer;
use uuid::Uuid;

/// Namespace URI of Keel's element in a domain's `<metadata>`.
pub const KEEL_METADATA_NS: &str = "urn:keel:vm:1";
/// Prefix Keel writes for [`KEEL_METADATA_NS`] (readers must not rely on it).
pub const KEEL_METADATA_PREFIX: &str = "keel";
/// Smallest memory a domain may have.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Longest domain name accepted.
pub const MAX_NAME_LEN: usize = 63;

/// Everything Keel puts into one domain definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    pub uuid: Uuid,
    /// libvirt domain name, e.g. `keel-web-1`: `[a-z0-9-]`, at most 63 characters.
    pub name: String,
    pub domain_type: DomainType,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskAttachment>,
    pub boot: BootMode,
    pub nics: Vec<NicAttachment>,
    /// The serial console (pty, `isa-serial` port 0) is always there; with a path, what
    /// the guest prints is also appended to that file.
    pub serial_log: Option<PathBuf>,
    pub vnc: Option<VncSpec>,
    /// Written into `<metadata>` as `<keel:vm xmlns:keel="urn:keel:vm:1" id=.. generation=../>`.
    pub metadata: KeelMetadata,
}

/// How the guest's CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainType {
    /// TCG: software emulation, works everywhere (`<domain type='qemu'>`).
    Qemu,
    /// Hardware virtualization (`<domain type='kvm'>`, `<cpu mode='host-model'>`).
    Kvm,
}

/// What the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootMode {
    /// The first disk (`<boot dev='hd'/>`).
    Disk,
    /// The first CD-ROM (`<boot dev='cdrom'/>`).
    Cdrom,
    /// Direct kernel boot.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// One file-backed disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskAttachment {
    pub path: PathBuf,
    pub format: DiskFormat,
    /// Guest device name: `vda`, `vdb`, … on virtio, `sda`, … on SATA.
    pub target: String,
    pub bus: DiskBus,
    pub device: DiskDevice,
    pub read_only: bool,
    pub cache: DiskCache,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    Virtio,
    Sata,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskDevice {
    Disk,
    Cdrom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskCache {
    /// `cache='none'` (O_DIRECT on the host; what live migration wants).
    None_,
    Writeback,
}

/// One NIC on a host bridge (`<interface type='bridge'>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicAttachment {
    /// `52:54:00:xx:xx:xx`-style unicast MAC.
    pub mac: String,
    pub bridge: String,
    /// Device model, e.g. `virtio`.
    pub model: String,
    /// Name of the host tap device; libvirt picks `vnetN` when absent.
    pub target_dev: Option<String>,
}

/// A VNC display (autoport, no websocket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VncSpec {
    pub listen: IpAddr,
}

impl Default for VncSpec {
    /// Listens on loopback only.
    fn default() -> Self {
        VncSpec {
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// What Keel records inside the domain itself: which VM it is and which generation of
/// its spec the definition was rendered from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeelMetadata {
    pub vm_id: String,
    pub generation: u64,
}

/// A spec that cannot be rendered, or XML that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum DomainXmlError {
    #[error("invalid domain name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("a domain needs at least one vCPU")]
    NoVcpus,
    #[error("{mib} MiB of memory is below the minimum of {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall { mib: u64 },
    #[error("invalid MAC address {mac:?} (expected six hex pairs, unicast)")]
    InvalidMac { mac: String },
    #[error("invalid disk target {target:?} for bus {bus:?} (expected {expected})")]
    InvalidDiskTarget {
        target: String,
        bus: DiskBus,
        expected: &'static str,
    },
    #[error("disk target {target:?} is used twice")]
    DuplicateDiskTarget { target: String },
    #[error("{field} must be an absolute path, not {path:?}")]
    RelativePath { field: &'static str, path: PathBuf },
    #[error("{field} is not valid UTF-8: {path:?}")]
    NonUtf8Path { field: &'static str, path: PathBuf },
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidValue {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("cannot write the domain XML")]
    Write {
        #[source]
        source: io::Error,
    },
    #[error("cannot parse the domain XML")]
    Parse {
        #[source]
        source: quick_xml::Error,
    },
    #[error("the domain XML is not usable: {reason}")]
    Invalid { reason: String },
}

impl From<quick_xml::Error> for DomainXmlError {
    fn from(source: quick_xml::Error) -> Self {
        DomainXmlError::Parse { source }
    }
}

impl From<quick_xml::events::attributes::AttrError> for DomainXmlError {
    fn from(e: quick_xml::events::attributes::AttrError) -> Self {
        DomainXmlError::Parse { source: e.into() }
    }
}

impl From<io::Error> for DomainXmlError {
    fn from(source: io::Error) -> Self {
        DomainXmlError::Write { source }
    }
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

/// Characters XML 1.0 cannot carry at all (escaping does not help): C0 controls other
/// than tab, newline and carriage return. libvirt would reject the document.
fn check_text(field: &'static str, value: &str) -> Result<(), DomainXmlError> {
    if value
        .chars()
        .any(|c| (c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || c == '\u{7f}')
    {
        return Err(DomainXmlError::InvalidValue {
            field,
            value: value.to_string(),
            reason: "contains control characters",
        });
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), DomainXmlError> {
    let bad = |reason| {
        Err(DomainXmlError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only a-z, 0-9 and '-' are allowed");
    }
    Ok(())
}

/// A unicast MAC written as six colon-separated hex pairs.
fn check_mac(mac: &str) -> Result<(), DomainXmlError> {
    let bad = || DomainXmlError::InvalidMac {
        mac: mac.to_string(),
    };
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6
        || !parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(bad());
    }
    let first = u8::from_str_radix(parts[0], 16).map_err(|_| bad())?;
    // Bit 0 of the first octet marks multicast; libvirt refuses those for a NIC.
    if first & 1 == 1 {
        return Err(bad());
    }
    Ok(())
}

/// `vd` or `sd` followed by one or two lowercase letters.
fn check_target(target: &str, bus: DiskBus) -> Result<(), DomainXmlError> {
    let (prefix, expected) = match bus {
        DiskBus::Virtio => ("vd", "vd followed by 1-2 letters, e.g. vda"),
        DiskBus::Sata => ("sd", "sd followed by 1-2 letters, e.g. sda"),
    };
    let ok = target.strip_prefix(prefix).is_some_and(|rest| {
        (1..=2).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_lowercase())
    });
    if ok {
        Ok(())
    } else {
        Err(DomainXmlError::InvalidDiskTarget {
            target: target.to_string(),
            bus,
            expected,
        })
    }
}

/// A Linux interface name: 1-15 characters of `[A-Za-z0-9_.-]`.
fn check_ifname(field: &'static str, name: &str) -> Result<(), DomainXmlError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 15 {
        Some("interface names have at most 15 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        Some("only A-Z, a-z, 0-9, '_', '.' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(DomainXmlError::InvalidValue {
            field,
            value: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

fn check_model(model: &str) -> Result<(), DomainXmlError> {
    if model.is_empty()
        || model.len() > 32
        || !model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        return Err(DomainXmlError::InvalidValue {
            field: "NIC model",
            value: model.to_string(),
            reason: "expected a device model name such as virtio or e1000",
        });
    }
    Ok(())
}

/// An absolute, UTF-8, XML-safe path, returned as `&str`.
fn check_path<'a>(field: &'static str, path: &'a Path) -> Result<&'a str, DomainXmlError> {
    let s = path.to_str().ok_or_else(|| DomainXmlError::NonUtf8Path {
        field,
        path: path.to_path_buf(),
    })?;
    if !path.is_absolute() {
        return Err(DomainXmlError::RelativePath {
            field,
            path: path.to_path_buf(),
        });
    }
    check_text(field, s)?;
    Ok(s)
}

fn validate_nic(n: &NicAttachment) -> Result<(), DomainXmlError> {
    check_mac(&n.mac)?;
    check_ifname("bridge", &n.bridge)?;
    check_model(&n.model)?;
    if let Some(dev) = &n.target_dev {
        check_ifname("NIC target device", dev)?;
    }
    Ok(())
}

fn validate_metadata(m: &KeelMetadata) -> Result<(), DomainXmlError> {
    if m.vm_id.is_empty() {
        return Err(DomainXmlError::InvalidValue {
            field: "metadata vm_id",
            value: String::new(),
            reason: "it is empty",
        });
    }
    check_text("metadata vm_id", &m.vm_id)
}

fn validate(spec: &DomainSpec) -> Result<(), DomainXmlError> {
    check_name(&spec.name)?;
    if spec.vcpus == 0 {
        return Err(DomainXmlError::NoVcpus);
    }
    if spec.memory_mib < MIN_MEMORY_MIB {
        return Err(DomainXmlError::MemoryTooSmall {
            mib: spec.memory_mib,
        });
    }
    let mut targets = std::collections::BTreeSet::new();
    for d in &spec.disks {
        check_path("disk path", &d.path)?;
        check_target(&d.target, d.bus)?;
        if !targets.insert(d.target.as_str()) {
            return Err(DomainXmlError::DuplicateDiskTarget {
                target: d.target.clone(),
            });
        }
    }
    if let BootMode::Kernel {
        kernel,
        initrd,
        cmdline,
    } = &spec.boot
    {
        check_path("kernel", kernel)?;
        if let Some(initrd) = initrd {
            check_path("initrd", initrd)?;
        }
        check_text("kernel command line", cmdline)?;
    }
    for n in &spec.nics {
        validate_nic(n)?;
    }
    if let Some(log) = &spec.serial_log {
        check_path("serial log", log)?;
    }
    validate_metadata(&spec.metadata)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

type W = Writer<Vec<u8>>;

/// `<name>text</name>`, with `text` escaped by the writer.
fn text_element(w: &mut W, name: &str, text: &str) -> io::Result<()> {
    w.create_element(name)
        .write_text_content(BytesText::new(text))?;
    Ok(())
}

/// Renders `spec` as a libvirt domain definition. Every value is validated first.
pub fn render(spec: &DomainSpec) -> Result<String, DomainXmlError> {
    validate(spec)?;
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    let domain_type = match spec.domain_type {
        DomainType::Qemu => "qemu",
        DomainType::Kvm => "kvm",
    };
    w.create_element("domain")
        .with_attribute(("type", domain_type))
        .write_inner_content(|w| {
            text_element(w, "name", &spec.name)?;
            text_element(w, "uuid", &spec.uuid.hyphenated().to_string())?;
            write_metadata(w, &spec.metadata)?;
            w.create_element("memory")
                .with_attribute(("unit", "MiB"))
                .write_text_content(BytesText::new(&spec.memory_mib.to_string()))?;
            text_element(w, "vcpu", &spec.vcpus.to_string())?;
            write_os(w, &spec.boot)?;
            w.create_element("features").write_inner_content(|w| {
                w.create_element("acpi").write_empty()?;
                w.create_element("apic").write_empty()?;
                Ok(())
            })?;
            if spec.domain_type == DomainType::Kvm {
                w.create_element("cpu")
                    .with_attribute(("mode", "host-model"))
                    .write_empty()?;
            }
            w.create_element("clock")
                .with_attribute(("offset", "utc"))
                .write_empty()?;
            text_element(w, "on_poweroff", "destroy")?;
            text_element(w, "on_reboot", "restart")?;
            text_element(w, "on_crash", "destroy")?;
            w.create_element("devices").write_inner_content(|w| {
                for d in &spec.disks {
                    write_disk(w, d)?;
                }
                for n in &spec.nics {
                    write_nic(w, n)?;
                }
                write_serial(w, spec.serial_log.as_deref())?;
                if let Some(vnc) = &spec.vnc {
                    let listen = vnc.listen.to_string();
                    w.create_element("graphics")
                        .with_attribute(("type", "vnc"))
                        .with_attribute(("port", "-1"))
                        .with_attribute(("autoport", "yes"))
                        .with_attribute(("listen", listen.as_str()))
                        .write_inner_content(|w| {
                            w.create_element("listen")
                                .with_attribute(("type", "address"))
                                .with_attribute(("address", listen.as_str()))
                                .write_empty()?;
                            Ok(())
                        })?;
                }
                w.create_element("memballoon")
                    .with_attribute(("model", "virtio"))
                    .write_empty()?;
                w.create_element("rng")
                    .with_attribute(("model", "virtio"))
                    .write_inner_content(|w| {
                        w.create_element("backend")
                            .with_attribute(("model", "random"))
                            .write_text_content(BytesText::new("/dev/urandom"))?;
                        Ok(())
                    })?;
                Ok(())
            })?;
            Ok(())
        })?;
    let mut xml = into_string(w)?;
    xml.push('\n');
    Ok(xml)
}

fn into_string(w: W) -> Result<String, DomainXmlError> {
    String::from_utf8(w.into_inner()).map_err(|e| DomainXmlError::Write {
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })
}

/// One NIC as a device definition for `virDomainAttachDeviceFlags` (and detach): the same
/// `<interface>` element [`render`] writes into a full definition. Validated first.
pub fn render_nic(nic: &NicAttachment) -> Result<String, DomainXmlError> {
    validate_nic(nic)?;
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    write_nic(&mut w, nic)?;
    into_string(w)
}

/// Keel's metadata element without its namespace (`<vm id=.. generation=../>`), as
/// `virDomainSetMetadata` takes it: libvirt puts it into the namespace given with the call
/// ([`KEEL_METADATA_NS`], prefix [`KEEL_METADATA_PREFIX`]) and replaces the element it had
/// there.
pub fn render_metadata_element(m: &KeelMetadata) -> Result<String, DomainXmlError> {
    validate_metadata(m)?;
    let mut w = Writer::new(Vec::new());
    let generation = m.generation.to_string();
    w.create_element("vm")
        .with_attribute(("id", m.vm_id.as_str()))
        .with_attribute(("generation", generation.as_str()))
        .write_empty()?;
    into_string(w)
}

fn write_metadata(w: &mut W, m: &KeelMetadata) -> io::Result<()> {
    let qname = format!("{KEEL_METADATA_PREFIX}:vm");
    let xmlns = format!("xmlns:{KEEL_METADATA_PREFIX}");
    let generation = m.generation.to_string();
    w.create_element("metadata").write_inner_content(|w| {
        w.create_element(qname.as_str())
            .with_attribute((xmlns.as_str(), KEEL_METADATA_NS))
            .with_attribute(("id", m.vm_id.as_str()))
            .with_attribute(("generation", generation.as_str()))
            .write_empty()?;
        Ok(())
    })?;
    Ok(())
}

fn write_os(w: &mut W, boot: &BootMode) -> io::Result<()> {
    w.create_element("os").write_inner_content(|w| {
        w.create_element("type")
            .with_attribute(("arch", "x86_64"))
            .with_attribute(("machine", "pc"))
            .write_text_content(BytesText::new("hvm"))?;
        match boot {
            BootMode::Disk | BootMode::Cdrom => {
                let dev = if *boot == BootMode::Disk {
                    "hd"
                } else {
                    "cdrom"
                };
                w.create_element("boot")
                    .with_attribute(("dev", dev))
                    .write_empty()?;
            }
            BootMode::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                // Validated as UTF-8 before rendering.
                text_element(w, "kernel", &kernel.to_string_lossy())?;
                if let Some(initrd) = initrd {
                    text_element(w, "initrd", &initrd.to_string_lossy())?;
                }
                text_element(w, "cmdline", cmdline)?;
            }
        }
        Ok(())
    })?;
    Ok(())
}

fn write_disk(w: &mut W, d: &DiskAttachment) -> io::Result<()> {
    let device = match d.device {
        DiskDevice::Disk => "disk",
        DiskDevice::Cdrom => "cdrom",
    };
    let format = match d.format {
        DiskFormat::Qcow2 => "qcow2",
        DiskFormat::Raw => "raw",
    };
    let cache = match d.cache {
        DiskCache::None_ => "none",
        DiskCache::Writeback => "writeback",
    };
    let bus = match d.bus {
        DiskBus::Virtio => "virtio",
        DiskBus::Sata => "sata",
    };
    let path = d.path.to_string_lossy();
    w.create_element("disk")
        .with_attribute(("type", "file"))
        .with_attribute(("device", device))
        .write_inner_content(|w| {
            w.create_element("driver")
                .with_attribute(("name", "qemu"))
                .with_attribute(("type", format))
                .with_attribute(("cache", cache))
                .write_empty()?;
            w.create_element("source")
                .with_attribute(("file", path.as_ref()))
                .write_empty()?;
            w.create_element("target")
                .with_attribute(("dev", d.target.as_str()))
                .with_attribute(("bus", bus))
                .write_empty()?;
            if d.read_only || d.device == DiskDevice::Cdrom {
                w.create_element("readonly").write_empty()?;
            }
            Ok(())
        })?;
    Ok(())
}

fn write_nic(w: &mut W, n: &NicAttachment) -> io::Result<()> {
    w.create_element("interface")
        .with_attribute(("type", "bridge"))
        .write_inner_content(|w| {
            w.create_element("mac")
                .with_attribute(("address", n.mac.to_ascii_lowercase().as_str()))
                .write_empty()?;
            w.create_element("source")
                .with_attribute(("bridge", n.bridge.as_str()))
                .write_empty()?;
            if let Some(dev) = &n.target_dev {
                w.create_element("target")
                    .with_attribute(("dev", dev.as_str()))
                    .write_empty()?;
            }
            w.create_element("model")
                .with_attribute(("type", n.model.as_str()))
                .write_empty()?;
            Ok(())
        })?;
    Ok(())
}

fn write_serial(w: &mut W, log: Option<&Path>) -> io::Result<()> {
    w.create_element("serial")
        .with_attribute(("type", "pty"))
        .write_inner_content(|w| {
            if let Some(log) = log {
                w.create_element("log")
                    .with_attribute(("file", log.to_string_lossy().as_ref()))
                    .with_attribute(("append", "on"))
                    .write_empty()?;
            }
            w.create_element("target")
                .with_attribute(("type", "isa-serial"))
                .with_attribute(("port", "0"))
                .write_empty()?;
            Ok(())
        })?;
    w.create_element("console")
        .with_attribute(("type", "pty"))
        .write_inner_content(|w| {
            w.create_element("target")
                .with_attribute(("type", "serial"))
                .with_attribute(("port", "0"))
                .write_empty()?;
            Ok(())
        })?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

/// Keel's metadata in a domain's XML (`/domain/metadata/{urn:keel:vm:1}vm`), whatever
/// prefix it carries; `None` when the domain has none (not Keel's).
pub fn read_metadata(xml: &str) -> Result<Option<KeelMetadata>, DomainXmlError> {
    let mut reader = NsReader::from_str(xml);
    reader.config_mut().expand_empty_elements = true;
    // Local names of the open elements, outermost first.
    let mut path: Vec<Vec<u8>> = Vec::new();
    loop {
        let (ns, event) = reader.read_resolved_event()?;
        match event {
            Event::Start(e) => {
                let local = e.local_name().as_ref().to_vec();
                let in_metadata = path.len() == 2 && path[0] == b"domain" && path[1] == b"metadata";
                let is_keel = match ns {
                    ResolveResult::Bound(n) => n.as_ref() == KEEL_METADATA_NS.as_bytes(),
                    _ => false,
                };
                if in_metadata && is_keel && local == b"vm" {
                    return keel_metadata(&e).map(Some);
                }
                path.push(local);
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Eof => return Ok(None),
            _ => {}
        }
    }
}

/// The NICs of a domain (`/domain/devices/interface`), in document order: MAC (lower
/// case), source bridge, target device and model, each empty or `None` when the XML has
/// none. For the live XML of a running domain this is what the guest has now.
pub fn read_nics(xml: &str) -> Result<Vec<NicAttachment>, DomainXmlError> {
    let mut reader = NsReader::from_str(xml);
    reader.config_mut().expand_empty_elements = true;
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut nics = Vec::new();
    let mut current: Option<NicAttachment> = None;
    loop {
        match reader.read_event()? {
            Event::Start(e) => {
                let local = e.local_name().as_ref().to_vec();
                let parents: Vec<&[u8]> = path.iter().map(Vec::as_slice).collect();
                if parents == [b"domain".as_slice(), b"devices"] && local == b"interface" {
                    current = Some(NicAttachment {
                        mac: String::new(),
                        bridge: String::new(),
                        model: String::new(),
                        target_dev: None,
                    });
                } else if parents == [b"domain".as_slice(), b"devices", b"interface"] {
                    if let Some(nic) = current.as_mut() {
                        for attr in e.attributes() {
                            let attr = attr?;
                            let value = || attr.unescape_value().map(|v| v.into_owned());
                            match (local.as_slice(), attr.key.as_ref()) {
                                (b"mac", b"address") => nic.mac = value()?.to_ascii_lowercase(),
                                (b"source", b"bridge") => nic.bridge = value()?,
                                (b"target", b"dev") => nic.target_dev = Some(value()?),
                                (b"model", b"type") => nic.model = value()?,
                                _ => {}
                            }
                        }
                    }
                }
                path.push(local);
            }
            Event::End(_) => {
                let closed = path.pop();
                if path.len() == 2 && closed.as_deref() == Some(b"interface".as_slice()) {
                    nics.extend(current.take());
                }
            }
            Event::Eof => return Ok(nics),
            _ => {}
        }
    }
}

fn keel_metadata(e: &quick_xml::events::BytesStart<'_>) -> Result<KeelMetadata, DomainXmlError> {
    let mut id = None;
    let mut generation = None;
    for attr in e.attributes() {
        let attr = attr?;
        // Unprefixed attributes only: they belong to the element, not to a namespace.
        match attr.key.as_ref() {
            b"id" => id = Some(attr.unescape_value()?.into_owned()),
            b"generation" => generation = Some(attr.unescape_value()?.into_owned()),
            _ => {}
        }
    }
    let vm_id = id.ok_or_else(|| DomainXmlError::Invalid {
        reason: "Keel metadata without an id attribute".into(),
    })?;
    let generation = generation.ok_or_else(|| DomainXmlError::Invalid {
        reason: "Keel metadata without a generation attribute".into(),
    })?;
    let generation = generation
        .trim()
        .parse()
        .map_err(|_| DomainXmlError::Invalid {
            reason: format!("Keel metadata generation {generation:?} is not a number"),
        })?;
    Ok(KeelMetadata { vm_id, generation })
}

/// The identity and size of a domain, read from its XML (the fake hypervisor, error context in
/// the real adapter, and the reconciler's check whether a running domain has its size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSummary {
    pub uuid: Uuid,
    pub name: String,
    /// Current vCPUs (`<vcpu current=..>` when given, else the element's value).
    pub vcpus: u32,
    pub memory_kib: u64,
}

/// Reads `/domain/uuid`, `/domain/name`, `/domain/vcpu` and `/domain/memory`.
pub fn summarize(xml: &str) -> Result<DomainSummary, DomainXmlError> {
    let mut reader = NsReader::from_str(xml);
    reader.config_mut().expand_empty_elements = true;
    let mut path: Vec<Vec<u8>> = Vec::new();
    let (mut uuid, mut name, mut vcpus, mut memory) = (None, None, None, None);
    let mut vcpu_current: Option<String> = None;
    let mut memory_unit: Option<String> = None;
    loop {
        match reader.read_event()? {
            Event::Start(e) => {
                let local = e.local_name().as_ref().to_vec();
                if path.len() == 1 && path[0] == b"domain" {
                    for attr in e.attributes() {
                        let attr = attr?;
                        match (local.as_slice(), attr.key.as_ref()) {
                            (b"vcpu", b"current") => {
                                vcpu_current = Some(attr.unescape_value()?.into_owned());
                            }
                            (b"memory", b"unit") => {
                                memory_unit = Some(attr.unescape_value()?.into_owned());
                            }
                            _ => {}
                        }
                    }
                }
                path.push(local);
            }
            Event::Text(t) if path.len() == 2 && path[0] == b"domain" => {
                let text = t.unescape()?.trim().to_string();
                match path[1].as_slice() {
                    b"uuid" => uuid = Some(text),
                    b"name" => name = Some(text),
                    b"vcpu" => vcpus = Some(text),
                    b"memory" => memory = Some(text),
                    _ => {}
                }
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let missing = |what: &str| DomainXmlError::Invalid {
        reason: format!("no {what} in the domain XML"),
    };
    let uuid = uuid.ok_or_else(|| missing("<uuid>"))?;
    let uuid = Uuid::parse_str(&uuid).map_err(|_| DomainXmlError::Invalid {
        reason: format!("<uuid> {uuid:?} is not a UUID"),
    })?;
    let name = name.ok_or_else(|| missing("<name>"))?;
    let vcpus = vcpu_current.or(vcpus).ok_or_else(|| missing("<vcpu>"))?;
    let vcpus = vcpus.parse().map_err(|_| DomainXmlError::Invalid {
        reason: format!("<vcpu> {vcpus:?} is not a number"),
    })?;
    let memory = memory.ok_or_else(|| missing("<memory>"))?;
    let memory_kib = memory_to_kib(&memory, memory_unit.as_deref())?;
    Ok(DomainSummary {
        uuid,
        name,
        vcpus,
        memory_kib,
    })
}

/// libvirt's memory units (`<memory unit=..>`; KiB when absent) converted to KiB.
fn memory_to_kib(value: &str, unit: Option<&str>) -> Result<u64, DomainXmlError> {
    let n: u64 = value.parse().map_err(|_| DomainXmlError::Invalid {
        reason: format!("<memory> {value:?} is not a number"),
    })?;
    let bytes_per_unit: u64 = match unit.unwrap_or("KiB") {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        other => {
            return Err(DomainXmlError::Invalid {
                reason: format!("unknown memory unit {other:?}"),
            })
        }
    };
    n.checked_mul(bytes_per_unit)
        .map(|b| b.div_ceil(1024))
        .ok_or_else(|| DomainXmlError::Invalid {
            reason: format!("<memory> {value} {unit:?} overflows"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DomainSpec {
        DomainSpec {
            uuid: Uuid::parse_str("6f1c2a5e-0c55-4d5f-9a53-1f0e8d7c6b5a").unwrap(),
            name: "keel-web-1".into(),
            domain_type: DomainType::Qemu,
            vcpus: 2,
            memory_mib: 256,
            disks: vec![
                DiskAttachment {
                    path: "/var/lib/keel/vms/web-1/root.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    target: "vda".into(),
                    bus: DiskBus::Virtio,
                    device: DiskDevice::Disk,
                    read_only: false,
                    cache: DiskCache::None_,
                },
                DiskAttachment {
                    path: "/var/lib/keel/vms/web-1/seed.img".into(),
                    format: DiskFormat::Raw,
                    target: "sda".into(),
                    bus: DiskBus::Sata,
                    device: DiskDevice::Cdrom,
                    read_only: true,
                    cache: DiskCache::Writeback,
                },
            ],
            boot: BootMode::Disk,
            nics: vec![NicAttachment {
                mac: "52:54:00:12:34:56".into(),
                bridge: "kbr-100".into(),
                model: "virtio".into(),
                target_dev: Some("kt-web1-0".into()),
            }],
            serial_log: Some("/var/log/keel/vms/web-1.serial.log".into()),
            vnc: Some(VncSpec::default()),
            metadata: KeelMetadata {
                vm_id: "vm-0123".into(),
                generation: 7,
            },
        }
    }

    /// A tiny DOM: (path of local names, attributes, text) of every element.
    #[derive(Debug)]
    struct El {
        path: String,
        attrs: Vec<(String, String)>,
        text: String,
    }

    fn parse(xml: &str) -> Vec<El> {
        let mut reader = NsReader::from_str(xml);
        reader.config_mut().expand_empty_elements = true;
        let mut stack: Vec<String> = Vec::new();
        let mut open: Vec<usize> = Vec::new();
        let mut out: Vec<El> = Vec::new();
        loop {
            match reader.read_event().expect("well-formed XML") {
                Event::Start(e) => {
                    stack.push(String::from_utf8(e.name().as_ref().to_vec()).unwrap());
                    let attrs = e
                        .attributes()
                        .map(|a| {
                            let a = a.unwrap();
                            (
                                String::from_utf8(a.key.as_ref().to_vec()).unwrap(),
                                a.unescape_value().unwrap().into_owned(),
                            )
                        })
                        .collect();
                    out.push(El {
                        path: stack.join("/"),
                        attrs,
                        text: String::new(),
                    });
                    open.push(out.len() - 1);
                }
                Event::Text(t) => {
                    if let Some(&i) = open.last() {
                        out[i].text.push_str(&t.unescape().unwrap());
                    }
                }
                Event::End(_) => {
                    stack.pop();
                    open.pop();
                }
                Event::Eof => break,
                _ => {}
            }
        }
        out
    }

    fn find<'a>(els: &'a [El], path: &str) -> Vec<&'a El> {
        els.iter().filter(|e| e.path == path).collect()
    }

    fn one<'a>(els: &'a [El], path: &str) -> &'a El {
        let found = find(els, path);
        assert_eq!(found.len(), 1, "expected one {path}, got {found:?}");
        found[0]
    }

    fn attr<'a>(el: &'a El, key: &str) -> Option<&'a str> {
        el.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn renders_the_expected_structure() {
        let xml = render(&spec()).unwrap();
        let els = parse(&xml);
        assert_eq!(attr(one(&els, "domain"), "type"), Some("qemu"));
        assert_eq!(one(&els, "domain/name").text.trim(), "keel-web-1");
        assert_eq!(
            one(&els, "domain/uuid").text.trim(),
            "6f1c2a5e-0c55-4d5f-9a53-1f0e8d7c6b5a"
        );
        let mem = one(&els, "domain/memory");
        assert_eq!((attr(mem, "unit"), mem.text.trim()), (Some("MiB"), "256"));
        assert_eq!(one(&els, "domain/vcpu").text.trim(), "2");
        let ty = one(&els, "domain/os/type");
        assert_eq!(ty.text.trim(), "hvm");
        assert_eq!(attr(ty, "arch"), Some("x86_64"));
        assert_eq!(attr(ty, "machine"), Some("pc"));
        assert_eq!(attr(one(&els, "domain/os/boot"), "dev"), Some("hd"));
        one(&els, "domain/features/acpi");
        one(&els, "domain/features/apic");
        assert!(find(&els, "domain/cpu").is_empty(), "no <cpu> under TCG");
        assert_eq!(attr(one(&els, "domain/clock"), "offset"), Some("utc"));
        assert_eq!(one(&els, "domain/on_poweroff").text, "destroy");
        assert_eq!(one(&els, "domain/on_reboot").text, "restart");
        assert_eq!(one(&els, "domain/on_crash").text, "destroy");
        assert!(find(&els, "domain/devices/emulator").is_empty());

        let disks = find(&els, "domain/devices/disk");
        assert_eq!(disks.len(), 2);
        assert_eq!(attr(disks[0], "device"), Some("disk"));
        assert_eq!(attr(disks[1], "device"), Some("cdrom"));
        let drivers = find(&els, "domain/devices/disk/driver");
        assert_eq!(attr(drivers[0], "type"), Some("qcow2"));
        assert_eq!(attr(drivers[0], "cache"), Some("none"));
        assert_eq!(attr(drivers[1], "type"), Some("raw"));
        assert_eq!(attr(drivers[1], "cache"), Some("writeback"));
        let sources = find(&els, "domain/devices/disk/source");
        assert_eq!(
            attr(sources[0], "file"),
            Some("/var/lib/keel/vms/web-1/root.qcow2")
        );
        let targets = find(&els, "domain/devices/disk/target");
        assert_eq!(
            (attr(targets[0], "dev"), attr(targets[0], "bus")),
            (Some("vda"), Some("virtio"))
        );
        assert_eq!(
            (attr(targets[1], "dev"), attr(targets[1], "bus")),
            (Some("sda"), Some("sata"))
        );
        assert_eq!(find(&els, "domain/devices/disk/readonly").len(), 1);

        let nic = one(&els, "domain/devices/interface");
        assert_eq!(attr(nic, "type"), Some("bridge"));
        assert_eq!(
            attr(one(&els, "domain/devices/interface/mac"), "address"),
            Some("52:54:00:12:34:56")
        );
        assert_eq!(
            attr(one(&els, "domain/devices/interface/source"), "bridge"),
            Some("kbr-100")
        );
        assert_eq!(
            attr(one(&els, "domain/devices/interface/target"), "dev"),
            Some("kt-web1-0")
        );
        assert_eq!(
            attr(one(&els, "domain/devices/interface/model"), "type"),
            Some("virtio")
        );

        assert_eq!(
            attr(one(&els, "domain/devices/serial"), "type"),
            Some("pty")
        );
        let log = one(&els, "domain/devices/serial/log");
        assert_eq!(
            attr(log, "file"),
            Some("/var/log/keel/vms/web-1.serial.log")
        );
        assert_eq!(attr(log, "append"), Some("on"));
        let st = one(&els, "domain/devices/serial/target");
        assert_eq!(
            (attr(st, "type"), attr(st, "port")),
            (Some("isa-serial"), Some("0"))
        );
        let ct = one(&els, "domain/devices/console/target");
        assert_eq!(
            (attr(ct, "type"), attr(ct, "port")),
            (Some("serial"), Some("0"))
        );

        let g = one(&els, "domain/devices/graphics");
        assert_eq!(attr(g, "type"), Some("vnc"));
        assert_eq!(attr(g, "autoport"), Some("yes"));
        assert_eq!(attr(g, "listen"), Some("127.0.0.1"));
        assert_eq!(attr(g, "websocket"), None);
        assert_eq!(
            attr(one(&els, "domain/devices/graphics/listen"), "address"),
            Some("127.0.0.1")
        );
        assert_eq!(
            attr(one(&els, "domain/devices/memballoon"), "model"),
            Some("virtio")
        );
        assert_eq!(
            attr(one(&els, "domain/devices/rng"), "model"),
            Some("virtio")
        );
        let backend = one(&els, "domain/devices/rng/backend");
        assert_eq!(
            (attr(backend, "model"), backend.text.as_str()),
            (Some("random"), "/dev/urandom")
        );

        let meta = one(&els, "domain/metadata/keel:vm");
        assert_eq!(attr(meta, "xmlns:keel"), Some(KEEL_METADATA_NS));
        assert_eq!(attr(meta, "id"), Some("vm-0123"));
        assert_eq!(attr(meta, "generation"), Some("7"));
    }

    #[test]
    fn kvm_gets_host_model_cpu_and_kernel_boot_has_no_boot_dev() {
        let mut s = spec();
        s.domain_type = DomainType::Kvm;
        s.boot = BootMode::Kernel {
            kernel: "/boot/vmlinuz".into(),
            initrd: Some("/boot/initrd.img".into()),
            cmdline: "console=ttyS0 root=/dev/vda1".into(),
        };
        s.vnc = None;
        s.serial_log = None;
        let els = parse(&render(&s).unwrap());
        assert_eq!(attr(one(&els, "domain"), "type"), Some("kvm"));
        assert_eq!(attr(one(&els, "domain/cpu"), "mode"), Some("host-model"));
        assert_eq!(one(&els, "domain/os/kernel").text, "/boot/vmlinuz");
        assert_eq!(one(&els, "domain/os/initrd").text, "/boot/initrd.img");
        assert_eq!(
            one(&els, "domain/os/cmdline").text,
            "console=ttyS0 root=/dev/vda1"
        );
        assert!(find(&els, "domain/os/boot").is_empty());
        assert!(find(&els, "domain/devices/graphics").is_empty());
        assert!(find(&els, "domain/devices/serial/log").is_empty());
        // The console is always there, logged or not.
        one(&els, "domain/devices/serial");
        one(&els, "domain/devices/console");
    }

    #[test]
    fn injection_in_the_name_is_rejected() {
        let mut s = spec();
        s.name = "a'/><evil/>".into();
        assert!(matches!(
            render(&s),
            Err(DomainXmlError::InvalidName { .. })
        ));
    }

    #[test]
    fn markup_in_free_text_comes_out_escaped() {
        let mut s = spec();
        let cmdline = "console=ttyS0 x=</cmdline><evil/> y='&amp;' z=\"<\"";
        s.boot = BootMode::Kernel {
            kernel: "/boot/k'ernel\"<&>".into(),
            initrd: None,
            cmdline: cmdline.into(),
        };
        s.metadata.vm_id = "id\"/><evil a='1'/>".into();
        s.disks[0].path = "/srv/x'/><disk type='block'>.qcow2".into();
        s.serial_log = Some("/tmp/a\"b<c>&d".into());
        let xml = render(&s).unwrap();
        assert!(!xml.contains("<evil"), "{xml}");
        let els = parse(&xml);
        assert!(els.iter().all(|e| !e.path.contains("evil")), "{els:?}");
        assert_eq!(one(&els, "domain/os/cmdline").text, cmdline);
        assert_eq!(one(&els, "domain/os/kernel").text, "/boot/k'ernel\"<&>");
        assert_eq!(find(&els, "domain/devices/disk").len(), 2);
        assert_eq!(
            attr(find(&els, "domain/devices/disk/source")[0], "file"),
            Some("/srv/x'/><disk type='block'>.qcow2")
        );
        assert_eq!(
            attr(one(&els, "domain/devices/serial/log"), "file"),
            Some("/tmp/a\"b<c>&d")
        );
        let meta = read_metadata(&xml).unwrap().unwrap();
        assert_eq!(meta.vm_id, "id\"/><evil a='1'/>");
    }

    #[test]
    fn invalid_values_are_rejected_with_typed_errors() {
        let check = |f: &dyn Fn(&mut DomainSpec), want: &dyn Fn(&DomainXmlError) -> bool| {
            let mut s = spec();
            f(&mut s);
            let err = render(&s).expect_err("must be rejected");
            assert!(want(&err), "unexpected error: {err:?}");
            // Messages are one line and name the problem.
            assert!(!err.to_string().contains('\n'));
        };
        use DomainXmlError as E;
        check(&|s| s.name = String::new(), &|e| {
            matches!(e, E::InvalidName { .. })
        });
        check(&|s| s.name = "Web".into(), &|e| {
            matches!(e, E::InvalidName { .. })
        });
        check(&|s| s.name = "a".repeat(64), &|e| {
            matches!(e, E::InvalidName { .. })
        });
        check(&|s| s.name = "web_1".into(), &|e| {
            matches!(e, E::InvalidName { .. })
        });
        check(&|s| s.vcpus = 0, &|e| matches!(e, E::NoVcpus));
        check(&|s| s.memory_mib = 15, &|e| {
            matches!(e, E::MemoryTooSmall { mib: 15 })
        });
        for mac in [
            "52:54:00:12:34",
            "52-54-00-12-34-56",
            "52:54:00:12:34:5g",
            "01:00:5e:00:00:01",
            "52:54:00:12:34:56:78",
        ] {
            check(&|s| s.nics[0].mac = mac.into(), &|e| {
                matches!(e, E::InvalidMac { .. })
            });
        }
        check(&|s| s.nics[0].bridge = "br0'/>".into(), &|e| {
            matches!(
                e,
                E::InvalidValue {
                    field: "bridge",
                    ..
                }
            )
        });
        check(
            &|s| s.nics[0].bridge = "a-very-long-bridge-name".into(),
            &|e| {
                matches!(
                    e,
                    E::InvalidValue {
                        field: "bridge",
                        ..
                    }
                )
            },
        );
        check(&|s| s.nics[0].model = "virtio'".into(), &|e| {
            matches!(e, E::InvalidValue { .. })
        });
        check(&|s| s.nics[0].target_dev = Some("tap 0".into()), &|e| {
            matches!(e, E::InvalidValue { .. })
        });
        check(&|s| s.disks[0].target = "sda".into(), &|e| {
            matches!(e, E::InvalidDiskTarget { .. })
        });
        check(&|s| s.disks[0].target = "vd".into(), &|e| {
            matches!(e, E::InvalidDiskTarget { .. })
        });
        check(&|s| s.disks[1].target = "vdb".into(), &|e| {
            matches!(e, E::InvalidDiskTarget { .. })
        });
        check(
            &|s| {
                s.disks[1].bus = DiskBus::Virtio;
                s.disks[1].target = "vda".into();
            },
            &|e| matches!(e, E::DuplicateDiskTarget { .. }),
        );
        check(&|s| s.disks[0].path = "root.qcow2".into(), &|e| {
            matches!(e, E::RelativePath { .. })
        });
        check(&|s| s.serial_log = Some("logs/serial.log".into()), &|e| {
            matches!(e, E::RelativePath { .. })
        });
        check(
            &|s| {
                s.boot = BootMode::Kernel {
                    kernel: "vmlinuz".into(),
                    initrd: None,
                    cmdline: String::new(),
                }
            },
            &|e| {
                matches!(
                    e,
                    E::RelativePath {
                        field: "kernel",
                        ..
                    }
                )
            },
        );
        check(
            &|s| {
                s.boot = BootMode::Kernel {
                    kernel: "/vmlinuz".into(),
                    initrd: None,
                    cmdline: "console=ttyS0\0evil".into(),
                }
            },
            &|e| matches!(e, E::InvalidValue { .. }),
        );
        check(&|s| s.metadata.vm_id = String::new(), &|e| {
            matches!(e, E::InvalidValue { .. })
        });
    }

    #[test]
    fn metadata_roundtrips() {
        let xml = render(&spec()).unwrap();
        assert_eq!(
            read_metadata(&xml).unwrap(),
            Some(KeelMetadata {
                vm_id: "vm-0123".into(),
                generation: 7
            })
        );
    }

    /// What `virsh dumpxml` returns: libvirt's own elements around ours, other
    /// applications' metadata, and the prefix of our element possibly changed.
    #[test]
    fn metadata_is_found_by_namespace_not_by_prefix() {
        let as_libvirt_returns = |meta: &str| {
            format!(
                r#"<domain type='qemu' id='3'>
  <name>keel-web-1</name>
  <uuid>6f1c2a5e-0c55-4d5f-9a53-1f0e8d7c6b5a</uuid>
  <metadata>
    <other:app xmlns:other="http://example.com/other" id="not-ours" generation="1"/>
    {meta}
  </metadata>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
  <seclabel type='none' model='none'/>
</domain>
"#
            )
        };
        let want = Some(KeelMetadata {
            vm_id: "vm-9".into(),
            generation: 42,
        });
        for meta in [
            r#"<keel:vm xmlns:keel="urn:keel:vm:1" id="vm-9" generation="42"/>"#,
            r#"<k:vm xmlns:k="urn:keel:vm:1" id="vm-9" generation="42"/>"#,
            r#"<ns0:vm xmlns:ns0="urn:keel:vm:1" id="vm-9" generation="42"></ns0:vm>"#,
            r#"<vm xmlns="urn:keel:vm:1" id="vm-9" generation="42"/>"#,
        ] {
            assert_eq!(
                read_metadata(&as_libvirt_returns(meta)).unwrap(),
                want,
                "{meta}"
            );
        }
        // The right prefix bound to another namespace is not ours.
        let foreign = r#"<keel:vm xmlns:keel="urn:keel:vm:2" id="vm-9" generation="42"/>"#;
        assert_eq!(read_metadata(&as_libvirt_returns(foreign)).unwrap(), None);
        // A domain without metadata.
        assert_eq!(
            read_metadata("<domain type='qemu'><name>x</name></domain>").unwrap(),
            None
        );
        // Ours but damaged.
        let bad = r#"<keel:vm xmlns:keel="urn:keel:vm:1" id="vm-9" generation="x"/>"#;
        assert!(matches!(
            read_metadata(&as_libvirt_returns(bad)),
            Err(DomainXmlError::Invalid { .. })
        ));
        assert!(read_metadata("<domain><metadata>").is_ok_and(|m| m.is_none()));
        assert!(read_metadata("<domain></metadata>").is_err());
    }

    #[test]
    fn summary_reads_identity_and_size() {
        let s = summarize(&render(&spec()).unwrap()).unwrap();
        assert_eq!(s.uuid, spec().uuid);
        assert_eq!(s.name, "keel-web-1");
        assert_eq!(s.vcpus, 2);
        assert_eq!(s.memory_kib, 256 * 1024);
        let libvirt = "<domain type='kvm'><name>foreign</name>\
            <uuid>11111111-2222-3333-4444-555555555555</uuid>\
            <memory unit='KiB'>65536</memory><vcpu placement='static' current='1'>4</vcpu>\
            <devices><disk><target dev='vda'/></disk></devices></domain>";
        let s = summarize(libvirt).unwrap();
        assert_eq!(
            (s.name.as_str(), s.vcpus, s.memory_kib),
            ("foreign", 1, 65536)
        );
        let no_unit = "<domain><name>n</name><uuid>11111111-2222-3333-4444-555555555555</uuid>\
            <memory>1024</memory><vcpu>1</vcpu></domain>";
        assert_eq!(summarize(no_unit).unwrap().memory_kib, 1024);
        assert!(summarize("<domain><name>n</name></domain>").is_err());
    }

    #[test]
    fn a_single_nic_renders_like_the_one_in_a_full_definition() {
        let full = render(&spec()).unwrap();
        let nic = render_nic(&spec().nics[0]).unwrap();
        // The same element, indented one level deeper inside <devices>.
        let inner: String = nic
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>();
        assert!(full.contains(&inner), "{nic}\nnot in\n{full}");
        assert_eq!(read_nics(&full).unwrap(), spec().nics);
        let bad = NicAttachment {
            mac: "01:00:5e:00:00:01".into(),
            ..spec().nics[0].clone()
        };
        assert!(matches!(
            render_nic(&bad),
            Err(DomainXmlError::InvalidMac { .. })
        ));
    }

    #[test]
    fn nics_are_read_from_what_libvirt_returns() {
        let live = r#"<domain type='qemu' id='4'>
  <name>keel-web-1</name>
  <devices>
    <disk type='file' device='disk'><target dev='vda' bus='virtio'/></disk>
    <interface type='bridge'>
      <mac address='52:54:00:AB:CD:01'/>
      <source bridge='kbr100'/>
      <target dev='kt525400abcd01'/>
      <model type='virtio'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:ab:cd:02'/>
      <source bridge='br0'/>
      <target dev='vnet7'/>
      <model type='virtio'/>
    </interface>
    <interface type='user'><mac address='52:54:00:ab:cd:03'/></interface>
  </devices>
</domain>"#;
        let nics = read_nics(live).unwrap();
        let got: Vec<(&str, &str, Option<&str>)> = nics
            .iter()
            .map(|n| (n.mac.as_str(), n.bridge.as_str(), n.target_dev.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("52:54:00:ab:cd:01", "kbr100", Some("kt525400abcd01")),
                ("52:54:00:ab:cd:02", "br0", Some("vnet7")),
                ("52:54:00:ab:cd:03", "", None),
            ]
        );
        assert!(read_nics("<domain><devices/></domain>").unwrap().is_empty());
    }

    #[test]
    fn the_metadata_element_for_set_metadata_has_no_namespace_of_its_own() {
        let m = KeelMetadata {
            vm_id: "vm-<9>".into(),
            generation: 3,
        };
        let el = render_metadata_element(&m).unwrap();
        assert_eq!(el, r#"<vm id="vm-&lt;9&gt;" generation="3"/>"#);
        // What libvirt makes of it reads back.
        let stored = format!(
            r#"<domain><metadata><keel:vm xmlns:keel="{KEEL_METADATA_NS}"{}</metadata></domain>"#,
            el.trim_start_matches("<vm")
        );
        assert_eq!(read_metadata(&stored).unwrap(), Some(m));
        assert!(render_metadata_element(&KeelMetadata {
            vm_id: String::new(),
            generation: 1
        })
        .is_err());
    }
}
