//! `keyhole doctor`: check the host the broker runs on (or will), one
//! line per check, each failure with what to do about it.
#![forbid(unsafe_code)]

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use serde::Serialize;

use super::client::{fail, print_json};
use crate::config::{Config, KeySource};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

/// One check's verdict. The JSON shape (`--json`) is stable:
/// `{"ok": bool, "checks": [{"check", "status", "detail", "fix"?}]}`.
#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    status: Status,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn ok(check: &'static str, detail: impl Into<String>) -> Check {
    Check { check, status: Status::Ok, detail: detail.into(), fix: None }
}

fn warn(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { check, status: Status::Warn, detail: detail.into(), fix: Some(fix.into()) }
}

fn bad(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { check, status: Status::Fail, detail: detail.into(), fix: Some(fix.into()) }
}

/// The inode numbers of the initial pid and cgroup namespaces
/// (`PROC_PID_INIT_INO`, `PROC_CGROUP_INIT_INO`): the host's.
const HOST_PID_NS: u64 = 0xEFFF_FFFC;
const HOST_CGROUP_NS: u64 = 0xEFFF_FFFB;

pub async fn run(config: anyhow::Result<Config>, json: bool) -> anyhow::Result<()> {
    // The backends' TLS: one crypto provider for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut checks = Vec::new();
    let config = match config {
        Ok(c) => {
            checks.push(ok("config", "valid"));
            c
        }
        Err(e) => {
            checks.push(bad("config", format!("{e:#}"), "fix the config file; the rest is checked with the defaults"));
            Config::load(None, Default::default())?
        }
    };
    checks.push(fuse());
    checks.push(peer_pidfd());
    let broker = broker_pid(&config.admin_socket()).await;
    checks.push(match &broker {
        Ok(pid) => ok("broker", format!("pid {pid} answers on {}", config.admin_socket().display())),
        Err(why) => warn("broker", why.clone(), "start it: keyhole serve (or systemctl start keyhole)"),
    });
    // The running broker's namespaces; with none running (or none we can
    // see), this process's, as a broker started here would have.
    let (proc, who) = match broker.as_ref().ok().filter(|p| **p > 0) {
        Some(pid) => (format!("/proc/{pid}"), format!("the broker (pid {pid}) is in")),
        None => ("/proc/self".into(), "this process is in".into()),
    };
    let why = "callers in containers would arrive with pid 0 and be denied";
    checks.push(namespace("pid namespace", &proc, &who, "pid", HOST_PID_NS, why));
    let why = "containers could not be told apart";
    checks.push(namespace("cgroup namespace", &proc, &who, "cgroup", HOST_CGROUP_NS, why));
    checks.push(run_dir(&config.run_dir, broker.is_ok()));
    checks.push(state_dir(&config.state_dir));
    checks.push(key(&config));
    let docker = docker(&config.docker_socket).await;
    let docker_up = docker.status == Status::Ok;
    checks.push(docker);
    let scope = std::fs::read_to_string(PTRACE_SCOPE).ok();
    let exposed = if docker_up && ptrace_open(scope.as_deref()) {
        host_uid_containers(&config.docker_socket).await
    } else {
        Vec::new()
    };
    checks.push(ptrace(scope.as_deref(), &exposed));
    for r in config.runtimes.iter().filter(|r| r.kind == crate::policy::Runtime::Podman) {
        checks.push(podman(&r.socket).await);
    }
    checks.push(rootless_podman());
    if let Some(sock) = &config.plugin_socket {
        checks.push(plugin(sock, docker_up, broker.is_ok()));
    }
    for b in &config.backends {
        checks.extend(backend(b).await);
    }
    if broker.is_ok() {
        checks.push(revocations(&config.admin_socket()).await);
    }

    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if json {
        print_json(&serde_json::json!({ "ok": failed == 0, "checks": checks }));
    } else {
        for c in &checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            println!("{tag}  {:<17} {}", c.check, c.detail);
            if let Some(fix) = &c.fix {
                println!("      {:<17} fix: {fix}", "");
            }
        }
    }
    if failed > 0 {
        return Err(fail(1, format!("{failed} check(s) failed")));
    }
    Ok(())
}

