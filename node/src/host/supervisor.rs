//! [`HostUnits`]: keeps the host's units running and reports them (the state machine is
//! drawn in [`super`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keel_cluster::error_chain;
use keel_cluster::model::HostUnitReport;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use keel_adapters::units::{UnitManager, UnitState, NOT_FOUND};

/// How often units are checked by default (`[host] units_interval_ms`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);
/// The first retry after a failed start (or the interval, if shorter).
const RETRY_BASE: Duration = Duration::from_secs(1);
/// Retries back off up to this many intervals.
const BACKOFF_CAP_INTERVALS: u32 = 8;

/// What the supervisor publishes: `None` until its first pass.
pub type UnitReports = Option<Vec<HostUnitReport>>;

/// Keeps `units` running through `manager`: a pass at start and then every `interval`
/// (sooner when a retry is due); every pass reads each unit's state, starts the units
/// that are down, and publishes the reports on `report`.
pub struct HostUnits {
    pub manager: Arc<dyn UnitManager>,
    pub units: Vec<String>,
    pub interval: Duration,
    pub report: watch::Sender<UnitReports>,
}

/// What the supervisor remembers of one unit between passes.
#[derive(Debug, Default)]
struct Tracker {
    /// Starts in a row that did not bring the unit up: refused by systemd, or the unit
    /// was down again at the next look.
    failures: u32,
    /// A start job was queued and the unit has not been seen `active` since.
    started: bool,
    /// No new start before this (backoff after a failure).
    retry_at: Option<Instant>,
    /// Why the unit is not running although it was started, reported until it is.
    failure: Option<String>,
    /// The previous pass's report (state changes are logged, not every pass).
    last: Option<HostUnitReport>,
}

impl HostUnits {
    /// A supervisor and the receiving end of its reports.
    pub fn new(
        manager: Arc<dyn UnitManager>,
        units: Vec<String>,
        interval: Duration,
    ) -> (Self, watch::Receiver<UnitReports>) {
        let (report, rx) = watch::channel(None);
        (
            Self {
                manager,
                units,
                interval,
                report,
            },
            rx,
        )
    }

