//! The Admin service's role and policy-file calls: `role add|ls|rm`,
//! `apply`/`diff` and `export`. Authorization is `AdminService::authorize`,
//! as for every other call; the writes are broker-level operations
//! (`broker::policy_ops`).
#![forbid(unsafe_code)]

use tonic::{Request, Response, Status};

use super::ApiError;
use super::admin::{AdminService, Caller};
use super::pb;
use crate::audit::Event;
use crate::policy::file::{Current, FileError, PolicyFile, export, plan};
use crate::policy::roles::{Need, Role, Verb};

type Reply<T> = Result<Response<T>, Status>;

pub(crate) fn role_pb(r: &Role) -> pb::RoleSpec {
    pb::RoleSpec {
        name: r.name.clone(),
        principals: r.principals.iter().map(ToString::to_string).collect(),
        paths: r.paths.iter().map(ToString::to_string).collect(),
        workloads: r.workloads.clone(),
        verbs: r.verbs.iter().map(ToString::to_string).collect(),
    }
}

pub(crate) fn role_from_pb(r: &pb::RoleSpec) -> Result<Role, ApiError> {
    Role::new(&r.name, &r.principals, &r.paths, &r.workloads, &r.verbs)
        .map_err(|e| ApiError::InvalidArgument(e.to_string()))
}

pub(crate) async fn add_role(s: &AdminService, req: Request<pb::RoleSpec>) -> Reply<pb::RoleSpec> {
    let Caller { id, .. } = s.authorize(&req, "AddRole", Need::FullAdmin).await?;
    let spec = req.into_inner();
    let name = spec.name.clone();
    let reply = s
        .audited_named(id, "role_add", Some(name), move |b| {
            let role = role_from_pb(&spec)?;
            b.put_role(&role)?;
            Ok((role_pb(&role), None))
        })
        .await?;
    Ok(Response::new(reply))
}

pub(crate) async fn list_roles(s: &AdminService, req: Request<pb::ListRolesRequest>) -> Reply<pb::ListRolesResponse> {
    let Caller { id, .. } = s.authorize(&req, "ListRoles", Need::FullAdmin).await?;
    let roles =
        s.audited_named(id, "role_ls", None, |b| Ok((b.store.roles()?.iter().map(role_pb).collect(), None))).await?;
    Ok(Response::new(pb::ListRolesResponse { roles }))
}

pub(crate) async fn remove_role(
    s: &AdminService,
    req: Request<pb::RemoveRoleRequest>,
) -> Reply<pb::RemoveRoleResponse> {
    let Caller { id, .. } = s.authorize(&req, "RemoveRole", Need::FullAdmin).await?;
    let name = req.into_inner().name;
    s.audited_named(id, "role_rm", Some(name.clone()), move |b| {
        b.remove_role(&name)?;
        Ok(((), None))
    })
    .await?;
    Ok(Response::new(pb::RemoveRoleResponse {}))
}

/// `keyhole apply` (and, with `dry_run`, `keyhole diff`): parse the file,
/// plan it against the broker within the caller's scope, and make it in
/// one transaction and one propagation. One audit line either way: the
/// apply (or diff) with its count of changes, or the denial.
pub(crate) async fn apply_policy(
    s: &AdminService,
    req: Request<pb::ApplyPolicyRequest>,
) -> Reply<pb::ApplyPolicyResponse> {
    let Caller { id, scope } = s.authorize(&req, "ApplyPolicy", Need::Verb(Verb::Apply)).await?;
    let r = req.into_inner();
    let event = if r.dry_run { "diff" } else { "apply" };
    let broker = s.0.clone();
    let lines = super::blocking(move || {
        let outcome = (|| {
            let file = PolicyFile::parse(&r.text)?;
            if let Some(e) = file.unsupported() {
                return Err(e);
            }
            let cur = Current {
                roles: broker.store.roles().map_err(store_err)?,
                workloads: broker.store.workloads().map_err(store_err)?,
                grants: broker.store.grants(None).map_err(store_err)?,
            };
            plan(&file, &cur, r.prune, &scope)
        })();
        let plan = match outcome {
            Ok(p) => p,
            Err(e) if e.denied => {
                let reason = format!("role {}: {e}", scope.names());
                broker.audit.deny(
                    &crate::limits::deny_key(&id),
                    &Event {
                        method: Some("ApplyPolicy"),
                        caller: Some(&id),
                        reason: Some(&reason),
                        ..Event::new("deny")
                    },
                )?;
                return Err(ApiError::PermissionDenied(format!("ApplyPolicy: {e}")));
            }
            Err(e) => {
                let reason = e.to_string();
                broker.audit.record(&Event { caller: Some(&id), reason: Some(&reason), ..Event::new(event) })?;
                return Err(if e.line.is_none() && e.message.starts_with("store") {
                    ApiError::Internal(reason)
                } else {
                    ApiError::InvalidArgument(reason)
                });
            }
        };
        let result = if r.dry_run { Ok(()) } else { broker.apply_policy(&plan.change) };
        let n = plan.change.len();
        let reason = match &result {
            Ok(()) if r.prune => format!("{n} changes (prune)"),
            Ok(()) => format!("{n} changes"),
            Err(e) => format!("{n} changes not made: {e}"),
        };
        broker.audit.record(&Event { caller: Some(&id), reason: Some(&reason), ..Event::new(event) })?;
        result.map(|()| plan.lines)
    })
    .await?;
    Ok(Response::new(pb::ApplyPolicyResponse { changes: lines }))
}

fn store_err(e: crate::backend::local::StoreError) -> FileError {
    FileError { line: None, message: format!("store: {e}"), denied: false }
}

/// `keyhole export`: the policy the caller sees, as a policy file.
pub(crate) async fn export_policy(
    s: &AdminService,
    req: Request<pb::ExportPolicyRequest>,
) -> Reply<pb::ExportPolicyResponse> {
    let Caller { id, scope } = s.authorize(&req, "ExportPolicy", Need::AnyRole).await?;
    let text = s
        .audited_named(id, "export", None, move |b| {
            let cur =
                Current { roles: b.store.roles()?, workloads: b.store.workloads()?, grants: b.store.grants(None)? };
            Ok((export(&cur, &scope), None))
        })
        .await?;
    Ok(Response::new(pb::ExportPolicyResponse { text }))
}
