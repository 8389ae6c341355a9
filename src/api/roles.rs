//! The Admin service's role and policy-file calls: `role add|ls|rm`,
//! `apply`/`diff` and `export`. Authorization is `AdminService::authorize`,
//! as for every other call; the writes are broker-level operations
//! (`broker::policy_ops`).
#![forbid(unsafe_code)]

use tonic::{Request, Response, Status};

use super::admin::{AdminService, Caller};
use super::pb;
use crate::audit::EventKind;
use crate::policy::file::export;
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

pub(crate) async fn add_role(s: &AdminService, req: Request<pb::RoleSpec>) -> Reply<pb::RoleSpec> {
    let Caller { id, .. } = s.authorize(&req, "AddRole", Need::FullAdmin).await?;
    let spec = req.into_inner();
    let role =
        Role::new(&spec.name, &spec.principals, &spec.paths, &spec.workloads, &spec.verbs).map_err(|e| e.to_string());
    let role = s.op(move |b| b.put_role(&id, role)).await?;
    Ok(Response::new(role_pb(&role)))
}

pub(crate) async fn list_roles(s: &AdminService, req: Request<pb::ListRolesRequest>) -> Reply<pb::ListRolesResponse> {
    let Caller { id, .. } = s.authorize(&req, "ListRoles", Need::FullAdmin).await?;
    let roles =
        s.audited(id, EventKind::RoleLs, None, |b| Ok((b.list_roles()?.iter().map(role_pb).collect(), None))).await?;
    Ok(Response::new(pb::ListRolesResponse { roles }))
}

pub(crate) async fn remove_role(
    s: &AdminService,
    req: Request<pb::RemoveRoleRequest>,
) -> Reply<pb::RemoveRoleResponse> {
    let Caller { id, .. } = s.authorize(&req, "RemoveRole", Need::FullAdmin).await?;
    let name = req.into_inner().name;
    s.op(move |b| b.remove_role(&id, &name)).await?;
    Ok(Response::new(pb::RemoveRoleResponse {}))
}

/// `keyhole apply` (and, with `dry_run`, `keyhole diff`): see
/// `Broker::apply_policy`.
pub(crate) async fn apply_policy(
    s: &AdminService,
    req: Request<pb::ApplyPolicyRequest>,
) -> Reply<pb::ApplyPolicyResponse> {
    let Caller { id, scope } = s.authorize(&req, "ApplyPolicy", Need::Verb(Verb::Apply)).await?;
    let r = req.into_inner();
    let broker = s.0.clone();
    let changes = s.op(move |_| broker.apply_policy(&id, &scope, &r.text, r.prune, r.dry_run, r.revoke_leases)).await?;
    Ok(Response::new(pb::ApplyPolicyResponse { changes }))
}

/// `keyhole export`: the policy the caller sees, as a policy file.
pub(crate) async fn export_policy(
    s: &AdminService,
    req: Request<pb::ExportPolicyRequest>,
) -> Reply<pb::ExportPolicyResponse> {
    let Caller { id, scope } = s.authorize(&req, "ExportPolicy", Need::AnyRole).await?;
    let text = s.audited(id, EventKind::Export, None, move |b| Ok((export(&b.policy_now()?, &scope), None))).await?;
    Ok(Response::new(pb::ExportPolicyResponse { text }))
}
