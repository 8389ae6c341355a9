//! keyhole's benchmarks, side by side in one run, as root:
//!
//!   cargo bench --bench keyhole              # the full run (BENCHMARKS.md)
//!   cargo bench --bench keyhole -- --short   # a quick smoke run (CI)
//!   cargo bench --bench keyhole -- --json    # the same figures as JSON
//!   ... -- --only=read_path --save=out.json  # one section; the JSON kept too
//!   KEYHOLE_BENCH_BIN=/path/to/keyhole ...   # brokers run that binary
//!
//! Read path: open+read+close of a 64-byte file on tmpfs, on a no-op FUSE
//! filesystem served exactly like keyhole's mounts (same mount options,
//! request threads, TTLs and keep-cache), and through a keyhole mount
//! (identity check and audit on, then audit of reads off). Then rotation
//! and revocation propagation and scale at 1, 100 and 1,000 mounts, the
//! Vault/OpenBao backend, and the outage window of `kill -9` and of a
//! takeover. Real parts only: a real `keyhole serve` driven through its
//! CLI and gRPC API, real FUSE mounts, a real OpenBao dev server.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{FsOptions, OpenOptions as FuseOpen, stat64};
use fuse_backend_rs::api::filesystem::{Context, Entry, FileSystem, ZeroCopyWriter};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::FuseSession;
use keyhole::api::pb::{self, admin_client::AdminClient};
use serde_json::{Value, json};

/// A broker to configure, running `KEYHOLE_BENCH_BIN serve` if that is
/// set (to compare two builds side by side in one session), else the
/// `keyhole` cargo built. Every broker the bench starts is made here.
fn builder() -> harness::BrokerBuilder {
    match std::env::var_os("KEYHOLE_BENCH_BIN") {
        Some(bin) => Broker::builder().bin(Path::new(&bin)),
        None => Broker::builder(),
    }
}

const VALUE: &[u8; 64] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

struct Opts {
    short: bool,
    json: bool,
    /// `--mounts=1,100`: the scale table's rows instead of the mode's.
    mounts: Option<Vec<usize>>,
    /// `--fleet[=N]`: run the fleet section with N brokers (default 20).
    fleet: Option<usize>,
    /// `--cluster` (with `--fleet`): the N brokers on a 3-node OpenBao
    /// cluster instead, its active node killed.
    cluster: bool,
}

/// One part of the run; its figures go in the report under its name.
type Section = fn(&Opts) -> Value;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mounts = args.iter().find_map(|a| a.strip_prefix("--mounts=")).map(|l| {
        l.split(',').map(|n| n.parse().unwrap_or_else(|_| panic!("--mounts={l}: a list of numbers"))).collect()
    });
    let fleet_n = args.iter().find_map(|a| {
        (a == "--fleet").then_some(20).or_else(|| a.strip_prefix("--fleet=").map(|n| n.parse().expect("--fleet=N")))
    });
    let opts = Opts {
        short: args.iter().any(|a| a == "--short"),
        json: args.iter().any(|a| a == "--json"),
        mounts,
        fleet: fleet_n,
        cluster: args.iter().any(|a| a == "--cluster"),
    };
    let only: Vec<&str> = args.iter().filter_map(|a| a.strip_prefix("--only=")).collect();
    let save = args.iter().find_map(|a| a.strip_prefix("--save="));
    let known = |a: &String| {
        ["--short", "--json", "--bench", "--fleet", "--cluster"].contains(&a.as_str())
            || ["--only=", "--save=", "--mounts=", "--fleet="].iter().any(|p| a.starts_with(p))
    };
    if let Some(bad) = args.iter().find(|a| !known(a)) {
        eprintln!(
            "usage: cargo bench --bench keyhole -- [--short] [--json] [--only=SECTION]... [--save=FILE.json] \
             [--mounts=1,100,...] [--fleet[=N] [--cluster]]   (env KEYHOLE_BENCH_BIN: the keyhole to run; unknown: {bad})"
        );
        std::process::exit(2);
    }
    if !is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("the benchmarks mount FUSE filesystems and tmpfs: run them as root on a host with /dev/fuse");
        std::process::exit(1);
    }
    let mut report = BTreeMap::new();
    report.insert("machine".to_owned(), machine());
    report.insert("mode".to_owned(), json!(if opts.short { "short" } else { "full" }));
    let sections: [(&str, Section); 8] = [
        ("read_path", read_path),
        ("propagation_and_scale", propagation_and_scale),
        ("backend", backend),
        ("outage", outage),
        ("audit", audit_cost),
        ("apply", apply_policy),
        ("template", template_cost),
        ("lease", lease_cost),
    ];
    for (name, f) in sections {
        if !only.is_empty() && !only.contains(&name) || opts.fleet.is_some() && !only.contains(&name) {
            continue;
        }
        eprintln!("== {name}");
        report.insert(name.to_owned(), f(&opts));
    }
    // Only when asked for: N brokers and one OpenBao.
    if opts.fleet.is_some() && opts.cluster {
        eprintln!("== fleet_cluster");
        report.insert("fleet_cluster".to_owned(), fleet_cluster(&opts));
    } else if opts.fleet.is_some() {
        eprintln!("== fleet");
        report.insert("fleet".to_owned(), fleet(&opts));
    }
    let text = serde_json::to_string_pretty(&report).unwrap();
    if let Some(path) = save {
        std::fs::write(path, &text).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
    }
    if opts.json {
        println!("{text}");
    } else {
        print_tables(&report);
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").and_then(|v| v.trim().trim_end_matches(" kB").parse().ok()))
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": cpu,
        "memory_gib": mem_kib / (1 << 20),
        "kernel": kernel,
        "keyhole": env!("CARGO_PKG_VERSION"),
    })
}

// ---------------------------------------------------------------- figures

/// Latencies in nanoseconds → p50/p99 in µs.
fn percentiles(mut ns: Vec<u64>) -> (f64, f64) {
    if ns.is_empty() {
        return (0.0, 0.0);
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0;
    (at(0.50), at(0.99))
}

/// open+read+close of `file` by `threads` threads, `iters` each (after a
/// warm-up): p50/p99 per operation and operations per second in total.
fn read_loop(file: &Path, threads: usize, iters: usize) -> Value {
    let (lat, secs) = read_latencies(file, threads, iters);
    latency_row(threads, lat, secs)
}

/// `threads` readers each open+read+close `file` `iters` times (after a
/// warm-up): every latency in ns, and the seconds it all took.
fn read_latencies(file: &Path, threads: usize, iters: usize) -> (Vec<u64>, f64) {
    for _ in 0..200 {
        read_once(file).expect("warm-up read");
    }
    let start = Instant::now();
    let lat: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut lat = Vec::with_capacity(iters);
                    for _ in 0..iters {
                        let t = Instant::now();
                        read_once(file).expect("read");
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                    lat
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    (lat, start.elapsed().as_secs_f64())
}

fn latency_row(threads: usize, lat: Vec<u64>, secs: f64) -> Value {
    let n = lat.len();
    let (p50, p99) = percentiles(lat);
    json!({ "threads": threads, "p50_us": p50, "p99_us": p99, "ops_per_s": (n as f64 / secs).round() })
}

fn read_once(file: &Path) -> io::Result<usize> {
    let mut buf = [0u8; 128];
    File::open(file)?.read(&mut buf)
}

// ---------------------------------------------------------------- tmpfs

struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new() -> Tmpfs {
        let d = tempfile::tempdir().unwrap();
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "bench"]).arg(d.path()).status().unwrap();
        assert!(st.success(), "mount -t tmpfs failed");
        std::fs::write(d.path().join("key"), VALUE).unwrap();
        Tmpfs(d)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = keyhole::sys::umount_detach(self.0.path());
    }
}