    /// Runs until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        tracing::info!(units = ?self.units, interval_ms = self.interval.as_millis() as u64,
            "host units: keeping them running through systemd");
        let mut trackers = BTreeMap::new();
        loop {
            let now = Instant::now();
            let reports = tokio::select! {
                _ = stop.cancelled() => return,
                reports = self.pass(&mut trackers, now) => reports,
            };
            self.report.send_if_modified(|current| {
                if current.as_ref() == Some(&reports) {
                    return false;
                }
                *current = Some(reports);
                true
            });
            let next = self.next_pass(&trackers, now);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// How long to wait before the next start after `failures` failed ones: doubling
    /// from a second, at most [`BACKOFF_CAP_INTERVALS`] intervals.
    fn backoff(&self, failures: u32) -> Duration {
        let base = RETRY_BASE.min(self.interval);
        let doubled = base.saturating_mul(1 << failures.saturating_sub(1).min(20));
        doubled.min(self.interval.saturating_mul(BACKOFF_CAP_INTERVALS))
    }

    /// When the pass after the one at `now` is due: after the interval, or when a retry is.
    fn next_pass(&self, trackers: &BTreeMap<String, Tracker>, now: Instant) -> Instant {
        trackers
            .values()
            .filter_map(|t| t.retry_at)
            .filter(|at| *at > now)
            .fold(now + self.interval, Instant::min)
    }

    /// One look at every unit, starting those that are down and due.
    async fn pass(
        &self,
        trackers: &mut BTreeMap<String, Tracker>,
        now: Instant,
    ) -> Vec<HostUnitReport> {
        trackers.retain(|unit, _| self.units.contains(unit));
        let mut reports = Vec::with_capacity(self.units.len());
        for unit in &self.units {
            let tracker = trackers.entry(unit.clone()).or_default();
            let report = self.check(unit, tracker, now).await;
            log_change(tracker.last.as_ref(), &report);
            tracker.last = Some(report.clone());
            reports.push(report);
        }
        reports
    }

    async fn check(&self, unit: &str, t: &mut Tracker, now: Instant) -> HostUnitReport {
        let state = match self.manager.unit_state(unit).await {
            Ok(state) => state,
            Err(e) => return report(unit, &UnitState::default(), Some(error_chain(&e))),
        };
        if !state.is_loaded() {
            // Nothing to start: a missing package, a typo, a masked unit. Looked at again
            // every interval (systemd reloads a not-found unit once its file appears).
            *t = Tracker {
                last: t.last.take(),
                ..Default::default()
            };
            let why = match state.load_state.as_str() {
                NOT_FOUND => {
                    "systemd has no such unit (is its package installed, is the name right?)"
                        .to_string()
                }
                "masked" => "the unit is masked: `systemctl unmask` it to let Keel start it".into(),
                other => format!(
                    "systemd could not load the unit (load state {other}): see `systemctl status {unit}`"
                ),
            };
            return report(unit, &state, Some(why));
        }
        if state.is_up() {
            if state.active_state == "active" {
                *t = Tracker {
                    last: t.last.take(),
                    ..Default::default()
                };
            }
            return report(unit, &state, t.failure.clone());
        }
        if !state.is_down() {
            // Deactivating (or a state Keel does not know): looked at again next pass.
            return report(unit, &state, t.failure.clone());
        }
        if t.started {
            // Started by an earlier pass and down again: that start did not stick.
            t.started = false;
            t.failures += 1;
            t.retry_at = Some(now + self.backoff(t.failures));
            t.failure = Some(format!(
                "started, but it is {} ({}) again: see `journalctl -u {unit}`",
                state.active_state, state.sub_state
            ));
        }
        if t.retry_at.is_some_and(|at| now < at) {
            return report(unit, &state, t.failure.clone());
        }
        match self.manager.start_unit(unit).await {
            Ok(()) => {
                tracing::info!(
                    unit,
                    active_state = %state.active_state,
                    sub_state = %state.sub_state,
                    attempt = t.failures + 1,
                    "host unit is not running; started it"
                );
                t.started = true;
                // Report what the start made of it (activating, or active already).
                let after = self.manager.unit_state(unit).await.unwrap_or(state);
                report(unit, &after, t.failure.clone())
            }
            Err(e) => {
                t.failures += 1;
                let wait = self.backoff(t.failures);
                t.retry_at = Some(now + wait);
                let message = error_chain(&e);
                tracing::debug!(unit, error = %message, failures = t.failures,
                    retry_in_ms = wait.as_millis() as u64, "host unit: start failed");
                t.failure = Some(message);
                report(unit, &state, t.failure.clone())
            }
        }
    }
}

fn report(unit: &str, state: &UnitState, error: Option<String>) -> HostUnitReport {
    HostUnitReport {
        unit: unit.to_string(),
        load_state: state.load_state.clone(),
        active_state: state.active_state.clone(),
        sub_state: state.sub_state.clone(),
        error,
    }
}

