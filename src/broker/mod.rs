//! `keyhole serve`: wiring. Prepares the state and run directories, opens
//! the key, the store and the audit log, connects the backends, serves
//! gRPC on both sockets, shuts down cleanly on SIGTERM/SIGINT, and hands
//! everything to a successor on request (see [`takeover`]).
#![forbid(unsafe_code)]

mod secrets;
mod systemd;
pub mod takeover;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tonic::transport::Server;

use crate::api::admin::AdminService;
use crate::api::pb::{admin_server::AdminServer, workload_server::WorkloadServer};
use crate::api::peer;
use crate::api::workload::WorkloadService;
use crate::audit::{AuditLog, Event};
use crate::backend::local::{KeyMaterial, LocalStore};
use crate::backend::vault::VaultBackend;
use crate::config::{Config, KeySource};
use crate::crypto::MasterKey;
use crate::fs::MountTable;
use crate::fs::workload::FsShared;
use crate::identity::Attestor;
use crate::identity::docker::DockerCache;
use crate::secret::SecretBytes;

/// What a successor takes over besides its listeners (see [`takeover`]).
pub struct Adopt {
    pub mounts: Vec<(crate::fs::MountState, fs::File)>,
    pub next_ino: u64,
    pub audit: (u64, [u8; 32]),
}

/// The running broker's shared state.
#[derive(Debug)]
pub struct Broker {
    pub config: Config,
    pub store: LocalStore,
    pub audit: Arc<AuditLog>,
    pub attestor: Arc<Attestor>,
    pub docker: Option<Arc<DockerCache>>,
    /// Remote backends, each owning the paths under its name.
    pub vaults: Vec<Arc<VaultBackend>>,
    pub mounts: MountTable,
    /// The runtime, for backend calls made from blocking threads.
    pub rt: tokio::runtime::Handle,
    pub started: Instant,
    /// Flips to true when the broker begins shutting down.
    pub stopping: watch::Sender<bool>,
    /// gRPC calls per caller (`[limits] calls_per_second`).
    pub calls: crate::limits::PerCaller,
    pub refusals: crate::limits::Refusals,
}

/// Why a file or directory is not private to this process, if it is not.
pub enum NotPrivate {
    /// Someone else owns it.
    Owner { owner: u32, me: u32 },
    /// Group or others have some access (the permission bits).
    Mode(u32),
}

/// Whether `md` is private to us: ours, with no access for group or others.
pub fn not_private(md: &fs::Metadata) -> Option<NotPrivate> {
    let me = euid();
    if md.uid() != me {
        return Some(NotPrivate::Owner { owner: md.uid(), me });
    }
    let mode = md.mode() & 0o7777;
    (mode & 0o077 != 0).then_some(NotPrivate::Mode(mode))
}

/// Refuse a file or directory that others could read or write, or that
/// belongs to someone else: it would hold or guard the master key.
fn check_private(path: &Path, what: &str) -> anyhow::Result<()> {
    let md = fs::metadata(path).with_context(|| format!("cannot stat {what} {}", path.display()))?;
    let p = path.display();
    match not_private(&md) {
        None => Ok(()),
        Some(NotPrivate::Owner { owner, me }) => {
            bail!("{what} {p} belongs to uid {owner}, not to the broker's uid {me}; fix with: chown {me} {p}")
        }
        Some(NotPrivate::Mode(mode)) => {
            let want = if md.is_dir() { "0700" } else { "0400" };
            bail!("{what} {p} has mode {mode:04o}: group and others must have no access; fix with: chmod {want} {p}")
        }
    }
}

fn euid() -> u32 {
    // /proc/self is owned by our effective uid: a safe way to learn it.
    fs::metadata("/proc/self").map_or(0, |m| m.uid())
}

