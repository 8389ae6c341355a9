//! A rotation in place: a rotated file keeps its inode when nothing holds
//! the old version open (the kernel is told to drop the file's pages and
//! attributes), and gets a new one when something does, so a file opened
//! before a rotation keeps reading the version it opened. Either way the
//! next open reads the new value, whole, the moment the call returns.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::support::*;

/// Values of different lengths, so a stale size or a stale page shows.
fn value(i: usize) -> Vec<u8> {
    let len = [11, 300, 1, 5000, 64][i % 5];
    vec![b'a' + (i % 26) as u8; len]
}

fn rotate(b: &Broker, path: &str, v: &[u8]) {
    let o = b.cli_in(&["secret", "rotate", path, "--stdin"], Some(v));
    assert!(o.status.success(), "rotate: {}", stderr(&o));
}

/// A reader that never asks for the file's size first (busybox `cat`,
/// nginx: `sendfile`, so the kernel's splice path, which trusts the size
/// it has) must get the new value whole after a rotation, longer or
/// shorter. Keeping a rotated file's inode broke this (the size stayed
/// the old one's: a longer value came back cut); each version is a new
/// inode again.
#[test]
fn after_a_rotation_a_sendfile_reader_gets_the_new_value_whole() {
    if !require_root() {
        return;
    }
    let b = Broker::start();
    b.put("db/pass", &value(0));
    b.ok(&["workload", "add", "app", "--selector", "unix:uid:0"]);
    b.ok(&["grant", "db/pass", "--to", "app"]);
    let file = b.mount("app").join("pass");
    let sendfile_cat = || {
        let o = std::process::Command::new("busybox").arg("cat").arg(&file).output().unwrap();
        assert!(o.status.success(), "busybox cat: {}", stderr(&o));
        o.stdout
    };
    // Read, so the kernel caches the entry, the attributes and the page.
    assert_eq!(sendfile_cat(), value(0));
    for (i, v) in [value(1), b"short".to_vec(), value(3), b"a-much-longer-value-than-any-before-it".to_vec()]
        .into_iter()
        .enumerate()
    {
        rotate(&b, "db/pass", &v);
        assert_eq!(sendfile_cat(), v, "rotation {i}: a stale size or page");
        assert_eq!(std::fs::read(&file).unwrap(), v);
    }
}

#[test]
fn a_file_open_across_a_rotation_keeps_its_version_and_its_inode() {
    if !require_root() {
        return;
    }
    let b = Broker::start();
    b.put("db/pass", b"old-version");
    b.ok(&["workload", "add", "app", "--selector", "unix:uid:0"]);
    b.ok(&["grant", "db/pass", "--to", "app"]);
    let file = b.mount("app").join("pass");
    assert_eq!(std::fs::read(&file).unwrap(), b"old-version");
    let ino = std::fs::metadata(&file).unwrap().ino();

    // Held open (and read once, so its page is cached) across a rotation.
    let mut held = std::fs::File::open(&file).unwrap();
    let mut first = [0u8; 3];
    held.read_exact(&mut first).unwrap();
    rotate(&b, "db/pass", b"the-new-and-longer-version");
    // New opens see the new version, on a new inode.
    let md = std::fs::metadata(&file).unwrap();
    assert_ne!(md.ino(), ino, "the held version's inode was reused");
    assert_eq!(std::fs::read(&file).unwrap(), b"the-new-and-longer-version");
    // The held file reads on in the version it opened.
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    assert_eq!([&first[..], &rest].concat(), b"old-version", "an open file changed under its reader");
    assert_eq!(held.metadata().unwrap().len(), 11);
    drop(held);

    // Every version is an inode of its own, held or not.
    let new_ino = md.ino();
    rotate(&b, "db/pass", b"third");
    assert_ne!(std::fs::metadata(&file).unwrap().ino(), new_ino);
    assert_eq!(std::fs::read(&file).unwrap(), b"third");
}

#[test]
fn readers_during_rotations_see_whole_values_and_never_an_old_one_after_the_call() {
    if !require_root() {
        return;
    }
    let b = Broker::start();
    b.put("db/pass", &value(0));
    b.ok(&["workload", "add", "app", "--selector", "unix:uid:0"]);
    b.ok(&["grant", "db/pass", "--to", "app"]);
    let file = b.mount("app").join("pass");
    let stop = AtomicBool::new(false);
    let rounds = 30;
    /// Stops the readers however the scope ends (a failed assertion too).
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop = Stop(&stop);
        // Readers loop open+read+close; every read is some whole value.
        let readers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut reads = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let got = std::fs::read(&file).unwrap();
                        assert!((0..=rounds).any(|i| got == value(i)), "a torn read: {} bytes", got.len());
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for i in 1..=rounds {
            rotate(&b, "db/pass", &value(i));
            assert_eq!(std::fs::read(&file).unwrap(), value(i), "rotation {i}: an old value after the call");
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
    });
}
