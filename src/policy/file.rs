//! Policy as a file: the TOML `keyhole apply`, `diff` and `export` speak,
//! parsed into checked workloads, grants, roles, templates and lease
//! sources (each with the line it came from), compared with what the
//! broker holds, and printed back.
//! Pure: no I/O. The format is documented in
//! docs/src/reference/policy-file.md.
//!
//! Names only, never values: a grant names a secret path; nothing in the
//! file can carry a secret's value.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::roles::{Lack, Need, Role, Scope, Verb, reach_of, source_reach};
use super::{Grant, Workload, check_file_clash};
use crate::backend::local::{PolicyChange, PutTemplate};
use crate::lease::{Kind, Source};

/// A file that cannot be applied: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct FileError {
    /// 1-based; `None` for a problem with no line (a prune).
    pub line: Option<usize>,
    pub message: String,
    /// The caller's roles do not allow the item (PERMISSION_DENIED), as
    /// opposed to a file that is wrong (INVALID_ARGUMENT).
    pub denied: bool,
}

fn at(line: usize, message: impl Into<String>) -> FileError {
    FileError { line: Some(line), message: message.into(), denied: false }
}

/// The largest policy file accepted (a bound on what one call may make
/// the broker parse and hold).
pub const MAX_FILE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    role: Vec<Spanned<RawRole>>,
    #[serde(default)]
    workload: Vec<Spanned<RawWorkload>>,
    #[serde(default)]
    grant: Vec<Spanned<RawGrant>>,
    #[serde(default)]
    template: Vec<Spanned<TemplateSpec>>,
    #[serde(default)]
    dynamic: Vec<Spanned<DynamicSpec>>,
    #[serde(default)]
    cert: Vec<Spanned<CertSpec>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    name: String,
    principals: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    workloads: Vec<String>,
    verbs: Vec<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: String,
    selectors: Vec<String>,
}

/// A file mode as `"0440"` (a string, octal) or `0o440` (a TOML integer).
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
enum RawMode {
    Int(u32),
    Octal(String),
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    /// Grants of a template, dynamic source or certificate, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dynamic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cert: Option<String>,
    workload: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<RawMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notify: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restart: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restart_spacing: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exec: Option<Vec<String>>,
}

/// `[[template]]`: a template (`keyhole template put NAME`), its text inline.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    pub name: String,
    /// The template text, inline.
    pub source: String,
    /// The inputs its dry run records (filled in by the broker before
    /// planning; a template whose text is unchanged keeps its own).
    #[serde(skip)]
    pub inputs: Option<Vec<String>>,
    /// Those of its inputs its dry run read by field.
    #[serde(skip)]
    pub fields: Vec<String>,
}

/// `[[dynamic]]`: `keyhole dynamic add NAME --backend B --path P`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct DynamicSpec {
    name: String,
    backend: String,
    path: String,
}

/// `[[cert]]`: `keyhole cert add NAME --backend B --issue P --uri U [--cn C] [--ttl T]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CertSpec {
    name: String,
    backend: String,
    issue: String,
    uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ttl: Option<String>,
}

