//! Teams: roles scope admins (host uids and remote certificates) to secret
//! paths and workloads, and policy files (`apply`, `diff`, `export`).

use std::process::{Command, Output};

use crate::support::*;

const A: u32 = 41001;
const B: u32 = 41002;
const NOROLE: u32 = 41003;

/// Two teams' roles and secrets on one broker.
fn two_teams(b: &Broker) {
    b.put("a/db", b"team-a-db-value-7f1e");
    b.put("b/db", b"team-b-db-value-90c2");
    b.ok(&[
        "role",
        "add",
        "team-a",
        "--principal",
        &format!("uid:{A}"),
        "--principal",
        "subject:CN=alice,O=TeamA",
        "--paths",
        "a/*",
        "--workloads",
        "a-*",
        "--verbs",
        "read,write,grant,workload,apply",
    ]);
    b.ok(&[
        "role",
        "add",
        "team-b",
        "--principal",
        &format!("uid:{B}"),
        "--paths",
        "b/*",
        "--workloads",
        "b-*",
        "--verbs",
        "read",
        "--verbs",
        "grant,workload,audit",
    ]);
}

/// The CLI as `uid`, on the workload socket (mode 0666; admin calls are
/// served there to admins, scoped ones included).
pub(crate) fn as_uid(b: &Broker, uid: u32, args: &[&str]) -> Output {
    cli_as(&b.workload_socket(), args, None, Some(uid))
}

/// The same, with `stdin` (a policy file: a team admin's uid cannot read the test's dir).
pub(crate) fn as_uid_in(b: &Broker, uid: u32, args: &[&str], stdin: &str) -> Output {
    cli_as(&b.workload_socket(), args, Some(stdin.as_bytes()), Some(uid))
}

pub(crate) fn ok_as(b: &Broker, uid: u32, args: &[&str]) -> String {
    let o = as_uid(b, uid, args);
    assert!(o.status.success(), "uid {uid}: keyhole {args:?}: {}", stderr(&o));
    String::from_utf8(o.stdout).unwrap()
}

pub(crate) fn last_deny(b: &Broker) -> serde_json::Value {
    b.audit_events("deny").pop().expect("a deny line")
}

