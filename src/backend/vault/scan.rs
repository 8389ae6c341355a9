//! Change detection by directory for a Vault/OpenBao KV v2 backend.
//!
//! Instead of one metadata read per watched secret, each refresh lists
//! the smallest set of directories that covers the granted secrets and
//! prefixes through `detailed-metadata` (OpenBao): one paged `LIST` per
//! directory holding exact grants, one recursive `scan` per prefix grant.
//! Each listing carries every key's `current_version` and that version's
//! deletion time / destroyed flag, so a secret's data is read only when
//! it changed, and a soft delete or destroy is seen too.
//!
//! A server without the endpoint (Vault answers 404 "unsupported path" or
//! 405), or a token that may not list it, falls back to one metadata read
//! per secret (the old way), shown in `status` and re-tried every
//! [`REPROBE`]. Changed secrets are fetched with at most
//! [`FETCH_CONCURRENCY`] requests in flight. A refresh computes everything
//! before it changes the cache: one that fails half-way changes nothing.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::{BackendError, Cached, VaultBackend, Verb, encode};

/// Changed secrets read at once, per backend.
pub const FETCH_CONCURRENCY: usize = 8;
/// Bytes one listing page (or a whole recursive scan) may return.
pub const MAX_LISTING_BYTES: usize = 64 << 20;
/// Keys one directory (recursive or not) may hold.
const MAX_KEYS: usize = 100_000;
/// How long the per-secret fallback lasts before the directory listing is
/// tried again.
pub const REPROBE: Duration = Duration::from_secs(300);

/// What one request costs the server, counted in keys of a listing:
/// measured on OpenBao 2.7.2 (raft), a metadata read takes about 0.9 ms
/// and 550 bytes, a detailed-metadata listing about 0.9 ms plus 35 to
/// 60 µs and 400 bytes per key: one request is worth about 20 keys.
pub const REQUEST_COST_KEYS: usize = 20;
/// Most secrets of one directory read one by one instead of listing it:
/// beyond that the request count, not the keys, is what grows.
pub const MAX_SPARSE_READS: usize = 8;

/// The sparse-directory rule: whether reading `granted` secrets' metadata
/// one request each costs the server less than listing the directory
/// they share (`keys` keys at its last listing, `page_size` a page).
/// A listing costs its pages' requests plus every key in them; reading
/// costs a request (and a key) per granted secret. Only when reading
/// costs at most half as much: the model is an estimate, and a directory
/// near the line should not change mode for a few keys. At most
/// [`MAX_SPARSE_READS`] reads: a flat request count per interval wins
/// over a few keys more.
pub fn sparse(granted: usize, keys: usize, page_size: usize) -> bool {
    let pages = keys.div_ceil(page_size.max(1)).max(1);
    let listing = pages * REQUEST_COST_KEYS + keys;
    let reading = granted * (REQUEST_COST_KEYS + 1);
    granted > 0 && granted <= MAX_SPARSE_READS && 2 * reading <= listing
}

/// One directory to list, relative to the KV mount ("" is its root).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dir {
    pub path: String,
    /// A prefix grant: everything under it (`scan=true`), one request.
    pub recursive: bool,
}

/// The directories that cover `exact` secrets and `prefixes` (relative
/// paths): each prefix not under another one, recursively; the parent of
/// each exact secret not under a prefix, flat.
pub fn plan(exact: &BTreeSet<String>, prefixes: &BTreeSet<String>) -> Vec<Dir> {
    let under = |p: &str, q: &str| p.strip_prefix(q).is_some_and(|r| r.starts_with('/'));
    let roots: Vec<&String> = prefixes.iter().filter(|p| !prefixes.iter().any(|q| under(p, q))).collect();
    let mut out: BTreeSet<Dir> = roots.iter().map(|p| Dir { path: (*p).clone(), recursive: true }).collect();
    for e in exact {
        if roots.iter().any(|q| under(e, q)) {
            continue;
        }
        let parent = e.rsplit_once('/').map_or("", |(d, _)| d);
        out.insert(Dir { path: parent.to_owned(), recursive: false });
    }
    out.into_iter().collect()
}