/// A parsed, checked policy file; every item with its line.
#[derive(Debug, Default)]
pub struct PolicyFile {
    pub roles: Vec<(usize, Role)>,
    pub workloads: Vec<(usize, Workload)>,
    pub grants: Vec<(usize, Grant)>,
    pub templates: Vec<(usize, TemplateSpec)>,
    /// `[[dynamic]]` and `[[cert]]`, checked as their `add` commands check them.
    pub sources: Vec<(usize, Source)>,
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

fn parse_mode(m: &RawMode) -> Result<u32, String> {
    match m {
        RawMode::Int(n) => Ok(*n),
        RawMode::Octal(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .map_err(|_| format!("mode {s:?} is not an octal number such as \"0440\"")),
    }
}

impl PolicyFile {
    /// Parse and check `text`. Every error names its line.
    pub fn parse(text: &str) -> Result<PolicyFile, FileError> {
        if text.len() > MAX_FILE_BYTES {
            return Err(FileError {
                line: None,
                message: format!("the file is {} bytes; the limit is {MAX_FILE_BYTES}", text.len()),
                denied: false,
            });
        }
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            FileError { line, message: e.message().trim().to_owned(), denied: false }
        })?;
        let line = |s: &std::ops::Range<usize>| line_of(text, s.start);
        let mut out = PolicyFile::default();
        let mut names = BTreeSet::new();
        for r in raw.role {
            let l = line(&r.span());
            let r = r.into_inner();
            let role = Role::new(&r.name, &r.principals, &r.paths, &r.workloads, &r.verbs)
                .map_err(|e| at(l, format!("[[role]] {}: {e}", r.name)))?;
            if !names.insert(role.name.clone()) {
                return Err(at(l, format!("[[role]] {} is named twice", role.name)));
            }
            out.roles.push((l, role));
        }
        let mut names = BTreeSet::new();
        for w in raw.workload {
            let l = line(&w.span());
            let w = w.into_inner();
            let wl =
                Workload::new(&w.name, &w.selectors).map_err(|e| at(l, format!("[[workload]] {}: {e}", w.name)))?;
            if !names.insert(wl.name.clone()) {
                return Err(at(l, format!("[[workload]] {} is named twice", wl.name)));
            }
            out.workloads.push((l, wl));
        }
        let mut names = BTreeSet::new();
        for t in raw.template {
            let l = line(&t.span());
            let t = t.into_inner();
            crate::template::check_name(&t.name).map_err(|e| at(l, format!("[[template]] {}: {e}", t.name)))?;
            if t.source.len() > crate::template::MAX_SOURCE {
                return Err(at(
                    l,
                    format!("[[template]] {}: longer than {} bytes", t.name, crate::template::MAX_SOURCE),
                ));
            }
            if !names.insert(t.name.clone()) {
                return Err(at(l, format!("[[template]] {} is named twice", t.name)));
            }
            out.templates.push((l, TemplateSpec { inputs: None, ..t }));
        }
        let mut ids = BTreeSet::new();
        let dynamics = raw.dynamic.into_iter().map(|d| {
            let l = line(&d.span());
            let d = d.into_inner();
            (l, "[[dynamic]]", Source::new(Kind::Dynamic, &d.name, &d.backend, &d.path, None, None, None), d.name)
        });
        let certs = raw.cert.into_iter().map(|c| {
            let l = line(&c.span());
            let c = c.into_inner();
            let src =
                Source::new(Kind::Cert, &c.name, &c.backend, &c.issue, Some(&c.uri), c.cn.as_deref(), c.ttl.as_deref());
            (l, "[[cert]]", src, c.name)
        });
        for (l, what, src, name) in dynamics.chain(certs) {
            let src = src.map_err(|e| at(l, format!("{what} {name}: {e}")))?;
            if !ids.insert(src.id()) {
                return Err(at(l, format!("{what} {name} is named twice")));
            }
            out.sources.push((l, src));
        }
        let mut seen = BTreeSet::new();
        for g in raw.grant {
            let l = line(&g.span());
            let g = g.into_inner();
            let kinds = [("secret", &g.secret), ("template", &g.template), ("dynamic", &g.dynamic), ("cert", &g.cert)];
            let named: Vec<_> = kinds.iter().filter(|(_, v)| v.is_some()).collect();
            let secret = match named.as_slice() {
                [("secret", Some(s))] => s.clone(),
                [("template", Some(t))] => format!("{}{t}", crate::secret::TEMPLATE_PREFIX),
                [(kind, Some(n))] => format!("{kind}:{n}"),
                _ => return Err(at(l, "[[grant]] needs exactly one of secret, template, dynamic, cert")),
            };
            let on_change = crate::actions::OnChange::from_file(
                g.restart.unwrap_or(false),
                g.restart_spacing.as_deref(),
                g.exec.clone(),
            )
            .map_err(|e| at(l, format!("[[grant]] {secret}: {e}")))?;
            let mode = g.mode.as_ref().map(parse_mode).transpose().map_err(|e| at(l, format!("[[grant]]: {e}")))?;
            let grant = Grant::new(&secret, &g.workload, g.file.clone(), mode, g.uid, g.gid)
                .and_then(|x| x.with_notify(g.notify.as_deref()))
                .map(|x| x.with_on_change(on_change))
                .map_err(|e| at(l, format!("[[grant]] {secret} to {}: {e}", g.workload)))?;
            if !seen.insert((grant.workload.clone(), grant.target.to_string())) {
                return Err(at(l, format!("[[grant]] {secret} to {} is written twice", g.workload)));
            }
            check_file_clash(out.grants.iter().map(|(_, g)| g), &grant)
                .map_err(|e| at(l, format!("[[grant]] {secret}: {e}")))?;
            out.grants.push((l, grant));
        }
        Ok(out)
    }
}

/// A template as the broker holds it: its current version's text and inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CurrentTemplate {
    pub name: String,
    pub source: String,
    pub inputs: Vec<String>,
}

/// What the broker holds now.
#[derive(Debug, Default)]
pub struct Current {
    pub roles: Vec<Role>,
    pub workloads: Vec<Workload>,
    pub grants: Vec<Grant>,
    pub templates: Vec<CurrentTemplate>,
    pub sources: Vec<Source>,
    /// Live leases: (source id such as `dynamic:db`, workload).
    pub leases: Vec<(String, String)>,
}

/// What applying a file would do: the store change, one line per change
/// for people, and the error of the first item the caller may not touch.
#[derive(Debug, Default)]
pub struct Plan {
    pub change: PolicyChange,
    /// `+ workload web`, `~ grant db/pw -> web`, `- role ops`, sorted as made.
    pub lines: Vec<String>,
    /// Live leases the change would revoke (a pruned source, grant of one,
    /// or workload holding them): how many.
    pub revokes: usize,
}

