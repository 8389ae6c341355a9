//! Strangers on the sockets: local users who are not admins flood the
//! broker with HTTP/2 streams (memory) and idle connections (file
//! descriptors). The broker stays within its memory budget, keeps fds in
//! reserve for attestation, and serves granted reads and admins
//! throughout; admins are not throttled like strangers.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

const NOBODY: u32 = 65534;

/// An HTTP/2 client, written by hand, that floods `path` with `conns`
/// connections of up to `streams` streams each (as many as the server
/// allows), each sending a gRPC message of `size` bytes to `method` and
/// never its last byte, respecting flow control so that the server
/// accepts all it is willing to. A stream the server ends or resets is
/// replaced (up to 4 times as many in all). In `noread` mode, the client
/// advertises a receive window of 0: the server can never send it a
/// response body; in `headers` mode, each connection sends the largest
/// header block h2 buffers (HEADERS and 5 CONTINUATION frames) and never
/// ends it. Runs for `secs`, prints a JSON summary, then holds its
/// connections until stdin closes.
const H2FLOOD: &str = r#"
import json, os, select, socket, sys, time
path, conns, streams, size, method, secs, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].encode(), float(sys.argv[6]), sys.argv[7]
noread = mode == "noread"

def frame(kind, flags, sid, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload

def lit(idx, value, name=b""):
    head = bytes([idx]) if idx else b"\x00" + bytes([len(name)]) + name
    return head + bytes([len(value)]) + value

HEADERS = (b"\x83\x86" + lit(4, method) + lit(1, b"localhost")
           + lit(0, b"application/grpc", b"content-type") + lit(0, b"trailers", b"te"))
stats = {"connected": 0, "refused": 0, "opened": 0, "sent": 0, "answered": 0, "reset": 0, "goaway": 0}

class Conn:
    def __init__(self):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.s.setblocking(False)
        self.out, self.inb = bytearray(), bytearray()
        self.conn_win, self.init_win, self.max_frame, self.max_streams = 65535, 65535, 16384, 100
        self.streams, self.sid, self.opened, self.dead, self.ready = {}, 1, 0, False, False
        mine = 0 if noread else (1 << 31) - 1
        self.out += b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, (4).to_bytes(2, "big") + mine.to_bytes(4, "big"))
        if not noread:
            self.out += frame(8, 0, 0, ((1 << 31) - 1 - 65535).to_bytes(4, "big"))

    def open_streams(self):
        if mode == "headers":
            # One header block the server must buffer, never finished:
            # HEADERS and CONTINUATION frames of the largest size, no END_HEADERS.
            if self.ready and self.opened == 0:
                self.opened = 1
                stats["opened"] += 1
                junk = b"\x00" * self.max_frame
                self.out += frame(1, 0, 1, junk) + b"".join(frame(9, 0, 1, junk) for _ in range(5))
                stats["sent"] += 6 * self.max_frame
            return
        while self.ready and not self.dead and len(self.streams) < min(streams, self.max_streams) and self.opened < 4 * streams:
            sid = self.sid
            self.sid += 2
            self.opened += 1
            stats["opened"] += 1
            self.out += frame(1, 4, sid, HEADERS)
            body = size if size > 5 else 5
            # The gRPC prefix: a message of `body - 5` bytes, never completed.
            self.streams[sid] = [self.init_win, body - 1 if size > 5 else body, True]
            if size <= 5:
                self.out += frame(0, 1, sid, b"\x00\x00\x00\x00\x00")
                self.streams[sid] = [0, 0, False]

    def pump(self):
        for sid, st in list(self.streams.items()):
            while st[1] > 0 and len(self.out) < 1 << 18:
                n = min(st[1], st[0], self.conn_win, self.max_frame)
                if n <= 0:
                    break
                if st[2]:
                    chunk = b"\x00" + (size - 5).to_bytes(4, "big") + b"\x00" * (n - 5)
                    st[2] = False
                else:
                    chunk = b"\x00" * n
                self.out += frame(0, 0, sid, chunk)
                st[0] -= n; st[1] -= n; self.conn_win -= n
                stats["sent"] += n

    def handle(self):
        while len(self.inb) >= 9:
            n = int.from_bytes(self.inb[0:3], "big")
            if len(self.inb) < 9 + n:
                return
            kind, flags = self.inb[3], self.inb[4]
            sid = int.from_bytes(self.inb[5:9], "big") & 0x7FFFFFFF
            p = bytes(self.inb[9:9 + n])
            del self.inb[:9 + n]
            if kind == 4 and not flags & 1:
                for i in range(0, len(p), 6):
                    k, v = int.from_bytes(p[i:i + 2], "big"), int.from_bytes(p[i + 2:i + 6], "big")
                    if k == 4:
                        for st in self.streams.values():
                            st[0] += v - self.init_win
                        self.init_win = v
                    elif k == 5:
                        self.max_frame = v
                    elif k == 3:
                        self.max_streams = v
                self.out += frame(4, 1, 0)
                self.ready = True
            elif kind == 8:
                inc = int.from_bytes(p[:4], "big") & 0x7FFFFFFF
                if sid == 0:
                    self.conn_win += inc
                elif sid in self.streams:
                    self.streams[sid][0] += inc
            elif kind == 6 and not flags & 1:
                self.out += frame(6, 1, 0, p)
            elif kind == 7:
                stats["goaway"] += 1
                stats["goaway_code"] = int.from_bytes(p[4:8], "big")
                self.dead = True
            elif kind == 3 and sid in self.streams:
                stats["reset"] += 1
                del self.streams[sid]
            elif kind in (0, 1) and flags & 1 and sid in self.streams:
                stats["answered"] += 1
                del self.streams[sid]
            if kind == 0 and n and not noread:
                self.out += frame(8, 0, 0, n.to_bytes(4, "big"))

