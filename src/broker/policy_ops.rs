//! Broker-level policy writes: roles, and a whole policy change
//! (`keyhole apply`), in the pattern of [`super::ops`]: store (one
//! transaction), bring the mounts and the role table in step, audit.
//!
//! Policy changes are serialized ([`Broker::policy_serial`]): an apply
//! reads the policy, plans against it and commits with no single-call
//! change (grant, revoke, workload add/rm, role add/rm) in between, so
//! nothing another admin did meanwhile is lost or contradicted.
#![forbid(unsafe_code)]

use std::sync::{Arc, MutexGuard};

use super::ops::{Audit, Done};
use super::{Broker, BrokerError};
use crate::audit::{Event, EventKind};
use crate::backend::local::PolicyChange;
use crate::identity::Identity;
use crate::policy::file::{Current, CurrentTemplate, FileError, PolicyFile, plan};
use crate::policy::roles::{Role, Scope};

impl Broker {
    /// Hold while reading and changing policy (workloads, grants, roles).
    pub(super) fn policy_serial(&self) -> MutexGuard<'_, ()> {
        self.policy_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every role, as the store holds them.
    pub fn list_roles(&self) -> Result<Vec<Role>, BrokerError> {
        Ok(self.store.roles()?)
    }

    /// The whole policy: roles, workloads, grants, templates, lease
    /// sources, and the live leases (what a prune would revoke).
    pub fn policy_now(&self) -> Result<Current, BrokerError> {
        let templates = self
            .list_templates()?
            .into_iter()
            // What it reads, as a scope is checked against: inputs and sources.
            .map(|(name, t)| CurrentTemplate { name, source: t.source, inputs: [t.inputs, t.sources].concat() })
            .collect();
        Ok(Current {
            roles: self.store.roles()?,
            workloads: self.store.workloads()?,
            grants: self.store.grants(None)?,
            templates,
            sources: self.leases.sources(),
            leases: self.leases.list(None).into_iter().map(|l| (l.source, l.workload)).collect(),
        })
    }

    /// The inputs of each template of `file` whose text is new or
    /// changed: its dry run, reading only what `scope` may (see
    /// [`super::InputGate`]). An error names the template's line.
    fn template_inputs(self: &Arc<Self>, file: &mut PolicyFile, scope: &Scope) -> Result<(), FileError> {
        let have: std::collections::BTreeMap<String, String> = self
            .list_templates()
            .map_err(|e| FileError { line: None, message: format!("store: {e}"), denied: false })?
            .into_iter()
            .map(|(n, t)| (n, t.source))
            .collect();
        // A template may read a source the same file makes.
        let also: Vec<String> = file.sources.iter().map(|(_, s)| s.id()).collect();
        for (l, t) in &mut file.templates {
            if have.get(&t.name) == Some(&t.source) {
                continue;
            }
            let super::templates::DryRun { checked, sources, lack } = self.dry_run(scope, &t.source, &also);
            if let Some(lack) = lack {
                return Err(FileError { line: Some(*l), message: lack.to_string(), denied: true });
            }
            let checked = checked.map_err(|e| FileError {
                line: Some(*l),
                message: format!("[[template]] {}: {e}", t.name),
                denied: false,
            })?;
            t.fields = checked.fields.into_iter().collect();
            t.inputs = Some(checked.inputs.into_iter().chain(sources).collect());
        }
        Ok(())
    }

    /// `role add`: add or replace a role; in force for the next call.
    pub fn put_role(&self, by: &Identity, role: Result<Role, String>) -> Result<Role, BrokerError> {
        let name = role.as_ref().map_or_else(|_| String::new(), |r| r.name.clone());
        self.write(Audit::by(by, EventKind::RoleAdd).path(&name), |b| {
            let role = role.map_err(BrokerError::InvalidArgument)?;
            let _serial = b.policy_serial();
            b.store.put_role(&role)?;
            b.roles.set(b.store.roles()?);
            Ok(Done::new(role))
        })
    }

    /// `role rm`: its principals are no admins from the next call on.
    pub fn remove_role(&self, by: &Identity, name: &str) -> Result<(), BrokerError> {
        self.write(Audit::by(by, EventKind::RoleRm).path(name), |b| {
            let _serial = b.policy_serial();
            b.store.remove_role(name)?;
            b.roles.set(b.store.roles()?);
            Ok(Done::new(()))
        })
    }

