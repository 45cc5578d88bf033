//! Per-source rate limiting for the routes a stranger can reach (`/api/v1/join`): a token
//! bucket per client address, so one source flooding the route is answered 429 while every
//! other source, and every other route, goes on as before.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many addresses are remembered before full buckets are forgotten (a flood from many
/// addresses cannot grow the table without bound).
const MAX_TRACKED: usize = 4096;

/// A token bucket per source address.
#[derive(Debug)]
pub struct RateLimiter {
    /// Requests per second a source may keep up.
    rate: f64,
    /// Requests a source may send at once.
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            rate: per_second,
            burst: f64::from(burst),
            buckets: Mutex::default(),
        }
    }

    /// Takes one request from `source`'s bucket at `now`; `Err` says how long until the
    /// next one is allowed.
    pub fn take(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&source) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| refill(b, now, rate, burst) < burst);
        }
        let bucket = buckets.entry(source).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = refill(bucket, now, self.rate, self.burst);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            Ok(())
        } else {
            *bucket = Bucket { tokens, at: now };
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }
}

fn refill(b: &Bucket, now: Instant, rate: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * rate).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_others_are_untouched() {
        let limiter = RateLimiter::new(2.0, 3);
        let (a, b): (IpAddr, IpAddr) = ([192, 0, 2, 1].into(), [192, 0, 2, 2].into());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.take(a, t0), Ok(()));
        }
        let wait = limiter
            .take(a, t0)
            .expect_err("the fourth at once is refused");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert_eq!(limiter.take(b, t0), Ok(()), "another source is not limited");
        // Half a second later one more request is allowed (2 per second), not two.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(limiter.take(a, t1), Ok(()));
        assert!(limiter.take(a, t1).is_err());
    }

    #[test]
    fn the_table_stays_bounded_under_a_flood_from_many_sources() {
        let limiter = RateLimiter::new(1.0, 2);
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 * 3) {
            let ip = IpAddr::from(i.to_be_bytes());
            let _ = limiter.take(ip, t0 + Duration::from_secs(u64::from(i / 1000) * 10));
        }
        let tracked = limiter
            .buckets
            .lock()
            .map(|b| b.len())
            .unwrap_or(usize::MAX);
        assert!(tracked <= MAX_TRACKED + 1, "{tracked} sources tracked");
    }
}
