//! Vault / OpenBao KV v2, through vaultrs.
//!
//! Paths under `<name>/` live in the KV v2 mount `mount`, field `field`:
//! `prod/db/pw` is `secret/db/pw`, field `value`. Writes read the current
//! data and write it back with check-and-set on the version they read, so
//! two writers never silently overwrite each other and other fields of
//! the secret are kept.
//!
//! Values of granted secrets are cached here (and, sealed, in the local
//! store, by the caller) and refreshed by [`VaultBackend::refresh`] (in
//! [`scan`]: one detailed-metadata listing per watched directory, or one
//! metadata read per secret where the server lacks it); mounts only ever
//! read this cache, never the network. [`Health`] (in `super::health`) tracks whether the backend
//! answers, so stale values are served (and audited) up to `max_stale`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vaultrs::api::kv2::requests::{ReadSecretRequest, SetSecretRequestOptions};
use vaultrs::client::{Client, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

pub use super::health::{Freshness, Health};
use super::{BackendError, VersionMeta};
use crate::config::{VaultAuth, VaultConfig};
use crate::secret::SecretBytes;

pub mod scan;

/// A value held for the mounts.
#[derive(Clone)]
pub struct Cached {
    pub meta: VersionMeta,
    pub value: Arc<SecretBytes>,
}

pub struct VaultBackend {
    pub cfg: VaultConfig,
    client: tokio::sync::RwLock<VaultClient>,
    /// When to renew the token; None: it does not expire or cannot renew.
    renew_at: Mutex<Option<Instant>>,
    pub health: Arc<Health>,
    /// Full keyhole path → current value.
    cache: Mutex<BTreeMap<String, Cached>>,
    /// Change detection: directory listings or per-secret reads.
    scan: scan::ScanState,
    /// Full keyhole path → every string field of its newest version read
    /// (for templates' `secret(path, field=...)`).
    fields: Mutex<BTreeMap<String, Fields>>,
}

/// The string fields of one version of a KV v2 secret.
#[derive(Clone)]
pub struct Fields {
    pub version: u64,
    pub values: Arc<BTreeMap<String, Arc<SecretBytes>>>,
}

/// The most fields of one secret kept for templates.
const MAX_FIELDS: usize = 256;

impl std::fmt::Debug for VaultBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultBackend").field("name", &self.cfg.name).field("address", &self.cfg.address).finish()
    }
}

fn read_file_trimmed(path: &std::path::Path, what: &str) -> Result<SecretBytes, BackendError> {
    let mut raw =
        std::fs::read(path).map_err(|e| BackendError::Config(format!("cannot read {what} {}: {e}", path.display())))?;
    let len = raw.trim_ascii_end().len();
    raw.truncate(len);
    if raw.is_empty() {
        return Err(BackendError::Config(format!("{what} {} is empty", path.display())));
    }
    Ok(SecretBytes::take(&mut raw))
}

fn text(s: &SecretBytes, what: &str) -> Result<String, BackendError> {
    std::str::from_utf8(s.expose())
        .map(str::to_owned)
        .map_err(|_| BackendError::Config(format!("{what} is not UTF-8 text")))
}

fn parse_time(s: &str) -> i64 {
    humantime::parse_rfc3339_weak(s.trim_end_matches('Z').split('.').next().unwrap_or(s))
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64)
}

/// Run a vaultrs call with a valid token (`$c` is the client); on 403,
/// log in again and retry once. A macro, not a generic async closure:
/// those cannot yet be proven `Send` inside spawned tasks.
macro_rules! authed {
    ($this:expr, $rel:expr, |$c:ident| $call:expr) => {{
        let this = $this;
        this.keep_token().await?;
        let started = std::time::Instant::now();
        let first = {
            let guard = this.client.read().await;
            let $c = &*guard;
            $call.await
        };
        let failed = matches!(&first, Err(e) if !matches!(e, ClientError::APIError { code: 400 | 403 | 404, .. }));
        crate::metrics::backend_request(&this.cfg.name, started, failed);
        match first {
            Err(ClientError::APIError { code: 403, .. }) => {
                tracing::warn!(backend = %this.cfg.name, "permission denied; logging in again");
                this.login().await?;
                let guard = this.client.read().await;
                let $c = &*guard;
                $call.await.map_err(|e| this.map_err($rel, e))
            }
            r => r.map_err(|e| this.map_err($rel, e)),
        }
    }};
}

