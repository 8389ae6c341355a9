//! `keyhole refresh`: check a Vault/OpenBao backend for changes now, the
//! way the watcher does each `poll_interval`, and return once the mounts
//! show what it found — for pipelines that just wrote to Vault.
#![forbid(unsafe_code)]

use super::secrets::{report_failure, split_targets};
use super::{Broker, BrokerError};

/// What one backend's refresh found.
#[derive(Debug)]
pub struct Refreshed {
    pub backend: String,
    pub change_detection: &'static str,
    pub requests: u64,
    pub watched: u64,
    /// Full paths whose value changed or went; the mounts show them.
    pub changed: Vec<String>,
    pub path_watched: bool,
}

impl Broker {
    /// Refresh the backend `path` lives in, or the one named `backend`,
    /// or (neither) every backend. Fails at the first backend that does
    /// not answer; what earlier ones found is applied.
    pub fn refresh_backends(&self, path: &str, backend: &str) -> Result<Vec<Refreshed>, BrokerError> {
        let path = path.trim_end_matches("/*").trim_end_matches('/');
        let chosen: Vec<_> = match (path.is_empty(), backend.is_empty()) {
            (false, false) => return Err(BrokerError::InvalidArgument("give a path or --backend, not both".into())),
            (false, true) => match self.vault_for(path).map(|(v, _)| v).or_else(|| self.vault_named(path)) {
                Some(v) => vec![v.clone()],
                None => {
                    return Err(BrokerError::InvalidArgument(format!(
                        "{path} is not under a [[backend]]: local secrets need no refresh"
                    )));
                }
            },
            (true, false) => match self.vault_named(backend) {
                Some(v) => vec![v.clone()],
                None => return Err(BrokerError::InvalidArgument(format!("no [[backend]] is named {backend:?}"))),
            },
            (true, true) => self.vaults.iter().map(|v| v.backend.clone()).collect(),
        };
        let grants = self.store.grants(None)?;
        let mut out = Vec::new();
        for v in chosen {
            let (exact, prefixes) = split_targets(&v, &grants);
            let changed = match self.rt.block_on(v.refresh(&exact, &prefixes)) {
                Ok(c) => c,
                Err(e) => {
                    report_failure(self, &v, &e);
                    return Err(e.into());
                }
            };
            if v.health.succeeded() {
                tracing::info!(backend = %v.cfg.name, "backend answers");
            }
            let paths: Vec<String> = changed.iter().map(|(p, _)| p.clone()).collect();
            // Persists, then updates every mount that shows them.
            self.backend_changed(changed);
            let (detection, _, stats) = v.change_detection();
            let path_watched = v.relative(path).is_some_and(|rel| {
                exact.contains(rel)
                    || prefixes
                        .iter()
                        .any(|p| rel == p || rel.strip_prefix(p.as_str()).is_some_and(|r| r.starts_with('/')))
            });
            out.push(Refreshed {
                backend: v.cfg.name.clone(),
                change_detection: detection,
                requests: stats.requests,
                watched: stats.watched,
                changed: paths,
                path_watched,
            });
        }
        Ok(out)
    }
}
