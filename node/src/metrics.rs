//! Prometheus metrics, rendered at scrape time from raft's metrics and the host table so
//! that nothing has to be kept in step by hand.

use std::sync::atomic::{AtomicU64, Ordering};

use keel_cluster::model::{self, Health, Host};
use keel_cluster::ClusterDb;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Default)]
pub struct Metrics {
    http_2xx: AtomicU64,
    http_4xx: AtomicU64,
    http_5xx: AtomicU64,
}

impl Metrics {
    pub fn record_http(&self, status: u16) {
        let counter = match status {
            500.. => &self.http_5xx,
            400.. => &self.http_4xx,
            _ => &self.http_2xx,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Renders every metric of this node: `started` is when the service started; raft and
    /// host figures come from `db` at scrape time.
    pub fn render(&self, db: &ClusterDb, started: std::time::Instant) -> String {
        let mut registry = Registry::with_prefix("keel");
        let gauge = |registry: &mut Registry, name: &str, help: &str, value: i64| {
            let g = Gauge::<i64>::default();
            g.set(value);
            registry.register(name, help, g);
        };
        gauge(
            &mut registry,
            "uptime_seconds",
            "Seconds since the node service started",
            started.elapsed().as_secs() as i64,
        );
        if let Some(m) = db.metrics() {
            gauge(
                &mut registry,
                "raft_term",
                "Current raft term",
                m.current_term as i64,
            );
            gauge(
                &mut registry,
                "raft_is_leader",
                "1 if this node is the raft leader",
                i64::from(db.is_leader()),
            );
            gauge(
                &mut registry,
                "raft_last_log_index",
                "Index of the last log entry",
                m.last_log_index.unwrap_or(0) as i64,
            );
            gauge(
                &mut registry,
                "raft_last_applied_index",
                "Index of the last applied entry",
                m.last_applied.map_or(0, |l| l.index) as i64,
            );
            let ms = m.membership_config.membership();
            gauge(
                &mut registry,
                "raft_voters",
                "Number of voters",
                ms.voter_ids().count() as i64,
            );
            gauge(
                &mut registry,
                "raft_learners",
                "Number of learners",
                ms.learner_ids().count() as i64,
            );
        }
        if let Ok(hosts) = db.reader().read(model::list::<Host>) {
            let family = Family::<Vec<(String, String)>, Gauge<i64>>::default();
            for health in [Health::Up, Health::Suspect, Health::Down] {
                let n = hosts.iter().filter(|h| h.health == health).count();
                family
                    .get_or_create(&vec![("health".into(), health.to_string())])
                    .set(n as i64);
            }
            registry.register("hosts", "Hosts by health", family);
        }
        let http = Family::<Vec<(String, String)>, Counter>::default();
        for (class, v) in [
            ("2xx", &self.http_2xx),
            ("4xx", &self.http_4xx),
            ("5xx", &self.http_5xx),
        ] {
            http.get_or_create(&vec![("class".into(), class.into())])
                .inc_by(v.load(Ordering::Relaxed));
        }
        registry.register("http_requests", "HTTPS API requests by status class", http);
        let mut out = String::new();
        if encode(&mut out, &registry).is_err() {
            out = "# metrics encoding failed\n".into();
        }
        out
    }
}
