//! Teams, indirect reach: templates, dynamic sources and certificates put
//! or granted by a scoped admin are checked against its roles (a
//! template's inputs, a source's backend path, a certificate's names);
//! and a scoped admin counts in the admin call bucket.

use std::process::Command;

use crate::support::*;

const A: u32 = 41011;
const B: u32 = 41012;
const NOROLE: u32 = 41013;

use crate::teams::{as_uid, as_uid_in, last_deny, ok_as};

/// Team a (uid A, and remote alice) may make templates, dynamic sources
/// and certificates in its corner; team b (uid B) only reads.
fn two_teams(b: &Broker) {
    b.put("a/db", b"team-a-db-value-5c1d");
    b.put("a/new", b"team-a-new-value-0b7e");
    b.put("b/db", b"team-b-db-value-e93a");
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
        "--paths",
        "prod/database/creds/a-web",
        "--paths",
        "prod/pki-a/*",
        "--workloads",
        "a-*",
        "--verbs",
        "read,write,grant,workload,template,dynamic,cert",
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
        "read,grant,workload",
    ]);
    b.ok(&["workload", "add", "b-web", "--selector", "docker:label:keyhole.workload=b-web"]);
}

fn template_names(out: &str) -> Vec<String> {
    let v = json(out.as_bytes());
    let mut names: Vec<String> = v.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect();
    names.sort();
    names
}

#[test]
fn a_scoped_admin_cannot_reach_another_teams_secret_through_a_template() {
    needs!(root);
    let b = Broker::start();
    two_teams(&b);
    ok_as(&b, A, &["workload", "add", "a-job", "--selector", &format!("unix:uid:{A}")]);
    // The attack: a template reading team b's secret, granted to its own workload.
    let denials = b.denials();
    let evil = "{{ secret('a/db') }}:{{ secret('b/db') }}";
    let o = as_uid_in(&b, A, &["template", "put", "evil", "--stdin"], evil);
    assert_fails(&o, 4, "no role grants template on b/db, which the template reads (roles: team-a)");
    assert!(!contains(&o.stdout, b"team-b-db-value") && !contains(&o.stderr, b"team-b-db-value"));
    let d = last_deny(&b);
    assert_eq!(d["method"], "PutTemplate");
    assert_eq!(d["reason"], "role team-a: no role grants template on b/db, which the template reads");
    assert_eq!(d["caller"]["uid"], A);
    assert_eq!(b.denials(), denials + 1);
    assert!(template_names(&String::from_utf8(b.ok(&["template", "ls", "--json"])).unwrap()).is_empty());
    // A branch the dry run does not take is no way around it: the input
    // is never recorded, so the render refuses it (fails closed).
    let sly = "{% if secret('a/db') == 'x' %}{{ secret('b/db') }}{% endif %}ok";
    let o = as_uid_in(&b, A, &["template", "put", "sly", "--stdin"], sly);
    assert!(o.status.success(), "{}", stderr(&o));
    let tv = json(&b.ok(&["template", "get", "sly", "--json"]));
    assert_eq!(tv["inputs"], serde_json::json!(["a/db"]), "{tv}");
    // Its own corner: put, grant to its own workload, read by its own process.
    let o = as_uid_in(&b, A, &["template", "put", "mine", "--stdin"], "db={{ secret('a/db') }}\n");
    assert!(o.status.success(), "{}", stderr(&o));
    ok_as(&b, A, &["grant", "--template", "mine", "--to", "a-job", "--uid", &A.to_string()]);
    let o = run_as(A, &["cat", b.mount("a-job").join("mine").to_str().unwrap()]);
    assert_eq!(o.stdout, b"db=team-a-db-value-5c1d\n", "{}", stderr(&o));
    // A full admin's template reading b/db: team a may not grant it to its
    // workload, replace it, read it or remove it; ls shows only its own.
    b.cli_in(&["template", "put", "theirs", "--stdin"], Some(b"{{ secret('b/db') }}"));
    let o = as_uid(&b, A, &["grant", "--template", "theirs", "--to", "a-job"]);
    assert_fails(&o, 4, "template theirs reads b/db: no role grants grant on b/db");
    let d = last_deny(&b);
    assert_eq!((d["method"].as_str(), d["caller"]["uid"].as_u64()), (Some("Grant"), Some(A as u64)));
    assert!(!b.mount("a-job").join("theirs").exists());
    let o = as_uid_in(&b, A, &["template", "put", "theirs", "--stdin"], "{{ secret('a/db') }}");
    assert_fails(&o, 4, "template theirs exists and reads what the caller's roles do not");
    assert_fails(&as_uid(&b, A, &["template", "get", "theirs"]), 4, "no role grants template on b/db");
    assert_fails(&as_uid(&b, A, &["template", "rm", "theirs"]), 4, "no role grants template on b/db");
    assert_eq!(template_names(&ok_as(&b, A, &["template", "ls", "--json"])), ["mine", "sly"]);
    // Its template granted by a full admin to team b's workload: a new
    // version would change what b-web shows, so it is refused.
    b.ok(&["grant", "--template", "mine", "--to", "b-web"]);
    let o = as_uid_in(&b, A, &["template", "put", "mine", "--stdin"], "{{ secret('a/new') }}");
    assert_fails(&o, 4, "no role grants grant and template on workload b-web");
    // Its own template to team b's workload: refused.
    assert_fails(&as_uid(&b, A, &["grant", "--template", "sly", "--to", "b-web"]), 4, "workload b-web");
    // Team b holds no template verb at all.
    let o = as_uid_in(&b, B, &["template", "put", "x", "--stdin"], "{{ secret('b/db') }}");
    assert_fails(&o, 4, "no role grants template (roles: team-b)");
    // Team b revokes nothing of team a's, and team a nothing of b's.
    assert_fails(&as_uid(&b, B, &["revoke", "--template", "mine", "--from", "a-job"]), 4, "");
    assert_fails(&as_uid(&b, A, &["revoke", "--template", "mine", "--from", "b-web"]), 4, "workload b-web");
    ok_as(&b, A, &["revoke", "--template", "mine", "--from", "a-job"]);
    // Roles name secrets in their paths, never templates or sources.
    let o = b.cli(&["role", "add", "x", "--principal", "uid:5", "--paths", "@template/theirs", "--verbs", "grant"]);
    assert_fails(&o, 2, "a role's paths name secrets");
    b.assert_never_leaked(&[b"team-a-db-value-5c1d", b"team-b-db-value-e93a"]);
}

