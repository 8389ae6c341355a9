//! Workloads, grants, and the decision. Pure: no I/O.
//!
//! A workload is a name and selectors; a caller matches it when it
//! matches every selector. `unix:` selectors name host users: a workload
//! of `unix:` selectors only matches host users ([`Identity::host_user`]:
//! in no container, and in the broker's pid namespace or a user namespace
//! of their own), never root in a container, who can take any uid; a
//! workload that also names containers matches those containers whose
//! uid and gid match too. A grant shows a secret (or every secret under
//! a prefix, `db/*`) in a workload's mount as a file with a name, mode
//! and owner.
#![forbid(unsafe_code)]

pub mod file;
pub mod roles;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::identity::Identity;
use crate::secret::{PathError, SecretPath};

pub mod admin;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error(
        "selector {0:?} is not one of unix:uid:N, unix:gid:N, container:id:ID, container:name:NAME, container:image:REF, container:label:KEY=VALUE (or docker:id|name|image|label:..., Docker containers only)"
    )]
    BadSelector(String),
    #[error("workload name {0:?} must be 1-64 characters of [A-Za-z0-9._-], not starting with '.' or '-'")]
    BadWorkloadName(String),
    #[error("a workload needs at least one selector")]
    NoSelectors,
    #[error("file name {0:?} must be 1-255 characters of [A-Za-z0-9._-], not '.' or '..'")]
    BadFileName(String),
    #[error("mode {0:04o}: files are read-only, so only read bits (0400, 0440, 0444, ...) are allowed")]
    BadMode(u32),
    #[error("signal {0:?} is not one of HUP, INT, QUIT, USR1, USR2, TERM, WINCH, ALRM")]
    BadSignal(String),
    #[error("workload {workload} already shows {shown} as file {file}; pass --file NAME")]
    FileClash { workload: String, shown: String, file: String },
    #[error("--file cannot be used with a prefix grant ({0}): each secret keeps its own name")]
    FileWithPrefix(String),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("{0}")]
    BadTemplateGrant(String),
    #[error("source name {0:?} must be 1-64 characters of [A-Za-z0-9._-], not starting with '.' or '-'")]
    BadSourceName(String),
    #[error("{0} cannot be granted as a prefix: grant each source by name")]
    LeasedPrefix(String),
    #[error(transparent)]
    Action(#[from] crate::actions::ActionError),
}

/// Whether a grant's path names a lease source (`dynamic:NAME`,
/// `cert:NAME`) rather than a stored secret; returns (kind, name).
pub fn leased(path: &str) -> Option<(&str, &str)> {
    let (kind, name) = path.split_once(':')?;
    matches!(kind, "dynamic" | "cert").then_some((kind, name))
}

/// Check a lease source's name.
pub fn check_source_name(s: &str) -> Result<(), PolicyError> {
    if check_name(s, 64) && !s.starts_with(['.', '-']) { Ok(()) } else { Err(PolicyError::BadSourceName(s.to_owned())) }
}

/// One fact about a caller that a workload can require.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Selector {
    UnixUid(u32),
    UnixGid(u32),
    DockerId(String),
    DockerName(String),
    DockerImage(String),
    DockerLabel(String, String),
    /// `container:id:ID` and the rest: a container of any configured
    /// runtime (Docker or Podman); the `docker:` forms match Docker's only.
    ContainerId(String),
    ContainerName(String),
    ContainerImage(String),
    ContainerLabel(String, String),
}

