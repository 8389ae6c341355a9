//! Template operations at the broker level (put, get, list, remove), and
//! what the mounts show for a template grant (see [`crate::template`]).
//!
//! A template grant names the reserved path `@template/NAME`. To the
//! mounts it is one more exact grant: [`Broker::template_meta`] gives its
//! "version" (a hash of the template's version and every input's
//! version, so any change of either is a new inode) and
//! [`Broker::template_load`] its rendered bytes. Both come from one
//! render, made from the inputs read in one store transaction: a file
//! never shows half old, half new inputs. A Vault input is read from the
//! backend's cache (as plain grants are), which the watcher refreshes.
//!
//! The broker keeps which templates read which secret, so a change of a
//! secret also updates the mounts that show a template reading it
//! ([`Broker::with_templates`]).
#![forbid(unsafe_code)]

use super::ops::{Audit, Done};
use crate::audit::EventKind;
use crate::identity::Identity;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use sha2::Digest;

use super::Broker;
use crate::api::ApiError;
use crate::backend::VersionMeta;
use crate::backend::local::{StoreError, TEMPLATES};
use crate::fs::Loaded;
use crate::policy::{Grant, Target};
use crate::secret::{SecretBytes, SecretPath, TEMPLATE_PREFIX};
use crate::template::{Rendering, TemplateError, TemplateVersion};

/// One render of a template, as the mounts show it.
struct Rendered {
    version: u64,
    created_unix_ms: i64,
    value: Option<Arc<SecretBytes>>,
    info: Arc<Rendering>,
}

/// The broker's template state: the last render of each template, and
/// which templates read each secret.
#[derive(Default)]
pub struct TemplateState {
    renders: Mutex<HashMap<String, Arc<Rendered>>>,
    /// Secret path → the templates that read it; built from the store on
    /// first use, kept up to date by put and rm.
    readers: RwLock<Option<HashMap<String, BTreeSet<String>>>>,
}

impl std::fmt::Debug for TemplateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateState").finish_non_exhaustive()
    }
}

impl From<TemplateError> for ApiError {
    fn from(e: TemplateError) -> Self {
        ApiError::InvalidArgument(e.to_string())
    }
}

/// The template a target names, if it names one.
pub fn template_of(target: &Target) -> Option<&str> {
    match target {
        Target::Exact(p) => p.template_name(),
        Target::Prefix(_) => None,
    }
}

impl Broker {
    fn template_index(&self) -> Result<(), StoreError> {
        if self.templates.readers.read().expect("template index").is_some() {
            return Ok(());
        }
        let mut ix: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (name, versions) in self.store.records::<Vec<TemplateVersion>>(TEMPLATES)? {
            for input in versions.last().map(|v| v.inputs.clone()).unwrap_or_default() {
                ix.entry(input).or_default().insert(name.clone());
            }
        }
        *self.templates.readers.write().expect("template index") = Some(ix);
        Ok(())
    }

    fn index_template(&self, name: &str, inputs: &[String]) {
        let mut guard = self.templates.readers.write().expect("template index");
        let Some(ix) = guard.as_mut() else { return };
        ix.values_mut().for_each(|s| {
            s.remove(name);
        });
        ix.retain(|_, s| !s.is_empty());
        for i in inputs {
            ix.entry(i.clone()).or_default().insert(name.to_owned());
        }
    }

    /// `paths` and the template paths of every template that reads one
    /// of them: what a change of `paths` touches.
    pub fn with_templates(&self, paths: &[String]) -> Vec<String> {
        if let Err(e) = self.template_index() {
            tracing::error!(error = %e, "cannot read the templates; template files are not updated");
            return paths.to_vec();
        }
        let guard = self.templates.readers.read().expect("template index");
        let mut out = paths.to_vec();
        if let Some(ix) = guard.as_ref() {
            let names: BTreeSet<&String> = paths.iter().filter_map(|p| ix.get(p)).flatten().collect();
            out.extend(names.into_iter().map(|n| format!("{TEMPLATE_PREFIX}{n}")));
        }
        out
    }

    /// Grants as the Vault watcher should see them: a template grant
    /// stands for exact grants of its inputs.
    pub fn with_template_inputs(&self, grants: Vec<Grant>) -> Vec<Grant> {
        let mut out = Vec::with_capacity(grants.len());
        for g in grants {
            if let Some(name) = template_of(&g.target) {
                let inputs = self.store.template_versions(name).ok().flatten().and_then(|v| v.last().cloned());
                for i in inputs.map(|v| v.inputs).unwrap_or_default() {
                    if let Ok(p) = SecretPath::parse(&i) {
                        out.push(Grant { target: Target::Exact(p), ..g.clone() });
                    }
                }
            } else {
                out.push(g);
            }
        }
        out
    }