// ---------------------------------------------------------------- the no-op FUSE floor

/// One 64-byte file, `key`, served with keyhole's settings and nothing
/// else: no identity check, no audit, no view lookups.
struct Noop;

const NOOP_TTL: Duration = Duration::from_secs(10);

fn noop_attr(ino: u64) -> stat64 {
    let mut st = keyhole::sys::zeroed_stat();
    st.st_ino = ino;
    if ino == 1 {
        st.st_mode = libc::S_IFDIR | 0o555;
        st.st_nlink = 2;
    } else {
        st.st_mode = libc::S_IFREG | 0o444;
        st.st_nlink = 1;
        st.st_size = VALUE.len() as i64;
    }
    st
}

impl FileSystem for Noop {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, _capable: FsOptions) -> io::Result<FsOptions> {
        Ok(FsOptions::empty())
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        if parent != 1 || name.to_bytes() != b"key" {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(Entry {
            inode: 2,
            generation: 0,
            attr: noop_attr(2),
            attr_flags: 0,
            attr_timeout: NOOP_TTL,
            entry_timeout: NOOP_TTL,
        })
    }

    fn getattr(&self, _ctx: &Context, ino: u64, _h: Option<u64>) -> io::Result<(stat64, Duration)> {
        Ok((noop_attr(ino), NOOP_TTL))
    }

    fn open(
        &self,
        _ctx: &Context,
        _ino: u64,
        _flags: u32,
        _ff: u32,
    ) -> io::Result<(Option<u64>, FuseOpen, Option<u32>)> {
        Ok((Some(1), FuseOpen::KEEP_CACHE, None))
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _ctx: &Context,
        _ino: u64,
        _h: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lo: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let start = (offset as usize).min(VALUE.len());
        let end = start.saturating_add(size as usize).min(VALUE.len());
        w.write_all(&VALUE[start..end])?;
        Ok(end - start)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(&self, _: &Context, _: u64, _: u32, _: u64, _: bool, _: bool, _: Option<u64>) -> io::Result<()> {
        Ok(())
    }
}

struct NoopMount {
    dir: tempfile::TempDir,
    session: FuseSession,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl NoopMount {
    /// Mounted like keyhole's (keyhole::sys::fuse_mount: read-only, nosuid,
    /// nodev, noexec, allow_other), served by the
    /// same number of request threads (2).
    fn new() -> NoopMount {
        let dir = tempfile::tempdir().unwrap();
        let mut session = FuseSession::new(dir.path(), "keyhole-noop", "noop", true).unwrap();
        let dev = OpenOptions::new().read(true).write(true).open("/dev/fuse").unwrap();
        keyhole::sys::fuse_mount(dir.path(), dev.as_raw_fd(), 128 * 1024).unwrap();
        keyhole::sys::set_nonblocking(&dev).unwrap();
        session.set_fuse_file(dev);
        let server = Arc::new(Server::new(Arc::new(Noop)));
        let threads = (0..2)
            .map(|_| {
                let mut ch = session.new_channel().unwrap();
                let server = server.clone();
                std::thread::spawn(move || {
                    while let Ok(Some((r, w))) = ch.get_request() {
                        let _ = server.handle_message(r, w.into(), None, None);
                    }
                })
            })
            .collect();
        NoopMount { dir, session, threads }
    }
}

impl Drop for NoopMount {
    fn drop(&mut self) {
        let _ = self.session.wake();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = keyhole::sys::umount_detach(self.dir.path());
    }
}

// ---------------------------------------------------------------- a real broker

// The broker, OpenBao and `eventually` are the integration tests' too.
#[path = "../tests/harness/mod.rs"]
mod harness;
use harness::cluster::BaoCluster;
use harness::{Bao, Broker};

/// What only the benchmark asks of a broker.
impl Broker {
    fn file(&self, workload: &str, name: &str) -> PathBuf {
        self.run().join("workloads").join(workload).join(name)
    }

    /// The broker's threads.
    fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid())).map_or(0, Iterator::count)
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches(" kB").parse().ok()))
            .unwrap_or(0)
    }
}

/// A broker with `bench/key` (64 bytes) granted to workload `w` (uid 0).
fn broker_with_one_mount(toml: &str) -> Broker {
    let b = builder().config(toml).quiet().start();
    b.put("bench/key", VALUE);
    b.ok(&["workload", "add", "w", "--selector", "unix:uid:0"]);
    b.ok(&["grant", "bench/key", "--to", "w", "--file", "key"]);
    b
}

// ---------------------------------------------------------------- sections

fn read_path(o: &Opts) -> Value {
    let iters = if o.short { 2_000 } else { 5_000 };
    // The floor itself moves by 2x between runs minutes apart on a shared
    // VM, and by 1.3x between runs a second apart: the no-op mount and
    // keyhole take many short turns (which goes first alternates), and
    // each side's figures are of all its turns' opens together.
    let rounds = if o.short { 1 } else { 20 };
    let tmpfs = Tmpfs::new();
    let noop = NoopMount::new();
    let b = broker_with_one_mount("");
    let (noop_file, keyhole_file) = (noop.dir.path().join("key"), b.file("w", "key"));
    let mut rows = Vec::new();
    for threads in [1, 2, 4] {
        let mut row = serde_json::Map::new();
        row.insert("threads".into(), json!(threads));
        eprintln!("   tmpfs, {threads} reader(s)");
        row.insert("tmpfs".into(), read_loop(&tmpfs.0.path().join("key"), threads, iters * 4 / threads));
        eprintln!("   no-op FUSE and keyhole, {threads} reader(s), {rounds} turns each");
        let (mut floor, mut ours) = ((Vec::new(), 0.0), (Vec::new(), 0.0));
        let mut ratios = Vec::new();
        for round in 0..rounds {
            let turn = |file: &Path, into: &mut (Vec<u64>, f64)| {
                let (lat, secs) = read_latencies(file, threads, iters / threads);
                let (p50, _) = percentiles(lat.clone());
                into.0.extend(lat);
                into.1 += secs;
                p50
            };
            let (f, k) = if round % 2 == 0 {
                let f = turn(&noop_file, &mut floor);
                (f, turn(&keyhole_file, &mut ours))
            } else {
                let k = turn(&keyhole_file, &mut ours);
                (turn(&noop_file, &mut floor), k)
            };
            ratios.push(ratio(k, f));
        }
        row.insert("noop_fuse".into(), latency_row(threads, floor.0, floor.1));
        row.insert("keyhole".into(), latency_row(threads, ours.0, ours.1));
        let p50 = |n: &str| row[n]["p50_us"].as_f64().unwrap();
        let (vs_floor, vs_tmpfs) = (ratio(p50("keyhole"), p50("noop_fuse")), ratio(p50("keyhole"), p50("tmpfs")));
        row.insert("keyhole_vs_floor_p50".into(), json!(vs_floor));
        row.insert("keyhole_vs_floor_p50_rounds".into(), json!(ratios));
        row.insert("keyhole_vs_tmpfs_p50".into(), json!(vs_tmpfs));
        rows.push(Value::Object(row));
    }
    json!({ "iterations": iters, "rounds": rounds, "rows": rows })
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { 0.0 } else { (a / b * 100.0).round() / 100.0 }
}

/// The admin API in-process, so calls are timed without a CLI start.
struct Admin {
    rt: tokio::runtime::Runtime,
    client: AdminClient<tonic::transport::Channel>,
}

