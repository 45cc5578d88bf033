//! Bounded polling. Tests never sleep for a fixed time: they wait *until* something they
//! can observe is true, for at most a timeout, and fail with a message naming what they
//! waited for and what they last saw.
//!
//! The probe closure returns
//! * `Ok(Some(value))` — done, `value` is returned;
//! * `Ok(None)` — not yet (the observation is recorded as "not ready");
//! * `Err(e)` — not yet, and `e` (with its causes) is the observation to report;
//! * `Err(abort(..))` — give up at once: waiting longer cannot help (the process died).
//!
//! ```ignore
//! let leader = wait_until("a leader on node1", secs(20), millis(200), || async {
//!     let s = cluster.status(0).await?;             // errors are observations
//!     Ok(s["leader_id"].as_u64())                   // None until elected
//! }).await?;
//! ```

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

/// A wait that timed out or was aborted.
#[derive(Debug, thiserror::Error)]
pub struct WaitError {
    /// What was awaited.
    pub desc: String,
    pub elapsed: Duration,
    pub attempts: u32,
    /// The last thing the probe saw.
    pub last: String,
    /// True when the probe aborted the wait (see [`abort`]), false on timeout.
    pub aborted: bool,
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = if self.aborted { "gave up" } else { "timed out" };
        write!(
            f,
            "{how} after {:.1?} ({} attempts) waiting for {}; last observation: {}",
            self.elapsed, self.attempts, self.desc, self.last
        )
    }
}

/// Marks an error returned by a probe as final: the wait stops at once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Abort(pub String);

/// An error that makes [`wait_until`] stop immediately instead of polling again.
pub fn abort(msg: impl fmt::Display) -> anyhow::Error {
    anyhow::Error::new(Abort(msg.to_string()))
}

/// Shorthand for `Duration::from_secs`.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Shorthand for `Duration::from_millis`.
pub fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

const NOT_READY: &str = "not ready (the probe returned None)";

fn describe(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

/// Polls `probe` every `interval` until it returns `Ok(Some(_))`, for at most `timeout`.
/// A single probe that is still running at the deadline is cancelled.
pub async fn wait_until<T, F, Fut>(
    desc: impl Into<String>,
    timeout: Duration,
    interval: Duration,
    mut probe: F,
) -> Result<T, WaitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        // Leave a probe at least one interval even when the deadline is close, so that a
        // slow-but-healthy probe can still finish once.
        let budget = timeout.saturating_sub(start.elapsed()).max(interval);
        let last = match tokio::time::timeout(budget, probe()).await {
            Ok(Ok(Some(v))) => return Ok(v),
            Ok(Ok(None)) => NOT_READY.to_string(),
            Ok(Err(e)) => {
                let last = describe(&e);
                if e.downcast_ref::<Abort>().is_some() {
                    return Err(WaitError {
                        desc: desc.into(),
                        elapsed: start.elapsed(),
                        attempts,
                        last,
                        aborted: true,
                    });
                }
                last
            }
            Err(_) => format!("the probe did not finish within {budget:.1?}"),
        };
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(WaitError {
                desc: desc.into(),
                elapsed,
                attempts,
                last,
                aborted: false,
            });
        }
        tokio::time::sleep(interval.min(timeout - elapsed)).await;
    }
}

/// [`wait_until`] for synchronous probes (used where no runtime is available, e.g. in
/// `Drop`). A probe is never interrupted.
pub fn wait_until_blocking<T, F>(
    desc: impl Into<String>,
    timeout: Duration,
    interval: Duration,
    mut probe: F,
) -> Result<T, WaitError>
where
    F: FnMut() -> anyhow::Result<Option<T>>,
{
    let start = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let last = match probe() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => NOT_READY.to_string(),
            Err(e) => {
                let last = describe(&e);
                if e.downcast_ref::<Abort>().is_some() {
                    return Err(WaitError {
                        desc: desc.into(),
                        elapsed: start.elapsed(),
                        attempts,
                        last,
                        aborted: true,
                    });
                }
                last
            }
        };
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(WaitError {
                desc: desc.into(),
                elapsed,
                attempts,
                last,
                aborted: false,
            });
        }
        std::thread::sleep(interval.min(timeout - elapsed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_ready() {
        let mut n = 0;
        let v = wait_until("n to reach 3", secs(5), millis(1), || {
            n += 1;
            let n = n;
            async move { Ok((n >= 3).then_some(n)) }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
    }

    #[tokio::test]
    async fn timeout_names_what_was_awaited_and_the_last_observation() {
        let mut n = 0;
        let err = wait_until("the moon", millis(50), millis(5), || {
            n += 1;
            let n = n;
            async move { Err::<Option<()>, _>(anyhow::anyhow!("saw {n} clouds")) }
        })
        .await
        .unwrap_err();
        assert!(!err.aborted);
        assert!(err.attempts >= 2, "{err}");
        let msg = err.to_string();
        assert!(msg.contains("timed out"), "{msg}");
        assert!(msg.contains("the moon"), "{msg}");
        assert!(
            msg.contains(&format!("saw {} clouds", err.attempts)),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn abort_stops_at_once() {
        let mut n = 0;
        let err = wait_until("a dead process", secs(30), millis(1), || {
            n += 1;
            async { Err::<Option<()>, _>(abort("it exited with status 1")) }
        })
        .await
        .unwrap_err();
        assert!(err.aborted);
        assert_eq!(n, 1);
        assert!(err.to_string().contains("gave up"), "{err}");
        assert!(err.to_string().contains("exited with status 1"), "{err}");
    }

    #[tokio::test]
    async fn a_hanging_probe_is_cut_at_the_deadline() {
        let err = wait_until("a hanging probe", millis(50), millis(10), || async {
            std::future::pending::<()>().await;
            Ok(Some(()))
        })
        .await
        .unwrap_err();
        assert!(err.last.contains("did not finish"), "{err}");
    }

    #[test]
    fn blocking_variant_times_out_with_not_ready() {
        let err =
            wait_until_blocking("nothing", millis(20), millis(5), || Ok(None::<()>)).unwrap_err();
        assert!(err.to_string().contains("not ready"), "{err}");
    }
}
