//! The local store: a redb database of sealed records. It is the
//! broker's one store (also `backend::Store`): the secrets no backend
//! owns (it is their [`super::SecretSource`]), the policy, the Docker
//! volumes and their mounts, the sealed copies of Vault values, notes
//! (a backend's last success), and the audit log's sealed head.
//!
//! | table | key | value |
//! |---|---|---|
//! | `values` | (path, version) | sealed value; AAD `keyhole/v1/value\0<path>\0<version>` |
//! | `heads` | path | sealed JSON list of kept versions; AAD `keyhole/v1/head\0<path>` |
//! | `meta` | name | `keycheck` (sealed constant), `kdf-salt` (passphrase mode) |
//! | `workloads` | name | sealed JSON workload; AAD `keyhole/v1/workload\0<name>` |
//! | `grants` | (workload, target) | sealed JSON grant; AAD `keyhole/v1/grant\0<workload>\0<target>` |
//! | `volumes`, `volume_mounts` | name, mount id | sealed JSON; AAD `keyhole/v1/<table>\0<key>` |
//! | `meta` `role:<name>` | role name | sealed JSON role; AAD `keyhole/v1/role\0<name>` (see `policy_txn`) |
//! | `templates` | name | sealed JSON list of kept template versions (source, inputs); AAD `keyhole/v1/templates\0<name>` |
//! | `backend_cache` | path | a value fetched from Vault: sealed version, time, bytes; AAD `keyhole/v1/cache\0<path>` |
//!
//! Everything a reader acts on is authenticated: a record edited, or
//! copied under another path or version, fails to open and is reported as
//! [`StoreError::Tampered`], never served. Every change is one durable
//! redb transaction, so a crash leaves each secret at its old or new
//! version.
//!
//! The manifest (`meta["manifest"]`, sealed, AAD `keyhole/v2/manifest`)
//! binds the records together: a generation bumped by every write, the
//! number of records, and a keyed multiset hash over all of them, the sum
//! mod 2^256 of `HMAC(manifest key, table ‖ key ‖ sealed record)` (every
//! table; in `meta`, every entry but the manifest itself). Each write
//! transaction subtracts the terms of the records it replaces or removes,
//! adds those it writes, and rewrites the manifest in the same
//! transaction; [`LocalStore::open`] recomputes the sum and refuses the
//! store ([`StoreError::Tampered`]) if it differs. So an older record
//! written back (a secret's previous head, a revoked grant), a record
//! moved, added or removed, or records mixed from copies taken at
//! different times, are all caught before anything is served. A store
//! rolled back as a whole (its file restored from a backup, manifest and
//! all) is consistent and is not caught here: that is out of scope. The
//! manifest also carries the audit log's head at its last write (see
//! [`LocalStore::seal_audit_with`]), so the broker can tell a cut or
//! deleted audit log at start.
//!
//! The key check (`meta["keycheck"]`) seals `keyhole local store v2`;
//! a 0.1 store (`... v1`, no manifest) is upgraded once at open.
#![forbid(unsafe_code)]

mod policy_txn;

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};

use super::VersionMeta;
use crate::crypto::{CryptoError, MasterKey, Sealer};
use crate::policy::{Grant, Workload};
use crate::secret::{SecretBytes, SecretPath};

pub use policy_txn::{PolicyChange, PutTemplate};

const VALUES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("values");
const HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("heads");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const WORKLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("workloads");
const GRANTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("grants");
const CACHE: TableDefinition<&str, &[u8]> = TableDefinition::new("backend_cache");
/// Docker volumes (name → spec) and their live mounts (mount id → mount).
pub const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
pub const VOLUME_MOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("volume_mounts");
/// Templates (name → kept versions, see [`crate::template::TemplateVersion`]).
pub const TEMPLATES: TableDefinition<&str, &[u8]> = TableDefinition::new("templates");
/// Dynamic sources (`dynamic:NAME`, `cert:NAME` → definition) and the
/// live leases issued from them, one per (source, workload, container).
pub const LEASE_SOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("lease_sources");
pub const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
/// The containers that read each file (`workload/secret` → container ids,
/// see [`crate::actions::Readers`]), for actions on change.
pub const READERS: TableDefinition<&str, &[u8]> = TableDefinition::new("readers");

/// The key check of a 0.1 store, which has no manifest.
const KEYCHECK_V1: &[u8] = b"keyhole local store v1";
/// The key check of a store with a manifest: it must have one.
const KEYCHECK: &[u8] = b"keyhole local store v2";
const KEYCHECK_AAD: &[u8] = b"keyhole/v1/keycheck";
const MANIFEST: &str = "manifest";
const MANIFEST_AAD: &[u8] = b"keyhole/v2/manifest";

/// A sum mod 2^256 of record HMACs, as four little-endian u64 limbs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Digest([u64; 4]);

impl Digest {
    fn from_mac(mac: &[u8; 32]) -> Digest {
        let mut d = [0u64; 4];
        for (i, limb) in d.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&mac[i * 8..i * 8 + 8]);
            *limb = u64::from_le_bytes(b);
        }
        Digest(d)
    }

    fn add(&mut self, o: Digest) {
        let mut carry = 0u128;
        for (a, b) in self.0.iter_mut().zip(o.0) {
            let s = u128::from(*a) + u128::from(b) + carry;
            *a = s as u64;
            carry = s >> 64;
        }
    }

    /// The additive inverse mod 2^256.
    fn neg(self) -> Digest {
        let mut d = Digest(self.0.map(|l| !l));
        d.add(Digest([1, 0, 0, 0]));
        d
    }

    fn to_hex(self) -> String {
        self.0.iter().map(|l| format!("{l:016x}")).collect()
    }

    fn from_hex(s: &str) -> Option<Digest> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut d = [0u64; 4];
        for (i, limb) in d.iter_mut().enumerate() {
            *limb = u64::from_str_radix(&s[i * 16..i * 16 + 16], 16).ok()?;
        }
        Some(Digest(d))
    }

    /// Equality in constant time.
    fn same(&self, o: &Digest) -> bool {
        self.0.iter().zip(o.0).fold(0u64, |d, (a, b)| d | (a ^ b)) == 0
    }
}

/// What a write transaction changed: the manifest's sum and count move by
/// this much when it commits.
#[derive(Default)]
struct Changes {
    delta: Digest,
    records: i64,
}

