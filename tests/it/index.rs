//! The index from secrets to the mounts that show them: every way a mount
//! comes to show a secret (made with its grants, a grant added later, a
//! prefix grant, a volume-less workload re-added) is found by a rotation,
//! and a mount that stopped showing it is not. Remove one index update
//! and a rotation misses a mount here.

use crate::support::*;

fn rotate(b: &Broker, path: &str, v: &[u8]) {
    let o = b.cli_in(&["secret", "rotate", path, "--stdin"], Some(v));
    assert!(o.status.success(), "rotate: {}", stderr(&o));
}

#[test]
fn a_rotation_reaches_every_mount_however_it_came_to_show_the_secret() {
    if !require_root() {
        return;
    }
    let b = Broker::start();
    b.put("db/pass", b"v1");
    b.put("web/key", b"k1");
    // A mount made first, its grants added after it exists.
    b.ok(&["workload", "add", "late", "--selector", "unix:uid:0"]);
    let late = b.mount("late");
    assert!(late.exists());
    b.ok(&["grant", "db/pass", "--to", "late"]);
    // A prefix grant.
    b.ok(&["workload", "add", "pre", "--selector", "unix:uid:0"]);
    b.ok(&["grant", "web/*", "--to", "pre"]);
    b.ok(&["grant", "db/*", "--to", "pre"]);
    assert_eq!(std::fs::read(late.join("pass")).unwrap(), b"v1");
    assert_eq!(std::fs::read(b.mount("pre").join("pass")).unwrap(), b"v1");

    rotate(&b, "db/pass", b"v2");
    assert_eq!(std::fs::read(late.join("pass")).unwrap(), b"v2", "a grant added to a live mount was not indexed");
    assert_eq!(std::fs::read(b.mount("pre").join("pass")).unwrap(), b"v2", "a prefix grant was not indexed");
    rotate(&b, "web/key", b"k2");
    assert_eq!(std::fs::read(b.mount("pre").join("key")).unwrap(), b"k2");

    // Revoked: the index forgets it, and the file stays gone on rotations.
    b.ok(&["revoke", "db/pass", "--from", "late"]);
    rotate(&b, "db/pass", b"v3");
    assert!(!late.join("pass").exists());
    assert_eq!(std::fs::read(b.mount("pre").join("pass")).unwrap(), b"v3");

    // A workload removed and added again: its new mount is indexed anew.
    b.ok(&["workload", "rm", "late"]);
    b.ok(&["workload", "add", "late", "--selector", "unix:uid:0"]);
    b.ok(&["grant", "db/pass", "--to", "late"]);
    assert_eq!(std::fs::read(late.join("pass")).unwrap(), b"v3");
    rotate(&b, "db/pass", b"v4");
    assert_eq!(std::fs::read(late.join("pass")).unwrap(), b"v4", "a re-made mount was not indexed");
    // A secret put under a granted prefix appears, and rotates.
    b.put("db/user", b"u1");
    assert_eq!(std::fs::read(b.mount("pre").join("user")).unwrap(), b"u1");
    rotate(&b, "db/user", b"u2");
    assert_eq!(std::fs::read(b.mount("pre").join("user")).unwrap(), b"u2");
}
