//! The integration tests' harness: the shared one (a real `keyhole serve`
//! per test, in its own temp dirs, stopped on drop; the real CLI to talk
//! to it; `eventually`; a private OpenBao), re-exported from
//! `tests/harness/mod.rs`, which the benchmark shares; and what only
//! tests need (containers, hostile scripts, a PKI, `needs!`).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "../harness/mod.rs"]
mod harness;

pub use harness::cluster::BaoCluster;
pub use harness::{
    BIN, Bao, Broker, cli_as, contains, denials_in, detach_mounts_under, eventually, json, require_bao, require_root,
    signal, unique,
};

/// What a test needs of the machine, in one line at its top:
/// `needs!(root)`, `needs!(root, docker)`, `needs!(bao)` (`compose` for
/// the compose tests). Each names a `require_*` check: root, docker (and
/// the test image), bao (OpenBao on PATH), compose (Compose v2 and the
/// broker image). A missing one returns from the test, saying so loudly;
/// under `CI=true` nothing skips: a missing one fails the test.
macro_rules! needs {
    (@one root) => { $crate::support::require_root() };
    (@one docker) => { $crate::support::require_docker() };
    (@one bao) => { $crate::support::require_bao() };
    (@one compose) => { require_compose() };
    ($($what:ident),+ $(,)?) => {
        if !($(needs!(@one $what))&&+) {
            return;
        }
    };
}
pub(crate) use needs;

/// Run a command as `uid` (gid the same; std drops supplementary groups).
pub fn run_as(uid: u32, cmd: &[&str]) -> Output {
    let mut c = Command::new(cmd[0]);
    c.args(&cmd[1..]).uid(uid).gid(uid).stdin(Stdio::null());
    c.output().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Assert a failed CLI run: its exit code, and words its one-line error has.
pub fn assert_fails(o: &Output, code: i32, words: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "wanted exit {code}, got {:?}: {err}", o.status.code());
    assert!(err.contains(words), "error {err:?} lacks {words:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "error is not one line: {err:?}");
}

/// A cheap random number for test schedules (no rand crate needed).
pub fn jitter(max: u64) -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    (t ^ (t >> 7).wrapping_mul(0x9E37_79B9)) % max.max(1)
}

pub const IMAGE: &str = "keyhole-test/busybox:2";

/// Docker is needed for the container tests: under CI its absence fails
/// the suite (scripts/test.sh installs and starts it); elsewhere it skips
/// loudly. Also makes sure the busybox test image exists.
pub fn require_docker() -> bool {
    if !require_root() {
        return false;
    }
    static READY: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let ready = READY.get_or_init(|| {
        let info = Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output();
        match info {
            Ok(o) if o.status.success() => {}
            Ok(o) => return Err(format!("docker info failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => return Err(format!("no docker CLI: {e}")),
        }
        ensure_image()
    });
    match ready {
        Ok(()) => true,
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "CI=true but docker is not usable: {e}");
            eprintln!("SKIPPED: {e} (scripts/test.sh installs and starts docker)");
            false
        }
    }
}

