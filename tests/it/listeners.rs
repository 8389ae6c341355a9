//! The broker's TCP listeners (remote admin over mutual TLS, metrics)
//! under a flood of idle connections from a local user, and the alert
//! hook under a stranger's flood of denials: the fd budget holds, a
//! granted read and the legitimate client still get through, idle
//! connections are closed, and a second caller's denial still alerts.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rcgen::DnType::CommonName as CN;

use crate::support::*;

const NOBODY: u32 = 65534;
const READER: u32 = 4345;

/// `keyhole serve` under `prlimit --nofile=1024:1024` (so the fd limit
/// is within a local user's reach) with a config file holding `toml`.
fn broker_under_nofile(toml: &str) -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keyhole.toml");
    std::fs::write(&cfg, format!("{toml}\n[docker]\nplugin = \"\"\n")).unwrap();
    let wrapper = dir.path().join("keyhole-nofile");
    // The harness passes a config of its own: ours replaces it.
    let script = format!(
        "#!/bin/sh\nskip=0\nfor a in \"$@\"; do\n  shift\n  if [ $skip = 1 ]; then skip=0; continue; fi\n  \
         if [ \"$a\" = --config ]; then skip=1; continue; fi\n  set -- \"$@\" \"$a\"\ndone\n\
         exec prlimit --nofile=1024:1024 {BIN} \"$@\" --config {}\n",
        cfg.display()
    );
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (Broker::start_from(&wrapper, &[]), dir)
}

/// A workload for host uid READER with `app/pw` granted; its file.
fn grant_to_reader(b: &Broker, value: &[u8]) -> std::path::PathBuf {
    b.put("app/pw", value);
    b.ok(&["workload", "add", "app", "--selector", &format!("unix:uid:{READER}")]);
    b.ok(&["grant", "app/pw", "--to", "app", "--mode", "0444"]);
    b.mount("app").join("pw")
}

/// Open up to `n` TCP connections to host:port and send nothing; print
/// how many connected; on a line from stdin, print how many are still
/// open (not closed by the broker).
const HOLD_TCP: &str = r#"
import resource, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks, failed = [], 0
for i in range(n):
    s = socket.socket()
    s.settimeout(0.3)
    try:
        s.connect((host, port))
        socks.append(s)
    except OSError:
        s.close()
        failed += 1
        if failed > 20:
            break
print(len(socks), flush=True)
sys.stdin.readline()
def is_open(s):
    s.setblocking(False)
    try:
        while s.recv(65536):
            pass
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
print(sum(is_open(s) for s in socks), flush=True)
sys.stdin.read()
"#;

struct Hold {
    script: Script,
    connected: usize,
    at: Instant,
}

impl Hold {
    fn start(uid: u32, addr: &str, n: usize) -> Hold {
        let (host, port) = addr.rsplit_once(':').unwrap();
        let mut script = Script::start(uid, HOLD_TCP, &[host, port, &n.to_string()]);
        let line = script.line();
        let connected = line.trim().parse().unwrap_or_else(|e| panic!("{e}: {line:?}"));
        Hold { script, connected, at: Instant::now() }
    }

    /// How many of the connections the broker has not closed.
    fn still_open(&mut self) -> usize {
        self.script.send(b"\n");
        self.script.line().trim().parse().unwrap()
    }
}

/// A granted read works while the connections are held, and they are
/// all closed once the handshake timeout has passed.
fn granted_reads_hold(b: &Broker, file: &Path, value: &[u8], hold: &Hold) {
    eprintln!("held {} connections; broker fds now {}", hold.connected, fd_count(b.pid()));
    for _ in 0..5 {
        let o = run_as(READER, &["cat", file.to_str().unwrap()]);
        assert_eq!(o.stdout, value, "a granted read failed under the flood: {}", stderr(&o));
    }
}

fn closed_after_the_handshake_timeout(hold: &mut Hold) {
    let wait = Duration::from_secs(8).saturating_sub(hold.at.elapsed());
    std::thread::sleep(wait);
    let open = hold.still_open();
    assert_eq!(open, 0, "{open} of {} silent connections still open after 8 s", hold.connected);
}

#[test]
fn idle_tcp_connections_to_remote_admin_leave_reads_and_admins_their_fds() {
    needs!(root);
    let pki = Pki::new("keyhole listeners CA");
    let (server_crt, server_key) = pki.issue("server", &[(CN, "broker")], true);
    let (admin_crt, admin_key) = pki.issue("admin", &[(CN, "ops")], false);
    let port = free_port();
    let (b, _dir) = broker_under_nofile(&format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"{server_crt}\"\ntls_key = \"{server_key}\"\n\
         client_ca = \"{}\"\nsubjects = [\"CN=ops\"]\n",
        pki.ca()
    ));
    let value = b"granted-under-tcp-flood-7a1e";
    let file = grant_to_reader(&b, value);
    let mut hold = Hold::start(NOBODY, &format!("127.0.0.1:{port}"), 1100);
    std::thread::sleep(Duration::from_millis(500));
    granted_reads_hold(&b, &file, value, &hold);
    // The admin's call over mutual TLS still gets through.
    let o = Command::new(BIN)
        .args(["--endpoint", &format!("https://localhost:{port}"), "--cert", &admin_crt, "--key", &admin_key])
        .args(["--ca", &pki.ca(), "secret", "ls", "--json"])
        .env_remove("KEYHOLE_SOCKET")
        .output()
        .unwrap();
    assert!(o.status.success(), "the admin's remote call failed under the flood: {}", stderr(&o));
    assert!(contains(&o.stdout, b"app/pw"));
    closed_after_the_handshake_timeout(&mut hold);
    assert!(!b.audit_events("limit").is_empty(), "refusals are audited");
}