/// Logs what changed since the previous pass: the state at info, a new problem at warn
/// (its whole error chain), a solved one at info.
fn log_change(previous: Option<&HostUnitReport>, now: &HostUnitReport) {
    let state = |r: &HostUnitReport| {
        (
            r.load_state.clone(),
            r.active_state.clone(),
            r.sub_state.clone(),
        )
    };
    if previous.map(state) != Some(state(now)) && !now.load_state.is_empty() {
        tracing::info!(
            unit = %now.unit,
            load_state = %now.load_state,
            active_state = %now.active_state,
            sub_state = %now.sub_state,
            "host unit state"
        );
    }
    match (previous.and_then(|p| p.error.as_ref()), &now.error) {
        (before, Some(error)) if before != Some(error) => {
            tracing::warn!(unit = %now.unit, error = %error, "host unit is not running as it should");
        }
        (Some(_), None) => tracing::info!(unit = %now.unit, "host unit is fine again"),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_adapters::units::fake::FakeUnits;

    const LIBVIRTD: &str = "libvirtd.service";
    const INTERVAL: Duration = Duration::from_secs(10);

    fn supervisor(fake: &Arc<FakeUnits>, units: &[&str]) -> HostUnits {
        HostUnits::new(
            fake.clone(),
            units.iter().map(|u| u.to_string()).collect(),
            INTERVAL,
        )
        .0
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[tokio::test]
    async fn an_inactive_unit_is_started_once() {
        let fake = Arc::new(FakeUnits::new());
        fake.add_inactive(LIBVIRTD);
        let sup = supervisor(&fake, &[LIBVIRTD]);
        let mut trackers = BTreeMap::new();
        let t0 = Instant::now();
        let reports = sup.pass(&mut trackers, t0).await;
        assert_eq!(fake.starts(), vec![LIBVIRTD.to_string()]);
        assert_eq!(
            reports,
            vec![HostUnitReport {
                unit: LIBVIRTD.into(),
                load_state: "loaded".into(),
                active_state: "active".into(),
                sub_state: "running".into(),
                error: None,
            }]
        );
        for i in 1..5 {
            sup.pass(&mut trackers, t0 + INTERVAL * i).await;
        }
        assert_eq!(fake.starts().len(), 1, "an active unit is left alone");
        assert_eq!(sup.next_pass(&trackers, t0), t0 + INTERVAL);
    }

    #[tokio::test]
    async fn an_active_unit_is_not_started() {
        let fake = Arc::new(FakeUnits::new());
        fake.add_active(LIBVIRTD);
        fake.set(
            "ceph-mon@n1.service",
            UnitState::new("loaded", "activating", "start"),
        );
        let sup = supervisor(&fake, &[LIBVIRTD, "ceph-mon@n1.service"]);
        let mut trackers = BTreeMap::new();
        let reports = sup.pass(&mut trackers, Instant::now()).await;
        assert!(fake.starts().is_empty(), "{:?}", fake.starts());
        assert_eq!(reports.len(), 2);
        assert!(reports.iter().all(|r| r.error.is_none()), "{reports:?}");
        assert_eq!(reports[1].active_state, "activating");
    }

    #[tokio::test]
    async fn a_failing_start_is_retried_with_backoff_and_reported() {
        let fake = Arc::new(FakeUnits::new());
        fake.set(LIBVIRTD, UnitState::new("loaded", "failed", "failed"));
        fake.fail_starts(
            LIBVIRTD,
            Some("org.freedesktop.systemd1.UnitMasked: start request repeated too quickly"),
        );
        let sup = supervisor(&fake, &[LIBVIRTD]);
        let mut trackers = BTreeMap::new();
        let t0 = Instant::now();

        let reports = sup.pass(&mut trackers, t0).await;
        assert_eq!(fake.starts().len(), 1);
        let error = reports[0].error.clone().expect("reported");
        assert!(
            error.contains("StartUnit of libvirtd.service failed")
                && error.contains("start request repeated too quickly"),
            "the whole chain: {error}"
        );
        assert_eq!(reports[0].active_state, "failed");
        assert_eq!(
            sup.next_pass(&trackers, t0),
            t0 + secs(1.0),
            "retry due first"
        );

        // Retries after 1 s, then 2 s, 4 s, 8 s, … (each from the failed attempt).
        let mut expected_starts = 1;
        let mut at = t0;
        for wait in [1.0, 2.0, 4.0, 8.0, 16.0] {
            let early = sup.pass(&mut trackers, at + secs(wait * 0.9)).await;
            assert_eq!(fake.starts().len(), expected_starts, "not before {wait} s");
            assert_eq!(
                early[0].error.as_deref(),
                Some(error.as_str()),
                "still reported"
            );
            at += secs(wait);
            sup.pass(&mut trackers, at).await;
            expected_starts += 1;
            assert_eq!(fake.starts().len(), expected_starts, "after {wait} s");
        }
        // Capped at 8 intervals.
        assert_eq!(sup.backoff(7), secs(64.0));
        assert_eq!(sup.backoff(8), INTERVAL * 8);
        assert_eq!(sup.backoff(100), INTERVAL * 8);

        // Fixed: the next retry starts it and the error goes once it is seen active.
        fake.fail_starts(LIBVIRTD, None);
        at += secs(32.0);
        let reports = sup.pass(&mut trackers, at).await;
        assert_eq!(fake.starts().len(), expected_starts + 1);
        assert_eq!(reports[0].active_state, "active");
        let reports = sup.pass(&mut trackers, at + INTERVAL).await;
        assert_eq!(reports[0].error, None);
        assert_eq!(trackers[LIBVIRTD].failures, 0);
    }

    #[tokio::test]
    async fn a_unit_that_fails_after_its_start_backs_off_too() {
        let fake = Arc::new(FakeUnits::new());
        fake.add_inactive(LIBVIRTD);
        fake.crash_on_start(LIBVIRTD, true);
        let sup = supervisor(&fake, &[LIBVIRTD]);
        let mut trackers = BTreeMap::new();
        let t0 = Instant::now();
        sup.pass(&mut trackers, t0).await;
        assert_eq!(fake.starts().len(), 1);
        // Seen failed at the next pass: a failure, retried after the backoff.
        let reports = sup.pass(&mut trackers, t0 + INTERVAL).await;
        assert_eq!(fake.starts().len(), 1);
        let error = reports[0].error.clone().expect("reported");
        assert!(error.contains("started, but it is failed"), "{error}");
        sup.pass(&mut trackers, t0 + INTERVAL + secs(1.0)).await;
        assert_eq!(fake.starts().len(), 2);
        sup.pass(&mut trackers, t0 + INTERVAL * 2 + secs(1.0)).await;
        assert_eq!(fake.starts().len(), 2, "second failure: 2 s");
        assert_eq!(trackers[LIBVIRTD].failures, 2);
    }

    #[tokio::test]
    async fn a_unit_systemd_does_not_know_is_reported_and_never_started() {
        let fake = Arc::new(FakeUnits::new());
        let sup = supervisor(&fake, &["nosuch.service"]);
        let mut trackers = BTreeMap::new();
        let t0 = Instant::now();
        for i in 0..20 {
            let now = t0 + secs(0.01 * f64::from(i));
            let reports = sup.pass(&mut trackers, now).await;
            assert_eq!(reports[0].load_state, NOT_FOUND);
            assert!(
                reports[0]
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("no such unit")),
                "{reports:?}"
            );
            assert_eq!(
                sup.next_pass(&trackers, now),
                now + INTERVAL,
                "no tight loop"
            );
        }
        assert!(fake.starts().is_empty(), "{:?}", fake.starts());
        // Installed later: started on the next pass.
        fake.add_inactive("nosuch.service");
        let reports = sup.pass(&mut trackers, t0 + INTERVAL).await;
        assert_eq!(fake.starts(), vec!["nosuch.service".to_string()]);
        assert_eq!(reports[0].error, None);
    }

    #[tokio::test]
    async fn an_unreachable_bus_is_reported_and_retried() {
        let fake = Arc::new(FakeUnits::new());
        fake.add_inactive(LIBVIRTD);
        fake.set_bus_down(true);
        let sup = supervisor(&fake, &[LIBVIRTD]);
        let mut trackers = BTreeMap::new();
        let t0 = Instant::now();
        let reports = sup.pass(&mut trackers, t0).await;
        assert!(
            reports[0]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("cannot connect to systemd") && e.contains("refused")),
            "{reports:?}"
        );
        fake.set_bus_down(false);
        sup.pass(&mut trackers, t0 + INTERVAL).await;
        assert_eq!(fake.starts().len(), 1);
    }

    #[tokio::test]
    async fn run_publishes_reports_and_stops() {
        let fake = Arc::new(FakeUnits::new());
        fake.add_inactive(LIBVIRTD);
        let (sup, mut rx) = HostUnits::new(
            fake.clone(),
            vec![LIBVIRTD.into()],
            Duration::from_millis(50),
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(sup.run(stop.clone()));
        let reports = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(r) = rx.borrow_and_update().clone() {
                    return r;
                }
                rx.changed().await.expect("sender alive");
            }
        })
        .await
        .expect("a report");
        assert_eq!(reports[0].active_state, "active");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops")
            .expect("no panic");
        assert_eq!(fake.starts().len(), 1);
    }
}
