//! Records written back from an older copy of the store, moved between
//! keys, or removed, and an audit log cut or deleted while no broker ran:
//! the broker refuses to start (exit 6) and serves nothing. A crash
//! (kill -9, no clean stop) is not mistaken for either.

use std::process::Stdio;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::support::*;

const HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("heads");
const GRANTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("grants");
const WORKLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("workloads");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The small redb tool of an attacker with file access to the stopped
/// broker's store.
fn store(b: &Broker) -> Database {
    Database::open(b.state().join("store.redb")).unwrap()
}

fn head(b: &Broker, path: &str) -> Vec<u8> {
    let db = store(b);
    let txn = db.begin_read().unwrap();
    txn.open_table(HEADS).unwrap().get(path).unwrap().unwrap().value().to_vec()
}

fn grants(b: &Broker) -> Vec<((String, String), Vec<u8>)> {
    let db = store(b);
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(GRANTS).unwrap();
    t.iter()
        .unwrap()
        .map(|e| {
            let (k, v) = e.unwrap();
            let (w, target) = k.value();
            ((w.to_owned(), target.to_owned()), v.value().to_vec())
        })
        .collect()
}

fn edit(b: &Broker, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = store(b);
    let txn = db.begin_write().unwrap();
    f(&txn);
    txn.commit().unwrap();
}

fn put_head(b: &Broker, path: &str, sealed: &[u8]) {
    edit(b, |t| {
        t.open_table(HEADS).unwrap().insert(path, sealed).unwrap();
    });
}

fn put_grant(b: &Broker, key: &(String, String), sealed: &[u8]) {
    edit(b, |t| {
        t.open_table(GRANTS).unwrap().insert((key.0.as_str(), key.1.as_str()), sealed).unwrap();
    });
}

/// `serve` must refuse to start: returns (exit code, stderr). If it comes
/// up instead, what it serves for `secret` is the evidence in the panic.
fn refused(b: &Broker, secret: &str) -> (Option<i32>, String) {
    let mut child = b.serve_command().stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (out.status.code(), stderr(&out));
        }
        if b.socket().exists() && b.cli(&["status"]).status.success() || Instant::now() > deadline {
            let got = b.cli(&["secret", "get", secret]);
            let grants = b.cli(&["grants"]);
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the broker started and served {secret} = {:?} (exit {:?}), grants: {}",
                String::from_utf8_lossy(&got.stdout),
                got.status.code(),
                String::from_utf8_lossy(&grants.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_refused(b: &Broker, secret: &str, words: &str) {
    let (code, err) = refused(b, secret);
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains(words), "{err}");
}

#[test]
fn an_old_head_or_a_revoked_grant_written_back_is_refused_at_start() {
    needs!(root);
    let mut b = Broker::start();
    b.put("app/key", b"old-value-7f1d");
    b.ok(&["workload", "add", "w", "--selector", "unix:uid:1000"]);
    b.ok(&["grant", "app/key", "--to", "w", "--uid", "1000"]);
    assert!(b.terminate().success());
    // The attacker's copy of the records, taken now.
    let old_head = head(&b, "app/key");
    let old_grants = grants(&b);
    assert_eq!(old_grants.len(), 1);
    b.restart();
    let o = b.cli_in(&["secret", "rotate", "app/key", "--stdin"], Some(b"new-value-2c9a"));
    assert!(o.status.success(), "{}", stderr(&o));
    b.ok(&["revoke", "app/key", "--from", "w"]);
    assert!(b.terminate().success());
    let new_head = head(&b, "app/key");
    assert!(grants(&b).is_empty());

    // The old head: the old value would be served as current.
    put_head(&b, "app/key", &old_head);
    assert_refused(&b, "app/key", "do not match its sealed manifest");
    // The revoked grant written back (and the head put right again).
    put_head(&b, "app/key", &new_head);
    put_grant(&b, &old_grants[0].0, &old_grants[0].1);
    assert_refused(&b, "app/key", "do not match its sealed manifest");
    // Both at once: still refused.
    put_head(&b, "app/key", &old_head);
    assert_refused(&b, "app/key", "integrity check failed");

    // Put back exactly as it was, the store starts and serves the truth.
    put_head(&b, "app/key", &new_head);
    edit(&b, |t| {
        let k = &old_grants[0].0;
        t.open_table(GRANTS).unwrap().remove((k.0.as_str(), k.1.as_str())).unwrap();
    });
    b.restart();
    assert_eq!(b.get("app/key"), b"new-value-2c9a");
    assert!(!run_as(1000, &["cat", b.mount("w").join("key").to_str().unwrap()]).status.success());
    b.assert_never_leaked(&[b"old-value-7f1d", b"new-value-2c9a"]);
}

#[test]
fn a_record_moved_removed_or_the_manifest_dropped_is_refused_at_start() {
    needs!(root);
    let mut b = Broker::start();
    b.put("a", b"value-a-11");
    b.put("b", b"value-b-22");
    b.ok(&["workload", "add", "w", "--selector", "unix:uid:1000"]);
    assert!(b.terminate().success());
    let (ha, hb) = (head(&b, "a"), head(&b, "b"));
    // b's head under a's name (a moved record).
    put_head(&b, "a", &hb);
    assert_refused(&b, "a", "do not match its sealed manifest");
    put_head(&b, "a", &ha);
    // A workload removed.
    let w = {
        let db = store(&b);
        let txn = db.begin_read().unwrap();
        txn.open_table(WORKLOADS).unwrap().get("w").unwrap().unwrap().value().to_vec()
    };
    edit(&b, |t| {
        t.open_table(WORKLOADS).unwrap().remove("w").unwrap();
    });
    assert_refused(&b, "a", "do not match its sealed manifest");
    edit(&b, |t| {
        t.open_table(WORKLOADS).unwrap().insert("w", w.as_slice()).unwrap();
    });
    // The manifest removed, to pass for a store without one.
    let manifest = {
        let db = store(&b);
        let txn = db.begin_read().unwrap();
        txn.open_table(META).unwrap().get("manifest").unwrap().unwrap().value().to_vec()
    };
    edit(&b, |t| {
        t.open_table(META).unwrap().remove("manifest").unwrap();
    });
    assert_refused(&b, "a", "manifest, which is missing");
    edit(&b, |t| {
        t.open_table(META).unwrap().insert("manifest", manifest.as_slice()).unwrap();
    });
    b.restart();
    assert_eq!(b.get("a"), b"value-a-11");
    assert_eq!(b.get("b"), b"value-b-22");
}

#[test]
fn an_audit_log_cut_or_deleted_while_stopped_is_refused_at_start() {
    needs!(root);
    let mut b = Broker::start();
    b.put("app/key", b"v");
    b.ok(&["secret", "history", "app/key"]);
    assert!(b.terminate().success());
    let log = b.state().join("audit.log");
    let full = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = full.lines().collect();
    // The last lines cut (the stop, and the history call before it).
    for cut in [1, 2] {
        std::fs::write(&log, lines[..lines.len() - cut].join("\n") + "\n").unwrap();
        let (code, err) = refused(&b, "app/key");
        assert_eq!(code, Some(6), "{err}");
        assert!(err.contains("does not hold the head the store sealed"), "{err}");
        assert!(err.contains("--new-audit-log"), "{err}");
    }
    std::fs::write(&log, &full).unwrap();
    b.restart();
    assert!(b.terminate().success());
    // Deleted.
    std::fs::remove_file(&log).unwrap();
    let (code, err) = refused(&b, "app/key");
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("ends at line 0"), "{err}");
    // The operator accepts the loss knowingly: a new log, the gap audited.
    let mut fresh = b.serve_command().arg("--new-audit-log").spawn().unwrap();
    eventually(30, "the broker to start with --new-audit-log", || b.cli(&["status"]).status.success());
    assert_eq!(b.audit_events("audit_reset").len(), 1);
    signal(fresh.id() as i32, libc::SIGTERM);
    assert!(fresh.wait().unwrap().success());
    // And from then on it starts as usual.
    b.restart();
    assert_eq!(b.get("app/key"), b"v");
    b.ok(&["audit", "--verify"]);
}