conns_ = []
for _ in range(conns):
    try:
        conns_.append(Conn())
        stats["connected"] += 1
    except OSError:
        stats["refused"] += 1
deadline = time.time() + secs
while time.time() < deadline:
    live = [c for c in conns_ if not c.dead]
    if not live:
        break
    r, w, _ = select.select([c.s for c in live], [c.s for c in live if c.out], [], 0.05)
    for c in live:
        if c.s in r:
            try:
                got = c.s.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                got = None
            except OSError:
                got = b""
            if got == b"":
                c.dead = True
                continue
            if got:
                c.inb += got
                c.handle()
        c.open_streams()
        c.pump()
        if c.out:
            try:
                sent = c.s.send(c.out)
                del c.out[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                c.dead = True
stats["alive"] = sum(not c.dead for c in conns_)
print(json.dumps(stats), flush=True)
sys.stdin.read()
"#;

struct H2Flood {
    _script: Script,
    stats: serde_json::Value,
}

impl H2Flood {
    #[allow(clippy::too_many_arguments)]
    fn start(
        uid: u32,
        socket: &Path,
        conns: usize,
        streams: usize,
        size: usize,
        method: &str,
        secs: f64,
        mode: &str,
    ) -> Self {
        let args = [
            socket.to_str().unwrap(),
            &conns.to_string(),
            &streams.to_string(),
            &size.to_string(),
            method,
            &secs.to_string(),
            mode,
        ];
        let mut script = Script::start(uid, H2FLOOD, &args);
        let line = script.line();
        let stats = serde_json::from_str(&line).unwrap_or_else(|e| panic!("flood output {line:?}: {e}"));
        H2Flood { _script: script, stats }
    }
}

fn kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix(field)).unwrap_or_else(|| panic!("{field} in {status}"));
    line.trim().trim_end_matches(" kB").parse().unwrap()
}

/// A host user the test can read a granted file as.
const READER: u32 = 4242;

fn grant_to_reader(b: &Broker, value: &[u8]) -> std::path::PathBuf {
    b.put("app/pw", value);
    b.ok(&["workload", "add", "reader", "--selector", &format!("unix:uid:{READER}")]);
    b.ok(&["grant", "app/pw", "--to", "reader", "--mode", "0400", "--uid", &READER.to_string()]);
    b.mount("reader").join("pw")
}

fn read_as_reader(file: &Path) -> std::process::Output {
    run_as(READER, &["cat", file.to_str().unwrap()])
}

const MIB: u64 = 1024;