/// Compare the file with the broker, within `scope`: every item of the
/// file must be the caller's to make (all or nothing), and `prune` only
/// removes what the caller could have made. Returns the plan, or the
/// first item out of scope (with its line).
pub fn plan(file: &PolicyFile, cur: &Current, prune: bool, scope: &Scope) -> Result<Plan, FileError> {
    let deny = |l: Option<usize>, e: Lack| FileError { line: l, message: e.to_string(), denied: true };
    let mut p = Plan::default();
    // Roles: full admins only.
    let have_roles: BTreeMap<&str, &Role> = cur.roles.iter().map(|r| (r.name.as_str(), r)).collect();
    for (l, r) in &file.roles {
        scope.check(Need::FullAdmin).map_err(|e| deny(Some(*l), e))?;
        match have_roles.get(r.name.as_str()) {
            Some(h) if *h == r => {}
            Some(_) => {
                p.lines.push(format!("~ role {}", r.name));
                p.change.put_roles.push(r.clone());
            }
            None => {
                p.lines.push(format!("+ role {}", r.name));
                p.change.put_roles.push(r.clone());
            }
        }
    }
    let file_roles: BTreeSet<&str> = file.roles.iter().map(|(_, r)| r.name.as_str()).collect();
    if prune && scope.is_full() {
        for r in &cur.roles {
            if !file_roles.contains(r.name.as_str()) {
                p.lines.push(format!("- role {}", r.name));
                p.change.remove_roles.push(r.name.clone());
            }
        }
    }
    // Live leases by source and by workload, for what a removal revokes.
    let leases_of = |pred: &dyn Fn(&str, &str) -> bool| cur.leases.iter().filter(|(s, w)| pred(s, w)).count();
    // Lease sources: what each reaches, as the file will leave them.
    let have_s: BTreeMap<String, &Source> = cur.sources.iter().map(|s| (s.id(), s)).collect();
    let file_s: BTreeMap<String, &Source> = file.sources.iter().map(|(_, s)| (s.id(), s)).collect();
    let mut gone_s = BTreeSet::new();
    if prune {
        for s in &cur.sources {
            if !file_s.contains_key(&s.id()) && source_within(scope, s).is_ok() {
                let n = leases_of(&|src, _| src == s.id());
                p.revokes += n;
                p.lines.push(format!("- {}{}", s.id(), revoking(n)));
                p.change.remove_sources.push(s.id());
                gone_s.insert(s.id());
            }
        }
    }
    let reach = |id: &str| -> Option<String> {
        file_s
            .get(id)
            .copied()
            .or_else(|| have_s.get(id).copied().filter(|_| !gone_s.contains(id)))
            .map(|s| source_reach(&s.backend, &s.path))
    };
    for (l, s) in &file.sources {
        let id = s.id();
        let verb = if s.kind == Kind::Cert { Verb::Cert } else { Verb::Dynamic };
        scope
            .check_source(verb, &s.backend, &s.path, s.uri.as_deref(), s.cn.as_deref())
            .map_err(|e| deny(Some(*l), e))?;
        match have_s.get(&id) {
            Some(h) if *h == s => {}
            Some(h) => {
                source_within(scope, h).map_err(|e| deny(Some(*l), e))?;
                p.lines.push(format!("~ {id}"));
                p.change.put_sources.push(s.clone());
            }
            None => {
                p.lines.push(format!("+ {id}"));
                p.change.put_sources.push(s.clone());
            }
        }
    }
    // Templates.
    let have_t: BTreeMap<&str, &CurrentTemplate> = cur.templates.iter().map(|t| (t.name.as_str(), t)).collect();
    let file_t: BTreeMap<&str, Vec<String>> = file
        .templates
        .iter()
        .map(|(_, t)| {
            let kept = have_t.get(t.name.as_str()).filter(|h| h.source == t.source).map(|h| h.inputs.clone());
            (t.name.as_str(), t.inputs.clone().or(kept).unwrap_or_default())
        })
        .collect();
    let mut changed_t = BTreeSet::new();
    for (l, t) in &file.templates {
        let inputs = &file_t[t.name.as_str()];
        scope.check_template_inputs(inputs, &reach).map_err(|e| deny(Some(*l), e))?;
        match have_t.get(t.name.as_str()) {
            Some(h) if h.source == t.source => continue,
            Some(h) => {
                scope.check_template_inputs(&h.inputs, &reach).map_err(|e| deny(Some(*l), e))?;
                p.lines.push(format!("~ template {}", t.name));
            }
            None => p.lines.push(format!("+ template {}", t.name)),
        }
        changed_t.insert(t.name.as_str());
        p.change.put_templates.push(PutTemplate {
            name: t.name.clone(),
            source: t.source.clone(),
            reads: inputs.clone(),
            fields: t.fields.clone(),
        });
    }
    let mut gone_t = BTreeSet::new();
    if prune {
        for t in &cur.templates {
            if !file_t.contains_key(t.name.as_str()) && scope.check_template_inputs(&t.inputs, &reach).is_ok() {
                p.lines.push(format!("- template {}", t.name));
                p.change.remove_templates.push(t.name.clone());
                gone_t.insert(t.name.as_str());
            }
        }
    }
    let template_inputs = |name: &str| -> Option<Vec<String>> {
        file_t
            .get(name)
            .cloned()
            .or_else(|| have_t.get(name).filter(|_| !gone_t.contains(name)).map(|t| t.inputs.clone()))
    };
    // A grant of a template or source needs it to be there, and is
    // checked by what it reaches; a secret grant as a secret.
    let check_grant = |l: Option<usize>, g: &Grant| -> Result<(), FileError> {
        let target = g.target.to_string();
        match reach_of(&target) {
            Some((Verb::Template, name)) => {
                let inputs = template_inputs(name).ok_or_else(|| FileError {
                    line: l,
                    message: format!("[[grant]] template {name}: no such template in the file or kept"),
                    denied: false,
                })?;
                scope.check_template_grant(name, &inputs, &g.workload, &reach).map_err(|e| deny(l, e))
            }
            Some((verb, _)) => {
                let r = reach(&target).ok_or_else(|| FileError {
                    line: l,
                    message: format!("[[grant]] {target}: no such source in the file or kept"),
                    denied: false,
                })?;
                scope.check_source_grant(verb, &target, &r, &g.workload).map_err(|e| deny(l, e))
            }
            None => scope.check(Need::Grant(Verb::Grant, &target, &g.workload)).map_err(|e| deny(l, e)),
        }
    };
    // Workloads.
    let have_w: BTreeMap<&str, &Workload> = cur.workloads.iter().map(|w| (w.name.as_str(), w)).collect();
    let file_w: BTreeSet<&str> = file.workloads.iter().map(|(_, w)| w.name.as_str()).collect();
    for (l, w) in &file.workloads {
        let sel: Vec<String> = w.selectors.iter().map(ToString::to_string).collect();
        scope.check(Need::Workload(Verb::Workload, &w.name, Some(&sel))).map_err(|e| deny(Some(*l), e))?;
        match have_w.get(w.name.as_str()) {
            Some(h) if *h == w => {}
            Some(_) => {
                p.lines.push(format!("~ workload {}", w.name));
                p.change.put_workloads.push(w.clone());
            }
            None => {
                p.lines.push(format!("+ workload {}", w.name));
                p.change.put_workloads.push(w.clone());
            }
        }
    }
    let mut gone_w = BTreeSet::new();
    if prune {
        for w in &cur.workloads {
            if !file_w.contains(w.name.as_str()) && scope.covers_workload(Verb::Workload, &w.name) {
                let n = leases_of(&|s, wl| wl == w.name && !gone_s.contains(s));
                p.revokes += n;
                p.lines.push(format!("- workload {} (and its grants){}", w.name, revoking(n)));
                p.change.remove_workloads.push(w.name.clone());
                gone_w.insert(w.name.as_str());
            }
        }
    }
    // Grants.
    let key = |g: &Grant| (g.workload.clone(), g.target.to_string());
    let have_g: BTreeMap<(String, String), &Grant> = cur.grants.iter().map(|g| (key(g), g)).collect();
    let file_g: BTreeSet<(String, String)> = file.grants.iter().map(|(_, g)| key(g)).collect();
    for (l, g) in &file.grants {
        let target = g.target.to_string();
        check_grant(Some(*l), g)?;
        let exists = file_w.contains(g.workload.as_str())
            || (have_w.contains_key(g.workload.as_str()) && !gone_w.contains(g.workload.as_str()));
        if !exists {
            return Err(at(*l, format!("[[grant]] {target}: workload {} is neither in the file nor kept", g.workload)));
        }
        // Clashes with the grants the workload keeps from before.
        let kept = cur.grants.iter().filter(|c| c.workload == g.workload && (!prune || file_g.contains(&key(c))));
        check_file_clash(kept, g).map_err(|e| at(*l, format!("[[grant]] {target}: {e}")))?;
        match have_g.get(&key(g)) {
            Some(h) if *h == g && !gone_w.contains(g.workload.as_str()) => {}
            Some(_) if !gone_w.contains(g.workload.as_str()) => {
                p.lines.push(format!("~ grant {target} -> {}", g.workload));
                p.change.put_grants.push(g.clone());
            }
            _ => {
                p.lines.push(format!("+ grant {target} -> {}", g.workload));
                p.change.put_grants.push(g.clone());
            }
        }
    }
    let mut kept_g = Vec::new();
    for g in &cur.grants {
        let target = g.target.to_string();
        if file_g.contains(&key(g)) || gone_w.contains(g.workload.as_str()) {
            continue;
        }
        let mine = match reach_of(&target) {
            // Taking a grant of a template or source away needs grant and its verb on the workload.
            Some((verb, _)) => match scope {
                Scope::Full => true,
                Scope::Roles(s) => {
                    s.roles.iter().any(|r| r.has(Verb::Grant) && r.has(verb) && r.covers_workload(&g.workload))
                }
            },
            None => scope.check(Need::Grant(Verb::Grant, &target, &g.workload)).is_ok(),
        };
        if prune && mine {
            let n = leases_of(&|s, w| s == target && w == g.workload && !gone_s.contains(s));
            p.revokes += n;
            p.lines.push(format!("- grant {target} -> {}{}", g.workload, revoking(n)));
            p.change.remove_grants.push((g.workload.clone(), target));
        } else {
            kept_g.push(g);
        }
    }
    // What stays granted of a changed or removed template must still be
    // the caller's to grant, and a removed template granted nowhere.
    for g in kept_g {
        if let Some((Verb::Template, name)) = reach_of(&g.target.to_string()) {
            if gone_t.contains(name) {
                return Err(FileError {
                    line: None,
                    message: format!("template {name} would be removed but stays granted to {}", g.workload),
                    denied: false,
                });
            }
            if changed_t.contains(name) {
                let line = file.templates.iter().find(|(_, t)| t.name == name).map(|(l, _)| *l);
                check_grant(line, g)?;
            }
        }
    }
    Ok(p)
}

