//! Configuration: an optional TOML file, read in two stages. [`RawConfig`]
//! is exactly what the file may say (unknown keys are errors); [`Config`]
//! is validated, has every default filled in, and is all the broker sees.
//! No secret is ever written inline: keys and passphrases are files.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/keyhole";
pub const DEFAULT_RUN_DIR: &str = "/run/keyhole";
pub const DEFAULT_HISTORY_DEPTH: u32 = 10;
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Where rootful `podman system service` listens by default.
pub const DEFAULT_PODMAN_SOCKET: &str = "/run/podman/podman.sock";
/// Where dockerd looks for legacy plugins' sockets.
pub const PLUGIN_DIR: &str = "/run/docker/plugins";
pub const DEFAULT_MAX_VALUE_BYTES: u64 = 1 << 20;
/// An audit file this large takes about 0.3 s to verify at start.
pub const DEFAULT_AUDIT_MAX_BYTES: u64 = 64 << 20;
/// Hard ceiling for `max_value_bytes`, so a gRPC message stays bounded.
pub const MAX_VALUE_BYTES_CEILING: u64 = 16 << 20;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub state_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub history_depth: Option<u32>,
    pub max_value_bytes: Option<u64>,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub docker: RawDocker,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub alerts: RawAlerts,
    #[serde(default)]
    pub backend: Vec<RawBackend>,
    /// `[[runtime]]`: the container runtimes asked about containers.
    #[serde(default)]
    pub runtime: Vec<RawRuntime>,
}

/// One `[[runtime]]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    /// "docker" or "podman".
    pub kind: String,
    /// Its Engine API socket (Podman: `podman system service`); default
    /// `/var/run/docker.sock` or `/run/podman/podman.sock`.
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Open connections per socket (admin, workload); default 1024.
    pub max_connections: Option<usize>,
    /// Open connections per caller (uid and cgroup); default 128.
    pub max_connections_per_caller: Option<usize>,
    /// gRPC calls a second per caller (container, host uid, or remote
    /// subject), in bursts of as many; default 100.
    pub calls_per_second: Option<u32>,
    /// Live FUSE mounts; a volume mount past it is refused. Default 4096.
    pub max_mounts: Option<usize>,
    /// gRPC calls a second per admin caller; default 5000.
    pub admin_calls_per_second: Option<u32>,
    /// A connection with no call under way this long is closed; default
    /// `"60s"`.
    pub idle_timeout: Option<String>,
}

/// `[limits]`, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_caller: usize,
    pub calls_per_second: u32,
    pub max_mounts: usize,
    pub admin_calls_per_second: u32,
    pub idle_timeout: std::time::Duration,
}

