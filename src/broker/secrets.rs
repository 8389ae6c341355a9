//! Secret operations routed to their backend, the catalog the mounts are
//! built from, and the watcher that keeps each Vault backend's cache
//! fresh.
//!
//! A path under a `[[backend]]`'s name goes to that backend; every other
//! path lives in the local store: [`Broker::source_for`] picks the one
//! [`SecretSource`] that owns a path, and every call goes through it. Mounts never touch the network: they
//! read local values, or the Vault cache that [`watch_backend`] refreshes.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Broker;
use super::BrokerError;
use crate::audit::{Event, EventKind};
use crate::backend::local::VOLUME_MOUNTS;
use crate::backend::vault::{Cached, VaultBackend};
use crate::backend::{BackendError, SecretSource, VersionMeta};
use crate::fs::{Catalog, Loaded, VolumeMount};
use crate::policy::{Grant, Target, Workload};
use crate::secret::{SecretBytes, SecretPath};

impl Broker {
    /// The one source that owns `path`: the backend named by its first
    /// segment(s), or else the local store.
    fn source_for(&self, path: &str) -> &dyn SecretSource {
        match self.vaults.iter().find(|v| v.owns(path)) {
            Some(v) => v,
            None => &self.store,
        }
    }

    pub(super) fn vault_for<'a>(&self, path: &'a str) -> Option<(&Arc<VaultBackend>, &'a str)> {
        self.vaults.iter().find_map(|v| v.backend.relative(path).map(|rel| (&v.backend, rel)))
    }

    pub(super) fn vault_named(&self, path: &str) -> Option<&Arc<VaultBackend>> {
        self.backend_named(path)
    }

    /// Reject the bare name of a backend: it is a directory, not a secret.
    fn check_not_backend_root(&self, path: &str) -> Result<(), BrokerError> {
        match self.vaults.iter().find(|v| v.name() == path) {
            Some(_) => Err(BrokerError::InvalidArgument(format!("{path} is a backend; name a secret under {path}/"))),
            None => Ok(()),
        }
    }

    /// Keep a fetched value sealed in the local store (for restarts
    /// during an outage); a failure only costs that resilience.
    pub(super) fn persist(&self, path: &str, cached: Option<&Cached>) {
        let r = match cached {
            Some(c) => self.store.cache_put(path, &c.meta, &c.value),
            None => self.store.cache_remove(path),
        };
        if let Err(e) = r {
            tracing::warn!(secret = path, error = %e, "cannot keep the cached copy");
        }
    }

    /// After a write to `source`: keep its copy of `path`, if it is remote.
    fn keep_copy(&self, source: &dyn SecretSource, path: &str) {
        if let Some(copy) = source.copy_of(path) {
            self.persist(path, copy.as_ref());
        }
    }

    pub(super) fn put_secret(
        &self,
        path: &SecretPath,
        value: &SecretBytes,
        rotate: bool,
        if_version: Option<u64>,
        now_ms: i64,
    ) -> Result<VersionMeta, BrokerError> {
        self.check_not_backend_root(path.as_str())?;
        let source = self.source_for(path.as_str());
        let meta = source.put(path, value, rotate, if_version, now_ms)?;
        self.keep_copy(source, path.as_str());
        Ok(meta)
    }

    pub fn get_secret(
        &self,
        path: &SecretPath,
        version: Option<u64>,
    ) -> Result<(VersionMeta, SecretBytes), BrokerError> {
        self.check_not_backend_root(path.as_str())?;
        Ok(self.source_for(path.as_str()).get(path, version)?)
    }

    pub fn secret_history(&self, path: &SecretPath) -> Result<Vec<VersionMeta>, BrokerError> {
        self.check_not_backend_root(path.as_str())?;
        Ok(self.source_for(path.as_str()).history(path)?)
    }

    pub(super) fn delete_secret(&self, path: &SecretPath) -> Result<usize, BrokerError> {
        self.check_not_backend_root(path.as_str())?;
        let source = self.source_for(path.as_str());
        let n = source.delete(path)?;
        self.keep_copy(source, path.as_str());
        Ok(n)
    }

    /// Secrets at or under `prefix` with their current version, local and
    /// remote. Listing a backend asks it (one request per secret).
    pub fn list_secrets(&self, prefix: &str) -> Result<Vec<(String, VersionMeta)>, BrokerError> {
        let prefix = prefix.trim_end_matches('/');
        let local: &dyn SecretSource = &self.store;
        let mut out: Vec<(String, VersionMeta)> =
            local.list(prefix)?.into_iter().filter(|(p, _)| !self.vaults.iter().any(|v| v.owns(p))).collect();
        for v in &self.vaults {
            out.extend(v.list(prefix)?);
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Fetch what a new grant shows now, if its backend answers, so the
    /// file is readable when `grant` returns. Returns the paths whose
    /// cached value changed (other mounts may show them).
    pub(super) fn prefetch(&self, target: &Target) -> Vec<String> {
        let (Target::Exact(p) | Target::Prefix(p)) = target;
        match self.source_for(p.as_str()).prefetch(target) {
            Ok(changed) => {
                for (path, c) in &changed {
                    self.persist(path, c.as_ref());
                }
                changed.into_iter().map(|(path, _)| path).collect()
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot prefetch a new grant; the watcher will retry");
                Vec::new()
            }
        }
    }
}

impl Catalog for Broker {
    fn workloads(&self) -> anyhow::Result<Vec<Workload>> {
        Ok(self.store.workloads()?)
    }

    fn grants(&self, workload: &str) -> anyhow::Result<Vec<Grant>> {
        Ok(self.store.grants(Some(workload))?)
    }

    fn covered(&self, target: &Target) -> anyhow::Result<Vec<(String, VersionMeta)>> {
        let (Target::Exact(p) | Target::Prefix(p)) = target;
        if crate::policy::leased(p.as_str()).is_some() {
            // A lease source: one file, whose content is each caller's own.
            let g = self.leases.generation(p.as_str());
            return Ok(g
                .map(|version| (p.to_string(), VersionMeta { version, created_unix_ms: 0, size: 0 }))
                .into_iter()
                .collect());
        }
        if super::templates::template_of(target).is_some() {
            let (Target::Exact(p) | Target::Prefix(p)) = target;
            return Ok(self.template_meta(p.as_str())?.map(|m| (p.to_string(), m)).into_iter().collect());
        }
        let (Target::Exact(p) | Target::Prefix(p)) = target;
        Ok(self.source_for(p.as_str()).covered(target)?)
    }

    fn current(&self, path: &str) -> anyhow::Result<Option<VersionMeta>> {
        if crate::policy::leased(path).is_some() {
            let g = self.leases.generation(path);
            return Ok(g.map(|version| VersionMeta { version, created_unix_ms: 0, size: 0 }));
        }
        if path.starts_with(crate::secret::TEMPLATE_PREFIX) {
            return self.template_meta(path);
        }
        Ok(self.source_for(path).current(path)?)
    }

    fn workload(&self, name: &str) -> anyhow::Result<Option<Workload>> {
        Ok(self.store.workload(name)?)
    }

    fn volume_mounts(&self) -> anyhow::Result<Vec<VolumeMount>> {
        Ok(self.store.records(VOLUME_MOUNTS)?.into_iter().map(|(_, m)| m).collect())
    }

    fn load(&self, path: &str, meta: &VersionMeta) -> anyhow::Result<Loaded> {
        if crate::policy::leased(path).is_some() {
            // Read per caller at open (crate::lease), never shared.
            return Ok(Loaded { value: None, health: None, template: None });
        }
        if path.starts_with(crate::secret::TEMPLATE_PREFIX) {
            return self.template_load(path, meta);
        }
        let shown = self.source_for(path).load(path, meta)?;
        Ok(Loaded { value: shown.value, health: shown.health, template: None })
    }
}

/// A random duration in [0.9, 1.1) × `d`, so brokers on many hosts do not
/// poll in step.
fn jittered(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = getrandom::fill(&mut b).map_or(0.5, |()| f64::from(u16::from_le_bytes(b)) / 65536.0);
    d.mul_f64(0.9 + 0.2 * r)
}

/// Persist the backend's last success at most this often.
const NOTE_EVERY: Duration = Duration::from_secs(60);

/// Keep one Vault backend's cache fresh: log in, renew, poll the watched
/// secrets' versions, and update the mounts when anything changed. Runs
/// until the broker stops.
pub(super) async fn watch_backend(broker: Arc<Broker>, v: Arc<VaultBackend>) {
    let name = v.cfg.name.clone();
    let note_key = format!("backend-ok:{name}");
    let mut logged_in = false;
    let mut noted: Option<SystemTime> = None;
    let mut stopping = broker.stopping.subscribe();
    loop {
        if !logged_in {
            logged_in = match v.login().await {
                Ok(()) => true,
                Err(e) => {
                    report_failure(&broker, &v, &e);
                    false
                }
            };
        }
        if logged_in {
            let b = broker.clone();
            let targets =
                tokio::task::spawn_blocking(move || b.store.grants(None).map(|g| b.with_template_inputs(g))).await;
            let (exact, prefixes) = match targets {
                Ok(Ok(grants)) => split_targets(&v, &grants),
                _ => (BTreeSet::new(), BTreeSet::new()),
            };
            match v.refresh(&exact, &prefixes).await {
                Ok(changed) => {
                    if v.health.succeeded() {
                        tracing::info!(backend = %name, "backend answers");
                    }
                    let due = noted.is_none_or(|t| t.elapsed().map_or(true, |e| e >= NOTE_EVERY));
                    let b = broker.clone();
                    let key = note_key.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        if due {
                            let _ = b.store.put_note(&key, &SystemTime::now());
                        }
                        b.backend_changed(changed);
                    })
                    .await;
                    if due {
                        noted = Some(SystemTime::now());
                    }
                }
                Err(e) => {
                    report_failure(&broker, &v, &e);
                    // Log in again next time: the token may be the problem.
                    logged_in = false;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(jittered(v.cfg.poll_interval)) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

/// The relative paths of `v` that grants name exactly, and the prefixes.
pub(super) fn split_targets(v: &VaultBackend, grants: &[Grant]) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut exact, mut prefixes) = (BTreeSet::new(), BTreeSet::new());
    for g in grants {
        match &g.target {
            Target::Exact(p) => exact.extend(v.relative(p.as_str()).map(str::to_owned)),
            Target::Prefix(p) => prefixes.extend(v.relative(p.as_str()).map(str::to_owned)),
        }
    }
    (exact, prefixes)
}

/// Mark the backend failing; audit the transition once, not every poll.
pub(super) fn report_failure(broker: &Broker, v: &VaultBackend, e: &BackendError) {
    let reason = e.to_string();
    if v.health.failed(&reason) {
        tracing::warn!(backend = %v.cfg.name, error = %reason, "backend failing; serving cached values up to max_stale");
        let _ = broker.audit.record(&Event {
            path: Some(&v.cfg.name),
            reason: Some(&reason),
            ..Event::new(EventKind::BackendError)
        });
    }
}
