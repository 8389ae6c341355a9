//! `keyhole serve`: wiring. Prepares the state and run directories, opens
//! the key, the store and the audit log, connects the backends, serves
//! gRPC on both sockets, and shuts down cleanly on SIGTERM/SIGINT.
#![forbid(unsafe_code)]

mod secrets;

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
}

/// Refuse a file or directory that others could read or write, or that
/// belongs to someone else: it would hold or guard the master key.
fn check_private(path: &Path, what: &str) -> anyhow::Result<()> {
    let md = fs::metadata(path).with_context(|| format!("cannot stat {what} {}", path.display()))?;
    let mode = md.mode() & 0o7777;
    let me = euid();
    if md.uid() != me {
        bail!(
            "{what} {} belongs to uid {}, not to the broker's uid {me}; fix with: chown {me} {}",
            path.display(),
            md.uid(),
            path.display()
        );
    }
    if mode & 0o077 != 0 {
        let want = if md.is_dir() { "0700" } else { "0400" };
        bail!(
            "{what} {} has mode {mode:04o}: group and others must have no access; fix with: chmod {want} {}",
            path.display(),
            path.display()
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
    /// Open everything in the state dir and set up the mounts. Blocking
    /// (Argon2id, fsync, mount); `rt` serves Docker lookups.
    pub fn open(config: Config, rt: tokio::runtime::Handle) -> anyhow::Result<Broker> {
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
        let audit = AuditLog::open(&audit_file, master.audit_key()).with_context(|| {
            format!("refusing to start: move {} aside to begin a new audit log", audit_file.display())
        })?;
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
        let audit = Arc::new(audit);
        let attestor = Arc::new(Attestor::new("/proc", config.admin.clone(), docker.clone()));
        let run_dir = &config.run_dir;
        fs::create_dir_all(run_dir).with_context(|| format!("cannot create run dir {}", run_dir.display()))?;
        // Containers bind the workload socket and mounts from here.
        fs::set_permissions(run_dir, fs::Permissions::from_mode(0o755))?;
        let shared = Arc::new(FsShared { attestor: attestor.clone(), audit: audit.clone() });
        let mounts = MountTable::new(run_dir, shared)?;
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
        };
        broker.mounts.sync(&broker)?;
        Ok(broker)
    }

    /// After any change to secrets or policy: bring the mounts up to date.
    /// The change itself is already durable, so a failure here is logged.
    pub fn changed(&self) {
        match self.mounts.sync(self) {
            Ok(notices) => self.announce(notices),
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

async fn shutdown_signal() -> &'static str {
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        _ => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Run the broker until SIGTERM or SIGINT.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    // One TLS crypto provider for the whole process (the Vault client).
    let _ = rustls::crypto::ring::default_provider().install_default();
    crate::sys::umask(0o077);
    crate::sys::harden_process().context("cannot disable core dumps")?;
    // Before touching the state: a running broker keeps it open.
    refuse_if_live(&config.admin_socket()).await?;
    let rt = tokio::runtime::Handle::current();
    let broker = Arc::new(tokio::task::spawn_blocking(move || Broker::open(config, rt)).await??);
    if let Some(d) = &broker.docker {
        tokio::spawn(d.clone().watch());
    }
    for v in &broker.vaults {
        tokio::spawn(secrets::watch_backend(broker.clone(), v.clone()));
    }
    let mut plugin = None;
    if let (Some(sock), Some(_)) = (&broker.config.plugin_socket, &broker.docker) {
        // Optional: without it, host-bind mounts still work.
        let dir = sock.parent().unwrap_or(Path::new("/"));
        match fs::create_dir_all(dir) {
            Ok(()) => {
                let l = bind(sock, 0o600).await?;
                let (b, s) = (broker.clone(), sock.clone());
                plugin = Some(tokio::spawn(async move { crate::docker::plugin::serve(b, l, &s).await }));
                tracing::info!(socket = %sock.display(), "serving the Docker volume plugin");
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "no Docker volume plugin: cannot create its socket dir")
            }
        }
    }
    let admin_path = broker.config.admin_socket();
    let workload_path = broker.config.workload_socket();
    let admin_l = bind(&admin_path, 0o600).await?;
    let workload_l = bind(&workload_path, 0o666).await?;

    let max_msg = broker.config.max_value_bytes as usize + 64 * 1024;
    let serve_on = |listener: UnixListener| {
        let mut stop = broker.stopping.subscribe();
        let admin = AdminServer::new(AdminService(broker.clone()))
            .max_decoding_message_size(max_msg)
            .max_encoding_message_size(max_msg);
        let workload = WorkloadServer::new(WorkloadService(broker.clone())).max_decoding_message_size(4096);
        Server::builder()
            .max_concurrent_streams(Some(64))
            .add_service(admin)
            .add_service(workload)
            .serve_with_incoming_shutdown(peer::incoming(listener), async move {
                let _ = stop.changed().await;
            })
    };
    let admin_srv = tokio::spawn(serve_on(admin_l));
    let workload_srv = tokio::spawn(serve_on(workload_l));

    broker.audit.record(&Event { reason: Some(env!("CARGO_PKG_VERSION")), ..Event::new("start") })?;
    tracing::info!(
        admin = %admin_path.display(),
        workload = %workload_path.display(),
        state = %broker.config.state_dir.display(),
        "keyhole is serving"
    );

    let why = shutdown_signal().await;
    tracing::info!(signal = why, "shutting down");
    broker.stopping.send_replace(true);
    for srv in [admin_srv, workload_srv] {
        if let Ok(Err(e)) = srv.await {
            tracing::warn!(error = %e, "gRPC server ended with an error");
        }
    }
    if let Some(p) = plugin {
        let _ = p.await;
    }
    for p in [
        Some(&admin_path),
        Some(&workload_path),
        broker.config.plugin_socket.as_ref().filter(|_| broker.docker.is_some()),
    ]
    .into_iter()
    .flatten()
    {
        let _ = fs::remove_file(p);
    }
    let b = broker.clone();
    tokio::task::spawn_blocking(move || b.mounts.shutdown()).await?;
    broker.audit.record(&Event { reason: Some(why), ..Event::new("stop") })?;
    Ok(())
}
