//! The audit log: JSON lines, each HMAC-chained to the one before.
//!
//! A line is a JSON object whose last member is `"hmac"`: HMAC-SHA256,
//! under the audit key, over the previous line's HMAC (32 zero bytes for
//! the first line) followed by the line's bytes up to `,"hmac"` plus `}`.
//! Lines carry a `seq` from 1 without gaps. Editing, reordering or cutting
//! lines breaks the chain; cutting the tail is caught by the running
//! broker, which knows the last HMAC it wrote, and, while no broker runs,
//! at the next start: the store seals the log's durable head
//! ([`AuditLog::durable_head`]) with each of its writes, every few
//! seconds, at handover and at a clean stop, and the log must hold it
//! ([`AuditLog::holds`]). No value is ever written here: events name
//! paths and versions only.
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hmac::Mac;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::crypto::HmacSha256;
use crate::identity::Identity;
use crate::secret::SecretBytes;

const MAC_LEN: usize = 32;
/// `,"hmac":"` + 64 hex digits + `"}`.
const TRAILER_LEN: usize = 9 + 2 * MAC_LEN + 2;

/// Declares [`EventKind`]: each variant with its name on the wire.
macro_rules! event_kinds {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// What an audit line records. The names ([`EventKind::as_str`])
        /// are the `event` field of the log's lines, as documented in
        /// `docs/src/reference/audit-events.md`: renaming one changes the
        /// log format.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum EventKind {
            $($(#[$doc])* $variant,)*
        }

        impl EventKind {
            /// Every kind, in the order declared.
            pub const ALL: &'static [EventKind] = &[$(EventKind::$variant,)*];

            /// The name written in the `event` field.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(EventKind::$variant => $name,)*
                }
            }
        }
    };
}

event_kinds! {
    // Reads and denials.
    /// A file opened through a mount, allowed (a caller's first of the
    /// file's version in full, before it is served).
    Read = "read",
    /// A caller's further reads summed up.
    ReadSummary = "read_summary",
    /// An open, or an admin call, refused (in full).
    Deny = "deny",
    /// A caller's denials summed up.
    DenySummary = "deny_summary",
    /// A caller held to a `[limits]` value.
    Limit = "limit",
    /// A run of the `[alerts] on_deny` hook.
    Alert = "alert",
    // Admin calls, one line per call.
    /// `secret put`.
    Put = "put",
    /// `secret rotate`.
    Rotate = "rotate",
    /// `secret get`.
    Get = "get",
    /// `secret ls`.
    Ls = "ls",
    /// `secret history`.
    History = "history",
    /// `secret rm`.
    Rm = "rm",
    /// `workload add`.
    WorkloadAdd = "workload_add",
    /// `workload ls`.
    WorkloadLs = "workload_ls",
    /// `workload rm`.
    WorkloadRm = "workload_rm",
    /// `grant`.
    Grant = "grant",
    /// `revoke`.
    Revoke = "revoke",
    /// `grants`.
    Grants = "grants",
    /// `mounts`.
    Mounts = "mounts",
    /// `status`.
    Status = "status",
    /// `audit` (and `--follow`).
    AuditRead = "audit_read",
    /// `audit --verify`.
    AuditVerify = "audit_verify",
    // Templates.
    /// `template put`.
    TemplatePut = "template_put",
    /// `template get`.
    TemplateGet = "template_get",
    /// `template ls`.
    TemplateLs = "template_ls",
    /// `template rm`.
    TemplateRm = "template_rm",
    /// A template's file could not be rendered (the open got EIO).
    TemplateError = "template_error",
    // Dynamic credentials and certificates.
    /// `dynamic add`.
    DynamicAdd = "dynamic_add",
    /// `dynamic rm`.
    DynamicRm = "dynamic_rm",
    /// `cert add`.
    CertAdd = "cert_add",
    /// `cert rm`.
    CertRm = "cert_rm",
    /// `dynamic ls`, `cert ls`.
    Sources = "sources",
    /// `leases`.
    Leases = "leases",
    /// A lease issued for a container's first open.
    LeaseIssue = "lease_issue",
    /// A lease that could not be issued (the open got EIO).
    LeaseError = "lease_error",
    /// A lease revoked (its container ended, its grant or source went).
    LeaseRevoke = "lease_revoke",
    // Teams.
    /// `role add`.
    RoleAdd = "role_add",
    /// `role ls`.
    RoleLs = "role_ls",
    /// `role rm`.
    RoleRm = "role_rm",
    /// `apply -f`.
    Apply = "apply",
    /// `diff -f`.
    Diff = "diff",
    /// `export`.
    Export = "export",
    /// `refresh`.
    Refresh = "refresh",
    // Containers and Docker.
    /// A `grant --notify` signal sent after a rotation.
    Notify = "notify",
    /// A `grant --restart` of a container that read a changed file (or
    /// why not: gone, failed, the queue full).
    Restart = "restart",
    /// A `grant --exec` command run in a container that read a changed
    /// file, with its exit code (or why not).
    Exec = "exec",
    /// dockerd created a keyhole volume.
    VolumeCreate = "volume_create",
    /// dockerd mounted one.
    VolumeMount = "volume_mount",
    /// dockerd unmounted one.
    VolumeUnmount = "volume_unmount",
    /// dockerd removed one.
    VolumeRemove = "volume_remove",
    // Backends.
    /// A Vault/OpenBao backend started failing.
    BackendError = "backend_error",
    /// An open served from the cache while its backend fails.
    StaleServe = "stale_serve",
    /// A caller's further stale serves summed up.
    StaleServeSummary = "stale_serve_summary",
    /// An open refused: the cache is older than `max_stale`.
    StaleExpired = "stale_expired",
    // The broker's life.
    /// A broker started (not by a takeover).
    Start = "start",
    /// A clean stop.
    Stop = "stop",
    /// Sessions handed to a successor.
    Handover = "handover",
    /// A successor took over.
    Takeover = "takeover",
    /// A handover that did not complete.
    HandoverFailed = "handover_failed",
    /// A would-be successor refused.
    TakeoverRefused = "takeover_refused",
    /// The first line of a new file after a rotation.
    AuditRotate = "audit_rotate",
    /// A start with `serve --new-audit-log` on a log that does not hold
    /// the sealed head.
    AuditReset = "audit_reset",
}

