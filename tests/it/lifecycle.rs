//! Start, stop, restart: sockets, signals, hardening, hostile bytes.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Stdio;

use crate::support::*;

#[test]
fn sigterm_shuts_down_cleanly_and_a_restart_keeps_everything() {
    needs!(root);
    let mut b = Broker::start();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&b.socket()), 0o600);
    assert_eq!(mode(&b.workload_socket()), 0o666);
    assert_eq!(mode(&b.state()), 0o700);
    assert_eq!(mode(&b.state().join("audit.log")), 0o600);
    assert_eq!(mode(&b.state().join("store.redb")), 0o600);
    b.put("keep/me", b"survives-restart-27aa");
    assert!(b.terminate().success(), "exit status after SIGTERM");
    assert!(!b.socket().exists() && !b.workload_socket().exists(), "sockets left behind");
    let events: Vec<String> = b.audit_lines().iter().map(|l| l["event"].as_str().unwrap().to_owned()).collect();
    assert_eq!(events.last().map(String::as_str), Some("stop"));
    b.restart();
    assert_eq!(b.get("keep/me"), b"survives-restart-27aa");
    b.ok(&["audit", "--verify"]);
}

#[test]
fn a_stale_socket_is_replaced_but_a_live_broker_is_not() {
    needs!(root);
    let mut b = Broker::start();
    // A second broker on the same run dir must not steal the sockets.
    let out = b.serve_command().stderr(Stdio::piped()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another broker is serving"));
    assert!(b.cli(&["status"]).status.success(), "the first broker was disturbed");
    // After kill -9 the socket files stay behind, stale: a restart replaces them.
    b.kill9();
    assert!(std::fs::metadata(b.socket()).unwrap().file_type().is_socket());
    b.restart();
    b.ok(&["status"]);
}

#[test]
fn the_broker_has_no_core_limit_locks_buffers_and_umask_077() {
    needs!(root);
    let b = Broker::start();
    let status = std::fs::read_to_string(format!("/proc/{}/status", b.pid())).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", b.pid())).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert!(core.split_whitespace().filter(|w| *w == "0").count() == 2, "{core}");
    // VmLck shows the locked secret buffers.
    let locked_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    assert!(locked_kb > 0, "no secret buffer is locked");
    let umask = status.lines().find_map(|l| l.strip_prefix("Umask:")).unwrap().trim().to_owned();
    assert_eq!(umask, "0077");
}

#[test]
fn garbage_on_the_socket_does_not_hurt_the_broker() {
    needs!(root);
    let b = Broker::start();
    b.put("still/here", b"ok");
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0xffu8; 4096],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x04\x00\x00\x00\x00\x00",
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(b.socket()).unwrap();
        let _ = s.write_all(junk);
        drop(s);
    }
    // Many connections opened and dropped at once.
    let conns: Vec<_> =
        (0..200).map(|_| std::os::unix::net::UnixStream::connect(b.workload_socket()).unwrap()).collect();
    drop(conns);
    assert_eq!(b.get("still/here"), b"ok");
}

#[test]
fn config_errors_are_clear() {
    needs!(root);
    assert!(serve_must_fail("stat_dir = \"/x\"\n").contains("unknown field `stat_dir`"));
    assert!(serve_must_fail("history_depth = 0\n").contains("history_depth = 0: it must be 1 to 1000"));
    assert!(serve_must_fail("history_depth = \"ten\"\n").contains("invalid type"));
    let o = std::process::Command::new(BIN).args(["serve", "--config", "/nonexistent.toml"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read config /nonexistent.toml"));
}
