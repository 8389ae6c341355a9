//! Denials: every refused open reaches the broker and is audited (the
//! file's mode is checked by the broker, not the kernel), and a flood of
//! them is summarised per caller, so it can neither fill the disk nor push
//! older audit files out of a rotated log.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// The uid a workload is for, and one that it is not.
const OWNER: u32 = 4242;
const INTRUDER: u32 = 4243;

/// Opens `path` for `secs` seconds from child processes it forks (25
/// opens each, so every few opens come from a new pid), and prints how
/// many were refused with EACCES. Any other outcome fails.
const FLOOD: &str = r#"
import os, sys, time
path, secs = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + secs
total = 0
while time.monotonic() < end:
    pid = os.fork()
    if pid == 0:
        n = 0
        for _ in range(25):
            try:
                os.close(os.open(path, os.O_RDONLY))
                os._exit(101)
            except PermissionError:
                n += 1
            except OSError:
                os._exit(102)
        os._exit(n)
    _, st = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(st)
    if code > 25:
        print("child exited", code)
        sys.exit(1)
    total += code
print(total)
"#;

/// `procs` processes of `uid` flooding `file` with refused opens for
/// `secs`; returns the number of opens refused.
fn flood(uid: u32, file: &Path, procs: usize, secs: u32) -> u64 {
    let file = file.to_str().unwrap().to_owned();
    let runs: Vec<_> = (0..procs)
        .map(|_| {
            let file = file.clone();
            std::thread::spawn(move || run_as(uid, &["/usr/bin/python3", "-c", FLOOD, &file, &secs.to_string()]))
        })
        .collect();
    runs.into_iter()
        .map(|r| {
            let o = r.join().unwrap();
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            assert!(o.status.success(), "flood: {out} {}", stderr(&o));
            out.trim().parse::<u64>().unwrap()
        })
        .sum()
}

/// The denials the audit log accounts for, of callers `is_caller`: its
/// `deny` lines and `deny_summary` lines, and the denials they stand for.
fn accounted(lines: &[serde_json::Value], is_caller: impl Fn(&serde_json::Value) -> bool) -> (usize, u64) {
    let mine: Vec<_> = lines
        .iter()
        .filter(|l| (l["event"] == "deny" || l["event"] == "deny_summary") && is_caller(&l["caller"]))
        .collect();
    let count = mine.iter().map(|l| if l["event"] == "deny" { 1 } else { l["count"].as_u64().unwrap() }).sum();
    (mine.len(), count)
}

/// Every line the log keeps, over all its files.
fn all_lines(b: &Broker) -> Vec<serde_json::Value> {
    let out = String::from_utf8(b.ok(&["audit"])).unwrap();
    out.lines().map(|l| json(l.as_bytes())).collect()
}

