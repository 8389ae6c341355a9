//! Attestation from the runtime's ground truth: a cgroup named for a
//! container is a claim, not a proof. A user with a delegated (writable)
//! cgroup subtree names a directory `docker-<id>.scope` and moves into
//! it; a host process put in a cgroup named for a real container by root
//! is still not that container. Real containers (`docker run`, `docker
//! exec`, `--pid host`) still read their grants, and an unknown id costs
//! one Docker inspect per negative-cache period, not one per open.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::*;

const NOBODY: u32 = 65534;
/// An id no container has.
const FAKE: &str = "0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de";

/// Cgroup directories made for a test, removed (deepest first) on drop.
struct Cgroups(Vec<PathBuf>);

impl Cgroups {
    /// A fresh directory under the hierarchy mounted at `mount`, owned by
    /// `NOBODY` as systemd's `Delegate=yes` would leave it.
    fn delegated(mount: &str) -> (Cgroups, PathBuf) {
        let dir = Path::new(mount).join(unique("khattest"));
        std::fs::create_dir(&dir).unwrap();
        let mut chown = vec![dir.clone()];
        for f in ["cgroup.procs", "cgroup.threads", "cgroup.subtree_control", "tasks"] {
            if dir.join(f).exists() {
                chown.push(dir.join(f));
            }
        }
        let o = Command::new("chown").arg(NOBODY.to_string()).args(&chown).output().unwrap();
        assert!(o.status.success(), "chown: {}", stderr(&o));
        (Cgroups(vec![dir.clone()]), dir)
    }

    /// A root-owned directory under the cgroup v2 mount.
    fn root_owned() -> (Cgroups, PathBuf) {
        let dir = Path::new(V2).join(unique("khattest"));
        std::fs::create_dir(&dir).unwrap();
        (Cgroups(vec![dir.clone()]), dir)
    }