impl Selector {
    pub fn parse(s: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::BadSelector(s.to_owned());
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        let (key, value) = rest.split_once(':').ok_or_else(bad)?;
        let nonempty = |v: &str| (!v.is_empty() && !v.contains(char::is_control)).then(|| v.to_owned()).ok_or_else(bad);
        let any = kind == "container";
        let kind = if any { "docker" } else { kind };
        let sel = match (kind, key) {
            ("unix", "uid") => Selector::UnixUid(value.parse().map_err(|_| bad())?),
            ("unix", "gid") => Selector::UnixGid(value.parse().map_err(|_| bad())?),
            ("docker", "id") if value.len() >= 12 && value.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Selector::DockerId(value.to_ascii_lowercase())
            }
            ("docker", "name") => Selector::DockerName(nonempty(value.trim_start_matches('/'))?),
            ("docker", "image") => Selector::DockerImage(nonempty(value)?),
            ("docker", "label") => {
                let (k, v) = value.split_once('=').ok_or_else(bad)?;
                Selector::DockerLabel(nonempty(k)?, v.to_owned())
            }
            _ => return Err(bad()),
        };
        Ok(match sel {
            Selector::DockerId(i) if any => Selector::ContainerId(i),
            Selector::DockerName(n) if any => Selector::ContainerName(n),
            Selector::DockerImage(i) if any => Selector::ContainerImage(i),
            Selector::DockerLabel(k, v) if any => Selector::ContainerLabel(k, v),
            Selector::UnixUid(_) | Selector::UnixGid(_) if any => return Err(bad()),
            other => other,
        })
    }

    pub fn matches(&self, id: &Identity) -> bool {
        // Facts only of a container a runtime confirmed (see `identity`).
        let any = id.docker.as_ref();
        let docker = any.filter(|d| d.runtime == Runtime::Docker);
        // A short id matches as a prefix, as docker's CLI accepts it.
        let id_is = |d: Option<&std::sync::Arc<ContainerInfo>>, want: &str| {
            d.is_some() && id.container_id.as_deref().is_some_and(|c| c.starts_with(want))
        };
        match self {
            Selector::UnixUid(u) => id.uid == *u,
            Selector::UnixGid(g) => id.gid == *g,
            Selector::DockerId(want) => id_is(docker, want),
            Selector::DockerName(n) => docker.is_some_and(|d| d.name == *n),
            Selector::DockerImage(i) => docker.is_some_and(|d| image_matches(i, &d.image)),
            Selector::DockerLabel(k, v) => docker.is_some_and(|d| d.labels.get(k) == Some(v)),
            Selector::ContainerId(want) => id_is(any, want),
            Selector::ContainerName(n) => any.is_some_and(|d| d.name == *n),
            Selector::ContainerImage(i) => any.is_some_and(|d| image_matches(i, &d.image)),
            Selector::ContainerLabel(k, v) => any.is_some_and(|d| d.labels.get(k) == Some(v)),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::UnixUid(u) => write!(f, "unix:uid:{u}"),
            Selector::UnixGid(g) => write!(f, "unix:gid:{g}"),
            Selector::DockerId(i) => write!(f, "docker:id:{i}"),
            Selector::DockerName(n) => write!(f, "docker:name:{n}"),
            Selector::DockerImage(i) => write!(f, "docker:image:{i}"),
            Selector::DockerLabel(k, v) => write!(f, "docker:label:{k}={v}"),
            Selector::ContainerId(i) => write!(f, "container:id:{i}"),
            Selector::ContainerName(n) => write!(f, "container:name:{n}"),
            Selector::ContainerImage(i) => write!(f, "container:image:{i}"),
            Selector::ContainerLabel(k, v) => write!(f, "container:label:{k}={v}"),
        }
    }
}

/// The container runtimes keyhole asks about containers (`[[runtime]]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    #[default]
    Docker,
    Podman,
}

impl Runtime {
    pub fn parse(s: &str) -> Option<Runtime> {
        match s {
            "docker" => Some(Runtime::Docker),
            "podman" => Some(Runtime::Podman),
            _ => None,
        }
    }

