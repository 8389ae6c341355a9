//! The repo's docker-compose.yml, as written: the broker as a sidecar, an
//! app reading its secret, rotation with SIGHUP, and a clean `down`.

use std::process::{Command, Output, Stdio};

use crate::support::*;

const COMPOSE_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml");
const BROKER_IMAGE: &str = "keyhole:0.2.0";

/// `docker compose` v2 and the broker image (scripts/image.sh) are needed.
fn require_compose() -> bool {
    if !require_docker() {
        return false;
    }
    let compose = Command::new("docker").args(["compose", "version"]).output().is_ok_and(|o| o.status.success());
    let image = docker(&["image", "inspect", BROKER_IMAGE]).status.success();
    if compose && image {
        // The compose file pins busybox:1.36.1; no registry here, so the
        // locally imported busybox stands in for it.
        return docker(&["tag", IMAGE, "busybox:1.36.1"]).status.success();
    }
    let missing = if compose { "the keyhole:0.2.0 image (scripts/image.sh)" } else { "docker compose v2" };
    assert!(std::env::var_os("CI").is_none(), "CI=true but {missing} is missing");
    eprintln!("SKIPPED: {missing} is missing (scripts/test.sh provides it)");
    false
}

/// A compose project on a private, shared run dir; `down` on drop.
struct Stack {
    project: String,
    run_dir: tempfile::TempDir,
}

impl Stack {
    fn up() -> Stack {
        let run_dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(run_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        // The host set-up the compose file asks for, in a temp dir.
        std::fs::create_dir_all(run_dir.path().join("workloads/demo")).unwrap();
        std::fs::create_dir_all(run_dir.path().join("state")).unwrap();
        let p = run_dir.path().to_str().unwrap();
        for args in [&["--bind", p, p][..], &["--make-rshared", p]] {
            assert!(Command::new("mount").args(args).status().unwrap().success());
        }
        let s = Stack { project: unique("khcompose"), run_dir };
        let o = s.compose(&["up", "-d"], None);
        assert!(o.status.success(), "compose up: {}", String::from_utf8_lossy(&o.stderr));
        s
    }

    fn compose(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut c = Command::new("docker");
        c.args(["compose", "-f", COMPOSE_FILE, "-p", &self.project])
            .args(args)
            .env("KEYHOLE_RUN_DIR", self.run_dir.path())
            .env("KEYHOLE_STATE_DIR", self.run_dir.path().join("state"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(b) = stdin {
            std::io::Write::write_all(&mut input, b).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// The keyhole CLI inside the sidecar (an admin there).
    fn keyhole(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut all = vec!["exec", "-T", "keyhole", "/keyhole"];
        all.extend_from_slice(args);
        self.compose(&all, stdin)
    }

    fn app_log(&self) -> String {
        String::from_utf8_lossy(&self.compose(&["logs", "--no-log-prefix", "app"], None).stdout).into_owned()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-v"], None);
        detach_mounts_under(self.run_dir.path());
    }
}

#[test]
fn the_compose_sidecar_serves_the_app_and_rotation_reaches_it() {
    needs!(compose);
    let stack = Stack::up();
    eventually(60, "the sidecar answers", || stack.keyhole(&["status"], None).status.success());
    let ok = |o: Output| assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ok(stack.keyhole(&["secret", "put", "db/password", "--stdin"], Some(b"compose-secret-v1")));
    ok(stack.keyhole(&["workload", "add", "demo", "--selector", "docker:label:com.example.app=demo"], None));
    ok(stack.keyhole(&["grant", "db/password", "--to", "demo", "--uid", "1000", "--notify", "HUP"], None));
    // The app, started before its secret existed, reads it (as uid 1000).
    eventually(20, "the app prints its secret", || stack.app_log().contains("compose-secret-v1"));
    ok(stack.keyhole(&["secret", "rotate", "db/password", "--stdin"], Some(b"compose-secret-v2")));
    eventually(20, "the app sees the new value without a restart", || stack.app_log().contains("compose-secret-v2"));
    assert!(stack.app_log().contains("reloaded"), "the app got no SIGHUP:\n{}", stack.app_log());
    // The app is not an admin, even as root and with the socket bound.
    let o = stack.compose(&["exec", "-T", "keyhole", "/keyhole", "whoami", "--json"], None);
    assert_eq!(json(&o.stdout)["admin"], true, "the sidecar's own exec is an admin");
    // `down` leaves no mounts behind.
    let o = stack.compose(&["down", "-v"], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let under = format!("{}/", stack.run_dir.path().display());
    assert!(!info.lines().any(|l| l.contains(&under)), "mounts left after down");
}
