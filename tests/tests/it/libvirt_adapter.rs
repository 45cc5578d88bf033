//! The libvirt adapter (`keel_adapters::hypervisor::libvirt::Libvirt`) against real libvirtd
//! daemons, one per namespace host ([`LibvirtHost`]), with guests defined from
//! `domain_xml::render`:
//!
//! * `lifecycle` — capabilities, define/start/redefine/destroy/shutdown/reset/undefine and
//!   their idempotent repeats, Keel's metadata read back from libvirt's XML, a domain
//!   defined behind Keel's back (with virsh) listed too.
//! * `console` — bytes both ways through the serial console, close from another thread
//!   while a read blocks, a second console taking over the first.
//! * `reconnect` — libvirtd killed (calls fail with a connect error) and restarted (the
//!   next call reconnects; the guest kept running).
//! * `migration` — a live migration between two hosts' daemons, both qemus on loopback
//!   only (`listen_address`) and the stream relayed between the hosts, as the node does.
//! * `nic_hotplug` — a NIC attached to and detached from running guests (live and
//!   persistent definition, the tap on the bridge, Keel's metadata updated in both): on the
//!   echo guest, which never answers the unplug request (the detach stays pending and can
//!   be asked again), and on the tiny Linux guest (`scripts/guest-images tiny`), which
//!   sees the new NIC and releases it.
//!
//! The guest is a 200-byte multiboot kernel booted directly by qemu (no disk, no OS): it
//! prints a marker on COM1, then echoes every byte it receives there (interrupt-driven,
//! halted in between), so the console can be tested end to end within a second of the
//! start under TCG. It ignores ACPI.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use keel_adapters::hypervisor::domain_xml::{
    read_metadata, read_nics, render, render_nic, BootMode, DomainSpec, DomainType, KeelMetadata,
    NicAttachment,
};
use keel_adapters::hypervisor::libvirt::Libvirt;
use keel_adapters::hypervisor::{
    ConsoleStream, DomainState, Hypervisor, HypervisorError, MigrationRequest,
};
use keel_tests::libvirt::LibvirtHost;
use keel_tests::wait::{millis, secs, wait_until_blocking};
use keel_tests::TestNet;
use uuid::Uuid;

const MARKER: &str = "KEEL-CONSOLE-OK";

fn skipped() -> bool {
    match keel_tests::libvirt::skip_reason() {
        Some(reason) => {
            eprintln!("SKIPPED: {reason}");
            true
        }
        None => false,
    }
}

/// Relative jump displacement from `next` (the address after the jump) to `target`.
fn rel8(target: usize, next: usize) -> u8 {
    (target as isize - next as isize) as i8 as u8
}

