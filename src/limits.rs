//! Limits and back-pressure: token buckets per caller, and audit lines
//! for limits hit that are themselves limited (one a second per caller,
//! with the count refused since), so a flood cannot flood the audit log.
//! Denials, reads and stale serves are limited the same way
//! ([`Coalescer`], one each): the first per caller and file in full, then
//! a count a second.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::audit::{AuditLog, Event, EventKind};

/// Allows `rate` events per `per`, in bursts of up to `rate`.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    rate: f64,
    per: Duration,
    at: Instant,
}

impl Bucket {
    pub fn new(rate: u32, per: Duration, now: Instant) -> Self {
        Bucket { tokens: rate.into(), rate: rate.into(), per, at: now }
    }

    pub fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() / self.per.as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn full(&self, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() / self.per.as_secs_f64() * self.rate
            >= self.rate
    }
}

/// Most callers tracked at once; idle ones are forgotten first.
const CALLERS: usize = 10_000;

/// A token bucket per caller key (a container id, a host uid, a remote
/// certificate subject).
#[derive(Debug)]
pub struct PerCaller {
    rate: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl PerCaller {
    pub fn new(per_second: u32) -> Self {
        PerCaller { rate: per_second, buckets: Mutex::default() }
    }

    pub fn allow(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut b = self.buckets.lock().expect("rate lock");
        if b.len() >= CALLERS && !b.contains_key(key) {
            // Full buckets are callers at rest: nothing is lost forgetting them.
            b.retain(|_, v| !v.full(now));
            if b.len() >= CALLERS {
                return false;
            }
        }
        b.entry(key.to_owned()).or_insert_with(|| Bucket::new(self.rate, Duration::from_secs(1), now)).take(now)
    }
}

/// Audits limits hit: the first at once, then at most one line a second
/// per caller, saying how many were refused.
#[derive(Debug, Default)]
pub struct Refusals {
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Refusals {
    /// One refusal of `key` by `limit`; writes a `limit` line when due.
    pub fn refused(&self, audit: &AuditLog, key: &str, limit: &str, caller: Option<&crate::identity::Identity>) {
        let now = Instant::now();
        let due = {
            let mut seen = self.seen.lock().expect("refusals lock");
            if seen.len() >= CALLERS {
                seen.retain(|_, (t, _)| now.duration_since(*t) < Duration::from_secs(1));
            }
            let e = seen.entry(key.to_owned()).or_insert((now - Duration::from_secs(2), 0));
            e.1 += 1;
            if now.duration_since(e.0) >= Duration::from_secs(1) {
                let n = e.1;
                *e = (now, 0);
                Some(n)
            } else {
                None
            }
        };
        if let Some(n) = due {
            let reason = format!("{limit}: refused {n} since the last such line");
            let _ = audit.record(&Event { caller, reason: Some(&reason), ..Event::new(EventKind::Limit) });
        }
    }
}

/// A caller's held events are summed up in one line at most this often.
pub const SUMMARY_PERIOD: Duration = Duration::from_secs(1);
/// A caller with nothing held, quiet this long, is forgotten: its next
/// event is written in full again.
const CALLER_IDLE: Duration = Duration::from_secs(60);
/// Most callers whose events are tracked; beyond them, events are summed
/// up together (the overflow).
const SUMMED_CALLERS: usize = 4096;
/// Most files remembered (and named in a summary) per caller.
const SUMMED_FILES: usize = 32;
/// The key of the overflow's summaries.
pub const OVERFLOW: &str = "overflow";

/// How a [`Coalescer`] limits the lines it writes.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Lines written in full per caller: a burst of this many, then one a
    /// second.
    pub burst: u32,
    /// Most lines (in full and summaries) written for all callers
    /// together in any second; beyond them, events and summaries are
    /// summed up in the overflow's summary (at most one more line a
    /// second), so no number of callers floods the audit log.
    pub lines_per_second: usize,
}

/// Denials: any caller can make them, of any file or method.
pub const DENIALS: Shape = Shape { burst: 4, lines_per_second: 50 };
/// Reads (and stale serves): only of files granted to the caller, so
/// every file a workload has (up to [`SUMMED_FILES`]) gets its line in
/// full at once, and many containers starting together are not summed
/// up together.
pub const READS: Shape = Shape { burst: SUMMED_FILES as u32, lines_per_second: 1000 };

/// The times of the lines written in the last second, at most the
/// shape's `lines_per_second` of them: a sliding window, so no second
/// (aligned or not) holds more.
#[derive(Debug, Default)]
struct LineCap(std::collections::VecDeque<Instant>);

impl LineCap {
    fn take(&mut self, now: Instant, cap: usize) -> bool {
        while self.0.front().is_some_and(|t| now.saturating_duration_since(*t) >= Duration::from_secs(1)) {
            self.0.pop_front();
        }
        if self.0.len() >= cap {
            return false;
        }
        self.0.push_back(now);
        true
    }
}

/// Whose calls, denials and reads are limited together: a container, a remote admin
/// client, the owner of a user namespace (every host uid mapped in it is
/// that one user's), or else a host uid. Never a pid: a fork must not
/// start afresh.
pub fn caller_key(id: &crate::identity::Identity) -> String {
    match (&id.container_id, &id.remote, id.userns_owner) {
        (Some(c), _, _) => format!("container:{c}"),
        // "<subject> from <address:port>": the subject, not the connection.
        (None, Some(r), _) => format!("remote:{}", r.subject_shown()),
        (None, None, Some(owner)) => format!("userns:{owner}"),
        (None, None, None) => format!("uid:{}", id.uid),
    }
}

/// Denials held back from the audit log, to be summed up.
#[derive(Debug, Default)]
struct Held {
    count: u64,
    files: std::collections::BTreeSet<String>,
    /// Held events of files beyond the ones named.
    unnamed: u64,
    first: Option<SystemTime>,
    last: Option<SystemTime>,
    /// The last caller held (its pid is the last one's).
    caller: Option<crate::identity::Identity>,
}

impl Held {
    fn add(&mut self, wall: SystemTime, file: &str, version: Option<u64>, caller: &crate::identity::Identity) {
        self.count += 1;
        let named = match version {
            Some(v) => std::borrow::Cow::Owned(format!("{file}@{v}")),
            None => std::borrow::Cow::Borrowed(file),
        };
        if self.files.contains(named.as_ref()) || self.files.len() < SUMMED_FILES {
            self.files.insert(named.into_owned());
        } else {
            self.unnamed += 1;
        }
        self.first.get_or_insert(wall);
        self.last = Some(wall);
        // A caller reading in a loop is the same task each time: no clone.
        let same = |c: &crate::identity::Identity| (c.pid, c.uid, c.gid) == (caller.pid, caller.uid, caller.gid);
        if !self.caller.as_ref().is_some_and(same) {
            self.caller = Some(caller.clone());
        }
    }