impl Admin {
    fn connect(b: &Broker) -> Admin {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let url = format!("unix://{}", b.run().join("admin.sock").display());
        let ch = rt.block_on(tonic::transport::Endpoint::from_shared(url).unwrap().connect()).unwrap();
        Admin { rt, client: AdminClient::new(ch) }
    }

    fn workload(&mut self, name: &str) {
        let spec = pb::WorkloadSpec { name: name.into(), selectors: vec!["unix:uid:0".into()] };
        self.rt.block_on(self.client.add_workload(spec)).unwrap();
    }

    fn grant(&mut self, secret: &str, workload: &str) {
        self.grant_as(secret, workload, "key");
    }

    fn grant_as(&mut self, secret: &str, workload: &str, file: &str) {
        let spec =
            pb::GrantSpec { secret: secret.into(), workload: workload.into(), file: file.into(), ..Default::default() };
        self.rt.block_on(self.client.grant(spec)).unwrap();
    }

    /// How long the call took.
    fn rotate(&mut self, path: &str, value: &[u8]) -> Duration {
        let req = pb::PutSecretRequest {
            path: path.into(),
            mode: pb::PutMode::Rotate as i32,
            source: Some(pb::put_secret_request::Source::Value(value.to_vec())),
            if_version: None,
        };
        let t = Instant::now();
        self.rt.block_on(self.client.put_secret(req)).unwrap();
        t.elapsed()
    }

    fn revoke(&mut self, secret: &str, workload: &str) -> Duration {
        let req = pb::RevokeRequest { secret: secret.into(), workload: workload.into() };
        let t = Instant::now();
        self.rt.block_on(self.client.revoke(req)).unwrap();
        t.elapsed()
    }
}

/// Rotation of a secret every mount shows and of one only one mount
/// shows, revocation of one, mount creation, open latency, threads and
/// RSS, as the number of mounts grows to 1, 100, 1,000 and 10,000 (full
/// mode; `--mounts=` picks other sizes).
fn propagation_and_scale(o: &Opts) -> Value {
    let steps: Vec<usize> =
        o.mounts.clone().unwrap_or_else(|| if o.short { vec![1, 20] } else { vec![1, 100, 1000, 10_000] });
    let rounds = if o.short { 3 } else { 10 };
    // Each mount holds a /dev/fuse descriptor: room for 10,000 of them.
    let b = builder().config("[limits]\nmax_mounts = 12000\n").quiet().start();
    b.put("bench/rot", b"v-0");
    b.put("bench/one", b"o-0");
    let mut admin = Admin::connect(&b);
    let rss_empty = b.rss_kib();
    let threads_empty = b.threads();
    let mut made = 0;
    let mut rows = Vec::new();
    let mut version = 0;
    let mut create_total = Duration::ZERO;
    for &n in &steps {
        let t = Instant::now();
        for i in made..n {
            admin.workload(&format!("w{i}"));
            admin.grant("bench/rot", &format!("w{i}"));
            if i == 0 {
                admin.grant_as("bench/one", "w0", "one");
            }
        }
        create_total += t.elapsed();
        let per_mount_ms = if n > made { t.elapsed().as_secs_f64() * 1000.0 / (n - made) as f64 } else { 0.0 };
        made = n;
        let files: Vec<PathBuf> = (0..n).map(|i| b.file(&format!("w{i}"), "key")).collect();
        for f in &files {
            read_once(f).expect("mount readable");
        }
        std::thread::sleep(Duration::from_millis(200));
        let rss = b.rss_kib();
        let threads = b.threads();

        // Rotation of the secret every mount shows: the call (the broker
        // updates every mount before it answers), then from its return
        // until each mount's first read shows the new value (4 threads
        // share the mounts).
        let (mut calls, mut seen, mut stale_reads) = (Vec::new(), Vec::new(), 0u64);
        for _ in 0..rounds {
            version += 1;
            let want = format!("v-{version}");
            calls.push(admin.rotate("bench/rot", want.as_bytes()).as_nanos() as u64);
            let (lat, stale) =
                visible_in_all(&files, Instant::now(), |f| std::fs::read(f).is_ok_and(|v| v == want.as_bytes()));
            seen.extend(lat);
            stale_reads += stale;
        }
        let (call_p50, call_p99) = percentiles(calls);
        let (rot_p50, rot_p99) = percentiles(seen);

        // Rotation of a secret only the first mount shows.
        let one = [b.file("w0", "one")];
        let mut ones = Vec::new();
        for _ in 0..rounds.max(20) {
            version += 1;
            let want = format!("o-{version}");
            ones.push(admin.rotate("bench/one", want.as_bytes()).as_nanos() as u64);
            let (_, stale) =
                visible_in_all(&one, Instant::now(), |f| std::fs::read(f).is_ok_and(|v| v == want.as_bytes()));
            stale_reads += stale;
        }
        let (one_p50, one_p99) = percentiles(ones);

        // Revocation of one mount's grant: the call, then until the file is gone.
        let (mut rcalls, mut revoked) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            rcalls.push(admin.revoke("bench/rot", "w0").as_nanos() as u64);
            let (lat, _) = visible_in_all(&files[..1], Instant::now(), |f| !f.exists());
            revoked.extend(lat);
            admin.grant("bench/rot", "w0");
        }
        let (rcall_p50, rcall_p99) = percentiles(rcalls);
        let (rev_p50, rev_p99) = percentiles(revoked);
        let open = read_loop(&files[0], 1, if o.short { 1000 } else { 5000 });
        let ms = |us: f64| (us / 10.0).round() / 100.0;
        rows.push(json!({
            "mounts": n,
            "rotate_all_call_p50_ms": ms(call_p50),
            "rotate_all_call_p99_ms": ms(call_p99),
            "rotate_one_call_p50_ms": ms(one_p50),
            "rotate_one_call_p99_ms": ms(one_p99),
            "rotation_visible_p50_ms": ms(rot_p50),
            "rotation_visible_p99_ms": ms(rot_p99),
            "stale_reads_after_return": stale_reads,
            "revoke_call_p50_ms": ms(rcall_p50),
            "revoke_call_p99_ms": ms(rcall_p99),
            "revocation_visible_p50_ms": ms(rev_p50),
            "revocation_visible_p99_ms": ms(rev_p99),
            "create_per_mount_ms": (per_mount_ms * 100.0).round() / 100.0,
            "create_total_s": (create_total.as_secs_f64() * 100.0).round() / 100.0,
            "threads": threads,
            "rss_kib": rss,
            "rss_per_mount_kib": (rss.saturating_sub(rss_empty)) / n as u64,
            "open_p50_us": open["p50_us"],
            "open_p99_us": open["p99_us"],
        }));
        eprintln!("   {n} mounts");
    }
    json!({ "rounds": rounds, "rss_no_mounts_kib": rss_empty, "threads_no_mounts": threads_empty, "rows": rows })
}

