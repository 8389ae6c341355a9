//! The store on disk: tampering is detected and never served; keys and
//! files with loose permissions are refused.

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

#[test]
fn a_flipped_byte_or_a_swapped_record_is_reported_not_served() {
    if !require_root() {
        return;
    }
    let mut b = Broker::start();
    b.put("a", b"value-of-a-1d4e");
    b.put("b", b"value-of-b-93c2");
    b.put("c", b"value-of-c-0f7a");
    b.put("c", b"value-of-c2-aa01");
    assert!(b.terminate().success());

    for i in [0, 5, 13, 20] {
        let mut rec = sealed(&b, "a", 1);
        rec[i] ^= 0x20;
        edit_store(&b, |t| {
            t.open_table(VALUES).unwrap().insert(("a", 1), rec.as_slice()).unwrap();
        });
        b.restart();
        let o = b.cli(&["secret", "get", "a"]);
        assert_fails(&o, 6, "integrity check failed for a version 1");
        assert!(o.stdout.is_empty());
        b.kill9();
    }
    // b's record moved under a's name: authentic ciphertext, wrong place.
    let theirs = sealed(&b, "b", 1);
    edit_store(&b, |t| {
        t.open_table(VALUES).unwrap().insert(("a", 1), theirs.as_slice()).unwrap();
    });
    // c's old version swapped in for its current one (a rollback).
    let old = sealed(&b, "c", 1);
    edit_store(&b, |t| {
        t.open_table(VALUES).unwrap().insert(("c", 2), old.as_slice()).unwrap();
    });
    b.restart();
    assert_fails(&b.cli(&["secret", "get", "a"]), 6, "integrity check failed");
    assert_fails(&b.cli(&["secret", "get", "c"]), 6, "integrity check failed for c version 2");
    // Untouched records still serve.
    assert_eq!(b.get("b"), b"value-of-b-93c2");
    assert_eq!(b.ok(&["secret", "get", "c", "--version", "1"]), b"value-of-c-0f7a");
    b.kill9();

    // The version list is sealed too: a's list swapped for c's.
    edit_store(&b, |t| {
        let mut heads = t.open_table(HEADS).unwrap();
        let c = heads.get("c").unwrap().unwrap().value().to_vec();
        heads.insert("a", c.as_slice()).unwrap();
    });
    b.restart();
    assert_fails(&b.cli(&["secret", "history", "a"]), 6, "the version list of a");
    assert_fails(&b.cli(&["secret", "ls"]), 6, "integrity check failed");
    b.assert_never_leaked(&[b"value-of-a-1d4e", b"value-of-b-93c2", b"value-of-c-0f7a", b"value-of-c2-aa01"]);
}

#[test]
fn the_wrong_key_or_a_lost_key_refuses_to_start() {
    if !require_root() {
        return;
    }
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
    if !require_root() {
        return;
    }
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
    if !require_root() {
        return;
    }
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
