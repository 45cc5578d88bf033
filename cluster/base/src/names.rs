//! Names of the kernel objects Keel creates on a host, defined once: the host adapters
//! create links by these names and the cluster model recognises them (a NIC may not be
//! put on a guest network's bridge by hand). Linux allows 15 bytes in a link name; a VNI
//! has at most 8 digits, so every name below fits.
//!
//! | prefix | object |
//! |---|---|
//! | `kbr<vni>` | a guest network's bridge on a host |
//! | `kvx<vni>` | its VXLAN device |
//! | `kgh<vni>` / `kgn<vni>` | the gateway veth pair: host end, router-namespace end |
//! | `kuh<vni>` / `kun<vni>` | the uplink veth pair of an external network |
//! | `kt<mac>` | the tap of a VM NIC (libvirt's `<target dev=…>`) |

/// The prefix of every guest network bridge.
pub const BRIDGE_PREFIX: &str = "kbr";
/// The prefix of every VM NIC's tap.
pub const TAP_PREFIX: &str = "kt";

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A text that is not a MAC address (six hex pairs separated by colons).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacAddrError {
    pub text: String,
}

impl std::fmt::Display for MacAddrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} is not a MAC address", self.text)
    }
}

impl std::error::Error for MacAddrError {}

impl std::str::FromStr for MacAddr {
    type Err = MacAddrError;
    fn from_str(s: &str) -> Result<Self, MacAddrError> {
        let bad = || MacAddrError {
            text: s.to_string(),
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

/// A guest network's bridge.
pub fn bridge_name(vni: u32) -> String {
    format!("{BRIDGE_PREFIX}{vni}")
}
/// A guest network's VXLAN device.
pub fn vxlan_name(vni: u32) -> String {
    format!("kvx{vni}")
}
/// The host end of the veth pair into the router namespace (a bridge port).
pub fn gateway_host_name(vni: u32) -> String {
    format!("kgh{vni}")
}
/// The router namespace's end of that veth pair; it carries the gateway address.
pub fn gateway_ns_name(vni: u32) -> String {
    format!("kgn{vni}")
}
/// The tap libvirt creates for a VM NIC (`<target dev=…>`): unique because MACs are.
pub fn tap_name(mac: MacAddr) -> String {
    let hex: String = mac.0.iter().map(|b| format!("{b:02x}")).collect();
    format!("{TAP_PREFIX}{hex}")
}
/// The host end of a network's uplink veth (external networks only).
pub fn uplink_host_name(vni: u32) -> String {
    format!("kuh{vni}")
}
/// The router namespace's end of the uplink.
pub fn uplink_ns_name(vni: u32) -> String {
    format!("kun{vni}")
}

/// Why a name is not a valid resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    Length,
    Characters(String),
    Hyphen(String),
}

impl std::fmt::Display for NameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NameError::Length => write!(f, "must be 1 to 63 characters long"),
            NameError::Characters(name) => {
                write!(
                    f,
                    "{name:?} may only contain lowercase letters, digits and '-'"
                )
            }
            NameError::Hyphen(name) => write!(f, "{name:?} must not start or end with '-'"),
        }
    }
}

impl std::error::Error for NameError {}

/// The rule for every resource name (hosts, VMs, networks, templates …): a DNS label,
/// 1-63 characters of `a-z`, `0-9` and `-`, not starting or ending with `-`.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > 63 {
        return Err(NameError::Length);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(NameError::Characters(name.to_string()));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::Hyphen(name.to_string()));
    }
    Ok(())
}
