//! The store on disk: tampering is detected and never served (the broker
//! refuses to start on it; replays: tests/it/replay.rs); keys and files
//! with loose permissions are refused.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::support::*;

const VALUES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("values");
const HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("heads");

/// Edit the stopped broker's store as an attacker with file access would.
fn edit_store(b: &Broker, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = Database::open(b.state().join("store.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    f(&txn);
    txn.commit().unwrap();
}

fn sealed(b: &Broker, path: &str, version: u64) -> Vec<u8> {
    let db = Database::open(b.state().join("store.redb")).unwrap();
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(VALUES).unwrap();
    t.get((path, version)).unwrap().unwrap().value().to_vec()
}

fn serve_fails(b: &Broker) -> String {
    let out = b.serve_command().stderr(Stdio::piped()).output().unwrap();
    assert!(!out.status.success(), "broker started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `serve` must refuse to start (exit 6, as for tampering) naming it.
fn refuses_tampered(b: &Broker) {
    let out = b.serve_command().stderr(Stdio::piped()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("integrity check failed") && err.contains("Nothing is served"), "{err}");
}

#[test]
fn a_flipped_byte_or_a_swapped_record_is_reported_not_served() {
    needs!(root);
    let mut b = Broker::start();
    b.put("a", b"value-of-a-1d4e");
    b.put("b", b"value-of-b-93c2");
    b.put("c", b"value-of-c-0f7a");
    b.put("c", b"value-of-c2-aa01");
    assert!(b.terminate().success());
    // Every record is bound into the store's sealed manifest: any edit is
    // caught at start, before anything is served.
    let original = sealed(&b, "a", 1);
    for i in [0, 5, 13, 20] {
        let mut rec = original.clone();
        rec[i] ^= 0x20;
        edit_store(&b, |t| {
            t.open_table(VALUES).unwrap().insert(("a", 1), rec.as_slice()).unwrap();
        });
        refuses_tampered(&b);
    }
    // b's record moved under a's name: authentic ciphertext, wrong place.
    let theirs = sealed(&b, "b", 1);
    edit_store(&b, |t| {
        t.open_table(VALUES).unwrap().insert(("a", 1), theirs.as_slice()).unwrap();
    });
    refuses_tampered(&b);
    edit_store(&b, |t| {
        t.open_table(VALUES).unwrap().insert(("a", 1), original.as_slice()).unwrap();
    });
    // c's old version swapped in for its current one (a rollback).
    let (old, current) = (sealed(&b, "c", 1), sealed(&b, "c", 2));
    edit_store(&b, |t| {
        t.open_table(VALUES).unwrap().insert(("c", 2), old.as_slice()).unwrap();
    });
    refuses_tampered(&b);
    edit_store(&b, |t| {
        t.open_table(VALUES).unwrap().insert(("c", 2), current.as_slice()).unwrap();
    });
    // The version list is sealed too: a's list swapped for c's.
    let a_list = {
        let db = Database::open(b.state().join("store.redb")).unwrap();
        let txn = db.begin_read().unwrap();
        txn.open_table(HEADS).unwrap().get("a").unwrap().unwrap().value().to_vec()
    };
    edit_store(&b, |t| {
        let mut heads = t.open_table(HEADS).unwrap();
        let c = heads.get("c").unwrap().unwrap().value().to_vec();
        heads.insert("a", c.as_slice()).unwrap();
    });
    refuses_tampered(&b);
    edit_store(&b, |t| {
        t.open_table(HEADS).unwrap().insert("a", a_list.as_slice()).unwrap();
    });
    // Put back as it was, everything serves.
    b.restart();
    assert_eq!(b.get("a"), b"value-of-a-1d4e");
    assert_eq!(b.get("b"), b"value-of-b-93c2");
    assert_eq!(b.get("c"), b"value-of-c2-aa01");
    assert_eq!(b.ok(&["secret", "get", "c", "--version", "1"]), b"value-of-c-0f7a");
    b.kill9();
    b.assert_never_leaked(&[b"value-of-a-1d4e", b"value-of-b-93c2", b"value-of-c-0f7a", b"value-of-c2-aa01"]);
}

#[test]
fn the_wrong_key_or_a_lost_key_refuses_to_start() {
    needs!(root);
    let mut b = Broker::start();
    b.put("k", b"v");
    b.kill9();
    let key = b.state().join("master.key");
    let original = std::fs::read(&key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&key, [0x42u8; 32]).unwrap();
    assert!(serve_fails(&b).contains("the master key does not open this store"));
    std::fs::write(&key, [0x42u8; 31]).unwrap();
    assert!(serve_fails(&b).contains("is 31 bytes; it must be exactly 32"));
    std::fs::remove_file(&key).unwrap();
    assert!(serve_fails(&b).contains("master key") && serve_fails(&b).contains("is missing"));
    // Restored, everything is back.
    std::fs::write(&key, &original).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
    b.restart();
    assert_eq!(b.get("k"), b"v");
}

#[test]
fn loose_permissions_are_refused_with_the_fix() {
    needs!(root);
    let mut b = Broker::start();
    let key_mode = std::fs::metadata(b.state().join("master.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o400, "a new key is created 0400");
    b.kill9();
    let cases = [("master.key", 0o644, 0o400), ("store.redb", 0o640, 0o600), ("", 0o755, 0o700)];
    for (file, loose, fixed) in cases {
        let p = b.state().join(file);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(loose)).unwrap();
        let err = serve_fails(&b);
        assert!(err.contains(&format!("has mode {loose:04o}")) && err.contains("chmod"), "{err}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(fixed)).unwrap();
    }
    b.restart();
}

#[test]
fn passphrase_mode_derives_the_key_and_rejects_a_wrong_passphrase() {
    needs!(root);
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o400)).unwrap();
    let mut b = Broker::start_with(&format!("[store]\npassphrase_file = \"{}\"\n", pass.display()));
    b.put("p", b"passphrase-protected-8e21");
    assert!(!b.state().join("master.key").exists(), "no key file in passphrase mode");
    assert!(String::from_utf8(b.ok(&["status"])).unwrap().contains("passphrase"));
    b.kill9();
    b.restart();
    assert_eq!(b.get("p"), b"passphrase-protected-8e21");
    b.kill9();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&pass, "wrong horse\n").unwrap();
    assert!(serve_fails(&b).contains("does not open this store"));
}