fn private_dir(path: &Path, what: &str) -> anyhow::Result<()> {
    if !path.exists() {
        fs::create_dir_all(path).with_context(|| format!("cannot create {what} {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    }
    // An empty directory holds nothing yet (e.g. a fresh Docker volume,
    // created 0755): make it private rather than refuse it.
    let empty = fs::read_dir(path).map(|mut d| d.next().is_none()).unwrap_or(false);
    if empty && fs::metadata(path)?.mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
        tracing::info!(path = %path.display(), "made the empty {what} private (0700)");
    }
    check_private(path, what)
}

/// Write a new file that nobody else can read, durably.
fn create_private_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_key(config: &Config) -> anyhow::Result<KeyMaterial> {
    match &config.key {
        KeySource::KeyFile(path) if path.exists() => {
            check_private(path, "master key file")?;
            let bytes = zeroize::Zeroizing::new(
                fs::read(path).with_context(|| format!("cannot read master key {}", path.display()))?,
            );
            let key = MasterKey::from_bytes(&bytes).with_context(|| {
                format!("master key {} is {} bytes; it must be exactly {}", path.display(), bytes.len(), MasterKey::LEN)
            })?;
            Ok(KeyMaterial::Key(key))
        }
        KeySource::KeyFile(path) => {
            if config.store_file().exists() {
                bail!(
                    "the store {} exists but its master key {} is missing: restore the key file (a new key cannot open the store)",
                    config.store_file().display(),
                    path.display()
                );
            }
            let key = MasterKey::generate()?;
            create_private_file(path, key.expose(), 0o400)?;
            tracing::info!(path = %path.display(), "created a new master key");
            Ok(KeyMaterial::Key(key))
        }
        KeySource::Passphrase(path) => {
            check_private(path, "passphrase file")?;
            let mut raw = fs::read(path).with_context(|| format!("cannot read passphrase file {}", path.display()))?;
            let trimmed = raw.strip_suffix(b"\n").unwrap_or(&raw).len();
            raw.truncate(trimmed);
            if raw.is_empty() {
                bail!("passphrase file {} is empty", path.display());
            }
            Ok(KeyMaterial::Passphrase(SecretBytes::take(&mut raw)))
        }
    }
}

impl Broker {
    /// Count one gRPC call of `id` against `[limits] calls_per_second`;
    /// over it, the call is refused (and audited, at most a line a second
    /// per caller).
    pub fn allow_call(&self, id: &crate::identity::Identity, method: &str) -> Result<(), crate::api::ApiError> {
        let key = match (&id.remote, &id.container_id) {
            (Some(r), _) => format!("remote {}", r.split(" from ").next().unwrap_or(r)),
            (None, Some(c)) => format!("container {c}"),
            (None, None) => format!("uid {}", id.uid),
        };
        if self.calls.allow(&key) {
            return Ok(());
        }
        let limit = format!("calls_per_second ({}) for {key}", self.config.limits.calls_per_second);
        self.refusals.refused(&self.audit, &key, &limit, Some(id));
        Err(crate::api::ApiError::ResourceExhausted(format!(
            "{method}: too many calls from this caller (limit {} a second); try again shortly",
            self.config.limits.calls_per_second
        )))
    }

    /// Open everything in the state dir and set up the mounts. Blocking
    /// (Argon2id, fsync, mount); `rt` serves Docker lookups.
    /// With `adopt`, the mounts and audit head come from a predecessor.
    pub fn open(config: Config, rt: tokio::runtime::Handle, adopt: Option<Adopt>) -> anyhow::Result<Broker> {
        private_dir(&config.state_dir, "state dir")?;
        let key = read_key(&config)?;
        let store_file = config.store_file();
        if store_file.exists() {
            check_private(&store_file, "store")?;
        }
        let (store, master) = LocalStore::open(&store_file, key, config.history_depth)
            .with_context(|| format!("cannot open the store {}", store_file.display()))?;
        let audit_file = config.audit_file();
        if audit_file.exists() {
            check_private(&audit_file, "audit log")?;
        }
        let audit = match &adopt {
            Some(a) => AuditLog::resume(&audit_file, master.audit_key(), a.audit.0, a.audit.1),
            None => AuditLog::open(&audit_file, master.audit_key()),
        }
        .with_context(|| format!("refusing to start: move {} aside to begin a new audit log", audit_file.display()))?;
        let docker = if config.docker_socket.exists() {
            let d = DockerCache::connect(&config.docker_socket, rt.clone())
                .with_context(|| format!("cannot use the Docker socket {}", config.docker_socket.display()))?;
            Some(d)
        } else {
            tracing::info!(socket = %config.docker_socket.display(), "no Docker socket: docker:* selectors never match");
            None
        };
        let mut vaults = Vec::with_capacity(config.backends.len());
        for cfg in &config.backends {
            let v = VaultBackend::new(cfg.clone()).with_context(|| format!("backend {}", cfg.name))?;
            // What an earlier broker fetched: served (as stale) until the
            // backend answers, up to max_stale after it last did.
            for (path, meta, value) in store.cache_under(&cfg.name)? {
                v.restore(path, meta, value);
            }
            if let Some(t) = store.note::<std::time::SystemTime>(&format!("backend-ok:{}", cfg.name))? {
                v.health.restore_last_ok(t);
            }
            vaults.push(Arc::new(v));
        }
        if let Some(r) = config.audit_rotation {
            audit.rotate_at(r);
        }
        let audit = Arc::new(audit);
        if let Some(a) = &config.alerts {
            audit.alert_on_deny(crate::alerts::Alerts::start(a.clone(), Arc::downgrade(&audit), &rt));
        }
        let attestor = Arc::new(Attestor::new("/proc", config.admin.clone(), docker.clone()));
        let run_dir = &config.run_dir;
        fs::create_dir_all(run_dir).with_context(|| format!("cannot create run dir {}", run_dir.display()))?;
        // Containers bind the workload socket and mounts from here.
        fs::set_permissions(run_dir, fs::Permissions::from_mode(0o755))?;
        let shared = Arc::new(FsShared {
            attestor: attestor.clone(),
            audit: audit.clone(),
            audit_reads: config.audit_reads,
            rt: rt.clone(),
        });
        let mounts = MountTable::new(run_dir, shared)?;
        let config_calls = config.limits.calls_per_second;
        let broker = Broker {
            config,
            store,
            audit,
            attestor,
            docker,
            vaults,
            mounts,
            rt,
            started: Instant::now(),
            stopping: watch::Sender::new(false),
            calls: crate::limits::PerCaller::new(config_calls),
            refusals: crate::limits::Refusals::default(),
        };
        if let Some(a) = adopt {
            broker.mounts.adopt(&broker, a.mounts, a.next_ino)?;
        }
        broker.mounts.sync(&broker)?;
        Ok(broker)
    }

    /// After any change to secrets or policy: bring the mounts up to date.
    /// The change itself is already durable, so a failure here is logged.
    pub fn changed(&self) {
        let started = Instant::now();
        match self.mounts.sync(self) {
            Ok(notices) => {
                crate::metrics::METRICS.propagation_seconds.observe(started.elapsed().as_secs_f64());
                self.announce(notices)
            }
            Err(e) => tracing::error!(error = format!("{e:#}"), "mounts not updated"),
        }
    }

    /// Signal the containers that read a rotated secret (`grant --notify`),
    /// through the Docker API, without waiting for it.
    fn announce(&self, notices: Vec<crate::fs::Notice>) {
        let Some(docker) = &self.docker else { return };
        for n in notices {
            for container in n.fs.readers_of(&n.secret) {
                let (docker, audit, fs) = (docker.clone(), self.audit.clone(), n.fs.clone());
                let (secret, signal, version) = (n.secret.clone(), n.signal.clone(), n.version);
                self.rt.spawn(async move {
                    let outcome = docker.signal(&container, &signal).await;
                    let reason = match &outcome {
                        Ok(()) => format!("sent {signal} to container {container}"),
                        Err(e) => format!("could not send {signal} to container {container}: {e}"),
                    };
                    if outcome.is_err() {
                        fs.forget_reader(&secret, &container);
                    }
                    let event = Event {
                        workload: Some(&fs.workload.name),
                        path: Some(&secret),
                        version: Some(version),
                        reason: Some(&reason),
                        ..Event::new("notify")
                    };
                    let _ = audit.record(&event);
                });
            }
        }
    }
}

/// Refuse to start where a live broker answers on `path`.
async fn refuse_if_live(path: &Path) -> anyhow::Result<()> {
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        bail!("another broker is serving on {}; stop it first", path.display());
    }
    Ok(())
}

/// Bind a socket, replacing a stale one left by a broker that died.
async fn bind(path: &Path, mode: u32) -> anyhow::Result<UnixListener> {
    if path.exists() {
        refuse_if_live(path).await?;
        fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(l)
}

/// Bind the admin, workload and (if configured, with Docker) plugin
/// sockets, replacing stale ones.
async fn bind_listeners(broker: &Broker) -> anyhow::Result<takeover::Listeners> {
    let mut plugin = None;
    if let (Some(sock), Some(_)) = (&broker.config.plugin_socket, &broker.docker) {
        // Optional: without it, host-bind mounts still work.
        let dir = sock.parent().unwrap_or(Path::new("/"));
        match fs::create_dir_all(dir) {
            Ok(()) => plugin = Some(bind(sock, 0o600).await?.into_std()?),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "no Docker volume plugin: cannot create its socket dir")
            }
        }
    }
    let admin = bind(&broker.config.admin_socket(), 0o600).await?.into_std()?;
    let workload = bind(&broker.config.workload_socket(), 0o666).await?.into_std()?;
    Ok(takeover::Listeners { admin, workload, plugin })
}