/// `SO_PEERPIDFD` (Linux 6.5+): the broker pins every connection's peer
/// with it and refuses connections without it.
fn peer_pidfd() -> Check {
    const NAME: &str = "SO_PEERPIDFD";
    match crate::sys::probe_peer_pidfd() {
        Ok(_) => ok(NAME, "the kernel pins a socket's peer (pidfd)"),
        Err(e) => bad(
            NAME,
            format!("the kernel gives no pidfd for a socket's peer: {e}"),
            "keyhole needs Linux 6.5 or later: every connection would be refused",
        ),
    }
}

fn fuse() -> Check {
    const NAME: &str = "fuse";
    let path = Path::new("/dev/fuse");
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return bad(
                NAME,
                format!("/dev/fuse: {e}"),
                "load the module (modprobe fuse); in a container, pass --device /dev/fuse",
            );
        }
    };
    let rdev = meta.rdev();
    if !meta.file_type().is_char_device() || (libc::major(rdev), libc::minor(rdev)) != (10, 229) {
        return bad(NAME, "/dev/fuse is not the FUSE device (char 10:229)", "mknod /dev/fuse c 10 229");
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => ok(NAME, "/dev/fuse opens"),
        Err(e) => bad(
            NAME,
            format!("cannot open /dev/fuse: {e}"),
            "run as root; in a container add --device /dev/fuse --cap-add SYS_ADMIN",
        ),
    }
}

fn namespace(check: &'static str, proc: &str, who: &str, ns: &str, host: u64, why: &str) -> Check {
    match std::fs::metadata(format!("{proc}/ns/{ns}")) {
        Ok(m) if m.ino() == host => ok(check, format!("{who} the host's {ns} namespace")),
        Ok(_) => bad(
            check,
            format!("{who} another {ns} namespace, not the host's: {why}"),
            format!("run on the host, or as a container with `{ns}: host`"),
        ),
        Err(e) => bad(check, format!("{proc}/ns/{ns}: {e}"), "mount /proc"),
    }
}

const PTRACE_SCOPE: &str = "/proc/sys/kernel/yama/ptrace_scope";

/// Yama's `ptrace_scope` (`None`: no Yama). At 0, or without Yama, any
/// process may ptrace (and `pidfd_getfd`) another of the same uid and gid:
/// a host user whose ids equal a container user's takes the container's
/// open secret files, and only the container's open is audited.
fn ptrace(scope: Option<&str>, exposed: &[String]) -> Check {
    const NAME: &str = "ptrace";
    let mut risk = "a host user with the same uid:gid as a container's user can take its open secret files \
                    (pidfd_getfd, ptrace), and the audit credits the container"
        .to_owned();
    if !exposed.is_empty() {
        risk.push_str(&format!("; running as host accounts' uids: {}", exposed.join(", ")));
    }
    let fix = "sysctl kernel.yama.ptrace_scope=1 (persist it in /etc/sysctl.d; a kernel without Yama needs \
               it enabled, e.g. lsm=...,yama), or run dockerd with userns-remap, or run containers as uids \
               no host account uses";
    match scope.map(|s| s.trim().parse::<u32>()) {
        None => warn(NAME, format!("no Yama ({PTRACE_SCOPE} is missing): {risk}"), fix),
        Some(Ok(0)) => warn(NAME, format!("kernel.yama.ptrace_scope is 0: {risk}"), fix),
        Some(Ok(n)) => {
            ok(NAME, format!("kernel.yama.ptrace_scope is {n}: other processes of a uid cannot take its files"))
        }
        Some(Err(_)) => warn(NAME, format!("{PTRACE_SCOPE} does not read as a number: {risk}"), fix),
    }
}

/// Whether `scope` (Yama's `ptrace_scope`, `None`: no Yama) lets a uid's
/// processes ptrace each other.
fn ptrace_open(scope: Option<&str>) -> bool {
    !matches!(scope.map(|s| s.trim().parse::<u32>()), Some(Ok(n)) if n >= 1)
}

/// Most running containers looked at for [`host_uid_containers`].
const EXPOSED_MAX: usize = 64;

