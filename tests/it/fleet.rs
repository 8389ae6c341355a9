//! A fleet of brokers on one OpenBao: change detection by directory
//! (detailed-metadata), counted at the server's own audit device; paged
//! listings; soft delete and destroy; a mass rotation read once per
//! broker; the per-secret fallback where the endpoint is missing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

const APP: u32 = 1000;

/// An OpenBao dev server with a file audit device (OpenBao 2 takes audit
/// devices from its config file only), so requests can be counted.
struct AuditedBao {
    addr: String,
    dir: tempfile::TempDir,
    child: Child,
}

impl AuditedBao {
    fn start() -> AuditedBao {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let hcl = format!("audit \"file\" \"t\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n", log.display());
        std::fs::write(dir.path().join("bao.hcl"), hcl).unwrap();
        let child = Command::new("bao")
            .args(["server", "-dev", "-dev-root-token-id=root"])
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .arg(format!("-config={}", dir.path().join("bao.hcl").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let b = AuditedBao { addr: format!("http://127.0.0.1:{port}"), dir, child };
        eventually(30, "bao dev server is up", || b.cli(&["status"]).status.success());
        b
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new("bao").args(args).env("BAO_ADDR", &self.addr).env("BAO_TOKEN", "root").output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(o.status.success(), "bao {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }

    /// A token file for one broker, whose requests the audit log names
    /// `token-<who>`.
    fn token_for(&self, who: &str) -> std::path::PathBuf {
        let t = self.ok(&["token", "create", "-policy=root", &format!("-display-name={who}"), "-field=token"]);
        let f = self.dir.path().join(format!("token-{who}"));
        std::fs::write(&f, t.trim()).unwrap();
        f
    }

    fn backend_toml(&self, who: &str, poll: &str, address: &str) -> String {
        format!(
            "[[backend]]\nname = \"prod\"\nkind = \"vault\"\naddress = \"{address}\"\ntoken_file = \"{}\"\npoll_interval = \"{poll}\"\n",
            self.token_for(who).display()
        )
    }

    /// Requests by `who` whose path starts with `prefix`, so far.
    fn requests(&self, who: &str, prefix: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default();
        let name = format!("token-{who}");
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["type"] == "request" && v["auth"]["display_name"] == name.as_str())
            .filter(|v| v["request"]["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
            .count()
    }

    /// Write many secrets fast: one HTTP request each, no CLI start-up.
    fn put_many(&self, items: &[(String, String)]) {
        let host = self.addr.trim_start_matches("http://").to_owned();
        for (path, value) in items {
            let body = format!("{{\"data\":{{\"value\":\"{value}\"}}}}");
            let mut s = TcpStream::connect(&host).unwrap();
            write!(
                s,
                "POST /v1/secret/data/{path} HTTP/1.1\r\nHost: {host}\r\nX-Vault-Token: root\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).unwrap();
            assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
        }
    }
}

impl Drop for AuditedBao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_as_app(b: &Broker, file: &str) -> Option<Vec<u8>> {
    let o = run_as(APP, &["cat", b.mount("app").join(file).to_str().unwrap()]);
    o.status.success().then_some(o.stdout)
}

fn grant_to_app(b: &Broker, secret: &str) {
    if b.cli(&["workload", "ls", "--json"]).stdout == b"[]\n" {
        b.ok(&["workload", "add", "app", "--selector", &format!("unix:uid:{APP}")]);
    }
    b.ok(&["grant", secret, "--to", "app", "--mode", "0444"]);
}

fn backend_status(b: &Broker) -> serde_json::Value {
    json(&b.ok(&["status", "--json"]))["backends"][0].clone()
}

#[test]
fn brokers_watch_directories_with_one_request_each_per_interval() {
    if !require_bao() {
        return;
    }
    let bao = AuditedBao::start();
    let mut items: Vec<(String, String)> = (0..30).map(|i| (format!("fleet/k{i}"), format!("v1-{i}"))).collect();
    items.push(("db/pw".into(), "pw-1".into()));
    items.push(("db/unwatched".into(), "x".into()));
    bao.put_many(&items);
    let who = ["ha", "hb"];
    let brokers: Vec<Broker> =
        who.iter().map(|w| Broker::start_with(&bao.backend_toml(w, "500ms", &bao.addr))).collect();
    for b in &brokers {
        grant_to_app(b, "prod/fleet/*");
        grant_to_app(b, "prod/db/pw");
        assert_eq!(read_as_app(b, "k7").unwrap(), b"v1-7");
        assert_eq!(read_as_app(b, "pw").unwrap(), b"pw-1");
    }

    // Steady state: one recursive scan of fleet/, one flat list of db/
    // per interval, and no data read at all.
    std::thread::sleep(Duration::from_secs(1));
    let before: Vec<(usize, usize)> =
        who.iter().map(|w| (bao.requests(w, ""), bao.requests(w, "secret/data/"))).collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let polls_max = (t.elapsed().as_secs_f64() / 0.45).ceil() as usize + 1;
    let polls_min = (t.elapsed().as_secs_f64() / 0.55).floor() as usize - 1;
    for (w, (all0, data0)) in who.iter().zip(&before) {
        let all = bao.requests(w, "") - all0;
        let listings = all - (bao.requests(w, "secret/data/") - data0);
        assert_eq!(bao.requests(w, "secret/data/"), *data0, "{w} read data with nothing changed");
        assert!(
            all % 2 == 0 && (2 * polls_min..=2 * polls_max).contains(&all),
            "{w}: {all} requests in {:?}",
            t.elapsed()
        );
        assert_eq!(listings, all, "{w}: only listings");
        assert_eq!(bao.requests(w, "secret/metadata/"), 0, "{w} fell back to per-secret reads");
    }
    for b in &brokers {
        let s = backend_status(b);
        assert_eq!(s["change_detection"], "directory", "{s}");
        assert_eq!(s["last_scan"]["requests"], 2, "{s}");
        assert_eq!(s["last_scan"]["dirs"], 2, "{s}");
        assert_eq!(s["last_scan"]["watched"], 31, "{s}");
        assert!(s["last_scan"]["bytes"].as_u64().unwrap() > 1000, "{s}");
        let text = String::from_utf8(b.ok(&["status"])).unwrap();
        assert!(text.contains("change detection: directory, last check 2 request(s)"), "{text}");
    }

    // A write with bao reaches every broker, read once by each.
    let data: Vec<usize> = who.iter().map(|w| bao.requests(w, "secret/data/")).collect();
    bao.ok(&["kv", "put", "secret/fleet/k3", "value=v2-3"]);
    for b in &brokers {
        eventually(3, "a bao write shows on every broker", || read_as_app(b, "k3").as_deref() == Some(b"v2-3"));
    }
    std::thread::sleep(Duration::from_secs(1));
    for (w, d) in who.iter().zip(&data) {
        assert_eq!(bao.requests(w, "secret/data/") - d, 1, "{w} reads a changed secret once");
    }
    // A key the prefix gains shows on every broker.
    bao.ok(&["kv", "put", "secret/fleet/sub/new", "value=n1"]);
    for b in &brokers {
        eventually(3, "a new key under the prefix appears", || read_as_app(b, "sub_new").as_deref() == Some(b"n1"));
    }
    // Soft delete and destroy do not move current_version; both are seen.
    bao.ok(&["kv", "delete", "secret/fleet/k5"]);
    bao.ok(&["kv", "destroy", "-versions=1", "secret/fleet/k6"]);
    bao.ok(&["kv", "delete", "secret/db/pw"]);
    for b in &brokers {
        eventually(3, "a soft-deleted secret stops being served", || read_as_app(b, "k5").is_none());
        eventually(3, "a destroyed secret stops being served", || read_as_app(b, "k6").is_none());
        eventually(3, "an exact grant's soft delete too", || read_as_app(b, "pw").is_none());
    }
    bao.ok(&["kv", "undelete", "-versions=1", "secret/fleet/k5"]);
    for b in &brokers {
        eventually(3, "an undeleted secret is served again", || read_as_app(b, "k5").as_deref() == Some(b"v1-5"));
        b.assert_never_leaked(&[b"v2-3", b"pw-1", b"v1-5"]);
    }
}

#[test]
fn a_listing_larger_than_a_page_is_read_page_by_page() {
    if !require_bao() {
        return;
    }
    let bao = AuditedBao::start();
    let items: Vec<(String, String)> = (0..10).map(|i| (format!("paged/k{i}"), format!("p{i}"))).collect();
    bao.put_many(&items);
    let b = Broker::start_with(&(bao.backend_toml("pg", "400ms", &bao.addr) + "list_page_size = 3\n"));
    for i in 0..10 {
        grant_to_app(&b, &format!("prod/paged/k{i}"));
    }
    // 10 keys, 3 a page: 4 requests (3 + 3 + 3 + 1) per interval.
    eventually(5, "a scan covered every page", || backend_status(&b)["last_scan"]["watched"] == 10);
    let s = backend_status(&b);
    assert_eq!((s["last_scan"]["dirs"].as_u64(), s["last_scan"]["requests"].as_u64()), (Some(1), Some(4)), "{s}");
    let all0 = bao.requests("pg", "secret/detailed-metadata/paged");
    std::thread::sleep(Duration::from_secs(3));
    let n = bao.requests("pg", "secret/detailed-metadata/paged") - all0;
    assert!(n % 4 == 0 && (16..=32).contains(&n), "{n} listing requests in 3 s at 4 a scan");
    // A change on the last page is seen.
    bao.ok(&["kv", "put", "secret/paged/k9", "value=p9-2"]);
    eventually(3, "a change on the last page", || read_as_app(&b, "k9").as_deref() == Some(b"p9-2"));
}

#[test]
fn a_mass_rotation_is_read_once_per_broker() {
    if !require_bao() {
        return;
    }
    let bao = AuditedBao::start();
    let v1: Vec<(String, String)> = (0..200).map(|i| (format!("mass/k{i:03}"), format!("a{i}"))).collect();
    bao.put_many(&v1);
    let who = ["ma", "mb"];
    let brokers: Vec<Broker> =
        who.iter().map(|w| Broker::start_with(&bao.backend_toml(w, "300ms", &bao.addr))).collect();
    for b in &brokers {
        grant_to_app(b, "prod/mass/*");
        assert_eq!(read_as_app(b, "k199").unwrap(), b"a199");
    }
    std::thread::sleep(Duration::from_secs(1));
    let data: Vec<usize> = who.iter().map(|w| bao.requests(w, "secret/data/")).collect();
    let v2: Vec<(String, String)> = (0..200).map(|i| (format!("mass/k{i:03}"), format!("b{i}"))).collect();
    bao.put_many(&v2);
    for b in &brokers {
        eventually(10, "all 200 rotated on every broker", || {
            read_as_app(b, "k000").as_deref() == Some(b"b0") && read_as_app(b, "k199").as_deref() == Some(b"b199")
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    for (w, d) in who.iter().zip(&data) {
        assert_eq!(bao.requests(w, "secret/data/") - d, 200, "{w}: each changed secret read once");
    }
    for b in &brokers {
        let o = run_as(APP, &["sh", "-c", &format!("cat {}/k*", b.mount("app").display())]);
        let expect: String = (0..200).map(|i| format!("b{i}")).collect();
        assert_eq!(String::from_utf8_lossy(&o.stdout), expect);
    }
}

/// Vault's answer to a path its KV v2 engine does not know.
const UNSUPPORTED: &str = "{\"errors\":[\"1 error occurred:\\n\\t* unsupported path\\n\\n\"]}";

/// A test double in front of a real OpenBao that answers like Vault for
/// `detailed-metadata` (404 "unsupported path") and forwards every other
/// request: no real server lacks the endpoint and runs here.
fn vault_like_proxy(upstream: &str) -> String {
    let unsupported = format!(
        "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{UNSUPPORTED}",
        UNSUPPORTED.len()
    );
    proxy_answering(
        upstream,
        Arc::new(move |target: &str| target.contains("/detailed-metadata/").then(|| unsupported.clone())),
    )
}

/// What a proxy answers itself for a request target (a whole HTTP
/// response), or None to forward it.
type Rule = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// A proxy in front of a real OpenBao that answers what `rule` says and
/// forwards every other request.
fn proxy_answering(upstream: &str, rule: Rule) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let upstream = upstream.trim_start_matches("http://").to_owned();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (upstream, rule) = (upstream.clone(), rule.clone());
            std::thread::spawn(move || {
                let _ = proxy_one(conn, &upstream, &*rule);
            });
        }
    });
    addr
}

/// Serve one connection, one request at a time (each upstream request on
/// its own connection, closed after).
fn proxy_one(
    mut conn: TcpStream,
    upstream: &str,
    rule: &(dyn Fn(&str) -> Option<String> + Send + Sync),
) -> std::io::Result<()> {
    loop {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if conn.read(&mut byte)? == 0 {
                return Ok(());
            }
            head.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let len = text
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
            .unwrap_or(0usize);
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body)?;
        let target = text.split(' ').nth(1).unwrap_or("");
        if let Some(answer) = rule(target) {
            conn.write_all(answer.as_bytes())?;
            continue;
        }
        let head: String = text
            .split("\r\n")
            .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
            .collect::<Vec<_>>()
            .join("\r\n");
        let head = head.trim_end().to_owned() + "\r\nConnection: close\r\n\r\n";
        let mut up = TcpStream::connect(upstream)?;
        up.write_all(head.as_bytes())?;
        up.write_all(&body)?;
        let mut answer = Vec::new();
        up.read_to_end(&mut answer)?;
        // Re-frame: HTTP/1.1 from OpenBao has a Content-Length (or is
        // chunked); pass it through as is, the client keeps the connection.
        conn.write_all(&answer)?;
    }
}

#[test]
fn a_server_without_detailed_metadata_falls_back_to_per_secret_reads() {
    if !require_bao() {
        return;
    }
    let bao = AuditedBao::start();
    bao.put_many(&[("fb/a".into(), "a1".into()), ("fb/b".into(), "b1".into())]);
    let proxy = vault_like_proxy(&bao.addr);
    let b = Broker::start_with(&bao.backend_toml("fb", "300ms", &proxy));
    grant_to_app(&b, "prod/fb/*");
    assert_eq!(read_as_app(&b, "a").unwrap(), b"a1");
    eventually(5, "status says per-secret", || backend_status(&b)["change_detection"] == "per-secret");
    let s = backend_status(&b);
    assert!(s["change_detection_note"].as_str().unwrap().contains("no secret/detailed-metadata endpoint"), "{s}");
    assert!(String::from_utf8(b.ok(&["status"])).unwrap().contains("per-secret because: the server has no"));
    assert!(b.log().contains("falls back to one metadata read per secret"));
    // Changes are still detected, at one metadata read per secret.
    bao.ok(&["kv", "put", "secret/fb/a", "value=a2"]);
    eventually(3, "a change through the fallback", || read_as_app(&b, "a").as_deref() == Some(b"a2"));
    let m0 = bao.requests("fb", "secret/metadata/fb/");
    std::thread::sleep(Duration::from_secs(2));
    assert!(bao.requests("fb", "secret/metadata/fb/") - m0 >= 8, "per-secret reads each poll");
    // doctor says so too.
    let cfg = b.config.clone().unwrap();
    let o = Command::new(BIN).args(["doctor", "--config", cfg.to_str().unwrap()]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("falls back to one metadata read per secret"), "{out}");
}

#[test]
fn refresh_returns_once_every_mount_shows_the_change() {
    if !require_bao() {
        return;
    }
    let mut bao = AuditedBao::start();
    bao.put_many(&[("ci/token".into(), "t1".into()), ("ci/user".into(), "u1".into())]);
    // An hour between polls: only `refresh` can bring the change in time.
    let hosts: Vec<Broker> =
        ["ra", "rb"].iter().map(|w| Broker::start_with(&bao.backend_toml(w, "1h", &bao.addr))).collect();
    for b in &hosts {
        grant_to_app(b, "prod/ci/*");
        b.put("local/here", b"l");
        assert_eq!(read_as_app(b, "token").unwrap(), b"t1");
    }
    bao.ok(&["kv", "put", "secret/ci/token", "value=ci-token-2-9f3e"]);
    bao.ok(&["kv", "put", "secret/ci/added", "value=ci-added-1-7c2d"]);
    bao.ok(&["kv", "delete", "secret/ci/user"]);
    for b in &hosts {
        let r = json(&b.ok(&["refresh", "prod/ci/token", "--json"]));
        assert_eq!(r[0]["backend"], "prod", "{r}");
        assert_eq!(r[0]["path_watched"], true, "{r}");
        assert_eq!(r[0]["changed"], serde_json::json!(["prod/ci/added", "prod/ci/token", "prod/ci/user"]), "{r}");
        // Synchronous: the mount shows it as soon as the call returned.
        assert_eq!(read_as_app(b, "token").unwrap(), b"ci-token-2-9f3e");
        assert_eq!(read_as_app(b, "added").unwrap(), b"ci-added-1-7c2d");
        assert!(read_as_app(b, "user").is_none());
        let again = String::from_utf8(b.ok(&["refresh", "--backend", "prod"])).unwrap();
        assert!(again.starts_with("prod/: 2 watched, 0 changed (1 request(s), by directory)"), "{again}");
        let events = b.audit_events("refresh");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["path"], "prod/ci/token");
    }
    let b = &hosts[0];
    // Bad input: a clear error, nothing refreshed.
    assert_fails(&b.cli(&["refresh", "local/here"]), 2, "local/here is not under a [[backend]]");
    assert_fails(&b.cli(&["refresh", "--backend", "nope"]), 2, "no [[backend]] is named \"nope\"");
    let o = b.cli(&["refresh", "prod/x", "--backend", "prod"]);
    assert!(!o.status.success());
    // Not an admin: refused.
    let o = cli_as(&b.workload_socket(), &["refresh"], None, Some(65534));
    assert_fails(&o, 4, "needs an admin caller");
    // The backend down: exit 5, the mounts keep serving what they had.
    bao.child.kill().unwrap();
    let _ = bao.child.wait();
    assert_fails(&b.cli(&["refresh"]), 5, "backend prod is unavailable");
    assert_eq!(read_as_app(b, "token").unwrap(), b"ci-token-2-9f3e");
    assert_eq!(json(&b.ok(&["status", "--json"]))["backends"][0]["state"], "stale");
    b.assert_never_leaked(&[b"ci-token-2-9f3e", b"ci-added-1-7c2d"]);
}

#[test]
fn a_scan_that_fails_half_way_changes_nothing() {
    if !require_bao() {
        return;
    }
    let bao = AuditedBao::start();
    // 50 keys, 20 a page: 3 pages (20 + 20 + 10) per interval.
    let items: Vec<(String, String)> = (0..50).map(|i| (format!("half/k{i:02}"), format!("h1-{i}"))).collect();
    bao.put_many(&items);
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let broken = "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"errors\":[\"storage down\"]}";
    // Only the third page (after k39) fails: the first two answer.
    let rule: Rule =
        Arc::new(move |t: &str| (f.load(Ordering::SeqCst) && t.contains("after=k39")).then(|| broken.to_owned()));
    let proxy = proxy_answering(&bao.addr, rule);
    let b = Broker::start_with(&(bao.backend_toml("hw", "300ms", &proxy) + "list_page_size = 20\n"));
    for i in 0..50 {
        grant_to_app(&b, &format!("prod/half/k{i:02}"));
    }
    eventually(5, "a scan covered every page", || backend_status(&b)["last_scan"]["watched"] == 50);
    let s = backend_status(&b);
    assert_eq!((s["last_scan"]["dirs"].as_u64(), s["last_scan"]["requests"].as_u64()), (Some(1), Some(3)), "{s}");
    assert_eq!(read_as_app(&b, "k49").unwrap(), b"h1-49");

    // The backend fails on page 3 while keys on pages 1 and 3 change.
    failing.store(true, Ordering::SeqCst);
    eventually(5, "the backend is seen failing", || backend_status(&b)["state"] == "stale");
    bao.ok(&["kv", "put", "secret/half/k00", "value=h2-0"]);
    bao.ok(&["kv", "put", "secret/half/k45", "value=h2-45"]);
    bao.ok(&["kv", "delete", "secret/half/k10"]);
    std::thread::sleep(Duration::from_secs(2));
    // Pages 1 and 2 answered every interval, yet nothing of them applied.
    assert_eq!(read_as_app(&b, "k00").unwrap(), b"h1-0", "a half-way scan applied page 1's change");
    assert_eq!(read_as_app(&b, "k10").unwrap(), b"h1-10", "a half-way scan applied page 1's deletion");
    assert_eq!(read_as_app(&b, "k45").unwrap(), b"h1-45");
    let s = backend_status(&b);
    assert!(s["last_error"].as_str().unwrap_or_default().contains("HTTP 500"), "{s}");
    assert!(bao.requests("hw", "secret/data/half/k00") == 1, "page 1's change was not even read");

    // Healed: all three at once.
    failing.store(false, Ordering::SeqCst);
    eventually(5, "every change after the repair", || {
        read_as_app(&b, "k00").as_deref() == Some(b"h2-0")
            && read_as_app(&b, "k45").as_deref() == Some(b"h2-45")
            && read_as_app(&b, "k10").is_none()
    });
    assert_eq!(backend_status(&b)["state"], "ok");
}

#[test]
fn a_sparse_directory_is_read_secret_by_secret() {
    if !require_bao() {
        return;
    }
    let bao = AuditedBao::start();
    // 60 keys in big/, one of them granted; 3 of 4 in small/ granted.
    let mut items: Vec<(String, String)> = (0..60).map(|i| (format!("big/k{i:02}"), format!("b1-{i}"))).collect();
    items.extend((0..4).map(|i| (format!("small/s{i}"), format!("s1-{i}"))));
    bao.put_many(&items);
    let b = Broker::start_with(&bao.backend_toml("sp", "300ms", &bao.addr));
    grant_to_app(&b, "prod/big/k07");
    for i in 0..3 {
        grant_to_app(&b, &format!("prod/small/s{i}"));
    }
    assert_eq!(read_as_app(&b, "k07").unwrap(), b"b1-7");
    // After one listing of big/ (60 keys: 80 units) one metadata read
    // (21) is cheaper; small/ (4 keys, 3 granted) stays listed.
    // (The last refresh may be a grant's own, of one directory: wait for the watcher's.)
    eventually(5, "big/ is read secret by secret", || {
        let s = backend_status(&b)["last_scan"].clone();
        s["sparse_dirs"] == 1 && s["dirs"] == 2
    });
    let s = backend_status(&b);
    assert_eq!((s["last_scan"]["dirs"].as_u64(), s["last_scan"]["requests"].as_u64()), (Some(2), Some(2)), "{s}");
    assert_eq!(s["last_scan"]["watched"], 4, "{s}");
    let (list0, md0) =
        (bao.requests("sp", "secret/detailed-metadata/big"), bao.requests("sp", "secret/metadata/big/k07"));
    let small0 = bao.requests("sp", "secret/detailed-metadata/small");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(bao.requests("sp", "secret/detailed-metadata/big"), list0, "big/ was listed again");
    let md = bao.requests("sp", "secret/metadata/big/k07") - md0;
    let small = bao.requests("sp", "secret/detailed-metadata/small") - small0;
    assert!((4..=8).contains(&md) && (4..=8).contains(&small), "{md} reads of k07, {small} listings of small/ in 2 s");
    assert_eq!(bao.requests("sp", "secret/metadata/big/k08"), 0, "an ungranted key was read");
    // Changes and deletions of the granted secret are still seen.
    bao.ok(&["kv", "put", "secret/big/k07", "value=b2-7"]);
    eventually(3, "a change in a sparse directory", || read_as_app(&b, "k07").as_deref() == Some(b"b2-7"));
    bao.ok(&["kv", "delete", "secret/big/k07"]);
    eventually(3, "a deletion in a sparse directory", || read_as_app(&b, "k07").is_none());
    bao.ok(&["kv", "put", "secret/small/s1", "value=s2-1"]);
    eventually(3, "a change in a listed directory", || read_as_app(&b, "s1").as_deref() == Some(b"s2-1"));
}
