//! Podman hosts, with a real rootful `podman` (Debian's 4.3): each test
//! starts its own `podman system service` on a socket in its temp dir
//! (killed at the end) and names it in `[[runtime]] kind = "podman"`.
//! A labelled Podman container reads its grant through the host mount
//! (also by `podman exec`, and across rotation, revoke and a broker
//! restart); an unlabelled one is denied; a cgroup named like a Podman
//! container (`libpod-<id>`) is only a claim; `docker:` selectors match
//! Docker's containers only, `container:` ones any runtime's.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// The test image, imported from busybox-static (no registry); Podman
/// reports it as `localhost/keyhole-test-busybox:1`.
pub const PODMAN_IMAGE: &str = "localhost/keyhole-test-busybox:1";
const NOBODY: u32 = 65534;
const V2: &str = "/sys/fs/cgroup/unified";

/// Podman is needed for these tests: under CI its absence fails the suite
/// (scripts/test.sh installs it); elsewhere they skip loudly.
pub fn require_podman() -> bool {
    if !require_root() {
        return false;
    }
    static READY: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let ready = READY.get_or_init(|| {
        match Command::new("podman").args(["version", "--format", "{{.Client.Version}}"]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => return Err(format!("podman version failed: {}", stderr(&o).trim())),
            Err(e) => return Err(format!("no podman: {e}")),
        }
        ensure_podman_image()
    });
    match ready {
        Ok(()) => true,
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "CI=true but podman is not usable: {e}");
            eprintln!("SKIPPED: {e} (scripts/test.sh installs podman)");
            false
        }
    }
}

pub fn podman(args: &[&str]) -> Output {
    Command::new("podman").args(args).stdin(Stdio::null()).output().unwrap()
}

/// `tar -C rootfs -c . | podman import --change 'CMD ["/bin/sh"]' - IMAGE`.
fn ensure_podman_image() -> Result<(), String> {
    if podman(&["image", "exists", PODMAN_IMAGE]).status.success() {
        return Ok(());
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("busybox is not installed (apt-get install busybox-static)")?;
    let root = tempfile::tempdir().map_err(|e| e.to_string())?;
    let bin = root.path().join("bin");
    for d in ["bin", "run/secrets", "tmp", "proc", "sys", "dev", "etc"] {
        fs::create_dir_all(root.path().join(d)).map_err(|e| e.to_string())?;
    }
    fs::copy(busybox, bin.join("busybox")).map_err(|e| e.to_string())?;
    fs::write(root.path().join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").map_err(|e| e.to_string())?;
    fs::write(root.path().join("etc/group"), "root:x:0:\n").map_err(|e| e.to_string())?;
    for applet in ["sh", "cat", "ls", "sleep", "echo", "id", "true", "stat"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).map_err(|e| e.to_string())?;
    }
    let tar = Command::new("tar").arg("-C").arg(root.path()).args(["-c", "."]).stdout(Stdio::piped()).spawn();
    let tar = tar.map_err(|e| e.to_string())?;
    let out = Command::new("podman")
        .args(["import", "--change", "CMD [\"/bin/sh\"]", "-", PODMAN_IMAGE])
        .stdin(tar.stdout.unwrap())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("podman import failed: {}", stderr(&out)));
    }
    Ok(())
}

/// `podman system service --time=0` on a socket of its own, killed on drop.
pub struct PodmanService {
    pub dir: tempfile::TempDir,
    child: Child,
}

impl PodmanService {
    pub fn start() -> PodmanService {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("podman.sock");
        let log = fs::File::create(dir.path().join("service.log")).unwrap();
        let child = Command::new("podman")
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let s = PodmanService { dir, child };
        let ping = || {
            let o =
                Command::new("curl").args(["-sf", "--unix-socket"]).arg(&sock).arg("http://d/_ping").output().unwrap();
            o.status.success()
        };
        eventually(30, "podman system service to answer", ping);
        s
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("podman.sock")
    }

