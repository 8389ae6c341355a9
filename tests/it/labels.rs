//! What a container's labels prove, and what a host user of the same uid
//! can still do. A label baked into an image (`LABEL role=db`) is the
//! image author's word, not the operator's: Docker merges it into the
//! container's labels, but it never satisfies a `docker:label:` selector.
//! A host user whose uid:gid equal a container user's can take that
//! container's open secret file with `pidfd_getfd` unless Yama forbids
//! it: `keyhole doctor` warns about it, and this suite shows it.

use std::process::{Command, Output, Stdio};

use crate::support::*;

fn secrets_bind(b: &Broker, workload: &str) -> String {
    format!("{}:/run/secrets:ro,rslave", b.mount(workload).display())
}

/// An image built with `docker build` from the test image, carrying
/// `labels`; removed on drop.
struct Image(String);

impl Image {
    fn build(labels: &[(&str, &str)]) -> Image {
        let name = format!("keyhole-test/labelled:{}", unique("img").to_lowercase());
        let mut dockerfile = format!("FROM {IMAGE}\n");
        for (k, v) in labels {
            dockerfile.push_str(&format!("LABEL {k}=\"{v}\"\n"));
        }
        let mut child = Command::new("docker")
            .args(["build", "-q", "-t", &name, "-"])
            .env("DOCKER_BUILDKIT", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), dockerfile.as_bytes()).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "docker build: {}", stderr(&o));
        Image(name)
    }

    /// `docker run -d --rm` of this image with `args`, sleeping.
    fn start(&self, args: &[&str]) -> Container {
        let mut all = vec!["run", "-d", "--rm"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[self.0.as_str(), "sleep", "3600"]);
        let o = docker(&all);
        assert!(o.status.success(), "docker run: {}", stderr(&o));
        Container { id: String::from_utf8(o.stdout).unwrap().trim().to_owned() }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "-f", &self.0]);
    }
}

fn labels_of(c: &Container) -> serde_json::Value {
    let o = docker(&["inspect", "--format", "{{json .Config.Labels}}", &c.id]);
    json(&o.stdout)
}

fn denied(b: &Broker, c: &Container, what: &str) {
    let before = b.audit_events("deny").len();
    let err = c.cat("/run/secrets/password").expect_err(what);
    assert!(err.contains("Permission denied"), "{what}: {err}");
    let denies = b.audit_events("deny");
    assert_eq!(denies.len(), before + 1, "{what}: one deny line");
    assert_eq!(denies[before]["caller"]["container_id"], c.id.as_str(), "{what}: {}", denies[before]);
}

#[test]
fn a_label_baked_into_the_image_does_not_make_a_workload() {
    needs!(docker);
    let b = Broker::start();
    let role = unique("db");
    b.put("db/password", b"image-label-s3cret");
    b.ok(&["workload", "add", "db", "--selector", &format!("docker:label:keyhole.role={role}")]);
    b.ok(&["grant", "db/password", "--to", "db"]);
    let img = Image::build(&[("keyhole.role", &role), ("keyhole.other", "x")]);

    // The image author's label, merged into the container's by Docker:
    // same directory, no label of the operator's: denied.
    let c = img.start(&["-v", &secrets_bind(&b, "db")]);
    assert_eq!(labels_of(&c)["keyhole.role"], role.as_str(), "Docker merges the image's labels");
    denied(&b, &c, "image label only");

    // The operator sets the very same pair: Docker cannot tell it from the
    // image's, so it does not count either (documented).
    let same = img.start(&["--label", &format!("keyhole.role={role}"), "-v", &secrets_bind(&b, "db")]);
    denied(&b, &same, "operator label equal to the image's");

    // The operator overrides the image's value: that label is the
    // operator's, and counts.
    let mine = unique("mine");
    b.ok(&["workload", "add", "mine", "--selector", &format!("docker:label:keyhole.role={mine}")]);
    b.ok(&["grant", "db/password", "--to", "mine"]);
    let over = img.start(&["--label", &format!("keyhole.role={mine}"), "-v", &secrets_bind(&b, "mine")]);
    assert_eq!(over.cat("/run/secrets/password").unwrap(), b"image-label-s3cret");

    // The image still names its containers for `docker:image:`.
    b.ok(&["workload", "add", "byimage", "--selector", &format!("docker:image:{}", img.0)]);
    b.ok(&["grant", "db/password", "--to", "byimage"]);
    let by_image = img.start(&["-v", &secrets_bind(&b, "byimage")]);
    assert_eq!(by_image.cat("/run/secrets/password").unwrap(), b"image-label-s3cret");

    // The plain test image, labelled by the operator at run time, reads.
    let plain = Container::start(&["--label", &format!("keyhole.role={role}"), "-v", &secrets_bind(&b, "db")]);
    assert_eq!(plain.cat("/run/secrets/password").unwrap(), b"image-label-s3cret");

    let reads: Vec<String> =
        b.audit_events("read").iter().map(|r| r["caller"]["container_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(reads, [over.id.clone(), by_image.id.clone(), plain.id.clone()]);
    b.assert_never_leaked(&[b"image-label-s3cret"]);
}

#[test]
fn image_labels_stay_out_across_a_takeover() {
    needs!(docker);
    let mut b = Broker::start();
    let role = unique("tk");
    b.put("db/password", b"takeover-label-s3cret");
    b.ok(&["workload", "add", "db", "--selector", &format!("docker:label:keyhole.role={role}")]);
    b.ok(&["grant", "db/password", "--to", "db"]);
    let img = Image::build(&[("keyhole.role", &role)]);
    let c = img.start(&["-v", &secrets_bind(&b, "db")]);
    denied(&b, &c, "before the takeover");
    // The successor takes the cache over: still no image labels in it.
    b.takeover();
    denied(&b, &c, "after the takeover");
    b.assert_never_leaked(&[b"takeover-label-s3cret"]);
}

fn doctor_text(b: &Broker) -> Output {
    let cfg = b.config.clone().unwrap();
    let (state, run) = (b.state(), b.run());
    let args =
        ["--config", cfg.to_str().unwrap(), "--state-dir", state.to_str().unwrap(), "--run-dir", run.to_str().unwrap()];
    Command::new(BIN).arg("doctor").args(args).output().unwrap()
}

/// Yama's `ptrace_scope`, if the kernel has Yama.
fn ptrace_scope() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok().and_then(|s| s.trim().parse().ok())
}

#[test]
fn doctor_warns_when_same_uid_host_users_can_take_a_containers_fds() {
    needs!(root);
    let b = Broker::start();
    let o = doctor_text(&b);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "a warning alone does not fail doctor: {text}{}", stderr(&o));
    let line = text.lines().find(|l| l.contains("  ptrace ")).unwrap_or_else(|| panic!("no ptrace check: {text}"));
    match ptrace_scope() {
        None | Some(0) => {
            assert!(line.starts_with("WARN  ptrace"), "{text}");
            assert!(line.contains("same uid:gid") && line.contains("pidfd_getfd"), "{text}");
            let fix = text.lines().skip_while(|l| !l.starts_with("WARN  ptrace")).nth(1).unwrap_or_default();
            for word in ["kernel.yama.ptrace_scope=1", "userns-remap", "uids no host account uses"] {
                assert!(fix.contains(word), "fix names {word}: {text}");
            }
        }
        Some(_) => assert!(line.starts_with("ok    ptrace"), "{text}"),
    }
    // The JSON form carries it too, as a warning that keeps `ok`.
    let cfg = b.config.clone().unwrap();
    let o = Command::new(BIN).args(["doctor", "--json", "--config", cfg.to_str().unwrap()]).output().unwrap();
    let r = json(&o.stdout);
    let check = r["checks"].as_array().unwrap().iter().find(|c| c["check"] == "ptrace").cloned().unwrap();
    let want = if matches!(ptrace_scope(), None | Some(0)) { "warn" } else { "ok" };
    assert_eq!(check["status"], want, "{r:#}");
}