#[test]
fn a_flood_of_denials_from_one_uid_is_summarised_and_every_denial_counted() {
    needs!(root);
    let addr = format!("127.0.0.1:{}", free_port());
    let b = Broker::start_with(&format!("[metrics]\nlisten = \"{addr}\"\n"));
    b.put("app/key", b"flood-never-logged-31f0");
    b.ok(&["workload", "add", "w", "--selector", &format!("unix:uid:{OWNER}")]);
    // Readable by all: the broker's workload check is what refuses.
    b.ok(&["grant", "app/key", "--to", "w", "--mode", "0444"]);
    let file = b.mount("w").join("key");

    let started = Instant::now();
    let attempts = flood(INTRUDER, &file, 3, 5);
    assert!(attempts > 1000, "the flood made only {attempts} opens");
    let is_intruder = |c: &serde_json::Value| c["uid"] == INTRUDER;
    // The last summary comes within a second or two of the last denial.
    let mut last = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        last = accounted(&b.audit_lines(), is_intruder);
        if last.1 >= attempts {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let secs = started.elapsed().as_secs() + 1;
    let (lines, counted) = last;
    eprintln!("{attempts} denials in {secs} s: {lines} audit lines");
    assert_eq!(counted, attempts, "the audit log accounts for every denial, exactly");
    assert!(lines as u64 <= 2 * secs, "{lines} audit lines for {attempts} denials in {secs} s");
    assert_eq!(b.audit_events("deny").len(), 1, "one line in full: the first of this caller and file");
    let s = b.audit_events("deny_summary").pop().unwrap();
    assert_eq!(s["files"], serde_json::json!(["w:app/key"]), "{s}");
    assert!(s["first"].is_string() && s["last"].is_string(), "{s}");
    // The metrics count every denial, not every line.
    let m = scrape(&addr);
    let open = "keyhole_denials_total{workload=\"w\",secret=\"app/key\",method=\"open\"}";
    assert_eq!(sample(&m, open), attempts as f64, "{m}");
    b.ok(&["audit", "--verify"]);
    b.assert_never_leaked(&[b"flood-never-logged-31f0"]);
}

#[test]
fn a_flood_cannot_push_an_admin_action_out_of_a_rotated_log() {
    needs!(root);
    let b = Broker::start_with("[audit]\nmax_bytes = 4096\nkeep = 2\n");
    b.put("early/admin-action", b"x");
    b.ok(&["workload", "add", "w", "--selector", &format!("unix:uid:{OWNER}")]);
    b.ok(&["grant", "early/admin-action", "--to", "w", "--mode", "0444"]);
    let attempts = flood(INTRUDER, &b.mount("w").join("admin-action"), 2, 3);
    // And lines enough for many rotations past keep = 2.
    for i in 0..60 {
        b.put(&format!("late/{i}"), b"y");
    }
    let lines = all_lines(&b);
    assert!(
        lines.iter().any(|l| l["event"] == "put" && l["path"] == "early/admin-action"),
        "the put before {attempts} denials was pushed out of the log"
    );
    let v = json(&b.ok(&["audit", "--verify", "--json"]));
    assert_eq!(v["ok"], true, "{v}");
    // Files younger than [audit] min_keep are kept beyond keep, said once.
    assert_eq!(b.log().matches("min_keep").count(), 1, "{}", b.log());
}

/// Run `cmd` as `uid`:`gid` with supplementary `groups` (none if empty).
fn run_with_groups(uid: u32, gid: u32, groups: &[u32], cmd: &[&str]) -> Output {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}")).arg(format!("--regid={gid}"));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        let g: Vec<String> = groups.iter().map(u32::to_string).collect();
        c.arg(format!("--groups={}", g.join(",")));
    }
    c.args(cmd).stdin(Stdio::null()).output().unwrap()
}

#[test]
fn the_files_mode_is_checked_by_the_broker_and_every_refusal_audited() {
    needs!(root);
    let addr = format!("127.0.0.1:{}", free_port());
    let b = Broker::start_with(&format!("[metrics]\nlisten = \"{addr}\"\n"));
    b.put("app/owned", b"owner-only-5e21");
    b.put("app/shared", b"group-shared-77c3");
    // Members: gid 4300. Of them only uid 4242 may read `owned`, and only
    // the members of group 4301 `shared`.
    b.ok(&["workload", "add", "w", "--selector", "unix:gid:4300"]);
    b.ok(&["grant", "app/owned", "--to", "w", "--uid", &OWNER.to_string(), "--mode", "0400"]);
    b.ok(&["grant", "app/shared", "--to", "w", "--uid", &OWNER.to_string(), "--gid", "4301", "--mode", "0440"]);
    let dir = b.mount("w");
    let (owned, shared) = (dir.join("owned"), dir.join("shared"));
    let cat = |uid, gid, groups: &[u32], f: &Path| run_with_groups(uid, gid, groups, &["cat", f.to_str().unwrap()]);

    assert_eq!(cat(OWNER, 4300, &[], &owned).stdout, b"owner-only-5e21");
    let o = cat(INTRUDER, 4300, &[], &owned);
    assert!(!o.status.success() && stderr(&o).contains("Permission denied"), "{}", stderr(&o));
    let deny = b.audit_events("deny").pop().expect("the mode's refusal is audited");
    assert_eq!((deny["path"].as_str(), deny["caller"]["uid"].as_u64()), (Some("app/owned"), Some(INTRUDER.into())));
    assert_eq!(deny["reason"], "mode 0400 owner 4242:0 does not let uid 4243 read", "{deny}");
    // A supplementary group is taken from the caller's status.
    assert_eq!(cat(INTRUDER, 4300, &[4301], &shared).stdout, b"group-shared-77c3");
    assert!(!cat(INTRUDER, 4300, &[4302], &shared).status.success());
    let deny = b.audit_events("deny").pop().unwrap();
    assert_eq!(deny["path"], "app/shared");
    assert!(deny["reason"].as_str().unwrap().starts_with("mode 0440 owner 4242:4301"), "{deny}");
    // access(2) asks the broker too, and a refusal is a denial (of a
    // member whose first denial it is: a second of the same file would be
    // summed up).
    let probe = |uid| {
        let f = owned.to_str().unwrap();
        let code = "import os,sys; print(os.access(sys.argv[1], os.R_OK))";
        String::from_utf8(run_with_groups(uid, 4300, &[], &["/usr/bin/python3", "-c", code, f]).stdout).unwrap()
    };
    assert_eq!(probe(OWNER).trim(), "True");
    assert_eq!(probe(4245).trim(), "False");
    let deny = b.audit_events("deny").pop().unwrap();
    assert_eq!((deny["method"].as_str(), deny["path"].as_str()), (Some("access"), Some("app/owned")), "{deny}");
    assert_eq!(deny["caller"]["uid"], 4245);
    // Not a member: refused as such, before its mode is looked at.
    assert!(!cat(4244, 4244, &[], &owned).status.success());
    let deny = b.audit_events("deny").pop().unwrap();
    assert_eq!(deny["reason"], "caller does not match the workload");

    let m = scrape(&addr);
    let series = |s: &str, method: &str| {
        sample(&m, &format!("keyhole_denials_total{{workload=\"w\",secret=\"app/{s}\",method=\"{method}\"}}"))
    };
    assert_eq!((series("owned", "open"), series("shared", "open"), series("owned", "access")), (2.0, 1.0, 1.0), "{m}");
    b.ok(&["audit", "--verify"]);
}