/// What a listing says about one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyState {
    pub current_version: u64,
    /// The current version is neither deleted nor destroyed.
    pub live: bool,
}

/// One page of a detailed-metadata listing.
#[derive(Debug, Default)]
pub struct Page {
    /// Secrets (relative to the mount) and their state; sub-directories
    /// of a flat listing are left out.
    pub keys: Vec<(String, KeyState)>,
    /// The raw keys returned, for paging (`after` = the last one).
    pub raw_count: usize,
    pub last_raw: Option<String>,
}

/// Parse a detailed-metadata answer for directory `dir`.
pub fn parse_page(body: &[u8], dir: &str) -> Result<Page, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let data = &v["data"];
    if data.is_null() {
        return Ok(Page::default());
    }
    let raw: Vec<&str> = match data["keys"].as_array() {
        Some(k) => k.iter().filter_map(|k| k.as_str()).collect(),
        None => return Err("the listing has no keys".into()),
    };
    let info = data["key_info"].as_object().ok_or("the listing has no key_info (not detailed-metadata)")?;
    let mut page = Page { raw_count: raw.len(), last_raw: raw.last().map(|k| (*k).to_owned()), ..Page::default() };
    for k in raw {
        if k.ends_with('/') || k.is_empty() {
            continue;
        }
        let Some(meta) = info.get(k) else { continue };
        let current = meta["current_version"].as_u64().unwrap_or(0);
        let version = &meta["versions"][current.to_string()];
        let live = current > 0
            && version.is_object()
            && !version["destroyed"].as_bool().unwrap_or(false)
            && version["deletion_time"].as_str().is_none_or(str::is_empty);
        let rel = if dir.is_empty() { k.to_owned() } else { format!("{dir}/{k}") };
        page.keys.push((rel, KeyState { current_version: current, live }));
    }
    Ok(page)
}

/// How a backend detects changes now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One listing per directory (OpenBao detailed-metadata).
    Directory,
    /// One metadata read per secret, and why.
    PerSecret { reason: String, since: Instant },
}

/// What the last refresh cost the server.
#[derive(Clone, Debug, Default)]
pub struct ScanStats {
    pub dirs: usize,
    pub requests: u64,
    pub bytes: u64,
    pub keys: u64,
    pub watched: u64,
    pub fetched: u64,
    /// Directories whose granted secrets were read one by one instead
    /// (the sparse-directory rule, [`sparse`]).
    pub sparse_dirs: usize,
    pub at: Option<SystemTime>,
}

/// A backend's change-detection state.
#[derive(Debug)]
pub struct ScanState {
    mode: Mutex<Mode>,
    stats: Mutex<ScanStats>,
    /// One refresh at a time per backend (the watcher, a grant's prefetch,
    /// `keyhole refresh`), so an older result never lands after a newer.
    one: tokio::sync::Mutex<()>,
    /// Keys each flat directory held at its last listing, and when (for
    /// the sparse-directory rule; only those listed within [`REPROBE`]).
    dir_keys: Mutex<BTreeMap<String, (usize, Instant)>>,
}

impl Default for ScanState {
    fn default() -> Self {
        ScanState {
            mode: Mutex::new(Mode::Directory),
            stats: Mutex::default(),
            one: tokio::sync::Mutex::new(()),
            dir_keys: Mutex::default(),
        }
    }
}

/// Why a directory listing did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The server has no detailed-metadata endpoint, or the token may not
    /// use it: fall back to per-secret reads.
    #[error("{0}")]
    Unsupported(String),
    /// Retry next interval; nothing changes meanwhile.
    #[error("{0}")]
    Failed(String),
    /// 403: maybe a revoked token; log in again once.
    #[error("permission denied listing detailed-metadata")]
    Denied,
}

