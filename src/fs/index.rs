//! Which mounts show what: an index of every mount's grants by exact
//! path and by prefix, and of the mounts of each workload, kept with the
//! mounts under their lock ([`Mounts`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::policy::{Grant, Target};

use super::{Mount, MountKey};

/// Which mounts show what: every mount's grants by exact path and by
/// prefix, and the mounts of each workload. Kept with the mounts, under
/// their lock, so a change finds the mounts it touches without looking
/// at the others.
#[derive(Default)]
pub(super) struct Index {
    pub(super) exact: HashMap<String, BTreeSet<MountKey>>,
    pub(super) prefix: HashMap<String, BTreeSet<MountKey>>,
    pub(super) workload: HashMap<String, BTreeSet<MountKey>>,
}

impl Index {
    fn grants(&mut self, key: &MountKey, grants: &[Grant], add: bool) {
        for g in grants {
            let (map, p) = match &g.target {
                Target::Exact(p) => (&mut self.exact, p),
                Target::Prefix(p) => (&mut self.prefix, p),
            };
            if add {
                map.entry(p.as_str().to_owned()).or_default().insert(key.clone());
            } else if let Some(keys) = map.get_mut(p.as_str()) {
                keys.remove(key);
                if keys.is_empty() {
                    map.remove(p.as_str());
                }
            }
        }
    }

    /// The mounts whose grants may cover one of `paths`: those naming it,
    /// and those granting a prefix above it; each once, in order. Borrowed,
    /// not copied: a secret every mount shows is one set, walked as it is.
    pub(super) fn showing<'a>(&'a self, paths: &[String]) -> Vec<&'a MountKey> {
        let mut sets = Vec::new();
        for path in paths {
            sets.extend(self.exact.get(path.as_str()));
            for (i, _) in path.match_indices('/') {
                sets.extend(self.prefix.get(&path[..i]));
            }
        }
        match sets.as_slice() {
            [] => Vec::new(),
            [one] => one.iter().collect(),
            many => many.iter().copied().flatten().collect::<BTreeSet<_>>().into_iter().collect(),
        }
    }
}

/// The mounts and their index.
#[derive(Default)]
pub(super) struct Mounts {
    pub(super) by_key: BTreeMap<MountKey, Mount>,
    pub(super) index: Index,
}

impl Mounts {
    /// A new mount: it shows nothing until its first update.
    pub(super) fn insert(&mut self, key: MountKey, m: Mount) {
        debug_assert!(m.grants.is_empty(), "grants come with the first update");
        self.index.workload.entry(m.shape.workload.name.clone()).or_default().insert(key.clone());
        self.by_key.insert(key, m);
    }

    pub(super) fn remove(&mut self, key: &MountKey) -> Option<Mount> {
        let m = self.by_key.remove(key)?;
        self.index.grants(key, &m.grants, false);
        let name = &m.shape.workload.name;
        if let Some(keys) = self.index.workload.get_mut(name) {
            keys.remove(key);
            if keys.is_empty() {
                self.index.workload.remove(name);
            }
        }
        Some(m)
    }

    /// Note the grants a mount's view is now built from.
    pub(super) fn set_grants(&mut self, key: &MountKey, grants: Vec<Grant>) {
        let Some(m) = self.by_key.get_mut(key) else { return };
        self.index.grants(key, &m.grants, false);
        self.index.grants(key, &grants, true);
        m.grants = grants;
    }

    pub(super) fn of_workload(&self, name: &str) -> BTreeSet<MountKey> {
        self.index.workload.get(name).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(target: &str) -> Grant {
        Grant::new(target, "w", None, None, None, None).unwrap()
    }

    fn showing(ix: &Index, path: &str) -> Vec<MountKey> {
        ix.showing(&[path.to_owned()]).into_iter().cloned().collect()
    }

    #[test]
    fn the_index_finds_the_mounts_of_a_path_by_exact_grant_and_by_prefix() {
        let (a, b, c) = (MountKey::Workload("a".into()), MountKey::Workload("b".into()), MountKey::Volume("c".into()));
        let mut ix = Index::default();
        let (ga, gb, gc) = (vec![grant("db/*")], vec![grant("db/pass"), grant("web/*")], vec![grant("db/x/*")]);
        ix.grants(&a, &ga, true);
        ix.grants(&b, &gb, true);
        ix.grants(&c, &gc, true);
        assert_eq!(showing(&ix, "db/pass"), [a.clone(), b.clone()]);
        assert_eq!(showing(&ix, "db/user"), vec![a.clone()]);
        assert_eq!(showing(&ix, "db/x/y/z"), [a.clone(), c.clone()]);
        assert_eq!(showing(&ix, "web/tls/key"), vec![b.clone()]);
        // Whole segments only, and a prefix does not cover itself.
        assert!(showing(&ix, "dbx/pass").is_empty());
        assert!(showing(&ix, "db").is_empty());
        assert!(showing(&ix, "web").is_empty());
        // Grants that go leave the index; nothing empty stays behind.
        ix.grants(&b, &gb, false);
        assert_eq!(showing(&ix, "db/pass"), vec![a.clone()]);
        assert!(showing(&ix, "web/x").is_empty());
        ix.grants(&a, &ga, false);
        ix.grants(&c, &gc, false);
        assert!(ix.exact.is_empty() && ix.prefix.is_empty());
    }
}
