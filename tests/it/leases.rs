//! Per-container dynamic credentials and certificates (issue 17), with
//! real parts: an OpenBao dev server whose `database` engine manages a
//! private PostgreSQL 15 cluster, its `pki` engine, a real broker and two
//! containers of one workload.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

pub(crate) const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// PostgreSQL 15 is needed: under CI its absence fails the suite
/// (scripts/test.sh installs `postgresql`); elsewhere the tests skip.
pub(crate) fn require_postgres() -> bool {
    if !require_bao() || !require_docker() {
        return false;
    }
    if Path::new(PG_BIN).join("initdb").exists() && Command::new("psql").arg("--version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI=true but PostgreSQL 15 is not installed (apt-get install postgresql)"
    );
    eprintln!("SKIPPED: no PostgreSQL 15 in {PG_BIN} (scripts/test.sh installs postgresql)");
    false
}

/// A private PostgreSQL cluster on a free loopback port (run as user
/// `postgres`, in a temp dir), stopped on drop.
pub(crate) struct Postgres {
    pub(crate) port: u16,
    dir: tempfile::TempDir,
}

pub(crate) const PG_ADMIN_PASSWORD: &str = "kh-test-admin-pw";

impl Postgres {
    pub(crate) fn start() -> Postgres {
        let dir = tempfile::Builder::new().prefix("kh-pg").tempdir().unwrap();
        let port = free_port();
        let ok = |cmd: &mut Command| {
            let o = cmd.output().unwrap();
            assert!(o.status.success(), "{cmd:?}: {}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
        };
        ok(Command::new("chown").args(["postgres:postgres"]).arg(dir.path()));
        let data = dir.path().join("data");
        ok(Command::new("runuser").args(["-u", "postgres", "--"]).arg(Path::new(PG_BIN).join("initdb")).args([
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        ]));
        let opts = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", dir.path().display());
        ok(Command::new("runuser").args(["-u", "postgres", "--"]).arg(Path::new(PG_BIN).join("pg_ctl")).args([
            "-D",
            data.to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            dir.path().join("log").to_str().unwrap(),
            "-w",
            "start",
        ]));
        let pg = Postgres { port, dir };
        pg.sql(&format!("ALTER USER postgres PASSWORD '{PG_ADMIN_PASSWORD}'"));
        pg
    }

    /// Run SQL as the superuser over the local socket; its output.
    pub(crate) fn sql(&self, q: &str) -> String {
        let o = Command::new("runuser")
            .args(["-u", "postgres", "--", "psql", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-d", "postgres", "-tAc", q])
            .output()
            .unwrap();
        assert!(o.status.success(), "psql {q}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    pub(crate) fn role_exists(&self, name: &str) -> bool {
        self.sql(&format!("SELECT count(*) FROM pg_roles WHERE rolname = '{name}'")) == "1"
    }

    pub(crate) fn valid_until(&self, name: &str) -> String {
        self.sql(&format!("SELECT rolvaliduntil FROM pg_roles WHERE rolname = '{name}'"))
    }

    /// Log in over TCP with a password, as a client would (from the host).
    pub(crate) fn login(&self, user: &str, password: &str) -> Output {
        Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", user, "-d", "postgres", "-tAc"])
            .arg("SELECT current_user")
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join("pg_ctl"))
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

/// The database engine of `bao` managing `pg`, with role `web` (TTL and
/// max TTL as given).
pub(crate) fn database_engine(bao: &Bao, pg: &Postgres, ttl: &str, max_ttl: &str) {
    bao.ok(&["secrets", "enable", "database"]);
    let url = format!("postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable", pg.port);
    bao.ok(&[
        "write",
        "database/config/pg",
        "plugin_name=postgresql-database-plugin",
        "allowed_roles=*",
        &format!("connection_url={url}"),
        "username=postgres",
        &format!("password={PG_ADMIN_PASSWORD}"),
        "verify_connection=true",
    ]);
    bao.ok(&[
        "write",
        "database/roles/web",
        "db_name=pg",
        "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
        "revocation_statements=SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}'; DROP ROLE IF EXISTS \"{{name}}\";",
        &format!("default_ttl={ttl}"),
        &format!("max_ttl={max_ttl}"),
    ]);
}

pub(crate) fn secrets_bind(b: &Broker, workload: &str) -> String {
    format!("{}:/run/secrets:ro,rslave", b.mount(workload).display())
}

/// A broker with backend `prod`, a workload `web` of the containers
/// labelled with a fresh tag, and `dynamic:db` granted as db.json.
fn dynamic_setup(bao: &Bao) -> (Broker, String) {
    dynamic_setup_with(bao, "")
}

pub(crate) fn dynamic_setup_with(bao: &Bao, extra: &str) -> (Broker, String) {
    let b = Broker::start_with(&format!("{extra}{}", bao.backend_toml("prod", "30s")));
    let tag = unique("lease");
    b.ok(&["workload", "add", "web", "--selector", &format!("docker:label:keyhole.test={tag}")]);
    b.ok(&["dynamic", "add", "db", "--backend", "prod", "--path", "database/creds/web"]);
    b.ok(&["grant", "dynamic:db", "--to", "web", "--file", "db.json"]);
    (b, tag)
}

pub(crate) fn web_container(b: &Broker, tag: &str) -> Container {
    Container::start(&["--label", &format!("keyhole.test={tag}"), "-v", &secrets_bind(b, "web")])
}

/// What a container read from db.json: (username, password, expires_at).
pub(crate) fn creds(c: &Container) -> (String, String, String) {
    let raw = c.cat("/run/secrets/db.json").unwrap_or_else(|e| panic!("read db.json: {e}"));
    let v = json(&raw);
    let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("no {k} in db.json")).to_owned();
    (s("username"), s("password"), s("expires_at"))
}

pub(crate) fn leases_json(b: &Broker) -> Vec<serde_json::Value> {
    let out = b.ok(&["leases", "--json"]);
    json(&out).as_array().unwrap().clone()
}

#[test]
fn each_container_reads_its_own_login_which_dies_with_it() {
    if !require_postgres() {
        return;
    }
    let pg = Postgres::start();
    let bao = Bao::start();
    database_engine(&bao, &pg, "1h", "24h");
    let addr = format!("127.0.0.1:{}", free_port());
    let (b, tag) = dynamic_setup_with(&bao, &format!("[metrics]\nlisten = \"{addr}\"\n"));
    let one = web_container(&b, &tag);
    let two = web_container(&b, &tag);
    // Alternate reads: each container always gets its own, never the
    // other's (no shared page cache).
    let (u1, p1, _) = creds(&one);
    let (u2, p2, _) = creds(&two);
    assert_ne!(u1, u2, "two containers were handed one login");
    for _ in 0..5 {
        assert_eq!(creds(&one).0, u1);
        assert_eq!(creds(&two).0, u2);
    }
    // A short read buffer still reads it whole (size covers the content).
    let dd = one.exec(&["sh", "-c", "cat /run/secrets/db.json | wc -c"]);
    assert!(String::from_utf8_lossy(&dd.stdout).trim().parse::<usize>().unwrap() > 20);
    // Each logs in from the host with what its container read.
    for (u, p) in [(&u1, &p1), (&u2, &p2)] {
        let o = pg.login(u, p);
        assert!(o.status.success(), "{u} cannot log in: {}", stderr(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), u.as_str());
        assert!(!pg.login(u, "wrong").status.success());
    }
    assert!(pg.role_exists(&u1) && pg.role_exists(&u2));
    // Listed, never with a credential.
    let list = b.ok(&["leases", "--json"]);
    assert!(!contains(&list, p1.as_bytes()) && !contains(&list, p2.as_bytes()));
    let rows = leases_json(&b);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().any(|r| r["container"] == one.id.as_str()));
    // The container ends: its role goes within 5 s; the other's stays.
    let gone_id = one.id.clone();
    drop(one);
    let t = Instant::now();
    eventually(5, "the removed container's role is dropped", || !pg.role_exists(&u1));
    eprintln!("role dropped {:?} after docker rm -f", t.elapsed());
    assert!(pg.role_exists(&u2));
    let revoked = b.audit_events("lease_revoke");
    assert!(
        revoked.iter().any(|e| e["reason"].as_str().is_some_and(|r| r.contains(&gone_id) && r.contains("result=ok"))),
        "{revoked:?}"
    );
    // Revoking the grant drops the remaining one.
    b.ok(&["revoke", "dynamic:db", "--from", "web"]);
    eventually(5, "the grant's revocation drops the remaining role", || !pg.role_exists(&u2));
    eventually(5, "no lease left", || leases_json(&b).is_empty());
    b.assert_never_leaked(&[p1.as_bytes(), p2.as_bytes()]);
    let m = scrape(&addr);
    assert_eq!(sample(&m, "keyhole_lease_revocations_total{result=\"ok\"}"), 2.0, "{m}");
    assert_eq!(sample(&m, "keyhole_leases"), 0.0);
}

#[test]
fn a_stranger_container_gets_no_lease_and_admin_verbs_need_an_admin() {
    if !require_postgres() {
        return;
    }
    let pg = Postgres::start();
    let bao = Bao::start();
    database_engine(&bao, &pg, "1h", "24h");
    let (b, _tag) = dynamic_setup(&bao);
    let stranger = Container::start(&["-v", &secrets_bind(&b, "web")]);
    let e = stranger.cat("/run/secrets/db.json").unwrap_err();
    assert!(e.contains("Permission denied"), "{e}");
    assert!(leases_json(&b).is_empty(), "a stranger's open issued a lease");
    // Non-admins cannot define or list sources.
    let o = cli_as(
        &b.socket(),
        &["dynamic", "add", "x", "--backend", "prod", "--path", "database/creds/web"],
        None,
        Some(1000),
    );
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let o = cli_as(&b.socket(), &["leases"], None, Some(1000));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    // Bad input: a clear error, nothing recorded.
    assert_fails(
        &b.cli(&["dynamic", "add", "../x", "--backend", "prod", "--path", "database/creds/web"]),
        2,
        "source name",
    );
    assert_fails(
        &b.cli(&["dynamic", "add", "y", "--backend", "nope", "--path", "database/creds/web"]),
        2,
        "not configured",
    );
    assert_fails(
        &b.cli(&["cert", "add", "t", "--backend", "prod", "--issue", "pki/issue/x", "--uri", "spiffe://x/{secret}"]),
        2,
        "placeholders",
    );
    assert_fails(&b.cli(&["grant", "dynamic:db/*", "--to", "web"]), 2, "prefix");
    let ls = json(&b.ok(&["dynamic", "ls", "--json"]));
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
    assert_eq!(b.audit_events("dynamic_add").len(), 3, "every add, refused or not, is audited");
}

#[test]
fn restarts_keep_each_containers_login_and_still_revoke_it() {
    if !require_postgres() {
        return;
    }
    let pg = Postgres::start();
    let bao = Bao::start();
    database_engine(&bao, &pg, "1h", "24h");
    let (mut b, tag) = dynamic_setup(&bao);
    let c = web_container(&b, &tag);
    let (u, p, _) = creds(&c);
    b.terminate();
    b.restart();
    assert_eq!(creds(&c).0, u, "a restart changed the container's login");
    b.kill9();
    b.restart();
    assert_eq!(creds(&c).0, u, "kill -9 changed the container's login");
    b.takeover();
    assert_eq!(creds(&c).0, u, "a takeover changed the container's login");
    assert!(pg.login(&u, &p).status.success());
    // A second container; the broker is down when both end.
    let d = web_container(&b, &tag);
    let (u2, _, _) = creds(&d);
    b.kill9();
    drop(c);
    drop(d);
    assert!(pg.role_exists(&u) && pg.role_exists(&u2), "nothing revoked while no broker ran");
    b.restart();
    eventually(10, "leases of containers that ended while no broker ran are revoked at start", || {
        !pg.role_exists(&u) && !pg.role_exists(&u2)
    });
}

#[test]
fn a_lease_is_renewed_at_two_thirds_and_rolled_at_max_ttl() {
    if !require_postgres() {
        return;
    }
    let pg = Postgres::start();
    let bao = Bao::start();
    // Renewed at ~6 s (2/3 of 9 s); capped by max_ttl at ~12 s: rolled.
    database_engine(&bao, &pg, "9s", "16s");
    let (b, tag) = dynamic_setup(&bao);
    let c = web_container(&b, &tag);
    let (u, _, exp) = creds(&c);
    let before = pg.valid_until(&u);
    eventually(10, "the renewal moves VALID UNTIL", || pg.valid_until(&u) != before);
    let (u_again, _, exp_again) = creds(&c);
    assert_eq!(u_again, u, "a renewal kept the login");
    assert_ne!(exp_again, exp, "the file shows the new expiry");
    let ino = |c: &Container| {
        String::from_utf8_lossy(&c.exec(&["stat", "-c", "%i", "/run/secrets/db.json"]).stdout).trim().to_owned()
    };
    let ino_before = ino(&c);
    eventually(20, "max_ttl rolls a new login ahead of expiry", || creds(&c).0 != u);
    let (u_new, p_new, _) = creds(&c);
    assert!(pg.login(&u_new, &p_new).status.success());
    assert_ne!(ino(&c), ino_before, "a rolled lease is a new inode");
    eventually(10, "the old login is revoked", || !pg.role_exists(&u));
}

/// A TCP proxy to `to` that holds each connection `delay` before passing
/// it on (while `slow` is set).
pub(crate) struct SlowProxy {
    pub(crate) addr: String,
    pub(crate) slow: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
}

impl SlowProxy {
    pub(crate) fn start(to: &str, delay: Duration) -> SlowProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let to = to.trim_start_matches("http://").to_owned();
        let slow = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(delay.as_millis() as u64));
        let (s, d) = (slow.clone(), delay_ms.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(client) = conn else { return };
                let Ok(server) = TcpStream::connect(&to) else { continue };
                // Requests (client to server) are held while slow: a
                // pooled keep-alive connection is slowed too.
                let pipe = |mut a: TcpStream, mut b: TcpStream, hold: Option<(Arc<AtomicBool>, Arc<AtomicU64>)>| {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = a.read(&mut buf) {
                            if let Some((s, d)) = &hold {
                                if s.load(Ordering::SeqCst) {
                                    std::thread::sleep(Duration::from_millis(d.load(Ordering::SeqCst)));
                                }
                            }
                            if n == 0 || b.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = b.shutdown(std::net::Shutdown::Write);
                    });
                };
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap(), Some((s.clone(), d.clone())));
                pipe(server, client, None);
            }
        });
        SlowProxy { addr, slow, delay_ms }
    }
}