/// The running containers whose configured user is a numeric uid (not 0)
/// that a host account has, e.g. "web (uid 1000, host user alice)". A
/// user given by name is resolved inside the container: not looked at.
async fn host_uid_containers(socket: &Path) -> Vec<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let account = |uid: &str| {
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == uid)
            .map(|f| f[0].to_owned())
    };
    let look = async {
        let d = bollard::Docker::connect_with_unix(&socket.to_string_lossy(), 5, bollard::API_DEFAULT_VERSION)?;
        let list = d.list_containers(None::<bollard::query_parameters::ListContainersOptions>).await?;
        let mut out = Vec::new();
        for c in list.into_iter().take(EXPOSED_MAX) {
            let Some(id) = c.id else { continue };
            let Ok(i) = d.inspect_container(&id, None).await else { continue };
            let user = i.config.and_then(|c| c.user).unwrap_or_default();
            let uid = user.split(':').next().unwrap_or_default();
            if uid.parse::<u32>().is_ok_and(|u| u != 0) {
                if let Some(login) = account(uid) {
                    let name = i.name.unwrap_or_default().trim_start_matches('/').to_owned();
                    out.push(format!("{name} (uid {uid}, host user {login})"));
                }
            }
        }
        Ok::<_, bollard::errors::Error>(out)
    };
    match tokio::time::timeout(std::time::Duration::from_secs(6), look).await {
        Ok(Ok(out)) => out,
        _ => Vec::new(),
    }
}

/// The pid of the broker answering on `admin` (from the socket's peer
/// credentials; 0 if it is outside our pid namespace).
/// The running broker's lease revocations that failed and are retried.
async fn revocations(admin: &Path) -> Check {
    const NAME: &str = "leases";
    let target = super::client::Target::Socket(admin.to_owned());
    match crate::cli::client::rpc!(admin, &target, Safe, status, crate::api::pb::StatusRequest {}) {
        Err(e) => warn(NAME, format!("cannot ask the broker: {e:#}"), "run doctor as an admin of the broker"),
        Ok(s) if s.revocations_pending > 0 => warn(
            NAME,
            format!("{} of {} lease(s) could not be revoked and are retried", s.revocations_pending, s.leases),
            "make the backend reachable; keyhole leases shows them as \"revoke pending\"",
        ),
        Ok(s) => ok(NAME, format!("{} live lease(s); no revocation pending", s.leases)),
    }
}

async fn broker_pid(admin: &Path) -> Result<i32, String> {
    let s = tokio::net::UnixStream::connect(admin)
        .await
        .map_err(|e| format!("no broker answers on {}: {e}", admin.display()))?;
    let cred = s.peer_cred().map_err(|e| format!("{}: {e}", admin.display()))?;
    Ok(cred.pid().unwrap_or(0))
}

fn run_dir(dir: &Path, broker: bool) -> Check {
    const NAME: &str = "run dir";
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let is_mount = crate::fs::mount_points().unwrap_or_default().iter().any(|p| p == dir);
    let d = dir.display();
    match (is_mount, crate::fs::peer_group(&mountinfo, dir)) {
        (true, Some(group)) => ok(NAME, format!("{d} is a shared mount (peer group {group})")),
        (true, None) => bad(
            NAME,
            format!("{d} is a private mount: mounts made in it will not reach containers"),
            format!("mount --make-rshared {d} (in compose: bind it with propagation: rshared)"),
        ),
        (false, _) if broker => bad(
            NAME,
            format!("{d} is not a mount point, though a broker runs"),
            "restart the broker: it makes the run dir a shared mount at start",
        ),
        (false, _) => ok(NAME, format!("{d}: the broker makes it a shared mount at start")),
    }
}

/// What makes a file or directory not private, as the broker judges it
/// at start.
fn loose(meta: &std::fs::Metadata) -> Option<String> {
    use crate::broker::NotPrivate;
    crate::broker::not_private(meta).map(|n| match n {
        NotPrivate::Mode(mode) => format!("mode {mode:04o} lets others in"),
        NotPrivate::Owner { owner, me } => format!("owned by uid {owner}, not {me}"),
    })
}

fn state_dir(dir: &Path) -> Check {
    const NAME: &str = "state dir";
    let d = dir.display();
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ok(NAME, format!("{d}: created (0700) at first start")),
        Err(e) => bad(NAME, format!("{d}: {e}"), "check the path and its parents"),
        Ok(m) => match loose(&m) {
            None => ok(NAME, format!("{d} is private")),
            Some(why) => bad(NAME, format!("{d}: {why}"), format!("chmod 700 {d}; chown the broker's user {d}")),
        },
    }
}

