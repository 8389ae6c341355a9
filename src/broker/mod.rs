//! `keyhole serve`: wiring. Prepares the state and run directories, opens
//! the key, the store and the audit log, connects the backends, serves
//! gRPC on both sockets, shuts down cleanly on SIGTERM/SIGINT, and hands
//! everything to a successor on request (see [`takeover`]).
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`Broker`] (private state, read accessors), opening it, the serve loop, the handover |
//! | `ops.rs` | every write: store, update the touched mounts, announce, audit |
//! | `error.rs` | [`BrokerError`], the one error of broker operations |
//! | `secrets.rs` | routing a path to its [`crate::backend::SecretSource`]; the mounts' catalog; the Vault watcher |
//! | `private.rs` | the private-file checks (state dir, run dir, key files) and reading the key |
//! | `services.rs` | binding the sockets, starting and stopping what serves callers |
//! | `actions.rs` | `grant --restart`/`--exec`: the queue of actions on change, its runner, writing the readers |
//! | `takeover.rs`, `systemd.rs` | the handover protocol; sd_notify |
#![forbid(unsafe_code)]

pub mod actions;
mod activation;
mod error;
mod leases;
mod ops;
mod policy_ops;
mod private;
mod refresh;
mod scoped;
mod secrets;
mod services;
mod systemd;
pub mod takeover;
pub mod templates;

pub use error::BrokerError;
pub use leases::SourceRequest;
pub use ops::{GrantRequest, NewValue};
pub use private::{NotPrivate, not_private};
pub use scoped::InputGate;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::audit::{AuditLog, Event, EventKind};
use crate::backend::local::LocalStore;
use crate::backend::vault::VaultBackend;
use crate::config::Config;
use crate::fs::MountTable;
use crate::fs::workload::FsShared;
use crate::identity::Attestor;
use crate::identity::docker::DockerCache;
use private::{check_private, check_run_dir, private_dir, read_key};
use services::{bind, bind_listeners, refuse_if_live, spawn_services, stop_services};

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

/// The running broker's shared state. Its parts are private: callers
/// read through the accessors below and change things only through the
/// write operations (`src/broker/ops.rs`), which keep the mounts up to date.
#[derive(Debug)]
pub struct Broker {
    config: Config,
    store: LocalStore,
    audit: Arc<AuditLog>,
    attestor: Arc<Attestor>,
    docker: Option<Arc<DockerCache>>,
    /// Remote backends, each owning the paths under its name.
    vaults: Vec<crate::backend::VaultSource>,
    mounts: MountTable,
    /// The runtime, for backend calls made from blocking threads.
    rt: tokio::runtime::Handle,
    started: Instant,
    /// Flips to true when the broker begins shutting down.
    stopping: watch::Sender<bool>,
    /// gRPC calls per caller (`[limits] calls_per_second`).
    calls: crate::limits::PerCaller,
    /// gRPC calls per admin caller (`[limits] admin_calls_per_second`).
    admin_calls: crate::limits::PerCaller,
    refusals: crate::limits::Refusals,
    /// Peers refused on `takeover.sock` (audited at most once a second).
    takeover_refusals: takeover::RefusalLog,
    /// The roles in force (scoped admins), as the store holds them.
    roles: Arc<crate::policy::roles::RoleTable>,
    /// Serializes policy changes (see `policy_ops`).
    policy_lock: std::sync::Mutex<()>,
    /// Template renders and which templates read which secret.
    templates: templates::TemplateState,
    /// Per-container dynamic credentials and certificates.
    leases: Arc<crate::lease::Leases>,
    /// The containers that read each file, and the actions queued for
    /// them (`grant --restart`, `--exec`).
    readers: Arc<crate::actions::Readers>,
    actions: actions::ActionQueue,
}

/// Reads of the broker's state, for the services. Nothing here changes
/// anything: writes are in `src/broker/ops.rs`.
impl Broker {
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    pub fn attestor(&self) -> &Arc<Attestor> {
        &self.attestor
    }

