//! Write operations: one broker method per change (put, rotate, rm,
//! grant, revoke, workload add/rm, volume create/mount/unmount/remove, a
//! backend's news). Each one, in this order:
//!
//! 1. **stores** the change (the local store, or the Vault backend that
//!    owns the path) — durable before anything shows it;
//! 2. **updates the mounts** the change touches, and only those (by the
//!    mount table's index: a secret's readers, a workload's mounts);
//! 3. **announces** it: `grant --notify` signals to the containers that
//!    read a rotated secret, and the metrics;
//! 4. **audits** it: one line, success or failure, with the caller.
//!
//! Callers (the gRPC handlers in `api/admin.rs`, the Docker plugin, the
//! backend watcher) authorize, call one method here, and map its
//! [`BrokerError`]; they never touch the store or the mounts themselves,
//! so no caller can forget a step. The mount-updating helpers
//! ([`Broker::update_mounts`], `announce`) are private to this module.
//!
//! # Adding an operation
//!
//! Take the request as the caller sent it (strings, not parsed types), so
//! a refused request is audited with what was asked. Describe the audit
//! line with [`Audit`], and do the store step in the closure passed to
//! [`Broker::write`], returning a [`Done`] that says what the change
//! touched; `write` does steps 2–4:
//!
//! ```ignore
//! pub fn template_put(&self, by: &Identity, name: &str, body: &str) -> Result<(), BrokerError> {
//!     self.write(Audit::by(by, EventKind::TemplatePut).path(name), |b| {
//!         let t = Template::parse(name, body)?;    // refusals are audited too
//!         b.store.put_record(TEMPLATES, name, &t)?; // 1. store
//!         Ok(Done::new(()).workloads(t.users()))  // 2-4: what it touched
//!     })
//! }
//! ```
//!
//! A new family of operations (templates, roles) may live in a sibling
//! file of `src/broker/` with its own `impl Broker`: [`Done`], [`Audit`]
//! and `write` are visible to the whole `broker` module, and nothing
//! outside it can reach the store or the mounts.
//!
//! An operation whose steps do not fit `write` (the volume mount, which
//! checks that the mount came up and undoes the record if not) uses the
//! same private pieces in the same order.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use super::{Broker, BrokerError};
use crate::audit::{Event, EventKind};
use crate::backend::VersionMeta;
use crate::backend::local::{VOLUME_MOUNTS, VOLUMES};
use crate::backend::vault::Cached;
use crate::docker::plugin::VolumeSpec;
use crate::fs::{MountKey, VolumeMount};
use crate::identity::Identity;
use crate::policy::{Grant, Target, Workload};
use crate::secret::{SecretBytes, SecretPath, generate_alnum};

/// The value of a `put`/`rotate` as the caller sent it.
pub enum NewValue {
    /// These bytes.
    Bytes(SecretBytes),
    /// A random alphanumeric value of this many characters.
    Generate(u32),
    /// Neither: refused.
    Missing,
}

/// A grant as the caller sent it (empty `file`/`notify`, zero `mode`:
/// the defaults).
#[derive(Clone, Debug, Default)]
pub struct GrantRequest {
    pub secret: String,
    pub workload: String,
    pub file: String,
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub notify: String,
    /// `--restart`, `--restart-spacing` (empty: the default), `--exec`
    /// (empty: none): see [`crate::actions::OnChange::parse`].
    pub restart: bool,
    pub restart_spacing: String,
    pub exec: String,
}

impl GrantRequest {
    /// The grant, checked.
    pub fn parse(&self) -> Result<Grant, crate::policy::PolicyError> {
        let file = (!self.file.is_empty()).then(|| self.file.clone());
        let mode = (self.mode != 0).then_some(self.mode);
        let notify = (!self.notify.is_empty()).then_some(self.notify.as_str());
        let on_change = crate::actions::OnChange::parse(
            self.restart,
            Some(self.restart_spacing.as_str()),
            Some(self.exec.as_str()),
        )?;
        Grant::new(&self.secret, &self.workload, file, mode, self.uid, self.gid)
            .and_then(|grant| grant.with_notify(notify))
            .map(|grant| grant.with_on_change(on_change))
    }
}

