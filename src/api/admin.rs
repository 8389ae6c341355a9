//! The `Admin` service. Every call attests its caller, refuses anyone who
//! is not an admin, and writes one audit line, success or failure.
#![forbid(unsafe_code)]

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::pb::{self, admin_server, put_secret_request::Source};
use super::remote::{show, subject_of};
use super::{ApiError, blocking, describe, peer_of};
use crate::audit::Event;
use crate::backend::VersionMeta;
use crate::broker::{Broker, GrantRequest, NewValue, SourceRequest};
use crate::identity::Identity;
use crate::lease::{Kind, Source as LeaseSource};
use crate::policy::{Grant, Workload};
use crate::secret::{SecretBytes, SecretPath, validate_prefix};

pub struct AdminService(pub Arc<Broker>);

type Reply<T> = Result<Response<T>, Status>;

fn version_pb(path: &str, m: VersionMeta) -> pb::SecretVersion {
    pb::SecretVersion { path: path.to_owned(), version: m.version, created_unix_ms: m.created_unix_ms, size: m.size }
}

fn workload_pb(w: &Workload) -> pb::WorkloadSpec {
    pb::WorkloadSpec { name: w.name.clone(), selectors: w.selectors.iter().map(ToString::to_string).collect() }
}

fn grant_pb(g: &Grant) -> pb::GrantSpec {
    pb::GrantSpec {
        secret: g.target.to_string(),
        workload: g.workload.clone(),
        file: g.file.clone().unwrap_or_default(),
        mode: g.mode,
        uid: g.uid,
        gid: g.gid,
        notify: g.notify.clone().unwrap_or_default(),
    }
}

fn backend_status(v: &crate::backend::vault::VaultBackend) -> pb::BackendStatus {
    use crate::backend::vault::Freshness;
    let (_, last_ok, last_error) = v.health.snapshot();
    let (address, auth) = v.describe();
    let state = match v.health.freshness() {
        Freshness::Fresh => "ok",
        Freshness::Stale => "stale",
        Freshness::Expired => "expired",
    };
    pb::BackendStatus {
        name: v.cfg.name.clone(),
        kind: "vault".into(),
        address,
        auth: auth.into(),
        state: state.into(),
        last_ok_unix_ms: last_ok
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64),
        last_error: last_error.unwrap_or_default(),
        cached_secrets: v.cached_count() as u64,
    }
}

impl AdminService {
    /// Attest the caller and require an admin. A refusal is audited.
    async fn authorize<T>(&self, req: &Request<T>, method: &'static str) -> Result<Identity, ApiError> {
        if let Some(certs) = req.peer_certs() {
            return self.authorize_remote(req, &certs, method);
        }
        let peer = peer_of(req)?;
        let audit = &self.0.audit;
        let attestor = self.0.attestor.clone();
        let p = peer.clone();
        let attested = blocking(move || Ok(attestor.attest(&p))).await?;
        if let Ok(id) = &attested {
            self.0.allow_call(id, method)?;
        }
        match attested {
            Ok(id) if id.admin => Ok(id),
            Ok(id) => {
                audit.deny(
                    &crate::limits::deny_key(&id),
                    &Event {
                        method: Some(method),
                        caller: Some(&id),
                        reason: Some("not an admin"),
                        ..Event::new("deny")
                    },
                )?;
                Err(ApiError::PermissionDenied(format!(
                    "{method} needs an admin caller (a host process with uid 0 or an [admin] uid/gid); the broker sees {}",
                    describe(&id)
                )))
            }
            Err(e) => {
                let who = Identity { uid: peer.uid, gid: peer.gid, pid: peer.pid, ..Identity::default() };
                let reason = e.to_string();
                audit.deny(
                    &crate::limits::deny_key(&who),
                    &Event { method: Some(method), caller: Some(&who), reason: Some(&reason), ..Event::new("deny") },
                )?;
                Err(e.into())
            }
        }
    }

