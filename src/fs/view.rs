//! Building what a mount shows: reading the catalog once per change
//! ([`Memo`], values shared across mounts and changes through
//! [`Values`]), patching a view when only versions changed, building it
//! from the grants otherwise, and bringing mounts up to date
//! ([`MountTable::update`], [`MountTable::reconcile`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::backend::VersionMeta;
use crate::policy::{Grant, Target, Workload, files_for};
use crate::secret::SecretBytes;

use super::index::Mounts;
use super::notices::Notice;
use super::pool::Conn;
use super::workload::{Node, Swapped, View};
use super::{Catalog, Loaded, Mount, MountKey, MountTable, Shape, VolumeMount};

/// One sync's view of a [`Catalog`]: what a target covers and each value
/// are read once however many mounts show them, and the mounts share the
/// loaded value — with the mounts made by earlier changes too, through
/// [`Values`].
pub(super) struct Memo<'a, C> {
    cat: &'a C,
    values: Option<&'a Values>,
    covered: std::cell::RefCell<BTreeMap<Target, Vec<(String, VersionMeta)>>>,
    current: std::cell::RefCell<BTreeMap<String, Option<VersionMeta>>>,
    loaded: std::cell::RefCell<HashMap<String, Vec<(u64, Loaded)>>>,
}

impl<'a, C: Catalog> Memo<'a, C> {
    pub(super) fn new(cat: &'a C) -> Self {
        Memo { cat, values: None, covered: Default::default(), current: Default::default(), loaded: Default::default() }
    }

    /// A memo that shares values with the mounts through `values`.
    pub(super) fn sharing(cat: &'a C, values: &'a Values) -> Self {
        Memo { values: Some(values), ..Self::new(cat) }
    }

    /// The version of `path` that `target` covers now, if it covers it
    /// (as [`Catalog::covered`] would list it, without copying the list).
    fn version_in(&self, target: &Target, path: &str) -> anyhow::Result<Option<VersionMeta>> {
        let find = |c: &[(String, VersionMeta)]| c.iter().find(|(s, _)| s == path).map(|(_, m)| m.clone());
        if let Some(c) = self.covered.borrow().get(target) {
            return Ok(find(c));
        }
        let c = self.cat.covered(target)?;
        let found = find(&c);
        self.covered.borrow_mut().insert(target.clone(), c);
        Ok(found)
    }
}

impl<C: Catalog> Catalog for Memo<'_, C> {
    fn workloads(&self) -> anyhow::Result<Vec<Workload>> {
        self.cat.workloads()
    }

    fn grants(&self, workload: &str) -> anyhow::Result<Vec<Grant>> {
        self.cat.grants(workload)
    }

    fn covered(&self, target: &Target) -> anyhow::Result<Vec<(String, VersionMeta)>> {
        if let Some(c) = self.covered.borrow().get(target) {
            return Ok(c.clone());
        }
        let c = self.cat.covered(target)?;
        self.covered.borrow_mut().insert(target.clone(), c.clone());
        Ok(c)
    }

    fn current(&self, path: &str) -> anyhow::Result<Option<VersionMeta>> {
        if let Some(c) = self.current.borrow().get(path) {
            return Ok(c.clone());
        }
        let c = self.cat.current(path)?;
        self.current.borrow_mut().insert(path.to_owned(), c.clone());
        Ok(c)
    }

    fn workload(&self, name: &str) -> anyhow::Result<Option<Workload>> {
        self.cat.workload(name)
    }

    fn load(&self, path: &str, meta: &VersionMeta) -> anyhow::Result<Loaded> {
        let hit = self.loaded.borrow().get(path).and_then(|v| v.iter().find(|(n, _)| *n == meta.version).cloned());
        if let Some((_, l)) = hit {
            return Ok(l);
        }
        // A template's render carries its inputs (for the audit): not shared.
        let templated = path.starts_with(crate::secret::TEMPLATE_PREFIX);
        let shared = self.values.filter(|_| !templated).and_then(|v| v.get(path, meta));
        let l = match shared {
            Some(value) => Loaded { value: Some(value), health: None, template: None },
            None => {
                let l = self.cat.load(path, meta)?;
                if let (Some(v), Some(value), None, false) = (self.values, &l.value, &l.health, templated) {
                    v.put(path, meta, value);
                }
                l
            }
        };
        self.loaded.borrow_mut().entry(path.to_owned()).or_default().push((meta.version, l.clone()));
        Ok(l)
    }

    fn volume_mounts(&self) -> anyhow::Result<Vec<VolumeMount>> {
        self.cat.volume_mounts()
    }
}