    /// Add a caller's summary that cannot be written now.
    fn merge(&mut self, s: Summary) {
        self.count += s.count;
        self.unnamed += s.unnamed;
        for f in s.files {
            if self.files.contains(&f) || self.files.len() < SUMMED_FILES {
                self.files.insert(f);
            } else {
                self.unnamed += 1;
            }
        }
        self.first = Some(self.first.map_or(s.first, |t| t.min(s.first)));
        self.last = Some(self.last.map_or(s.last, |t| t.max(s.last)));
        if s.caller.is_some() {
            self.caller = s.caller;
        }
    }

    fn take(&mut self, key: &str) -> Option<Summary> {
        if self.count == 0 {
            return None;
        }
        let h = std::mem::take(self);
        Some(Summary {
            key: key.to_owned(),
            caller: h.caller,
            count: h.count,
            files: h.files.into_iter().collect(),
            unnamed: h.unnamed,
            first: h.first.unwrap_or(UNIX_EPOCH),
            last: h.last.unwrap_or(UNIX_EPOCH),
        })
    }
}

/// One caller's events of one kind, as far as the audit log has told of them.
#[derive(Debug)]
struct CallerLines {
    /// Files whose event was written in full, and of which version (a
    /// new version is written in full again; it replaces the old one).
    seen: HashMap<String, Option<u64>>,
    full: Bucket,
    held: Held,
    last_summary: Instant,
    last_seen: Instant,
}

/// The events held back and not yet summed up, for one caller (or for
/// the overflow): an audit line `deny_summary`, `read_summary` or
/// `stale_serve_summary`.
#[derive(Debug)]
pub struct Summary {
    pub key: String,
    /// The last caller held; None for the overflow.
    pub caller: Option<crate::identity::Identity>,
    pub count: u64,
    /// The files (`workload:path`, with `@version` for reads; or the gRPC
    /// method).
    pub files: Vec<String>,
    /// Events of further files, not named.
    pub unnamed: u64,
    pub first: SystemTime,
    pub last: SystemTime,
}

#[derive(Debug, Default)]
struct CoalescerState {
    callers: HashMap<String, CallerLines>,
    overflow: Held,
    overflow_summary: Option<Instant>,
    /// The lines written for callers lately (not the overflow's).
    lines: LineCap,
}

impl CoalescerState {
    /// A caller's summary `s` if the cap allows a line now; else it is
    /// added to the overflow, whose summary is returned if due.
    fn capped(&mut self, now: Instant, cap: usize, s: Option<Summary>) -> Option<Summary> {
        let s = s?;
        if self.lines.take(now, cap) {
            return Some(s);
        }
        self.overflow.merge(s);
        self.overflow_due(now)
    }

