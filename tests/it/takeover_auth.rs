//! Who may take a broker over: only a process of its uid in its own pid
//! and mount namespaces. Root in another namespace (a container with the
//! run dir bound in) is refused and audited, the broker serves on; a
//! peer that connects and says nothing blocks nobody; the documented
//! upgrade (binary replaced, then SIGHUP; or another install path) works.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// Run `unshare <flags> keyhole serve --takeover` as root against `b`;
/// returns its exit code (None: still running after 20 s, i.e. it took
/// over and serves) and its stderr.
fn foreign_takeover(b: &Broker, flags: &[&str]) -> (Option<i32>, String) {
    let mut c = Command::new("unshare");
    c.args(flags).arg("--kill-child").arg(BIN).args(b.serve_args()).arg("--takeover");
    let mut child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            // It took over: stop it (--kill-child takes the broker along).
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    (code, err)
}

/// Where [`attacker`] connects when the test binary is run again inside
/// other namespaces (unset: that test does nothing).
const ATTACKER_ENV: &str = "KEYHOLE_TEST_ATTACKER_SOCKET";

/// Not a test of its own: a hostile successor, run by
/// [`root_in_another_pid_or_mount_namespace_cannot_take_over`] inside
/// `unshare`. It speaks the handover protocol without checking anyone:
/// accepts whatever is offered, takes the descriptors and acknowledges.
/// Prints `TOOK OVER <n> fds` or `REFUSED <why>`.
#[test]
fn attacker() {
    let Some(path) = std::env::var_os(ATTACKER_ENV) else { return };
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let frame = |s: &mut UnixStream| -> Result<serde_json::Value, String> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).map_err(|e| e.to_string())?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).map_err(|e| e.to_string())?;
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    };
    let send = |s: &mut UnixStream, v: &str| {
        s.write_all(&(v.len() as u32).to_be_bytes()).unwrap();
        s.write_all(v.as_bytes()).unwrap();
    };
    let offer = match frame(&mut s) {
        Ok(o) => o,
        Err(e) => return println!("REFUSED no offer: {e}"),
    };
    assert!(offer.get("offer").is_some(), "{offer}");
    send(&mut s, "\"accept\"");
    let state = match frame(&mut s) {
        Ok(st) => st,
        Err(e) => return println!("REFUSED no state: {e}"),
    };
    let st = &state["state"];
    let n = st["mounts"].as_array().map_or(0, |m| m.len()) + 2 + usize::from(st["plugin"] == true);
    let mut got = 0;
    while got < n {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(200))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut byte)];
        let m = rustix::net::recvmsg(&s, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC).unwrap();
        assert!(m.bytes == 1, "hung up after {got} fds");
        for c in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = c {
                got += fds.count();
            }
        }
    }
    send(&mut s, "\"ack\"");
    println!("TOOK OVER {got} fds");
}

