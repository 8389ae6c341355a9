//! Limits and back-pressure: token buckets per caller, and audit lines
//! for limits hit that are themselves limited (one a second per caller,
//! with the count refused since), so a flood cannot flood the audit log.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::audit::{AuditLog, Event};

/// Allows `rate` events per `per`, in bursts of up to `rate`.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    rate: f64,
    per: Duration,
    at: Instant,
}

impl Bucket {
    pub fn new(rate: u32, per: Duration, now: Instant) -> Self {
        Bucket { tokens: rate.into(), rate: rate.into(), per, at: now }
    }

    pub fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() / self.per.as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn full(&self, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() / self.per.as_secs_f64() * self.rate
            >= self.rate
    }
}

/// Most callers tracked at once; idle ones are forgotten first.
const CALLERS: usize = 10_000;

/// A token bucket per caller key (a container id, a host uid, a remote
/// certificate subject).
#[derive(Debug)]
pub struct PerCaller {
    rate: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl PerCaller {
    pub fn new(per_second: u32) -> Self {
        PerCaller { rate: per_second, buckets: Mutex::default() }
    }

    pub fn allow(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut b = self.buckets.lock().expect("rate lock");
        if b.len() >= CALLERS && !b.contains_key(key) {
            // Full buckets are callers at rest: nothing is lost forgetting them.
            b.retain(|_, v| !v.full(now));
            if b.len() >= CALLERS {
                return false;
            }
        }
        b.entry(key.to_owned()).or_insert_with(|| Bucket::new(self.rate, Duration::from_secs(1), now)).take(now)
    }
}

/// Audits limits hit: the first at once, then at most one line a second
/// per caller, saying how many were refused.
#[derive(Debug, Default)]
pub struct Refusals {
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Refusals {
    /// One refusal of `key` by `limit`; writes a `limit` line when due.
    pub fn refused(&self, audit: &AuditLog, key: &str, limit: &str, caller: Option<&crate::identity::Identity>) {
        let now = Instant::now();
        let due = {
            let mut seen = self.seen.lock().expect("refusals lock");
            if seen.len() >= CALLERS {
                seen.retain(|_, (t, _)| now.duration_since(*t) < Duration::from_secs(1));
            }
            let e = seen.entry(key.to_owned()).or_insert((now - Duration::from_secs(2), 0));
            e.1 += 1;
            if now.duration_since(e.0) >= Duration::from_secs(1) {
                let n = e.1;
                *e = (now, 0);
                Some(n)
            } else {
                None
            }
        };
        if let Some(n) = due {
            let reason = format!("{limit}: refused {n} since the last such line");
            let _ = audit.record(&Event { caller, reason: Some(&reason), ..Event::new("limit") });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_bursts_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(3, Duration::from_secs(60), t0);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert!(!b.take(t0 + Duration::from_secs(10)), "a third of a token after 10 s");
        assert!(b.take(t0 + Duration::from_secs(20)), "one token after 20 s at 3 a minute");
        assert!(!b.take(t0 + Duration::from_secs(21)));
    }

    #[test]
    fn callers_have_their_own_buckets() {
        let p = PerCaller::new(2);
        assert!(p.allow("a") && p.allow("a"));
        assert!(!p.allow("a"), "a's burst is spent");
        assert!(p.allow("b"), "b is not held back by a");
    }
}