/// A tokio listener on a copy of `l`: the original stays open, so a
/// stopped server can be started again, or its socket handed on.
fn serving_copy(l: &std::os::unix::net::UnixListener) -> std::io::Result<UnixListener> {
    let copy = l.try_clone()?;
    copy.set_nonblocking(true)?;
    UnixListener::from_std(copy)
}

/// Start what serves callers: gRPC on both sockets, the volume plugin,
/// and the backend pollers. They all stop when `broker.stopping` flips.
fn spawn_services(
    broker: &Arc<Broker>,
    listeners: &takeover::Listeners,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    broker.stopping.send_replace(false);
    let max_msg = broker.config.max_value_bytes as usize + 64 * 1024;
    let mut tasks = Vec::new();
    for (l, name) in [(&listeners.admin, "admin.sock"), (&listeners.workload, "workload.sock")] {
        let gate = peer::Gate::new(name, &broker.config.limits, broker.audit.clone());
        let mut stop = broker.stopping.subscribe();
        let admin = AdminServer::new(AdminService(broker.clone()))
            .max_decoding_message_size(max_msg)
            .max_encoding_message_size(max_msg);
        let workload = WorkloadServer::new(WorkloadService(broker.clone())).max_decoding_message_size(4096);
        let server = Server::builder()
            .max_concurrent_streams(Some(64))
            .layer(crate::api::CountCalls)
            .add_service(admin)
            .add_service(workload)
            .serve_with_incoming_shutdown(peer::incoming(serving_copy(l)?, gate), async move {
                let _ = stop.wait_for(|s| *s).await;
            });
        tasks.push(tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::warn!(error = %e, "gRPC server ended with an error");
            }
        }));
    }
    if let (Some(l), Some(sock)) = (&listeners.plugin, &broker.config.plugin_socket) {
        let (b, s, l) = (broker.clone(), sock.clone(), serving_copy(l)?);
        tasks.push(tokio::spawn(async move { crate::docker::plugin::serve(b, l, &s).await }));
        tracing::info!(socket = %sock.display(), "serving the Docker volume plugin");
    }
    for v in &broker.vaults {
        tasks.push(tokio::spawn(secrets::watch_backend(broker.clone(), v.clone())));
    }
    if let Some(listen) = &broker.config.metrics {
        let l = bind_metrics(listen).with_context(|| format!("cannot listen for metrics on {listen}"))?;
        tasks.push(tokio::spawn(crate::metrics::serve(broker.clone(), l)));
        tracing::info!(listen = %listen, "serving metrics");
    }
    if let Some(remote) = &broker.config.remote_admin {
        tasks.push(spawn_remote_admin(broker, remote, max_msg)?);
        tracing::info!(listen = %remote.listen, "serving remote admin (mutual TLS)");
    }
    Ok(tasks)
}