    /// The roles in force (scoped admins).
    pub fn roles(&self) -> &Arc<crate::policy::roles::RoleTable> {
        &self.roles
    }

    /// The Docker Engine cache, if there is a Docker socket.
    /// Per-container dynamic credentials and certificates.
    pub fn leases(&self) -> &Arc<crate::lease::Leases> {
        &self.leases
    }

    /// The store (for `crate::lease`, which keeps its leases there).
    pub(crate) fn store(&self) -> &LocalStore {
        &self.store
    }

    /// The Vault/OpenBao backend named `name`.
    pub fn backend_named(&self, name: &str) -> Option<&Arc<VaultBackend>> {
        self.vaults.iter().map(|v| &v.backend).find(|v| v.cfg.name == name)
    }

    pub fn docker(&self) -> Option<&Arc<DockerCache>> {
        self.docker.as_ref()
    }

    /// The Vault backends, in `[[backend]]` order.
    pub fn backends(&self) -> impl Iterator<Item = &Arc<VaultBackend>> {
        self.vaults.iter().map(|v| &v.backend)
    }

    /// How long this broker has been serving (since it opened).
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Becomes true when the broker begins shutting down.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// How many secrets the local store holds.
    pub fn secret_count(&self) -> Result<u64, BrokerError> {
        Ok(self.store.count()?)
    }

    /// Every workload.
    pub fn list_workloads(&self) -> Result<Vec<crate::policy::Workload>, BrokerError> {
        Ok(self.store.workloads()?)
    }

    /// The grants of one workload, or all.
    pub fn list_grants(&self, workload: Option<&str>) -> Result<Vec<crate::policy::Grant>, BrokerError> {
        Ok(self.store.grants(workload)?)
    }

    /// The mounts being served.
    pub fn list_mounts(&self) -> Vec<crate::fs::MountInfo> {
        self.mounts.list()
    }

    pub fn mount_count(&self) -> usize {
        self.mounts.count()
    }

    /// Where the mount of `key` is (or would be).
    pub fn mount_path(&self, key: &crate::fs::MountKey) -> std::path::PathBuf {
        self.mounts.path_of(key)
    }
}