#[test]
fn a_slow_or_down_backend_fails_a_first_open_promptly_and_stalls_no_other_mount() {
    if !require_postgres() {
        return;
    }
    let pg = Postgres::start();
    let mut bao = Bao::start();
    database_engine(&bao, &pg, "1h", "24h");
    let proxy = SlowProxy::start(&bao.addr, Duration::from_secs(4));
    let toml = format!(
        "[[backend]]\nname = \"prod\"\nkind = \"vault\"\naddress = \"{}\"\ntoken_file = \"{}\"\npoll_interval = \"30s\"\n",
        proxy.addr,
        bao.token_file().display()
    );
    let b = Broker::start_with(&toml);
    let tag = unique("lease");
    b.ok(&["workload", "add", "web", "--selector", &format!("docker:label:keyhole.test={tag}")]);
    b.ok(&["dynamic", "add", "db", "--backend", "prod", "--path", "database/creds/web"]);
    b.ok(&["grant", "dynamic:db", "--to", "web", "--file", "db.json"]);
    b.ok(&["workload", "add", "host", "--selector", "unix:uid:1000"]);
    b.put("plain/value", b"plain");
    b.ok(&["grant", "plain/value", "--to", "host", "--uid", "1000"]);
    let host_file = b.mount("host").join("value");
    // Slow: several containers' first opens are parked while the backend
    // takes 4 s; every other mount is served meanwhile, at once.
    proxy.slow.store(true, Ordering::SeqCst);
    let cs: Vec<Container> = (0..3).map(|_| web_container(&b, &tag)).collect();
    let readers: Vec<_> = cs
        .iter()
        .map(|c| {
            let id = c.id.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                let o = docker(&["exec", &id, "cat", "/run/secrets/db.json"]);
                (o.status.success(), t.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..10 {
        let t = Instant::now();
        let o = run_as(1000, &["cat", host_file.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(t.elapsed() < Duration::from_millis(900), "another mount stalled: {:?}", t.elapsed());
    }
    for r in readers {
        let (ok, took) = r.join().unwrap();
        assert!(!ok, "a first open answered before its lease could arrive");
        assert!(took < Duration::from_secs(4), "a parked open was held {took:?}");
    }
    // The lease arrives later: the next open reads it.
    proxy.slow.store(false, Ordering::SeqCst);
    eventually(15, "the lease issued in the background is served", || cs[0].cat("/run/secrets/db.json").is_ok());
    let (u, _, _) = creds(&cs[0]);
    // Down: a live lease is still served; a new container fails at once.
    bao.stop();
    assert_eq!(creds(&cs[0]).0, u);
    let late = web_container(&b, &tag);
    let t = Instant::now();
    assert!(late.cat("/run/secrets/db.json").is_err(), "a lease out of nowhere");
    assert!(t.elapsed() < Duration::from_secs(5), "the first open hung {:?}", t.elapsed());
    assert!(!b.audit_events("lease_error").is_empty());
    let _ = proxy.delay_ms.load(Ordering::SeqCst);
}

pub(crate) fn cert_of(pem: &str) -> String {
    let start = pem.find("-----BEGIN CERTIFICATE-----").unwrap();
    let end = pem.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    pem[start..end].to_owned() + "\n"
}

pub(crate) fn openssl(args: &[&str], input: &str) -> String {
    let mut c = Command::new("openssl").args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "openssl {args:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn each_container_gets_its_own_certificate_revoked_by_serial_when_it_ends() {
    if !require_postgres() {
        return;
    }
    let (bao, b, ca, tag) = cert_broker("lease", true);
    b.ok(&["grant", "cert:tls", "--to", "web", "--file", "tls.pem"]);
    let names = [unique("web-a"), unique("web-b")];
    let cs: Vec<Container> = names
        .iter()
        .map(|n| {
            Container::start(&["--name", n, "--label", &format!("keyhole.test={tag}"), "-v", &secrets_bind(&b, "web")])
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    fs::write(&ca_file, &ca).unwrap();
    let mut serials = Vec::new();
    for (c, n) in cs.iter().zip(&names) {
        let pem = String::from_utf8(c.cat("/run/secrets/tls.pem").unwrap()).unwrap();
        assert!(pem.contains("PRIVATE KEY"), "no key in tls.pem");
        let cert = cert_of(&pem);
        let text = openssl(&["x509", "-noout", "-text"], &cert);
        assert!(text.contains(&format!("URI:spiffe://example.org/web/{n}")), "{n}: {text}");
        assert!(text.contains(&format!("CN = {n}.svc")) || text.contains(&format!("CN={n}.svc")), "{text}");
        let leaf = dir.path().join(format!("{n}.pem"));
        fs::write(&leaf, &cert).unwrap();
        let o = Command::new("openssl")
            .args(["verify", "-CAfile", ca_file.to_str().unwrap(), leaf.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "openssl verify: {}", String::from_utf8_lossy(&o.stdout));
        let serial = openssl(&["x509", "-noout", "-serial"], &cert);
        serials.push(serial.trim().trim_start_matches("serial=").to_ascii_uppercase());
    }
    assert_ne!(serials[0], serials[1]);
    let mut cs = cs;
    drop(cs.remove(0));
    let on_crl = |serial: &str| {
        let crl = bao.ok(&["read", "-field=certificate", "pki/cert/crl"]);
        let text = openssl(&["crl", "-noout", "-text"], &crl);
        text.to_ascii_uppercase().contains(serial)
    };
    eventually(10, "the removed container's serial is on the CRL", || on_crl(&serials[0]));
    assert!(!on_crl(&serials[1]), "the live container's certificate was revoked");
}

/// OpenBao with its PKI engine, a broker on it, workload `web` (the
/// containers labelled `keyhole.test=TAG`) and the certificate source
/// `tls` (URI `spiffe://example.org/{workload}/{container_name}`, 1 h,
/// and CN `{container_name}.svc` when `cn`): (OpenBao, broker, CA, TAG).
pub(crate) fn cert_broker(prefix: &str, cn: bool) -> (Bao, Broker, String, String) {
    let bao = Bao::start();
    let ca = bao.pki_engine();
    let b = Broker::start_with(&bao.backend_toml("prod", "30s"));
    let tag = unique(prefix);
    b.ok(&["workload", "add", "web", "--selector", &format!("docker:label:keyhole.test={tag}")]);
    let mut args = vec!["cert", "add", "tls", "--backend", "prod", "--issue", "pki/issue/workload"];
    args.extend(["--uri", "spiffe://example.org/{workload}/{container_name}", "--ttl", "1h"]);
    if cn {
        args.extend(["--cn", "{container_name}.svc"]);
    }
    b.ok(&args);
    (bao, b, ca, tag)
}