impl EventKind {
    /// A denial, written in full or summed up: what the alert hook hears.
    pub fn is_denial(self) -> bool {
        matches!(self, EventKind::Deny | EventKind::DenySummary)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One audited event. Deliberately has no field that could hold a value.
#[derive(Debug, Serialize)]
pub struct Event<'a> {
    pub event: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<&'a Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// Only on the first line of a file after a rotation: the HMAC of the
    /// previous file's last line, so the file verifies on its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_hmac: Option<&'a str>,
    /// A `deny_summary`: the denials it stands for, the files refused,
    /// and when the first and the last of them were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<&'a str>,
    /// A template's file: every input its render read, as `path@version`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inputs: Option<&'a [String]>,
}

impl<'a> Event<'a> {
    pub fn new(event: EventKind) -> Self {
        Event {
            event,
            method: None,
            caller: None,
            workload: None,
            path: None,
            version: None,
            reason: None,
            prev_hmac: None,
            count: None,
            files: None,
            first: None,
            last: None,
            inputs: None,
        }
    }
}

/// When the log is rotated: past `max_bytes`, into at most `keep` older
/// files named `<log>.<last seq, 12 digits>`; but a file last written
/// less than `min_keep` ago is never deleted (more files are kept), so
/// no burst of lines can push recent history out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    pub max_bytes: u64,
    pub keep: u32,
    pub min_keep: std::time::Duration,
}

/// Whether keeping more than `keep` files was logged (once a process).
static KEPT_YOUNG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Serialize)]
struct Stamped<'a> {
    seq: u64,
    time: String,
    #[serde(flatten)]
    event: &'a Event<'a>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("audit log fails verification at line {line}: {problem}")]
    Broken { line: u64, problem: String },
    #[error("audit log handed over to a successor broker")]
    Sealed,
}

struct Head {
    file: File,
    /// Bytes in the current file.
    bytes: u64,
    rotation: Option<Rotation>,
    seq: u64,
    mac: [u8; MAC_LEN],
}

pub struct AuditLog {
    path: PathBuf,
    key: SecretBytes,
    head: Mutex<Head>,
    lines: broadcast::Sender<(u64, String)>,
    /// Where denials go as they are written (`[alerts] on_deny`).
    alerts: std::sync::OnceLock<crate::alerts::Alerts>,
    /// Which denials, reads and stale serves are written in full, and the
    /// ones summed up.
    denials: crate::limits::Coalescer,
    reads: crate::limits::Coalescer,
    stale: crate::limits::Coalescer,
    /// Set while a successor broker takes the log over: nothing more may
    /// be written here. Changed with the head locked; read without it by
    /// events held back.
    sealed: AtomicBool,
    /// The thread that writes held events' summaries when due.
    flusher: std::sync::Once,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("path", &self.path).finish_non_exhaustive()
    }
}

fn mac_of(key: &SecretBytes, prev: &[u8; MAC_LEN], body: &[u8]) -> [u8; MAC_LEN] {
    let mut m = <HmacSha256 as hmac::KeyInit>::new_from_slice(key.expose()).expect("HMAC takes any key length");
    m.update(prev);
    m.update(body);
    m.finalize().into_bytes().into()
}

/// The `seq` of a line in our own shape, `{"seq":N,...`, read without
/// parsing the JSON.
pub fn seq_of(line: &str) -> Option<u64> {
    line.strip_prefix("{\"seq\":")?.split_once(',')?.0.parse().ok()
}

/// Check one line against the chain; returns its HMAC. `keyed` is an
/// HMAC already keyed with the audit key (cloned per line).
fn check_line(keyed: &HmacSha256, prev: &[u8; MAC_LEN], want_seq: u64, line: &str) -> Result<[u8; MAC_LEN], String> {
    if line.len() < TRAILER_LEN + 2 || !line.ends_with("\"}") {
        return Err("not an audit line".into());
    }
    let (body, trailer) = line.split_at(line.len() - TRAILER_LEN);
    let hex_mac = trailer.strip_prefix(",\"hmac\":\"").and_then(|t| t.strip_suffix("\"}")).ok_or("no hmac")?;
    let mut got = [0u8; MAC_LEN];
    hex::decode_to_slice(hex_mac, &mut got).map_err(|_| "hmac is not hex")?;
    // The signed text is the line without its hmac field: body + "}".
    let mut m = keyed.clone();
    m.update(prev);
    m.update(body.as_bytes());
    m.update(b"}");
    let want: [u8; MAC_LEN] = m.finalize().into_bytes().into();
    if want.iter().zip(&got).fold(0u8, |d, (a, b)| d | (a ^ b)) != 0 {
        return Err("hmac mismatch: the line was edited, or lines were removed or reordered before it".into());
    }
    // Authentic, so in our own shape: {"seq":N,...
    let seq = seq_of(body).ok_or("no seq")?;
    if seq != want_seq {
        return Err(format!("seq {seq} where {want_seq} was expected"));
    }
    Ok(got)
}

