//! Broker-level policy writes: roles, and a whole policy change
//! (`keyhole apply`). Each stores (one transaction), brings the mounts
//! and the role table in step, and leaves the audit line to its caller,
//! which knows who asked.
#![forbid(unsafe_code)]

use super::Broker;
use crate::api::ApiError;
use crate::backend::local::PolicyChange;
use crate::policy::roles::Role;

impl Broker {
    /// Add or replace a role; in force for the next call.
    pub fn put_role(&self, role: &Role) -> Result<(), ApiError> {
        self.store.put_role(role)?;
        self.roles.set(self.store.roles()?);
        Ok(())
    }

    /// Remove a role; its principals are no admins from the next call on.
    pub fn remove_role(&self, name: &str) -> Result<(), ApiError> {
        self.store.remove_role(name)?;
        self.roles.set(self.store.roles()?);
        Ok(())
    }

    /// Make a policy change: one store transaction, then one propagation
    /// to every mount (all of them up to date when this returns), and the
    /// roles reloaded if any changed.
    pub fn apply_policy(&self, change: &PolicyChange) -> Result<(), ApiError> {
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
        self.changed();
        if !fetched.is_empty() {
            self.secret_changed(&fetched);
        }
        Ok(())
    }
}