/// A multiboot (v1, a.out kludge) kernel for qemu's `-kernel`: 32-bit code loaded at
/// 1 MiB that writes [`MARKER`] to COM1, then echoes what COM1 receives from an
/// interrupt handler and halts in between (an idle TCG guest costs no host CPU; a polling
/// loop would burn a whole core).
fn echo_kernel() -> Vec<u8> {
    const BASE: u32 = 0x0010_0000;
    const HEADER_LEN: u32 = 32;
    const MAGIC: u32 = 0x1BAD_B002;
    // Bit 16: load and entry addresses are in the header (no ELF needed).
    const FLAGS: u32 = 1 << 16;
    /// Where the IDT is built (free RAM above the kernel and qemu's multiboot info).
    const IDT: u32 = 0x0030_0000;
    /// COM1 is IRQ 4; the PIC is remapped to vectors 0x20.. below.
    const VECTOR: u32 = 0x24;
    let mut c: Vec<u8> = Vec::new();
    /// Reserves an imm32 for the address of a later label; returns its offset.
    fn imm(c: &mut Vec<u8>) -> usize {
        c.extend([0; 4]);
        c.len() - 4
    }
    c.push(0xfc); // cld
    c.push(0xbe); // mov esi, message
    let msg_imm = imm(&mut c);
    c.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8 (COM1 data)
    let print = c.len();
    c.extend([0xac, 0x84, 0xc0]); // print: lodsb; test al, al
    c.extend([0x74, 0x00]); // jz setup
    let jz_setup = c.len() - 1;
    c.push(0xee); // out dx, al
    c.extend([0xeb, rel8(print, c.len() + 2)]); // jmp print
    let setup = c.len();
    c[jz_setup] = rel8(setup, jz_setup + 1);
    // PIC: master at vector 0x20, slave at 0x28, everything masked but IRQ 4.
    c.extend([0xb0, 0x11, 0xe6, 0x20, 0xe6, 0xa0]); // ICW1 to both
    c.extend([0xb0, 0x20, 0xe6, 0x21, 0xb0, 0x28, 0xe6, 0xa1]); // ICW2: bases
    c.extend([0xb0, 0x04, 0xe6, 0x21, 0xb0, 0x02, 0xe6, 0xa1]); // ICW3: cascade
    c.extend([0xb0, 0x01, 0xe6, 0x21, 0xe6, 0xa1]); // ICW4: 8086 mode
    c.extend([0xb0, 0xef, 0xe6, 0x21, 0xb0, 0xff, 0xe6, 0xa1]); // masks

    // The interrupt gate for VECTOR: handler offset, the current CS, type 0x8e.
    c.push(0xbf); // mov edi, gate
    c.extend((IDT + VECTOR * 8).to_le_bytes());
    c.push(0xb8); // mov eax, handler
    let handler_imm = imm(&mut c);
    c.extend([0x66, 0x89, 0x07]); // mov [edi], ax
    c.extend([0xc1, 0xe8, 0x10]); // shr eax, 16
    c.extend([0x66, 0x89, 0x47, 0x06]); // mov [edi+6], ax
    c.extend([0x66, 0x8c, 0xc8]); // mov ax, cs
    c.extend([0x66, 0x89, 0x47, 0x02]); // mov [edi+2], ax
    c.extend([0x66, 0xc7, 0x47, 0x04, 0x00, 0x8e]); // mov word [edi+4], 0x8e00
    c.extend([0x0f, 0x01, 0x1d]); // lidt [idtr]
    let idtr_imm = imm(&mut c);
    c.extend([0x66, 0xba, 0xfc, 0x03, 0xb0, 0x0b, 0xee]); // MCR = DTR | RTS | OUT2
    c.extend([0x66, 0xba, 0xf9, 0x03, 0xb0, 0x01, 0xee]); // IER = received data
    c.push(0xfb); // sti
    let idle = c.len();
    c.push(0xf4); // idle: hlt
    c.extend([0xeb, rel8(idle, c.len() + 2)]); // jmp idle
    let handler = c.len();
    c.extend([0x50, 0x52]); // handler: push eax; push edx
    let drain = c.len();
    c.extend([0x66, 0xba, 0xfd, 0x03, 0xec]); // drain: mov dx, 0x3fd; in al, dx
    c.extend([0xa8, 0x01, 0x74, 0x00]); // test al, 1 (data ready); jz done
    let jz_done = c.len() - 1;
    c.extend([0x66, 0xba, 0xf8, 0x03, 0xec, 0xee]); // mov dx, 0x3f8; in al, dx; out dx, al
    c.extend([0xeb, rel8(drain, c.len() + 2)]); // jmp drain
    let done = c.len();
    c[jz_done] = rel8(done, jz_done + 1);
    c.extend([0xb0, 0x20, 0xe6, 0x20]); // done: end of interrupt to the PIC
    c.extend([0x5a, 0x58, 0xcf]); // pop edx; pop eax; iretd
    let idtr = c.len();
    c.extend(((VECTOR * 8 + 7) as u16).to_le_bytes()); // IDT limit
    c.extend(IDT.to_le_bytes()); // IDT base
    let msg = c.len();
    c.extend(MARKER.as_bytes());
    c.extend(b"\r\n\0");
    for (at, label) in [(msg_imm, msg), (handler_imm, handler), (idtr_imm, idtr)] {
        c[at..at + 4].copy_from_slice(&(BASE + HEADER_LEN + label as u32).to_le_bytes());
    }
    let checksum = 0u32.wrapping_sub(MAGIC.wrapping_add(FLAGS));
    let header = [MAGIC, FLAGS, checksum, BASE, BASE, 0, 0, BASE + HEADER_LEN];
    let mut image: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    image.extend(c);
    image
}

fn write_kernel(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("echo-kernel.bin");
    std::fs::write(&path, echo_kernel())?;
    Ok(path)
}

