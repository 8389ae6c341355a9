//! Templates: one file rendered from several secrets (issue 16).
//!
//! The language is Jinja2 through `minijinja`, sandboxed: no loader (no
//! `include`, `import` or `extends`: the `multi_template` feature is off),
//! no macros, no environment or file access, undefined names are errors,
//! and every render is bounded by fuel (instructions and the memory they
//! allocate) and its output by `max_value_bytes`.
//!
//! A template names its inputs with `secret("path")`, and a field of a
//! Vault KV v2 secret with `secret("path", field="name")` (a local secret
//! has no fields: refused at put). They are found when
//! the template is put ([`check`]): a dry run with the current values
//! records every `secret()` call it makes, and refuses a syntax error, an
//! unknown function or variable, and a missing secret, with the line and
//! column. The recorded paths are the template's inputs: a render gets
//! exactly those values, read at one snapshot, and a `secret()` of any
//! other path (one built from a value, or in a branch the dry run did not
//! take) fails that render closed (the open gets `EIO`, audited with the
//! reason); putting the template again records it.
//!
//! Filters beyond minijinja's builtins: `tojson`, `b64encode`,
//! `b64decode`, `env` (POSIX shell single quotes), `yaml` (a YAML
//! double-quoted scalar). `indent` is minijinja's.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use base64::Engine;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};

use crate::secret::SecretBytes;

pub mod leased;

/// Fuel for one render: roughly instructions, and 64 bytes of allocation
/// each (see `minijinja::Environment::set_fuel`).
pub const FUEL: u64 = 2_000_000;
/// The longest template source accepted.
pub const MAX_SOURCE: usize = 256 << 10;
/// The most inputs one template may read.
pub const MAX_INPUTS: usize = 256;
/// The functions and variables a template may name.
const GLOBALS: [&str; 10] =
    ["secret", "range", "dict", "namespace", "cycler", "joiner", "loop", "self", "dynamic", "cert"];

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TemplateError {
    /// A template refused at put; line and column are 1-based.
    #[error("line {line}, column {col}: {msg}")]
    At { line: usize, col: usize, msg: String },
    #[error("{0}")]
    Invalid(String),
    /// A render that failed (at an open): the reason, without values.
    #[error("{0}")]
    Render(String),
}

/// One kept version of a template, as the store keeps it (sealed).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TemplateVersion {
    pub version: u64,
    pub created_unix_ms: i64,
    pub source: String,
    /// The secrets it reads (recorded at put).
    pub inputs: Vec<String>,
    /// Those of its inputs it reads fields of (`secret(path, field=...)`:
    /// Vault KV v2 secrets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    /// The lease sources it reads (`dynamic:NAME`, `cert:NAME`), recorded
    /// at put: what an admin granting it must reach (see the teams docs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
}

/// What a template reads: secret paths.
pub type Inputs = BTreeSet<String>;

/// The fields of Vault secrets a render may read: path → field → value.
pub type FieldValues = BTreeMap<String, Arc<BTreeMap<String, Arc<SecretBytes>>>>;

/// How a dry run finds a field of a secret: its value, or why not (a
/// local secret has no fields; a missing field).
pub type GetField = Box<dyn Fn(&str, &str) -> Result<SecretBytes, String> + Send + Sync>;

/// What [`check_fields`] found: every input, and those read by field.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Checked {
    pub inputs: Inputs,
    pub fields: Inputs,
}

/// The outcome of one render, shown with the file (see `fs::workload`):
/// the inputs and versions it read, and why it failed if it did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendering {
    /// The template's version.
    pub template_version: u64,
    /// (path, version) of every input, in path order.
    pub inputs: Vec<(String, u64)>,
    pub error: Option<String>,
}

impl Rendering {
    /// `tpl@V db/user@3 db/pass@5`, for audit lines.
    pub fn describe(&self) -> Vec<String> {
        self.inputs.iter().map(|(p, v)| format!("{p}@{v}")).collect()
    }
}