fn bind_metrics(listen: &crate::config::Listen) -> anyhow::Result<crate::metrics::Listener> {
    use crate::config::Listen;
    Ok(match listen {
        Listen::Tcp(addr) => {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            crate::metrics::Listener::Tcp(tokio::net::TcpListener::from_std(l)?)
        }
        Listen::Unix(path) => {
            // A predecessor's socket: it stopped serving before we started.
            let _ = fs::remove_file(path);
            let l = UnixListener::bind(path)?;
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
            crate::metrics::Listener::Unix(l)
        }
    })
}

/// The Admin service on TCP with mutual TLS (`[admin] listen`).
fn spawn_remote_admin(
    broker: &Arc<Broker>,
    remote: &crate::config::RemoteAdmin,
    max_msg: usize,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    check_private(&remote.tls_key, "[admin] tls_key")?;
    let tls = crate::api::remote::tls_config(remote)?;
    let l = std::net::TcpListener::bind(remote.listen)
        .with_context(|| format!("cannot listen for remote admin on {}", remote.listen))?;
    l.set_nonblocking(true)?;
    let incoming = tonic::transport::server::TcpIncoming::from(tokio::net::TcpListener::from_std(l)?);
    let admin = AdminServer::new(AdminService(broker.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let mut stop = broker.stopping.subscribe();
    let server = Server::builder()
        .tls_config(tls)
        .context("[admin] TLS settings")?
        .max_concurrent_streams(Some(64))
        .layer(crate::api::CountCalls)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        });
    Ok(tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::warn!(error = %e, "remote admin server ended with an error");
        }
    }))
}