impl Limits {
    fn from_raw(raw: RawLimits) -> Result<Self, ConfigError> {
        let l = Limits {
            max_connections: raw.max_connections.unwrap_or(1024),
            max_connections_per_caller: raw.max_connections_per_caller.unwrap_or(128),
            calls_per_second: raw.calls_per_second.unwrap_or(100),
            max_mounts: raw.max_mounts.unwrap_or(4096),
            admin_calls_per_second: raw.admin_calls_per_second.unwrap_or(5000),
            idle_timeout: duration("[limits] idle_timeout", raw.idle_timeout, "60s")?,
        };
        let bad = |k: &str, v: String| ConfigError::Invalid(format!("[limits] {k} = {v}: it must be at least 1"));
        if l.max_connections == 0 {
            return Err(bad("max_connections", "0".into()));
        }
        if l.max_connections_per_caller == 0 {
            return Err(bad("max_connections_per_caller", "0".into()));
        }
        if l.calls_per_second == 0 {
            return Err(bad("calls_per_second", "0".into()));
        }
        if l.max_mounts == 0 {
            return Err(bad("max_mounts", "0".into()));
        }
        if l.admin_calls_per_second == 0 {
            return Err(bad("admin_calls_per_second", "0".into()));
        }
        if l.idle_timeout < std::time::Duration::from_secs(1) {
            return Err(ConfigError::Invalid("[limits] idle_timeout: it must be at least 1s".into()));
        }
        Ok(l)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// `"127.0.0.1:9477"`, or an absolute unix socket path. Off when unset.
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// A program (absolute path), or a program and its arguments; run
    /// without a shell, with the denial as JSON on stdin.
    pub on_deny: Option<RawCommand>,
    /// At most this many runs a minute (default 6); more denials are
    /// counted and reported to the next run as `suppressed`.
    pub max_per_minute: Option<u32>,
    /// A run still going after this is killed (default "10s").
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawCommand {
    Program(String),
    Argv(Vec<String>),
}

/// Where a listener binds: TCP, or a unix socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl Listen {
    fn parse(key: &str, v: &str) -> Result<Self, ConfigError> {
        if v.starts_with('/') {
            return Ok(Listen::Unix(v.into()));
        }
        v.parse().map(Listen::Tcp).map_err(|_| {
            ConfigError::Invalid(format!(
                "{key} = {v:?}: use an address and port (\"127.0.0.1:9477\") or an absolute socket path"
            ))
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// `[alerts]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertConfig {
    pub argv: Vec<String>,
    pub max_per_minute: u32,
    pub timeout: std::time::Duration,
}

impl AlertConfig {
    fn from_raw(raw: RawAlerts) -> Result<Option<Self>, ConfigError> {
        let Some(cmd) = raw.on_deny else {
            if raw.max_per_minute.is_some() || raw.timeout.is_some() {
                return Err(ConfigError::Invalid("[alerts] sets limits but no on_deny command".into()));
            }
            return Ok(None);
        };
        let argv = match cmd {
            RawCommand::Program(p) => vec![p],
            RawCommand::Argv(a) => a,
        };
        if !argv.first().is_some_and(|p| p.starts_with('/')) {
            return Err(ConfigError::Invalid(
                "[alerts] on_deny: the program must be an absolute path (it is run without a shell or PATH)".into(),
            ));
        }
        let max_per_minute = raw.max_per_minute.unwrap_or(6);
        if !(1..=600).contains(&max_per_minute) {
            return Err(ConfigError::Invalid(format!(
                "[alerts] max_per_minute = {max_per_minute}: it must be 1 to 600"
            )));
        }
        let timeout = duration("[alerts] timeout", raw.timeout, "10s")?;
        Ok(Some(AlertConfig { argv, max_per_minute, timeout }))
    }
}

/// The remote admin listener: gRPC over mutual TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteAdmin {
    pub listen: std::net::SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: PathBuf,
}

/// A certificate subject as a set of `TYPE=value` attributes (type in
/// upper case), so order and spacing do not matter.
pub type Subject = std::collections::BTreeSet<String>;

/// Parse `"CN=alice, O=Example"`. Values may not contain `,`, `=` or `+`.
pub fn parse_subject(s: &str) -> Result<Subject, String> {
    let mut set = Subject::new();
    for part in s.split(',') {
        let (t, v) = part.split_once('=').ok_or_else(|| format!("{s:?}: {part:?} is not TYPE=value"))?;
        let (t, v) = (t.trim(), v.trim());
        if t.is_empty() || v.is_empty() || v.contains(['=', '+']) {
            return Err(format!("{s:?}: {part:?} is not TYPE=value"));
        }
        set.insert(format!("{}={v}", t.to_ascii_uppercase()));
    }
    Ok(set)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// Log every allowed file open (`read`); default true. Denials, admin
    /// calls and backend events are always logged.
    pub reads: Option<bool>,
    /// Start a new file past this size (default 64 MiB; 0: never).
    pub max_bytes: Option<u64>,
    /// Rotated files kept (default 10); older ones are deleted.
    pub keep: Option<u32>,
    /// A rotated file is never deleted before it is this old (default
    /// 7d): more than `keep` are kept instead ("0s": no minimum).
    pub min_keep: Option<String>,
}

/// `[[backend]]`: paths under `<name>/` live in this Vault/OpenBao KV v2 mount.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub name: String,
    pub kind: String,
    /// One node's address, or the list of a cluster's nodes.
    pub address: RawAddresses,
    pub mount: Option<String>,
    pub field: Option<String>,
    pub token_file: Option<PathBuf>,
    pub approle: Option<RawAppRole>,
    pub ca_file: Option<PathBuf>,
    pub poll_interval: Option<String>,
    pub max_stale: Option<String>,
    pub request_timeout: Option<String>,
    /// Keys per page of a detailed-metadata listing; default 1000.
    pub list_page_size: Option<usize>,
    /// "directory" (default; per-secret where the server lacks it) or
    /// "per-secret".
    pub change_detection: Option<String>,
}

/// `address = "https://v:8200"` or `address = ["https://a:8200", ...]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawAddresses {
    One(String),
    Many(Vec<String>),
}

/// Most node addresses one `[[backend]]` may list.
pub const MAX_BACKEND_ADDRESSES: usize = 16;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAppRole {
    pub role_id_file: PathBuf,
    pub secret_id_file: PathBuf,
    /// Where the AppRole auth method is mounted; default "approle".
    pub mount: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VaultAuth {
    TokenFile(PathBuf),
    AppRole { role_id_file: PathBuf, secret_id_file: PathBuf, mount: String },
}

/// A validated Vault/OpenBao backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaultConfig {
    pub name: String,
    /// The first node's address (the one shown before any request).
    pub address: String,
    pub mount: String,
    pub field: String,
    pub auth: VaultAuth,
    pub ca_file: Option<PathBuf>,
    pub poll_interval: std::time::Duration,
    pub max_stale: std::time::Duration,
    pub request_timeout: std::time::Duration,
    /// Keys per page of a detailed-metadata listing (change detection).
    pub list_page_size: usize,
    /// `change_detection = "per-secret"`: never list by directory.
    pub per_secret: bool,
    /// Every node's address (one or more), in the order tried.
    pub addresses: Vec<String>,
}

fn duration(key: &str, value: Option<String>, default: &str) -> Result<std::time::Duration, ConfigError> {
    let v = value.unwrap_or_else(|| default.to_owned());
    humantime::parse_duration(&v)
        .map_err(|e| ConfigError::Invalid(format!("{key} = {v:?}: {e} (e.g. \"30s\", \"24h\")")))
}

impl TryFrom<RawBackend> for VaultConfig {
    type Error = ConfigError;