#[test]
fn each_team_admin_is_allowed_in_its_corner_and_refused_outside_it() {
    if !require_root() {
        return;
    }
    let b = Broker::start();
    two_teams(&b);
    // Its own secrets: read, write, list (only its own).
    assert_eq!(ok_as(&b, A, &["secret", "get", "a/db"]), "team-a-db-value-7f1e");
    ok_as(&b, A, &["secret", "put", "a/new", "--generate", "12"]);
    ok_as(&b, A, &["secret", "history", "a/db"]);
    let ls = ok_as(&b, A, &["secret", "ls", "--json"]);
    let paths: Vec<String> = json(ls.as_bytes()).as_array().unwrap().iter().map(|s| s["path"].to_string()).collect();
    assert_eq!(paths, ["\"a/db\"", "\"a/new\""], "ls shows only the role's paths");
    // Another team's: refused, exit 4, audited with the role and what it lacked.
    let denials = b.denials();
    let o = as_uid(&b, A, &["secret", "get", "b/db"]);
    assert_fails(&o, 4, "no role grants read on b/db (roles: team-a)");
    assert!(!contains(&o.stdout, b"team-b-db-value"));
    let d = last_deny(&b);
    assert_eq!(d["method"], "GetSecret");
    assert_eq!(d["reason"], "role team-a: no role grants read on b/db");
    assert_eq!(d["caller"]["uid"], A);
    assert_fails(&as_uid(&b, A, &["secret", "put", "b/db", "--generate", "8"]), 4, "no role grants write on b/db");
    assert_fails(&as_uid(&b, A, &["secret", "rm", "b/db"]), 4, "no role grants write on b/db");
    assert_fails(&as_uid(&b, A, &["secret", "history", "b/db"]), 4, "no role grants read on b/db");
    assert_eq!(b.denials(), denials + 4);
    assert_eq!(b.get("b/db"), b"team-b-db-value-90c2", "team b's secret is untouched");
    // Team b has read but no write; audit, which team a lacks.
    assert_fails(&as_uid(&b, B, &["secret", "put", "b/db", "--generate", "8"]), 4, "no role grants write on b/db");
    ok_as(&b, B, &["audit", "--verify"]);
    assert_fails(&as_uid(&b, A, &["audit", "--verify"]), 4, "no role grants audit");
    // Full-admin calls are not for roles.
    assert_fails(
        &as_uid(&b, A, &["role", "add", "mine", "--principal", &format!("uid:{A}"), "--paths", "*", "--verbs", "read"]),
        4,
        "needs a full admin",
    );
    assert_fails(&as_uid(&b, A, &["role", "rm", "team-b"]), 4, "needs a full admin");
    assert_fails(&as_uid(&b, A, &["status"]), 4, "needs a full admin");
    // Someone no role names is no admin at all.
    assert_fails(&as_uid(&b, NOROLE, &["secret", "get", "a/db"]), 4, "needs an admin caller");
    // whoami shows a scoped admin its roles.
    let w = json(ok_as(&b, A, &["whoami", "--json"]).as_bytes());
    assert_eq!((w["admin"].as_bool(), w["roles"].clone()), (Some(false), serde_json::json!(["team-a"])));
    assert!(ok_as(&b, B, &["whoami"]).contains("admin: scoped, roles team-b"));
    // A role removed: its principal is refused from the next call.
    b.ok(&["role", "rm", "team-a"]);
    assert_fails(&as_uid(&b, A, &["secret", "get", "a/db"]), 4, "needs an admin caller");
    let ls = String::from_utf8(b.ok(&["role", "ls"])).unwrap();
    assert!(ls.contains("team-b") && !ls.contains("team-a"), "{ls}");
    assert_eq!(b.audit_events("role_rm").pop().unwrap()["path"], "team-a");
    b.assert_never_leaked(&[b"team-a-db-value-7f1e", b"team-b-db-value-90c2"]);
}

#[test]
fn a_team_admin_cannot_reach_another_teams_secrets_through_grants_or_selectors() {
    if !require_root() {
        return;
    }
    let b = Broker::start();
    two_teams(&b);
    ok_as(&b, A, &["workload", "add", "a-web", "--selector", "docker:label:keyhole.workload=a-web"]);
    ok_as(&b, A, &["workload", "add", "a-job", "--selector", &format!("unix:uid:{A}")]);
    ok_as(&b, A, &["grant", "a/db", "--to", "a-job", "--uid", &A.to_string()]);
    // The mount shows it at once, to team a's own host process.
    let file = b.mount("a-job").join("db");
    let o = run_as(A, &["cat", file.to_str().unwrap()]);
    assert_eq!(o.stdout, b"team-a-db-value-7f1e", "{}", stderr(&o));
    // The attack: team b's secret to team a's own workload.
    assert_fails(&as_uid(&b, A, &["grant", "b/db", "--to", "a-job"]), 4, "no role grants grant on b/db");
    assert_fails(&as_uid(&b, A, &["grant", "b/*", "--to", "a-job"]), 4, "no role grants grant on b/*");
    assert_fails(&as_uid(&b, A, &["grant", "*", "--to", "a-job"]), 4, "not a secret path or prefix");
    // Its own secret to another team's workload, or another team's grant revoked.
    b.ok(&["workload", "add", "b-web", "--selector", "docker:label:keyhole.workload=b-web"]);
    b.ok(&["grant", "b/db", "--to", "b-web"]);
    assert_fails(&as_uid(&b, A, &["grant", "a/db", "--to", "b-web"]), 4, "to workload b-web");
    assert_fails(&as_uid(&b, A, &["revoke", "b/db", "--from", "b-web"]), 4, "no role grants grant on b/db");
    assert_fails(&as_uid(&b, A, &["workload", "rm", "b-web"]), 4, "no role grants workload on workload b-web");
    // Widening: selectors that could match another team's containers or users.
    for sel in [
        "docker:label:keyhole.workload=b-web",
        "docker:image:busybox:1.36.1",
        "docker:name:b-web",
        "docker:id:0123456789ab",
        "unix:uid:0",
        &format!("unix:uid:{B}"),
    ] {
        let o = as_uid(&b, A, &["workload", "add", "a-wide", "--selector", sel]);
        assert_fails(&o, 4, "selector");
    }
    // Nor may it replace another team's workload by name.
    let o = as_uid(&b, A, &["workload", "add", "b-web2", "--selector", "docker:label:keyhole.workload=a-web"]);
    assert_fails(&o, 4, "no role grants workload on workload b-web2");
    let d = last_deny(&b);
    assert_eq!(d["method"], "AddWorkload");
    assert!(d["reason"].as_str().unwrap().starts_with("role team-a: "), "{d}");
    // Lists show only its own corner.
    let ws = ok_as(&b, A, &["workload", "ls", "--json"]);
    let names: Vec<_> = json(ws.as_bytes()).as_array().unwrap().iter().map(|w| w["name"].clone()).collect();
    assert_eq!(names, ["a-job", "a-web"]);
    let gs = ok_as(&b, A, &["grants", "--json"]);
    assert_eq!(json(gs.as_bytes()).as_array().unwrap().len(), 1);
    assert_eq!(String::from_utf8(b.ok(&["grants", "--workload", "b-web"])).unwrap().matches("b/db").count(), 1);
}

