//! Hostile callers: names that try to leave a mount, writes to a
//! read-only mount, a caller that connects and exits so someone else
//! speaks on its connection, a caller in its own mount namespace, and
//! what a secret leaves behind in the broker's process.

use std::process::Command;

use crate::support::*;

const NOBODY: u32 = 65534;

fn cat_as(uid: u32, path: &std::path::Path) -> std::process::Output {
    run_as(uid, &["cat", path.to_str().unwrap()])
}

#[test]
fn names_that_leave_a_mount_and_writes_into_it_get_nothing() {
    needs!(root);
    let b = Broker::start();
    b.put("web/pw", b"hostile-web-0c4b");
    b.put("ops/pw", b"hostile-ops-91de");
    b.ok(&["workload", "add", "web", "--selector", &format!("unix:uid:{NOBODY}")]);
    b.ok(&["workload", "add", "ops", "--selector", "unix:uid:0"]);
    b.ok(&["grant", "web/pw", "--to", "web", "--mode", "0444"]);
    b.ok(&["grant", "ops/pw", "--to", "ops", "--mode", "0444"]);
    let web = b.mount("web");
    assert_eq!(cat_as(NOBODY, &web.join("pw")).stdout, b"hostile-web-0c4b");
    // `..` leaves the mount for its parent: the other workload's mount
    // checks the caller itself, and refuses.
    let o = cat_as(NOBODY, &web.join("../ops/pw"));
    assert!(!o.status.success() && stderr(&o).contains("Permission denied"), "{}", stderr(&o));
    let deny = b.audit_events("deny").pop().unwrap();
    assert_eq!((deny["workload"].as_str(), deny["path"].as_str()), (Some("ops"), Some("ops/pw")));
    // Nothing can be written, linked or made inside a mount, even by root.
    for cmd in [
        vec!["ln", "-s", "/etc/shadow", "shadow"],
        vec!["touch", "new"],
        vec!["mkdir", "dir"],
        vec!["mv", "pw", "moved"],
        vec!["sh", "-c", "echo x > pw"],
        vec!["rm", "pw"],
    ] {
        let o = Command::new(cmd[0]).args(&cmd[1..]).current_dir(&web).output().unwrap();
        assert!(!o.status.success(), "{cmd:?} succeeded");
        assert!(String::from_utf8_lossy(&o.stderr).contains("Read-only file system"), "{cmd:?}: {}", stderr(&o));
    }
    assert_eq!(cat_as(NOBODY, &web.join("pw")).stdout, b"hostile-web-0c4b");
    // Names that would leave a mount are refused where they are made.
    assert_fails(&b.cli(&["grant", "web/pw", "--to", "web", "--file", "../escape"]), 2, "");
    assert_fails(&b.cli(&["grant", "../ops/pw", "--to", "web"]), 2, "");
    assert_fails(&b.cli_in(&["secret", "put", "/etc/shadow", "--stdin"], Some(b"x")), 2, "");
    let names: Vec<String> =
        std::fs::read_dir(&web).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["pw"]);
    b.assert_never_leaked(&[b"hostile-web-0c4b", b"hostile-ops-91de"]);
}

/// Speak gRPC (WhoAmI) by hand on a connection a process made and then,
/// with `exit`, left to a child after dying. Prints what came back.
const HANDOFF: &str = r#"
import os, socket, sys, time
path, mode = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.connect(path)
parent = os.getpid()
if os.fork() != 0:
    if mode == "exit":
        os._exit(0)
    os.wait()
    sys.exit(0)
if mode == "exit":
    while os.getppid() == parent:
        time.sleep(0.005)
    time.sleep(0.2)

def frame(kind, flags, stream, payload):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

def literal(name_index, value, name=b""):
    head = bytes([name_index]) if name_index else b"\x00" + bytes([len(name)]) + name
    return head + bytes([len(value)]) + value

headers = (b"\x83\x86" + literal(4, b"/keyhole.v1.Workload/WhoAmI") + literal(1, b"localhost")
           + literal(0, b"application/grpc", b"content-type") + literal(0, b"trailers", b"te"))
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")
          + frame(1, 4, 1, headers) + frame(0, 1, 1, b"\x00\x00\x00\x00\x00"))
s.settimeout(5)
got = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
        if b"unix:uid:" in got or len(got) > 1 << 16:
            break
except socket.timeout:
    pass
sys.stdout.write("served" if b"unix:uid:%d" % os.getuid() in got else "refused")
"#;

