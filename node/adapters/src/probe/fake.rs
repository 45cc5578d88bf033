//! A probe that answers the facts it was given, for unit tests of what is built on them.

use std::sync::Mutex;

use super::{HostFacts, HostProbe};

#[derive(Debug, Default)]
pub struct FakeProbe {
    facts: Mutex<HostFacts>,
}

impl FakeProbe {
    pub fn new(facts: HostFacts) -> Self {
        Self {
            facts: Mutex::new(facts),
        }
    }

    /// Changes what the next [`HostProbe::facts`] answers (a NIC came up, a disk was added).
    pub fn set(&self, facts: HostFacts) {
        *self.facts.lock().unwrap_or_else(|e| e.into_inner()) = facts;
    }
}

impl HostProbe for FakeProbe {
    fn facts(&self) -> HostFacts {
        self.facts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
