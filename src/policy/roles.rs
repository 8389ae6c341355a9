//! Roles: admins scoped to secret paths and workload names, and the one
//! decision of what a scoped admin may do. Pure: no I/O.
//!
//! A role names principals (`uid:N` and `gid:N` for host processes,
//! `subject:CN=…` for remote admins by client certificate), secret path
//! patterns (`team-a/*` every secret under `team-a/`, or one exact path),
//! workload name patterns (`*` matches any run of characters: `a-*`), and
//! verbs. Root and `[admin]` uids, gids and subjects are full admins and
//! never consult roles ([`Scope::Full`]); any other caller that matches a
//! role's principal is a scoped admin with every role it matches
//! ([`Scope::Roles`]); anyone else is no admin at all.
//!
//! What each verb allows (checked by [`Scope::check`]; one call per
//! handler in `api::admin`):
//!
//! | verb | calls | scope |
//! |---|---|---|
//! | `read` | get, history, ls | the path (ls is filtered to the role's paths) |
//! | `write` | put, rotate, rm | the path |
//! | `grant` | grant, revoke | the target within the role's paths AND the workload within its patterns, in one role |
//! | `workload` | workload add, rm | the name within its patterns; selectors per [`check_selectors`] |
//! | `audit` | audit log, verify | the whole log |
//! | `apply` | `keyhole apply` | every item of the file, as the verbs above |
//! | `template`, `dynamic`, `cert`, `leases`, `refresh` | those features | see below |
//!
//! What reaches secrets indirectly is checked against the admin who puts
//! or grants it ([`Scope::check_template_inputs`],
//! [`Scope::check_template_grant`], [`Scope::check_source`],
//! [`Scope::check_source_grant`]):
//!
//! - a **template** (`template`): every input it reads (the references
//!   recorded at put: `secret()` paths, and `dynamic:NAME`/`cert:NAME`
//!   for lease sources) must be covered by the paths of a role holding
//!   `template`; granting it to a workload is granting each input to it
//!   (a role with `grant` covering the input and the workload), and a role
//!   with `template` and `grant` must cover the workload;
//! - a **dynamic source** or **certificate** (`dynamic`, `cert`) reaches
//!   `BACKEND/ENGINE_PATH` (backend `vault`, path `database/creds/a-web`:
//!   `vault/database/creds/a-web`), the name its backend's secrets have
//!   in keyhole's path space: a role with the verb must cover that path
//!   (`--paths 'vault/database/creds/a-web'`, or `'vault/pki-a/*'` for a
//!   team's own PKI mount). Granting it needs one role with `grant` and
//!   the verb covering the path and the workload. A certificate put by a
//!   scoped admin must name its workload ([`check_cert_names`]);
//! - `leases` lists the leases of the role's workloads; `refresh` refreshes
//!   a backend (a named path must be covered).
//!
//! A role's `--paths` name secrets only: `@template/…`, `dynamic:…` and
//! `cert:…` are refused there (those are reached through the rules above).
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Selector, Target, check_workload_name};
use crate::config::Subject;

/// Why a role definition is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoleError {
    #[error("role name {0:?} must be 1-64 characters of [A-Za-z0-9._-], not starting with '.' or '-'")]
    BadName(String),
    #[error("principal {0:?} is not one of uid:N, gid:N, subject:CN=...")]
    BadPrincipal(String),
    #[error("uid:0 and gid:0 are full admins already; a role cannot name them")]
    RootPrincipal,
    #[error(
        "verb {0:?} is not one of read, write, grant, workload, audit, template, dynamic, cert, leases, refresh, apply"
    )]
    BadVerb(String),
    #[error("path pattern {0:?}: {1}")]
    BadPath(String, String),
    #[error("workload pattern {0:?} must be 1-64 characters of [A-Za-z0-9._-] and '*'")]
    BadWorkloadPattern(String),
    #[error("a role needs at least one {0}")]
    Empty(&'static str),
}

/// What a role allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    Read,
    Write,
    Grant,
    Workload,
    Audit,
    Template,
    Dynamic,
    Cert,
    Leases,
    Refresh,
    Apply,
}

impl Verb {
    pub const ALL: [Verb; 11] = [
        Verb::Read,
        Verb::Write,
        Verb::Grant,
        Verb::Workload,
        Verb::Audit,
        Verb::Template,
        Verb::Dynamic,
        Verb::Cert,
        Verb::Leases,
        Verb::Refresh,
        Verb::Apply,
    ];

