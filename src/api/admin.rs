//! The `Admin` service. Every call attests its caller, refuses anyone who
//! is not an admin, and writes one audit line, success or failure.
#![forbid(unsafe_code)]

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::pb::{self, admin_server, put_secret_request::Source};
use super::remote;
use super::{ApiError, blocking, describe, peer_of};
use crate::audit::{Event, EventKind};
use crate::backend::VersionMeta;
use crate::broker::{Broker, NewValue, SourceRequest};
use crate::identity::Identity;
use crate::lease::{Kind, Source as LeaseSource};
use crate::policy::roles::{Need, Scope, Verb};
use crate::policy::{Grant, Workload, admin};
use crate::secret::{SecretBytes, SecretPath, validate_prefix};

pub struct AdminService(pub Arc<Broker>);

/// An authorized caller: who it is, and what it may do.
pub(crate) struct Caller {
    pub id: Identity,
    pub scope: Scope,
}

type Reply<T> = Result<Response<T>, Status>;

fn version_pb(path: &str, m: VersionMeta) -> pb::SecretVersion {
    pb::SecretVersion { path: path.to_owned(), version: m.version, created_unix_ms: m.created_unix_ms, size: m.size }
}

fn workload_pb(w: &Workload) -> pb::WorkloadSpec {
    pb::WorkloadSpec { name: w.name.clone(), selectors: w.selectors.iter().map(ToString::to_string).collect() }
}

fn grant_pb(g: &Grant) -> pb::GrantSpec {
    let template = crate::broker::templates::template_of(&g.target).unwrap_or_default().to_owned();
    pb::GrantSpec {
        secret: if template.is_empty() { g.target.to_string() } else { String::new() },
        template,
        workload: g.workload.clone(),
        file: g.file.clone().unwrap_or_default(),
        mode: g.mode,
        uid: g.uid,
        gid: g.gid,
        notify: g.notify.clone().unwrap_or_default(),
        restart: g.on_change.restart(),
        restart_spacing: g.on_change.spacing_text().unwrap_or_default(),
        exec: g.on_change.exec_text().unwrap_or_default(),
    }
}

