//! Operating keyhole: metrics, the alert hook, `doctor`, completions and
//! the man page, remote admin over mutual TLS, JSON logs, tables.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

const NOBODY: u32 = 65534;
const DAEMON: u32 = 1;

/// A workload `web` for uid NOBODY with `db/pw` granted to it. The file
/// mode lets anyone past the kernel's check, so the broker's check is
/// the one that refuses others.
fn web_reads_db_pw(b: &Broker, value: &[u8]) {
    b.put("db/pw", value);
    b.ok(&["workload", "add", "web", "--selector", &format!("unix:uid:{NOBODY}")]);
    b.ok(&["grant", "db/pw", "--to", "web", "--mode", "0444"]);
}

fn cat_as(uid: u32, path: &Path) -> std::process::Output {
    run_as(uid, &["cat", path.to_str().unwrap()])
}

#[test]
fn metrics_count_reads_denials_rotations_and_calls_exactly() {
    needs!(root);
    let addr = format!("127.0.0.1:{}", free_port());
    let b = Broker::start_with(&format!("[metrics]\nlisten = \"{addr}\"\n"));
    let value = b"metrics-must-not-show-6d1e";
    web_reads_db_pw(&b, value);
    let file = b.mount("web").join("pw");
    let before = scrape(&addr);

    for _ in 0..3 {
        let o = cat_as(NOBODY, &file);
        assert_eq!(o.stdout, value, "{}", stderr(&o));
    }
    for _ in 0..2 {
        assert!(!cat_as(DAEMON, &file).status.success(), "uid 1 is not the workload");
    }
    b.ok(&["secret", "rotate", "db/pw", "--generate", "24"]);
    let o = cli_as(&b.workload_socket(), &["secret", "get", "db/pw"], None, Some(NOBODY));
    assert_fails(&o, 4, "needs an admin caller");

    let after = scrape(&addr);
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(delta("keyhole_reads_total{workload=\"web\",secret=\"db/pw\"}"), 3.0, "{after}");
    assert_eq!(delta("keyhole_denials_total{workload=\"web\",secret=\"db/pw\",method=\"open\"}"), 2.0);
    assert_eq!(delta("keyhole_denials_total{workload=\"\",secret=\"\",method=\"GetSecret\"}"), 1.0);
    assert_eq!(delta("keyhole_rotations_total"), 1.0);
    assert_eq!(delta("keyhole_open_duration_seconds_count"), 5.0);
    assert!(delta("keyhole_propagation_duration_seconds_count") >= 1.0);
    assert_eq!(delta("keyhole_grpc_requests_total{method=\"PutSecret\",code=\"Ok\"}"), 1.0);
    assert_eq!(delta("keyhole_grpc_requests_total{method=\"GetSecret\",code=\"PermissionDenied\"}"), 1.0);
    // Reads and refusals alike: the caller's first of the file (version)
    // is a line in full, the rest are summed up in a later line, counted
    // in keyhole_reads_total / keyhole_denials_total, not as lines.
    assert_eq!(delta("keyhole_audit_lines_total{event=\"read\"}"), 1.0);
    assert_eq!(delta("keyhole_audit_lines_total{event=\"deny\"}"), 2.0);
    assert_eq!(sample(&after, "keyhole_mounts"), 1.0);
    assert!(after.contains("# TYPE keyhole_reads counter"), "{after}");
    // The count matches the audit log it mirrors.
    assert_eq!(b.audit_events("deny").len() as f64, sample(&after, "keyhole_audit_lines_total{event=\"deny\"}"));
    assert!(!after.contains(std::str::from_utf8(value).unwrap()));
    b.assert_never_leaked(&[value]);
}

