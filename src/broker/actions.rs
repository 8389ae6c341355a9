//! Actions on change at the broker level: after a file with `grant
//! --restart` or `--exec` changes, one job per (mount, file) is queued;
//! one task runs the jobs in order, off the FUSE workers and off the
//! write path (the rotate that caused a job has returned by then: the
//! new file is in the mounts before it returns, the actions follow).
//!
//! A job acts only on the containers recorded as readers of that file
//! ([`crate::actions::Readers`]): containers attested by their runtime
//! whose open of it was granted; never a host process. `--restart`
//! restarts them one at a time, waiting for each to run again, and
//! pauses `--restart-spacing` between two; `--exec` runs the command in
//! each. Every container's outcome is one audit line (`restart`, `exec`);
//! a container that is gone is skipped (audited) and forgotten.
//!
//! The queue holds [`MAX_QUEUED`] jobs: past it a job is dropped and
//! audited. The queue lives in memory: a stop or a handover drops the
//! jobs not yet done (the readers are kept; the next change acts again). The readers are written to the store (sealed) by a second
//! task, [`flush_readers`], soon after they change, so a broker that
//! starts again (after a restart or a `kill -9`) acts on them too; a
//! successor taking over also gets them from its predecessor's mounts.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::Broker;
use crate::actions::{OnChange, Readers};
use crate::audit::{Event, EventKind};
use crate::backend::local::READERS;
use crate::identity::docker::ActionFailure;

/// The most jobs waiting to run.
pub const MAX_QUEUED: usize = 256;
/// How long changed readers wait before they are written, so a burst of
/// first opens is one write per file.
const FLUSH_DELAY: Duration = Duration::from_millis(100);

/// One file changed: act on its readers.
#[derive(Debug)]
pub struct Job {
    pub workload: String,
    pub secret: String,
    pub version: u64,
    pub containers: Vec<String>,
    pub on_change: OnChange,
}

/// The queue of jobs: the sending end, and the receiving end until the
/// runner takes it.
#[derive(Debug)]
pub struct ActionQueue {
    tx: mpsc::Sender<Job>,
    rx: Mutex<Option<mpsc::Receiver<Job>>>,
}

impl Default for ActionQueue {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        ActionQueue { tx, rx: Mutex::new(Some(rx)) }
    }
}

/// The readers as the store holds them.
pub fn load_readers(store: &crate::backend::local::LocalStore) -> anyhow::Result<Readers> {
    Ok(Readers::from_records(store.records::<Vec<String>>(READERS)?))
}

impl Broker {
    /// After a change: the containers to signal (`--notify`), and the
    /// actions (`--restart`, `--exec`) queued for the runner.
    pub(super) fn readers_and_actions(&self, n: &crate::fs::Notice) -> Vec<String> {
        // Every mount records its readers here (and a successor takes its
        // predecessor's: `WorkloadFs::restore`).
        let containers = self.readers.of(&n.fs.workload.name, &n.secret);
        if n.on_change.is_empty() || containers.is_empty() {
            return containers;
        }
        let job = Job {
            workload: n.fs.workload.name.clone(),
            secret: n.secret.clone(),
            version: n.version,
            containers: containers.clone(),
            on_change: n.on_change.clone(),
        };
        if let Err(e) = self.actions.tx.try_send(job) {
            let job = match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            };
            let why = format!("dropped: the action queue is full ({MAX_QUEUED} jobs)");
            for c in &job.containers {
                if job.on_change.restart() {
                    self.audit_action(EventKind::Restart, &job, c, &why);
                }
                if job.on_change.exec.is_some() {
                    self.audit_action(EventKind::Exec, &job, c, &why);
                }
            }
        }
        containers
    }

    fn audit_action(&self, kind: EventKind, job: &Job, container: &str, outcome: &str) {
        let reason = format!("container {container}: {outcome}");
        let event = Event {
            workload: Some(&job.workload),
            path: Some(&job.secret),
            version: Some(job.version),
            reason: Some(&reason),
            ..Event::new(kind)
        };
        if let Err(e) = self.audit.record(&event) {
            tracing::error!(error = %e, "cannot audit an action");
        }
    }

    /// Run one job: exec first (a reload), then restarts, one at a time.
    async fn run_job(&self, job: Job) {
        let Some(docker) = self.docker.clone() else { return };
        let mut gone = Vec::new();
        if let Some(argv) = &job.on_change.exec {
            for c in &job.containers {
                let outcome = match docker.exec(c, argv).await {
                    Ok(code) => format!("exit {code}"),
                    Err(ActionFailure::Gone) => {
                        gone.push(c.clone());
                        format!("skipped: {}", ActionFailure::Gone)
                    }
                    Err(e) => format!("failed: {e}"),
                };
                self.audit_action(EventKind::Exec, &job, c, &outcome);
            }
        }
        if job.on_change.restart() {
            let mut first = true;
            for c in &job.containers {
                if gone.contains(c) {
                    self.audit_action(EventKind::Restart, &job, c, &format!("skipped: {}", ActionFailure::Gone));
                    continue;
                }
                if !first {
                    tokio::time::sleep(job.on_change.spacing()).await;
                }
                let outcome = match docker.restart(c).await {
                    Ok(took) => {
                        first = false;
                        format!("restarted, running again after {}ms", took.as_millis())
                    }
                    Err(ActionFailure::Gone) => {
                        gone.push(c.clone());
                        format!("skipped: {}", ActionFailure::Gone)
                    }
                    Err(e) => {
                        first = false;
                        format!("failed: {e}")
                    }
                };
                self.audit_action(EventKind::Restart, &job, c, &outcome);
            }
        }
        for c in gone {
            self.readers.forget(&job.workload, &job.secret, &c);
        }
    }
}

/// Run the queued jobs, one at a time, until the broker stops.
pub async fn run_actions(broker: Arc<Broker>) {
    let Some(mut rx) = broker.actions.rx.lock().expect("action queue").take() else { return };
    let mut stopping = broker.stopping();
    loop {
        let job = tokio::select! {
            _ = stopping.wait_for(|s| *s) => return,
            job = rx.recv() => job,
        };
        let Some(job) = job else { return };
        // A stop (or a handover) does not wait for a job under way: its
        // remaining containers are not acted on.
        tokio::select! {
            _ = stopping.wait_for(|s| *s) => return,
            _ = broker.run_job(job) => {}
        }
    }
}

/// Write changed readers to the store soon after they change, and once
/// more when the broker stops.
pub async fn flush_readers(broker: Arc<Broker>) {
    let mut stopping = broker.stopping();
    loop {
        let stop = tokio::select! {
            _ = stopping.wait_for(|s| *s) => true,
            _ = broker.readers.wake.notified() => false,
        };
        if !stop {
            tokio::time::sleep(FLUSH_DELAY).await;
        }
        let b = broker.clone();
        let _ = tokio::task::spawn_blocking(move || b.write_readers()).await;
        if stop {
            return;
        }
    }
}

impl Broker {
    /// Write what changed in the readers; a failed write is tried again
    /// with the next change.
    fn write_readers(&self) {
        for (key, containers) in self.readers.take_dirty() {
            let written = if containers.is_empty() {
                self.store.remove_record(READERS, &key).map(|_| ())
            } else {
                self.store.put_record(READERS, &key, &containers)
            };
            if let Err(e) = written {
                tracing::warn!(error = %e, "cannot record the readers of a file");
                self.readers.redirty(&key);
            }
        }
    }
}
