//! Actions on change: what a grant asks to be done, in each container
//! that read its file, after the file changes (`grant --restart`,
//! `grant --exec 'CMD ARGS'`), and the set of containers that read each
//! file ([`Readers`]), which the broker keeps sealed in its store so it
//! survives a takeover, a restart and a `kill -9`.
//!
//! This module is pure bookkeeping: the actions themselves run in
//! `broker::actions`, off the FUSE workers and off the write path.
//!
//! # Who is a reader
//!
//! A container is recorded when an open of the file is *granted* to it
//! (`fs::workload`: attested by its runtime, matched against the
//! workload); a denied open records nothing, and a host process (no
//! container id) is never recorded, so an action never runs outside a
//! container that read the file. The set is bounded:
//! [`MAX_READERS_PER_FILE`] containers per (workload, file), the oldest
//! forgotten first, and [`MAX_FILES`] files in all.
#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::sync::RwLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The most containers recorded as readers of one file of one workload;
/// past it the one recorded longest ago is forgotten.
pub const MAX_READERS_PER_FILE: usize = 256;
/// The most (workload, file) pairs whose readers are recorded.
pub const MAX_FILES: usize = 65_536;
/// `--restart-spacing` when none is given.
pub const DEFAULT_SPACING: Duration = Duration::from_secs(10);
/// The longest `--restart-spacing`.
pub const MAX_SPACING: Duration = Duration::from_secs(3600);
/// The most bytes of an `--exec` command line, and words in it.
pub const MAX_EXEC_BYTES: usize = 4096;
pub const MAX_EXEC_WORDS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActionError {
    #[error("--restart-spacing {0:?} is not a duration like 10s or 1m (at most 1h)")]
    BadSpacing(String),
    #[error("--restart-spacing needs --restart")]
    SpacingWithoutRestart,
    #[error("--exec {0}")]
    BadExec(String),
}

/// What a grant asks to be done after its file changes, in each container
/// that read it. Empty: nothing (the default).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnChange {
    /// Restart each reader, one at a time, this many milliseconds apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_spacing_ms: Option<u64>,
    /// Run this command (argv, no shell) in each reader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
}

impl OnChange {
    /// From the grant's flags: `restart`, `--restart-spacing` (e.g. "10s";
    /// only with `restart`), `--exec` (split by POSIX shell-words rules:
    /// quotes and backslashes, no expansion, never run by a shell).
    pub fn parse(restart: bool, spacing: Option<&str>, exec: Option<&str>) -> Result<OnChange, ActionError> {
        let restart_spacing_ms = match (restart, spacing.filter(|s| !s.is_empty())) {
            (false, None) => None,
            (false, Some(_)) => return Err(ActionError::SpacingWithoutRestart),
            (true, None) => Some(DEFAULT_SPACING.as_millis() as u64),
            (true, Some(s)) => {
                let d = humantime::parse_duration(s.trim()).map_err(|_| ActionError::BadSpacing(s.to_owned()))?;
                if d > MAX_SPACING {
                    return Err(ActionError::BadSpacing(s.to_owned()));
                }
                Some(d.as_millis() as u64)
            }
        };
        let exec = exec.filter(|s| !s.is_empty()).map(parse_exec).transpose()?;
        Ok(OnChange { restart_spacing_ms, exec })
    }

    /// From a policy file's `[[grant]]`: `restart = true`,
    /// `restart_spacing = "10s"`, `exec = ["nginx", "-s", "reload"]` (an
    /// argv, checked as `--exec` is once split).
    pub fn from_file(restart: bool, spacing: Option<&str>, exec: Option<Vec<String>>) -> Result<OnChange, ActionError> {
        let mut on = OnChange::parse(restart, spacing, None)?;
        if let Some(argv) = exec {
            check_argv(&argv)?;
            on.exec = Some(argv);
        }
        Ok(on)
    }

