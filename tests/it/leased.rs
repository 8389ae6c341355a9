//! Leases, continued (issue 17): templates that read per-caller leases
//! (`dynamic("db").username`), one lease per host user for `unix:`
//! selectors (revoked after one idle TTL), failed revocations retried
//! and shown, and a leased file's open descriptor across a takeover.
//! Real parts: OpenBao dev, PostgreSQL 15, Docker, a real broker.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::leases::{Postgres, creds, database_engine, leases_json, require_postgres, secrets_bind, web_container};
use crate::support::*;

fn put_template(b: &Broker, name: &str, source: &str) -> std::process::Output {
    b.cli_in(&["template", "put", name, "--stdin"], Some(source.as_bytes()))
}

/// What a container read from conf.json: (user, password, host).
fn conf(c: &Container) -> (String, String, String) {
    let raw = c.cat("/run/secrets/conf.json").unwrap_or_else(|e| panic!("read conf.json: {e}"));
    let v = json(&raw);
    let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("no {k} in conf.json: {v}")).to_owned();
    (s("user"), s("password"), s("host"))
}

#[test]
fn a_template_reading_a_dynamic_login_renders_each_containers_own() {
    if !require_postgres() {
        return;
    }
    let pg = Postgres::start();
    let bao = Bao::start();
    database_engine(&bao, &pg, "1h", "24h");
    let b = Broker::start_with(&bao.backend_toml("prod", "30s"));
    let tag = unique("tpl-lease");
    b.ok(&["workload", "add", "web", "--selector", &format!("docker:label:keyhole.test={tag}")]);
    b.ok(&["dynamic", "add", "db", "--backend", "prod", "--path", "database/creds/web"]);
    b.put("app/host", b"db.internal");
    // A source that does not exist is refused at put, with its position.
    let o = put_template(&b, "conf", "{\n  \"user\": \"{{ dynamic('nope').username }}\"\n}\n");
    assert_fails(&o, 2, "line 2, column");
    assert!(stderr(&o).contains("\"nope\""), "{}", stderr(&o));
    let o = put_template(&b, "conf", "{{ cert('db').cert }}");
    assert_fails(&o, 2, "cert source");
    assert!(b.ok(&["template", "ls", "--json"]).starts_with(b"[]"), "a refused template was stored");
    let t = "{\"user\": \"{{ dynamic('db').username }}\", \"password\": \"{{ dynamic('db').password }}\", \
             \"host\": \"{{ secret('app/host') }}\", \"expires\": \"{{ dynamic('db').expires_at }}\"}\n";
    let o = put_template(&b, "conf", t);
    assert!(o.status.success(), "{}", stderr(&o));
    b.ok(&["grant", "--template", "conf", "--to", "web", "--file", "conf.json"]);
    // The direct grant of the same source: a lease of its own.
    b.ok(&["grant", "dynamic:db", "--to", "web", "--file", "db.json"]);
    let one = web_container(&b, &tag);
    let two = web_container(&b, &tag);
    let (u1, p1, host) = conf(&one);
    let (u2, p2, _) = conf(&two);
    assert_eq!(host, "db.internal");
    assert_ne!(u1, u2, "two containers of one workload were handed one login");
    // Alternate reads: each always its own (direct I/O, no shared pages).
    for _ in 0..4 {
        assert_eq!(conf(&one).0, u1);
        assert_eq!(conf(&two).0, u2);
    }
    // The template's lease is keyed by the template grant: apart from
    // the direct grant's.
    let (d1, _, _) = creds(&one);
    assert_ne!(d1, u1, "the template and the direct grant shared a lease");
    for (u, p) in [(&u1, &p1), (&u2, &p2)] {
        let o = pg.login(u, p);
        assert!(o.status.success(), "{u} cannot log in: {}", stderr(&o));
    }
    let rows = leases_json(&b);
    assert_eq!(rows.iter().filter(|r| r["template"] == "@template/conf").count(), 2, "{rows:?}");
    let list = b.ok(&["leases"]);
    assert!(contains(&list, b"(@template/conf)"), "{}", String::from_utf8_lossy(&list));
    // A stranger container gets nothing, and no lease.
    let stranger = Container::start(&["-v", &secrets_bind(&b, "web")]);
    assert!(stranger.cat("/run/secrets/conf.json").unwrap_err().contains("Permission denied"));
    assert_eq!(leases_json(&b).len(), 3);
    // docker rm -f: that container's roles go (template and direct).
    drop(one);
    let t0 = Instant::now();
    eventually(5, "the removed container's template login is dropped", || !pg.role_exists(&u1));
    eprintln!("template lease's role dropped {:?} after docker rm -f", t0.elapsed());
    eventually(5, "and its direct one", || !pg.role_exists(&d1));
    assert!(pg.role_exists(&u2));
    // Revoking the template grant drops the other's template login.
    b.ok(&["revoke", "--template", "conf", "--from", "web"]);
    eventually(5, "the template grant's revocation drops the remaining login", || !pg.role_exists(&u2));
    assert!(leases_json(&b).iter().all(|r| r["template"].is_null()));
    // A field the engine does not return: that open fails (EIO, audited
    // lease_error naming the template), and nothing else does.
    let o = put_template(&b, "bad", "{{ dynamic('db').username }}{{ dynamic('db').nope }}");
    assert!(o.status.success(), "{}", stderr(&o));
    b.ok(&["grant", "--template", "bad", "--to", "web", "--file", "bad.txt"]);
    let e = two.cat("/run/secrets/bad.txt").unwrap_err();
    assert!(e.contains("Input/output error"), "{e}");
    let errs = b.audit_events("lease_error");
    assert!(errs.iter().any(|e| e["path"] == "@template/bad"), "{errs:?}");
    assert_eq!(creds(&two).0, creds(&two).0);
    b.assert_never_leaked(&[p1.as_bytes(), p2.as_bytes()]);
}