fn key(config: &Config) -> Check {
    const NAME: &str = "master key";
    let (path, what) = match &config.key {
        KeySource::KeyFile(p) => (p, "key file"),
        KeySource::Passphrase(p) => (p, "passphrase file"),
    };
    let p = path.display();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if config.store_file().exists() {
                bad(NAME, format!("{what} {p} is missing, but the store exists"), "restore the key from your backup")
            } else if matches!(config.key, KeySource::KeyFile(_)) {
                ok(NAME, format!("{p}: created (0400) at first start; back it up then"))
            } else {
                bad(NAME, format!("{what} {p} is missing"), "write the passphrase to it, mode 0400")
            }
        }
        Err(e) => bad(NAME, format!("{p}: {e}"), "check the path and its parents"),
        Ok(m) => match loose(&m) {
            None => ok(NAME, format!("{what} {p} is private (mode {:04o})", m.mode() & 0o7777)),
            Some(why) => bad(NAME, format!("{what} {p}: {why}"), format!("chmod 400 {p}")),
        },
    }
}

async fn docker(socket: &Path) -> Check {
    const NAME: &str = "docker";
    let s = socket.display();
    if !socket.exists() {
        return warn(
            NAME,
            format!("no Docker socket at {s}: docker:* selectors never match"),
            "ignore on hosts without Docker; else start dockerd or set [docker] socket",
        );
    }
    let version = async {
        let d = bollard::Docker::connect_with_unix(&socket.to_string_lossy(), 5, bollard::API_DEFAULT_VERSION)?;
        d.version().await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(6), version).await {
        Ok(Ok(v)) => ok(
            NAME,
            format!(
                "Docker Engine {} (API {}) on {s}",
                v.version.unwrap_or_default(),
                v.api_version.unwrap_or_default()
            ),
        ),
        Ok(Err(e)) => bad(NAME, format!("{s}: {e}"), "start dockerd, or check the socket's permissions"),
        Err(_) => bad(NAME, format!("{s}: no answer in 6 s"), "dockerd is hung: restart it"),
    }
}

/// A configured Podman API socket: root's, and answering.
async fn podman(socket: &Path) -> Check {
    const NAME: &str = "podman";
    let s = socket.display();
    if let Some(why) = crate::identity::runtime::not_roots(socket) {
        return bad(NAME, format!("{s}: {why}"), "name a rootful Podman's socket (podman system service as root)");
    }
    if !socket.exists() {
        return warn(
            NAME,
            format!("no Podman socket at {s}: its containers are never confirmed"),
            format!("podman system service --time=0 unix://{s} (or systemctl enable --now podman.socket)"),
        );
    }
    let version = async {
        let d = bollard::Docker::connect_with_unix(&socket.to_string_lossy(), 5, bollard::API_DEFAULT_VERSION)?;
        d.version().await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(6), version).await {
        Ok(Ok(v)) => ok(NAME, format!("Podman {} on {s}", v.version.unwrap_or_default())),
        Ok(Err(e)) => bad(NAME, format!("{s}: {e}"), "start podman system service, or check the socket"),
        Err(_) => bad(NAME, format!("{s}: no answer in 6 s"), "the Podman service is hung: restart it"),
    }
}

/// Rootless Podman's containers, where any run: never attested.
fn rootless_podman() -> Check {
    const NAME: &str = "rootless podman";
    // A user's Podman keeps its state under ~/.local/share/containers and
    // its runtime dir under /run/user/<uid>/containers (or libpod).
    let users: Vec<String> = std::fs::read_dir("/run/user")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("containers").exists() || e.path().join("libpod").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if users.is_empty() {
        return ok(NAME, "none seen (rootless Podman is not attested: its processes match only unix: selectors)");
    }
    warn(
        NAME,
        format!(
            "uid(s) {} run rootless Podman: its containers are not attested (no container id is visible \
             from the host on cgroup v1, and a user-owned subtree on v2); their processes match only unix: selectors",
            users.join(", ")
        ),
        "run containers that need secrets by name or label under rootful Podman or Docker",
    )
}

fn plugin(sock: &Path, docker: bool, broker: bool) -> Check {
    const NAME: &str = "volume plugin";
    let s = sock.display();
    match std::os::unix::net::UnixStream::connect(sock) {
        Ok(_) => ok(NAME, format!("answering on {s}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if broker && docker {
                warn(NAME, format!("no socket at {s}"), "see the broker's log: it could not create it")
            } else {
                ok(NAME, format!("{s}: created when the broker starts with Docker"))
            }
        }
        Err(e) => bad(
            NAME,
            format!("{s} is dead ({e}): dockerd stalls ~100 s on new volumes while it exists"),
            format!(
                "start keyhole, or rm {s}; to never leave it dead, let systemd hold the sockets \
                 (examples/keyhole.socket: connections wait while the broker restarts)"
            ),
        ),
    }
}