    /// Add a version of template `name`: checked first (it parses, names
    /// known functions only, and renders from the current values within
    /// fuel and `max_value_bytes`; every secret it reads exists).
    pub fn put_template(
        self: &Arc<Self>,
        by: &Identity,
        name: &str,
        source: &str,
        now_ms: i64,
    ) -> Result<TemplateVersion, ApiError> {
        self.put_template_within(by, &crate::policy::roles::Scope::Full, name, source, now_ms)
    }

    /// [`Self::put_template`] by an admin of `scope`: the dry run reads
    /// only what its roles cover, and the inputs are checked before the
    /// store is written (see [`super::scoped`]).
    pub fn put_template_within(
        self: &Arc<Self>,
        by: &Identity,
        scope: &crate::policy::roles::Scope,
        name: &str,
        source: &str,
        now_ms: i64,
    ) -> Result<TemplateVersion, ApiError> {
        self.write(Audit::by(by, EventKind::TemplatePut).path(name), |_| {
            crate::template::check_name(name)?;
            let DryRun { checked, sources, lack } = self.dry_run(scope, source, &[]);
            if let Some(lack) = lack {
                return Err(self.refuse(by, "PutTemplate", &lack));
            }
            let checked = checked?;
            let inputs: Vec<String> = checked.inputs.into_iter().collect();
            let fields: Vec<String> = checked.fields.into_iter().collect();
            // The lease sources it reads are within the caller's reach too.
            let reaches: Vec<String> = inputs.iter().chain(&sources).cloned().collect();
            self.check_template_put(by, scope, name, &reaches)?;
            self.template_index()?;
            let made = self.store.template_put(name, source, inputs.clone(), fields, sources, now_ms)?;
            self.index_template(name, &inputs);
            // Vault inputs: fetch them now, so the file renders at once.
            let mut changed = Vec::new();
            for i in &inputs {
                if let Ok(p) = SecretPath::parse(i) {
                    changed.extend(self.prefetch(&Target::Exact(p)));
                }
            }
            changed.push(format!("{TEMPLATE_PREFIX}{name}"));
            let version = made.version;
            Ok(Done::new(made).version(version).secrets(changed))
        })
    }

    /// A template's dry run for an admin of `scope` (`template put`, and
    /// `apply` of a `[[template]]`): it reads only what the scope covers
    /// ([`super::InputGate`]: a path outside it is never read, and is the
    /// `lack`), and records what the template reads — its inputs, those
    /// read by field, and the lease sources (`dynamic:`/`cert:`) it names:
    /// those the broker has, and `also` (a policy file's own).
    pub(super) fn dry_run(
        self: &Arc<Self>,
        scope: &crate::policy::roles::Scope,
        source: &str,
        also: &[String],
    ) -> DryRun {
        let max = self.config.max_value_bytes as usize;
        let gate = super::InputGate::new(scope);
        let (b, g) = (self.clone(), gate.clone());
        let get = move |path: &str| {
            if !g.readable(path) {
                return None;
            }
            let p = SecretPath::parse(path).ok()?;
            b.get_secret(&p, None).ok().map(|(_, v)| v)
        };
        let (b, g) = (self.clone(), gate.clone());
        let get_field: crate::template::GetField = Box::new(move |path: &str, field: &str| {
            if !g.readable(path) {
                return Err(format!("{path} is not the caller's to read"));
            }
            b.field_of(path, field)
        });
        // The dry run may call a backend: off the async workers already.
        let known = self.leases.sources().iter().map(|s| s.id()).chain(also.iter().cloned()).collect();
        let (checked, sources) =
            crate::template::leased::checking(known, || crate::template::check_fields(source, max, get, get_field));
        DryRun { checked, sources: sources.into_iter().collect(), lack: gate.lack() }
    }

    /// A version of a template (the current one for `None`).
    pub fn get_template(&self, name: &str, version: Option<u64>) -> Result<TemplateVersion, ApiError> {
        crate::template::check_name(name)?;
        let versions = self
            .store
            .template_versions(name)?
            .ok_or_else(|| StoreError::Missing(format!("template {name} does not exist")))?;
        let found = match version {
            None => versions.last(),
            Some(v) => versions.iter().find(|t| t.version == v),
        };
        found.cloned().ok_or_else(|| {
            StoreError::Missing(format!("template {name} has no version {}", version.unwrap_or(0))).into()
        })
    }

    /// Every template, at its current version.
    pub fn list_templates(&self) -> Result<Vec<(String, TemplateVersion)>, ApiError> {
        let all = self.store.records::<Vec<TemplateVersion>>(TEMPLATES)?;
        Ok(all.into_iter().filter_map(|(n, v)| v.last().cloned().map(|t| (n, t))).collect())
    }

