//! [`SecretSource`]: where a secret's value lives, as the broker sees it.
//! The local store ([`LocalStore`]) holds every path no backend owns;
//! each Vault backend ([`VaultSource`]) owns the paths under its name.
//! The broker picks the one source that owns a path and calls through
//! this trait; nothing else tells them apart.
//!
//! Two kinds of calls: the admin's (`put`, `get`, `history`, `delete`,
//! `list`, `prefetch`), which may go to the network and block the calling
//! thread; and the mounts' (`covered`, `current`, `load`), which never do
//! (a remote source answers them from its cache).
#![forbid(unsafe_code)]

use std::sync::Arc;

use super::health::Health;
use super::local::{LocalStore, StoreError};
use super::vault::{Cached, VaultBackend};
use super::{BackendError, VersionMeta};
use crate::policy::Target;
use crate::secret::{PathError, SecretBytes, SecretPath};

/// Why a source could not answer. Messages name paths, never values.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The local store failed or refused.
    #[error(transparent)]
    Local(#[from] StoreError),
    /// A remote backend failed or refused.
    #[error(transparent)]
    Remote(#[from] BackendError),
    /// Not a secret's path.
    #[error(transparent)]
    Path(#[from] PathError),
}

impl SourceError {
    /// The secret (or the version asked for) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            SourceError::Local(StoreError::NotFound(_) | StoreError::NoVersion { .. })
                | SourceError::Remote(BackendError::NotFound(_))
        )
    }
}

/// A value for a mount to show.
pub struct Shown {
    /// The value, if the source has this version (a remote source may
    /// not have fetched it).
    pub value: Option<Arc<SecretBytes>>,
    /// Whether the source answers (a remote one); `None`: always fresh.
    pub health: Option<Arc<Health>>,
}

/// One place secrets live. Paths are full (`prod/db/pw`), never relative.
pub trait SecretSource: Send + Sync {
    /// `local`, or the backend's name.
    fn name(&self) -> &str;

    /// Add a version; `rotate`: the secret must exist; `if_version`: it
    /// must be at that version.
    fn put(
        &self,
        path: &SecretPath,
        value: &SecretBytes,
        rotate: bool,
        if_version: Option<u64>,
        now_ms: i64,
    ) -> Result<VersionMeta, SourceError>;

    /// A version (the current one for `None`) and its value.
    fn get(&self, path: &SecretPath, version: Option<u64>) -> Result<(VersionMeta, SecretBytes), SourceError>;

    /// The kept versions, oldest first.
    fn history(&self, path: &SecretPath) -> Result<Vec<VersionMeta>, SourceError>;

    /// Remove a secret and all its versions; returns how many.
    fn delete(&self, path: &SecretPath) -> Result<usize, SourceError>;

    /// The secrets of this source at or under `prefix` (whole segments;
    /// empty: all), with their current version.
    fn list(&self, prefix: &str) -> Result<Vec<(String, VersionMeta)>, SourceError>;

    /// Fetch what a new grant of `target` shows, so it is readable at
    /// once. Returns what changed (`None`: gone), for the caller to keep
    /// and show. Only a remote source has anything to fetch.
    fn prefetch(&self, _target: &Target) -> Result<Vec<(String, Option<Cached>)>, SourceError> {
        Ok(Vec::new())
    }

    /// What a remote source holds of `path` now, to keep sealed in the
    /// local store for a restart during an outage. `None` for the local
    /// store (it is the copy).
    fn copy_of(&self, _path: &str) -> Option<Option<Cached>> {
        None
    }

    /// The mounts' view (no network): the secrets `target` covers.
    fn covered(&self, target: &Target) -> Result<Vec<(String, VersionMeta)>, SourceError>;

    /// The mounts' view (no network): the current version of `path`.
    fn current(&self, path: &str) -> Result<Option<VersionMeta>, SourceError>;

    /// The mounts' view (no network): version `meta` of `path`.
    fn load(&self, path: &str, meta: &VersionMeta) -> Result<Shown, SourceError>;
}

impl SecretSource for LocalStore {
    fn name(&self) -> &str {
        "local"
    }

    fn put(
        &self,
        path: &SecretPath,
        value: &SecretBytes,
        rotate: bool,
        if_version: Option<u64>,
        now_ms: i64,
    ) -> Result<VersionMeta, SourceError> {
        Ok(LocalStore::put(self, path, value, rotate, if_version, now_ms)?)
    }

    fn get(&self, path: &SecretPath, version: Option<u64>) -> Result<(VersionMeta, SecretBytes), SourceError> {
        Ok(LocalStore::get(self, path, version)?)
    }

    fn history(&self, path: &SecretPath) -> Result<Vec<VersionMeta>, SourceError> {
        Ok(LocalStore::history(self, path)?)
    }

    fn delete(&self, path: &SecretPath) -> Result<usize, SourceError> {
        Ok(LocalStore::delete(self, path)?)
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, VersionMeta)>, SourceError> {
        Ok(LocalStore::list(self, prefix)?)
    }

