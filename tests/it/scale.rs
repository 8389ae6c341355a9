//! A change touches only the mounts that show it: the broker finds them
//! in an index of every mount's grants (exact paths and prefixes). These
//! tests check, right after each call returns, that every mount that
//! shows a secret sees the change and that the others are as they were —
//! so an index entry that is not kept up to date fails here.

use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::support::*;

fn read(p: &Path) -> Option<Vec<u8>> {
    match std::fs::read(p) {
        Ok(v) => Some(v),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("{}: {e}", p.display()),
    }
}

fn rotate(b: &Broker, path: &str, value: &[u8]) {
    let o = b.cli_in(&["secret", "rotate", path, "--stdin"], Some(value));
    assert!(o.status.success(), "rotate {path}: {}", stderr(&o));
}

fn ino(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

#[test]
fn a_change_reaches_the_mounts_that_show_it_and_no_other() {
    needs!(root);
    let b = Broker::start();
    b.put("app/db/pass", b"pass-1");
    b.put("app/db/user", b"user-1");
    b.put("other/x", b"x-1");
    for w in ["a", "b", "c", "d"] {
        b.ok(&["workload", "add", w, "--selector", "unix:uid:0"]);
    }
    // a: the prefix; b: another secret; c: one secret under a's prefix,
    // exactly; d: both the prefix and that secret under another name.
    b.ok(&["grant", "app/db/*", "--to", "a"]);
    b.ok(&["grant", "other/x", "--to", "b"]);
    b.ok(&["grant", "app/db/user", "--to", "c"]);
    b.ok(&["grant", "app/db/*", "--to", "d"]);
    b.ok(&["grant", "app/db/pass", "--to", "d", "--file", "exact"]);
    let (a, bm, c, d) = (b.mount("a"), b.mount("b"), b.mount("c"), b.mount("d"));
    assert_eq!(read(&a.join("pass")).as_deref(), Some(&b"pass-1"[..]));
    assert_eq!(read(&a.join("user")).as_deref(), Some(&b"user-1"[..]));
    let (b_ino, c_ino) = (ino(&bm.join("x")), ino(&c.join("user")));

    // A rotate through a prefix: seen where the prefix is granted, as the
    // call returns; the others are untouched (same inode, same value).
    rotate(&b, "app/db/pass", b"pass-2");
    assert_eq!(read(&a.join("pass")).as_deref(), Some(&b"pass-2"[..]));
    assert_eq!(read(&d.join("pass")).as_deref(), Some(&b"pass-2"[..]));
    assert_eq!(read(&d.join("exact")).as_deref(), Some(&b"pass-2"[..]));
    assert_eq!(read(&c.join("pass")), None);
    assert_eq!((ino(&bm.join("x")), ino(&c.join("user"))), (b_ino, c_ino));
    assert_eq!(read(&c.join("user")).as_deref(), Some(&b"user-1"[..]));

    // An exact grant: the rotate reaches c, and a and d by their prefix.
    rotate(&b, "app/db/user", b"user-2");
    for m in [&a, &c, &d] {
        assert_eq!(read(&m.join("user")).as_deref(), Some(&b"user-2"[..]), "{}", m.display());
    }
    assert_eq!(ino(&bm.join("x")), b_ino);

    // A new secret under a granted prefix appears (its '/' as '_'), in
    // the prefix's mounts only; rm takes it away again.
    b.put("app/db/replica/host", b"host-1");
    assert_eq!(read(&a.join("replica_host")).as_deref(), Some(&b"host-1"[..]));
    assert_eq!(read(&d.join("replica_host")).as_deref(), Some(&b"host-1"[..]));
    assert_eq!(read(&c.join("replica_host")), None);
    b.put("app/dbx", b"not under the prefix");
    assert_eq!(read(&a.join("x")), None);
    b.ok(&["secret", "rm", "app/db/replica/host"]);
    assert_eq!(read(&a.join("replica_host")), None);
    assert_eq!(read(&d.join("replica_host")), None);

    // A secret that d shows twice: the exact grant stays when the prefix
    // goes, and a later rotate still reaches it (the index follows grants).
    b.ok(&["revoke", "app/db/*", "--from", "d"]);
    assert_eq!(read(&d.join("pass")), None);
    rotate(&b, "app/db/pass", b"pass-3");
    assert_eq!(read(&d.join("exact")).as_deref(), Some(&b"pass-3"[..]));
    assert_eq!(read(&a.join("pass")).as_deref(), Some(&b"pass-3"[..]));
    b.put("app/db/late", b"late-1");
    assert_eq!(read(&d.join("late")), None);
    assert_eq!(read(&a.join("late")).as_deref(), Some(&b"late-1"[..]));

    // A revoked prefix is out of the index: its secrets no longer reach a.
    b.ok(&["revoke", "app/db/*", "--from", "a"]);
    assert_eq!(read(&a.join("pass")), None);
    b.put("app/db/later", b"later-1");
    assert_eq!(read(&a.join("later")), None);
    // Granted again: the current values, and news reach it again.
    b.ok(&["grant", "app/db/*", "--to", "a"]);
    assert_eq!(read(&a.join("later")).as_deref(), Some(&b"later-1"[..]));
    rotate(&b, "app/db/later", b"later-2");
    assert_eq!(read(&a.join("later")).as_deref(), Some(&b"later-2"[..]));

    // A workload removed and added again under the same name: a fresh,
    // empty mount, which news of its old grants do not reach.
    b.ok(&["workload", "rm", "c"]);
    assert!(!c.join("user").exists());
    b.ok(&["workload", "add", "c", "--selector", "unix:uid:0"]);
    rotate(&b, "app/db/user", b"user-3");
    assert_eq!(read(&c.join("user")), None);
    assert_eq!(read(&a.join("user")).as_deref(), Some(&b"user-3"[..]));
    b.ok(&["grant", "app/db/user", "--to", "c"]);
    assert_eq!(read(&c.join("user")).as_deref(), Some(&b"user-3"[..]));
    assert_eq!(read(&bm.join("x")).as_deref(), Some(&b"x-1"[..]));
    b.assert_never_leaked(&[b"pass-1", b"pass-2", b"pass-3"]);
}

#[test]
fn a_restarted_broker_builds_its_index_again() {
    needs!(root);
    let mut b = Broker::start();
    b.put("svc/a/token", b"t-1");
    b.ok(&["workload", "add", "w", "--selector", "unix:uid:0"]);
    b.ok(&["grant", "svc/*", "--to", "w"]);
    b.takeover();
    rotate(&b, "svc/a/token", b"t-2");
    assert_eq!(read(&b.mount("w").join("a_token")).as_deref(), Some(&b"t-2"[..]));
    assert!(b.terminate().success());
    b.restart();
    b.put("svc/b", b"b-1");
    assert_eq!(read(&b.mount("w").join("b")).as_deref(), Some(&b"b-1"[..]));
    assert_eq!(read(&b.mount("w").join("a_token")).as_deref(), Some(&b"t-2"[..]));
}
