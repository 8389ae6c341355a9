//! Writes own their propagation: every change, whoever makes it (an
//! admin's CLI call, dockerd through the volume plugin, OpenBao behind
//! the broker's back), reaches the mounts that show it when the change
//! is made, with no step left to its caller. Driven through the plugin
//! socket directly (as dockerd would), so the mount needs no container.

use crate::support::*;

const APP: u32 = 1000;

/// One call on the plugin socket, as dockerd makes it.
fn plugin(b: &Broker, call: &str, body: &serde_json::Value) -> serde_json::Value {
    let sock = format!("/run/docker/plugins/{}.sock", b.plugin);
    let o = std::process::Command::new("curl")
        .args(["-s", "--max-time", "30", "--unix-socket", &sock, "-X", "POST", "-d"])
        .arg(body.to_string())
        .arg(format!("http://plugin/{call}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "curl {call}: {}", stderr(&o));
    json(&o.stdout)
}

fn read_as_app(dir: &std::path::Path, file: &str) -> Result<Vec<u8>, String> {
    let o = run_as(APP, &["cat", dir.join(file).to_str().unwrap()]);
    if o.status.success() { Ok(o.stdout) } else { Err(String::from_utf8_lossy(&o.stderr).into_owned()) }
}

fn mounted(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.split(' ').nth(4) == Some(path))
}

#[test]
fn every_write_reaches_a_volume_mount_whoever_makes_it() {
    if !require_docker() || !require_bao() {
        return;
    }
    let bao = Bao::start();
    let b = Broker::start_with_plugin_config(&bao.backend_toml("prod", "200ms"));
    bao.ok(&["kv", "put", "secret/app/token", "value=t1"]);
    b.put("db/pw", b"local-1");
    b.ok(&["workload", "add", "app", "--selector", &format!("unix:uid:{APP}")]);
    b.ok(&["grant", "db/pw", "--to", "app", "--mode", "0444"]);
    b.ok(&["grant", "prod/app/*", "--to", "app", "--mode", "0444"]);

    // Bad calls change nothing: an unknown volume, an unknown workload.
    let vol = unique("vol");
    let r = plugin(&b, "VolumeDriver.Mount", &serde_json::json!({ "Name": vol, "ID": "m1" }));
    assert!(r["Err"].as_str().unwrap().contains("no keyhole volume"), "{r}");
    let r = plugin(&b, "VolumeDriver.Create", &serde_json::json!({ "Name": vol, "Opts": { "workload": "nope" } }));
    assert!(r["Err"].as_str().unwrap().contains("workload nope does not exist"), "{r}");
    assert!(b.audit_events("volume_create").is_empty() && b.audit_events("volume_mount").is_empty());

    // dockerd mounts a volume: the mount shows the workload's grants.
    let r = plugin(&b, "VolumeDriver.Create", &serde_json::json!({ "Name": vol, "Opts": { "workload": "app" } }));
    assert_eq!(r["Err"], "", "{r}");
    let r = plugin(&b, "VolumeDriver.Mount", &serde_json::json!({ "Name": vol, "ID": "m1" }));
    assert_eq!(r["Err"], "", "{r}");
    let dir = std::path::PathBuf::from(r["Mountpoint"].as_str().unwrap());
    assert!(mounted(dir.to_str().unwrap()), "{} is not a mount", dir.display());
    assert_eq!(read_as_app(&dir, "pw").unwrap(), b"local-1");
    assert_eq!(read_as_app(&dir, "token").unwrap(), b"t1");

    // An admin's writes show in the volume when the call returns.
    b.cli_in(&["secret", "rotate", "db/pw", "--stdin"], Some(b"local-2"));
    assert_eq!(read_as_app(&dir, "pw").unwrap(), b"local-2", "a rotation did not reach the volume mount");
    b.put("db/other", b"other-1");
    b.ok(&["grant", "db/other", "--to", "app", "--mode", "0444"]);
    assert_eq!(read_as_app(&dir, "other").unwrap(), b"other-1", "a grant did not reach the volume mount");
    b.ok(&["revoke", "db/pw", "--from", "app"]);
    assert!(read_as_app(&dir, "pw").is_err(), "a revoke did not reach the volume mount");

    // A change made in OpenBao reaches it within a poll.
    bao.ok(&["kv", "put", "secret/app/token", "value=t2"]);
    eventually(10, "a bao write shows in the volume mount", || read_as_app(&dir, "token").as_deref() == Ok(b"t2"));

    // In use: not removed. Unmounted: gone, then removable.
    let r = plugin(&b, "VolumeDriver.Remove", &serde_json::json!({ "Name": vol }));
    assert!(r["Err"].as_str().unwrap().contains("in use"), "{r}");
    let r = plugin(&b, "VolumeDriver.Unmount", &serde_json::json!({ "Name": vol, "ID": "m1" }));
    assert_eq!(r["Err"], "", "{r}");
    assert!(!mounted(dir.to_str().unwrap()), "the volume mount outlived its unmount");
    let r = plugin(&b, "VolumeDriver.Remove", &serde_json::json!({ "Name": vol }));
    assert_eq!(r["Err"], "", "{r}");
    for e in ["volume_create", "volume_mount", "volume_unmount", "volume_remove"] {
        assert_eq!(b.audit_events(e).len(), 1, "one {e} line");
    }
    for e in ["rotate", "grant", "revoke"] {
        assert!(b.audit_events(e).iter().all(|l| l["reason"].is_null()), "{e} audited as failed");
    }
}