/// As host uid `uid`, take fd `fd` of process `pid` with pidfd_getfd
/// (syscall 438) and print what it reads.
const GETFD: &str = r#"
import ctypes, os, sys
pid, fd = int(sys.argv[1]), int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(pid)
got = libc.syscall(438, pidfd, fd, 0)
if got < 0:
    e = ctypes.get_errno()
    sys.stderr.write("pidfd_getfd: " + os.strerror(e) + "\n")
    sys.exit(3)
os.lseek(got, 0, 0)
sys.stdout.write(os.read(got, 4096).decode())
"#;

/// The residual risk, shown: a host user whose uid:gid are the container
/// user's takes the container's open secret file, without ever opening it
/// (no audit line of its own), unless Yama's ptrace_scope forbids it.
/// `doctor` says so on this host.
#[test]
fn a_same_uid_host_user_can_take_an_open_secret_without_yama() {
    needs!(docker);
    let b = Broker::start();
    let t = unique("getfd");
    b.put("db/password", b"pidfd-getfd-s3cret");
    b.ok(&["workload", "add", "w", "--selector", &format!("docker:label:keyhole.test={t}")]);
    b.ok(&["grant", "db/password", "--to", "w", "--uid", "1000", "--gid", "1000"]);
    let c = Container::run(
        &["--user", "1000:1000", "--label", &format!("keyhole.test={t}"), "-v", &secrets_bind(&b, "w")],
        &["sh", "-c", "exec 3</run/secrets/password; exec sleep 3600"],
    );
    let o = docker(&["inspect", "--format", "{{.State.Pid}}", &c.id]);
    let pid = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    eventually(10, "the container to hold the secret open", || {
        std::fs::read_link(format!("/proc/{pid}/fd/3")).is_ok_and(|p| p.ends_with("password"))
    });
    let reads_before = b.audit_events("read").len();
    let o = run_as(1000, &["/usr/bin/python3", "-c", GETFD, &pid, "3"]);
    match ptrace_scope() {
        None | Some(0) => {
            assert!(o.status.success(), "pidfd_getfd as uid 1000: {}", stderr(&o));
            assert_eq!(o.stdout, b"pidfd-getfd-s3cret", "the host user read the container's open file");
            // Nothing in the audit log names the host user.
            assert_eq!(b.audit_events("read").len(), reads_before);
            let text = String::from_utf8_lossy(&doctor_text(&b).stdout).into_owned();
            let warning = text.lines().find(|l| l.starts_with("WARN  ptrace")).unwrap_or_default();
            // ... and names the container running as a host account's uid.
            let name = docker(&["inspect", "--format", "{{.Name}}", &c.id]);
            let name = String::from_utf8(name.stdout).unwrap().trim().trim_start_matches('/').to_owned();
            assert!(warning.contains(&format!("{name} (uid 1000, host user ")), "doctor warns on this host: {text}");
        }
        Some(_) => assert_eq!(o.status.code(), Some(3), "Yama refuses: {}", stderr(&o)),
    }
    // Another uid cannot, Yama or not.
    let o = run_as(1001, &["/usr/bin/python3", "-c", GETFD, &pid, "3"]);
    assert_eq!(o.status.code(), Some(3), "uid 1001: {}", stderr(&o));
}