#[test]
fn a_stream_flood_by_strangers_stays_within_the_memory_budget() {
    needs!(root);
    let b = Broker::start();
    let file = grant_to_reader(&b, b"granted-during-flood-6d1e");
    let pid = b.pid();
    // Warm up: a call of each kind, so the baseline holds what any caller costs.
    assert!(cli_as(&b.workload_socket(), &["whoami"], None, Some(NOBODY)).status.success());
    assert_eq!(read_as_reader(&file).stdout, b"granted-during-flood-6d1e");
    let before = kib(pid, "VmRSS:");
    let fds_before = fd_count(pid);
    // The attack as found: 4 connections of 64 streams of ~1 MiB each, to
    // the Admin service on the world-writable workload socket.
    let ws = b.workload_socket();
    let put = "/keyhole.v1.Admin/PutSecret";
    let floods = vec![H2Flood::start(NOBODY, &ws, 4, 64, 1 << 20, put, 6.0, "read")];
    eprintln!("admin-path flood: {}", floods[0].stats);
    let after_admin = kib(pid, "VmHWM:");
    // Refused on the headers: of each stream's body the broker took no
    // more than its window (4 KiB) before answering.
    let (opened, sent) = (floods[0].stats["opened"].as_u64().unwrap(), floods[0].stats["sent"].as_u64().unwrap());
    assert!(opened > 0 && sent <= opened * 4096, "{} bytes sent on {opened} streams", sent);
    eprintln!("RSS before {before} KiB, peak after the admin-path flood {after_admin} KiB");
    // Meanwhile the broker serves a granted read, and admins.
    assert_eq!(read_as_reader(&file).stdout, b"granted-during-flood-6d1e");
    assert_eq!(b.get("app/pw"), b"granted-during-flood-6d1e");
    assert!(after_admin.saturating_sub(before) <= 64 * MIB, "RSS grew by {} KiB", after_admin - before);

    drop(floods);

    // Any other flood, all at once: more strangers' connections than the
    // broker serves, with big WhoAmI bodies, with WhoAmI calls whose
    // answers are never read, with admin calls, and with header blocks
    // that never end.
    let who = "/keyhole.v1.Workload/WhoAmI";
    let floods: Vec<H2Flood> = std::thread::scope(|s| {
        let started = [
            s.spawn(|| H2Flood::start(3001, &ws, 70, 64, 1 << 20, who, 5.0, "read")),
            s.spawn(|| H2Flood::start(3002, &ws, 70, 64, 5, who, 5.0, "noread")),
            s.spawn(|| H2Flood::start(3003, &ws, 70, 64, 1 << 20, put, 5.0, "read")),
            s.spawn(|| H2Flood::start(3004, &ws, 70, 1, 0, who, 5.0, "headers")),
        ];
        started.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for f in &floods {
        eprintln!("flood: {}", f.stats);
    }
    let peak = kib(pid, "VmHWM:");
    eprintln!("RSS before {before} KiB, peak {peak} KiB; fds before {fds_before}, now {}", fd_count(pid));
    assert_eq!(read_as_reader(&file).stdout, b"granted-during-flood-6d1e");
    assert_eq!(b.get("app/pw"), b"granted-during-flood-6d1e");
    let me = json(&cli_as(&ws, &["whoami", "--json"], None, None).stdout);
    assert_eq!(me["admin"], true, "an admin on the workload socket during the flood");
    assert!(peak.saturating_sub(before) <= 64 * MIB, "RSS grew by {} KiB under the flood", peak - before);
    drop(floods);
    // Refused admin calls were refused as such, and audited.
    let denials = b.audit_events("deny");
    assert!(denials.iter().any(|d| d["method"] == "PutSecret" && d["caller"]["uid"] == NOBODY), "no audited denial");
    b.ok(&["audit", "--verify"]);
}

/// Hold `n` idle (HTTP/2 preface sent, no stream) connections to `path`.
const IDLE: &str = r#"
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
socks, refused = [], 0
for _ in range(n):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        socks.append(s)
    except OSError:
        refused += 1
print(len(socks), refused, flush=True)
sys.stdin.read()
"#;

/// [`IDLE`] run as a user: the connections held until it drops.
struct Idle {
    _script: Script,
}

impl Idle {
    fn hold(uid: u32, path: &Path, n: usize) -> Idle {
        let mut script = Script::start(uid, IDLE, &[path.to_str().unwrap(), &n.to_string()]);
        eprintln!("uid {uid}: {}", script.line());
        Idle { _script: script }
    }
}

fn idle_connections_leave_fds_for_a_granted_open(limits: &str) {
    let (b, _wrapper) = broker_under_prlimit(limits);
    let file = grant_to_reader(&b, b"granted-under-fd-flood-21c9");
    assert_eq!(read_as_reader(&file).stdout, b"granted-under-fd-flood-21c9");
    let pid = b.pid();
    let fds_before = fd_count(pid);
    let ws = b.workload_socket();
    let held: Vec<Idle> = (3101..3105).map(|uid| Idle::hold(uid, &ws, 128)).collect();
    std::thread::sleep(Duration::from_millis(500));
    eprintln!("broker fds: {fds_before} before, {} with the idle connections held", fd_count(pid));
    for _ in 0..20 {
        let o = read_as_reader(&file);
        assert_eq!(o.stdout, b"granted-under-fd-flood-21c9", "granted open failed: {}", stderr(&o));
    }
    assert_eq!(b.get("app/pw"), b"granted-under-fd-flood-21c9");
    drop(held);
}

#[test]
fn idle_connections_under_a_soft_nofile_of_1024_leave_a_granted_open_its_fds() {
    needs!(root);
    idle_connections_leave_fds_for_a_granted_open("1024:20000");
}

#[test]
fn idle_connections_under_a_hard_nofile_of_1024_leave_a_granted_open_its_fds() {
    needs!(root);
    idle_connections_leave_fds_for_a_granted_open("1024:1024");
}

#[test]
fn an_admin_script_of_500_grants_is_not_throttled_like_a_stranger() {
    needs!(root);
    let b = Broker::start_with("[limits]\ncalls_per_second = 20\n");
    b.put("s", b"v");
    b.ok(&["workload", "add", "w", "--selector", "unix:uid:4343"]);
    let script = format!(
        "set -e; for i in $(seq 1 500); do {BIN} --socket {} grant s --to w --file f$i >/dev/null; done",
        b.socket().display()
    );
    let o = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "the admin's loop failed: {}", stderr(&o));
    let grants = json(&b.ok(&["grants", "--json"]));
    assert_eq!(grants[0]["file"], "f500", "the last grant holds");
    // Strangers are still held to calls_per_second.
    let ws = b.workload_socket();
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..40).map(|_| s.spawn(|| cli_as(&ws, &["whoami"], None, Some(NOBODY)))).collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert!(outcomes.iter().any(|o| o.status.code() == Some(5)), "40 stranger calls at once, 20 a second: all passed");
}