    pub fn is_empty(&self) -> bool {
        self.restart_spacing_ms.is_none() && self.exec.is_none()
    }

    pub fn restart(&self) -> bool {
        self.restart_spacing_ms.is_some()
    }

    /// The pause between two restarts.
    pub fn spacing(&self) -> Duration {
        Duration::from_millis(self.restart_spacing_ms.unwrap_or(0))
    }

    /// `--restart-spacing` as given back (`10s`), if restarting.
    pub fn spacing_text(&self) -> Option<String> {
        self.restart_spacing_ms.map(|ms| humantime::format_duration(Duration::from_millis(ms)).to_string())
    }

    /// `--exec` as a command line that splits back to the same words.
    pub fn exec_text(&self) -> Option<String> {
        self.exec.as_ref().map(|argv| shlex::try_join(argv.iter().map(String::as_str)).unwrap_or_default())
    }
}

/// `CMD ARGS` → argv, by shell-words rules; refused if empty, unbalanced,
/// too long, or holding a NUL.
pub fn parse_exec(line: &str) -> Result<Vec<String>, ActionError> {
    if line.len() > MAX_EXEC_BYTES {
        return Err(ActionError::BadExec(format!("is longer than {MAX_EXEC_BYTES} bytes")));
    }
    if line.contains('\0') {
        return Err(ActionError::BadExec("holds a NUL byte".into()));
    }
    let argv = shlex::split(line)
        .ok_or_else(|| ActionError::BadExec("has an unclosed quote or a trailing backslash".into()))?;
    check_argv(&argv)?;
    Ok(argv)
}

/// An argv to run: a command, at most [`MAX_EXEC_WORDS`] words and
/// [`MAX_EXEC_BYTES`] bytes in all, no NUL.
fn check_argv(argv: &[String]) -> Result<(), ActionError> {
    if argv.first().is_none_or(|c| c.is_empty()) {
        return Err(ActionError::BadExec("names no command".into()));
    }
    if argv.len() > MAX_EXEC_WORDS {
        return Err(ActionError::BadExec(format!("has more than {MAX_EXEC_WORDS} words")));
    }
    if argv.iter().map(|a| a.len() + 1).sum::<usize>() > MAX_EXEC_BYTES {
        return Err(ActionError::BadExec(format!("is longer than {MAX_EXEC_BYTES} bytes")));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(ActionError::BadExec("holds a NUL byte".into()));
    }
    Ok(())
}

/// One file's readers: container id → when it was recorded (a counter).
type Set = HashMap<String, u64>;

/// The containers that read each (workload, file secret), shared by every
/// mount of the broker. Changes are marked dirty and written to the store
/// by `broker::actions`, off the FUSE workers.
#[derive(Default)]
pub struct Readers {
    inner: RwLock<Inner>,
    /// Woken when something is dirty.
    pub wake: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    /// Workload → file's secret → its readers.
    sets: HashMap<String, HashMap<String, Set>>,
    /// How many files have readers.
    files: usize,
    dirty: BTreeSet<(String, String)>,
    next: u64,
    /// Whether a refusal for lack of room was logged already.
    full_logged: bool,
}

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers").finish_non_exhaustive()
    }
}

/// A stored record's key: workload names hold no `/`.
pub fn record_key(workload: &str, secret: &str) -> String {
    format!("{workload}/{secret}")
}

/// The (workload, secret) of a stored record's key.
pub fn parse_record_key(key: &str) -> Option<(String, String)> {
    key.split_once('/').map(|(w, s)| (w.to_owned(), s.to_owned()))
}