    /// Remember `rel` (and its parents) under `top` for removal.
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
            // The processes in it have exited; their cgroup may lag a moment.
            for _ in 0..50 {
                if !d.exists() || std::fs::remove_dir(d).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

const V2: &str = "/sys/fs/cgroup/unified";

/// As root, move a shell into `top`; then, as `NOBODY`, make `top/leaf`,
/// move into it and `cat file` (the reproduction).
fn cat_from_delegated(top: &Path, leaf: &str, file: &Path) -> Output {
    let (top, file) = (top.display(), file.display());
    let inner = format!("mkdir -p {top}/{leaf} && echo $$ > {top}/{leaf}/cgroup.procs && exec cat {file}");
    let outer = format!(
        "echo $$ > {top}/cgroup.procs && exec setpriv --reuid {NOBODY} --regid {NOBODY} --clear-groups sh -c '{inner}'"
    );
    Command::new("sh").args(["-c", &outer]).output().unwrap()
}

/// As root, make `top/leaf` and move a shell into it; then `cat file` as
/// `NOBODY` (a host process in a cgroup named for a container).
fn cat_from_root_made(top: &Path, leaf: &str, file: &Path) -> Output {
    let (top, file) = (top.display(), file.display());
    let cmd = format!(
        "mkdir -p {top}/{leaf} && echo $$ > {top}/{leaf}/cgroup.procs && \
         exec setpriv --reuid {NOBODY} --regid {NOBODY} --clear-groups cat {file}"
    );
    Command::new("sh").args(["-c", &cmd]).output().unwrap()
}

/// The broker under test; `KEYHOLE_TEST_BIN` runs another build (e.g.
/// main's, to see each attack succeed there).
fn broker() -> Broker {
    match std::env::var("KEYHOLE_TEST_BIN") {
        Ok(bin) => Broker::start_from(Path::new(&bin), &[]),
        Err(_) => Broker::start(),
    }
}

fn secrets_bind(b: &Broker, workload: &str) -> String {
    format!("{}:/run/secrets:ro,rslave", b.mount(workload).display())
}

/// Every deny line credits no container, and no read happened.
fn assert_denied_uncredited(b: &Broker, o: &Output, what: &str) {
    assert!(!o.status.success(), "{what}: the forged caller read the secret");
    assert!(stderr(o).contains("Permission denied"), "{what}: {}", stderr(o));
    assert!(b.audit_events("read").is_empty(), "{what}: a read was audited");
    let denies = b.audit_events("deny");
    assert!(!denies.is_empty(), "{what}: no deny line");
    for d in &denies {
        assert!(d["caller"]["container_id"].is_null(), "{what}: the deny credits a container: {d}");
        assert!(d["caller"]["container_name"].is_null(), "{what}: the deny names a container: {d}");
        assert_eq!(d["caller"]["uid"], NOBODY, "{what}: {d}");
    }
}

#[test]
fn a_delegated_cgroup_cannot_pose_as_a_container_by_id() {
    needs!(docker);
    let b = broker();
    b.put("db/password", b"by-id-s3cret");
    b.ok(&["workload", "add", "w", "--selector", &format!("docker:id:{FAKE}")]);
    b.ok(&["grant", "db/password", "--to", "w", "--uid", &NOBODY.to_string()]);
    let file = b.mount("w").join("password");

    for leaf in [format!("docker-{FAKE}.scope"), format!("libpod-{FAKE}")] {
        let (mut cg, top) = Cgroups::delegated(V2);
        cg.will_hold(&top, &leaf);
        let o = cat_from_delegated(&top, &leaf, &file);
        assert_denied_uncredited(&b, &o, &format!("v2 {leaf}"));
    }
    // cgroup v1, `/docker/<id>` as the cgroupfs driver makes it.
    let (mut cg, top) = Cgroups::delegated("/sys/fs/cgroup/pids");
    let leaf = format!("docker/{FAKE}");
    cg.will_hold(&top, &leaf);
    let o = cat_from_delegated(&top, &leaf, &file);
    assert_denied_uncredited(&b, &o, "v1 /docker/<id>");
    drop(cg);

    // Refused before Docker is ever asked: a stranger cannot make the
    // broker call Docker by inventing ids.
    let log = b.log();
    assert!(log.contains("delegated cgroup is ignored"), "no warning for the delegated claim");
    assert!(!log.contains(&format!("asking Docker about a container container={}", &FAKE[..12])), "Docker was asked");
    b.assert_never_leaked(&[b"by-id-s3cret"]);
}

#[test]
fn a_delegated_cgroup_cannot_pose_as_a_running_container() {
    needs!(docker);
    let b = broker();
    let t = unique("pose");
    b.put("db/password", b"by-label-s3cret");
    let c = Container::start(&["--label", &format!("keyhole.test={t}"), "--name", &t]);
    b.ok(&["workload", "add", "w", "--selector", &format!("docker:label:keyhole.test={t}")]);
    b.ok(&["workload", "add", "n", "--selector", &format!("docker:name:{t}")]);
    for w in ["w", "n"] {
        b.ok(&["grant", "db/password", "--to", w, "--uid", &NOBODY.to_string()]);
    }
    for w in ["w", "n"] {
        let file = b.mount(w).join("password");
        let leaf = format!("docker-{}.scope", c.id);
        let (mut cg, top) = Cgroups::delegated(V2);
        cg.will_hold(&top, &leaf);
        let o = cat_from_delegated(&top, &leaf, &file);
        assert_denied_uncredited(&b, &o, &format!("workload {w}"));
    }
    b.assert_never_leaked(&[b"by-label-s3cret"]);
}

#[test]
fn a_host_process_in_a_cgroup_named_for_a_container_is_not_that_container() {
    needs!(docker);
    // Root names the cgroup here (not delegated): only the namespace check
    // against the container's init tells the host process from it.
    let b = broker();
    let t = unique("ns");
    b.put("db/password", b"ns-s3cret");
    b.ok(&["workload", "add", "w", "--selector", &format!("docker:label:keyhole.test={t}")]);
    let c = Container::start(&["--label", &format!("keyhole.test={t}"), "-v", &secrets_bind(&b, "w")]);
    b.ok(&["grant", "db/password", "--to", "w", "--uid", &NOBODY.to_string()]);
    let leaf = format!("docker-{}.scope", c.id);
    let (mut cg, top) = Cgroups::root_owned();
    cg.will_hold(&top, &leaf);
    let o = cat_from_root_made(&top, &leaf, &b.mount("w").join("password"));
    assert_denied_uncredited(&b, &o, "root-made cgroup");
    let reason = b.audit_events("deny")[0]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("namespaces"), "{reason}");
    // The container itself still reads.
    assert_eq!(c.cat("/run/secrets/password").unwrap(), b"ns-s3cret");
    b.assert_never_leaked(&[b"ns-s3cret"]);
}

#[test]
fn an_unknown_container_id_costs_one_inspect_per_negative_ttl() {
    needs!(docker);
    let b = broker();
    b.put("db/password", b"neg-s3cret");
    b.ok(&["workload", "add", "w", "--selector", &format!("docker:id:{FAKE}")]);
    b.ok(&["grant", "db/password", "--to", "w", "--uid", &NOBODY.to_string()]);
    let leaf = format!("docker-{FAKE}.scope");
    let (mut cg, top) = Cgroups::root_owned();
    cg.will_hold(&top, &leaf);
    let started = std::time::Instant::now();
    for _ in 0..5 {
        let o = cat_from_root_made(&top, &leaf, &b.mount("w").join("password"));
        assert!(!o.status.success() && stderr(&o).contains("Permission denied"), "{}", stderr(&o));
    }
    assert!(started.elapsed().as_secs() < 5, "the opens outlived the negative cache: {:?}", started.elapsed());
    let log = b.log();
    let asked =
        log.lines().filter(|l| l.contains("asking Docker about a container") && l.contains(&FAKE[..12])).count();
    let mine: Vec<&str> = log.lines().filter(|l| l.contains(&FAKE[..12]) && !l.contains("h2::")).collect();
    // One per negative TTL, not one per open. An inspect that overlaps a
    // container start (another test's: the broker sees its event) stores
    // no negative answer, so the next open asks once more.
    assert!((1..=2).contains(&asked), "{asked} inspects for 5 opens: {mine:#?}");
    // The first denial in full, the rest summed up within a second.
    assert_eq!(b.audit_events("deny").len(), 1);
    eventually(5, "the other four denials summed up", || b.denials() == 5);
    assert!(b.audit_events("read").is_empty());
}

#[test]
fn real_containers_read_through_run_exec_and_pid_host() {
    needs!(docker);
    let b = broker();
    let t = unique("real");
    b.put("db/password", b"real-s3cret");
    b.ok(&["workload", "add", "w", "--selector", &format!("docker:label:keyhole.test={t}")]);
    b.ok(&["grant", "db/password", "--to", "w"]);
    let label = format!("keyhole.test={t}");

    // The first read of a container that has just started.
    let o = docker(&[
        "run",
        "--rm",
        "--label",
        &label,
        "-v",
        &secrets_bind(&b, "w"),
        IMAGE,
        "cat",
        "/run/secrets/password",
    ]);
    assert!(o.status.success(), "docker run cat: {}", stderr(&o));
    assert_eq!(o.stdout, b"real-s3cret");

    // `docker exec` shares the container's namespaces.
    let c = Container::start(&["--label", &label, "-v", &secrets_bind(&b, "w")]);
    assert_eq!(c.cat("/run/secrets/password").unwrap(), b"real-s3cret");

    // --pid host: the host's pid namespace, its own mount namespace.
    let sock = format!("{}:/run/keyhole/workload.sock", b.workload_socket().display());
    let bin = format!("{BIN}:/usr/local/bin/keyhole:ro");
    let p = Container::start(&[
        "--pid",
        "host",
        "--label",
        &label,
        "-v",
        &secrets_bind(&b, "w"),
        "-v",
        &sock,
        "-v",
        &bin,
        "-v",
        "/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu:ro",
        "-v",
        "/lib64:/lib64:ro",
    ]);
    assert_eq!(p.cat("/run/secrets/password").unwrap(), b"real-s3cret");
    let o = p.exec(&["/usr/local/bin/keyhole", "--socket", "/run/keyhole/workload.sock", "whoami", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let w = json(&o.stdout);
    assert_eq!(w["container_id"], p.id.as_str());
    assert_eq!(w["host_process"], false);
    assert_eq!(w["admin"], false);

    let readers: Vec<String> =
        b.audit_events("read").iter().map(|r| r["caller"]["container_id"].as_str().unwrap_or("").to_owned()).collect();
    assert!(readers.contains(&c.id) && readers.contains(&p.id), "{readers:?}");
    assert!(b.audit_events("deny").is_empty(), "{:?}", b.audit_events("deny"));
}

#[test]
fn running_containers_are_known_before_serving_and_across_a_takeover() {
    needs!(docker);
    let mut b = broker();
    let label = format!("keyhole.test={}", unique("prime"));
    b.put("db/password", b"primed-s3cret");
    b.ok(&["workload", "add", "w", "--selector", &format!("docker:label:{label}")]);
    b.ok(&["grant", "db/password", "--to", "w"]);
    let c = Container::start(&["--label", &label, "-v", &secrets_bind(&b, "w")]);
    assert_eq!(c.cat("/run/secrets/password").unwrap(), b"primed-s3cret");
    let short = &c.id[..12];

    // A broker starting while the container runs knows it before serving.
    assert!(b.terminate().success());
    let before = b.log().len();
    b.restart();
    let log = b.log()[before..].to_owned();
    let confirmed = log.find(&format!("container confirmed container={short}")).expect("not primed");
    assert!(confirmed < log.find("keyhole is serving").unwrap(), "confirmed only after serving began");
    assert_eq!(c.cat("/run/secrets/password").unwrap(), b"primed-s3cret");

    // A successor takes the predecessor's containers and checks them
    // again, without asking Docker about them.
    let before = b.log().len();
    b.takeover();
    let log = b.log()[before..].to_owned();
    assert!(log.contains("containers taken from the predecessor"), "{log}");
    assert!(!log.contains(&format!("asking Docker about a container container={short}")), "{log}");
    assert_eq!(c.cat("/run/secrets/password").unwrap(), b"primed-s3cret");
    let reads = b.audit_events("read");
    assert!(reads.iter().all(|r| r["caller"]["container_id"] == c.id.as_str()), "{reads:?}");
}
