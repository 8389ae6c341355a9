//! The Vault/OpenBao backend against a real OpenBao dev server.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use crate::support::*;

const APP: u32 = 1000;

fn read_as_app(b: &Broker, workload: &str, file: &str) -> Result<Vec<u8>, String> {
    let o = run_as(APP, &["cat", b.mount(workload).join(file).to_str().unwrap()]);
    if o.status.success() { Ok(o.stdout) } else { Err(String::from_utf8_lossy(&o.stderr).into_owned()) }
}

fn grant_to_app(b: &Broker, secret: &str) {
    if b.cli(&["workload", "ls", "--json"]).stdout == b"[]\n" {
        b.ok(&["workload", "add", "app", "--selector", &format!("unix:uid:{APP}")]);
    }
    b.ok(&["grant", secret, "--to", "app", "--mode", "0444"]);
}

#[test]
fn put_get_rotate_and_rm_agree_with_the_bao_cli() {
    needs!(bao);
    let bao = Bao::start();
    let b = Broker::start_with(&bao.backend_toml("prod", "30s"));
    assert_eq!(b.put("prod/db/password", b"vault-pw-1f3a"), 1);
    assert_eq!(bao.ok(&["kv", "get", "-field=value", "secret/db/password"]), "vault-pw-1f3a");
    b.ok(&["secret", "rotate", "prod/db/password", "--generate", "24"]);
    let generated = b.get("prod/db/password");
    assert_eq!(generated.len(), 24);
    assert_eq!(bao.ok(&["kv", "get", "-field=value", "secret/db/password"]).as_bytes(), generated.as_slice());
    assert_eq!(b.ok(&["secret", "get", "prod/db/password", "--version", "1"]), b"vault-pw-1f3a");
    let h = json(&b.ok(&["secret", "history", "prod/db/password", "--json"]));
    assert_eq!(h.as_array().unwrap().len(), 2);
    // Other fields of a secret survive keyhole's writes.
    bao.ok(&["kv", "put", "secret/svc", "value=one", "user=admin"]);
    b.cli_in(&["secret", "rotate", "prod/svc", "--stdin"], Some(b"two"));
    assert_eq!(bao.ok(&["kv", "get", "-field=user", "secret/svc"]), "admin");
    let ls = json(&b.ok(&["secret", "ls", "prod", "--json"]));
    let paths: Vec<&str> = ls.as_array().unwrap().iter().map(|v| v["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["prod/db/password", "prod/svc"]);
    b.ok(&["secret", "rm", "prod/db/password"]);
    assert!(!bao.cli(&["kv", "get", "secret/db/password"]).status.success());
    assert_fails(&b.cli(&["secret", "get", "prod/db/password"]), 3, "does not exist");
    // Vault keeps text; a backend's bare name is not a secret.
    assert_fails(&b.cli_in(&["secret", "put", "prod/bin", "--stdin"], Some(&[0xff, 0xfe])), 2, "must be UTF-8");
    assert_fails(&b.cli(&["secret", "put", "prod", "--generate", "4"]), 2, "prod is a backend");
    // Paths outside the backend stay local.
    b.put("local/x", b"here");
    assert!(!bao.cli(&["kv", "get", "secret/local/x"]).status.success());
    b.assert_never_leaked(&[b"vault-pw-1f3a", &generated]);
}

#[test]
fn check_and_set_refuses_a_stale_writer() {
    needs!(bao);
    let bao = Bao::start();
    let b = Broker::start_with(&bao.backend_toml("prod", "30s"));
    b.put("prod/k", b"one");
    bao.ok(&["kv", "put", "secret/k", "value=written-elsewhere"]);
    let o = b.cli_in(&["secret", "rotate", "prod/k", "--stdin", "--if-version", "1"], Some(b"mine"));
    assert_fails(&o, 7, "prod/k was not changed: it is at version 2, not 1");
    assert_eq!(bao.ok(&["kv", "get", "-field=value", "secret/k"]), "written-elsewhere");
    assert!(b.cli_in(&["secret", "rotate", "prod/k", "--stdin", "--if-version", "2"], Some(b"mine")).status.success());
    // The same rule for local secrets; 0 means "only if it is new".
    assert!(b.cli_in(&["secret", "put", "l/k", "--stdin", "--if-version", "0"], Some(b"a")).status.success());
    assert_fails(
        &b.cli_in(&["secret", "put", "l/k", "--stdin", "--if-version", "0"], Some(b"b")),
        7,
        "at version 1, not 0",
    );
    assert_eq!(b.get("l/k"), b"a");
}

#[test]
fn changes_made_in_bao_reach_the_mounts_within_a_poll() {
    needs!(bao);
    let bao = Bao::start();
    let b = Broker::start_with(&bao.backend_toml("prod", "200ms"));
    bao.ok(&["kv", "put", "secret/app/token", "value=t1"]);
    bao.ok(&["kv", "put", "secret/app/user", "value=u1"]);
    grant_to_app(&b, "prod/app/*");
    // The grant fetched them: readable as soon as it returned.
    assert_eq!(read_as_app(&b, "app", "token").unwrap(), b"t1");
    bao.ok(&["kv", "put", "secret/app/token", "value=t2"]);
    eventually(10, "a bao write shows in the mount", || read_as_app(&b, "app", "token").as_deref() == Ok(b"t2"));
    bao.ok(&["kv", "put", "secret/app/new", "value=n1"]);
    eventually(10, "a new secret under the prefix appears", || read_as_app(&b, "app", "new").is_ok());
    bao.ok(&["kv", "metadata", "delete", "secret/app/user"]);
    eventually(10, "a deleted secret disappears", || read_as_app(&b, "app", "user").is_err());
    assert!(b.audit_events("read").iter().all(|r| r["caller"]["uid"] == APP));
}

#[test]
fn two_brokers_share_one_openbao() {
    needs!(bao);
    let bao = Bao::start();
    // Two hosts: separate state and run dirs, one backend.
    let host_a = Broker::start_with(&bao.backend_toml("prod", "200ms"));
    let host_b = Broker::start_with(&bao.backend_toml("prod", "200ms"));
    host_a.put("prod/shared/key", b"from-a-1");
    grant_to_app(&host_b, "prod/shared/key");
    assert_eq!(read_as_app(&host_b, "app", "key").unwrap(), b"from-a-1");
    host_a.cli_in(&["secret", "rotate", "prod/shared/key", "--stdin"], Some(b"from-a-2"));
    eventually(10, "host b sees host a's rotation", || {
        read_as_app(&host_b, "app", "key").as_deref() == Ok(b"from-a-2")
    });
}

#[test]
fn an_outage_serves_cached_values_and_fails_uncached_ones_promptly() {
    needs!(bao);
    let mut bao = Bao::start();
    let mut b = Broker::start_with(&bao.backend_toml("prod", "200ms"));
    b.put("prod/db/pw", b"cached-during-outage");
    grant_to_app(&b, "prod/db/pw");
    assert_eq!(read_as_app(&b, "app", "pw").unwrap(), b"cached-during-outage");
    bao.ok(&["kv", "put", "secret/never/read", "value=x"]);

    bao.stop();
    eventually(10, "status says the backend is failing", || {
        json(&b.ok(&["status", "--json"]))["backends"][0]["state"] == "stale"
    });
    assert_eq!(read_as_app(&b, "app", "pw").unwrap(), b"cached-during-outage");
    assert!(!b.audit_events("backend_error").is_empty());
    assert_eq!(b.audit_events("stale_serve").last().unwrap()["path"], "prod/db/pw");
    let s = json(&b.ok(&["status", "--json"]));
    // Refused, or reset if the server died under a request in flight.
    let last_error = s["backends"][0]["last_error"].as_str().unwrap();
    assert!(last_error.contains("onnection refused") || last_error.contains("onnection reset"), "{s}");

    // A broker restarted during the outage still serves what it had.
    b.kill9();
    b.restart();
    assert_eq!(read_as_app(&b, "app", "pw").unwrap(), b"cached-during-outage");

    // Never fetched: the open fails at once, it does not hang.
    grant_to_app(&b, "prod/never/read");
    let t = Instant::now();
    let err = read_as_app(&b, "app", "read").unwrap_err();
    assert!(err.contains("Input/output error"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "an uncached open took {:?}", t.elapsed());
    // Admin reads need the backend: a clear error, exit 5.
    assert_fails(&b.cli(&["secret", "get", "prod/db/pw"]), 5, "backend prod is unavailable");
    b.assert_never_leaked(&[b"cached-during-outage"]);
}

#[test]
fn past_max_stale_cached_values_are_no_longer_served() {
    needs!(bao);
    let mut bao = Bao::start();
    let toml = bao.backend_toml("prod", "200ms") + "max_stale = \"1s\"\n";
    let b = Broker::start_with(&toml);
    b.put("prod/k", b"short-lived");
    grant_to_app(&b, "prod/k");
    bao.stop();
    eventually(10, "the cache expires", || json(&b.ok(&["status", "--json"]))["backends"][0]["state"] == "expired");
    assert!(read_as_app(&b, "app", "k").unwrap_err().contains("Input/output error"));
    assert!(!b.audit_events("stale_expired").is_empty());
}

#[test]
fn approle_logs_in_renews_and_logs_in_again_after_revocation() {
    needs!(bao);
    let bao = Bao::start();
    bao.ok(&["auth", "enable", "approle"]);
    let policy = bao.dir.path().join("kh.hcl");
    // Exactly the policy docs/src/vault.md tells operators to write.
    std::fs::write(
        &policy,
        "path \"secret/data/*\"     { capabilities = [\"create\", \"read\", \"update\", \"delete\"] }\n\
         path \"secret/metadata/*\" { capabilities = [\"read\", \"list\", \"delete\"] }\n\
         path \"secret/detailed-metadata/*\" { capabilities = [\"list\", \"scan\"] }\n\
         path \"secret/detailed-metadata/\"  { capabilities = [\"list\", \"scan\"] }\n",
    )
    .unwrap();
    bao.ok(&["policy", "write", "kh", policy.to_str().unwrap()]);
    bao.ok(&["write", "auth/approle/role/kh", "token_ttl=2s", "token_max_ttl=10m", "token_policies=kh"]);
    let role = bao.ok(&["read", "-field=role_id", "auth/approle/role/kh/role-id"]);
    let secret = bao.ok(&["write", "-f", "-field=secret_id", "auth/approle/role/kh/secret-id"]);
    let (role_file, secret_file) = (bao.dir.path().join("role_id"), bao.dir.path().join("secret_id"));
    for (f, v) in [(&role_file, &role), (&secret_file, &secret)] {
        std::fs::write(f, v).unwrap();
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    let toml = format!(
        "[[backend]]\nname = \"prod\"\nkind = \"vault\"\naddress = \"{}\"\npoll_interval = \"300ms\"\napprole = {{ role_id_file = \"{}\", secret_id_file = \"{}\" }}\n",
        bao.addr,
        role_file.display(),
        secret_file.display()
    );
    let b = Broker::start_with(&toml);
    b.put("prod/ar/k", b"v0");
    // Keep working past several 2 s token lifetimes.
    let until = Instant::now() + Duration::from_secs(5);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let v = format!("v{n}");
        assert!(b.cli_in(&["secret", "rotate", "prod/ar/k", "--stdin"], Some(v.as_bytes())).status.success());
        assert_eq!(b.get("prod/ar/k"), v.as_bytes());
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(b.log().contains("logged in with AppRole") && b.log().contains("renewed the token"), "{}", b.log());
    // Revoke every token AppRole issued: the next call logs in again.
    bao.ok(&["lease", "revoke", "-prefix", "auth/approle/login"]);
    assert_eq!(b.get("prod/ar/k"), format!("v{n}").as_bytes());
    assert!(b.log().contains("logging in again"));
}

#[test]
fn backend_configuration_errors_and_an_unreachable_backend_at_start() {
    needs!(bao);
    let toml = "[[backend]]\nname = \"prod\"\nkind = \"vault\"\naddress = \"http://127.0.0.1:1\"\ntoken_file = \"/nonexistent/token\"\n";
    assert!(serve_must_fail(toml).contains("cannot read token file /nonexistent/token"));
    // Unreachable is not a configuration error: the broker starts, says so.
    let bao = Bao::start();
    let toml = bao.backend_toml("prod", "200ms").replace(&bao.addr, "http://127.0.0.1:1");
    let b = Broker::start_with(&toml);
    eventually(10, "status reports the failing backend", || {
        let s = json(&b.ok(&["status", "--json"]));
        s["backends"][0]["state"] == "expired" && s["backends"][0]["last_error"].is_string()
    });
    b.put("local/still", b"works");
    assert_eq!(b.get("local/still"), b"works");
}
