//! An in-memory [`Firewall`] for unit tests of the network reconciler: remembers the last
//! applied state and counts calls; can be told to fail.

use std::sync::Mutex;

use crate::firewall::{Firewall, FirewallError, FirewallState};

#[derive(Debug, Default)]
struct Inner {
    state: Option<FirewallState>,
    applies: u64,
    clears: u64,
    fail: Option<String>,
}

/// Records what the reconciler asked for. `state()` is `None` before the first apply and
/// after a clear.
#[derive(Debug, Default)]
pub struct FakeFirewall {
    inner: Mutex<Inner>,
}

impl FakeFirewall {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last applied state (`None` when nothing is applied).
    pub fn state(&self) -> Option<FirewallState> {
        self.lock().state.clone()
    }

    /// Successful `apply` calls so far.
    pub fn apply_count(&self) -> u64 {
        self.lock().applies
    }

    /// Successful `clear` calls so far.
    pub fn clear_count(&self) -> u64 {
        self.lock().clears
    }

    /// Makes every following call fail with `Rejected { stderr: reason }` (`None`: succeed
    /// again). A failed apply leaves the previous state in place, like nft's transactions.
    pub fn fail_with(&self, reason: Option<&str>) {
        self.lock().fail = reason.map(str::to_string);
    }
}

impl Firewall for FakeFirewall {
    fn apply(&self, state: &FirewallState) -> Result<(), FirewallError> {
        // The real adapter refuses states it cannot render; so does the fake.
        crate::firewall::nft::render(state)?;
        let mut inner = self.lock();
        if let Some(stderr) = inner.fail.clone() {
            return Err(FirewallError::Rejected { stderr });
        }
        inner.state = Some(state.clone());
        inner.applies += 1;
        Ok(())
    }

    fn clear(&self) -> Result<(), FirewallError> {
        let mut inner = self.lock();
        if let Some(stderr) = inner.fail.clone() {
            return Err(FirewallError::Rejected { stderr });
        }
        inner.state = None;
        inner.clears += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::NetworkPolicy;
    use crate::links::{gateway_host_name, gateway_mac, vxlan_name};

    #[test]
    fn records_applies_and_clears() {
        let fw = FakeFirewall::new();
        assert_eq!(fw.state(), None);
        let state = FirewallState {
            networks: vec![NetworkPolicy {
                vni: 5,
                vxlan: vxlan_name(5),
                gateway_port: gateway_host_name(5),
                gateway_ip: "10.0.0.1".parse().unwrap(),
                gateway_mac: gateway_mac(5),
            }],
            ..FirewallState::default()
        };
        fw.apply(&state).unwrap();
        fw.apply(&state).unwrap();
        assert_eq!(fw.state(), Some(state.clone()));
        assert_eq!(fw.apply_count(), 2);

        fw.fail_with(Some("boom"));
        assert!(matches!(
            fw.apply(&FirewallState::default()),
            Err(FirewallError::Rejected { .. })
        ));
        assert_eq!(fw.state(), Some(state.clone()));
        fw.fail_with(None);

        let mut bad = state.clone();
        bad.networks[0].vxlan = "bad name".into();
        assert!(matches!(fw.apply(&bad), Err(FirewallError::Invalid(_))));
        assert_eq!(fw.apply_count(), 2);

        fw.clear().unwrap();
        assert_eq!(fw.state(), None);
        assert_eq!(fw.clear_count(), 1);
    }
}