/// A key's observed state: live version, or None (absent or deleted).
type Observed = BTreeMap<String, Option<u64>>;

impl VaultBackend {
    /// How this backend detects changes: ("directory" | "per-secret",
    /// reason for the fallback, last refresh's cost).
    pub fn change_detection(&self) -> (&'static str, Option<String>, ScanStats) {
        let stats = self.scan.stats.lock().expect("scan lock").clone();
        match &*self.scan.mode.lock().expect("scan lock") {
            Mode::Directory => ("directory", None, stats),
            Mode::PerSecret { reason, .. } => ("per-secret", Some(reason.clone()), stats),
        }
    }

    fn directory_mode(&self) -> bool {
        let mut mode = self.scan.mode.lock().expect("scan lock");
        if self.cfg.per_secret {
            *mode = Mode::PerSecret {
                reason: "change_detection = \"per-secret\" in the config".into(),
                since: Instant::now(),
            };
            return false;
        }
        match &*mode {
            Mode::Directory => true,
            Mode::PerSecret { since, .. } if since.elapsed() >= REPROBE => {
                *mode = Mode::Directory;
                true
            }
            Mode::PerSecret { .. } => false,
        }
    }

    fn fall_back(&self, reason: String) {
        tracing::warn!(backend = %self.cfg.name, %reason, "change detection falls back to one metadata read per secret");
        *self.scan.mode.lock().expect("scan lock") = Mode::PerSecret { reason, since: Instant::now() };
    }

    /// For `keyhole doctor`: whether this server and token can list by
    /// directory (one page of one key of the mount's root). Err: why
    /// change detection would fall back to per-secret reads.
    pub async fn probe_detection(&self) -> Result<(), String> {
        let api = format!("{}/detailed-metadata/?list=true&limit=1", encode(&self.cfg.mount));
        match self.get_listing(&api).await {
            Ok((404 | 405, body)) if body.windows(11).any(|w| w == b"unsupported") => {
                Err(format!("the server has no {}/detailed-metadata endpoint", self.cfg.mount))
            }
            Ok((200 | 404, _)) => Ok(()),
            Ok((403, _)) => Err(format!("the token may not list {}/detailed-metadata", self.cfg.mount)),
            Ok((code, _)) => Err(format!("{}/detailed-metadata answers HTTP {code}", self.cfg.mount)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// One GET of a detailed-metadata listing (`api`: path and query
    /// under `v1/`); (status, body), the body capped at
    /// [`MAX_LISTING_BYTES`].
    async fn get_listing(&self, api: &str) -> Result<(u16, Vec<u8>), ScanError> {
        match self.send(Verb::Get, api, None, MAX_LISTING_BYTES).await {
            Ok(a) => Ok((a.status, a.body)),
            Err(e) if e.contains("an answer larger than") => Err(ScanError::Failed(format!(
                "a detailed-metadata listing is larger than {} MiB; grant narrower prefixes",
                MAX_LISTING_BYTES >> 20
            ))),
            Err(e) => Err(ScanError::Failed(e)),
        }
    }

    /// List one directory, every page; adds requests and bytes to `stats`.
    async fn list_dir(&self, dir: &Dir, stats: &mut ScanStats) -> Result<Vec<(String, KeyState)>, ScanError> {
        let base = if dir.path.is_empty() {
            format!("{}/detailed-metadata/", encode(&self.cfg.mount))
        } else {
            format!("{}/detailed-metadata/{}/", encode(&self.cfg.mount), encode(&dir.path))
        };
        let page_size = self.cfg.list_page_size;
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let url = match (dir.recursive, &after) {
                // OpenBao answers a scan whole; it is not paged.
                (true, _) => format!("{base}?scan=true"),
                (false, None) => format!("{base}?list=true&limit={page_size}"),
                (false, Some(a)) => format!("{base}?list=true&limit={page_size}&after={}", encode(a)),
            };
            let (status, body) = self.get_listing(&url).await?;
            stats.requests += 1;
            stats.bytes += body.len() as u64;
            let errors = || {
                serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| {
                        v["errors"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|e| e.as_str()).collect::<Vec<_>>().join("; "))
                    })
                    .unwrap_or_default()
            };
            let page = match status {
                200 => {
                    parse_page(&body, &dir.path).map_err(|e| ScanError::Failed(format!("detailed-metadata: {e}")))?
                }
                // No such directory (yet): nothing there.
                404 if !errors().contains("unsupported") => Page::default(),
                404 | 405 => {
                    return Err(ScanError::Unsupported(format!(
                        "the server has no {}/detailed-metadata endpoint (HTTP {status}: {})",
                        self.cfg.mount,
                        errors().trim()
                    )));
                }
                403 => return Err(ScanError::Denied),
                code => return Err(ScanError::Failed(format!("HTTP {code}: {}", errors()))),
            };
            out.extend(page.keys);
            if out.len() > MAX_KEYS {
                return Err(ScanError::Failed(format!(
                    "more than {MAX_KEYS} secrets under {}/{}; grant narrower prefixes",
                    self.cfg.name, dir.path
                )));
            }
            if dir.recursive || page.raw_count < page_size {
                return Ok(out);
            }
            match page.last_raw {
                Some(last) if after.as_ref().is_none_or(|a| *a < last) => after = Some(last),
                _ => return Err(ScanError::Failed("a detailed-metadata page did not advance".into())),
            }
        }
    }