#[test]
fn idle_tcp_connections_to_metrics_leave_reads_and_scrapes_their_fds() {
    needs!(root);
    let addr = format!("127.0.0.1:{}", free_port());
    let (b, _dir) = broker_under_nofile(&format!("[metrics]\nlisten = \"{addr}\"\n"));
    let value = b"granted-under-metrics-flood-c3d0";
    let file = grant_to_reader(&b, value);
    let mut hold = Hold::start(NOBODY, &addr, 1100);
    std::thread::sleep(Duration::from_millis(500));
    granted_reads_hold(&b, &file, value, &hold);
    // A scrape still gets through.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: keyhole\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut resp);
    assert!(resp.starts_with("HTTP/1.1 200") && resp.contains("keyhole_mounts"), "scrape failed: {resp:?}");
    closed_after_the_handshake_timeout(&mut hold);
}

fn write_hook(dir: &Path, body: &str) -> String {
    let p = dir.join("hook.sh");
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    p.display().to_string()
}

#[test]
fn a_stranger_denied_all_minute_does_not_silence_the_alert_hook_for_others() {
    needs!(root);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alerts");
    let hook = write_hook(dir.path(), &format!("cat > {}.$$", out.display()));
    let b = Broker::start_with(&format!("[alerts]\non_deny = \"{hook}\"\nmax_per_minute = 6\n"));
    let value = b"alert-per-caller-must-not-show-5e2b";
    let file = grant_to_reader(&b, value);
    let runs = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("alerts."))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|r| serde_json::from_str::<serde_json::Value>(&r).ok())
            .collect::<Vec<_>>()
    };
    // The stranger calls an admin method on workload.sock, all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ws = b.workload_socket();
    let stranger = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = cli_as(&ws, &["secret", "ls"], None, Some(NOBODY));
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    eventually(30, "the stranger's denials to use up six runs", || b.audit_events("alert").len() >= 6);
    // A few more of the stranger's summaries, suppressed.
    std::thread::sleep(Duration::from_secs(3));
    // Another uid probes the workload's file: the hook runs for it.
    let probe = run_as(4346, &["cat", file.to_str().unwrap()]);
    assert!(!probe.status.success());
    let ran_for_prober = || runs().into_iter().find(|r| r["denial"]["caller"]["uid"] == 4346);
    eventually(10, "a run for the second caller", || ran_for_prober().is_some());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    stranger.join().unwrap();
    let run = ran_for_prober().unwrap();
    assert_eq!(run["denial"]["workload"], "app");
    eprintln!("the prober's run: {run}");
    // The stranger's suppressed denials are named in it.
    let named = run["suppressed_callers"].as_array().unwrap();
    assert!(named.iter().any(|c| c["caller"] == "uid:65534" && c["count"].as_u64() > Some(0)), "{run}");
    for r in runs() {
        assert!(!r.to_string().contains(std::str::from_utf8(value).unwrap()));
    }
}

/// Connect with a client certificate, finish the TLS handshake, send
/// nothing more; print after how many seconds the broker closed it
/// (`null`: not within `wait`).
const TLS_IDLE: &str = r#"
import json, socket, ssl, sys, time
host, port, ca, crt, key, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], float(sys.argv[6])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.load_cert_chain(crt, key)
ctx.set_alpn_protocols(["h2"])
s = ctx.wrap_socket(socket.create_connection((host, port)), server_hostname="localhost")
t0 = time.time()
s.settimeout(0.2)
closed = None
while time.time() - t0 < wait:
    try:
        got = s.recv(65536)
    except socket.timeout:
        continue
    except (OSError, ssl.SSLError):
        got = b""
    if not got:
        closed = time.time() - t0
        break
print(json.dumps(closed), flush=True)
"#;

#[test]
fn a_remote_admin_connection_with_no_call_is_closed_after_the_idle_timeout() {
    needs!(root);
    let pki = Pki::new("keyhole idle CA");
    let (server_crt, server_key) = pki.issue("server", &[(CN, "broker")], true);
    let (admin_crt, admin_key) = pki.issue("admin", &[(CN, "ops")], false);
    let port = free_port();
    let b = Broker::start_with(&format!(
        "[limits]\nidle_timeout = \"2s\"\n\
         [admin]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"{server_crt}\"\ntls_key = \"{server_key}\"\n\
         client_ca = \"{}\"\nsubjects = [\"CN=ops\"]\n",
        pki.ca()
    ));
    let o = Command::new("python3")
        .args(["-c", TLS_IDLE, "127.0.0.1", &port.to_string(), &pki.ca(), &admin_crt, &admin_key, "10"])
        .output()
        .unwrap();
    let closed: Option<f64> = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&o)));
    let closed = closed.expect("an idle remote admin connection stayed open 10 s");
    assert!((1.5..6.0).contains(&closed), "closed after {closed} s");
    // Calls still work.
    let o = Command::new(BIN)
        .args(["--endpoint", &format!("https://localhost:{port}"), "--cert", &admin_crt, "--key", &admin_key])
        .args(["--ca", &pki.ca(), "secret", "ls"])
        .env_remove("KEYHOLE_SOCKET")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    drop(b);
}
