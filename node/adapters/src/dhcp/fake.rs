//! An in-memory [`Dhcp`] for tests of the logic above it (the network reconciler).
//!
//! It decides what the real adapter ([`crate::dhcp::dnsmasq::Dnsmasq`]) would do and records it:
//! a network not running is started, one whose host lists alone changed is reloaded, one
//! with any other change is restarted, an unchanged one is left alone ([`FakeEffect`]).
//! Networks the real adapter would refuse (see [`crate::dhcp::dnsmasq::render`]) are refused
//! with [`DhcpError::Invalid`].
//!
//! Knobs for tests:
//! * [`FakeDhcp::fail_next_ensure`] — the next `ensure` of a network fails like a dnsmasq
//!   that exits at start ([`DhcpError::Exited`]), before it changes anything.
//! * [`FakeDhcp::crash`] — the network's server dies (the next `ensure` starts it again).
//! * [`FakeDhcp::calls`] / [`FakeDhcp::take_calls`] — every call and its effect, failed
//!   calls included (idempotence tests: "a second reconcile pass changes nothing").

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use crate::dhcp::dnsmasq::{render, NetworkPaths};
use crate::dhcp::{Dhcp, DhcpError, DhcpNetwork};

/// What one call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeEffect {
    /// No server ran; one was started.
    Started,
    /// Only the host lists changed: rewritten and signalled.
    Reloaded,
    /// Something else changed: stopped and started.
    Restarted,
    /// Already running exactly so.
    Unchanged,
    /// A running server was stopped.
    Stopped,
    /// `stop` of a network without a server.
    Absent,
    /// The call failed.
    Failed,
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeDhcpCall {
    Ensure { vni: u32, effect: FakeEffect },
    Stop { vni: u32, effect: FakeEffect },
}

#[derive(Debug, Default)]
struct Inner {
    running: BTreeMap<u32, DhcpNetwork>,
    calls: Vec<FakeDhcpCall>,
    failures: BTreeMap<u32, VecDeque<String>>,
}

/// See the module header.
#[derive(Debug, Default)]
pub struct FakeDhcp {
    inner: Mutex<Inner>,
}

impl FakeDhcp {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What network `vni`'s server serves now, if it runs.
    pub fn network(&self, vni: u32) -> Option<DhcpNetwork> {
        self.lock().running.get(&vni).cloned()
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<FakeDhcpCall> {
        self.lock().calls.clone()
    }

    /// Every call since the last `take_calls`, in order.
    pub fn take_calls(&self) -> Vec<FakeDhcpCall> {
        std::mem::take(&mut self.lock().calls)
    }

    /// Makes the next `ensure` of `vni` fail with [`DhcpError::Exited`] carrying `detail`
    /// (queued: two calls, two failures).
    pub fn fail_next_ensure(&self, vni: u32, detail: impl Into<String>) {
        self.lock()
            .failures
            .entry(vni)
            .or_default()
            .push_back(detail.into());
    }

    /// The server of `vni` dies (as if killed); true when one was running.
    pub fn crash(&self, vni: u32) -> bool {
        self.lock().running.remove(&vni).is_some()
    }
}

/// Whether `a` and `b` differ only in their host lists.
fn hosts_only(a: &DhcpNetwork, b: &DhcpNetwork) -> bool {
    let strip = |n: &DhcpNetwork| DhcpNetwork {
        hosts: Vec::new(),
        ..n.clone()
    };
    strip(a) == strip(b)
}

impl Dhcp for FakeDhcp {
    fn ensure(&self, net: &DhcpNetwork) -> Result<(), DhcpError> {
        let vni = net.vni;
        let mut inner = self.lock();
        let failure = inner.failures.get_mut(&vni).and_then(VecDeque::pop_front);
        let result = match failure {
            Some(detail) => Err(DhcpError::Exited { vni, detail }),
            None => render(net, &NetworkPaths::new(Path::new("/run/keel/dnsmasq"), vni))
                .map_err(|source| DhcpError::Invalid { vni, source }),
        };
        let effect = match result {
            Err(e) => {
                inner.calls.push(FakeDhcpCall::Ensure {
                    vni,
                    effect: FakeEffect::Failed,
                });
                return Err(e);
            }
            Ok(_) => {
                let mut sorted = net.clone();
                sorted.hosts.sort();
                let effect = match inner.running.get(&vni) {
                    None => FakeEffect::Started,
                    Some(old) if *old == sorted => FakeEffect::Unchanged,
                    Some(old) if hosts_only(old, &sorted) => FakeEffect::Reloaded,
                    Some(_) => FakeEffect::Restarted,
                };
                inner.running.insert(vni, sorted);
                effect
            }
        };
        inner.calls.push(FakeDhcpCall::Ensure { vni, effect });
        Ok(())
    }