/// A host process of `uid` in group `gid`.
fn as_user(uid: u32, gid: u32, cmd: &[&str]) -> Command {
    let mut c = Command::new(cmd[0]);
    c.args(&cmd[1..]).uid(uid).gid(gid).stdin(Stdio::null());
    c
}

fn host_creds(uid: u32, gid: u32, file: &str) -> (String, String) {
    let o = as_user(uid, gid, &["cat", file]).output().unwrap();
    assert!(o.status.success(), "uid {uid} cat {file}: {}", stderr(&o));
    let v = json(&o.stdout);
    (v["username"].as_str().unwrap().to_owned(), v["password"].as_str().unwrap().to_owned())
}

struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn host_users_get_a_lease_each_revoked_once_none_held_it_for_a_ttl() {
    if !require_postgres() {
        return;
    }
    let pg = Postgres::start();
    let bao = Bao::start();
    // A 6 s TTL (renewed at 4 s): an idle user's lease goes after ~6 s.
    database_engine(&bao, &pg, "6s", "1h");
    let b = Broker::start_with(&bao.backend_toml("prod", "30s"));
    let gid = 4242;
    b.ok(&["workload", "add", "hosts", "--selector", &format!("unix:gid:{gid}")]);
    b.ok(&["dynamic", "add", "db", "--backend", "prod", "--path", "database/creds/web"]);
    b.ok(&["grant", "dynamic:db", "--to", "hosts", "--file", "db.json", "--mode", "0440", "--gid", &gid.to_string()]);
    let file = b.mount("hosts").join("db.json");
    let file = file.to_str().unwrap();
    let (ua, pa) = host_creds(1000, gid, file);
    let (ub, pb) = host_creds(1001, gid, file);
    assert_ne!(ua, ub, "two host users were handed one login");
    assert_eq!(host_creds(1000, gid, file).0, ua, "one user's opens share its lease");
    assert!(pg.login(&ua, &pa).status.success() && pg.login(&ub, &pb).status.success());
    let rows = leases_json(&b);
    let holders: Vec<&str> = rows.iter().filter_map(|r| r["container"].as_str()).collect();
    assert!(holders.contains(&"uid:1000") && holders.contains(&"uid:1001"), "{rows:?}");
    // uid 1000 keeps the file open; uid 1001 does not.
    let held = Holder(as_user(1000, gid, &["sh", "-c", &format!("exec 3< {file}; exec sleep 60")]).spawn().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    eventually(15, "the idle user's lease is revoked after one TTL", || !pg.role_exists(&ub));
    eprintln!("idle host lease revoked {:?} after its last close", t0.elapsed());
    assert!(t0.elapsed() >= Duration::from_secs(3), "revoked before one TTL passed");
    std::thread::sleep(Duration::from_secs(7));
    assert!(pg.role_exists(&ua), "a lease whose file is held open was revoked");
    let revoked = b.audit_events("lease_revoke");
    assert!(
        revoked
            .iter()
            .any(|e| e["reason"].as_str().is_some_and(|r| r.contains("uid:1001") && r.contains("no process"))),
        "{revoked:?}"
    );
    // The idle user opens again: a new lease.
    let (ub2, _) = host_creds(1001, gid, file);
    assert_ne!(ub2, ub);
    drop(held);
    eventually(15, "the holder closed it: its lease is revoked after one TTL", || !pg.role_exists(&ua));
    // A user outside the group gets nothing, and no lease.
    let o = as_user(1002, 1002, &["cat", file]).output().unwrap();
    assert!(!o.status.success());
    assert!(leases_json(&b).iter().all(|r| r["container"] != "uid:1002"));
}

/// A TCP proxy to `to` that can be cut: while down, every connection
/// (new, or pooled and idle) is closed at its next request.
struct CutProxy {
    addr: String,
    down: Arc<AtomicBool>,
}

impl CutProxy {
    fn start(to: &str) -> CutProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let to = to.trim_start_matches("http://").to_owned();
        let down = Arc::new(AtomicBool::new(false));
        let d = down.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(client) = conn else { return };
                if d.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(&to) else { continue };
                let pipe = |mut a: TcpStream, mut b: TcpStream, d: Arc<AtomicBool>| {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = a.read(&mut buf) {
                            if n == 0 || d.load(Ordering::SeqCst) || b.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = a.shutdown(std::net::Shutdown::Both);
                        let _ = b.shutdown(std::net::Shutdown::Both);
                    });
                };
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap(), d.clone());
                pipe(server, client, d.clone());
            }
        });
        CutProxy { addr, down }
    }
}