/// For each file, ns from `since` until `ok(file)` first holds, checked
/// by 4 threads that each sweep their share of the files; also how many
/// checks failed first (0: every mount showed the new state at once).
fn visible_in_all(files: &[PathBuf], since: Instant, ok: impl Fn(&Path) -> bool + Sync) -> (Vec<u64>, u64) {
    let threads = 4.min(files.len());
    let chunk = files.len().div_ceil(threads);
    std::thread::scope(|s| {
        let hs: Vec<_> = files
            .chunks(chunk)
            .map(|part| {
                let ok = &ok;
                s.spawn(move || {
                    let mut lat = Vec::with_capacity(part.len());
                    let mut misses = 0;
                    for f in part {
                        while !ok(f) {
                            misses += 1;
                            assert!(since.elapsed() < Duration::from_secs(30), "{} never changed", f.display());
                        }
                        lat.push(since.elapsed().as_nanos() as u64);
                    }
                    (lat, misses)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).fold((Vec::new(), 0), |(mut l, m), (l2, m2)| {
            l.extend(l2);
            (l, m + m2)
        })
    })
}

/// What only the benchmark asks of OpenBao.
impl Bao {
    /// One direct KV v2 read over HTTP/1.1, the way any client would.
    fn direct_get(&self, path: &str) -> Duration {
        let host = self.addr.trim_start_matches("http://");
        let t = Instant::now();
        let mut s = std::net::TcpStream::connect(host).unwrap();
        write!(
            s,
            "GET /v1/secret/data/{path} HTTP/1.1\r\nHost: {host}\r\nX-Vault-Token: root\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = Vec::new();
        s.read_to_end(&mut body).unwrap();
        let d = t.elapsed();
        assert!(body.starts_with(b"HTTP/1.1 200"), "direct GET failed");
        d
    }
}

fn backend(o: &Opts) -> Value {
    let Ok(bao) = Bao::try_start() else {
        if std::env::var_os("CI").is_some() {
            panic!("bao (OpenBao) is missing: scripts/test.sh installs it");
        }
        return json!({ "skipped": "bao (OpenBao) not found; scripts/test.sh installs it" });
    };
    let watched = if o.short { 10 } else { 100 };
    for i in 0..watched {
        let o = bao.cli(&["kv", "put", &format!("secret/bench{i}"), &format!("value=v{i}")]);
        assert!(o.status.success(), "bao kv put: {}", String::from_utf8_lossy(&o.stderr));
    }
    let toml = format!(
        "[[backend]]\nname = \"vault\"\nkind = \"vault\"\naddress = \"{}\"\ntoken_file = \"{}\"\npoll_interval = \"1s\"\n",
        bao.addr,
        bao.dir.path().join("token").display()
    );
    let b = builder().config(&toml).quiet().start();
    b.ok(&["workload", "add", "w", "--selector", "unix:uid:0"]);
    for i in 0..watched {
        b.ok(&["grant", &format!("vault/bench{i}"), "--to", "w", "--file", &format!("k{i}")]);
    }
    let file = b.file("w", "k0");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read(&file).ok().as_deref() != Some(b"v0") {
        assert!(Instant::now() < deadline, "the Vault secret never reached the mount");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Warm reads: no data request reaches the backend.
    let before = bao.requests("secret/data/");
    let warm = read_loop(&file, 1, if o.short { 1000 } else { 10_000 });
    let data_requests = bao.requests("secret/data/") - before;

    // Poll load: every request the broker makes of the backend while
    // nothing changes (directory listings, metadata and data reads, token
    // and health calls), per second, for `watched` secrets.
    let kinds = ["", "secret/detailed-metadata/", "secret/metadata/"];
    let (c0, t0) = (kinds.map(|k| bao.requests(k)), Instant::now());
    std::thread::sleep(Duration::from_secs(if o.short { 3 } else { 10 }));
    let secs = t0.elapsed().as_secs_f64();
    let [polls, listings, metadata] = {
        let mut i = 0;
        kinds.map(|k| {
            let rate = (bao.requests(k) - c0[i]) as f64 / secs;
            i += 1;
            (rate * 10.0).round() / 10.0
        })
    };

    // A miss (the admin API reads through to the backend) vs a direct GET.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let n = if o.short { 50 } else { 500 };
    let (miss, local) = rt.block_on(async {
        let sock = b.run().join("admin.sock");
        let ch = tonic::transport::Endpoint::from_shared(format!("unix://{}", sock.display()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = AdminClient::new(ch);
        b.put("bench/local", VALUE);
        let mut time = async |path: &str| {
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                c.get_secret(pb::GetSecretRequest { path: path.into(), version: 0 }).await.unwrap();
                lat.push(t.elapsed().as_nanos() as u64);
            }
            percentiles(lat)
        };
        (time("vault/bench0").await, time("bench/local").await)
    });
    let direct = percentiles((0..n).map(|_| bao.direct_get("bench0").as_nanos() as u64).collect());
    json!({
        "watched_secrets": watched,
        "poll_interval_s": 1,
        "warm_reads": warm,
        "backend_data_requests_during_warm_reads": data_requests,
        "poll_requests_per_s": polls,
        "poll_listings_per_s": listings,
        "poll_metadata_reads_per_s": metadata,
        "miss_via_keyhole_p50_us": miss.0,
        "miss_via_keyhole_p99_us": miss.1,
        "direct_http_get_p50_us": direct.0,
        "direct_http_get_p99_us": direct.1,
        "local_store_get_p50_us": local.0,
        "local_store_get_p99_us": local.1,
    })
}

/// A reader opening the file in a loop; returns (longest gap between two
/// successful reads, failed reads) over what `during` does.
fn reader_during(file: &Path, during: impl FnOnce()) -> (Duration, u64) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let (mut last_ok, mut gap, mut failed) = (Instant::now(), Duration::ZERO, 0u64);
            while !stop.load(Ordering::SeqCst) {
                match read_once(file) {
                    Ok(_) => {
                        gap = gap.max(last_ok.elapsed());
                        last_ok = Instant::now();
                    }
                    Err(_) => failed += 1,
                }
            }
            (gap, failed)
        });
        during();
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::SeqCst);
        h.join().unwrap()
    })
}

fn outage(o: &Opts) -> Value {
    let rounds = if o.short { 2 } else { 5 };
    let mut b = broker_with_one_mount("");
    let file = b.file("w", "key");
    // kill -9, then start again at once (a supervisor with no delay;
    // systemd's RestartSec adds to this).
    let mut crash = Vec::new();
    let mut crash_failed = 0;
    for _ in 0..rounds {
        let (gap, failed) = reader_during(&file, || {
            b.kill9();
            b.restart();
            let deadline = Instant::now() + Duration::from_secs(30);
            while read_once(&file).is_err() {
                assert!(Instant::now() < deadline, "the mount never came back");
            }
        });
        crash.push(gap.as_nanos() as u64);
        crash_failed += failed;
    }
    // Takeover: the longest wait a reader sees, and failed reads (0).
    let mut takeover = Vec::new();
    let mut takeover_failed = 0;
    for _ in 0..rounds {
        let (gap, failed) = reader_during(&file, || {
            b.takeover();
        });
        takeover.push(gap.as_nanos() as u64);
        takeover_failed += failed;
    }
    let ms = |v: &[u64]| v.iter().map(|n| (*n as f64 / 1e4).round() / 100.0).collect::<Vec<_>>();
    json!({
        "rounds": rounds,
        "kill9_restart_window_ms": ms(&crash),
        "kill9_failed_reads": crash_failed,
        "takeover_longest_wait_ms": ms(&takeover),
        "takeover_failed_reads": takeover_failed,
    })
}

fn audit_cost(o: &Opts) -> Value {
    let iters = if o.short { 2_000 } else { 20_000 };
    let on = broker_with_one_mount("");
    let before = on.audit_lines().len();
    let with = read_loop(&on.file("w", "key"), 1, iters);
    // Held reads are summed up within a second.
    std::thread::sleep(Duration::from_millis(1500));
    let lines = on.audit_lines().len() - before;
    drop(on);
    let off = broker_with_one_mount("[audit]\nreads = false\n");
    let without = read_loop(&off.file("w", "key"), 1, iters);
    let p50 = |v: &Value| v["p50_us"].as_f64().unwrap();
    json!({
        "audit_on": with,
        "audit_off": without,
        "on_vs_off_p50": ratio(p50(&with), p50(&without)),
        "reads": iters + 200,
        "audit_lines_for_reads": lines,
    })
}