impl Broker {
    /// Count one gRPC call of `id` against `[limits] calls_per_second`,
    /// or `admin_calls_per_second` for an admin; over it, the call is
    /// refused (and audited, at most a line a second per caller).
    pub fn allow_call(&self, id: &crate::identity::Identity, method: &str) -> Result<(), BrokerError> {
        // A user namespace's host uids are all its owner's: one caller (as
        // for denials, `limits::caller_key`), not one bucket per uid.
        let key = match (&id.remote, &id.container_id, id.userns_owner) {
            (Some(r), _, _) => format!("remote {}", r.subject_shown()),
            (None, Some(c), _) => format!("container {c}"),
            (None, None, Some(owner)) => format!("userns {owner}"),
            (None, None, None) => format!("uid {}", id.uid),
        };
        let limits = &self.config.limits;
        // A scoped admin (some role names it) is an admin here too.
        let admin = id.admin || self.roles.any_match(&crate::api::caller_facts(id));
        let (calls, rate, name) = if admin {
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
                audit.record(&Event { reason: Some(&why), ..Event::new(EventKind::AuditReset) })?;
            }
        }
        let docker = crate::identity::runtime::connect(&config.runtimes, rt.clone())?;
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
            vaults.push(crate::backend::VaultSource::new(Arc::new(v), rt.clone()));
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
        let attestor = Arc::new(Attestor::new("/proc", docker.clone()));
        let run_dir = &config.run_dir;
        if run_dir.exists() {
            check_run_dir(run_dir)?;
        } else {
            fs::create_dir_all(run_dir).with_context(|| format!("cannot create run dir {}", run_dir.display()))?;
            // Containers bind the workload socket and mounts from here.
            fs::set_permissions(run_dir, fs::Permissions::from_mode(0o755))?;
        }
        let leases = Arc::new(crate::lease::Leases::load(&store, rt.clone())?);
        let readers = Arc::new(actions::load_readers(&store)?);
        let shared = Arc::new(FsShared {
            readers: readers.clone(),
            leases: leases.clone(),
            attestor: attestor.clone(),
            audit: audit.clone(),
            audit_reads: config.audit_reads,
            admin: config.admin.clone(),
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
            roles: Arc::default(),
            policy_lock: std::sync::Mutex::new(()),
            templates: Default::default(),
            leases,
            readers,
            actions: Default::default(),
        };
        broker.roles.set(broker.store.roles()?);
        if let Some(a) = adopt {
            broker.mounts.adopt(&broker, a.mounts, a.next_ino)?;
        }
        broker.mounts.sync(&broker)?;
        Ok(broker)
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
            let e = Event { reason: Some("the successor refused the state"), ..Event::new(EventKind::TakeoverRefused) };
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
    if let Err(e) = tokio::task::spawn_blocking(move || b.mounts.quiesce()).await? {
        out.fail(&e.to_string());
        *services = spawn_services(broker, listeners)?;
        return Err(anyhow::Error::from(e).context("cannot hand over"));
    }
    let to = format!("to pid {pid}");
    broker.audit.record(&Event { reason: Some(&to), ..Event::new(EventKind::Handover) })?;
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
        tokio::task::spawn_blocking(move || b.mounts.resume()).await??;
        *services = spawn_services(broker, listeners)?;
        let why = format!("{e:#}");
        broker.audit.record(&Event { reason: Some(&why), ..Event::new(EventKind::HandoverFailed) })?;
        return Err(e.context("the handover failed; serving again"));
    }
    if let Err(e) = broker.mounts.handed_over() {
        tracing::error!(error = %e, "the mounts' lifecycle");
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
    // The sockets systemd holds for us, if it started us (socket activation).
    let paths = activation::Paths {
        admin: &config.admin_socket(),
        workload: &config.workload_socket(),
        plugin: config.plugin_socket.as_deref(),
    };
    let activated = activation::take(paths).context("socket activation")?;
    let held = (activated.admin.is_some(), activated.workload.is_some(), activated.plugin.is_some());
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
        // Before touching the state: a running broker keeps it open
        // (unless systemd holds the socket: then it answers, queued).
        if activated.admin.is_none() {
            refuse_if_live(&config.admin_socket()).await?;
        }
        (None, None)
    };
    let rt = tokio::runtime::Handle::current();
    let broker = Arc::new(tokio::task::spawn_blocking(move || Broker::open(config, rt, adopt, new_audit_log)).await??);
    let (listeners, from) = match received {
        Some((l, pid)) => (l, Some(pid)),
        None => (bind_listeners(&broker, activated).await?, None),
    };
    let takeover_l = bind(&takeover_path, 0o600).await?;
    let mut services = spawn_services(&broker, &listeners)?;
    match from {
        Some(pid) => {
            let reason = format!("keyhole {} from pid {pid}", env!("CARGO_PKG_VERSION"));
            broker.audit.record(&Event { reason: Some(&reason), ..Event::new(EventKind::Takeover) })?;
            systemd::notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
        }
        None => {
            broker.audit.record(&Event { reason: Some(env!("CARGO_PKG_VERSION")), ..Event::new(EventKind::Start) })?;
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
    let plugin_path = broker.config.plugin_socket.as_ref().filter(|_| listeners.plugin.is_some() && !held.2);
    // Sockets systemd holds stay: connections wait there for the next broker.
    let admin_path = Some(&admin_path).filter(|_| !held.0);
    let workload_path = Some(&workload_path).filter(|_| !held.1);
    for p in [admin_path, workload_path, Some(&takeover_path), plugin_path].into_iter().flatten() {
        let _ = fs::remove_file(p);
    }
    let b = broker.clone();
    tokio::task::spawn_blocking(move || b.mounts.shutdown()).await?;
    broker.audit.record(&Event { reason: Some(why), ..Event::new(EventKind::Stop) })?;
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