    fn covered(&self, target: &Target) -> Result<Vec<(String, VersionMeta)>, SourceError> {
        let (Target::Exact(p) | Target::Prefix(p)) = target;
        Ok(LocalStore::list(self, p.as_str())?.into_iter().filter(|(s, _)| target.file_for(s).is_some()).collect())
    }

    fn current(&self, path: &str) -> Result<Option<VersionMeta>, SourceError> {
        match LocalStore::history(self, &SecretPath::parse(path)?) {
            Ok(h) => Ok(h.last().cloned()),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn load(&self, path: &str, meta: &VersionMeta) -> Result<Shown, SourceError> {
        let (_, value) = LocalStore::get(self, &SecretPath::parse(path)?, Some(meta.version))?;
        Ok(Shown { value: Some(Arc::new(value)), health: None })
    }
}

/// A Vault backend as a [`SecretSource`]: its requests are made on the
/// broker's runtime from the calling (blocking) thread; the mounts' calls
/// read its cache.
pub struct VaultSource {
    pub backend: Arc<VaultBackend>,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for VaultSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultSource").field("backend", &self.backend).finish_non_exhaustive()
    }
}

impl VaultSource {
    pub fn new(backend: Arc<VaultBackend>, rt: tokio::runtime::Handle) -> Self {
        VaultSource { backend, rt }
    }

    /// Whether `path` is this backend's (under its name).
    pub fn owns(&self, path: &str) -> bool {
        self.backend.relative(path).is_some()
    }

    /// The path inside the backend.
    fn rel<'a>(&self, path: &'a SecretPath) -> Result<&'a str, SourceError> {
        let (p, name) = (path.as_str(), &self.backend.cfg.name);
        self.backend
            .relative(p)
            .ok_or_else(|| SourceError::Remote(BackendError::Invalid(format!("{p} is not under backend {name}"))))
    }
}

impl SecretSource for VaultSource {
    fn name(&self) -> &str {
        &self.backend.cfg.name
    }

    fn put(
        &self,
        path: &SecretPath,
        value: &SecretBytes,
        rotate: bool,
        if_version: Option<u64>,
        _now_ms: i64,
    ) -> Result<VersionMeta, SourceError> {
        let rel = self.rel(path)?;
        Ok(self.rt.block_on(self.backend.put(rel, value, rotate, if_version))?)
    }

    fn get(&self, path: &SecretPath, version: Option<u64>) -> Result<(VersionMeta, SecretBytes), SourceError> {
        Ok(self.rt.block_on(self.backend.get(self.rel(path)?, version))?)
    }

    fn history(&self, path: &SecretPath) -> Result<Vec<VersionMeta>, SourceError> {
        Ok(self.rt.block_on(self.backend.history(self.rel(path)?))?)
    }

    fn delete(&self, path: &SecretPath) -> Result<usize, SourceError> {
        Ok(self.rt.block_on(self.backend.delete(self.rel(path)?))?)
    }

    /// Asks the backend: one request per secret.
    fn list(&self, prefix: &str) -> Result<Vec<(String, VersionMeta)>, SourceError> {
        let v = &self.backend;
        let name = v.cfg.name.as_str();
        let rel = match v.relative(prefix) {
            Some(rel) => rel,
            None if prefix.is_empty() || prefix == name => "",
            None => return Ok(Vec::new()),
        };
        let mut out = Vec::new();
        for r in self.rt.block_on(v.list(rel))? {
            match self.rt.block_on(v.history(&r)) {
                Ok(h) => out.extend(h.last().map(|m| (format!("{name}/{r}"), m.clone()))),
                Err(BackendError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    fn prefetch(&self, target: &Target) -> Result<Vec<(String, Option<Cached>)>, SourceError> {
        let (Target::Exact(p) | Target::Prefix(p)) = target;
        let Some(rel) = self.backend.relative(p.as_str()) else { return Ok(Vec::new()) };
        let set = std::collections::BTreeSet::from([rel.to_owned()]);
        let (exact, prefixes) = match target {
            Target::Exact(_) => (set, Default::default()),
            Target::Prefix(_) => (Default::default(), set),
        };
        Ok(self.rt.block_on(self.backend.refresh(&exact, &prefixes))?)
    }

    fn copy_of(&self, path: &str) -> Option<Option<Cached>> {
        Some(self.backend.cached(path))
    }

    fn covered(&self, target: &Target) -> Result<Vec<(String, VersionMeta)>, SourceError> {
        let (Target::Exact(p) | Target::Prefix(p)) = target;
        let mut found: Vec<(String, VersionMeta)> = self
            .backend
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

    fn current(&self, path: &str) -> Result<Option<VersionMeta>, SourceError> {
        Ok(self.backend.cached(path).map(|c| c.meta))
    }

    fn load(&self, path: &str, meta: &VersionMeta) -> Result<Shown, SourceError> {
        Ok(Shown {
            value: self.backend.cached(path).filter(|c| c.meta.version == meta.version).map(|c| c.value),
            health: Some(self.backend.health.clone()),
        })
    }
}