/// The local store's values the mounts show, by path: one copy of each
/// (a value is a locked page, and freeing one a syscall), however many
/// mounts show it and however many changes made them. Weak: a value
/// goes when no node holds it. A path's entry is dropped whenever the
/// secret changes, so a version number a secret reuses after `rm` is
/// read anew. (A Vault backend's cache shares its values itself.)
#[derive(Default)]
pub(super) struct Values(Mutex<HashMap<String, SharedValue>>);

/// A shown value: its version, when it was made, and the value itself
/// while some node holds it.
type SharedValue = (u64, i64, std::sync::Weak<SecretBytes>);

impl Values {
    pub(super) fn get(&self, path: &str, meta: &VersionMeta) -> Option<Arc<SecretBytes>> {
        let map = self.0.lock().expect("values lock");
        let (version, created, value) = map.get(path)?;
        (*version == meta.version && *created == meta.created_unix_ms).then(|| value.upgrade()).flatten()
    }

    pub(super) fn put(&self, path: &str, meta: &VersionMeta, value: &Arc<SecretBytes>) {
        let entry = (meta.version, meta.created_unix_ms, Arc::downgrade(value));
        self.0.lock().expect("values lock").insert(path.to_owned(), entry);
    }

    /// Forget `paths` (they changed).
    pub(super) fn forget(&self, paths: &[String]) {
        let mut map = self.0.lock().expect("values lock");
        for p in paths {
            map.remove(p.as_str());
        }
    }
}

/// How a mount's view follows a change of secrets.
enum Patch {
    /// Nothing it shows changed.
    Unchanged,
    /// Only versions changed: the view with the new nodes.
    View(View),
    /// Build it from its grants.
    Rebuild,
}

/// Whether `target` covers the secret at `path` (as `Target::file_for`
/// would find it, without making the name).
fn covers(target: &Target, path: &str) -> bool {
    match target {
        Target::Exact(p) => p.as_str() == path,
        Target::Prefix(p) => path.strip_prefix(p.as_str()).is_some_and(|rest| rest.starts_with('/')),
    }
}

/// Files whose every new version takes a new inode, as the templates and
/// dynamic-credentials docs promise: a template's render (its node carries
/// the inputs it read) and a leased file (each open reads the caller's own
/// content; a rolled lease is a new file).
fn renews_inode(secret: &str) -> bool {
    secret.starts_with(crate::secret::TEMPLATE_PREFIX) || crate::policy::leased(secret).is_some()
}

impl MountTable {
    /// Every secret `grants` cover now, with its version.
    fn covered_all(cat: &impl Catalog, grants: &[Grant]) -> anyhow::Result<BTreeMap<String, VersionMeta>> {
        let mut secrets = BTreeMap::new();
        for g in grants {
            secrets.extend(cat.covered(&g.target)?);
        }
        Ok(secrets)
    }

    /// Bring what a mount knows of `paths` up to date: each is shown now
    /// if one of its grants covers it and it exists (an exact grant of a
    /// Vault secret not fetched yet shows it as version 0). Returns
    /// whether only versions changed — every path shown before is shown
    /// now and the other way round — so the view can be patched
    /// ([`MountTable::patch_view`]) instead of built again.
    fn recover<C: Catalog>(cat: &Memo<'_, C>, m: &mut Mount, paths: &[String]) -> anyhow::Result<bool> {
        let mut versions_only = true;
        for p in paths {
            let mut found = None;
            for g in m.grants.iter().filter(|g| covers(&g.target, p)) {
                let now = match &g.target {
                    Target::Exact(_) => cat.version_in(&g.target, p)?,
                    Target::Prefix(_) => cat.current(p)?,
                };
                found = now.or(found);
            }
            match (m.secrets.get_mut(p.as_str()), found) {
                (Some(was), Some(meta)) => *was = meta,
                (None, None) => {}
                (Some(_), None) => {
                    m.secrets.remove(p.as_str());
                    versions_only = false;
                }
                (None, Some(meta)) => {
                    m.secrets.insert(p.clone(), meta);
                    versions_only = false;
                }
            }
        }
        Ok(versions_only)
    }