    /// "Docker", "Podman": for log lines.
    pub fn title(self) -> &'static str {
        match self {
            Runtime::Docker => "Docker",
            Runtime::Podman => "Podman",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An image reference with its defaults spelled out where they are
/// unambiguous: a missing tag is `:latest` (a digest stays as it is).
fn with_tag(r: &str) -> String {
    let last = r.rsplit('/').next().unwrap_or(r);
    if last.contains(':') || last.contains('@') { r.to_owned() } else { format!("{r}:latest") }
}

/// Whether the first component of an image reference names a registry
/// (`localhost`, or a host with a '.' or a port), as Docker and Podman
/// tell them apart.
fn has_registry(r: &str) -> bool {
    match r.split_once('/') {
        Some((first, _)) => first == "localhost" || first.contains('.') || first.contains(':'),
        None => false,
    }
}

/// Whether a selector's image `want` names the image a runtime reports,
/// `have`. A fully qualified `want` must equal it (up to `:latest`); a
/// short name as typed (`busybox:1`) also matches the names runtimes
/// resolve it to: `docker.io/library/busybox:1` (Docker Hub) and
/// `localhost/busybox:1` (Podman's local images, as `podman import` and
/// `podman build` name them).
pub fn image_matches(want: &str, have: &str) -> bool {
    let (want, have) = (with_tag(want), with_tag(have));
    if want == have {
        return true;
    }
    if has_registry(&want) {
        return false;
    }
    let mut resolved = vec![format!("localhost/{want}"), format!("docker.io/{want}")];
    if !want.contains('/') {
        resolved.push(format!("docker.io/library/{want}"));
    }
    resolved.contains(&have)
}

/// The selectors a caller in container `id` (confirmed by a runtime)
/// matches: the `container:` forms, and for Docker's the `docker:` ones.
pub fn container_selectors(id: Option<&str>, info: Option<&ContainerInfo>) -> Vec<String> {
    let (Some(id), Some(d)) = (id, info) else { return Vec::new() };
    let mut kinds = vec!["container"];
    if d.runtime == Runtime::Docker {
        kinds.push("docker");
    }
    let mut s = Vec::new();
    for k in kinds {
        s.push(format!("{k}:id:{id}"));
        s.push(format!("{k}:name:{}", d.name));
        s.push(format!("{k}:image:{}", d.image));
        s.extend(d.labels.iter().map(|(l, v)| format!("{k}:label:{l}={v}")));
    }
    s
}

/// What the runtime says about a container (from inspect).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ContainerInfo {
    /// Which runtime confirmed it.
    pub runtime: Runtime,
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// The container's configured user (`User`), e.g. "1000" or "app".
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user: String,
}

fn check_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

pub fn check_workload_name(s: &str) -> Result<(), PolicyError> {
    if check_name(s, 64) && !s.starts_with(['.', '-']) {
        Ok(())
    } else {
        Err(PolicyError::BadWorkloadName(s.to_owned()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub name: String,
    pub selectors: Vec<Selector>,
}

impl Workload {
    pub fn new(name: &str, selectors: &[String]) -> Result<Self, PolicyError> {
        check_workload_name(name)?;
        if selectors.is_empty() {
            return Err(PolicyError::NoSelectors);
        }
        let mut selectors = selectors.iter().map(|s| Selector::parse(s)).collect::<Result<Vec<_>, _>>()?;
        selectors.sort();
        selectors.dedup();
        Ok(Workload { name: name.to_owned(), selectors })
    }

    /// A caller matches when it matches every selector; and, when every
    /// selector is a `unix:` one, only if it is a host user (in a
    /// container, or in a pid namespace of its own with the broker's user
    /// namespace, root picks its uid: a uid there names no host user).
    pub fn matches(&self, id: &Identity) -> bool {
        !self.selectors.is_empty()
            && (id.host_user || !self.unix_only())
            && self.selectors.iter().all(|s| s.matches(id))
    }

    /// Every selector is `unix:uid` or `unix:gid`.
    pub fn unix_only(&self) -> bool {
        self.selectors.iter().all(|s| matches!(s, Selector::UnixUid(_) | Selector::UnixGid(_)))
    }
}

/// What a grant names: one secret, or every secret under a prefix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Target {
    Exact(SecretPath),
    Prefix(SecretPath),
}

impl Target {
    pub fn parse(s: &str) -> Result<Self, PolicyError> {
        if let Some(name) = s.strip_prefix(crate::secret::TEMPLATE_PREFIX) {
            return Ok(Target::Exact(SecretPath::template(name)?));
        }
        if let Some((kind, name)) = leased(s) {
            if name.ends_with("/*") {
                return Err(PolicyError::LeasedPrefix(s.to_owned()));
            }
            check_source_name(name)?;
            return Ok(Target::Exact(SecretPath::leased(kind, name)));
        }
        match s.strip_suffix("/*") {
            Some(p) => Ok(Target::Prefix(SecretPath::parse(p)?)),
            None => Ok(Target::Exact(SecretPath::parse(s)?)),
        }
    }

    /// The file name `path` appears as under this target, if it is covered:
    /// the last segment for an exact grant; for a prefix grant, the rest
    /// of the path with '/' turned into '_'.
    pub fn file_for(&self, path: &str) -> Option<String> {
        match self {
            Target::Exact(p) if p.as_str() == path => path.rsplit(['/', ':']).next().map(str::to_owned),
            Target::Exact(_) => None,
            Target::Prefix(p) => {
                let rest = path.strip_prefix(p.as_str())?.strip_prefix('/')?;
                Some(rest.replace('/', "_"))
            }
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Exact(p) => write!(f, "{p}"),
            Target::Prefix(p) => write!(f, "{p}/*"),
        }
    }
}

pub const DEFAULT_MODE: u32 = 0o400;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub target: Target,
    pub workload: String,
    /// File name; `None` means the default derived from the path.
    pub file: Option<String>,
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Signal sent to the containers that read the secret, after it rotates.
    #[serde(default)]
    pub notify: Option<String>,
    /// Restart or exec in the containers that read the file, after it
    /// changes (see [`crate::actions`]).
    #[serde(default, skip_serializing_if = "crate::actions::OnChange::is_empty")]
    pub on_change: crate::actions::OnChange,
}

/// Signals a grant may send on rotation.
const SIGNALS: [&str; 8] = ["SIGHUP", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGTERM", "SIGWINCH", "SIGALRM"];

/// `HUP`, `sighup` or `SIGHUP` → `SIGHUP`.
pub fn parse_signal(s: &str) -> Result<String, PolicyError> {
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") { up } else { format!("SIG{up}") };
    if SIGNALS.contains(&name.as_str()) { Ok(name) } else { Err(PolicyError::BadSignal(s.to_owned())) }
}

impl Grant {
    pub fn new(
        target: &str,
        workload: &str,
        file: Option<String>,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<Self, PolicyError> {
        let target = Target::parse(target)?;
        check_workload_name(workload)?;
        if let Some(f) = &file {
            if matches!(target, Target::Prefix(_)) {
                return Err(PolicyError::FileWithPrefix(target.to_string()));
            }
            if !check_name(f, 255) {
                return Err(PolicyError::BadFileName(f.clone()));
            }
        }
        let mode = mode.unwrap_or(DEFAULT_MODE);
        if mode & !0o444 != 0 || mode == 0 {
            return Err(PolicyError::BadMode(mode));
        }
        Ok(Grant {
            target,
            workload: workload.to_owned(),
            file,
            mode,
            uid,
            gid,
            notify: None,
            on_change: Default::default(),
        })
    }

    /// Restart or exec in the file's readers after it changes.
    pub fn with_on_change(mut self, on_change: crate::actions::OnChange) -> Self {
        self.on_change = on_change;
        self
    }

    /// Send `signal` to the secret's readers when it rotates.
    pub fn with_notify(mut self, signal: Option<&str>) -> Result<Self, PolicyError> {
        self.notify = signal.map(parse_signal).transpose()?;
        Ok(self)
    }

    pub fn file_for(&self, path: &str) -> Option<String> {
        let derived = self.target.file_for(path)?;
        Some(self.file.clone().unwrap_or(derived))
    }
}

/// Refuse an exact grant whose file name another exact grant of the same
/// workload (in `existing`) already shows: the second would silently
/// swap what the workload reads. Prefix grants keep their precedence
/// (see [`files_for`]); granting the same secret again is an update.
pub fn check_file_clash<'a>(existing: impl IntoIterator<Item = &'a Grant>, new: &Grant) -> Result<(), PolicyError> {
    let Target::Exact(p) = &new.target else { return Ok(()) };
    let Some(name) = new.file_for(p.as_str()) else { return Ok(()) };
    for g in existing {
        let Target::Exact(q) = &g.target else { continue };
        if g.workload == new.workload && q != p && g.file_for(q.as_str()).as_deref() == Some(name.as_str()) {
            return Err(PolicyError::FileClash { workload: new.workload.clone(), shown: q.to_string(), file: name });
        }
    }
    Ok(())
}

/// One file a workload's mount shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSpec {
    pub name: String,
    pub secret: String,
    pub mode: u32,
    /// The grant's owner; None: the mount's default owner (root, or a
    /// volume's container user).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub notify: Option<String>,
    pub on_change: crate::actions::OnChange,
}

/// The files a workload sees, given its grants and the secrets that exist.
/// Where two grants would show the same name, the exact grant wins over a
/// prefix, then the earlier secret path; the loser is reported.
pub fn files_for<'a>(grants: impl IntoIterator<Item = &'a Grant>, secrets: &[String]) -> (Vec<FileSpec>, Vec<String>) {
    let mut chosen: BTreeMap<String, (bool, FileSpec)> = BTreeMap::new();
    let mut clashes = Vec::new();
    for g in grants {
        for s in secrets {
            let Some(name) = g.file_for(s) else { continue };
            let exact = matches!(g.target, Target::Exact(_));
            let spec = FileSpec {
                name: name.clone(),
                secret: s.clone(),
                mode: g.mode,
                uid: g.uid,
                gid: g.gid,
                notify: g.notify.clone(),
                on_change: g.on_change.clone(),
            };
            match chosen.get(&name) {
                Some((was_exact, prev))
                    if *was_exact && !exact || (*was_exact == exact && prev.secret <= spec.secret) =>
                {
                    clashes.push(format!("{name}: {} hides {}", prev.secret, spec.secret));
                }
                Some((_, prev)) => {
                    clashes.push(format!("{name}: {} hides {}", spec.secret, prev.secret));
                    chosen.insert(name, (exact, spec));
                }
                None => {
                    chosen.insert(name, (exact, spec));
                }
            }
        }
    }
    (chosen.into_values().map(|(_, s)| s).collect(), clashes)
}

/// The decision for one open of one file in one workload's mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// The caller does not match the mount's workload.
    WrongWorkload,
}

