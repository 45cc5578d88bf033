//! An in-memory [`Nat`] for tests of the logic above it (the network reconciler).
//!
//! It keeps the last state applied per router namespace (by VNI) and for the host, and
//! rejects what the real adapter rejects (it renders with [`crate::nat::nft`]'s pure
//! functions, so an invalid state fails here too, before anything is stored).
//!
//! Knobs for tests: [`FakeNat::fail_next`] (the next call fails, queued) and
//! [`FakeNat::calls`] (every call in order, failed ones included).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use crate::firewall::FirewallError;
use crate::nat::nft::{render_host, render_router};
use crate::nat::{HostNat, Nat, RouterNat};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatCall {
    Router(RouterNat),
    Host(Option<HostNat>),
}

#[derive(Debug, Default)]
struct State {
    routers: BTreeMap<u32, RouterNat>,
    /// `None`: never applied; `Some(None)`: removed.
    host: Option<Option<HostNat>>,
    calls: Vec<NatCall>,
    fail_next: u32,
}

/// In-memory address translation of one host.
#[derive(Debug, Default)]
pub struct FakeNat {
    state: Mutex<State>,
}

impl FakeNat {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last state applied to the router namespace of `vni`.
    pub fn router(&self, vni: u32) -> Option<RouterNat> {
        self.lock().routers.get(&vni).cloned()
    }

    /// The last state applied to every router namespace, by VNI.
    pub fn routers(&self) -> BTreeMap<u32, RouterNat> {
        self.lock().routers.clone()
    }

    /// The last host state: `None` when never applied, `Some(None)` when removed.
    pub fn host(&self) -> Option<Option<HostNat>> {
        self.lock().host.clone()
    }

    /// Makes the next call fail (each call adds one more failure).
    pub fn fail_next(&self) {
        self.lock().fail_next += 1;
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<NatCall> {
        self.lock().calls.clone()
    }

    /// Records `call` and consumes an injected failure, if one is queued.
    fn begin(&self, call: NatCall) -> Result<MutexGuard<'_, State>, FirewallError> {
        let mut st = self.lock();
        st.calls.push(call);
        if st.fail_next > 0 {
            st.fail_next -= 1;
            return Err(FirewallError::Rejected {
                stderr: "injected failure".into(),
            });
        }
        Ok(st)
    }
}

impl Nat for FakeNat {
    fn apply_router(&self, nat: &RouterNat) -> Result<(), FirewallError> {
        let mut st = self.begin(NatCall::Router(nat.clone()))?;
        render_router(nat)?;
        st.routers.insert(nat.vni, nat.clone());
        Ok(())
    }

    fn apply_host(&self, nat: Option<&HostNat>) -> Result<(), FirewallError> {
        let mut st = self.begin(NatCall::Host(nat.cloned()))?;
        render_host(nat)?;
        st.host = Some(nat.cloned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::Cidr;
    use crate::nat::FloatingNat;
    use std::net::Ipv4Addr;
    use std::path::PathBuf;

    fn router(vni: u32, floating: Vec<FloatingNat>) -> RouterNat {
        RouterNat {
            vni,
            netns: PathBuf::from(format!("/run/keel/fake-netns/n{vni}")),
            cidr: Cidr {
                addr: Ipv4Addr::new(10, 90, 0, 0),
                prefix_len: 24,
            },
            uplink: format!("kun{vni}"),
            uplink_ip: Ipv4Addr::new(100, 64, 0, 2),
            floating,
        }
    }

    #[test]
    fn records_last_states_and_fails_on_demand() {
        let nat = FakeNat::new();
        assert_eq!(nat.host(), None);
        let fip = FloatingNat {
            floating_ip: Ipv4Addr::new(203, 0, 113, 10),
            private_ip: Ipv4Addr::new(10, 90, 0, 5),
            forwards: vec![],
        };
        nat.apply_router(&router(7, vec![fip.clone()])).unwrap();
        nat.apply_router(&router(7, vec![])).unwrap();
        nat.apply_router(&router(8, vec![fip])).unwrap();
        assert_eq!(nat.router(7), Some(router(7, vec![])));
        assert_eq!(nat.routers().len(), 2);

        let host = HostNat {
            public_dev: "eth0".into(),
            transit: Cidr {
                addr: Ipv4Addr::new(100, 64, 0, 0),
                prefix_len: 10,
            },
        };
        nat.apply_host(Some(&host)).unwrap();
        assert_eq!(nat.host(), Some(Some(host.clone())));
        nat.fail_next();
        assert!(nat.apply_host(None).is_err());
        assert_eq!(nat.host(), Some(Some(host)));
        nat.apply_host(None).unwrap();
        assert_eq!(nat.host(), Some(None));

        // Invalid input is refused like the real adapter refuses it.
        let mut bad = router(9, vec![]);
        bad.uplink = "bad name".into();
        assert!(matches!(
            nat.apply_router(&bad),
            Err(FirewallError::Invalid(_))
        ));
        assert_eq!(nat.router(9), None);
        assert_eq!(nat.calls().len(), 7);
    }
}