    /// A mount's view after new versions of secrets it shows, when no
    /// file comes or goes (see [`MountTable::recover`]): each file of a
    /// changed secret gets a new node with the new value, the others are
    /// kept. A shown secret without a file (hidden by a clash, or its
    /// value failed to load before), or a value that cannot be loaded
    /// now, asks for the view to be built from scratch, which reports it.
    fn patch_view<C: Catalog>(
        &self,
        cat: &Memo<'_, C>,
        m: &Mount,
        paths: &[String],
        notices: &mut Vec<Notice>,
    ) -> Patch {
        let old = m.fs.view();
        if paths.iter().any(|p| m.secrets.contains_key(p.as_str()) && !old.by_name.values().any(|n| n.secret == *p)) {
            return Patch::Rebuild;
        }
        let mut nodes = Vec::with_capacity(old.by_name.len());
        let mut changed = false;
        for n in old.by_name.values() {
            let meta = paths.iter().any(|p| *p == n.secret).then(|| m.secrets.get(&n.secret)).flatten();
            let Some(meta) = meta.filter(|meta| meta.version != n.version) else {
                nodes.push(n.clone());
                continue;
            };
            if renews_inode(&n.secret) {
                return Patch::Rebuild;
            }
            let Ok(loaded) = cat.load(&n.secret, meta) else { return Patch::Rebuild };
            if n.notify.is_some() || !n.on_change.is_empty() {
                let (fs, secret, signal, on_change) =
                    (m.fs.clone(), n.secret.clone(), n.notify.clone(), n.on_change.clone());
                notices.push(Notice { fs, secret, version: meta.version, signal, on_change });
            }
            nodes.push(Arc::new(Node {
                // A new version is a new inode (see `WorkloadFs::replace`).
                ino: self.next_ino.fetch_add(1, Ordering::Relaxed),
                version: meta.version,
                mtime_ms: meta.created_unix_ms,
                value: loaded.value,
                health: loaded.health,
                template: loaded.template,
                ..Node::clone(n)
            }));
            changed = true;
        }
        if changed { Patch::View(View::new(nodes)) } else { Patch::Unchanged }
    }

    /// Build one mount's view from its grants and the secrets they
    /// cover, reusing the nodes (and inode numbers, and loaded values) of
    /// files that did not change.
    fn make_view(&self, cat: &impl Catalog, m: &Mount, notices: &mut Vec<Notice>) -> View {
        let (fs, shape, secrets) = (&m.fs, &m.shape, &m.secrets);
        let names: Vec<String> = secrets.keys().cloned().collect();
        let (mut specs, clashes) = files_for(&m.grants, &names);
        if let Some(mode) = shape.mode {
            specs.iter_mut().for_each(|s| s.mode = mode);
        }
        for c in clashes {
            tracing::warn!(workload = %fs.workload.name, clash = %c, "two grants want one file name");
        }
        let old = fs.view();
        let mut nodes = Vec::with_capacity(specs.len());
        for spec in specs {
            let meta = &secrets[&spec.secret];
            let before = old.by_name.get(&spec.name);
            let reuse = before.filter(|n| n.same_as(&spec.secret, meta.version, spec.mode, spec.uid, spec.gid));
            if let Some(n) = reuse {
                nodes.push(n.clone());
                continue;
            }
            let rotated = before.is_some_and(|n| n.secret == spec.secret && n.version != meta.version);
            if rotated && (spec.notify.is_some() || !spec.on_change.is_empty()) {
                let (fs, secret, signal, on_change) =
                    (fs.clone(), spec.secret.clone(), spec.notify.clone(), spec.on_change.clone());
                notices.push(Notice { fs, secret, version: meta.version, signal, on_change });
            }
            let loaded = match cat.load(&spec.secret, meta) {
                Ok(l) => l,
                Err(e) => {
                    // A tampered record is reported, never served.
                    tracing::error!(secret = %spec.secret, error = %e, "not shown in the mount");
                    continue;
                }
            };
            let reads = match before.filter(|n| n.secret == spec.secret) {
                Some(n) => n.reads.clone(),
                None => crate::metrics::reads_of(&fs.workload.name, &spec.secret),
            };
            // A new version is a new inode (see `WorkloadFs::replace`).
            nodes.push(Arc::new(Node {
                ino: self.next_ino.fetch_add(1, Ordering::Relaxed),
                name: spec.name,
                secret: spec.secret,
                version: meta.version,
                mtime_ms: meta.created_unix_ms,
                mode: spec.mode,
                uid: spec.uid,
                gid: spec.gid,
                value: loaded.value,
                health: loaded.health,
                reads,
                notify: spec.notify,
                on_change: spec.on_change,
                template: loaded.template,
            }));
        }
        View::new(nodes)
    }

