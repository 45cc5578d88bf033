//! The host's own services: on an installed node (systemd is PID 1) `keel serve` makes
//! sure the systemd units it depends on are running — `libvirtd.service` now, Ceph's
//! daemons later; the list is `[host] units` — through systemd's D-Bus API, not
//! `systemctl`. Where systemd does not run the host (the lab, the tests, containers)
//! this is off: `[host] systemd = "auto"` follows sd_booted(3).
//!
//! Keel only starts units; it never stops, enables or reconfigures them. systemd stays
//! the supervisor of the processes (its `Restart=` settings act first); Keel is the
//! safety net for a unit that is down and that nothing brings back: not started at boot,
//! stopped by hand, or failed for good. To keep a unit down on purpose, mask it
//! (`systemctl mask`) or take it out of `[host] units`.
//!
//! How [`supervisor::HostUnits`] treats one unit, at every pass (every
//! `units_interval_ms`, sooner when a retry is due):
//!
//! ```text
//!   not loaded (LoadState not-found, masked, …): reported with an error, never started,
//!   looked at again every interval (systemd loads a unit whose file appeared since)
//!
//!   inactive        ──StartUnit(replace)──▶ starting ───────────────▶ active
//!   failed             (no backoff running)  (activating)               │ failures := 0,
//!     ▲  ▲                                       │                      │ error cleared
//!     │  │                                       │ StartUnit refused,   │
//!     │  └─────────── backoff ◀──────────────────┘ or down again at     │ stopped,
//!     │     1 s, 2 s, 4 s … at most 8 × interval;    the next look      │ crashed
//!     │     failures += 1, error reported                               │
//!     └─────────────────────────────────────────────────────────────────┘
//!   (deactivating: left to finish; inactive at a later pass)
//! ```
//!
//! Every pass publishes one [`keel_cluster::model::HostUnitReport`] per unit (states and
//! the error, if any) on a `watch` channel; the agent puts them into the host's
//! inventory, which is re-sent when they change (`keel node show`, the API).
//!
//! The unit manager itself is an adapter: `keel_adapters::units` holds the `UnitManager`
//! trait, the real one over D-Bus (`units::systemd`, every zbus call) and the fake.

pub mod supervisor;