    fn stop(&self, vni: u32) -> Result<(), DhcpError> {
        let mut inner = self.lock();
        let effect = match inner.running.remove(&vni) {
            Some(_) => FakeEffect::Stopped,
            None => FakeEffect::Absent,
        };
        inner.calls.push(FakeDhcpCall::Stop { vni, effect });
        Ok(())
    }

    fn running(&self) -> Vec<u32> {
        self.lock().running.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::dhcp::DhcpHost;
    use crate::links::MacAddr;

    fn host(last: u8, name: &str) -> DhcpHost {
        DhcpHost {
            mac: MacAddr([0x52, 0x54, 0, 0, 0, last]),
            ip: Ipv4Addr::new(10, 0, 0, 10 + last),
            hostname: Some(name.into()),
        }
    }

    fn net(vni: u32) -> DhcpNetwork {
        DhcpNetwork {
            vni,
            netns: None,
            interface: format!("kgn{vni}"),
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            prefix_len: 24,
            domain: "example.internal".into(),
            mtu: 1450,
            hosts: vec![host(1, "a")],
            lease_secs: 3600,
        }
    }

    fn ensure(vni: u32, effect: FakeEffect) -> FakeDhcpCall {
        FakeDhcpCall::Ensure { vni, effect }
    }

    #[test]
    fn records_what_the_real_adapter_would_do() {
        let d = FakeDhcp::new();
        let mut n = net(7);
        d.ensure(&n).unwrap();
        d.ensure(&n).unwrap();
        n.hosts.push(host(2, "b"));
        d.ensure(&n).unwrap();
        // Order of hosts does not matter.
        n.hosts.reverse();
        d.ensure(&n).unwrap();
        n.mtu = 1400;
        d.ensure(&n).unwrap();
        assert_eq!(
            d.take_calls(),
            vec![
                ensure(7, FakeEffect::Started),
                ensure(7, FakeEffect::Unchanged),
                ensure(7, FakeEffect::Reloaded),
                ensure(7, FakeEffect::Unchanged),
                ensure(7, FakeEffect::Restarted),
            ]
        );
        assert_eq!(d.network(7).unwrap().mtu, 1400);
        assert_eq!(d.running(), vec![7]);

        assert!(d.crash(7));
        assert_eq!(d.running(), Vec::<u32>::new());
        d.ensure(&n).unwrap();
        d.stop(7).unwrap();
        d.stop(7).unwrap();
        assert_eq!(
            d.take_calls(),
            vec![
                ensure(7, FakeEffect::Started),
                FakeDhcpCall::Stop {
                    vni: 7,
                    effect: FakeEffect::Stopped
                },
                FakeDhcpCall::Stop {
                    vni: 7,
                    effect: FakeEffect::Absent
                },
            ]
        );
        assert!(d.calls().is_empty());
    }

    #[test]
    fn injected_failures_and_invalid_networks_change_nothing() {
        let d = FakeDhcp::new();
        d.fail_next_ensure(3, "dnsmasq: unknown interface kgn3");
        let err = d.ensure(&net(3)).unwrap_err();
        assert!(
            matches!(&err, DhcpError::Exited { vni: 3, detail } if detail.contains("unknown interface")),
            "{err}"
        );
        assert_eq!(d.running(), Vec::<u32>::new());
        let mut bad = net(3);
        bad.hosts[0].hostname = Some("a\nserver=1.1.1.1".into());
        assert!(matches!(
            d.ensure(&bad),
            Err(DhcpError::Invalid { vni: 3, .. })
        ));
        d.ensure(&net(3)).unwrap();
        d.ensure(&net(4)).unwrap();
        assert_eq!(d.running(), vec![3, 4]);
        assert_eq!(
            d.calls(),
            vec![
                ensure(3, FakeEffect::Failed),
                ensure(3, FakeEffect::Failed),
                ensure(3, FakeEffect::Started),
                ensure(4, FakeEffect::Started),
            ]
        );
    }
}
