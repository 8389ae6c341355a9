//! What serves callers: binding the sockets (replacing stale ones), and
//! starting and stopping the gRPC servers on them, the volume plugin,
//! the backend watchers, the metrics listener and remote admin.
#![forbid(unsafe_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::net::UnixListener;
use tonic::transport::Server;

use super::private::check_private;
use super::{Broker, activation, secrets, takeover};
use crate::api::admin::AdminService;
use crate::api::pb::{admin_server::AdminServer, workload_server::WorkloadServer};
use crate::api::peer;
use crate::api::workload::WorkloadService;

/// Refuse to start where a live broker answers on `path`.
pub(super) async fn refuse_if_live(path: &Path) -> anyhow::Result<()> {
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        bail!("another broker is serving on {}; stop it first", path.display());
    }
    Ok(())
}

/// Bind a socket, replacing a stale one left by a broker that died.
pub(super) async fn bind(path: &Path, mode: u32) -> anyhow::Result<UnixListener> {
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
pub(super) async fn bind_listeners(
    broker: &Broker,
    held: activation::Activated,
) -> anyhow::Result<takeover::Listeners> {
    let mut plugin = None;
    if let Some(l) = held.plugin {
        plugin = Some(l);
    } else if let (Some(sock), Some(_)) = (&broker.config.plugin_socket, &broker.docker) {
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
    let admin = match (held.admin, broker.config.admin.socket_group) {
        (Some(l), _) => l,
        // Admins by group reach the admin socket; everyone else is still
        // refused by the kernel.
        (None, Some(gid)) => {
            let l = bind(&admin_path, 0o600).await?.into_std()?;
            std::os::unix::fs::chown(&admin_path, None, Some(gid))
                .with_context(|| format!("cannot give {} to group {gid}", admin_path.display()))?;
            fs::set_permissions(&admin_path, fs::Permissions::from_mode(0o660))?;
            l
        }
        (None, None) => bind(&admin_path, 0o600).await?.into_std()?,
    };
    let workload = match held.workload {
        Some(l) => l,
        None => bind(&broker.config.workload_socket(), 0o666).await?.into_std()?,
    };
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
pub(super) fn spawn_services(
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
        let admin_policy = Arc::new(broker.config.admin.clone());
        let (admins, strangers) =
            peer::incoming(serving_copy(l)?, gate, broker.attestor.clone(), admin_policy, broker.roles.clone());
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
        tasks.push(tokio::spawn(secrets::watch_backend(broker.clone(), v.backend.clone())));
    }
    tasks.push(tokio::spawn(crate::lease::keeper(broker.clone())));
    tasks.push(tokio::spawn(super::actions::run_actions(broker.clone())));
    tasks.push(tokio::spawn(super::actions::flush_readers(broker.clone())));
    if !broker.vaults.is_empty() {
        tokio::spawn(broker.clone().fetch_template_fields());
    }
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
pub(super) async fn stop_services(broker: &Broker, tasks: Vec<tokio::task::JoinHandle<()>>) {
    broker.stopping.send_replace(true);
    for t in tasks {
        if tokio::time::timeout(std::time::Duration::from_secs(10), t).await.is_err() {
            tracing::warn!("a server did not stop within 10 s");
        }
    }
}