    /// `[[runtime]]` for this service.
    pub fn runtime_toml(&self) -> String {
        format!("[[runtime]]\nkind = \"podman\"\nsocket = \"{}\"\n", self.socket().display())
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running Podman container, removed on drop.
pub struct Pod {
    pub id: String,
}

impl Pod {
    /// `podman run -d --rm` with `args` (options), sleeping.
    pub fn start(args: &[&str]) -> Pod {
        let mut all = vec!["run", "-d", "--rm", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[PODMAN_IMAGE, "sleep", "3600"]);
        let o = podman(&all);
        assert!(o.status.success(), "podman run: {}", stderr(&o));
        Pod { id: String::from_utf8(o.stdout).unwrap().trim().to_owned() }
    }

    pub fn exec(&self, cmd: &[&str]) -> Output {
        let mut all = vec!["exec", self.id.as_str()];
        all.extend_from_slice(cmd);
        podman(&all)
    }

    /// `cat` a file inside the container: its bytes, or the error text.
    pub fn cat(&self, path: &str) -> Result<Vec<u8>, String> {
        let o = self.exec(&["cat", path]);
        if o.status.success() { Ok(o.stdout) } else { Err(stderr(&o)) }
    }

    pub fn init_pid(&self) -> i32 {
        let o = podman(&["inspect", "--format", "{{.State.Pid}}", &self.id]);
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.id]);
    }
}

/// A broker asking only `svc`'s Podman. `KEYHOLE_TEST_BIN` runs another
/// build (main's, to see an attack's outcome there), which knows no
/// `[[runtime]]`: it is pointed at the Podman socket as its Docker's.
fn broker_on_podman(svc: &PodmanService) -> Broker {
    let Ok(bin) = std::env::var("KEYHOLE_TEST_BIN") else { return Broker::start_with(&svc.runtime_toml()) };
    let mut b = Broker::start_from(Path::new(&bin), &[]);
    let cfg = b.dir.path().join("keyhole.toml");
    fs::write(&cfg, format!("[docker]\nsocket = \"{}\"\nplugin = \"\"\n", svc.socket().display())).unwrap();
    assert!(b.terminate().success());
    b.config = Some(cfg);
    b.restart();
    b
}

fn secrets_bind(b: &Broker, workload: &str) -> String {
    format!("{}:/run/secrets:ro,rslave", b.mount(workload).display())
}

#[test]
fn a_labelled_podman_container_reads_its_grant_and_an_unlabelled_one_is_denied() {
    if !require_podman() {
        return;
    }
    let svc = PodmanService::start();
    let b = Broker::start_with(&svc.runtime_toml());
    let t = unique("pm");
    let label = format!("keyhole.test={t}");
    b.put("db/password", b"podman-s3cret");
    b.ok(&["workload", "add", "w", "--selector", &format!("container:label:{label}")]);
    // Docker's selectors are Docker's: a Podman container never matches them.
    b.ok(&["workload", "add", "d", "--selector", &format!("docker:label:{label}")]);
    // The image as typed; Podman reports it resolved (localhost/...).
    b.ok(&[
        "workload",
        "add",
        "i",
        "--selector",
        "container:image:keyhole-test-busybox:1",
        "--selector",
        &format!("container:label:{label}"),
    ]);
    for w in ["w", "d", "i"] {
        b.ok(&["grant", "db/password", "--to", w]);
    }
    let c = Pod::start(&["--label", &label, "--name", &t, "-v", &secrets_bind(&b, "w")]);
    // `podman exec` shares the container's namespaces: it reads.
    assert_eq!(c.cat("/run/secrets/password").unwrap(), b"podman-s3cret");
    let reads = b.audit_events("read");
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(reads[0]["caller"]["container_id"], c.id.as_str());
    assert_eq!(reads[0]["caller"]["container_name"], t.as_str());

    let i = Pod::start(&["--label", &label, "-v", &secrets_bind(&b, "i")]);
    assert_eq!(i.cat("/run/secrets/password").unwrap(), b"podman-s3cret", "container:image as typed");

    // Rotation and revoke, seen inside the running container.
    b.put("db/password", b"podman-rotated");
    eventually(5, "the rotated value inside the container", || {
        c.cat("/run/secrets/password").ok().as_deref() == Some(b"podman-rotated")
    });
    b.ok(&["revoke", "db/password", "--from", "w"]);
    eventually(5, "the revoked file gone inside the container", || c.cat("/run/secrets/password").is_err());

    // Matches only docker:label — denied, and the deny names the container.
    let before = b.audit_events("deny").len();
    let d = Pod::start(&["--label", &label, "-v", &secrets_bind(&b, "d")]);
    let err = d.cat("/run/secrets/password").expect_err("a docker: selector matched a Podman container");
    assert!(err.contains("Permission denied"), "{err}");
    // An unlabelled container in a workload's mount: denied.
    let u = Pod::start(&["-v", &secrets_bind(&b, "i")]);
    let err = u.cat("/run/secrets/password").expect_err("an unlabelled container read");
    assert!(err.contains("Permission denied"), "{err}");
    let denies = b.audit_events("deny");
    let denied: Vec<&str> = denies[before..].iter().filter_map(|d| d["caller"]["container_id"].as_str()).collect();
    assert_eq!(denied, [d.id.as_str(), u.id.as_str()], "{denies:?}");
    b.assert_never_leaked(&[b"podman-s3cret", b"podman-rotated"]);
}