/// Check a template name: [A-Za-z0-9._-], 1 to 128 bytes, not `.`/`..`.
pub fn check_name(name: &str) -> Result<(), TemplateError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(TemplateError::Invalid(format!("{name:?} is not a template name: use 1 to 128 of [A-Za-z0-9._-] (no '/')")))
    }
}

/// 1-based (line, column) of byte `at` in `src`.
fn line_col(src: &str, at: usize) -> (usize, usize) {
    let at = at.min(src.len());
    let before = src.get(..at).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Marks the errors of our own functions and filters, whose details name
/// paths and limits only.
const OURS: &str = "keyhole: ";

fn ours(msg: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("{OURS}{msg}"))
}

/// A minijinja error as a position and a message, never a value: only
/// details made from the source (syntax, unknown names) or by our own
/// functions are kept; any other error (minijinja's, which may quote a
/// value) is shown by its kind alone.
fn located(src: &str, e: &Error) -> TemplateError {
    let from_source = matches!(
        e.kind(),
        ErrorKind::SyntaxError
            | ErrorKind::UnknownFilter
            | ErrorKind::UnknownFunction
            | ErrorKind::UnknownTest
            | ErrorKind::TooManyArguments
            | ErrorKind::MissingArgument
            | ErrorKind::BadInclude
            | ErrorKind::TemplateNotFound
            | ErrorKind::InvalidDelimiter
    );
    let msg = match e.detail() {
        Some(d) if d.starts_with(OURS) => d[OURS.len()..].to_owned(),
        Some(d) if from_source => format!("{}: {d}", e.kind()),
        _ => e.kind().to_string(),
    };
    match (e.range(), e.line()) {
        (Some(r), _) => {
            let (line, col) = line_col(src, r.start);
            TemplateError::At { line, col, msg }
        }
        (None, Some(line)) => TemplateError::At { line, col: 1, msg },
        _ => TemplateError::Invalid(msg),
    }
}

/// A path as an error may show it: quoted if the source spells it out,
/// otherwise not at all (it was built at render time, maybe from a value).
fn shown(source: &str, path: &str) -> String {
    if !path.is_empty() && source.contains(path) {
        format!("{path:?}")
    } else {
        "(a path built at render time, not written in the template)".to_owned()
    }
}

/// How `secret()` finds values (a path, and a field or none): in a dry
/// run, any existing secret (and records it); in a render, only the
/// recorded inputs.
type Lookup = Arc<dyn Fn(&str, Option<&str>) -> Result<Value, String> + Send + Sync>;

fn value_of(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => Value::from(s),
        Err(_) => Value::from_bytes(bytes.to_vec()),
    }
}

/// The most a filter takes in: no render may be larger
/// ([`crate::config::MAX_VALUE_BYTES_CEILING`]), and fuel does not charge
/// our filters, so a huge input (`('x' * 10**8) | env`) is refused before
/// it is copied and quoted.
const MAX_FILTER_INPUT: usize = crate::config::MAX_VALUE_BYTES_CEILING as usize;

fn bytes_of(v: &Value) -> Result<Vec<u8>, Error> {
    let b = match (v.as_str(), v.as_bytes()) {
        (Some(s), _) => s.as_bytes(),
        (None, Some(b)) => b,
        (None, None) => {
            let b = v.to_string().into_bytes();
            bounded(b.len())?;
            return Ok(b);
        }
    };
    bounded(b.len())?;
    Ok(b.to_vec())
}

fn bounded(len: usize) -> Result<(), Error> {
    if len > MAX_FILTER_INPUT {
        return Err(ours(format!("a filter's input is {len} bytes; the limit is {MAX_FILTER_INPUT}")));
    }
    Ok(())
}

fn text_of(v: &Value, filter: &str) -> Result<String, Error> {
    String::from_utf8(bytes_of(v)?).map_err(|_| ours(format!("{filter}: the value is not UTF-8 (use b64encode)")))
}