async fn backend(cfg: &crate::config::VaultConfig) -> Vec<Check> {
    const NAME: &str = "backend";
    let n = &cfg.name;
    let v = match crate::backend::vault::VaultBackend::new(cfg.clone()) {
        Ok(v) => v,
        Err(e) => return vec![bad(NAME, format!("{n}: {e}"), "fix the [[backend]] table or its files")],
    };
    let p = match v.probe().await {
        Ok(p) => p,
        Err(e) => {
            return vec![bad(
                NAME,
                format!("{n}: {e}"),
                format!("check that {} is up and reachable", cfg.addresses.join(" or ")),
            )];
        }
    };
    let mut out = Vec::new();
    out.push(if p.sealed {
        bad(NAME, format!("{n}: {} is sealed", cfg.addresses.join(", ")), "unseal it")
    } else {
        ok(NAME, format!("{n}: {} answers (version {})", cfg.addresses.join(", "), p.version))
    });
    if p.nodes.len() > 1 {
        out.extend(crate::backend::vault::nodes::doctor_lines(n, &p.nodes).into_iter().map(|(fine, line)| {
            if fine {
                ok("node", line)
            } else {
                warn("node", line, "start or unseal it: the cluster serves on while a majority of its nodes do")
            }
        }));
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let skew = now - p.server_time_unix;
    out.push(if skew.abs() > 30 {
        bad(
            "clock",
            format!("{n}: this host is {skew} s off the backend's clock"),
            "run NTP (chrony, systemd-timesyncd)",
        )
    } else {
        ok("clock", format!("{n}: within {} s of the backend", skew.abs()))
    });
    // Change detection: one listing per directory, or one read per secret.
    if p.token.is_some() {
        out.push(match v.probe_detection().await {
            Ok(()) => ok("changes", format!("{n}: detected by directory (detailed-metadata)")),
            Err(why) => warn(
                "changes",
                format!("{n}: {why}; change detection falls back to one metadata read per secret per poll"),
                format!(
                    "use OpenBao, and allow \"list\" and \"scan\" on {}/detailed-metadata/* in the token's policy",
                    cfg.mount
                ),
            ),
        });
    }
    match p.token {
        None => out.push(ok("token", format!("{n}: AppRole; a token is made at each login"))),
        Some((0, _)) => out.push(ok("token", format!("{n}: the token never expires"))),
        Some((ttl, renewable)) => {
            let left = humantime::format_duration(std::time::Duration::from_secs(ttl));
            out.push(match (renewable, ttl) {
                (true, _) => ok("token", format!("{n}: renewable, {left} left (renewed at 2/3)")),
                (false, t) if t < 600 => bad(
                    "token",
                    format!("{n}: expires in {left} and cannot be renewed"),
                    "issue a renewable token, or use AppRole",
                ),
                (false, _) => warn(
                    "token",
                    format!("{n}: not renewable; expires in {left}"),
                    "issue a renewable token, or use AppRole",
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptrace_scope_below_one_is_a_warning() {
        for scope in [None, Some("0\n"), Some("junk")] {
            let c = ptrace(scope, &[]);
            assert_eq!(c.status, Status::Warn, "{scope:?}");
            assert!(c.detail.contains("same uid:gid") && c.detail.contains("pidfd_getfd"), "{}", c.detail);
            assert!(c.fix.unwrap().contains("userns-remap"));
        }
        for scope in ["1\n", "2", "3"] {
            assert_eq!(ptrace(Some(scope), &[]).status, Status::Ok, "{scope}");
            assert!(!ptrace_open(Some(scope)));
        }
        assert!(ptrace_open(None) && ptrace_open(Some("0")) && ptrace_open(Some("junk")));
        let c = ptrace(None, &["web (uid 1000, host user alice)".into()]);
        assert!(
            c.detail.ends_with("; running as host accounts' uids: web (uid 1000, host user alice)"),
            "{}",
            c.detail
        );
    }

    #[test]
    fn this_kernel_pins_socket_peers() {
        // The CI kernels are 6.5+; on an older one this is the failing check.
        let c = peer_pidfd();
        assert_eq!(c.status, Status::Ok, "{}", c.detail);
    }
}