fn write_hook(dir: &Path, body: &str) -> String {
    let path = dir.join("hook.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path.display().to_string()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_denial_runs_the_alert_hook_with_its_json_and_the_rate_limit_holds() {
    needs!(root);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alerts");
    // One file per run, so concurrent runs would show.
    let hook = write_hook(dir.path(), &format!("cat > {}.$$", out.display()));
    let addr = format!("127.0.0.1:{}", free_port());
    let b = Broker::start_with(&format!(
        "[metrics]\nlisten = \"{addr}\"\n[alerts]\non_deny = \"{hook}\"\nmax_per_minute = 2\n"
    ));
    let value = b"alerts-must-not-show-0b9c";
    web_reads_db_pw(&b, value);
    let file = b.mount("web").join("pw");
    let runs = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("alerts."))
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .collect::<Vec<_>>()
    };

    assert!(!cat_as(DAEMON, &file).status.success());
    wait_for("the hook's first run", Duration::from_secs(10), || b.audit_events("alert").len() == 1);
    let first = runs();
    assert_eq!(first.len(), 1);
    let alert = json(first[0].as_bytes());
    assert_eq!(alert["alert"], "deny");
    assert_eq!(alert["suppressed"], 0);
    let denial = &alert["denial"];
    assert_eq!((denial["event"].as_str(), denial["workload"].as_str()), (Some("deny"), Some("web")));
    assert_eq!(denial["path"], "db/pw");
    assert_eq!(denial["caller"]["uid"], DAEMON);
    assert_eq!(denial["reason"], "caller does not match the workload");
    // It is the audit line itself, HMAC and all.
    let deny_line = b.audit_events("deny").pop().unwrap();
    assert_eq!(denial, &deny_line);
    let audited = b.audit_events("alert").pop().unwrap();
    let seq = deny_line["seq"].as_u64().unwrap();
    assert_eq!(audited["reason"], format!("on_deny hook for audit line {seq}: exited 0"));

    // Four more at once: the audit log sums them up in one line, and the
    // hook's second run (the last this minute) gets that line.
    for _ in 0..4 {
        assert!(!cat_as(DAEMON, &file).status.success());
    }
    wait_for("the second run", Duration::from_secs(10), || b.audit_events("alert").len() == 2);
    let summary = runs().iter().map(|r| json(r.as_bytes())).find(|a| a["denial"]["event"] == "deny_summary");
    let summary = summary.expect("the second run is the summary's");
    assert_eq!((summary["denial"]["count"].as_u64(), summary["suppressed"].as_u64()), (Some(4), Some(0)));
    // Three more: summed up again, not run, and counted as three.
    for _ in 0..3 {
        assert!(!cat_as(DAEMON, &file).status.success());
    }
    let m = scrape(&addr);
    wait_for("the suppressed count", Duration::from_secs(10), || {
        sample(&scrape(&addr), "keyhole_alerts_suppressed_total") == 3.0
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(runs().len(), 2, "the rate limit let more runs through");
    assert_eq!(b.audit_events("alert").len(), 2);
    assert_eq!(sample(&m, "keyhole_alert_hook_runs_total{result=\"ok\"}"), 2.0, "{m}");
    // A granted read is no alert.
    assert_eq!(cat_as(NOBODY, &file).stdout, value);
    b.ok(&["audit", "--verify"]);
    for r in runs() {
        assert!(!r.contains(std::str::from_utf8(value).unwrap()));
    }
    b.assert_never_leaked(&[value]);
}

#[test]
fn a_hook_that_hangs_or_fails_never_slows_reads() {
    needs!(root);
    let dir = tempfile::tempdir().unwrap();
    let hook = write_hook(dir.path(), "sleep 300");
    let b = Broker::start_with(&format!("[alerts]\non_deny = \"{hook}\"\nmax_per_minute = 600\ntimeout = \"300s\"\n"));
    let value = b"hooks-must-not-show-77aa";
    web_reads_db_pw(&b, value);
    let file = b.mount("web").join("pw");
    // The first denial starts a hook that hangs for 5 minutes; the queue
    // behind it fills up. Reads and denials go on regardless.
    let started = Instant::now();
    for i in 0..100 {
        assert!(!cat_as(DAEMON, &file).status.success());
        if i % 10 == 0 {
            assert_eq!(cat_as(NOBODY, &file).stdout, value);
        }
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(60), "100 denials took {took:?} behind a hung hook");
    assert!(b.audit_events("alert").is_empty(), "the hung hook has not finished");
    // One caller and file: one line in full, the rest summed up.
    wait_for("every denial in the audit log", Duration::from_secs(10), || {
        let lines = b.audit_lines();
        let full = lines.iter().filter(|l| l["event"] == "deny").count() as u64;
        let summed: u64 =
            lines.iter().filter(|l| l["event"] == "deny_summary").filter_map(|l| l["count"].as_u64()).sum();
        full + summed == 100
    });
    assert_eq!(b.audit_events("deny").len(), 1);
    drop(b);

    // A hook that fails, and one that cannot even start: audited, reads go on.
    for (hook, outcome) in [
        (write_hook(dir.path(), "exit 3"), "exit status: 3"),
        (dir.path().join("missing").display().to_string(), "cannot run"),
    ] {
        let b = Broker::start_with(&format!("[alerts]\non_deny = [\"{hook}\", \"--flag\"]\ntimeout = \"2s\"\n"));
        web_reads_db_pw(&b, value);
        let file = b.mount("web").join("pw");
        assert!(!cat_as(DAEMON, &file).status.success());
        wait_for("the alert line", Duration::from_secs(10), || !b.audit_events("alert").is_empty());
        let reason = b.audit_events("alert")[0]["reason"].as_str().unwrap().to_owned();
        assert!(reason.contains(outcome), "{reason}");
        assert_eq!(cat_as(NOBODY, &file).stdout, value);
        assert!(b.log().contains("the on_deny alert hook failed"));
    }
}

#[test]
fn a_hook_past_its_timeout_is_killed_with_what_it_started() {
    needs!(root);
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("sleeper");
    let hook = write_hook(dir.path(), &format!("sleep 600 & echo $! > {}\nwait", pidfile.display()));
    let b = Broker::start_with(&format!("[alerts]\non_deny = \"{hook}\"\ntimeout = \"1s\"\n"));
    web_reads_db_pw(&b, b"x");
    assert!(!cat_as(DAEMON, &b.mount("web").join("pw")).status.success());
    wait_for("the alert line", Duration::from_secs(15), || !b.audit_events("alert").is_empty());
    assert!(b.audit_events("alert")[0]["reason"].as_str().unwrap().ends_with("killed after 1s"));
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    wait_for("the hook's child to die", Duration::from_secs(5), || {
        // Gone, or a zombie awaiting its reaper.
        std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).map_or(true, |s| s.contains(") Z "))
    });
}

