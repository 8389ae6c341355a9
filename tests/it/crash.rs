//! `kill -9` in the middle of a stream of rotations loses nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::support::*;

#[test]
fn kill_9_during_rotations_keeps_every_acknowledged_version() {
    if !require_root() {
        return;
    }
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