    /// Remove a template and its versions; refused while a grant shows it.
    pub fn delete_template(&self, by: &Identity, name: &str) -> Result<usize, ApiError> {
        self.write(Audit::by(by, EventKind::TemplateRm).path(name), |_| {
            crate::template::check_name(name)?;
            let versions = self
                .store
                .template_versions(name)?
                .ok_or_else(|| StoreError::Missing(format!("template {name} does not exist")))?;
            let users: Vec<String> = self
                .store
                .grants(None)?
                .into_iter()
                .filter(|g| template_of(&g.target) == Some(name))
                .map(|g| g.workload)
                .collect();
            if !users.is_empty() {
                let users = users.join(", ");
                let why = format!("template {name} is granted to {users}: revoke it there first");
                return Err(StoreError::Exists(why).into());
            }
            self.template_index()?;
            self.store.remove_record(TEMPLATES, name)?;
            self.index_template(name, &[]);
            self.templates.renders.lock().expect("renders lock").remove(&format!("{TEMPLATE_PREFIX}{name}"));
            Ok(Done::new(versions.len()))
        })
    }

    /// A field of the current version of a Vault KV v2 secret, read from
    /// the backend (for a template's dry run at put). A local secret has
    /// no fields.
    fn field_of(&self, path: &str, field: &str) -> Result<SecretBytes, String> {
        let Some(v) = self.vaults.iter().find(|v| v.backend.relative(path).is_some()) else {
            return Err(
                "it is a local secret, which holds one value and no fields (field= reads a field of a Vault KV v2 secret)"
                    .into(),
            );
        };
        let p = SecretPath::parse(path).map_err(|e| e.to_string())?;
        let (meta, _) = self.get_secret(&p, None).map_err(|_| "it does not exist or cannot be read".to_owned())?;
        let fields = v.backend.cached_fields(path, meta.version).ok_or("its fields could not be read")?;
        let value = fields.values.get(field).ok_or_else(|| format!("it has no string field {field:?}"))?;
        Ok(SecretBytes::copy_from(value.expose()))
    }

    /// The Vault inputs that templates read by field, whose fields are
    /// not here (after a start: the backend's cache is restored from the
    /// store, which keeps one field): read them, then re-render.
    pub(super) async fn fetch_template_fields(self: Arc<Self>) {
        let Ok(all) = self.store.records::<Vec<TemplateVersion>>(TEMPLATES) else { return };
        let mut changed = Vec::new();
        for (name, versions) in all {
            let Some(tv) = versions.last() else { continue };
            for p in &tv.fields {
                let Some(v) = self.vaults.iter().find(|v| v.backend.relative(p).is_some()) else { continue };
                let Some(rel) = v.backend.relative(p) else { continue };
                let have = v.backend.cached(p).map(|c| c.meta.version);
                if have.is_some_and(|ver| v.backend.cached_fields(p, ver).is_some()) {
                    continue;
                }
                match v.backend.get(rel, have).await {
                    Ok(_) => changed.push(format!("{TEMPLATE_PREFIX}{name}")),
                    Err(e) => tracing::warn!(template = %name, error = %e, "cannot read the fields of an input"),
                }
            }
        }
        if !changed.is_empty() {
            let b = self.clone();
            let _ = tokio::task::spawn_blocking(move || b.everything_changed(changed)).await;
        }
    }

