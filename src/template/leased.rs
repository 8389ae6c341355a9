//! Templates that read per-caller leases: `{{ dynamic("NAME").username }}`,
//! `.password`, `.expires_at` (any field the engine returns), and
//! `{{ cert("NAME").cert }}`, `.key`, `.ca`, `.chain` (see
//! [`crate::lease`]).
//!
//! Such a template's output differs per caller, so it is never rendered
//! once for all: the broker's render ([`render_shared`]) finds, with a
//! probe render, which lease sources it reads, and *defers* it — it keeps
//! the template source and the secret inputs (read at one snapshot, as
//! for any template) in a [`Registry`], and the file shows no shared
//! value. Each open then renders it for its caller from that caller's own
//! leases ([`crate::lease::Leases::body_for_node`]), one lease per
//! (template grant, container): the lease is keyed by the template grant
//! (`@template/T#dynamic:NAME`), apart from a direct `dynamic:NAME`
//! grant's. The file is served like a `dynamic:` file: direct I/O, no
//! keep-cache, a size that bounds every caller's render; a first open
//! whose lease must be issued is parked by the FUSE pool, off the workers.
//!
//! The template functions find what they need in a per-thread context
//! set around one (synchronous) check or render: [`checking`] at `template
//! put` (a source that does not exist is refused with the line and
//! column), [`probing`] in the broker's render, [`serving`] for one
//! caller. Outside those, `dynamic()`/`cert()` fail the render closed.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use minijinja::value::{Object, Value};
use minijinja::{Environment, Error, ErrorKind};

use crate::secret::SecretBytes;

/// The most lease sources one template may read.
pub const MAX_SOURCES: usize = 8;
/// Deferred renders kept per template path (the current one and the one
/// before, for an open that looked the name up just before a swap).
const KEPT: usize = 2;

/// What the template functions see on this thread.
enum Ctx {
    /// At put: the sources that exist; records every one named.
    Check { known: BTreeSet<String>, seen: BTreeSet<String> },
    /// The broker's render: records the sources named, gives placeholders.
    Probe { seen: BTreeSet<String> },
    /// One caller's render: the fields of each of its leases, by source.
    Serve { fields: BTreeMap<String, serde_json::Value> },
}

thread_local! {
    static CTX: RefCell<Option<Ctx>> = const { RefCell::new(None) };
}

/// Run `f` with `ctx` set on this thread; returns its result and the
/// context as `f` left it.
fn with_ctx<T>(ctx: Ctx, f: impl FnOnce() -> T) -> (T, Ctx) {
    let before = CTX.with(|c| c.borrow_mut().replace(ctx));
    let out = f();
    let after = CTX.with(|c| std::mem::replace(&mut *c.borrow_mut(), before));
    (out, after.expect("template lease context"))
}

/// Run a template check (at put) with the lease sources that exist
/// (`dynamic:NAME`, `cert:NAME`): a template naming another is refused.
/// Gives `f`'s result and the sources the template read.
pub fn checking<T>(known: BTreeSet<String>, f: impl FnOnce() -> T) -> (T, BTreeSet<String>) {
    match with_ctx(Ctx::Check { known, seen: BTreeSet::new() }, f) {
        (out, Ctx::Check { seen, .. }) => (out, seen),
        (out, _) => (out, BTreeSet::new()),
    }
}

/// Run a render that probes which lease sources a template reads.
pub fn probing<T>(f: impl FnOnce() -> T) -> (T, BTreeSet<String>) {
    match with_ctx(Ctx::Probe { seen: BTreeSet::new() }, f) {
        (out, Ctx::Probe { seen }) => (out, seen),
        (out, _) => (out, BTreeSet::new()),
    }
}

/// Run one caller's render with the fields of its leases.
pub fn serving<T>(fields: BTreeMap<String, serde_json::Value>, f: impl FnOnce() -> T) -> T {
    let (out, ctx) = with_ctx(Ctx::Serve { fields }, f);
    // The fields hold credentials: zero what can be.
    if let Ctx::Serve { fields } = ctx {
        for (_, v) in fields {
            wipe(v);
        }
    }
    out
}

fn wipe(v: serde_json::Value) {
    match v {
        serde_json::Value::String(mut s) => zeroize::Zeroize::zeroize(&mut s),
        serde_json::Value::Object(m) => m.into_iter().for_each(|(_, v)| wipe(v)),
        serde_json::Value::Array(a) => a.into_iter().for_each(wipe),
        _ => {}
    }
}

/// A lease's JSON fields as a template value.
fn to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(f)) => Value::from(f),
            _ => Value::from(n.to_string()),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::from(a.iter().map(to_value).collect::<Vec<_>>()),
        serde_json::Value::Object(m) => {
            Value::from(m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect::<BTreeMap<String, Value>>())
        }
    }
}

