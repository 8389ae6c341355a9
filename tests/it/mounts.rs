//! Real FUSE mounts with unix selectors: the granted uid reads, others are
//! denied at open, and every change is visible on the next open.

use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;

use crate::support::*;

const APP: u32 = 1000;
const OTHER: u32 = 1001;

fn cat_as(uid: u32, path: &std::path::Path) -> Result<Vec<u8>, String> {
    let o = run_as(uid, &["cat", path.to_str().unwrap()]);
    if o.status.success() { Ok(o.stdout) } else { Err(String::from_utf8_lossy(&o.stderr).into_owned()) }
}

#[test]
fn only_the_workloads_callers_read_and_every_open_is_audited() {
    needs!(root);
    let b = Broker::start();
    b.put("db/password", b"mount-secret-v1-8b1f");
    b.ok(&["workload", "add", "app", "--selector", &format!("unix:uid:{APP}")]);
    // 0444 so the kernel's permission check lets everyone through to ours.
    b.ok(&["grant", "db/password", "--to", "app", "--mode", "0444"]);
    let file = b.mount("app").join("password");
    let md = std::fs::metadata(&file).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.len()), (0o444, 0, 20));

    assert_eq!(cat_as(APP, &file).unwrap(), b"mount-secret-v1-8b1f");
    assert!(cat_as(OTHER, &file).unwrap_err().contains("Permission denied"));
    // Host root is not the workload either.
    let e = std::fs::read(&file).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);

    let reads = b.audit_events("read");
    assert_eq!(reads.len(), 1);
    assert_eq!((reads[0]["caller"]["uid"].as_u64(), reads[0]["workload"].as_str()), (Some(APP as u64), Some("app")));
    assert_eq!((reads[0]["path"].as_str(), reads[0]["version"].as_u64()), (Some("db/password"), Some(1)));
    assert!(reads[0]["caller"]["pid"].as_u64().unwrap() > 0);
    let denies: Vec<_> = b.audit_events("deny").into_iter().filter(|d| d["workload"] == "app").collect();
    let uids: Vec<u64> = denies.iter().map(|d| d["caller"]["uid"].as_u64().unwrap()).collect();
    assert_eq!(uids, [OTHER as u64, 0]);
    assert!(denies.iter().all(|d| d["reason"] == "caller does not match the workload"));
    b.ok(&["audit", "--verify"]);
    b.assert_never_leaked(&[b"mount-secret-v1-8b1f"]);
}

#[test]
fn owner_and_mode_come_from_the_grant() {
    needs!(root);
    let b = Broker::start();
    b.put("tls/key", b"k");
    b.ok(&["workload", "add", "app", "--selector", &format!("unix:uid:{APP}")]);
    b.ok(&["grant", "tls/key", "--to", "app", "--file", "server.key", "--uid", "1000", "--gid", "1000"]);
    let file = b.mount("app").join("server.key");
    let md = std::fs::metadata(&file).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o400, APP, APP));
    assert_eq!(cat_as(APP, &file).unwrap(), b"k");
    // Names that are not granted do not exist.
    assert_eq!(std::fs::metadata(b.mount("app").join("key")).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(std::fs::metadata(b.mount("app").join("../app/x")).unwrap_err().kind(), ErrorKind::NotFound);
    // Read-only: no writes, no new files, no renames.
    assert!(std::fs::OpenOptions::new().write(true).open(&file).is_err());
    assert!(std::fs::write(b.mount("app").join("new"), b"x").is_err());
    assert!(std::fs::rename(&file, b.mount("app").join("moved")).is_err());
    assert_fails(&b.cli(&["grant", "tls/key", "--to", "app", "--mode", "0600"]), 2, "only read bits");
    assert_fails(&b.cli(&["grant", "tls/key", "--to", "nobody"]), 3, "workload nobody does not exist");
    assert_fails(&b.cli(&["grant", "../x", "--to", "app"]), 2, "'.' or '..'");
}

#[test]
fn rotation_grant_and_revoke_show_on_the_next_open() {
    needs!(root);
    let b = Broker::start();
    b.put("db/password", b"rot-v1");
    b.ok(&["workload", "add", "app", "--selector", &format!("unix:uid:{APP}")]);
    b.ok(&["grant", "db/*", "--to", "app", "--mode", "0444"]);
    let dir = b.mount("app");
    assert_eq!(cat_as(APP, &dir.join("password")).unwrap(), b"rot-v1");

    // A file opened before a rotation keeps the version it opened; the
    // next open sees the new one. (Root holds the fd: run it as APP.)
    let held = std::process::Command::new("sh")
        .args(["-c", &format!("exec 3<{0}; sleep 1; cat <&3", dir.join("password").display())])
        .uid(APP)
        .gid(APP)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    b.cli_in(&["secret", "rotate", "db/password", "--stdin"], Some(b"rot-v2-longer"));
    assert_eq!(cat_as(APP, &dir.join("password")).unwrap(), b"rot-v2-longer");
    let old = held.wait_with_output().unwrap().stdout;
    assert_eq!(old, b"rot-v1", "an open file changed under its reader");

    // A secret put later under the prefix appears; one removed goes.
    b.put("db/user", b"admin");
    assert_eq!(cat_as(APP, &dir.join("user")).unwrap(), b"admin");
    b.ok(&["secret", "rm", "db/user"]);
    assert_eq!(std::fs::metadata(dir.join("user")).unwrap_err().kind(), ErrorKind::NotFound);

    // Revoke: gone at once, for a caller that just read it.
    b.ok(&["revoke", "db/*", "--from", "app"]);
    assert!(cat_as(APP, &dir.join("password")).unwrap_err().contains("No such file"));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let mounts = json(&b.ok(&["mounts", "--json"]));
    assert_eq!(mounts[0]["files"], serde_json::json!([]));

    // Removing the workload removes its mount.
    b.ok(&["grant", "db/password", "--to", "app"]);
    let r = String::from_utf8(b.ok(&["workload", "rm", "app"])).unwrap();
    assert_eq!(r, "workload app removed (1 grants)\n");
    assert!(!dir.exists());
    assert_eq!(json(&b.ok(&["mounts", "--json"])), serde_json::json!([]));
}

