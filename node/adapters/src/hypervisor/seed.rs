//! The NoCloud seed disk every VM gets: its instance id, hostname, SSH keys, user data and
//! (optionally) network configuration, as the small read-only disk cloud-init's NoCloud
//! datasource looks for.
//!
//! NoCloud accepts a filesystem labelled `cidata` that is either vfat or iso9660, holding the
//! files `meta-data`, `user-data` and optionally `network-config`. We write vfat: a FAT12/FAT16
//! image can be produced in pure Rust with the `fatfs` crate, with no host tools (`genisoimage`,
//! `mkfs.vfat`, mtools) and no mounting — the node's host kernel cannot mount vfat or iso9660
//! anyway. The Keel guest templates (image/guest/) read the same disk: cloud-init in the Debian
//! template, a few lines of shell in the tiny test guest.
//!
//! Every string that ends up in YAML (`meta-data`, the generated `#cloud-config`) is written as
//! a JSON string literal. JSON strings are valid YAML double-quoted scalars, so no field — a
//! hostname with a newline or a colon, a key with a `#` — can add or change YAML structure.
//!
//! The image is built in memory, written to a temporary file beside the target and renamed
//! over it, so a reader never sees a half-written seed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Cursor, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// What one VM's seed disk says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoCloudSeed {
    /// cloud-init runs its once-per-instance steps again when this changes.
    pub instance_id: String,
    pub hostname: String,
    /// Written verbatim as `user-data` (a `#cloud-config` document, a `#!` script, …). When
    /// absent, a `#cloud-config` with the hostname and the SSH keys is written instead.
    pub user_data: Option<String>,
    /// Reach the guest through `meta-data` `public-keys` in any case, and through the generated
    /// `#cloud-config` when there is no user data.
    pub ssh_authorized_keys: Vec<String>,
    /// Written verbatim as `network-config` (cloud-init network config v1 or v2) when given.
    pub network_config: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("invalid NoCloud seed: {field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
    #[error("NoCloud seed content of {size} bytes is over the {limit}-byte limit")]
    TooLarge { size: u64, limit: u64 },
    #[error("seed image path {path} has no file name")]
    BadPath { path: PathBuf },
    #[error("cannot build the FAT filesystem of seed image {path}")]
    Format {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write seed image {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The filesystem label NoCloud looks for (cloud-init matches it in either case).
pub const SEED_LABEL: &str = "cidata";

/// The most content (all files together) a seed image may carry.
pub const MAX_CONTENT_BYTES: u64 = 64 * MIB;

const MIB: u64 = 1024 * 1024;

/// Writes the NoCloud seed image for `seed` to `path` (replacing it atomically).
pub fn write_seed_image(path: &Path, seed: &NoCloudSeed) -> Result<(), SeedError> {
    let files = seed_files(seed)?;
    let image = build_image(path, seed, &files)?;
    write_atomically(path, &image)
}

/// The files of the seed, in the order they are written: `(name, content)`.
pub fn seed_files(seed: &NoCloudSeed) -> Result<Vec<(&'static str, String)>, SeedError> {
    if seed.instance_id.trim().is_empty() {
        return Err(SeedError::Invalid {
            field: "instance_id",
            reason: "must not be empty",
        });
    }
    if seed.hostname.trim().is_empty() {
        return Err(SeedError::Invalid {
            field: "hostname",
            reason: "must not be empty",
        });
    }
    let mut files = vec![
        ("meta-data", meta_data(seed)),
        (
            "user-data",
            match &seed.user_data {
                Some(data) => data.clone(),
                None => default_user_data(seed),
            },
        ),
    ];
    if let Some(net) = &seed.network_config {
        files.push(("network-config", net.clone()));
    }
    Ok(files)
}

/// A YAML scalar that is exactly `s`: a JSON string literal, which YAML reads as a
/// double-quoted scalar, so it can never become structure. Everything outside printable ASCII is
/// escaped as well (`\uXXXX`, or YAML's `\UXXXXXXXX` above the BMP where JSON would use a
/// surrogate pair): YAML 1.1 parsers such as cloud-init's PyYAML treat U+0085/U+2028/U+2029 as
/// line breaks and reject C1 control characters outright.
fn yaml_str(s: &str) -> String {
    let json = serde_json::Value::from(s).to_string();
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        match u32::from(c) {
            0x20..=0x7e => out.push(c),
            n @ 0..=0xffff => out.push_str(&format!("\\u{n:04x}")),
            n => out.push_str(&format!("\\U{n:08x}")),
        }
    }
    out
}

fn meta_data(seed: &NoCloudSeed) -> String {
    let mut out = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml_str(&seed.instance_id),
        yaml_str(&seed.hostname)
    );
    if !seed.ssh_authorized_keys.is_empty() {
        out.push_str("public-keys:\n");
        for key in &seed.ssh_authorized_keys {
            out.push_str(&format!("  - {}\n", yaml_str(key)));
        }
    }
    out
}

fn default_user_data(seed: &NoCloudSeed) -> String {
    let mut out = format!("#cloud-config\nhostname: {}\n", yaml_str(&seed.hostname));
    if seed.ssh_authorized_keys.is_empty() {
        out.push_str("ssh_authorized_keys: []\n");
    } else {
        out.push_str("ssh_authorized_keys:\n");
        for key in &seed.ssh_authorized_keys {
            out.push_str(&format!("  - {}\n", yaml_str(key)));
        }
    }
    out
}

/// Image size for `content` bytes of files: the content plus room for the FAT structures and
/// each file's last partial cluster, in whole MiB, at least 1 MiB (a FAT12 volume).
fn image_size(content: u64) -> u64 {
    let needed = content + content / 8 + 512 * 1024;
    needed.div_ceil(MIB).max(1) * MIB
}

/// A volume serial derived from the instance id, so two seeds of one VM agree and seeds of
/// different VMs differ (the default serial would be the same for all).
fn volume_id(seed: &NoCloudSeed) -> u32 {
    let digest = Sha256::digest(seed.instance_id.as_bytes());
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

fn build_image(
    path: &Path,
    seed: &NoCloudSeed,
    files: &[(&'static str, String)],
) -> Result<Vec<u8>, SeedError> {
    let content: u64 = files.iter().map(|(_, c)| c.len() as u64).sum();
    if content > MAX_CONTENT_BYTES {
        return Err(SeedError::TooLarge {
            size: content,
            limit: MAX_CONTENT_BYTES,
        });
    }
    let format_err = |source| SeedError::Format {
        path: path.to_path_buf(),
        source,
    };
    let size = usize::try_from(image_size(content)).map_err(|_| SeedError::TooLarge {
        size: content,
        limit: MAX_CONTENT_BYTES,
    })?;
    let mut label = [b' '; 11];
    label[..SEED_LABEL.len()].copy_from_slice(SEED_LABEL.as_bytes());
    let mut disk = Cursor::new(vec![0u8; size]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(label)
            .volume_id(volume_id(seed)),
    )
    .map_err(format_err)?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(format_err)?;
        {
            let root = fs.root_dir();
            for (name, data) in files {
                let mut file = root.create_file(name).map_err(format_err)?;
                file.truncate().map_err(format_err)?;
                file.write_all(data.as_bytes()).map_err(format_err)?;
                file.flush().map_err(format_err)?;
            }
        }
        fs.unmount().map_err(format_err)?;
    }
    Ok(disk.into_inner())
}

fn write_atomically(path: &Path, image: &[u8]) -> Result<(), SeedError> {
    let name = path
        .file_name()
        .ok_or_else(|| SeedError::BadPath {
            path: path.to_path_buf(),
        })?
        .to_string_lossy()
        .into_owned();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let write_err = |source| SeedError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| -> io::Result<()> {
        let mut file: File = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(image)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        // make the rename itself durable
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn open(path: &Path) -> fatfs::FileSystem<File> {
        // fatfs wants read+write storage; the tests only read
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        fatfs::FileSystem::new(file, fatfs::FsOptions::new()).unwrap()
    }

    fn read(fs: &fatfs::FileSystem<File>, name: &str) -> Option<String> {
        let mut file = fs.root_dir().open_file(name).ok()?;
        let mut s = String::new();
        file.read_to_string(&mut s).unwrap();
        Some(s)
    }

    fn sample() -> NoCloudSeed {
        NoCloudSeed {
            instance_id: "iid-0001".into(),
            hostname: "web-1".into(),
            user_data: None,
            ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3Nza k@h".into()],
            network_config: None,
        }
    }

    #[test]
    fn image_has_label_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        write_seed_image(&path, &sample()).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), MIB);
        let fs = open(&path);
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat12);
        assert_eq!(fs.volume_label(), "cidata");
        assert_eq!(
            fs.read_volume_label_from_root_dir().unwrap().as_deref(),
            Some("cidata")
        );
        assert_eq!(
            read(&fs, "meta-data").unwrap(),
            "instance-id: \"iid-0001\"\nlocal-hostname: \"web-1\"\n\
             public-keys:\n  - \"ssh-ed25519 AAAAC3Nza k@h\"\n"
        );
        assert_eq!(
            read(&fs, "user-data").unwrap(),
            "#cloud-config\nhostname: \"web-1\"\n\
             ssh_authorized_keys:\n  - \"ssh-ed25519 AAAAC3Nza k@h\"\n"
        );
        assert_eq!(read(&fs, "network-config"), None);
        // nothing else left beside it
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("seed.img")]);
    }

    #[test]
    fn user_data_verbatim_and_keys_still_in_meta_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        let user = "#!/bin/sh\necho hello > /dev/ttyS0\n";
        let net = "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n";
        let seed = NoCloudSeed {
            user_data: Some(user.into()),
            network_config: Some(net.into()),
            ..sample()
        };
        write_seed_image(&path, &seed).unwrap();
        let fs = open(&path);
        assert_eq!(read(&fs, "user-data").unwrap(), user);
        assert_eq!(read(&fs, "network-config").unwrap(), net);
        assert!(read(&fs, "meta-data")
            .unwrap()
            .contains("public-keys:\n  - \"ssh-ed25519 AAAAC3Nza k@h\"\n"));
    }

    #[test]
    fn yaml_injection_stays_one_scalar() {
        let evil = "x\ninstance-id: evil\nlocal-hostname: \"y\": z # c";
        let seed = NoCloudSeed {
            hostname: evil.into(),
            ssh_authorized_keys: vec!["k\n- injected".into()],
            ..sample()
        };
        let files = seed_files(&seed).unwrap();
        let meta = &files[0].1;
        assert_eq!(
            meta,
            "instance-id: \"iid-0001\"\n\
             local-hostname: \"x\\ninstance-id: evil\\nlocal-hostname: \\\"y\\\": z # c\"\n\
             public-keys:\n  - \"k\\n- injected\"\n"
        );
        // every line is one of the keys we wrote, or a list item
        for line in meta.lines() {
            assert!(
                [
                    "instance-id: ",
                    "local-hostname: ",
                    "public-keys:",
                    "  - \""
                ]
                .iter()
                .any(|p| line.starts_with(p)),
                "unexpected line {line:?}"
            );
        }
        assert_eq!(meta.matches("instance-id:").count(), 2); // ours, and the quoted text
        assert_eq!(
            meta.lines()
                .filter(|l| l.starts_with("instance-id:"))
                .count(),
            1
        );
        // the quoted scalar decodes back to exactly the hostname (JSON strings are YAML)
        let value = meta
            .lines()
            .find_map(|l| l.strip_prefix("local-hostname: "))
            .unwrap();
        assert_eq!(serde_json::from_str::<String>(value).unwrap(), evil);
        // non-ASCII is escaped; what serde_json can read back (the BMP) decodes exactly
        assert_eq!(yaml_str("caf\u{e9}\u{2028}x"), r#""caf\u00e9\u2028x""#);
        assert_eq!(
            serde_json::from_str::<String>(&yaml_str("caf\u{e9}\u{85}")).unwrap(),
            "caf\u{e9}\u{85}"
        );
        assert_eq!(yaml_str("\u{1f600}"), r#""\U0001f600""#);
        let user = &files[1].1;
        assert_eq!(
            user.lines().filter(|l| l.starts_with("hostname:")).count(),
            1
        );
    }

    #[test]
    fn size_follows_content() {
        assert_eq!(image_size(0), MIB);
        assert_eq!(image_size(100 * 1024), MIB);
        assert!(image_size(3 * MIB) >= 4 * MIB);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.img");
        let big = "#!/bin/sh\n".to_string() + &"# padding padding padding\n".repeat(200_000);
        let seed = NoCloudSeed {
            user_data: Some(big.clone()),
            ..sample()
        };
        write_seed_image(&path, &seed).unwrap();
        let fs = open(&path);
        assert_eq!(read(&fs, "user-data").unwrap(), big);
        // replacing an existing image works and leaves no temporary file behind
        write_seed_image(&path, &sample()).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn rejects_empty_and_oversized() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        let err = write_seed_image(
            &path,
            &NoCloudSeed {
                instance_id: " ".into(),
                ..sample()
            },
        )
        .unwrap_err();
        assert!(matches!(
            err,
            SeedError::Invalid {
                field: "instance_id",
                ..
            }
        ));
        let err = write_seed_image(
            &path,
            &NoCloudSeed {
                user_data: Some("x".repeat(MAX_CONTENT_BYTES as usize + 1)),
                ..sample()
            },
        )
        .unwrap_err();
        assert!(matches!(err, SeedError::TooLarge { .. }));
        assert!(!path.exists());
    }

    #[test]
    fn write_error_names_the_path_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("seed.img");
        let err = write_seed_image(&path, &sample()).unwrap_err();
        let shown = err.to_string();
        assert_eq!(shown, format!("cannot write seed image {}", path.display()));
        assert!(std::error::Error::source(&err).is_some());
    }
}