/// Stop what [`spawn_services`] started; calls under way may finish.
async fn stop_services(broker: &Broker, tasks: Vec<tokio::task::JoinHandle<()>>) {
    broker.stopping.send_replace(true);
    for t in tasks {
        if tokio::time::timeout(std::time::Duration::from_secs(10), t).await.is_err() {
            tracing::warn!("a server did not stop within 10 s");
        }
    }
}

/// SIGHUP: start a successor from the binary now at our path (an
/// upgrade, if it was replaced) with our arguments plus `--takeover`.
fn spawn_successor(exe: &Path) {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if !args.iter().any(|a| a == "--takeover") {
        args.push("--takeover".into());
    }
    match std::process::Command::new(exe).args(&args).stdin(std::process::Stdio::null()).spawn() {
        Ok(mut child) => {
            tracing::info!(exe = %exe.display(), pid = child.id(), "SIGHUP: started a successor to take over");
            // Reaped here if it fails; if it succeeds, this process is gone.
            std::thread::spawn(move || match child.wait() {
                Ok(s) if s.success() => {}
                Ok(s) => tracing::warn!(status = %s, "the successor failed to take over; still serving"),
                Err(e) => tracing::warn!(error = %e, "the successor could not be waited for"),
            });
        }
        Err(e) => tracing::error!(exe = %exe.display(), error = %e, "SIGHUP: cannot start a successor"),
    }
}

/// One takeover request on `conn`. `Ok(Some(pid))`: everything is handed
/// over to `pid` and this process must exit now, without unmounting or
/// writing anything.
async fn hand_over(
    broker: &Arc<Broker>,
    listeners: &takeover::Listeners,
    services: &mut Vec<tokio::task::JoinHandle<()>>,
    conn: tokio::net::UnixStream,
) -> anyhow::Result<Option<i32>> {
    let sock = conn.into_std()?;
    let Some(out) = tokio::task::spawn_blocking(move || takeover::Outgoing::offer(sock)).await?? else {
        broker
            .audit
            .record(&Event { reason: Some("the successor refused the state"), ..Event::new("takeover_refused") })?;
        return Ok(None);
    };
    let pid = out.peer_pid;
    tracing::info!(pid, "handing over to a successor");
    stop_services(broker, std::mem::take(services)).await;
    let b = broker.clone();
    tokio::task::spawn_blocking(move || b.mounts.quiesce()).await?;
    let to = format!("to pid {pid}");
    broker.audit.record(&Event { reason: Some(&to), ..Event::new("handover") })?;
    let (audit_seq, mac) = broker.audit.seal();
    let packed = broker.mounts.snapshot().and_then(|(mounts, next_ino)| {
        let (mounts, mut fds): (Vec<_>, Vec<_>) = mounts.into_iter().unzip();
        fds.extend(listeners.fds()?);
        let state = takeover::Handover {
            broker_version: env!("CARGO_PKG_VERSION").to_owned(),
            next_ino,
            audit_seq,
            audit_mac: hex::encode(mac),
            mounts,
            plugin: listeners.plugin.is_some(),
        };
        Ok((state, fds))
    });
    let handed = match packed {
        Ok((state, fds)) => tokio::task::spawn_blocking(move || out.hand(state, &fds)).await?,
        Err(e) => {
            let e = anyhow::Error::from(e).context("cannot copy the descriptors to hand over");
            out.fail(&format!("{e:#}"));
            Err(e)
        }
    };
    if let Err(e) = handed {
        broker.audit.unseal();
        let b = broker.clone();
        tokio::task::spawn_blocking(move || b.mounts.resume()).await?;
        *services = spawn_services(broker, listeners)?;
        let why = format!("{e:#}");
        broker.audit.record(&Event { reason: Some(&why), ..Event::new("handover_failed") })?;
        return Err(e.context("the handover failed; serving again"));
    }
    Ok(Some(pid))
}

