//! The audit log: JSON lines, each HMAC-chained to the one before.
//!
//! A line is a JSON object whose last member is `"hmac"`: HMAC-SHA256,
//! under the audit key, over the previous line's HMAC (32 zero bytes for
//! the first line) followed by the line's bytes up to `,"hmac"` plus `}`.
//! Lines carry a `seq` from 1 without gaps. Editing, reordering or cutting
//! lines breaks the chain; cutting the tail is caught by the running
//! broker, which knows the last HMAC it wrote. No value is ever written
//! here: events name paths and versions only.
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hmac::Mac;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::crypto::HmacSha256;
use crate::identity::Identity;
use crate::secret::SecretBytes;

const MAC_LEN: usize = 32;
/// `,"hmac":"` + 64 hex digits + `"}`.
const TRAILER_LEN: usize = 9 + 2 * MAC_LEN + 2;

/// One audited event. Deliberately has no field that could hold a value.
#[derive(Debug, Serialize)]
pub struct Event<'a> {
    pub event: &'a str,
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
}

impl<'a> Event<'a> {
    pub fn new(event: &'a str) -> Self {
        Event { event, method: None, caller: None, workload: None, path: None, version: None, reason: None }
    }
}

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
    seq: u64,
    mac: [u8; MAC_LEN],
    /// Set while a successor broker takes the log over: nothing more may
    /// be written here.
    sealed: bool,
}

pub struct AuditLog {
    path: PathBuf,
    key: SecretBytes,
    head: Mutex<Head>,
    lines: broadcast::Sender<(u64, String)>,
    /// Where denials go as they are written (`[alerts] on_deny`).
    alerts: std::sync::OnceLock<crate::alerts::Alerts>,
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
    let seq = body
        .strip_prefix("{\"seq\":")
        .and_then(|r| r.split_once(',').and_then(|(n, _)| n.parse::<u64>().ok()))
        .ok_or("no seq")?;
    if seq != want_seq {
        return Err(format!("seq {seq} where {want_seq} was expected"));
    }
    Ok(got)
}

/// Verify a whole log; returns (lines, last HMAC).
fn verify_file(key: &SecretBytes, path: &Path) -> Result<(u64, [u8; MAC_LEN]), AuditError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, [0; MAC_LEN])),
        Err(source) => return Err(AuditError::Io { path: path.into(), source }),
    };
    let keyed = <HmacSha256 as hmac::KeyInit>::new_from_slice(key.expose()).expect("HMAC takes any key length");
    let mut prev = [0u8; MAC_LEN];
    let mut n = 0u64;
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|source| AuditError::Io { path: path.into(), source })?;
        n += 1;
        prev = check_line(&keyed, &prev, n, &line).map_err(|problem| AuditError::Broken { line: n, problem })?;
    }
    Ok((n, prev))
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
        let (seq, mac) = verify_file(&key, path)?;
        Self::append_at(path, key, seq, mac)
    }

    fn append_at(path: &Path, key: SecretBytes, seq: u64, mac: [u8; MAC_LEN]) -> Result<Self, AuditError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| AuditError::Io { path: path.into(), source })?;
        let (lines, _) = broadcast::channel(1024);
        Ok(AuditLog {
            path: path.into(),
            key,
            head: Mutex::new(Head { file, seq, mac, sealed: false }),
            lines,
            alerts: Default::default(),
        })
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
        let mut head = self.head.lock().expect("audit lock");
        head.sealed = true;
        (head.seq, head.mac)
    }

    /// Write again (the successor did not take over).
    pub fn unseal(&self) {
        self.head.lock().expect("audit lock").sealed = false;
    }

    /// Append one event. An audit line that cannot be written is logged
    /// loudly; the error is returned so callers that must not proceed
    /// unaudited can refuse.
    pub fn record(&self, event: &Event<'_>) -> Result<u64, AuditError> {
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        // Invariant: poisoning needs a panic while holding the lock, and
        // nothing below panics.
        let mut head = self.head.lock().expect("audit lock");
        if head.sealed {
            return Err(AuditError::Sealed);
        }
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
        drop(head);
        crate::metrics::audited(event);
        if event.event == "deny" {
            if let Some(a) = self.alerts.get() {
                a.deny(&line);
            }
        }
        let _ = self.lines.send((seq, line));
        Ok(seq)
    }

    /// Send every denial written from now on to `alerts`.
    pub fn alert_on_deny(&self, alerts: crate::alerts::Alerts) {
        let _ = self.alerts.set(alerts);
    }

    pub fn lines_written(&self) -> u64 {
        self.head.lock().expect("audit lock").seq
    }

    /// Verify the file end to end, and that it still reaches the last line
    /// this broker wrote (so a cut tail is caught too).
    pub fn verify(&self) -> Result<u64, AuditError> {
        let (seq, mac) = {
            let h = self.head.lock().expect("audit lock");
            (h.seq, h.mac)
        };
        let (n, last) = verify_file(&self.key, &self.path)?;
        if n < seq || (n == seq && last != mac) {
            return Err(AuditError::Broken {
                line: n + 1,
                problem: format!("the log ends at line {n}, but the broker wrote {seq} lines: it was truncated"),
            });
        }
        Ok(n)
    }

    /// Every stored line, then (if `follow`) every new one as written.
    pub fn subscribe(&self) -> (Vec<String>, broadcast::Receiver<(u64, String)>) {
        // Subscribe before reading so no line falls between the two; the
        // caller drops broadcast lines with seq <= the lines returned.
        let rx = self.lines.subscribe();
        let lines = File::open(&self.path)
            .map(|f| BufReader::new(f).lines().map_while(Result::ok).collect())
            .unwrap_or_default();
        (lines, rx)
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
            log.record(&Event { path: Some(&p), version: Some(i as u64), ..Event::new("put") }).unwrap();
        }
        assert_eq!(log.verify().unwrap(), n as u64);
        path
    }

    #[test]
    fn a_clean_log_verifies_and_reopens() {
        let d = tempfile::tempdir().unwrap();
        let path = write(d.path(), 5);
        let log = AuditLog::open(&path, key()).unwrap();
        assert_eq!(log.record(&Event::new("status")).unwrap(), 6);
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
            log.record(&Event::new("get")).unwrap();
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
        assert_eq!(log.record(&Event::new("get")).unwrap(), 3);
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
}
