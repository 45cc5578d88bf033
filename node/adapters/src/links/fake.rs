//! An in-memory [`Links`] for tests of the logic above it (the network reconciler).
//!
//! It behaves like the netlink adapter where the reconciler can tell the difference:
//! `ensure` makes a network's state exactly its input (peers and remote MACs replaced,
//! not merged) and keeps the bridge's other ports; `remove` of an absent network
//! succeeds; `list` reads back what `ensure` stored, sorted by VNI.
//!
//! Knobs for tests:
//! * [`FakeLinks::with_addresses`] — the host's addresses; `ensure` then also fails with
//!   [`LinkError::NoUnderlay`] for an underlay device that has none, and with
//!   [`LinkError::NoPublicDevice`] for an uplink's public device that has none (a fake made
//!   with [`FakeLinks::new`] accepts any device).
//! * [`FakeLinks::fail_next`] — the next call of an operation fails (queued: two calls,
//!   two failures), before it changes anything.
//! * [`FakeLinks::calls`] — every call in order, failed ones included (idempotence tests:
//!   "a second pass ensures nothing new").
//! * [`FakeLinks::set_ports`] — what libvirt does behind the reconciler's back (VM taps
//!   appearing on a bridge).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use crate::links::{HostAddress, LinkError, Links, NetworkLinks, NetworkLinksState};

/// The operations of [`Links`], for failure injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinksOp {
    Ensure,
    Remove,
    List,
    Addresses,
}

impl LinksOp {
    pub fn as_str(self) -> &'static str {
        match self {
            LinksOp::Ensure => "ensure",
            LinksOp::Remove => "remove",
            LinksOp::List => "list",
            LinksOp::Addresses => "addresses",
        }
    }
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinksCall {
    Ensure(NetworkLinks),
    Remove(u32),
    List,
    Addresses,
}

/// The `source` of an injected failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("injected failure")]
pub struct InjectedFailure;

#[derive(Debug, Default)]
struct State {
    networks: BTreeMap<u32, NetworkLinks>,
    ports: BTreeMap<u32, BTreeSet<String>>,
    calls: Vec<LinksCall>,
    fail_next: BTreeMap<LinksOp, u32>,
    addresses: Option<Vec<HostAddress>>,
}

/// In-memory links of one host.
#[derive(Debug)]
pub struct FakeLinks {
    netns_dir: PathBuf,
    state: Mutex<State>,
}

impl Default for FakeLinks {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeLinks {
    /// No networks, no addresses, any underlay device accepted.
    pub fn new() -> Self {
        FakeLinks {
            netns_dir: PathBuf::from("/run/keel/fake-netns"),
            state: Mutex::new(State::default()),
        }
    }

    /// A host with these addresses: `addresses()` returns them and `ensure` accepts only
    /// underlay devices among them.
    pub fn with_addresses(addresses: Vec<HostAddress>) -> Self {
        let fake = Self::new();
        fake.lock().addresses = Some(addresses);
        fake
    }

    /// Locks, ignoring poisoning (a test that panicked holding the lock has failed
    /// already).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next call of `op` fail (twice: the next two calls).
    pub fn fail_next(&self, op: LinksOp) {
        *self.lock().fail_next.entry(op).or_default() += 1;
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<LinksCall> {
        self.lock().calls.clone()
    }

    /// Forgets the recorded calls.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// What the last successful `ensure` of `vni` stored (`None` when absent).
    pub fn network(&self, vni: u32) -> Option<NetworkLinks> {
        self.lock().networks.get(&vni).cloned()
    }

    /// Sets the other ports (VM taps) of network `vni`'s bridge; ignored when the bridge
    /// does not exist.
    pub fn set_ports(&self, vni: u32, ports: impl IntoIterator<Item = String>) {
        let mut st = self.lock();
        if st.networks.contains_key(&vni) {
            st.ports.insert(vni, ports.into_iter().collect());
        }
    }

    /// Records the call and consumes an injected failure of `op`, if one is queued.
    fn begin(&self, op: LinksOp, call: LinksCall) -> Result<MutexGuard<'_, State>, LinkError> {
        let mut st = self.lock();
        st.calls.push(call);
        if let Some(n) = st.fail_next.get_mut(&op) {
            *n -= 1;
            if *n == 0 {
                st.fail_next.remove(&op);
            }
            return Err(LinkError::Netlink {
                operation: op.as_str(),
                link: "fake".into(),
                source: Box::new(InjectedFailure),
            });
        }
        Ok(st)
    }
}

impl Links for FakeLinks {
    fn ensure(&self, net: &NetworkLinks) -> Result<(), LinkError> {
        let mut st = self.begin(LinksOp::Ensure, LinksCall::Ensure(net.clone()))?;
        if let Some(addresses) = &st.addresses {
            if !addresses.iter().any(|a| a.dev == net.underlay.dev) {
                return Err(LinkError::NoUnderlay {
                    dev: net.underlay.dev.clone(),
                });
            }
            if let Some(uplink) = &net.uplink {
                if !addresses.iter().any(|a| a.dev == uplink.public_dev) {
                    return Err(LinkError::NoPublicDevice {
                        dev: uplink.public_dev.clone(),
                    });
                }
            }
        }
        st.networks.insert(net.vni, net.clone());
        st.ports.entry(net.vni).or_default();
        Ok(())
    }