    pub fn parse(s: &str) -> Result<Verb, RoleError> {
        Verb::ALL.into_iter().find(|v| v.as_str() == s.trim()).ok_or_else(|| RoleError::BadVerb(s.to_owned()))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Read => "read",
            Verb::Write => "write",
            Verb::Grant => "grant",
            Verb::Workload => "workload",
            Verb::Audit => "audit",
            Verb::Template => "template",
            Verb::Dynamic => "dynamic",
            Verb::Cert => "cert",
            Verb::Leases => "leases",
            Verb::Refresh => "refresh",
            Verb::Apply => "apply",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a role is for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Principal {
    /// A host process with this uid.
    Uid(u32),
    /// A host process with this primary or supplementary gid.
    Gid(u32),
    /// A remote admin whose client certificate has exactly this subject.
    Subject(Subject),
}

impl Principal {
    pub fn parse(s: &str) -> Result<Principal, RoleError> {
        let bad = || RoleError::BadPrincipal(s.to_owned());
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        let p = match kind {
            "uid" => Principal::Uid(rest.parse().map_err(|_| bad())?),
            "gid" => Principal::Gid(rest.parse().map_err(|_| bad())?),
            "subject" => Principal::Subject(crate::config::parse_subject(rest).map_err(|_| bad())?),
            _ => return Err(bad()),
        };
        if matches!(p, Principal::Uid(0) | Principal::Gid(0)) {
            return Err(RoleError::RootPrincipal);
        }
        Ok(p)
    }

    pub fn matches(&self, c: &Caller<'_>) -> bool {
        match (self, c.subject) {
            (Principal::Uid(u), None) => c.host && c.uid == *u,
            (Principal::Gid(g), None) => c.host && (c.gid == *g || c.groups.contains(g)),
            (Principal::Subject(s), Some(have)) => s == have,
            _ => false,
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Uid(u) => write!(f, "uid:{u}"),
            Principal::Gid(g) => write!(f, "gid:{g}"),
            Principal::Subject(s) => write!(f, "subject:{}", s.iter().cloned().collect::<Vec<_>>().join(",")),
        }
    }
}

impl From<Principal> for String {
    fn from(p: Principal) -> String {
        p.to_string()
    }
}

impl TryFrom<String> for Principal {
    type Error = RoleError;
    fn try_from(s: String) -> Result<Self, RoleError> {
        Principal::parse(&s)
    }
}

/// The facts about a caller that principals match: from the attestor
/// (a host process's uid, gids) or the TLS layer (a certificate subject).
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    pub uid: u32,
    pub gid: u32,
    pub groups: &'a [u32],
    /// A host process (only those match `uid:` and `gid:`).
    pub host: bool,
    /// A remote client's certificate subject (only those match `subject:`).
    pub subject: Option<&'a Subject>,
}

/// `*` matches any run of characters (none included); nothing else is special.
pub fn glob(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// A target that names secrets only: not a template (`@template/NAME`)
/// nor a lease source (`dynamic:NAME`, `cert:NAME`).
fn secret_paths_only(t: &Target) -> bool {
    match t {
        Target::Exact(p) => p.template_name().is_none() && super::leased(p.as_str()).is_none(),
        Target::Prefix(_) => true,
    }
}

fn check_pattern(p: &str) -> Result<(), RoleError> {
    let ok = !p.is_empty() && p.len() <= 64 && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-*".contains(&b));
    if ok { Ok(()) } else { Err(RoleError::BadWorkloadPattern(p.to_owned())) }
}

/// A role as stored: checked by [`Role::new`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub name: String,
    pub principals: Vec<Principal>,
    /// Secret path patterns: `team-a/*` (everything under) or an exact path.
    pub paths: Vec<Target>,
    /// Workload name patterns (`*` globs).
    pub workloads: Vec<String>,
    pub verbs: BTreeSet<Verb>,
}

impl Role {
    pub fn new(
        name: &str,
        principals: &[String],
        paths: &[String],
        workloads: &[String],
        verbs: &[String],
    ) -> Result<Role, RoleError> {
        check_workload_name(name).map_err(|_| RoleError::BadName(name.to_owned()))?;
        let mut principals = principals.iter().map(|p| Principal::parse(p)).collect::<Result<Vec<_>, _>>()?;
        principals.sort();
        principals.dedup();
        if principals.is_empty() {
            return Err(RoleError::Empty("principal"));
        }
        let mut paths = paths
            .iter()
            .map(|p| {
                if reach_of(p).is_some() {
                    return Err(RoleError::BadPath(
                        p.clone(),
                        "a role's paths name secrets; templates and lease sources are reached through their \
                         inputs and backend paths (see the Teams docs)"
                            .into(),
                    ));
                }
                Target::parse(p).map_err(|e| RoleError::BadPath(p.clone(), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        paths.sort();
        paths.dedup();
        let mut workloads = workloads.to_vec();
        for w in &workloads {
            check_pattern(w)?;
        }
        workloads.sort();
        workloads.dedup();
        // Verbs may come comma-separated in one argument.
        let verbs = verbs
            .iter()
            .flat_map(|v| v.split(','))
            .filter(|v| !v.trim().is_empty())
            .map(Verb::parse)
            .collect::<Result<BTreeSet<_>, _>>()?;
        if verbs.is_empty() {
            return Err(RoleError::Empty("verb"));
        }
        Ok(Role { name: name.to_owned(), principals, paths, workloads, verbs })
    }

    pub fn matches(&self, c: &Caller<'_>) -> bool {
        self.principals.iter().any(|p| p.matches(c))
    }

    /// One of the role's path patterns covers secret `path` (never a
    /// template or lease source, even in a role stored before they were
    /// refused).
    pub fn covers_path(&self, path: &str) -> bool {
        self.paths.iter().filter(|t| secret_paths_only(t)).any(|t| match t {
            Target::Exact(p) => p.as_str() == path,
            Target::Prefix(p) => path.strip_prefix(p.as_str()).is_some_and(|r| r.starts_with('/')),
        })
    }

    /// Every secret `target` names is covered: an exact path as above; a
    /// prefix only by a prefix pattern at or above it.
    pub fn covers_target(&self, target: &Target) -> bool {
        match target {
            Target::Exact(p) => self.covers_path(p.as_str()),
            Target::Prefix(want) => self.paths.iter().filter(|t| secret_paths_only(t)).any(|t| match t {
                Target::Prefix(p) => {
                    want == p || want.as_str().strip_prefix(p.as_str()).is_some_and(|r| r.starts_with('/'))
                }
                Target::Exact(_) => false,
            }),
        }
    }

    pub fn covers_workload(&self, name: &str) -> bool {
        self.workloads.iter().any(|p| glob(p, name))
    }

    pub fn has(&self, verb: Verb) -> bool {
        self.verbs.contains(&verb)
    }
}

/// What a call needs of its caller. Built by the handler from its request;
/// decided by [`Scope::check`].
#[derive(Clone, Copy, Debug)]
pub enum Need<'a> {
    /// Only a full admin (roles, status, backend changes).
    FullAdmin,
    /// Any role at all (lists, filtered to the roles' scope afterwards).
    AnyRole,
    /// The verb, on nothing in particular (`audit`; `read` for ls).
    Verb(Verb),
    /// The verb on one secret path.
    Path(Verb, &'a str),
    /// The verb on a grant: its target and its workload, in one role.
    Grant(Verb, &'a str, &'a str),
    /// The verb on a workload by name; with its selectors when it is made.
    Workload(Verb, &'a str, Option<&'a [String]>),
}

/// What a refused call lacked, for the error and the audit line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{lacked} (roles: {roles})")]
pub struct Lack {
    /// The caller's roles, comma-separated ("none" for no role).
    pub roles: String,
    pub lacked: String,
}

/// Who the caller is as an admin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Root, `[admin]` uids/gids/subjects: everything.
    Full,
    /// A scoped admin: the roles it matches (never empty).
    Roles(Scoped),
}

/// A scoped admin: its roles and the facts the selector rules need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scoped {
    pub roles: Vec<Role>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub host: bool,
    pub remote: bool,
}

impl Scope {
    /// The scope of a caller who is not a full admin: every role it
    /// matches, or `None` (no admin at all).
    pub fn of(roles: &[Role], c: &Caller<'_>) -> Option<Scope> {
        let mine: Vec<Role> = roles.iter().filter(|r| r.matches(c)).cloned().collect();
        (!mine.is_empty()).then(|| {
            Scope::Roles(Scoped {
                roles: mine,
                uid: c.uid,
                gid: c.gid,
                groups: c.groups.to_vec(),
                host: c.host,
                remote: c.subject.is_some(),
            })
        })
    }

    pub fn is_full(&self) -> bool {
        matches!(self, Scope::Full)
    }

    /// The role names, for messages and audit lines ("full admin" for a full one).
    pub fn names(&self) -> String {
        match self {
            Scope::Full => "full admin".into(),
            Scope::Roles(s) => s.roles.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(","),
        }
    }

    fn roles(&self) -> &[Role] {
        match self {
            Scope::Full => &[],
            Scope::Roles(s) => &s.roles,
        }
    }

    /// Some role with `verb` covers secret `path`. Always true for a full
    /// admin. For features that read secrets on a caller's behalf
    /// (template inputs, dynamic source paths): check each path they read.
    pub fn covers_path(&self, verb: Verb, path: &str) -> bool {
        self.is_full() || self.roles().iter().any(|r| r.has(verb) && r.covers_path(path))
    }

    /// Some role with `verb` covers workload `name`.
    pub fn covers_workload(&self, verb: Verb, name: &str) -> bool {
        self.is_full() || self.roles().iter().any(|r| r.has(verb) && r.covers_workload(name))
    }

    /// Some role covers workload `name` with any verb (what lists show).
    pub fn sees_workload(&self, name: &str) -> bool {
        self.is_full() || self.roles().iter().any(|r| r.covers_workload(name))
    }

    /// Some role with `verb` covers every secret `target` names.
    pub fn covers_target(&self, verb: Verb, target: &Target) -> bool {
        self.is_full() || self.roles().iter().any(|r| r.has(verb) && r.covers_target(target))
    }

    /// May the caller do what `need` says? Full admins may do anything.
    pub fn check(&self, need: Need<'_>) -> Result<(), Lack> {
        let Scope::Roles(s) = self else { return Ok(()) };
        let lack = |lacked: String| Err(Lack { roles: self.names(), lacked });
        match need {
            Need::FullAdmin => lack("this call needs a full admin; a role never allows it".into()),
            Need::AnyRole => Ok(()),
            Need::Verb(v) if s.roles.iter().any(|r| r.has(v)) => Ok(()),
            Need::Verb(v) => lack(format!("no role grants {v}")),
            // Only a valid path is ever covered: patterns compare raw strings.
            Need::Path(_, path) if crate::secret::SecretPath::parse(path).is_err() => {
                lack(format!("{path:?} is not a secret path"))
            }
            Need::Path(v, path) if self.covers_path(v, path) => Ok(()),
            Need::Path(v, path) => lack(format!("no role grants {v} on {path}")),
            Need::Grant(v, target, workload) => {
                let Ok(t) = Target::parse(target) else {
                    return lack(format!("{target:?} is not a secret path or prefix"));
                };
                if s.roles.iter().any(|r| r.has(v) && r.covers_target(&t) && r.covers_workload(workload)) {
                    Ok(())
                } else if !self.covers_target(v, &t) {
                    lack(format!("no role grants {v} on {target}"))
                } else {
                    lack(format!("no role grants {v} on {target} to workload {workload}"))
                }
            }
            Need::Workload(v, name, selectors) => {
                let Some(role) = s.roles.iter().find(|r| r.has(v) && r.covers_workload(name)) else {
                    return lack(format!("no role grants {v} on workload {name}"));
                };
                match selectors {
                    None => Ok(()),
                    Some(sel) => {
                        // Any role that may make this workload may vouch for its selectors.
                        let mut why = String::new();
                        for r in s.roles.iter().filter(|r| r.has(v) && r.covers_workload(name)) {
                            match check_selectors(r, s, sel) {
                                Ok(()) => return Ok(()),
                                Err(e) if r.name == role.name => why = e,
                                Err(_) => {}
                            }
                        }
                        lack(why)
                    }
                }
            }
        }
    }
}

/// A grant target that reaches secrets indirectly: a template
/// (`@template/NAME`), a dynamic source (`dynamic:NAME`) or a certificate
/// (`cert:NAME`), as the verb that governs it and the name.
pub fn reach_of(target: &str) -> Option<(Verb, &str)> {
    if let Some(name) = target.strip_prefix(crate::secret::TEMPLATE_PREFIX) {
        return Some((Verb::Template, name));
    }
    match super::leased(target)? {
        ("dynamic", name) => Some((Verb::Dynamic, name)),
        (_, name) => Some((Verb::Cert, name)),
    }
}

/// What a lease source reaches in keyhole's path space: `BACKEND/PATH`.
pub fn source_reach(backend: &str, path: &str) -> String {
    format!("{backend}/{}", path.trim_matches('/'))
}

/// A certificate put by a scoped admin names the workload it is issued
/// to, and nothing a container could choose: `--uri` ends in
/// `/{workload}` (no other placeholder, no `?` or `#`), and `--cn` is
/// given (the default is `{container_name}`) as `{workload}` or
/// `{workload}.DOMAIN` (no other placeholder).
/// With the workload in the admin's patterns, no team mints a name that
/// is another team's workload.
pub fn check_cert_names(uri: Option<&str>, cn: Option<&str>) -> Result<(), String> {
    const W: &str = "{workload}";
    let others = |s: &str| s.replacen(W, "", 1).contains('{');
    if let Some(uri) = uri {
        let ok = uri.ends_with(&format!("/{W}")) && uri.matches(W).count() == 1 && !others(uri);
        if !ok || uri.contains(['?', '#']) {
            return Err(format!(
                "certificate URI {uri:?}: a role's certificate URI must end in /{W}, with no other placeholder, ? or #"
            ));
        }
    }
    let Some(cn) = cn else {
        return Err(format!(
            "a role's certificate needs --cn {W} or {W}.DOMAIN (the default, {{container_name}}, is the container's choice)"
        ));
    };
    let rest = cn.strip_prefix(W);
    if rest.is_some_and(|r| r.is_empty() || (r.starts_with('.') && !r.contains('{'))) {
        Ok(())
    } else {
        Err(format!(
            "certificate CN {cn:?}: a role's certificate CN must be {W} or {W}.DOMAIN, with no other placeholder"
        ))
    }
}

impl Scope {
    /// Put (or replace) a lease source of kind `verb` (`dynamic` or
    /// `cert`) reaching `backend/path`; a certificate's URI and CN per
    /// [`check_cert_names`].
    pub fn check_source(
        &self,
        verb: Verb,
        backend: &str,
        path: &str,
        uri: Option<&str>,
        cn: Option<&str>,
    ) -> Result<(), Lack> {
        if self.is_full() {
            return Ok(());
        }
        let reach = source_reach(backend, path);
        self.check(Need::Verb(verb))?;
        if !self.covers_path(verb, &reach) {
            return Err(self.lack(format!("no role grants {verb} on {reach} (the source's backend path)")));
        }
        if verb == Verb::Cert {
            check_cert_names(uri, cn).map_err(|e| self.lack(e))?;
        }
        Ok(())
    }

    /// Grant lease source `id` (`dynamic:NAME`, reaching `reach`) to
    /// `workload`: one role with `grant` and the source's verb covers both.
    pub fn check_source_grant(&self, verb: Verb, id: &str, reach: &str, workload: &str) -> Result<(), Lack> {
        let ok = |r: &Role| r.has(Verb::Grant) && r.has(verb) && r.covers_path(reach) && r.covers_workload(workload);
        match self {
            Scope::Full => Ok(()),
            Scope::Roles(s) if s.roles.iter().any(ok) => Ok(()),
            Scope::Roles(_) => Err(self.lack(format!(
                "no role grants grant and {verb} on {id} (backend path {reach}) to workload {workload}"
            ))),
        }
    }

    /// A template's inputs, as recorded at put: each must be covered by a
    /// role holding `template` (a lease source by its backend path, which
    /// `reach` gives; an unknown source is refused).
    pub fn check_template_inputs(&self, inputs: &[String], reach: &dyn Fn(&str) -> Option<String>) -> Result<(), Lack> {
        if self.is_full() {
            return Ok(());
        }
        self.check(Need::Verb(Verb::Template))?;
        for input in inputs {
            let (path, shown) = match reach_of(input) {
                Some((_, _)) => match reach(input) {
                    Some(r) => (r.clone(), format!("{input} (backend path {r})")),
                    None => return Err(self.lack(format!("the template reads {input}, which does not exist"))),
                },
                None => (input.clone(), input.clone()),
            };
            if !self.covers_path(Verb::Template, &path) {
                return Err(self.lack(format!("no role grants template on {shown}, which the template reads")));
            }
        }
        Ok(())
    }

    /// Grant template `name` reading `inputs` to `workload`: as granting
    /// each input to it, and a role with `template` and `grant` covers
    /// the workload.
    pub fn check_template_grant(
        &self,
        name: &str,
        inputs: &[String],
        workload: &str,
        reach: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), Lack> {
        let Scope::Roles(s) = self else { return Ok(()) };
        if !s.roles.iter().any(|r| r.has(Verb::Template) && r.has(Verb::Grant) && r.covers_workload(workload)) {
            return Err(self.lack(format!("no role grants grant and template on workload {workload}")));
        }
        for input in inputs {
            let lacked = match reach_of(input) {
                Some((verb, _)) => match reach(input) {
                    Some(r) => self.check_source_grant(verb, input, &r, workload).err(),
                    None => Some(self.lack(format!("template {name} reads {input}, which does not exist"))),
                },
                None => self.check(Need::Grant(Verb::Grant, input, workload)).err(),
            };
            if let Some(l) = lacked {
                return Err(Lack { lacked: format!("template {name} reads {input}: {}", l.lacked), ..l });
            }
        }
        Ok(())
    }

    fn lack(&self, lacked: String) -> Lack {
        Lack { roles: self.names(), lacked }
    }
}

/// The selectors a scoped admin may give a workload: each must confine
/// it to callers the admin's team owns, so no team can widen a workload
/// to match another team's containers (and serve them its files, or be
/// served in their place):
///
/// - `docker:label:KEY=VALUE` whose VALUE matches one of the role's
///   workload patterns (a team labels its containers with its own names,
///   e.g. `keyhole.workload=a-web` for pattern `a-*`);
/// - `unix:uid:N` only for the admin's own uid, `unix:gid:N` only for a
///   group it is in, and only for a host admin (a remote one owns no uid);
/// - never `docker:id`, `docker:name` or `docker:image` (names and images
///   are anyone's to reuse), nor any selector kind added later until it
///   is given a rule here.
pub fn check_selectors(role: &Role, s: &Scoped, selectors: &[String]) -> Result<(), String> {
    let mut anchored = false;
    for raw in selectors {
        let sel = Selector::parse(raw).map_err(|e| e.to_string())?;
        match &sel {
            Selector::DockerLabel(_, v) if role.covers_workload(v) => anchored = true,
            Selector::DockerLabel(_, v) => {
                return Err(format!(
                    "selector {sel}: a role may select containers only by a label whose value matches its \
                     workload patterns ({}), not {v:?}",
                    role.workloads.join(", ")
                ));
            }
            Selector::UnixUid(u) if s.host && !s.remote && *u == s.uid => anchored = true,
            Selector::UnixGid(g) if s.host && !s.remote && (*g == s.gid || s.groups.contains(g)) => anchored = true,
            Selector::UnixUid(_) | Selector::UnixGid(_) => {
                return Err(format!("selector {sel}: a role may name only its own admin's uid or gids"));
            }
            #[allow(unreachable_patterns)]
            _ => {
                return Err(format!(
                    "selector {sel}: a role may not select by container id, name or image (another team's \
                     containers could match); use docker:label:KEY=VALUE with a value in its workload patterns"
                ));
            }
        }
    }
    if anchored { Ok(()) } else { Err("a workload needs at least one selector".into()) }
}

/// The roles in force, shared by everything that decides who is an admin
/// (the connection classifier, the remote listener, the Admin service).
/// Loaded from the store at start; replaced whole after every change.
#[derive(Debug, Default)]
pub struct RoleTable(std::sync::RwLock<std::sync::Arc<Vec<Role>>>);

impl RoleTable {
    pub fn set(&self, roles: Vec<Role>) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(roles);
    }

    pub fn get(&self) -> std::sync::Arc<Vec<Role>> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Some role names this caller: it may use the Admin service (each
    /// call is then checked against its scope).
    pub fn any_match(&self, c: &Caller<'_>) -> bool {
        self.get().iter().any(|r| r.matches(c))
    }

    /// The caller's scope, if any role names it.
    pub fn scope_of(&self, c: &Caller<'_>) -> Option<Scope> {
        Scope::of(&self.get(), c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    fn team_a() -> Role {
        Role::new(
            "team-a",
            &v(&["uid:1001", "subject:CN=alice,O=A"]),
            &v(&["a/*"]),
            &v(&["a-*"]),
            &v(&["read,write,grant,workload"]),
        )
        .unwrap()
    }

    fn host(uid: u32) -> Caller<'static> {
        Caller { uid, gid: uid, groups: &[], host: true, subject: None }
    }

    fn scope(uid: u32) -> Scope {
        Scope::of(&[team_a(), team_b()], &host(uid)).unwrap()
    }

    fn team_b() -> Role {
        Role::new(
            "team-b",
            &v(&["uid:1002", "gid:500"]),
            &v(&["b/*", "shared/ca"]),
            &v(&["b-*"]),
            &v(&["read", "grant"]),
        )
        .unwrap()
    }

    #[test]
    fn roles_parse_and_refuse_nonsense() {
        let r = team_a();
        assert_eq!(r.verbs.len(), 4);
        assert_eq!(r.principals[1].to_string(), "subject:CN=alice,O=A");
        assert_eq!(Role::new("x", &v(&["uid:0"]), &[], &[], &v(&["read"])), Err(RoleError::RootPrincipal));
        assert!(Role::new("x", &v(&["pid:1"]), &[], &[], &v(&["read"])).is_err());
        assert!(Role::new("x", &v(&["uid:5"]), &v(&["../a"]), &[], &v(&["read"])).is_err());
        for p in ["@template/t", "dynamic:pg", "cert:web"] {
            let e = Role::new("x", &v(&["uid:5"]), &v(&[p]), &v(&["a-*"]), &v(&["grant"])).unwrap_err();
            assert!(matches!(e, RoleError::BadPath(..)), "{p}: {e}");
            // A role stored before this was refused covers none of them.
            let mut r = Role::new("x", &v(&["uid:5"]), &v(&["a/*"]), &v(&["a-*"]), &v(&["grant"])).unwrap();
            r.paths.push(Target::parse(p).unwrap());
            assert!(!r.covers_path(p) && !r.covers_target(&Target::parse(p).unwrap()), "{p}");
        }
        assert!(Role::new("x", &v(&["uid:5"]), &[], &v(&["a/b"]), &v(&["read"])).is_err());
        assert!(Role::new("x", &v(&["uid:5"]), &[], &[], &v(&["sudo"])).is_err());
        assert!(Role::new("x", &[], &[], &[], &v(&["read"])).is_err());
        assert!(Role::new("x", &v(&["uid:5"]), &[], &[], &[]).is_err());
        assert!(Role::new("-x", &v(&["uid:5"]), &[], &[], &v(&["read"])).is_err());
        for verb in Verb::ALL {
            assert_eq!(Verb::parse(verb.as_str()), Ok(verb));
        }
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Role>(&json).unwrap(), r);
    }

    #[test]
    fn globs() {
        assert!(glob("a-*", "a-web"));
        assert!(glob("a-*", "a-"));
        assert!(!glob("a-*", "b-web"));
        assert!(!glob("a-*", "xa-web"));
        assert!(glob("svc", "svc"));
        assert!(!glob("svc", "svc2"));
        assert!(glob("*-a", "web-a"));
        assert!(glob("a*b*c", "aXbYc"));
        assert!(!glob("a*b*c", "aXbY"));
        assert!(glob("*", "anything"));
        assert!(!glob("ab*ba", "aba"), "overlapping ends do not count twice");
    }

    #[test]
    fn principals_match_host_processes_and_subjects() {
        let a = team_a();
        assert!(a.matches(&host(1001)));
        assert!(!a.matches(&host(1002)));
        assert!(!a.matches(&Caller { host: false, ..host(1001) }), "uid 1001 in a container is anyone");
        let alice = crate::config::parse_subject("O=A, CN=alice").unwrap();
        let remote = Caller { uid: 0, gid: 0, groups: &[], host: false, subject: Some(&alice) };
        assert!(a.matches(&remote));
        let other = crate::config::parse_subject("CN=alice").unwrap();
        assert!(!a.matches(&Caller { subject: Some(&other), ..remote }), "every attribute");
        // A remote client is never a uid.
        assert!(!a.matches(&Caller { uid: 1001, host: true, subject: Some(&other), ..remote }));
        let b = team_b();
        assert!(b.matches(&Caller { groups: &[500], ..host(7) }));
        assert!(b.matches(&Caller { gid: 500, ..host(7) }));
        assert!(Scope::of(&[a, b], &host(7)).is_none());
    }

    #[test]
    fn paths_and_targets() {
        let s = scope(1001);
        assert!(s.check(Need::Path(Verb::Read, "a/db")).is_ok());
        assert!(s.check(Need::Path(Verb::Write, "a/x/y")).is_ok());
        assert!(s.check(Need::Path(Verb::Read, "a")).is_err(), "a/* is under a/, not a itself");
        assert!(s.check(Need::Path(Verb::Read, "ab/x")).is_err());
        assert!(s.check(Need::Path(Verb::Read, "a/../b/db")).is_err(), "never a path that is no path");
        assert!(s.check(Need::Path(Verb::Read, "a/x y")).is_err());
        assert!(s.check(Need::Path(Verb::Read, "b/db")).is_err());
        assert!(s.check(Need::Path(Verb::Audit, "a/db")).is_err());
        let e = s.check(Need::Path(Verb::Write, "b/db")).unwrap_err();
        assert_eq!(e.to_string(), "no role grants write on b/db (roles: team-a)");
        let b = scope(1002);
        assert!(b.check(Need::Path(Verb::Read, "shared/ca")).is_ok());
        assert!(b.check(Need::Path(Verb::Write, "b/db")).is_err(), "team-b has no write");
        assert!(b.check(Need::Path(Verb::Read, "shared/ca2")).is_err());
        assert!(Scope::Full.check(Need::FullAdmin).is_ok());
        assert!(s.check(Need::FullAdmin).is_err());
        assert!(s.check(Need::AnyRole).is_ok());
        assert!(s.check(Need::Verb(Verb::Audit)).is_err());
        assert!(s.check(Need::Verb(Verb::Read)).is_ok());
    }

    #[test]
    fn a_grant_needs_the_target_and_the_workload_in_one_role() {
        let s = scope(1001);
        assert!(s.check(Need::Grant(Verb::Grant, "a/db", "a-web")).is_ok());
        assert!(s.check(Need::Grant(Verb::Grant, "a/*", "a-web")).is_ok());
        assert!(s.check(Need::Grant(Verb::Grant, "a/x/*", "a-web")).is_ok());
        // Its own workload, another team's secret: the attack.
        let e = s.check(Need::Grant(Verb::Grant, "b/db", "a-web")).unwrap_err();
        assert_eq!(e.lacked, "no role grants grant on b/db");
        assert!(s.check(Need::Grant(Verb::Grant, "b/*", "a-web")).is_err());
        // A prefix above its own covers others' paths.
        assert!(s.check(Need::Grant(Verb::Grant, "*", "a-web")).is_err());
        assert!(s.check(Need::Grant(Verb::Grant, "a/db", "b-web")).is_err());
        assert!(s.check(Need::Grant(Verb::Grant, "../x", "a-web")).is_err());
        // Two roles of one caller do not mix: b's path to a's workload.
        let both = Role { principals: vec![Principal::Uid(1001)], ..team_b() };
        let s = Scope::of(&[team_a(), both], &host(1001)).unwrap();
        assert_eq!(s.names(), "team-a,team-b");
        assert!(s.check(Need::Grant(Verb::Grant, "b/db", "b-web")).is_ok());
        assert!(s.check(Need::Grant(Verb::Grant, "b/db", "a-web")).is_err());
    }

    #[test]
    fn a_scoped_admin_cannot_widen_a_workload_to_other_teams_containers() {
        let s = scope(1001);
        let w = |sel: &[&str]| s.check(Need::Workload(Verb::Workload, "a-web", Some(&v(sel))));
        assert!(w(&["docker:label:keyhole.workload=a-web"]).is_ok());
        assert!(w(&["docker:label:keyhole.workload=a-web", "unix:uid:1001"]).is_ok());
        assert!(w(&["unix:uid:1001"]).is_ok(), "its own host processes");
        for bad in [
            &["docker:label:keyhole.workload=b-web"][..],
            &["docker:label:keyhole.workload=a-web", "docker:label:team=b-x"],
            &["docker:image:busybox"],
            &["docker:name:b-web"],
            &["docker:id:abababababab"],
            &["unix:uid:0"],
            &["unix:uid:1002"],
            &["unix:gid:500"],
            &["docker:label:keyhole.workload=a-web", "docker:image:x"],
        ] {
            assert!(w(bad).is_err(), "{bad:?}");
        }
        assert!(s.check(Need::Workload(Verb::Workload, "b-web", Some(&v(&["docker:label:k=a-web"])))).is_err());
        assert!(s.check(Need::Workload(Verb::Workload, "b-web", None)).is_err());
        assert!(s.check(Need::Workload(Verb::Workload, "a-web", None)).is_ok());
        // A remote admin owns no uid.
        let alice = crate::config::parse_subject("CN=alice,O=A").unwrap();
        let r = Scope::of(&[team_a()], &Caller { uid: 0, gid: 0, groups: &[], host: false, subject: Some(&alice) })
            .unwrap();
        assert!(r.check(Need::Workload(Verb::Workload, "a-web", Some(&v(&["unix:uid:0"])))).is_err());
        assert!(r.check(Need::Workload(Verb::Workload, "a-web", Some(&v(&["docker:label:k=a-x"])))).is_ok());
    }

    fn lab() -> Scope {
        let r = Role::new(
            "lab",
            &v(&["uid:1001"]),
            &v(&["a/*", "vault/database/creds/a-web", "vault/pki-a/*"]),
            &v(&["a-*"]),
            &v(&["grant,template,dynamic,cert"]),
        )
        .unwrap();
        let only_read = Role::new("ro", &v(&["uid:1001"]), &v(&["b/*"]), &v(&["a-*"]), &v(&["read"])).unwrap();
        Scope::of(&[r, only_read], &host(1001)).unwrap()
    }

    #[test]
    fn templates_are_checked_by_every_input() {
        let s = lab();
        let none = |_: &str| None;
        let src = |id: &str| (id == "dynamic:db").then(|| "vault/database/creds/a-web".to_owned());
        assert!(s.check_template_inputs(&v(&["a/db", "a/x/y"]), &none).is_ok());
        // The attack: another team's secret as an input.
        let e = s.check_template_inputs(&v(&["a/db", "b/db"]), &none).unwrap_err();
        assert_eq!(e.lacked, "no role grants template on b/db, which the template reads");
        assert!(s.check_template_inputs(&v(&["dynamic:db"]), &src).is_ok());
        assert!(s.check_template_inputs(&v(&["dynamic:other"]), &src).is_err(), "unknown source: closed");
        let ok = s.check_template_grant("t", &v(&["a/db", "dynamic:db"]), "a-web", &src);
        assert!(ok.is_ok(), "{ok:?}");
        let e = s.check_template_grant("t", &v(&["a/db", "b/db"]), "a-web", &src).unwrap_err();
        assert_eq!(e.lacked, "template t reads b/db: no role grants grant on b/db");
        assert!(s.check_template_grant("t", &v(&["a/db"]), "b-web", &src).is_err());
        assert!(Scope::Full.check_template_grant("t", &v(&["b/db"]), "b-web", &none).is_ok());
        // A role without template may not put one at all.
        assert!(scope(1002).check_template_inputs(&v(&["b/db"]), &none).is_err());
    }

    #[test]
    fn sources_are_checked_by_backend_path_and_certificates_by_name() {
        let s = lab();
        let d = Verb::Dynamic;
        assert!(s.check_source(d, "vault", "database/creds/a-web", None, None).is_ok());
        let e = s.check_source(d, "vault", "database/creds/b-web", None, None).unwrap_err();
        assert!(e.lacked.contains("vault/database/creds/b-web"), "{e}");
        let c = Verb::Cert;
        let uri = Some("spiffe://corp/{workload}");
        assert!(s.check_source(c, "vault", "pki-a/issue/web", uri, Some("{workload}.svc")).is_ok());
        assert!(s.check_source(c, "vault", "pki/issue/web", uri, Some("{workload}")).is_err(), "not its PKI mount");
        assert!(s.check_source(c, "vault", "pki-a/issue/web", uri, None).is_err(), "the default CN is the container's");
        for (u, cn) in [
            ("spiffe://corp/b-web", Some("{workload}")),
            ("spiffe://corp/{workload}/x", Some("{workload}")),
            ("spiffe://corp/{container_name}/{workload}", Some("{workload}")),
            ("spiffe://corp/x?{workload}", Some("{workload}")),
            ("spiffe://corp/{workload}", Some("b-web.svc")),
            ("spiffe://corp/{workload}", Some("x.{workload}.svc")),
            ("spiffe://corp/{workload}", Some("{workload}{container_id}")),
            ("spiffe://corp/{workload}", Some("{workload}.{container_name}")),
        ] {
            assert!(s.check_source(c, "vault", "pki-a/issue/web", Some(u), cn).is_err(), "{u} {cn:?}");
        }
        assert!(Scope::Full.check_source(c, "vault", "pki/issue/x", Some("spiffe://b-web"), None).is_ok());
        assert!(s.check_source_grant(d, "dynamic:db", "vault/database/creds/a-web", "a-web").is_ok());
        assert!(s.check_source_grant(d, "dynamic:db", "vault/database/creds/a-web", "b-web").is_err());
        assert!(s.check_source_grant(d, "dynamic:db", "vault/database/creds/b-web", "a-web").is_err());
        assert!(s.check_source_grant(Verb::Cert, "cert:x", "vault/database/creds/a-web", "a-web").is_ok());
        assert_eq!(reach_of("@template/t"), Some((Verb::Template, "t")));
        assert_eq!(reach_of("cert:x"), Some((Verb::Cert, "x")));
        assert_eq!(reach_of("a/b"), None);
        // A role's paths name secrets only.
        for p in ["@template/t", "dynamic:db", "cert:x"] {
            assert!(Role::new("x", &v(&["uid:5"]), &v(&[p]), &[], &v(&["grant"])).is_err(), "{p}");
        }
    }
}
