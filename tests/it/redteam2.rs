//! Red team 3 (helper F): attacks on what the last round added — teams,
//! templates, leases, Podman attestation, refresh, the admin API's rate
//! buckets — each as the exploit that worked before its fix.

use std::io::BufRead;
use std::process::{Command, Output, Stdio};

use crate::support::*;

/// The owner of the user namespace in these tests, and the host uids its
/// processes run as (a subordinate range, as `newuidmap` would map).
const F_NS_OWNER: u32 = 4600;
const F_SUBUID: u32 = 210_000;

fn f_subuid_namespace() -> std::process::Child {
    crate::redteam::subuid_namespace(F_NS_OWNER, F_SUBUID)
}

/// `cmd` as `uid` inside the namespace of `holder` (host uid `F_SUBUID + uid`).
fn f_in_ns(holder: u32, uid: u32, cmd: &[&str]) -> Command {
    let (t, u) = (holder.to_string(), uid.to_string());
    let mut c = Command::new("nsenter");
    c.args(["-t", &t, "-U", "--setuid", &u, "--setgid", &u]).args(cmd);
    c
}

/// Finding: the per-caller connection share was keyed by host uid, and a
/// user with subordinate uids is thousands of host uids: 8 of its uids
/// held 8 shares. They are one caller (the namespace's owner), as its
/// denials already were: all of them together keep one share.
#[test]
fn redteam3_host_uids_of_one_users_namespace_share_one_connection_limit() {
    needs!(root);
    let b = Broker::start_with("[limits]\nmax_connections = 1000\nmax_connections_per_caller = 20\n");
    let mut ns = f_subuid_namespace();
    let ws = b.workload_socket();
    let mut holders = Vec::new();
    let mut kept = 0;
    for uid in 1..=8 {
        let mut child = f_in_ns(ns.id(), uid, &["python3", "-c", HOLD_UNIX, ws.to_str().unwrap(), "40", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        let (_, n) = parse_flood(&line);
        eprintln!("host uid {}: {n} connections kept", F_SUBUID + uid);
        kept += n;
        holders.push(child);
    }
    for mut h in holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    let _ = ns.kill();
    let _ = ns.wait();
    assert!(kept <= 20, "one user's namespace kept {kept} connections as 8 host uids (limit 20 a caller)");
    assert!(kept >= 19, "the namespace's own share was not served: {kept}");
}

/// Finding: `calls_per_second` was a bucket per host uid, so a user with
/// subordinate uids had one per uid (and could fill the 10,000 buckets,
/// after which every new caller is refused). One namespace is one bucket.
#[test]
fn redteam3_host_uids_of_one_users_namespace_share_one_call_bucket() {
    needs!(root);
    let b = Broker::start_with("[limits]\ncalls_per_second = 1\n");
    let mut ns = f_subuid_namespace();
    let ws = b.workload_socket();
    let mut refused = 0;
    let mut served = 0;
    for uid in 1..=6 {
        let o: Output =
            f_in_ns(ns.id(), uid, &[BIN, "whoami"]).env("KEYHOLE_SOCKET", &ws).stdin(Stdio::null()).output().unwrap();
        if o.status.success() {
            served += 1;
        } else if stderr(&o).contains("too many calls") {
            refused += 1;
        } else {
            panic!("whoami as {uid}: {}", stderr(&o));
        }
    }
    let _ = ns.kill();
    let _ = ns.wait();
    eprintln!("6 host uids of one namespace: {served} served, {refused} refused (calls_per_second = 1)");
    assert!(served >= 1, "the namespace's own bucket was not served");
    assert!(refused >= 3, "6 uids of one user's namespace had a bucket each: {served} served");
}

/// A scoped admin with `grant` on its own workloads.
const F_TEAM: u32 = 41501;

/// Finding: a role's paths were parsed as grant targets, so a role could
/// name `@template/NAME`, `dynamic:NAME` or `cert:NAME` — and its scoped
/// admin then granted that template (which reads secrets far outside the
/// role's paths) to a workload of its own and read them. Only full admins
/// grant templates and lease sources (0.2.0): a role's paths are secret
/// paths, and such a role is refused.
#[test]
fn redteam3_a_role_cannot_name_a_template_or_lease_source_as_a_path() {
    needs!(root);
    let b = Broker::start();
    b.put("prod/db", b"prod-db-value-5be1c0");
    b.put("a/x", b"team-a-value");
    let t = b.cli_in(&["template", "put", "t", "--stdin"], Some(b"{{ secret('prod/db') }}"));
    assert!(t.status.success(), "{}", stderr(&t));
    let role = |paths: &[&str]| {
        let principal = format!("uid:{F_TEAM}");
        let mut args = vec!["role", "add", "team-a", "--principal", &principal];
        for p in paths {
            args.extend(["--paths", p]);
        }
        args.extend(["--workloads", "a-*", "--verbs", "grant,workload"]);
        b.cli(&args)
    };
    let r = role(&["a/*", "@template/t"]);
    let mut read = false;
    if r.status.success() {
        // The exploit, as it went: a workload of the admin's own uid,
        // the template granted to it, prod/db read.
        let as_team = |args: &[&str]| cli_as(&b.workload_socket(), args, None, Some(F_TEAM));
        let w = as_team(&["workload", "add", "a-web", "--selector", &format!("unix:uid:{F_TEAM}")]);
        assert!(w.status.success(), "{}", stderr(&w));
        let uid = F_TEAM.to_string();
        let g = as_team(&["grant", "--template", "t", "--to", "a-web", "--file", "x", "--uid", &uid]);
        eprintln!("scoped grant of the template: {:?} {}", g.status, stderr(&g));
        let file = b.mount("a-web").join("x");
        read = eventually_read(&file, b"prod-db-value-5be1c0");
    }
    assert!(!r.status.success(), "a role named @template/t as a path (its admin read prod/db: {read})");
    assert!(stderr(&r).contains("@template/t"), "{}", stderr(&r));
    for p in ["dynamic:pg", "cert:web"] {
        assert!(!role(&["a/*", p]).status.success(), "a role may name {p} as a path");
    }
    assert!(role(&["a/*"]).status.success(), "a role of secret paths is still made");
}

/// Whether `file` (read as `F_TEAM`) shows `want` within a few seconds.
fn eventually_read(file: &std::path::Path, want: &[u8]) -> bool {
    for _ in 0..50 {
        let o = run_as(F_TEAM, &["cat", file.to_str().unwrap()]);
        if contains(&o.stdout, want) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

/// Finding (critical): the leased file was one inode for every container
/// of a workload, and `sendfile` (busybox `cat`) reads through the inode's
/// page cache even when the open was answered with direct I/O. While
/// container a read its certificate in a loop, container b's `cat` read
/// a's certificate and private key (6 times in 200), and otherwise its own
/// file cut to a's length (a short read there sets the inode's size).
/// Each caller now has its own inode of a leased file.
#[test]
fn redteam3_two_containers_never_read_each_others_leased_certificate() {
    needs!(root, docker, bao);
    let (_bao, b, _, tag) = crate::leases::cert_broker("rt3", false);
    b.ok(&["grant", "cert:tls", "--to", "web", "--file", "tls.pem"]);
    let bind = format!("{}:/run/secrets:ro,rslave", b.mount("web").display());
    let names = [unique("rt3-a"), unique("rt3-b")];
    let cs: Vec<Container> = names
        .iter()
        .map(|n| Container::start(&["--name", n, "--label", &format!("keyhole.test={tag}"), "-v", &bind]))
        .collect();
    // Each container's own file, by read(2) (direct I/O: the broker's
    // answer to this caller's open).
    let own: Vec<Vec<u8>> = cs
        .iter()
        .map(|c| {
            let dd = c.exec(&["busybox", "dd", "if=/run/secrets/tls.pem", "bs=65536"]);
            assert!(dd.status.success(), "dd: {}", stderr(&dd));
            assert!(contains(&dd.stdout, b"PRIVATE KEY"), "no key in {} bytes", dd.stdout.len());
            dd.stdout
        })
        .collect();
    assert_ne!(own[0], own[1]);
    let mut wrong = Vec::new();
    for round in 0..4 {
        for (i, c) in cs.iter().enumerate() {
            // busybox cat: sendfile, through the inode's page cache.
            let cat = c.cat("/run/secrets/tls.pem").unwrap();
            let dd = c.exec(&["busybox", "dd", "if=/run/secrets/tls.pem", "bs=65536"]).stdout;
            for (how, got) in [("cat", &cat), ("dd", &dd)] {
                if *got != own[i] {
                    let other = &own[1 - i];
                    let whose = if got == other {
                        "the other container's file".to_owned()
                    } else if other.starts_with(&got[..got.len().min(other.len()).min(64)]) && got.len() > 64 {
                        format!("{} bytes starting as the other container's", got.len())
                    } else {
                        format!("{} bytes (own is {})", got.len(), own[i].len())
                    };
                    wrong.push(format!("round {round}: container {i} {how} read {whose}"));
                }
            }
        }
    }
    // The race: a reads its file in a loop (through sendfile) while b
    // reads its own 200 times; the inode's pages are one cache.
    let spin =
        cs[0].exec(&["sh", "-c", "for i in $(busybox seq 4000); do cat /run/secrets/tls.pem >/dev/null; done &"]);
    assert!(spin.status.success(), "{}", stderr(&spin));
    let many = cs[1].exec(&["sh", "-c", "for i in $(busybox seq 200); do cat /run/secrets/tls.pem; echo =====; done"]);
    let mut others = 0;
    let mut bad = 0;
    let text = String::from_utf8_lossy(&many.stdout).into_owned();
    let own1 = String::from_utf8_lossy(&own[1]).into_owned();
    let own0 = String::from_utf8_lossy(&own[0]).into_owned();
    for got in text.split("=====\n").filter(|g| !g.is_empty()) {
        if got == own0 {
            others += 1;
        } else if got != own1 {
            bad += 1;
        }
    }
    eprintln!("b read a's whole file {others} times, something else not its own {bad} times in 200");
    assert!(wrong.is_empty(), "a leased file showed a container what is not its own:\n{}", wrong.join("\n"));
    assert_eq!(
        (others, bad),
        (0, 0),
        "b read a's certificate and key {others} times (and {bad} other wrong reads) in 200"
    );
    // 1,000 fresh processes of b: one lease each container, no more.
    let at = std::time::Instant::now();
    let k = cs[1].exec(&[
        "sh",
        "-c",
        "for i in $(busybox seq 1000); do cat /run/secrets/tls.pem >/dev/null || echo fail; done",
    ]);
    assert!(k.status.success() && !contains(&k.stdout, b"fail"), "{}", String::from_utf8_lossy(&k.stdout));
    let leases = json(&b.ok(&["leases", "--json"])).as_array().unwrap().len();
    eprintln!("1,000 fresh cats in b: {:?}; {leases} leases", at.elapsed());
    assert_eq!(leases, 2);
}

const F_PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const F_PG_PASSWORD: &str = "kh-rt3-admin-pw";

/// A private PostgreSQL 15 cluster (as user `postgres`), stopped on drop.
struct FPostgres {
    port: u16,
    dir: tempfile::TempDir,
}

impl FPostgres {
    fn start() -> FPostgres {
        let dir = tempfile::Builder::new().prefix("kh-rt3pg").tempdir().unwrap();
        let port = free_port();
        let ok = |cmd: &mut Command| {
            let o = cmd.output().unwrap();
            assert!(o.status.success(), "{cmd:?}: {}", stderr(&o));
        };
        ok(Command::new("chown").args(["postgres:postgres"]).arg(dir.path()));
        let data = dir.path().join("data");
        let bin = |b: &str| std::path::Path::new(F_PG_BIN).join(b);
        ok(Command::new("runuser").args(["-u", "postgres", "--"]).arg(bin("initdb")).args([
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        ]));
        let opts = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", dir.path().display());
        let log = dir.path().join("log");
        ok(Command::new("runuser").args(["-u", "postgres", "--"]).arg(bin("pg_ctl")).args([
            "-D",
            data.to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "start",
        ]));
        let pg = FPostgres { port, dir };
        pg.sql(&format!("ALTER USER postgres PASSWORD '{F_PG_PASSWORD}'"));
        pg
    }

    fn sql(&self, q: &str) -> String {
        let o = Command::new("runuser")
            .args(["-u", "postgres", "--", "psql", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-d", "postgres", "-tAc", q])
            .output()
            .unwrap();
        assert!(o.status.success(), "psql {q}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    fn logins(&self) -> usize {
        self.sql("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'v-%'").parse().unwrap()
    }
}

impl Drop for FPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(std::path::Path::new(F_PG_BIN).join("pg_ctl"))
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

/// Finding: a host user's lease was keyed by its uid, and a user with
/// subordinate uids is thousands of host uids: each uid of its namespace
/// that a `unix:gid:` workload matched (its own group, mapped in) was
/// issued a database login of its own — 12 uids, 12 logins; 10,000 would
/// take `MAX_LEASES` from every container on the host. The namespace is
/// one holder, its owner.
#[test]
fn redteam3_host_uids_of_one_users_namespace_get_one_lease() {
    needs!(root, bao);
    if !std::path::Path::new(F_PG_BIN).join("initdb").exists() {
        eprintln!("SKIPPED: no PostgreSQL 15");
        return;
    }
    let pg = FPostgres::start();
    let bao = Bao::start();
    bao.ok(&["secrets", "enable", "database"]);
    let url = format!("postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable", pg.port);
    bao.ok(&[
        "write",
        "database/config/pg",
        "plugin_name=postgresql-database-plugin",
        "allowed_roles=*",
        &format!("connection_url={url}"),
        "username=postgres",
        &format!("password={F_PG_PASSWORD}"),
    ]);
    bao.ok(&[
        "write",
        "database/roles/web",
        "db_name=pg",
        "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
        "revocation_statements=DROP ROLE IF EXISTS \"{{name}}\";",
        "default_ttl=1h",
        "max_ttl=24h",
    ]);
    let b = Broker::start_with(&bao.backend_toml("prod", "30s"));
    // The owner's own group: a workload for its services.
    b.ok(&["workload", "add", "mine", "--selector", &format!("unix:gid:{F_NS_OWNER}")]);
    b.ok(&["dynamic", "add", "db", "--backend", "prod", "--path", "database/creds/web"]);
    b.ok(&["grant", "dynamic:db", "--to", "mine", "--file", "db.json", "--mode", "0444"]);
    // The namespace: its uids 0..99 are host uids F_SUBUID.., its gid 0
    // the owner's own group (newgidmap lets a user map its own gid).
    let owner = F_NS_OWNER.to_string();
    let mut ns = Command::new("setpriv")
        .args(["--reuid", &owner, "--regid", &owner, "--clear-groups", "unshare", "-U", "sleep", "120"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = ns.id();
    let own = std::fs::read_link("/proc/self/ns/user").unwrap();
    eventually(10, "the holder's user namespace", || {
        std::fs::read_link(format!("/proc/{pid}/ns/user")).is_ok_and(|n| n != own)
    });
    std::fs::write(format!("/proc/{pid}/uid_map"), format!("0 {F_SUBUID} 100\n")).unwrap();
    std::fs::write(format!("/proc/{pid}/gid_map"), format!("0 {F_NS_OWNER} 1\n")).unwrap();
    let file = b.mount("mine").join("db.json");
    let mut read = 0;
    for uid in 1..=12 {
        let (t, u) = (pid.to_string(), uid.to_string());
        let o = Command::new("nsenter")
            .args(["-t", &t, "-U", "--setuid", &u, "--setgid", "0", "cat", file.to_str().unwrap()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if contains(&o.stdout, b"password") {
            read += 1;
        } else {
            eprintln!("uid {uid}: {}", stderr(&o));
        }
    }
    let _ = ns.kill();
    let _ = ns.wait();
    let leases = json(&b.ok(&["leases", "--json"])).as_array().unwrap().len();
    let logins = pg.logins();
    eprintln!("12 host uids of one namespace: {read} read the file, {leases} leases, {logins} database logins");
    assert!(read >= 1, "the namespace's processes read nothing");
    assert_eq!((leases, logins), (1, 1), "one user's namespace was issued a lease per host uid");
}

/// Finding: `keyhole refresh` by a scoped admin (verb `refresh`) returned
/// every changed path of the backend, other teams' included — names a
/// scoped `ls` never shows. It now lists only the paths the caller's
/// roles cover.
#[test]
fn redteam3_a_scoped_refresh_shows_only_its_own_paths() {
    needs!(root, bao);
    let bao = Bao::start();
    bao.ok(&["kv", "put", "secret/team-a/x", "value=a1"]);
    bao.ok(&["kv", "put", "secret/team-b/db", "value=b1"]);
    let b = Broker::start_with(&bao.backend_toml("prod", "1h"));
    b.ok(&["workload", "add", "w", "--selector", "unix:uid:0"]);
    b.ok(&["grant", "prod/team-a/x", "--to", "w", "--file", "a"]);
    b.ok(&["grant", "prod/team-b/db", "--to", "w", "--file", "b"]);
    let principal = format!("uid:{F_TEAM}");
    b.ok(&[
        "role",
        "add",
        "team-a",
        "--principal",
        &principal,
        "--paths",
        "prod/team-a/*",
        "--workloads",
        "a-*",
        "--verbs",
        "read,refresh",
    ]);
    bao.ok(&["kv", "put", "secret/team-a/x", "value=a2"]);
    bao.ok(&["kv", "put", "secret/team-b/db", "value=b2"]);
    let o = cli_as(&b.workload_socket(), &["refresh", "--json"], None, Some(F_TEAM));
    assert!(o.status.success(), "{}", stderr(&o));
    let r = json(&o.stdout);
    eprintln!("scoped refresh: {r}");
    let changed = r[0]["changed"].as_array().unwrap();
    assert!(changed.iter().any(|p| p == "prod/team-a/x"), "{r}");
    assert!(!changed.iter().any(|p| p == "prod/team-b/db"), "a scoped refresh named team b's secret: {r}");
    // A full admin still sees every change.
    bao.ok(&["kv", "put", "secret/team-b/db", "value=b3"]);
    let all = json(&b.ok(&["refresh", "--json"]));
    assert!(all[0]["changed"].as_array().unwrap().iter().any(|p| p == "prod/team-b/db"), "{all}");
}
