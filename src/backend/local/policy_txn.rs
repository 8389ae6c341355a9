//! The store's side of roles and of `keyhole apply`: roles as sealed
//! records in `meta` (`role:<name>`, AAD `keyhole/v1/role\0<name>`, in the
//! manifest like every record), and one transaction that makes a whole
//! policy change (workloads, grants, roles, templates, lease sources) at once.
#![forbid(unsafe_code)]

use redb::{ReadableTable, TableHandle};

use super::{
    Changes, GRANTS, LEASE_SOURCES, LocalStore, META, StoreError, TEMPLATES, WORKLOADS, grant_aad, key_grant, key_str,
    workload_aad,
};
use crate::lease::Source;
use crate::policy::roles::Role;
use crate::policy::{Grant, Workload};

const ROLE_PREFIX: &str = "role:";

fn role_aad(name: &str) -> Vec<u8> {
    format!("keyhole/v1/role\0{name}").into_bytes()
}

/// A template given a new version by a policy file (its dry run's record).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutTemplate {
    pub name: String,
    pub source: String,
    /// What it reads: its secret inputs and the lease sources it names
    /// (`dynamic:NAME`, `cert:NAME`), as a scope is checked against.
    pub reads: Vec<String>,
    /// Those of its inputs read by field (`secret(p, field=...)`).
    pub fields: Vec<String>,
}

/// Everything one `apply` changes, written in one transaction.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PolicyChange {
    /// Workloads made or replaced (their grants are kept unless removed).
    pub put_workloads: Vec<Workload>,
    /// Workloads removed, with all their grants.
    pub remove_workloads: Vec<String>,
    /// Grants made or replaced.
    pub put_grants: Vec<Grant>,
    /// Grants removed: (workload, target).
    pub remove_grants: Vec<(String, String)>,
    pub put_roles: Vec<Role>,
    pub remove_roles: Vec<String>,
    /// Templates given a new version.
    pub put_templates: Vec<PutTemplate>,
    pub remove_templates: Vec<String>,
    /// Lease sources made or replaced, and removed (by id, `dynamic:NAME`).
    pub put_sources: Vec<Source>,
    pub remove_sources: Vec<String>,
    /// When the templates' new versions are made (ms since the epoch).
    pub now_ms: i64,
}

impl PolicyChange {
    pub fn is_empty(&self) -> bool {
        self.put_workloads.is_empty()
            && self.remove_workloads.is_empty()
            && self.put_grants.is_empty()
            && self.remove_grants.is_empty()
            && self.put_roles.is_empty()
            && self.remove_roles.is_empty()
            && self.put_templates.is_empty()
            && self.remove_templates.is_empty()
            && self.put_sources.is_empty()
            && self.remove_sources.is_empty()
    }

    pub fn len(&self) -> usize {
        self.put_workloads.len()
            + self.remove_workloads.len()
            + self.put_grants.len()
            + self.remove_grants.len()
            + self.put_roles.len()
            + self.remove_roles.len()
            + self.put_templates.len()
            + self.remove_templates.len()
            + self.put_sources.len()
            + self.remove_sources.len()
    }
}

impl LocalStore {
    /// Add or replace a role.
    pub fn put_role(&self, role: &Role) -> Result<(), StoreError> {
        self.apply_policy(&PolicyChange { put_roles: vec![role.clone()], ..PolicyChange::default() })
    }

    /// Remove a role; an error if there is none of that name.
    pub fn remove_role(&self, name: &str) -> Result<(), StoreError> {
        if !self.roles()?.iter().any(|r| r.name == name) {
            return Err(StoreError::Missing(format!("role {name} does not exist")));
        }
        self.apply_policy(&PolicyChange { remove_roles: vec![name.to_owned()], ..PolicyChange::default() })
    }