    /// Refuse a grant of a template that does not exist.
    pub fn check_template_grant(&self, g: &Grant) -> Result<(), ApiError> {
        match template_of(&g.target) {
            Some(name) => self.get_template(name, None).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Render template `name` from its inputs as they are now, read at
    /// one snapshot (the last render is reused if nothing changed).
    fn render_now(&self, path: &str, name: &str) -> anyhow::Result<Option<Arc<Rendered>>> {
        let Some(tv) = self.store.template_versions(name)?.and_then(|v| v.last().cloned()) else {
            return Ok(None);
        };
        let (remote, local): (Vec<String>, Vec<String>) =
            tv.inputs.iter().cloned().partition(|p| self.vaults.iter().any(|v| v.backend.relative(p).is_some()));
        let got = self.store.get_many(&local)?;
        let mut values: BTreeMap<String, Arc<SecretBytes>> = BTreeMap::new();
        let mut inputs = Vec::with_capacity(tv.inputs.len());
        let mut missing = Vec::new();
        let mut created = tv.created_unix_ms;
        for (p, g) in local.iter().zip(got) {
            match g {
                Some((meta, v)) => {
                    created = created.max(meta.created_unix_ms);
                    inputs.push((p.clone(), meta.version));
                    values.insert(p.clone(), Arc::new(v));
                }
                None => {
                    inputs.push((p.clone(), 0));
                    missing.push(p.clone());
                }
            }
        }
        let mut fields = crate::template::FieldValues::new();
        for p in &remote {
            let backend = self.vaults.iter().find(|v| v.backend.relative(p).is_some()).map(|v| &v.backend);
            let cached = backend.and_then(|b| b.cached(p));
            match cached {
                Some(c) => {
                    created = created.max(c.meta.created_unix_ms);
                    inputs.push((p.clone(), c.meta.version));
                    if tv.fields.contains(p) {
                        // The fields of the same version as the value, or none.
                        if let Some(f) = backend.and_then(|b| b.cached_fields(p, c.meta.version)) {
                            fields.insert(p.clone(), f.values);
                        }
                    }
                    values.insert(p.clone(), c.value);
                }
                None => {
                    inputs.push((p.clone(), 0));
                    missing.push(p.clone());
                }
            }
        }
        inputs.sort();
        let mut h = sha2::Sha256::new();
        h.update(name.as_bytes());
        h.update(tv.version.to_be_bytes());
        for (p, v) in &inputs {
            h.update((p.len() as u64).to_be_bytes());
            h.update(p.as_bytes());
            h.update(v.to_be_bytes());
            // A render made before the fields were read is not this one.
            if tv.fields.contains(p) {
                h.update([u8::from(fields.contains_key(p))]);
            }
        }
        let d = h.finalize();
        let mut eight = [0u8; 8];
        eight.copy_from_slice(&d[..8]);
        // Safe in a JSON number, never 0 (a value not fetched yet).
        let version = (u64::from_be_bytes(eight) & ((1 << 53) - 1)) | 1;
        if let Some(r) = self.templates.renders.lock().expect("renders lock").get(path) {
            if r.version == version {
                return Ok(Some(r.clone()));
            }
        }
        let max = self.config.max_value_bytes as usize;
        let (value, error) = if missing.is_empty() {
            let deferred = &self.leases.templates;
            match crate::template::leased::render_shared(deferred, path, version, &tv.source, values, fields, max) {
                Ok(v) => (v.map(Arc::new), None),
                Err(e) => (None, Some(format!("template {name} version {}: {e}", tv.version))),
            }
        } else {
            let why = format!("template {name}: its input {} is missing or not fetched yet", missing.join(", "));
            (None, Some(why))
        };
        let info = Arc::new(Rendering { template_version: tv.version, inputs, error });
        let r = Arc::new(Rendered { version, created_unix_ms: created, value, info });
        self.templates.renders.lock().expect("renders lock").insert(path.to_owned(), r.clone());
        Ok(Some(r))
    }

    /// For the mounts: template path `path` as a secret would be listed
    /// (its render's version), or None if the template does not exist.
    pub fn template_meta(&self, path: &str) -> anyhow::Result<Option<VersionMeta>> {
        let name = path.strip_prefix(TEMPLATE_PREFIX).unwrap_or(path);
        Ok(self.render_now(path, name)?.map(|r| VersionMeta {
            version: r.version,
            created_unix_ms: r.created_unix_ms,
            size: r.value.as_ref().map_or(0, |v| v.len() as u64),
        }))
    }

    /// For the mounts: the render `meta` names. A render that is gone (a
    /// successor asked for its predecessor's) is shown failed.
    pub fn template_load(&self, path: &str, meta: &VersionMeta) -> anyhow::Result<Loaded> {
        let last = self.templates.renders.lock().expect("renders lock").get(path).cloned();
        let r = match last.filter(|r| r.version == meta.version) {
            Some(r) => Some(r),
            None => {
                let name = path.strip_prefix(TEMPLATE_PREFIX).unwrap_or(path);
                self.render_now(path, name)?.filter(|r| r.version == meta.version)
            }
        };
        Ok(match r {
            Some(r) => Loaded { value: r.value.clone(), health: None, template: Some(r.info.clone()) },
            None => {
                let error = Some("this rendering of the template is gone; open the file again".to_owned());
                Loaded {
                    value: None,
                    health: None,
                    template: Some(Arc::new(Rendering { error, ..Default::default() })),
                }
            }
        })
    }
}

impl Broker {
    /// Templates `names` were put or removed outside [`Self::put_template`]
    /// (a policy apply): the index of who reads what is rebuilt from the
    /// store on next use, and their last renders forgotten.
    pub(crate) fn templates_replaced(&self, names: &[String]) {
        *self.templates.readers.write().expect("template index") = None;
        let mut renders = self.templates.renders.lock().expect("renders lock");
        for n in names {
            renders.remove(&format!("{TEMPLATE_PREFIX}{n}"));
        }
    }
}

/// What [`Broker::dry_run`] found.
pub(super) struct DryRun {
    pub checked: Result<crate::template::Checked, crate::template::TemplateError>,
    /// The lease sources it reads (`dynamic:NAME`, `cert:NAME`).
    pub sources: Vec<String>,
    /// The first path outside the caller's scope it tried to read.
    pub lack: Option<crate::policy::roles::Lack>,
}