/// What verifying one file found: its first and last seq (first is
/// where a rotated file continues; last is first - 1 for an empty file)
/// and its last HMAC (the chain's start for an empty file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    first: u64,
    last: u64,
    /// The HMAC the file's first line chains from.
    start: [u8; MAC_LEN],
    mac: [u8; MAC_LEN],
}

/// Where a file's chain starts: at line 1 from zeros, or, for a file
/// begun by a rotation, where its first line says (the line's own HMAC
/// covers that claim).
fn chain_start(first_line: &str) -> (u64, [u8; MAC_LEN]) {
    #[derive(serde::Deserialize)]
    struct First {
        seq: u64,
        event: String,
        prev_hmac: Option<String>,
    }
    let mut prev = [0u8; MAC_LEN];
    match serde_json::from_str::<First>(first_line) {
        Ok(f)
            if f.event == EventKind::AuditRotate.as_str()
                && f.prev_hmac.as_ref().is_some_and(|h| hex::decode_to_slice(h, &mut prev).is_ok()) =>
        {
            (f.seq, prev)
        }
        _ => (1, [0; MAC_LEN]),
    }
}

/// Verify one file of the log end to end.
fn verify_file(key: &SecretBytes, path: &Path) -> Result<Span, AuditError> {
    verify_file_at(key, path, 0).map(|(span, _)| span)
}

/// [`verify_file`], also returning the HMAC of line `at` if the file
/// holds it.
fn verify_file_at(key: &SecretBytes, path: &Path, at: u64) -> Result<(Span, Option<[u8; MAC_LEN]>), AuditError> {
    let mut found = None;
    let empty = Span { first: 1, last: 0, start: [0; MAC_LEN], mac: [0; MAC_LEN] };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((empty, None)),
        Err(source) => return Err(AuditError::Io { path: path.into(), source }),
    };
    let keyed = <HmacSha256 as hmac::KeyInit>::new_from_slice(key.expose()).expect("HMAC takes any key length");
    let mut span = empty;
    let mut prev = [0u8; MAC_LEN];
    let mut n = 0u64;
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|source| AuditError::Io { path: path.into(), source })?;
        if n == 0 {
            let (first, start) = chain_start(&line);
            (n, prev) = (first - 1, start);
            (span.first, span.start) = (first, start);
        }
        n += 1;
        prev = check_line(&keyed, &prev, n, &line).map_err(|problem| AuditError::Broken { line: n, problem })?;
        if n == at {
            found = Some(prev);
        }
    }
    span.last = n.max(span.first - 1);
    span.mac = if n >= span.first { prev } else { span.start };
    Ok((span, found))
}

/// The last seq a rotated file's name carries (`<log>.<12 digits>`).
fn rotated_last(path: &Path) -> Option<u64> {
    path.extension()?.to_str()?.parse().ok()
}

/// The files a rotation left beside `path`, oldest first.
fn rotated_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .is_some_and(|s| s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    Ok(found)
}

fn rotated_name(path: &Path, last_seq: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{last_seq:012}"));
    PathBuf::from(name)
}

/// Whether the log's last line is line `seq` with HMAC `mac`.
fn ends_at(path: &Path, seq: u64, mac: &[u8; MAC_LEN]) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    if seq == 0 {
        return Ok(len == 0);
    }
    f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail)?;
    let Some(body) = tail.strip_suffix(b"\n") else { return Ok(false) };
    let last = body.rsplit(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(last) else { return Ok(false) };
    #[derive(serde::Deserialize)]
    struct Tail {
        seq: u64,
        hmac: String,
    }
    Ok(serde_json::from_str::<Tail>(line).is_ok_and(|t| t.seq == seq && t.hmac == hex::encode(mac)))
}

