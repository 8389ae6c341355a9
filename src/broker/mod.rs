//! `keyhole serve`: wiring. Prepares the state and run directories, opens
//! the key, the store and the audit log, connects the backends, serves
//! gRPC on both sockets, shuts down cleanly on SIGTERM/SIGINT, and hands
//! everything to a successor on request (see [`takeover`]).
#![forbid(unsafe_code)]

mod error;
mod leases;
mod ops;
mod secrets;
mod systemd;
pub mod takeover;

pub use error::BrokerError;
pub use leases::SourceRequest;
pub use ops::{GrantRequest, NewValue};

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

/// A start refused because the store or the audit log was tampered with
/// (or cut, or replaced) while no broker ran: `keyhole serve` exits 6.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Tampered(pub String);

/// How often, at most, the audit log's head is sealed in the store when
/// nothing else writes to the store.
const AUDIT_SEAL_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

/// What a successor takes over besides its listeners (see [`takeover`]).
pub struct Adopt {
    pub mounts: Vec<(crate::fs::MountState, fs::File)>,
    pub next_ino: u64,
    pub audit: (u64, [u8; 32]),
    /// The predecessor's confirmed containers (checked again here).
    pub containers: Vec<crate::identity::docker::Exported>,
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
    /// gRPC calls per admin caller (`[limits] admin_calls_per_second`).
    pub admin_calls: crate::limits::PerCaller,
    pub refusals: crate::limits::Refusals,
    /// Peers refused on `takeover.sock` (audited at most once a second).
    pub takeover_refusals: takeover::RefusalLog,
    /// Per-container dynamic credentials and certificates.
    pub leases: Arc<crate::lease::Leases>,
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

/// The run dir holds `admin.sock` and `takeover.sock`: whoever may
/// rename or create entries in it could put their own sockets there.
/// It must be ours and writable by nobody else (0755, as created, is fine).
fn check_run_dir(path: &Path) -> anyhow::Result<()> {
    let md = fs::metadata(path).with_context(|| format!("cannot stat run dir {}", path.display()))?;
    let (p, me) = (path.display(), euid());
    if !md.is_dir() {
        bail!("run dir {p} is not a directory");
    }
    if md.uid() != me {
        bail!(
            "run dir {p} belongs to uid {}, not to the broker's uid {me}: its owner could replace admin.sock; \
             fix with: chown {me} {p}",
            md.uid()
        );
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o022 != 0 {
        bail!(
            "run dir {p} has mode {mode:04o}: group and others must not write to it (they could replace \
             admin.sock); fix with: chmod 0755 {p}"
        );
    }
    Ok(())
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
    /// Count one gRPC call of `id` against `[limits] calls_per_second`,
    /// or `admin_calls_per_second` for an admin; over it, the call is
    /// refused (and audited, at most a line a second per caller).
    pub fn allow_call(&self, id: &crate::identity::Identity, method: &str) -> Result<(), BrokerError> {
        let key = match (&id.remote, &id.container_id) {
            (Some(r), _) => format!("remote {}", r.split(" from ").next().unwrap_or(r)),
            (None, Some(c)) => format!("container {c}"),
            (None, None) => format!("uid {}", id.uid),
        };
        let limits = &self.config.limits;
        let (calls, rate, name) = if id.admin {
            (&self.admin_calls, limits.admin_calls_per_second, "admin_calls_per_second")
        } else {
            (&self.calls, limits.calls_per_second, "calls_per_second")
        };
        if calls.allow(&key) {
            return Ok(());
        }
        let limit = format!("{name} ({rate}) for {key}");
        self.refusals.refused(&self.audit, &key, &limit, Some(id));
        Err(BrokerError::ResourceExhausted(format!(
            "{method}: too many calls from this caller (limit {rate} a second); try again shortly"
        )))
    }

    /// Open everything in the state dir and set up the mounts. Blocking
    /// (Argon2id, fsync, mount); `rt` serves Docker lookups.
    /// With `adopt`, the mounts and audit head come from a predecessor.
    /// With `new_audit_log`, an audit log that does not reach the head the
    /// store sealed (cut, lost or replaced) is accepted, and the gap audited.
    pub fn open(
        config: Config,
        rt: tokio::runtime::Handle,
        mut adopt: Option<Adopt>,
        new_audit_log: bool,
    ) -> anyhow::Result<Broker> {
        private_dir(&config.state_dir, "state dir")?;
        let key = read_key(&config)?;
        let store_file = config.store_file();
        if store_file.exists() {
            check_private(&store_file, "store")?;
        }
        let (store, master) = match LocalStore::open(&store_file, key, config.history_depth) {
            Ok(opened) => opened,
            Err(e @ crate::backend::local::StoreError::Tampered { .. }) => {
                return Err(Tampered(format!(
                    "refusing to start: {e}. Nothing is served from {}; restore the state dir (store and audit \
                     log) from a backup you trust",
                    store_file.display()
                ))
                .into());
            }
            Err(e) => {
                return Err(anyhow::Error::from(e))
                    .with_context(|| format!("cannot open the store {}", store_file.display()));
            }
        };
        let audit_file = config.audit_file();
        if audit_file.exists() {
            check_private(&audit_file, "audit log")?;
        }
        let audit = match &adopt {
            Some(a) => AuditLog::resume(&audit_file, master.audit_key(), a.audit.0, a.audit.1),
            None => AuditLog::open(&audit_file, master.audit_key()),
        }
        .with_context(|| {
            format!(
                "refusing to start: move {} aside, then start once with --new-audit-log to begin a new audit log",
                audit_file.display()
            )
        })?;
        if let Some(seal) = store.sealed_audit_head() {
            if let Err(e) = audit.holds(seal.seq, &seal.mac) {
                let a = audit_file.display();
                if !new_audit_log {
                    return Err(Tampered(format!(
                        "refusing to start: the audit log {a} does not hold the head the store sealed (line {}): \
                         {e}. Restore the log from a backup; or, to go on from the log as it is (the gap is \
                         audited), start once with: keyhole serve --new-audit-log",
                        seal.seq
                    ))
                    .into());
                }
                let why = format!("started with --new-audit-log: {e}");
                tracing::warn!(path = %a, reason = %why, "the audit log does not hold the sealed head; going on");
                audit.record(&Event { reason: Some(&why), ..Event::new("audit_reset") })?;
            }
        }
        let docker = if config.docker_socket.exists() {
            let d = DockerCache::connect(&config.docker_socket, rt.clone())
                .with_context(|| format!("cannot use the Docker socket {}", config.docker_socket.display()))?;
            Some(d)
        } else {
            tracing::info!(socket = %config.docker_socket.display(), "no Docker socket: docker:* selectors never match");
            None
        };
        if let Some(d) = &docker {
            // Before serving: the predecessor's containers (checked again),
            // the events stream, then every running container, so the
            // common case never waits for Docker.
            let handed = adopt.as_mut().map(|a| std::mem::take(&mut a.containers)).unwrap_or_default();
            if !handed.is_empty() {
                let (n, taken) = (handed.len(), d.import(handed));
                tracing::info!(handed = n, taken, "containers taken from the predecessor");
            }
            rt.spawn(d.clone().watch());
            rt.block_on(d.prime());
        }
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
        // Every store write seals the audit log's (durable) head with it.
        let head_of = audit.clone();
        store.seal_audit_with(Box::new(move || match head_of.durable_head() {
            Ok((seq, mac)) => Some(crate::backend::local::AuditSeal { seq, mac }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot sync the audit log; its head is not sealed with this write");
                None
            }
        }));
        if let Some(a) = &config.alerts {
            audit.alert_on_deny(crate::alerts::Alerts::start(a.clone(), Arc::downgrade(&audit), &rt));
        }
        let attestor = Arc::new(Attestor::new("/proc", config.admin.clone(), docker.clone()));
        let run_dir = &config.run_dir;
        if run_dir.exists() {
            check_run_dir(run_dir)?;
        } else {
            fs::create_dir_all(run_dir).with_context(|| format!("cannot create run dir {}", run_dir.display()))?;
            // Containers bind the workload socket and mounts from here.
            fs::set_permissions(run_dir, fs::Permissions::from_mode(0o755))?;
        }
        let leases = Arc::new(crate::lease::Leases::load(&store, rt.clone())?);
        let shared = Arc::new(FsShared {
            leases: leases.clone(),
            attestor: attestor.clone(),
            audit: audit.clone(),
            audit_reads: config.audit_reads,
            rt: rt.clone(),
        });
        let mounts = MountTable::new(run_dir, shared)?;
        let config_calls = config.limits.calls_per_second;
        let config_admin_calls = config.limits.admin_calls_per_second;
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
            admin_calls: crate::limits::PerCaller::new(config_admin_calls),
            refusals: crate::limits::Refusals::default(),
            takeover_refusals: takeover::RefusalLog::default(),
            leases,
        };
        if let Some(a) = adopt {
            broker.mounts.adopt(&broker, a.mounts, a.next_ino)?;
        }
        broker.mounts.sync(&broker)?;
        Ok(broker)
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
    let admin_path = broker.config.admin_socket();
    let admin = match broker.config.admin.socket_group {
        // Admins by group reach the admin socket; everyone else is still
        // refused by the kernel.
        Some(gid) => {
            let l = bind(&admin_path, 0o600).await?;
            std::os::unix::fs::chown(&admin_path, None, Some(gid))
                .with_context(|| format!("cannot give {} to group {gid}", admin_path.display()))?;
            fs::set_permissions(&admin_path, fs::Permissions::from_mode(0o660))?;
            l
        }
        None => bind(&admin_path, 0o600).await?,
    }
    .into_std()?;
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

/// HTTP/2 keepalive: a PING after this long without a frame from the
/// peer, and the connection closed if it is not answered as long again.
/// Long streams (`audit --follow`) stay up; dead peers do not.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(20);
/// How long a stranger's call may take, its request body included.
const STRANGER_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Start what serves callers: gRPC on both sockets, the volume plugin,
/// and the backend pollers. They all stop when `broker.stopping` flips.
///
/// Each socket has two gRPC servers: one for connections whose peer was
/// attested as an admin when it connected (the Admin and Workload
/// services, normal limits), one for everyone else's (the Workload
/// service only, small HTTP/2 windows and few streams, admin calls
/// refused on the headers; see [`crate::api::strangers`]).
fn spawn_services(
    broker: &Arc<Broker>,
    listeners: &takeover::Listeners,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    use crate::api::strangers as s;
    broker.stopping.send_replace(false);
    let max_msg = broker.config.max_value_bytes as usize + 64 * 1024;
    let mut tasks = Vec::new();
    let soft = crate::sys::nofile().map_or(1024, |(soft, _)| soft);
    let budget = peer::Budget::new(soft, &broker.config.limits);
    let idle = broker.config.limits.idle_timeout;
    tracing::info!(
        nofile = soft,
        reserved_fds = budget.reserved_fds,
        fds_per_connection = peer::FDS_PER_CONNECTION,
        max_connections = budget.max,
        max_non_admin_connections = budget.strangers_max,
        non_admin_bytes_per_connection = s::CONNECTION_BYTES,
        "connection budget"
    );
    for (l, name) in [(&listeners.admin, "admin.sock"), (&listeners.workload, "workload.sock")] {
        let gate = peer::Gate::new(name, &broker.config.limits, budget.clone(), broker.audit.clone());
        let (admins, strangers) = peer::incoming(serving_copy(l)?, gate, broker.attestor.clone());
        let admin = AdminServer::new(AdminService(broker.clone()))
            .max_decoding_message_size(max_msg)
            .max_encoding_message_size(max_msg);
        let workload = WorkloadServer::new(WorkloadService(broker.clone())).max_decoding_message_size(4096);
        let mut stop = broker.stopping.subscribe();
        let for_admins = Server::builder()
            .max_concurrent_streams(Some(64))
            .http2_keepalive_interval(Some(KEEPALIVE))
            .http2_keepalive_timeout(Some(KEEPALIVE))
            .layer(crate::api::CountCalls)
            .layer(s::Calls::admins())
            .add_service(admin)
            .add_service(workload)
            .serve_with_incoming_shutdown(admins, async move {
                let _ = stop.wait_for(|s| *s).await;
            });
        let workload = WorkloadServer::new(WorkloadService(broker.clone()))
            .max_decoding_message_size(s::MAX_REQUEST)
            .max_encoding_message_size(s::MAX_RESPONSE);
        let mut stop = broker.stopping.subscribe();
        let for_strangers = Server::builder()
            .max_concurrent_streams(Some(s::STREAMS))
            .initial_stream_window_size(Some(s::STREAM_WINDOW))
            .initial_connection_window_size(Some(s::CONNECTION_WINDOW))
            .max_frame_size(Some(s::MAX_FRAME))
            .http2_max_header_list_size(Some(s::MAX_HEADER_LIST))
            .http2_max_pending_accept_reset_streams(Some(8))
            .http2_max_local_error_reset_streams(Some(64))
            .http2_keepalive_interval(Some(KEEPALIVE))
            .http2_keepalive_timeout(Some(KEEPALIVE))
            .timeout(STRANGER_CALL_TIMEOUT)
            // A stranger whose answers wait on a window it never opens (or
            // who answers PINGs and nothing else) is not served for ever:
            // every stranger's connection ends after the idle timeout,
            // with a grace for calls under way.
            .max_connection_age(idle)
            .max_connection_age_grace(STRANGER_CALL_TIMEOUT.min(idle))
            .layer(crate::api::CountCalls)
            .layer(s::Calls::strangers(broker.clone()))
            .add_service(workload)
            .serve_with_incoming_shutdown(strangers, async move {
                let _ = stop.wait_for(|s| *s).await;
            });
        tasks.push(tokio::spawn(async move {
            if let Err(e) = for_admins.await {
                tracing::warn!(error = %e, "gRPC server ended with an error");
            }
        }));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = for_strangers.await {
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
    tasks.push(tokio::spawn(crate::lease::keeper(broker.clone())));
    if let Some(listen) = &broker.config.metrics {
        let l = bind_metrics(listen).with_context(|| format!("cannot listen for metrics on {listen}"))?;
        let gate =
            crate::api::listen::NetGate::new("metrics", &broker.config.limits, budget.clone(), broker.audit.clone());
        let l = crate::api::listen::MetricsListener { inner: l, gate };
        tasks.push(tokio::spawn(crate::metrics::serve(broker.clone(), l)));
        tracing::info!(listen = %listen, "serving metrics");
    }
    if let Some(remote) = &broker.config.remote_admin {
        let gate = crate::api::listen::NetGate::new(
            "remote admin",
            &broker.config.limits,
            budget.clone(),
            broker.audit.clone(),
        );
        tasks.push(spawn_remote_admin(broker, remote, max_msg, gate)?);
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
    gate: Arc<crate::api::listen::NetGate>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    check_private(&remote.tls_key, "[admin] tls_key")?;
    // Each TLS handshake runs with a timeout, and every connection within
    // the gate's caps and the fd budget (see crate::api::listen).
    let tls = crate::api::remote::rustls_config(remote)?;
    let l = std::net::TcpListener::bind(remote.listen)
        .with_context(|| format!("cannot listen for remote admin on {}", remote.listen))?;
    l.set_nonblocking(true)?;
    let incoming = crate::api::listen::remote_incoming(
        tokio::net::TcpListener::from_std(l)?,
        gate.clone(),
        tls,
        broker.stopping.subscribe(),
    );
    let admin = AdminServer::new(AdminService(broker.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let mut stop = broker.stopping.subscribe();
    let server = Server::builder()
        .max_concurrent_streams(Some(64))
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .layer(crate::api::CountCalls)
        .layer(crate::api::strangers::Calls::remote(broker.clone()))
        .layer(crate::api::listen::Track(gate))
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

/// Check and answer one connection to `takeover.sock`, off the main loop
/// (bounded by [`takeover::HANDSHAKE_TIMEOUT`]); a successor that
/// accepted our state goes to `ready`, for the main loop to hand over.
async fn handshake(
    broker: Arc<Broker>,
    conn: tokio::net::UnixStream,
    ready: tokio::sync::mpsc::Sender<takeover::Outgoing>,
) {
    let offered = match conn.into_std() {
        Ok(sock) => tokio::task::spawn_blocking(move || takeover::Outgoing::offer(sock)).await,
        Err(e) => return tracing::warn!(error = %e, "takeover: cannot use the connection"),
    };
    match offered {
        Ok(Ok(takeover::Offered::Accepted(out))) => {
            let _ = ready.send(out).await;
        }
        Ok(Ok(takeover::Offered::Declined(_))) => {
            let e = Event { reason: Some("the successor refused the state"), ..Event::new("takeover_refused") };
            let _ = broker.audit.record(&e);
        }
        Ok(Ok(takeover::Offered::Refused(why))) => {
            tracing::warn!(reason = %why, "takeover refused");
            broker.takeover_refusals.refused(&broker.audit, &format!("refused: {why}"));
        }
        Ok(Err(e)) => tracing::warn!(error = format!("{e:#}"), "takeover: the peer did not complete the handshake"),
        Err(e) => tracing::warn!(error = %e, "takeover: the handshake failed"),
    }
}

/// Hand over to a successor that accepted our state. `Ok(Some(pid))`:
/// everything is handed over to `pid` and this process must exit now,
/// without unmounting or writing anything.
async fn hand_over(
    broker: &Arc<Broker>,
    listeners: &takeover::Listeners,
    services: &mut Vec<tokio::task::JoinHandle<()>>,
    out: takeover::Outgoing,
) -> anyhow::Result<Option<i32>> {
    let pid = out.peer_pid;
    tracing::info!(pid, "handing over to a successor");
    stop_services(broker, std::mem::take(services)).await;
    let b = broker.clone();
    tokio::task::spawn_blocking(move || b.mounts.quiesce()).await?;
    let to = format!("to pid {pid}");
    broker.audit.record(&Event { reason: Some(&to), ..Event::new("handover") })?;
    let (audit_seq, mac) = broker.audit.seal();
    let b = broker.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || b.store.seal_audit()).await? {
        tracing::warn!(error = %e, "cannot seal the audit log's head in the store before the handover");
    }
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
            containers: broker.docker.as_ref().map(|d| d.export()).unwrap_or_default(),
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
pub async fn serve(config: Config, takeover: bool, new_audit_log: bool) -> anyhow::Result<()> {
    // One TLS crypto provider for the whole process (the Vault client).
    let _ = rustls::crypto::ring::default_provider().install_default();
    crate::sys::umask(0o077);
    crate::sys::harden_process().context("cannot disable core dumps")?;
    // Every caller is pinned by the pidfd the kernel took at connect: where
    // there is none, no caller could be told from a recycled pid.
    crate::sys::probe_peer_pidfd().context(
        "keyhole needs Linux 6.5 or later: this kernel gives no pidfd for a socket's peer (SO_PEERPIDFD); \
         on Debian 12, install a newer kernel (bookworm-backports)",
    )?;
    // Connections, FUSE mounts and attestation all take file descriptors:
    // the soft limit (often 1024) is raised to the hard one.
    match crate::sys::raise_nofile() {
        Ok((soft, hard)) => tracing::info!(soft, hard, "file descriptor limit (RLIMIT_NOFILE)"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    // Signals are ours from the start: a SIGTERM while the broker is still
    // starting waits for the main loop and stops it cleanly, rather than
    // killing a broker that is mounting and sealing.
    let (mut term, mut int, mut hup) =
        (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?, signal(SignalKind::hangup())?);
    // For SIGHUP: the path we were started from, before any upgrade.
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    let takeover_path = config.run_dir.join("takeover.sock");
    let (received, adopt) = if takeover {
        let p = takeover_path.clone();
        let r = tokio::task::spawn_blocking(move || takeover::take_over(&p)).await??;
        let mut mac = [0u8; 32];
        hex::decode_to_slice(&r.state.audit_mac, &mut mac).context("the handed audit head is not hex")?;
        let adopt = Adopt {
            mounts: r.mounts,
            next_ino: r.state.next_ino,
            audit: (r.state.audit_seq, mac),
            containers: r.state.containers,
        };
        (Some((r.listeners, r.predecessor_pid)), Some(adopt))
    } else {
        // Before touching the state: a running broker keeps it open.
        refuse_if_live(&config.admin_socket()).await?;
        (None, None)
    };
    let rt = tokio::runtime::Handle::current();
    let broker = Arc::new(tokio::task::spawn_blocking(move || Broker::open(config, rt, adopt, new_audit_log)).await??);
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
    seal_audit_head(&broker).await;
    tokio::spawn(seal_audit_periodically(broker.clone()));
    tracing::info!(
        admin = %broker.config.admin_socket().display(),
        workload = %broker.config.workload_socket().display(),
        state = %broker.config.state_dir.display(),
        "keyhole is serving"
    );

    let handshakes = Arc::new(tokio::sync::Semaphore::new(16));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<takeover::Outgoing>(1);
    let why = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => spawn_successor(&exe),
            conn = takeover_l.accept() => {
                let Ok((conn, _)) = conn else { continue };
                // A few handshakes at a time; each is short.
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    tracing::warn!("takeover: too many handshakes under way; connection closed");
                    continue;
                };
                let (b, tx) = (broker.clone(), ready_tx.clone());
                tokio::spawn(async move {
                    handshake(b, conn, tx).await;
                    drop(permit);
                });
            }
            Some(out) = ready_rx.recv() => {
                match hand_over(&broker, &listeners, &mut services, out).await {
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
    seal_audit_head(&broker).await;
    Ok(())
}

/// Seal the audit log's current head in the store (a store write).
async fn seal_audit_head(broker: &Arc<Broker>) -> bool {
    let b = broker.clone();
    match tokio::task::spawn_blocking(move || b.store.seal_audit()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot seal the audit log's head in the store");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot seal the audit log's head in the store");
            false
        }
    }
}

/// Between store writes, seal the audit log's head every few seconds
/// when it has moved, so a tail cut while no broker runs is caught.
async fn seal_audit_periodically(broker: Arc<Broker>) {
    let mut sealed = broker.audit.lines_written();
    loop {
        tokio::time::sleep(AUDIT_SEAL_EVERY).await;
        let now = broker.audit.lines_written();
        if now != sealed && seal_audit_head(&broker).await {
            sealed = now;
        }
    }
}