fn ours(msg: impl std::fmt::Display) -> Error {
    // The prefix marks our own messages (see `super::located`): they name
    // sources only, never a value.
    Error::new(ErrorKind::InvalidOperation, format!("keyhole: {msg}"))
}

/// A placeholder for a dynamic lease in a check or probe: any field is a
/// string (the engine decides the fields; a missing one fails the render
/// at open).
#[derive(Debug)]
struct AnyField;

impl Object for AnyField {
    fn get_value(self: &Arc<Self>, _key: &Value) -> Option<Value> {
        Some(Value::from(""))
    }
}

/// The fields of a certificate lease (see `crate::lease::pem_fields`).
const CERT_FIELDS: [&str; 4] = ["cert", "key", "ca", "chain"];

fn lookup(kind: &str, name: &str) -> Result<Value, Error> {
    crate::policy::check_source_name(name).map_err(|e| ours(format!("{kind}({name:?}): {e}")))?;
    let id = format!("{kind}:{name}");
    CTX.with(|c| {
        let mut c = c.borrow_mut();
        let seen = match c.as_mut() {
            None => return Err(ours(format!("{kind}({name:?}) is served per caller only, at an open"))),
            Some(Ctx::Serve { fields }) => {
                return match fields.get(&id) {
                    Some(v) => Ok(to_value(v)),
                    None => Err(ours(format!("{kind}({name:?}) has no lease for this caller"))),
                };
            }
            Some(Ctx::Check { known, seen }) => {
                if !known.contains(&id) {
                    let verb = if kind == "cert" { "keyhole cert add" } else { "keyhole dynamic add" };
                    return Err(ours(format!("{kind} source {name:?} does not exist ({verb} it first)")));
                }
                seen
            }
            Some(Ctx::Probe { seen }) => seen,
        };
        if !seen.contains(&id) && seen.len() >= MAX_SOURCES {
            return Err(ours(format!("a template may read at most {MAX_SOURCES} dynamic or cert sources")));
        }
        seen.insert(id);
        Ok(match kind {
            "cert" => Value::from(
                CERT_FIELDS.iter().map(|f| ((*f).to_owned(), Value::from(""))).collect::<BTreeMap<String, Value>>(),
            ),
            _ => Value::from_object(AnyField),
        })
    })
}

/// Add `dynamic()` and `cert()` to a template environment.
pub fn register(env: &mut Environment<'static>) {
    env.add_function("dynamic", |name: String| lookup("dynamic", &name));
    env.add_function("cert", |name: String| lookup("cert", &name));
}

/// A template render put off to each open: what it needs besides the
/// caller's leases.
pub struct Deferred {
    /// The render's version (the file's).
    pub version: u64,
    pub source: String,
    pub values: BTreeMap<String, Arc<SecretBytes>>,
    /// The fields of its Vault inputs read by field (`secret(p, field=)`).
    pub fields: super::FieldValues,
    /// The lease sources it reads (`dynamic:NAME`, `cert:NAME`).
    pub sources: Vec<String>,
    /// The largest render (and the size the file shows).
    pub max: usize,
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred").field("version", &self.version).field("sources", &self.sources).finish()
    }
}

/// The deferred renders of one broker: template path → its last few.
#[derive(Default)]
pub struct Registry(Mutex<HashMap<String, Vec<Arc<Deferred>>>>);

impl Registry {
    /// The deferred render of `path` at `version`, if it is one.
    pub fn get(&self, path: &str, version: u64) -> Option<Arc<Deferred>> {
        let m = self.0.lock().expect("deferred lock");
        m.get(path)?.iter().find(|d| d.version == version).cloned()
    }

    fn put(&self, path: &str, d: Deferred) {
        let mut m = self.0.lock().expect("deferred lock");
        let kept = m.entry(path.to_owned()).or_default();
        kept.retain(|k| k.version != d.version);
        kept.push(Arc::new(d));
        if kept.len() > KEPT {
            kept.remove(0);
        }
    }

    /// Forget a template path's renders (it renders shared again, or went).
    fn forget(&self, path: &str) {
        self.0.lock().expect("deferred lock").remove(path);
    }
}

/// The broker's render of template `path` (render version `version`):
/// rendered as usual if it reads no lease, `Ok(None)` if it does (each
/// open renders it for its caller, see [`crate::lease::Leases::body_for_node`]).
pub fn render_shared(
    registry: &Registry,
    path: &str,
    version: u64,
    source: &str,
    values: BTreeMap<String, Arc<SecretBytes>>,
    fields: super::FieldValues,
    max: usize,
) -> Result<Option<SecretBytes>, String> {
    let (out, seen) = probing(|| super::render_fields(source, values.clone(), fields.clone(), max));
    if seen.is_empty() {
        registry.forget(path);
        return out.map(Some);
    }
    drop(out);
    let max = max.min(crate::lease::LEASED_SIZE);
    registry.put(
        path,
        Deferred { version, source: source.to_owned(), values, fields, sources: seen.into_iter().collect(), max },
    );
    Ok(None)
}

