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
    if !require_root() {
        return;
    }
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

/// A container of workload `web` (label `t`) on volume `vol`, as user
/// 1000, whose `/etc/passwd` is a FIFO nobody writes to (made by root in
/// the container once it runs: runc reads passwd at start).
fn fifo_container(t: &str, vol: &str) -> Container {
    let c = Container::run(
        &["--user", "1000", "--label", &format!("keyhole.test={t}"), "-v", &format!("{vol}:/run/secrets")],
        &["sleep", "3600"],
    );
    let made = docker(&["exec", "--user", "0", &c.id, "sh", "-c", "rm /etc/passwd && busybox mkfifo /etc/passwd"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    c
}

#[test]
fn a_fifo_at_a_containers_etc_passwd_hangs_no_read_takeover_or_shutdown() {
    if !require_docker() {
        return;
    }
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
    let c = fifo_container(&t, &vol.0);

    // The container's reads learn its owner from that FIFO: they must
    // neither hang nor lose the owner (uid 1000 reads its 0400 file).
    let host_file = b.mount("host").join("token");
    let mut readers = Vec::new();
    for _ in 0..3 {
        let id = c.id.clone();
        readers.push(std::thread::spawn(move || docker_within(15, &["exec", &id, "cat", "/run/secrets/password"])));
    }
    // Meanwhile every other mount serves.
    for _ in 0..50 {
        assert_eq!(std::fs::read(&host_file).unwrap(), b"fifo-host-secret");
    }
    for r in readers {
        let (finished, ok, out) = r.join().unwrap();
        if !finished {
            // Free the container's stuck readers, so it can be removed.
            b.kill9();
            panic!("a read in the container hung on its FIFO /etc/passwd");
        }
        assert!(ok && out == "fifo-volume-secret", "{out}");
    }

    // A takeover and a shutdown are prompt.
    let started = Instant::now();
    b.takeover();
    assert!(started.elapsed() < Duration::from_secs(10), "takeover took {:?}", started.elapsed());
    assert_eq!(std::fs::read(&host_file).unwrap(), b"fifo-host-secret");
    let (finished, ok, out) = docker_within(15, &["exec", &c.id, "cat", "/run/secrets/password"]);
    assert!(finished && ok && out == "fifo-volume-secret", "{out}");
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
    if !require_docker() {
        return;
    }
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
            let args =
                ["run", "--rm", "--user", "1000", "--label", &label, "-v", &mount, IMAGE, "cat", "/run/secrets/password"];
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