    fn try_from(b: RawBackend) -> Result<Self, ConfigError> {
        let at = format!("[[backend]] {:?}", b.name);
        let bad = |m: String| ConfigError::Invalid(format!("{at}: {m}"));
        if b.kind != "vault" {
            return Err(bad(format!("kind = {:?}: the only backend kind is \"vault\" (Vault or OpenBao)", b.kind)));
        }
        crate::secret::SecretPath::parse(&b.name)
            .ok()
            .filter(|_| !b.name.contains('/'))
            .ok_or_else(|| bad("name must be one path segment of [A-Za-z0-9._-]".into()))?;
        let addresses = match b.address {
            RawAddresses::One(a) => vec![a],
            RawAddresses::Many(a) => a,
        };
        if addresses.is_empty() || addresses.len() > MAX_BACKEND_ADDRESSES {
            return Err(bad(format!("address: list 1 to {MAX_BACKEND_ADDRESSES} node addresses")));
        }
        let mut seen = std::collections::BTreeSet::new();
        for a in &addresses {
            if !(a.starts_with("http://") || a.starts_with("https://")) {
                return Err(bad(format!("address {a:?} must start with http:// or https://")));
            }
            if a.len() > 2048 || a.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(format!("address {a:?} is not a URL")));
            }
            if !seen.insert(a.trim_end_matches('/')) {
                return Err(bad(format!("address {a:?} is listed twice")));
            }
        }
        let addresses: Vec<String> = addresses.iter().map(|a| a.trim_end_matches('/').to_owned()).collect();
        let auth = match (b.token_file, b.approle) {
            (Some(t), None) => VaultAuth::TokenFile(absolute("token_file", t)?),
            (None, Some(a)) => VaultAuth::AppRole {
                role_id_file: absolute("approle.role_id_file", a.role_id_file)?,
                secret_id_file: absolute("approle.secret_id_file", a.secret_id_file)?,
                mount: a.mount.unwrap_or_else(|| "approle".into()),
            },
            _ => return Err(bad("set exactly one of token_file or approle".into())),
        };
        let poll_interval = duration("poll_interval", b.poll_interval, "30s")?;
        if poll_interval < std::time::Duration::from_millis(100) {
            return Err(bad("poll_interval must be at least 100ms".into()));
        }
        Ok(VaultConfig {
            name: b.name,
            address: addresses[0].clone(),
            mount: b.mount.unwrap_or_else(|| "secret".into()),
            field: b.field.unwrap_or_else(|| "value".into()),
            auth,
            ca_file: b.ca_file.map(|c| absolute("ca_file", c)).transpose()?,
            poll_interval,
            max_stale: duration("max_stale", b.max_stale, "24h")?,
            request_timeout: duration("request_timeout", b.request_timeout, "5s")?,
            list_page_size: match b.list_page_size {
                None => 1000,
                Some(n @ 1..=10_000) => n,
                Some(n) => return Err(bad(format!("list_page_size = {n}: must be 1 to 10000"))),
            },
            per_secret: match b.change_detection.as_deref() {
                None | Some("directory") => false,
                Some("per-secret") => true,
                Some(other) => {
                    return Err(bad(format!("change_detection = {other:?}: \"directory\" or \"per-secret\"")));
                }
            },
            addresses,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDocker {
    /// Docker Engine API socket; default `/var/run/docker.sock`. Docker
    /// attestation is off when it does not exist.
    pub socket: Option<PathBuf>,
    /// Volume plugin name (`docker volume create -d NAME`); the socket is
    /// `/run/docker/plugins/NAME.sock`. Default "keyhole"; "" turns it off.
    pub plugin: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default)]
    pub uids: Vec<u32>,
    #[serde(default)]
    pub gids: Vec<u32>,
    /// Remote admin over mutual TLS: off unless `listen` is set.
    pub listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    /// Subjects of client certificates (issued by `client_ca`) that are
    /// admins, e.g. `"CN=ops-laptop,O=Example"`.
    #[serde(default)]
    pub subjects: Vec<String>,
    /// The group (gid) `admin.sock` belongs to, mode 0660; default the
    /// first of `gids`; with neither, the socket is 0600.
    pub socket_group: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// Master key file; default `<state_dir>/master.key`.
    pub key_file: Option<PathBuf>,
    /// Derive the master key with Argon2id from this file's contents
    /// instead of keeping a key file.
    pub passphrase_file: Option<PathBuf>,
}

/// Who may make admin calls, besides uid 0. Only host processes qualify.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdminPolicy {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    /// The group `admin.sock` belongs to (mode 0660), if any.
    pub socket_group: Option<u32>,
    /// Remote admins, by client certificate subject.
    pub subjects: Vec<Subject>,
}

