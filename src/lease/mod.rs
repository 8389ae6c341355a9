//! Per-container dynamic credentials: database logins (`dynamic:NAME`)
//! and X.509 certificates (`cert:NAME`) leased from a Vault/OpenBao
//! backend for exactly one container's life.
//!
//! A **source** names a backend and an engine path (`database/creds/web`,
//! `pki/issue/web`); it is stored sealed (table `lease_sources`) and
//! granted like a secret (`keyhole grant dynamic:NAME --to W`). The file
//! it shows is the same node in every container's mount of the workload,
//! but each container reads its own **lease**: one per (source, workload,
//! container), issued on the container's first open (the open is parked
//! by the FUSE pool, off the workers, until the lease arrives — see
//! [`Leases::obtain`]), shared by its later opens, never by another
//! container. Leased files are served with direct I/O, so no container is
//! ever handed another's cached pages.
//!
//! The [`keeper`] renews each lease at two thirds of its TTL; when the
//! engine caps a renewal (the role's `max_ttl`), or a certificate is two
//! thirds through its life, a new lease is issued ahead of expiry and the
//! file changes (a new inode; `--notify` applies). It revokes a lease when
//! its reason ends: the container died or was removed (Docker events, and
//! a sweep for missed ones), the grant was revoked, the workload or the
//! source removed. A failed revocation stays in the store and is retried
//! (audited and counted each time) until it succeeds.
//!
//! Leases are sealed in the store (table `leases`, the rendered file
//! included), so a restart, `kill -9` or takeover keeps each container's
//! credentials, and a broker that starts revokes the leases of containers
//! that died while none ran.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::audit::{Event, EventKind};
use crate::backend::BackendError;
use crate::backend::local::{LEASE_SOURCES, LEASES};
use crate::backend::vault::{Issued, VaultBackend};
use crate::broker::Broker;
use crate::identity::Identity;
use crate::secret::SecretBytes;

/// Why a lease operation failed. Messages name sources, backends and
/// containers, never credentials.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("no source {0}: add it first (keyhole dynamic add / keyhole cert add)")]
    NoSource(String),
    #[error("source {id} names backend {backend}, which is not configured")]
    NoBackend { id: String, backend: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("too many live leases ({0}); none is issued until some are revoked")]
    TooMany(usize),
    #[error("the broker is stopping")]
    Stopping,
}

/// Most leases held at once (every container of every workload).
pub const MAX_LEASES: usize = 10_000;
/// Most issue requests in flight at once, to any backend.
const MAX_ISSUING: usize = 16;
/// The size a leased file shows: above any rendered content (a rendered
/// lease larger than this is refused), so no reader stops short. Reads
/// are direct, so the kernel asks for what is there.
pub const LEASED_SIZE: usize = 64 * 1024;
/// How often the keeper looks at the leases (renewals, retries).
const TICK: Duration = Duration::from_secs(1);
/// How often the keeper asks Docker about every lease's container, for
/// events it missed.
const SWEEP: Duration = Duration::from_secs(15);
/// After a failed renewal or revocation, wait this long before the next
/// try (doubling, up to [`RETRY_MAX`]).
const RETRY_MIN: u64 = 2;
const RETRY_MAX: u64 = 60;
/// Failed revocation tries audited one by one; later, one in
/// [`AUDIT_EVERY`] (about one an hour at [`RETRY_MAX`]).
const AUDIT_FIRST: u32 = 5;
const AUDIT_EVERY: u32 = 60;
/// A failed issue is not asked again for this long (every open in the
/// meantime fails at once), so a backend outage costs one request.
const ISSUE_BACKOFF: Duration = Duration::from_secs(2);

/// What a source leases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A dynamic secrets engine's credentials (`database/creds/ROLE`).
    Dynamic,
    /// A certificate from the PKI engine (`pki/issue/ROLE`).
    Cert,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Dynamic => "dynamic",
            Kind::Cert => "cert",
        }
    }
}

/// A dynamic source, as `keyhole dynamic add` / `keyhole cert add` made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub kind: Kind,
    pub name: String,
    pub backend: String,
    /// The engine path: `database/creds/web`, `pki/issue/web`.
    pub path: String,
    /// Certificates: the URI SAN, with placeholders.
    #[serde(default)]
    pub uri: Option<String>,
    /// Certificates: the common name, with placeholders.
    #[serde(default)]
    pub cn: Option<String>,
    /// Certificates: the TTL asked for (None: the role's).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

impl Source {
    /// `dynamic:NAME` or `cert:NAME`: how grants name it.
    pub fn id(&self) -> String {
        format!("{}:{}", self.kind.as_str(), self.name)
    }

    /// A source as asked for, checked.
    pub fn new(
        kind: Kind,
        name: &str,
        backend: &str,
        path: &str,
        uri: Option<&str>,
        cn: Option<&str>,
        ttl: Option<&str>,
    ) -> Result<Source, LeaseError> {
        crate::policy::check_source_name(name).map_err(|e| LeaseError::Invalid(e.to_string()))?;
        let path = path.trim_matches('/');
        crate::secret::SecretPath::parse(path)
            .map_err(|e| LeaseError::Invalid(format!("engine path {path:?}: {e}")))?;
        let (uri, cn, ttl_secs) = match kind {
            Kind::Dynamic => {
                if uri.is_some() || cn.is_some() || ttl.is_some() {
                    return Err(LeaseError::Invalid("--uri, --cn and --ttl are for certificates".into()));
                }
                (None, None, None)
            }
            Kind::Cert => {
                if !path.contains("/issue/") {
                    return Err(LeaseError::Invalid(format!(
                        "--issue {path:?} is not a PKI issue path like pki/issue/ROLE"
                    )));
                }
                let uri = uri.ok_or_else(|| LeaseError::Invalid("a certificate needs --uri".into()))?;
                check_pattern(uri, "--uri")?;
                if let Some(cn) = cn {
                    check_pattern(cn, "--cn")?;
                }
                let ttl = ttl
                    .map(|t| {
                        humantime::parse_duration(t)
                            .map_err(|e| LeaseError::Invalid(format!("--ttl {t:?}: {e}")))
                            .and_then(|d| match d.as_secs() {
                                s if s >= 60 => Ok(s),
                                _ => Err(LeaseError::Invalid("--ttl must be at least 1m".into())),
                            })
                    })
                    .transpose()?;
                (Some(uri.to_owned()), cn.map(str::to_owned), ttl)
            }
        };
        Ok(Source {
            kind,
            name: name.to_owned(),
            backend: backend.to_owned(),
            path: path.to_owned(),
            uri,
            cn,
            ttl_secs,
        })
    }