fn metadata(generation: u64) -> KeelMetadata {
    KeelMetadata {
        vm_id: "vm-it".into(),
        generation,
    }
}

fn spec(uuid: Uuid, name: &str, kernel: &Path, serial_log: &Path, generation: u64) -> DomainSpec {
    DomainSpec {
        uuid,
        name: name.into(),
        domain_type: DomainType::Qemu,
        vcpus: 1,
        memory_mib: 64,
        disks: vec![],
        boot: BootMode::Kernel {
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: String::new(),
        },
        nics: vec![],
        serial_log: Some(serial_log.to_path_buf()),
        vnc: None,
        metadata: metadata(generation),
    }
}

fn state(hv: &Libvirt, uuid: Uuid) -> Result<DomainState> {
    Ok(hv
        .lookup(uuid)?
        .ok_or_else(|| anyhow!("domain {uuid} is not defined"))?
        .state)
}

/// Waits until the guest printed its marker into its serial log.
fn wait_marker(log: &Path) -> Result<()> {
    wait_until_blocking(
        format!("{MARKER} in {}", log.display()),
        secs(30),
        millis(100),
        || {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            Ok(text.contains(MARKER).then_some(()))
        },
    )?;
    Ok(())
}

/// A domain name unique to this run.
fn name(tag: &str) -> String {
    format!("keel-it-{tag}-{:06x}", rand_suffix())
}

fn rand_suffix() -> u32 {
    Uuid::new_v4().as_fields().0 & 0x00ff_ffff
}

#[test]
fn lifecycle() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    let net = TestNet::new(1)?;
    let host = LibvirtHost::start(&net, 0)?;
    eprintln!(
        "libvirtd answered after {:.2?} ({} capability cache)",
        host.last_start(),
        if host.started_warm() { "warm" } else { "cold" }
    );
    let hv = Libvirt::new(&host.uri());
    let caps = hv.capabilities()?;
    eprintln!("capabilities: {caps:?}");
    ensure!(caps.domain_types.iter().any(|t| t == "qemu"), "{caps:?}");
    ensure!(caps.libvirt_version.starts_with("9."), "{caps:?}");

    let kernel = write_kernel(host.dir())?;
    let uuid = Uuid::new_v4();
    let vm = name("life");
    let serial = host.dir().join("life.serial.log");
    let t = Instant::now();
    let info = hv.define(&render(&spec(uuid, &vm, &kernel, &serial, 1))?)?;
    let define_took = t.elapsed();
    ensure!(info.uuid == uuid && info.name == vm, "{info:?}");
    ensure!(
        info.state == DomainState::ShutOff && info.persistent,
        "{info:?}"
    );
    ensure!(info.vcpus == 1 && info.memory_kib == 64 * 1024, "{info:?}");
    hv.start(uuid)?;
    eprintln!(
        "define {define_took:.2?}, define + start {:.2?}",
        t.elapsed()
    );
    ensure!(state(&hv, uuid)? == DomainState::Running);
    wait_marker(&serial)?;
    eprintln!(
        "guest marker in the serial log {:.2?} after define",
        t.elapsed()
    );
    hv.start(uuid).context("start of a running domain")?;
    ensure!(state(&hv, uuid)? == DomainState::Running);

    // Keel's metadata comes back through libvirt.
    ensure!(read_metadata(&hv.xml(uuid)?)? == Some(metadata(1)));

    // Redefining (same UUID, next generation) replaces the definition: still one domain,
    // still running its old configuration until the next start.
    let info = hv.define(&render(&spec(uuid, &vm, &kernel, &serial, 2))?)?;
    ensure!(info.state == DomainState::Running, "{info:?}");
    let same: Vec<_> = hv.list()?.into_iter().filter(|d| d.uuid == uuid).collect();
    ensure!(same.len() == 1, "{same:?}");
    let inactive = host.virsh(&["dumpxml", "--inactive", &uuid.to_string()])?;
    ensure!(read_metadata(&inactive)? == Some(metadata(2)), "{inactive}");
    ensure!(read_metadata(&hv.xml(uuid)?)? == Some(metadata(1)));

    hv.destroy(uuid)?;
    ensure!(state(&hv, uuid)? == DomainState::ShutOff);
    hv.destroy(uuid).context("destroy of a shut-off domain")?;
    hv.shutdown(uuid).context("shutdown of a shut-off domain")?;
    ensure!(read_metadata(&hv.xml(uuid)?)? == Some(metadata(2)));

    hv.start(uuid)?;
    ensure!(state(&hv, uuid)? == DomainState::Running);
    // No OS: the guest ignores the ACPI request; the call itself succeeds.
    hv.shutdown(uuid)?;
    let s = state(&hv, uuid)?;
    ensure!(
        matches!(s, DomainState::Running | DomainState::ShuttingDown),
        "{s:?}"
    );
    hv.reset(uuid)?;
    hv.destroy(uuid)?;
    ensure!(state(&hv, uuid)? == DomainState::ShutOff);
    hv.undefine(uuid)?;
    hv.undefine(uuid).context("undefine of an absent domain")?;
    ensure!(hv.lookup(uuid)?.is_none());
    hv.destroy(uuid).context("destroy of an absent domain")?;
    match hv.start(uuid) {
        Err(HypervisorError::NoSuchDomain { uuid: u }) if u == uuid => {}
        other => return Err(anyhow!("start of an absent domain: {other:?}")),
    }
    match hv.xml(uuid) {
        Err(HypervisorError::NoSuchDomain { .. }) => {}
        other => return Err(anyhow!("xml of an absent domain: {other:?}")),
    }

    // A domain Keel did not define is listed as well (and has no Keel metadata).
    let foreign = Uuid::new_v4();
    let foreign_xml = host.dir().join("foreign.xml");
    std::fs::write(
        &foreign_xml,
        format!(
            "<domain type='qemu'><name>{}</name><uuid>{foreign}</uuid>\
             <memory unit='MiB'>32</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64'>hvm</type></os></domain>",
            name("foreign")
        ),
    )?;
    host.virsh(&["define", &foreign_xml.to_string_lossy()])?;
    let listed = hv.list()?;
    let f = listed
        .iter()
        .find(|d| d.uuid == foreign)
        .ok_or_else(|| anyhow!("foreign domain not listed: {listed:?}"))?;
    ensure!(f.persistent && f.state == DomainState::ShutOff, "{f:?}");
    ensure!(read_metadata(&hv.xml(foreign)?)?.is_none());
    hv.undefine(foreign)?;
    Ok(())
}