#[test]
fn remote_certificate_admins_are_scoped_by_their_subject() {
    if !require_root() {
        return;
    }
    use rcgen::DnType::{CommonName as CN, OrganizationName as O};
    let pki = Pki::new("keyhole teams CA");
    let (server_crt, server_key) = pki.issue("server", &[(CN, "broker")], true);
    let (alice_crt, alice_key) = pki.issue("alice", &[(CN, "alice"), (O, "TeamA")], false);
    let (mallory_crt, mallory_key) = pki.issue("mallory", &[(CN, "mallory"), (O, "TeamA")], false);
    let port = free_port();
    let b = Broker::start_with(&format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"{server_crt}\"\ntls_key = \"{server_key}\"\n\
         client_ca = \"{}\"\nsubjects = [\"CN=ops\"]\n",
        pki.ca()
    ));
    two_teams(&b);
    let endpoint = format!("https://localhost:{port}");
    let remote = |crt: &str, key: &str, args: &[&str]| {
        Command::new(BIN)
            .args(["--endpoint", &endpoint, "--cert", crt, "--key", key, "--ca", &pki.ca()])
            .args(args)
            .env_remove("KEYHOLE_SOCKET")
            .output()
            .unwrap()
    };
    let o = remote(&alice_crt, &alice_key, &["secret", "get", "a/db"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout, b"team-a-db-value-7f1e");
    let o = remote(&alice_crt, &alice_key, &["secret", "get", "b/db"]);
    assert_fails(&o, 4, "no role grants read on b/db (roles: team-a)");
    let d = last_deny(&b);
    assert!(d["caller"]["remote"].as_str().unwrap().starts_with("CN=alice,O=TeamA from 127.0.0.1:"), "{d}");
    assert_eq!(d["reason"], "role team-a: no role grants read on b/db");
    // A remote admin owns no uid: it cannot select host users.
    let o = remote(&alice_crt, &alice_key, &["workload", "add", "a-x", "--selector", "unix:uid:0"]);
    assert_fails(&o, 4, "selector unix:uid:0");
    let o = remote(&alice_crt, &alice_key, &["workload", "add", "a-x", "--selector", "docker:label:app=a-x"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A certificate from the same CA whose subject no role names.
    let o = remote(&mallory_crt, &mallory_key, &["secret", "get", "a/db"]);
    assert_fails(&o, 4, "not listed");
}

const POLICY: &str = r#"# two workloads of root's host processes
[[workload]]
name = "w1"
selectors = ["unix:uid:0"]

[[workload]]
name = "w2"
selectors = ["unix:uid:0", "unix:gid:0"]

[[grant]]
secret = "app/db"
workload = "w1"
file = "DB_PASSWORD"
mode = "0440"

[[grant]]
secret = "app/*"
workload = "w2"
"#;

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn apply_diff_export_round_trip_with_prune_and_idempotence() {
    if !require_root() {
        return;
    }
    let b = Broker::start();
    b.put("app/db", b"app-db-value-31ab");
    b.put("app/key", b"app-key-value-77de");
    let f = write(b.dir.path(), "policy.toml", POLICY);
    // diff: drift is exit 10, and says what apply would do.
    let o = b.cli(&["diff", "-f", &f]);
    assert_eq!(o.status.code(), Some(10), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.contains("+ workload w1") && out.contains("+ grant app/* -> w2"), "{out}");
    assert!(b.mount("w1").join("DB_PASSWORD").metadata().is_err(), "diff changed nothing");
    // apply: every mount is there when it returns.
    let out = String::from_utf8(b.ok(&["apply", "-f", &f])).unwrap();
    assert!(out.contains("applied: 4 changes"), "{out}");
    assert_eq!(std::fs::read(b.mount("w1").join("DB_PASSWORD")).unwrap(), b"app-db-value-31ab");
    assert_eq!(std::fs::read(b.mount("w2").join("key")).unwrap(), b"app-key-value-77de");
    // Idempotent: nothing to do, and one audit line saying so.
    assert_eq!(b.cli(&["diff", "-f", &f]).status.code(), Some(0));
    let lines = b.audit_lines().len();
    let out = String::from_utf8(b.ok(&["apply", "-f", &f])).unwrap();
    assert!(out.contains("applied: 0 changes"), "{out}");
    let new = &b.audit_lines()[lines..];
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!((new[0]["event"].as_str(), new[0]["reason"].as_str()), (Some("apply"), Some("0 changes")));
    // export | apply changes nothing; the export holds names, never values.
    let exported = b.ok(&["export"]);
    assert!(!contains(&exported, b"app-db-value") && !contains(&exported, b"app-key-value"));
    let o = b.cli_in(&["diff", "-f", "-", "--prune"], Some(&exported));
    assert_eq!(o.status.code(), Some(0), "{}\n{}", String::from_utf8_lossy(&exported), stderr(&o));
    // Prune: a smaller file; diff --prune says what goes, apply --prune removes it.
    let smaller = write(b.dir.path(), "smaller.toml", &POLICY[..POLICY.find("[[workload]]\nname = \"w2\"").unwrap()]);
    let o = b.cli(&["diff", "-f", &smaller]);
    assert_eq!(o.status.code(), Some(0), "without --prune nothing is removed");
    let o = b.cli(&["diff", "-f", &smaller, "--prune"]);
    assert_eq!(o.status.code(), Some(10));
    assert!(String::from_utf8_lossy(&o.stdout).contains("- workload w2 (and its grants)"));
    b.ok(&["apply", "-f", &smaller, "--prune"]);
    eventually(5, "w2's mount gone", || !b.mount("w2").join("key").exists());
    let ws = String::from_utf8(b.ok(&["workload", "ls"])).unwrap();
    assert!(ws.contains("w1") && !ws.contains("w2"), "{ws}");
    b.assert_never_leaked(&[b"app-db-value-31ab", b"app-key-value-77de"]);
}

#[test]
fn a_broken_file_changes_nothing_and_names_its_line() {
    if !require_root() {
        return;
    }
    let b = Broker::start();
    let f = write(b.dir.path(), "ok.toml", POLICY);
    b.ok(&["apply", "-f", &f]);
    let before = String::from_utf8(b.ok(&["export"])).unwrap();
    // A bad selector on line 8, after a valid change to w1: nothing is applied.
    let broken = POLICY
        .replace("selectors = [\"unix:uid:0\"]", "selectors = [\"unix:uid:5\"]")
        .replace("selectors = [\"unix:uid:0\", \"unix:gid:0\"]", "selectors = [\"unix:uid:0\", \"bogus\"]");
    let bf = write(b.dir.path(), "broken.toml", &broken);
    let o = b.cli(&["apply", "-f", &bf]);
    assert_fails(&o, 2, "line 6: [[workload]] w2: selector \"bogus\"");
    let o = b.cli(&["diff", "-f", &bf]);
    assert_fails(&o, 2, "line 6:");
    // TOML syntax, an unknown field, a grant to a workload nowhere.
    let o = b.cli_in(&["apply", "-f", "-"], Some(b"[[workload]]\nname = \"x\"\nselectors = [\"unix:uid:0\"\n"));
    assert_fails(&o, 2, "line 3");
    let o = b.cli_in(&["apply", "-f", "-"], Some(b"[[workload]]\nname = \"x\"\nselectors = []\ncolour = 1\n"));
    assert_fails(&o, 2, "line 4");
    let o = b.cli_in(&["apply", "-f", "-"], Some(b"\n[[grant]]\nsecret = \"a\"\nworkload = \"nowhere\"\n"));
    assert_fails(&o, 2, "line 2: [[grant]] a: workload nowhere");
    // A template that reads a secret that is not there: refused by its line.
    let t = b"\n\n[[template]]\nname = \"t\"\nsource = \"{{ secret('nope/x') }}\"\n";
    let o = b.cli_in(&["apply", "-f", "-"], Some(t));
    assert_fails(&o, 2, "line 3: [[template]] t: line 1, column");
    assert_eq!(String::from_utf8(b.ok(&["export"])).unwrap(), before, "nothing changed");
}

#[test]
fn a_scoped_admin_applies_only_within_its_scope_all_or_nothing() {
    if !require_root() {
        return;
    }
    let b = Broker::start();
    two_teams(&b);
    b.ok(&["workload", "add", "b-web", "--selector", "docker:label:keyhole.workload=b-web"]);
    b.ok(&["grant", "b/db", "--to", "b-web"]);
    let mine = format!(
        "[[workload]]\nname = \"a-job\"\nselectors = [\"unix:uid:{A}\"]\n\n\
         [[grant]]\nsecret = \"a/db\"\nworkload = \"a-job\"\n"
    );
    // Its own corner, with --prune: team b's workload is not its to prune.
    let o = as_uid_in(&b, A, &["apply", "-f", "-", "--prune"], &mine);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("applied: 2 changes"));
    assert!(String::from_utf8(b.ok(&["workload", "ls"])).unwrap().contains("b-web"));
    // One item outside: nothing of the file is applied, the denial audited with its line.
    let evil = format!(
        "{mine}\n[[workload]]\nname = \"a-new\"\nselectors = [\"unix:uid:{A}\"]\n\n\
         [[grant]]\nsecret = \"b/db\"\nworkload = \"a-job\"\nfile = \"b_db\"\n"
    );
    let o = as_uid_in(&b, A, &["apply", "-f", "-"], &evil);
    assert_fails(&o, 4, "line 13: no role grants grant on b/db (roles: team-a)");
    let d = last_deny(&b);
    assert_eq!(d["method"], "ApplyPolicy");
    assert!(!String::from_utf8(b.ok(&["workload", "ls"])).unwrap().contains("a-new"), "all or nothing");
    // Roles in a file are for full admins; team b holds no apply verb.
    let o = as_uid_in(&b, B, &["apply", "-f", "-"], &mine);
    assert_fails(&o, 4, "no role grants apply");
    // A scoped export shows only its corner, and no roles.
    let out = ok_as(&b, A, &["export"]);
    assert!(out.contains("a-job") && !out.contains("b-web") && !out.contains("[[role]]"), "{out}");
}