/// POSIX shell single quotes: `'...'`, a `'` as `'\''`. `set -a; . file`
/// gives back the exact bytes (a NUL cannot be in a shell variable).
pub fn shell_quote(s: &str) -> Result<String, String> {
    if s.contains('\0') {
        return Err("env: the value holds a NUL byte, which no shell variable can".into());
    }
    Ok(format!("'{}'", s.replace('\'', r"'\''")))
}

/// A YAML double-quoted scalar: `"`, `\` and every character a YAML
/// parser would refuse or fold (controls, C1, line/paragraph separators,
/// BOM, non-characters) escaped; other text as is.
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || (0x7f..=0x9f).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn environment(lookup: Lookup) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder().keep_trailing_newline(true).build() {
        env.set_syntax(syntax);
    }
    env.remove_global("debug");
    leased::register(&mut env);
    env.add_function("secret", move |path: String, kwargs: Kwargs| -> Result<Value, Error> {
        let field: Option<String> = kwargs.get("field")?;
        kwargs.assert_all_used()?;
        lookup(&path, field.as_deref()).map_err(ours)
    });
    env.add_filter("tojson", |v: Value| -> Result<String, Error> {
        bounded(v.as_str().map_or(0, str::len))?;
        let r = match v.as_bytes().filter(|_| v.as_str().is_none()) {
            Some(b) => serde_json::to_string(
                &String::from_utf8(b.to_vec()).map_err(|_| ours("tojson: the value is not UTF-8 (use b64encode)"))?,
            ),
            None => serde_json::to_string(&v),
        };
        r.map_err(|_| ours("tojson: the value cannot be written as JSON"))
    });
    env.add_filter("b64encode", |v: Value| -> Result<String, Error> {
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes_of(&v)?))
    });
    env.add_filter("b64decode", |v: Value| -> Result<Value, Error> {
        let text = text_of(&v, "b64decode")?;
        let b = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| ours("b64decode: the value is not base64"))?;
        Ok(value_of(&b))
    });
    env.add_filter("env", |v: Value| -> Result<String, Error> { shell_quote(&text_of(&v, "env")?).map_err(ours) });
    env.add_filter("yaml", |v: Value| -> Result<String, Error> { Ok(yaml_quote(&text_of(&v, "yaml")?)) });
    env
}

/// Refuse names a template may not use (an unknown function is a name
/// that is not declared): found without running it, in every branch.
fn check_names(env: &Environment<'_>, source: &str) -> Result<(), TemplateError> {
    let t = env.template_from_str(source).map_err(|e| located(source, &e))?;
    let mut unknown: Vec<String> =
        t.undeclared_variables(false).into_iter().filter(|n| !GLOBALS.contains(&n.as_str())).collect();
    unknown.sort();
    if let Some(name) = unknown.first() {
        let at = find_word(source, name).unwrap_or(0);
        let (line, col) = line_col(source, at);
        return Err(TemplateError::At {
            line,
            col,
            msg: format!(
                "unknown function or variable {name:?} (a template may use secret(\"path\") and minijinja's builtins)"
            ),
        });
    }
    Ok(())
}

/// Where `word` first stands alone in `src`.
fn find_word(src: &str, word: &str) -> Option<usize> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    src.match_indices(word).map(|(i, _)| i).find(|&i| {
        let before = src[..i].chars().next_back().is_none_or(|c| !ident(c));
        let after = src[i + word.len()..].chars().next().is_none_or(|c| !ident(c));
        before && after
    })
}

/// Check a template at put: it must parse, name only known functions,
/// and render (dry run, values from `get`) within fuel and `max` bytes.
/// Returns the secrets it reads. `get` returns None for a missing secret.
pub fn check(
    source: &str,
    max: usize,
    get: impl Fn(&str) -> Option<SecretBytes> + Send + Sync + 'static,
) -> Result<Inputs, TemplateError> {
    let no_fields: GetField = Box::new(|_: &str, _: &str| Err("this secret has no fields".to_owned()));
    check_fields(source, max, get, no_fields).map(|c| c.inputs)
}