#[test]
fn kill_9_without_a_clean_stop_still_starts() {
    needs!(root);
    let mut b = Broker::start();
    for round in 0..6u64 {
        b.put(&format!("k/{round}"), format!("v{round}").as_bytes());
        b.ok(&["secret", "ls"]);
        if round == 3 {
            // Long enough for a periodic seal of the audit head.
            std::thread::sleep(Duration::from_secs(4));
            b.ok(&["secret", "ls"]);
        }
        b.kill9();
        b.restart();
        assert_eq!(b.get(&format!("k/{round}")), format!("v{round}").as_bytes());
    }
    b.ok(&["audit", "--verify"]);
}

#[test]
fn a_store_from_before_manifests_is_upgraded_once_and_says_so() {
    needs!(root);
    let mut b = Broker::start();
    b.put("app/key", b"kept-across-the-upgrade");
    assert!(b.terminate().success());
    // As keyhole 0.1 left a store: its key check, and no manifest.
    let key = std::fs::read(b.state().join("master.key")).unwrap();
    let sealer = keyhole::crypto::MasterKey::from_bytes(&key).unwrap().sealer();
    edit(&b, |t| {
        let mut meta = t.open_table(META).unwrap();
        meta.remove("manifest").unwrap();
        let check = sealer.seal(b"keyhole local store v1", b"keyhole/v1/keycheck").unwrap();
        meta.insert("keycheck", check.as_slice()).unwrap();
    });
    b.restart();
    assert_eq!(b.get("app/key"), b"kept-across-the-upgrade");
    assert!(b.log().contains("upgraded a keyhole 0.1 store"), "{}", b.log());
    assert!(b.terminate().success());
    // Once upgraded, it is held to its manifest.
    edit(&b, |t| {
        t.open_table(META).unwrap().remove("manifest").unwrap();
    });
    assert_refused(&b, "app/key", "manifest, which is missing");
}