impl AdminPolicy {
    pub fn allows(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        uid == 0 || self.uids.contains(&uid) || self.gids.contains(&gid) || groups.iter().any(|g| self.gids.contains(g))
    }

    pub fn allows_subject(&self, subject: &Subject) -> bool {
        self.subjects.iter().any(|s| s == subject)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    KeyFile(PathBuf),
    Passphrase(PathBuf),
}

impl KeySource {
    pub fn label(&self) -> &'static str {
        match self {
            KeySource::KeyFile(_) => "key-file",
            KeySource::Passphrase(_) => "passphrase",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub history_depth: u32,
    pub max_value_bytes: u64,
    pub admin: AdminPolicy,
    pub key: KeySource,
    pub docker_socket: PathBuf,
    /// The runtimes asked about containers, in order (`[[runtime]]`;
    /// Docker on `docker_socket` when none is configured).
    pub runtimes: Vec<RuntimeConfig>,
    /// The volume plugin's socket, if enabled.
    pub plugin_socket: Option<PathBuf>,
    /// Whether allowed file opens are audited (`[audit] reads`).
    pub audit_reads: bool,
    /// `[audit] max_bytes` and `keep`; None: never rotate.
    pub audit_rotation: Option<crate::audit::Rotation>,
    pub limits: Limits,
    pub metrics: Option<Listen>,
    pub alerts: Option<AlertConfig>,
    pub remote_admin: Option<RemoteAdmin>,
    pub backends: Vec<VaultConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Command-line values that take precedence over the file.
#[derive(Debug, Default)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
}

impl Config {
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let raw = match file {
            None => RawConfig::default(),
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.into(),
                    message: e.message().to_owned()
                        + &e.span().map(|s| format!(" (at byte {})", s.start)).unwrap_or_default(),
                })?
            }
        };
        Self::from_raw(raw, overrides)
    }

    pub fn from_raw(raw: RawConfig, o: Overrides) -> Result<Self, ConfigError> {
        let state_dir = absolute("state_dir", o.state_dir.or(raw.state_dir).unwrap_or(DEFAULT_STATE_DIR.into()))?;
        let run_dir = absolute("run_dir", o.run_dir.or(raw.run_dir).unwrap_or(DEFAULT_RUN_DIR.into()))?;
        let history_depth = raw.history_depth.unwrap_or(DEFAULT_HISTORY_DEPTH);
        if !(1..=1000).contains(&history_depth) {
            return Err(ConfigError::Invalid(format!("history_depth = {history_depth}: it must be 1 to 1000")));
        }
        let max_value_bytes = raw.max_value_bytes.unwrap_or(DEFAULT_MAX_VALUE_BYTES);
        if !(1..=MAX_VALUE_BYTES_CEILING).contains(&max_value_bytes) {
            return Err(ConfigError::Invalid(format!(
                "max_value_bytes = {max_value_bytes}: it must be 1 to {MAX_VALUE_BYTES_CEILING}"
            )));
        }
        let key = match (raw.store.key_file, raw.store.passphrase_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid("[store] sets both key_file and passphrase_file: choose one".into()));
            }
            (None, Some(p)) => KeySource::Passphrase(absolute("store.passphrase_file", p)?),
            (Some(k), None) => KeySource::KeyFile(absolute("store.key_file", k)?),
            (None, None) => KeySource::KeyFile(state_dir.join("master.key")),
        };
        let a = raw.admin;
        let subjects = a.subjects.iter().map(|s| parse_subject(s)).collect::<Result<Vec<_>, _>>();
        let subjects = subjects.map_err(|e| ConfigError::Invalid(format!("[admin] subjects: {e}")))?;
        let remote_admin = match (a.listen, a.tls_cert, a.tls_key, a.client_ca) {
            (None, None, None, None) if subjects.is_empty() => None,
            (Some(listen), Some(cert), Some(key), Some(ca)) => Some(RemoteAdmin {
                listen: listen.parse().map_err(|_| {
                    ConfigError::Invalid(format!(
                        "[admin] listen = {listen:?}: use an address and port, e.g. \"0.0.0.0:9478\""
                    ))
                })?,
                tls_cert: absolute("[admin] tls_cert", cert)?,
                tls_key: absolute("[admin] tls_key", key)?,
                client_ca: absolute("[admin] client_ca", ca)?,
            }),
            _ => {
                return Err(ConfigError::Invalid(
                    "[admin]: remote admin needs all of listen, tls_cert, tls_key and client_ca (and subjects)".into(),
                ));
            }
        };
        if remote_admin.is_some() && subjects.is_empty() {
            return Err(ConfigError::Invalid("[admin] listen is set but no subjects: nobody could use it".into()));
        }
        let socket_group = a.socket_group.or_else(|| a.gids.first().copied());
        let admin = AdminPolicy { uids: a.uids, gids: a.gids, socket_group, subjects };
        let min_keep = duration("[audit] min_keep", raw.audit.min_keep, "7d")?;
        let audit_rotation =
            match (raw.audit.max_bytes.unwrap_or(DEFAULT_AUDIT_MAX_BYTES), raw.audit.keep.unwrap_or(10)) {
                (0, _) => None,
                (max_bytes, _) if max_bytes < 4096 => {
                    return Err(ConfigError::Invalid(format!(
                        "[audit] max_bytes = {max_bytes}: use 0 (never rotate) or at least 4096"
                    )));
                }
                (_, 0) => return Err(ConfigError::Invalid("[audit] keep = 0: keep at least 1 rotated file".into())),
                (max_bytes, keep) => Some(crate::audit::Rotation { max_bytes, keep, min_keep }),
            };
        let limits = Limits::from_raw(raw.limits)?;
        let metrics = raw.metrics.listen.map(|l| Listen::parse("[metrics] listen", &l)).transpose()?;
        let alerts = AlertConfig::from_raw(raw.alerts)?;
        let runtimes = RuntimeConfig::from_raw(raw.runtime, raw.docker.socket.is_some())?;
        let docker_socket = absolute("docker.socket", raw.docker.socket.unwrap_or(DEFAULT_DOCKER_SOCKET.into()))?;
        let docker_socket = runtimes
            .iter()
            .find(|r| r.kind == crate::policy::Runtime::Docker)
            .map_or(docker_socket, |r| r.socket.clone());
        let runtimes = if runtimes.is_empty() {
            vec![RuntimeConfig { kind: crate::policy::Runtime::Docker, socket: docker_socket.clone(), explicit: false }]
        } else {
            runtimes
        };
        let plugin = raw.docker.plugin.unwrap_or_else(|| "keyhole".into());
        let plugin_socket = match plugin.as_str() {
            "" => None,
            p if crate::policy::check_workload_name(p).is_ok() => Some(Path::new(PLUGIN_DIR).join(format!("{p}.sock"))),
            p => return Err(ConfigError::Invalid(format!("docker.plugin = {p:?}: use [A-Za-z0-9._-]"))),
        };
        let backends = raw.backend.into_iter().map(VaultConfig::try_from).collect::<Result<Vec<_>, _>>()?;
        for (i, b) in backends.iter().enumerate() {
            if backends[..i].iter().any(|o| o.name == b.name) {
                return Err(ConfigError::Invalid(format!("two [[backend]] tables are named {:?}", b.name)));
            }
        }
        Ok(Config {
            state_dir,
            run_dir,
            history_depth,
            max_value_bytes,
            admin,
            key,
            docker_socket,
            runtimes,
            plugin_socket,
            audit_reads: raw.audit.reads.unwrap_or(true),
            audit_rotation,
            limits,
            metrics,
            alerts,
            remote_admin,
            backends,
        })
    }

    pub fn default_admin_socket() -> PathBuf {
        Path::new(DEFAULT_RUN_DIR).join("admin.sock")
    }

    pub fn default_workload_socket() -> PathBuf {
        Path::new(DEFAULT_RUN_DIR).join("workload.sock")
    }

    pub fn store_file(&self) -> PathBuf {
        self.state_dir.join("store.redb")
    }

    pub fn audit_file(&self) -> PathBuf {
        self.state_dir.join("audit.log")
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.run_dir.join("admin.sock")
    }

    pub fn workload_socket(&self) -> PathBuf {
        self.run_dir.join("workload.sock")
    }
}