fn revoking(n: usize) -> String {
    match n {
        0 => String::new(),
        1 => " (revokes 1 live lease)".into(),
        n => format!(" (revokes {n} live leases)"),
    }
}

/// A source the caller could have made (what it may see, change and prune).
pub fn source_within(scope: &Scope, s: &Source) -> Result<(), Lack> {
    let verb = if s.kind == Kind::Cert { Verb::Cert } else { Verb::Dynamic };
    scope.check_source(verb, &s.backend, &s.path, s.uri.as_deref(), s.cn.as_deref())
}

#[derive(Serialize)]
struct ExportFile {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    role: Vec<RawRole>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    workload: Vec<RawWorkload>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    template: Vec<TemplateSpec>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    dynamic: Vec<DynamicSpec>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    cert: Vec<CertSpec>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    grant: Vec<RawGrant>,
}

/// The broker's policy as a file [`PolicyFile::parse`] reads back to the
/// same items: roles (full admins only), then the workloads, templates,
/// sources and grants `scope` sees. Names only: a template's text names
/// its inputs, never their values.
pub fn export(cur: &Current, scope: &Scope) -> String {
    let role = if scope.is_full() {
        cur.roles
            .iter()
            .map(|r| RawRole {
                name: r.name.clone(),
                principals: r.principals.iter().map(ToString::to_string).collect(),
                paths: r.paths.iter().map(ToString::to_string).collect(),
                workloads: r.workloads.clone(),
                verbs: r.verbs.iter().map(ToString::to_string).collect(),
            })
            .collect()
    } else {
        Vec::new()
    };
    let workload = cur
        .workloads
        .iter()
        .filter(|w| scope.sees_workload(&w.name))
        .map(|w| RawWorkload { name: w.name.clone(), selectors: w.selectors.iter().map(ToString::to_string).collect() })
        .collect();
    let grant = cur
        .grants
        .iter()
        .filter(|g| scope.sees_workload(&g.workload))
        .map(|g| {
            let target = g.target.to_string();
            let (secret, template, dynamic, cert) = match reach_of(&target) {
                Some((Verb::Template, n)) => (None, Some(n.to_owned()), None, None),
                Some((Verb::Dynamic, n)) => (None, None, Some(n.to_owned()), None),
                Some((_, n)) => (None, None, None, Some(n.to_owned())),
                None => (Some(target.clone()), None, None, None),
            };
            (g, secret, template, dynamic, cert)
        })
        .map(|(g, secret, template, dynamic, cert)| RawGrant {
            secret,
            template,
            dynamic,
            cert,
            workload: g.workload.clone(),
            file: g.file.clone(),
            mode: (g.mode != super::DEFAULT_MODE).then(|| RawMode::Octal(format!("{:04o}", g.mode))),
            uid: g.uid,
            gid: g.gid,
            notify: g.notify.clone(),
            restart: g.on_change.restart().then_some(true),
            restart_spacing: g.on_change.spacing_text(),
            exec: g.on_change.exec.clone(),
        })
        .collect();
    let header = "# keyhole policy (keyhole export): names only, never values.\n\
                  # Apply with: keyhole apply -f FILE   (see keyhole diff -f FILE first)\n\n";
    // Invariant: plain strings, integers and arrays of them serialize.
    let reach = |id: &str| cur.sources.iter().find(|s| s.id() == id).map(|s| source_reach(&s.backend, &s.path));
    let template = cur
        .templates
        .iter()
        .filter(|t| scope.check_template_inputs(&t.inputs, &reach).is_ok())
        .map(|t| TemplateSpec { name: t.name.clone(), source: t.source.clone(), inputs: None, fields: Vec::new() })
        .collect();
    let mine = || cur.sources.iter().filter(|s| source_within(scope, s).is_ok());
    let dynamic = mine()
        .filter(|s| s.kind == Kind::Dynamic)
        .map(|s| DynamicSpec { name: s.name.clone(), backend: s.backend.clone(), path: s.path.clone() })
        .collect();
    let cert = mine()
        .filter(|s| s.kind == Kind::Cert)
        .map(|s| CertSpec {
            name: s.name.clone(),
            backend: s.backend.clone(),
            issue: s.path.clone(),
            uri: s.uri.clone().unwrap_or_default(),
            cn: s.cn.clone(),
            ttl: s.ttl_secs.map(|t| humantime::format_duration(std::time::Duration::from_secs(t)).to_string()),
        })
        .collect();
    let out = ExportFile { role, workload, template, dynamic, cert, grant };
    format!("{header}{}", toml::to_string(&out).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[role]]
name = "team-a"
principals = ["uid:1001"]
paths = ["a/*"]
workloads = ["a-*"]
verbs = ["read", "write", "grant", "workload", "apply"]

[[workload]]
name = "a-web"
selectors = ["docker:label:keyhole.workload=a-web"]

[[workload]]
name = "a-job"
selectors = ["unix:uid:1001"]

[[grant]]
secret = "a/db"
workload = "a-web"
file = "DB_PASSWORD"
mode = "0440"
uid = 101
notify = "HUP"

[[grant]]
secret = "a/tls/*"
workload = "a-web"
mode = 0o444
"#;

    fn full_plan(text: &str, cur: &Current, prune: bool) -> Plan {
        plan(&PolicyFile::parse(text).unwrap(), cur, prune, &Scope::Full).unwrap()
    }

    fn applied(cur: &mut Current, p: &PolicyChange) {
        cur.grants.retain(|g| !p.remove_grants.contains(&(g.workload.clone(), g.target.to_string())));
        cur.workloads.retain(|w| !p.remove_workloads.contains(&w.name));
        cur.grants.retain(|g| !p.remove_workloads.contains(&g.workload));
        cur.roles.retain(|r| !p.remove_roles.contains(&r.name));
        for w in &p.put_workloads {
            cur.workloads.retain(|x| x.name != w.name);
            cur.workloads.push(w.clone());
        }
        for g in &p.put_grants {
            cur.grants.retain(|x| (x.workload.as_str(), &x.target) != (g.workload.as_str(), &g.target));
            cur.grants.push(g.clone());
        }
        for r in &p.put_roles {
            cur.roles.retain(|x| x.name != r.name);
            cur.roles.push(r.clone());
        }
        cur.workloads.sort_by(|a, b| a.name.cmp(&b.name));
        cur.grants.sort_by_key(|g| (g.workload.clone(), g.target.to_string()));
        cur.roles.sort_by(|a, b| a.name.cmp(&b.name));
    }

    #[test]
    fn a_file_parses_applies_and_exports_back_to_itself() {
        let f = PolicyFile::parse(FILE).unwrap();
        assert_eq!((f.roles.len(), f.workloads.len(), f.grants.len()), (1, 2, 2));
        assert_eq!(f.workloads[0].0, 9, "the line of [[workload]]");
        assert_eq!(f.grants[0].1.mode, 0o440);
        assert_eq!(f.grants[1].1.mode, 0o444);
        assert_eq!(f.grants[0].1.notify.as_deref(), Some("SIGHUP"));
        let mut cur = Current::default();
        let p = full_plan(FILE, &cur, false);
        assert_eq!(p.change.len(), 5, "{:?}", p.lines);
        assert_eq!(p.lines[0], "+ role team-a");
        applied(&mut cur, &p.change);
        assert!(full_plan(FILE, &cur, false).change.is_empty(), "idempotent");
        assert!(full_plan(FILE, &cur, true).change.is_empty(), "and with prune");
        let out = export(&cur, &Scope::Full);
        assert!(full_plan(&out, &cur, true).change.is_empty(), "export round-trips:\n{out}");
    }

    #[test]
    fn prune_removes_what_the_file_does_not_name() {
        let mut cur = Current::default();
        let p = full_plan(FILE, &cur, false);
        applied(&mut cur, &p.change);
        let smaller = FILE.replace("secret = \"a/tls/*\"", "secret = \"a/other\"");
        let p = full_plan(&smaller, &cur, false);
        assert_eq!(p.lines, ["+ grant a/other -> a-web"]);
        let p = full_plan(&smaller, &cur, true);
        assert_eq!(p.lines, ["+ grant a/other -> a-web", "- grant a/tls/* -> a-web"]);
        let p = full_plan("", &cur, true);
        assert_eq!(p.change.remove_workloads.len(), 2);
        assert_eq!(p.change.remove_roles, ["team-a"]);
        assert!(p.change.remove_grants.is_empty(), "gone with their workloads");
        let p = full_plan("", &cur, false);
        assert!(p.change.is_empty(), "no prune, nothing removed");
    }

    #[test]
    fn errors_name_their_line() {
        let e = |text: &str| PolicyFile::parse(text).unwrap_err();
        assert_eq!(e("[[workload]]\nname = \"x\"\nselectors = [\"bogus\"]\n").line, Some(1));
        let bad = FILE.replace("unix:uid:1001\"]", "unix:uid:x\"]");
        let err = e(&bad);
        assert_eq!(err.line, Some(13), "{err}");
        assert!(err.to_string().starts_with("line 13: [[workload]] a-job: selector"), "{err}");
        let err = e("[[grant]]\nsecret = \"a\"\nworkload = \"w\"\n\n[[grant]]\nsecret = \"a\"\nworkload = \"w\"\n");
        assert_eq!(err.line, Some(5));
        let err = e("x = 1\n");
        assert_eq!(err.line, Some(1));
        assert!(err.message.contains("unknown field"), "{err}");
        let err = e("[[workload]]\nname = \"x\"\nselectors = [\"unix:uid:1\"]\nnope = 2\n");
        assert_eq!(err.line, Some(4), "{err}");
        let err = e("[[grant]]\nsecret = \"a\"\nworkload = \"w\"\nmode = \"0600\"\n");
        assert!(err.message.contains("read bits"), "{err}");
        let err = e("\n\n[[workload\n");
        assert_eq!(err.line, Some(3), "{err}");
        let f = PolicyFile::parse(
            "[[template]]\nname = \"t\"\nsource = \"{{ a }}\"\n\n[[grant]]\ntemplate = \"t\"\nworkload = \"w\"\n",
        )
        .unwrap();
        assert_eq!(f.grants[0].1.target.to_string(), "@template/t");
        let f = PolicyFile::parse("[[grant]]\ncert = \"c\"\nworkload = \"w\"\n").unwrap();
        assert_eq!(f.grants[0].1.target.to_string(), "cert:c");
        let err = e("\n[[dynamic]]\nname = \"d\"\nbackend = \"prod\"\npath = \"../x\"\n");
        assert_eq!(err.line, Some(2), "{err}");
        let err = e("[[cert]]\nname = \"c\"\nbackend = \"prod\"\nissue = \"pki/sign/x\"\nuri = \"spiffe://x\"\n");
        assert!(err.to_string().starts_with("line 1: [[cert]] c: --issue"), "{err}");
        let err = e("[[template]]\nname = \"a/b\"\nsource = \"x\"\n");
        assert!(err.to_string().starts_with("line 1: [[template]] a/b:"), "{err}");
        let err = e("[[template]]\nname = \"t\"\nsource = \"x\"\ncolour = 1\n");
        assert_eq!(err.line, Some(4), "{err}");
        let err = e("[[grant]]\nsecret = \"a\"\ncert = \"c\"\nworkload = \"w\"\n");
        assert!(err.message.contains("exactly one"), "{err}");
    }

    #[test]
    fn a_scoped_admin_applies_only_within_its_scope_and_prunes_only_its_own() {
        use super::super::roles::Caller;
        let role = Role::new(
            "team-a",
            &["uid:1001".into()],
            &["a/*".into()],
            &["a-*".into()],
            &["grant".into(), "workload".into(), "apply".into()],
        )
        .unwrap();
        let scope =
            Scope::of(&[role], &Caller { uid: 1001, gid: 1001, groups: &[], host: true, subject: None }).unwrap();
        let mut cur = Current::default();
        let b_file = "[[workload]]\nname = \"b-web\"\nselectors = [\"docker:label:k=b-web\"]\n\
                      [[grant]]\nsecret = \"b/db\"\nworkload = \"b-web\"\n";
        let p = full_plan(b_file, &cur, false);
        applied(&mut cur, &p.change);
        let a_file = FILE.split("[[workload]]").skip(1).collect::<Vec<_>>().join("[[workload]]");
        let a_file = format!("[[workload]]{a_file}");
        let f = PolicyFile::parse(&a_file).unwrap();
        let p = plan(&f, &cur, true, &scope).unwrap();
        assert_eq!(p.change.put_workloads.len(), 2);
        assert!(p.change.remove_workloads.is_empty(), "team b's workload is not team a's to prune");
        assert!(p.change.remove_grants.is_empty());
        // Roles are for full admins.
        let e = plan(&PolicyFile::parse(FILE).unwrap(), &cur, false, &scope).unwrap_err();
        assert_eq!(e.line, Some(2));
        // Another team's secret to its own workload: refused, with the line.
        let attack = format!("{a_file}\n[[grant]]\nsecret = \"b/db\"\nworkload = \"a-web\"\n");
        let e = plan(&PolicyFile::parse(&attack).unwrap(), &cur, false, &scope).unwrap_err();
        assert!(e.to_string().contains("no role grants grant on b/db"), "{e}");
        assert_eq!(e.line, Some(attack.lines().position(|l| l == "secret = \"b/db\"").unwrap()));
        // Widening its workload to another team's containers: refused.
        let widen = a_file.replace("keyhole.workload=a-web", "keyhole.workload=b-web");
        assert!(plan(&PolicyFile::parse(&widen).unwrap(), &cur, false, &scope).is_err());
    }

    const LEASED: &str = r#"
[[workload]]
name = "a-web"
selectors = ["docker:label:keyhole.workload=a-web"]

[[template]]
name = "cfg"
source = "db={{ secret('a/db') }}"

[[dynamic]]
name = "db"
backend = "prod"
path = "database/creds/a-web"

[[cert]]
name = "tls"
backend = "prod"
issue = "pki-a/issue/web"
uri = "spiffe://corp/{workload}"
cn = "{workload}.svc"
ttl = "1h"

[[grant]]
template = "cfg"
workload = "a-web"

[[grant]]
dynamic = "db"
workload = "a-web"
file = "db.json"

[[grant]]
cert = "tls"
workload = "a-web"
"#;

    fn with_inputs(text: &str) -> PolicyFile {
        let mut f = PolicyFile::parse(text).unwrap();
        for (_, t) in &mut f.templates {
            t.inputs = Some(vec!["a/db".into()]);
        }
        f
    }

    fn applied_all(cur: &mut Current, p: &PolicyChange) {
        applied(cur, p);
        cur.templates.retain(|t| !p.remove_templates.contains(&t.name));
        for PutTemplate { name, source, reads: inputs, .. } in &p.put_templates {
            cur.templates.retain(|t| &t.name != name);
            cur.templates.push(CurrentTemplate { name: name.clone(), source: source.clone(), inputs: inputs.clone() });
        }
        cur.sources.retain(|s| !p.remove_sources.contains(&s.id()));
        for s in &p.put_sources {
            cur.sources.retain(|x| x.id() != s.id());
            cur.sources.push(s.clone());
        }
    }

    #[test]
    fn templates_and_sources_apply_export_and_prune_with_their_leases() {
        let mut cur = Current::default();
        let p = plan(&with_inputs(LEASED), &cur, false, &Scope::Full).unwrap();
        assert_eq!(p.change.len(), 7, "{:?}", p.lines);
        assert!(p.lines.contains(&"+ template cfg".to_owned()) && p.lines.contains(&"+ cert:tls".to_owned()));
        applied_all(&mut cur, &p.change);
        assert!(plan(&with_inputs(LEASED), &cur, true, &Scope::Full).unwrap().change.is_empty(), "idempotent");
        // An unchanged template needs no dry run: its kept inputs stand.
        assert!(plan(&PolicyFile::parse(LEASED).unwrap(), &cur, true, &Scope::Full).unwrap().change.is_empty());
        let out = export(&cur, &Scope::Full);
        assert!(out.contains("[[template]]") && out.contains("[[cert]]") && out.contains("ttl = \"1h\""), "{out}");
        let back = plan(&PolicyFile::parse(&out).unwrap(), &cur, true, &Scope::Full).unwrap();
        assert!(back.change.is_empty(), "export round-trips: {:?}\n{out}", back.lines);
        // Pruning the source and its grant while a container holds a lease says so.
        cur.leases = vec![("dynamic:db".into(), "a-web".into()), ("dynamic:db".into(), "a-web".into())];
        let smaller =
            LEASED.replace("[[dynamic]]\nname = \"db\"\nbackend = \"prod\"\npath = \"database/creds/a-web\"\n", "");
        let smaller = smaller.replace("[[grant]]\ndynamic = \"db\"\nworkload = \"a-web\"\nfile = \"db.json\"\n", "");
        let p = plan(&with_inputs(&smaller), &cur, true, &Scope::Full).unwrap();
        assert_eq!(p.revokes, 2, "{:?}", p.lines);
        assert!(p.lines.contains(&"- dynamic:db (revokes 2 live leases)".to_owned()), "{:?}", p.lines);
        assert!(p.lines.contains(&"- grant dynamic:db -> a-web".to_owned()), "{:?}", p.lines);
        // A grant of a source or template that is nowhere: refused by line.
        let orphan = "[[grant]]\ndynamic = \"nope\"\nworkload = \"a-web\"\n";
        let e = plan(&PolicyFile::parse(orphan).unwrap(), &cur, false, &Scope::Full).unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
        // A template pruned that stays granted (without --prune of its grant) is refused.
        let no_t = LEASED.replace("[[template]]\nname = \"cfg\"\nsource = \"db={{ secret('a/db') }}\"\n", "");
        assert!(plan(&with_inputs(&no_t), &cur, true, &Scope::Full).is_err());
    }

    #[test]
    fn a_scoped_admin_applies_templates_and_sources_only_within_its_scope() {
        use super::super::roles::Caller;
        let role = Role::new(
            "team-a",
            &["uid:1001".into()],
            &["a/*".into(), "prod/database/creds/a-web".into(), "prod/pki-a/*".into()],
            &["a-*".into()],
            &["grant,workload,apply,template,dynamic,cert".into()],
        )
        .unwrap();
        let scope =
            Scope::of(&[role], &Caller { uid: 1001, gid: 1001, groups: &[], host: true, subject: None }).unwrap();
        let cur = Current::default();
        assert!(plan(&with_inputs(LEASED), &cur, false, &scope).is_ok());
        let mut f = with_inputs(LEASED);
        f.templates[0].1.inputs = Some(vec!["a/db".into(), "b/db".into()]);
        let e = plan(&f, &cur, false, &scope).unwrap_err();
        assert!(e.denied && e.to_string().contains("no role grants template on b/db"), "{e}");
        assert_eq!(e.line, Some(6));
        let other = LEASED.replace("database/creds/a-web", "database/creds/b-web");
        let e = plan(&with_inputs(&other), &cur, false, &scope).unwrap_err();
        assert!(e.denied && e.to_string().contains("prod/database/creds/b-web"), "{e}");
        let other = LEASED.replace("cn = \"{workload}.svc\"", "cn = \"b-web.svc\"");
        assert!(plan(&with_inputs(&other), &cur, false, &scope).unwrap_err().denied);
    }

    #[test]
    fn grant_actions_parse_and_export_back() {
        let text = "[[workload]]\nname = \"w\"\nselectors = [\"unix:uid:1\"]\n\n[[grant]]\nsecret = \"a/b\"\n\
                    workload = \"w\"\nrestart = true\nrestart_spacing = \"30s\"\nexec = [\"nginx\", \"-s\", \"reload\"]\n";
        let f = PolicyFile::parse(text).unwrap();
        let g = &f.grants[0].1;
        assert_eq!(g.on_change.spacing(), std::time::Duration::from_secs(30));
        assert_eq!(g.on_change.exec.as_deref().unwrap(), ["nginx", "-s", "reload"]);
        let mut cur = Current::default();
        let p = full_plan(text, &cur, false);
        applied(&mut cur, &p.change);
        let out = export(&cur, &Scope::Full);
        assert!(out.contains("restart_spacing = \"30s\""), "{out}");
        assert!(full_plan(&out, &cur, true).change.is_empty(), "export round-trips:\n{out}");
        let e = |t: &str| PolicyFile::parse(t).unwrap_err();
        let err = e("[[grant]]\nsecret = \"a\"\nworkload = \"w\"\nexec = []\n");
        assert!(err.message.contains("names no command"), "{err}");
        let err = e("[[grant]]\nsecret = \"a\"\nworkload = \"w\"\nrestart_spacing = \"1s\"\n");
        assert!(err.message.contains("needs --restart"), "{err}");
    }
}
