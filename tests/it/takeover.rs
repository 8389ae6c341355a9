//! Hitless restarts: `serve --takeover` and SIGHUP hand the live FUSE
//! sessions, sockets and state to a successor while readers keep reading.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::support::*;

/// A shell loop that opens and reads `file` until `dir/stop` exists,
/// counting reads of a valid value (`valid-*`) and everything else;
/// progress every 500 reads in `dir/progress`, totals in `dir/result`.
/// `read < file` opens, reads and closes in the shell itself: no fork.
fn reader_script(file: &str, dir: &str) -> String {
    format!(
        "n=0; bad=0
         while [ ! -e {dir}/stop ]; do
           v=
           read -r v < {file} 2>/dev/null
           case \"$v\" in valid-*) n=$((n+1)) ;; *) bad=$((bad+1)); echo \"[$v]\" >> {dir}/bad ;; esac
           [ $((n % 500)) -eq 0 ] && echo $n > {dir}/progress
         done
         echo \"$n $bad\" > {dir}/result"
    )
}

/// Reads done so far, per the reader's progress file (read by `cat`).
fn progress(cat: impl Fn(&str) -> Option<String>) -> u64 {
    cat("progress").and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Wait until the reader has done `more` reads beyond what it had.
fn keep_reading(cat: &impl Fn(&str) -> Option<String>, more: u64) {
    let from = progress(cat);
    eventually(60, "the reader to keep reading", || progress(cat) >= from + more);
}

/// (good reads, bad reads) once the reader has stopped.
fn result(cat: &impl Fn(&str) -> Option<String>) -> (u64, u64) {
    let mut r = None;
    eventually(30, "the reader's result", || {
        r = cat("result");
        r.is_some()
    });
    let r = r.unwrap();
    let mut it = r.split_whitespace().map(|x| x.parse::<u64>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

#[test]
fn takeovers_keep_every_read_open_files_inodes_and_the_audit_chain() {
    needs!(root);
    let mut b = Broker::start();
    b.put("app/key", b"valid-1");
    b.ok(&["workload", "add", "w", "--selector", "unix:uid:1000"]);
    b.ok(&["grant", "app/key", "--to", "w", "--uid", "1000"]);
    let file = b.mount("w").join("key");
    let file = file.to_str().unwrap();
    let out = b.dir.path().join("reader");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let dir = out.to_str().unwrap();
    let cat = |name: &str| std::fs::read_to_string(out.join(name)).ok();

    let ino = || String::from_utf8(run_as(1000, &["stat", "-c", "%i", file]).stdout).unwrap();
    let ino_before = ino();
    // A file opened before the takeover is read after it.
    let held = format!("exec 3< {file}; while [ ! -e {dir}/go ]; do sleep 0.02; done; cat <&3");
    let held = Command::new("sh").args(["-c", &held]).uid(1000).gid(1000).stdout(Stdio::piped()).spawn().unwrap();
    let mut reader = Command::new("sh").args(["-c", &reader_script(file, dir)]).uid(1000).gid(1000).spawn().unwrap();
    keep_reading(&cat, 2000);

    // The CLI keeps working throughout: it retries what a handover cuts off.
    let socket = b.socket();
    let stop_cli = std::sync::atomic::AtomicBool::new(false);
    let cli_calls = std::thread::scope(|s| {
        let calls = s.spawn(|| {
            let mut n = 0;
            while !stop_cli.load(std::sync::atomic::Ordering::SeqCst) {
                let o = cli_as(&socket, &["secret", "get", "app/key"], None, None);
                assert!(o.status.success() && o.stdout.starts_with(b"valid-"), "CLI call failed: {}", stderr(&o));
                n += 1;
            }
            n
        });
        let first = b.pid();
        b.takeover();
        assert_ne!(b.pid(), first);
        assert_eq!(ino(), ino_before, "the inode number changed across the takeover");
        keep_reading(&cat, 2000);
        for v in 2..=3 {
            let o = b.cli_in(&["secret", "rotate", "app/key", "--stdin"], Some(format!("valid-{v}").as_bytes()));
            assert!(o.status.success(), "{}", stderr(&o));
            b.takeover();
            keep_reading(&cat, 2000);
        }
        stop_cli.store(true, std::sync::atomic::Ordering::SeqCst);
        calls.join().unwrap()
    });
    eprintln!("{cli_calls} CLI calls across 3 takeovers, none failed");
    std::fs::write(out.join("go"), "").unwrap();
    let held = held.wait_with_output().unwrap();
    assert_eq!(held.stdout, b"valid-1", "a file opened before the takeover lost its version");
    std::fs::write(out.join("stop"), "").unwrap();
    reader.wait().unwrap();
    let (good, bad) = result(&cat);
    assert_eq!(bad, 0, "failed or invalid reads across takeovers: {:?}", cat("bad"));
    eprintln!("{good} host reads across 3 takeovers, none failed");

    // The new broker is the broker: it changes mounts and answers the CLI.
    assert_eq!(run_as(1000, &["cat", file]).stdout, b.get("app/key"));
    b.ok(&["revoke", "app/key", "--from", "w"]);
    assert!(!run_as(1000, &["cat", file]).status.success());
    b.ok(&["audit", "--verify"]);
    assert_eq!(b.audit_events("handover").len(), 3);
    assert_eq!(b.audit_events("takeover").len(), 3);
    assert!(!b.log().lines().any(|l| l.contains(" ERROR ")), "{}", b.log());
}

#[test]
fn a_successor_that_cannot_read_the_state_refuses_and_the_broker_serves_on() {
    needs!(root);
    let b = Broker::start();
    b.put("app/key", b"still-served");
    b.ok(&["workload", "add", "w", "--selector", "unix:uid:1000"]);
    b.ok(&["grant", "app/key", "--to", "w", "--uid", "1000"]);
    let file = b.mount("w").join("key");
    let pid = b.pid();

    let out = b
        .serve_command()
        .arg("--takeover")
        .env("KEYHOLE_TEST_STATE_VERSION", "999")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("cannot take over") && err.contains("reads version 999"), "{err}");
    assert!(err.contains("keeps serving"), "{err}");

    assert_eq!(b.serving_pid(), pid);
    assert_eq!(run_as(1000, &["cat", file.to_str().unwrap()]).stdout, b"still-served");
    b.ok(&["secret", "rotate", "app/key", "--generate", "16"]);
    assert_eq!(b.audit_events("takeover_refused").len(), 1);
    b.ok(&["audit", "--verify"]);
}

#[test]
fn takeover_without_a_running_broker_says_so() {
    needs!(root);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--takeover", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no broker to take over from"), "{}", stderr(&out));
    detach_mounts_under(dir.path());
}

