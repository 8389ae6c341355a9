//! Broker-level policy writes: roles, and a whole policy change
//! (`keyhole apply`), in the pattern of [`super::ops`]: store (one
//! transaction), bring the mounts and the role table in step, audit.
//!
//! Policy changes are serialized ([`Broker::policy_serial`]): an apply
//! reads the policy, plans against it and commits with no single-call
//! change (grant, revoke, workload add/rm, role add/rm) in between, so
//! nothing another admin did meanwhile is lost or contradicted.
#![forbid(unsafe_code)]

use std::sync::MutexGuard;

use super::ops::{Audit, Done};
use super::{Broker, BrokerError};
use crate::audit::{Event, EventKind};
use crate::backend::local::PolicyChange;
use crate::identity::Identity;
use crate::policy::file::{Current, FileError, PolicyFile, plan};
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

    /// The whole policy: roles, workloads and grants.
    pub fn policy_now(&self) -> Result<Current, BrokerError> {
        Ok(Current { roles: self.store.roles()?, workloads: self.store.workloads()?, grants: self.store.grants(None)? })
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
    pub fn apply_policy(
        &self,
        by: &Identity,
        scope: &Scope,
        text: &str,
        prune: bool,
        dry_run: bool,
    ) -> Result<Vec<String>, BrokerError> {
        let event = if dry_run { EventKind::Diff } else { EventKind::Apply };
        let record =
            |reason: &str| self.audit.record(&Event { caller: Some(by), reason: Some(reason), ..Event::new(event) });
        let _serial = self.policy_serial();
        let planned = PolicyFile::parse(text).and_then(|file| {
            if let Some(e) = file.unsupported() {
                return Err(e);
            }
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
                self.audit.deny(&crate::limits::deny_key(by), &event)?;
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
        let result = if dry_run { Ok(()) } else { self.commit_policy(&plan.change) };
        let n = plan.change.len();
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
        // Values of new grants on a remote backend, fetched before the mounts show them.
        let mut fetched = Vec::new();
        for g in &change.put_grants {
            fetched.extend(self.prefetch(&g.target));
        }
        self.everything_changed(fetched);
        Ok(())
    }
}