/// A busybox-static image imported from a rootfs: no registry needed.
fn ensure_image() -> Result<(), String> {
    if docker(&["image", "inspect", IMAGE]).status.success() {
        return Ok(());
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("busybox is not installed (apt-get install busybox-static)")?;
    let root = tempfile::tempdir().map_err(|e| e.to_string())?;
    let bin = root.path().join("bin");
    fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
    for d in ["run/secrets", "tmp", "proc", "sys", "dev", "etc"] {
        fs::create_dir_all(root.path().join(d)).map_err(|e| e.to_string())?;
    }
    fs::copy(busybox, bin.join("busybox")).map_err(|e| e.to_string())?;
    // A named user, for images whose `User` is a name.
    let etc = root.path().join("etc");
    fs::write(etc.join("passwd"), "root:x:0:0::/:/bin/sh\napp:x:1001:1002::/:/bin/sh\n").map_err(|e| e.to_string())?;
    fs::write(etc.join("group"), "root:x:0:\napp:x:1002:\n").map_err(|e| e.to_string())?;
    for applet in ["sh", "cat", "ls", "sleep", "echo", "id", "true", "stat"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).map_err(|e| e.to_string())?;
    }
    let tar = Command::new("tar").arg("-C").arg(root.path()).args(["-c", "."]).stdout(Stdio::piped()).spawn();
    let tar = tar.map_err(|e| e.to_string())?;
    let out = Command::new("docker")
        .args(["import", "--change", "CMD [\"/bin/sh\"]", "-", IMAGE])
        .stdin(tar.stdout.unwrap())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("docker import failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).stdin(Stdio::null()).output().unwrap()
}

/// Stop dockerd and start it again with the same command line, as an
/// operator's `systemctl restart docker` would. Every container stops, so
/// only tests run alone may call this (they are `#[ignore]`d; scripts/test.sh
/// runs them in a second, serial pass).
#[expect(clippy::zombie_processes, reason = "dockerd outlives the test process on purpose")]
pub fn restart_dockerd() {
    let pid = String::from_utf8(Command::new("pidof").arg("dockerd").output().unwrap().stdout).unwrap();
    let pid: i32 = pid.split_whitespace().next().expect("dockerd is not running").parse().unwrap();
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> =
        cmdline.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "dockerd did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = fs::OpenOptions::new().create(true).append(true).open("/tmp/keyhole-test-dockerd.log").unwrap();
    Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("start dockerd");
    eventually(60, "dockerd to answer again", || docker(&["info"]).status.success());
}

/// A running container, removed on drop.
pub struct Container {
    pub id: String,
}

impl Container {
    /// `docker run -d` with `args` (options), then `sleep` forever.
    pub fn start(args: &[&str]) -> Container {
        Self::run(args, &["sleep", "3600"])
    }

    /// `docker run -d` with `args` (options) and `cmd` in the test image.
    pub fn run(args: &[&str], cmd: &[&str]) -> Container {
        let mut all = vec!["run", "-d", "--rm"];
        all.extend_from_slice(args);
        all.push(IMAGE);
        all.extend_from_slice(cmd);
        let o = docker(&all);
        assert!(o.status.success(), "docker run: {}", String::from_utf8_lossy(&o.stderr));
        Container { id: String::from_utf8(o.stdout).unwrap().trim().to_owned() }
    }

    pub fn exec(&self, cmd: &[&str]) -> Output {
        let mut all = vec!["exec", self.id.as_str()];
        all.extend_from_slice(cmd);
        docker(&all)
    }

    /// `cat` a file inside the container: its bytes, or the error text.
    pub fn cat(&self, path: &str) -> Result<Vec<u8>, String> {
        let o = self.exec(&["cat", path]);
        if o.status.success() { Ok(o.stdout) } else { Err(String::from_utf8_lossy(&o.stderr).into_owned()) }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.id]);
    }
}

/// Start `keyhole serve` with `toml` as its config in fresh dirs; it must
/// fail at start (exit 1). Returns its stderr.
pub fn serve_must_fail(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keyhole.toml");
    fs::write(&cfg, toml).unwrap();
    let o = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    detach_mounts_under(dir.path());
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "serve did not fail as it should: {err}");
    err
}

/// A free TCP port on 127.0.0.1 (free when asked).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// How many file descriptors process `pid` holds (0 once it is gone).
pub fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// A `python3 -c` script run as host user `uid` (its uid and gid), its
/// stdin and stdout piped; killed when dropped (closing its stdin ends
/// the scripts that wait on it).
pub struct Script {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Script {
    pub fn start(uid: u32, code: &str, args: &[&str]) -> Script {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(code)
            .args(args)
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        Script { child, out }
    }

    /// Its next line of output.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.out, &mut line).unwrap();
        line
    }