    /// The PKI mount of a certificate source (`pki` of `pki/issue/web`).
    fn pki_mount(&self) -> Option<&str> {
        self.path.split_once("/issue/").map(|(m, _)| m)
    }
}

/// The placeholders a certificate's URI and CN may use.
const PLACEHOLDERS: [&str; 3] = ["{workload}", "{container_name}", "{container_id}"];

fn check_pattern(p: &str, what: &str) -> Result<(), LeaseError> {
    if p.is_empty() || p.len() > 1024 || p.contains(char::is_control) || p.contains(',') {
        return Err(LeaseError::Invalid(format!("{what} must be 1-1024 printable characters, no comma")));
    }
    let mut rest = p.to_owned();
    for ph in PLACEHOLDERS {
        rest = rest.replace(ph, "");
    }
    if rest.contains(['{', '}']) {
        return Err(LeaseError::Invalid(format!("{what} {p:?}: the placeholders are {}", PLACEHOLDERS.join(", "))));
    }
    Ok(())
}

/// Fill a pattern's placeholders from the attested holder.
fn fill(p: &str, h: &Holder) -> String {
    p.replace("{workload}", &h.workload).replace("{container_name}", &h.name).replace("{container_id}", &h.container)
}

/// Who a lease is for: a container (its full id), or a host user
/// (`uid:N`), of a workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub workload: String,
    pub container: String,
    pub name: String,
}

impl Holder {
    /// The holder an attested caller of `workload` is.
    pub fn of(id: &Identity, workload: &str) -> Holder {
        match &id.container_id {
            Some(c) => Holder {
                workload: workload.to_owned(),
                container: c.clone(),
                name: id.docker.as_ref().map_or_else(|| c[..12.min(c.len())].to_owned(), |d| d.name.clone()),
            },
            // A user namespace's host uids are all its owner's: one holder
            // (else a user with subordinate ids takes a lease per uid).
            None => {
                let uid = id.userns_owner.unwrap_or(id.uid);
                Holder { workload: workload.to_owned(), container: format!("uid:{uid}"), name: format!("uid-{uid}") }
            }
        }
    }

    fn in_container(&self) -> bool {
        !self.container.starts_with("uid:")
    }
}

/// The store key of a lease (`grant`: see [`Lease::grant`]).
fn key(grant: &str, workload: &str, container: &str) -> String {
    format!("{grant}|{workload}|{container}")
}

/// A lease's grant split into (template, source): `@template/T#dynamic:db`
/// is (Some("@template/T"), "dynamic:db"); `dynamic:db` is (None, it).
pub fn split_grant(grant: &str) -> (Option<&str>, &str) {
    match grant.split_once('#') {
        Some((t, s)) => (Some(t), s),
        None => (None, grant),
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// One live lease. `body` is the file's content (credentials): sealed in
/// the store with the rest, never listed, left out of `Debug`, zeroed
/// when dropped.
#[derive(Clone, Serialize, Deserialize)]
pub struct Lease {
    pub source: String,
    /// The template grant (`@template/NAME`) this lease serves, when a
    /// template reads it (`dynamic("NAME")`): a lease of its own, apart
    /// from a direct grant's and from other templates'.
    #[serde(default)]
    pub via: Option<String>,
    pub workload: String,
    pub container: String,
    pub container_name: String,
    pub backend: String,
    /// The engine's lease id (empty for a certificate).
    pub lease_id: String,
    /// A certificate's serial and PKI mount.
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub pki_mount: Option<String>,
    pub issued_unix: u64,
    /// When it was last issued or renewed, and for how long.
    pub renewed_unix: u64,
    pub ttl_secs: u64,
    pub expires_unix: u64,
    pub renewable: bool,
    body: String,
    /// Why it is being revoked (it stays, retried, until the backend
    /// confirms), and how many tries failed.
    #[serde(default)]
    pub revoking: Option<String>,
    #[serde(default)]
    pub failures: u32,
    /// Not before this (unix s): the next renewal or revocation try.
    #[serde(default)]
    retry_at: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.body);
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("source", &self.source)
            .field("workload", &self.workload)
            .field("container", &self.container)
            .field("expires_unix", &self.expires_unix)
            .finish_non_exhaustive()
    }
}

impl Lease {
    fn key(&self) -> String {
        key(&self.grant(), &self.workload, &self.container)
    }

    /// What it was issued for: `dynamic:NAME`, or
    /// `@template/T#dynamic:NAME` for a template's.
    pub fn grant(&self) -> String {
        match &self.via {
            Some(t) => format!("{t}#{}", self.source),
            None => self.source.clone(),
        }
    }

    /// When to renew (or roll): two thirds into its current term.
    fn renew_at(&self) -> u64 {
        self.renewed_unix + self.ttl_secs * 2 / 3
    }
}

/// One row of `keyhole leases`: never a credential.
#[derive(Clone, Debug, Serialize)]
pub struct LeaseInfo {
    pub source: String,
    pub workload: String,
    pub container: String,
    pub container_name: String,
    pub backend: String,
    pub issued_unix: u64,
    pub expires_unix: u64,
    pub serial: Option<String>,
    /// "live"; "revoking" (being revoked now); "revoke pending" (a
    /// revocation failed and is retried, with backoff).
    pub state: String,
    /// The template grant it serves (`@template/NAME`), if any.
    pub template: Option<String>,
    /// Failed revocation tries so far.
    pub failures: u32,
}