/// Run the broker until SIGTERM or SIGINT, or until a successor takes
/// over. With `takeover`, first take over from the broker running on the
/// same run dir.
pub async fn serve(config: Config, takeover: bool) -> anyhow::Result<()> {
    // One TLS crypto provider for the whole process (the Vault client).
    let _ = rustls::crypto::ring::default_provider().install_default();
    crate::sys::umask(0o077);
    crate::sys::harden_process().context("cannot disable core dumps")?;
    // For SIGHUP: the path we were started from, before any upgrade.
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    let takeover_path = config.run_dir.join("takeover.sock");
    let (received, adopt) = if takeover {
        let p = takeover_path.clone();
        let r = tokio::task::spawn_blocking(move || takeover::take_over(&p)).await??;
        let mut mac = [0u8; 32];
        hex::decode_to_slice(&r.state.audit_mac, &mut mac).context("the handed audit head is not hex")?;
        let adopt = Adopt { mounts: r.mounts, next_ino: r.state.next_ino, audit: (r.state.audit_seq, mac) };
        (Some((r.listeners, r.predecessor_pid)), Some(adopt))
    } else {
        // Before touching the state: a running broker keeps it open.
        refuse_if_live(&config.admin_socket()).await?;
        (None, None)
    };
    let rt = tokio::runtime::Handle::current();
    let broker = Arc::new(tokio::task::spawn_blocking(move || Broker::open(config, rt, adopt)).await??);
    if let Some(d) = &broker.docker {
        tokio::spawn(d.clone().watch());
    }
    let (listeners, from) = match received {
        Some((l, pid)) => (l, Some(pid)),
        None => (bind_listeners(&broker).await?, None),
    };
    let takeover_l = bind(&takeover_path, 0o600).await?;
    let mut services = spawn_services(&broker, &listeners)?;
    match from {
        Some(pid) => {
            let reason = format!("keyhole {} from pid {pid}", env!("CARGO_PKG_VERSION"));
            broker.audit.record(&Event { reason: Some(&reason), ..Event::new("takeover") })?;
            systemd::notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
        }
        None => {
            broker.audit.record(&Event { reason: Some(env!("CARGO_PKG_VERSION")), ..Event::new("start") })?;
            systemd::notify("READY=1");
        }
    }
    tracing::info!(
        admin = %broker.config.admin_socket().display(),
        workload = %broker.config.workload_socket().display(),
        state = %broker.config.state_dir.display(),
        "keyhole is serving"
    );

    let (mut term, mut int, mut hup) =
        (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?, signal(SignalKind::hangup())?);
    let why = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => spawn_successor(&exe),
            conn = takeover_l.accept() => {
                let Ok((conn, _)) = conn else { continue };
                match hand_over(&broker, &listeners, &mut services, conn).await {
                    Ok(Some(pid)) => {
                        // Under systemd, the successor becomes the service's
                        // main process before this one exits.
                        systemd::notify(&format!("MAINPID={pid}"));
                        systemd::barrier(std::time::Duration::from_secs(5));
                        tracing::info!("handed over; exiting");
                        // No destructor may run: they would unmount.
                        std::process::exit(0);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = format!("{e:#}"), "takeover"),
                }
            }
        }
    };
    tracing::info!(signal = why, "shutting down");
    stop_services(&broker, services).await;
    let admin_path = broker.config.admin_socket();
    let workload_path = broker.config.workload_socket();
    let plugin_path = broker.config.plugin_socket.as_ref().filter(|_| listeners.plugin.is_some());
    for p in [Some(&admin_path), Some(&workload_path), Some(&takeover_path), plugin_path].into_iter().flatten() {
        let _ = fs::remove_file(p);
    }
    let b = broker.clone();
    tokio::task::spawn_blocking(move || b.mounts.shutdown()).await?;
    broker.audit.record(&Event { reason: Some(why), ..Event::new("stop") })?;
    Ok(())
}
