//! Network cards (sysfs `/sys/class/net`) and the choice of the management interface.
//!
//! The installed system matches the management interface by MAC address, which does not
//! change when interface names do.

use std::fs;
use std::path::PathBuf;

use crate::answer::is_mac;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub name: String,
    pub mac: String,
}

pub trait NicProbe {
    fn nics(&self) -> Vec<Nic>;
}

/// Physical network cards (those with a `device` link) from sysfs.
#[derive(Debug, Clone)]
pub struct SysfsNics {
    pub sys: PathBuf,
}

impl Default for SysfsNics {
    fn default() -> Self {
        Self {
            sys: PathBuf::from("/sys"),
        }
    }
}

impl NicProbe for SysfsNics {
    fn nics(&self) -> Vec<Nic> {
        let dir = self.sys.join("class/net");
        let mut out: Vec<Nic> = fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().join("device").exists())
                    .filter_map(|e| {
                        let mac = fs::read_to_string(e.path().join("address")).ok()?;
                        Some(Nic {
                            name: e.file_name().to_string_lossy().to_string(),
                            mac: mac.trim().to_lowercase(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

#[derive(Debug, Clone, Default)]
pub struct FakeNics(pub Vec<Nic>);

impl NicProbe for FakeNics {
    fn nics(&self) -> Vec<Nic> {
        self.0.clone()
    }
}

/// Why no management interface could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterfaceError {
    #[error("no network card was found for the management network")]
    NoCard,
    #[error("no network card has the MAC address {mac}; {}", listing(.cards))]
    NoSuchMac { mac: String, cards: Vec<Nic> },
    #[error("there is no network card '{name}'; {}", listing(.cards))]
    NoSuchName { name: String, cards: Vec<Nic> },
}

fn listing(cards: &[Nic]) -> String {
    if cards.is_empty() {
        "no network card was found".to_string()
    } else {
        let l: Vec<String> = cards
            .iter()
            .map(|n| format!("{} ({})", n.name, n.mac))
            .collect();
        format!("the network cards are: {}", l.join(", "))
    }
}

/// The management interface: the one named (by name or MAC), or the first card.
pub fn resolve_interface(wanted: Option<&str>, nics: &[Nic]) -> Result<Nic, InterfaceError> {
    match wanted {
        None => nics.first().cloned().ok_or(InterfaceError::NoCard),
        Some(w) if is_mac(w) => nics
            .iter()
            .find(|n| n.mac.eq_ignore_ascii_case(w))
            .cloned()
            .ok_or_else(|| InterfaceError::NoSuchMac {
                mac: w.to_string(),
                cards: nics.to_vec(),
            }),
        Some(w) => {
            nics.iter()
                .find(|n| n.name == w)
                .cloned()
                .ok_or_else(|| InterfaceError::NoSuchName {
                    name: w.to_string(),
                    cards: nics.to_vec(),
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nics() -> Vec<Nic> {
        vec![
            Nic {
                name: "enp1s0".into(),
                mac: "52:54:00:00:00:01".into(),
            },
            Nic {
                name: "enp2s0".into(),
                mac: "52:54:00:00:00:02".into(),
            },
        ]
    }

    #[test]
    fn resolves_by_default_name_and_mac() {
        assert_eq!(
            resolve_interface(None, &nics()).map(|n| n.name),
            Ok("enp1s0".into())
        );
        assert_eq!(
            resolve_interface(Some("enp2s0"), &nics()).map(|n| n.mac),
            Ok("52:54:00:00:00:02".into())
        );
        assert_eq!(
            resolve_interface(Some("52:54:00:00:00:02"), &nics()).map(|n| n.name),
            Ok("enp2s0".into())
        );
        let e = resolve_interface(Some("eth9"), &nics())
            .unwrap_err()
            .to_string();
        assert!(e.contains("enp1s0 (52:54:00:00:00:01)"), "{e}");
        assert!(resolve_interface(None, &[]).is_err());
    }

    #[test]
    fn sysfs_lists_only_physical_cards() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for (n, mac, dev) in [
            ("lo", "00:00:00:00:00:00", false),
            ("ens3", "52:54:00:AB:CD:EF", true),
        ] {
            let p = dir.path().join("class/net").join(n);
            fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{e}"));
            fs::write(p.join("address"), format!("{mac}\n")).unwrap_or_else(|e| panic!("{e}"));
            if dev {
                fs::create_dir_all(p.join("device")).unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let found = SysfsNics {
            sys: dir.path().to_path_buf(),
        }
        .nics();
        assert_eq!(
            found,
            vec![Nic {
                name: "ens3".into(),
                mac: "52:54:00:ab:cd:ef".into()
            }]
        );
    }
}
