//! Red team 3 (helper F): attacks on what the last round added — teams,
//! templates, leases, Podman attestation, refresh, the admin API's rate
//! buckets — each as the exploit that worked before its fix.

use std::io::BufRead;
use std::process::{Command, Output, Stdio};

use crate::support::*;

/// The owner of the user namespace in these tests, and the host uids its
/// processes run as (a subordinate range, as `newuidmap` would map).
const F_NS_OWNER: u32 = 4600;
const F_SUBUID: u32 = 210_000;

/// A process of `F_NS_OWNER` in a user namespace of its own, whose ids
/// 0..100 are host ids `F_SUBUID`.. (root writes the maps, as the setuid
/// `newuidmap` does for a user with a /etc/subuid range).
fn f_subuid_namespace() -> std::process::Child {
    let owner = F_NS_OWNER.to_string();
    let holder = Command::new("setpriv")
        .args(["--reuid", &owner, "--regid", &owner, "--clear-groups", "unshare", "-U", "sleep", "120"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = holder.id();
    let own = std::fs::read_link("/proc/self/ns/user").unwrap();
    eventually(10, "the holder's user namespace", || {
        std::fs::read_link(format!("/proc/{pid}/ns/user")).is_ok_and(|ns| ns != own)
    });
    let map = format!("0 {F_SUBUID} 100\n");
    std::fs::write(format!("/proc/{pid}/uid_map"), &map).unwrap();
    std::fs::write(format!("/proc/{pid}/gid_map"), &map).unwrap();
    holder
}

/// `cmd` as `uid` inside the namespace of `holder` (host uid `F_SUBUID + uid`).
fn f_in_ns(holder: u32, uid: u32, cmd: &[&str]) -> Command {
    let (t, u) = (holder.to_string(), uid.to_string());
    let mut c = Command::new("nsenter");
    c.args(["-t", &t, "-U", "--setuid", &u, "--setgid", &u]).args(cmd);
    c
}

/// Finding: the per-caller connection share was keyed by host uid, and a
/// user with subordinate uids is thousands of host uids: 8 of its uids
/// held 8 shares. They are one caller (the namespace's owner), as its
/// denials already were: all of them together keep one share.
#[test]
fn redteam3_host_uids_of_one_users_namespace_share_one_connection_limit() {
    needs!(root);
    let b = Broker::start_with("[limits]\nmax_connections = 1000\nmax_connections_per_caller = 20\n");
    let mut ns = f_subuid_namespace();
    let ws = b.workload_socket();
    let mut holders = Vec::new();
    let mut kept = 0;
    for uid in 1..=8 {
        let mut child = f_in_ns(ns.id(), uid, &["python3", "-c", HOLD_UNIX, ws.to_str().unwrap(), "40", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        let (_, n) = parse_flood(&line);
        eprintln!("host uid {}: {n} connections kept", F_SUBUID + uid);
        kept += n;
        holders.push(child);
    }
    for mut h in holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    let _ = ns.kill();
    let _ = ns.wait();
    assert!(kept <= 20, "one user's namespace kept {kept} connections as 8 host uids (limit 20 a caller)");
    assert!(kept >= 19, "the namespace's own share was not served: {kept}");
}

/// Finding: `calls_per_second` was a bucket per host uid, so a user with
/// subordinate uids had one per uid (and could fill the 10,000 buckets,
/// after which every new caller is refused). One namespace is one bucket.
#[test]
fn redteam3_host_uids_of_one_users_namespace_share_one_call_bucket() {
    needs!(root);
    let b = Broker::start_with("[limits]\ncalls_per_second = 1\n");
    let mut ns = f_subuid_namespace();
    let ws = b.workload_socket();
    let mut refused = 0;
    let mut served = 0;
    for uid in 1..=6 {
        let o: Output = f_in_ns(ns.id(), uid, &[BIN, "whoami"])
            .env("KEYHOLE_SOCKET", &ws)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if o.status.success() {
            served += 1;
        } else if stderr(&o).contains("too many calls") {
            refused += 1;
        } else {
            panic!("whoami as {uid}: {}", stderr(&o));
        }
    }
    let _ = ns.kill();
    let _ = ns.wait();
    eprintln!("6 host uids of one namespace: {served} served, {refused} refused (calls_per_second = 1)");
    assert!(served >= 1, "the namespace's own bucket was not served");
    assert!(refused >= 3, "6 uids of one user's namespace had a bucket each: {served} served");
}

/// A scoped admin with `grant` on its own workloads.
const F_TEAM: u32 = 41501;

/// Finding: a role's paths were parsed as grant targets, so a role could
/// name `@template/NAME`, `dynamic:NAME` or `cert:NAME` — and its scoped
/// admin then granted that template (which reads secrets far outside the
/// role's paths) to a workload of its own and read them. Only full admins
/// grant templates and lease sources (0.2.0): a role's paths are secret
/// paths, and such a role is refused.
#[test]
fn redteam3_a_role_cannot_name_a_template_or_lease_source_as_a_path() {
    needs!(root);
    let b = Broker::start();
    b.put("prod/db", b"prod-db-value-5be1c0");
    b.put("a/x", b"team-a-value");
    let t = b.cli_in(&["template", "put", "t", "--stdin"], Some(b"{{ secret('prod/db') }}"));
    assert!(t.status.success(), "{}", stderr(&t));
    let role = |paths: &[&str]| {
        let principal = format!("uid:{F_TEAM}");
        let mut args = vec!["role", "add", "team-a", "--principal", &principal];
        for p in paths {
            args.extend(["--paths", p]);
        }
        args.extend(["--workloads", "a-*", "--verbs", "grant,workload"]);
        b.cli(&args)
    };
    let r = role(&["a/*", "@template/t"]);
    let mut read = false;
    if r.status.success() {
        // The exploit, as it went: a workload of the admin's own uid,
        // the template granted to it, prod/db read.
        let as_team = |args: &[&str]| cli_as(&b.workload_socket(), args, None, Some(F_TEAM));
        let w = as_team(&["workload", "add", "a-web", "--selector", &format!("unix:uid:{F_TEAM}")]);
        assert!(w.status.success(), "{}", stderr(&w));
        let uid = F_TEAM.to_string();
        let g = as_team(&["grant", "--template", "t", "--to", "a-web", "--file", "x", "--uid", &uid]);
        eprintln!("scoped grant of the template: {:?} {}", g.status, stderr(&g));
        let file = b.mount("a-web").join("x");
        read = eventually_read(&file, b"prod-db-value-5be1c0");
    }
    assert!(!r.status.success(), "a role named @template/t as a path (its admin read prod/db: {read})");
    assert!(stderr(&r).contains("@template/t"), "{}", stderr(&r));
    for p in ["dynamic:pg", "cert:web"] {
        assert!(!role(&["a/*", p]).status.success(), "a role may name {p} as a path");
    }
    assert!(role(&["a/*"]).status.success(), "a role of secret paths is still made");
}

/// Whether `file` (read as `F_TEAM`) shows `want` within a few seconds.
fn eventually_read(file: &std::path::Path, want: &[u8]) -> bool {
    for _ in 0..50 {
        let o = run_as(F_TEAM, &["cat", file.to_str().unwrap()]);
        if contains(&o.stdout, want) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}