/// Render a deferred template for one caller from the fields of its
/// leases (by source id). The error names a position and a reason, never
/// a value.
pub fn render_for(d: &Deferred, fields: BTreeMap<String, serde_json::Value>) -> Result<SecretBytes, String> {
    serving(fields, || super::render_fields(&d.source, d.values.clone(), d.fields.clone(), d.max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> BTreeSet<String> {
        ["dynamic:db".to_owned(), "cert:tls".to_owned()].into_iter().collect()
    }

    #[test]
    fn put_refuses_an_unknown_source_with_its_position() {
        let (ok, seen) = checking(known(), || {
            super::super::check("{{ dynamic('db').username }} {{ cert('tls').key }}", 1000, |_| None)
        });
        assert!(ok.is_ok(), "{ok:?}");
        // What it read is recorded: an admin's scope is checked against it.
        assert_eq!(seen, known());
        let e = checking(known(), || super::super::check("x\n  {{ dynamic('nope').username }}", 1000, |_| None))
            .0
            .unwrap_err();
        assert!(matches!(&e, super::super::TemplateError::At { line: 2, .. }), "{e}");
        assert!(e.to_string().contains("\"nope\"") && e.to_string().contains("dynamic add"), "{e}");
        let e = checking(known(), || super::super::check("{{ cert('db').cert }}", 1000, |_| None)).0.unwrap_err();
        assert!(e.to_string().contains("cert source"), "{e}");
        // A certificate has four fields; another is refused at put.
        assert!(checking(known(), || super::super::check("{{ cert('tls').nope }}", 1000, |_| None)).0.is_err());
        // Bad names, and no context at all, fail closed.
        assert!(checking(known(), || super::super::check("{{ dynamic('../x') }}", 1000, |_| None)).0.is_err());
        assert!(super::super::render("{{ dynamic('db').username }}", BTreeMap::new(), 100).is_err());
    }

    #[test]
    fn a_leased_template_is_deferred_and_rendered_per_caller() {
        let reg = Registry::default();
        let values: BTreeMap<String, Arc<SecretBytes>> =
            [("app/host".to_owned(), Arc::new(SecretBytes::copy_from(b"db.example")))].into_iter().collect();
        let t = "{{ secret('app/host') }} {{ dynamic('db').username }}:{{ dynamic('db').password }}";
        assert!(render_shared(&reg, "@template/t", 7, t, values.clone(), BTreeMap::new(), 1000).unwrap().is_none());
        let d = reg.get("@template/t", 7).unwrap();
        assert_eq!(d.sources, ["dynamic:db"]);
        let fields = |u: &str| -> BTreeMap<String, serde_json::Value> {
            [("dynamic:db".to_owned(), serde_json::json!({"username": u, "password": "pw"}))].into_iter().collect()
        };
        let a = render_for(&d, fields("u1")).unwrap();
        let b = render_for(&d, fields("u2")).unwrap();
        assert_eq!(a.expose(), b"db.example u1:pw");
        assert_eq!(b.expose(), b"db.example u2:pw");
        // A field the engine did not give fails closed, quoting no value.
        let e = render_for(&Deferred { source: "{{ dynamic('db').nope }}".into(), ..clone(&d) }, fields("u1"));
        assert!(e.is_err_and(|e| !e.contains("pw")));
        // A template without leases renders shared, and is forgotten.
        let plain =
            render_shared(&reg, "@template/t", 8, "{{ secret('app/host') }}", values, BTreeMap::new(), 1000).unwrap();
        assert_eq!(plain.unwrap().expose(), b"db.example");
        assert!(reg.get("@template/t", 7).is_none());
    }

    fn clone(d: &Deferred) -> Deferred {
        Deferred {
            version: d.version,
            source: d.source.clone(),
            values: d.values.clone(),
            fields: d.fields.clone(),
            sources: d.sources.clone(),
            max: d.max,
        }
    }

    #[test]
    fn too_many_sources_are_refused() {
        let known: BTreeSet<String> = (0..20).map(|i| format!("dynamic:s{i}")).collect();
        let t: String = (0..=MAX_SOURCES).map(|i| format!("{{{{ dynamic('s{i}').u }}}}")).collect();
        let e = checking(known, || super::super::check(&t, 10_000, |_| None)).0.unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
    }
}