impl Readers {
    /// From the stored records (key, containers oldest first).
    pub fn from_records(records: Vec<(String, Vec<String>)>) -> Readers {
        let r = Readers::default();
        {
            let mut inner = r.inner.write().expect("readers lock");
            for (key, containers) in records {
                let Some((w, s)) = parse_record_key(&key) else { continue };
                if inner.files >= MAX_FILES {
                    break;
                }
                let mut set = Set::new();
                for c in containers.into_iter().rev().take(MAX_READERS_PER_FILE).rev() {
                    inner.next += 1;
                    set.insert(c, inner.next);
                }
                if inner.sets.entry(w).or_default().insert(s, set).is_none() {
                    inner.files += 1;
                }
            }
        }
        r
    }

    /// Record that `container` read `secret`'s file in `workload`'s mount.
    /// Cheap when it is known already (the common case, on every open).
    pub fn add(&self, workload: &str, secret: &str, container: &str) {
        // A shared lock and no allocation when it is known (the common case).
        {
            let inner = self.inner.read().expect("readers lock");
            if inner.sets.get(workload).and_then(|m| m.get(secret)).is_some_and(|s| s.contains_key(container)) {
                return;
            }
        }
        let mut guard = self.inner.write().expect("readers lock");
        let inner = &mut *guard;
        let known = inner.sets.get(workload).and_then(|m| m.get(secret));
        if known.is_some_and(|s| s.contains_key(container)) {
            return;
        }
        let new_file = known.is_none();
        if new_file && inner.files >= MAX_FILES {
            if !inner.full_logged {
                inner.full_logged = true;
                tracing::warn!(max = MAX_FILES, "the readers of more files are not recorded (no actions for them)");
            }
            return;
        }
        inner.next += 1;
        let seq = inner.next;
        if new_file {
            inner.files += 1;
        }
        let set = inner.sets.entry(workload.to_owned()).or_default().entry(secret.to_owned()).or_default();
        if set.len() >= MAX_READERS_PER_FILE {
            if let Some(oldest) = set.iter().min_by_key(|(_, s)| **s).map(|(c, _)| c.clone()) {
                set.remove(&oldest);
            }
        }
        set.insert(container.to_owned(), seq);
        inner.dirty.insert((workload.to_owned(), secret.to_owned()));
        drop(guard);
        self.wake.notify_one();
    }

    /// The containers that read it, oldest first.
    pub fn of(&self, workload: &str, secret: &str) -> Vec<String> {
        let inner = self.inner.read().expect("readers lock");
        let Some(set) = inner.sets.get(workload).and_then(|m| m.get(secret)) else { return Vec::new() };
        let mut v: Vec<(&String, &u64)> = set.iter().collect();
        v.sort_by_key(|(_, s)| **s);
        v.into_iter().map(|(c, _)| c.clone()).collect()
    }

    /// Forget a container (it is gone) as a reader of one file.
    pub fn forget(&self, workload: &str, secret: &str, container: &str) {
        let mut guard = self.inner.write().expect("readers lock");
        let inner = &mut *guard;
        let Some(files) = inner.sets.get_mut(workload) else { return };
        let Some(set) = files.get_mut(secret) else { return };
        if set.remove(container).is_none() {
            return;
        }
        if set.is_empty() {
            files.remove(secret);
            inner.files -= 1;
            if files.is_empty() {
                inner.sets.remove(workload);
            }
        }
        inner.dirty.insert((workload.to_owned(), secret.to_owned()));
        drop(guard);
        self.wake.notify_one();
    }

    /// What changed since the last call: each dirty file's record key and
    /// readers (oldest first; empty: remove the record).
    pub fn take_dirty(&self) -> Vec<(String, Vec<String>)> {
        let mut inner = self.inner.write().expect("readers lock");
        let dirty = std::mem::take(&mut inner.dirty);
        dirty
            .into_iter()
            .map(|(w, s)| {
                let set = inner.sets.get(&w).and_then(|m| m.get(&s));
                let mut v: Vec<(&String, &u64)> = set.map(|set| set.iter().collect()).unwrap_or_default();
                v.sort_by_key(|(_, s)| **s);
                let containers = v.into_iter().map(|(c, _)| c.clone()).collect();
                (record_key(&w, &s), containers)
            })
            .collect()
    }

