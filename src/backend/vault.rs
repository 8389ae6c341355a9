//! Vault / OpenBao KV v2, over HTTP.
//!
//! Paths under `<name>/` live in the KV v2 mount `mount`, field `field`:
//! `prod/db/pw` is `secret/db/pw`, field `value`. Writes read the current
//! data and write it back with check-and-set on the version they read, so
//! two writers never silently overwrite each other and other fields of
//! the secret are kept.
//!
//! Every request goes through [`VaultBackend::send`]: to the cluster node
//! in use, moving on to the next address on a connection error, 5xx, 429
//! or 307, with read-your-writes headers (see [`nodes`]). vaultrs builds
//! the HTTP client (TLS roots, timeouts); the requests are made here,
//! because vaultrs neither sends nor returns headers.
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

use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

pub use super::health::{Freshness, Health};
use super::{BackendError, VersionMeta};
use crate::config::{VaultAuth, VaultConfig};
use crate::secret::SecretBytes;

pub mod nodes;
pub mod scan;

/// A value held for the mounts.
#[derive(Clone)]
pub struct Cached {
    pub meta: VersionMeta,
    pub value: Arc<SecretBytes>,
}

pub struct VaultBackend {
    pub cfg: VaultConfig,
    /// The HTTP client (vaultrs builds it with the TLS settings).
    client: VaultClient,
    /// The token every request carries (a credential: never logged).
    token: Mutex<String>,
    /// The cluster's nodes, the one in use, the newest index seen.
    pub nodes: nodes::Nodes,
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
        f.debug_struct("VaultBackend")
            .field("name", &self.cfg.name)
            .field("addresses", &self.cfg.addresses)
            .finish_non_exhaustive()
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

/// The HTTP verbs the calls use (a `LIST` is a GET with `?list=true`).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Verb {
    Get,
    Put,
    Post,
    Delete,
}

/// The most of an answer read, but a listing's (a secret, a certificate
/// and chain are KiB; anything far larger is not an answer of ours).
const MAX_BODY: usize = 4 << 20;

/// One answer of the cluster: status and body.
pub(crate) struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        if self.body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&self.body).unwrap_or_default()
        }
    }

    /// The server's error messages, joined and bounded (they name paths
    /// and roles, never values).
    pub fn errors(&self) -> String {
        let mut detail = self.json()["errors"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e.as_str()).collect::<Vec<_>>().join("; "))
            .unwrap_or_default();
        detail.truncate(300);
        detail
    }
}

