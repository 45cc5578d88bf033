//! Deciding KVM by booting, never by `/dev/kvm`: a nested host can have a `/dev/kvm` on
//! which stock kernels hang in early boot (this project's own CI machines do). The probe
//! boots a small Linux guest (the tiny template's kernel and initramfs) as a `kvm` domain
//! and waits for its boot marker on the serial console; only then do VMs on this host
//! get `<domain type='kvm'>`. Otherwise they run under TCG (`qemu`).
//!
//! ```text
//!  no /dev/kvm, or libvirt offers no kvm ─► not usable (TCG)
//!  no probe kernel installed             ─► not probed (TCG), said in the report
//!  define + start keel-kvm-probe ─► marker within the deadline? ─► usable (KVM)
//!                                          └─ no / start failed ─► not usable (TCG)
//!  always: destroy + undefine the probe domain, remove its log
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use uuid::Uuid;

use keel_adapters::hypervisor::domain_xml::{self, BootMode, DomainSpec, DomainType, KeelMetadata};
use keel_adapters::hypervisor::Hypervisor;

/// What the tiny guest prints first on its console.
const BOOT_MARKER: &str = "KEEL-TINY-BOOT";
/// Fixed, so a probe domain left by a crash is found and removed by the next probe.
const PROBE_UUID: Uuid = Uuid::from_u128(0x6b65_656c_2d6b_766d_2d70_726f_6265_0001);
const PROBE_NAME: &str = "keel-kvm-probe";

/// The probe's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmVerdict {
    /// `None`: not probed.
    pub usable: Option<bool>,
    pub detail: String,
}

/// Where the probe guest is.
#[derive(Debug, Clone)]
pub struct ProbeGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Boots the probe guest under KVM, waiting at most `deadline` for its marker.
pub fn probe(
    hv: &dyn Hypervisor,
    advertises_kvm: bool,
    guest: &ProbeGuest,
    run_dir: &Path,
    deadline: Duration,
) -> KvmVerdict {
    let no = |detail: String| KvmVerdict {
        usable: Some(false),
        detail,
    };
    if !Path::new("/dev/kvm").exists() {
        return no("no /dev/kvm: VMs run under TCG".into());
    }
    if !advertises_kvm {
        return no("libvirt offers no kvm domain type: VMs run under TCG".into());
    }
    if !guest.kernel.is_file() || !guest.initrd.is_file() {
        return KvmVerdict {
            usable: None,
            detail: format!(
                "not probed: no probe guest at {} (VMs run under TCG)",
                guest.kernel.display()
            ),
        };
    }
    let log = run_dir.join("kvm-probe.log");
    let _ = std::fs::create_dir_all(run_dir);
    let _ = std::fs::remove_file(&log);
    cleanup(hv);
    let spec = DomainSpec {
        uuid: PROBE_UUID,
        name: PROBE_NAME.into(),
        domain_type: DomainType::Kvm,
        vcpus: 1,
        memory_mib: 128,
        disks: vec![],
        boot: BootMode::Kernel {
            kernel: guest.kernel.clone(),
            initrd: Some(guest.initrd.clone()),
            cmdline: "console=ttyS0 quiet".into(),
        },
        nics: vec![],
        serial_log: Some(log.clone()),
        vnc: None,
        metadata: KeelMetadata {
            vm_id: "kvm-probe".into(),
            generation: 0,
        },
    };
    let started = Instant::now();
    let verdict = (|| {
        let xml = domain_xml::render(&spec).map_err(|e| keel_cluster::error_chain(&e))?;
        hv.define(&xml).map_err(|e| keel_cluster::error_chain(&e))?;
        hv.start(PROBE_UUID)
            .map_err(|e| keel_cluster::error_chain(&e))?;
        while started.elapsed() < deadline {
            let seen = std::fs::read(&log)
                .map(|b| String::from_utf8_lossy(&b).contains(BOOT_MARKER))
                .unwrap_or(false);
            if seen {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok::<bool, String>(false)
    })();
    cleanup(hv);
    let _ = std::fs::remove_file(&log);
    match verdict {
        Ok(true) => KvmVerdict {
            usable: Some(true),
            detail: format!(
                "a guest booted under KVM in {} ms",
                started.elapsed().as_millis()
            ),
        },
        Ok(false) => no(format!(
            "a guest did not boot under KVM within {} s (nested or broken KVM): VMs run under TCG",
            deadline.as_secs()
        )),
        Err(e) => no(format!(
            "a KVM guest would not start ({e}): VMs run under TCG"
        )),
    }
}

fn cleanup(hv: &dyn Hypervisor) {
    let _ = hv.destroy(PROBE_UUID);
    let _ = hv.undefine(PROBE_UUID);
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_adapters::hypervisor::fake::FakeHypervisor;

    #[test]
    fn a_missing_probe_guest_means_not_probed_and_leaves_nothing() {
        let hv = FakeHypervisor::new();
        let dir = tempfile::tempdir().expect("tmp");
        let guest = ProbeGuest {
            kernel: dir.path().join("none"),
            initrd: dir.path().join("none"),
        };
        let v = probe(&hv, true, &guest, dir.path(), Duration::from_millis(10));
        if Path::new("/dev/kvm").exists() {
            assert_eq!(v.usable, None, "{v:?}");
        } else {
            assert_eq!(v.usable, Some(false), "{v:?}");
        }
        assert!(hv.domains().is_empty());
    }

    #[test]
    fn a_guest_that_never_prints_its_marker_is_a_no_and_is_cleaned_up() {
        if !Path::new("/dev/kvm").exists() {
            return;
        }
        let hv = FakeHypervisor::new();
        let dir = tempfile::tempdir().expect("tmp");
        let (kernel, initrd) = (dir.path().join("k"), dir.path().join("i"));
        std::fs::write(&kernel, b"k").expect("write");
        std::fs::write(&initrd, b"i").expect("write");
        let v = probe(
            &hv,
            true,
            &ProbeGuest { kernel, initrd },
            dir.path(),
            Duration::from_millis(300),
        );
        assert_eq!(v.usable, Some(false), "{v:?}");
        assert!(v.detail.contains("did not boot"), "{v:?}");
        assert!(hv.domains().is_empty(), "the probe domain was removed");
    }
}