/// One container runtime keyhole asks about containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeConfig {
    pub kind: crate::policy::Runtime,
    /// Its API socket: only ever this path, never one derived from a
    /// caller's cgroup or uid.
    pub socket: PathBuf,
    /// Named by a `[[runtime]]` table (used even while its socket is
    /// missing); false for the implicit Docker default (used only if its
    /// socket exists at start, as before `[[runtime]]`).
    pub explicit: bool,
}

impl RuntimeConfig {
    fn from_raw(raw: Vec<RawRuntime>, docker_section_socket: bool) -> Result<Vec<RuntimeConfig>, ConfigError> {
        if !raw.is_empty() && docker_section_socket {
            return Err(ConfigError::Invalid(
                "[docker] socket and [[runtime]] both name a socket: give Docker's as [[runtime]] kind = \"docker\""
                    .into(),
            ));
        }
        let mut out: Vec<RuntimeConfig> = Vec::with_capacity(raw.len());
        for r in raw {
            let kind = crate::policy::Runtime::parse(&r.kind).ok_or_else(|| {
                ConfigError::Invalid(format!("[[runtime]] kind = {:?}: use \"docker\" or \"podman\"", r.kind))
            })?;
            let default = match kind {
                crate::policy::Runtime::Docker => DEFAULT_DOCKER_SOCKET,
                crate::policy::Runtime::Podman => DEFAULT_PODMAN_SOCKET,
            };
            let socket = absolute("[[runtime]] socket", r.socket.unwrap_or_else(|| default.into()))?;
            if out.iter().any(|o| o.socket == socket) {
                return Err(ConfigError::Invalid(format!(
                    "two [[runtime]] tables name the socket {}",
                    socket.display()
                )));
            }
            out.push(RuntimeConfig { kind, socket, explicit: true });
        }
        Ok(out)
    }
}