    fn overflow_due(&mut self, now: Instant) -> Option<Summary> {
        let last = self.overflow_summary.get_or_insert(now);
        if now.saturating_duration_since(*last) >= SUMMARY_PERIOD {
            self.overflow_summary = Some(now);
            return self.overflow.take(OVERFLOW);
        }
        None
    }
}

/// Decides which events of one kind (denials, reads, stale serves) the
/// audit log writes in full and sums up the rest: per caller, the first
/// event of each file (and version, for reads) in full (a burst of the
/// [`Shape`]'s `burst`, then one a second), every other one held and
/// summed up at most once per [`SUMMARY_PERIOD`]. Memory is bounded: at
/// most `SUMMED_CALLERS` callers of `SUMMED_FILES` files each; beyond
/// that, events are held together under [`OVERFLOW`]. Lines for all
/// callers together are capped at the shape's `lines_per_second` in any
/// second; what the cap holds back is summed up with the overflow.
#[derive(Debug)]
pub struct Coalescer {
    shape: Shape,
    state: Mutex<CoalescerState>,
}

impl Default for Coalescer {
    /// Shaped for denials.
    fn default() -> Self {
        Self::new(DENIALS)
    }
}

impl Coalescer {
    pub fn new(shape: Shape) -> Self {
        Coalescer { shape, state: Mutex::default() }
    }

    /// One event of `file` (at `version`, for reads) by `caller` (limited
    /// as `key`): whether to write it in full now, and a summary of held
    /// ones that is due.
    pub fn note(
        &self,
        now: Instant,
        wall: SystemTime,
        key: &str,
        (file, version): (&str, Option<u64>),
        caller: &crate::identity::Identity,
    ) -> (bool, Option<Summary>) {
        let Shape { burst, lines_per_second: cap } = self.shape;
        let mut st = self.state.lock().expect("coalescer lock");
        if st.callers.len() >= SUMMED_CALLERS && !st.callers.contains_key(key) {
            forget_idle(&mut st.callers, now);
        }
        if st.callers.len() >= SUMMED_CALLERS && !st.callers.contains_key(key) {
            st.overflow.add(wall, file, version, caller);
            return (false, st.overflow_due(now));
        }
        let st = &mut *st;
        let c = st.callers.entry(key.to_owned()).or_insert_with(|| CallerLines {
            seen: Default::default(),
            full: Bucket::new(burst, SUMMARY_PERIOD * burst, now),
            held: Held::default(),
            last_summary: now,
            last_seen: now,
        });
        c.last_seen = now;
        // Held by the cap, a new file's event is held (and summed up) like
        // any other.
        let new = c.seen.get(file) != Some(&version);
        let room = c.seen.contains_key(file) || c.seen.len() < SUMMED_FILES;
        if new && room && c.full.take(now) && st.lines.take(now, cap) {
            c.seen.insert(file.to_owned(), version);
            return (true, None);
        }
        c.held.add(wall, file, version, caller);
        if now.saturating_duration_since(c.last_summary) >= SUMMARY_PERIOD {
            c.last_summary = now;
            let s = c.held.take(key);
            return (false, st.capped(now, cap, s));
        }
        (false, None)
    }

    /// The summaries due by `now` (all held ones, with `all`); callers
    /// quiet long enough are forgotten.
    pub fn due(&self, now: Instant, all: bool) -> Vec<Summary> {
        let mut st = self.state.lock().expect("coalescer lock");
        let st = &mut *st;
        let mut out = Vec::new();
        for (key, c) in &mut st.callers {
            if all || now.saturating_duration_since(c.last_summary) >= SUMMARY_PERIOD {
                if let Some(s) = c.held.take(key) {
                    c.last_summary = now;
                    if st.lines.take(now, self.shape.lines_per_second) {
                        out.push(s);
                    } else {
                        st.overflow.merge(s);
                    }
                }
            }
        }
        let overflow_due = st.overflow_summary.is_none_or(|t| now.saturating_duration_since(t) >= SUMMARY_PERIOD);
        if all || overflow_due {
            if let Some(s) = st.overflow.take(OVERFLOW) {
                st.overflow_summary = Some(now);
                out.push(s);
            }
        }
        forget_idle(&mut st.callers, now);
        out
    }

