//! Templates (issue 16): files rendered from several secrets, put and
//! checked like secrets, granted like secrets, rendered from one snapshot
//! of their inputs, re-rendered on every change, failing closed.

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

const OTHER: u32 = 1001;

/// A broker with workload `app` matching host root (this test process).
fn broker() -> Broker {
    let b = Broker::start();
    b.ok(&["workload", "add", "app", "--selector", "unix:uid:0"]);
    b
}

fn put_template(b: &Broker, name: &str, source: &str) -> std::process::Output {
    b.cli_in(&["template", "put", name, "--stdin"], Some(source.as_bytes()))
}

fn python(code: &str, input: &[u8]) -> Vec<u8> {
    let mut c = Command::new("python3")
        .args(["-c", code])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(c.stdin.as_mut().unwrap(), input).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "python: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

/// Values that break naive quoting: quotes of both kinds, backslashes,
/// newlines, a tab, `$()`, `#`, unicode (and a line separator), YAML
/// indicators.
const NASTY: [(&str, &str); 3] = [
    ("cfg/user", "o'brien \"the\" \\admin\\ $(id) `x` # not a comment"),
    ("cfg/pass", "line1\nline2\r\n\ttab: - [x] {y} & *z ! % @ |\n"),
    ("cfg/note", "ünïcødé ☃ 𝄞 \u{2028} end: yes"),
];

#[test]
fn json_env_and_yaml_render_values_that_parse_back_to_the_exact_bytes() {
    if !require_root() {
        return;
    }
    let b = broker();
    for (p, v) in NASTY {
        b.put(p, v.as_bytes());
    }
    let json_t = "{\"user\": {{ secret(\"cfg/user\")|tojson }}, \"pass\": {{ secret(\"cfg/pass\")|tojson }}, \
                  \"note\": {{ secret(\"cfg/note\")|tojson }}}\n";
    let env_t =
        "USER={{ secret('cfg/user')|env }}\nPASS={{ secret('cfg/pass')|env }}\nNOTE={{ secret('cfg/note')|env }}\n";
    let yaml_t = "db:\n  user: {{ secret('cfg/user')|yaml }}\n  pass: {{ secret('cfg/pass')|yaml }}\n  note: {{ secret('cfg/note')|yaml }}\n";
    for (name, src) in [("j", json_t), ("e", env_t), ("y", yaml_t)] {
        let o = put_template(&b, name, src);
        assert!(o.status.success(), "put {name}: {}", stderr(&o));
    }
    b.ok(&["grant", "--template", "j", "--to", "app", "--file", "config.json"]);
    b.ok(&["grant", "--template", "e", "--to", "app", "--file", "app.env"]);
    b.ok(&["grant", "--template", "y", "--to", "app", "--file", "database.yml"]);
    let m = b.mount("app");
    let want: Vec<&str> = NASTY.iter().map(|(_, v)| *v).collect();

    let j = std::fs::read(m.join("config.json")).unwrap();
    let out = python(
        "import json,sys; d=json.load(sys.stdin); sys.stdout.write(d['user']+'\\0'+d['pass']+'\\0'+d['note'])",
        &j,
    );
    assert_eq!(String::from_utf8(out).unwrap(), want.join("\0"));

    let y = std::fs::read(m.join("database.yml")).unwrap();
    let code = "import yaml,sys; d=yaml.safe_load(sys.stdin.read())['db']; sys.stdout.write(d['user']+'\\0'+d['pass']+'\\0'+d['note'])";
    assert_eq!(String::from_utf8(python(code, &y)).unwrap(), want.join("\0"));

    // The shell gives back the exact bytes: `set -a; . file`.
    let e = m.join("app.env");
    let sh = format!("set -a; . '{}'; printf '%s\\0%s\\0%s' \"$USER\" \"$PASS\" \"$NOTE\"", e.display());
    let o = Command::new("sh").args(["-c", &sh]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8(o.stdout).unwrap(), want.join("\0"));
    // And so does a shlex parse (as python-dotenv-style tools do).
    let env = std::fs::read(&e).unwrap();
    let code = "import shlex,sys\nd={}\nfor t in shlex.split(sys.stdin.read()):\n k,v=t.split('=',1); d[k]=v\nsys.stdout.write(d['USER']+'\\0'+d['PASS']+'\\0'+d['NOTE'])";
    assert_eq!(String::from_utf8(python(code, &env)).unwrap(), want.join("\0"));

    // Each open's audit line lists every input with its version.
    let reads: Vec<_> = b.audit_events("read").into_iter().filter(|r| r["path"] == "@template/j").collect();
    assert_eq!(reads.len(), 1, "{reads:?}");
    let inputs: Vec<&str> = reads[0]["inputs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(inputs, ["cfg/note@1", "cfg/pass@1", "cfg/user@1"]);
    // Put, get, ls of templates are audited; values never leak.
    assert_eq!(b.audit_events("template_put").len(), 3);
    assert_eq!(b.ok(&["template", "get", "y"]), yaml_t.as_bytes());
    let ls = json(&b.ok(&["template", "ls", "--json"]));
    assert_eq!(ls[0]["inputs"].as_array().unwrap().len(), 3);
    b.ok(&["audit", "--verify"]);
    b.assert_never_leaked(&NASTY.map(|(_, v)| v.as_bytes()));
}

#[test]
fn a_rotation_is_seen_by_the_next_open_and_not_by_an_fd_opened_before() {
    if !require_root() {
        return;
    }
    let b = broker();
    b.put("db/user", b"alice");
    b.put("db/pass", b"pw-1");
    assert!(put_template(&b, "dsn", "{{ secret('db/user') }}:{{ secret('db/pass') }}").status.success());
    b.ok(&["grant", "--template", "dsn", "--to", "app", "--file", "dsn"]);
    let f = b.mount("app").join("dsn");
    let mut before = std::fs::File::open(&f).unwrap();
    b.cli_in(&["secret", "rotate", "db/pass", "--stdin"], Some(b"pw-2"));
    assert_eq!(std::fs::read(&f).unwrap(), b"alice:pw-2");
    let mut old = String::new();
    before.read_to_string(&mut old).unwrap();
    assert_eq!(old, "alice:pw-1");
    // A new version of the template itself re-renders too.
    assert!(put_template(&b, "dsn", "user={{ secret('db/user') }}").status.success());
    assert_eq!(std::fs::read(&f).unwrap(), b"user=alice");
    let reads = b.audit_events("read");
    let last = reads.last().unwrap();
    assert_eq!(last["inputs"], serde_json::json!(["db/user@1"]));
    // Revoke: the file goes; then the template can be removed.
    assert_fails(&b.cli(&["template", "rm", "dsn"]), 7, "revoke");
    b.ok(&["revoke", "--template", "dsn", "--from", "app"]);
    assert!(!f.exists());
    b.ok(&["template", "rm", "dsn"]);
    assert_eq!(b.audit_events("template_rm").len(), 2);
}

#[test]
fn two_inputs_rotated_in_a_tight_loop_are_never_seen_mixed() {
    if !require_root() {
        return;
    }
    let b = broker();
    b.put("pair/a", b"0");
    b.put("pair/b", b"0");
    assert!(put_template(&b, "pair", "{{ secret('pair/a') }} {{ secret('pair/b') }}").status.success());
    b.ok(&["grant", "--template", "pair", "--to", "app"]);
    let f = b.mount("app").join("pair");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut reads, mut bad) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let s = String::from_utf8(std::fs::read(&f).unwrap()).unwrap();
                let (a, bb) = s.split_once(' ').unwrap();
                let (a, bb): (u64, u64) = (a.parse().unwrap(), bb.parse().unwrap());
                // a is always rotated first: the store is at (i, i) or
                // (i+1, i); anything else is a render from two moments.
                if !(a == bb || a == bb + 1) {
                    bad.push(s);
                }
                reads += 1;
            }
            (reads, bad)
        })
    };
    for i in 1..=60u32 {
        let v = i.to_string();
        b.cli_in(&["secret", "rotate", "pair/a", "--stdin"], Some(v.as_bytes()));
        b.cli_in(&["secret", "rotate", "pair/b", "--stdin"], Some(v.as_bytes()));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, bad) = reader.join().unwrap();
    assert!(reads > 100, "only {reads} reads");
    assert!(bad.is_empty(), "{} of {reads} reads mixed two moments: {:?}", bad.len(), &bad[..bad.len().min(5)]);
    assert_eq!(std::fs::read(&f).unwrap(), b"60 60");
}