/// As root, move a shell into `top`; then, as `NOBODY`, make `top/leaf`,
/// move into it and `cat file`.
fn cat_from_delegated(top: &Path, leaf: &str, file: &Path) -> Output {
    let (top, file) = (top.display(), file.display());
    let inner = format!("mkdir -p {top}/{leaf} && echo $$ > {top}/{leaf}/cgroup.procs && exec cat {file}");
    let outer = format!(
        "echo $$ > {top}/cgroup.procs && exec setpriv --reuid {NOBODY} --regid {NOBODY} --clear-groups sh -c '{inner}'"
    );
    Command::new("sh").args(["-c", &outer]).output().unwrap()
}

/// Cgroup directories made for a test, removed (deepest first) on drop.
struct Cgroups(Vec<PathBuf>);

impl Cgroups {
    /// A fresh directory under `mount`, owned by `NOBODY` (as systemd's
    /// `Delegate=yes` leaves a user's), or root's when `owner` is 0.
    fn made(mount: &str, owner: u32) -> (Cgroups, PathBuf) {
        let dir = Path::new(mount).join(unique("khpodman"));
        fs::create_dir(&dir).unwrap();
        if owner != 0 {
            let mut chown = vec![dir.clone()];
            for f in ["cgroup.procs", "cgroup.threads", "cgroup.subtree_control", "tasks"] {
                if dir.join(f).exists() {
                    chown.push(dir.join(f));
                }
            }
            let o = Command::new("chown").arg(owner.to_string()).args(&chown).output().unwrap();
            assert!(o.status.success(), "chown: {}", stderr(&o));
        }
        (Cgroups(vec![dir.clone()]), dir)
    }