    /// The watched secrets' state from one listing per directory.
    async fn observe_by_dirs(
        &self,
        exact: &BTreeSet<String>,
        prefixes: &BTreeSet<String>,
        stats: &mut ScanStats,
    ) -> Result<Observed, ScanError> {
        let dirs = plan(exact, prefixes);
        stats.dirs = dirs.len();
        // Counts older than REPROBE are not used: forget them (bounds it).
        self.scan.dir_keys.lock().expect("scan lock").retain(|_, (_, at)| at.elapsed() < REPROBE);
        let mut seen: BTreeMap<String, KeyState> = BTreeMap::new();
        let mut read: Observed = Observed::new();
        for dir in &dirs {
            if !dir.recursive {
                let granted: Vec<&String> =
                    exact.iter().filter(|e| e.rsplit_once('/').map_or("", |(d, _)| d) == dir.path).collect();
                let known = self.scan.dir_keys.lock().expect("scan lock").get(&dir.path).copied();
                let fresh = known.filter(|(_, at)| at.elapsed() < REPROBE);
                if fresh.is_some_and(|(keys, _)| sparse(granted.len(), keys, self.cfg.list_page_size)) {
                    for e in granted {
                        let v = self.current_version(e).await.map_err(|e| ScanError::Failed(e.to_string()))?;
                        stats.requests += 1;
                        read.insert(e.clone(), v);
                    }
                    stats.sparse_dirs += 1;
                    continue;
                }
            }
            let listed = self.list_dir(dir, stats).await?;
            if !dir.recursive {
                self.scan.dir_keys.lock().expect("scan lock").insert(dir.path.clone(), (listed.len(), Instant::now()));
            }
            seen.extend(listed);
        }
        stats.keys = (seen.len() + read.len()) as u64;
        let mut observed: Observed = exact.iter().map(|e| (e.clone(), None)).collect();
        observed.extend(read);
        for (rel, st) in seen {
            let in_prefix = prefixes.iter().any(|p| rel.strip_prefix(p.as_str()).is_some_and(|r| r.starts_with('/')));
            if in_prefix || exact.contains(&rel) {
                observed.insert(rel, st.live.then_some(st.current_version));
            }
        }
        Ok(observed)
    }

