//! keyhole on a real 3-node OpenBao cluster (raft storage, loopback
//! ports): several addresses in one `[[backend]]`, read-your-writes
//! through a standby, and the active node killed with -9 while a
//! container reads and an admin writes.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const APP: u32 = 1000;

fn backend_toml(c: &BaoCluster, order: &[usize], poll: &str) -> String {
    format!(
        "[[backend]]\nname = \"prod\"\nkind = \"vault\"\naddress = {}\ntoken_file = \"{}\"\npoll_interval = \"{poll}\"\nrequest_timeout = \"2s\"\n",
        c.addresses_toml(order),
        c.token_file().display()
    )
}

fn read_as_app(b: &Broker, file: &str) -> Option<Vec<u8>> {
    let o = run_as(APP, &["cat", b.mount("app").join(file).to_str().unwrap()]);
    o.status.success().then_some(o.stdout)
}

fn status(b: &Broker) -> serde_json::Value {
    json(&b.ok(&["status", "--json"]))["backends"][0].clone()
}

fn put(b: &Broker, path: &str, value: &str) -> std::process::Output {
    b.cli_in(&["secret", "put", path, "--stdin"], Some(value.as_bytes()))
}

#[test]
fn writes_through_a_standby_carry_read_your_writes_headers() {
    needs!(bao);
    let c = BaoCluster::start(3);
    let active = c.active().expect("an active node");
    let standby = (0..3).find(|&i| i != active).unwrap();
    c.ok_at(active, &["kv", "put", "secret/ryw/pw", "value=v0"]);
    // A write made outside keyhole carries no index keyhole could wait
    // for: the standby must have it before keyhole's first read.
    eventually(10, "the standby has v0", || {
        let o = c.cli_at(standby, &["kv", "get", "-field=value", "secret/ryw/pw"]);
        o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "v0"
    });
    // The standby first: every request goes to it, writes are forwarded.
    let b = Broker::start_with(&backend_toml(&c, &[standby, active], "1h"));
    // Back-to-back check-and-set writes: each reads the version the last
    // one wrote. A standby a few ms behind answers the old version unless
    // told the index to wait for; the write then fails with a false
    // conflict ("check-and-set parameter did not match").
    for k in 1..=20 {
        let o = put(&b, "prod/ryw/pw", &format!("v{k}"));
        assert!(o.status.success(), "write {k} through a standby: {}", stderr(&o));
    }
    let s = status(&b);
    assert_eq!(s["address"], c.nodes[standby].addr, "{s}");
    assert_eq!(s["node_switches"], 0, "{s}");
    assert_eq!(s["addresses"].as_array().unwrap().len(), 2, "{s}");
    let v = c.ok_at(active, &["kv", "get", "-field=value", "secret/ryw/pw"]);
    assert_eq!(v.trim(), "v20");
    let text = String::from_utf8(b.ok(&["status"])).unwrap();
    assert!(text.contains("cluster: node 1 of 2 in use"), "{text}");
}