/// `keyhole apply` of a policy file with N workloads, each with a grant
/// (`--mounts=` picks N; 1,000 by default, 100 in short mode): the call's
/// time (one transaction, one propagation; every mount is there when it
/// returns), and a second apply of the same file (no changes).
fn apply_policy(o: &Opts) -> Value {
    let n = o.mounts.as_ref().and_then(|m| m.iter().max().copied()).unwrap_or(if o.short { 100 } else { 1000 });
    let b = builder().config(&format!("[limits]\nmax_mounts = {}\n", n + 100)).quiet().start();
    b.put("bench/key", VALUE);
    let mut file = String::new();
    for i in 0..n {
        file.push_str(&format!(
            "[[workload]]\nname = \"w{i}\"\nselectors = [\"unix:uid:0\"]\n\n\
             [[grant]]\nsecret = \"bench/key\"\nworkload = \"w{i}\"\nfile = \"key\"\n\n"
        ));
    }
    let path = b.dir.path().join("policy.toml");
    std::fs::write(&path, &file).unwrap();
    let apply = |what: &str| {
        let t = Instant::now();
        let o = b.cli(&["apply", "-f", path.to_str().unwrap()]);
        let took = t.elapsed();
        assert!(o.status.success(), "{what}: {}", String::from_utf8_lossy(&o.stderr));
        took
    };
    let first = apply("apply");
    let present = (0..n).filter(|i| b.file(&format!("w{i}"), "key").exists()).count();
    let again = apply("second apply");
    json!({
        "workloads": n,
        "file_bytes": file.len(),
        "apply_ms": first.as_secs_f64() * 1000.0,
        "mounts_present_at_return": present,
        "second_apply_ms": again.as_secs_f64() * 1000.0,
    })
}

/// Open of a file rendered from a 3-input template against a plain
/// grant, in one mount (the render is made when an input changes, so an
/// open serves bytes already rendered).
fn template_cost(o: &Opts) -> Value {
    let iters = if o.short { 2_000 } else { 20_000 };
    let b = broker_with_one_mount(&std::env::var("RP_TOML").unwrap_or_default());
    for (p, v) in [("bench/user", &b"app"[..]), ("bench/pass", VALUE), ("bench/host", b"db.internal")] {
        let out = b.cli_in(&["secret", "put", p, "--stdin"], Some(v));
        assert!(out.status.success(), "put {p}");
    }
    let t = b"{\"user\": {{ secret('bench/user')|tojson }}, \"password\": {{ secret('bench/pass')|tojson }}, \
              \"host\": {{ secret('bench/host')|tojson }}}\n";
    let out = b.cli_in(&["template", "put", "cfg", "--stdin"], Some(t));
    assert!(out.status.success(), "template put: {}", String::from_utf8_lossy(&out.stderr));
    b.ok(&["grant", "--template", "cfg", "--to", "w", "--file", "config.json"]);
    eprintln!("   plain grant");
    let plain = read_loop(&b.file("w", "key"), 1, iters);
    eprintln!("   3-input template");
    let template = read_loop(&b.file("w", "config.json"), 1, iters);
    // A rotation of one input: the call returns once the file is re-rendered.
    let mut admin = Admin::connect(&b);
    let mut rotate = Vec::new();
    for i in 0..if o.short { 20 } else { 200 } {
        rotate.push(admin.rotate("bench/pass", format!("pw-{i:060}").as_bytes()).as_nanos() as u64);
    }
    let (r50, r99) = percentiles(rotate);
    let p50 = |v: &Value| v["p50_us"].as_f64().unwrap();
    json!({
        "plain": plain,
        "template_3_inputs": template,
        "template_vs_plain_p50": ratio(p50(&template), p50(&plain)),
        "rotate_input_p50_us": r50,
        "rotate_input_p99_us": r99,
    })
}

// ---------------------------------------------------------------- leases