#[test]
fn mounts_come_back_after_a_restart_or_a_kill_9() {
    needs!(root);
    let mut b = Broker::start();
    b.put("k", b"survives");
    b.ok(&["workload", "add", "app", "--selector", &format!("unix:uid:{APP}")]);
    b.ok(&["grant", "k", "--to", "app", "--mode", "0444"]);
    let file = b.mount("app").join("k");
    // A clean stop detaches a mount no container holds (tests/it/docker.rs
    // covers one that a container holds: it stays for the next broker).
    assert!(b.terminate().success());
    assert!(cat_as(APP, &file).unwrap_err().contains("No such file"));
    b.restart();
    assert_eq!(cat_as(APP, &file).unwrap(), b"survives");
    // kill -9 leaves a dead mount; the next broker mounts over it.
    b.kill9();
    assert!(cat_as(APP, &file).unwrap_err().contains("Transport endpoint is not connected"));
    b.restart();
    assert_eq!(cat_as(APP, &file).unwrap(), b"survives");
    assert_eq!(b.log().matches("mounted over the mount a previous broker left").count(), 1);
    // Removing the workload detaches every layer stacked at its mount point.
    b.ok(&["workload", "rm", "app"]);
    assert!(!b.mount("app").exists());
    let layers = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!layers.contains(&format!("{} ", b.mount("app").display())), "layers left at a removed workload");
}

#[test]
fn workload_and_grant_listing() {
    needs!(root);
    let b = Broker::start();
    b.ok(&["workload", "add", "web", "--selector", "docker:label:app=web", "--selector", "unix:uid:0"]);
    assert_fails(&b.cli(&["workload", "add", "web", "--selector", "unix:uid:1"]), 7, "workload web exists");
    assert_fails(&b.cli(&["workload", "add", "bad", "--selector", "k8s:ns:x"]), 2, "is not one of");
    assert_eq!(b.cli(&["workload", "add", "nosel"]).status.code(), Some(2));
    assert_fails(&b.cli(&["workload", "add", "../x", "--selector", "unix:uid:1"]), 2, "workload name");
    let w = json(&b.ok(&["workload", "ls", "--json"]));
    assert_eq!(w, serde_json::json!([{ "name": "web", "selectors": ["unix:uid:0", "docker:label:app=web"] }]));
    b.ok(&["grant", "db/password", "--to", "web", "--file", "DB_PASSWORD", "--uid", "101"]);
    b.ok(&["grant", "api/*", "--to", "web", "--mode", "0440"]);
    let g = json(&b.ok(&["grants", "--workload", "web", "--json"]));
    assert_eq!(g[0]["secret"], "api/*");
    assert_eq!(g[0]["mode"], "0440");
    assert_eq!((g[1]["file"].as_str(), g[1]["uid"].as_u64()), (Some("DB_PASSWORD"), Some(101)));
    assert_fails(&b.cli(&["revoke", "db/other", "--from", "web"]), 3, "db/other is not granted to web");
    let admin_only = cli_as(&b.workload_socket(), &["grant", "x", "--to", "web"], None, Some(65534));
    assert_fails(&admin_only, 4, "needs an admin caller");
}

#[test]
fn a_caller_outside_the_brokers_pid_namespace_is_denied() {
    needs!(root);
    let mut b = Broker::start();
    b.put("k", b"pid-zero-must-not-read");
    b.ok(&["workload", "add", "app", "--selector", &format!("unix:uid:{APP}")]);
    b.ok(&["grant", "k", "--to", "app", "--mode", "0444"]);
    assert!(b.terminate().success());
    // The same broker in a pid namespace of its own: every host process
    // reaches it as pid 0, which cannot be attested. (--kill-child: the
    // broker must die with unshare, not outlive the test.)
    let mut child = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", BIN])
        .args(b.serve_args())
        .stdout(std::process::Stdio::null())
        .stderr(b.log_file())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while b.log().matches("keyhole is serving").count() < 2 {
        assert!(std::time::Instant::now() < deadline, "broker did not start:\n{}", b.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let err = cat_as(APP, &b.mount("app").join("k"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(err.unwrap_err().contains("Permission denied"));
    let deny = b.audit_events("deny").pop().unwrap();
    assert!(deny["reason"].as_str().unwrap().contains("outside the broker's pid namespace"), "{deny}");
}