    /// Bring one mount up to date after its workload's grants (or the
    /// mount) are new: read them again, swap in its new view, hand what
    /// the kernel must be told to `inval`, and serve the mount if it is
    /// adopted.
    pub(super) fn update<C: Catalog>(
        &self,
        cat: &Memo<'_, C>,
        mounts: &mut Mounts,
        key: &MountKey,
        notices: &mut Vec<Notice>,
        inval: &mut dyn FnMut(&Arc<Conn>, Swapped),
    ) -> anyhow::Result<()> {
        let Some(m) = mounts.by_key.get_mut(key) else { return Ok(()) };
        let read = match cat.grants(&m.fs.workload.name).and_then(|g| Ok((Self::covered_all(cat, &g)?, g))) {
            Ok((secrets, grants)) => {
                m.secrets = secrets;
                mounts.set_grants(key, grants);
                Ok(())
            }
            Err(e) => Err(e),
        };
        let m = mounts.by_key.get_mut(key).expect("present above");
        if read.is_ok() {
            self.swap(cat, m, None, notices, inval);
        }
        self.serve(key, m);
        read
    }

    /// [`MountTable::update`] after new values (or the existence) of
    /// `paths`: only the mount's own state changes, so it takes the mount
    /// alone (the caller keeps the index borrowed).
    pub(super) fn update_secrets<C: Catalog>(
        &self,
        cat: &Memo<'_, C>,
        key: &MountKey,
        m: &mut Mount,
        paths: &[String],
        notices: &mut Vec<Notice>,
        inval: &mut dyn FnMut(&Arc<Conn>, Swapped),
    ) -> anyhow::Result<()> {
        let read = Self::recover(cat, m, paths);
        if let Ok(versions_only) = read {
            self.swap(cat, m, versions_only.then_some(paths), notices, inval);
        }
        self.serve(key, m);
        read.map(drop)
    }

    /// Swap in the mount's new view: patched for new versions of `paths`
    /// if given, else built from scratch. What changed goes to `inval`.
    fn swap<C: Catalog>(
        &self,
        cat: &Memo<'_, C>,
        m: &mut Mount,
        paths: Option<&[String]>,
        notices: &mut Vec<Notice>,
        inval: &mut dyn FnMut(&Arc<Conn>, Swapped),
    ) {
        let patch = match paths {
            Some(paths) => self.patch_view(cat, m, paths, notices),
            None => Patch::Rebuild,
        };
        let view = match patch {
            Patch::Unchanged => return,
            Patch::View(v) => v,
            Patch::Rebuild => self.make_view(cat, m, notices),
        };
        let swapped = m.fs.replace(view, &self.next_ino);
        if !swapped.is_empty() {
            inval(&m.conn, swapped);
        }
    }

    /// A mount adopted from a predecessor is served once it is current
    /// (or as current as it can be). First, any request the predecessor
    /// read and never answered is queued again.
    fn serve(&self, key: &MountKey, m: &mut Mount) {
        if m.served {
            return;
        }
        m.conn.resend();
        match self.pool.add(&m.conn) {
            Ok(()) => m.served = true,
            Err(e) => tracing::error!(mount = ?key, error = format!("{e:#}"), "cannot serve mount"),
        }
    }

    /// The shape of a workload's own mount.
    pub(super) fn workload_shape(w: Workload) -> Shape {
        Shape { workload: w, uid: None, gid: None, mode: None, volume: None, container: None }
    }

    /// The shape of a container's mount of a volume (`workload`: the
    /// volume's workload, if it exists).
    pub(super) fn volume_shape(v: VolumeMount, workload: Option<Workload>) -> Shape {
        // A volume whose workload is gone shows nothing and matches
        // nobody (a workload without selectors matches no caller).
        let workload = workload.unwrap_or(Workload { name: v.workload.clone(), selectors: vec![] });
        Shape { workload, uid: v.uid, gid: v.gid, mode: v.mode, volume: Some(v.volume), container: v.container }
    }