/// Which mounts a change touched: exactly these are brought up to date.
#[derive(Debug, Default)]
pub(super) struct Touched {
    /// Secrets whose value or versions changed: the mounts that show them.
    secrets: Vec<String>,
    /// Workloads whose policy changed: their mounts (own and volumes).
    workloads: Vec<String>,
    /// Any mount may be touched: every mount is checked.
    everything: bool,
}

/// What the store step of an operation did: its result for the caller,
/// the version to audit, and what it touched.
pub(super) struct Done<T> {
    value: T,
    version: Option<u64>,
    touched: Touched,
}

impl<T> Done<T> {
    pub(super) fn new(value: T) -> Self {
        Done { value, version: None, touched: Touched::default() }
    }

    /// The version the audit line names.
    pub(super) fn version(mut self, version: u64) -> Self {
        self.version = Some(version);
        self
    }

    /// The change touched these secrets' values.
    pub(super) fn secrets(mut self, paths: impl IntoIterator<Item = String>) -> Self {
        self.touched.secrets.extend(paths);
        self
    }

    /// The change touched this workload's policy.
    pub(super) fn workload(mut self, name: impl Into<String>) -> Self {
        self.touched.workloads.push(name.into());
        self
    }

    /// The change may touch any mount.
    pub(super) fn everything(mut self) -> Self {
        self.touched.everything = true;
        self
    }
}

/// How an operation is audited.
pub(super) struct Audit<'a> {
    event: EventKind,
    caller: Option<&'a Identity>,
    workload: Option<&'a str>,
    path: Option<&'a str>,
    /// An admin's call: every outcome is audited, and a call whose line
    /// cannot be written fails. Otherwise (Docker's plugin calls): only
    /// successes, and an audit failure does not undo them.
    strict: bool,
}

impl<'a> Audit<'a> {
    /// An admin's call, audited as `event` whatever its outcome.
    pub(super) fn by(caller: &'a Identity, event: EventKind) -> Self {
        Audit { event, caller: Some(caller), workload: None, path: None, strict: true }
    }

    /// A call from dockerd (no attested caller): successes audited.
    pub(super) fn plugin(event: EventKind) -> Self {
        Audit { event, caller: None, workload: None, path: None, strict: false }
    }

    pub(super) fn path(mut self, path: &'a str) -> Self {
        self.path = Some(path);
        self
    }