#[test]
fn containers_read_through_takeovers_and_a_sighup_without_a_failure() {
    needs!(docker);
    let mut b = Broker::start_with_plugin();
    let label = format!("keyhole.test=takeover-{}", std::process::id());
    b.put("app/key", b"valid-1");
    b.ok(&["workload", "add", "c", "--selector", &format!("docker:label:{label}")]);
    b.ok(&["grant", "app/key", "--to", "c"]);
    // One container reads through the host bind, one through its own
    // volume-driver mount; both stay up after their loops, so their
    // results can be read.
    let bind = format!("{}:/run/secrets:ro,rslave", b.mount("c").display());
    let vol = unique("takeover");
    assert!(docker(&["volume", "create", "-d", &b.plugin, "-o", "workload=c", &vol]).status.success());
    let script = reader_script("/run/secrets/key", "/tmp") + "\nexec sleep 3600";
    let readers = [
        Container::run(&["--label", &label, "-v", &bind], &["sh", "-c", &script]),
        Container::run(&["--label", &label, "-v", &format!("{vol}:/run/secrets")], &["sh", "-c", &script]),
    ];
    let cats: Vec<_> = readers
        .iter()
        .map(|c| move |name: &str| c.cat(&format!("/tmp/{name}")).ok().map(|b| String::from_utf8(b).unwrap()))
        .collect();
    let keep_all_reading = || cats.iter().for_each(|cat| keep_reading(cat, 2000));
    keep_all_reading();
    for (i, how) in ["takeover", "sighup", "takeover"].into_iter().enumerate() {
        let o = b.cli_in(&["secret", "rotate", "app/key", "--stdin"], Some(format!("valid-{}", i + 2).as_bytes()));
        assert!(o.status.success(), "{}", stderr(&o));
        match how {
            "sighup" => b.hup(),
            _ => b.takeover(),
        }
        keep_all_reading();
    }
    for (c, cat) in readers.iter().zip(&cats) {
        assert!(c.exec(&["sh", "-c", ": > /tmp/stop"]).status.success());
        let (good, bad) = result(cat);
        assert_eq!(bad, 0, "failed or invalid reads across takeovers: {:?}", cat("bad"));
        eprintln!("{good} reads in a container across 3 takeovers, none failed");
        assert_eq!(c.cat("/run/secrets/key").unwrap(), b"valid-4");
    }

    // The successor serves the volume driver: a new container mounts the
    // volume, and every container's mount goes when it exits.
    let o = docker(&[
        "run",
        "--rm",
        "--label",
        &label,
        "-v",
        &format!("{vol}:/run/secrets"),
        IMAGE,
        "cat",
        "/run/secrets/key",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "valid-4", "{}", String::from_utf8_lossy(&o.stderr));
    drop(cats);
    drop(readers);
    assert!(docker(&["volume", "rm", &vol]).status.success());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&b.run().join("volumes").display().to_string()), "volume mounts left behind");
    b.ok(&["audit", "--verify"]);
    assert_eq!(b.audit_events("takeover").len(), 3);
    assert!(!b.log().lines().any(|l| l.contains(" ERROR ")), "{}", b.log());
}