fn absolute(key: &str, p: PathBuf) -> Result<PathBuf, ConfigError> {
    if p.as_os_str().is_empty() {
        return Err(ConfigError::Invalid(format!("{key} is empty")));
    }
    std::path::absolute(&p).map_err(|e| ConfigError::Invalid(format!("{key} {}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(s).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Config::from_raw(raw, Overrides::default())
    }

    #[test]
    fn the_example_config_is_valid_and_says_the_defaults() {
        let c = parse(include_str!("../examples/keyhole.toml")).unwrap();
        let d = parse("").unwrap();
        assert_eq!((c.state_dir, c.run_dir, c.history_depth), (d.state_dir, d.run_dir, d.history_depth));
        assert_eq!((c.max_value_bytes, c.audit_reads), (d.max_value_bytes, d.audit_reads));
        assert!(d.audit_reads);
        assert!(!parse("[audit]\nreads = false").unwrap().audit_reads);
        assert_eq!(c.audit_rotation, d.audit_rotation);
        let week = std::time::Duration::from_secs(7 * 86400);
        assert_eq!(d.audit_rotation, Some(crate::audit::Rotation { max_bytes: 64 << 20, keep: 10, min_keep: week }));
        let r = parse("[audit]\nmin_keep = \"0s\"").unwrap().audit_rotation.unwrap();
        assert_eq!(r.min_keep, std::time::Duration::ZERO);
        assert!(parse("[audit]\nmin_keep = \"soon\"").is_err());
        assert_eq!(parse("[audit]\nmax_bytes = 0").unwrap().audit_rotation, None);
        assert!(parse("[audit]\nmax_bytes = 100").is_err());
        assert!(parse("[audit]\nkeep = 0").is_err());
        assert_eq!(c.limits, d.limits);
        assert_eq!(
            (d.limits.max_connections, d.limits.max_connections_per_caller, d.limits.calls_per_second),
            (1024, 128, 100)
        );
        assert!(parse("[limits]\ncalls_per_second = 0").is_err());
        assert!(parse("[audit]\nread = false").is_err(), "unknown keys are errors");
    }

    #[test]
    fn empty_config_gives_the_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(c.run_dir, Path::new(DEFAULT_RUN_DIR));
        assert_eq!(c.history_depth, 10);
        assert_eq!(c.max_value_bytes, 1 << 20);
        assert_eq!(c.key, KeySource::KeyFile("/var/lib/keyhole/master.key".into()));
        assert_eq!(c.admin_socket(), Path::new("/run/keyhole/admin.sock"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(parse("state_dri = \"/x\"").unwrap_err().to_string().contains("unknown field"));
        assert!(parse("[admin]\nuid = [1]").unwrap_err().to_string().contains("unknown field"));
        assert!(parse("history_depth = 0").is_err());
        assert!(parse("max_value_bytes = 99999999999").is_err());
        assert!(parse("[store]\nkey_file = \"/a\"\npassphrase_file = \"/b\"").is_err());
    }

    #[test]
    fn vault_backends_validate() {
        let ok = "[[backend]]\nname = \"prod\"\nkind = \"vault\"\naddress = \"https://v:8200/\"\ntoken_file = \"/t\"\n";
        let c = parse(ok).unwrap();
        let b = &c.backends[0];
        assert_eq!((b.address.as_str(), b.mount.as_str(), b.field.as_str()), ("https://v:8200", "secret", "value"));
        assert_eq!(b.poll_interval, std::time::Duration::from_secs(30));
        assert_eq!(b.max_stale, std::time::Duration::from_secs(24 * 3600));
        let approle = ok.replace("token_file = \"/t\"", "approle = { role_id_file = \"/r\", secret_id_file = \"/s\" }");
        assert!(matches!(parse(&approle).unwrap().backends[0].auth, VaultAuth::AppRole { .. }));
        for (edit, want) in [
            (ok.replace("\"vault\"", "\"consul\""), "only backend kind"),
            (ok.replace("\"prod\"", "\"a/b\""), "one path segment"),
            (ok.replace("https://v:8200/", "v:8200"), "must start with http"),
            (ok.replace("token_file = \"/t\"\n", ""), "exactly one of token_file or approle"),
            (ok.to_owned() + "poll_interval = \"soon\"\n", "poll_interval"),
            (ok.to_owned() + ok, "two [[backend]] tables"),
            (ok.replace("kind", "knd"), "unknown field"),
        ] {
            let e = parse(&edit).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_backend_may_list_a_clusters_nodes() {
        let one =
            "[[backend]]\nname = \"prod\"\nkind = \"vault\"\naddress = \"https://v:8200/\"\ntoken_file = \"/t\"\n";
        assert_eq!(parse(one).unwrap().backends[0].addresses, ["https://v:8200"]);
        let many = one.replace("\"https://v:8200/\"", "[\"http://a:8200\", \"http://b:8200/\", \"http://c:8200\"]");
        let b = &parse(&many).unwrap().backends[0];
        assert_eq!(b.addresses, ["http://a:8200", "http://b:8200", "http://c:8200"]);
        assert_eq!(b.address, "http://a:8200");
        for (edit, want) in [
            (one.replace("\"https://v:8200/\"", "[]"), "list 1 to 16"),
            (one.replace("\"https://v:8200/\"", "[\"http://a\", \"a:1\"]"), "must start with http"),
            (one.replace("\"https://v:8200/\"", "[\"http://a\", \"http://a/\"]"), "listed twice"),
            (one.replace("\"https://v:8200/\"", "[\"http://a b\"]"), "is not a URL"),
            (one.replace("\"https://v:8200/\"", &format!("{:?}", vec!["http://x"; 17])), "list 1 to 16"),
        ] {
            let e = parse(&edit).unwrap_err().to_string();
            assert!(e.contains(want), "{edit}: {e}");
        }
    }

    #[test]
    fn overrides_win_and_admin_lists_apply() {
        let raw: RawConfig = toml::from_str("state_dir = \"/a\"\n[admin]\nuids = [1000]\ngids = [50]").unwrap();
        let c = Config::from_raw(raw, Overrides { state_dir: Some("/b".into()), run_dir: None }).unwrap();
        assert_eq!(c.state_dir, Path::new("/b"));
        assert!(c.admin.allows(0, 0, &[]));
        assert!(c.admin.allows(1000, 1000, &[]));
        assert!(c.admin.allows(7, 50, &[]));
        assert!(c.admin.allows(7, 7, &[50]));
        assert!(!c.admin.allows(7, 7, &[8]));
    }

    #[test]
    fn runtimes_are_configured_or_docker_by_default() {
        use crate::policy::Runtime;
        let d = parse("").unwrap();
        assert_eq!(
            d.runtimes,
            [RuntimeConfig { kind: Runtime::Docker, socket: DEFAULT_DOCKER_SOCKET.into(), explicit: false }]
        );
        let old = parse("[docker]\nsocket = \"/tmp/d.sock\"").unwrap();
        assert_eq!(
            (old.runtimes[0].socket.to_str(), old.docker_socket.to_str()),
            (Some("/tmp/d.sock"), Some("/tmp/d.sock"))
        );
        let both = parse(
            "[[runtime]]\nkind = \"podman\"\n[[runtime]]\nkind = \"docker\"\nsocket = \"/tmp/d.sock\"\n\
             [[runtime]]\nkind = \"podman\"\nsocket = \"/tmp/p2.sock\"",
        )
        .unwrap();
        let got: Vec<(Runtime, &str)> = both.runtimes.iter().map(|r| (r.kind, r.socket.to_str().unwrap())).collect();
        assert_eq!(
            got,
            [
                (Runtime::Podman, DEFAULT_PODMAN_SOCKET),
                (Runtime::Docker, "/tmp/d.sock"),
                (Runtime::Podman, "/tmp/p2.sock")
            ]
        );
        assert_eq!(both.docker_socket.to_str(), Some("/tmp/d.sock"), "doctor asks the configured Docker");
        assert!(both.runtimes.iter().all(|r| r.explicit));
        let podman = parse("[[runtime]]\nkind = \"podman\"").unwrap();
        assert_eq!(podman.runtimes.len(), 1, "no Docker unless named");
        for bad in [
            "[[runtime]]\nkind = \"rkt\"",
            "[[runtime]]\nsocket = \"/x\"",
            "[[runtime]]\nkind = \"docker\"\nsocket = \"\"",
            "[[runtime]]\nkind = \"docker\"\nfoo = 1",
            "[[runtime]]\nkind = \"docker\"\n[[runtime]]\nkind = \"docker\"",
            "[docker]\nsocket = \"/d\"\n[[runtime]]\nkind = \"podman\"",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
