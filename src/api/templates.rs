//! The template side of the `Admin` service: how a template grant and a
//! template version travel in the API (the handlers are in
//! [`super::admin`], the work in [`crate::broker::templates`]).
#![forbid(unsafe_code)]

use super::pb;
use crate::policy::PolicyError;
use crate::secret::TEMPLATE_PREFIX;
use crate::template::TemplateVersion;

/// A grant of a template names it by its reserved path (`@template/NAME`,
/// which no secret path can be); refuse a spec naming both or neither.
pub fn template_target(g: &mut pb::GrantSpec) -> Result<(), PolicyError> {
    if g.template.is_empty() {
        return Ok(());
    }
    if !g.secret.is_empty() {
        return Err(PolicyError::BadTemplateGrant(format!(
            "a grant names a secret ({}) or a template ({}), not both",
            g.secret, g.template
        )));
    }
    crate::template::check_name(&g.template).map_err(|e| PolicyError::BadTemplateGrant(e.to_string()))?;
    g.secret = format!("{TEMPLATE_PREFIX}{}", g.template);
    Ok(())
}

/// What a grant's audit line names: the secret, or the template's path.
/// A grant as the caller sent it, a template's named by its reserved
/// path, for `Broker::grant`.
pub fn grant_request(mut g: pb::GrantSpec) -> Result<crate::broker::GrantRequest, PolicyError> {
    template_target(&mut g)?;
    Ok(crate::broker::GrantRequest {
        secret: g.secret,
        workload: g.workload,
        file: g.file,
        mode: g.mode,
        uid: g.uid,
        gid: g.gid,
        notify: g.notify,
        restart: g.restart,
        restart_spacing: g.restart_spacing,
        exec: g.exec,
    })
}

pub fn shown_path(g: &pb::GrantSpec) -> String {
    if g.template.is_empty() { g.secret.clone() } else { format!("{TEMPLATE_PREFIX}{}", g.template) }
}

pub fn version_pb(name: &str, t: &TemplateVersion) -> pb::TemplateVersion {
    pb::TemplateVersion {
        name: name.to_owned(),
        version: t.version,
        created_unix_ms: t.created_unix_ms,
        inputs: t.inputs.clone(),
        size: t.source.len() as u64,
    }
}