fn doctor(args: &[&str]) -> (std::process::Output, serde_json::Value) {
    let o = Command::new(BIN).arg("doctor").arg("--json").args(args).output().unwrap();
    let v = json(&o.stdout);
    (o, v)
}

fn status_of<'a>(report: &'a serde_json::Value, check: &str) -> Vec<&'a str> {
    let checks = report["checks"].as_array().unwrap();
    checks.iter().filter(|c| c["check"] == check).map(|c| c["status"].as_str().unwrap()).collect()
}

#[test]
fn doctor_passes_a_good_host_and_names_each_problem() {
    needs!(root);
    let b = Broker::start();
    let cfg = b.config.clone().unwrap();
    let (state, run) = (b.state(), b.run());
    let host =
        ["--config", cfg.to_str().unwrap(), "--state-dir", state.to_str().unwrap(), "--run-dir", run.to_str().unwrap()];
    let (o, r) = doctor(&host);
    assert!(o.status.success(), "{r:#}");
    assert_eq!(r["ok"], true);
    for check in ["config", "fuse", "pid namespace", "cgroup namespace", "broker", "run dir", "state dir", "master key"]
    {
        assert_eq!(status_of(&r, check), ["ok"], "{check}: {r:#}");
    }
    let ns = r["checks"].as_array().unwrap().iter().find(|c| c["check"] == "pid namespace").unwrap();
    assert_eq!(ns["detail"], format!("the broker (pid {}) is in the host's pid namespace", b.pid()), "{r:#}");
    // The text form: one line per check, each problem with its fix.
    let text = Command::new(BIN).arg("doctor").args(host).output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).lines().any(|l| l.starts_with("ok    run dir")));

    // A loose key file.
    let key = state.join("master.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (o, r) = doctor(&host);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(status_of(&r, "master key"), ["fail"]);
    let text = String::from_utf8(Command::new(BIN).arg("doctor").args(host).output().unwrap().stdout).unwrap();
    assert!(text.contains("FAIL  master key") && text.contains("mode 0644 lets others in"), "{text}");
    assert!(text.contains(&format!("fix: chmod 400 {}", key.display())), "{text}");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o400)).unwrap();

    // A run dir that is a private mount.
    let private = tempfile::tempdir().unwrap();
    let p = private.path().to_str().unwrap();
    assert!(Command::new("mount").args(["--bind", p, p]).status().unwrap().success());
    assert!(Command::new("mount").args(["--make-private", p]).status().unwrap().success());
    let (o, r) = doctor(&["--run-dir", p, "--state-dir", state.to_str().unwrap()]);
    detach_mounts_under(private.path());
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(status_of(&r, "run dir"), ["fail"], "{r:#}");
    assert_eq!(status_of(&r, "broker"), ["warn"], "no broker on that run dir");

    // No /dev/fuse, and not the host's pid namespace.
    let shell = format!("mount -t tmpfs none /dev && exec {BIN} doctor --json --run-dir {}", run.display());
    let o = Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &shell]).output().unwrap();
    let r = json(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(status_of(&r, "fuse"), ["fail"], "{r:#}");
    let o = Command::new("unshare").args(["-p", "-f", "--mount-proc", BIN, "doctor", "--json"]).output().unwrap();
    let r = json(&o.stdout);
    assert_eq!(status_of(&r, "pid namespace"), ["fail"], "{r:#}");
    assert_eq!(o.status.code(), Some(1));

    // A dead volume plugin socket (a killed broker's): dockerd stalls on it.
    let name = unique("kh-doctor");
    let sock = format!("/run/docker/plugins/{name}.sock");
    std::fs::create_dir_all("/run/docker/plugins").unwrap();
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let cfg2 = b.dir.path().join("doctor.toml");
    std::fs::write(&cfg2, format!("[docker]\nplugin = \"{name}\"\n")).unwrap();
    let (o, r) = doctor(&["--config", cfg2.to_str().unwrap(), "--run-dir", run.to_str().unwrap()]);
    let _ = std::fs::remove_file(&sock);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(status_of(&r, "volume plugin"), ["fail"], "{r:#}");

    // A bad config is a failed check, the rest still run.
    std::fs::write(&cfg2, "[metrics]\nlisten = \"nowhere\"\n").unwrap();
    let (o, r) = doctor(&["--config", cfg2.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(status_of(&r, "config"), ["fail"]);
    assert_eq!(status_of(&r, "fuse"), ["ok"]);
}

#[test]
fn doctor_checks_a_vault_backend_and_one_that_is_down() {
    needs!(root, bao);
    let bao = Bao::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keyhole.toml");
    std::fs::write(&cfg, bao.backend_toml("prod", "1s")).unwrap();
    let (_, r) = doctor(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(status_of(&r, "backend"), ["ok"], "{r:#}");
    assert_eq!(status_of(&r, "clock"), ["ok"], "{r:#}");
    assert_eq!(status_of(&r, "token"), ["ok"], "{r:#}");
    let down = bao.backend_toml("prod", "1s").replace(&bao.addr, &format!("http://127.0.0.1:{}", free_port()));
    std::fs::write(&cfg, down).unwrap();
    let (o, r) = doctor(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(status_of(&r, "backend"), ["fail"], "{r:#}");
}

#[test]
fn completions_and_the_man_page_are_generated() {
    let run = |args: &[&str]| Command::new(BIN).args(args).output().unwrap();
    let bash = run(&["completions", "bash"]);
    assert!(bash.status.success());
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), &bash.stdout).unwrap();
    let syntax = Command::new("bash").arg("-n").arg(script.path()).output().unwrap();
    assert!(syntax.status.success(), "{}", stderr(&syntax));
    let text = String::from_utf8(bash.stdout).unwrap();
    for word in ["complete", "doctor", "--endpoint", "grant"] {
        assert!(text.contains(word), "bash completion lacks {word}");
    }
    for shell in ["zsh", "fish"] {
        let o = run(&["completions", shell]);
        assert!(o.status.success() && contains(&o.stdout, b"doctor"), "{shell}");
    }
    let o = run(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("invalid value 'tcsh'"), "{}", stderr(&o));
    let man = String::from_utf8(run(&["man"]).stdout).unwrap();
    assert!(man.contains(".TH keyhole 1"), "{man}");
    for word in ["doctor", "completions", "\\-\\-endpoint", "Exit status"] {
        assert!(man.contains(word), "the man page lacks {word}");
    }
    // One page per subcommand: printed, or all written to a directory.
    let put = String::from_utf8(run(&["man", "secret", "put"]).stdout).unwrap();
    assert!(put.contains(".TH keyhole-secret-put 1") && put.contains("\\-\\-if\\-version"), "{put}");
    let o = run(&["man", "secret", "nope"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let listed = String::from_utf8(o.stdout).unwrap();
    for page in ["keyhole.1", "keyhole-serve.1", "keyhole-secret.1", "keyhole-secret-put.1", "keyhole-workload-add.1"] {
        let path = dir.path().join(page);
        assert!(listed.contains(path.to_str().unwrap()), "{page} not listed: {listed}");
        assert!(std::fs::read_to_string(&path).unwrap().starts_with(".ie"), "{page}");
    }
    assert_eq!(std::fs::read_to_string(dir.path().join("keyhole.1")).unwrap(), man, "the same main page");
    assert!(!dir.path().join("keyhole-help.1").exists());
}

#[test]
fn remote_admin_over_mutual_tls() {
    needs!(root);
    use rcgen::DnType::{CommonName as CN, OrganizationName as O};
    let pki = Pki::new("keyhole test admin CA");
    let (server_crt, server_key) = pki.issue("server", &[(CN, "broker")], true);
    let (admin_crt, admin_key) = pki.issue("admin", &[(CN, "ops-laptop"), (O, "Example")], false);
    let (other_crt, other_key) = pki.issue("other", &[(CN, "intern")], false);
    let rogue = Pki::new("some other CA");
    let (rogue_crt, rogue_key) = rogue.issue("rogue", &[(CN, "ops-laptop"), (O, "Example")], false);
    let (port, metrics) = (free_port(), format!("127.0.0.1:{}", free_port()));
    let mut b = Broker::start_with(&format!(
        "[metrics]\nlisten = \"{metrics}\"\n\
         [admin]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"{server_crt}\"\ntls_key = \"{server_key}\"\n\
         client_ca = \"{}\"\nsubjects = [\"O=Example, CN=ops-laptop\"]\n",
        pki.ca()
    ));
    b.put("db/pw", b"remote-old-value-41c2");
    let endpoint = format!("https://localhost:{port}");
    let remote = |cert: &str, key: &str, ca: &str, args: &[&str]| {
        Command::new(BIN)
            .args(["--endpoint", &endpoint, "--cert", cert, "--key", key, "--ca", ca])
            .args(args)
            .env_remove("KEYHOLE_SOCKET")
            .output()
            .unwrap()
    };

    // The admin's certificate: it may rotate, and it is audited by subject.
    let o = remote(&admin_crt, &admin_key, &pki.ca(), &["secret", "rotate", "db/pw", "--generate", "20", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o.stdout)["version"], 2);
    let rotated = b.get("db/pw");
    assert_eq!(rotated.len(), 20);
    let line = b.audit_events("rotate").pop().unwrap();
    assert!(line["caller"]["remote"].as_str().unwrap().starts_with("CN=ops-laptop,O=Example from 127.0.0.1:"));
    // Its subject and address apart, too.
    assert_eq!(line["caller"]["subject"], "CN=ops-laptop,O=Example", "{line}");
    assert!(line["caller"]["address"].as_str().unwrap().starts_with("127.0.0.1:"), "{line}");
    // The same through the environment, as a remote operator would set it.
    let o = Command::new(BIN)
        .args(["secret", "ls", "--json"])
        .env_remove("KEYHOLE_SOCKET")
        .envs([("KEYHOLE_ENDPOINT", endpoint.as_str()), ("KEYHOLE_CERT", &admin_crt), ("KEYHOLE_KEY", &admin_key)])
        .env("KEYHOLE_CA", pki.ca())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o.stdout)[0]["path"], "db/pw");

    // A certificate from another CA, with the admin's very subject: refused at the handshake.
    let lines = b.audit_lines().len();
    let o = remote(&rogue_crt, &rogue_key, &pki.ca(), &["secret", "rotate", "db/pw", "--generate", "20"]);
    assert_fails(&o, 4, "refused this client");
    assert_eq!(b.audit_lines().len(), lines, "nothing reached the service");
    // A valid certificate whose subject is not an admin: PERMISSION_DENIED, audited.
    let o = remote(&other_crt, &other_key, &pki.ca(), &["secret", "rotate", "db/pw", "--generate", "20"]);
    assert_fails(&o, 4, "the subject CN=intern is not listed");
    let deny = b.audit_events("deny").pop().unwrap();
    assert_eq!(deny["method"], "PutSecret");
    assert!(deny["caller"]["remote"].as_str().unwrap().starts_with("CN=intern from 127.0.0.1:"));
    assert_eq!((&deny["caller"]["subject"], deny["caller"]["admin"].as_bool()), (&"CN=intern".into(), Some(false)));
    assert_eq!(b.get("db/pw"), rotated, "neither refused call changed the secret");
    // A broker whose certificate the client's CA did not issue.
    let o = remote(&admin_crt, &admin_key, &rogue.ca(), &["secret", "ls"]);
    assert_fails(&o, 5, "UnknownIssuer");
    // Usage errors.
    let o = Command::new(BIN).args(["--endpoint", &endpoint, "secret", "ls"]).output().unwrap();
    assert_fails(&o, 2, "--endpoint needs --cert, --key and --ca");
    let o = remote(&admin_crt, &admin_key, &pki.ca(), &["whoami"]);
    assert_fails(&o, 2, "not served over --endpoint");
    // The old broker closes its TCP listeners before it hands over; the
    // successor listens on the same ports.
    b.takeover();
    let o = remote(&admin_crt, &admin_key, &pki.ca(), &["secret", "ls", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(scrape(&metrics).contains("keyhole_mounts"));
    b.ok(&["audit", "--verify"]);
    b.assert_never_leaked(&[b"remote-old-value-41c2", &rotated]);
}

#[test]
fn remote_admin_and_metrics_config_errors_are_clear() {
    for (toml, words) in [
        ("[admin]\nlisten = \"127.0.0.1:1\"\n", "needs all of listen, tls_cert, tls_key and client_ca"),
        ("[admin]\nlisten = \"127.0.0.1:1\"\ntls_cert = \"/a\"\ntls_key = \"/b\"\nclient_ca = \"/c\"\n", "no subjects"),
        ("[admin]\nsubjects = [\"CN\"]\n", "not TYPE=value"),
        ("[metrics]\nlisten = \"localhost\"\n", "[metrics] listen"),
        ("[alerts]\non_deny = \"page-oncall\"\n", "absolute path"),
        ("[alerts]\nmax_per_minute = 5\n", "no on_deny command"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("k.toml");
        std::fs::write(&cfg, toml).unwrap();
        let o = Command::new(BIN)
            .args(["serve", "--config", cfg.to_str().unwrap(), "--state-dir"])
            .arg(dir.path().join("s"))
            .arg("--run-dir")
            .arg(dir.path().join("r"))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{toml}");
        assert!(stderr(&o).contains(words), "{toml}: {}", stderr(&o));
    }
}

#[test]
fn json_logs_are_one_object_a_line_and_metrics_serve_on_a_unix_socket() {
    needs!(root);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("metrics.sock");
    let b = Broker::start_with_env(
        &format!("[metrics]\nlisten = \"{}\"\n", sock.display()),
        &[("KEYHOLE_LOG_FORMAT", "json")],
    );
    let value = b"logs-must-not-show-5e0f";
    web_reads_db_pw(&b, value);
    assert_eq!(cat_as(NOBODY, &b.mount("web").join("pw")).stdout, value);
    b.ok(&["secret", "rotate", "db/pw", "--generate", "12"]);
    let m = scrape(sock.to_str().unwrap());
    assert_eq!(sample(&m, "keyhole_reads_total{workload=\"web\",secret=\"db/pw\"}"), 1.0, "{m}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let log = b.log();
    let lines: Vec<_> = log.lines().collect();
    assert!(lines.len() > 3, "{log}");
    for l in lines {
        let v = json(l.as_bytes());
        assert!(v["level"].is_string() && v["message"].is_string(), "{l}");
    }
    assert!(log.contains("\"message\":\"keyhole is serving\""));
    b.assert_never_leaked(&[value]);
}

#[test]
fn listing_tables_fit_80_columns() {
    needs!(root);
    let b = Broker::start();
    let paths = ["prod/payments/stripe-webhook", "prod/payments/db/password", "db/pw"];
    for p in paths {
        b.put(p, b"0123456789abcdef0123456789abcdef");
    }
    b.ok(&["workload", "add", "payments-api-prod", "--selector", "docker:label:com.example.service=payments-api"]);
    b.ok(&["workload", "add", "web", "--selector", "unix:uid:65534", "--selector", "docker:image:example/web:1.2"]);
    b.ok(&["grant", "prod/payments/*", "--to", "payments-api-prod", "--mode", "0440", "--uid", "10001"]);
    b.ok(&["grant", "prod/payments/stripe-webhook", "--to", "web", "--file", "stripe.key", "--gid", "10001"]);
    for args in [
        &["secret", "ls"][..],
        &["secret", "history", "db/pw"],
        &["grants"],
        &["workload", "ls"],
        &["mounts"],
        &["status"],
    ] {
        let out = String::from_utf8(b.ok(args)).unwrap();
        assert!(out.lines().count() >= 2, "{args:?}: {out}");
        for l in out.lines() {
            assert!(l.chars().count() <= 80, "{args:?} prints {} columns: {l:?}", l.chars().count());
        }
    }
}

#[test]
fn backend_metrics_follow_an_openbao_outage() {
    needs!(bao);
    let mut bao = Bao::start();
    let addr = format!("127.0.0.1:{}", free_port());
    let b = Broker::start_with(&format!("{}\n[metrics]\nlisten = \"{addr}\"\n", bao.backend_toml("prod", "200ms")));
    let value = b"backend-metrics-must-not-show-19d3";
    b.put("prod/db/pw", value);
    b.ok(&["workload", "add", "app", "--selector", &format!("unix:uid:{NOBODY}")]);
    b.ok(&["grant", "prod/db/pw", "--to", "app", "--mode", "0444"]);
    let file = b.mount("app").join("pw");
    assert_eq!(cat_as(NOBODY, &file).stdout, value);
    let m = scrape(&addr);
    let prod = |name: &str| format!("{name}{{backend=\"prod\"}}");
    assert!(sample(&m, &prod("keyhole_backend_requests_total")) >= 2.0, "{m}");
    assert_eq!(sample(&m, &prod("keyhole_backend_errors_total")), 0.0, "{m}");
    assert_eq!(sample(&m, &prod("keyhole_backend_cached_secrets")), 1.0, "{m}");
    assert!(sample(&m, &prod("keyhole_backend_last_ok_age_seconds")) < 5.0, "{m}");
    assert!(sample(&m, &prod("keyhole_backend_request_duration_seconds_count")) >= 2.0, "{m}");
    // Warm reads make no backend request.
    let requests = |m: &str| sample(m, &prod("keyhole_backend_requests_total"));
    let polls = requests(&scrape(&addr));
    for _ in 0..20 {
        assert_eq!(cat_as(NOBODY, &file).stdout, value);
    }
    let after = requests(&scrape(&addr));
    assert!(after - polls < 20.0, "20 warm reads made {} requests", after - polls);

    bao.stop();
    eventually(10, "the pollers to see the outage", || {
        sample(&scrape(&addr), &prod("keyhole_backend_errors_total")) >= 1.0
    });
    eventually(10, "the cache to age", || sample(&scrape(&addr), &prod("keyhole_backend_last_ok_age_seconds")) >= 1.0);
    let before = sample(&scrape(&addr), "keyhole_stale_serves_total{workload=\"app\",secret=\"prod/db/pw\"}");
    assert_eq!(cat_as(NOBODY, &file).stdout, value, "served from the cache");
    let m = scrape(&addr);
    assert_eq!(sample(&m, "keyhole_stale_serves_total{workload=\"app\",secret=\"prod/db/pw\"}") - before, 1.0, "{m}");
    assert!(!m.contains(std::str::from_utf8(value).unwrap()));
    b.assert_never_leaked(&[value]);
}