#[test]
fn a_remote_scoped_admin_is_held_to_the_same_template_rules() {
    needs!(root);
    use rcgen::DnType::{CommonName as CN, OrganizationName as O};
    let pki = Pki::new("keyhole teams reach CA");
    let (server_crt, server_key) = pki.issue("server", &[(CN, "broker")], true);
    let (alice_crt, alice_key) = pki.issue("alice", &[(CN, "alice"), (O, "TeamA")], false);
    let port = free_port();
    let b = Broker::start_with(&format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"{server_crt}\"\ntls_key = \"{server_key}\"\n\
         client_ca = \"{}\"\nsubjects = [\"CN=ops\"]\n",
        pki.ca()
    ));
    two_teams(&b);
    let endpoint = format!("https://localhost:{port}");
    let remote = |args: &[&str], stdin: &[u8]| {
        let mut c = Command::new(BIN)
            .args(["--endpoint", &endpoint, "--cert", &alice_crt, "--key", &alice_key, "--ca", &pki.ca()])
            .args(args)
            .env_remove("KEYHOLE_SOCKET")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(c.stdin.as_mut().unwrap(), stdin).unwrap();
        drop(c.stdin.take());
        c.wait_with_output().unwrap()
    };
    let o = remote(&["template", "put", "evil", "--stdin"], b"{{ secret('b/db') }}");
    assert_fails(&o, 4, "no role grants template on b/db");
    let d = last_deny(&b);
    assert!(d["caller"]["remote"].as_str().unwrap().starts_with("CN=alice,O=TeamA from 127.0.0.1:"), "{d}");
    assert_eq!(d["reason"], "role team-a: no role grants template on b/db, which the template reads");
    let o = remote(&["template", "put", "ok", "--stdin"], b"{{ secret('a/db') }}");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = remote(&["workload", "add", "a-web", "--selector", "docker:label:keyhole.workload=a-web"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = remote(&["grant", "--template", "ok", "--to", "a-web"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = remote(&["grant", "--template", "ok", "--to", "b-web"], b"");
    assert_fails(&o, 4, "workload b-web");
}

#[test]
fn dynamic_sources_and_certificates_are_scoped_by_backend_path_and_name() {
    needs!(root, bao);
    let bao = Bao::start();
    let b = Broker::start_with(&bao.backend_toml("prod", "30s"));
    two_teams(&b);
    ok_as(&b, A, &["workload", "add", "a-web", "--selector", "docker:label:keyhole.workload=a-web"]);
    // Its own backend path: made, listed, granted to its own workload.
    ok_as(&b, A, &["dynamic", "add", "db-a", "--backend", "prod", "--path", "database/creds/a-web"]);
    ok_as(&b, A, &["grant", "dynamic:db-a", "--to", "a-web"]);
    // The attack: another team's engine path, under its own name.
    let o = as_uid(&b, A, &["dynamic", "add", "db-x", "--backend", "prod", "--path", "database/creds/b-web"]);
    assert_fails(&o, 4, "no role grants dynamic on prod/database/creds/b-web (the source's backend path)");
    assert_eq!(last_deny(&b)["method"], "AddSource");
    // A full admin's source for team b: not team a's to grant, replace or remove.
    b.ok(&["dynamic", "add", "db-b", "--backend", "prod", "--path", "database/creds/b-web"]);
    let o = as_uid(&b, A, &["grant", "dynamic:db-b", "--to", "a-web"]);
    assert_fails(&o, 4, "no role grants grant and dynamic on dynamic:db-b (backend path prod/database/creds/b-web)");
    // Nor through a template naming it: dynamic() is an input like secret().
    let o = as_uid_in(&b, A, &["template", "put", "via-b", "--stdin"], "{{ dynamic('db-b').username }}");
    assert_fails(&o, 4, "prod/database/creds/b-web");
    // A full admin's template reading it: not team a's to grant.
    let o = b.cli_in(&["template", "put", "t-b", "--stdin"], Some(b"u={{ dynamic('db-b').username }}"));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = as_uid(&b, A, &["grant", "--template", "t-b", "--to", "a-web", "--file", "t.txt"]);
    assert_fails(&o, 4, "prod/database/creds/b-web");
    let o = as_uid(&b, A, &["dynamic", "add", "db-b", "--backend", "prod", "--path", "database/creds/a-web"]);
    assert_fails(&o, 4, "prod/database/creds/b-web");
    assert_fails(&as_uid(&b, A, &["dynamic", "rm", "db-b"]), 4, "prod/database/creds/b-web");
    let ls = json(ok_as(&b, A, &["dynamic", "ls", "--json"]).as_bytes());
    let names: Vec<_> = ls.as_array().unwrap().iter().map(|s| s["name"].clone()).collect();
    assert_eq!(names, ["db-a"], "{ls}");
    // Its own source, to another team's workload: refused.
    assert_fails(&as_uid(&b, A, &["grant", "dynamic:db-a", "--to", "b-web"]), 4, "to workload b-web");
    // Certificates: its own PKI mount, names that are its workload's.
    let uri = "spiffe://example.org/{workload}";
    let cert = |name: &str, issue: &str, uri: &str, cn: Option<&str>| {
        let mut args = vec!["cert", "add", name, "--backend", "prod", "--issue", issue, "--uri", uri];
        if let Some(cn) = cn {
            args.extend(["--cn", cn]);
        }
        as_uid(&b, A, &args)
    };
    let o = cert("tls-a", "pki-a/issue/web", uri, Some("{workload}.svc"));
    assert!(o.status.success(), "{}", stderr(&o));
    ok_as(&b, A, &["grant", "cert:tls-a", "--to", "a-web"]);
    assert_fails(&cert("t2", "pki/issue/web", uri, Some("{workload}")), 4, "no role grants cert on prod/pki/issue/web");
    let o = cert("t3", "pki-a/issue/web", "spiffe://example.org/b-web", Some("{workload}"));
    assert_fails(&o, 4, "must end in /{workload}");
    assert_fails(&cert("t4", "pki-a/issue/web", uri, Some("b-web.svc")), 4, "certificate CN \"b-web.svc\"");
    assert_fails(&cert("t5", "pki-a/issue/web", uri, None), 4, "needs --cn");
    // No leases verb: the list is refused; team b may not touch team a's sources.
    assert_fails(&as_uid(&b, A, &["leases"]), 4, "no role grants leases");
    assert_fails(&as_uid(&b, B, &["dynamic", "rm", "db-a"]), 4, "no role grants dynamic");
    // Revoke within its scope works, and the full admin still sees everything.
    ok_as(&b, A, &["revoke", "dynamic:db-a", "--from", "a-web"]);
    let all = json(&b.ok(&["dynamic", "ls", "--json"]));
    assert_eq!(all.as_array().unwrap().len(), 2);
}

#[test]
fn a_scoped_admin_is_counted_in_the_admin_bucket_and_a_stranger_is_not() {
    needs!(root);
    let b = Broker::start_with("[limits]\ncalls_per_second = 5\n");
    two_teams(&b);
    // A few hundred calls in a loop: never RESOURCE_EXHAUSTED.
    for i in 0..300 {
        let o = as_uid(&b, A, &["secret", "get", "a/db"]);
        assert!(o.status.success(), "call {i}: {}", stderr(&o));
    }
    // A stranger (no role) is held to calls_per_second.
    let codes: Vec<_> = (0..40).map(|_| as_uid(&b, NOROLE, &["secret", "get", "a/db"]).status.code()).collect();
    assert!(codes.contains(&Some(5)), "a stranger was never limited: {codes:?}");
    assert!(codes.iter().all(|c| matches!(c, Some(4 | 5))), "{codes:?}");
}

fn policy(tag: &str, template: &str, with_cert: bool) -> String {
    let mut f = format!(
        "[[workload]]\nname = \"web\"\nselectors = [\"docker:label:keyhole.test={tag}\"]\n\n\
         [[template]]\nname = \"cfg\"\nsource = \"\"\"\n{template}\"\"\"\n\n\
         [[grant]]\ntemplate = \"cfg\"\nworkload = \"web\"\nfile = \"app.conf\"\nmode = \"0444\"\n\n"
    );
    if with_cert {
        f.push_str(
            "[[cert]]\nname = \"tls\"\nbackend = \"prod\"\nissue = \"pki/issue/workload\"\n\
             uri = \"spiffe://example.org/{workload}\"\ncn = \"{workload}.svc\"\nttl = \"1h\"\n\n\
             [[grant]]\ncert = \"tls\"\nworkload = \"web\"\nfile = \"tls.pem\"\nmode = \"0444\"\n",
        );
    }
    f
}

/// OpenBao with a PKI engine, a broker with it as backend `prod`, and
/// `app/db` in the local store.
fn pki_broker(db: &[u8]) -> (Bao, Broker) {
    let bao = Bao::start();
    bao.pki_engine();
    let b = Broker::start_with(&bao.backend_toml("prod", "30s"));
    b.put("app/db", db);
    (bao, b)
}

#[test]
fn templates_and_certificates_in_a_policy_file_apply_diff_export_and_prune_with_live_leases() {
    needs!(root, docker, bao);
    let (_bao, b) = pki_broker(b"app-db-value-4e0c");
    let tag = unique("files");
    let full = policy(&tag, "db={{ secret('app/db') }}\n", true);
    // diff: drift (exit 10), naming the template and the certificate.
    let o = b.cli_in(&["diff", "-f", "-"], Some(full.as_bytes()));
    assert_eq!(o.status.code(), Some(10), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.contains("+ template cfg") && out.contains("+ cert:tls") && out.contains("+ grant cert:tls -> web"));
    let o = b.cli_in(&["apply", "-f", "-"], Some(full.as_bytes()));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("applied: 5 changes"));
    // A container reads the rendered template and its own certificate (a live lease).
    let bind = format!("{}:/run/secrets:ro,rslave", b.mount("web").display());
    let c = Container::start(&["--label", &format!("keyhole.test={tag}"), "-v", &bind]);
    assert_eq!(c.cat("/run/secrets/app.conf").unwrap(), b"db=app-db-value-4e0c\n");
    let pem = String::from_utf8(c.cat("/run/secrets/tls.pem").unwrap()).unwrap();
    assert!(pem.contains("BEGIN CERTIFICATE"), "{pem}");
    assert_eq!(json(&b.ok(&["leases", "--json"])).as_array().unwrap().len(), 1);
    // Idempotent: 0 changes, one audit line; export round-trips, names only.
    let lines = b.audit_lines().len();
    let o = b.cli_in(&["apply", "-f", "-"], Some(full.as_bytes()));
    assert!(String::from_utf8_lossy(&o.stdout).contains("applied: 0 changes"), "{}", stderr(&o));
    let new = &b.audit_lines()[lines..];
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!((new[0]["event"].as_str(), new[0]["reason"].as_str()), (Some("apply"), Some("0 changes")));
    let exported = b.ok(&["export"]);
    assert!(!contains(&exported, b"app-db-value"));
    let text = String::from_utf8_lossy(&exported);
    assert!(text.contains("[[template]]") && text.contains("[[cert]]") && text.contains("cert = \"tls\""), "{text}");
    let o = b.cli_in(&["diff", "-f", "-", "--prune"], Some(&exported));
    assert_eq!(o.status.code(), Some(0), "{text}\n{}\n{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    // A changed template: one change, the file shows it.
    let changed = policy(&tag, "DB={{ secret('app/db') }}\n", true);
    let o = b.cli_in(&["apply", "-f", "-"], Some(changed.as_bytes()));
    assert!(String::from_utf8_lossy(&o.stdout).contains("~ template cfg"), "{}", stderr(&o));
    eventually(5, "the new render", || {
        c.cat("/run/secrets/app.conf").ok().as_deref() == Some(b"DB=app-db-value-4e0c\n")
    });
    // A prune that would revoke the live certificate lease: diff says so,
    // apply refuses without --revoke-leases and changes nothing.
    let smaller = policy(&tag, "DB={{ secret('app/db') }}\n", false);
    let o = b.cli_in(&["diff", "-f", "-", "--prune"], Some(smaller.as_bytes()));
    assert_eq!(o.status.code(), Some(10));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.contains("- cert:tls (revokes 1 live lease)"), "{out}");
    let o = b.cli_in(&["apply", "-f", "-", "--prune"], Some(smaller.as_bytes()));
    assert_fails(&o, 7, "would revoke 1 live leases");
    assert_eq!(json(&b.ok(&["cert", "ls", "--json"])).as_array().unwrap().len(), 1, "nothing changed");
    assert!(c.cat("/run/secrets/tls.pem").is_ok());
    let o = b.cli_in(&["apply", "-f", "-", "--prune", "--revoke-leases"], Some(smaller.as_bytes()));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(json(&b.ok(&["cert", "ls", "--json"])).as_array().unwrap().is_empty());
    eventually(10, "the lease revoked", || json(&b.ok(&["leases", "--json"])).as_array().unwrap().is_empty());
    assert!(c.cat("/run/secrets/tls.pem").is_err(), "the certificate file is gone");
    assert_eq!(c.cat("/run/secrets/app.conf").unwrap(), b"DB=app-db-value-4e0c\n");
    // A broken template changes nothing and names its line.
    let broken = policy(&tag, "{{ secret('app/nope') }}\n", false);
    let o = b.cli_in(&["apply", "-f", "-"], Some(broken.as_bytes()));
    assert_fails(&o, 2, "line 5: [[template]] cfg:");
    b.assert_never_leaked(&[b"app-db-value-4e0c"]);
}

#[test]
fn a_policy_files_template_may_read_a_certificate_the_same_file_makes() {
    needs!(root, docker, bao);
    let (_bao, b) = pki_broker(b"app-db-value-77d1");
    let tag = unique("leasedfile");
    let file = policy(&tag, "{{ cert('tls').cert }}{{ cert('tls').key }}db={{ secret('app/db') }}\n", true);
    let o = b.cli_in(&["apply", "-f", "-"], Some(file.as_bytes()));
    assert!(o.status.success(), "{}", stderr(&o));
    // Recorded like a put's: the source is what the template reads.
    let export = String::from_utf8(b.ok(&["export"])).unwrap();
    assert!(export.contains("cert('tls').cert"), "{export}");
    let bind = format!("{}:/run/secrets:ro,rslave", b.mount("web").display());
    let c = Container::start(&["--label", &format!("keyhole.test={tag}"), "-v", &bind]);
    let conf = String::from_utf8(c.cat("/run/secrets/app.conf").unwrap()).unwrap();
    assert!(conf.contains("BEGIN CERTIFICATE") && conf.contains("PRIVATE KEY"), "{conf}");
    assert!(conf.ends_with("db=app-db-value-77d1\n"), "{conf}");
    // The template's lease is its own, apart from the direct grant's.
    assert!(c.cat("/run/secrets/tls.pem").is_ok());
    eventually(5, "two leases", || json(&b.ok(&["leases", "--json"])).as_array().unwrap().len() == 2);
    // Applied again: nothing changes.
    let o = b.cli_in(&["apply", "-f", "-"], Some(file.as_bytes()));
    assert!(String::from_utf8_lossy(&o.stdout).contains("applied: 0 changes"), "{}", stderr(&o));
    // A template naming a source neither the broker nor the file has: refused by line.
    let bad = policy(&tag, "{{ dynamic('nope').username }}\n", false);
    assert_fails(&b.cli_in(&["apply", "-f", "-"], Some(bad.as_bytes())), 2, "line 5: [[template]] cfg:");
    b.assert_never_leaked(&[b"app-db-value-77d1"]);
}

#[test]
fn a_scoped_admin_applies_templates_and_sources_only_within_its_scope() {
    needs!(root, bao);
    let bao = Bao::start();
    let b = Broker::start_with(&bao.backend_toml("prod", "30s"));
    two_teams(&b);
    b.ok(&["role", "add", "team-a-apply", "--principal", &format!("uid:{A}"), "--verbs", "apply"]);
    let mine = format!(
        "[[workload]]\nname = \"a-job\"\nselectors = [\"unix:uid:{A}\"]\n\n\
         [[template]]\nname = \"a-cfg\"\nsource = \"db={{{{ secret('a/db') }}}}\"\n\n\
         [[dynamic]]\nname = \"a-db\"\nbackend = \"prod\"\npath = \"database/creds/a-web\"\n\n\
         [[grant]]\ntemplate = \"a-cfg\"\nworkload = \"a-job\"\nuid = {A}\n\n\
         [[grant]]\ndynamic = \"a-db\"\nworkload = \"a-job\"\n"
    );
    let o = as_uid_in(&b, A, &["apply", "-f", "-"], &mine);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("applied: 5 changes"));
    let o = run_as(A, &["cat", b.mount("a-job").join("a-cfg").to_str().unwrap()]);
    assert_eq!(o.stdout, b"db=team-a-db-value-5c1d", "{}", stderr(&o));
    // The attack through a file: a template reading team b's secret (line 5),
    // or a source on team b's engine path. Nothing is applied, the denial audited.
    let evil = mine.replace("secret('a/db')", "secret('b/db')").replace("a-cfg", "a-cfg2");
    let o = as_uid_in(&b, A, &["apply", "-f", "-"], &evil);
    assert_fails(
        &o,
        4,
        "line 5: no role grants template on b/db, which the template reads (roles: team-a,team-a-apply)",
    );
    let d = last_deny(&b);
    assert_eq!((d["method"].as_str(), d["caller"]["uid"].as_u64()), (Some("ApplyPolicy"), Some(A as u64)));
    let evil = mine.replace("database/creds/a-web", "database/creds/b-web");
    let o = as_uid_in(&b, A, &["apply", "-f", "-"], &evil);
    assert_fails(&o, 4, "no role grants dynamic on prod/database/creds/b-web");
    let names = template_names(&String::from_utf8(b.ok(&["template", "ls", "--json"])).unwrap());
    assert_eq!(names, ["a-cfg"], "nothing of the refused files was applied");
    assert_eq!(json(&b.ok(&["dynamic", "ls", "--json"]))[0]["path"], "database/creds/a-web");
    // A full admin's template and source for team b: team a's --prune leaves them.
    b.cli_in(&["template", "put", "b-cfg", "--stdin"], Some(b"{{ secret('b/db') }}"));
    b.ok(&["dynamic", "add", "b-db", "--backend", "prod", "--path", "database/creds/b-web"]);
    let o = as_uid_in(&b, A, &["apply", "-f", "-", "--prune"], &mine);
    assert!(String::from_utf8_lossy(&o.stdout).contains("applied: 0 changes"), "{}", stderr(&o));
    let out = ok_as(&b, A, &["export"]);
    assert!(out.contains("a-cfg") && !out.contains("b-cfg") && !out.contains("b-db"), "{out}");
    assert_eq!(json(&b.ok(&["dynamic", "ls", "--json"])).as_array().unwrap().len(), 2);
    b.assert_never_leaked(&[b"team-b-db-value-e93a"]);
}