    /// A remote client, already through mutual TLS: an admin if its
    /// certificate's subject is listed. A refusal is audited.
    fn authorize_remote<T>(
        &self,
        req: &Request<T>,
        certs: &[tonic::transport::CertificateDer<'static>],
        method: &'static str,
    ) -> Result<Identity, ApiError> {
        let from = req.remote_addr().map_or_else(|| "an unknown address".into(), |a| a.to_string());
        let subject = certs.first().ok_or_else(|| "no client certificate".to_owned()).and_then(|c| subject_of(c));
        let (shown, admin) = match &subject {
            Ok(s) => (show(s), self.0.config.admin.allows_subject(s)),
            Err(e) => (e.clone(), false),
        };
        let id = Identity { remote: Some(format!("{shown} from {from}")), admin, ..Identity::default() };
        self.0.allow_call(&id, method)?;
        if admin {
            return Ok(id);
        }
        self.0.audit.deny(
            &crate::limits::deny_key(&id),
            &Event {
                method: Some(method),
                caller: Some(&id),
                reason: Some("client certificate subject is not in [admin] subjects"),
                ..Event::new("deny")
            },
        )?;
        Err(ApiError::PermissionDenied(format!(
            "{method} needs an admin: the subject {shown} is not listed in the broker's [admin] subjects"
        )))
    }

    /// Run a broker operation (which stores, updates the mounts,
    /// announces and audits; see `crate::broker::ops`) off the async
    /// workers.
    async fn op<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Broker) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let broker = self.0.clone();
        blocking(move || op(&broker)).await
    }

    /// Run a read off the async workers and audit its outcome as `event`:
    /// with the version it reports on success, with the error otherwise.
    /// If the audit line cannot be written, the call fails.
    async fn audited<T: Send + 'static>(
        &self,
        id: Identity,
        event: &'static str,
        path: Option<String>,
        op: impl FnOnce(&Broker) -> Result<(T, Option<u64>), ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        self.audited_for(id, event, None, path, op).await
    }

    /// [`Self::audited`], naming the workload the call concerns.
    async fn audited_for<T: Send + 'static>(
        &self,
        id: Identity,
        event: &'static str,
        workload: Option<String>,
        path: Option<String>,
        op: impl FnOnce(&Broker) -> Result<(T, Option<u64>), ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let broker = self.0.clone();
        blocking(move || {
            let result = op(&broker);
            let (version, reason) = match &result {
                Ok((_, v)) => (*v, None),
                Err(e) => (None, Some(e.to_string())),
            };
            broker.audit.record(&Event {
                caller: Some(&id),
                workload: workload.as_deref(),
                path: path.as_deref(),
                version,
                reason: reason.as_deref(),
                ..Event::new(event)
            })?;
            result.map(|(t, _)| t)
        })
        .await
    }
}

#[tonic::async_trait]
impl admin_server::Admin for AdminService {
    async fn put_secret(&self, req: Request<pb::PutSecretRequest>) -> Reply<pb::SecretVersion> {
        let id = self.authorize(&req, "PutSecret").await?;
        let r = req.into_inner();
        let rotate = match pb::PutMode::try_from(r.mode) {
            Ok(pb::PutMode::Rotate) => true,
            Ok(_) => false,
            Err(_) => return Err(ApiError::InvalidArgument(format!("unknown put mode {}", r.mode)).into()),
        };
        let value = match r.source {
            Some(Source::Value(mut v)) => NewValue::Bytes(SecretBytes::take(&mut v)),
            Some(Source::GenerateLength(n)) => NewValue::Generate(n),
            None => NewValue::Missing,
        };
        let (path, if_version) = (r.path, r.if_version);
        let meta = self.op(move |b| b.put(&id, &path, value, rotate, if_version).map(|m| (path, m))).await?;
        Ok(Response::new(version_pb(&meta.0, meta.1)))
    }