    #[cfg(test)]
    fn lines_now(&self) -> usize {
        self.state.lock().expect("coalescer lock").lines.0.len()
    }
}

fn forget_idle(callers: &mut HashMap<String, CallerLines>, now: Instant) {
    callers.retain(|_, c| c.held.count > 0 || now.saturating_duration_since(c.last_seen) < CALLER_IDLE);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_bursts_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(3, Duration::from_secs(60), t0);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert!(!b.take(t0 + Duration::from_secs(10)), "a third of a token after 10 s");
        assert!(b.take(t0 + Duration::from_secs(20)), "one token after 20 s at 3 a minute");
        assert!(!b.take(t0 + Duration::from_secs(21)));
    }

    #[test]
    fn callers_have_their_own_buckets() {
        let p = PerCaller::new(2);
        assert!(p.allow("a") && p.allow("a"));
        assert!(!p.allow("a"), "a's burst is spent");
        assert!(p.allow("b"), "b is not held back by a");
    }
}

#[cfg(test)]
mod coalescer_tests {
    use super::*;
    use crate::identity::Identity;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn the_first_denial_of_a_file_is_written_then_a_summary_a_second() {
        let l = Coalescer::default();
        let (t0, w) = (Instant::now(), SystemTime::now());
        let who = Identity { uid: 4243, pid: 10, ..Identity::default() };
        assert!(l.note(t0, w, "uid:4243", ("w:a", None), &who).0, "the first in full");
        let mut held = 0;
        for i in 1..=999 {
            let who = Identity { pid: 10 + i, ..who.clone() };
            let (full, s) = l.note(at(t0, i as u64), w, "uid:4243", ("w:a", None), &who);
            assert!(!full, "a new pid is the same caller");
            held += 1;
            if let Some(s) = s {
                assert_eq!((s.count, s.files.as_slice()), (held, &["w:a".to_owned()][..]));
                assert_eq!(s.caller.unwrap().pid, 10 + i);
                held = 0;
            }
        }
        assert_eq!(held, 999, "nothing summed up within the first second");
        assert!(l.due(at(t0, 999), false).is_empty(), "not due yet");
        let s = l.due(at(t0, 1000), false);
        assert_eq!((s.len(), s[0].count), (1, 999));
        // The next denial a second later is summed up at once.
        let (full, s) = l.note(at(t0, 2500), w, "uid:4243", ("w:a", None), &who);
        assert!(!full && s.unwrap().count == 1);
        // Another caller starts afresh.
        assert!(l.note(at(t0, 2500), w, "container:c1", ("w:a", None), &who).0);
    }

    #[test]
    fn new_files_are_written_in_a_burst_then_held() {
        let l = Coalescer::default();
        let (t0, w, who) = (Instant::now(), SystemTime::now(), Identity::default());
        let full: Vec<bool> = (0..8).map(|i| l.note(t0, w, "uid:1", (&format!("w:{i}"), None), &who).0).collect();
        assert_eq!(full, [true, true, true, true, false, false, false, false]);
        let s = l.due(at(t0, 1000), false);
        assert_eq!((s[0].count, s[0].files.len()), (4, 4));
        // Quiet for a minute: forgotten; the next is written in full.
        assert!(l.due(at(t0, 62_000), false).is_empty());
        assert!(l.note(at(t0, 62_000), w, "uid:1", ("w:0", None), &who).0);
    }

    #[test]
    fn memory_is_bounded_and_the_overflow_is_summed_up_too() {
        let l = Coalescer::default();
        let (t0, w, who) = (Instant::now(), SystemTime::now(), Identity::default());
        let full = (0..SUMMED_CALLERS).filter(|i| l.note(t0, w, &format!("uid:{i}"), ("w:a", None), &who).0).count();
        assert_eq!(full, DENIALS.lines_per_second, "the cap of lines a second, whatever the callers");
        for f in 0..100 {
            assert!(!l.note(t0, w, "uid:0", (&format!("w:{f}"), None), &who).0, "the cap is spent");
        }
        let (full, s) = l.note(t0, w, "uid:x", ("w:a", None), &who);
        assert!(!full && s.is_none());
        assert!(!l.note(t0, w, "uid:y", ("w:a", None), &who).0);
        let s = l.due(at(t0, 1000), false);
        let over = s.iter().find(|s| s.key == OVERFLOW).unwrap();
        assert!(over.caller.is_some() && over.count >= 2);
        assert_eq!(s.len(), DENIALS.lines_per_second + 1, "the cap's worth of callers' summaries, and the overflow's");
        let held = (SUMMED_CALLERS - DENIALS.lines_per_second + 100 + 2) as u64;
        assert_eq!(s.iter().map(|s| s.count).sum::<u64>(), held, "every denial held is summed up");
        assert!(s.iter().all(|s| s.files.len() <= SUMMED_FILES));
        let st = l.state.lock().unwrap();
        assert!(st.callers.len() <= SUMMED_CALLERS);
        assert!(st.callers.values().all(|c| c.seen.len() <= SUMMED_FILES));
    }

