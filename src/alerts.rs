//! The `[alerts] on_deny` hook: a command run (no shell) for each denial,
//! with the denial's audit line as JSON on stdin, so a container probing
//! for secrets that are not its own wakes someone up.
//!
//! A denial is handed over with `try_send` and never waits: a hook that
//! hangs or fails cannot slow an open. Runs are one at a time, at most
//! `max_per_minute`, each killed after `timeout`; denials beyond that are
//! counted and reported to the next run as `suppressed`. Denials the
//! audit log sums up reach the hook as their `deny_summary` line, and
//! count as its `count` denials when suppressed. Every run is
//! audited (`alert` lines) and counted in the metrics.
#![forbid(unsafe_code)]

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::audit::{AuditLog, Event};
use crate::config::AlertConfig;
use crate::limits::Bucket;
use crate::metrics::{METRICS, ResultLabels};

/// Denials waiting for the hook; more than this are suppressed.
const QUEUE: usize = 64;

pub struct Alerts {
    tx: mpsc::Sender<(String, u64)>,
    suppressed: Arc<AtomicU64>,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts").finish_non_exhaustive()
    }
}

impl Alerts {
    /// Start the task that runs the hook on `rt`.
    pub fn start(cfg: AlertConfig, audit: Weak<AuditLog>, rt: &tokio::runtime::Handle) -> Alerts {
        let (tx, rx) = mpsc::channel(QUEUE);
        let suppressed = Arc::new(AtomicU64::new(0));
        rt.spawn(run_hooks(cfg, rx, suppressed.clone(), audit));
        Alerts { tx, suppressed }
    }

    /// A denial's audit line (a summary's, standing for `count`). Never
    /// blocks.
    pub fn deny(&self, line: &str, count: u64) {
        if self.tx.try_send((line.to_owned(), count)).is_err() {
            suppress(&self.suppressed, count);
        }
    }
}

/// A denial the hook will not see: counted for its next run.
fn suppress(suppressed: &AtomicU64, count: u64) {
    suppressed.fetch_add(count, Ordering::Relaxed);
    METRICS.alerts_suppressed.inc_by(count);
}

async fn run_hooks(
    cfg: AlertConfig,
    mut rx: mpsc::Receiver<(String, u64)>,
    suppressed: Arc<AtomicU64>,
    audit: Weak<AuditLog>,
) {
    let mut bucket = Bucket::new(cfg.max_per_minute, Duration::from_secs(60), Instant::now());
    while let Some((line, count)) = rx.recv().await {
        if !bucket.take(Instant::now()) {
            suppress(&suppressed, count);
            continue;
        }
        let skipped = suppressed.swap(0, Ordering::Relaxed);
        // The audit line is JSON already; wrap it, do not re-encode it.
        let input = format!("{{\"alert\":\"deny\",\"suppressed\":{skipped},\"denial\":{line}}}\n");
        let (result, outcome) = run_once(&cfg, input.as_bytes()).await;
        METRICS.alert_runs.get_or_create(&ResultLabels { result: result.into() }).inc();
        if result != "ok" {
            tracing::warn!(hook = %cfg.argv[0], outcome = %outcome, "the on_deny alert hook failed");
        }
        let Some(audit) = audit.upgrade() else { return };
        let seq = crate::audit::seq_of(&line).unwrap_or(0);
        let reason = format!("on_deny hook for audit line {seq}: {outcome}");
        let _ = audit.record(&Event { reason: Some(&reason), ..Event::new("alert") });
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