/// Cut a last line left unfinished by a crash mid-write (no newline).
fn drop_partial_tail(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    // Read back from the end, a block at a time, to the last newline.
    let mut end = len;
    loop {
        let start = end.saturating_sub(64 * 1024);
        let mut block = vec![0u8; (end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut block)?;
        if end == len && block.last().is_none_or(|&b| b == b'\n') {
            return Ok(false);
        }
        if let Some(i) = block.iter().rposition(|&b| b == b'\n') {
            f.set_len(start + i as u64 + 1)?;
            return Ok(true);
        }
        if start == 0 {
            f.set_len(0)?;
            return Ok(true);
        }
        end = start;
    }
}

impl AuditLog {
    /// Open the log, verifying the chain written so far; a broken chain
    /// refuses to start rather than silently continuing it.
    pub fn open(path: &Path, key: SecretBytes) -> Result<Self, AuditError> {
        let io = |source| AuditError::Io { path: path.into(), source };
        if drop_partial_tail(path).map_err(io)? {
            tracing::warn!(path = %path.display(), "audit log ended in a partial line (crash during a write); cut it");
        }
        if !path.exists() {
            // A rotation that stopped between moving the full file aside
            // and starting the next: continue from the newest moved file.
            if let Some(last) = rotated_files(path).map_err(io)?.pop() {
                let span = verify_file(&key, &last)?;
                let log = Self::append_at(path, key, span.last, span.mac)?;
                log.start_file(&mut log.head.lock().expect("audit lock"), &last)?;
                return Ok(log);
            }
        }
        let span = verify_file(&key, path)?;
        Self::append_at(path, key, span.last, span.mac)
    }

    fn append_at(path: &Path, key: SecretBytes, seq: u64, mac: [u8; MAC_LEN]) -> Result<Self, AuditError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| AuditError::Io { path: path.into(), source })?;
        let bytes = file.metadata().map_err(|source| AuditError::Io { path: path.into(), source })?.len();
        let (lines, _) = broadcast::channel(1024);
        Ok(AuditLog {
            path: path.into(),
            key,
            head: Mutex::new(Head { file, bytes, rotation: None, seq, mac }),
            lines,
            alerts: Default::default(),
            denials: Default::default(),
            reads: crate::limits::Coalescer::new(crate::limits::READS),
            stale: crate::limits::Coalescer::new(crate::limits::READS),
            sealed: AtomicBool::new(false),
            flusher: std::sync::Once::new(),
        })
    }

    /// Rotate the log past `rotation.max_bytes` from now on.
    pub fn rotate_at(&self, rotation: Rotation) {
        self.head.lock().expect("audit lock").rotation = Some(rotation);
    }

    /// The first line of a new file: it names the file before it and
    /// carries its last HMAC, and chains from it as every line does.
    /// Written under the same lock as the line before it, so nothing
    /// else can come first in the new file.
    fn start_file(&self, head: &mut Head, previous: &Path) -> Result<(u64, String), AuditError> {
        let mac = hex::encode(head.mac);
        let name = previous.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let reason = format!("continues {name}");
        let event = Event { reason: Some(&reason), prev_hmac: Some(&mac), ..Event::new(EventKind::AuditRotate) };
        let written = self.append(head, &event)?;
        crate::metrics::audited(&event);
        Ok(written)
    }

    /// Move the full file aside, start the next, and delete the oldest
    /// beyond `keep`. Called with the head locked, after a write.
    fn rotate(&self, head: &mut Head, rotation: Rotation) -> std::io::Result<PathBuf> {
        let aside = rotated_name(&self.path, head.seq);
        head.file.sync_all()?;
        std::fs::rename(&self.path, &aside)?;
        head.file = OpenOptions::new().create(true).append(true).mode(0o600).open(&self.path)?;
        head.bytes = 0;
        let old = rotated_files(&self.path)?;
        let now = std::time::SystemTime::now();
        for f in old.iter().take(old.len().saturating_sub(rotation.keep as usize)) {
            // Oldest first: once one is young, so are the rest. A time in
            // the future counts as young.
            let written = std::fs::metadata(f)?.modified()?;
            if now.duration_since(written).unwrap_or_default() < rotation.min_keep {
                if !KEPT_YOUNG.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        path = %self.path.display(),
                        keep = rotation.keep,
                        kept = old.len(),
                        "audit log: keeping more rotated files than keep, as none may be deleted before [audit] \
                         min_keep = {}: is something writing lines fast? (said once)",
                        humantime::format_duration(rotation.min_keep)
                    );
                }
                break;
            }
            std::fs::remove_file(f)?;
        }
        Ok(aside)
    }

    /// Continue a log that a predecessor broker handed over at `(seq, mac)`
    /// (see [`AuditLog::seal`]) without verifying it all again: its last
    /// line must be that head. Otherwise it is opened as usual.
    pub fn resume(path: &Path, key: SecretBytes, seq: u64, mac: [u8; MAC_LEN]) -> Result<Self, AuditError> {
        if ends_at(path, seq, &mac).unwrap_or(false) {
            return Self::append_at(path, key, seq, mac);
        }
        tracing::warn!(path = %path.display(), "the audit log does not end where the previous broker left it; verifying it");
        Self::open(path, key)
    }

    /// Stop writing (a successor takes over); returns the head to hand it.
    pub fn seal(&self) -> (u64, [u8; MAC_LEN]) {
        self.flush_summaries(true);
        let head = self.head.lock().expect("audit lock");
        self.sealed.store(true, Ordering::Release);
        (head.seq, head.mac)
    }

    /// Write again (the successor did not take over).
    pub fn unseal(&self) {
        let _head = self.head.lock().expect("audit lock");
        self.sealed.store(false, Ordering::Release);
    }

    /// Append one event. An audit line that cannot be written is logged
    /// loudly; the error is returned so callers that must not proceed
    /// unaudited can refuse.
    pub fn record(&self, event: &Event<'_>) -> Result<u64, AuditError> {
        // Invariant: poisoning needs a panic while holding the lock, and
        // nothing below panics.
        let mut head = self.head.lock().expect("audit lock");
        if self.sealed.load(Ordering::Acquire) {
            return Err(AuditError::Sealed);
        }
        let (seq, line) = self.append(&mut head, event)?;
        // The line is written either way; a rotation that fails is tried
        // again after the next line.
        let mut next_file = None;
        if let Some(r) = head.rotation.filter(|r| head.bytes >= r.max_bytes) {
            match self
                .rotate(&mut head, r)
                .map_err(|e| e.to_string())
                .and_then(|aside| self.start_file(&mut head, &aside).map_err(|e| e.to_string()))
            {
                Ok(first) => next_file = Some(first),
                Err(e) => tracing::error!(error = %e, path = %self.path.display(), "audit log not rotated"),
            }
        }
        drop(head);
        crate::metrics::audited(event);
        if event.event.is_denial() {
            if let Some(a) = self.alerts.get() {
                // The caller as the denial limiter keys it; a summary's
                // workloads from its files (`workload:path`).
                let caller = event.caller.map_or_else(|| crate::limits::OVERFLOW.to_owned(), crate::limits::caller_key);
                let mut workloads: Vec<&str> = event.workload.into_iter().collect();
                for f in event.files.unwrap_or_default() {
                    if let Some((w, _)) = f.split_once(':') {
                        if !workloads.contains(&w) {
                            workloads.push(w);
                        }
                    }
                }
                a.deny(&line, event.count.unwrap_or(1), &caller, &workloads);
            }
        }
        let _ = self.lines.send((seq, line));
        if let Some(first) = next_file {
            let _ = self.lines.send(first);
        }
        Ok(seq)
    }

    /// Audit a denial by the caller limited as `key` (see
    /// [`crate::limits::caller_key`]): the first of each file in full, the
    /// rest summed up in `deny_summary` lines at most once a second, so a
    /// flood cannot flood the log. Every denial is counted in the metrics
    /// and reaches the alert hook (summaries with their count).
    pub fn deny(self: &Arc<Self>, key: &str, event: &Event<'_>) -> Result<(), AuditError> {
        self.summed(key, event)
    }

    /// Audit an allowed open (`read` or `stale_serve`) by the caller
    /// limited as `key`: its first of each file version in full, before it
    /// is served; repeats summed up in `read_summary` or
    /// `stale_serve_summary` lines at most once a second. A container
    /// reading in a loop cannot fill the disk, and a warm open costs no
    /// write. Every open is still counted (`keyhole_reads_total`).
    pub fn read(self: &Arc<Self>, key: &str, event: &Event<'_>) -> Result<(), AuditError> {
        self.summed(key, event)
    }

    /// Write `event` in full, or hold it to be summed up, as its kind's
    /// [`crate::limits::Coalescer`] decides.
    fn summed(self: &Arc<Self>, key: &str, event: &Event<'_>) -> Result<(), AuditError> {
        let Some((coalescer, _)) = self.coalescer(event.event) else { return self.record(event).map(drop) };
        let file = match (event.workload, event.path) {
            (Some(w), Some(p)) => format!("{w}:{p}"),
            _ => event.method.or(event.path).unwrap_or("-").to_owned(),
        };
        // A read of a new version is new; a denial is of the file.
        let version = event.version.filter(|_| event.event != EventKind::Deny);
        let no_one = Identity::default();
        let caller = event.caller.unwrap_or(&no_one);
        let now = (std::time::Instant::now(), std::time::SystemTime::now());
        let (full, summary) = coalescer.note(now.0, now.1, key, (&file, version), caller);
        if let Some(s) = summary {
            self.summarize(event.event, &s);
        }
        self.start_flusher();
        if full {
            return self.record(event).map(drop);
        }
        crate::metrics::counted(event);
        // An event held back must still fail closed when the log cannot
        // be written at all.
        if self.sealed.load(Ordering::Acquire) { Err(AuditError::Sealed) } else { Ok(()) }
    }

    /// The coalescer of events of `kind`, and the kind of its summaries.
    fn coalescer(&self, kind: EventKind) -> Option<(&crate::limits::Coalescer, EventKind)> {
        match kind {
            EventKind::Deny => Some((&self.denials, EventKind::DenySummary)),
            EventKind::Read => Some((&self.reads, EventKind::ReadSummary)),
            EventKind::StaleServe => Some((&self.stale, EventKind::StaleServeSummary)),
            _ => None,
        }
    }

    /// Write the summary line of held events of `kind`.
    fn summarize(&self, kind: EventKind, s: &crate::limits::Summary) {
        let Some((_, summary)) = self.coalescer(kind) else { return };
        let what = match kind {
            EventKind::Deny => "denials",
            EventKind::Read => "reads",
            _ => "stale serves",
        };
        let time = |t| humantime::format_rfc3339_millis(t).to_string();
        let (first, last) = (time(s.first), time(s.last));
        let reason = match (s.key.as_str(), s.unnamed) {
            (crate::limits::OVERFLOW, _) => format!("{what} of callers beyond the ones tracked, summed up"),
            (_, 0) => format!("{what} summed up since this caller's last line"),
            (_, n) => format!("{what} summed up since this caller's last line; {n} of them of files not named"),
        };
        let event = Event {
            caller: s.caller.as_ref().filter(|_| s.key != crate::limits::OVERFLOW),
            reason: Some(&reason),
            count: Some(s.count),
            files: Some(&s.files),
            first: Some(&first),
            last: Some(&last),
            ..Event::new(summary)
        };
        if let Err(e) = self.record(&event) {
            tracing::error!(error = %e, event = %summary, count = s.count, "a summary was not audited");
        }
    }

    /// Write the summaries due (all held ones, with `all`).
    fn flush_summaries(&self, all: bool) {
        for kind in [EventKind::Deny, EventKind::Read, EventKind::StaleServe] {
            let Some((coalescer, _)) = self.coalescer(kind) else { continue };
            for s in coalescer.due(std::time::Instant::now(), all) {
                self.summarize(kind, &s);
            }
        }
    }

    /// Start the thread that writes held events' summaries when they are
    /// due, once; it ends with the log.
    fn start_flusher(self: &Arc<Self>) {
        self.flusher.call_once(|| {
            let log = Arc::downgrade(self);
            let spawned = std::thread::Builder::new().name("audit-summaries".into()).spawn(move || {
                loop {
                    std::thread::sleep(crate::limits::SUMMARY_PERIOD / 5);
                    let Some(log) = log.upgrade() else { return };
                    log.flush_summaries(false);
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the thread that audits summaries of denials and reads");
            }
        });
    }

    /// Write one line at the head of the chain; the caller holds the lock.
    fn append(&self, head: &mut Head, event: &Event<'_>) -> Result<(u64, String), AuditError> {
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let seq = head.seq + 1;
        // Invariant: Event and Identity serialize infallibly (strings, ints).
        let body = serde_json::to_string(&Stamped { seq, time, event }).expect("serialize audit event");
        let mac = mac_of(&self.key, &head.mac, body.as_bytes());
        let line = format!("{},\"hmac\":\"{}\"}}", &body[..body.len() - 1], hex::encode(mac));
        head.file
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|source| AuditError::Io { path: self.path.clone(), source })
            .inspect_err(|e| tracing::error!(error = %e, "audit line not written"))?;
        head.seq = seq;
        head.mac = mac;
        head.bytes += line.len() as u64 + 1;
        Ok((seq, line))
    }

    /// Send every denial written from now on to `alerts`.
    pub fn alert_on_deny(&self, alerts: crate::alerts::Alerts) {
        let _ = self.alerts.set(alerts);
    }

    pub fn lines_written(&self) -> u64 {
        self.head.lock().expect("audit lock").seq
    }

    /// Verify every file of the log end to end, each continuing the one
    /// before it, and that the last still reaches the last line this
    /// broker wrote (so a cut tail is caught too). Returns the lines
    /// checked.
    pub fn verify(&self) -> Result<u64, AuditError> {
        let (seq, mac) = {
            let h = self.head.lock().expect("audit lock");
            (h.seq, h.mac)
        };
        let io = |source| AuditError::Io { path: self.path.clone(), source };
        let mut files = rotated_files(&self.path).map_err(io)?;
        files.push(self.path.clone());
        let mut checked = 0;
        let mut before: Option<(PathBuf, Span)> = None;
        for f in files {
            let span = verify_file(&self.key, &f)?;
            if let Some((prev_file, prev)) = &before {
                if span.first != prev.last + 1 || span.start != prev.mac {
                    return Err(AuditError::Broken {
                        line: span.first,
                        problem: format!(
                            "{} does not continue {} (lines up to {}): a file of the log is missing or replaced",
                            f.display(),
                            prev_file.display(),
                            prev.last
                        ),
                    });
                }
            }
            checked += span.last + 1 - span.first;
            before = Some((f, span));
        }
        let (last, last_mac) = before.map_or((0, [0; MAC_LEN]), |(_, s)| (s.last, s.mac));
        if last < seq || (last == seq && last_mac != mac) {
            return Err(AuditError::Broken {
                line: last + 1,
                problem: format!("the log ends at line {last}, but the broker wrote {seq} lines: it was truncated"),
            });
        }
        Ok(checked)
    }

    /// The head, with every line up to it on disk (fdatasync): a head the
    /// store may seal without getting ahead of the log after a crash.
    pub fn durable_head(&self) -> Result<(u64, [u8; MAC_LEN]), AuditError> {
        let (seq, mac, file) = {
            let h = self.head.lock().expect("audit lock");
            (h.seq, h.mac, h.file.try_clone())
        };
        let io = |source| AuditError::Io { path: self.path.clone(), source };
        // A file rotated away since was synced before it was moved.
        file.and_then(|f| f.sync_data()).map_err(io)?;
        Ok((seq, mac))
    }

    /// Check that the log holds line `seq` with HMAC `mac` (the head the
    /// store sealed at its last write), verifying the files from the one
    /// that holds it to the current, each continuing the one before. A
    /// line older than every file rotation kept is taken as passed.
    pub fn holds(&self, seq: u64, mac: &[u8; MAC_LEN]) -> Result<(), AuditError> {
        let (head, head_mac) = {
            let h = self.head.lock().expect("audit lock");
            (h.seq, h.mac)
        };
        let cut = |last: u64| AuditError::Broken {
            line: last + 1,
            problem: format!(
                "the log ends at line {last}, but the store sealed line {seq} as its head: lines were cut from its \
                 end, or it was deleted or replaced"
            ),
        };
        let replaced = || AuditError::Broken {
            line: seq,
            problem: format!("line {seq} is not the one the store sealed as its head: the log was replaced"),
        };
        if seq == 0 {
            return Ok(());
        }
        if head < seq {
            return Err(cut(head));
        }
        if head == seq {
            return if head_mac == *mac { Ok(()) } else { Err(replaced()) };
        }
        let io = |source| AuditError::Io { path: self.path.clone(), source };
        let rotated = rotated_files(&self.path).map_err(io)?;
        // Files ending before the sealed line need no reading.
        let older = rotated.iter().filter(|f| rotated_last(f).is_some_and(|last| last < seq)).count();
        let mut files = rotated[older..].to_vec();
        files.push(self.path.clone());
        let mut before: Option<Span> = None;
        let mut found = None;
        for f in &files {
            let (span, at) = verify_file_at(&self.key, f, seq)?;
            match &before {
                Some(prev) if span.first != prev.last + 1 || span.start != prev.mac => {
                    return Err(AuditError::Broken {
                        line: span.first,
                        problem: format!("{} does not continue the file before it: a file is missing", f.display()),
                    });
                }
                None if span.first > seq && older > 0 => {
                    return Err(AuditError::Broken {
                        line: seq,
                        problem: format!("the file holding line {seq}, which the store sealed, is missing"),
                    });
                }
                None if span.first > seq => {
                    tracing::warn!(seq, "the audit line the store sealed was in a file rotation has since deleted");
                    return Ok(());
                }
                _ => {}
            }
            found = found.or(at);
            before = Some(span);
        }
        match found {
            Some(m) if m == *mac => Ok(()),
            Some(_) => Err(replaced()),
            None => Err(cut(before.map_or(0, |s| s.last))),
        }
    }

    /// Every stored line (of the files a rotation kept, too), the seq of
    /// the last, then (if `follow`) every new one as written.
    pub fn subscribe(&self) -> (Vec<String>, u64, broadcast::Receiver<(u64, String)>) {
        // Subscribe before reading so no line falls between the two; the
        // caller drops broadcast lines with seq <= the last one returned.
        let rx = self.lines.subscribe();
        let mut files = rotated_files(&self.path).unwrap_or_default();
        files.push(self.path.clone());
        let lines: Vec<String> = files
            .iter()
            .filter_map(|f| File::open(f).ok())
            .flat_map(|f| BufReader::new(f).lines().map_while(Result::ok))
            .collect();
        let last = lines.last().and_then(|l| seq_of(l)).unwrap_or(0);
        (lines, last, rx)
    }
}