/// Render what a container reads from an issued lease.
fn render(src: &Source, issued: &Issued, expires: u64) -> Result<(String, Option<String>), LeaseError> {
    let body = match src.kind {
        Kind::Dynamic => {
            let mut out = serde_json::Map::new();
            if let Some(data) = issued.data.as_object() {
                for (k, v) in data {
                    out.insert(k.clone(), v.clone());
                }
            }
            out.insert("expires_at".into(), serde_json::Value::String(rfc3339(expires)));
            let mut s = serde_json::Value::Object(out).to_string();
            s.push('\n');
            s
        }
        Kind::Cert => {
            let d = &issued.data;
            let mut s = String::new();
            for part in [d["certificate"].as_str()].into_iter().flatten() {
                s.push_str(part.trim_end());
                s.push('\n');
            }
            match d["ca_chain"].as_array().filter(|a| !a.is_empty()) {
                Some(chain) => {
                    for c in chain.iter().filter_map(|c| c.as_str()) {
                        s.push_str(c.trim_end());
                        s.push('\n');
                    }
                }
                None => {
                    if let Some(ca) = d["issuing_ca"].as_str() {
                        s.push_str(ca.trim_end());
                        s.push('\n');
                    }
                }
            }
            if let Some(k) = d["private_key"].as_str() {
                s.push_str(k.trim_end());
                s.push('\n');
            }
            s
        }
    };
    if body.len() > LEASED_SIZE {
        return Err(LeaseError::Invalid(format!(
            "{} rendered {} bytes; the limit is {LEASED_SIZE}",
            src.id(),
            body.len()
        )));
    }
    let serial = issued.data["serial_number"].as_str().map(str::to_owned);
    Ok((body, serial))
}

/// Labels of `keyhole_lease_revocations_total`.
fn count_revocation(result: &str) {
    crate::metrics::lease_revoked(result);
}

/// The leases of one broker.
pub struct Leases {
    sources: RwLock<BTreeMap<String, Source>>,
    live: Mutex<BTreeMap<String, Lease>>,
    /// Leases being issued now: their waiters watch for the end.
    issuing: Mutex<HashMap<String, tokio::sync::watch::Receiver<bool>>>,
    /// Issues that failed lately: not asked again until the time passes.
    failed: Mutex<HashMap<String, std::time::Instant>>,
    /// Bumped when a source's leases roll: a new inode for its file.
    generations: Mutex<HashMap<String, u64>>,
    permits: Arc<tokio::sync::Semaphore>,
    broker: OnceLock<Weak<Broker>>,
    rt: tokio::runtime::Handle,
    /// Templates that read leases: rendered per caller at each open.
    pub templates: crate::template::leased::Registry,
    /// Host users' leases: open handles, and since when none is open.
    holds: Mutex<HashMap<String, Hold>>,
    /// Leases whose revocation is in flight now: the keeper's retry must
    /// not revoke one a second time while the first try is under way.
    revoking_now: Mutex<std::collections::HashSet<String>>,
}

/// The open handles of a host user's lease (see [`Leases::hold`]).
#[derive(Clone, Copy, Debug)]
struct Hold {
    open: usize,
    /// When the last handle closed (or the lease was first seen).
    since: u64,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases").finish_non_exhaustive()
    }
}

