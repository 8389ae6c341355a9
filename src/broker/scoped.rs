//! Scope checks that need the broker's state: what a template reads, what
//! a lease source reaches, and which workloads a template is granted to,
//! decided by the pure rules of [`crate::policy::roles`] for a scoped
//! admin. A refusal is audited (a `deny` line with the caller's roles and
//! what they lacked) and is `PERMISSION_DENIED`. Full admins pass every
//! check without a store read.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

use super::{Broker, BrokerError};
use crate::audit::{Event, EventKind};
use crate::identity::Identity;
use crate::policy::roles::{Lack, Scope, Verb, reach_of, source_reach};

/// What a template's dry run at put may read for a scoped admin: only
/// paths a role holding `template` covers. A path it may not read is
/// never read (no value, no existence oracle); it is remembered, so the
/// put fails as a denial rather than as a missing secret.
#[derive(Debug)]
pub struct InputGate {
    scope: Scope,
    denied: Mutex<Vec<String>>,
}

impl InputGate {
    pub fn new(scope: &Scope) -> Arc<InputGate> {
        Arc::new(InputGate { scope: scope.clone(), denied: Mutex::default() })
    }

    /// May the dry run read `path`? Remembers a refusal.
    pub fn readable(&self, path: &str) -> bool {
        if self.scope.covers_path(Verb::Template, path) {
            return true;
        }
        self.denied.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(path.to_owned());
        false
    }

    /// The first path the dry run was refused, as what the caller lacked.
    pub fn lack(&self) -> Option<Lack> {
        let denied = self.denied.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        denied.first().map(|p| Lack {
            roles: self.scope.names(),
            lacked: format!("no role grants template on {p}, which the template reads"),
        })
    }
}

impl Broker {
    /// Audit a scoped admin's refusal found after authorization, and the
    /// error to return.
    pub fn refuse(&self, by: &Identity, method: &'static str, lack: &Lack) -> BrokerError {
        let reason = format!("role {}: {}", lack.roles, lack.lacked);
        let event =
            Event { method: Some(method), caller: Some(by), reason: Some(&reason), ..Event::new(EventKind::Deny) };
        if let Err(e) = self.audit.deny(&crate::limits::caller_key(by), &event) {
            return e.into();
        }
        BrokerError::PermissionDenied(format!("{method}: {lack}"))
    }

    /// What lease source `id` (`dynamic:NAME`, `cert:NAME`) reaches:
    /// `BACKEND/PATH`; `None` if there is no such source.
    pub fn source_reach_of(&self, id: &str) -> Option<String> {
        self.leases.source(id).map(|s| source_reach(&s.backend, &s.path))
    }

    fn current_inputs(&self, name: &str) -> Result<Option<Vec<String>>, BrokerError> {
        // The lease sources it reads reach secrets too.
        Ok(self
            .store
            .template_versions(name)?
            .and_then(|v| v.last().map(|t| t.inputs.iter().chain(&t.sources).cloned().collect())))
    }

    /// A template put by `scope` reading `inputs`: every input within its
    /// template roles; a template it replaces must have been its to make;
    /// and every workload the template is granted to must be one it could
    /// grant the new inputs to (a put changes what those files show).
    pub fn check_template_put(
        &self,
        by: &Identity,
        scope: &Scope,
        name: &str,
        inputs: &[String],
    ) -> Result<(), BrokerError> {
        if scope.is_full() {
            return Ok(());
        }
        let reach = |id: &str| self.source_reach_of(id);
        let mut checked = scope.check_template_inputs(inputs, &reach);
        if checked.is_ok() {
            if let Some(old) = self.current_inputs(name)? {
                checked = scope.check_template_inputs(&old, &reach).map_err(|l| Lack {
                    lacked: format!("template {name} exists and reads what the caller's roles do not: {}", l.lacked),
                    ..l
                });
            }
        }
        if checked.is_ok() {
            let target = format!("{}{name}", crate::secret::TEMPLATE_PREFIX);
            for g in self.store.grants(None)?.into_iter().filter(|g| g.target.to_string() == target) {
                checked = scope.check_template_grant(name, inputs, &g.workload, &reach);
                if checked.is_err() {
                    break;
                }
            }
        }
        checked.map_err(|l| self.refuse(by, "PutTemplate", &l))
    }

    /// A template `scope` may see, get or remove: one whose inputs are
    /// all within its template roles (it could have made it).
    pub fn template_within(&self, scope: &Scope, name: &str) -> Result<Result<(), Lack>, BrokerError> {
        if scope.is_full() {
            return Ok(Ok(()));
        }
        let inputs = self.current_inputs(name)?.unwrap_or_default();
        Ok(scope.check_template_inputs(&inputs, &|id| self.source_reach_of(id)))
    }

    /// A grant (or revoke) of `target` to `workload` by `scope` when the
    /// target is a template or a lease source (`None` otherwise: the
    /// caller checks it as a secret grant).
    pub fn reach_grant_lack(
        &self,
        scope: &Scope,
        target: &str,
        workload: &str,
        revoke: bool,
    ) -> Result<Option<Result<(), Lack>>, BrokerError> {
        let Some((verb, name)) = reach_of(target) else { return Ok(None) };
        if scope.is_full() {
            return Ok(Some(Ok(())));
        }
        let lack = |lacked: String| Lack { roles: scope.names(), lacked };
        // A revoke only takes away: a role with grant and the verb on the workload.
        if revoke {
            let Scope::Roles(s) = scope else { return Ok(Some(Ok(()))) };
            let ok = s.roles.iter().any(|r| r.has(Verb::Grant) && r.has(verb) && r.covers_workload(workload));
            return Ok(Some(if ok {
                Ok(())
            } else {
                Err(lack(format!("no role grants grant and {verb} on workload {workload}")))
            }));
        }
        let reach = |id: &str| self.source_reach_of(id);
        Ok(Some(match verb {
            Verb::Template => match self.current_inputs(name)? {
                Some(inputs) => scope.check_template_grant(name, &inputs, workload, &reach),
                None => Err(lack(format!("template {name} does not exist"))),
            },
            _ => match reach(target) {
                Some(r) => scope.check_source_grant(verb, target, &r, workload),
                None => Err(lack(format!("{target} does not exist"))),
            },
        }))
    }

    /// `dynamic add` / `cert add` by `scope`: the source within its roles
    /// ([`Scope::check_source`]); a source it replaces must have been its
    /// to make, and every workload the source is granted to one it could
    /// grant the new source to.
    pub fn check_source_put(
        &self,
        by: &Identity,
        scope: &Scope,
        kind: crate::lease::Kind,
        req: &super::SourceRequest,
    ) -> Result<(), BrokerError> {
        if scope.is_full() {
            return Ok(());
        }
        let verb = if kind == crate::lease::Kind::Cert { Verb::Cert } else { Verb::Dynamic };
        let id = format!("{}:{}", kind.as_str(), req.name);
        let reach = source_reach(&req.backend, &req.path);
        let mut checked = scope.check_source(verb, &req.backend, &req.path, req.uri.as_deref(), req.cn.as_deref());
        if checked.is_ok() {
            if let Some(old) = self.leases.source(&id) {
                checked = scope.check_source(verb, &old.backend, &old.path, old.uri.as_deref(), old.cn.as_deref());
            }
        }
        if checked.is_ok() {
            for g in self.store.grants(None)?.into_iter().filter(|g| g.target.to_string() == id) {
                checked = scope.check_source_grant(verb, &id, &reach, &g.workload);
                if checked.is_err() {
                    break;
                }
            }
        }
        checked.map_err(|l| self.refuse(by, "AddSource", &l))
    }
}
