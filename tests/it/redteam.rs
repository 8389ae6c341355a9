//! Red-team findings that issue 14 did not name, each as the attack that
//! worked: a burst of short-lived openers that filled the broker's file
//! table with cached pidfds; one uid taking many connection shares from
//! cgroups of its own; root in a container matching a `unix:` workload;
//! a stranger's user namespace keeping every mount alive (dead) after a
//! clean stop.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::*;

const RT_NOBODY: u32 = 65534;
/// A host user granted a file in these tests.
const RT_READER: u32 = 4343;

/// `n` threads, each a task of its own, each opening `file` once and
/// exiting (at most 64 alive at once); prints how many opens succeeded.
const RT_OPENERS: &str = r#"
import sys, threading
path, n = sys.argv[1], int(sys.argv[2])
ok = [0]
lock = threading.Lock()
def one():
    try:
        with open(path, "rb") as f:
            f.read()
        with lock:
            ok[0] += 1
    except OSError:
        pass
alive = []
for i in range(n):
    t = threading.Thread(target=one)
    t.start()
    alive.append(t)
    if len(alive) >= 64:
        for t in alive:
            t.join()
        alive = []
for t in alive:
    t.join()
print(ok[0], flush=True)
"#;

fn rt_openers(uid: u32, file: &Path, n: usize) -> usize {
    let o = Command::new("python3")
        .args(["-c", RT_OPENERS, file.to_str().unwrap(), &n.to_string()])
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .output()
        .expect("python3");
    assert!(o.status.success(), "openers: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

fn rt_cat_as(uid: u32, file: &Path) -> Output {
    run_as(uid, &["cat", file.to_str().unwrap()])
}

/// Finding 1: every FUSE caller task was remembered with a pidfd until
/// 4096 of them; 1,100 openers took the broker's 1024 fds and every later
/// open failed. 5,000 openers (granted and denied) must leave the broker
/// serving, and its file table back near where it was.
#[test]
fn redteam_a_burst_of_5000_short_lived_openers_leaves_the_brokers_fds() {
    needs!(root);
    let (b, _wrapper) = broker_under_prlimit("1024:1024");
    b.put("rt/pw", b"burst-granted-7d1e");
    b.ok(&["workload", "add", "reader", "--selector", &format!("unix:uid:{RT_READER}")]);
    b.ok(&["grant", "rt/pw", "--to", "reader", "--mode", "0400", "--uid", &RT_READER.to_string()]);
    let file = b.mount("reader").join("pw");
    assert_eq!(rt_cat_as(RT_READER, &file).stdout, b"burst-granted-7d1e");
    let pid = b.pid();
    let before = fd_count(pid);
    // Granted callers and denied strangers, 2,500 tasks each.
    let granted = rt_openers(RT_READER, &file, 2500);
    let denied = rt_openers(RT_NOBODY, &file, 2500);
    let during = fd_count(pid);
    eprintln!(
        "broker fds: {before} before, {during} after 5000 openers ({granted} granted reads, {denied} stranger reads)"
    );
    assert_eq!(denied, 0, "a stranger read the file");
    assert!(granted >= 2400, "granted openers failed during the burst: {granted} of 2500 read");
    // A granted read still succeeds, and the cache gave its fds back.
    std::thread::sleep(Duration::from_millis(1500));
    let o = rt_cat_as(RT_READER, &file);
    assert_eq!(o.stdout, b"burst-granted-7d1e", "granted read after the burst: {}", stderr(&o));
    let after = fd_count(pid);
    eprintln!("broker fds after a later read: {after}");
    assert!(after <= before + 16, "the broker holds {after} fds, {before} before the burst");
    assert!(during <= before + 200, "the broker held {during} fds right after the burst ({before} before)");
}

/// Finding 4: the per-caller connection key held the caller's cgroup line,
/// and a user with a delegated cgroup picks its own. One uid in 8 cgroups
/// of its own keeps no more than `max_connections_per_caller` in all.
#[test]
fn redteam_one_uid_in_8_delegated_cgroups_gets_one_connection_share() {
    needs!(root);
    let b = Broker::start_with("[limits]\nmax_connections = 1000\nmax_connections_per_caller = 20\n");
    // A directory delegated to nobody in the v1 `name=systemd` hierarchy,
    // whose line comes first in /proc/<pid>/cgroup on this hybrid host.
    let top = Path::new("/sys/fs/cgroup/systemd").join(unique("khrt"));
    std::fs::create_dir(&top).unwrap();
    let chown = Command::new("chown")
        .arg(RT_NOBODY.to_string())
        .args([top.clone(), top.join("cgroup.procs"), top.join("tasks")])
        .output()
        .unwrap();
    assert!(chown.status.success(), "{}", stderr(&chown));
    let ws = b.workload_socket();
    let mut holders = Vec::new();
    let mut kept = 0;
    for i in 0..8 {
        let (t, ws) = (top.display(), ws.display());
        let inner =
            format!("mkdir -p {t}/c{i} && echo $$ > {t}/c{i}/cgroup.procs && exec python3 -c \"$HOLD_UNIX\" {ws} 40 0");
        let outer = format!(
            "echo $$ > {t}/cgroup.procs && exec setpriv --reuid {RT_NOBODY} --regid {RT_NOBODY} --clear-groups sh -c '{inner}'"
        );
        let mut child = Command::new("sh")
            .args(["-c", &outer])
            .env("HOLD_UNIX", HOLD_UNIX)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        let (_, n) = parse_flood(&line);
        eprintln!("cgroup c{i}: {n} connections kept");
        kept += n;
        holders.push(child);
    }
    for mut h in holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    for i in 0..8 {
        let d = top.join(format!("c{i}"));
        for _ in 0..50 {
            if std::fs::remove_dir(&d).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_dir(&top);
    assert!(kept <= 20, "one uid kept {kept} connections from 8 cgroups of its own (limit 20)");
    assert!(kept >= 19, "the uid's own share was not served: {kept}");
    let limit = b.audit_events("limit");
    assert!(!limit.is_empty(), "refusals are audited");
    assert_eq!(limit[0]["caller"]["uid"], RT_NOBODY);
}

/// Finding 6: `unix:uid:0` matched root in any container (root in a
/// container can become any uid). A workload of `unix:` selectors only
/// matches host users; one that also names containers keeps matching its
/// containers.
#[test]
fn redteam_root_in_a_container_does_not_match_a_unix_only_workload() {
    needs!(docker);
    let b = Broker::start();
    let t = unique("rtunix");
    b.put("rt/backup", b"host-only-backup-9a3c");
    b.ok(&["workload", "add", "hostbackup", "--selector", "unix:uid:0"]);
    b.ok(&["grant", "rt/backup", "--to", "hostbackup", "--mode", "0400"]);
    b.ok(&["workload", "add", "mixed", "--selector", "unix:uid:0", "--selector", &format!("docker:label:rt={t}")]);
    b.ok(&["grant", "rt/backup", "--to", "mixed", "--mode", "0400"]);
    let run = format!("{}:/r:ro,rslave", b.run().display());
    let c = Container::start(&["-v", &run, "--label", &format!("rt={t}")]);
    // Root in the container, as root and as any uid it picks.
    let err = c.cat("/r/workloads/hostbackup/backup").unwrap_err();
    assert!(err.contains("Permission denied"), "{err}");
    let deny = b.audit_events("deny");
    assert!(!deny.is_empty(), "no deny line");
    assert_eq!(deny[0]["caller"]["container_id"], c.id.as_str(), "{}", deny[0]);
    // The mixed workload: the labelled container as root reads.
    assert_eq!(c.cat("/r/workloads/mixed/backup").unwrap(), b"host-only-backup-9a3c");
    // Host root reads the host-only workload, also from a mount namespace
    // of its own (`unshare -m`).
    let file = b.mount("hostbackup").join("backup");
    assert_eq!(std::fs::read(&file).unwrap(), b"host-only-backup-9a3c");
    let o = Command::new("unshare").args(["-m", "--propagation", "slave", "cat"]).arg(&file).output().unwrap();
    assert_eq!(o.stdout, b"host-only-backup-9a3c", "root in its own mount ns: {}", stderr(&o));
    // Host root in a pid namespace of its own (a container by another
    // runtime would look the same): not a host user.
    let o = Command::new("unshare")
        .args(["-p", "-f", "-m", "--mount-proc", "--propagation", "slave", "cat"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!o.status.success() && stderr(&o).contains("Permission denied"), "pid ns: {}", stderr(&o));
    // The mixed workload is no host user's.
    assert!(std::fs::read(b.mount("mixed").join("backup")).is_err());
    b.assert_never_leaked(&[b"host-only-backup-9a3c"]);
}

/// A host user in a user namespace of its own (`unshare -U -r`) is still
/// that user: the kernel maps its ids, it cannot choose them.
#[test]
fn redteam_a_host_user_in_its_own_user_namespace_reads_its_grant() {
    needs!(root);
    let b = Broker::start();
    b.put("rt/mine", b"own-userns-4e1b");
    b.ok(&["workload", "add", "mine", "--selector", &format!("unix:uid:{RT_READER}")]);
    b.ok(&["grant", "rt/mine", "--to", "mine", "--mode", "0400", "--uid", &RT_READER.to_string()]);
    let file = b.mount("mine").join("mine");
    let o = run_as(RT_READER, &["unshare", "-U", "-r", "-m", "--propagation", "slave", "cat", file.to_str().unwrap()]);
    assert_eq!(o.stdout, b"own-userns-4e1b", "{}", stderr(&o));
    let o = run_as(RT_READER, &["unshare", "-U", "-r", "-p", "-f", "cat", file.to_str().unwrap()]);
    assert_eq!(o.stdout, b"own-userns-4e1b", "{}", stderr(&o));
    // Its root there is not host root.
    let o = run_as(RT_NOBODY, &["unshare", "-U", "-r", "cat", file.to_str().unwrap()]);
    assert!(!o.status.success());
}

fn rt_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = format!(" {} ", path.display());
    info.lines().any(|l| l.contains(&want))
}

/// Finding 10: a stranger's `unshare -U -r -m --propagation slave` holds a
/// copy of every mount; a clean stop took it for a container's and left
/// every mount dead (ENOTCONN) for everyone.
#[test]
fn redteam_a_strangers_user_namespace_does_not_keep_mounts_dead_after_a_clean_stop() {
    needs!(root);
    let mut b = Broker::start();
    b.put("rt/k", b"clean-stop-0c4d");
    b.ok(&["workload", "add", "app", "--selector", &format!("unix:uid:{RT_READER}")]);
    b.ok(&["grant", "rt/k", "--to", "app", "--mode", "0444"]);
    let dir: PathBuf = b.mount("app");
    assert!(rt_mounted(&dir));
    let mut holder = Command::new("setpriv")
        .args(["--reuid", &RT_NOBODY.to_string(), "--regid", &RT_NOBODY.to_string(), "--clear-groups"])
        .args(["unshare", "-U", "-r", "-m", "--propagation", "slave", "sleep", "60"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(b.terminate().success());
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(!b.log().contains("containers hold the mount"), "a stranger's namespace held the mount:\n{}", b.log());
    assert!(!rt_mounted(&dir), "a dead mount was left at {}", dir.display());
    let err = rt_cat_as(RT_READER, &dir.join("k"));
    assert!(!stderr(&err).contains("Transport endpoint is not connected"), "{}", stderr(&err));
    b.restart();
    assert_eq!(rt_cat_as(RT_READER, &dir.join("k")).stdout, b"clean-stop-0c4d");
}

/// Finding 9: without `SO_PEERPIDFD` the broker fell back to re-pinning
/// the pid. It now refuses such connections; `doctor` says whether the
/// kernel has it.
#[test]
fn redteam_doctor_checks_the_kernel_pins_socket_peers() {
    let o = Command::new(BIN).args(["doctor", "--json"]).output().unwrap();
    let r = json(&o.stdout);
    let check = r["checks"].as_array().unwrap().iter().find(|c| c["check"] == "SO_PEERPIDFD").cloned();
    let check = check.unwrap_or_else(|| panic!("no SO_PEERPIDFD check: {r:#}"));
    assert_eq!(check["status"], "ok", "{check}");
}

/// The owner of the user namespace in these tests, and the host uids its
/// processes run as (a subordinate range, as `newuidmap` would map).
const RT_NS_OWNER: u32 = 4500;
const RT_SUBUID: u32 = 200_000;

fn rt_subuid_namespace() -> std::process::Child {
    subuid_namespace(RT_NS_OWNER, RT_SUBUID)
}

/// A process of `owner` in a user namespace of its own, whose ids 0..100
/// are host ids `subuid`.. (root writes the maps, as the setuid
/// `newuidmap` does for a user with a /etc/subuid range).
pub(crate) fn subuid_namespace(owner: u32, subuid: u32) -> std::process::Child {
    let owner = owner.to_string();
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
    let map = format!("0 {subuid} 100\n");
    std::fs::write(format!("/proc/{pid}/uid_map"), &map).unwrap();
    std::fs::write(format!("/proc/{pid}/gid_map"), &map).unwrap();
    holder
}

/// `cat file` as `uid` inside the namespace of `holder` (host uid
/// `RT_SUBUID + uid`).
fn rt_cat_in_ns(holder: u32, uid: u32, file: &Path) -> Output {
    let (t, u) = (holder.to_string(), uid.to_string());
    Command::new("nsenter")
        .args(["-t", &t, "-U", "--setuid", &u, "--setgid", &u, "cat", file.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Red team 2, finding 1a: a user with subordinate uids runs processes as
/// thousands of host uids in a user namespace of its own; each host uid
/// was a caller of its own, with its own denial lines and alert budget.
/// They are now one caller, the namespace's owner: 20 of its uids denied
/// make at most the burst of full lines and at most `max_per_minute`
/// (plus the first-pair) hook runs; another user still runs the hook.
#[test]
fn redteam2_host_uids_of_one_users_namespace_are_one_caller() {
    needs!(root);
    let dir = tempfile::tempdir().unwrap();
    let hook = dir.path().join("hook");
    let out = dir.path().join("alerts");
    std::fs::write(&hook, format!("#!/bin/sh\ncat > {}.$$\n", out.display())).unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let b = Broker::start_with(&format!("[alerts]\non_deny = \"{}\"\nmax_per_minute = 2\n", hook.display()));
    b.put("rt/ns", b"subuid-never-logged-7d21");
    b.ok(&["workload", "add", "w", "--selector", &format!("unix:uid:{RT_READER}")]);
    b.ok(&["grant", "rt/ns", "--to", "w", "--mode", "0444"]);
    let file = b.mount("w").join("ns");
    let mut holder = rt_subuid_namespace();
    for u in 0..20 {
        let o = rt_cat_in_ns(holder.id(), u, &file);
        assert!(!o.status.success(), "uid {u} in the namespace read the file");
    }
    let in_ns = |c: &serde_json::Value| c["uid"].as_u64().is_some_and(|u| u >= u64::from(RT_SUBUID));
    let accounted = |lines: &[serde_json::Value]| -> (usize, u64) {
        let mine: Vec<_> = lines
            .iter()
            .filter(|l| l["event"] == "deny" && in_ns(&l["caller"]))
            .chain(lines.iter().filter(|l| l["event"] == "deny_summary" && in_ns(&l["caller"])))
            .collect();
        let n = mine.iter().map(|l| l["count"].as_u64().unwrap_or(1)).sum();
        (mine.len(), n)
    };
    eventually(10, "all 20 denials accounted for", || accounted(&b.audit_lines()).1 == 20);
    let full: Vec<_> = b.audit_events("deny").into_iter().filter(|l| in_ns(&l["caller"])).collect();
    assert!(full.len() <= 4, "{} denial lines in full for one user's namespace: {full:?}", full.len());
    assert!(full.iter().all(|l| l["caller"]["userns_owner"] == RT_NS_OWNER), "{full:?}");
    // Another user is a caller of its own: its probe runs the hook.
    assert!(!rt_cat_as(RT_NOBODY, &file).status.success());
    let runs = || -> Vec<serde_json::Value> {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("alerts."))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter(|s| s.ends_with('\n'))
            .map(|s| json(s.as_bytes()))
            .collect()
    };
    eventually(10, "the other user's hook run", || runs().iter().any(|r| r["denial"]["caller"]["uid"] == RT_NOBODY));
    std::thread::sleep(Duration::from_millis(1500));
    let ns_runs = runs().iter().filter(|r| in_ns(&r["denial"]["caller"])).count();
    assert!(ns_runs <= 3, "{ns_runs} hook runs for one user's namespace (max_per_minute 2 + its first pair)");
    let _ = holder.kill();
    let _ = holder.wait();
    b.assert_never_leaked(&[b"subuid-never-logged-7d21"]);
}

/// 200 host uids, each denied in a loop for `secs`, from one root
/// process forking a child per uid; prints the denials.
const RT_MANY_UIDS: &str = r#"
import os, sys, time
path, first, n, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
r, w = os.pipe()
kids = []
for i in range(n):
    pid = os.fork()
    if pid == 0:
        os.close(r)
        uid = first + i
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
        end, denied = time.time() + secs, 0
        while time.time() < end:
            try:
                open(path, "rb").close()
            except OSError:
                denied += 1
            time.sleep(0.02)
        os.write(w, b"%d\n" % denied)
        os._exit(0)
    kids.append(pid)
os.close(w)
data = b""
while True:
    chunk = os.read(r, 65536)
    if not chunk:
        break
    data += chunk
for k in kids:
    os.waitpid(k, 0)
print(sum(int(x) for x in data.split()))
"#;

/// Red team 2, finding 1b: no number of callers floods the audit log:
/// 200 host uids denied in a loop write at most 50 denial lines (in full
/// and summaries) in any second, plus the overflow's summary, and every
/// denial is still accounted for.
#[test]
fn redteam2_many_callers_cannot_flood_the_audit_log() {
    needs!(root);
    let b = Broker::start();
    b.put("rt/many", b"many-uids-never-logged-5a90");
    b.ok(&["workload", "add", "w", "--selector", &format!("unix:uid:{RT_READER}")]);
    b.ok(&["grant", "rt/many", "--to", "w", "--mode", "0444"]);
    let file = b.mount("w").join("many");
    let o = Command::new("python3")
        .args(["-c", RT_MANY_UIDS, file.to_str().unwrap(), "300000", "200", "4"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let denied: u64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    assert!(denied > 2000, "only {denied} denials");
    eventually(15, "every denial accounted for", || b.denials() == denied);
    let lines = b.audit_lines();
    assert_eq!(denials_in(&lines), denied);
    let mut per_second = std::collections::BTreeMap::<String, (u64, u64)>::new();
    for l in lines.iter().filter(|l| l["event"] == "deny" || l["event"] == "deny_summary") {
        let second = l["time"].as_str().unwrap()[..19].to_owned();
        let e = per_second.entry(second).or_default();
        if l["caller"].is_null() {
            e.1 += 1; // the overflow's summary
        } else {
            e.0 += 1;
        }
    }
    eprintln!("{denied} denials; lines a second (callers', overflow's): {per_second:?}");
    // The cap holds for the limiter's decisions; a line's time is stamped
    // a moment later, so one may cross into the next second.
    assert!(per_second.values().all(|(callers, overflow)| *callers <= 51 && *overflow <= 1), "{per_second:?}");
    b.assert_never_leaked(&[b"many-uids-never-logged-5a90"]);
}

/// Red team 2, finding 2: a second exact grant whose file name clashes
/// with another's in the same workload silently swapped what the workload
/// read (`pw` served d/pw, only a WARN in the broker log). It is refused,
/// exit 7, and the workload still reads r/pw; `--file` gets it in.
#[test]
fn redteam2_an_exact_grant_clashing_with_anothers_file_name_is_refused() {
    needs!(root);
    let b = Broker::start();
    b.put("r/pw", b"first-pw-3c1e");
    b.put("d/pw", b"second-pw-8b02");
    b.ok(&["workload", "add", "w", "--selector", &format!("unix:uid:{RT_READER}")]);
    b.ok(&["grant", "r/pw", "--to", "w", "--mode", "0444"]);
    let dir = b.mount("w");
    assert_eq!(rt_cat_as(RT_READER, &dir.join("pw")).stdout, b"first-pw-3c1e");
    let o = b.cli(&["grant", "d/pw", "--to", "w", "--mode", "0444"]);
    assert_fails(&o, 7, "workload w already shows r/pw as file pw; pass --file NAME");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rt_cat_as(RT_READER, &dir.join("pw")).stdout, b"first-pw-3c1e", "the file was swapped");
    b.ok(&["grant", "d/pw", "--to", "w", "--mode", "0444", "--file", "d_pw"]);
    eventually(10, "d_pw shown", || rt_cat_as(RT_READER, &dir.join("d_pw")).stdout == b"second-pw-8b02");
    // A prefix grant keeps the documented precedence (the exact one wins).
    b.ok(&["grant", "d/*", "--to", "w", "--mode", "0444"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rt_cat_as(RT_READER, &dir.join("pw")).stdout, b"first-pw-3c1e");
}