/// The sealed manifest (see the module doc).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Manifest {
    generation: u64,
    records: u64,
    digest: String,
    /// The audit log's head at the last write: (seq, hex HMAC).
    #[serde(default)]
    audit: Option<(u64, String)>,
}

/// The audit log's head as the store last sealed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditSeal {
    pub seq: u64,
    pub mac: [u8; 32],
}

/// Where a write transaction gets the audit log's head to seal with it;
/// it must return a head whose lines are durable.
pub type AuditHeadSource = Box<dyn Fn() -> Option<AuditSeal> + Send + Sync>;

/// The key bytes of a record in the manifest's HMAC input.
fn key_str(k: &str) -> Vec<u8> {
    k.as_bytes().to_vec()
}

fn key_pair(a: &str, b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + a.len() + b.len());
    out.extend_from_slice(&(a.len() as u32).to_be_bytes());
    out.extend_from_slice(a.as_bytes());
    out.extend_from_slice(b);
    out
}

fn key_value(path: &str, version: u64) -> Vec<u8> {
    key_pair(path, &version.to_be_bytes())
}

fn key_grant(workload: &str, target: &str) -> Vec<u8> {
    key_pair(workload, target.as_bytes())
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store database: {0}")]
    Db(String),
    #[error("the master key does not open this store (wrong key or passphrase, or a tampered store)")]
    WrongKey,
    #[error("integrity check failed for {what}: the store was tampered with or corrupted; the record is not served")]
    Tampered { what: String },
    #[error("secret {0} does not exist")]
    NotFound(String),
    /// A workload or grant that does not exist (the message says which).
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Exists(String),
    #[error("{path} was not changed: it is at version {current}, not {expected}")]
    Conflict { path: String, current: u64, expected: u64 },
    #[error("secret {path} has no version {version} (kept: {kept})")]
    NoVersion { path: String, version: u64, kept: String },
    #[error("{0}")]
    Crypto(#[from] CryptoError),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(impl From<$t> for StoreError {
        fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
    })*};
}
db_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub struct LocalStore {
    /// `None` only between closing a database that hit an I/O error and
    /// opening it again.
    db: std::sync::RwLock<Option<Database>>,
    path: std::path::PathBuf,
    sealer: Sealer,
    /// Keys the manifest's per-record HMACs.
    manifest_key: SecretBytes,
    history_depth: usize,
    /// The audit head the manifest held when the store was opened.
    opened_audit: Option<AuditSeal>,
    audit_source: std::sync::OnceLock<AuditHeadSource>,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore").field("history_depth", &self.history_depth).finish_non_exhaustive()
    }
}

fn value_aad(path: &str, version: u64) -> Vec<u8> {
    format!("keyhole/v1/value\0{path}\0{version}").into_bytes()
}

fn head_aad(path: &str) -> Vec<u8> {
    format!("keyhole/v1/head\0{path}").into_bytes()
}

fn workload_aad(name: &str) -> Vec<u8> {
    format!("keyhole/v1/workload\0{name}").into_bytes()
}

fn cache_aad(path: &str) -> Vec<u8> {
    format!("keyhole/v1/cache\0{path}").into_bytes()
}

fn grant_aad(workload: &str, target: &str) -> Vec<u8> {
    format!("keyhole/v1/grant\0{workload}\0{target}").into_bytes()
}

/// Where the master key comes from, resolved against the store.
pub enum KeyMaterial {
    Key(MasterKey),
    /// Passphrase bytes: the salt lives in the store.
    Passphrase(SecretBytes),
}