#[test]
fn a_failed_revocation_is_retried_shown_and_survives_a_restart() {
    if !require_postgres() {
        return;
    }
    let pg = Postgres::start();
    let bao = Bao::start();
    database_engine(&bao, &pg, "1h", "24h");
    let proxy = CutProxy::start(&bao.addr);
    let maddr = format!("127.0.0.1:{}", free_port());
    let toml = format!(
        "[metrics]\nlisten = \"{maddr}\"\n[[backend]]\nname = \"prod\"\nkind = \"vault\"\naddress = \"{}\"\n\
         token_file = \"{}\"\npoll_interval = \"30s\"\n",
        proxy.addr,
        bao.token_file().display()
    );
    let mut b = Broker::start_with(&toml);
    let tag = unique("lease-down");
    b.ok(&["workload", "add", "web", "--selector", &format!("docker:label:keyhole.test={tag}")]);
    b.ok(&["dynamic", "add", "db", "--backend", "prod", "--path", "database/creds/web"]);
    b.ok(&["grant", "dynamic:db", "--to", "web", "--file", "db.json"]);
    let c = web_container(&b, &tag);
    let (u, _, _) = creds(&c);
    // The backend becomes unreachable; the container goes.
    proxy.down.store(true, Ordering::SeqCst);
    drop(c);
    eventually(20, "the lease shows as revoke pending", || {
        leases_json(&b).iter().any(|r| r["state"] == "revoke pending" && r["failures"].as_u64() >= Some(1))
    });
    assert!(pg.role_exists(&u), "revoked while the backend was unreachable?");
    let failed = b.audit_events("lease_revoke");
    assert!(failed.iter().any(|e| e["reason"].as_str().is_some_and(|r| r.contains("result=failed"))), "{failed:?}");
    let m = scrape(&maddr);
    assert!(sample(&m, "keyhole_lease_revocations_total{result=\"failed\"}") >= 1.0, "{m}");
    let status = String::from_utf8(b.ok(&["status"])).unwrap();
    assert!(status.contains("warning: 1 lease revocation(s) failed"), "{status}");
    let st = json(&b.ok(&["status", "--json"]));
    assert_eq!(st["revocations_pending"], 1, "{st}");
    // Persisted: a restart (backend still down) keeps retrying it.
    b.terminate();
    b.restart();
    eventually(20, "still pending after a restart", || {
        leases_json(&b).iter().any(|r| r["state"] == "revoke pending" && r["failures"].as_u64() >= Some(2))
    });
    // Back: the retry succeeds and the role goes.
    proxy.down.store(false, Ordering::SeqCst);
    let t0 = Instant::now();
    eventually(45, "the retried revocation drops the role", || !pg.role_exists(&u));
    eprintln!("role dropped {:?} after the backend came back", t0.elapsed());
    eventually(5, "no lease left", || leases_json(&b).is_empty());
    let ok = b.audit_events("lease_revoke");
    assert!(ok.iter().any(|e| e["reason"].as_str().is_some_and(|r| r.contains("result=ok"))), "{ok:?}");
    let status = String::from_utf8(b.ok(&["status"])).unwrap();
    assert!(!status.contains("warning"), "{status}");
}