impl Drop for AuditLog {
    /// Held events are summed up before the log closes.
    fn drop(&mut self) {
        if self.head.get_mut().is_ok() && !*self.sealed.get_mut() {
            self.flush_summaries(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretBytes {
        SecretBytes::copy_from(&[9; 32])
    }

    fn write(dir: &Path, n: usize) -> PathBuf {
        let path = dir.join("audit.log");
        let log = AuditLog::open(&path, key()).unwrap();
        for i in 0..n {
            let p = format!("s{i}");
            log.record(&Event { path: Some(&p), version: Some(i as u64), ..Event::new(EventKind::Put) }).unwrap();
        }
        assert_eq!(log.verify().unwrap(), n as u64);
        path
    }

    /// The reference page lists every event, and nothing else: the
    /// docs cannot drift from the code.
    #[test]
    fn every_event_kind_is_documented_and_every_documented_event_exists() {
        const DOC: &str = include_str!("../docs/src/reference/audit-events.md");
        let mut names = std::collections::HashSet::new();
        for k in EventKind::ALL {
            assert!(names.insert(k.as_str()), "{k:?}: its name {} is taken twice", k.as_str());
            let row = format!("| `{}`", k.as_str());
            let listed = DOC.lines().any(|l| {
                l.starts_with("| `") && l.split('|').nth(1).is_some_and(|cell| cell.contains(&format!("`{k}`")))
            });
            assert!(listed, "{k:?} ({row} ...) is not in a table of docs/src/reference/audit-events.md");
        }
        // The event tables follow the first heading (the fields table
        // comes before it); their first cells name events only.
        let tables = DOC.split_once("\n## ").expect("a heading").1;
        for line in tables.lines().filter(|l| l.starts_with("| `")) {
            let cell = line.split('|').nth(1).unwrap_or_default();
            for name in cell.split('`').skip(1).step_by(2) {
                assert!(names.contains(name), "the docs list an event `{name}` that no EventKind names");
            }
        }
    }

    #[test]
    fn an_event_is_written_under_its_wire_name() {
        let e = Event { path: Some("db/pw"), ..Event::new(EventKind::WorkloadAdd) };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["event"], "workload_add");
        assert_eq!(EventKind::DenySummary.to_string(), "deny_summary");
        assert!(EventKind::DenySummary.is_denial() && !EventKind::Limit.is_denial());
    }

    #[test]
    fn a_clean_log_verifies_and_reopens() {
        let d = tempfile::tempdir().unwrap();
        let path = write(d.path(), 5);
        let log = AuditLog::open(&path, key()).unwrap();
        assert_eq!(log.record(&Event::new(EventKind::Status)).unwrap(), 6);
        assert_eq!(log.verify().unwrap(), 6);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    }

    #[test]
    fn edits_cuts_and_reorders_are_detected() {
        let d = tempfile::tempdir().unwrap();
        let path = write(d.path(), 4);
        let orig = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = orig.lines().collect();
        let cases = [
            orig.replacen("\"s2\"", "\"s9\"", 1),
            [lines[0], lines[2], lines[3]].join("\n") + "\n",
            [lines[1], lines[2], lines[3]].join("\n") + "\n",
            [lines[0], lines[2], lines[1], lines[3]].join("\n") + "\n",
        ];
        for bad in cases {
            std::fs::write(&path, &bad).unwrap();
            assert!(matches!(verify_file(&key(), &path), Err(AuditError::Broken { .. })), "{bad}");
            assert!(AuditLog::open(&path, key()).is_err());
        }
        // Wrong key: nothing verifies.
        std::fs::write(&path, &orig).unwrap();
        assert!(verify_file(&SecretBytes::copy_from(&[1; 32]), &path).is_err());
    }

    #[test]
    fn a_cut_tail_is_caught_by_the_running_broker() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("audit.log");
        let log = AuditLog::open(&path, key()).unwrap();
        for _ in 0..3 {
            log.record(&Event::new(EventKind::Get)).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let keep: usize = text.lines().take(2).map(|l| l.len() + 1).sum();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(keep as u64).unwrap();
        assert!(log.verify().unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn a_partial_last_line_from_a_crash_is_cut() {
        let d = tempfile::tempdir().unwrap();
        let path = write(d.path(), 2);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":3,\"ti").unwrap();
        let log = AuditLog::open(&path, key()).unwrap();
        assert_eq!(log.record(&Event::new(EventKind::Get)).unwrap(), 3);
        assert_eq!(log.verify().unwrap(), 3);
        drop(log);
        // A partial line longer than the block the tail is read back in.
        let whole = std::fs::metadata(&path).unwrap().len();
        f.write_all(&vec![b'x'; 150 * 1024]).unwrap();
        assert!(drop_partial_tail(&path).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        assert!(!drop_partial_tail(&path).unwrap(), "a whole log is left alone");
        // Nothing but a partial line: nothing is left.
        std::fs::write(&path, vec![b'y'; 70 * 1024]).unwrap();
        assert!(drop_partial_tail(&path).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    fn rotating(dir: &Path, n: usize) -> (PathBuf, AuditLog) {
        let path = dir.join("audit.log");
        let log = AuditLog::open(&path, key()).unwrap();
        log.rotate_at(Rotation { max_bytes: 1000, keep: 3, min_keep: std::time::Duration::ZERO });
        for i in 0..n {
            let p = format!("secret/number/{i}");
            log.record(&Event { path: Some(&p), version: Some(i as u64), ..Event::new(EventKind::Put) }).unwrap();
        }
        (path, log)
    }

    #[test]
    fn a_rotated_log_keeps_its_chain_across_files() {
        let d = tempfile::tempdir().unwrap();
        let (path, log) = rotating(d.path(), 60);
        let files = rotated_files(&path).unwrap();
        assert_eq!(files.len(), 3, "keep = 3: {files:?}");
        assert!(std::fs::metadata(&path).unwrap().len() < 1200);
        // Every file kept verifies, each continuing the one before.
        let checked = log.verify().unwrap();
        let (lines, last, _) = log.subscribe();
        assert_eq!(checked, lines.len() as u64);
        assert_eq!(last, log.lines_written());
        let seqs: Vec<u64> = lines
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"].as_u64().unwrap())
            .collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        // A new file starts with the line that ties it to the last one.
        let current = std::fs::read_to_string(&path).unwrap();
        let first: serde_json::Value = serde_json::from_str(current.lines().next().unwrap()).unwrap();
        assert_eq!(first["event"], "audit_rotate");
        assert_eq!(first["prev_hmac"].as_str().unwrap().len(), 64);
        // A start verifies only the current file, and continues the chain.
        drop(log);
        let log = AuditLog::open(&path, key()).unwrap();
        log.record(&Event::new(EventKind::Status)).unwrap();
        assert_eq!(log.verify().unwrap(), checked + 1);
    }

    #[test]
    fn a_rotated_file_edited_replaced_or_missing_is_caught() {
        let d = tempfile::tempdir().unwrap();
        let (path, log) = rotating(d.path(), 60);
        let files = rotated_files(&path).unwrap();
        let middle = std::fs::read_to_string(&files[1]).unwrap();
        std::fs::write(&files[1], middle.replacen("secret/number", "secret/numbex", 1)).unwrap();
        assert!(matches!(log.verify(), Err(AuditError::Broken { .. })));
        std::fs::write(&files[1], &middle).unwrap();
        log.verify().unwrap();
        // A middle file removed: the next does not continue the one before.
        std::fs::rename(&files[1], d.path().join("aside")).unwrap();
        let e = log.verify().unwrap_err().to_string();
        assert!(e.contains("does not continue"), "{e}");
        std::fs::rename(d.path().join("aside"), &files[1]).unwrap();
        // The oldest kept file may start mid-chain: older ones were deleted.
        std::fs::remove_file(&files[0]).unwrap();
        log.verify().unwrap();
    }

    #[test]
    fn a_crash_between_moving_the_file_aside_and_the_next_continues_the_chain() {
        let d = tempfile::tempdir().unwrap();
        let (path, log) = rotating(d.path(), 3);
        let seq = log.lines_written();
        drop(log);
        std::fs::rename(&path, rotated_name(&path, seq)).unwrap();
        let log = AuditLog::open(&path, key()).unwrap();
        assert_eq!(log.lines_written(), seq + 1, "the new file starts with its audit_rotate line");
        assert_eq!(log.verify().unwrap(), seq + 1);
    }

    #[test]
    fn holds_finds_a_sealed_head_in_any_kept_file_and_catches_a_cut_or_a_missing_file() {
        let d = tempfile::tempdir().unwrap();
        let (path, log) = rotating(d.path(), 60);
        let (seq, mac) = log.durable_head().unwrap();
        log.holds(seq, &mac).unwrap();
        assert!(log.holds(seq, &[0; 32]).is_err(), "another line at the head");
        assert!(log.holds(seq + 1, &mac).unwrap_err().to_string().contains("cut"));
        // The last line of a rotated file in the middle.
        let files = rotated_files(&path).unwrap();
        let text = std::fs::read_to_string(&files[1]).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let s = last["seq"].as_u64().unwrap();
        let mut m = [0u8; 32];
        hex::decode_to_slice(last["hmac"].as_str().unwrap(), &mut m).unwrap();
        log.holds(s, &m).unwrap();
        assert!(log.holds(s, &[1; 32]).is_err());
        // Older than every kept file: rotation deleted it; taken as passed.
        log.holds(1, &[0; 32]).unwrap();
        // The file that holds it gone, with older ones kept: refused.
        std::fs::remove_file(&files[1]).unwrap();
        assert!(log.holds(s, &m).unwrap_err().to_string().contains("missing"));
    }

    #[test]
    fn concurrent_writers_never_come_before_a_files_first_line() {
        let d = tempfile::tempdir().unwrap();
        let (_, log) = rotating(d.path(), 0);
        std::thread::scope(|s| {
            for t in 0..4 {
                let log = &log;
                s.spawn(move || {
                    for i in 0..200 {
                        let p = format!("t{t}/{i}");
                        log.record(&Event { path: Some(&p), ..Event::new(EventKind::Get) }).unwrap();
                    }
                });
            }
        });
        // Every file kept begins with its audit_rotate line and verifies.
        assert_eq!(log.verify().unwrap(), log.subscribe().0.len() as u64);
    }
}