#[test]
fn bad_templates_are_refused_at_put_with_line_and_column() {
    if !require_root() {
        return;
    }
    let b = broker();
    b.put("db/user", b"u");
    let o = put_template(&b, "t", "ok\n{{ secret('db/user') }}\n  {% for x in %}\n");
    assert_fails(&o, 2, "line 3");
    let o = put_template(&b, "t", "{{ secret('db/user') }}\n{{ secret('db/missing') }}\n");
    assert_fails(&o, 2, "line 2");
    assert!(stderr(&o).contains("db/missing"), "{}", stderr(&o));
    let o = put_template(&b, "t", "a\nb {{ lookup('x') }}");
    assert_fails(&o, 2, "line 2, column 6");
    assert!(stderr(&o).contains("lookup"), "{}", stderr(&o));
    assert_fails(&put_template(&b, "t", "{{ secret('db/user')|nosuch }}"), 2, "filter");
    assert_fails(&put_template(&b, "t", "{% include 'x' %}"), 2, "line 1");
    assert_fails(&put_template(&b, "bad/name", "x"), 2, "template name");
    // Nothing was stored; a grant of a template that does not exist fails.
    assert!(json(&b.ok(&["template", "ls", "--json"])).as_array().unwrap().is_empty());
    assert_fails(&b.cli(&["grant", "--template", "t", "--to", "app"]), 3, "does not exist");
    // The refusals are audited as failed puts.
    let puts = b.audit_events("template_put");
    assert_eq!(puts.len(), 6);
    assert!(puts.iter().all(|p| p["reason"].is_string()));
}

