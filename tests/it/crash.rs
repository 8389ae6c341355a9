//! `kill -9` in the middle of a stream of rotations loses nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::support::*;

#[test]
fn kill_9_during_rotations_keeps_every_acknowledged_version() {
    needs!(root);
    let mut b = Broker::start();
    b.put("crash/k", b"value-0");
    for round in 0..5 {
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (acked, stop, socket) = (acked.clone(), stop.clone(), b.socket());
            std::thread::spawn(move || {
                let mut next = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    let v = format!("value-{next}");
                    let o = cli_as(
                        &socket,
                        &["secret", "rotate", "crash/k", "--stdin", "--json"],
                        Some(v.as_bytes()),
                        None,
                    );
                    if !o.status.success() {
                        break; // the broker is gone
                    }
                    acked.store(json(&o.stdout)["version"].as_u64().unwrap(), Ordering::SeqCst);
                    next += 1;
                }
            })
        };
        // Let some rotations land, then kill at a random moment.
        while acked.load(Ordering::SeqCst) < 3 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(jitter(150)));
        b.kill9();
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let last_acked = acked.load(Ordering::SeqCst);

        b.restart();
        let got = json(&b.ok(&["secret", "get", "crash/k", "--json"]));
        let version = got["version"].as_u64().unwrap();
        assert!(version >= last_acked, "round {round}: acknowledged {last_acked}, found {version}");
        assert!(version <= last_acked + 1, "round {round}: version {version} was never sent");
        // Each round starts at version 1 = "value-0", and rotation n writes
        // "value-<n>" as version n+1: the value must match its version.
        let want = format!("value-{}", version - 1);
        assert_eq!(b.get("crash/k"), want.as_bytes(), "round {round}: version {version} holds another value");
        b.ok(&["audit", "--verify"]);
        // Start the next round from a fresh counter on a fresh secret.
        b.ok(&["secret", "rm", "crash/k"]);
        b.put("crash/k", b"value-0");
    }
}

/// What a writer had acknowledged when the broker was killed.
#[derive(Default)]
struct Acked {
    versions: std::collections::HashMap<String, u64>,
    grants: Vec<String>,
}

#[test]
fn kill_9_at_random_moments_200_times_loses_no_acknowledged_change() {
    needs!(root);
    let mut b = Broker::start_with("[limits]\ncalls_per_second = 10000\n");
    b.ok(&["workload", "add", "w", "--selector", "unix:uid:65534"]);
    let secrets = ["crash/a", "crash/b", "crash/c"];
    for s in secrets {
        b.put(s, b"v");
    }
    let acked = Arc::new(std::sync::Mutex::new(Acked::default()));
    let mut grants_made = 0u64;
    for round in 0..200u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let writer = {
            let (acked, stop, ops, socket) = (acked.clone(), stop.clone(), ops.clone(), b.socket());
            let first_grant = grants_made;
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Each round starts at another kind of change.
                    let (args, grant): (Vec<String>, Option<String>) = if (n + round) % 4 == 3 {
                        // A grant per secret: a second grant of one secret
                        // to one workload would replace the first.
                        let file = format!("g{}", first_grant + n);
                        let secret = format!("granted/{file}");
                        let a = ["grant", &secret, "--to", "w", "--file", &file].map(String::from).to_vec();
                        (a, Some(file))
                    } else {
                        let s = ["crash/a", "crash/b", "crash/c"][((n + round) % 4) as usize];
                        (["secret", "rotate", s, "--generate", "16", "--json"].map(String::from).to_vec(), None)
                    };
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let o = cli_as(&socket, &args, None, None);
                    if !o.status.success() {
                        break; // the broker is gone: this one was not acknowledged
                    }
                    let mut a = acked.lock().unwrap();
                    match grant {
                        Some(file) => a.grants.push(file),
                        None => {
                            let v = json(&o.stdout);
                            a.versions.insert(v["path"].as_str().unwrap().to_owned(), v["version"].as_u64().unwrap());
                        }
                    }
                    drop(a);
                    n += 1;
                    ops.store(n, Ordering::SeqCst);
                }
                n
            })
        };
        while ops.load(Ordering::SeqCst) < 2 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(jitter(40)));
        stop.store(true, Ordering::Relaxed);
        b.kill9();
        // A call begun just now waits for a broker: give it one, then
        // count what it may have had acknowledged too.
        b.restart();
        grants_made += writer.join().unwrap() + 1;
        let a = acked.lock().unwrap();
        let listed = json(&b.ok(&["secret", "ls", "crash", "--json"]));
        for s in secrets {
            let row = listed.as_array().unwrap().iter().find(|r| r["path"] == s).expect("listed");
            let current = row["version"].as_u64().unwrap();
            let want = a.versions.get(s).copied().unwrap_or(1);
            assert!(current >= want, "round {round}: {s} acknowledged at {want}, found {current}");
        }
        let listed = json(&b.ok(&["grants", "--workload", "w", "--json"]));
        let files: std::collections::HashSet<&str> =
            listed.as_array().unwrap().iter().map(|g| g["file"].as_str().unwrap()).collect();
        for g in &a.grants {
            assert!(files.contains(g.as_str()), "round {round}: acknowledged grant {g} is gone");
        }
    }
    let a = acked.lock().unwrap();
    assert!(
        a.grants.len() > 20 && a.versions.len() == 3,
        "too little was acknowledged to prove anything: {} grants, {:?}",
        a.grants.len(),
        a.versions
    );
    b.ok(&["audit", "--verify"]);
}

#[test]
fn a_full_disk_refuses_the_write_clearly_and_keeps_the_previous_version() {
    needs!(root);
    let mut b = Broker::start();
    b.put("disk/k", b"kept-on-a-full-disk-3b8d");
    b.terminate();
    // Move the state onto a 4 MiB tmpfs.
    let state = b.state();
    let aside = b.dir.path().join("state-aside");
    std::fs::rename(&state, &aside).unwrap();
    std::fs::create_dir(&state).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "keyhole-test", state.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(ok.success());
    for e in std::fs::read_dir(&aside).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), state.join(e.file_name())).unwrap();
        let mode = e.metadata().unwrap().permissions();
        std::fs::set_permissions(state.join(e.file_name()), mode).unwrap();
    }
    b.restart();
    // Fill the disk, then leave 256 KiB.
    let filler = state.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
    }
    let full = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&filler).unwrap().set_len(full - 256 * 1024).unwrap();

    let big = vec![b'x'; 900 * 1024];
    let o = b.cli_in(&["secret", "put", "disk/k", "--stdin"], Some(&big));
    assert!(!o.status.success(), "a 900 KiB write fit in 256 KiB");
    let err = stderr(&o);
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert_eq!(b.get("disk/k"), b"kept-on-a-full-disk-3b8d");
    // Space again: writes work, and a restart finds a clean store.
    std::fs::remove_file(&filler).unwrap();
    let o = b.cli_in(&["secret", "put", "disk/k", "--stdin"], Some(b"after-the-disk-was-freed"));
    assert!(o.status.success(), "{}", stderr(&o));
    b.kill9();
    b.restart();
    assert_eq!(b.get("disk/k"), b"after-the-disk-was-freed");
    b.ok(&["audit", "--verify"]);
    b.terminate();
    detach_mounts_under(&state);
}
