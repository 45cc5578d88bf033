//! The node-local image store: templates and the disks of the VMs this host runs.
//!
//! ```text
//! <images_dir>/
//!   templates/<template id>.<qcow2|raw|iso>   verified copies, read-only for qemu
//!   incoming/<random>.part                     uploads and fetches in flight
//!   vms/<vm id>/root.qcow2                     copy-on-write overlay on the template
//!   vms/<vm id>/data-<n>.qcow2                 empty data disks
//!   vms/<vm id>/seed.img                       NoCloud seed (vfat, label cidata)
//!   vms/<vm id>/console.log                    serial console log (written by virtlogd)
//! ```
//!
//! Storage sits behind [`Volumes`] so that Ceph RBD can replace the local qcow2 backend
//! without touching the reconciler. The local backend shells out to `qemu-img` (the only
//! tool that writes qcow2 headers qemu trusts); everything else is plain file IO.
//!
//! Security: an uploaded image is inspected with `qemu-img info` and refused if it has a
//! backing file (a qcow2 naming `/etc/shadow` as its backing file would otherwise hand
//! that file to the guest), or if its real format is not the declared one.

use std::path::{Path, PathBuf};
use std::process::Command;

use keel_cluster::model::compute::ImageFormat;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image store IO failed on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run qemu-img {args}; is qemu-utils installed?")]
    QemuImgSpawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-img {args} failed: {stderr}")]
    QemuImg { args: String, stderr: String },
    #[error("checksum mismatch: the image's SHA-256 is {actual}, the request said {expected}")]
    ChecksumMismatch { expected: String, actual: String },
    #[error("the image is {actual}, not the declared {declared}")]
    FormatMismatch { declared: String, actual: String },
    #[error("the image has a backing file ({backing}); upload a self-contained image (`qemu-img convert -O qcow2`)")]
    HasBackingFile { backing: String },
    #[error("unsupported image format {format:?}: use qcow2, raw or iso")]
    UnsupportedFormat { format: String },
    #[error("the image is empty")]
    Empty,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A verified image placed in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    pub path: PathBuf,
    pub format: ImageFormat,
    pub size_bytes: u64,
    pub virtual_size_bytes: u64,
    pub sha256: String,
}

/// Where a VM's disks are on this host, for the domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDisks {
    /// Root disk (qcow2 overlay, or an empty qcow2 for ISO installs).
    pub root: PathBuf,
    /// The ISO to attach as a CD-ROM, if the VM boots one.
    pub cdrom: Option<PathBuf>,
    pub data: Vec<PathBuf>,
    pub seed: PathBuf,
    pub console_log: PathBuf,
}

/// The disk side of a VM, as the reconciler needs it.
pub trait Volumes: Send + Sync + 'static {
    /// Whether a verified copy of the template is in the store.
    fn has_template(&self, template_id: &str, format: ImageFormat) -> bool;
    fn template_path(&self, template_id: &str, format: ImageFormat) -> PathBuf;
    /// Creates what is missing of the VM's disks (existing disks are kept: they hold the
    /// guest's data). `root_size_bytes` of `None` keeps the template's size.
    fn ensure_vm_disks(&self, request: &DiskRequest<'_>) -> Result<VmDisks, ImageError>;
    /// Removes every file of the VM. Absent files are fine.
    fn delete_vm(&self, vm_id: &str) -> Result<(), ImageError>;
    /// The VM's directory paths without creating anything.
    fn vm_paths(&self, vm_id: &str, data_disks: usize, cdrom: Option<PathBuf>) -> VmDisks;
}

/// What [`Volumes::ensure_vm_disks`] needs.
#[derive(Debug, Clone)]
pub struct DiskRequest<'a> {
    pub vm_id: &'a str,
    pub template_id: &'a str,
    pub template_format: ImageFormat,
    pub root_size_bytes: Option<u64>,
    pub data_disk_bytes: Vec<u64>,
    pub seed: &'a keel_adapters::hypervisor::seed::NoCloudSeed,
}