#[test]
fn root_in_a_container_reads_as_the_kernel_would_let_it_and_groups_count() {
    needs!(docker);
    let b = Broker::start();
    let t = format!("modes-{}", std::process::id());
    b.put("c/owned", b"container-owned-4c1d");
    b.put("c/grouped", b"container-group-a9e0");
    b.ok(&["workload", "add", "c", "--selector", &format!("docker:label:keyhole.test={t}")]);
    b.ok(&["grant", "c/owned", "--to", "c", "--uid", &OWNER.to_string(), "--mode", "0400"]);
    b.ok(&["grant", "c/grouped", "--to", "c", "--uid", &OWNER.to_string(), "--gid", "4300", "--mode", "0440"]);
    let bind = format!("{}:/run/secrets:ro,rslave", b.mount("c").display());
    let label = format!("keyhole.test={t}");
    let start = |extra: &[&str]| {
        let mut args = vec!["--label", label.as_str(), "-v", bind.as_str()];
        args.extend_from_slice(extra);
        Container::start(&args)
    };

    // Root with Docker's default capabilities (CAP_DAC_OVERRIDE) reads a
    // file owned by another uid, as it could with the kernel's check.
    let root = start(&[]);
    assert_eq!(root.cat("/run/secrets/owned").unwrap(), b"container-owned-4c1d");
    // Without DAC_OVERRIDE and DAC_READ_SEARCH it cannot, and it is audited.
    let weak = start(&["--cap-drop", "DAC_OVERRIDE", "--cap-drop", "DAC_READ_SEARCH"]);
    let err = weak.cat("/run/secrets/owned").unwrap_err();
    assert!(err.contains("Permission denied"), "{err}");
    let deny = b.audit_events("deny").pop().expect("the refusal is audited");
    assert_eq!(deny["caller"]["container_id"], weak.id.as_str());
    assert_eq!(deny["reason"], "mode 0400 owner 4242:0 does not let uid 0 read", "{deny}");
    // With DAC_READ_SEARCH alone it reads.
    let search = start(&["--cap-drop", "DAC_OVERRIDE", "--cap-add", "DAC_READ_SEARCH"]);
    assert_eq!(search.cat("/run/secrets/owned").unwrap(), b"container-owned-4c1d");

    // --group-add: a 0440 file of that group reads; without it, it does not.
    let member = start(&["--user", "1000:1000", "--group-add", "4300"]);
    assert_eq!(member.cat("/run/secrets/grouped").unwrap(), b"container-group-a9e0");
    assert!(member.cat("/run/secrets/owned").unwrap_err().contains("Permission denied"));
    let outsider = start(&["--user", "1000:1000"]);
    assert!(outsider.cat("/run/secrets/grouped").unwrap_err().contains("Permission denied"));
    let deny = b.audit_events("deny").pop().unwrap();
    assert_eq!(deny["caller"]["container_id"], outsider.id.as_str());
    assert!(deny["reason"].as_str().unwrap().starts_with("mode 0440 owner 4242:4300"), "{deny}");
    b.ok(&["audit", "--verify"]);
}