/// Connect and report, as JSON, after how many seconds the broker closed
/// the connection (or `null` if it did not within `wait`): `silent` sends
/// nothing; `idle` sends the HTTP/2 preface and settings, then nothing.
const CLOSED_AFTER: &str = r#"
import json, socket, sys, time
path, mode, wait = sys.argv[1], sys.argv[2], float(sys.argv[3])
s = socket.socket(socket.AF_UNIX)
s.connect(path)
t0 = time.time()
if mode == "idle":
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
s.settimeout(0.2)
closed = None
while time.time() - t0 < wait:
    try:
        got = s.recv(65536)
    except socket.timeout:
        continue
    except OSError:
        got = b""
    if not got:
        closed = time.time() - t0
        break
print(json.dumps(closed), flush=True)
"#;

fn closed_after(uid: u32, path: &Path, mode: &str, wait: u32) -> Option<f64> {
    let o = Command::new("python3")
        .args(["-c", CLOSED_AFTER, path.to_str().unwrap(), mode, &wait.to_string()])
        .uid(uid)
        .gid(uid)
        .output()
        .expect("python3");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&o)))
}

#[test]
fn silent_and_idle_connections_are_closed_long_streams_stay() {
    needs!(root);
    // Without the HTTP/2 preface, a connection lasts 5 s.
    let silent = closed_after(NOBODY, &Broker::start().workload_socket(), "silent", 15);
    let silent = silent.expect("a connection that never sent the HTTP/2 preface stayed open");
    assert!((4.5..9.0).contains(&silent), "closed after {silent} s, not the 5 s preface timeout");
    // With it but no call, as long as [limits] idle_timeout.
    let b = Broker::start_with("[limits]\nidle_timeout = \"2s\"\n");
    let ws = b.workload_socket();
    let idle = closed_after(NOBODY, &ws, "idle", 15).expect("an idle HTTP/2 connection stayed open");
    assert!((1.5..6.0).contains(&idle), "closed after {idle} s, not the 2 s idle timeout");
    // An admin's idle connection too (admins' connections have no maximum age).
    let idle = closed_after(0, &b.socket(), "idle", 15).expect("an admin's idle connection stayed open");
    assert!((1.5..6.0).contains(&idle), "an admin's: closed after {idle} s, not the 2 s idle timeout");
    // A stranger that answers PINGs but never opens a window for its
    // answers is cut off all the same.
    let stuck = H2Flood::start(NOBODY, &ws, 4, 2, 5, "/keyhole.v1.Workload/WhoAmI", 8.0, "noread");
    assert_eq!(stuck.stats["alive"], 0, "{}", stuck.stats);
    // An admin following the audit log holds one long call: it stays.
    let mut follow = Command::new(BIN)
        .args(["--socket", b.socket().to_str().unwrap(), "audit", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(lines).lines() {
            let Ok(l) = l else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(5));
    assert!(follow.try_wait().unwrap().is_none(), "audit --follow was cut off while idle");
    b.put("after/idle", b"x");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let seen =
        std::iter::from_fn(|| rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())).ok())
            .any(|l| l.contains("after/idle"));
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(seen, "the follower missed a line");
}

