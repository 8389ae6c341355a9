//! Actions on change (issue 16): `grant --exec` and `grant --restart` run
//! in the containers that read a file after it changes (template grants
//! and plain grants alike), never in one that did not read it or was
//! refused; the set of readers survives a takeover and a `kill -9`.

use std::time::Duration;

use crate::support::*;

/// A unique label value per test, so parallel tests never match each other.
fn tag(test: &str) -> String {
    format!("act-{test}-{}", std::process::id())
}

fn secrets_bind(b: &Broker, workload: &str) -> String {
    format!("{}:/run/secrets:ro,rslave", b.mount(workload).display())
}

/// PID 1 that ends at once on SIGTERM (a restart does not wait 10 s).
const IDLE: &str = "trap 'exit 0' TERM; while true; do sleep 0.1; done";

fn started_at(c: &Container) -> String {
    let o = docker(&["inspect", "-f", "{{.State.StartedAt}}", &c.id]);
    assert!(o.status.success(), "{}", stderr(&o));
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

/// The audit lines of `event` naming `container`.
fn lines_for(b: &Broker, event: &str, container: &Container) -> Vec<serde_json::Value> {
    b.audit_events(event)
        .into_iter()
        .filter(|e| e["reason"].as_str().is_some_and(|r| r.contains(&container.id)))
        .collect()
}

/// A broker with workload `app` (containers labelled with `t`), two
/// inputs and a template `cfg` granted as `app.conf` with `grant_args`.
fn setup(t: &str, grant_args: &[&str]) -> Broker {
    let b = Broker::start();
    b.put("db/user", b"alice");
    b.put("db/pass", b"pw-1");
    b.ok(&["workload", "add", "app", "--selector", &format!("docker:label:keyhole.test={t}")]);
    let o = b.cli_in(&["template", "put", "cfg", "--stdin"], Some(b"{{ secret('db/user') }}:{{ secret('db/pass') }}"));
    assert!(o.status.success(), "{}", stderr(&o));
    let mut args = vec!["grant", "--template", "cfg", "--to", "app", "--file", "app.conf"];
    args.extend_from_slice(grant_args);
    b.ok(&args);
    b
}

#[test]
fn exec_runs_in_each_container_that_read_the_file_and_in_no_other() {
    needs!(docker);
    let t = tag("exec");
    let b = setup(&t, &["--exec", "sh -c 'echo \"re loaded\" >> /tmp/reloads'"]);
    // A plain grant with --exec too.
    b.put("app/flag", b"f1");
    b.ok(&["grant", "app/flag", "--to", "app", "--exec", "sh -c ': > /tmp/flag-changed'"]);
    // Shown back as given.
    let g = json(&b.ok(&["grants", "--json"]));
    let cfg = g.as_array().unwrap().iter().find(|g| g["template"] == "cfg").unwrap().clone();
    assert_eq!(cfg["exec"], "sh -c 'echo \"re loaded\" >> /tmp/reloads'");
    let table = String::from_utf8(b.ok(&["grants"])).unwrap();
    assert!(table.contains("ON CHANGE") && table.contains("exec "), "{table}");

    let label = format!("keyhole.test={t}");
    let bind = secrets_bind(&b, "app");
    let opts = ["--label", label.as_str(), "-v", bind.as_str()];
    let reader = Container::run(&opts, &["sh", "-c", IDLE]);
    let idle = Container::run(&opts, &["sh", "-c", IDLE]);
    assert_eq!(reader.cat("/run/secrets/app.conf").unwrap(), b"alice:pw-1");

    b.cli_in(&["secret", "rotate", "db/pass", "--stdin"], Some(b"pw-2"));
    eventually(15, "the reader ran the exec", || reader.cat("/tmp/reloads").is_ok_and(|r| r == b"re loaded\n"));
    assert_eq!(reader.cat("/run/secrets/app.conf").unwrap(), b"alice:pw-2");
    let ex = lines_for(&b, "exec", &reader);
    assert_eq!(ex.len(), 1, "{ex:?}");
    assert!(ex[0]["reason"].as_str().unwrap().ends_with("exit 0"), "{ex:?}");
    assert_eq!(ex[0]["path"], "@template/cfg");
    assert_eq!(ex[0]["workload"], "app");
    // The plain grant's exec ran only once its secret was read.
    b.cli_in(&["secret", "rotate", "app/flag", "--stdin"], Some(b"f2"));
    std::thread::sleep(Duration::from_millis(800));
    assert!(reader.cat("/tmp/flag-changed").is_err(), "exec in a container that had not read app/flag");
    assert_eq!(reader.cat("/run/secrets/flag").unwrap(), b"f2");
    b.cli_in(&["secret", "rotate", "app/flag", "--stdin"], Some(b"f3"));
    eventually(15, "the plain grant's exec ran", || reader.cat("/tmp/flag-changed").is_ok());

    // The container that never read the files: nothing ran there.
    std::thread::sleep(Duration::from_millis(500));
    assert!(idle.cat("/tmp/reloads").is_err(), "exec in a container that never read the file");
    assert!(idle.cat("/tmp/flag-changed").is_err());
    assert!(lines_for(&b, "exec", &idle).is_empty());
    assert_eq!(b.audit_events("exec").len(), 2, "{:?}", b.audit_events("exec"));
    b.ok(&["audit", "--verify"]);
    b.assert_never_leaked(&[b"pw-1", b"pw-2"]);
}

#[test]
fn a_refused_container_never_gets_onto_the_readers() {
    needs!(docker);
    let t = tag("deny");
    let b = setup(&t, &["--exec", "sh -c ': > /tmp/ran'"]);
    let label = format!("keyhole.test={t}");
    let bind = secrets_bind(&b, "app");
    let reader = Container::run(&["--label", label.as_str(), "-v", bind.as_str()], &["sh", "-c", IDLE]);
    // Root in a container of no workload, with the mount bound in: refused.
    let other = format!("keyhole.test={t}-intruder");
    let intruder = Container::run(&["--label", other.as_str(), "-v", bind.as_str()], &["sh", "-c", IDLE]);
    for _ in 0..3 {
        let err = intruder.cat("/run/secrets/app.conf").unwrap_err();
        assert!(err.contains("Permission denied"), "{err}");
    }
    assert!(!b.audit_events("deny").is_empty());
    assert_eq!(reader.cat("/run/secrets/app.conf").unwrap(), b"alice:pw-1");
    b.cli_in(&["secret", "rotate", "db/user", "--stdin"], Some(b"bob"));
    eventually(15, "the reader ran the exec", || reader.cat("/tmp/ran").is_ok());
    std::thread::sleep(Duration::from_millis(500));
    assert!(intruder.cat("/tmp/ran").is_err(), "exec in a container that was refused");
    assert!(lines_for(&b, "exec", &intruder).is_empty());
}

#[test]
fn restart_restarts_each_reader_one_at_a_time_and_no_other() {
    needs!(docker);
    let t = tag("restart");
    let b = setup(&t, &["--restart", "--restart-spacing", "1s"]);
    let g = json(&b.ok(&["grants", "--json"]));
    assert_eq!(g[0]["restart"], true);
    assert_eq!(g[0]["restart_spacing"], "1s");
    assert_fails(&b.cli(&["grant", "db/user", "--to", "app", "--restart-spacing", "1s"]), 2, "needs --restart");
    assert_fails(&b.cli(&["grant", "db/user", "--to", "app", "--restart", "--restart-spacing", "soon"]), 2, "soon");
    assert_fails(&b.cli(&["grant", "db/user", "--to", "app", "--exec", "sh -c 'unclosed"]), 2, "quote");
    let label = format!("keyhole.test={t}");
    let bind = secrets_bind(&b, "app");
    let opts = ["--label", label.as_str(), "-v", bind.as_str()];
    let (r1, r2) = (Container::run(&opts, &["sh", "-c", IDLE]), Container::run(&opts, &["sh", "-c", IDLE]));
    let idle = Container::run(&opts, &["sh", "-c", IDLE]);
    assert_eq!(r1.cat("/run/secrets/app.conf").unwrap(), b"alice:pw-1");
    assert_eq!(r2.cat("/run/secrets/app.conf").unwrap(), b"alice:pw-1");
    let (s1, s2, s_idle) = (started_at(&r1), started_at(&r2), started_at(&idle));
    let t0 = std::time::Instant::now();
    b.cli_in(&["secret", "rotate", "db/pass", "--stdin"], Some(b"pw-2"));
    // rotate does not wait for the restarts.
    assert!(t0.elapsed() < Duration::from_secs(3), "rotate waited for the restarts: {:?}", t0.elapsed());
    eventually(60, "both readers restarted", || {
        lines_for(&b, "restart", &r1).len() + lines_for(&b, "restart", &r2).len() == 2
    });
    for (c, before) in [(&r1, &s1), (&r2, &s2)] {
        let l = lines_for(&b, "restart", c);
        assert!(l[0]["reason"].as_str().unwrap().contains("restarted"), "{l:?}");
        assert_ne!(&started_at(c), before, "not restarted");
        // Running again, and reads the new render.
        assert_eq!(c.cat("/run/secrets/app.conf").unwrap(), b"alice:pw-2");
    }
    // One at a time, the spacing between.
    let at =
        |c: &Container| humantime::parse_rfc3339(lines_for(&b, "restart", c)[0]["time"].as_str().unwrap()).unwrap();
    let (a1, a2) = (at(&r1), at(&r2));
    let gap = a1.max(a2).duration_since(a1.min(a2)).unwrap();
    assert!(gap >= Duration::from_secs(1), "restarts {gap:?} apart");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(started_at(&idle), s_idle, "a container that never read the file was restarted");
    assert!(lines_for(&b, "restart", &idle).is_empty());
}

#[test]
fn the_readers_survive_a_takeover_and_a_kill_9() {
    needs!(docker);
    let t = tag("survive");
    let mut b = setup(&t, &["--exec", "sh -c 'echo x >> /tmp/execs'"]);
    let label = format!("keyhole.test={t}");
    let bind = secrets_bind(&b, "app");
    let opts = ["--label", label.as_str(), "-v", bind.as_str()];
    let reader = Container::run(&opts, &["sh", "-c", IDLE]);
    let idle = Container::run(&opts, &["sh", "-c", IDLE]);
    assert_eq!(reader.cat("/run/secrets/app.conf").unwrap(), b"alice:pw-1");
    b.takeover();
    b.cli_in(&["secret", "rotate", "db/pass", "--stdin"], Some(b"pw-2"));
    eventually(15, "exec after the takeover", || reader.cat("/tmp/execs").is_ok_and(|r| r == b"x\n"));
    // Written to the store within a moment of the read; then kill -9.
    std::thread::sleep(Duration::from_millis(500));
    b.kill9();
    b.restart();
    b.cli_in(&["secret", "rotate", "db/pass", "--stdin"], Some(b"pw-3"));
    eventually(15, "exec after a kill -9 and a start", || reader.cat("/tmp/execs").is_ok_and(|r| r == b"x\nx\n"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(idle.cat("/tmp/execs").is_err());
    // A reader that is gone is skipped, audited, and forgotten.
    drop(reader);
    b.cli_in(&["secret", "rotate", "db/pass", "--stdin"], Some(b"pw-4"));
    eventually(15, "the gone reader skipped", || {
        b.audit_events("exec").iter().any(|e| e["reason"].as_str().is_some_and(|r| r.contains("skipped")))
    });
}

#[test]
fn secret_field_reads_a_field_of_a_vault_secret_and_is_refused_for_a_local_one() {
    needs!(root, bao);
    let bao = Bao::start();
    let mut b = Broker::start_with(&bao.backend_toml("prod", "1s"));
    b.ok(&["workload", "add", "app", "--selector", "unix:uid:0"]);
    bao.ok(&["kv", "put", "secret/db", "value=pw-one", "username=alice", "host=db.internal"]);
    b.put("local/db", b"local-value");
    // A local secret has no fields: refused at put, with the position.
    let o = b.cli_in(&["template", "put", "bad", "--stdin"], Some(b"x\n{{ secret('local/db', field='username') }}"));
    assert_fails(&o, 2, "line 2");
    assert!(stderr(&o).contains("local secret"), "{}", stderr(&o));
    // A field the secret lacks: refused too.
    let o = b.cli_in(&["template", "put", "bad", "--stdin"], Some(b"{{ secret('prod/db', field='nope') }}"));
    assert_fails(&o, 2, "no string field \"nope\"");
    let t = "user={{ secret('prod/db', field='username') }} host={{ secret('prod/db', field='host') }} pw={{ secret('prod/db') }}";
    let o = b.cli_in(&["template", "put", "dsn", "--stdin"], Some(t.as_bytes()));
    assert!(o.status.success(), "{}", stderr(&o));
    b.ok(&["grant", "--template", "dsn", "--to", "app"]);
    let f = b.mount("app").join("dsn");
    assert_eq!(std::fs::read(&f).unwrap(), b"user=alice host=db.internal pw=pw-one");
    // Fields change with their secret's version, all at once.
    bao.ok(&["kv", "put", "secret/db", "value=pw-two", "username=bob", "host=db.internal"]);
    eventually(15, "the new version's fields", || {
        std::fs::read(&f).ok().as_deref() == Some(b"user=bob host=db.internal pw=pw-two")
    });
    let reads = b.audit_events("read");
    assert_eq!(reads.last().unwrap()["inputs"], serde_json::json!(["prod/db@2"]));
    // After a kill -9 the cache is restored without fields: they are read
    // again, and the file renders.
    b.kill9();
    b.restart();
    eventually(15, "the fields read again after a start", || {
        std::fs::read(&f).ok().as_deref() == Some(b"user=bob host=db.internal pw=pw-two")
    });
    b.assert_never_leaked(&[b"pw-one", b"pw-two"]);
}