/// The local qcow2 backend.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the store's directories.
    pub fn prepare(&self) -> Result<(), ImageError> {
        for sub in ["templates", "incoming", "vms"] {
            let dir = self.root.join(sub);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(())
    }

    /// A fresh path under `incoming/` for an upload or fetch in flight.
    pub fn incoming_path(&self) -> Result<PathBuf, ImageError> {
        let dir = self.root.join("incoming");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(dir.join(format!("{}.part", uuid::Uuid::new_v4().simple())))
    }

    fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.root.join("vms").join(vm_id)
    }

    /// Verifies a file (checksum, real format, no backing file) and moves it into the
    /// store as template `template_id`. `src` must be on the same filesystem when
    /// `move_src` is set (uploads land in `incoming/`); otherwise it is copied.
    pub fn adopt(
        &self,
        src: &Path,
        move_src: bool,
        template_id: &str,
        declared: ImageFormat,
        expected_sha256: Option<&str>,
    ) -> Result<StoredImage, ImageError> {
        self.prepare()?;
        let size_bytes = std::fs::metadata(src).map_err(io(src))?.len();
        if size_bytes == 0 {
            return Err(ImageError::Empty);
        }
        let sha256 = sha256_file(src)?;
        if let Some(expected) = expected_sha256 {
            if !expected.eq_ignore_ascii_case(&sha256) {
                return Err(ImageError::ChecksumMismatch {
                    expected: expected.to_ascii_lowercase(),
                    actual: sha256,
                });
            }
        }
        let virtual_size_bytes = match declared {
            ImageFormat::Iso => {
                check_iso(src)?;
                size_bytes
            }
            ImageFormat::Kernel => {
                check_kernel(src)?;
                size_bytes
            }
            // Any compression (gzip, zstd, xz) or a bare cpio: the kernel decides.
            ImageFormat::Initrd => size_bytes,
            ImageFormat::Qcow2 | ImageFormat::Raw => {
                let info = qemu_img_info(src)?;
                let actual = info
                    .get("format")
                    .and_then(|f| f.as_str())
                    .unwrap_or("unknown")
                    .to_string();
                if actual != declared.as_str() {
                    return Err(ImageError::FormatMismatch {
                        declared: declared.as_str().into(),
                        actual,
                    });
                }
                if let Some(backing) = info.get("backing-filename").and_then(|b| b.as_str()) {
                    return Err(ImageError::HasBackingFile {
                        backing: backing.into(),
                    });
                }
                info.get("virtual-size")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(size_bytes)
            }
        };
        let dest = self.template_path(template_id, declared);
        let tmp = self.incoming_path()?;
        if move_src {
            std::fs::rename(src, &tmp).map_err(io(src))?;
        } else {
            std::fs::copy(src, &tmp).map_err(io(src))?;
        }
        set_read_only(&tmp)?;
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        sync_dir(dest.parent().unwrap_or(&self.root));
        Ok(StoredImage {
            path: dest,
            format: declared,
            size_bytes,
            virtual_size_bytes,
            sha256,
        })
    }

    /// Places a fetched copy of a known template after checking its checksum.
    pub fn adopt_fetched(
        &self,
        src: &Path,
        template_id: &str,
        format: ImageFormat,
        sha256: &str,
    ) -> Result<PathBuf, ImageError> {
        let actual = sha256_file(src)?;
        if !actual.eq_ignore_ascii_case(sha256) {
            let _ = std::fs::remove_file(src);
            return Err(ImageError::ChecksumMismatch {
                expected: sha256.into(),
                actual,
            });
        }
        let dest = self.template_path(template_id, format);
        set_read_only(src)?;
        std::fs::rename(src, &dest).map_err(io(&dest))?;
        sync_dir(dest.parent().unwrap_or(&self.root));
        Ok(dest)
    }
}

impl Volumes for ImageStore {
    fn has_template(&self, template_id: &str, format: ImageFormat) -> bool {
        self.template_path(template_id, format).is_file()
    }

    fn template_path(&self, template_id: &str, format: ImageFormat) -> PathBuf {
        self.root
            .join("templates")
            .join(format!("{template_id}.{}", format.as_str()))
    }

    fn vm_paths(&self, vm_id: &str, data_disks: usize, cdrom: Option<PathBuf>) -> VmDisks {
        let dir = self.vm_dir(vm_id);
        VmDisks {
            root: dir.join("root.qcow2"),
            cdrom,
            data: (0..data_disks)
                .map(|i| dir.join(format!("data-{i}.qcow2")))
                .collect(),
            seed: dir.join("seed.img"),
            console_log: dir.join("console.log"),
        }
    }