fn backend_status(v: &crate::backend::vault::VaultBackend) -> pb::BackendStatus {
    use crate::backend::health::Freshness;
    let (_, last_ok, last_error) = v.health.snapshot();
    let (address, auth) = v.describe();
    let (detection, note, scan) = v.change_detection();
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
        change_detection: detection.into(),
        change_detection_note: note.unwrap_or_default(),
        scan_dirs: scan.dirs as u64,
        scan_requests: scan.requests,
        scan_bytes: scan.bytes,
        watched_secrets: scan.watched,
        scan_fetched: scan.fetched,
        last_scan_unix_ms: scan
            .at
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64),
        addresses: v.nodes.addresses().to_vec(),
        node_switches: v.nodes.switches(),
        scan_sparse_dirs: scan.sparse_dirs as u64,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl AdminService {
    /// Attest the caller, require an admin, and decide `need` against its
    /// scope: a full admin may do anything; a scoped admin (some role
    /// names it) what its roles allow (see [`crate::policy::roles`]). The
    /// one authorization of every Admin call. A refusal is audited, with
    /// the caller's roles and what they lacked.
    pub(super) async fn authorize<T>(
        &self,
        req: &Request<T>,
        method: &'static str,
        need: Need<'_>,
    ) -> Result<Caller, ApiError> {
        let (id, scope) = if let Some(certs) = req.peer_certs() {
            self.authorize_remote(req, &certs, method)?
        } else {
            self.authorize_local(req, method).await?
        };
        if let Err(lack) = scope.check(need) {
            let reason = format!("role {}: {}", lack.roles, lack.lacked);
            self.0.audit().deny(
                &crate::limits::caller_key(&id),
                &Event {
                    method: Some(method),
                    caller: Some(&id),
                    reason: Some(&reason),
                    ..Event::new(EventKind::Deny)
                },
            )?;
            return Err(ApiError::PermissionDenied(format!("{method}: {}", lack)));
        }
        Ok(Caller { id, scope })
    }

    /// A local caller: a full admin, or a scoped one.
    async fn authorize_local<T>(&self, req: &Request<T>, method: &'static str) -> Result<(Identity, Scope), ApiError> {
        let peer = peer_of(req)?;
        let audit = self.0.audit();
        let attestor = self.0.attestor().clone();
        let p = peer.clone();
        let admins = self.0.config().admin.clone();
        let attested = blocking(move || Ok(attestor.attest(&p).map(|id| admin::decided(id, &admins)))).await?;
        if let Ok(id) = &attested {
            self.0.allow_call(id, method)?;
        }
        match attested {
            Ok(id) if id.admin => Ok((id, Scope::Full)),
            Ok(id) => {
                if let Some(scope) = self.0.roles().scope_of(&super::caller_facts(&id)) {
                    return Ok((id, scope));
                }
                audit.deny(
                    &crate::limits::caller_key(&id),
                    &Event {
                        method: Some(method),
                        caller: Some(&id),
                        reason: Some("not an admin"),
                        ..Event::new(EventKind::Deny)
                    },
                )?;
                Err(ApiError::PermissionDenied(format!(
                    "{method} needs an admin caller (a host process with uid 0 or an [admin] uid/gid); the broker sees {}",
                    describe(&id)
                )))
            }
            Err(e) => {
                let who = Identity::unattested(peer.uid, peer.gid, peer.pid);
                let reason = e.to_string();
                audit.deny(
                    &crate::limits::caller_key(&who),
                    &Event {
                        method: Some(method),
                        caller: Some(&who),
                        reason: Some(&reason),
                        ..Event::new(EventKind::Deny)
                    },
                )?;
                Err(e.into())
            }
        }
    }

    /// A remote client, already through mutual TLS: a full admin if its
    /// certificate's subject is listed, a scoped one if a role names it.
    /// A refusal is audited.
    fn authorize_remote<T>(
        &self,
        req: &Request<T>,
        certs: &[tonic::transport::CertificateDer<'static>],
        method: &'static str,
    ) -> Result<(Identity, Scope), ApiError> {
        let id = admin::decided(remote::caller(Some(certs), req.remote_addr()), &self.0.config().admin);
        self.0.allow_call(&id, method)?;
        if id.admin {
            return Ok((id, Scope::Full));
        }
        if let Some(scope) = self.0.roles().scope_of(&super::caller_facts(&id)) {
            return Ok((id, scope));
        }
        let shown = id.remote.as_ref().map(crate::identity::Remote::subject_shown).unwrap_or_default();
        self.0.audit().deny(
            &crate::limits::caller_key(&id),
            &Event {
                method: Some(method),
                caller: Some(&id),
                reason: Some("client certificate subject is not in [admin] subjects"),
                ..Event::new(EventKind::Deny)
            },
        )?;
        Err(ApiError::PermissionDenied(format!(
            "{method} needs an admin: the subject {shown} is not listed in the broker's [admin] subjects"
        )))
    }

    /// Run a broker operation (which stores, updates the mounts,
    /// announces and audits; see `crate::broker::ops`) off the async
    /// workers.
    pub(super) async fn op<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Broker) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let broker = self.0.clone();
        blocking(move || op(&broker)).await
    }

    /// Run a read off the async workers and audit its outcome as `event`:
    /// with the version it reports on success, with the error otherwise.
    /// If the audit line cannot be written, the call fails.
    pub(super) async fn audited<T: Send + 'static>(
        &self,
        id: Identity,
        event: EventKind,
        path: Option<String>,
        op: impl FnOnce(&Broker) -> Result<(T, Option<u64>), ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        self.audited_for(id, event, None, path, op).await
    }

    /// [`Self::audited`], naming the workload the call concerns.
    async fn audited_for<T: Send + 'static>(
        &self,
        id: Identity,
        event: EventKind,
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
            broker.audit().record(&Event {
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
        let Caller { id, .. } = self.authorize(&req, "PutSecret", Need::Path(Verb::Write, &req.get_ref().path)).await?;
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
        let Caller { id, .. } = self.authorize(&req, "GetSecret", Need::Path(Verb::Read, &req.get_ref().path)).await?;
        let pb::GetSecretRequest { path, version } = req.into_inner();
        let reply = self
            .audited(id, EventKind::Get, Some(path.clone()), move |b| {
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
        let Caller { id, scope } = self.authorize(&req, "ListSecrets", Need::Verb(Verb::Read)).await?;
        let prefix = req.into_inner().prefix;
        let shown = (!prefix.is_empty()).then(|| prefix.clone());
        let secrets = self
            .audited(id, EventKind::Ls, shown, move |b| {
                validate_prefix(&prefix)?;
                let list = b.list_secrets(&prefix)?;
                let mine = list.into_iter().filter(|(p, _)| scope.covers_path(Verb::Read, p));
                Ok((mine.map(|(p, m)| version_pb(&p, m)).collect(), None))
            })
            .await?;
        Ok(Response::new(pb::ListSecretsResponse { secrets }))
    }

    async fn secret_history(&self, req: Request<pb::SecretHistoryRequest>) -> Reply<pb::SecretHistoryResponse> {
        let Caller { id, .. } =
            self.authorize(&req, "SecretHistory", Need::Path(Verb::Read, &req.get_ref().path)).await?;
        let path = req.into_inner().path;
        let versions = self
            .audited(id, EventKind::History, Some(path.clone()), move |b| {
                let path = SecretPath::parse(&path)?;
                let h = b.secret_history(&path)?;
                Ok((h.into_iter().map(|m| version_pb(path.as_str(), m)).collect(), None))
            })
            .await?;
        Ok(Response::new(pb::SecretHistoryResponse { versions }))
    }

    async fn delete_secret(&self, req: Request<pb::DeleteSecretRequest>) -> Reply<pb::DeleteSecretResponse> {
        let Caller { id, .. } =
            self.authorize(&req, "DeleteSecret", Need::Path(Verb::Write, &req.get_ref().path)).await?;
        let path = req.into_inner().path;
        let removed = self.op(move |b| b.remove(&id, &path)).await?;
        Ok(Response::new(pb::DeleteSecretResponse { versions_removed: removed as u32 }))
    }

    async fn refresh(&self, req: Request<pb::RefreshRequest>) -> Reply<pb::RefreshResponse> {
        let path = req.get_ref().path.clone();
        let need = if path.is_empty() { Need::Verb(Verb::Refresh) } else { Need::Path(Verb::Refresh, &path) };
        let Caller { id, scope } = self.authorize(&req, "Refresh", need).await?;
        let r = req.into_inner();
        let named = if r.path.is_empty() { r.backend.clone() } else { r.path.clone() };
        let found = self
            .audited(id, EventKind::Refresh, (!named.is_empty()).then_some(named), move |b| {
                Ok((b.refresh_backends(&r.path, &r.backend)?, None))
            })
            .await?;
        let backends = found
            .into_iter()
            .map(|f| pb::RefreshedBackend {
                name: f.backend,
                change_detection: f.change_detection.into(),
                requests: f.requests,
                watched: f.watched,
                // A scoped admin sees the names its roles cover, as `ls` does.
                changed: f.changed.into_iter().filter(|p| scope.covers_path(Verb::Refresh, p)).collect(),
                path_watched: f.path_watched,
            })
            .collect();
        Ok(Response::new(pb::RefreshResponse { backends }))
    }

    async fn ping(&self, _req: Request<pb::PingRequest>) -> Reply<pb::PingResponse> {
        Ok(Response::new(pb::PingResponse { version: env!("CARGO_PKG_VERSION").into() }))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Reply<pb::StatusResponse> {
        let Caller { id, .. } = self.authorize(&req, "Status", Need::FullAdmin).await?;
        let reply = self
            .audited(id, EventKind::Status, None, |b| {
                let (buffers, locked) = SecretBytes::counts();
                let c = b.config();
                let status = pb::StatusResponse {
                    version: env!("CARGO_PKG_VERSION").into(),
                    pid: std::process::id(),
                    uptime_seconds: b.uptime().as_secs(),
                    state_dir: c.state_dir.display().to_string(),
                    run_dir: c.run_dir.display().to_string(),
                    key_source: c.key.label().into(),
                    secrets: b.secret_count()?,
                    audit_lines: b.audit().lines_written(),
                    history_depth: c.history_depth,
                    max_value_bytes: c.max_value_bytes,
                    secret_buffers: buffers,
                    secret_buffers_locked: locked,
                    backends: b.backends().map(|v| backend_status(v)).collect(),
                    leases: b.leases().count() as u64,
                    revocations_pending: b.leases().pending_revocations().0 as u64,
                };
                Ok((status, None))
            })
            .await?;
        Ok(Response::new(reply))
    }

    type AuditLogStream = ReceiverStream<Result<pb::AuditLine, Status>>;

    async fn audit_log(&self, req: Request<pb::AuditLogRequest>) -> Reply<Self::AuditLogStream> {
        let Caller { id, .. } = self.authorize(&req, "AuditLog", Need::Verb(Verb::Audit)).await?;
        let follow = req.into_inner().follow;
        let (lines, mut seen, mut rx) =
            self.audited(id, EventKind::AuditRead, None, |b| Ok((b.audit().subscribe(), None))).await?;
        let (tx, out) = mpsc::channel(256);
        let mut stopping = self.0.stopping();
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
        let Caller { id, .. } = self.authorize(&req, "AuditVerify", Need::Verb(Verb::Audit)).await?;
        let b = self.0.clone();
        let reply = blocking(move || {
            let checked = b.audit().verify();
            let problem = checked.as_ref().err().map(|e| e.to_string());
            b.audit().record(&Event {
                caller: Some(&id),
                reason: problem.as_deref(),
                ..Event::new(EventKind::AuditVerify)
            })?;
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
        let r = req.get_ref();
        let need = Need::Workload(Verb::Workload, &r.name, Some(&r.selectors));
        let Caller { id, .. } = self.authorize(&req, "AddWorkload", need).await?;
        let spec = req.into_inner();
        let w = self.op(move |b| b.add_workload(&id, &spec.name, &spec.selectors)).await?;
        Ok(Response::new(workload_pb(&w)))
    }

    async fn list_workloads(&self, req: Request<pb::ListWorkloadsRequest>) -> Reply<pb::ListWorkloadsResponse> {
        let Caller { id, scope } = self.authorize(&req, "ListWorkloads", Need::AnyRole).await?;
        let workloads = self
            .audited(id, EventKind::WorkloadLs, None, move |b| {
                let all = b.list_workloads()?;
                Ok((all.iter().filter(|w| scope.sees_workload(&w.name)).map(workload_pb).collect(), None))
            })
            .await?;
        Ok(Response::new(pb::ListWorkloadsResponse { workloads }))
    }

    async fn remove_workload(&self, req: Request<pb::RemoveWorkloadRequest>) -> Reply<pb::RemoveWorkloadResponse> {
        let need = Need::Workload(Verb::Workload, &req.get_ref().name, None);
        let Caller { id, .. } = self.authorize(&req, "RemoveWorkload", need).await?;
        let name = req.into_inner().name;
        let removed = self.op(move |b| b.remove_workload(&id, &name)).await?;
        Ok(Response::new(pb::RemoveWorkloadResponse { grants_removed: removed as u32 }))
    }

    async fn grant(&self, req: Request<pb::GrantSpec>) -> Reply<pb::GrantSpec> {
        // A grant of a template or a lease source is checked by what it
        // reaches (its inputs, its backend path): see `policy::roles`.
        let shown = super::templates::shown_path(req.get_ref());
        let workload = req.get_ref().workload.clone();
        let reaches = crate::policy::roles::reach_of(&shown).is_some();
        let need = if reaches { Need::AnyRole } else { Need::Grant(Verb::Grant, &shown, &workload) };
        let Caller { id, scope } = self.authorize(&req, "Grant", need).await?;
        let asked = super::templates::grant_request(req.into_inner()).map_err(ApiError::from)?;
        let grant = self
            .op(move |b| {
                if let Some(Err(lack)) = b.reach_grant_lack(&scope, &shown, &workload, false)? {
                    return Err(b.refuse(&id, "Grant", &lack));
                }
                b.grant(&id, &asked)
            })
            .await?;
        Ok(Response::new(grant_pb(&grant)))
    }

    async fn revoke(&self, req: Request<pb::RevokeRequest>) -> Reply<pb::RevokeResponse> {
        let (secret, workload) = (req.get_ref().secret.clone(), req.get_ref().workload.clone());
        let reaches = crate::policy::roles::reach_of(&secret).is_some();
        let need = if reaches { Need::AnyRole } else { Need::Grant(Verb::Grant, &secret, &workload) };
        let Caller { id, scope } = self.authorize(&req, "Revoke", need).await?;
        self.op(move |b| {
            if let Some(Err(lack)) = b.reach_grant_lack(&scope, &secret, &workload, true)? {
                return Err(b.refuse(&id, "Revoke", &lack));
            }
            b.revoke(&id, &workload, &secret)
        })
        .await?;
        Ok(Response::new(pb::RevokeResponse {}))
    }

    async fn list_grants(&self, req: Request<pb::ListGrantsRequest>) -> Reply<pb::ListGrantsResponse> {
        let Caller { id, scope } = self.authorize(&req, "ListGrants", Need::AnyRole).await?;
        let w = req.into_inner().workload;
        let grants = self
            .audited(id, EventKind::Grants, None, move |b| {
                let only = (!w.is_empty()).then_some(w.as_str());
                let all = b.list_grants(only)?;
                Ok((all.iter().filter(|g| scope.sees_workload(&g.workload)).map(grant_pb).collect(), None))
            })
            .await?;
        Ok(Response::new(pb::ListGrantsResponse { grants }))
    }

    async fn list_mounts(&self, req: Request<pb::ListMountsRequest>) -> Reply<pb::ListMountsResponse> {
        let Caller { id, scope } = self.authorize(&req, "ListMounts", Need::AnyRole).await?;
        let mounts = self
            .audited(id, EventKind::Mounts, None, move |b| {
                let list = b.list_mounts().into_iter().filter(|m| scope.sees_workload(&m.workload)).map(|m| {
                    pb::MountEntry { workload: m.workload, path: m.path.display().to_string(), files: m.files }
                });
                Ok((list.collect(), None))
            })
            .await?;
        Ok(Response::new(pb::ListMountsResponse { mounts }))
    }

    async fn add_role(&self, req: Request<pb::RoleSpec>) -> Reply<pb::RoleSpec> {
        super::roles::add_role(self, req).await
    }

    async fn list_roles(&self, req: Request<pb::ListRolesRequest>) -> Reply<pb::ListRolesResponse> {
        super::roles::list_roles(self, req).await
    }

    async fn remove_role(&self, req: Request<pb::RemoveRoleRequest>) -> Reply<pb::RemoveRoleResponse> {
        super::roles::remove_role(self, req).await
    }

    async fn apply_policy(&self, req: Request<pb::ApplyPolicyRequest>) -> Reply<pb::ApplyPolicyResponse> {
        super::roles::apply_policy(self, req).await
    }

    async fn export_policy(&self, req: Request<pb::ExportPolicyRequest>) -> Reply<pb::ExportPolicyResponse> {
        super::roles::export_policy(self, req).await
    }

    async fn put_template(&self, req: Request<pb::PutTemplateRequest>) -> Reply<pb::TemplateVersion> {
        let Caller { id, scope } = self.authorize(&req, "PutTemplate", Need::Verb(Verb::Template)).await?;
        let r = req.into_inner();
        let broker = self.0.clone();
        let t = self
            .op(move |_| broker.put_template_within(&id, &scope, &r.name, &r.source, now_ms()).map(|t| (r.name, t)))
            .await?;
        Ok(Response::new(super::templates::version_pb(&t.0, &t.1)))
    }

    async fn get_template(&self, req: Request<pb::GetTemplateRequest>) -> Reply<pb::GetTemplateResponse> {
        let Caller { id, scope } = self.authorize(&req, "GetTemplate", Need::Verb(Verb::Template)).await?;
        let r = req.into_inner();
        let who = id.clone();
        let reply = self
            .audited(id, EventKind::TemplateGet, Some(r.name.clone()), move |b| {
                if let Err(lack) = b.template_within(&scope, &r.name)? {
                    return Err(b.refuse(&who, "GetTemplate", &lack));
                }
                let t = b.get_template(&r.name, (r.version != 0).then_some(r.version))?;
                let meta = super::templates::version_pb(&r.name, &t);
                Ok((pb::GetTemplateResponse { meta: Some(meta), source: t.source }, Some(t.version)))
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn list_templates(&self, req: Request<pb::ListTemplatesRequest>) -> Reply<pb::ListTemplatesResponse> {
        let Caller { id, scope } = self.authorize(&req, "ListTemplates", Need::Verb(Verb::Template)).await?;
        let templates = self
            .audited(id, EventKind::TemplateLs, None, move |b| {
                let all = b.list_templates()?;
                let reach = |id: &str| b.source_reach_of(id);
                let mine = all.iter().filter(|(_, t)| scope.check_template_inputs(&t.inputs, &reach).is_ok());
                Ok((mine.map(|(n, t)| super::templates::version_pb(n, t)).collect(), None))
            })
            .await?;
        Ok(Response::new(pb::ListTemplatesResponse { templates }))
    }

    async fn delete_template(&self, req: Request<pb::DeleteTemplateRequest>) -> Reply<pb::DeleteTemplateResponse> {
        let Caller { id, scope } = self.authorize(&req, "DeleteTemplate", Need::Verb(Verb::Template)).await?;
        let name = req.into_inner().name;
        let removed = self
            .op(move |b| {
                if let Err(lack) = b.template_within(&scope, &name)? {
                    return Err(b.refuse(&id, "DeleteTemplate", &lack));
                }
                b.delete_template(&id, &name)
            })
            .await?;
        Ok(Response::new(pb::DeleteTemplateResponse { versions_removed: removed as u32 }))
    }

    async fn add_source(&self, req: Request<pb::SourceSpec>) -> Reply<pb::SourceSpec> {
        let verb = if req.get_ref().kind == "cert" { Verb::Cert } else { Verb::Dynamic };
        let Caller { id, scope } = self.authorize(&req, "AddSource", Need::Verb(verb)).await?;
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
        let src = self
            .op(move |b| {
                b.check_source_put(&id, &scope, kind, &asked)?;
                b.add_source(&id, kind, &asked)
            })
            .await?;
        Ok(Response::new(source_pb(&src)))
    }

    async fn list_sources(&self, req: Request<pb::ListSourcesRequest>) -> Reply<pb::ListSourcesResponse> {
        let Caller { id, scope } = self.authorize(&req, "ListSources", Need::AnyRole).await?;
        let kind = req.into_inner().kind;
        let only = if kind.is_empty() { None } else { Some(source_kind(&kind)?) };
        let sources = self
            .audited(id, EventKind::Sources, None, move |b| {
                let list = b.leases().sources().into_iter().filter(|s| only.is_none_or(|k| s.kind == k));
                let list = list.filter(|s| source_within(&scope, s).is_ok());
                Ok((list.map(|s| source_pb(&s)).collect(), None))
            })
            .await?;
        Ok(Response::new(pb::ListSourcesResponse { sources }))
    }

    async fn remove_source(&self, req: Request<pb::RemoveSourceRequest>) -> Reply<pb::RemoveSourceResponse> {
        let verb = if req.get_ref().kind == "cert" { Verb::Cert } else { Verb::Dynamic };
        let Caller { id, scope } = self.authorize(&req, "RemoveSource", Need::Verb(verb)).await?;
        let r = req.into_inner();
        let kind = source_kind(&r.kind)?;
        self.op(move |b| {
            let existing = b.leases().source(&format!("{}:{}", kind.as_str(), r.name));
            if let Some(Err(lack)) = existing.map(|s| source_within(&scope, &s)) {
                return Err(b.refuse(&id, "RemoveSource", &lack));
            }
            b.remove_source(&id, kind, &r.name)
        })
        .await?;
        Ok(Response::new(pb::RemoveSourceResponse {}))
    }

    async fn list_leases(&self, req: Request<pb::ListLeasesRequest>) -> Reply<pb::ListLeasesResponse> {
        let Caller { id, scope } = self.authorize(&req, "ListLeases", Need::Verb(Verb::Leases)).await?;
        let w = req.into_inner().workload;
        let leases = self
            .audited_for(id, EventKind::Leases, (!w.is_empty()).then(|| w.clone()), None, move |b| {
                let only = (!w.is_empty()).then_some(w.as_str());
                let list =
                    b.leases().list(only).into_iter().filter(|l| scope.covers_workload(Verb::Leases, &l.workload));
                let list = list.map(|l| pb::LeaseEntry {
                    source: l.source,
                    workload: l.workload,
                    container: l.container,
                    container_name: l.container_name,
                    backend: l.backend,
                    issued_unix: l.issued_unix as i64,
                    expires_unix: l.expires_unix as i64,
                    serial: l.serial.unwrap_or_default(),
                    state: l.state,
                    template: l.template.unwrap_or_default(),
                    failures: l.failures,
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

/// A source the caller could have made (what it may see and remove).
fn source_within(scope: &Scope, s: &LeaseSource) -> Result<(), crate::policy::roles::Lack> {
    let verb = if s.kind == Kind::Cert { Verb::Cert } else { Verb::Dynamic };
    scope.check_source(verb, &s.backend, &s.path, s.uri.as_deref(), s.cn.as_deref())
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