#[test]
fn admins_by_group_reach_the_admin_socket_others_do_not() {
    needs!(root);
    let b = Broker::start_with("[admin]\ngids = [4444]\n");
    let md = std::fs::metadata(b.socket()).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((md.mode() & 0o777, md.gid()), (0o660, 4444));
    let as_admin_group = Command::new(BIN)
        .args(["--socket", b.socket().to_str().unwrap(), "secret", "ls"])
        .uid(4445)
        .gid(4444)
        .output()
        .unwrap();
    assert!(as_admin_group.status.success(), "{}", stderr(&as_admin_group));
    let o = cli_as(&b.socket(), &["secret", "ls"], None, Some(NOBODY));
    assert_fails(&o, 4, "permission denied opening");
}

/// Count the copies of a value in a process's writable memory (heap,
/// anonymous mappings, stacks), read through `/proc/<pid>/mem` as root.
const SCAN: &str = r#"
import sys
pid, needle = int(sys.argv[1]), sys.argv[2].encode()
hits = 0
with open(f"/proc/{pid}/maps") as m, open(f"/proc/{pid}/mem", "rb", 0) as mem:
    for line in m:
        parts = line.split()
        name = parts[5] if len(parts) > 5 else ""
        if "r" not in parts[1] or name.startswith("/") or name in ("[vvar]", "[vsyscall]", "[vdso]"):
            continue
        a, b = (int(x, 16) for x in parts[0].split("-"))
        try:
            mem.seek(a)
            hits += mem.read(b - a).count(needle)
        except OSError:
            pass
print(hits)
"#;

#[test]
fn a_value_put_and_got_over_grpc_lingers_nowhere_in_the_brokers_memory() {
    needs!(root);
    let b = Broker::start();
    let value = format!("lingering-value-{}-8f3a", std::process::id());
    b.put("lin/v", value.as_bytes());
    for _ in 0..3 {
        assert_eq!(b.get("lin/v"), value.as_bytes());
    }
    // The calls' connections are closed; every buffer that held the value
    // (the request, the answer, h2's and tonic's buffers) is freed.
    std::thread::sleep(Duration::from_millis(500));
    let o = Command::new("python3").args(["-c", SCAN, &b.pid().to_string(), &value]).output().unwrap();
    let hits = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert_eq!(hits, "0", "copies of the value left in the broker's memory ({})", stderr(&o));
}