    #[test]
    fn no_number_of_callers_writes_more_than_the_cap_a_second_and_counts_add_up() {
        let l = Coalescer::default();
        let (t0, w, who) = (Instant::now(), SystemTime::now(), Identity::default());
        let (mut lines, mut counted, mut denied) = (0u64, 0u64, 0u64);
        let mut per_second = std::collections::BTreeMap::<u64, u64>::new();
        let mut write = |t: u64, full: bool, s: Vec<Summary>, counted: &mut u64| {
            let n = u64::from(full) + s.iter().filter(|s| s.key != OVERFLOW).count() as u64;
            *per_second.entry(t / 1000).or_default() += n;
            lines += n;
            *counted += u64::from(full) + s.iter().map(|s| s.count).sum::<u64>();
        };
        // 1,000 callers, each denied every 100 ms for 5 s.
        for ms in (0..5000).step_by(100) {
            for i in 0..1000 {
                let (full, s) = l.note(at(t0, ms), w, &format!("uid:{i}"), ("w:a", None), &who);
                denied += 1;
                write(ms, full, s.into_iter().collect(), &mut counted);
            }
            write(ms, false, l.due(at(t0, ms + 50), false), &mut counted);
        }
        write(9000, false, l.due(at(t0, 9000), true), &mut counted);
        assert_eq!(counted, denied, "every denial is accounted for");
        assert!(per_second.values().all(|n| *n <= DENIALS.lines_per_second as u64), "{per_second:?}");
        assert!(lines > 0 && l.lines_now() <= DENIALS.lines_per_second);
    }

    #[test]
    fn reads_a_new_version_is_written_in_full_and_a_loop_is_summed_up() {
        let l = Coalescer::new(READS);
        let (t0, w) = (Instant::now(), SystemTime::now());
        let who = Identity { container_id: Some("c1".into()), pid: 10, ..Identity::default() };
        // Every file a workload has, at once, in full.
        let files: Vec<String> = (0..SUMMED_FILES).map(|i| format!("w:s{i}")).collect();
        assert!(files.iter().all(|f| l.note(t0, w, "container:c1", (f, Some(1)), &who).0));
        // A loop over them: held, and summed up once a second.
        let held =
            (1..=10_000u64).filter(|i| !l.note(at(t0, i / 100), w, "container:c1", (&files[0], Some(1)), &who).0);
        assert_eq!(held.count(), 10_000);
        let s = l.due(at(t0, 1000), false);
        assert_eq!((s.len(), s[0].count, s[0].files.as_slice()), (1, 10_000, &["w:s0@1".to_owned()][..]));
        // Rotated a hundred times, once a second: each new version in
        // full, the same file's old one replaced (the files remembered do
        // not fill up).
        for v in 2..=100 {
            assert!(l.note(at(t0, 1000 * v), w, "container:c1", (&files[0], Some(v)), &who).0, "version {v}");
            assert!(!l.note(at(t0, 1000 * v), w, "container:c1", (&files[0], Some(v)), &who).0);
        }
        assert_eq!(l.state.lock().unwrap().callers["container:c1"].seen.len(), SUMMED_FILES);
    }

    #[test]
    fn callers_are_hosts_uids_or_containers_never_pids() {
        let host = Identity { uid: 7, pid: 1, ..Identity::default() };
        assert_eq!(caller_key(&host), caller_key(&Identity { pid: 2, ..host.clone() }));
        let c = Identity { container_id: Some("abc".into()), ..host.clone() };
        assert_eq!(caller_key(&c), "container:abc");
        let r = |a: &str| Identity::remote(crate::config::parse_subject("CN=x"), Some(a.parse().unwrap()));
        assert_eq!(caller_key(&r("10.0.0.1:5000")), caller_key(&r("10.0.0.1:5001")));
        assert_eq!(caller_key(&r("10.0.0.1:5000")), "remote:CN=x", "the subject, not the connection");
        // Host uids mapped in one user's namespace are that user.
        let ns = |uid| Identity { uid, userns_owner: Some(4500), ..Identity::default() };
        assert_eq!(caller_key(&ns(200_000)), "userns:4500");
        assert_eq!(caller_key(&ns(200_000)), caller_key(&ns(200_019)));
    }
}