    fn will_hold(&mut self, top: &Path, rel: &str) {
        let mut p = top.to_path_buf();
        for seg in rel.split('/') {
            p.push(seg);
            self.0.push(p.clone());
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            for _ in 0..50 {
                if !d.exists() || fs::remove_dir(d).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn a_cgroup_named_like_a_podman_container_is_not_that_container() {
    if !require_podman() {
        return;
    }
    let svc = PodmanService::start();
    let b = broker_on_podman(&svc);
    let t = unique("spoof");
    let label = format!("keyhole.test={t}");
    b.put("db/password", b"spoofed-s3cret");
    // main knows no container: selectors; `docker:` ones on a Podman
    // socket are what an operator of main would have written.
    let selector = if std::env::var_os("KEYHOLE_TEST_BIN").is_some() { "docker" } else { "container" };
    b.ok(&["workload", "add", "w", "--selector", &format!("{selector}:label:{label}")]);
    b.ok(&["grant", "db/password", "--to", "w", "--uid", &NOBODY.to_string()]);
    let c = Pod::start(&["--label", &label, "--name", &t, "-v", &secrets_bind(&b, "w")]);
    let file = b.mount("w").join("password");
    assert_eq!(c.cat("/run/secrets/password").unwrap(), b"spoofed-s3cret", "the real container reads");
    let reads_before = b.audit_events("read").len();

    // A user's delegated subtree, a directory named as Podman names the
    // container's (cgroupfs manager: /libpod_parent/libpod-<id>), on
    // cgroup v2 and on v1.
    let mut outcomes = Vec::new();
    for mount in [V2, "/sys/fs/cgroup/pids"] {
        for leaf in [format!("libpod_parent/libpod-{}", c.id), format!("libpod-{}.scope", c.id)] {
            let (mut cg, top) = Cgroups::made(mount, NOBODY);
            cg.will_hold(&top, &leaf);
            let o = cat_from_delegated(&top, &leaf, &file);
            outcomes.push((format!("{mount} {leaf}"), o));
        }
    }
    // A host process root put in such a cgroup (not delegated): only the
    // namespace check against the container's init tells it apart.
    let (mut cg, top) = Cgroups::made(V2, 0);
    let leaf = format!("libpod_parent/libpod-{}", c.id);
    cg.will_hold(&top, &leaf);
    let cmd = format!(
        "mkdir -p {top}/{leaf} && echo $$ > {top}/{leaf}/cgroup.procs && \
         exec setpriv --reuid {NOBODY} --regid {NOBODY} --clear-groups cat {file}",
        top = top.display(),
        file = file.display()
    );
    outcomes.push(("root-made".into(), Command::new("sh").args(["-c", &cmd]).output().unwrap()));
    drop(cg);

    let leaked: Vec<&String> = outcomes.iter().filter(|(_, o)| o.status.success()).map(|(w, _)| w).collect();
    eprintln!("spoofed libpod cgroups that read the secret: {leaked:?}");
    assert!(leaked.is_empty(), "a spoofed libpod cgroup read the secret: {leaked:?}");
    for (what, o) in &outcomes {
        assert!(stderr(o).contains("Permission denied"), "{what}: {}", stderr(o));
    }
    assert_eq!(b.audit_events("read").len(), reads_before, "a spoofed read was audited");
    for d in b.audit_events("deny") {
        assert!(d["caller"]["container_id"].is_null(), "a deny credits the container: {d}");
        assert_eq!(d["caller"]["uid"], NOBODY, "{d}");
    }
    // The conmon monitor's cgroup names no container.
    let conmon = fs::read_to_string(format!("/proc/{}/cgroup", conmon_of(&c))).unwrap();
    assert!(!conmon.contains(&c.id), "conmon's cgroup names the container: {conmon}");
    b.assert_never_leaked(&[b"spoofed-s3cret"]);
}

/// The pid of the conmon that monitors `c`.
fn conmon_of(c: &Pod) -> i32 {
    let o = podman(&["inspect", "--format", "{{.State.ConmonPid}}", &c.id]);
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

#[test]
fn the_broker_restarted_under_running_podman_containers_serves_them_again() {
    if !require_podman() {
        return;
    }
    let svc = PodmanService::start();
    let mut b = Broker::start_with(&svc.runtime_toml());
    let label = format!("keyhole.test={}", unique("pmrestart"));
    b.put("db/password", b"restart-s3cret");
    b.ok(&["workload", "add", "w", "--selector", &format!("container:label:{label}")]);
    b.ok(&["grant", "db/password", "--to", "w"]);
    let c = Pod::start(&["--label", &label, "-v", &secrets_bind(&b, "w")]);
    assert_eq!(c.cat("/run/secrets/password").unwrap(), b"restart-s3cret");
    let short = c.id[..12].to_owned();

    // Killed and started again: the container is known before serving.
    b.kill9();
    let before = b.log().len();
    b.restart();
    let log = b.log()[before..].to_owned();
    let confirmed = log.find(&format!("container confirmed container={short}")).expect("not primed");
    assert!(confirmed < log.find("keyhole is serving").unwrap(), "confirmed only after serving began");
    assert!(log.contains("runtime=podman"), "{log}");
    eventually(10, "the container reads after the restart", || {
        c.cat("/run/secrets/password").ok().as_deref() == Some(b"restart-s3cret")
    });

    // A takeover hands the Podman container over, checked again.
    let before = b.log().len();
    b.takeover();
    let log = b.log()[before..].to_owned();
    assert!(log.contains("containers taken from the predecessor"), "{log}");
    assert!(!log.contains(&format!("asking Podman about a container container={short}")), "{log}");
    assert_eq!(c.cat("/run/secrets/password").unwrap(), b"restart-s3cret");

    // Removed: evicted on Podman's `remove` event; a new one is asked about.
    let id = c.id.clone();
    drop(c);
    let c2 = Pod::start(&["--label", &label, "-v", &secrets_bind(&b, "w")]);
    assert_eq!(c2.cat("/run/secrets/password").unwrap(), b"restart-s3cret");
    let readers: Vec<String> =
        b.audit_events("read").iter().filter_map(|r| r["caller"]["container_id"].as_str().map(str::to_owned)).collect();
    assert!(readers.contains(&id) && readers.contains(&c2.id), "{readers:?}");
    assert!(b.audit_events("deny").is_empty(), "{:?}", b.audit_events("deny"));
}

#[test]
fn podman_and_docker_side_by_side_in_one_broker() {
    if !require_podman() || !require_docker() {
        return;
    }
    let svc = PodmanService::start();
    let toml = format!("{}[[runtime]]\nkind = \"docker\"\n", svc.runtime_toml());
    let b = Broker::start_with(&toml);
    let label = format!("keyhole.test={}", unique("both"));
    b.put("db/password", b"both-s3cret");
    b.ok(&["workload", "add", "any", "--selector", &format!("container:label:{label}")]);
    b.ok(&["workload", "add", "dock", "--selector", &format!("docker:label:{label}")]);
    for w in ["any", "dock"] {
        b.ok(&["grant", "db/password", "--to", w]);
    }
    let p = Pod::start(&["--label", &label, "-v", &secrets_bind(&b, "any")]);
    let d = Container::start(&["--label", &label, "-v", &secrets_bind(&b, "any")]);
    assert_eq!(p.cat("/run/secrets/password").unwrap(), b"both-s3cret", "podman under container:");
    assert_eq!(d.cat("/run/secrets/password").unwrap(), b"both-s3cret", "docker under container:");
    let pd = Pod::start(&["--label", &label, "-v", &secrets_bind(&b, "dock")]);
    let dd = Container::start(&["--label", &label, "-v", &secrets_bind(&b, "dock")]);
    assert_eq!(dd.cat("/run/secrets/password").unwrap(), b"both-s3cret", "docker under docker:");
    assert!(pd.cat("/run/secrets/password").is_err(), "podman under docker: must be denied");
    let log = b.log();
    assert!(
        log.contains(&format!("container confirmed container={} pid={} runtime=podman", &p.id[..12], p.init_pid())),
        "{log}"
    );
    assert!(log.contains(&format!("container confirmed container={}", &d.id[..12])), "{log}");
    let denies = b.audit_events("deny");
    assert_eq!(denies.len(), 1, "{denies:?}");
    assert_eq!(denies[0]["caller"]["container_id"], pd.id.as_str());
    let started = Instant::now();
    drop((p, d, pd, dd));
    eprintln!("containers removed in {:?}", started.elapsed());
}

/// `podman` with `CONTAINERS_CONF` naming a containers.conf of its own.
fn podman_with(conf: &Path, args: &[&str]) -> Output {
    Command::new("podman").args(args).env("CONTAINERS_CONF", conf).stdin(Stdio::null()).output().unwrap()
}

/// Podman volumes of a keyhole plugin, removed on drop (before the
/// broker, which must answer the `Remove`).
struct Volumes<'a> {
    conf: &'a Path,
    names: Vec<String>,
    pods: Vec<String>,
}

impl Drop for Volumes<'_> {
    fn drop(&mut self) {
        for p in &self.pods {
            let _ = podman_with(self.conf, &["rm", "-f", "-t", "0", p]);
        }
        for v in &self.names {
            let _ = podman_with(self.conf, &["volume", "rm", "-f", v]);
        }
    }
}

#[test]
fn podman_volumes_of_two_workloads_each_show_their_own_grants() {
    if !require_podman() {
        return;
    }
    let svc = PodmanService::start();
    let b = Broker::start_with_plugin_config(&svc.runtime_toml());
    // The documented snippet, in a containers.conf of the test's own.
    let conf = svc.dir.path().join("containers.conf");
    let plugin_sock = format!("/run/docker/plugins/{}.sock", b.plugin);
    fs::write(&conf, format!("[engine.volume_plugins]\n{} = \"{plugin_sock}\"\n", b.plugin)).unwrap();
    let t = unique("pmvol");
    b.put("web/token", b"web-volume-s3cret");
    b.put("db/password", b"db-volume-s3cret");
    b.ok(&["workload", "add", "web", "--selector", &format!("container:label:keyhole.test=web-{t}")]);
    b.ok(&["workload", "add", "db", "--selector", &format!("container:label:keyhole.test=db-{t}")]);
    b.ok(&["grant", "web/token", "--to", "web"]);
    b.ok(&["grant", "db/password", "--to", "db"]);
    let (vweb, vdb) = (format!("{t}-web"), format!("{t}-db"));
    let mut vols = Volumes { conf: &conf, names: vec![vweb.clone(), vdb.clone()], pods: Vec::new() };
    for (v, w) in [(&vweb, "web"), (&vdb, "db")] {
        let o = podman_with(&conf, &["volume", "create", "--driver", &b.plugin, "-o", &format!("workload={w}"), v]);
        assert!(o.status.success(), "podman volume create: {}", stderr(&o));
    }
    // A bad option is refused by the broker, through Podman.
    vols.names.push(format!("{t}-bad"));
    let bad =
        podman_with(&conf, &["volume", "create", "--driver", &b.plugin, "-o", "workload=nope", &format!("{t}-bad")]);
    assert!(!bad.status.success(), "a volume of a missing workload was made");
    assert!(stderr(&bad).contains("workload nope does not exist"), "{}", stderr(&bad));

    let run = |label: &str, vol: &str| -> String {
        let started = Instant::now();
        let o = podman_with(
            &conf,
            &[
                "run",
                "-d",
                "--rm",
                "--ulimit",
                "nofile=4096:4096",
                "--ulimit",
                "nproc=4096:4096",
                "--label",
                &format!("keyhole.test={label}"),
                "-v",
                &format!("{vol}:/run/secrets"),
                PODMAN_IMAGE,
                "sleep",
                "3600",
            ],
        );
        assert!(o.status.success(), "podman run: {}", stderr(&o));
        // Well inside Podman's 5 s plugin timeout: no call back into it.
        assert!(started.elapsed() < Duration::from_secs(4), "the start took {:?}", started.elapsed());
        String::from_utf8(o.stdout).unwrap().trim().to_owned()
    };
    let web = run(&format!("web-{t}"), &vweb);
    vols.pods.push(web.clone());
    let db = run(&format!("db-{t}"), &vdb);
    vols.pods.push(db.clone());
    // A second container of the same volume: Podman mounts it once.
    let web2 = run(&format!("web-{t}"), &vweb);
    vols.pods.push(web2.clone());
    // A db container on the web volume: mounted, and denied at open.
    let intruder = run(&format!("db-{t}"), &vweb);
    vols.pods.push(intruder.clone());

    let cat = |id: &str, f: &str| podman(&["exec", id, "cat", &format!("/run/secrets/{f}")]);
    for id in [&web, &web2] {
        let o = cat(id, "token");
        assert!(o.status.success(), "web reads its token: {}", stderr(&o));
        assert_eq!(o.stdout, b"web-volume-s3cret");
        assert!(!cat(id, "password").status.success(), "the web volume shows db's password");
    }
    let o = cat(&db, "password");
    assert!(o.status.success(), "db reads its password: {}", stderr(&o));
    assert_eq!(o.stdout, b"db-volume-s3cret");
    assert!(!cat(&db, "token").status.success(), "the db volume shows web's token");
    let o = cat(&intruder, "token");
    assert!(!o.status.success() && stderr(&o).contains("Permission denied"), "{}", stderr(&o));
    let denies = b.audit_events("deny");
    assert_eq!(denies.len(), 1, "{denies:?}");
    assert_eq!(denies[0]["caller"]["container_id"], intruder.as_str());

    // Two volumes, two mounts, whatever one id Podman sends.
    let mounts = b.audit_events("volume_mount");
    let mounted: std::collections::BTreeSet<&str> = mounts.iter().filter_map(|m| m["path"].as_str()).collect();
    assert_eq!(mounted, [vdb.as_str(), vweb.as_str()].into_iter().collect(), "{mounts:?}");

    // Rotation seen in the volume of a running container.
    b.put("web/token", b"web-volume-rotated");
    eventually(5, "the rotated token in the volume", || cat(&web, "token").stdout == b"web-volume-rotated");

    // Podman unmounts when the last container of a volume stops.
    for id in [&web, &web2, &intruder] {
        let _ = podman_with(&conf, &["rm", "-f", "-t", "0", id]);
    }
    eventually(10, "the web volume unmounted", || !b.audit_events("volume_unmount").is_empty());
    let o = cat(&db, "password");
    assert_eq!(o.stdout, b"db-volume-s3cret", "db's mount outlives web's: {}", stderr(&o));
    drop(vols);
    eventually(10, "both volumes removed", || b.audit_events("volume_remove").len() == 2);
    b.assert_never_leaked(&[b"web-volume-s3cret", b"db-volume-s3cret", b"web-volume-rotated"]);
}

/// A stand-in for systemd's socket activation: binds the admin, workload
/// and plugin sockets, holds them, and starts the broker (argv after the
/// three paths) with them as fds 3-5 (`LISTEN_FDS`, `LISTEN_FDNAMES`,
/// `LISTEN_PID`), again 2 s after each exit (`Restart=`, `RestartSec=2`),
/// until the file `stop` exists next to this script.
const STANDIN: &str = r#"
import fcntl, os, socket, sys, time
paths, argv = sys.argv[1:4], sys.argv[4:]
stop = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stop")
socks = []
for p, mode in zip(paths, [0o600, 0o666, 0o600]):
    try: os.unlink(p)
    except FileNotFoundError: pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.bind(p); os.chmod(p, mode); s.listen(128); socks.append(s)
while not os.path.exists(stop):
    pid = os.fork()
    if pid == 0:
        high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 20) for s in socks]
        for i, h in enumerate(high):
            os.dup2(h, 3 + i, inheritable=True); os.close(h)
        os.environ.update(LISTEN_FDS="3", LISTEN_FDNAMES="admin:workload:plugin", LISTEN_PID=str(os.getpid()))
        os.execv(argv[0], argv)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    time.sleep(2)
"#;

/// The stand-in and the broker it runs, stopped however the test ends.
struct StandIn {
    child: Child,
    stop: PathBuf,
    /// The broker it started last.
    last: i32,
}

impl StandIn {
    fn stop(&mut self) {
        let _ = fs::write(&self.stop, b"");
        if self.last > 0 {
            signal(self.last, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = fs::write(&self.stop, b"");
            let _ = self.child.kill();
            let _ = self.child.wait();
            if self.last > 0 {
                signal(self.last, libc::SIGKILL);
            }
        }
    }
}

#[test]
fn with_systemd_holding_the_sockets_a_broker_restart_stalls_no_volume_create() {
    if !require_docker() {
        return;
    }
    let mut b = Broker::start_with_plugin();
    assert!(b.terminate().success());
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("standin.py");
    fs::write(&script, STANDIN).unwrap();
    let plugin_sock = PathBuf::from(format!("/run/docker/plugins/{}.sock", b.plugin));
    let standin = Command::new("python3")
        .arg(&script)
        .arg(b.socket())
        .arg(b.workload_socket())
        .arg(&plugin_sock)
        .arg(BIN)
        .args(b.serve_args())
        .env("KEYHOLE_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(b.log_file())
        .spawn()
        .unwrap();
    let mut standin = StandIn { child: standin, stop: dir.path().join("stop"), last: 0 };
    let mut pids = std::io::BufReader::new(standin.child.stdout.take().unwrap());
    let mut next_pid = || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut pids, &mut line).unwrap();
        line.trim().parse::<i32>().unwrap_or_else(|_| panic!("the stand-in said {line:?}"))
    };
    let first = next_pid();
    standin.last = first;
    eventually(30, "the activated broker answers", || b.cli(&["status"]).status.success());
    assert!(b.log().contains("listening on a socket systemd holds"), "{}", b.log());
    b.put("db/password", b"held-s3cret");
    b.ok(&["workload", "add", "w", "--selector", "docker:label:x=y"]);
    let vol = |n: &str| format!("{}-{n}", b.plugin);
    let create = |v: &str, driver: &str| {
        let started = Instant::now();
        let mut args = vec!["volume", "create", "-d", driver];
        if driver != "local" {
            args.extend(["-o", "workload=w"]);
        }
        args.push(v);
        let o = Command::new("timeout").arg("30").arg("docker").args(&args).output().unwrap();
        (o, started.elapsed())
    };
    let (o, _) = create(&vol("a"), &b.plugin);
    assert!(o.status.success(), "{}", stderr(&o));