/// Reads from `console` on a thread until end-of-file or an error; every chunk goes to
/// the returned channel, then the final result.
fn spawn_reader(
    console: Arc<dyn ConsoleStream>,
) -> (
    mpsc::Receiver<Vec<u8>>,
    std::thread::JoinHandle<std::io::Result<usize>>,
) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        loop {
            match console.read(&mut buf) {
                Ok(0) => return Ok(0),
                Ok(n) => {
                    let _ = tx.send(buf[..n].to_vec());
                }
                Err(e) => return Err(e),
            }
        }
    });
    (rx, handle)
}

/// Collects chunks until their concatenation contains `want`.
fn read_until(rx: &mpsc::Receiver<Vec<u8>>, want: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => {
                got.extend(chunk);
                let text = String::from_utf8_lossy(&got).into_owned();
                if text.contains(want) {
                    return Ok(text);
                }
            }
            Err(e) => {
                return Err(anyhow!(
                    "waiting for {want:?} on the console: {e}; got {:?}",
                    String::from_utf8_lossy(&got)
                ))
            }
        }
    }
}

/// Waits (bounded) for a reader thread to finish.
fn join_within(
    handle: std::thread::JoinHandle<std::io::Result<usize>>,
    timeout: Duration,
) -> Result<std::io::Result<usize>> {
    wait_until_blocking("the console reader to return", timeout, millis(20), || {
        Ok(handle.is_finished().then_some(()))
    })?;
    handle
        .join()
        .map_err(|_| anyhow!("the console reader panicked"))
}

/// Round trips in the console test.
const ECHO_ROUNDS: usize = 200;