impl Leases {
    /// The sources and leases the store holds.
    pub fn load(store: &crate::backend::local::LocalStore, rt: tokio::runtime::Handle) -> anyhow::Result<Leases> {
        let sources: Vec<(String, Source)> = store.records(LEASE_SOURCES)?;
        let leases: Vec<(String, Lease)> = store.records(LEASES)?;
        // Keyed as stored: a rolled-over lease awaiting revocation has a key of its own.
        let live: BTreeMap<String, Lease> = leases.into_iter().collect();
        crate::metrics::METRICS.leases.set(live.len() as i64);
        Ok(Leases {
            sources: RwLock::new(sources.into_iter().collect()),
            live: Mutex::new(live),
            issuing: Mutex::default(),
            failed: Mutex::default(),
            generations: Mutex::default(),
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_ISSUING)),
            broker: OnceLock::new(),
            rt,
            templates: Default::default(),
            holds: Mutex::default(),
            revoking_now: Mutex::default(),
        })
    }

    /// Tie to the running broker (for the store, backends, audit).
    pub fn attach(&self, broker: &Arc<Broker>) {
        let _ = self.broker.set(Arc::downgrade(broker));
    }

    fn broker(&self) -> Option<Arc<Broker>> {
        self.broker.get().and_then(Weak::upgrade)
    }

    // ------------------------------------------------------------ sources

    pub fn source(&self, id: &str) -> Option<Source> {
        self.sources.read().expect("sources lock").get(id).cloned()
    }

    pub fn sources(&self) -> Vec<Source> {
        self.sources.read().expect("sources lock").values().cloned().collect()
    }

    /// Record a source (the caller stored it).
    pub(crate) fn set_source(&self, s: Source) {
        self.sources.write().expect("sources lock").insert(s.id(), s);
    }

    /// Forget a source (the caller removed it from the store).
    pub(crate) fn drop_source(&self, id: &str) -> bool {
        self.sources.write().expect("sources lock").remove(id).is_some()
    }

    /// The version a granted source's file shows (a new one when its
    /// leases roll); None if there is no such source.
    pub fn generation(&self, id: &str) -> Option<u64> {
        self.source(id)?;
        Some(*self.generations.lock().expect("generations lock").get(id).unwrap_or(&1))
    }

    // ------------------------------------------------------------ serving

    /// What `holder` reads from `source` now: its live lease's content;
    /// None if it has none, or it expired (an outage outlasted it).
    pub fn body_for(&self, source: &str, holder: &Holder) -> Result<Arc<SecretBytes>, &'static str> {
        let live = self.live.lock().expect("leases lock");
        match live.get(&key(source, &holder.workload, &holder.container)) {
            Some(l) if l.revoking.is_some() => Err("its lease is being revoked"),
            Some(l) if l.expires_unix <= now() => Err("its lease expired (is the backend reachable?)"),
            Some(l) => Ok(Arc::new(SecretBytes::copy_from(l.body.as_bytes()))),
            None => Err("no lease could be issued for this caller (is the backend reachable?)"),
        }
    }

    /// The fields of `holder`'s live lease of `source`, for templates
    /// (`dynamic("NAME").username`, `cert("NAME").cert`, `.key`, `.ca`):
    /// a dynamic lease's JSON object; for a certificate, `cert` (the
    /// leaf), `ca` (the chain) and `key`, each PEM. Holds credentials.
    pub fn fields(&self, source: &str, holder: &Holder) -> Result<serde_json::Value, &'static str> {
        let body = self.body_for(source, holder)?;
        let text = std::str::from_utf8(body.expose()).map_err(|_| "a lease that is not text")?;
        if split_grant(source).1.starts_with("dynamic:") {
            return serde_json::from_str(text).map_err(|_| "a lease that is not JSON");
        }
        Ok(pem_fields(text))
    }

    /// Whether a file (`secret` at `version`) shows each caller its own
    /// content: a `dynamic:`/`cert:` grant, or a template reading leases.
    pub fn is_leased_node(&self, secret: &str, version: u64) -> bool {
        crate::policy::leased(secret).is_some()
            || (secret.starts_with(crate::secret::TEMPLATE_PREFIX) && self.templates.get(secret, version).is_some())
    }

    /// The leases (by grant, see [`Lease::grant`]) a file's caller reads.
    fn grants_of(&self, secret: &str, version: u64) -> Vec<String> {
        if crate::policy::leased(secret).is_some() {
            return vec![secret.to_owned()];
        }
        match self.templates.get(secret, version) {
            Some(d) => d.sources.iter().map(|s| format!("{secret}#{s}")).collect(),
            None => Vec::new(),
        }
    }

    /// For an open of a leased file: None if `holder` has every lease it
    /// needs; otherwise a future that ends once each missing one is
    /// issued or failed (their issues run at once, in the background).
    pub fn wait_for(
        self: &Arc<Self>,
        secret: &str,
        version: u64,
        holder: &Holder,
    ) -> Option<crate::identity::docker::Wait> {
        let waits: Vec<_> = self
            .grants_of(secret, version)
            .into_iter()
            .filter(|g| !self.ready(g, holder))
            .map(|g| self.obtain(&g, holder.clone()))
            .collect();
        if waits.is_empty() {
            return None;
        }
        Some(Box::pin(async move {
            for w in waits {
                w.await;
            }
        }))
    }

    /// What `holder` reads from a leased file (`secret` at `version`): its
    /// own lease's content, or the template rendered from its own leases.
    /// The error names sources and reasons, never a value.
    pub fn body_for_node(&self, secret: &str, version: u64, holder: &Holder) -> Result<Arc<SecretBytes>, String> {
        if crate::policy::leased(secret).is_some() {
            return self.body_for(secret, holder).map_err(str::to_owned);
        }
        let d = self
            .templates
            .get(secret, version)
            .ok_or_else(|| "this rendering of the template is gone; open the file again".to_owned())?;
        let mut fields = BTreeMap::new();
        for s in &d.sources {
            let f = self.fields(&format!("{secret}#{s}"), holder).map_err(|e| format!("{s}: {e}"))?;
            fields.insert(s.clone(), f);
        }
        crate::template::leased::render_for(&d, fields).map(Arc::new).map_err(|e| format!("{secret}: {e}"))
    }

    /// An open handle of a leased file by a host user: its leases are
    /// held (not revoked for idleness) until [`Leases::unhold`]. Returns
    /// the lease keys held (none for a container: its leases end with it).
    pub fn hold(&self, secret: &str, version: u64, holder: &Holder) -> Vec<String> {
        if holder.in_container() {
            return Vec::new();
        }
        let keys: Vec<String> =
            self.grants_of(secret, version).iter().map(|g| key(g, &holder.workload, &holder.container)).collect();
        let mut holds = self.holds.lock().expect("holds lock");
        for k in &keys {
            holds.entry(k.clone()).or_insert(Hold { open: 0, since: now() }).open += 1;
        }
        keys
    }

    /// A handle [`Leases::hold`] counted was closed.
    pub fn unhold(&self, keys: &[String]) {
        let mut holds = self.holds.lock().expect("holds lock");
        for k in keys {
            if let Some(h) = holds.get_mut(k) {
                h.open = h.open.saturating_sub(1);
                if h.open == 0 {
                    h.since = now();
                }
            }
        }
    }

    /// Host users' leases no handle has held open for one TTL: revoked.
    /// A lease not seen before (issued, or loaded at start) starts its
    /// idle time now.
    fn revoke_idle(self: &Arc<Self>) -> usize {
        let t = now();
        let idle: BTreeSet<String> = {
            let live = self.live.lock().expect("leases lock");
            let mut holds = self.holds.lock().expect("holds lock");
            holds.retain(|k, h| h.open > 0 || live.contains_key(k));
            live.iter()
                .filter(|(k, l)| l.revoking.is_none() && k.as_str() == l.key())
                .filter(|(_, l)| l.container.starts_with("uid:"))
                .filter(|(k, l)| {
                    let h = holds.entry((*k).clone()).or_insert(Hold { open: 0, since: t });
                    h.open == 0 && t >= h.since + l.ttl_secs.max(1)
                })
                .map(|(k, _)| k.clone())
                .collect()
        };
        if idle.is_empty() {
            return 0;
        }
        self.revoke_where("no process of its user held the file open for one TTL", |l| idle.contains(&l.key()))
    }

    /// Whether `holder` has a live lease of `source` (an open need not wait).
    pub fn ready(&self, source: &str, holder: &Holder) -> bool {
        self.body_for(source, holder).is_ok()
    }

    /// A future that ends when `holder`'s lease of `source` is issued (or
    /// its issue failed): issues it if none is live or under way. The
    /// issue goes on even if the waiter stops waiting.
    pub fn obtain(
        self: &Arc<Self>,
        source: &str,
        holder: Holder,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        let k = key(source, &holder.workload, &holder.container);
        if self.live.lock().expect("leases lock").contains_key(&k) {
            return Box::pin(async {});
        }
        let mut issuing = self.issuing.lock().expect("issuing lock");
        if let Some(rx) = issuing.get(&k) {
            let mut rx = rx.clone();
            return Box::pin(async move {
                let _ = rx.wait_for(|done| *done).await;
            });
        }
        if self.failed.lock().expect("failed lock").get(&k).is_some_and(|t| t.elapsed() < ISSUE_BACKOFF) {
            return Box::pin(async {});
        }
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        issuing.insert(k.clone(), rx.clone());
        drop(issuing);
        let (me, source) = (self.clone(), source.to_owned());
        self.rt.spawn(async move {
            let outcome = me.issue(&source, &holder).await;
            match &outcome {
                Ok(()) => {
                    me.failed.lock().expect("failed lock").remove(&k);
                }
                Err(e) => {
                    me.failed.lock().expect("failed lock").insert(k.clone(), std::time::Instant::now());
                    tracing::warn!(source = %source, container = %holder.container, error = %e, "cannot issue a lease");
                    me.audit_issue(&source, &holder, Some(&e.to_string()));
                }
            }
            me.issuing.lock().expect("issuing lock").remove(&k);
            let _ = tx.send(true);
        });
        Box::pin(async move {
            let _ = rx.wait_for(|done| *done).await;
        })
    }

    fn vault(&self, b: &Broker, src: &Source) -> Result<Arc<VaultBackend>, LeaseError> {
        b.backend_named(&src.backend)
            .cloned()
            .ok_or_else(|| LeaseError::NoBackend { id: src.id(), backend: src.backend.clone() })
    }

    /// Ask the backend for a new lease of `src` for `holder`.
    async fn fetch(&self, b: &Broker, src: &Source, holder: &Holder, via: Option<&str>) -> Result<Lease, LeaseError> {
        let v = self.vault(b, src)?;
        let _permit = self.permits.clone().acquire_owned().await.map_err(|_| LeaseError::Stopping)?;
        let issued = match src.kind {
            Kind::Dynamic => v.lease_issue(&src.path).await?,
            Kind::Cert => {
                if !holder.in_container() {
                    return Err(LeaseError::Invalid("certificates are issued to containers only".into()));
                }
                let uri = fill(src.uri.as_deref().unwrap_or_default(), holder);
                let cn = fill(src.cn.as_deref().unwrap_or("{container_name}"), holder);
                v.cert_issue(&src.path, &cn, &uri, src.ttl_secs).await?
            }
        };
        let t = now();
        let expires = t + issued.lease_duration;
        let (body, serial) = match render(src, &issued, expires) {
            Ok(r) => r,
            Err(e) => {
                // Issued but unusable: give it back at once.
                if !issued.lease_id.is_empty() {
                    let _ = v.lease_revoke(&issued.lease_id).await;
                }
                return Err(e);
            }
        };
        Ok(Lease {
            source: src.id(),
            via: via.map(str::to_owned),
            workload: holder.workload.clone(),
            container: holder.container.clone(),
            container_name: holder.name.clone(),
            backend: src.backend.clone(),
            lease_id: issued.lease_id.clone(),
            pki_mount: serial.as_ref().and(src.pki_mount().map(str::to_owned)),
            serial,
            issued_unix: t,
            renewed_unix: t,
            ttl_secs: issued.lease_duration,
            expires_unix: expires,
            renewable: issued.renewable,
            body,
            revoking: None,
            failures: 0,
            retry_at: 0,
        })
    }

    async fn issue(&self, grant: &str, holder: &Holder) -> Result<(), LeaseError> {
        let b = self.broker().ok_or(LeaseError::Stopping)?;
        let (via, source) = split_grant(grant);
        let src = self.source(source).ok_or_else(|| LeaseError::NoSource(source.to_owned()))?;
        let n = self.live.lock().expect("leases lock").len();
        if n >= MAX_LEASES {
            return Err(LeaseError::TooMany(n));
        }
        let lease = self.fetch(&b, &src, holder, via).await?;
        self.persist(&b, &lease.key(), &lease).await;
        self.audit_issue(grant, holder, None);
        tracing::info!(source, container = %holder.container, ttl = lease.ttl_secs, "issued a lease");
        let mut live = self.live.lock().expect("leases lock");
        live.insert(lease.key(), lease);
        crate::metrics::METRICS.leases.set(live.len() as i64);
        Ok(())
    }

    async fn persist(&self, b: &Arc<Broker>, k: &str, lease: &Lease) {
        let (b, l, k) = (b.clone(), lease.clone(), k.to_owned());
        let stored = tokio::task::spawn_blocking(move || b.store().put_record(LEASES, &k, &l)).await;
        if !matches!(stored, Ok(Ok(()))) {
            tracing::error!(source = %lease.source, container = %lease.container, "cannot store a lease: a restart would not revoke it");
        }
    }

    fn audit_issue(&self, source: &str, holder: &Holder, error: Option<&str>) {
        let Some(b) = self.broker() else { return };
        let reason = match error {
            None => format!("container={} name={}", holder.container, holder.name),
            Some(e) => format!("container={} name={}: {e}", holder.container, holder.name),
        };
        let event = if error.is_some() { EventKind::LeaseError } else { EventKind::LeaseIssue };
        let _ = b.audit().record(&Event {
            workload: Some(&holder.workload),
            path: Some(source),
            reason: Some(&reason),
            ..Event::new(event)
        });
    }

    // ------------------------------------------------------------ listing

    pub fn list(&self, workload: Option<&str>) -> Vec<LeaseInfo> {
        let live = self.live.lock().expect("leases lock");
        live.values()
            .filter(|l| workload.is_none_or(|w| l.workload == w))
            .map(|l| LeaseInfo {
                source: l.source.clone(),
                workload: l.workload.clone(),
                container: l.container.clone(),
                container_name: l.container_name.clone(),
                backend: l.backend.clone(),
                issued_unix: l.issued_unix,
                expires_unix: l.expires_unix,
                serial: l.serial.clone(),
                state: match (&l.revoking, l.failures) {
                    (None, _) => "live".into(),
                    (Some(_), 0) => "revoking".into(),
                    (Some(_), _) => "revoke pending".into(),
                },
                template: l.via.clone(),
                failures: l.failures,
            })
            .collect()
    }

    pub fn count(&self) -> usize {
        self.live.lock().expect("leases lock").len()
    }

    /// Leases whose revocation failed and is being retried: (how many,
    /// the most failed tries of one). For `keyhole status` and `doctor`.
    pub fn pending_revocations(&self) -> (usize, u32) {
        let live = self.live.lock().expect("leases lock");
        live.values()
            .filter(|l| l.revoking.is_some() && l.failures > 0)
            .fold((0, 0), |(n, most), l| (n + 1, most.max(l.failures)))
    }

    // ------------------------------------------------------------ revocation

    /// Revoke every lease `pred` picks, for `why`; returns how many. Each
    /// is marked (and stored) as being revoked first, so a failure or a
    /// crash midway is retried.
    pub fn revoke_where(self: &Arc<Self>, why: &str, pred: impl Fn(&Lease) -> bool) -> usize {
        let picked: Vec<String> = {
            let mut live = self.live.lock().expect("leases lock");
            live.iter_mut()
                .filter(|(_, l)| l.revoking.is_none() && pred(l))
                .map(|(k, l)| {
                    l.revoking = Some(why.to_owned());
                    l.retry_at = 0;
                    k.clone()
                })
                .collect()
        };
        for k in &picked {
            let me = self.clone();
            let k = k.clone();
            self.rt.spawn(async move { me.revoke_one(&k).await });
        }
        picked.len()
    }

    /// Try to revoke one lease marked as being revoked; on success it is
    /// forgotten (and removed from the store), otherwise retried later.
    async fn revoke_one(&self, k: &str) {
        // One try at a time per lease (a container's end and the keeper's
        // retry could both start one: revoked, counted and audited twice).
        if !self.revoking_now.lock().expect("revoking lock").insert(k.to_owned()) {
            return;
        }
        self.revoke_now(k).await;
        self.revoking_now.lock().expect("revoking lock").remove(k);
    }

    async fn revoke_now(&self, k: &str) {
        let Some(b) = self.broker() else { return };
        let Some(lease) = self.live.lock().expect("leases lock").get(k).cloned() else { return };
        let why = lease.revoking.clone().unwrap_or_default();
        let outcome = match b.backend_named(&lease.backend) {
            None => Err(format!("backend {} is not configured", lease.backend)),
            Some(v) => match (&lease.serial, &lease.pki_mount) {
                (Some(serial), Some(mount)) => v.cert_revoke(mount, serial).await.map_err(|e| e.to_string()),
                _ => v.lease_revoke(&lease.lease_id).await.map_err(|e| e.to_string()),
            },
        };
        let what = match &lease.serial {
            Some(s) => format!("container={} name={} serial={s}", lease.container, lease.container_name),
            None => format!("container={} name={}", lease.container, lease.container_name),
        };
        match outcome {
            Ok(()) => {
                {
                    let mut live = self.live.lock().expect("leases lock");
                    live.remove(k);
                    crate::metrics::METRICS.leases.set(live.len() as i64);
                }
                let key = k.to_owned();
                let bb = b.clone();
                let _ = tokio::task::spawn_blocking(move || bb.store().remove_record(LEASES, &key)).await;
                count_revocation("ok");
                let reason = format!("{what}: {why}; result=ok");
                tracing::info!(source = %lease.source, container = %lease.container, "revoked a lease");
                let _ = b.audit().record(&Event {
                    workload: Some(&lease.workload),
                    path: Some(&lease.source),
                    reason: Some(&reason),
                    ..Event::new(EventKind::LeaseRevoke)
                });
            }
            Err(e) => {
                count_revocation("failed");
                let stored = {
                    let mut live = self.live.lock().expect("leases lock");
                    live.get_mut(k).map(|l| {
                        l.failures += 1;
                        let wait = (RETRY_MIN << l.failures.min(5)).min(RETRY_MAX);
                        l.retry_at = now() + wait;
                        l.clone()
                    })
                };
                if let Some(l) = stored {
                    self.persist(&b, k, &l).await;
                }
                let tries = lease.failures + 1;
                let reason = format!("{what}: {why}; result=failed (try {tries}): {e}; retried");
                tracing::error!(source = %lease.source, container = %lease.container, error = %e, tries, "cannot revoke a lease; it will be retried");
                // Every try is counted; audited are the first few, then
                // one in AUDIT_EVERY (a long outage of many leases must
                // not flood the log; the backoff bounds the rate too).
                if tries <= AUDIT_FIRST || tries % AUDIT_EVERY == 0 {
                    let _ = b.audit().record(&Event {
                        workload: Some(&lease.workload),
                        path: Some(&lease.source),
                        reason: Some(&reason),
                        ..Event::new(EventKind::LeaseRevoke)
                    });
                }
            }
        }
    }

    /// Revoke the leases of a container that ended.
    pub fn container_gone(self: &Arc<Self>, id: &str) -> usize {
        self.revoke_where("the container ended", |l| l.container == id)
    }

    /// Revoke the leases whose grant, workload or source is gone
    /// (`grants`: (workload, source) pairs granted now).
    pub fn policy_changed(self: &Arc<Self>, grants: &std::collections::BTreeSet<(String, String)>) -> usize {
        let sources: std::collections::BTreeSet<String> =
            self.sources.read().expect("sources lock").keys().cloned().collect();
        let mut n = self.revoke_where("its source was removed", |l| !sources.contains(&l.source));
        n += self.revoke_where("its grant was revoked", |l| {
            let granted = l.via.clone().unwrap_or_else(|| l.source.clone());
            !grants.contains(&(l.workload.clone(), granted))
        });
        n
    }

    // ------------------------------------------------------------ upkeep

    /// Renew (or roll) the leases that are due, and retry revocations.
    async fn tick(self: &Arc<Self>) {
        let t = now();
        let due: Vec<(String, Lease)> = {
            let live = self.live.lock().expect("leases lock");
            live.iter()
                .filter(|(_, l)| l.retry_at <= t && (l.revoking.is_some() || l.renew_at() <= t))
                .map(|(k, l)| (k.clone(), l.clone()))
                .collect()
        };
        for (k, l) in due {
            if l.revoking.is_some() {
                self.revoke_one(&k).await;
            } else if k == l.key() {
                self.renew(l).await;
            }
        }
    }

    /// Renew one lease; when the engine caps it (max_ttl) or it cannot be
    /// renewed (a certificate), issue a new one and revoke the old.
    async fn renew(self: &Arc<Self>, l: Lease) {
        let Some(b) = self.broker() else { return };
        let Some(src) = self.source(&l.source) else { return };
        let Ok(v) = self.vault(&b, &src) else { return };
        let k = l.key();
        if l.renewable && !l.lease_id.is_empty() {
            match v.lease_renew(&l.lease_id, l.ttl_secs).await {
                // Renewed for a full term: same credentials, new expiry.
                Ok(d) if d + 1 >= l.ttl_secs || d >= 3600 => {
                    let t = now();
                    let updated = {
                        let mut live = self.live.lock().expect("leases lock");
                        live.get_mut(&k).map(|x| {
                            x.renewed_unix = t;
                            x.ttl_secs = d.max(1);
                            x.expires_unix = t + d;
                            x.failures = 0;
                            x.retry_at = 0;
                            x.body = rerender_expiry(&x.body, x.expires_unix);
                            x.clone()
                        })
                    };
                    if let Some(x) = updated {
                        self.persist(&b, &k, &x).await;
                        tracing::info!(source = %x.source, container = %x.container, ttl = d, "renewed a lease");
                    }
                    return;
                }
                Ok(_) => {} // capped by max_ttl: roll below
                Err(e) => {
                    self.retry_later(&k, &e.to_string());
                    return;
                }
            }
        }
        // Roll: a new lease for the same holder, ahead of expiry.
        let holder =
            Holder { workload: l.workload.clone(), container: l.container.clone(), name: l.container_name.clone() };
        match self.fetch(&b, &src, &holder, l.via.as_deref()).await {
            Ok(new) => {
                self.persist(&b, &k, &new).await;
                let old = {
                    let mut live = self.live.lock().expect("leases lock");
                    live.insert(k.clone(), new)
                };
                *self.generations.lock().expect("generations lock").entry(l.source.clone()).or_insert(1) += 1;
                self.audit_issue(&l.grant(), &holder, None);
                tracing::info!(source = %l.source, container = %l.container, "rolled a lease to a new one");
                // The old one goes (revoked in the background, retried).
                if let Some(mut old) = old {
                    old.revoking = Some("replaced by a new lease".into());
                    old.retry_at = 0;
                    // Keyed apart so it is retried (and survives restarts) on its own.
                    let bk = format!("{k}|old{}", old.issued_unix);
                    self.persist(&b, &bk, &old).await;
                    self.live.lock().expect("leases lock").insert(bk, old);
                }
                let bb = b.clone();
                let src_id = l.source.clone();
                let _ = tokio::task::spawn_blocking(move || bb.leases_changed(vec![src_id])).await;
            }
            Err(e) => self.retry_later(&k, &e.to_string()),
        }
    }

    fn retry_later(&self, k: &str, error: &str) {
        let mut live = self.live.lock().expect("leases lock");
        if let Some(l) = live.get_mut(k) {
            l.failures += 1;
            l.retry_at = now() + (RETRY_MIN << l.failures.min(5)).min(RETRY_MAX);
            tracing::warn!(source = %l.source, container = %l.container, error, "cannot renew a lease; retrying");
        }
    }

    /// The containers leases are held for (not host users).
    fn containers(&self) -> Vec<String> {
        let live = self.live.lock().expect("leases lock");
        let mut c: Vec<String> =
            live.values().filter(|l| !l.container.starts_with("uid:")).map(|l| l.container.clone()).collect();
        c.sort();
        c.dedup();
        c
    }
}

