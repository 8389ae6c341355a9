//! Secret operations routed to their backend, the catalog the mounts are
//! built from, and the watcher that keeps each Vault backend's cache
//! fresh.
//!
//! A path under a `[[backend]]`'s name goes to that backend; every other
//! path lives in the local store. Mounts never touch the network: they
//! read local values, or the Vault cache that [`watch_backend`] refreshes.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Broker;
use super::BrokerError;
use crate::audit::Event;
use crate::backend::local::VOLUME_MOUNTS;
use crate::backend::vault::{Cached, VaultBackend};
use crate::backend::{BackendError, VersionMeta};
use crate::fs::{Catalog, Loaded, VolumeMount};
use crate::policy::{Grant, Target, Workload};
use crate::secret::{SecretBytes, SecretPath};

impl Broker {
    fn vault_for<'a>(&self, path: &'a str) -> Option<(&Arc<VaultBackend>, &'a str)> {
        self.vaults.iter().find_map(|v| v.relative(path).map(|rel| (v, rel)))
    }

    fn vault_named(&self, path: &str) -> Option<&Arc<VaultBackend>> {
        self.vaults.iter().find(|v| v.cfg.name == path)
    }

    /// Reject the bare name of a backend: it is a directory, not a secret.
    fn check_not_backend_root(&self, path: &str) -> Result<(), BrokerError> {
        match self.vault_named(path) {
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

    pub(super) fn put_secret(
        &self,
        path: &SecretPath,
        value: &SecretBytes,
        rotate: bool,
        if_version: Option<u64>,
        now_ms: i64,
    ) -> Result<VersionMeta, BrokerError> {
        self.check_not_backend_root(path.as_str())?;
        match self.vault_for(path.as_str()) {
            Some((v, rel)) => {
                let meta = self.rt.block_on(v.put(rel, value, rotate, if_version))?;
                self.persist(path.as_str(), v.cached(path.as_str()).as_ref());
                Ok(meta)
            }
            None => Ok(self.store.put(path, value, rotate, if_version, now_ms)?),
        }
    }

    pub fn get_secret(
        &self,
        path: &SecretPath,
        version: Option<u64>,
    ) -> Result<(VersionMeta, SecretBytes), BrokerError> {
        self.check_not_backend_root(path.as_str())?;
        match self.vault_for(path.as_str()) {
            Some((v, rel)) => Ok(self.rt.block_on(v.get(rel, version))?),
            None => Ok(self.store.get(path, version)?),
        }
    }

    pub fn secret_history(&self, path: &SecretPath) -> Result<Vec<VersionMeta>, BrokerError> {
        self.check_not_backend_root(path.as_str())?;
        match self.vault_for(path.as_str()) {
            Some((v, rel)) => Ok(self.rt.block_on(v.history(rel))?),
            None => Ok(self.store.history(path)?),
        }
    }

    pub(super) fn delete_secret(&self, path: &SecretPath) -> Result<usize, BrokerError> {
        self.check_not_backend_root(path.as_str())?;
        match self.vault_for(path.as_str()) {
            Some((v, rel)) => {
                let n = self.rt.block_on(v.delete(rel))?;
                self.persist(path.as_str(), None);
                Ok(n)
            }
            None => Ok(self.store.delete(path)?),
        }
    }

    /// Secrets at or under `prefix` with their current version, local and
    /// remote. Listing a backend asks it (one request per secret).
    pub fn list_secrets(&self, prefix: &str) -> Result<Vec<(String, VersionMeta)>, BrokerError> {
        let prefix = prefix.trim_end_matches('/');
        let mut out: Vec<(String, VersionMeta)> =
            self.store.list(prefix)?.into_iter().filter(|(p, _)| self.vault_for(p).is_none()).collect();
        for v in &self.vaults {
            let name = v.cfg.name.as_str();
            let rel = match v.relative(prefix) {
                Some(rel) => rel,
                None if prefix.is_empty() || prefix == name => "",
                None => continue,
            };
            for r in self.rt.block_on(v.list(rel))? {
                match self.rt.block_on(v.history(&r)) {
                    Ok(h) => out.extend(h.last().map(|m| (format!("{name}/{r}"), m.clone()))),
                    Err(BackendError::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Fetch what a new grant shows now, if its backend answers, so the
    /// file is readable when `grant` returns. Returns the paths whose
    /// cached value changed (other mounts may show them).
    pub(super) fn prefetch(&self, target: &Target) -> Vec<String> {
        let (Target::Exact(p) | Target::Prefix(p)) = target;
        let Some((v, rel)) = self.vault_for(p.as_str()) else { return Vec::new() };
        let set = BTreeSet::from([rel.to_owned()]);
        let (exact, prefixes) = match target {
            Target::Exact(_) => (set, BTreeSet::new()),
            Target::Prefix(_) => (BTreeSet::new(), set),
        };
        match self.rt.block_on(v.refresh(&exact, &prefixes)) {
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
        let Some((v, _)) = self.vault_for(p.as_str()) else {
            return Ok(self
                .store
                .list(p.as_str())?
                .into_iter()
                .filter(|(s, _)| target.file_for(s).is_some())
                .collect());
        };
        let mut found: Vec<(String, VersionMeta)> = v
            .cached_under(p.as_str())
            .into_iter()
            .filter(|(s, _)| target.file_for(s).is_some())
            .map(|(s, c)| (s, c.meta))
            .collect();
        // A granted secret not fetched yet still shows, as version 0,
        // so opening it fails at once (EIO) instead of looking absent.
        if matches!(target, Target::Exact(_)) && found.is_empty() {
            found.push((p.to_string(), VersionMeta { version: 0, created_unix_ms: 0, size: 0 }));
        }
        Ok(found)
    }

    fn current(&self, path: &str) -> anyhow::Result<Option<VersionMeta>> {
        if crate::policy::leased(path).is_some() {
            let g = self.leases.generation(path);
            return Ok(g.map(|version| VersionMeta { version, created_unix_ms: 0, size: 0 }));
        }
        if let Some((v, _)) = self.vault_for(path) {
            return Ok(v.cached(path).map(|c| c.meta));
        }
        match self.store.history(&SecretPath::parse(path)?) {
            Ok(h) => Ok(h.last().cloned()),
            Err(crate::backend::local::StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
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
            return Ok(Loaded { value: None, health: None });
        }
        match self.vault_for(path) {
            Some((v, _)) => Ok(Loaded {
                value: v.cached(path).filter(|c| c.meta.version == meta.version).map(|c| c.value),
                health: Some(v.health.clone()),
            }),
            None => {
                let (_, value) = self.store.get(&SecretPath::parse(path)?, Some(meta.version))?;
                Ok(Loaded { value: Some(Arc::new(value)), health: None })
            }
        }
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
pub async fn watch_backend(broker: Arc<Broker>, v: Arc<VaultBackend>) {
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
            let targets = tokio::task::spawn_blocking(move || b.store.grants(None)).await;
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
fn split_targets(v: &VaultBackend, grants: &[Grant]) -> (BTreeSet<String>, BTreeSet<String>) {
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
fn report_failure(broker: &Broker, v: &VaultBackend, e: &BackendError) {
    let reason = e.to_string();
    if v.health.failed(&reason) {
        tracing::warn!(backend = %v.cfg.name, error = %reason, "backend failing; serving cached values up to max_stale");
        let _ = broker.audit.record(&Event {
            path: Some(&v.cfg.name),
            reason: Some(&reason),
            ..Event::new("backend_error")
        });
    }
}