#[test]
fn a_leased_descriptor_opened_before_a_takeover_keeps_reading_its_bytes() {
    if !require_postgres() {
        return;
    }
    let pg = Postgres::start();
    let bao = Bao::start();
    database_engine(&bao, &pg, "1h", "24h");
    let mut b = Broker::start_with(&bao.backend_toml("prod", "30s"));
    let tag = unique("lease-fd");
    b.ok(&["workload", "add", "web", "--selector", &format!("docker:label:keyhole.test={tag}")]);
    b.ok(&["dynamic", "add", "db", "--backend", "prod", "--path", "database/creds/web"]);
    b.ok(&["grant", "dynamic:db", "--to", "web", "--file", "db.json"]);
    let label = format!("keyhole.test={tag}");
    let c = Container::start(&["--label", &label, "-v", &secrets_bind(&b, "web"), "--tmpfs", "/tmp"]);
    let whole = c.cat("/run/secrets/db.json").unwrap();
    // Open, read 10 bytes, wait for /tmp/go, read the rest from the same
    // descriptor.
    let script = "exec 3< /run/secrets/db.json; busybox dd bs=1 count=10 <&3 2>/dev/null; \
                  while [ ! -e /tmp/go ]; do sleep 0.1; done; cat <&3";
    let id = c.id.clone();
    let reader = std::thread::spawn(move || docker(&["exec", &id, "sh", "-c", script]));
    std::thread::sleep(Duration::from_secs(1));
    b.takeover();
    let o = c.exec(&["sh", "-c", "echo > /tmp/go"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = reader.join().unwrap();
    assert!(o.status.success(), "the descriptor failed after the takeover: {}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&whole));
    let v = json(&o.stdout);
    assert!(pg.role_exists(v["username"].as_str().unwrap()));
}

#[test]
fn a_template_reading_a_certificate_gives_each_container_its_own() {
    if !require_postgres() {
        return;
    }
    let (_bao, b, ca, tag) = crate::leases::cert_broker("tpl-cert", false);
    let o = put_template(&b, "pem", "{{ cert('tls').chain }}{{ cert('tls').key }}");
    assert!(o.status.success(), "{}", stderr(&o));
    // A field the engine does not give fails that open, quoting nothing.
    let o = put_template(&b, "bad", "{{ cert('tls').cert }}{{ cert('tls').password }}");
    assert_fails(&o, 2, "line 1");
    b.ok(&["grant", "--template", "pem", "--to", "web", "--file", "tls.pem"]);
    let names = [unique("tc-a"), unique("tc-b")];
    let cs: Vec<Container> = names
        .iter()
        .map(|n| {
            Container::start(&["--name", n, "--label", &format!("keyhole.test={tag}"), "-v", &secrets_bind(&b, "web")])
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
    for (c, n) in cs.iter().zip(&names) {
        let pem = String::from_utf8(c.cat("/run/secrets/tls.pem").unwrap()).unwrap();
        assert!(pem.contains("PRIVATE KEY"), "no key");
        let leaf = crate::leases::cert_of(&pem);
        let text = crate::leases::openssl(&["x509", "-noout", "-text"], &leaf);
        assert!(text.contains(&format!("URI:spiffe://example.org/web/{n}")), "{n}: {text}");
        let f = dir.path().join(format!("{n}.pem"));
        std::fs::write(&f, &leaf).unwrap();
        let o = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(dir.path().join("ca.pem"))
            .arg(&f)
            .output()
            .unwrap();
        assert!(o.status.success(), "openssl verify: {}", String::from_utf8_lossy(&o.stdout));
    }
    let rows = leases_json(&b);
    assert_eq!(rows.iter().filter(|r| r["template"] == "@template/pem" && r["serial"].is_string()).count(), 2);
}