    /// The old way: list each prefix, read each secret's metadata.
    async fn observe_per_secret(
        &self,
        exact: &BTreeSet<String>,
        prefixes: &BTreeSet<String>,
        stats: &mut ScanStats,
    ) -> Result<Observed, BackendError> {
        let mut watched = exact.clone();
        for p in prefixes {
            watched.extend(self.list(p).await?);
        }
        let mut observed = Observed::new();
        for rel in watched {
            let v = self.current_version(&rel).await?;
            stats.requests += 1;
            observed.insert(rel, v);
        }
        stats.keys = observed.len() as u64;
        Ok(observed)
    }

    /// Bring the cache up to date for the watched secrets: `exact` paths
    /// and everything under `prefixes` (relative). Returns the full paths
    /// that changed, with their new value (None: gone). Computes every
    /// change before applying any: an error changes nothing.
    pub async fn refresh(
        self: &Arc<Self>,
        exact: &BTreeSet<String>,
        prefixes: &BTreeSet<String>,
    ) -> Result<Vec<(String, Option<Cached>)>, BackendError> {
        let _one = self.scan.one.lock().await;
        self.keep_token().await?;
        let mut stats = ScanStats::default();
        let mut observed = None;
        if self.directory_mode() {
            let mut tried = self.observe_by_dirs(exact, prefixes, &mut stats).await;
            if matches!(tried, Err(ScanError::Denied)) {
                // A revoked token looks the same: log in once, then decide.
                self.login().await?;
                tried = self.observe_by_dirs(exact, prefixes, &mut stats).await;
            }
            match tried {
                Ok(o) => observed = Some(o),
                Err(ScanError::Failed(reason)) => return Err(self.unavailable(reason)),
                Err(ScanError::Unsupported(reason)) => self.fall_back(reason),
                Err(ScanError::Denied) => self.fall_back(format!(
                    "the token may not list {}/detailed-metadata (add \"list\" and \"scan\" on {}/detailed-metadata/* to its policy)",
                    self.cfg.mount, self.cfg.mount
                )),
            }
        }
        let observed = match observed {
            Some(o) => o,
            None => {
                stats = ScanStats::default();
                self.observe_per_secret(exact, prefixes, &mut stats).await?
            }
        };

        // What changed, against the cache.
        let mut fetch: Vec<(String, u64)> = Vec::new();
        let mut gone: Vec<String> = Vec::new();
        {
            let cache = self.cache.lock().expect("cache lock");
            for (rel, now) in &observed {
                let full = self.full(rel);
                if crate::secret::SecretPath::parse(&full).is_err() {
                    continue;
                }
                let have = cache.get(&full).map(|c| c.meta.version);
                match (*now, have) {
                    (a, b) if a == b => {}
                    (Some(v), _) => fetch.push((rel.clone(), v)),
                    (None, Some(_)) => gone.push(full),
                    (None, None) => {}
                }
            }
            // Cached prefix entries that vanished from the listing.
            for k in cache.keys() {
                let Some(r) = self.relative(k) else { continue };
                let in_prefix = prefixes.iter().any(|p| r.strip_prefix(p.as_str()).is_some_and(|x| x.starts_with('/')));
                if in_prefix && !observed.contains_key(r) {
                    gone.push(k.clone());
                }
            }
        }
        stats.watched = observed.values().filter(|v| v.is_some()).count() as u64;
        stats.fetched = fetch.len() as u64;

        // Read the changed ones, a bounded number at a time.
        let limit = Arc::new(tokio::sync::Semaphore::new(FETCH_CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        for (rel, v) in fetch {
            let (this, limit) = (self.clone(), limit.clone());
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let got = this.get(&rel, Some(v)).await;
                (rel, got)
            });
        }
        let mut fetched = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (rel, got) = joined.map_err(|e| self.unavailable(format!("a fetch task failed: {e}")))?;
            match got {
                Ok((meta, value)) => fetched.push((rel, meta, value)),
                Err(BackendError::Invalid(why)) => tracing::warn!(backend = %self.cfg.name, %why, "not served"),
                // Deleted between the listing and the read: the next
                // listing says so.
                Err(BackendError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }

        // Apply, all at once.
        let mut changed = Vec::new();
        {
            let mut cache = self.cache.lock().expect("cache lock");
            for full in gone {
                cache.remove(&full);
                changed.push((full, None));
            }
            for (rel, meta, value) in fetched {
                let full = self.full(&rel);
                let entry = Cached { meta, value: Arc::new(value) };
                cache.insert(full.clone(), entry.clone());
                changed.push((full, Some(entry)));
            }
        }
        changed.sort_by(|a, b| a.0.cmp(&b.0));
        stats.at = Some(SystemTime::now());
        *self.scan.stats.lock().expect("scan lock") = stats;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn dir(p: &str, recursive: bool) -> Dir {
        Dir { path: p.into(), recursive }
    }

    #[test]
    fn the_plan_covers_each_grant_once() {
        let exact = set(&["db/pw", "db/user", "top", "app/x/y", "apps/z", "web/tls/key"]);
        let prefixes = set(&["app", "app/x", "web"]);
        assert_eq!(
            plan(&exact, &prefixes),
            [dir("", false), dir("app", true), dir("apps", false), dir("db", false), dir("web", true)]
        );
        assert!(plan(&BTreeSet::new(), &BTreeSet::new()).is_empty());
    }

    #[test]
    fn a_page_says_versions_deletions_and_destroys() {
        let body = br#"{"data":{"keys":["a","b","c","d/"],"key_info":{
            "a":{"current_version":2,"versions":{"1":{"deletion_time":"","destroyed":false},"2":{"deletion_time":"","destroyed":false}}},
            "b":{"current_version":3,"versions":{"3":{"deletion_time":"2026-01-01T00:00:00Z","destroyed":false}}},
            "c":{"current_version":1,"versions":{"1":{"deletion_time":"","destroyed":true}}},
            "d/":{}}}}"#;
        let p = parse_page(body, "dir").unwrap();
        assert_eq!(p.raw_count, 4);
        assert_eq!(p.last_raw.as_deref(), Some("d/"));
        let k: Vec<(&str, u64, bool)> = p.keys.iter().map(|(r, s)| (r.as_str(), s.current_version, s.live)).collect();
        assert_eq!(k, [("dir/a", 2, true), ("dir/b", 3, false), ("dir/c", 1, false)]);
        assert_eq!(parse_page(br#"{"data":null}"#, "").unwrap().raw_count, 0);
        assert!(parse_page(br#"{"data":{"keys":["a"]}}"#, "").is_err(), "a plain LIST is not detailed");
        assert!(parse_page(b"<html>", "").is_err());
    }

    #[test]
    fn a_sparse_directory_is_read_secret_by_secret() {
        // 1000 keys, 2 granted: 2 reads (42) beat 1 page of 1000 (1020).
        assert!(sparse(2, 1000, 1000));
        // 30 keys, 1 granted: one read (21) is under half a listing (50).
        assert!(sparse(1, 30, 1000));
        // 2 keys, 1 granted: one read (21) is not half a listing (22).
        assert!(!sparse(1, 2, 1000));
        // 10 keys, 2 granted: one listing (30) beats two reads (42).
        assert!(!sparse(2, 10, 1000));
        // A directory of granted secrets only: always listed.
        assert!(!sparse(5, 5, 1000));
        assert!(!sparse(200, 200, 1000));
        // More than MAX_SPARSE_READS granted: listed, however big.
        assert!(!sparse(MAX_SPARSE_READS + 1, 100_000, 1000));
        assert!(sparse(MAX_SPARSE_READS, 100_000, 1000));
        // Small pages make a listing dearer: 100 keys at 20 a page (200
        // against 4 reads' 84), not at 1000 a page (120).
        assert!(sparse(4, 100, 20) && !sparse(4, 100, 1000));
        assert!(!sparse(0, 1000, 1000), "nothing granted: nothing to read");
        assert!(!sparse(1, 0, 0), "no page size: no division by zero");
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("a b&c=d/é"), "a%20b%26c%3Dd/%C3%A9");
    }
}
