//! An in-memory service manager for unit tests of `HostUnits` (the service's supervisor): units
//! are a map of states, starts are recorded, and a start can be told to fail or to leave
//! the unit failed (a service that crashes right away).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::units::{UnitError, UnitManager, UnitState, NOT_FOUND};

#[derive(Debug, Default)]
struct Inner {
    units: BTreeMap<String, UnitState>,
    starts: Vec<String>,
    /// Units whose `start_unit` fails.
    failing_starts: BTreeMap<String, String>,
    /// Units that end up `failed` after a start instead of `active`.
    crashing: BTreeSet<String>,
    /// When set, every call fails as if the bus were gone.
    bus_down: bool,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct FakeUnits {
    inner: Mutex<Inner>,
}

impl FakeUnits {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds (or replaces) a unit in the given state.
    pub fn set(&self, unit: &str, state: UnitState) {
        self.lock().units.insert(unit.into(), state);
    }

    /// Adds a loaded unit that is not running (`inactive`/`dead`).
    pub fn add_inactive(&self, unit: &str) {
        self.set(unit, UnitState::new("loaded", "inactive", "dead"));
    }

    /// Adds a loaded, running unit.
    pub fn add_active(&self, unit: &str) {
        self.set(unit, UnitState::new("loaded", "active", "running"));
    }

    /// Makes `start_unit` of the unit fail with `message` (`None`: succeed again).
    pub fn fail_starts(&self, unit: &str, message: Option<&str>) {
        let mut inner = self.lock();
        match message {
            Some(m) => inner.failing_starts.insert(unit.into(), m.into()),
            None => inner.failing_starts.remove(unit),
        };
    }

    /// Makes a started unit end up `failed` (`false`: `active` again).
    pub fn crash_on_start(&self, unit: &str, crash: bool) {
        let mut inner = self.lock();
        if crash {
            inner.crashing.insert(unit.into());
        } else {
            inner.crashing.remove(unit);
        }
    }

    /// Makes every call fail as if the bus connection were gone.
    pub fn set_bus_down(&self, down: bool) {
        self.lock().bus_down = down;
    }

    /// Every unit `start_unit` was called for, in order (failed calls included).
    pub fn starts(&self) -> Vec<String> {
        self.lock().starts.clone()
    }

    pub fn state(&self, unit: &str) -> Option<UnitState> {
        self.lock().units.get(unit).cloned()
    }
}

fn bus_gone() -> UnitError {
    UnitError::Connect {
        bus: "the fake bus".into(),
        source: "connection refused".into(),
    }
}

#[async_trait::async_trait]
impl UnitManager for FakeUnits {
    async fn unit_state(&self, unit: &str) -> Result<UnitState, UnitError> {
        let inner = self.lock();
        if inner.bus_down {
            return Err(bus_gone());
        }
        Ok(inner
            .units
            .get(unit)
            .cloned()
            .unwrap_or_else(|| UnitState::new(NOT_FOUND, "inactive", "dead")))
    }

    async fn start_unit(&self, unit: &str) -> Result<(), UnitError> {
        let mut inner = self.lock();
        if inner.bus_down {
            return Err(bus_gone());
        }
        inner.starts.push(unit.into());
        if let Some(message) = inner.failing_starts.get(unit) {
            return Err(UnitError::Call {
                operation: "StartUnit",
                unit: unit.into(),
                source: message.clone().into(),
            });
        }
        let crashes = inner.crashing.contains(unit);
        match inner.units.get_mut(unit) {
            Some(state) if state.is_loaded() => {
                *state = if crashes {
                    UnitState::new("loaded", "failed", "failed")
                } else {
                    UnitState::new("loaded", "active", "running")
                };
                Ok(())
            }
            // What systemd answers for a unit it has no file for.
            _ => Err(UnitError::Call {
                operation: "StartUnit",
                unit: unit.into(),
                source: format!("org.freedesktop.systemd1.NoSuchUnit: Unit {unit} not found.")
                    .into(),
            }),
        }
    }
}