/// What [`VaultBackend::probe`] found.
#[derive(Debug)]
pub struct Probe {
    pub sealed: bool,
    pub server_time_unix: i64,
    pub version: String,
    /// TTL in seconds (0: never expires) and whether it can be renewed.
    pub token: Option<(u64, bool)>,
}

impl VaultBackend {
    /// Build the client and read the credentials' files (a missing file is
    /// a configuration error); no request is made yet.
    pub fn new(cfg: VaultConfig) -> Result<Self, BackendError> {
        let token = match &cfg.auth {
            VaultAuth::TokenFile(p) => text(&read_file_trimmed(p, "token file")?, "token file")?,
            VaultAuth::AppRole { role_id_file, secret_id_file, .. } => {
                read_file_trimmed(role_id_file, "AppRole role_id file")?;
                read_file_trimmed(secret_id_file, "AppRole secret_id file")?;
                String::new()
            }
        };
        let mut settings = VaultClientSettingsBuilder::default();
        settings
            .address(&cfg.address)
            .token(token)
            .timeout(Some(cfg.request_timeout))
            .verify(true)
            .ca_certs(cfg.ca_file.iter().map(|p| p.display().to_string()).collect());
        let settings = settings.build().map_err(|e| BackendError::Config(format!("backend {}: {e}", cfg.name)))?;
        let client =
            VaultClient::new(settings).map_err(|e| BackendError::Config(format!("backend {}: {e}", cfg.name)))?;
        let health = Arc::new(Health::new(&cfg.name, cfg.max_stale));
        Ok(VaultBackend {
            cfg,
            client: tokio::sync::RwLock::new(client),
            renew_at: Mutex::new(None),
            health,
            cache: Mutex::default(),
            fields: Mutex::default(),
            scan: scan::ScanState::default(),
        })
    }

