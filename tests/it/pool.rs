//! One fixed pool of FUSE workers serves every mount: the broker's thread
//! count does not grow with its mounts, a request that must wait (a
//! container just started, a volume whose owner is not learned yet) is
//! parked instead of holding a worker, and nothing a container puts at its
//! `/etc/passwd` can hang a worker, a takeover or a shutdown.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// The broker's threads, from `/proc/<pid>/task`.
fn threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

/// A unique label value per test, so parallel tests never match each other.
fn tag(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

/// Run `docker args`, giving up after `secs`: (finished, success, output).
fn docker_within(secs: u64, args: &[&str]) -> (bool, bool, String) {
    let mut child = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if child.try_wait().unwrap().is_some() {
            let o = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
            return (true, o.status.success(), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (false, false, String::new());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes a Docker volume on drop (before the broker that serves it goes).
struct Volume(String);

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = docker_within(30, &["volume", "rm", "-f", &self.0]);
    }
}

#[test]
fn broker_threads_do_not_grow_with_mounts() {
    needs!(root);
    let b = Broker::start();
    b.put("app/token", b"pool-thread-secret");
    let read_all = |n: usize| {
        for i in 0..n {
            let f = b.mount(&format!("w{i}")).join("token");
            assert_eq!(std::fs::read(&f).unwrap(), b"pool-thread-secret", "{}", f.display());
        }
    };
    b.ok(&["workload", "add", "w0", "--selector", "unix:uid:0"]);
    b.ok(&["grant", "app/token", "--to", "w0"]);
    read_all(1);
    let one = threads(b.pid());
    for i in 1..50 {
        let w = format!("w{i}");
        b.ok(&["workload", "add", &w, "--selector", "unix:uid:0"]);
        b.ok(&["grant", "app/token", "--to", &w]);
    }
    read_all(50);
    let fifty = threads(b.pid());
    eprintln!("broker threads: {one} with 1 mount, {fifty} with 50");
    // A few blocking-pool threads may come and go; 2 per mount may not.
    assert!(fifty <= one + 4, "threads grew with mounts: {one} with 1 mount, {fifty} with 50");
    b.assert_never_leaked(&[b"pool-thread-secret"]);
}

/// An image like the test image, but with no `/etc/passwd` and a
/// world-writable `/etc`, so the container's own user can put a FIFO
/// there. (A FIFO must not be there at start, nor while anyone runs
/// `docker exec`: runc and dockerd read the container's passwd too.)
const OPEN_ETC_IMAGE: &str = "keyhole-test/busybox-open-etc:1";

fn ensure_open_etc_image() {
    if docker(&["image", "inspect", OPEN_ETC_IMAGE]).status.success() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    for d in ["bin", "etc", "run/secrets", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.path().join(d)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    for d in ["etc", "tmp"] {
        std::fs::set_permissions(root.path().join(d), std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"].into_iter().find(|p| Path::new(p).exists()).unwrap();
    std::fs::copy(busybox, root.path().join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "sleep", "echo", "mkfifo", "true"] {
        std::os::unix::fs::symlink("busybox", root.path().join("bin").join(applet)).unwrap();
    }
    let mut tar =
        Command::new("tar").arg("-C").arg(root.path()).args(["-c", "."]).stdout(Stdio::piped()).spawn().unwrap();
    let out = Command::new("docker")
        .args(["import", "--change", "CMD [\"/bin/sh\"]", "-", OPEN_ETC_IMAGE])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success());
    assert!(out.status.success(), "docker import: {}", String::from_utf8_lossy(&out.stderr));
}

/// `docker logs` of a container: (stdout, stderr).
fn logs(id: &str) -> (String, String) {
    let o = docker(&["logs", id]);
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn a_fifo_at_a_containers_etc_passwd_hangs_no_read_takeover_or_shutdown() {
    needs!(docker);
    ensure_open_etc_image();
    let mut b = Broker::start_with_plugin();
    let t = tag("fifo");
    b.put("db/password", b"fifo-volume-secret");
    b.put("host/token", b"fifo-host-secret");
    b.ok(&["workload", "add", "web", "--selector", &format!("docker:label:keyhole.test={t}")]);
    b.ok(&["grant", "db/password", "--to", "web"]);
    b.ok(&["workload", "add", "host", "--selector", "unix:uid:0"]);
    b.ok(&["grant", "host/token", "--to", "host"]);
    let vol = Volume(unique("fifo"));
    assert!(docker(&["volume", "create", "-d", &b.plugin, "-o", "workload=web", &vol.0]).status.success());

    // The container, as user 1000, makes its /etc/passwd a FIFO nobody
    // writes to, then reads its secret again and again. Its first read
    // has the broker learn the file owner from that passwd: it must
    // neither hang nor lose the owner (uid 1000 reads its 0400 file).
    let script = "mkfifo /etc/passwd || exit 1; \
                  while true; do cat /run/secrets/password && echo; sleep 0.1; done";
    let label = format!("keyhole.test={t}");
    let mount = format!("{}:/run/secrets", vol.0);
    let args =
        ["run", "-d", "--rm", "--user", "1000", "--label", &label, "-v", &mount, OPEN_ETC_IMAGE, "sh", "-c", script];
    let o = docker(&args);
    assert!(o.status.success(), "docker run: {}", String::from_utf8_lossy(&o.stderr));
    let c = Container { id: String::from_utf8(o.stdout).unwrap().trim().to_owned() };
    let reads = |c: &Container| {
        let (out, err) = logs(&c.id);
        assert!(err.is_empty(), "the container's reads failed: {err}");
        assert!(out.lines().all(|l| l == "fifo-volume-secret"), "{out}");
        out.lines().count()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while reads(&c) < 3 {
        if Instant::now() > deadline {
            // Free the container's stuck reader, so it can be removed.
            b.kill9();
            panic!("the container's read hung on its FIFO /etc/passwd");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every other mount serves meanwhile.
    let host_file = b.mount("host").join("token");
    for _ in 0..50 {
        assert_eq!(std::fs::read(&host_file).unwrap(), b"fifo-host-secret");
    }

    // A takeover and a shutdown are prompt, and the reads go on.
    let started = Instant::now();
    b.takeover();
    assert!(started.elapsed() < Duration::from_secs(10), "takeover took {:?}", started.elapsed());
    assert_eq!(std::fs::read(&host_file).unwrap(), b"fifo-host-secret");
    let before = reads(&c);
    eventually(10, "the container to read after the takeover", || reads(&c) > before + 3);
    drop(c);
    drop(vol);
    let started = Instant::now();
    assert!(b.terminate().success());
    assert!(started.elapsed() < Duration::from_secs(5), "shutdown took {:?}", started.elapsed());
}

/// Keep reading `files` from `threads` threads until `stop`; returns the
/// number of reads and the failures.
fn hammer(files: Vec<PathBuf>, threads: usize, stop: &std::sync::atomic::AtomicBool) -> (u64, Vec<String>) {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                let files = &files;
                s.spawn(move || {
                    let (mut n, mut failed) = (0u64, Vec::new());
                    let mut i = k;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let f: &Path = &files[i % files.len()];
                        match std::fs::read(f) {
                            Ok(v) if v == b"pool-busy-secret" => n += 1,
                            Ok(v) => failed.push(format!("{}: {:?}", f.display(), String::from_utf8_lossy(&v))),
                            Err(e) => failed.push(format!("{}: {e}", f.display())),
                        }
                        i += threads;
                    }
                    (n, failed)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).fold((0, Vec::new()), |(n, mut f), (m, g)| {
            f.extend(g);
            (n + m, f)
        })
    })
}

#[test]
fn parked_opens_of_starting_containers_succeed_while_every_mount_serves() {
    needs!(docker);
    let b = Broker::start_with_plugin();
    let t = tag("parked");
    b.put("db/password", b"parked-volume-secret");
    b.put("busy/token", b"pool-busy-secret");
    b.ok(&["workload", "add", "web", "--selector", &format!("docker:label:keyhole.test={t}")]);
    b.ok(&["grant", "db/password", "--to", "web"]);
    let mut files = Vec::new();
    for i in 0..20 {
        let w = format!("busy{i}");
        b.ok(&["workload", "add", &w, "--selector", "unix:uid:0"]);
        b.ok(&["grant", "busy/token", "--to", &w]);
        files.push(b.mount(&w).join("token"));
    }
    let vol = Volume(unique("parked"));
    assert!(docker(&["volume", "create", "-d", &b.plugin, "-o", "workload=web", &vol.0]).status.success());

    let stop = std::sync::atomic::AtomicBool::new(false);
    let ((reads, failed), runs) = std::thread::scope(|s| {
        let busy = s.spawn(|| hammer(files, 4, &stop));
        // Each container's first open waits for what the broker must learn
        // about it (its owner on a fresh volume mount, its identity).
        let label = format!("keyhole.test={t}");
        let mount = format!("{}:/run/secrets", vol.0);
        let mut runs = Vec::new();
        for _ in 0..3 {
            let args = [
                "run",
                "--rm",
                "--user",
                "1000",
                "--label",
                &label,
                "-v",
                &mount,
                IMAGE,
                "cat",
                "/run/secrets/password",
            ];
            runs.push(docker_within(60, &args));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (busy.join().unwrap(), runs)
    });
    for (finished, ok, out) in runs {
        assert!(finished && ok && out == "parked-volume-secret", "docker run: {out}");
    }
    assert!(failed.is_empty(), "reads failed while containers started: {:?}", &failed[..failed.len().min(5)]);
    assert!(reads > 0);
    assert!(b.log().contains("parked a FUSE request"), "no request was parked");
    b.assert_never_leaked(&[b"parked-volume-secret", b"pool-busy-secret"]);
}