    async fn get_secret(&self, req: Request<pb::GetSecretRequest>) -> Reply<pb::GetSecretResponse> {
        let id = self.authorize(&req, "GetSecret").await?;
        let pb::GetSecretRequest { path, version } = req.into_inner();
        let reply = self
            .audited(id, "get", Some(path.clone()), move |b| {
                let path = SecretPath::parse(&path)?;
                let (meta, value) = b.get_secret(&path, (version != 0).then_some(version))?;
                let v = meta.version;
                // The encoder needs a plain buffer: this copy is the value's
                // way out to the admin who asked for it.
                let value = value.expose().to_vec();
                Ok((pb::GetSecretResponse { meta: Some(version_pb(path.as_str(), meta)), value }, Some(v)))
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn list_secrets(&self, req: Request<pb::ListSecretsRequest>) -> Reply<pb::ListSecretsResponse> {
        let id = self.authorize(&req, "ListSecrets").await?;
        let prefix = req.into_inner().prefix;
        let shown = (!prefix.is_empty()).then(|| prefix.clone());
        let secrets = self
            .audited(id, "ls", shown, move |b| {
                validate_prefix(&prefix)?;
                let list = b.list_secrets(&prefix)?;
                Ok((list.into_iter().map(|(p, m)| version_pb(&p, m)).collect(), None))
            })
            .await?;
        Ok(Response::new(pb::ListSecretsResponse { secrets }))
    }

    async fn secret_history(&self, req: Request<pb::SecretHistoryRequest>) -> Reply<pb::SecretHistoryResponse> {
        let id = self.authorize(&req, "SecretHistory").await?;
        let path = req.into_inner().path;
        let versions = self
            .audited(id, "history", Some(path.clone()), move |b| {
                let path = SecretPath::parse(&path)?;
                let h = b.secret_history(&path)?;
                Ok((h.into_iter().map(|m| version_pb(path.as_str(), m)).collect(), None))
            })
            .await?;
        Ok(Response::new(pb::SecretHistoryResponse { versions }))
    }

    async fn delete_secret(&self, req: Request<pb::DeleteSecretRequest>) -> Reply<pb::DeleteSecretResponse> {
        let id = self.authorize(&req, "DeleteSecret").await?;
        let path = req.into_inner().path;
        let removed = self.op(move |b| b.remove(&id, &path)).await?;
        Ok(Response::new(pb::DeleteSecretResponse { versions_removed: removed as u32 }))
    }

    async fn ping(&self, _req: Request<pb::PingRequest>) -> Reply<pb::PingResponse> {
        Ok(Response::new(pb::PingResponse { version: env!("CARGO_PKG_VERSION").into() }))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Reply<pb::StatusResponse> {
        let id = self.authorize(&req, "Status").await?;
        let reply = self
            .audited(id, "status", None, |b| {
                let (buffers, locked) = SecretBytes::counts();
                let c = &b.config;
                let status = pb::StatusResponse {
                    version: env!("CARGO_PKG_VERSION").into(),
                    pid: std::process::id(),
                    uptime_seconds: b.started.elapsed().as_secs(),
                    state_dir: c.state_dir.display().to_string(),
                    run_dir: c.run_dir.display().to_string(),
                    key_source: c.key.label().into(),
                    secrets: b.store.count()?,
                    audit_lines: b.audit.lines_written(),
                    history_depth: c.history_depth,
                    max_value_bytes: c.max_value_bytes,
                    secret_buffers: buffers,
                    secret_buffers_locked: locked,
                    backends: b.vaults.iter().map(|v| backend_status(v)).collect(),
                };
                Ok((status, None))
            })
            .await?;
        Ok(Response::new(reply))
    }

    type AuditLogStream = ReceiverStream<Result<pb::AuditLine, Status>>;

    async fn audit_log(&self, req: Request<pb::AuditLogRequest>) -> Reply<Self::AuditLogStream> {
        let id = self.authorize(&req, "AuditLog").await?;
        let follow = req.into_inner().follow;
        let (lines, mut seen, mut rx) =
            self.audited(id, "audit_read", None, |b| Ok((b.audit.subscribe(), None))).await?;
        let (tx, out) = mpsc::channel(256);
        let mut stopping = self.0.stopping.subscribe();
        tokio::spawn(async move {
            for json in lines {
                if tx.send(Ok(pb::AuditLine { json })).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                let msg = tokio::select! {
                    m = rx.recv() => m,
                    () = tx.closed() => return,
                    _ = stopping.wait_for(|s| *s) => return,
                };
                match msg {
                    Ok((seq, _)) if seq <= seen => {}
                    Ok((seq, json)) => {
                        seen = seq;
                        if tx.send(Ok(pb::AuditLine { json })).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let msg = format!("this follower fell {n} lines behind; run `keyhole audit --follow` again");
                        let _ = tx.send(Err(Status::resource_exhausted(msg))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn audit_verify(&self, req: Request<pb::AuditVerifyRequest>) -> Reply<pb::AuditVerifyResponse> {
        let id = self.authorize(&req, "AuditVerify").await?;
        let b = self.0.clone();
        let reply = blocking(move || {
            let checked = b.audit.verify();
            let problem = checked.as_ref().err().map(|e| e.to_string());
            b.audit.record(&Event { caller: Some(&id), reason: problem.as_deref(), ..Event::new("audit_verify") })?;
            Ok(pb::AuditVerifyResponse {
                ok: problem.is_none(),
                lines: checked.unwrap_or(0),
                problem: problem.unwrap_or_default(),
            })
        })
        .await?;
        Ok(Response::new(reply))
    }

    async fn add_workload(&self, req: Request<pb::WorkloadSpec>) -> Reply<pb::WorkloadSpec> {
        let id = self.authorize(&req, "AddWorkload").await?;
        let spec = req.into_inner();
        let w = self.op(move |b| b.add_workload(&id, &spec.name, &spec.selectors)).await?;
        Ok(Response::new(workload_pb(&w)))
    }

    async fn list_workloads(&self, req: Request<pb::ListWorkloadsRequest>) -> Reply<pb::ListWorkloadsResponse> {
        let id = self.authorize(&req, "ListWorkloads").await?;
        let workloads = self
            .audited(id, "workload_ls", None, |b| Ok((b.store.workloads()?.iter().map(workload_pb).collect(), None)))
            .await?;
        Ok(Response::new(pb::ListWorkloadsResponse { workloads }))
    }

    async fn remove_workload(&self, req: Request<pb::RemoveWorkloadRequest>) -> Reply<pb::RemoveWorkloadResponse> {
        let id = self.authorize(&req, "RemoveWorkload").await?;
        let name = req.into_inner().name;
        let removed = self.op(move |b| b.remove_workload(&id, &name)).await?;
        Ok(Response::new(pb::RemoveWorkloadResponse { grants_removed: removed as u32 }))
    }

    async fn grant(&self, req: Request<pb::GrantSpec>) -> Reply<pb::GrantSpec> {
        let id = self.authorize(&req, "Grant").await?;
        let g = req.into_inner();
        let asked = GrantRequest {
            secret: g.secret,
            workload: g.workload,
            file: g.file,
            mode: g.mode,
            uid: g.uid,
            gid: g.gid,
            notify: g.notify,
        };
        let grant = self.op(move |b| b.grant(&id, &asked)).await?;
        Ok(Response::new(grant_pb(&grant)))
    }

    async fn revoke(&self, req: Request<pb::RevokeRequest>) -> Reply<pb::RevokeResponse> {
        let id = self.authorize(&req, "Revoke").await?;
        let r = req.into_inner();
        self.op(move |b| b.revoke(&id, &r.workload, &r.secret)).await?;
        Ok(Response::new(pb::RevokeResponse {}))
    }

    async fn list_grants(&self, req: Request<pb::ListGrantsRequest>) -> Reply<pb::ListGrantsResponse> {
        let id = self.authorize(&req, "ListGrants").await?;
        let w = req.into_inner().workload;
        let grants = self
            .audited(id, "grants", None, move |b| {
                let only = (!w.is_empty()).then_some(w.as_str());
                Ok((b.store.grants(only)?.iter().map(grant_pb).collect(), None))
            })
            .await?;
        Ok(Response::new(pb::ListGrantsResponse { grants }))
    }

    async fn list_mounts(&self, req: Request<pb::ListMountsRequest>) -> Reply<pb::ListMountsResponse> {
        let id = self.authorize(&req, "ListMounts").await?;
        let mounts = self
            .audited(id, "mounts", None, |b| {
                let list = b.mounts.list().into_iter().map(|m| pb::MountEntry {
                    workload: m.workload,
                    path: m.path.display().to_string(),
                    files: m.files,
                });
                Ok((list.collect(), None))
            })
            .await?;
        Ok(Response::new(pb::ListMountsResponse { mounts }))
    }

    async fn add_source(&self, req: Request<pb::SourceSpec>) -> Reply<pb::SourceSpec> {
        let id = self.authorize(&req, "AddSource").await?;
        let s = req.into_inner();
        let kind = source_kind(&s.kind)?;
        let nonempty = |v: String| (!v.is_empty()).then_some(v);
        let asked = SourceRequest {
            name: s.name,
            backend: s.backend,
            path: s.path,
            uri: nonempty(s.uri),
            cn: nonempty(s.cn),
            ttl: nonempty(s.ttl),
        };
        let src = self.op(move |b| b.add_source(&id, kind, &asked)).await?;
        Ok(Response::new(source_pb(&src)))
    }

    async fn list_sources(&self, req: Request<pb::ListSourcesRequest>) -> Reply<pb::ListSourcesResponse> {
        let id = self.authorize(&req, "ListSources").await?;
        let kind = req.into_inner().kind;
        let only = if kind.is_empty() { None } else { Some(source_kind(&kind)?) };
        let sources = self
            .audited(id, "sources", None, move |b| {
                let list = b.leases.sources().into_iter().filter(|s| only.is_none_or(|k| s.kind == k));
                Ok((list.map(|s| source_pb(&s)).collect(), None))
            })
            .await?;
        Ok(Response::new(pb::ListSourcesResponse { sources }))
    }

    async fn remove_source(&self, req: Request<pb::RemoveSourceRequest>) -> Reply<pb::RemoveSourceResponse> {
        let id = self.authorize(&req, "RemoveSource").await?;
        let r = req.into_inner();
        let kind = source_kind(&r.kind)?;
        self.op(move |b| b.remove_source(&id, kind, &r.name)).await?;
        Ok(Response::new(pb::RemoveSourceResponse {}))
    }

    async fn list_leases(&self, req: Request<pb::ListLeasesRequest>) -> Reply<pb::ListLeasesResponse> {
        let id = self.authorize(&req, "ListLeases").await?;
        let w = req.into_inner().workload;
        let leases = self
            .audited_for(id, "leases", (!w.is_empty()).then(|| w.clone()), None, move |b| {
                let only = (!w.is_empty()).then_some(w.as_str());
                let list = b.leases.list(only).into_iter().map(|l| pb::LeaseEntry {
                    source: l.source,
                    workload: l.workload,
                    container: l.container,
                    container_name: l.container_name,
                    backend: l.backend,
                    issued_unix: l.issued_unix as i64,
                    expires_unix: l.expires_unix as i64,
                    serial: l.serial.unwrap_or_default(),
                    state: l.state,
                });
                Ok((list.collect(), None))
            })
            .await?;
        Ok(Response::new(pb::ListLeasesResponse { leases }))
    }
}

fn source_kind(kind: &str) -> Result<Kind, Status> {
    match kind {
        "dynamic" => Ok(Kind::Dynamic),
        "cert" => Ok(Kind::Cert),
        k => Err(Status::invalid_argument(format!("source kind {k:?} is not dynamic or cert"))),
    }
}

fn source_pb(s: &LeaseSource) -> pb::SourceSpec {
    pb::SourceSpec {
        kind: s.kind.as_str().into(),
        name: s.name.clone(),
        backend: s.backend.clone(),
        path: s.path.clone(),
        uri: s.uri.clone().unwrap_or_default(),
        cn: s.cn.clone().unwrap_or_default(),
        ttl: s
            .ttl_secs
            .map(|t| humantime::format_duration(std::time::Duration::from_secs(t)).to_string())
            .unwrap_or_default(),
    }
}