#[test]
fn console() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    let net = TestNet::new(1)?;
    let host = LibvirtHost::start(&net, 0)?;
    let hv = Libvirt::new(&host.uri());
    let kernel = write_kernel(host.dir())?;
    let uuid = Uuid::new_v4();
    let serial = host.dir().join("console.serial.log");
    hv.define(&render(&spec(uuid, &name("con"), &kernel, &serial, 1))?)?;
    hv.start(uuid)?;
    wait_marker(&serial)?;

    let first: Arc<dyn ConsoleStream> = Arc::from(hv.open_console(uuid)?);
    let (rx, reader) = spawn_reader(first.clone());
    // Written while the reader thread waits in a read: must not wait for it.
    let t = Instant::now();
    first.write_all(b"hello-from-keel\n")?;
    let echoed = read_until(&rx, "hello-from-keel", secs(20))?;
    eprintln!("console echo after {:.2?}: {echoed:?}", t.elapsed());
    // Many short round trips: every echo must reach the reader, including its tail when
    // it arrives while a write is still in flight (libvirt completes only the first
    // pending call of a stream; a blocking reader once slept through such a tail).
    let t = Instant::now();
    for round in 0..ECHO_ROUNDS {
        let line = format!("round-{round}-end");
        first.write_all(format!("{line}\n").as_bytes())?;
        read_until(&rx, &line, secs(20))?;
    }
    eprintln!("{ECHO_ROUNDS} console round trips in {:.2?}", t.elapsed());

    // close() from this thread ends the waiting read promptly, as end-of-file.
    let t = Instant::now();
    first.close();
    let ended = join_within(reader, secs(5))?;
    eprintln!(
        "waiting read returned {ended:?} {:.2?} after close",
        t.elapsed()
    );
    ensure!(matches!(ended, Ok(0)), "{ended:?}");
    ensure!(first.write(b"x").is_err(), "write after close must fail");
    let mut buf = [0u8; 8];
    ensure!(first.read(&mut buf)? == 0);

    // A second console takes over from the first.
    let second: Arc<dyn ConsoleStream> = Arc::from(hv.open_console(uuid)?);
    let (rx2, reader2) = spawn_reader(second.clone());
    let third: Arc<dyn ConsoleStream> = Arc::from(hv.open_console(uuid)?);
    let ended = join_within(reader2, secs(10))?;
    eprintln!("the console taken over read {ended:?}");
    drop(rx2);
    let (rx3, reader3) = spawn_reader(third.clone());
    third.write_all(b"second-client\n")?;
    read_until(&rx3, "second-client", secs(20))?;

    // The domain stopping ends the console too.
    hv.destroy(uuid)?;
    let ended = join_within(reader3, secs(10))?;
    eprintln!("the console of a destroyed domain read {ended:?}");
    drop(third);
    drop(second);
    hv.undefine(uuid)?;
    Ok(())
}

#[test]
fn reconnect() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    let net = TestNet::new(1)?;
    let mut host = LibvirtHost::start(&net, 0)?;
    let hv = Libvirt::new(&host.uri());
    let kernel = write_kernel(host.dir())?;
    let uuid = Uuid::new_v4();
    let serial = host.dir().join("reconnect.serial.log");
    hv.define(&render(&spec(uuid, &name("rec"), &kernel, &serial, 1))?)?;
    hv.start(uuid)?;
    wait_marker(&serial)?;
    let qemu_before = host.qemu_pids();
    ensure!(qemu_before.len() == 1, "{qemu_before:?}");

    let t = Instant::now();
    host.kill_daemons()?;
    eprintln!(
        "libvirtd and virtlogd killed and reaped in {:.2?}",
        t.elapsed()
    );
    match hv.list() {
        Err(HypervisorError::Connect { .. }) => {}
        other => return Err(anyhow!("list with libvirtd dead: {other:?}")),
    }
    let t = Instant::now();
    host.restart()?;
    eprintln!(
        "libvirtd restarted in {:.2?} (answering {:.2?} after its start)",
        t.elapsed(),
        host.last_start()
    );
    // The very next call reconnects; libvirtd re-attached to the still running guest.
    ensure!(state(&hv, uuid)? == DomainState::Running);
    ensure!(host.qemu_pids() == qemu_before);

    // Once more, with the adapter idle meanwhile: the next call reconnects again.
    host.restart()?;
    ensure!(state(&hv, uuid)? == DomainState::Running);
    hv.destroy(uuid)?;
    hv.undefine(uuid)?;
    ensure!(hv.lookup(uuid)?.is_none());
    Ok(())
}

