//! keel-node: the per-server service that `keel serve` runs.
//!
//! * [`service`] — `keel serve`: listeners, the cluster database, agent and duties.
//! * [`api`] — the HTTPS API and the admin socket (one set of handlers).
//! * [`duties`] — leader-only management duties (host health, voters).
//! * [`host`] — the host's own systemd units the service keeps running (libvirtd).
//!
//! Beside it: `keel-api-types` (wire types), `keel-client` (the typed client),
//! `keel-adapters` (host side effects) and `keel-cli` (the `keel` binary).

pub mod api;
pub mod compute;
pub mod config;
pub mod duties;
pub mod host;
pub mod inventory;
pub mod metrics;
pub mod network;
pub mod peer;
pub mod service;
pub mod wake;