pub fn decide(id: &Identity, workload: &Workload) -> Decision {
    if workload.matches(id) { Decision::Allow } else { Decision::WrongWorkload }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, image, labels) of a container.
    type Docker<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

    fn id(uid: u32, container: Option<Docker<'_>>) -> Identity {
        Identity {
            uid,
            gid: uid,
            pid: 1,
            host_user: container.is_none(),
            container_id: container.map(|_| "ab".repeat(32)),
            docker: container.map(|(name, image, labels)| {
                std::sync::Arc::new(ContainerInfo {
                    name: name.into(),
                    image: image.into(),
                    labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                    user: String::new(),
                    runtime: Runtime::Docker,
                })
            }),
            ..Identity::default()
        }
    }

    #[test]
    fn selectors_parse_and_print_back() {
        for s in [
            "unix:uid:1000",
            "unix:gid:0",
            "docker:id:abababababab",
            "docker:name:web",
            "docker:image:local/app:1.2",
            "docker:label:com.example.role=db",
            "docker:label:empty=",
        ] {
            assert_eq!(Selector::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(Selector::parse("docker:name:/web").unwrap().to_string(), "docker:name:web");
        for bad in
            ["uid:1", "unix:uid:x", "unix:pid:1", "docker:id:xyz", "docker:label:novalue", "docker:name:", "k8s:ns:a"]
        {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_workload_needs_every_selector() {
        let w = Workload::new("web", &["docker:label:app=web".into(), "unix:uid:0".into()]).unwrap();
        assert!(w.matches(&id(0, Some(("c1", "img", &[("app", "web")])))));
        assert!(!w.matches(&id(0, Some(("c1", "img", &[("app", "db")])))));
        assert!(!w.matches(&id(1000, Some(("c1", "img", &[("app", "web")])))));
        assert!(!w.matches(&id(0, None)), "a host process has no labels");
        let short = Workload::new("x", &["docker:id:abababababab".into()]).unwrap();
        assert!(short.matches(&id(5, Some(("n", "i", &[])))));
        assert_eq!(decide(&id(5, None), &short), Decision::WrongWorkload);
        assert!(Workload::new("x", &[]).is_err());
        for bad in ["", ".x", "-x", "a/b", "a b", &"a".repeat(65)] {
            assert!(Workload::new(bad, &["unix:uid:0".into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn unix_selectors_alone_match_host_users_only() {
        let w = Workload::new("backup", &["unix:uid:0".into()]).unwrap();
        assert!(w.unix_only());
        assert!(w.matches(&id(0, None)), "host root");
        assert!(!w.matches(&id(0, Some(("c1", "img", &[])))), "root in a container");
        // Neither host nor a container: another runtime's, or root in a pid
        // namespace of its own.
        assert!(!w.matches(&Identity { host_user: false, ..id(0, None) }));
        let g = Workload::new("g", &["unix:gid:50".into(), "unix:uid:7".into()]).unwrap();
        assert!(g.matches(&Identity { gid: 50, ..id(7, None) }));
        assert_eq!(decide(&Identity { gid: 50, ..id(7, Some(("c", "i", &[]))) }, &g), Decision::WrongWorkload);
        // Mixed with a container selector: that container, as that uid.
        let m = Workload::new("m", &["unix:uid:0".into(), "docker:label:app=web".into()]).unwrap();
        assert!(!m.unix_only());
        assert!(m.matches(&id(0, Some(("c1", "img", &[("app", "web")])))));
        assert!(!m.matches(&id(5, Some(("c1", "img", &[("app", "web")])))));
        assert!(!m.matches(&id(0, None)));
    }

    #[test]
    fn grants_name_files() {
        let g = Grant::new("db/password", "web", None, None, None, None).unwrap();
        assert_eq!(g.file_for("db/password").as_deref(), Some("password"));
        assert_eq!(g.file_for("db/password2"), None);
        let p = Grant::new("db/*", "web", None, Some(0o440), Some(1000), None).unwrap();
        assert_eq!(p.file_for("db/user").as_deref(), Some("user"));
        assert_eq!(p.file_for("db/replica/pw").as_deref(), Some("replica_pw"));
        assert_eq!(p.file_for("db"), None);
        assert_eq!(p.file_for("dbx/a"), None);
        let f = Grant::new("db/password", "web", Some("DB_PASSWORD".into()), None, None, None).unwrap();
        assert_eq!(f.file_for("db/password").as_deref(), Some("DB_PASSWORD"));
        assert_eq!(
            Grant::new("db/*", "w", Some("x".into()), None, None, None),
            Err(PolicyError::FileWithPrefix("db/*".into()))
        );
        assert_eq!(Grant::new("a", "w", None, Some(0o600), None, None), Err(PolicyError::BadMode(0o600)));
        assert!(Grant::new("a", "w", Some("..".into()), None, None, None).is_err());
        assert!(Grant::new("../a", "w", None, None, None, None).is_err());
    }

    #[test]
    fn notify_signals() {
        assert_eq!(parse_signal("hup").unwrap(), "SIGHUP");
        assert_eq!(parse_signal("SIGUSR1").unwrap(), "SIGUSR1");
        assert!(parse_signal("KILL").is_err(), "a rotation must not kill");
        assert!(parse_signal("").is_err());
        let g = Grant::new("a", "w", None, None, None, None).unwrap().with_notify(Some("usr2")).unwrap();
        assert_eq!(g.notify.as_deref(), Some("SIGUSR2"));
    }

    #[test]
    fn a_second_exact_grant_of_the_same_file_name_is_refused() {
        let g = |t: &str, w: &str, f: Option<&str>| Grant::new(t, w, f.map(str::to_owned), None, None, None).unwrap();
        let have = [g("r/pw", "w", None), g("db/*", "w", None)];
        let e = check_file_clash(&have, &g("d/pw", "w", None)).unwrap_err();
        assert_eq!(e.to_string(), "workload w already shows r/pw as file pw; pass --file NAME");
        assert!(check_file_clash(&have, &g("x/y", "w", Some("pw"))).is_err(), "--file names count");
        assert!(check_file_clash(&have, &g("d/pw", "w", Some("d_pw"))).is_ok());
        assert!(check_file_clash(&have, &g("r/pw", "w", None)).is_ok(), "the same grant again");
        assert!(check_file_clash(&have, &g("d/pw", "v", None)).is_ok(), "another workload");
        assert!(
            check_file_clash(&have, &g("a/x", "w", None)).is_ok(),
            "a prefix's names (db/x as x) keep their precedence"
        );
        assert!(check_file_clash(&have, &g("e/*", "w", None)).is_ok());
    }

    #[test]
    fn clashing_file_names_resolve_deterministically() {
        let exact = Grant::new("web/password", "w", None, None, None, None).unwrap();
        let prefix = Grant::new("db/*", "w", None, None, Some(7), None).unwrap();
        let secrets: Vec<String> = ["db/password", "db/user", "web/password"].map(String::from).to_vec();
        let (files, clashes) = files_for([&prefix, &exact], &secrets);
        let names: Vec<(&str, &str)> = files.iter().map(|f| (f.name.as_str(), f.secret.as_str())).collect();
        assert_eq!(names, [("password", "web/password"), ("user", "db/user")]);
        assert_eq!(clashes, ["password: web/password hides db/password"]);
        let (again, _) = files_for([&exact, &prefix], &secrets);
        assert_eq!(files, again, "order of grants does not matter");
        assert_eq!((files[0].uid, files[1].uid), (None, Some(7)));
    }

    fn in_runtime(runtime: Runtime, image: &str, labels: &[(&str, &str)]) -> Identity {
        let mut i = id(0, Some(("web", image, labels)));
        if let Some(d) = i.docker.as_mut() {
            std::sync::Arc::make_mut(d).runtime = runtime;
        }
        i
    }

    #[test]
    fn container_selectors_match_any_runtime_and_docker_ones_only_docker() {
        for s in ["container:id:abababababab", "container:name:web", "container:image:busybox:1", "container:label:a=b"]
        {
            assert_eq!(Selector::parse(s).unwrap().to_string(), s);
        }
        for bad in
            ["container:uid:0", "container:id:xyz", "container:label:novalue", "container:name:", "podman:name:x"]
        {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
        let podman = in_runtime(Runtime::Podman, "localhost/busybox:1", &[("app", "web")]);
        let docker = in_runtime(Runtime::Docker, "busybox:1", &[("app", "web")]);
        let w = |s: &str| Workload::new("w", &[s.to_owned()]).unwrap();
        for s in
            ["container:label:app=web", "container:name:web", "container:id:abababababab", "container:image:busybox:1"]
        {
            assert!(w(s).matches(&podman), "{s} on podman");
            assert!(w(s).matches(&docker), "{s} on docker");
        }
        for s in ["docker:label:app=web", "docker:name:web", "docker:id:abababababab", "docker:image:busybox:1"] {
            assert!(!w(s).matches(&podman), "{s} must not match a Podman container");
            assert!(w(s).matches(&docker), "{s} on docker");
        }
        assert!(!w("container:label:app=web").matches(&id(0, None)), "a host process is in no container");
        assert_eq!(
            container_selectors(Some("ab"), podman.docker.as_deref()),
            ["container:id:ab", "container:name:web", "container:image:localhost/busybox:1", "container:label:app=web"]
        );
        assert_eq!(container_selectors(Some("ab"), docker.docker.as_deref()).len(), 8);
        assert!(container_selectors(None, docker.docker.as_deref()).is_empty());
    }

    #[test]
    fn an_image_matches_as_typed_and_as_resolved() {
        for (want, have) in [
            ("busybox:1", "busybox:1"),
            ("busybox:1", "localhost/busybox:1"),
            ("busybox:1", "docker.io/library/busybox:1"),
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:latest", "busybox"),
            ("org/app:2", "docker.io/org/app:2"),
            ("org/app:2", "localhost/org/app:2"),
            ("localhost/busybox:1", "localhost/busybox:1"),
            ("registry.example:5000/app:1", "registry.example:5000/app:1"),
            ("busybox@sha256:ab", "docker.io/library/busybox@sha256:ab"),
        ] {
            assert!(image_matches(want, have), "{want} ~ {have}");
        }
        for (want, have) in [
            ("busybox:1", "busybox:2"),
            ("busybox:1", "evil.example/busybox:1"),
            ("busybox:1", "quay.io/busybox:1"),
            ("localhost/busybox:1", "docker.io/library/busybox:1"),
            ("docker.io/library/busybox:1", "localhost/busybox:1"),
            ("busybox", "busybox:1"),
            ("box:1", "localhost/busybox:1"),
            ("org/app:2", "docker.io/library/org/app:2"),
        ] {
            assert!(!image_matches(want, have), "{want} must not match {have}");
        }
    }
}