    // The broker crashes: systemd (the stand-in) holds its sockets and
    // starts it again 2 s later. A volume create meanwhile waits for the
    // new broker instead of failing; a local volume does not wait at all.
    signal(first, libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(200));
    let (local, local_took) = create(&vol("local"), "local");
    let (held, held_took) = create(&vol("b"), &b.plugin);
    let second = next_pid();
    standin.last = second;
    eprintln!("while the broker was down: a local volume in {local_took:?}, a keyhole volume in {held_took:?}");
    assert!(local.status.success(), "{}", stderr(&local));
    assert!(local_took < Duration::from_secs(5), "a local volume stalled {local_took:?}");
    assert!(held.status.success(), "the keyhole volume create failed across the restart: {}", stderr(&held));
    assert!(held_took < Duration::from_secs(20), "took {held_took:?}");
    assert_ne!(first, second);
    // The sockets were never unbound: the paths are the stand-in's still.
    assert!(plugin_sock.exists() && b.socket().exists());
    for v in [vol("a"), vol("b"), vol("local")] {
        let _ = docker(&["volume", "rm", "-f", &v]);
    }
    standin.stop();
    // A clean stop leaves systemd's sockets in place.
    assert!(plugin_sock.exists(), "the broker removed the socket systemd holds");
}

/// The stall itself: a dead socket in /run/docker/plugins makes dockerd
/// wait on `docker volume ls` (every driver is asked; ~100 s on Debian's
/// 20.10), and on every volume create once dockerd has used that plugin.
/// Measured with a short timeout; it stalls the shared dockerd, so it
/// runs alone.
#[test]
#[ignore = "stalls dockerd for every volume create: scripts/test.sh runs it alone"]
fn a_dead_plugin_socket_stalls_docker_volume_ls() {
    if !require_docker() {
        return;
    }
    let name = unique("kh-dead");
    let path = format!("/run/docker/plugins/{name}.sock");
    fs::create_dir_all("/run/docker/plugins").unwrap();
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // bound, then closed: dead
    let started = Instant::now();
    let o = Command::new("timeout").args(["5", "docker", "volume", "ls"]).output().unwrap();
    let took = started.elapsed();
    let _ = fs::remove_file(&path);
    eprintln!("docker volume ls with a dead plugin socket: {:?} after {took:?}", o.status.code());
    assert_eq!(o.status.code(), Some(124), "it did not stall: {}", stderr(&o));
}
