//! Policy as a file: the TOML `keyhole apply`, `diff` and `export` speak,
//! parsed into checked workloads, grants and roles (each with the line it
//! came from), compared with what the broker holds, and printed back.
//! Pure: no I/O. The format is documented in
//! docs/src/reference/policy-file.md.
//!
//! Names only, never values: a grant names a secret path; nothing in the
//! file can carry a secret's value.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::roles::{Need, Role, Scope, Verb};
use super::{Grant, Workload, check_file_clash};
use crate::backend::local::PolicyChange;

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
    /// Grants of a template, dynamic source or certificate: parsed, not
    /// yet applied (see [`PolicyFile::unsupported`]).
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

/// `[[template]]`: a template rendered from secrets (issue 16). Parsed so
/// the file format is settled; applied once templates land.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct TemplateSpec {
    pub name: String,
    /// The template text, inline.
    pub source: String,
    /// Anything else its `add` command takes.
    #[serde(flatten)]
    pub fields: BTreeMap<String, toml::Value>,
}

/// `[[dynamic]]`: a dynamic credential source (issue 17). Parsed, not yet applied.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct DynamicSpec {
    pub name: String,
    #[serde(flatten)]
    pub fields: BTreeMap<String, toml::Value>,
}

/// `[[cert]]`: an issued certificate. Parsed, not yet applied.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct CertSpec {
    pub name: String,
    #[serde(flatten)]
    pub fields: BTreeMap<String, toml::Value>,
}

/// A parsed, checked policy file; every item with its line.
#[derive(Debug, Default)]
pub struct PolicyFile {
    pub roles: Vec<(usize, Role)>,
    pub workloads: Vec<(usize, Workload)>,
    pub grants: Vec<(usize, Grant)>,
    pub templates: Vec<(usize, TemplateSpec)>,
    pub dynamics: Vec<(usize, DynamicSpec)>,
    pub certs: Vec<(usize, CertSpec)>,
    /// Grants of templates, dynamic sources or certificates: (line, kind).
    pub other_grants: Vec<(usize, &'static str)>,
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
        let mut seen = BTreeSet::new();
        for g in raw.grant {
            let l = line(&g.span());
            let g = g.into_inner();
            let kinds = [("secret", &g.secret), ("template", &g.template), ("dynamic", &g.dynamic), ("cert", &g.cert)];
            let named: Vec<_> = kinds.iter().filter(|(_, v)| v.is_some()).collect();
            let secret = match named.as_slice() {
                [("secret", Some(s))] => s.clone(),
                [(kind, Some(_))] => {
                    out.other_grants.push((l, kind));
                    continue;
                }
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
        out.templates = raw.template.into_iter().map(|t| (line(&t.span()), t.into_inner())).collect();
        out.dynamics = raw.dynamic.into_iter().map(|t| (line(&t.span()), t.into_inner())).collect();
        out.certs = raw.cert.into_iter().map(|t| (line(&t.span()), t.into_inner())).collect();
        Ok(out)
    }

    /// The first item this broker cannot apply yet (templates, dynamic
    /// sources, certificates and grants of them), as an error naming it.
    pub fn unsupported(&self) -> Option<FileError> {
        let first = [
            self.templates.first().map(|(l, _)| (*l, "[[template]]")),
            self.dynamics.first().map(|(l, _)| (*l, "[[dynamic]]")),
            self.certs.first().map(|(l, _)| (*l, "[[cert]]")),
            self.other_grants.first().map(|(l, k)| (*l, *k)),
        ];
        let (l, what) = first.into_iter().flatten().min_by_key(|(l, _)| *l)?;
        Some(at(l, format!("{what} is not supported by this broker yet; nothing was applied")))
    }
}

/// What the broker holds now.
#[derive(Debug, Default)]
pub struct Current {
    pub roles: Vec<Role>,
    pub workloads: Vec<Workload>,
    pub grants: Vec<Grant>,
}

/// What applying a file would do: the store change, one line per change
/// for people, and the error of the first item the caller may not touch.
#[derive(Debug, Default)]
pub struct Plan {
    pub change: PolicyChange,
    /// `+ workload web`, `~ grant db/pw -> web`, `- role ops`, sorted as made.
    pub lines: Vec<String>,
}

/// Compare the file with the broker, within `scope`: every item of the
/// file must be the caller's to make (all or nothing), and `prune` only
/// removes what the caller could have made. Returns the plan, or the
/// first item out of scope (with its line).
pub fn plan(file: &PolicyFile, cur: &Current, prune: bool, scope: &Scope) -> Result<Plan, FileError> {
    let deny = |l: Option<usize>, e: super::roles::Lack| FileError { line: l, message: e.to_string(), denied: true };
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
                p.lines.push(format!("- workload {} (and its grants)", w.name));
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
        scope.check(Need::Grant(Verb::Grant, &target, &g.workload)).map_err(|e| deny(Some(*l), e))?;
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
    if prune {
        for g in &cur.grants {
            let target = g.target.to_string();
            if file_g.contains(&key(g)) || gone_w.contains(g.workload.as_str()) {
                continue;
            }
            if scope.check(Need::Grant(Verb::Grant, &target, &g.workload)).is_ok() {
                p.lines.push(format!("- grant {target} -> {}", g.workload));
                p.change.remove_grants.push((g.workload.clone(), target));
            }
        }
    }
    Ok(p)
}

#[derive(Serialize)]
struct ExportFile {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    role: Vec<RawRole>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    workload: Vec<RawWorkload>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    grant: Vec<RawGrant>,
}

/// The broker's policy as a file [`PolicyFile::parse`] reads back to the
/// same items: roles (full admins only), then the workloads and grants
/// `scope` sees. Names only.
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
        .map(|g| RawGrant {
            secret: Some(g.target.to_string()),
            workload: g.workload.clone(),
            file: g.file.clone(),
            mode: (g.mode != super::DEFAULT_MODE).then(|| RawMode::Octal(format!("{:04o}", g.mode))),
            uid: g.uid,
            gid: g.gid,
            notify: g.notify.clone(),
            restart: g.on_change.restart().then_some(true),
            restart_spacing: g.on_change.spacing_text(),
            exec: g.on_change.exec.clone(),
            ..RawGrant::default()
        })
        .collect();
    let header = "# keyhole policy (keyhole export): names only, never values.\n\
                  # Apply with: keyhole apply -f FILE   (see keyhole diff -f FILE first)\n\n";
    // Invariant: plain strings, integers and arrays of them serialize.
    format!("{header}{}", toml::to_string(&ExportFile { role, workload, grant }).unwrap_or_default())
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
        assert_eq!(
            f.unsupported().unwrap().to_string(),
            "line 1: [[template]] is not supported by this broker yet; nothing was applied"
        );
        let f = PolicyFile::parse("[[grant]]\ncert = \"c\"\nworkload = \"w\"\n").unwrap();
        assert_eq!(f.unsupported().unwrap().line, Some(1));
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