impl LocalStore {
    /// Open (or create) the store, prove the key opens it, and verify its
    /// manifest against every record (a 0.1 store, which has none, gets
    /// one). Returns the store and the master key it was opened with.
    pub fn open(path: &Path, key: KeyMaterial, history_depth: u32) -> Result<(Self, MasterKey), StoreError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        let master;
        let format;
        {
            let mut meta = txn.open_table(META)?;
            txn.open_table(VALUES)?;
            txn.open_table(HEADS)?;
            txn.open_table(WORKLOADS)?;
            txn.open_table(GRANTS)?;
            txn.open_table(CACHE)?;
            txn.open_table(VOLUMES)?;
            txn.open_table(VOLUME_MOUNTS)?;
            txn.open_table(TEMPLATES)?;
            txn.open_table(LEASE_SOURCES)?;
            txn.open_table(LEASES)?;
            txn.open_table(READERS)?;
            master = match key {
                KeyMaterial::Key(k) => k,
                KeyMaterial::Passphrase(pass) => {
                    let existing = meta.get("kdf-salt")?.map(|s| s.value().to_vec());
                    let salt = match existing {
                        Some(s) => s,
                        None => {
                            let mut s = vec![0u8; 16];
                            getrandom::fill(&mut s).map_err(CryptoError::Random)?;
                            meta.insert("kdf-salt", s.as_slice())?;
                            s
                        }
                    };
                    MasterKey::from_passphrase(pass.expose(), &salt)?
                }
            };
            let sealer = master.sealer();
            let check = meta.get("keycheck")?.map(|c| c.value().to_vec());
            format = match check {
                Some(c) => match sealer.open(&c, KEYCHECK_AAD) {
                    Ok(v) if v.expose() == KEYCHECK => 2,
                    Ok(v) if v.expose() == KEYCHECK_V1 => 1,
                    _ => return Err(StoreError::WrongKey),
                },
                None => 0,
            };
            if format < 2 {
                meta.insert("keycheck", sealer.seal(KEYCHECK, KEYCHECK_AAD)?.as_slice())?;
            }
        }
        let mut store = LocalStore {
            db: std::sync::RwLock::new(None),
            path: path.to_owned(),
            sealer: master.sealer(),
            manifest_key: master.manifest_key(),
            history_depth: history_depth as usize,
            opened_audit: None,
            audit_source: std::sync::OnceLock::new(),
        };
        let (sum, records) = store.scan(&txn)?;
        match format {
            2 => {
                let m = {
                    let meta = txn.open_table(META)?;
                    store.read_manifest(&meta)?
                };
                let want = Digest::from_hex(&m.digest);
                if m.records != records || !want.is_some_and(|w| w.same(&sum)) {
                    return Err(StoreError::Tampered {
                        what: format!(
                            "the store's records, which do not match its sealed manifest (generation {}): a \
                             record was written back from an older copy, moved, added or removed",
                            m.generation
                        ),
                    });
                }
                store.opened_audit = m.audit.as_ref().and_then(|(seq, mac)| {
                    let mut b = [0u8; 32];
                    hex::decode_to_slice(mac, &mut b).ok().map(|()| AuditSeal { seq: *seq, mac: b })
                });
                tracing::debug!(generation = m.generation, records, "store verified against its manifest");
                drop(txn);
            }
            _ => {
                // Nothing but the salt in a store without a key check: new.
                let salt = u64::from(txn.open_table(META)?.get("kdf-salt")?.is_some());
                if format == 0 && records > 1 + salt {
                    return Err(StoreError::Tampered {
                        what: "the store's key check, which is missing from a store that holds records".into(),
                    });
                }
                let m = Manifest { generation: 1, records, digest: sum.to_hex(), audit: None };
                txn.open_table(META)?.insert(MANIFEST, store.seal_manifest(&m)?.as_slice())?;
                txn.commit()?;
                if format == 1 {
                    tracing::info!(
                        path = %path.display(),
                        records,
                        "upgraded a keyhole 0.1 store: sealed a manifest over its records (replayed or moved \
                         records are detected from now on)"
                    );
                }
            }
        }
        *store.db.get_mut().expect("store lock") = Some(db);
        Ok((store, master))
    }

    /// The audit log's head as the manifest held it when the store was
    /// opened (`None`: never sealed, e.g. a new or just upgraded store).
    pub fn sealed_audit_head(&self) -> Option<AuditSeal> {
        self.opened_audit
    }

    /// From now on every write transaction seals the head `source`
    /// returns in the manifest. Set once.
    pub fn seal_audit_with(&self, source: AuditHeadSource) {
        let _ = self.audit_source.set(source);
    }

    /// Seal the audit log's current head (a transaction of its own).
    pub fn seal_audit(&self) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        self.commit(txn, Changes::default())
    }

    /// The manifest's HMAC of one record.
    fn term(&self, table: &str, key: &[u8], sealed: &[u8]) -> Digest {
        let mut m = <crate::crypto::HmacSha256 as hmac::KeyInit>::new_from_slice(self.manifest_key.expose())
            .expect("HMAC takes keys of any length");
        hmac::Mac::update(&mut m, &[table.len() as u8]);
        hmac::Mac::update(&mut m, table.as_bytes());
        hmac::Mac::update(&mut m, &(key.len() as u32).to_be_bytes());
        hmac::Mac::update(&mut m, key);
        hmac::Mac::update(&mut m, sealed);
        Digest::from_mac(&hmac::Mac::finalize(m).into_bytes().into())
    }

    /// Account for one record going from `old` to `new` (`None`: absent).
    fn changed(&self, ch: &mut Changes, table: &str, key: &[u8], old: Option<&[u8]>, new: Option<&[u8]>) {
        if let Some(o) = old {
            ch.delta.add(self.term(table, key, o).neg());
            ch.records -= 1;
        }
        if let Some(n) = new {
            ch.delta.add(self.term(table, key, n));
            ch.records += 1;
        }
    }

    /// The manifest's sum and count, computed afresh over every record.
    fn scan(&self, txn: &redb::WriteTransaction) -> Result<(Digest, u64), StoreError> {
        let mut sum = Digest::default();
        let mut n = 0u64;
        for def in [META, HEADS, WORKLOADS, CACHE, VOLUMES, VOLUME_MOUNTS, TEMPLATES, LEASE_SOURCES, LEASES, READERS] {
            let t = txn.open_table(def)?;
            for e in t.iter()? {
                let (k, v) = e?;
                if def.name() == META.name() && k.value() == MANIFEST {
                    continue;
                }
                sum.add(self.term(def.name(), &key_str(k.value()), v.value()));
                n += 1;
            }
        }
        for e in txn.open_table(VALUES)?.iter()? {
            let (k, v) = e?;
            let (path, version) = k.value();
            sum.add(self.term(VALUES.name(), &key_value(path, version), v.value()));
            n += 1;
        }
        for e in txn.open_table(GRANTS)?.iter()? {
            let (k, v) = e?;
            let (w, target) = k.value();
            sum.add(self.term(GRANTS.name(), &key_grant(w, target), v.value()));
            n += 1;
        }
        Ok((sum, n))
    }

    fn read_manifest(&self, meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Manifest, StoreError> {
        let what = || "the store's manifest".to_owned();
        let sealed = meta.get(MANIFEST)?.ok_or_else(|| StoreError::Tampered {
            what: "the store's manifest, which is missing (a store of this version always has one)".into(),
        })?;
        self.open_json(sealed.value(), MANIFEST_AAD, what)
    }

    fn seal_manifest(&self, m: &Manifest) -> Result<Vec<u8>, StoreError> {
        self.seal_json(m, MANIFEST_AAD)
    }

    /// Commit a write transaction with its manifest brought up to date
    /// (the changes, the next generation, the audit head): one commit.
    fn commit(&self, txn: redb::WriteTransaction, ch: Changes) -> Result<(), StoreError> {
        {
            let mut meta = txn.open_table(META)?;
            let mut m = self.read_manifest(&meta)?;
            let mut sum = Digest::from_hex(&m.digest)
                .ok_or_else(|| StoreError::Tampered { what: "the store's manifest".into() })?;
            sum.add(ch.delta);
            m.digest = sum.to_hex();
            m.records = m
                .records
                .checked_add_signed(ch.records)
                .ok_or_else(|| StoreError::Tampered { what: "the store's manifest (its record count)".into() })?;
            m.generation += 1;
            if let Some(head) = self.audit_source.get().and_then(|f| f()) {
                m.audit = Some((head.seq, hex::encode(head.mac)));
            }
            meta.insert(MANIFEST, self.seal_manifest(&m)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Begin a transaction with `begin`. After an I/O error (a full disk,
    /// say) redb refuses everything until the database is opened again:
    /// then close it, open it again, and retry once, so a freed disk
    /// needs no broker restart.
    fn begin<T>(&self, begin: impl Fn(&Database) -> Result<T, redb::TransactionError>) -> Result<T, StoreError> {
        let first = match &*self.db.read().expect("store lock") {
            Some(db) => begin(db),
            None => Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)),
        };
        match first {
            Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)) => {
                let mut db = self.db.write().expect("store lock");
                if let Some(old) = db.take() {
                    tracing::warn!(path = %self.path.display(), "the store hit an I/O error; opening it again");
                    let _ = old.close();
                }
                let fresh = Database::create(&self.path)?;
                let txn = begin(&fresh)?;
                *db = Some(fresh);
                Ok(txn)
            }
            r => Ok(r?),
        }
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        self.begin(Database::begin_write)
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.begin(Database::begin_read)
    }

    fn seal_json(&self, value: &impl serde::Serialize, aad: &[u8]) -> Result<Vec<u8>, StoreError> {
        // Invariant: our records are plain structs of strings and integers.
        let json = serde_json::to_vec(value).expect("serialize record");
        Ok(self.sealer.seal(&json, aad)?)
    }

    fn open_json<T: serde::de::DeserializeOwned>(
        &self,
        sealed: &[u8],
        aad: &[u8],
        what: impl Fn() -> String,
    ) -> Result<T, StoreError> {
        let plain = self.sealer.open(sealed, aad).map_err(|_| StoreError::Tampered { what: what() })?;
        serde_json::from_slice(plain.expose()).map_err(|_| StoreError::Tampered { what: what() })
    }

    fn read_head(
        &self,
        table: &impl ReadableTable<&'static str, &'static [u8]>,
        path: &str,
    ) -> Result<Option<Vec<VersionMeta>>, StoreError> {
        let Some(sealed) = table.get(path)? else { return Ok(None) };
        self.open_json(sealed.value(), &head_aad(path), || format!("the version list of {path}")).map(Some)
    }

    fn seal_head(&self, path: &str, versions: &[VersionMeta]) -> Result<Vec<u8>, StoreError> {
        self.seal_json(&versions, &head_aad(path))
    }

    /// Add a version. With `must_exist`, the secret must already exist
    /// (a rotation); with `if_version`, it must be at that version (0:
    /// must not exist). Durable when this returns.
    pub fn put(
        &self,
        path: &SecretPath,
        value: &SecretBytes,
        must_exist: bool,
        if_version: Option<u64>,
        now_ms: i64,
    ) -> Result<VersionMeta, StoreError> {
        let p = path.as_str();
        let txn = self.begin_write()?;
        let mut ch = Changes::default();
        let meta;
        {
            let mut heads = txn.open_table(HEADS)?;
            let mut values = txn.open_table(VALUES)?;
            let mut versions = match self.read_head(&heads, p)? {
                Some(v) => v,
                None if must_exist => return Err(StoreError::NotFound(p.to_owned())),
                None => Vec::new(),
            };
            let current = versions.last().map_or(0, |m| m.version);
            if let Some(expected) = if_version.filter(|e| *e != current) {
                return Err(StoreError::Conflict { path: p.to_owned(), current, expected });
            }
            let version = current + 1;
            meta = VersionMeta { version, created_unix_ms: now_ms, size: value.len() as u64 };
            let sealed = self.sealer.seal(value.expose(), &value_aad(p, version))?;
            let old = values.insert((p, version), sealed.as_slice())?.map(|g| g.value().to_vec());
            self.changed(&mut ch, VALUES.name(), &key_value(p, version), old.as_deref(), Some(&sealed));
            versions.push(meta.clone());
            let excess = versions.len().saturating_sub(self.history_depth);
            for old in versions.drain(..excess) {
                let gone = values.remove((p, old.version))?.map(|g| g.value().to_vec());
                self.changed(&mut ch, VALUES.name(), &key_value(p, old.version), gone.as_deref(), None);
            }
            let head = self.seal_head(p, &versions)?;
            let old = heads.insert(p, head.as_slice())?.map(|g| g.value().to_vec());
            self.changed(&mut ch, HEADS.name(), &key_str(p), old.as_deref(), Some(&head));
        }
        self.commit(txn, ch)?;
        Ok(meta)
    }

    /// A version (the current one when `version` is `None`) and its value.
    pub fn get(&self, path: &SecretPath, version: Option<u64>) -> Result<(VersionMeta, SecretBytes), StoreError> {
        let p = path.as_str();
        let txn = self.begin_read()?;
        let heads = txn.open_table(HEADS)?;
        let values = txn.open_table(VALUES)?;
        let versions = self.read_head(&heads, p)?.ok_or_else(|| StoreError::NotFound(p.to_owned()))?;
        let meta = match version {
            None => versions.last().cloned(),
            Some(v) => versions.iter().find(|m| m.version == v).cloned(),
        }
        .ok_or_else(|| StoreError::NoVersion {
            path: p.to_owned(),
            version: version.unwrap_or(0),
            kept: kept_range(&versions),
        })?;
        let tampered = || StoreError::Tampered { what: format!("{p} version {}", meta.version) };
        let sealed = values.get((p, meta.version))?.ok_or_else(tampered)?;
        let value = self.sealer.open(sealed.value(), &value_aad(p, meta.version)).map_err(|_| tampered())?;
        if value.len() as u64 != meta.size {
            return Err(tampered());
        }
        Ok((meta, value))
    }

    /// The kept versions of a secret, oldest first.
    pub fn history(&self, path: &SecretPath) -> Result<Vec<VersionMeta>, StoreError> {
        let txn = self.begin_read()?;
        let heads = txn.open_table(HEADS)?;
        self.read_head(&heads, path.as_str())?.ok_or_else(|| StoreError::NotFound(path.to_string()))
    }

    /// Every secret under `prefix` (whole segments: `db` matches `db/x`
    /// and `db`, not `dbx`), with its current version.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, VersionMeta)>, StoreError> {
        let prefix = prefix.trim_end_matches('/');
        let txn = self.begin_read()?;
        let heads = txn.open_table(HEADS)?;
        let mut out = Vec::new();
        for entry in heads.range(prefix..)? {
            let (k, _) = entry?;
            let path = k.value();
            if !path.starts_with(prefix) {
                break;
            }
            let rest = &path[prefix.len()..];
            if !(prefix.is_empty() || rest.is_empty() || rest.starts_with('/')) {
                continue;
            }
            if let Some(current) = self.read_head(&heads, path)?.and_then(|v| v.last().cloned()) {
                out.push((path.to_owned(), current));
            }
        }
        Ok(out)
    }

    /// Remove a secret and all its versions; returns how many versions.
    pub fn delete(&self, path: &SecretPath) -> Result<usize, StoreError> {
        let p = path.as_str();
        let txn = self.begin_write()?;
        let mut ch = Changes::default();
        let n;
        {
            let mut heads = txn.open_table(HEADS)?;
            let mut values = txn.open_table(VALUES)?;
            let versions = self.read_head(&heads, p)?.ok_or_else(|| StoreError::NotFound(p.to_owned()))?;
            for m in &versions {
                let gone = values.remove((p, m.version))?.map(|g| g.value().to_vec());
                self.changed(&mut ch, VALUES.name(), &key_value(p, m.version), gone.as_deref(), None);
            }
            let gone = heads.remove(p)?.map(|g| g.value().to_vec());
            self.changed(&mut ch, HEADS.name(), &key_str(p), gone.as_deref(), None);
            n = versions.len();
        }
        self.commit(txn, ch)?;
        Ok(n)
    }

    /// Add a workload; its name must be new.
    pub fn add_workload(&self, w: &Workload) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        let mut ch = Changes::default();
        {
            let mut t = txn.open_table(WORKLOADS)?;
            if t.get(w.name.as_str())?.is_some() {
                return Err(StoreError::Exists(format!("workload {} exists; remove it first to change it", w.name)));
            }
            let sealed = self.seal_json(w, &workload_aad(&w.name))?;
            t.insert(w.name.as_str(), sealed.as_slice())?;
            self.changed(&mut ch, WORKLOADS.name(), &key_str(&w.name), None, Some(&sealed));
        }
        self.commit(txn, ch)?;
        Ok(())
    }

    /// Remove a workload and its grants; returns how many grants went.
    pub fn remove_workload(&self, name: &str) -> Result<usize, StoreError> {
        let txn = self.begin_write()?;
        let mut ch = Changes::default();
        let n;
        {
            let mut t = txn.open_table(WORKLOADS)?;
            let Some(gone) = t.remove(name)?.map(|g| g.value().to_vec()) else {
                return Err(StoreError::Missing(format!("workload {name} does not exist")));
            };
            self.changed(&mut ch, WORKLOADS.name(), &key_str(name), Some(&gone), None);
            let mut g = txn.open_table(GRANTS)?;
            let mut targets = Vec::new();
            for e in g.range((name, "")..)? {
                let (k, _) = e?;
                let (w, target) = k.value();
                if w != name {
                    break;
                }
                targets.push(target.to_owned());
            }
            for target in &targets {
                let gone = g.remove((name, target.as_str()))?.map(|g| g.value().to_vec());
                self.changed(&mut ch, GRANTS.name(), &key_grant(name, target), gone.as_deref(), None);
            }
            n = targets.len();
        }
        self.commit(txn, ch)?;
        Ok(n)
    }

    pub fn workloads(&self) -> Result<Vec<Workload>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(WORKLOADS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            let name = k.value();
            out.push(self.open_json(v.value(), &workload_aad(name), || format!("workload {name}"))?);
        }
        Ok(out)
    }

    /// One workload, if it exists.
    pub fn workload(&self, name: &str) -> Result<Option<Workload>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(WORKLOADS)?;
        let Some(v) = t.get(name)? else { return Ok(None) };
        Ok(Some(self.open_json(v.value(), &workload_aad(name), || format!("workload {name}"))?))
    }

    /// Add or replace the grant of `g.target` to `g.workload`, which must exist.
    pub fn put_grant(&self, g: &Grant) -> Result<(), StoreError> {
        let target = g.target.to_string();
        let txn = self.begin_write()?;
        let mut ch = Changes::default();
        {
            if txn.open_table(WORKLOADS)?.get(g.workload.as_str())?.is_none() {
                return Err(StoreError::Missing(format!("workload {} does not exist", g.workload)));
            }
            let sealed = self.seal_json(g, &grant_aad(&g.workload, &target))?;
            let mut t = txn.open_table(GRANTS)?;
            let old = t.insert((g.workload.as_str(), target.as_str()), sealed.as_slice())?.map(|v| v.value().to_vec());
            self.changed(&mut ch, GRANTS.name(), &key_grant(&g.workload, &target), old.as_deref(), Some(&sealed));
        }
        self.commit(txn, ch)?;
        Ok(())
    }

    pub fn remove_grant(&self, workload: &str, target: &str) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        let mut ch = Changes::default();
        let Some(gone) = txn.open_table(GRANTS)?.remove((workload, target))?.map(|g| g.value().to_vec()) else {
            return Err(StoreError::Missing(format!("{target} is not granted to {workload}")));
        };
        self.changed(&mut ch, GRANTS.name(), &key_grant(workload, target), Some(&gone), None);
        self.commit(txn, ch)?;
        Ok(())
    }

    /// All grants, or one workload's, ordered by workload then target.
    pub fn grants(&self, workload: Option<&str>) -> Result<Vec<Grant>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(GRANTS)?;
        let mut out = Vec::new();
        for e in t.range((workload.unwrap_or(""), "")..)? {
            let (k, v) = e?;
            let (w, target) = k.value();
            if workload.is_some_and(|want| want != w) {
                break;
            }
            out.push(self.open_json(v.value(), &grant_aad(w, target), || format!("the grant of {target} to {w}"))?);
        }
        Ok(out)
    }

    /// Keep a value fetched from a remote backend, sealed, so a broker
    /// restarted while the backend is down still has it.
    pub fn cache_put(&self, path: &str, meta: &VersionMeta, value: &SecretBytes) -> Result<(), StoreError> {
        let mut plain = zeroize::Zeroizing::new(Vec::with_capacity(16 + value.len()));
        plain.extend_from_slice(&meta.version.to_be_bytes());
        plain.extend_from_slice(&meta.created_unix_ms.to_be_bytes());
        plain.extend_from_slice(value.expose());
        let sealed = self.sealer.seal(&plain, &cache_aad(path))?;
        let txn = self.begin_write()?;
        let mut ch = Changes::default();
        let old = txn.open_table(CACHE)?.insert(path, sealed.as_slice())?.map(|g| g.value().to_vec());
        self.changed(&mut ch, CACHE.name(), &key_str(path), old.as_deref(), Some(&sealed));
        self.commit(txn, ch)?;
        Ok(())
    }

    pub fn cache_remove(&self, path: &str) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        let mut ch = Changes::default();
        let gone = txn.open_table(CACHE)?.remove(path)?.map(|g| g.value().to_vec());
        self.changed(&mut ch, CACHE.name(), &key_str(path), gone.as_deref(), None);
        self.commit(txn, ch)?;
        Ok(())
    }

    /// Every cached value under `prefix/`. A tampered entry is an error.
    pub fn cache_under(&self, prefix: &str) -> Result<Vec<(String, VersionMeta, SecretBytes)>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(CACHE)?;
        let start = format!("{prefix}/");
        let mut out = Vec::new();
        for e in t.range(start.as_str()..)? {
            let (k, v) = e?;
            let path = k.value();
            if !path.starts_with(&start) {
                break;
            }
            let tampered = || StoreError::Tampered { what: format!("the cached copy of {path}") };
            let plain = self.sealer.open(v.value(), &cache_aad(path)).map_err(|_| tampered())?;
            let b = plain.expose();
            if b.len() < 16 {
                return Err(tampered());
            }
            let version = u64::from_be_bytes(b[..8].try_into().map_err(|_| tampered())?);
            let created_unix_ms = i64::from_be_bytes(b[8..16].try_into().map_err(|_| tampered())?);
            let value = SecretBytes::copy_from(&b[16..]);
            out.push((path.to_owned(), VersionMeta { version, created_unix_ms, size: value.len() as u64 }, value));
        }
        Ok(out)
    }

    /// Write a sealed JSON record into a name-keyed table.
    pub fn put_record(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &impl serde::Serialize,
    ) -> Result<(), StoreError> {
        let aad = format!("keyhole/v1/{}\0{key}", table.name());
        let sealed = self.seal_json(value, aad.as_bytes())?;
        let txn = self.begin_write()?;
        let mut ch = Changes::default();
        let old = txn.open_table(table)?.insert(key, sealed.as_slice())?.map(|g| g.value().to_vec());
        self.changed(&mut ch, table.name(), &key_str(key), old.as_deref(), Some(&sealed));
        self.commit(txn, ch)?;
        Ok(())
    }

    /// Remove a record; returns whether it was there.
    pub fn remove_record(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<bool, StoreError> {
        let txn = self.begin_write()?;
        let mut ch = Changes::default();
        let gone = txn.open_table(table)?.remove(key)?.map(|g| g.value().to_vec());
        self.changed(&mut ch, table.name(), &key_str(key), gone.as_deref(), None);
        let had = gone.is_some();
        self.commit(txn, ch)?;
        Ok(had)
    }

    /// Every record of a name-keyed table, in key order.
    pub fn records<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            let key = k.value();
            let aad = format!("keyhole/v1/{}\0{key}", table.name());
            out.push((
                key.to_owned(),
                self.open_json(v.value(), aad.as_bytes(), || format!("{} {key}", table.name()))?,
            ));
        }
        Ok(out)
    }

    /// A small sealed record in `meta` (e.g. when a backend last answered).
    pub fn put_note(&self, key: &str, value: &impl serde::Serialize) -> Result<(), StoreError> {
        let key = format!("note:{key}");
        let sealed = self.seal_json(value, key.as_bytes())?;
        let txn = self.begin_write()?;
        let mut ch = Changes::default();
        let old = txn.open_table(META)?.insert(key.as_str(), sealed.as_slice())?.map(|g| g.value().to_vec());
        self.changed(&mut ch, META.name(), &key_str(&key), old.as_deref(), Some(&sealed));
        self.commit(txn, ch)?;
        Ok(())
    }

    pub fn note<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let key = format!("note:{key}");
        let txn = self.begin_read()?;
        let t = txn.open_table(META)?;
        let Some(v) = t.get(key.as_str())? else { return Ok(None) };
        self.open_json(v.value(), key.as_bytes(), || key.clone()).map(Some)
    }

    /// Several secrets' current versions and values, read in one
    /// transaction: one consistent snapshot (a template's inputs). A
    /// missing secret is `None`.
    #[allow(clippy::type_complexity)]
    pub fn get_many(&self, paths: &[String]) -> Result<Vec<Option<(VersionMeta, SecretBytes)>>, StoreError> {
        let txn = self.begin_read()?;
        let heads = txn.open_table(HEADS)?;
        let values = txn.open_table(VALUES)?;
        let mut out = Vec::with_capacity(paths.len());
        for p in paths {
            let Some(meta) = self.read_head(&heads, p)?.and_then(|v| v.last().cloned()) else {
                out.push(None);
                continue;
            };
            let tampered = || StoreError::Tampered { what: format!("{p} version {}", meta.version) };
            let sealed = values.get((p.as_str(), meta.version))?.ok_or_else(tampered)?;
            let value = self.sealer.open(sealed.value(), &value_aad(p, meta.version)).map_err(|_| tampered())?;
            if value.len() as u64 != meta.size {
                return Err(tampered());
            }
            out.push(Some((meta, value)));
        }
        Ok(out)
    }

    /// Add a version of a template (read, append and write in one
    /// transaction; the oldest beyond the history depth go).
    pub fn template_put(
        &self,
        name: &str,
        source: &str,
        inputs: Vec<String>,
        fields: Vec<String>,
        sources: Vec<String>,
        now_ms: i64,
    ) -> Result<crate::template::TemplateVersion, StoreError> {
        let aad = format!("keyhole/v1/{}\0{name}", TEMPLATES.name());
        let txn = self.begin_write()?;
        let mut ch = Changes::default();
        let made;
        {
            let mut t = txn.open_table(TEMPLATES)?;
            let mut versions: Vec<crate::template::TemplateVersion> = match t.get(name)? {
                Some(v) => self.open_json(v.value(), aad.as_bytes(), || format!("template {name}"))?,
                None => Vec::new(),
            };
            let version = versions.last().map_or(0, |v| v.version) + 1;
            made = crate::template::TemplateVersion {
                version,
                created_unix_ms: now_ms,
                source: source.to_owned(),
                inputs,
                fields,
                sources,
            };
            versions.push(made.clone());
            let excess = versions.len().saturating_sub(self.history_depth.max(1));
            versions.drain(..excess);
            let sealed = self.seal_json(&versions, aad.as_bytes())?;
            let old = t.insert(name, sealed.as_slice())?.map(|g| g.value().to_vec());
            self.changed(&mut ch, TEMPLATES.name(), &key_str(name), old.as_deref(), Some(&sealed));
        }
        self.commit(txn, ch)?;
        Ok(made)
    }

    /// A template's kept versions, oldest first (`None`: no such template).
    pub fn template_versions(&self, name: &str) -> Result<Option<Vec<crate::template::TemplateVersion>>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(TEMPLATES)?;
        let Some(v) = t.get(name)? else { return Ok(None) };
        let aad = format!("keyhole/v1/{}\0{name}", TEMPLATES.name());
        self.open_json(v.value(), aad.as_bytes(), || format!("template {name}")).map(Some)
    }

    pub fn count(&self) -> Result<u64, StoreError> {
        let txn = self.begin_read()?;
        Ok(txn.open_table(HEADS)?.len()?)
    }
}