/// A rendered certificate lease (leaf, chain, key) split into its parts.
fn pem_fields(text: &str) -> serde_json::Value {
    let (mut cert, mut ca, mut key) = (String::new(), String::new(), String::new());
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block = &rest[start..];
        let Some(end_at) = block.find("-----END ") else { break };
        let close = block[end_at..].find('\n').map_or(block.len(), |i| end_at + i + 1);
        let pem = &block[..close];
        if pem.contains("PRIVATE KEY") {
            key.push_str(pem);
        } else if cert.is_empty() {
            cert.push_str(pem);
        } else {
            ca.push_str(pem);
        }
        rest = &block[close..];
    }
    let chain = format!("{cert}{ca}");
    serde_json::json!({ "cert": cert, "ca": ca, "chain": chain, "key": key })
}

/// A renewed lease's file shows its new expiry.
fn rerender_expiry(body: &str, expires: u64) -> String {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(mut v) if v.get("expires_at").is_some() => {
            v["expires_at"] = serde_json::Value::String(rfc3339(expires));
            let mut s = v.to_string();
            s.push('\n');
            zeroize::Zeroize::zeroize(&mut v.to_string());
            s
        }
        _ => body.to_owned(),
    }
}

/// Keep the leases: renew, roll, revoke when containers end (events and
/// a sweep) or their policy goes, retry failed revocations. Runs until
/// the broker stops. The first sweep, at start, revokes the leases of
/// containers that ended while no broker ran.
pub async fn keeper(broker: Arc<Broker>) {
    let leases = broker.leases().clone();
    leases.attach(&broker);
    let mut stopping = broker.stopping();
    let mut gone = broker.docker().map(|d| d.gone());
    let mut tick = tokio::time::interval(TICK);
    let mut sweep = tokio::time::interval(SWEEP);
    enum Next {
        Stop,
        Gone(Result<String, tokio::sync::broadcast::error::RecvError>),
        Tick,
        Sweep,
    }
    loop {
        let next = tokio::select! {
            _ = stopping.wait_for(|s| *s) => Next::Stop,
            ev = async {
                match gone.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => Next::Gone(ev),
            _ = tick.tick() => Next::Tick,
            _ = sweep.tick() => Next::Sweep,
        };
        match next {
            Next::Stop => return,
            Next::Gone(Ok(id)) => {
                let n = leases.container_gone(&id);
                if n > 0 {
                    tracing::info!(container = %id, leases = n, "container ended; revoking its leases");
                }
            }
            Next::Gone(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => sweep.reset_immediately(),
            Next::Gone(Err(tokio::sync::broadcast::error::RecvError::Closed)) => gone = None,
            Next::Tick => {
                leases.revoke_idle();
                leases.tick().await
            }
            Next::Sweep => sweep_once(&broker, &leases).await,
        }
    }
}

/// Revoke the leases of containers Docker says are not running, and of
/// grants, workloads or sources that are gone.
async fn sweep_once(broker: &Arc<Broker>, leases: &Arc<Leases>) {
    let b = broker.clone();
    let grants = tokio::task::spawn_blocking(move || b.store().grants(None)).await;
    if let Ok(Ok(grants)) = grants {
        let pairs = grants.iter().map(|g| (g.workload.clone(), g.target.to_string())).collect();
        leases.policy_changed(&pairs);
    }
    let Some(docker) = broker.docker() else { return };
    for c in leases.containers() {
        if docker.running(&c).await == Some(false) {
            let n = leases.container_gone(&c);
            if n > 0 {
                tracing::info!(container = %c, leases = n, "container not running (sweep); revoking its leases");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_take_only_known_placeholders() {
        assert!(check_pattern("spiffe://example.org/{workload}/{container_name}", "--uri").is_ok());
        assert!(check_pattern("spiffe://x/{secret}", "--uri").is_err());
        assert!(check_pattern("a,b", "--uri").is_err());
        assert!(check_pattern("", "--uri").is_err());
        let h = Holder { workload: "web".into(), container: "abc".into(), name: "web-1".into() };
        assert_eq!(fill("spiffe://e/{workload}/{container_name}", &h), "spiffe://e/web/web-1");
    }

    #[test]
    fn sources_are_checked() {
        assert!(Source::new(Kind::Dynamic, "db", "prod", "database/creds/web", None, None, None).is_ok());
        assert!(Source::new(Kind::Dynamic, "../x", "prod", "database/creds/web", None, None, None).is_err());
        assert!(Source::new(Kind::Dynamic, "db", "prod", "database/creds/web", Some("u"), None, None).is_err());
        assert!(Source::new(Kind::Cert, "tls", "prod", "pki/issue/web", None, None, None).is_err());
        assert!(Source::new(Kind::Cert, "tls", "prod", "database/creds/web", Some("spiffe://x"), None, None).is_err());
        let s =
            Source::new(Kind::Cert, "tls", "prod", "pki/issue/web", Some("spiffe://x/{workload}"), None, Some("1h"))
                .unwrap();
        assert_eq!((s.pki_mount(), s.ttl_secs, s.id().as_str()), (Some("pki"), Some(3600), "cert:tls"));
    }

    #[test]
    fn a_dynamic_lease_renders_its_credentials_and_expiry() {
        let src = Source::new(Kind::Dynamic, "db", "prod", "database/creds/web", None, None, None).unwrap();
        let issued = Issued {
            lease_id: "x".into(),
            lease_duration: 60,
            renewable: true,
            data: serde_json::json!({"username": "u1", "password": "p1"}),
        };
        let (body, serial) = render(&src, &issued, 0).unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((v["username"].as_str(), v["password"].as_str()), (Some("u1"), Some("p1")));
        assert_eq!(v["expires_at"].as_str(), Some("1970-01-01T00:00:00Z"));
        assert!(serial.is_none());
        let again: serde_json::Value = serde_json::from_str(&rerender_expiry(&body, 60)).unwrap();
        assert_eq!(again["expires_at"].as_str(), Some("1970-01-01T00:01:00Z"));
        assert_eq!(again["password"].as_str(), Some("p1"));
    }

    #[test]
    fn a_certificate_lease_splits_into_cert_chain_and_key() {
        let pem = "-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----\n\
                   -----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n\
                   -----BEGIN RSA PRIVATE KEY-----\nK\n-----END RSA PRIVATE KEY-----\n";
        let f = pem_fields(pem);
        assert!(f["cert"].as_str().unwrap().contains("LEAF") && !f["cert"].as_str().unwrap().contains("\nCA\n"));
        assert!(f["ca"].as_str().unwrap().contains("\nCA\n"));
        assert!(f["key"].as_str().unwrap().contains("\nK\n"));
    }

    #[test]
    fn a_lease_debug_shows_no_credentials() {
        let l = Lease {
            source: "dynamic:db".into(),
            via: None,
            workload: "w".into(),
            container: "c".into(),
            container_name: "n".into(),
            backend: "b".into(),
            lease_id: "id".into(),
            serial: None,
            pki_mount: None,
            issued_unix: 0,
            renewed_unix: 0,
            ttl_secs: 60,
            expires_unix: 60,
            renewable: true,
            body: "hunter2".into(),
            revoking: None,
            failures: 0,
            retry_at: 0,
        };
        assert!(!format!("{l:?}").contains("hunter2"));
        assert_eq!(l.renew_at(), 40);
    }
}