    pub(super) fn workload(mut self, workload: &'a str) -> Self {
        self.workload = Some(workload);
        self
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Broker {
    /// Run one write: `change` stores it (step 1); then the mounts it
    /// touched are updated and the change announced (2, 3), and the
    /// outcome audited (4). A failed change touches nothing.
    pub(super) fn write<T>(
        &self,
        audit: Audit<'_>,
        change: impl FnOnce(&Self) -> Result<Done<T>, BrokerError>,
    ) -> Result<T, BrokerError> {
        let result = change(self);
        if let Ok(done) = &result {
            self.update_mounts(&done.touched);
        }
        let (version, reason) = match &result {
            Ok(done) => (done.version, None),
            Err(e) => (None, Some(e.to_string())),
        };
        self.audit_outcome(&audit, version, reason.as_deref())?;
        result.map(|done| done.value)
    }

    /// Step 4: the audit line of an operation.
    fn audit_outcome(&self, a: &Audit<'_>, version: Option<u64>, reason: Option<&str>) -> Result<(), BrokerError> {
        if !a.strict && reason.is_some() {
            return Ok(());
        }
        let event =
            Event { caller: a.caller, workload: a.workload, path: a.path, version, reason, ..Event::new(a.event) };
        match self.audit.record(&event) {
            Ok(_) => Ok(()),
            Err(e) if a.strict => Err(e.into()),
            Err(e) => {
                tracing::warn!(event = a.event.as_str(), error = %e, "cannot audit");
                Ok(())
            }
        }
    }

    /// Steps 2 and 3: bring the mounts a change touched up to date, then
    /// announce the rotations they show. The change is already durable,
    /// so a failure here is logged.
    fn update_mounts(&self, t: &Touched) {
        if t.everything {
            let started = Instant::now();
            self.propagated(started, self.mounts.sync(self));
        }
        if !t.secrets.is_empty() {
            let started = Instant::now();
            // Templates that read one of them change too.
            let paths = self.with_templates(&t.secrets);
            self.propagated(started, self.mounts.secret_changed(self, &paths));
        }
        if t.everything {
            return;
        }
        let mut seen = BTreeSet::new();
        for w in t.workloads.iter().filter(|w| seen.insert(w.as_str())) {
            let started = Instant::now();
            self.propagated(started, self.mounts.workload_changed(self, w));
        }
    }

    /// A change that may touch any mount (a policy file applied): every
    /// mount brought up to date, then those showing `secrets` (values
    /// fetched for new grants).
    pub(super) fn everything_changed(&self, secrets: Vec<String>) {
        self.update_mounts(&Touched { secrets, workloads: Vec::new(), everything: true });
    }

    fn propagated(&self, started: Instant, outcome: anyhow::Result<Vec<crate::fs::Notice>>) {
        match outcome {
            Ok(notices) => {
                crate::metrics::METRICS.propagation_seconds.observe(started.elapsed().as_secs_f64());
                self.announce(notices)
            }
            Err(e) => tracing::error!(error = format!("{e:#}"), "mounts not updated"),
        }
    }

    /// Signal the containers that read a rotated secret (`grant --notify`),
    /// through the Docker API, without waiting for it; queue the actions
    /// on change (`--restart`, `--exec`, see `actions.rs`).
    fn announce(&self, notices: Vec<crate::fs::Notice>) {
        let Some(docker) = &self.docker else { return };
        // A file shown by several mounts of one workload is acted on once.
        let mut seen = std::collections::HashSet::new();
        for n in notices {
            if !seen.insert((n.fs.workload.name.clone(), n.secret.clone(), n.version)) {
                continue;
            }
            let readers = self.readers_and_actions(&n);
            let Some(signal) = n.signal.clone() else { continue };
            for container in readers {
                let (docker, audit, fs, recorded) =
                    (docker.clone(), self.audit.clone(), n.fs.clone(), self.readers.clone());
                let (secret, signal, version) = (n.secret.clone(), signal.clone(), n.version);
                self.rt.spawn(async move {
                    let outcome = docker.signal(&container, &signal).await;
                    let reason = match &outcome {
                        Ok(()) => format!("sent {signal} to container {container}"),
                        Err(e) => format!("could not send {signal} to container {container}: {e}"),
                    };
                    if outcome.is_err() {
                        fs.forget_reader(&secret, &container);
                        recorded.forget(&fs.workload.name, &secret, &container);
                    }
                    let event = Event {
                        workload: Some(&fs.workload.name),
                        path: Some(&secret),
                        version: Some(version),
                        reason: Some(&reason),
                        ..Event::new(EventKind::Notify)
                    };
                    let _ = audit.record(&event);
                });
            }
        }
    }

    // ------------------------------------------------------------ secrets

    /// `put` (or `rotate`) a secret's value; with `if_version`, only if
    /// that is its current version.
    pub fn put(
        &self,
        by: &Identity,
        path: &str,
        value: NewValue,
        rotate: bool,
        if_version: Option<u64>,
    ) -> Result<VersionMeta, BrokerError> {
        let event = if rotate { EventKind::Rotate } else { EventKind::Put };
        self.write(Audit::by(by, event).path(path), |b| {
            let path = SecretPath::parse(path)?;
            let value = b.checked_value(value)?;
            let meta = b.put_secret(&path, &value, rotate, if_version, now_ms())?;
            Ok(Done::new(meta.clone()).version(meta.version).secrets([path.to_string()]))
        })
    }

    /// A new value within `max_value_bytes`.
    fn checked_value(&self, value: NewValue) -> Result<SecretBytes, BrokerError> {
        let max = self.config.max_value_bytes;
        match value {
            NewValue::Bytes(value) => {
                let len = value.expose().len() as u64;
                if len == 0 {
                    Err(BrokerError::InvalidArgument("the value is empty".into()))
                } else if len > max {
                    Err(BrokerError::InvalidArgument(format!(
                        "the value is {len} bytes; the limit is {max} (max_value_bytes)"
                    )))
                } else {
                    Ok(value)
                }
            }
            NewValue::Generate(n) if n == 0 || u64::from(n) > max => Err(BrokerError::InvalidArgument(format!(
                "cannot generate {n} characters: the length must be 1 to {max}"
            ))),
            NewValue::Generate(n) => {
                generate_alnum(n as usize).map_err(|e| BrokerError::Internal(format!("no randomness: {e}")))
            }
            NewValue::Missing => {
                Err(BrokerError::InvalidArgument("no value: send a value or a length to generate".into()))
            }
        }
    }

    /// `rm`: delete a secret and all its versions; returns how many.
    pub fn remove(&self, by: &Identity, path: &str) -> Result<usize, BrokerError> {
        self.write(Audit::by(by, EventKind::Rm).path(path), |b| {
            let path = SecretPath::parse(path)?;
            let n = b.delete_secret(&path)?;
            Ok(Done::new(n).secrets([path.to_string()]))
        })
    }

    /// What a Vault backend's watcher found changed (`None`: gone): kept
    /// sealed in the store, then shown. Not audited: a backend's own
    /// changes have no caller here (its failures are, by the watcher).
    pub(super) fn backend_changed(&self, changed: Vec<(String, Option<Cached>)>) {
        for (path, c) in &changed {
            self.persist(path, c.as_ref());
        }
        if changed.is_empty() {
            return;
        }
        crate::metrics::METRICS.rotations.inc_by(changed.len() as u64);
        let touched = Touched { secrets: changed.into_iter().map(|(path, _)| path).collect(), ..Touched::default() };
        self.update_mounts(&touched);
    }

    // ------------------------------------------------------------ policy

    /// `workload add`.
    pub fn add_workload(&self, by: &Identity, name: &str, selectors: &[String]) -> Result<Workload, BrokerError> {
        self.write(Audit::by(by, EventKind::WorkloadAdd), |b| {
            let w = Workload::new(name, selectors)?;
            let _serial = b.policy_serial();
            b.store.add_workload(&w)?;
            let name = w.name.clone();
            Ok(Done::new(w).workload(name))
        })
    }

    /// `workload rm`, with its grants; returns how many grants went.
    pub fn remove_workload(&self, by: &Identity, name: &str) -> Result<usize, BrokerError> {
        let n = self.write(Audit::by(by, EventKind::WorkloadRm), |b| {
            let _serial = b.policy_serial();
            let n = b.store.remove_workload(name)?;
            Ok(Done::new(n).workload(name))
        })?;
        self.leases_policy_changed();
        Ok(n)
    }

    /// `grant`: what a new grant shows is fetched now, if its backend
    /// answers, so the file is readable when the call returns.
    pub fn grant(&self, by: &Identity, req: &GrantRequest) -> Result<Grant, BrokerError> {
        self.write(Audit::by(by, EventKind::Grant).workload(&req.workload).path(&req.secret), |b| {
            let grant = req.parse()?;
            b.check_template_grant(&grant)?;
            // The clash check and the write, with no other policy change between.
            let _serial = b.policy_serial();
            let existing = b.store.grants(Some(&grant.workload))?;
            crate::policy::check_file_clash(&existing, &grant)?;
            b.store.put_grant(&grant)?;
            let fetched = b.prefetch(&grant.target);
            let workload = grant.workload.clone();
            Ok(Done::new(grant).secrets(fetched).workload(workload))
        })
    }

    /// `revoke` a workload's grant of `secret` (a path or a prefix).
    pub fn revoke(&self, by: &Identity, workload: &str, secret: &str) -> Result<(), BrokerError> {
        self.write(Audit::by(by, EventKind::Revoke).workload(workload).path(secret), |b| {
            // Normalize through the parser so `db/*` and friends match.
            let target = Target::parse(secret)?;
            let _serial = b.policy_serial();
            b.store.remove_grant(workload, &target.to_string())?;
            Ok(Done::new(()).workload(workload))
        })?;
        self.leases_policy_changed();
        Ok(())
    }

    /// Some lease sources' files changed (a lease rolled to a new one):
    /// their mounts show a new inode, and `--notify` applies.
    pub(crate) fn leases_changed(&self, sources: Vec<String>) {
        self.update_mounts(&Touched { secrets: sources, ..Touched::default() });
    }

    // ------------------------------------------------------------ volumes

    /// `docker volume create -d keyhole`: record the volume (again, with
    /// the same options, is fine).
    pub fn create_volume(&self, name: &str, spec: &VolumeSpec) -> Result<(), BrokerError> {
        self.write(Audit::plugin(EventKind::VolumeCreate).path(name).workload(&spec.workload), |b| {
            if !b.store.workloads()?.iter().any(|w| w.name == spec.workload) {
                return Err(BrokerError::Precondition(format!(
                    "workload {} does not exist: add it first (keyhole workload add {} --selector ...)",
                    spec.workload, spec.workload
                )));
            }
            match b.volume(name)? {
                Some(existing) if existing != *spec => {
                    return Err(BrokerError::Precondition(format!("volume {name} exists with other options")));
                }
                Some(_) => {}
                None => b.store.put_record(VOLUMES, name, spec)?,
            }
            Ok(Done::new(()))
        })
    }

    /// `docker volume rm`: only a volume no container mounts.
    pub fn remove_volume(&self, name: &str) -> Result<(), BrokerError> {
        self.write(Audit::plugin(EventKind::VolumeRemove).path(name), |b| {
            if !b.mounts_of_volume(name)?.is_empty() {
                return Err(BrokerError::Precondition(format!("volume {name} is in use by a running container")));
            }
            b.store.remove_record(VOLUMES, name)?;
            Ok(Done::new(()))
        })
    }

    /// A container start mounts a volume: record the mount, make it, and
    /// return where it is. A mount that could not be made is forgotten.
    pub fn mount_volume(&self, m: VolumeMount) -> Result<PathBuf, BrokerError> {
        let max = self.config.limits.max_mounts;
        if self.mounts.count() >= max {
            let limit = format!("max_mounts ({max}) reached: volume {} not mounted", m.volume);
            self.refusals.refused(&self.audit, "volume mounts", &limit, None);
            return Err(BrokerError::ResourceExhausted(format!(
                "keyhole: max_mounts ({max}) reached; the volume {} is not mounted",
                m.volume
            )));
        }
        // 1. store
        self.store.put_record(VOLUME_MOUNTS, &m.id, &m)?;
        // 2, 3. update the workload's mounts (this one among them)
        self.update_mounts(&Touched { workloads: vec![m.workload.clone()], ..Touched::default() });
        let key = MountKey::Volume(m.id.clone());
        if self.mounts.workload_of(&key).is_none() {
            let _ = self.store.remove_record(VOLUME_MOUNTS, &m.id);
            return Err(BrokerError::Unavailable(format!("cannot mount volume {}: see the broker's log", m.volume)));
        }
        // 4. audit
        self.audit_outcome(&Audit::plugin(EventKind::VolumeMount).path(&m.volume).workload(&m.workload), None, None)?;
        Ok(self.mounts.path_of(&key))
    }

    /// A container that mounted a volume stopped: unmount it.
    pub fn unmount_volume(&self, id: &str, volume: &str) -> Result<(), BrokerError> {
        self.write(Audit::plugin(EventKind::VolumeUnmount).path(volume), |b| {
            let workload = b.mounts.workload_of(&MountKey::Volume(id.to_owned()));
            b.store.remove_record(VOLUME_MOUNTS, id)?;
            Ok(match workload {
                Some(w) => Done::new(()).workload(w),
                None => Done::new(()).everything(),
            })
        })
    }

    /// A recorded volume's options.
    pub fn volume(&self, name: &str) -> Result<Option<VolumeSpec>, BrokerError> {
        let all: Vec<(String, VolumeSpec)> = self.store.records(VOLUMES)?;
        Ok(all.into_iter().find(|(n, _)| n == name).map(|(_, s)| s))
    }

    /// Every recorded volume, with its options.
    pub fn volumes(&self) -> Result<Vec<(String, VolumeSpec)>, BrokerError> {
        Ok(self.store.records(VOLUMES)?)
    }

    /// The containers' mounts of one volume.
    pub fn mounts_of_volume(&self, name: &str) -> Result<Vec<VolumeMount>, BrokerError> {
        let all: Vec<(String, VolumeMount)> = self.store.records(VOLUME_MOUNTS)?;
        Ok(all.into_iter().map(|(_, m)| m).filter(|m| m.volume == name).collect())
    }
}