fn kept_range(versions: &[VersionMeta]) -> String {
    match (versions.first(), versions.last()) {
        (Some(a), Some(b)) if a.version == b.version => a.version.to_string(),
        (Some(a), Some(b)) => format!("{}-{}", a.version, b.version),
        _ => "none".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path, depth: u32) -> LocalStore {
        let key = MasterKey::from_bytes(&[7; 32]).unwrap();
        LocalStore::open(&dir.join("s.redb"), KeyMaterial::Key(key), depth).unwrap().0
    }

    fn p(s: &str) -> SecretPath {
        SecretPath::parse(s).unwrap()
    }

    #[test]
    fn versions_and_history_depth() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), 3);
        assert!(matches!(s.put(&p("a"), &SecretBytes::copy_from(b"x"), true, None, 0), Err(StoreError::NotFound(_))));
        for i in 1..=5u8 {
            let m = s.put(&p("db/pw"), &SecretBytes::copy_from(&[i]), false, None, i as i64).unwrap();
            assert_eq!(m.version, i as u64);
        }
        let h = s.history(&p("db/pw")).unwrap();
        assert_eq!(h.iter().map(|m| m.version).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(s.get(&p("db/pw"), None).unwrap().1.expose(), [5]);
        assert_eq!(s.get(&p("db/pw"), Some(3)).unwrap().1.expose(), [3]);
        let e = s.get(&p("db/pw"), Some(1)).unwrap_err().to_string();
        assert!(e.contains("kept: 3-5"), "{e}");
    }

    #[test]
    fn list_respects_segment_boundaries() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), 10);
        for path in ["db", "db/a", "db/b/c", "dbx", "web/t"] {
            s.put(&p(path), &SecretBytes::copy_from(b"v"), false, None, 0).unwrap();
        }
        let names = |pre| s.list(pre).unwrap().into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        assert_eq!(names("db"), ["db", "db/a", "db/b/c"]);
        assert_eq!(names("db/"), ["db", "db/a", "db/b/c"]);
        assert_eq!(names("").len(), 5);
        assert_eq!(s.delete(&p("db/a")).unwrap(), 1);
        assert_eq!(s.count().unwrap(), 4);
    }

    #[test]
    fn workloads_and_grants() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), 10);
        let w = Workload::new("web", &["unix:uid:1000".into()]).unwrap();
        let g = Grant::new("db/*", "web", None, None, None, None).unwrap();
        assert!(matches!(s.put_grant(&g), Err(StoreError::Missing(_))), "no grant to a missing workload");
        s.add_workload(&w).unwrap();
        assert!(matches!(s.add_workload(&w), Err(StoreError::Exists(_))));
        s.add_workload(&Workload::new("api", &["unix:uid:1".into()]).unwrap()).unwrap();
        s.put_grant(&g).unwrap();
        s.put_grant(&Grant::new("x", "web", None, None, None, None).unwrap()).unwrap();
        s.put_grant(&Grant::new("x", "api", None, None, None, None).unwrap()).unwrap();
        assert_eq!(s.grants(Some("web")).unwrap().len(), 2);
        assert_eq!(s.grants(None).unwrap().len(), 3);
        s.remove_grant("web", "x").unwrap();
        assert!(matches!(s.remove_grant("web", "x"), Err(StoreError::Missing(_))));
        assert_eq!(s.remove_workload("web").unwrap(), 1);
        assert_eq!(s.grants(None).unwrap().len(), 1);
        assert_eq!(s.workloads().unwrap().iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["api"]);
    }

    #[test]
    fn digest_arithmetic_is_mod_2_256() {
        let mut d = Digest([u64::MAX, u64::MAX, 5, 0]);
        let one = Digest([1, 0, 0, 0]);
        d.add(one);
        assert_eq!(d, Digest([0, 0, 6, 0]));
        d.add(one.neg());
        assert_eq!(d, Digest([u64::MAX, u64::MAX, 5, 0]));
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        let mut z = Digest([0, 0, 0, u64::MAX]);
        z.add(Digest([0, 0, 0, 1]));
        assert_eq!(z, Digest::default());
        assert!(Digest::from_hex("xyz").is_none());
    }

    fn reopen(dir: &Path) -> Result<LocalStore, StoreError> {
        let key = MasterKey::from_bytes(&[7; 32]).unwrap();
        LocalStore::open(&dir.join("s.redb"), KeyMaterial::Key(key), 10).map(|(s, _)| s)
    }

    fn raw<T>(dir: &Path, f: impl FnOnce(&redb::WriteTransaction) -> T) -> T {
        let db = Database::open(dir.join("s.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        let out = f(&txn);
        txn.commit().unwrap();
        out
    }

    #[test]
    fn every_kind_of_write_keeps_the_manifest_in_step() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), 2);
        for i in 0..4u8 {
            s.put(&p("a"), &SecretBytes::copy_from(&[i]), false, None, 0).unwrap();
        }
        s.put(&p("b"), &SecretBytes::copy_from(b"b"), false, None, 0).unwrap();
        s.delete(&p("b")).unwrap();
        s.add_workload(&Workload::new("web", &["unix:uid:1000".into()]).unwrap()).unwrap();
        s.add_workload(&Workload::new("api", &["unix:uid:1".into()]).unwrap()).unwrap();
        s.put_grant(&Grant::new("a", "web", None, None, None, None).unwrap()).unwrap();
        s.put_grant(&Grant::new("a", "web", None, None, None, None).unwrap()).unwrap();
        s.put_grant(&Grant::new("a", "api", None, None, None, None).unwrap()).unwrap();
        s.remove_grant("api", "a").unwrap();
        s.remove_workload("web").unwrap();
        let meta = VersionMeta { version: 3, created_unix_ms: 1, size: 1 };
        s.cache_put("prod/x", &meta, &SecretBytes::copy_from(b"x")).unwrap();
        s.cache_put("prod/x", &meta, &SecretBytes::copy_from(b"y")).unwrap();
        s.cache_put("prod/y", &meta, &SecretBytes::copy_from(b"y")).unwrap();
        s.cache_remove("prod/y").unwrap();
        s.put_record(VOLUMES, "v", &"spec").unwrap();
        s.put_record(VOLUME_MOUNTS, "m", &"mount").unwrap();
        assert!(s.remove_record(VOLUME_MOUNTS, "m").unwrap());
        s.put_note("backend-ok:prod", &5u64).unwrap();
        s.put_note("backend-ok:prod", &6u64).unwrap();
        s.seal_audit_with(Box::new(|| Some(AuditSeal { seq: 9, mac: [3; 32] })));
        s.seal_audit().unwrap();
        drop(s);
        let s = reopen(d.path()).unwrap();
        assert_eq!(s.sealed_audit_head(), Some(AuditSeal { seq: 9, mac: [3; 32] }));
        assert_eq!(s.get(&p("a"), None).unwrap().1.expose(), [3]);
    }

    #[test]
    fn a_replayed_or_removed_record_refuses_the_store() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), 10);
        s.put(&p("a"), &SecretBytes::copy_from(b"1"), false, None, 0).unwrap();
        s.add_workload(&Workload::new("web", &["unix:uid:1000".into()]).unwrap()).unwrap();
        s.put_grant(&Grant::new("a", "web", None, None, None, None).unwrap()).unwrap();
        let head =
            |t: &redb::WriteTransaction| t.open_table(HEADS).unwrap().get("a").unwrap().unwrap().value().to_vec();
        let grant = |t: &redb::WriteTransaction| {
            t.open_table(GRANTS).unwrap().get(("web", "a")).unwrap().unwrap().value().to_vec()
        };
        drop(s);
        let (old_head, old_grant) = raw(d.path(), |t| (head(t), grant(t)));
        let s = reopen(d.path()).unwrap();
        s.put(&p("a"), &SecretBytes::copy_from(b"2"), false, None, 0).unwrap();
        s.remove_grant("web", "a").unwrap();
        drop(s);
        let new_head = raw(d.path(), head);
        raw(d.path(), |t| t.open_table(HEADS).unwrap().insert("a", old_head.as_slice()).map(drop).unwrap());
        assert!(matches!(reopen(d.path()), Err(StoreError::Tampered { .. })));
        raw(d.path(), |t| t.open_table(HEADS).unwrap().insert("a", new_head.as_slice()).map(drop).unwrap());
        raw(d.path(), |t| t.open_table(GRANTS).unwrap().insert(("web", "a"), old_grant.as_slice()).map(drop).unwrap());
        assert!(matches!(reopen(d.path()), Err(StoreError::Tampered { .. })));
        raw(d.path(), |t| t.open_table(GRANTS).unwrap().remove(("web", "a")).map(drop).unwrap());
        assert_eq!(reopen(d.path()).unwrap().get(&p("a"), None).unwrap().1.expose(), b"2");
        // A store that lost its key check but holds records is no new store.
        raw(d.path(), |t| t.open_table(META).unwrap().remove("keycheck").map(drop).unwrap());
        assert!(matches!(reopen(d.path()), Err(StoreError::Tampered { .. })));
    }

    #[test]
    fn a_store_without_a_manifest_is_upgraded_once() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), 10);
        s.put(&p("a"), &SecretBytes::copy_from(b"1"), false, None, 0).unwrap();
        let sealer = MasterKey::from_bytes(&[7; 32]).unwrap().sealer();
        drop(s);
        // As keyhole 0.1 left it: a v1 key check and no manifest.
        raw(d.path(), |t| {
            let mut meta = t.open_table(META).unwrap();
            meta.remove(MANIFEST).unwrap();
            meta.insert("keycheck", sealer.seal(KEYCHECK_V1, KEYCHECK_AAD).unwrap().as_slice()).unwrap();
        });
        let s = reopen(d.path()).unwrap();
        assert_eq!(s.get(&p("a"), None).unwrap().1.expose(), b"1");
        assert!(s.sealed_audit_head().is_none());
        drop(s);
        // From then on it is a store with a manifest: dropping it refuses.
        raw(d.path(), |t| t.open_table(META).unwrap().remove(MANIFEST).map(drop).unwrap());
        assert!(matches!(reopen(d.path()), Err(StoreError::Tampered { .. })));
    }

    #[test]
    fn wrong_key_and_moved_records_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), 10);
        s.put(&p("a"), &SecretBytes::copy_from(b"va"), false, None, 0).unwrap();
        s.put(&p("b"), &SecretBytes::copy_from(b"vb"), false, None, 0).unwrap();
        // Copy a's sealed value over b's: same version, other path.
        let txn = s.begin_write().unwrap();
        {
            let mut t = txn.open_table(VALUES).unwrap();
            let a = t.get(("a", 1)).unwrap().unwrap().value().to_vec();
            t.insert(("b", 1), a.as_slice()).unwrap();
        }
        txn.commit().unwrap();
        assert!(matches!(s.get(&p("b"), None), Err(StoreError::Tampered { .. })));
        assert_eq!(s.get(&p("a"), None).unwrap().1.expose(), b"va");
        drop(s);
        let other = MasterKey::from_bytes(&[8; 32]).unwrap();
        let r = LocalStore::open(&d.path().join("s.redb"), KeyMaterial::Key(other), 10);
        assert!(matches!(r, Err(StoreError::WrongKey)));
    }
}