#[test]
fn only_an_admin_puts_a_template() {
    if !require_root() {
        return;
    }
    let b = broker();
    b.put("db/user", b"u");
    // The socket opened up: the broker itself refuses the caller.
    std::fs::set_permissions(b.socket(), std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let o = cli_as(&b.socket(), &["template", "put", "t", "--stdin"], Some(b"{{ secret('db/user') }}"), Some(OTHER));
    assert_fails(&o, 4, "needs an admin caller");
    let o = cli_as(&b.socket(), &["template", "ls"], None, Some(OTHER));
    assert_fails(&o, 4, "needs an admin caller");
    assert!(b.audit_events("template_put").is_empty());
    let denies = b.audit_events("deny");
    assert!(denies.iter().any(|d| d["method"] == "PutTemplate"), "{denies:?}");
}

#[test]
fn a_template_that_loops_for_ever_is_stopped_by_fuel_and_the_open_fails_fast() {
    if !require_root() {
        return;
    }
    let b = broker();
    b.put("n", b"1");
    b.put("plain", b"still-served");
    let t = "{% for i in range(secret('n')|int) %}{% for j in range(secret('n')|int) %}\
             {% for k in range(secret('n')|int) %}x{% endfor %}{% endfor %}{% endfor %}";
    assert!(put_template(&b, "loop", t).status.success());
    b.ok(&["grant", "--template", "loop", "--to", "app"]);
    b.ok(&["grant", "plain", "--to", "app"]);
    let m = b.mount("app");
    assert_eq!(std::fs::read(m.join("loop")).unwrap(), b"x");
    // 10,000^3 iterations: only fuel stops it.
    let started = Instant::now();
    b.cli_in(&["secret", "rotate", "n", "--stdin"], Some(b"10000"));
    let rotate = started.elapsed();
    let started = Instant::now();
    let e = std::fs::read(m.join("loop")).unwrap_err();
    let open = started.elapsed();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(open < Duration::from_millis(500), "the failed open took {open:?}");
    assert!(rotate < Duration::from_secs(10), "the rotate took {rotate:?}");
    assert_eq!(std::fs::read(m.join("plain")).unwrap(), b"still-served");
    let errs = b.audit_events("template_error");
    assert_eq!(errs.len(), 1);
    assert!(errs[0]["reason"].as_str().unwrap().contains("fuel"), "{errs:?}");
    assert_eq!(errs[0]["inputs"], serde_json::json!(["n@2"]));
    // Fixed by the next change: the file renders again.
    b.cli_in(&["secret", "rotate", "n", "--stdin"], Some(b"2"));
    assert_eq!(std::fs::read(m.join("loop")).unwrap(), b"xxxxxxxx");
    eprintln!("fuel-stopped render: rotate {rotate:?}, failed open {open:?}");
}

#[test]
fn a_caller_outside_the_workload_gets_eacces_and_a_deny_line() {
    if !require_root() {
        return;
    }
    let b = broker();
    b.put("db/user", b"u-secret-4e1a");
    assert!(put_template(&b, "t", "user={{ secret('db/user') }}").status.success());
    b.ok(&["grant", "--template", "t", "--to", "app", "--mode", "0444"]);
    let f = b.mount("app").join("t");
    let o = run_as(OTHER, &["cat", f.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("Permission denied"), "{}", stderr(&o));
    let denies: Vec<_> = b.audit_events("deny").into_iter().filter(|d| d["path"] == "@template/t").collect();
    assert_eq!(denies.len(), 1);
    assert_eq!(denies[0]["caller"]["uid"], OTHER);
    // Granting the template granted its input for that file only.
    assert!(!b.mount("app").join("user").exists());
    b.assert_never_leaked(&[b"u-secret-4e1a"]);
}

#[test]
fn a_container_reads_its_template_and_another_is_denied() {
    if !require_docker() {
        return;
    }
    let b = Broker::start();
    let tag = unique("tpl");
    b.ok(&["workload", "add", "web", "--selector", &format!("docker:label:keyhole.test={tag}")]);
    b.put("db/user", b"web");
    b.put("db/pass", b"p@ss'\"");
    let t = "{\"user\": {{ secret('db/user')|tojson }}, \"password\": {{ secret('db/pass')|tojson }}}";
    assert!(put_template(&b, "cfg", t).status.success());
    b.ok(&["grant", "--template", "cfg", "--to", "web", "--file", "config.json"]);
    let bind = format!("{}:/run/secrets:ro,rslave", b.mount("web").display());
    let c = Container::start(&["--label", &format!("keyhole.test={tag}"), "-v", &bind]);
    assert_eq!(c.cat("/run/secrets/config.json").unwrap(), br#"{"user": "web", "password": "p@ss'\""}"#);
    let stranger = Container::start(&["-v", &bind]);
    assert!(stranger.cat("/run/secrets/config.json").unwrap_err().contains("Permission denied"));
    let denies = b.audit_events("deny");
    assert!(denies.iter().any(|d| d["caller"]["container_id"] == stranger.id.as_str() && d["path"] == "@template/cfg"));
    b.cli_in(&["secret", "rotate", "db/pass", "--stdin"], Some(b"new"));
    assert_eq!(c.cat("/run/secrets/config.json").unwrap(), br#"{"user": "web", "password": "new"}"#);
}

#[test]
fn takeover_and_kill9_keep_serving_templates() {
    if !require_root() {
        return;
    }
    let mut b = broker();
    b.put("db/user", b"alice");
    b.put("db/pass", b"one");
    assert!(put_template(&b, "dsn", "{{ secret('db/user') }}:{{ secret('db/pass') }}").status.success());
    b.ok(&["grant", "--template", "dsn", "--to", "app"]);
    let f = b.mount("app").join("dsn");
    let mut held = std::fs::File::open(&f).unwrap();
    b.takeover();
    assert_eq!(std::fs::read(&f).unwrap(), b"alice:one");
    let mut s = String::new();
    held.read_to_string(&mut s).unwrap();
    assert_eq!(s, "alice:one");
    b.cli_in(&["secret", "rotate", "db/pass", "--stdin"], Some(b"two"));
    assert_eq!(std::fs::read(&f).unwrap(), b"alice:two");
    b.kill9();
    b.restart();
    eventually(10, "the template served again", || std::fs::read(&f).ok().as_deref() == Some(b"alice:two"));
    b.cli_in(&["secret", "rotate", "db/user", "--stdin"], Some(b"bob"));
    assert_eq!(std::fs::read(&f).unwrap(), b"bob:two");
}

#[test]
fn a_change_the_vault_watcher_sees_re_renders_a_template_with_vault_and_local_inputs() {
    if !require_bao() || !require_root() {
        return;
    }
    let bao = Bao::start();
    let b = Broker::start_with(&bao.backend_toml("prod", "1s"));
    b.ok(&["workload", "add", "app", "--selector", "unix:uid:0"]);
    bao.ok(&["kv", "put", "secret/db/pass", "value=vault-one"]);
    b.put("db/user", b"alice");
    let o = put_template(&b, "mixed", "{{ secret('db/user') }}:{{ secret('prod/db/pass') }}");
    assert!(o.status.success(), "{}", stderr(&o));
    b.ok(&["grant", "--template", "mixed", "--to", "app"]);
    let f = b.mount("app").join("mixed");
    assert_eq!(std::fs::read(&f).unwrap(), b"alice:vault-one");
    // Changed behind keyhole's back: the watcher's poll re-renders.
    bao.ok(&["kv", "put", "secret/db/pass", "value=vault-two"]);
    eventually(15, "the watcher's change in the template", || {
        std::fs::read(&f).ok().as_deref() == Some(b"alice:vault-two")
    });
    let reads = b.audit_events("read");
    assert_eq!(reads.last().unwrap()["inputs"], serde_json::json!(["db/user@1", "prod/db/pass@2"]));
}
