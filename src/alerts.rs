//! The `[alerts] on_deny` hook: a command run (no shell) for each denial,
//! with the denial's audit line as JSON on stdin, so a container probing
//! for secrets that are not its own wakes someone up.
//!
//! A denial is handed over without waiting: a hook that hangs or fails
//! cannot slow an open. Runs are one at a time, each killed after
//! `timeout`. Each caller (as the audit log's denial limiter keys it, see
//! [`crate::limits::caller_key`]) has its own budget of `max_per_minute`
//! runs, so one caller's flood cannot keep the hook silent for others;
//! the first denial of a new (caller, workload) pair always runs the
//! hook, within [`MAX_RUNS_PER_MINUTE`] runs a minute in all (which
//! protects the machine). Denials beyond that are counted and reported to
//! the next run as `suppressed`, with the callers they stand for
//! (`suppressed_callers`, at most [`NAMED`]; the rest in
//! `suppressed_others`). Denials the audit log sums up reach the hook as
//! their `deny_summary` line, and count as its `count` denials when
//! suppressed. Every run is audited (`alert` lines) and counted in the
//! metrics.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::audit::{AuditLog, Event, EventKind};
use crate::config::AlertConfig;
use crate::limits::Bucket;
use crate::metrics::{METRICS, ResultLabels};

/// Denials waiting for the hook; more than this are suppressed.
const QUEUE: usize = 64;
/// Hook runs a minute in all, whatever the callers (at least
/// `max_per_minute`).
pub const MAX_RUNS_PER_MINUTE: u32 = 60;
/// Callers, and (caller, workload) pairs, remembered; beyond them the
/// ones not seen for a minute (pairs: an hour) are forgotten.
const REMEMBERED: usize = 4096;
/// Callers named in a run's account of suppressed denials.
pub const NAMED: usize = 16;
/// The workload of a denial that names none (a gRPC method).
const NO_WORKLOAD: &str = "-";

pub struct Alerts {
    tx: mpsc::Sender<String>,
    budget: Arc<Mutex<Budget>>,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts").finish_non_exhaustive()
    }
}

/// Which denials run the hook (see the module doc), and what was
/// suppressed since the last run.
#[derive(Debug)]
struct Budget {
    per_caller: u32,
    callers: HashMap<String, (Bucket, Instant)>,
    pairs: HashMap<(String, String), Instant>,
    all: Bucket,
    suppressed: Suppressed,
}

/// Denials the hook did not see since its last run.
#[derive(Debug, Default, PartialEq)]
struct Suppressed {
    total: u64,
    /// Per caller, for the first [`NAMED`] callers.
    named: BTreeMap<String, u64>,
    /// Denials of callers beyond the ones named.
    others: u64,
}

impl Budget {
    fn new(per_caller: u32, now: Instant) -> Budget {
        Budget {
            per_caller,
            callers: HashMap::new(),
            pairs: HashMap::new(),
            all: Bucket::new(MAX_RUNS_PER_MINUTE.max(per_caller), Duration::from_secs(60), now),
            suppressed: Suppressed::default(),
        }
    }

    /// Whether a denial (a summary's: of `count`) by `caller` of
    /// `workloads` runs the hook; if not, it is counted as suppressed.
    fn admit(&mut self, now: Instant, caller: &str, workloads: &[&str], count: u64) -> bool {
        let new_pair = workloads.iter().any(|w| !self.pairs.contains_key(&(caller.to_owned(), (*w).to_owned())));
        if self.callers.len() >= REMEMBERED && !self.callers.contains_key(caller) {
            self.callers.retain(|_, (_, seen)| now.duration_since(*seen) < Duration::from_secs(60));
        }
        let per_caller = self.per_caller;
        let bucket = if self.callers.len() < REMEMBERED || self.callers.contains_key(caller) {
            let e = self
                .callers
                .entry(caller.to_owned())
                .or_insert_with(|| (Bucket::new(per_caller, Duration::from_secs(60), now), now));
            e.1 = now;
            e.0.take(now)
        } else {
            // Too many callers at once: only new pairs get through.
            false
        };
        let run = (new_pair || bucket) && self.all.take(now);
        if run && new_pair {
            if self.pairs.len() + workloads.len() > REMEMBERED {
                self.pairs.retain(|_, seen| now.duration_since(*seen) < Duration::from_secs(3600));
                if self.pairs.len() + workloads.len() > REMEMBERED {
                    self.pairs.clear();
                }
            }
            for w in workloads {
                self.pairs.insert((caller.to_owned(), (*w).to_owned()), now);
            }
        }
        if !run {
            self.suppress(caller, count);
        }
        run
    }

    fn suppress(&mut self, caller: &str, count: u64) {
        let s = &mut self.suppressed;
        s.total += count;
        if let Some(n) = s.named.get_mut(caller) {
            *n += count;
        } else if s.named.len() < NAMED {
            s.named.insert(caller.to_owned(), count);
        } else {
            s.others += count;
        }
        METRICS.alerts_suppressed.inc_by(count);
    }
}

impl Suppressed {
    /// The hook's input for a denial's audit line.
    fn input(&self, line: &str) -> String {
        let callers: Vec<_> =
            self.named.iter().map(|(caller, count)| serde_json::json!({"caller": caller, "count": count})).collect();
        let callers = serde_json::Value::Array(callers);
        // The audit line is JSON already; wrap it, do not re-encode it.
        format!(
            "{{\"alert\":\"deny\",\"suppressed\":{},\"suppressed_callers\":{callers},\"suppressed_others\":{},\"denial\":{line}}}\n",
            self.total, self.others
        )
    }
}