    fn remove(&self, vni: u32) -> Result<(), LinkError> {
        let mut st = self.begin(LinksOp::Remove, LinksCall::Remove(vni))?;
        st.networks.remove(&vni);
        st.ports.remove(&vni);
        Ok(())
    }

    fn list(&self) -> Result<Vec<NetworkLinksState>, LinkError> {
        let st = self.begin(LinksOp::List, LinksCall::List)?;
        Ok(st
            .networks
            .values()
            .map(|n| NetworkLinksState {
                vni: n.vni,
                mtu: n.mtu,
                peers: n.peers.clone(),
                remote_macs: n.remote_macs.clone(),
                ports: st.ports.get(&n.vni).cloned().unwrap_or_default(),
            })
            .collect())
    }

    fn router_netns(&self, vni: u32) -> PathBuf {
        self.netns_dir.join(format!("n{vni}"))
    }

    fn addresses(&self) -> Result<Vec<HostAddress>, LinkError> {
        let st = self.begin(LinksOp::Addresses, LinksCall::Addresses)?;
        Ok(st.addresses.clone().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::links::{gateway_mac, GatewayLink, MacAddr, Underlay};

    fn net(vni: u32, peers: &[u8]) -> NetworkLinks {
        NetworkLinks {
            local_taps: Default::default(),
            uplink: None,
            vni,
            mtu: 1450,
            underlay: Underlay {
                dev: "eth0".into(),
                ip: Ipv4Addr::new(10, 0, 0, 1),
            },
            peers: peers.iter().map(|p| Ipv4Addr::new(10, 0, 0, *p)).collect(),
            remote_macs: BTreeMap::from([(
                MacAddr([2, 0, 0, 0, 0, 1]),
                Ipv4Addr::new(10, 0, 0, 2),
            )]),
            gateway: GatewayLink {
                addr: Ipv4Addr::new(10, 77, 0, 1),
                prefix_len: 24,
                mac: gateway_mac(vni),
            },
        }
    }

    #[test]
    fn ensure_replaces_keeps_ports_and_remove_is_idempotent() {
        let links = FakeLinks::new();
        links.ensure(&net(7, &[2, 3])).unwrap();
        links.set_ports(7, ["kt020000000009".to_string()]);
        links.ensure(&net(7, &[2])).unwrap();
        let listed = links.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            listed[0].peers,
            BTreeSet::from([Ipv4Addr::new(10, 0, 0, 2)])
        );
        assert_eq!(
            listed[0].ports,
            BTreeSet::from(["kt020000000009".to_string()])
        );
        assert_eq!(listed[0].remote_macs.len(), 1);
        assert_eq!(
            links.router_netns(7),
            PathBuf::from("/run/keel/fake-netns/n7")
        );

        links.remove(7).unwrap();
        links.remove(7).unwrap();
        assert!(links.list().unwrap().is_empty());
        assert_eq!(links.network(7), None);
        assert_eq!(
            links.calls(),
            vec![
                LinksCall::Ensure(net(7, &[2, 3])),
                LinksCall::Ensure(net(7, &[2])),
                LinksCall::List,
                LinksCall::Remove(7),
                LinksCall::Remove(7),
                LinksCall::List,
            ]
        );
    }

    #[test]
    fn injected_failures_and_missing_underlay_change_nothing() {
        let links = FakeLinks::with_addresses(vec![HostAddress {
            dev: "eth0".into(),
            addr: Ipv4Addr::new(10, 0, 0, 1),
            prefix_len: 24,
            mtu: 1500,
            up: true,
        }]);
        links.fail_next(LinksOp::Ensure);
        let err = links.ensure(&net(9, &[2])).unwrap_err();
        assert!(
            matches!(
                err,
                LinkError::Netlink {
                    operation: "ensure",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(links.network(9), None);
        links.ensure(&net(9, &[2])).unwrap();
        assert!(links.network(9).is_some());

        let mut other = net(10, &[2]);
        other.underlay.dev = "eth9".into();
        assert!(matches!(
            links.ensure(&other),
            Err(LinkError::NoUnderlay { dev }) if dev == "eth9"
        ));
        let mut external = net(11, &[2]);
        external.uplink = Some(crate::links::Uplink {
            public_dev: "eth7".into(),
            floating_ips: BTreeSet::new(),
        });
        assert!(matches!(
            links.ensure(&external),
            Err(LinkError::NoPublicDevice { dev }) if dev == "eth7"
        ));
        assert_eq!(links.network(11), None);
        external.uplink.as_mut().unwrap().public_dev = "eth0".into();
        links.ensure(&external).unwrap();
        assert_eq!(links.network(11), Some(external));
        assert_eq!(links.addresses().unwrap().len(), 1);
        assert_eq!(links.calls().len(), 6);
    }
}