    /// `keyhole apply` (or, with `dry_run`, `keyhole diff`): parse the
    /// file, plan it against the policy within `scope`, and make it in one
    /// transaction and one propagation (every mount up to date when this
    /// returns). Returns the plan's lines. One audit line either way: the
    /// apply (or diff) with its count of changes, or the denial.
    /// A prune that would revoke live leases is refused unless
    /// `revoke_leases` (a diff says so on the lines concerned).
    pub fn apply_policy(
        self: &Arc<Self>,
        by: &Identity,
        scope: &Scope,
        text: &str,
        prune: bool,
        dry_run: bool,
        revoke_leases: bool,
    ) -> Result<Vec<String>, BrokerError> {
        let event = if dry_run { EventKind::Diff } else { EventKind::Apply };
        let record =
            |reason: &str| self.audit.record(&Event { caller: Some(by), reason: Some(reason), ..Event::new(event) });
        let _serial = self.policy_serial();
        let planned = PolicyFile::parse(text).and_then(|mut file| {
            self.template_inputs(&mut file, scope)?;
            let cur = self.policy_now().map_err(|e| FileError {
                line: None,
                message: format!("store: {e}"),
                denied: false,
            })?;
            plan(&file, &cur, prune, scope)
        });
        let plan = match planned {
            Ok(p) => p,
            Err(e) if e.denied => {
                let reason = format!("role {}: {e}", scope.names());
                let event = Event {
                    method: Some("ApplyPolicy"),
                    caller: Some(by),
                    reason: Some(&reason),
                    ..Event::new(EventKind::Deny)
                };
                self.audit.deny(&crate::limits::caller_key(by), &event)?;
                return Err(BrokerError::PermissionDenied(format!("ApplyPolicy: {e}")));
            }
            Err(e) => {
                let reason = e.to_string();
                record(&reason)?;
                return Err(if e.line.is_none() && e.message.starts_with("store") {
                    BrokerError::Internal(reason)
                } else {
                    BrokerError::InvalidArgument(reason)
                });
            }
        };
        if plan.revokes > 0 && !dry_run && !revoke_leases {
            let reason = format!(
                "{} changes not made: they would revoke {} live leases; apply again with --revoke-leases",
                plan.change.len(),
                plan.revokes
            );
            record(&reason)?;
            return Err(BrokerError::Precondition(format!(
                "this apply would revoke {} live leases (see keyhole diff); nothing was changed: apply again with \
                 --revoke-leases to revoke them",
                plan.revokes
            )));
        }
        let mut change = plan.change;
        change.now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let result = if dry_run { Ok(()) } else { self.commit_policy(&change) };
        let n = change.len();
        let reason = match &result {
            Ok(()) if prune => format!("{n} changes (prune)"),
            Ok(()) => format!("{n} changes"),
            Err(e) => format!("{n} changes not made: {e}"),
        };
        record(&reason)?;
        result.map(|()| plan.lines)
    }

    /// Store a planned policy change in one transaction, then one
    /// propagation to every mount, and the roles reloaded if any changed.
    fn commit_policy(&self, change: &PolicyChange) -> Result<(), BrokerError> {
        if change.is_empty() {
            return Ok(());
        }
        self.store.apply_policy(change)?;
        if !change.put_roles.is_empty() || !change.remove_roles.is_empty() {
            self.roles.set(self.store.roles()?);
        }
        for id in &change.remove_sources {
            self.leases.drop_source(id);
        }
        for s in &change.put_sources {
            self.leases.set_source(s.clone());
        }
        let mut templates: Vec<String> = change.put_templates.iter().map(|t| t.name.clone()).collect();
        templates.extend(change.remove_templates.iter().cloned());
        if !templates.is_empty() {
            self.templates_replaced(&templates);
        }
        // Values of new grants (and of new templates' inputs) on a remote
        // backend, fetched before the mounts show them.
        let mut fetched = Vec::new();
        for g in &change.put_grants {
            fetched.extend(self.prefetch(&g.target));
        }
        for input in change.put_templates.iter().flat_map(|t| &t.reads) {
            if let Ok(p) = crate::secret::SecretPath::parse(input) {
                fetched.extend(self.prefetch(&crate::policy::Target::Exact(p)));
            }
        }
        fetched.extend(change.put_sources.iter().map(crate::lease::Source::id));
        fetched.extend(templates.iter().map(|n| format!("{}{n}", crate::secret::TEMPLATE_PREFIX)));
        self.everything_changed(fetched);
        let ended = !change.remove_grants.is_empty()
            || !change.remove_workloads.is_empty()
            || !change.remove_sources.is_empty();
        if ended {
            self.leases_policy_changed();
        }
        Ok(())
    }
}