/// [`check`], with `secret(path, field=...)` read through `get_field`.
pub fn check_fields(
    source: &str,
    max: usize,
    get: impl Fn(&str) -> Option<SecretBytes> + Send + Sync + 'static,
    get_field: GetField,
) -> Result<Checked, TemplateError> {
    if source.len() > MAX_SOURCE {
        return Err(TemplateError::Invalid(format!(
            "the template is {} bytes; the limit is {MAX_SOURCE}",
            source.len()
        )));
    }
    let seen: Arc<Mutex<Checked>> = Arc::default();
    let rec = seen.clone();
    let src = source.to_owned();
    let lookup: Lookup = Arc::new(move |path: &str, field: Option<&str>| {
        let shown = |p| shown(&src, p);
        crate::secret::SecretPath::parse(path).map_err(|e| format!("secret({}): {e}", shown(path)))?;
        let mut seen = rec.lock().expect("inputs lock");
        if !seen.inputs.contains(path) && seen.inputs.len() >= MAX_INPUTS {
            return Err(format!("a template may read at most {MAX_INPUTS} secrets"));
        }
        let v = match field {
            None => get(path).ok_or_else(|| format!("secret {} does not exist", shown(path)))?,
            Some(f) => {
                let v = get_field(path, f).map_err(|why| format!("secret({}, field={f:?}): {why}", shown(path)))?;
                seen.fields.insert(path.to_owned());
                v
            }
        };
        seen.inputs.insert(path.to_owned());
        Ok(value_of(v.expose()))
    });
    let env = environment(lookup);
    check_names(&env, source)?;
    let out = render_with(&env, source, max).map_err(|e| match e {
        RenderFail::At(e) => located(source, &e),
        RenderFail::Other(m) => TemplateError::Invalid(m),
    })?;
    drop(out);
    let checked = seen.lock().expect("inputs lock").clone();
    Ok(checked)
}

enum RenderFail {
    At(Error),
    Other(String),
}