#[test]
fn a_connection_left_behind_by_a_process_that_exited_is_not_attested() {
    needs!(root);
    let addr =
        format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
    let b = Broker::start_with(&format!("[metrics]\nlisten = \"{addr}\"\n"));
    let speak = |mode: &str| {
        use std::os::unix::process::CommandExt;
        let o = Command::new("python3")
            .args(["-c", HANDOFF, b.workload_socket().to_str().unwrap(), mode])
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // The control: the process that connected is alive, and is served.
    assert_eq!(speak("stay"), "served");
    // It exits, its child speaks on its connection: the pidfd taken at
    // accept says the connecting process is gone, so nobody is attested
    // in its name (its pid could already be someone else's).
    assert_eq!(speak("exit"), "refused");
    let metrics = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n").unwrap();
        let mut m = String::new();
        s.read_to_string(&mut m).unwrap();
        m
    };
    assert!(metrics.contains("keyhole_grpc_requests_total{method=\"WhoAmI\",code=\"Unauthenticated\"} 1"), "{metrics}");
    let deny = b.audit_events("deny").pop().expect("the refusal is audited");
    assert_eq!((deny["method"].as_str(), deny["caller"]["uid"].as_u64()), (Some("WhoAmI"), Some(NOBODY as u64)));
    // Gone (reaped) or exited: either way the pid is named, not trusted.
    let pid = deny["caller"]["pid"].to_string();
    assert!(deny["reason"].as_str().unwrap().contains(&pid), "{deny}");
}

#[test]
fn a_caller_in_its_own_mount_namespace_is_no_host_process_whatever_it_mounts() {
    needs!(root);
    let b = Broker::start();
    let fake = b.dir.path().join("fake-mountinfo");
    std::fs::write(&fake, "1 0 0:1 / / rw shared:1 - ext4 /dev/root rw\n").unwrap();
    // Root, in a mount namespace of its own, forges its mountinfo view.
    let shell = format!(
        "mount --bind {} /proc/self/mountinfo && exec {BIN} --socket {} {{}}",
        fake.display(),
        b.socket().display()
    );
    let run = |args: &str| {
        Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &shell.replace("{}", args)])
            .output()
            .unwrap()
    };
    let o = run("whoami --json");
    assert!(o.status.success(), "{}", stderr(&o));
    let w = json(&o.stdout);
    assert_eq!((w["host_process"].as_bool(), w["admin"].as_bool()), (Some(false), Some(false)), "{w}");
    let o = run("secret ls");
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
}

#[test]
fn a_secret_leaves_no_trace_in_the_brokers_environment_arguments_or_a_core_dump() {
    needs!(root);
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    let mut b = Broker::start();
    let values: [&[u8]; 3] = [b"hygiene-put-5e2a", b"hygiene-rotated-8c71", b"hygiene-read-b3f0"];
    b.put("h/a", values[0]);
    b.put("h/b", values[1]);
    b.cli_in(&["secret", "rotate", "h/b", "--stdin"], Some(values[2]));
    b.ok(&["workload", "add", "w", "--selector", "unix:uid:0"]);
    b.ok(&["grant", "h/*", "--to", "w"]);
    assert_eq!(std::fs::read(b.mount("w").join("b")).unwrap(), values[2]);
    let pid = b.pid();
    let proc = |f: &str| std::fs::read(format!("/proc/{pid}/{f}")).unwrap();
    for v in values {
        assert!(!contains(&proc("environ"), v) && !contains(&proc("cmdline"), v));
    }
    // Secret buffers are locked in RAM.
    let status = String::from_utf8(proc("status")).unwrap();
    let locked: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmLck:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap();
    assert!(locked > 0, "VmLck: {locked} kB");
    let s = json(&b.ok(&["status", "--json"]));
    assert_eq!(s["secret_buffers_locked"], s["secret_buffers"]);
    // Core dumps: even with its core limit raised from outside, a crash
    // writes none (the broker made itself undumpable).
    assert!(!pattern.starts_with('|'), "core_pattern {pattern:?} pipes cores away: this check needs a file pattern");
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    let cores = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("core"))
            .count()
    };
    let before = cores(&cwd);
    let prlimit = |pid: u32| {
        let o =
            Command::new("prlimit").args(["--pid", &pid.to_string(), "--core=unlimited:unlimited"]).output().unwrap();
        (o.status.success(), stderr(&o))
    };
    // From outside: the broker's core limit is 0, soft and hard.
    let limits = String::from_utf8(proc("limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert_eq!(core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(), ["0", "0"], "{core}");
    // Where we may raise it again (CAP_SYS_RESOURCE), the crash must still
    // write no core: the broker is undumpable. Without the capability the
    // hard limit of 0 holds, and so does the check below.
    let (raised, why) = prlimit(pid as u32);
    assert!(raised || why.contains("Operation not permitted"), "prlimit: {why}");
    signal(pid, libc::SIGABRT);
    b.reap();
    assert_eq!(cores(&cwd), before, "the crash wrote a core file");
    b.restart();
    b.assert_never_leaked(&values);
}