/// Run [`attacker`] as root inside `unshare <flags>` against `b`.
fn attack(b: &Broker, flags: &[&str]) -> String {
    let out = Command::new("unshare")
        .args(flags)
        .arg("--kill-child")
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "takeover_auth::attacker", "--nocapture", "--test-threads=1"])
        .env(ATTACKER_ENV, b.run().join("takeover.sock"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let marker = |l: &str| l.find("TOOK OVER").or_else(|| l.find("REFUSED")).map(|i| l[i..].to_owned());
    text.lines().find_map(marker).unwrap_or(text)
}

#[test]
fn root_in_another_pid_or_mount_namespace_cannot_take_over() {
    needs!(root);
    let b = Broker::start();
    b.put("app/key", b"the-real-value-5e1c");
    b.ok(&["workload", "add", "w", "--selector", "unix:uid:1000"]);
    b.ok(&["grant", "app/key", "--to", "w", "--uid", "1000"]);
    let file = b.mount("w").join("key");
    let pid = b.pid();
    let cases: [&[&str]; 3] = [&["-m", "-p", "-f", "--mount-proc"], &["-m"], &["-p", "-f"]];
    for (i, flags) in cases.into_iter().enumerate() {
        // A hostile client that checks nothing: the broker must refuse it.
        let got = attack(&b, flags);
        assert!(got.starts_with("REFUSED"), "unshare {flags:?}: the attacker {got}");
        assert_eq!(b.serving_pid(), pid, "unshare {flags:?}: the broker must keep serving");
        // keyhole itself, from there: refused too.
        let (code, err) = foreign_takeover(&b, flags);
        assert_eq!(code, Some(1), "unshare {flags:?}: the foreign successor was not refused:\n{err}");
        assert!(err.contains("namespace"), "unshare {flags:?}: {err}");
        assert_eq!(b.serving_pid(), pid, "unshare {flags:?}: the broker must keep serving");
        assert_eq!(b.get("app/key"), b"the-real-value-5e1c");
        assert_eq!(run_as(1000, &["cat", file.to_str().unwrap()]).stdout, b"the-real-value-5e1c");
        // The broker refused it itself (not only the successor's own check).
        let refused = b.audit_events("takeover_refused");
        assert_eq!(refused.len(), 2 * (i + 1), "unshare {flags:?}: {refused:?}");
        for r in &refused[2 * i..] {
            let why = r["reason"].as_str().unwrap();
            assert!(why.contains("namespace"), "unshare {flags:?}: {why}");
        }
    }
    assert!(b.audit_events("handover").is_empty());
    // A change made now is the broker's, and it still takes over properly.
    b.ok(&["secret", "rotate", "app/key", "--generate", "16"]);
    b.ok(&["audit", "--verify"]);
}

#[test]
fn a_peer_that_connects_and_says_nothing_blocks_no_takeover_or_stop() {
    needs!(root);
    let mut b = Broker::start();
    b.put("app/key", b"v1");
    let socket = b.run().join("takeover.sock");
    // Several idle peers of the broker's own uid and namespaces.
    let idle: Vec<UnixStream> = (0..3).map(|_| UnixStream::connect(&socket).unwrap()).collect();
    let t0 = Instant::now();
    b.takeover();
    assert!(t0.elapsed() < Duration::from_secs(10), "the takeover waited {:?} for idle peers", t0.elapsed());
    assert_eq!(b.get("app/key"), b"v1");
    // And the new broker stops promptly with an idle peer on its socket.
    let idle2 = UnixStream::connect(&socket).unwrap();
    let t0 = Instant::now();
    assert!(b.terminate().success());
    assert!(t0.elapsed() < Duration::from_secs(8), "SIGTERM waited {:?}", t0.elapsed());
    drop((idle, idle2));
}

#[test]
fn an_upgrade_from_a_replaced_binary_or_another_install_path_still_takes_over() {
    needs!(root);
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("keyhole");
    std::fs::copy(BIN, &bin).unwrap();
    let mut b = Broker::start_from(&bin, &[]);
    b.put("app/key", b"across-upgrades");
    // The binary replaced (the running one's exe now reads "(deleted)").
    let upgrade = dir.path().join("keyhole.new");
    std::fs::copy(BIN, &upgrade).unwrap();
    std::fs::rename(&upgrade, &bin).unwrap();
    let old = b.pid();
    let exe = std::fs::read_link(format!("/proc/{old}/exe")).unwrap();
    assert!(exe.to_string_lossy().ends_with("(deleted)"), "{exe:?}");
    b.hup();
    assert_ne!(b.pid(), old);
    assert_eq!(b.get("app/key"), b"across-upgrades");
    // A versioned install path: another binary, another path.
    let v2 = dir.path().join("keyhole-0.2");
    std::fs::copy(BIN, &v2).unwrap();
    let before = b.pid();
    let out = Command::new(&v2)
        .args(b.serve_args())
        .arg("--takeover")
        .stdout(Stdio::null())
        .stderr(b.log_file())
        .spawn()
        .unwrap();
    eventually(30, "the versioned binary to take over", || ![0, before].contains(&b.serving_pid()));
    let new = b.serving_pid();
    assert_eq!(std::fs::read_link(format!("/proc/{new}/exe")).unwrap(), v2);
    assert_eq!(b.get("app/key"), b"across-upgrades");
    assert_eq!(b.audit_events("takeover").len(), 2);
    assert!(b.audit_events("takeover_refused").is_empty());
    b.ok(&["audit", "--verify"]);
    // The versioned broker is ours to stop.
    signal(out.id() as i32, libc::SIGTERM);
    let mut out = out;
    out.wait().unwrap();
}

#[test]
fn a_run_dir_another_user_owns_or_may_write_is_refused_at_start() {
    needs!(root);
    use std::os::unix::fs::PermissionsExt;
    let mut b = Broker::start();
    b.put("app/key", b"v");
    assert!(b.terminate().success());
    let run = b.run();
    let mode = |m: u32| std::fs::set_permissions(&run, std::fs::Permissions::from_mode(m)).unwrap();
    for loose in [0o775, 0o757, 0o777] {
        mode(loose);
        let err = serve_must_fail_for(&b);
        assert!(err.contains(&format!("has mode {loose:04o}")) && err.contains("chmod 0755"), "{err}");
    }
    mode(0o755);
    // Owned by another user (who could swap admin.sock for their own).
    std::os::unix::fs::chown(&run, Some(1000), None).unwrap();
    let err = serve_must_fail_for(&b);
    assert!(err.contains("belongs to uid 1000") && err.contains("chown 0"), "{err}");
    std::os::unix::fs::chown(&run, Some(0), None).unwrap();
    // The documented 0755, ours: fine.
    b.restart();
    assert_eq!(b.get("app/key"), b"v");
}

/// `serve` on `b`'s dirs must fail at start; returns its stderr.
fn serve_must_fail_for(b: &Broker) -> String {
    let mut child = b.serve_command().stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the broker started");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the broker started");
    stderr(&out)
}
