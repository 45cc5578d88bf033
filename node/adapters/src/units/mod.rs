//! The narrow interface between `HostUnits` (the service's supervisor) and the host's service
//! manager. The real implementation is [`crate::units::systemd::SystemdDbus`] (systemd's D-Bus API;
//! every zbus call lives there); [`crate::units::fake::FakeUnits`] keeps units in memory for
//! unit tests of the logic above it.
//!
//! Calls are async (D-Bus is): the supervisor awaits them on the runtime. Both calls are
//! idempotent: reading changes nothing, starting an active unit is a no-op for systemd.

pub mod fake;
pub mod systemd;

/// systemd's `LoadState` of a unit it has no file for.
pub const NOT_FOUND: &str = "not-found";

/// A unit as systemd reports it: its `LoadState`, `ActiveState` and `SubState` properties
/// (systemd.unit(5), `systemctl show -p LoadState,ActiveState,SubState`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnitState {
    /// `loaded`, `not-found`, `masked`, `bad-setting`, `error`, …
    pub load_state: String,
    /// `active`, `reloading`, `inactive`, `failed`, `activating`, `deactivating`, …
    pub active_state: String,
    /// Type-specific detail: `running`, `dead`, `auto-restart`, …
    pub sub_state: String,
}

impl UnitState {
    pub fn new(load: &str, active: &str, sub: &str) -> Self {
        Self {
            load_state: load.into(),
            active_state: active.into(),
            sub_state: sub.into(),
        }
    }

    /// systemd has the unit's configuration, so it can start it.
    pub fn is_loaded(&self) -> bool {
        self.load_state == "loaded"
    }

    /// Up, or on its way up (a start job or systemd's own restart is running).
    pub fn is_up(&self) -> bool {
        matches!(
            self.active_state.as_str(),
            "active" | "reloading" | "activating" | "refreshing"
        )
    }

    /// Down and nothing is bringing it up: only a start helps. A unit still
    /// `deactivating` is left to finish first.
    pub fn is_down(&self) -> bool {
        matches!(self.active_state.as_str(), "inactive" | "failed")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    /// No connection to the service manager (its bus is down, or absent: no systemd).
    #[error("cannot connect to systemd on {bus}")]
    Connect {
        bus: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The service manager refused or failed a request about one unit.
    #[error("systemd {operation} of {unit} failed")]
    Call {
        operation: &'static str,
        unit: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The host's service manager, as far as Keel needs it.
#[async_trait::async_trait]
pub trait UnitManager: Send + Sync + 'static {
    /// The unit's state, loading its configuration if systemd has not yet. A unit systemd
    /// has no file for is `load_state = "not-found"` ([`NOT_FOUND`]), not an error.
    async fn unit_state(&self, unit: &str) -> Result<UnitState, UnitError>;
    /// Queues a start job for the unit (mode `replace`) and returns once systemd accepted
    /// it, not when the unit is up: the next [`Self::unit_state`] tells.
    async fn start_unit(&self, unit: &str) -> Result<(), UnitError>;
}