    /// The mounts the catalog asks for, and how each shows its files.
    pub(super) fn wanted(cat: &impl Catalog) -> anyhow::Result<BTreeMap<MountKey, Shape>> {
        let workloads: HashMap<String, Workload> = cat.workloads()?.into_iter().map(|w| (w.name.clone(), w)).collect();
        let mut wanted = BTreeMap::new();
        for w in workloads.values() {
            wanted.insert(MountKey::Workload(w.name.clone()), Self::workload_shape(w.clone()));
        }
        for v in cat.volume_mounts()? {
            let w = workloads.get(&v.workload).cloned();
            wanted.insert(MountKey::Volume(v.id.clone()), Self::volume_shape(v, w));
        }
        Ok(wanted)
    }

    /// Make the mounts in `scope` match `wanted` (the wanted mounts are
    /// in scope too): unmount the unwanted or reshaped, mount the new,
    /// and rebuild each wanted mount's view from its grants. Errors for
    /// one mount are logged and do not stop the others.
    pub(super) fn reconcile<C: Catalog>(
        &self,
        cat: &Memo<'_, C>,
        mounts: &mut Mounts,
        scope: BTreeSet<MountKey>,
        wanted: BTreeMap<MountKey, Shape>,
        notices: &mut Vec<Notice>,
    ) {
        let gone: Vec<MountKey> = scope
            .into_iter()
            .filter(|k| mounts.by_key.get(k).is_some_and(|m| wanted.get(k) != Some(&m.shape)))
            .collect();
        for key in gone {
            if let Some(m) = mounts.remove(&key) {
                self.unmount(&key, m);
            }
        }
        Self::invalidating(wanted.len(), |inval| {
            for (key, shape) in wanted {
                if !mounts.by_key.contains_key(&key) {
                    match self.mount(&key, shape) {
                        Ok(m) => mounts.insert(key.clone(), m),
                        Err(e) => {
                            tracing::error!(mount = ?key, error = format!("{e:#}"), "cannot mount");
                            continue;
                        }
                    }
                }
                if let Err(e) = self.update(cat, mounts, &key, notices, inval) {
                    tracing::error!(mount = ?key, error = format!("{e:#}"), "cannot update mount");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretPath;

    /// Counts what reaches the real catalog.
    #[derive(Default)]
    struct Counting {
        covered: std::cell::Cell<u32>,
        loaded: std::cell::Cell<u32>,
    }

    impl Catalog for Counting {
        fn workloads(&self) -> anyhow::Result<Vec<Workload>> {
            Ok(Vec::new())
        }
        fn grants(&self, _: &str) -> anyhow::Result<Vec<Grant>> {
            Ok(Vec::new())
        }
        fn covered(&self, t: &Target) -> anyhow::Result<Vec<(String, VersionMeta)>> {
            self.covered.set(self.covered.get() + 1);
            let (Target::Exact(p) | Target::Prefix(p)) = t;
            Ok(vec![(p.as_str().to_owned(), VersionMeta { version: 1, created_unix_ms: 0, size: 1 })])
        }
        fn load(&self, _: &str, _: &VersionMeta) -> anyhow::Result<Loaded> {
            self.loaded.set(self.loaded.get() + 1);
            Ok(Loaded { value: Some(Arc::new(SecretBytes::copy_from(b"v"))), health: None, template: None })
        }
        fn volume_mounts(&self) -> anyhow::Result<Vec<VolumeMount>> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn one_sync_reads_each_target_and_value_once_and_mounts_share_it() {
        let real = Counting::default();
        let memo = Memo::new(&real);
        let (a, b) = (Target::Exact(SecretPath::parse("a").unwrap()), Target::Exact(SecretPath::parse("b").unwrap()));
        let meta = |v| VersionMeta { version: v, created_unix_ms: 0, size: 1 };
        for _ in 0..1000 {
            memo.covered(&a).unwrap();
        }
        memo.covered(&b).unwrap();
        let first = memo.load("a", &meta(1)).unwrap();
        let again = memo.load("a", &meta(1)).unwrap();
        memo.load("a", &meta(2)).unwrap();
        assert_eq!((real.covered.get(), real.loaded.get()), (2, 2));
        assert!(Arc::ptr_eq(first.value.as_ref().unwrap(), again.value.as_ref().unwrap()));
    }
}