/// A private PostgreSQL 15 cluster (as user `postgres`, in a temp dir,
/// on a free loopback port), stopped on drop.
struct Pg {
    port: u16,
    dir: tempfile::TempDir,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl Pg {
    fn start() -> Option<Pg> {
        if !Path::new(PG_BIN).join("initdb").exists() {
            return None;
        }
        let dir = tempfile::Builder::new().prefix("kh-bench-pg").tempdir().ok()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let run = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
        let data = dir.path().join("data");
        let pg = |tool: &str| {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(Path::new(PG_BIN).join(tool));
            c
        };
        let ok = run(Command::new("chown").arg("postgres:postgres").arg(dir.path()))
            && run(pg("initdb").arg("-D").arg(&data).args(["-U", "postgres", "--auth-local=trust"]))
            && run(pg("pg_ctl").arg("-D").arg(&data).args([
                "-o",
                &format!("-p {port} -k {} -c listen_addresses=127.0.0.1", dir.path().display()),
                "-l",
                dir.path().join("log").to_str()?,
                "-w",
                "start",
            ]));
        let me = Pg { port, dir };
        let sql = Command::new("runuser")
            .args(["-u", "postgres", "--", "psql", "-h"])
            .arg(me.dir.path())
            .args(["-p", &port.to_string(), "-d", "postgres", "-tAc", "ALTER USER postgres PASSWORD 'kh-bench-pw'"])
            .output();
        (ok && sql.is_ok_and(|o| o.status.success())).then_some(me)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// `cat FILE` as host user `uid` (group `gid`): its wall time, process
/// start included.
fn cat_as(uid: u32, gid: u32, file: &Path) -> Duration {
    use std::os::unix::process::CommandExt;
    let t = Instant::now();
    let o = Command::new("cat").arg(file).uid(uid).gid(gid).output().unwrap();
    let d = t.elapsed();
    assert!(o.status.success(), "cat as {uid}: {}", String::from_utf8_lossy(&o.stderr));
    d
}

/// The first open of a `dynamic:` grant by a caller (the broker issues
/// its lease from OpenBao's database engine against a real PostgreSQL:
/// the open is parked until it arrives) against a warm open (the lease
/// is live). Callers are host users (one lease per uid), each read a
/// `cat` process, so both columns include the process start; the warm
/// in-process open+read+close is given too.
fn lease_cost(o: &Opts) -> Value {
    let Ok(bao) = Bao::try_start() else {
        return json!({ "skipped": "bao (OpenBao) not found; scripts/test.sh installs it" });
    };
    let Some(pg) = Pg::start() else {
        return json!({ "skipped": "PostgreSQL 15 not found in /usr/lib/postgresql/15/bin" });
    };
    let ok = |args: &[&str]| {
        let out = bao.cli(args);
        assert!(out.status.success(), "bao {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    ok(&["secrets", "enable", "database"]);
    let url = format!("postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable", pg.port);
    ok(&[
        "write",
        "database/config/pg",
        "plugin_name=postgresql-database-plugin",
        "allowed_roles=*",
        &format!("connection_url={url}"),
        "username=postgres",
        "password=kh-bench-pw",
    ]);
    ok(&[
        "write",
        "database/roles/web",
        "db_name=pg",
        "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
        "default_ttl=1h",
        "max_ttl=24h",
    ]);
    let toml = format!(
        "[[backend]]\nname = \"prod\"\nkind = \"vault\"\naddress = \"{}\"\ntoken_file = \"{}\"\npoll_interval = \"30s\"\n",
        bao.addr,
        bao.dir.path().join("token").display()
    );
    let b = Broker::builder().config(&toml).quiet().start();
    let gid = 4343;
    b.ok(&["dynamic", "add", "db", "--backend", "prod", "--path", "database/creds/web"]);
    b.ok(&["workload", "add", "users", "--selector", &format!("unix:gid:{gid}")]);
    b.ok(&["grant", "dynamic:db", "--to", "users", "--file", "db.json", "--mode", "0440", "--gid", &gid.to_string()]);
    b.ok(&["workload", "add", "w", "--selector", "unix:uid:0"]);
    b.ok(&["grant", "dynamic:db", "--to", "w", "--file", "db.json"]);
    let file = b.file("users", "db.json");
    let callers = if o.short { 10 } else { 50 };
    let mut first = Vec::new();
    let mut warm = Vec::new();
    for i in 0..callers {
        let uid = 31_000 + i;
        first.push(cat_as(uid, gid, &file).as_nanos() as u64);
        for _ in 0..5 {
            warm.push(cat_as(uid, gid, &file).as_nanos() as u64);
        }
    }
    let (f50, f99) = percentiles(first);
    let (w50, w99) = percentiles(warm);
    let in_process = read_loop(&b.file("w", "db.json"), 1, if o.short { 1_000 } else { 10_000 });
    json!({
        "callers": callers,
        "first_open_p50_us": f50,
        "first_open_p99_us": f99,
        "warm_open_p50_us": w50,
        "warm_open_p99_us": w99,
        "issue_cost_p50_us": ((f50 - w50) * 10.0).round() / 10.0,
        "warm_in_process": in_process,
    })
}

// ---------------------------------------------------------------- output

fn print_tables(r: &BTreeMap<String, Value>) {
    let m = &r["machine"];
    println!(
        "keyhole {} benchmarks ({} mode) on {} × {}, {} GiB, Linux {}\n",
        m["keyhole"].as_str().unwrap_or(""),
        r["mode"].as_str().unwrap_or(""),
        m["cpus"],
        m["cpu"].as_str().unwrap_or(""),
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or("")
    );
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
    if let Some(rp) = r.get("read_path") {
        println!(
            "Read path: open+read+close of 64 bytes, p50 / p99 µs, reads/s ({} turns of {} opens each for no-op FUSE and keyhole)",
            rp["rounds"], rp["iterations"]
        );
        println!(
            "{:>7}  {:>22}  {:>22}  {:>22}  {:>8}  {:>8}",
            "readers", "tmpfs", "no-op FUSE", "keyhole", "/floor", "/tmpfs"
        );
        for row in rp["rows"].as_array().into_iter().flatten() {
            let cell = |n: &str| {
                format!(
                    "{} / {} / {:.0}",
                    f(&row[n]["p50_us"]),
                    f(&row[n]["p99_us"]),
                    row[n]["ops_per_s"].as_f64().unwrap_or(0.0)
                )
            };
            println!(
                "{:>7}  {:>22}  {:>22}  {:>22}  {:>8}  {:>8}",
                row["threads"].to_string(),
                cell("tmpfs"),
                cell("noop_fuse"),
                cell("keyhole"),
                format!("{:.2}×", row["keyhole_vs_floor_p50"].as_f64().unwrap_or(0.0)),
                format!("{:.2}×", row["keyhole_vs_tmpfs_p50"].as_f64().unwrap_or(0.0)),
            );
        }
        let each: Vec<String> = rp["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|row| {
                let mut rs: Vec<f64> = row["keyhole_vs_floor_p50_rounds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_f64)
                    .collect();
                rs.sort_by(f64::total_cmp);
                match (rs.first(), rs.get(rs.len() / 2), rs.last()) {
                    (Some(lo), Some(mid), Some(hi)) => format!("{}: {lo:.2} / {mid:.2} / {hi:.2}", row["threads"]),
                    _ => format!("{}: -", row["threads"]),
                }
            })
            .collect();
        println!(
            "  (no-op FUSE and keyhole take turns, which goes first alternating; each column is all its turns' opens; \
             /floor of single turns, min / median / max, by readers: {})",
            each.join("; ")
        );
    }
    if let Some(ps) = r.get("propagation_and_scale") {
        println!("\nPropagation and scale ({} rounds each; call, then ms from its return until seen)", ps["rounds"]);
        println!(
            "{:>6}  {:>13}  {:>13}  {:>13}  {:>5}  {:>13}  {:>13}  {:>9}  {:>7}  {:>7}  {:>7}  {:>13}",
            "mounts",
            "rotate one",
            "rotate all",
            "then visible",
            "stale",
            "revoke call",
            "then gone",
            "create",
            "RSS KiB",
            "KiB/mnt",
            "threads",
            "open µs"
        );
        for row in ps["rows"].as_array().into_iter().flatten() {
            let g = |k: &str| row[k].as_f64().map_or("-".into(), |x| format!("{x:.2}"));
            let pair = |a: &str, b: &str| format!("{} / {}", g(a), g(b));
            println!(
                "{:>6}  {:>13}  {:>13}  {:>13}  {:>5}  {:>13}  {:>13}  {:>9}  {:>7}  {:>7}  {:>7}  {:>13}",
                row["mounts"].to_string(),
                pair("rotate_one_call_p50_ms", "rotate_one_call_p99_ms"),
                pair("rotate_all_call_p50_ms", "rotate_all_call_p99_ms"),
                pair("rotation_visible_p50_ms", "rotation_visible_p99_ms"),
                row["stale_reads_after_return"].to_string(),
                pair("revoke_call_p50_ms", "revoke_call_p99_ms"),
                pair("revocation_visible_p50_ms", "revocation_visible_p99_ms"),
                format!("{} ms", g("create_per_mount_ms")),
                row["rss_kib"].to_string(),
                row["rss_per_mount_kib"].to_string(),
                row["threads"].to_string(),
                format!("{} / {}", f(&row["open_p50_us"]), f(&row["open_p99_us"])),
            );
        }
        println!(
            "  (p50 / p99; times in ms except open; rotate one: a secret one mount shows, all: every mount; \
             broker threads with no mounts: {})",
            ps["threads_no_mounts"]
        );
    }
    if let Some(be) = r.get("backend") {
        println!("\nBackend (OpenBao dev server on loopback)");
        if let Some(why) = be["skipped"].as_str() {
            println!("  skipped: {why}");
        } else {
            println!(
                "  read through OpenBao (miss):  p50 {} µs, p99 {} µs   direct HTTP GET: p50 {} µs, p99 {} µs",
                f(&be["miss_via_keyhole_p50_us"]),
                f(&be["miss_via_keyhole_p99_us"]),
                f(&be["direct_http_get_p50_us"]),
                f(&be["direct_http_get_p99_us"])
            );
            println!(
                "  local store get:              p50 {} µs, p99 {} µs",
                f(&be["local_store_get_p50_us"]),
                f(&be["local_store_get_p99_us"])
            );
            println!(
                "  warm reads through the mount: p50 {} µs; backend data requests during them: {}",
                f(&be["warm_reads"]["p50_us"]),
                be["backend_data_requests_during_warm_reads"]
            );
            println!(
                "  poll load: {} requests/s ({} listings, {} metadata reads) for {} watched secrets at a {} s interval",
                be["poll_requests_per_s"],
                be["poll_listings_per_s"],
                be["poll_metadata_reads_per_s"],
                be["watched_secrets"],
                be["poll_interval_s"]
            );
        }
    }
    if let Some(out) = r.get("outage") {
        println!("\nOutage ({} rounds)", out["rounds"]);
        println!(
            "  kill -9, restarted at once: opens fail for {} ms ({} failed reads in all)",
            out["kill9_restart_window_ms"], out["kill9_failed_reads"]
        );
        println!(
            "  takeover: longest wait of a reader {} ms, {} failed reads",
            out["takeover_longest_wait_ms"], out["takeover_failed_reads"]
        );
    }
    if let Some(a) = r.get("audit") {
        println!(
            "\nAudit cost (1 reader): p50 {} µs with reads audited, {} µs without: {:.2}×; {} reads wrote {} audit lines",
            f(&a["audit_on"]["p50_us"]),
            f(&a["audit_off"]["p50_us"]),
            a["on_vs_off_p50"].as_f64().unwrap_or(0.0),
            a["reads"],
            a["audit_lines_for_reads"]
        );
    }
    if let Some(a) = r.get("apply") {
        println!(
            "\nkeyhole apply: {} workloads with a grant each ({} bytes): {} ms, {} mounts present at return; \
             again (no changes): {} ms",
            a["workloads"],
            a["file_bytes"],
            f(&a["apply_ms"]),
            a["mounts_present_at_return"],
            f(&a["second_apply_ms"])
        );
    }
    if let Some(t) = r.get("template") {
        println!(
            "\nTemplate (1 reader): open+read+close p50 {} µs for a 3-input template, {} µs for a plain grant: \
             {:.2}×; rotating an input (call returns re-rendered) p50 {} µs",
            f(&t["template_3_inputs"]["p50_us"]),
            f(&t["plain"]["p50_us"]),
            t["template_vs_plain_p50"].as_f64().unwrap_or(0.0),
            f(&t["rotate_input_p50_us"])
        );
    }
    if let Some(l) = r.get("lease") {
        if let Some(why) = l["skipped"].as_str() {
            println!("\nLeases: skipped ({why})");
        } else {
            println!(
                "\nLeases (OpenBao database engine, PostgreSQL 15; {} host users, `cat` as each): first open \
                 (lease issued) p50 {} / p99 {} µs, warm open p50 {} / p99 {} µs: issue ≈ {} µs; warm \
                 open+read+close in-process p50 {} µs",
                l["callers"],
                f(&l["first_open_p50_us"]),
                f(&l["first_open_p99_us"]),
                f(&l["warm_open_p50_us"]),
                f(&l["warm_open_p99_us"]),
                f(&l["issue_cost_p50_us"]),
                f(&l["warm_in_process"]["p50_us"])
            );
        }
    }
}

/// Write many KV v2 secrets over plain HTTP (no CLI start-up each).
fn bao_put_many(bao: &Bao, items: &[(String, String)]) {
    let host = bao.addr.trim_start_matches("http://").to_owned();
    for (path, value) in items {
        let body = format!("{{\"data\":{{\"value\":\"{value}\"}}}}");
        let mut s = std::net::TcpStream::connect(&host).unwrap();
        write!(
            s,
            "POST /v1/secret/data/{path} HTTP/1.1\r\nHost: {host}\r\nX-Vault-Token: root\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
    }
}

/// The audit device's requests by token display name `token-<prefix>*`:
/// (display name, HH:MM:SS) of each.
fn audited_requests(bao: &Bao, prefix: &str) -> Vec<(String, String)> {
    let log = std::fs::read_to_string(bao.dir.path().join("audit.log")).unwrap_or_default();
    let want = format!("token-{prefix}");
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "request")
        .filter_map(|v| {
            let who = v["auth"]["display_name"].as_str()?;
            let t = v["time"].as_str()?;
            who.starts_with(&want).then(|| (who.to_owned(), t.get(11..19).unwrap_or("").to_owned()))
        })
        .collect()
}

/// N brokers (own state and run dirs, one process each) on one OpenBao dev
/// server with a file audit device, 200 watched secrets each (one prefix
/// grant): requests per broker per interval counted at the server, bytes
/// per listing, propagation of a `bao kv put` to every broker's mount,
/// the request rate second by second; per-secret and directory modes side
/// by side in one run.
fn fleet(o: &Opts) -> Value {
    let n = o.fleet.unwrap_or(20);
    let bao = match Bao::try_start() {
        Ok(bao) => bao,
        Err(e) => return json!({ "skipped": format!("bao (OpenBao): {e}") }),
    };
    let secrets = 200;
    let interval = Duration::from_secs(1);
    let window = Duration::from_secs(if o.short { 5 } else { 10 });
    let items: Vec<(String, String)> =
        (0..secrets).map(|i| (format!("fleet/k{i:03}"), format!("v0-{i}-{}", "x".repeat(24)))).collect();
    bao_put_many(&bao, &items);
    let mut modes = serde_json::Map::new();
    for mode in ["per-secret", "directory"] {
        let tag = if mode == "directory" { "dir" } else { "per" };
        let brokers: Vec<Broker> = (0..n)
            .map(|i| {
                let o = bao.cli(&["token", "create", "-policy=root", &format!("-display-name={tag}-{i:02}"), "-field=token"]);
                let token = bao.dir.path().join(format!("token-{tag}-{i}"));
                std::fs::write(&token, String::from_utf8_lossy(&o.stdout).trim()).unwrap();
                let toml = format!(
                    "[[backend]]\nname = \"prod\"\nkind = \"vault\"\naddress = \"{}\"\ntoken_file = \"{}\"\npoll_interval = \"1s\"\nchange_detection = \"{mode}\"\n",
                    bao.addr,
                    token.display()
                );
                let b = builder().config(&toml).quiet().start();
                b.ok(&["workload", "add", "w", "--selector", "unix:uid:0"]);
                b.ok(&["grant", "prod/fleet/*", "--to", "w"]);
                b
            })
            .collect();
        std::thread::sleep(2 * interval);
        // The window runs from one read of the log to the next (parsing
        // it takes long: the read times bound what is counted).
        let t0 = Instant::now();
        let before = audited_requests(&bao, tag).len();
        std::thread::sleep(window);
        // Before parsing: the log is read at once, parsing takes long.
        let elapsed = t0.elapsed();
        let during = audited_requests(&bao, tag);
        let counted = during.len() - before;
        let per_broker_interval = counted as f64 / n as f64 / (elapsed.as_secs_f64() / interval.as_secs_f64());
        // The request rate second by second (whole seconds of the window).
        let mut per_second: BTreeMap<String, u64> = BTreeMap::new();
        for (_, t) in &during[before..] {
            *per_second.entry(t.clone()).or_default() += 1;
        }
        let mut rate: Vec<u64> = per_second.values().copied().collect();
        if rate.len() > 2 {
            rate = rate[1..rate.len() - 1].to_vec();
        }
        let status: Value =
            serde_json::from_slice(&brokers[0].cli(&["status", "--json"]).stdout).unwrap_or(Value::Null);
        let scan = status["backends"][0]["last_scan"].clone();
        // Propagation: a bao kv put, until every broker's mount shows it.
        let mut lat_ns = Vec::new();
        for r in 0..5 {
            let value = format!("p{r}-{mode}-{}", "y".repeat(20));
            let t = Instant::now();
            bao_put_many(&bao, &[("fleet/k007".to_owned(), value.clone())]);
            let files: Vec<PathBuf> = brokers.iter().map(|b| b.file("w", "k007")).collect();
            let (ns, _) = visible_in_all(&files, t, |f| std::fs::read(f).is_ok_and(|v| v == value.as_bytes()));
            lat_ns.extend(ns);
        }
        // percentiles() answers in µs.
        let (p50, p99) = percentiles(lat_ns.clone());
        let max_ms = lat_ns.iter().max().copied().unwrap_or(0) as f64 / 1e6;
        eprintln!(
            "  {mode}: {n} brokers, {per_broker_interval:.2} requests/broker/interval, listing {} bytes, \
             propagation p50 {:.0} ms p99 {:.0} ms, rate/s {rate:?}",
            scan["bytes"],
            p50 / 1e3,
            p99 / 1e3
        );
        modes.insert(
            mode.to_owned(),
            json!({
                "brokers": n,
                "secrets_per_broker": secrets,
                "interval_s": interval.as_secs_f64(),
                "window_s": elapsed.as_secs_f64(),
                "requests_counted": counted,
                "requests_per_broker_per_interval": per_broker_interval,
                "last_scan": scan,
                "rate_per_second": rate,
                "propagation_ms": { "p50": p50 / 1e3, "p99": p99 / 1e3, "max": max_ms, "samples": lat_ns.len() },
            }),
        );
        drop(brokers);
    }
    let per = modes["per-secret"]["requests_per_broker_per_interval"].as_f64().unwrap_or(0.0);
    let dir = modes["directory"]["requests_per_broker_per_interval"].as_f64().unwrap_or(0.0);
    json!({
        "modes": modes,
        "at_10000_hosts_30s": {
            "per_secret_requests_per_s": per * 10_000.0 / 30.0,
            "directory_requests_per_s": dir * 10_000.0 / 30.0,
        },
    })
}

/// Write secrets to node `i` of a cluster, one HTTP request each.
fn cluster_put_many(c: &BaoCluster, i: usize, items: &[(String, String)]) {
    let host = c.nodes[i].addr.trim_start_matches("http://").to_owned();
    let token = std::fs::read_to_string(c.token_file()).unwrap();
    for (path, value) in items {
        let body = format!("{{\"data\":{{\"value\":\"{value}\"}}}}");
        let mut s = std::net::TcpStream::connect(&host).unwrap();
        write!(
            s,
            "POST /v1/secret/data/{path} HTTP/1.1\r\nHost: {host}\r\nX-Vault-Token: {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
    }
}

/// N brokers on a 3-node OpenBao raft cluster (loopback ports), each
/// listing every node, 200 watched secrets each (one prefix grant). While
/// a reader reads every broker's file every 50 ms and an admin writes
/// through one broker every 200 ms, the active node is killed with -9:
/// the cluster's election time, the seconds without a successful write,
/// failed reads (must be 0), and how long a `bao kv put` to the new
/// leader takes to reach every broker's mount.
fn fleet_cluster(o: &Opts) -> Value {
    let n = o.fleet.unwrap_or(20);
    if std::process::Command::new("bao").arg("version").output().is_err() {
        return json!({ "skipped": "no bao (OpenBao) binary" });
    }
    let mut c = BaoCluster::start(3);
    let active = c.active().expect("an active node");
    let secrets = 200;
    let items: Vec<(String, String)> =
        (0..secrets).map(|i| (format!("fleet/k{i:03}"), format!("v0-{i}-{}", "x".repeat(24)))).collect();
    cluster_put_many(&c, active, &items);
    let mut order = vec![active];
    order.extend((0..3).filter(|&i| i != active));
    let brokers: Vec<Broker> = (0..n)
        .map(|i| {
            // Each broker starts at another node: the load spreads.
            let mine: Vec<usize> = (0..3).map(|k| order[(i + k) % 3]).collect();
            let toml = format!(
                "[[backend]]\nname = \"prod\"\nkind = \"vault\"\naddress = {}\ntoken_file = \"{}\"\npoll_interval = \"1s\"\nrequest_timeout = \"2s\"\n",
                c.addresses_toml(&mine),
                c.token_file().display()
            );
            let b = Broker::builder().config(&toml).quiet().start();
            b.ok(&["workload", "add", "w", "--selector", "unix:uid:0"]);
            b.ok(&["grant", "prod/fleet/*", "--to", "w"]);
            b
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let files: Vec<PathBuf> = brokers.iter().map(|b| b.file("w", "k010")).collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let killed_at = Instant::now() + Duration::from_secs(3);
    let (reads, failed_reads, writes, gap, attempts_failed, elected) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let (mut ok, mut failed) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for f in &files {
                    if std::fs::read(f).is_ok_and(|v| v.starts_with(b"v")) {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (ok, failed)
        });
        let writer = s.spawn(|| {
            // (time of each successful write, failed attempts)
            let (mut done, mut failed) = (Vec::new(), 0u64);
            let mut k = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                k += 1;
                let o = brokers[0]
                    .cli_in(&["secret", "put", "prod/fleet/k199", "--stdin"], Some(format!("v-w{k}").as_bytes()));
                if o.status.success() {
                    done.push(Instant::now());
                } else {
                    failed += 1;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (done, failed)
        });
        std::thread::sleep(killed_at.saturating_duration_since(Instant::now()));
        c.kill9(active);
        let mut elected = None;
        while elected.is_none() && killed_at.elapsed() < Duration::from_secs(60) {
            if c.active().is_some() {
                elected = Some(killed_at.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(5));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (ok, failed) = reader.join().unwrap();
        let (done, wfailed) = writer.join().unwrap();
        // The longest time without a successful write, around the kill.
        let mut gap = Duration::ZERO;
        for w in done.windows(2) {
            if w[1] > killed_at && w[0] < killed_at + Duration::from_secs(60) {
                gap = gap.max(w[1] - w[0]);
            }
        }
        (ok, failed, done.len(), gap, wfailed, elected)
    });
    // Change detection on the new leader: a bao write, into every mount.
    let leader = c.active().expect("a new active node");
    let value = format!("after-failover-{}", "z".repeat(20));
    let t = Instant::now();
    cluster_put_many(&c, leader, &[("fleet/k007".to_owned(), value.clone())]);
    let files: Vec<PathBuf> = brokers.iter().map(|b| b.file("w", "k007")).collect();
    let (ns, _) = visible_in_all(&files, t, |f| std::fs::read(f).is_ok_and(|v| v == value.as_bytes()));
    let (p50, p99) = percentiles(ns);
    let switched = brokers
        .iter()
        .filter(|b| {
            let st: Value = serde_json::from_slice(&b.cli(&["status", "--json"]).stdout).unwrap_or(Value::Null);
            st["backends"][0]["address"] != json!(c.nodes[active].addr)
        })
        .count();
    let status: Value = serde_json::from_slice(&brokers[1].cli(&["status", "--json"]).stdout).unwrap_or(Value::Null);
    let elected_s = elected.map(|e| e.as_secs_f64());
    eprintln!(
        "  cluster: {n} brokers, election {elected_s:?} s, {:.2} s without a successful write ({attempts_failed} failed \
         attempt(s), {writes} ok), reads {reads} ok / {failed_reads} failed, new-leader write in every mount p50 {:.0} ms \
         p99 {:.0} ms, {switched}/{n} brokers off the dead node",
        gap.as_secs_f64(),
        p50 / 1e3,
        p99 / 1e3
    );
    json!({
        "brokers": n,
        "nodes": 3,
        "secrets_per_broker": secrets,
        "interval_s": 1.0,
        "election_s": elected_s,
        "seconds_without_a_successful_write": gap.as_secs_f64(),
        "write_attempts_failed": attempts_failed,
        "writes_ok": writes,
        "reads_ok": reads,
        "reads_failed": failed_reads,
        "brokers_off_the_dead_node": switched,
        "new_leader_propagation_ms": { "p50": p50 / 1e3, "p99": p99 / 1e3 },
        "last_scan": status["backends"][0]["last_scan"],
    })
}