#[test]
fn migration() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    let net = TestNet::new(2)?;
    let src = LibvirtHost::start(&net, 0)?;
    let dst = LibvirtHost::start(&net, 1)?;
    let (hv_src, hv_dst) = (Libvirt::new(&src.uri()), Libvirt::new(&dst.uri()));
    let kernel = write_kernel(src.dir())?;
    let uuid = Uuid::new_v4();
    let vm = name("mig");
    let src_log = src.dir().join("mig.serial.log");
    let dst_log = dst.dir().join("mig.serial.log");
    hv_src.define(&render(&spec(uuid, &vm, &kernel, &src_log, 1))?)?;
    hv_src.start(uuid)?;
    wait_marker(&src_log)?;

    // As the node runs it: both qemus on loopback only, the stream carried between the
    // hosts by a relay (the node's is mTLS over the peer port; this one is plain).
    let relay = LoopbackRelay::start(&net, 0, 1)?;
    let request = MigrationRequest {
        dest_uri: dst.uri(),
        migrate_uri: format!("tcp://127.0.0.1:{}", relay.port),
        listen_address: Some("127.0.0.1".into()),
        disks_port: None,
        dest_xml: render(&spec(uuid, &vm, &kernel, &dst_log, 1))?,
        copy_storage: false,
        disks: vec![],
    };
    let t = Instant::now();
    hv_src.migrate(uuid, &request)?;
    let relayed = relay.finish()?;
    eprintln!(
        "live migration took {:.2?}; {relayed} bytes through the loopback relay",
        t.elapsed()
    );
    ensure!(
        relayed > 0,
        "the migration stream did not go through the relay"
    );
    ensure!(
        hv_src.lookup(uuid)?.is_none(),
        "still defined on the source"
    );
    let moved = hv_dst
        .lookup(uuid)?
        .ok_or_else(|| anyhow!("not on the destination"))?;
    ensure!(
        moved.state == DomainState::Running && moved.persistent,
        "{moved:?}"
    );
    // The guest lives on: it still echoes, through the destination's console.
    let console: Arc<dyn ConsoleStream> = Arc::from(hv_dst.open_console(uuid)?);
    let (rx, reader) = spawn_reader(console.clone());
    console.write_all(b"after-migration\n")?;
    read_until(&rx, "after-migration", secs(20))?;
    console.close();
    join_within(reader, secs(5))??;
    hv_dst.destroy(uuid)?;
    hv_dst.undefine(uuid)?;
    Ok(())
}

/// Relays connections to 127.0.0.1:`port` in host `from` to the same port in host `to`,
/// counting the bytes sent towards `to`: two loopbacks joined, as the node joins them for
/// a live migration.
struct LoopbackRelay {
    port: u16,
    thread: std::thread::JoinHandle<Result<u64>>,
}

impl LoopbackRelay {
    /// How long the relay waits for its connections.
    const WAIT: Duration = Duration::from_secs(120);

    fn start(net: &TestNet, from: usize, to: usize) -> Result<Self> {
        use std::net::{TcpListener, TcpStream};
        let listener = net.in_host(from, || TcpListener::bind("127.0.0.1:0"))??;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let to_ns = std::fs::File::open(PathBuf::from("/run/netns").join(net.ns(to)))?;
        // Connects from host `to`: this (relay) thread moves there once it has accepted.
        let connect = move || -> Result<TcpStream> {
            nix::sched::setns(&to_ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(TcpStream::connect(("127.0.0.1", port))?)
        };
        let thread = std::thread::spawn(move || -> Result<u64> {
            // qemu opens one connection for the stream (no multifd): relay it to the end.
            let inbound = wait_until_blocking(
                "the source qemu connecting to the relay",
                Self::WAIT,
                millis(20),
                || match listener.accept() {
                    Ok((conn, _)) => Ok(Some(conn)),
                    Err(e) => Err(e.into()),
                },
            )?;
            inbound.set_nonblocking(false)?;
            let outbound = connect()?;
            let (mut in_rd, mut in_wr) = (inbound.try_clone()?, inbound);
            let (mut out_rd, mut out_wr) = (outbound.try_clone()?, outbound);
            let back = std::thread::spawn(move || {
                let _ = std::io::copy(&mut out_rd, &mut in_wr);
                let _ = in_wr.shutdown(std::net::Shutdown::Write);
            });
            let sent = std::io::copy(&mut in_rd, &mut out_wr)?;
            let _ = out_wr.shutdown(std::net::Shutdown::Write);
            let _ = back.join();
            Ok(sent)
        });
        Ok(Self { port, thread })
    }

    /// The bytes relayed towards the destination, once both sides closed.
    fn finish(self) -> Result<u64> {
        self.thread
            .join()
            .map_err(|_| anyhow!("the relay thread panicked"))?
    }
}

/// The MACs of the interfaces in a domain XML.
fn macs(xml: &str) -> Result<Vec<String>> {
    Ok(read_nics(xml)?.into_iter().map(|n| n.mac).collect())
}

/// The tiny Linux test guest (kernel and initrd), or `None` when it was not built.
fn tiny_guest() -> Option<(PathBuf, PathBuf)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest-images");
    let (kernel, initrd) = (dir.join("keel-tiny.vmlinuz"), dir.join("keel-tiny.initrd"));
    (kernel.exists() && initrd.exists()).then_some((kernel, initrd))
}

