//! Whether a source answers: [`Health`], shared by a remote source and
//! the mount nodes that show its values, and the [`Freshness`] of what it
//! caches. The local store is always fresh (it has no health).
#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Freshness of what a backend's cache holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// The last refresh succeeded.
    Fresh,
    /// The backend is failing, but it answered within `max_stale`.
    Stale,
    /// Failing for longer than `max_stale` (or never answered).
    Expired,
}

#[derive(Debug, Default)]
struct HealthState {
    ok: bool,
    last_ok: Option<SystemTime>,
    last_error: Option<String>,
}

/// Whether a backend answers; shared with the mounts' nodes.
#[derive(Debug)]
pub struct Health {
    pub name: String,
    pub max_stale: Duration,
    state: Mutex<HealthState>,
}

impl Health {
    /// A source that has not answered yet.
    pub fn new(name: &str, max_stale: Duration) -> Self {
        Health { name: name.to_owned(), max_stale, state: Mutex::new(HealthState::default()) }
    }

    pub fn freshness(&self) -> Freshness {
        let s = self.state.lock().expect("health lock");
        if s.ok {
            return Freshness::Fresh;
        }
        match s.last_ok.and_then(|t| t.elapsed().ok()) {
            Some(age) if age <= self.max_stale => Freshness::Stale,
            _ => Freshness::Expired,
        }
    }

    /// (healthy, last success, last error)
    pub fn snapshot(&self) -> (bool, Option<SystemTime>, Option<String>) {
        let s = self.state.lock().expect("health lock");
        (s.ok, s.last_ok, s.last_error.clone())
    }

    /// Record a success; returns whether the backend was failing before.
    pub fn succeeded(&self) -> bool {
        let mut s = self.state.lock().expect("health lock");
        let recovered = !s.ok;
        s.ok = true;
        s.last_ok = Some(SystemTime::now());
        s.last_error = None;
        recovered
    }

    /// Record a failure; returns whether it was healthy before.
    pub fn failed(&self, error: &str) -> bool {
        let mut s = self.state.lock().expect("health lock");
        let was_ok = s.ok;
        s.ok = false;
        s.last_error = Some(error.to_owned());
        was_ok
    }

    /// Restore the last success time a previous broker persisted.
    pub fn restore_last_ok(&self, t: SystemTime) {
        let mut s = self.state.lock().expect("health lock");
        if s.last_ok.is_none_or(|cur| cur < t) {
            s.last_ok = Some(t);
        }
    }
}