/// What a broker told a stand-in for systemd's notify socket, in order;
/// `BARRIER=1` is answered only after checking that its sender, the
/// outgoing broker, still runs (it must wait for systemd, then exit).
struct FakeSystemd {
    path: std::path::PathBuf,
    got: std::sync::mpsc::Receiver<String>,
}

impl FakeSystemd {
    fn start(dir: &std::path::Path, outgoing: std::sync::Arc<std::sync::atomic::AtomicI32>) -> FakeSystemd {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        use std::mem::MaybeUninit;
        let path = dir.join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let (tx, got) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            loop {
                let mut buf = [0u8; 512];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let Ok(m) = rustix::net::recvmsg(&sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) else {
                    return;
                };
                let text = String::from_utf8_lossy(&buf[..m.bytes]).into_owned();
                let fds: Vec<_> = control
                    .drain()
                    .flat_map(|c| match c {
                        RecvAncillaryMessage::ScmRights(fds) => fds.collect(),
                        _ => Vec::new(),
                    })
                    .collect();
                if text == "BARRIER=1" {
                    let pid = outgoing.load(std::sync::atomic::Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    let alive =
                        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| !s.contains("State:\tZ"));
                    let _ = tx.send(format!("BARRIER=1 sender alive={alive} fds={}", fds.len()));
                } else {
                    let _ = tx.send(text);
                }
                drop(fds);
            }
        });
        FakeSystemd { path, got }
    }

    fn next(&self) -> String {
        self.got.recv_timeout(std::time::Duration::from_secs(30)).expect("a notification within 30 s")
    }
}

#[test]
fn an_upgrade_under_systemd_runs_the_new_binary_which_becomes_the_main_pid_before_the_old_exits() {
    needs!(root);
    let dir = tempfile::tempdir().unwrap();
    let outgoing = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    let systemd = FakeSystemd::start(dir.path(), outgoing.clone());
    let bin = dir.path().join("keyhole");
    std::fs::copy(BIN, &bin).unwrap();
    let mut b = Broker::start_from(&bin, &[("NOTIFY_SOCKET", systemd.path.to_str().unwrap())]);
    assert_eq!(systemd.next(), "READY=1");
    let old = b.pid();
    outgoing.store(old, std::sync::atomic::Ordering::SeqCst);

    // An upgrade: `install` replaces the binary (a new file, same path),
    // then `systemctl reload` (ExecReload=kill -HUP $MAINPID).
    let upgrade = dir.path().join("keyhole.new");
    std::fs::copy(BIN, &upgrade).unwrap();
    std::fs::rename(&upgrade, &bin).unwrap();
    b.hup();
    let new = b.pid();
    let exe = std::fs::read_link(format!("/proc/{new}/exe")).unwrap();
    assert_eq!(exe, bin, "the successor must run the binary now at the old one's path");
    assert_ne!(new, old);
    assert_eq!(systemd.next(), format!("MAINPID={new}"), "the old broker must name its successor");
    assert_eq!(systemd.next(), "BARRIER=1 sender alive=true fds=1", "the old broker must wait for systemd");
    assert_eq!(systemd.next(), format!("MAINPID={new}\nREADY=1"));
    assert_eq!(b.serving_pid(), new);
}

#[test]
fn the_cli_waits_for_a_broker_that_is_starting_again() {
    needs!(root);
    let mut b = Broker::start();
    b.put("app/key", b"after-restart");
    b.kill9();
    // The CLI is started while no broker serves; the broker comes up
    // a second later, and the call goes through.
    let socket = b.socket();
    let get = std::thread::spawn(move || cli_as(&socket, &["secret", "get", "app/key"], None, None));
    std::thread::sleep(std::time::Duration::from_secs(1));
    b.restart();
    let o = get.join().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout, b"after-restart");
}

#[test]
fn only_the_brokers_own_user_may_take_it_over() {
    needs!(root);
    let b = Broker::start();
    b.put("app/key", b"kept");
    let pid = b.pid();
    let out = b.serve_command().arg("--takeover").uid(1000).gid(1000).stderr(Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("only the broker's own user may take it over"), "{}", stderr(&out));
    assert_eq!(b.serving_pid(), pid, "the broker must keep serving");
    assert_eq!(b.get("app/key"), b"kept");
    assert!(b.audit_events("handover").is_empty());
}