    /// Every role, by name.
    pub fn roles(&self) -> Result<Vec<Role>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(META)?;
        let mut out = Vec::new();
        for e in t.range(ROLE_PREFIX..)? {
            let (k, v) = e?;
            let Some(name) = k.value().strip_prefix(ROLE_PREFIX) else { break };
            out.push(self.open_json(v.value(), &role_aad(name), || format!("role {name}"))?);
        }
        Ok(out)
    }

    /// Make `c` in one durable transaction (one commit, one manifest
    /// update): grants removed, workloads removed (with their grants),
    /// workloads put, grants put (each to a workload that exists by
    /// then), roles removed and put. Any error leaves the store as it was.
    pub fn apply_policy(&self, c: &PolicyChange) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        let mut ch = Changes::default();
        {
            let mut grants = txn.open_table(GRANTS)?;
            for (w, target) in &c.remove_grants {
                let gone = grants.remove((w.as_str(), target.as_str()))?.map(|g| g.value().to_vec());
                if gone.is_none() {
                    return Err(StoreError::Missing(format!("{target} is not granted to {w}")));
                }
                self.changed(&mut ch, GRANTS.name(), &key_grant(w, target), gone.as_deref(), None);
            }
            let mut workloads = txn.open_table(WORKLOADS)?;
            for name in &c.remove_workloads {
                let Some(gone) = workloads.remove(name.as_str())?.map(|g| g.value().to_vec()) else {
                    return Err(StoreError::Missing(format!("workload {name} does not exist")));
                };
                self.changed(&mut ch, WORKLOADS.name(), &key_str(name), Some(&gone), None);
                let mut targets = Vec::new();
                for e in grants.range((name.as_str(), "")..)? {
                    let (k, _) = e?;
                    let (w, target) = k.value();
                    if w != name {
                        break;
                    }
                    targets.push(target.to_owned());
                }
                for target in &targets {
                    let gone = grants.remove((name.as_str(), target.as_str()))?.map(|g| g.value().to_vec());
                    self.changed(&mut ch, GRANTS.name(), &key_grant(name, target), gone.as_deref(), None);
                }
            }
            for w in &c.put_workloads {
                let sealed = self.seal_json(w, &workload_aad(&w.name))?;
                let old = workloads.insert(w.name.as_str(), sealed.as_slice())?.map(|g| g.value().to_vec());
                self.changed(&mut ch, WORKLOADS.name(), &key_str(&w.name), old.as_deref(), Some(&sealed));
            }
            for g in &c.put_grants {
                if workloads.get(g.workload.as_str())?.is_none() {
                    return Err(StoreError::Missing(format!("workload {} does not exist", g.workload)));
                }
                let target = g.target.to_string();
                let sealed = self.seal_json(g, &grant_aad(&g.workload, &target))?;
                let old = grants
                    .insert((g.workload.as_str(), target.as_str()), sealed.as_slice())?
                    .map(|v| v.value().to_vec());
                self.changed(&mut ch, GRANTS.name(), &key_grant(&g.workload, &target), old.as_deref(), Some(&sealed));
            }
            let mut meta = txn.open_table(META)?;
            for name in &c.remove_roles {
                let key = format!("{ROLE_PREFIX}{name}");
                let gone = meta.remove(key.as_str())?.map(|g| g.value().to_vec());
                if gone.is_none() {
                    return Err(StoreError::Missing(format!("role {name} does not exist")));
                }
                self.changed(&mut ch, META.name(), &key_str(&key), gone.as_deref(), None);
            }
            for r in &c.put_roles {
                let key = format!("{ROLE_PREFIX}{}", r.name);
                let sealed = self.seal_json(r, &role_aad(&r.name))?;
                let old = meta.insert(key.as_str(), sealed.as_slice())?.map(|g| g.value().to_vec());
                self.changed(&mut ch, META.name(), &key_str(&key), old.as_deref(), Some(&sealed));
            }
            let mut sources = txn.open_table(LEASE_SOURCES)?;
            for id in &c.remove_sources {
                let gone = sources.remove(id.as_str())?.map(|g| g.value().to_vec());
                if gone.is_none() {
                    return Err(StoreError::Missing(format!("no source {id}")));
                }
                self.changed(&mut ch, LEASE_SOURCES.name(), &key_str(id), gone.as_deref(), None);
            }
            for src in &c.put_sources {
                let id = src.id();
                let aad = format!("keyhole/v1/{}\0{id}", LEASE_SOURCES.name());
                let sealed = self.seal_json(src, aad.as_bytes())?;
                let old = sources.insert(id.as_str(), sealed.as_slice())?.map(|g| g.value().to_vec());
                self.changed(&mut ch, LEASE_SOURCES.name(), &key_str(&id), old.as_deref(), Some(&sealed));
            }
            let mut templates = txn.open_table(TEMPLATES)?;
            for name in &c.remove_templates {
                let gone = templates.remove(name.as_str())?.map(|g| g.value().to_vec());
                if gone.is_none() {
                    return Err(StoreError::Missing(format!("template {name} does not exist")));
                }
                self.changed(&mut ch, TEMPLATES.name(), &key_str(name), gone.as_deref(), None);
            }
            for PutTemplate { name, source, reads, fields } in &c.put_templates {
                let aad = format!("keyhole/v1/{}\0{name}", TEMPLATES.name());
                let mut versions: Vec<crate::template::TemplateVersion> = match templates.get(name.as_str())? {
                    Some(v) => self.open_json(v.value(), aad.as_bytes(), || format!("template {name}"))?,
                    None => Vec::new(),
                };
                let version = versions.last().map_or(0, |v| v.version) + 1;
                versions.push(crate::template::TemplateVersion {
                    version,
                    created_unix_ms: c.now_ms,
                    source: source.clone(),
                    inputs: reads.iter().filter(|r| crate::policy::leased(r).is_none()).cloned().collect(),
                    fields: fields.clone(),
                    sources: reads.iter().filter(|r| crate::policy::leased(r).is_some()).cloned().collect(),
                });
                let excess = versions.len().saturating_sub(self.history_depth.max(1));
                versions.drain(..excess);
                let sealed = self.seal_json(&versions, aad.as_bytes())?;
                let old = templates.insert(name.as_str(), sealed.as_slice())?.map(|g| g.value().to_vec());
                self.changed(&mut ch, TEMPLATES.name(), &key_str(name), old.as_deref(), Some(&sealed));
            }
        }
        self.commit(txn, ch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::local::KeyMaterial;
    use crate::crypto::MasterKey;

    fn open(dir: &std::path::Path) -> LocalStore {
        let key = MasterKey::from_bytes(&[7; 32]).unwrap();
        LocalStore::open(&dir.join("s.redb"), KeyMaterial::Key(key), 10).unwrap().0
    }

    fn role(name: &str) -> Role {
        let v = |s: &str| vec![s.to_owned()];
        Role::new(name, &v("uid:1001"), &v("a/*"), &v("a-*"), &v("read")).unwrap()
    }

    #[test]
    fn roles_and_an_applied_change_survive_a_reopen_with_the_manifest_in_step() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        s.put_role(&role("team-a")).unwrap();
        s.put_role(&role("team-b")).unwrap();
        s.put_note("x", &1u32).unwrap();
        assert_eq!(s.roles().unwrap().len(), 2);
        s.remove_role("team-b").unwrap();
        assert!(matches!(s.remove_role("team-b"), Err(StoreError::Missing(_))));
        let w = Workload::new("a-web", &["unix:uid:1001".into()]).unwrap();
        let g = Grant::new("a/db", "a-web", None, None, None, None).unwrap();
        let bad = PolicyChange {
            put_workloads: vec![w.clone()],
            put_grants: vec![Grant::new("a/db", "nope", None, None, None, None).unwrap()],
            ..PolicyChange::default()
        };
        assert!(s.apply_policy(&bad).is_err());
        assert!(s.workloads().unwrap().is_empty(), "all or nothing");
        let good = PolicyChange { put_workloads: vec![w], put_grants: vec![g], ..PolicyChange::default() };
        s.apply_policy(&good).unwrap();
        drop(s);
        let s = open(d.path());
        assert_eq!(s.roles().unwrap(), [role("team-a")]);
        assert_eq!(s.grants(None).unwrap().len(), 1);
        s.apply_policy(&PolicyChange { remove_workloads: vec!["a-web".into()], ..PolicyChange::default() }).unwrap();
        assert!(s.grants(None).unwrap().is_empty());
        drop(s);
        open(d.path());
    }
}