    fn ensure_vm_disks(&self, req: &DiskRequest<'_>) -> Result<VmDisks, ImageError> {
        let dir = self.vm_dir(req.vm_id);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let template = self.template_path(req.template_id, req.template_format);
        let cdrom = (req.template_format == ImageFormat::Iso).then(|| template.clone());
        let disks = self.vm_paths(req.vm_id, req.data_disk_bytes.len(), cdrom);
        // A kernel-booted VM has a root disk only when it asked for one.
        let wants_root =
            req.template_format != ImageFormat::Kernel || req.root_size_bytes.is_some();
        if wants_root && !disks.root.exists() {
            let tmp = dir.join("root.qcow2.part");
            let tmp_s = tmp.to_string_lossy().into_owned();
            let size = req.root_size_bytes.map(|b| b.to_string());
            let mut args: Vec<String> =
                vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
            if matches!(req.template_format, ImageFormat::Qcow2 | ImageFormat::Raw) {
                args.extend([
                    "-b".into(),
                    template.to_string_lossy().into_owned(),
                    "-F".into(),
                    req.template_format.as_str().into(),
                ]);
            }
            args.push(tmp_s);
            if let Some(size) = size {
                args.push(size);
            }
            qemu_img(&args)?;
            std::fs::rename(&tmp, &disks.root).map_err(io(&disks.root))?;
        }
        for (path, bytes) in disks.data.iter().zip(&req.data_disk_bytes) {
            if !path.exists() {
                let tmp = path.with_extension("qcow2.part");
                qemu_img(&[
                    "create".into(),
                    "-q".into(),
                    "-f".into(),
                    "qcow2".into(),
                    tmp.to_string_lossy().into_owned(),
                    bytes.to_string(),
                ])?;
                std::fs::rename(&tmp, path).map_err(io(path))?;
            }
        }
        // The seed is rewritten every time: it is derived from the desired state only.
        keel_adapters::hypervisor::seed::write_seed_image(&disks.seed, req.seed).map_err(|e| {
            ImageError::Io {
                path: disks.seed.clone(),
                source: std::io::Error::other(keel_cluster::error_chain(&e)),
            }
        })?;
        sync_dir(&dir);
        Ok(disks)
    }

    fn delete_vm(&self, vm_id: &str) -> Result<(), ImageError> {
        let dir = self.vm_dir(vm_id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ImageError::Io { path: dir, source }),
        }
    }
}

fn qemu_img(args: &[String]) -> Result<Vec<u8>, ImageError> {
    let joined = args.join(" ");
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|source| ImageError::QemuImgSpawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ImageError::QemuImg {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

fn qemu_img_info(path: &Path) -> Result<serde_json::Value, ImageError> {
    let out = qemu_img(&[
        "info".into(),
        "--output=json".into(),
        path.to_string_lossy().into_owned(),
    ])?;
    serde_json::from_slice(&out).map_err(|e| ImageError::QemuImg {
        args: format!("info {}", path.display()),
        stderr: format!("unreadable output: {e}"),
    })
}

/// A Linux x86 boot image (bzImage) has `HdrS` at byte 0x202.
fn check_kernel(path: &Path) -> Result<(), ImageError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut magic = [0u8; 4];
    let ok = f.seek(SeekFrom::Start(0x202)).is_ok() && f.read_exact(&mut magic).is_ok();
    if ok && &magic == b"HdrS" {
        Ok(())
    } else {
        Err(ImageError::FormatMismatch {
            declared: "kernel".into(),
            actual: "not a Linux boot image (bzImage)".into(),
        })
    }
}

/// An ISO 9660 image has `CD001` at byte 32769.
fn check_iso(path: &Path) -> Result<(), ImageError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut magic = [0u8; 5];
    let ok = f.seek(SeekFrom::Start(32769)).is_ok() && f.read_exact(&mut magic).is_ok();
    if ok && &magic == b"CD001" {
        Ok(())
    } else {
        Err(ImageError::FormatMismatch {
            declared: "iso".into(),
            actual: "not an ISO 9660 image".into(),
        })
    }
}

/// The file's SHA-256, as the client computed it before the upload.
pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    keel_client::sha256_file(path).map_err(io(path))
}

fn set_read_only(path: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).map_err(io(path))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