impl Alerts {
    /// Start the task that runs the hook on `rt`.
    pub fn start(cfg: AlertConfig, audit: Weak<AuditLog>, rt: &tokio::runtime::Handle) -> Alerts {
        let (tx, rx) = mpsc::channel(QUEUE);
        let budget = Arc::new(Mutex::new(Budget::new(cfg.max_per_minute, Instant::now())));
        rt.spawn(run_hooks(cfg, rx, budget.clone(), audit));
        Alerts { tx, budget }
    }

    /// A denial's audit line (a summary's, standing for `count`), by
    /// `caller` (its [`crate::limits::caller_key`]) of files in
    /// `workloads` (none: a gRPC method). Never blocks.
    pub fn deny(&self, line: &str, count: u64, caller: &str, workloads: &[&str]) {
        let workloads = if workloads.is_empty() { &[NO_WORKLOAD][..] } else { workloads };
        let mut budget = self.budget.lock().expect("alerts lock");
        if budget.admit(Instant::now(), caller, workloads, count) && self.tx.try_send(line.to_owned()).is_err() {
            budget.suppress(caller, count);
        }
    }
}

async fn run_hooks(
    cfg: AlertConfig,
    mut rx: mpsc::Receiver<String>,
    budget: Arc<Mutex<Budget>>,
    audit: Weak<AuditLog>,
) {
    while let Some(line) = rx.recv().await {
        let skipped = std::mem::take(&mut budget.lock().expect("alerts lock").suppressed);
        let input = skipped.input(&line);
        let (result, outcome) = run_once(&cfg, input.as_bytes()).await;
        METRICS.alert_runs.get_or_create(&ResultLabels { result: result.into() }).inc();
        if result != "ok" {
            tracing::warn!(hook = %cfg.argv[0], outcome = %outcome, "the on_deny alert hook failed");
        }
        let Some(audit) = audit.upgrade() else { return };
        let seq = crate::audit::seq_of(&line).unwrap_or(0);
        let reason = format!("on_deny hook for audit line {seq}: {outcome}");
        let _ = audit.record(&Event { reason: Some(&reason), ..Event::new(EventKind::Alert) });
    }
}

/// Run the hook once; returns a metric label and what happened.
async fn run_once(cfg: &AlertConfig, input: &[u8]) -> (&'static str, String) {
    let mut cmd = tokio::process::Command::new(&cfg.argv[0]);
    cmd.args(&cfg.argv[1..])
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return ("error", format!("cannot run {}: {e}", cfg.argv[0])),
    };
    let pgid = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32));
    let work = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A hook that does not read its input is its own business.
            let _ = stdin.write_all(input).await;
        }
        child.wait().await
    };
    let outcome = tokio::time::timeout(cfg.timeout, work).await;
    match outcome {
        Ok(Ok(status)) if status.success() => ("ok", "exited 0".into()),
        Ok(Ok(status)) => ("failed", format!("{status}")),
        Ok(Err(e)) => ("error", format!("cannot wait for it: {e}")),
        Err(_) => {
            // The hook and anything it started: it runs in its own group.
            if let Some(pgid) = pgid {
                let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            }
            let _ = child.kill().await;
            ("timeout", format!("killed after {}", humantime::format_duration(cfg.timeout)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_has_its_own_budget_and_a_new_pair_always_runs() {
        let t0 = Instant::now();
        let mut b = Budget::new(6, t0);
        // A stranger uses up its six runs, then is suppressed.
        let runs = (0..10).filter(|_| b.admit(t0, "uid:65534", &["-"], 1)).count();
        assert_eq!(runs, 6);
        assert_eq!(b.suppressed.named.get("uid:65534"), Some(&4));
        // Another caller still gets its run; so does the stranger's first
        // denial of another workload.
        assert!(b.admit(t0, "container:abc", &["db"], 1));
        assert!(b.admit(t0, "uid:65534", &["db"], 1));
        assert!(!b.admit(t0, "uid:65534", &["db"], 1), "the pair is not new any more");
        let input = std::mem::take(&mut b.suppressed).input("{\"seq\":1}");
        let v: serde_json::Value = serde_json::from_str(&input).unwrap();
        assert_eq!(v["suppressed"], 5);
        assert_eq!(v["suppressed_callers"][0]["caller"], "uid:65534");
        assert_eq!(v["denial"]["seq"], 1);
    }

    #[test]
    fn the_hard_cap_holds_and_named_callers_are_bounded() {
        let t0 = Instant::now();
        let mut b = Budget::new(6, t0);
        let runs = (0..200).filter(|i| b.admit(t0, &format!("uid:{i}"), &["w"], 1)).count();
        assert_eq!(runs, MAX_RUNS_PER_MINUTE as usize);
        assert_eq!(b.suppressed.named.len(), NAMED);
        assert_eq!(b.suppressed.total, 140);
        assert_eq!(b.suppressed.others, 140 - NAMED as u64);
        // A minute later, there is room again.
        assert!(b.admit(t0 + Duration::from_secs(60), "uid:7", &["w"], 1));
    }
}