#[test]
fn the_broker_refuses_exactly_what_the_kernel_refuses_on_a_disk_file() {
    needs!(root);
    use std::os::unix::fs::PermissionsExt;
    let b = Broker::start();
    // Every caller below has gid 4300: all are the workload's.
    b.ok(&["workload", "add", "k", "--selector", "unix:gid:4300"]);
    let disk = tempfile::tempdir().unwrap();
    std::fs::set_permissions(disk.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let modes = ["0400", "0440", "0404", "0444"];
    for (i, mode) in modes.iter().enumerate() {
        b.put(&format!("k/f{i}"), b"same-as-kernel");
        b.ok(&["grant", &format!("k/f{i}"), "--to", "k", "--uid", "4242", "--gid", "4301", "--mode", mode]);
        let f = disk.path().join(format!("f{i}"));
        std::fs::write(&f, b"same-as-kernel").unwrap();
        std::os::unix::fs::chown(&f, Some(4242), Some(4301)).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(u32::from_str_radix(mode, 8).unwrap())).unwrap();
    }
    let as_ids = |uid: &str, groups: &str| {
        vec!["setpriv".to_owned(), format!("--reuid={uid}"), "--regid=4300".into(), groups.to_owned()]
    };
    let no_caps = "--inh-caps=-all --bounding-set=-dac_override,-dac_read_search";
    let callers: Vec<(&str, Vec<String>)> = vec![
        ("the owner", as_ids("4242", "--clear-groups")),
        ("another uid", as_ids("4243", "--clear-groups")),
        ("a member of the file's group", as_ids("4243", "--groups=4301")),
        ("root", as_ids("0", "--clear-groups")),
        ("root without DAC capabilities", {
            let mut v = as_ids("0", "--clear-groups");
            v.extend(no_caps.split(' ').map(str::to_owned));
            v
        }),
        ("root of a user namespace that maps only itself", {
            let mut v = as_ids("0", "--clear-groups");
            v.extend(["unshare", "--user", "--map-root-user"].map(str::to_owned));
            v
        }),
    ];
    let mut refused = 0;
    let mut table = Vec::new();
    for (who, prefix) in &callers {
        for (i, mode) in modes.iter().enumerate() {
            let cat = |file: &Path| {
                let mut argv: Vec<&str> = prefix.iter().map(String::as_str).collect();
                let f = file.to_str().unwrap().to_owned();
                argv.push("cat");
                argv.push(&f);
                let o = Command::new(argv[0]).args(&argv[1..]).stdin(Stdio::null()).output().unwrap();
                (o.status.success(), o.stdout == b"same-as-kernel")
            };
            let (fuse, disk) = (cat(&b.mount("k").join(format!("f{i}"))), cat(&disk.path().join(format!("f{i}"))));
            assert_eq!(fuse, disk, "{who} reading a {mode} file: broker {fuse:?}, kernel {disk:?}");
            refused += u64::from(!fuse.0);
            table.push(fuse.1);
        }
    }
    // Modes 0400 0440 0404 0444, owner 4242:4301, by caller as listed.
    let (t, f) = (true, false);
    let want = [[t, t, t, t], [f, f, t, t], [f, t, f, t], [t, t, t, t], [f, f, t, t], [f, f, t, t]];
    assert_eq!(table, want.concat());
    // Every refusal is accounted for in the audit log.
    let deadline = Instant::now() + Duration::from_secs(5);
    while accounted(&b.audit_lines(), |_| true).1 < refused && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(accounted(&b.audit_lines(), |_| true).1, refused);
}