/// Percent-encode a path or query value (keys come from the server).
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What [`VaultBackend::probe`] found.
#[derive(Debug)]
pub struct Probe {
    pub sealed: bool,
    pub server_time_unix: i64,
    pub version: String,
    /// TTL in seconds (0: never expires) and whether it can be renewed.
    pub token: Option<(u64, bool)>,
    /// Each node: its address and "active", "standby", "sealed" or why it
    /// did not answer.
    pub nodes: Vec<(String, Result<&'static str, String>)>,
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
            .timeout(Some(cfg.request_timeout))
            .verify(true)
            .ca_certs(cfg.ca_file.iter().map(|p| p.display().to_string()).collect());
        let settings = settings.build().map_err(|e| BackendError::Config(format!("backend {}: {e}", cfg.name)))?;
        let client =
            VaultClient::new(settings).map_err(|e| BackendError::Config(format!("backend {}: {e}", cfg.name)))?;
        let health = Arc::new(Health::new(&cfg.name, cfg.max_stale));
        let nodes = nodes::Nodes::new(cfg.addresses.clone());
        Ok(VaultBackend {
            cfg,
            client,
            token: Mutex::new(token),
            nodes,
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

    /// One request to `v1/<api>` (path and query), body JSON, the answer
    /// capped at `cap` bytes. Tries the node in use, then each other node
    /// once while the answer says to move on ([`nodes::moves_on`]) or the
    /// node cannot be reached; the node that answers stays in use. The
    /// last node's answer is returned whatever it is; Err: no node could
    /// be reached (or an answer was larger than `cap`).
    pub(crate) async fn send(
        &self,
        verb: Verb,
        api: &str,
        body: Option<&serde_json::Value>,
        cap: usize,
    ) -> Result<Answer, String> {
        let order = self.nodes.order();
        let mut last_error = String::new();
        for (k, &i) in order.iter().enumerate() {
            let last = k + 1 == order.len();
            let started = Instant::now();
            let url = format!("{}/v1/{api}", self.nodes.address(i));
            let http = &self.client.http.http;
            let req = match verb {
                Verb::Get => http.get(&url),
                Verb::Put => http.put(&url),
                Verb::Post => http.post(&url),
                Verb::Delete => http.delete(&url),
            };
            let token = self.token.lock().expect("token lock").clone();
            let mut req = req.header("X-Vault-Request", "true").timeout(self.cfg.request_timeout);
            if !token.is_empty() {
                req = req.header("X-Vault-Token", token);
            }
            if let Some(index) = self.nodes.consistency_headers() {
                req = req.header("X-Vault-Index", index).header("X-Vault-Inconsistent", "forward-active-node");
            }
            if let Some(b) = body {
                req = req.header("Content-Type", "application/json").body(b.to_string());
            }
            let mut resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    crate::metrics::backend_request(&self.cfg.name, started, true);
                    last_error = format!("{}: {}", self.nodes.address(i), crate::causes(&e));
                    tracing::debug!(backend = %self.cfg.name, error = %last_error, "a node did not answer");
                    continue;
                }
            };
            let status = resp.status().as_u16();
            crate::metrics::backend_request(&self.cfg.name, started, status >= 500 || status == 429);
            if nodes::moves_on(status) && !last {
                last_error = format!("{}: HTTP {status}", self.nodes.address(i));
                tracing::debug!(backend = %self.cfg.name, error = %last_error, "moving on to the next node");
                continue;
            }
            if let Some(h) = resp.headers().get("X-Vault-Index").and_then(|h| h.to_str().ok()) {
                self.nodes.saw_index(h);
            }
            let mut bytes = Vec::new();
            loop {
                match resp.chunk().await {
                    Ok(Some(c)) if bytes.len() + c.len() > cap => {
                        return Err(format!("{api}: an answer larger than {cap} bytes"));
                    }
                    Ok(Some(c)) => bytes.extend_from_slice(&c),
                    Ok(None) => break,
                    Err(e) => return Err(crate::causes(&e)),
                }
            }
            if !nodes::moves_on(status) {
                self.nodes.answered(i, &self.cfg.name);
            }
            return Ok(Answer { status, body: bytes });
        }
        Err(last_error)
    }

    /// [`Self::send`] with a valid token: renews it when due, and on 403
    /// logs in again and retries once. Errors name `rel` (a keyhole path
    /// inside the backend) when given, else the API path; for a KV call
    /// (`rel` given) a check-and-set refusal is a conflict and any other
    /// 400 a failing backend, for the other calls a 400 is bad input.
    async fn request(
        &self,
        verb: Verb,
        api: &str,
        body: Option<&serde_json::Value>,
        rel: Option<&str>,
        cap: usize,
    ) -> Result<serde_json::Value, BackendError> {
        self.keep_token().await?;
        let mut retried = false;
        loop {
            let a = self.send(verb, api, body, cap).await.map_err(|e| self.unavailable(e))?;
            if (200..300).contains(&a.status) {
                return Ok(a.json());
            }
            if a.status == 403 && !retried {
                retried = true;
                tracing::warn!(backend = %self.cfg.name, "permission denied; logging in again");
                self.login().await?;
                continue;
            }
            let named = rel.map_or_else(|| self.full(api), |r| self.full(r));
            let detail = a.errors();
            return Err(match (a.status, rel) {
                (404, _) => BackendError::NotFound(named),
                (400, Some(_)) if detail.contains("check-and-set") => {
                    BackendError::Conflict { path: named, detail: "it changed at the backend meanwhile".into() }
                }
                (400, None) => BackendError::Invalid(format!("{named}: {detail}")),
                (code, Some(_)) => self.unavailable(format!("HTTP {code}: {detail}")),
                (code, None) => self.unavailable(format!("{api}: HTTP {code}: {detail}")),
            });
        }
    }

    /// A KV v2 call about secret `rel`.
    async fn kv(
        &self,
        verb: Verb,
        api: &str,
        body: Option<&serde_json::Value>,
        rel: &str,
    ) -> Result<serde_json::Value, BackendError> {
        self.request(verb, api, body, Some(rel), MAX_BODY).await
    }

    fn schedule_renewal(&self, ttl_secs: u64, renewable: bool) {
        *self.renew_at.lock().expect("renew lock") =
            (renewable && ttl_secs > 0).then(|| Instant::now() + Duration::from_secs(ttl_secs * 2 / 3));
    }

    /// A call of the login/renewal flow (no renewal or re-login of its own).
    async fn auth_call(
        &self,
        verb: Verb,
        api: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, BackendError> {
        let a = self.send(verb, api, body, MAX_BODY).await.map_err(|e| self.unavailable(e))?;
        if (200..300).contains(&a.status) {
            return Ok(a.json());
        }
        Err(self.unavailable(format!("{api}: HTTP {}: {}", a.status, a.errors())))
    }

    /// Log in (AppRole) or re-read the token file, then learn the TTL.
    pub async fn login(&self) -> Result<(), BackendError> {
        match &self.cfg.auth {
            VaultAuth::TokenFile(p) => {
                let token = text(&read_file_trimmed(p, "token file")?, "token file")?;
                *self.token.lock().expect("token lock") = token;
                let info = self.auth_call(Verb::Get, "auth/token/lookup-self", None).await?;
                let data = &info["data"];
                self.schedule_renewal(data["ttl"].as_u64().unwrap_or(0), data["renewable"].as_bool().unwrap_or(false));
            }
            VaultAuth::AppRole { role_id_file, secret_id_file, mount } => {
                let role = text(&read_file_trimmed(role_id_file, "AppRole role_id file")?, "role_id")?;
                let secret = text(&read_file_trimmed(secret_id_file, "AppRole secret_id file")?, "secret_id")?;
                let body = serde_json::json!({ "role_id": role, "secret_id": secret });
                let r = self.auth_call(Verb::Post, &format!("auth/{}/login", encode(mount)), Some(&body)).await?;
                let auth = &r["auth"];
                let Some(t) = auth["client_token"].as_str() else {
                    return Err(self.unavailable("the AppRole login answered no token"));
                };
                *self.token.lock().expect("token lock") = t.to_owned();
                let ttl = auth["lease_duration"].as_u64().unwrap_or(0);
                self.schedule_renewal(ttl, auth["renewable"].as_bool().unwrap_or(false));
                tracing::info!(backend = %self.cfg.name, ttl, "logged in with AppRole");
            }
        }
        Ok(())
    }

    /// For `keyhole doctor`: each node's health, the server's clock and
    /// version, and (for a token file) the token's TTL. Makes no login: an
    /// AppRole secret_id may have limited uses.
    pub async fn probe(&self) -> Result<Probe, BackendError> {
        let mut nodes = Vec::new();
        let mut first: Option<serde_json::Value> = None;
        for addr in self.nodes.addresses() {
            // Not vaultrs::sys::health: it insists on fields OpenBao omits.
            let url = format!("{addr}/v1/sys/health?standbyok=true&sealedcode=200&uninitcode=200");
            let fetched =
                async { self.client.http.http.get(&url).timeout(self.cfg.request_timeout).send().await?.bytes().await };
            let health = match fetched.await {
                Ok(body) => serde_json::from_slice::<serde_json::Value>(&body)
                    .map_err(|e| format!("sys/health did not answer JSON: {e}")),
                Err(e) => Err(crate::causes(&e)),
            };
            let role = health.as_ref().map(|h| match (h["sealed"].as_bool(), h["standby"].as_bool()) {
                (Some(false), Some(false)) => "active",
                (Some(false), _) => "standby",
                _ => "sealed",
            });
            if let (Ok(h), None) = (&health, &first) {
                first = Some(h.clone());
            }
            nodes.push((addr.clone(), role.map_err(Clone::clone)));
        }
        let Some(health) = first else {
            let why: Vec<String> =
                nodes.iter().filter_map(|(a, r)| r.as_ref().err().map(|e| format!("{a}: {e}"))).collect();
            return Err(self.unavailable(why.join("; ")));
        };
        let token = match &self.cfg.auth {
            VaultAuth::TokenFile(_) => {
                let t = self.auth_call(Verb::Get, "auth/token/lookup-self", None).await?;
                Some((t["data"]["ttl"].as_u64().unwrap_or(0), t["data"]["renewable"].as_bool().unwrap_or(false)))
            }
            VaultAuth::AppRole { .. } => None,
        };
        Ok(Probe {
            sealed: !nodes.iter().any(|(_, r)| matches!(r, Ok("active" | "standby"))),
            server_time_unix: health["server_time_utc"].as_i64().unwrap_or(0),
            version: health["version"].as_str().unwrap_or("unknown").to_owned(),
            token,
            nodes,
        })
    }

    /// Renew the token when two thirds of its TTL have passed; log in
    /// again if renewal fails.
    async fn keep_token(&self) -> Result<(), BackendError> {
        let due = self.renew_at.lock().expect("renew lock").is_some_and(|t| Instant::now() >= t);
        if !due {
            return Ok(());
        }
        let renewed = self.auth_call(Verb::Post, "auth/token/renew-self", Some(&serde_json::json!({}))).await;
        match renewed {
            Ok(r) => {
                let ttl = r["auth"]["lease_duration"].as_u64().unwrap_or(0);
                self.schedule_renewal(ttl, r["auth"]["renewable"].as_bool().unwrap_or(false));
                tracing::info!(backend = %self.cfg.name, ttl, "renewed the token");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(backend = %self.cfg.name, error = %e, "token renewal failed; logging in again");
                self.login().await
            }
        }
    }

    fn data_api(&self, rel: &str) -> String {
        format!("{}/data/{}", encode(&self.cfg.mount), encode(rel))
    }

    fn metadata_api(&self, rel: &str) -> String {
        format!("{}/metadata/{}", encode(&self.cfg.mount), encode(rel))
    }

    /// Data map and version of `rel` (a version, or the current one).
    async fn read_raw(
        &self,
        rel: &str,
        version: Option<u64>,
    ) -> Result<(serde_json::Value, VersionMeta), BackendError> {
        let mut api = self.data_api(rel);
        if let Some(v) = version {
            api.push_str(&format!("?version={v}"));
        }
        let r = self.kv(Verb::Get, &api, None, rel).await?;
        let (data, md) = (&r["data"]["data"], &r["data"]["metadata"]);
        let deleted = md["deletion_time"].as_str().is_some_and(|t| !t.is_empty());
        if md["destroyed"].as_bool().unwrap_or(false) || deleted || data.is_null() {
            return Err(BackendError::NotFound(self.full(rel)));
        }
        let meta = VersionMeta {
            version: md["version"].as_u64().unwrap_or(0),
            created_unix_ms: parse_time(md["created_time"].as_str().unwrap_or_default()),
            size: 0,
        };
        Ok((data.clone(), meta))
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
            Err(BackendError::NotFound(_)) => (serde_json::json!({}), self.current_version_any(rel).await?),
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
        let body = serde_json::json!({ "data": data, "options": { "cas": current } });
        let written = self.kv(Verb::Post, &self.data_api(rel), Some(&body), rel).await?;
        let w = &written["data"];
        let meta = VersionMeta {
            version: w["version"].as_u64().unwrap_or(0),
            created_unix_ms: parse_time(w["created_time"].as_str().unwrap_or_default()),
            size: value.len() as u64,
        };
        self.remember(rel, meta.clone(), value.clone());
        Ok(meta)
    }

    /// The metadata of `rel` (404: NotFound).
    async fn metadata(&self, rel: &str) -> Result<serde_json::Value, BackendError> {
        Ok(self.kv(Verb::Get, &self.metadata_api(rel), None, rel).await?["data"].take())
    }

    /// Kept versions, oldest first (sizes are not known without reading).
    pub async fn history(&self, rel: &str) -> Result<Vec<VersionMeta>, BackendError> {
        let md = self.metadata(rel).await?;
        let mut out: Vec<VersionMeta> = md["versions"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| {
                !v["destroyed"].as_bool().unwrap_or(false) && v["deletion_time"].as_str().is_none_or(str::is_empty)
            })
            .filter_map(|(n, v)| {
                Some(VersionMeta {
                    version: n.parse().ok()?,
                    created_unix_ms: parse_time(v["created_time"].as_str().unwrap_or_default()),
                    size: 0,
                })
            })
            .collect();
        out.sort_by_key(|m| m.version);
        if out.is_empty() {
            return Err(BackendError::NotFound(self.full(rel)));
        }
        Ok(out)
    }

    /// Current metadata version of `rel`, or None if it does not exist
    /// or its current version is deleted or destroyed.
    async fn current_version(&self, rel: &str) -> Result<Option<u64>, BackendError> {
        match self.metadata(rel).await {
            Ok(md) => {
                let current = md["current_version"].as_u64().unwrap_or(0);
                let v = &md["versions"][current.to_string()];
                let live = v.is_object()
                    && !v["destroyed"].as_bool().unwrap_or(false)
                    && v["deletion_time"].as_str().is_none_or(str::is_empty);
                Ok(live.then_some(current))
            }
            Err(BackendError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The version a check-and-set write must name: the current one even
    /// if it is deleted (0: no such secret).
    async fn current_version_any(&self, rel: &str) -> Result<u64, BackendError> {
        match self.metadata(rel).await {
            Ok(md) => Ok(md["current_version"].as_u64().unwrap_or(0)),
            Err(BackendError::NotFound(_)) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Every secret at or under `rel_prefix` (relative paths).
    pub async fn list(&self, rel_prefix: &str) -> Result<Vec<String>, BackendError> {
        const MAX: usize = 10_000;
        let mut out = Vec::new();
        let mut dirs = vec![rel_prefix.trim_end_matches('/').to_owned()];
        while let Some(dir) = dirs.pop() {
            let api = format!("{}/?list=true", self.metadata_api(&dir).trim_end_matches('/'));
            let keys = match self.kv(Verb::Get, &api, None, &dir).await {
                Ok(r) => r["data"]["keys"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|k| k.as_str().map(str::to_owned)).collect::<Vec<_>>())
                    .unwrap_or_default(),
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
        self.kv(Verb::Delete, &self.metadata_api(rel), None, rel).await?;
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

    /// Status fields: (the node in use, kind of auth).
    pub fn describe(&self) -> (String, &'static str) {
        let auth = match self.cfg.auth {
            VaultAuth::TokenFile(_) => "token-file",
            VaultAuth::AppRole { .. } => "approle",
        };
        (self.nodes.in_use().to_owned(), auth)
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

/// The most of a lease response read (a certificate and chain are a few
/// KiB; anything far larger is not a lease).
const MAX_LEASE_BODY: usize = 1 << 20;

impl VaultBackend {
    /// One request to `v1/<rel>` with the client's token, its body JSON;
    /// on 403, log in again and retry once (see [`Self::request`]: to the
    /// node in use, moving on as [`nodes`] says).
    async fn call(
        &self,
        verb: Verb,
        rel: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, BackendError> {
        self.request(verb, rel, body, None, MAX_LEASE_BODY).await
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
