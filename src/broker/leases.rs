//! Write operations on lease sources (`keyhole dynamic add|rm`,
//! `keyhole cert add|rm`), in the pattern of [`super::ops`]: store, update
//! the mounts, audit; and the hook that revokes the leases a policy
//! change ended (see [`crate::lease`]).
#![forbid(unsafe_code)]

use crate::audit::EventKind;

use std::collections::BTreeSet;

use super::ops::{Audit, Done};
use super::{Broker, BrokerError};
use crate::backend::local::LEASE_SOURCES;
use crate::identity::Identity;
use crate::lease::{Kind, LeaseError, Source};

/// A source as the caller sent it.
#[derive(Clone, Debug, Default)]
pub struct SourceRequest {
    pub name: String,
    pub backend: String,
    pub path: String,
    pub uri: Option<String>,
    pub cn: Option<String>,
    pub ttl: Option<String>,
}

impl From<LeaseError> for BrokerError {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::Invalid(m) => BrokerError::InvalidArgument(m),
            LeaseError::NoSource(_) | LeaseError::NoBackend { .. } => BrokerError::Precondition(e.to_string()),
            LeaseError::Backend(b) => BrokerError::Backend(b),
            LeaseError::TooMany(_) => BrokerError::ResourceExhausted(e.to_string()),
            LeaseError::Stopping => BrokerError::Unavailable(e.to_string()),
        }
    }
}

fn event(kind: Kind, add: bool) -> EventKind {
    match (kind, add) {
        (Kind::Dynamic, true) => EventKind::DynamicAdd,
        (Kind::Dynamic, false) => EventKind::DynamicRm,
        (Kind::Cert, true) => EventKind::CertAdd,
        (Kind::Cert, false) => EventKind::CertRm,
    }
}

impl Broker {
    /// `dynamic add` / `cert add`: record a source (again: replace it).
    /// Its backend must be a configured `[[backend]]`.
    pub fn add_source(&self, by: &Identity, kind: Kind, req: &SourceRequest) -> Result<Source, BrokerError> {
        let id = format!("{}:{}", kind.as_str(), req.name);
        self.write(Audit::by(by, event(kind, true)).path(&id), |b| {
            let src = Source::new(
                kind,
                &req.name,
                &req.backend,
                &req.path,
                req.uri.as_deref(),
                req.cn.as_deref(),
                req.ttl.as_deref(),
            )?;
            if b.backend_named(&src.backend).is_none() {
                return Err(BrokerError::InvalidArgument(format!(
                    "backend {} is not configured (a [[backend]] in the config)",
                    src.backend
                )));
            }
            b.store.put_record(LEASE_SOURCES, &src.id(), &src)?;
            b.leases.set_source(src.clone());
            Ok(Done::new(src.clone()).secrets([src.id()]))
        })
    }

    /// `dynamic rm` / `cert rm`: forget a source and revoke its leases.
    pub fn remove_source(&self, by: &Identity, kind: Kind, name: &str) -> Result<(), BrokerError> {
        let id = format!("{}:{name}", kind.as_str());
        self.write(Audit::by(by, event(kind, false)).path(&id), |b| {
            if !b.store.remove_record(LEASE_SOURCES, &id)? {
                return Err(BrokerError::Precondition(format!("no source {id}")));
            }
            b.leases.drop_source(&id);
            Ok(Done::new(()).secrets([id.clone()]))
        })?;
        self.leases_policy_changed();
        Ok(())
    }

    /// Revoke the leases whose grant, workload or source no longer exists.
    pub(crate) fn leases_policy_changed(&self) {
        // Reading every grant costs O(grants) unsealings (97 ms at 10,000):
        // none of it when no lease is live (a lease issued meanwhile is
        // for a grant that exists, and the sweep catches the rest).
        if self.leases.count() == 0 {
            return;
        }
        match self.store.grants(None) {
            Ok(grants) => {
                let pairs: BTreeSet<(String, String)> =
                    grants.iter().map(|g| (g.workload.clone(), g.target.to_string())).collect();
                let n = self.leases.policy_changed(&pairs);
                if n > 0 {
                    tracing::info!(leases = n, "revoking leases whose grant, workload or source went");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the grants; the sweep will revoke ended leases"),
        }
    }
}