/// A `Write` that refuses to grow past `max` bytes.
struct Capped {
    buf: zeroize::Zeroizing<Vec<u8>>,
    max: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.max {
            return Err(std::io::Error::other("too large"));
        }
        // Grow by hand: a reallocation would leave a copy behind.
        if self.buf.capacity() < self.buf.len() + b.len() {
            let want = (self.buf.len() + b.len()).max(self.buf.capacity() * 2).min(self.max);
            let mut bigger = zeroize::Zeroizing::new(Vec::with_capacity(want));
            bigger.extend_from_slice(&self.buf);
            self.buf = bigger;
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn render_with(env: &Environment<'_>, source: &str, max: usize) -> Result<SecretBytes, RenderFail> {
    let t = env.template_from_str(source).map_err(RenderFail::At)?;
    let mut out = Capped { buf: zeroize::Zeroizing::new(Vec::new()), max };
    match t.render_captured_to((), &mut out) {
        Ok(_) => Ok(SecretBytes::copy_from(&out.buf)),
        Err(e) if e.kind() == ErrorKind::WriteFailure => {
            Err(RenderFail::Other(format!("the rendered file would be larger than {max} bytes (max_value_bytes)")))
        }
        Err(e) if e.kind() == ErrorKind::OutOfFuel => {
            Err(RenderFail::Other("the render ran out of fuel (a template that loops too long)".into()))
        }
        Err(e) => Err(RenderFail::At(e)),
    }
}

/// Render `source` from `values` (its inputs, read at one snapshot). The
/// error names a position and a reason, never a value.
pub fn render(source: &str, values: BTreeMap<String, Arc<SecretBytes>>, max: usize) -> Result<SecretBytes, String> {
    render_fields(source, values, FieldValues::new(), max)
}

/// [`render`], with the fields of the Vault inputs read by field (at the
/// same versions as `values`).
pub fn render_fields(
    source: &str,
    values: BTreeMap<String, Arc<SecretBytes>>,
    fields: FieldValues,
    max: usize,
) -> Result<SecretBytes, String> {
    let src = source.to_owned();
    let lookup: Lookup = Arc::new(move |path: &str, field: Option<&str>| match (field, values.get(path)) {
        (None, Some(v)) => Ok(value_of(v.expose())),
        (Some(f), Some(_)) => match fields.get(path) {
            Some(all) => all
                .get(f)
                .map(|v| value_of(v.expose()))
                .ok_or_else(|| format!("secret {} has no string field {f:?}", shown(&src, path))),
            None => Err(format!("the fields of secret {} are not fetched yet", shown(&src, path))),
        },
        (_, None) => Err(format!(
            "secret {} is not one of the inputs recorded when the template was put (put the template again)",
            shown(&src, path)
        )),
    });
    let env = environment(lookup);
    render_with(&env, source, max).map_err(|e| match e {
        RenderFail::At(e) => located(source, &e).to_string(),
        RenderFail::Other(m) => m,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_filter_refuses_an_input_larger_than_any_render() {
        let e = super::render("{{ ('x' * 20000000) | env }}", Default::default(), 1000).unwrap_err();
        assert!(e.contains("a filter's input is 20000000 bytes"), "{e}");
        let e = super::render("{{ ('x' * 20000000) | tojson }}", Default::default(), 1000).unwrap_err();
        assert!(e.contains("limit"), "{e}");
        assert_eq!(super::render("{{ 'a' | env }}", Default::default(), 1000).unwrap().expose(), b"'a'");
    }

    use super::*;

    fn store(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<SecretBytes> + Send + Sync + 'static {
        let m: BTreeMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |p| m.get(p).map(|v| SecretBytes::copy_from(v.as_bytes()))
    }

    #[test]
    fn check_records_inputs_and_refuses_with_positions() {
        let get = store(&[("db/user", "u"), ("db/pass", "p")]);
        let inputs = check("{{ secret('db/user') }}:{{ secret(\"db/pass\") }}\n", 1000, get).unwrap();
        assert_eq!(inputs.into_iter().collect::<Vec<_>>(), ["db/pass", "db/user"]);
        let e = check("a\nb {{ secret('db/none') }}", 1000, store(&[])).unwrap_err();
        assert!(matches!(&e, TemplateError::At { line: 2, .. }), "{e}");
        assert!(e.to_string().contains("db/none"), "{e}");
        let e = check("x\n  {% for %}", 1000, store(&[])).unwrap_err();
        assert!(matches!(e, TemplateError::At { line: 2, .. }), "{e}");
        let e = check("x\n\n {{ nope('a') }}", 1000, store(&[])).unwrap_err();
        assert!(matches!(e, TemplateError::At { line: 3, col: 5, .. }), "{e}");
        let e = check("{{ 'a'|nosuchfilter }}", 1000, store(&[])).unwrap_err();
        assert!(e.to_string().contains("filter"), "{e}");
        // No loader: include and friends are syntax errors or unknown.
        assert!(check("{% include 'x' %}", 1000, store(&[])).is_err());
        assert!(check("{% macro m() %}{% endmacro %}", 1000, store(&[])).is_err());
    }

    #[test]
    fn fields_are_read_by_field_and_local_secrets_have_none() {
        let get = store(&[("prod/db", "pw"), ("local/x", "v")]);
        let get_field: GetField = Box::new(|p: &str, f: &str| match (p, f) {
            ("prod/db", "username") => Ok(SecretBytes::copy_from(b"alice")),
            ("prod/db", _) => Err(format!("it has no string field {f:?}")),
            _ => Err("a local secret has no fields".into()),
        });
        let c = check_fields("{{ secret('prod/db', field='username') }}:{{ secret('prod/db') }}", 1000, get, get_field)
            .unwrap();
        assert_eq!(c.inputs.iter().collect::<Vec<_>>(), ["prod/db"]);
        assert_eq!(c.fields.iter().collect::<Vec<_>>(), ["prod/db"]);
        let get_field: GetField = Box::new(|_: &str, _: &str| Err("a local secret has no fields".into()));
        let e = check_fields("\n {{ secret('local/x', field='a') }}", 1000, store(&[("local/x", "v")]), get_field)
            .unwrap_err();
        assert!(matches!(&e, TemplateError::At { line: 2, .. }), "{e}");
        assert!(e.to_string().contains("local secret has no fields"), "{e}");
        let values: BTreeMap<String, Arc<SecretBytes>> =
            [("prod/db".to_owned(), Arc::new(SecretBytes::copy_from(b"pw")))].into_iter().collect();
        let t = "{{ secret('prod/db', field='username') }}:{{ secret('prod/db') }}";
        let e = render_fields(t, values.clone(), FieldValues::new(), 100).unwrap_err();
        assert!(e.contains("not fetched yet"), "{e}");
        let f: BTreeMap<String, Arc<SecretBytes>> =
            [("username".to_owned(), Arc::new(SecretBytes::copy_from(b"alice")))].into_iter().collect();
        let fields: FieldValues = [("prod/db".to_owned(), Arc::new(f))].into_iter().collect();
        assert_eq!(render_fields(t, values.clone(), fields.clone(), 100).unwrap().expose(), b"alice:pw");
        let e = render_fields("{{ secret('prod/db', field='nope') }}", values, fields, 100).unwrap_err();
        assert!(e.contains("no string field"), "{e}");
    }

    #[test]
    fn fuel_and_size_bound_a_render() {
        let t = "{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}";
        let e = render(t, BTreeMap::new(), 1 << 30).unwrap_err();
        assert!(e.contains("fuel"), "{e}");
        let e = render("{{ 'x' * 100 }}", BTreeMap::new(), 10).unwrap_err();
        assert!(e.contains("larger"), "{e}");
        let e = render("{{ secret('other') }}", BTreeMap::new(), 10).unwrap_err();
        assert!(e.contains("not one of the inputs"), "{e}");
    }

    #[test]
    fn render_errors_never_quote_a_value() {
        let v = "hunter2-secret-value";
        let values = || -> BTreeMap<String, Arc<SecretBytes>> {
            [("s".to_owned(), Arc::new(SecretBytes::copy_from(v.as_bytes())))].into_iter().collect()
        };
        for t in [
            "{{ secret('s')|int }}",
            "{{ secret('s') + 1 }}",
            "{{ secret('s')|b64decode }}",
            "{{ secret('s')[1000] }}",
            "{{ secret('s').nope }}",
            "{{ secret('s')|float }}",
            "{{ range(secret('s')) }}",
            "{% for x in secret('s') %}{{ x.y.z }}{% endfor %}",
            "{{ secret('s') is divisibleby 3 }}",
            "{{ secret(secret('s')) }}",
        ] {
            if let Err(e) = render(t, values(), 1000) {
                assert!(!e.contains("hunter2"), "{t}: {e}");
            }
            let get = |p: &str| (p == "s").then(|| SecretBytes::copy_from(b"hunter2-secret-value"));
            if let Err(e) = check(t, 1000, get) {
                assert!(!e.to_string().contains("hunter2"), "{t}: {e}");
            }
        }
    }

    #[test]
    fn filters_quote_for_their_formats() {
        assert_eq!(shell_quote("it's").unwrap(), r"'it'\''s'");
        assert!(shell_quote("a\0b").is_err());
        assert_eq!(yaml_quote("a\"b\\c\nd\u{85}\u{2028}é"), "\"a\\\"b\\\\c\\nd\\x85\\u2028é\"");
        let v: BTreeMap<String, Arc<SecretBytes>> =
            [("s".to_owned(), Arc::new(SecretBytes::copy_from("q\"'\n€".as_bytes())))].into_iter().collect();
        let out = render(
            "{{ secret('s')|tojson }} {{ secret('s')|b64encode }} {{ secret('s')|b64encode|b64decode|env }}",
            v,
            1000,
        )
        .unwrap();
        assert_eq!(std::str::from_utf8(out.expose()).unwrap(), "\"q\\\"'\\n€\" cSInCuKCrA== 'q\"'\\''\n€'");
    }
}