#[test]
fn the_active_node_killed_mounts_keep_serving_and_writes_resume() {
    needs!(bao);
    let mut c = BaoCluster::start(3);
    let active = c.active().expect("an active node");
    c.ok_at(active, &["kv", "put", "secret/ha/db", "value=db-1"]);
    c.ok_at(active, &["kv", "put", "secret/ha/api", "value=api-1"]);
    // The active node first in the list, as an operator would write it.
    let mut order = vec![active];
    order.extend((0..3).filter(|&i| i != active));
    let b = Broker::start_with(&backend_toml(&c, &order, "300ms"));
    b.ok(&["workload", "add", "app", "--selector", &format!("unix:uid:{APP}")]);
    b.ok(&["grant", "prod/ha/*", "--to", "app", "--mode", "0444"]);
    assert_eq!(read_as_app(&b, "db").unwrap(), b"db-1");
    assert!(put(&b, "prod/ha/api", "api-2").status.success());

    // A container's reader: one read every 20 ms, each logged.
    let file = b.mount("app").join("db");
    let reads = b.dir.path().join("reads.log");
    std::fs::File::create(&reads).unwrap();
    std::fs::set_permissions(&reads, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let script = format!(
        "while :; do if v=$(cat {f} 2>/dev/null); then echo \"ok $v\"; else echo fail; fi; sleep 0.02; done >> {r}",
        f = file.display(),
        r = reads.display()
    );
    let mut reader = Command::new("sh").args(["-c", &script]).uid(APP).gid(APP).stdin(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(1));

    let killed_at = Instant::now();
    c.kill9(active);
    // The cluster's own election: until another node says it is active.
    let mut elected = None;
    let mut first_write = None;
    let mut attempts = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while first_write.is_none() && Instant::now() < deadline {
        if elected.is_none() && c.active().is_some() {
            elected = Some(killed_at.elapsed());
        }
        attempts += 1;
        let o = put(&b, "prod/ha/api", &format!("api-after-{attempts}"));
        if o.status.success() {
            first_write = Some(killed_at.elapsed());
        } else {
            // A failed write says why, in one line, and changes nothing.
            assert!(stderr(&o).contains("unavailable"), "{}", stderr(&o));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let first_write = first_write.expect("a write through keyhole succeeds after the failover");
    while elected.is_none() && Instant::now() < deadline {
        if c.active().is_some() {
            elected = Some(killed_at.elapsed());
        }
    }
    let elected = elected.expect("the cluster elects a new active node");
    let new_active = c.active().unwrap();
    assert_ne!(new_active, active);
    // Change detection resumes on the new leader.
    let t = Instant::now();
    c.ok_at(new_active, &["kv", "put", "secret/ha/db", "value=db-2"]);
    eventually(10, "a bao write to the new leader shows in the mount", || {
        read_as_app(&b, "db").as_deref() == Some(b"db-2")
    });
    let propagated = t.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let _ = reader.kill();
    let _ = reader.wait();

    let log = std::fs::read_to_string(&reads).unwrap();
    let ok = log.lines().filter(|l| l.starts_with("ok ")).count();
    let failed = log.lines().filter(|l| *l == "fail").count();
    println!(
        "cluster failover: election {:.2} s, first successful write through keyhole {:.2} s after kill -9 \
         ({attempts} attempt(s)), seconds without a successful write {:.2}, bao write to the new leader in the \
         mount after {:.2} s, reads {ok} ok / {failed} failed",
        elected.as_secs_f64(),
        first_write.as_secs_f64(),
        first_write.as_secs_f64(),
        propagated.as_secs_f64()
    );
    assert_eq!(failed, 0, "reads failed during the failover:\n{log}");
    assert!(ok > 50, "the reader read {ok} times");
    assert!(log.lines().all(|l| l == "ok db-1" || l == "ok db-2" || l == "fail"), "{log}");
    // Within the election plus one retry (the loop retries every 200 ms;
    // a request that timed out on the dead node costs request_timeout).
    assert!(
        first_write <= elected + Duration::from_secs(3),
        "the first write succeeded {first_write:?} after the kill, the election took {elected:?}"
    );
    let s = status(&b);
    assert_ne!(s["address"], c.nodes[active].addr, "{s}");
    assert!(s["node_switches"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(s["state"], "ok", "{s}");
    assert!(b.log().contains("now using another node of the cluster"));
    // doctor names the dead node.
    let cfg = b.config.clone().unwrap();
    let o = Command::new(BIN).args(["doctor", "--config", cfg.to_str().unwrap()]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains(&format!("{} does not answer", c.nodes[active].addr)), "{out}");
    b.assert_never_leaked(&[b"db-1", b"db-2", b"api-2"]);
    let _ = std::io::stdout().flush();
}

#[test]
fn a_node_that_does_not_answer_is_passed_over_and_status_says_so() {
    needs!(bao);
    let bao = Bao::start();
    bao.ok(&["kv", "put", "secret/dead/pw", "value=alive-1"]);
    // Nothing listens on the first address.
    let dead = format!("http://{}", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap());
    let toml = format!(
        "[[backend]]\nname = \"prod\"\nkind = \"vault\"\naddress = [\"{dead}\", \"{}\"]\ntoken_file = \"{}\"\npoll_interval = \"300ms\"\n",
        bao.addr,
        bao.token_file().display()
    );
    let b = Broker::start_with(&toml);
    b.ok(&["workload", "add", "app", "--selector", &format!("unix:uid:{APP}")]);
    b.ok(&["grant", "prod/dead/pw", "--to", "app", "--mode", "0444"]);
    assert_eq!(read_as_app(&b, "pw").unwrap(), b"alive-1");
    assert!(put(&b, "prod/dead/pw", "alive-2").status.success());
    let s = status(&b);
    assert_eq!((s["address"].as_str(), s["node_switches"].as_u64()), (Some(bao.addr.as_str()), Some(1)), "{s}");
    assert_eq!(s["state"], "ok", "{s}");
    // Every node down: the backend is unavailable, the mount keeps its value.
    let mut bao = bao;
    bao.stop();
    let o = put(&b, "prod/dead/pw", "alive-3");
    assert_fails(&o, 5, "unavailable");
    assert_eq!(read_as_app(&b, "pw").unwrap(), b"alive-2");
    // A list of no address, or a bad one, is refused at start.
    for bad in ["[]", "[\"http://a:1\", \"ftp://b\"]", "[\"http://a:1\", \"http://a:1/\"]"] {
        let cfg = b.dir.path().join("bad.toml");
        std::fs::write(
            &cfg,
            format!("[[backend]]\nname = \"prod\"\nkind = \"vault\"\naddress = {bad}\ntoken_file = \"/nonexistent\"\n"),
        )
        .unwrap();
        let o = Command::new(BIN).args(["doctor", "--config", cfg.to_str().unwrap()]).output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && out.contains("address"), "{bad}: {out}");
    }
}