/// Waits until `text` is in the file at `log`.
fn wait_log(log: &Path, text: &str, timeout: Duration) -> Result<()> {
    wait_until_blocking(
        format!("{text} in {}", log.display()),
        timeout,
        millis(100),
        || {
            let got = std::fs::read_to_string(log).unwrap_or_default();
            Ok(got.contains(text).then_some(()))
        },
    )?;
    Ok(())
}

#[test]
fn nic_hotplug() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    let net = TestNet::new(1)?;
    let host = LibvirtHost::start(&net, 0)?;
    let hv = Libvirt::new(&host.uri());
    // libvirt creates the tap in its own namespace: the bridge must be there.
    net.exec(0, "ip", &["link", "add", "kbrhp", "type", "bridge"])?;
    net.exec(0, "ip", &["link", "set", "kbrhp", "up"])?;
    let nic = |mac: &str, tap: &str| NicAttachment {
        mac: mac.into(),
        bridge: "kbrhp".into(),
        model: "virtio".into(),
        target_dev: Some(tap.into()),
    };
    let inactive = |uuid: Uuid| host.virsh(&["dumpxml", "--inactive", &uuid.to_string()]);

    // The echo guest: no OS, so nothing ever answers an unplug request.
    let kernel = write_kernel(host.dir())?;
    let uuid = Uuid::new_v4();
    let serial = host.dir().join("hp.serial.log");
    hv.define(&render(&spec(uuid, &name("hp"), &kernel, &serial, 1))?)?;
    hv.start(uuid)?;
    wait_marker(&serial)?;
    let a = nic("52:54:00:6b:00:01", "kt5254006b0001");
    let t = Instant::now();
    hv.attach_device(uuid, &render_nic(&a)?)?;
    eprintln!("attach took {:.2?}", t.elapsed());
    let live = read_nics(&hv.xml(uuid)?)?;
    ensure!(
        live.len() == 1 && live[0].mac == a.mac && live[0].bridge == "kbrhp",
        "{live:?}"
    );
    ensure!(
        live[0].target_dev.as_deref() == Some("kt5254006b0001"),
        "{live:?}"
    );
    ensure!(
        macs(&inactive(uuid)?)? == [a.mac.clone()],
        "not in the persistent definition"
    );
    let link = net.exec(0, "ip", &["-o", "link", "show", "kt5254006b0001"])?;
    ensure!(link.contains("master kbrhp"), "{link}");
    // The generation moves in both definitions.
    hv.set_metadata(uuid, &metadata(2))?;
    hv.set_metadata(uuid, &metadata(2))
        .context("set_metadata again")?;
    ensure!(read_metadata(&hv.xml(uuid)?)? == Some(metadata(2)));
    ensure!(read_metadata(&inactive(uuid)?)? == Some(metadata(2)));
    let live_xml = hv.xml(uuid)?;
    ensure!(
        live_xml.matches("urn:keel:vm:1").count() == 1,
        "one Keel element: {live_xml}"
    );

    // Detach: out of the persistent definition at once; the guest never lets go.
    let t = Instant::now();
    hv.detach_device(uuid, &render_nic(&a)?)?;
    eprintln!("detach (unanswered) took {:.2?}", t.elapsed());
    ensure!(
        macs(&inactive(uuid)?)?.is_empty(),
        "still in the persistent definition"
    );
    ensure!(
        macs(&hv.xml(uuid)?)? == [a.mac.clone()],
        "the guest cannot have released it"
    );
    // Asking again (the persistent definition has it no more) repeats the request only.
    let t = Instant::now();
    hv.detach_device(uuid, &render_nic(&a)?)
        .context("a second detach while the first is pending")?;
    eprintln!("second detach took {:.2?}", t.elapsed());
    // Stopped and started, the domain runs without it.
    hv.destroy(uuid)?;
    hv.start(uuid)?;
    ensure!(macs(&hv.xml(uuid)?)?.is_empty());
    // Absent from both: succeeds.
    hv.detach_device(uuid, &render_nic(&a)?)
        .context("detach of an absent NIC")?;
    // A NIC on a bridge that does not exist fails and changes nothing.
    let nowhere = NicAttachment {
        bridge: "kbrnone".into(),
        ..nic("52:54:00:6b:00:09", "kt5254006b0009")
    };
    ensure!(hv.attach_device(uuid, &render_nic(&nowhere)?).is_err());
    ensure!(macs(&hv.xml(uuid)?)?.is_empty() && macs(&inactive(uuid)?)?.is_empty());
    hv.destroy(uuid)?;
    hv.undefine(uuid)?;

    // The tiny Linux guest handles ACPI PCI hot-plug: it sees the NIC and releases it.
    let Some((vmlinuz, initrd)) = tiny_guest() else {
        bail!("the tiny guest is missing: build it with `scripts/guest-images tiny` (scripts/test does)");
    };
    let uuid = Uuid::new_v4();
    let serial = host.dir().join("hp-linux.serial.log");
    let mut linux = spec(uuid, &name("hpl"), &vmlinuz, &serial, 1);
    linux.memory_mib = 128;
    linux.boot = BootMode::Kernel {
        kernel: vmlinuz.clone(),
        initrd: Some(initrd),
        cmdline: "console=ttyS0".into(),
    };
    hv.define(&render(&linux)?)?;
    hv.start(uuid)?;
    let t = Instant::now();
    wait_log(&serial, "KEEL-TINY-READY", secs(90))?;
    eprintln!("tiny guest ready after {:.2?}", t.elapsed());
    let b = nic("52:54:00:6b:00:02", "kt5254006b0002");
    let t = Instant::now();
    hv.attach_device(uuid, &render_nic(&b)?)?;
    let console: Arc<dyn ConsoleStream> = Arc::from(hv.open_console(uuid)?);
    let (rx, reader) = spawn_reader(console.clone());
    // The guest's kernel probes the new virtio device; its MAC shows up as eth0.
    let deadline = Instant::now() + secs(30);
    loop {
        console.write_all(b"cat /sys/class/net/eth0/address 2>/dev/null | sed 's/^/HP-/'\n")?;
        match read_until(&rx, "HP-52:54:00:6b:00:02", secs(3)) {
            Ok(_) => break,
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context("the guest never saw the hot-plugged NIC"))
            }
            Err(_) => {}
        }
    }
    eprintln!("the guest saw the NIC {:.2?} after the attach", t.elapsed());
    let t = Instant::now();
    hv.detach_device(uuid, &render_nic(&b)?)?;
    wait_until_blocking(
        "the guest to release the NIC",
        secs(20),
        millis(200),
        || Ok(macs(&hv.xml(uuid)?)?.is_empty().then_some(())),
    )?;
    eprintln!(
        "the guest released the NIC {:.2?} after the detach request",
        t.elapsed()
    );
    ensure!(macs(&inactive(uuid)?)?.is_empty());
    wait_until_blocking("the tap to go", secs(10), millis(100), || {
        Ok(net
            .exec(0, "ip", &["link", "show", "kt5254006b0002"])
            .is_err()
            .then_some(()))
    })?;
    console.write_all(b"test -e /sys/class/net/eth0 || echo NO''-ETH0\n")?;
    read_until(&rx, "NO-ETH0", secs(10)).context("the guest still has eth0")?;
    console.close();
    join_within(reader, secs(5))??;
    hv.destroy(uuid)?;
    hv.undefine(uuid)?;
    Ok(())
}