    /// The path inside this backend, if `path` belongs to it.
    pub fn relative<'a>(&self, path: &'a str) -> Option<&'a str> {
        path.strip_prefix(self.cfg.name.as_str())?.strip_prefix('/')
    }

    fn full(&self, rel: &str) -> String {
        format!("{}/{rel}", self.cfg.name)
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> BackendError {
        BackendError::Unavailable { backend: self.cfg.name.clone(), reason: reason.to_string() }
    }

    fn map_err(&self, rel: &str, e: ClientError) -> BackendError {
        match e {
            ClientError::APIError { code: 404, .. } => BackendError::NotFound(self.full(rel)),
            ClientError::APIError { code: 400, errors } if errors.iter().any(|m| m.contains("check-and-set")) => {
                BackendError::Conflict { path: self.full(rel), detail: "it changed at the backend meanwhile".into() }
            }
            ClientError::APIError { code, errors } => self.unavailable(format!("HTTP {code}: {}", errors.join("; "))),
            other => self.unavailable(crate::causes(&other)),
        }
    }

    fn schedule_renewal(&self, ttl_secs: u64, renewable: bool) {
        *self.renew_at.lock().expect("renew lock") =
            (renewable && ttl_secs > 0).then(|| Instant::now() + Duration::from_secs(ttl_secs * 2 / 3));
    }

    /// Log in (AppRole) or re-read the token file, then learn the TTL.
    pub async fn login(&self) -> Result<(), BackendError> {
        match &self.cfg.auth {
            VaultAuth::TokenFile(p) => {
                let token = text(&read_file_trimmed(p, "token file")?, "token file")?;
                self.client.write().await.set_token(&token);
                let c = self.client.read().await;
                let info = vaultrs::token::lookup_self(&*c).await.map_err(|e| self.map_err("", e))?;
                self.schedule_renewal(info.ttl, info.renewable.unwrap_or(false));
            }
            VaultAuth::AppRole { role_id_file, secret_id_file, mount } => {
                let role = text(&read_file_trimmed(role_id_file, "AppRole role_id file")?, "role_id")?;
                let secret = text(&read_file_trimmed(secret_id_file, "AppRole secret_id file")?, "secret_id")?;
                let auth = {
                    let c = self.client.read().await;
                    vaultrs::auth::approle::login(&*c, mount, &role, &secret).await.map_err(|e| self.map_err("", e))?
                };
                self.client.write().await.set_token(&auth.client_token);
                self.schedule_renewal(auth.lease_duration, auth.renewable);
                tracing::info!(backend = %self.cfg.name, ttl = auth.lease_duration, "logged in with AppRole");
            }
        }
        Ok(())
    }

    /// For `keyhole doctor`: the server's health and clock, and (for a
    /// token file) the token's TTL. Makes no login: an AppRole secret_id
    /// may have limited uses.
    pub async fn probe(&self) -> Result<Probe, BackendError> {
        let c = self.client.read().await;
        // Not vaultrs::sys::health: it insists on fields OpenBao omits.
        let url = format!("{}/v1/sys/health?standbyok=true", self.cfg.address);
        let fetched = async { c.http.http.get(&url).send().await?.bytes().await };
        let body = fetched.await.map_err(|e| self.unavailable(crate::causes(&e)))?;
        let health: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| self.unavailable(format!("sys/health did not answer JSON: {e}")))?;
        let token = match &self.cfg.auth {
            VaultAuth::TokenFile(_) => {
                let t = vaultrs::token::lookup_self(&*c).await.map_err(|e| self.map_err("", e))?;
                Some((t.ttl, t.renewable.unwrap_or(false)))
            }
            VaultAuth::AppRole { .. } => None,
        };
        Ok(Probe {
            sealed: health["sealed"].as_bool().unwrap_or(true),
            server_time_unix: health["server_time_utc"].as_i64().unwrap_or(0),
            version: health["version"].as_str().unwrap_or("unknown").to_owned(),
            token,
        })
    }

    /// Renew the token when two thirds of its TTL have passed; log in
    /// again if renewal fails.
    async fn keep_token(&self) -> Result<(), BackendError> {
        let due = self.renew_at.lock().expect("renew lock").is_some_and(|t| Instant::now() >= t);
        if !due {
            return Ok(());
        }
        let renewed = {
            let c = self.client.read().await;
            vaultrs::token::renew_self(&*c, None).await
        };
        match renewed {
            Ok(auth) => {
                self.schedule_renewal(auth.lease_duration, auth.renewable);
                tracing::info!(backend = %self.cfg.name, ttl = auth.lease_duration, "renewed the token");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(backend = %self.cfg.name, error = %e, "token renewal failed; logging in again");
                self.login().await
            }
        }
    }

    /// Data map and version of `rel` (a version, or the current one).
    async fn read_raw(
        &self,
        rel: &str,
        version: Option<u64>,
    ) -> Result<(serde_json::Value, VersionMeta), BackendError> {
        let (mount, path) = (self.cfg.mount.clone(), rel.to_owned());
        let mut req = ReadSecretRequest::builder();
        req.mount(&mount).path(&path).version(version);
        // Invariant: mount and path are set, so the builder succeeds.
        let r = authed!(self, rel, |c| vaultrs::api::exec_with_result(c, req.build().expect("read request")))?;
        if r.metadata.destroyed || !r.metadata.deletion_time.is_empty() || r.data.is_null() {
            return Err(BackendError::NotFound(self.full(rel)));
        }
        let meta =
            VersionMeta { version: r.metadata.version, created_unix_ms: parse_time(&r.metadata.created_time), size: 0 };
        Ok((r.data, meta))
    }

    fn field(&self, rel: &str, data: &serde_json::Value) -> Result<SecretBytes, BackendError> {
        match data.get(&self.cfg.field) {
            Some(serde_json::Value::String(s)) => Ok(SecretBytes::copy_from(s.as_bytes())),
            Some(_) => {
                Err(BackendError::Invalid(format!("{}: field {:?} is not a string", self.full(rel), self.cfg.field)))
            }
            None => Err(BackendError::Invalid(format!("{} has no field {:?}", self.full(rel), self.cfg.field))),
        }
    }

    pub async fn get(&self, rel: &str, version: Option<u64>) -> Result<(VersionMeta, SecretBytes), BackendError> {
        let (data, mut meta) = self.read_raw(rel, version).await?;
        self.remember_fields(rel, &meta, &data);
        let value = self.field(rel, &data)?;
        meta.size = value.len() as u64;
        Ok((meta, value))
    }

    /// Write a new version. `must_exist`: a rotation. `if_version`: only
    /// if the secret is still at that version. Check-and-set on the
    /// version read, so a concurrent writer makes this fail, not vanish.
    pub async fn put(
        &self,
        rel: &str,
        value: &SecretBytes,
        must_exist: bool,
        if_version: Option<u64>,
    ) -> Result<VersionMeta, BackendError> {
        let text = std::str::from_utf8(value.expose())
            .map_err(|_| BackendError::Invalid("Vault stores text: the value must be UTF-8".into()))?;
        let (mut data, current) = match self.read_raw(rel, None).await {
            Ok((d, m)) => (d, m.version),
            Err(BackendError::NotFound(_)) if must_exist => return Err(BackendError::NotFound(self.full(rel))),
            Err(BackendError::NotFound(_)) => (serde_json::json!({}), 0),
            Err(e) => return Err(e),
        };
        if let Some(want) = if_version.filter(|w| *w != current) {
            return Err(BackendError::Conflict {
                path: self.full(rel),
                detail: format!("it is at version {current}, not {want}"),
            });
        }
        if !data.is_object() {
            data = serde_json::json!({});
        }
        data[self.cfg.field.as_str()] = serde_json::Value::String(text.to_owned());
        let (mount, path) = (self.cfg.mount.clone(), rel.to_owned());
        let cas = u32::try_from(current).map_err(|_| BackendError::Invalid("version out of range".into()))?;
        let written = authed!(self, rel, |c| vaultrs::kv2::set_with_options(
            c,
            &mount,
            &path,
            &data,
            SetSecretRequestOptions { cas }
        ))?;
        let meta = VersionMeta {
            version: written.version,
            created_unix_ms: parse_time(&written.created_time),
            size: value.len() as u64,
        };
        self.remember(rel, meta.clone(), value.clone());
        Ok(meta)
    }

    /// Kept versions, oldest first (sizes are not known without reading).
    pub async fn history(&self, rel: &str) -> Result<Vec<VersionMeta>, BackendError> {
        let (mount, path) = (self.cfg.mount.clone(), rel.to_owned());
        let md = authed!(self, rel, |c| vaultrs::kv2::read_metadata(c, &mount, &path))?;
        let mut out: Vec<VersionMeta> = md
            .versions
            .iter()
            .filter(|(_, v)| !v.destroyed && v.deletion_time.is_empty())
            .filter_map(|(n, v)| {
                Some(VersionMeta { version: n.parse().ok()?, created_unix_ms: parse_time(&v.created_time), size: 0 })
            })
            .collect();
        out.sort_by_key(|m| m.version);
        if out.is_empty() {
            return Err(BackendError::NotFound(self.full(rel)));
        }
        Ok(out)
    }

    /// Current metadata version of `rel`, or None if it does not exist.
    async fn current_version(&self, rel: &str) -> Result<Option<u64>, BackendError> {
        let (mount, path) = (self.cfg.mount.clone(), rel.to_owned());
        let md = authed!(self, rel, |c| vaultrs::kv2::read_metadata(c, &mount, &path));
        match md {
            Ok(md) => {
                let v = md.versions.get(&md.current_version.to_string());
                let live = v.is_some_and(|v| !v.destroyed && v.deletion_time.is_empty());
                Ok(live.then_some(md.current_version))
            }
            Err(BackendError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every secret at or under `rel_prefix` (relative paths).
    pub async fn list(&self, rel_prefix: &str) -> Result<Vec<String>, BackendError> {
        const MAX: usize = 10_000;
        let mut out = Vec::new();
        let mut dirs = vec![rel_prefix.trim_end_matches('/').to_owned()];
        while let Some(dir) = dirs.pop() {
            let mount = self.cfg.mount.clone();
            let listing = format!("{dir}/");
            let keys = authed!(self, &dir, |c| vaultrs::kv2::list(c, &mount, &listing));
            let keys = match keys {
                Ok(k) => k,
                Err(BackendError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            for k in keys {
                let child = if dir.is_empty() { k.clone() } else { format!("{dir}/{k}") };
                match child.strip_suffix('/') {
                    Some(sub) => dirs.push(sub.to_owned()),
                    None => out.push(child),
                }
                if out.len() >= MAX {
                    return Err(BackendError::Invalid(format!(
                        "more than {MAX} secrets under {}",
                        self.full(rel_prefix)
                    )));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    pub async fn delete(&self, rel: &str) -> Result<usize, BackendError> {
        let kept = self.history(rel).await?.len();
        let (mount, path) = (self.cfg.mount.clone(), rel.to_owned());
        authed!(self, rel, |c| vaultrs::kv2::delete_metadata(c, &mount, &path))?;
        self.cache.lock().expect("cache lock").remove(&self.full(rel));
        Ok(kept)
    }

    fn remember(&self, rel: &str, meta: VersionMeta, value: SecretBytes) {
        let entry = Cached { meta, value: Arc::new(value) };
        self.cache.lock().expect("cache lock").insert(self.full(rel), entry);
    }

    /// Keep the string fields of a version read, if it is the newest.
    fn remember_fields(&self, rel: &str, meta: &VersionMeta, data: &serde_json::Value) {
        let Some(map) = data.as_object() else { return };
        let values: BTreeMap<String, Arc<SecretBytes>> = map
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), Arc::new(SecretBytes::copy_from(s.as_bytes())))))
            .take(MAX_FIELDS)
            .collect();
        let mut fields = self.fields.lock().expect("fields lock");
        let full = self.full(rel);
        if fields.get(&full).is_some_and(|f| f.version > meta.version) {
            return;
        }
        fields.insert(full, Fields { version: meta.version, values: Arc::new(values) });
    }

    /// The fields of `path` at `version`, if that version was read.
    pub fn cached_fields(&self, path: &str, version: u64) -> Option<Fields> {
        self.fields.lock().expect("fields lock").get(path).filter(|f| f.version == version).cloned()
    }

    /// Load entries persisted by an earlier broker.
    pub fn restore(&self, path: String, meta: VersionMeta, value: SecretBytes) {
        self.cache.lock().expect("cache lock").insert(path, Cached { meta, value: Arc::new(value) });
    }

    pub fn cached(&self, path: &str) -> Option<Cached> {
        self.cache.lock().expect("cache lock").get(path).cloned()
    }

    /// Cached secrets at or under a full path.
    pub fn cached_under(&self, prefix: &str) -> Vec<(String, Cached)> {
        let cache = self.cache.lock().expect("cache lock");
        cache
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| k.len() == prefix.len() || k[prefix.len()..].starts_with('/'))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn cached_count(&self) -> usize {
        self.cache.lock().expect("cache lock").len()
    }

    /// Status fields: (address, kind of auth).
    pub fn describe(&self) -> (String, &'static str) {
        let auth = match self.cfg.auth {
            VaultAuth::TokenFile(_) => "token-file",
            VaultAuth::AppRole { .. } => "approle",
        };
        (self.cfg.address.clone(), auth)
    }
}

/// A lease a secrets engine issued (`GET database/creds/ROLE`), or a
/// certificate (`pki/issue/ROLE`, whose lease id is empty). The data
/// holds credentials: it is never logged and `Debug` leaves it out.
pub struct Issued {
    pub lease_id: String,
    /// Seconds the lease lasts from now.
    pub lease_duration: u64,
    pub renewable: bool,
    pub data: serde_json::Value,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("lease_id", &self.lease_id)
            .field("lease_duration", &self.lease_duration)
            .finish_non_exhaustive()
    }
}

/// The HTTP verbs the lease calls use.
#[derive(Clone, Copy, Debug)]
enum Verb {
    Get,
    Put,
    Post,
}

/// The most of a lease response read (a certificate and chain are a few
/// KiB; anything far larger is not a lease).
const MAX_LEASE_BODY: usize = 1 << 20;

impl VaultBackend {
    /// One request to `v1/<rel>` with the client's token, its body JSON;
    /// on 403, log in again and retry once. vaultrs drops lease ids and
    /// has no lease calls, so these go through its HTTP client directly.
    async fn call(
        &self,
        verb: Verb,
        rel: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, BackendError> {
        self.keep_token().await?;
        let mut retried = false;
        loop {
            let started = Instant::now();
            let sent = {
                let c = self.client.read().await;
                let url = format!("{}/v1/{rel}", self.cfg.address.trim_end_matches('/'));
                let req = match verb {
                    Verb::Get => c.http.http.get(&url),
                    Verb::Put => c.http.http.put(&url),
                    Verb::Post => c.http.http.post(&url),
                };
                let req = req.header("X-Vault-Token", c.settings.token.as_str()).timeout(self.cfg.request_timeout);
                let req = match body {
                    Some(b) => req.header("Content-Type", "application/json").body(b.to_string()),
                    None => req,
                };
                req.send().await
            };
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    crate::metrics::backend_request(&self.cfg.name, started, true);
                    return Err(self.unavailable(crate::causes(&e)));
                }
            };
            let status = resp.status().as_u16();
            let bytes = resp.bytes().await.map_err(|e| self.unavailable(crate::causes(&e)))?;
            crate::metrics::backend_request(&self.cfg.name, started, status >= 500);
            if bytes.len() > MAX_LEASE_BODY {
                return Err(self.unavailable(format!("{rel}: an answer of {} bytes", bytes.len())));
            }
            let json: serde_json::Value = if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap_or_default()
            };
            if (200..300).contains(&status) {
                return Ok(json);
            }
            if status == 403 && !retried {
                retried = true;
                tracing::warn!(backend = %self.cfg.name, "permission denied; logging in again");
                self.login().await?;
                continue;
            }
            let errors: Vec<String> = json["errors"]
                .as_array()
                .map(|a| a.iter().filter_map(|e| e.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            // Engine errors name roles and paths; bounded all the same.
            let mut detail = errors.join("; ");
            detail.truncate(300);
            return Err(match status {
                404 => BackendError::NotFound(self.full(rel)),
                400 => BackendError::Invalid(format!("{}: {detail}", self.full(rel))),
                _ => self.unavailable(format!("{rel}: HTTP {status}: {detail}")),
            });
        }
    }

    /// `GET <rel>` of a dynamic secrets engine (`database/creds/web`):
    /// a new lease and its credentials.
    pub async fn lease_issue(&self, rel: &str) -> Result<Issued, BackendError> {
        let r = self.call(Verb::Get, rel, None).await?;
        let lease_id = r["lease_id"].as_str().unwrap_or_default().to_owned();
        if lease_id.is_empty() || !r["data"].is_object() {
            return Err(BackendError::Invalid(format!(
                "{} answered no lease (is it a dynamic secrets path?)",
                self.full(rel)
            )));
        }
        Ok(Issued {
            lease_id,
            lease_duration: r["lease_duration"].as_u64().unwrap_or(0),
            renewable: r["renewable"].as_bool().unwrap_or(false),
            data: r["data"].clone(),
        })
    }

    /// `PUT sys/leases/renew`: the lease's new duration from now (the
    /// engine caps it at the role's max_ttl).
    pub async fn lease_renew(&self, lease_id: &str, increment: u64) -> Result<u64, BackendError> {
        let body = serde_json::json!({ "lease_id": lease_id, "increment": increment });
        let r = self.call(Verb::Put, "sys/leases/renew", Some(&body)).await?;
        Ok(r["lease_duration"].as_u64().unwrap_or(0))
    }

    /// `PUT sys/leases/revoke` (synchronous: the credentials are gone
    /// when it returns). A lease the server no longer knows is gone too.
    pub async fn lease_revoke(&self, lease_id: &str) -> Result<(), BackendError> {
        let body = serde_json::json!({ "lease_id": lease_id });
        match self.call(Verb::Put, "sys/leases/revoke", Some(&body)).await {
            Ok(_) | Err(BackendError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `POST <rel>` of the PKI engine (`pki/issue/ROLE`): a certificate
    /// and its private key, made by the engine.
    pub async fn cert_issue(&self, rel: &str, cn: &str, uri: &str, ttl: Option<u64>) -> Result<Issued, BackendError> {
        let mut body = serde_json::json!({ "common_name": cn, "uri_sans": uri });
        if let Some(t) = ttl {
            body["ttl"] = serde_json::Value::String(format!("{t}s"));
        }
        let r = self.call(Verb::Post, rel, Some(&body)).await?;
        let data = &r["data"];
        let exp = data["expiration"].as_u64().unwrap_or(0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if data["certificate"].as_str().is_none() || data["private_key"].as_str().is_none() {
            return Err(BackendError::Invalid(format!("{} answered no certificate and key", self.full(rel))));
        }
        Ok(Issued {
            lease_id: String::new(),
            lease_duration: exp.saturating_sub(now),
            renewable: false,
            data: data.clone(),
        })
    }

    /// `POST <mount>/revoke` by serial. A serial the engine does not
    /// know (expired and tidied) is no longer valid anyway.
    pub async fn cert_revoke(&self, mount: &str, serial: &str) -> Result<(), BackendError> {
        let body = serde_json::json!({ "serial_number": serial });
        match self.call(Verb::Post, &format!("{mount}/revoke"), Some(&body)).await {
            Ok(_) | Err(BackendError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