    /// Mark a file dirty again (its write failed).
    pub fn redirty(&self, key: &str) {
        if let Some(k) = parse_record_key(key) {
            self.inner.write().expect("readers lock").dirty.insert(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        assert!(OnChange::parse(false, None, None).unwrap().is_empty());
        let r = OnChange::parse(true, None, None).unwrap();
        assert_eq!(r.spacing(), DEFAULT_SPACING);
        assert_eq!(r.spacing_text().as_deref(), Some("10s"));
        let r = OnChange::parse(true, Some("250ms"), None).unwrap();
        assert_eq!(r.spacing(), Duration::from_millis(250));
        assert_eq!(OnChange::parse(false, Some("1s"), None), Err(ActionError::SpacingWithoutRestart));
        assert!(matches!(OnChange::parse(true, Some("soon"), None), Err(ActionError::BadSpacing(_))));
        assert!(matches!(OnChange::parse(true, Some("2h"), None), Err(ActionError::BadSpacing(_))));
        let e = OnChange::parse(false, None, Some(r#"sh -c 'echo "a b" > /tmp/x'"#)).unwrap();
        assert_eq!(e.exec.as_deref().unwrap(), ["sh", "-c", r#"echo "a b" > /tmp/x"#]);
        let again = parse_exec(&e.exec_text().unwrap()).unwrap();
        assert_eq!(again, e.exec.unwrap());
    }

    #[test]
    fn bad_exec_refused() {
        for bad in ["'unclosed", "trailing\\", "   ", "a\0b"] {
            assert!(parse_exec(bad).is_err(), "{bad:?}");
        }
        assert!(parse_exec(&"a ".repeat(MAX_EXEC_WORDS + 1)).is_err());
        assert!(parse_exec(&"a".repeat(MAX_EXEC_BYTES + 1)).is_err());
        // No expansion: `$HOME` and `;` are words, not shell syntax.
        assert_eq!(parse_exec("echo $HOME ; rm").unwrap(), ["echo", "$HOME", ";", "rm"]);
    }

    #[test]
    fn readers_bounded_oldest_forgotten() {
        let r = Readers::default();
        for i in 0..MAX_READERS_PER_FILE + 5 {
            r.add("w", "s", &format!("c{i}"));
        }
        let of = r.of("w", "s");
        assert_eq!(of.len(), MAX_READERS_PER_FILE);
        assert_eq!(of[0], "c5");
        assert_eq!(of.last().map(String::as_str), Some(format!("c{}", MAX_READERS_PER_FILE + 4).as_str()));
        // Known again: no change, not dirty again.
        let _ = r.take_dirty();
        r.add("w", "s", "c5");
        assert!(r.take_dirty().is_empty());
        r.forget("w", "s", "c5");
        let d = r.take_dirty();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0, "w/s");
        assert!(!d[0].1.contains(&"c5".to_owned()));
    }

    #[test]
    fn files_bounded() {
        let r = Readers::default();
        for i in 0..MAX_FILES {
            r.add("w", &format!("s{i}"), "c");
        }
        r.add("w", "one-more", "c");
        assert!(r.of("w", "one-more").is_empty());
        r.forget("w", "s0", "c");
        r.add("w", "one-more", "c");
        assert_eq!(r.of("w", "one-more"), ["c"]);
    }

    #[test]
    fn readers_round_trip_records() {
        let r = Readers::default();
        r.add("web", "@template/app", "c1");
        r.add("web", "@template/app", "c2");
        r.add("api", "db/password", "c3");
        let recs = r.take_dirty();
        let back = Readers::from_records(recs);
        assert_eq!(back.of("web", "@template/app"), ["c1", "c2"]);
        assert_eq!(back.of("api", "db/password"), ["c3"]);
        assert!(back.of("api", "nothing").is_empty());
    }
}
