//! A real OpenBao cluster for the tests and the benchmark: three nodes
//! (or more) with integrated (raft) storage on loopback ports, each a
//! `bao server -config` of its own, joined by `retry_join`, initialized
//! with one key share, unsealed, all voters, with a KV v2 mount at
//! `secret/` served by every node. Stopped (kill -9) on drop.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One node: its API address and process (None once killed).
pub struct Node {
    pub addr: String,
    child: Option<Child>,
    config: PathBuf,
}

pub struct BaoCluster {
    pub nodes: Vec<Node>,
    pub dir: tempfile::TempDir,
    root: String,
    unseal_key: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One plain HTTP/1.0 GET: (status, body), or None if nothing answered
/// within 2 s.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let host = addr.trim_start_matches("http://");
    let sock: std::net::SocketAddr = host.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_owned());
    Some((status, body))
}

fn wait(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "bao cluster: not within {secs}s: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl BaoCluster {
    /// Start `n` nodes and wait until the cluster serves KV v2 from every
    /// node, all of them raft voters.
    pub fn start(n: usize) -> BaoCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let joins: String = ports
            .iter()
            .map(|(api, _)| format!("  retry_join {{\n    leader_api_addr = \"http://127.0.0.1:{api}\"\n  }}\n"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (api, cluster)) in ports.iter().enumerate() {
            let data = dir.path().join(format!("n{i}"));
            fs::create_dir_all(&data).unwrap();
            // performance_multiplier = 1: raft's tightest timeouts (elections
            // in about a second), as on a fast LAN.
            let hcl = format!(
                "storage \"raft\" {{\n  path = \"{}\"\n  node_id = \"n{i}\"\n  performance_multiplier = 1\n{joins}}}\n\
                 listener \"tcp\" {{\n  address = \"127.0.0.1:{api}\"\n  cluster_address = \"127.0.0.1:{cluster}\"\n  tls_disable = true\n}}\n\
                 api_addr = \"http://127.0.0.1:{api}\"\ncluster_addr = \"http://127.0.0.1:{cluster}\"\n\
                 disable_mlock = true\nui = false\nlog_level = \"warn\"\n",
                data.display()
            );
            let config = dir.path().join(format!("n{i}.hcl"));
            fs::write(&config, hcl).unwrap();
            nodes.push(Node { addr: format!("http://127.0.0.1:{api}"), child: None, config });
        }
        let mut c = BaoCluster { nodes, dir, root: String::new(), unseal_key: String::new() };
        for i in 0..n {
            c.spawn(i);
        }
        // `bao status` exits 2 for a sealed (or uninitialized) node that answers.
        for i in 0..n {
            wait(30, "every node answers", || c.cli_at(i, &["status"]).status.code() == Some(2));
        }
        let init = c.cli_at(0, &["operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json"]);
        assert!(init.status.success(), "bao operator init: {}", String::from_utf8_lossy(&init.stderr));
        let init: serde_json::Value = serde_json::from_slice(&init.stdout).unwrap();
        c.root = init["root_token"].as_str().unwrap().to_owned();
        c.unseal_key = init["unseal_keys_b64"][0].as_str().unwrap().to_owned();
        fs::write(c.token_file(), &c.root).unwrap();
        c.unseal(0);
        wait(60, "node 0 active", || c.role(0) == "active");
        // New nodes become voters after the stabilization time: short here.
        c.ok_at(0, &["operator", "raft", "autopilot", "set-config", "-server-stabilization-time=1s"]);
        for i in 1..n {
            // The join happens once a node is unsealed; retry until it took.
            wait(60, "a node joins and unseals", || {
                c.unseal(i);
                c.role(i) == "standby"
            });
        }
        wait(60, "every node a raft voter", || {
            let peers = c.cli_at(0, &["operator", "raft", "list-peers", "-format=json"]);
            let v: serde_json::Value = serde_json::from_slice(&peers.stdout).unwrap_or_default();
            let servers = v["data"]["config"]["servers"].as_array().cloned().unwrap_or_default();
            servers.len() == n && servers.iter().all(|s| s["voter"] == true)
        });
        c.ok_at(0, &["secrets", "enable", "-path=secret", "kv-v2"]);
        c.ok_at(0, &["kv", "put", "secret/cluster/ready", "value=1"]);
        // A standby answers 400 "waiting for the primary to upgrade" until
        // it has applied the new mount.
        for i in 0..n {
            wait(60, "every node serves secret/", || {
                c.cli_at(i, &["kv", "get", "secret/cluster/ready"]).status.success()
            });
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let log =
            fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(format!("n{i}.log"))).unwrap();
        let child = Command::new("bao")
            .arg("server")
            .arg(format!("-config={}", self.nodes[i].config.display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run bao");
        self.nodes[i].child = Some(child);
    }

    fn unseal(&self, i: usize) {
        let _ = self.cli_at(i, &["operator", "unseal", &self.unseal_key]);
    }

    /// The root token, in a file (for a `[[backend]]`'s token_file).
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("root-token")
    }

    /// Every node's address, as a TOML array (for `address = ...`).
    pub fn addresses_toml(&self, order: &[usize]) -> String {
        let a: Vec<String> = order.iter().map(|&i| format!("\"{}\"", self.nodes[i].addr)).collect();
        format!("[{}]", a.join(", "))
    }

    /// `bao` against node `i`, as root.
    pub fn cli_at(&self, i: usize, args: &[&str]) -> Output {
        Command::new("bao")
            .args(args)
            .env("BAO_ADDR", &self.nodes[i].addr)
            .env("BAO_TOKEN", &self.root)
            .env("BAO_CLIENT_TIMEOUT", "5s")
            .output()
            .unwrap()
    }

    pub fn ok_at(&self, i: usize, args: &[&str]) -> String {
        let o = self.cli_at(i, args);
        assert!(o.status.success(), "bao {args:?} at node {i}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }

    /// "active", "standby", "sealed" or "down", from `sys/health`.
    pub fn role(&self, i: usize) -> &'static str {
        let Some((_, body)) = http_get(&self.nodes[i].addr, "/v1/sys/health?standbyok=true") else { return "down" };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        match (v["sealed"].as_bool(), v["standby"].as_bool()) {
            (Some(false), Some(false)) => "active",
            (Some(false), Some(true)) => "standby",
            (Some(true), _) => "sealed",
            _ => "down",
        }
    }

    /// The active node, if one is.
    pub fn active(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| self.nodes[i].child.is_some() && self.role(i) == "active")
    }

    /// kill -9 node `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The node's log (warnings and errors).
    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(self.dir.path().join(format!("n{i}.log"))).unwrap_or_default()
    }
}

impl Drop for BaoCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
    }
}