    /// Write `bytes` to its stdin.
    pub fn send(&mut self, bytes: &[u8]) {
        self.child.stdin.as_mut().unwrap().write_all(bytes).unwrap();
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Open up to `n` connections to the Unix socket `path` (garbage on the
/// first `garbage`, the HTTP/2 preface on the others), wait, print how
/// many were tried and how many the broker kept open, and hold them until
/// stdin closes. Arguments: path, n, garbage.
pub const HOLD_UNIX: &str = r#"
import resource, socket, sys, time
path, n, garbage = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
n = min(n, hard - 64)
socks = []
for i in range(n):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        if i < garbage:
            s.send(b"\x00\xffnot http/2\r\n" * 64)
        else:
            # An idle HTTP/2 client: without the preface it is closed in 5 s.
            s.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    except OSError:
        pass  # refused: already closed
    socks.append(s)
time.sleep(1.5)
def is_open(s):
    s.setblocking(False)
    try:
        while s.recv(65536):
            pass  # what the broker said before closing (a GOAWAY)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
open_ = sum(is_open(s) for s in socks)
print(n, open_, flush=True)
sys.stdin.read()
"#;

/// [`HOLD_UNIX`] run as `uid`: the connections held until it drops.
pub struct Flood {
    _script: Script,
    pub tried: usize,
    pub kept: usize,
}

impl Flood {
    pub fn start(uid: u32, socket: &Path, n: usize, garbage: usize) -> Flood {
        let mut script =
            Script::start(uid, HOLD_UNIX, &[socket.to_str().unwrap(), &n.to_string(), &garbage.to_string()]);
        let (tried, kept) = parse_flood(&script.line());
        Flood { _script: script, tried, kept }
    }
}

/// The two numbers [`HOLD_UNIX`] prints: tried, kept.
pub fn parse_flood(line: &str) -> (usize, usize) {
    let mut f = line.split_whitespace().map(|w| w.parse::<usize>().unwrap_or_else(|e| panic!("{e}: {line:?}")));
    (f.next().unwrap_or_else(|| panic!("flood output {line:?}")), f.next().unwrap())
}

/// A CA (rcgen) in a temporary directory, and certificates it issues.
pub struct Pki {
    dir: tempfile::TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        fs::write(dir.path().join("ca.crt"), cert.pem()).unwrap();
        Pki { dir, issuer: rcgen::Issuer::new(params, key) }
    }

    /// The CA certificate's path.
    pub fn ca(&self) -> String {
        self.dir.path().join("ca.crt").display().to_string()
    }

    /// Issue a certificate (a server's for localhost and 127.0.0.1, or a
    /// client's) for `subject`; returns (cert, key) paths.
    pub fn issue(&self, file: &str, subject: &[(rcgen::DnType, &str)], server: bool) -> (String, String) {
        let sans = if server { vec!["localhost".to_owned(), "127.0.0.1".to_owned()] } else { vec![] };
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in subject {
            params.distinguished_name.push(t.clone(), *v);
        }
        params.extended_key_usages = vec![if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (self.dir.path().join(format!("{file}.crt")), self.dir.path().join(format!("{file}.key")));
        fs::write(&c, cert.pem()).unwrap();
        fs::write(&k, key.serialize_pem()).unwrap();
        fs::set_permissions(&k, fs::Permissions::from_mode(0o600)).unwrap();
        (c.display().to_string(), k.display().to_string())
    }
}

/// `keyhole serve` under `prlimit --nofile=SOFT:HARD` (`limits`), as
/// systemd's default soft limit of 1024 would have it; the directory holds
/// the wrapper.
pub fn broker_under_prlimit(limits: &str) -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("keyhole-nofile");
    fs::write(&wrapper, format!("#!/bin/sh\nexec prlimit --nofile={limits} {BIN} \"$@\"\n")).unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    (Broker::start_from(&wrapper, &[]), dir)
}

/// GET /metrics over a TCP address or a unix socket path.
pub fn scrape(at: &str) -> String {
    let req = b"GET /metrics HTTP/1.1\r\nHost: keyhole\r\nConnection: close\r\n\r\n";
    let mut resp = String::new();
    if at.starts_with('/') {
        let mut s = std::os::unix::net::UnixStream::connect(at).unwrap();
        s.write_all(req).unwrap();
        s.read_to_string(&mut resp).unwrap();
    } else {
        let mut s = std::net::TcpStream::connect(at).unwrap();
        s.write_all(req).unwrap();
        s.read_to_string(&mut resp).unwrap();
    }
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("application/openmetrics-text"), "{resp}");
    resp
}

/// The value of one sample (`name{labels}` exactly as exported), 0 if absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse::<f64>().unwrap())
        .next()
        .unwrap_or(0.0)
}
