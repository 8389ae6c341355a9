//! The command line: clap definitions and dispatch. One file per command
//! group; each command is a plain function of its arguments and a client.

mod client;
mod doctor;
mod inspect;
mod lease;
mod policy;
mod roles;
mod secret;
mod template;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Overrides};

pub use client::Failure;

const EXIT_CODES: &str = "\
Exit status:
  0  success
  1  error (the message says which)
  2  bad usage or invalid argument (bad path, oversized value, missing flag)
  3  not found (no such secret or version)
  4  permission denied: the caller is not an admin, or could not be attested
  5  unavailable: the broker (not running, socket unreachable), a backend,
     or too many calls from this caller ([limits])
  6  integrity failure: a tampered store record or audit log
  7  conflict: it changed meanwhile (--if-version, check-and-set), or exists already
 10  `keyhole diff` only: the broker differs from the file (not an error)";

#[derive(Debug, Parser)]
#[command(
    name = "keyhole",
    version,
    about = "A secrets broker for container hosts: secrets as files, checked per open against the calling container",
    after_help = EXIT_CODES,
)]
pub struct Cli {
    /// The broker's socket [default: /run/keyhole/admin.sock;
    /// for `whoami`: /run/keyhole/workload.sock]
    #[arg(long, global = true, env = "KEYHOLE_SOCKET", help_heading = "Client options", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// A remote broker's admin listener, over mutual TLS; wins over
    /// --socket (needs --cert, --key, --ca)
    #[arg(
        long,
        global = true,
        env = "KEYHOLE_ENDPOINT",
        help_heading = "Client options",
        value_name = "https://HOST:PORT"
    )]
    pub endpoint: Option<String>,

    /// This client's certificate (PEM), for --endpoint
    #[arg(long, global = true, env = "KEYHOLE_CERT", help_heading = "Client options", value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// This client's private key (PEM), for --endpoint
    #[arg(long, global = true, env = "KEYHOLE_KEY", help_heading = "Client options", value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// The CA that issued the broker's certificate (PEM), for --endpoint
    #[arg(long, global = true, env = "KEYHOLE_CA", help_heading = "Client options", value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// Print JSON instead of text (one object, or one per line for `audit`)
    #[arg(long, global = true, help_heading = "Client options")]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker in the foreground (no config file needed)
    #[command(after_help = "\
Examples:
  keyhole serve
  keyhole serve --state-dir /srv/keyhole --run-dir /run/keyhole
  keyhole serve --config /etc/keyhole/keyhole.toml
  keyhole serve --config /etc/keyhole/keyhole.toml --takeover   # upgrade in place
  kill -HUP <broker pid>                                         # the same, by the broker

On first start it creates <state-dir>/master.key (32 random bytes, mode 0400)
and <state-dir>/store.redb. Back the key up: without it the store cannot be
opened. Log level: KEYHOLE_LOG (e.g. KEYHOLE_LOG=debug).")]
    Serve(ServeArgs),

    /// Put, rotate, read, list and remove secrets
    #[command(subcommand)]
    Secret(secret::SecretCmd),

    /// Define, list and remove workloads (who may read a mount)
    #[command(subcommand)]
    Workload(policy::WorkloadCmd),

    /// Show a secret (or every secret under a prefix) in a workload's mount
    #[command(after_help = "\
Examples:
  keyhole grant db/password --to web
  keyhole grant 'db/*' --to web --mode 0440 --gid 1000
  keyhole grant tls/key.pem --to web --file server.key --uid 101
  keyhole grant --template app-config --to web --file config.json --notify HUP
  keyhole grant --template tls-bundle --to web --file bundle.pem --exec 'nginx -s reload'

The file appears at once in <run-dir>/workloads/<workload>/. A grant of the
same secret to the same workload replaces the earlier one.")]
    Grant(policy::GrantArgs),

    /// Put, read, list and remove templates (files rendered from secrets)
    #[command(subcommand)]
    Template(template::TemplateCmd),

    /// Take a grant back; the file disappears from the mount at once
    Revoke {
        /// Secret path or prefix, as granted
        #[arg(required_unless_present = "template")]
        secret: Option<String>,
        /// Revoke the grant of this template instead of a secret
        #[arg(long, value_name = "NAME", conflicts_with = "secret")]
        template: Option<String>,
        /// The workload to take it from
        #[arg(long, value_name = "WORKLOAD")]
        from: String,
    },

    /// List grants, of every workload or one
    Grants {
        /// Only this workload's grants
        #[arg(long, value_name = "WORKLOAD")]
        workload: Option<String>,
    },

    /// List the live mounts and the files each shows
    Mounts,

    /// Add, list and remove roles: admins scoped to secret paths and
    /// workloads (full admins only)
    #[command(subcommand)]
    Role(roles::RoleCmd),

    /// Make the broker's policy (workloads, grants, templates, sources, roles) what a file says
    #[command(after_help = "One transaction and one update of the mounts: every item is checked (and,
for a scoped admin, must be within its roles) before anything changes; an
invalid file changes nothing and names its line. Without --prune nothing
the file does not name is removed; a prune that would revoke live leases
(of a removed dynamic/cert source, grant or workload) also needs
--revoke-leases. Names only: a file never holds a value.

Examples:
  keyhole diff -f policy.toml && keyhole apply -f policy.toml
  keyhole export > policy.toml
  keyhole apply -f policy.toml --prune")]
    Apply(roles::ApplyArgs),

    /// Print what `apply` would change; exit 0 if nothing, 10 if something
    #[command(after_help = "Exit status: 0 when the broker matches the file, 10 when apply would change
something (drift, not an error), and the usual codes (1-7) on errors.
With --prune, what apply --prune would remove is listed too (lines with -).")]
    Diff(roles::ApplyArgs),

    /// Print the current policy as a policy file (names only, never values)
    Export,

    /// Show the broker's state (admin)
    Status,

    /// Check Vault/OpenBao for changes now; returns once the mounts show them (admin)
    #[command(after_help = "\
Examples:
  keyhole refresh                     # every backend
  keyhole refresh prod/db/password    # the backend prod/ lives in
  keyhole refresh --backend prod

For a pipeline that just wrote to Vault: when this returns, every mount of
this host shows what the backend holds. The watcher does the same each
poll_interval; this does not wait for it. Exit 5 if the backend does not
answer (mounts keep serving what they had).")]
    Refresh {
        /// A secret path or prefix: refresh the backend it lives in
        path: Option<String>,
        /// The [[backend]] to refresh, by name
        #[arg(long, value_name = "NAME", conflicts_with = "path")]
        backend: Option<String>,
    },

    /// Show the identity the broker sees for this process
    #[command(after_help = "\
Uses the workload socket unless --socket is given, so it works from inside a
container that has /run/keyhole/workload.sock bound in:
  docker run -v /run/keyhole/workload.sock:/run/keyhole/workload.sock ... keyhole whoami")]
    Whoami,

    /// Print the audit log, follow it, or verify its HMAC chain (admin)
    #[command(after_help = "\
Examples:
  keyhole audit                 every line, oldest first (JSON lines)
  keyhole audit --follow        then keep printing new lines
  keyhole audit --verify        check the chain; exit 6 if it is broken")]
    Audit(inspect::AuditArgs),

    /// Check this host for what the broker needs; exit 1 if anything fails
    #[command(after_help = "\
Checks, one line each: the config, /dev/fuse, the host pid and cgroup
namespaces, a running broker, the run dir as a shared mount, state dir and
key file permissions, Docker and its API version, the volume plugin socket,
and for each [[backend]]: reachability, clock skew and the token's TTL.
Warnings do not fail. With --json: {\"ok\": bool, \"checks\": [{\"check\",
\"status\": \"ok\"|\"warn\"|\"fail\", \"detail\", \"fix\"}]}.

Examples:
  keyhole doctor
  keyhole doctor --config /etc/keyhole/keyhole.toml --json")]
    Doctor(HostArgs),

    /// Print a shell completion script
    #[command(after_help = "\
Examples:
  keyhole completions bash > /etc/bash_completion.d/keyhole
  keyhole completions zsh > \"${fpath[1]}/_keyhole\"
  keyhole completions fish > ~/.config/fish/completions/keyhole.fish")]
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },

    /// Print the man page (roff), or a subcommand's, or write them all
    #[command(after_help = "\
Examples:
  keyhole man > /usr/local/share/man/man1/keyhole.1 && man keyhole
  keyhole man secret put                    the page of `keyhole secret put`
  keyhole man --dir /usr/local/share/man/man1 && man keyhole-secret-put
                                            every page: keyhole.1, keyhole-secret.1,
                                            keyhole-secret-put.1, ... (one per line)")]
    Man(ManArgs),

    /// Define, list and remove dynamic sources: per-container database
    /// logins leased from a backend (admin)
    #[command(subcommand)]
    Dynamic(lease::DynamicCmd),

    /// Define, list and remove certificate sources: a certificate per
    /// container from a backend's PKI engine (admin)
    #[command(subcommand)]
    Cert(lease::CertCmd),

    /// List the live per-container leases (never a credential)
    #[command(after_help = "\
STATE is live, revoking, or revoke pending (a revocation failed: retried with
backoff; keyhole status warns). SOURCE names the template a lease serves, if any.

Examples:
  keyhole leases
  keyhole leases --workload web --json")]
    Leases {
        /// Only this workload's leases
        #[arg(long, value_name = "WORKLOAD")]
        workload: Option<String>,
    },
}

/// `keyhole man`: which page, or where to write them all.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Print this subcommand's page, e.g. `secret put` [default: the
    /// main page, keyhole(1)]
    #[arg(value_name = "SUBCOMMAND", conflicts_with = "dir")]
    pub command: Vec<String>,
    /// Write every page into DIR (made if missing) instead, one file per
    /// command and subcommand, and print the files' paths
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Where the broker's files are: the same flags as `serve`.
#[derive(Debug, Args)]
pub struct HostArgs {
    /// TOML config file (optional; unknown keys are rejected)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the key, store and audit log live [default: /var/lib/keyhole]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where the sockets (and mounts) live [default: /run/keyhole]
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
}

impl HostArgs {
    fn load(self) -> Result<Config, crate::config::ConfigError> {
        Config::load(self.config.as_deref(), Overrides { state_dir: self.state_dir, run_dir: self.run_dir })
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Log lines as text or as JSON objects (one per line)
    #[arg(long, value_enum, env = "KEYHOLE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Log level or filter: error, warn, info, debug, trace, or a
    /// tracing filter such as "info,keyhole=debug"
    #[arg(long, env = "KEYHOLE_LOG", value_name = "FILTER", default_value = "info")]
    pub log_level: String,
    /// Take over from the broker running on the same run dir: its live
    /// mounts, open files and sockets carry on without a failed read
    /// (a restart or an upgrade to this binary). SIGHUP to a broker
    /// starts such a successor itself.
    #[arg(long)]
    pub takeover: bool,
    /// Start even though the audit log does not hold the head the store
    /// sealed (it was cut, lost or replaced while no broker ran): go on
    /// from the log as it is, and audit the gap (`audit_reset`)
    #[arg(long)]
    pub new_audit_log: bool,
}

/// Parse the command line, run it, and turn the outcome into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "keyhole", &mut out);
            print_all(&out)
        }
        Command::Man(args) => man(args),
        Command::Doctor(args) => {
            let config = args.load().map_err(Into::into);
            client::runtime().and_then(|rt| rt.block_on(doctor::run(config, cli.json)))
        }
        command => target(cli.socket, cli.endpoint, cli.cert, cli.key, cli.ca)
            .and_then(|t| client::runtime().and_then(|rt| rt.block_on(dispatch(command, t, cli.json)))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.downcast_ref::<Failure>().map_or(1, |f| f.code);
            eprintln!("keyhole: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// `keyhole man`: the main page, one subcommand's page, or (`--dir`)
/// every page as `keyhole.1`, `keyhole-secret.1`, `keyhole-secret-put.1`...
fn man(args: ManArgs) -> anyhow::Result<()> {
    // No `help` subcommand in the pages: there is no keyhole-help(1).
    let mut cmd = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    // Gives each subcommand its page name (`keyhole-secret-put`) and its
    // synopsis name (`keyhole secret put`).
    cmd.build();
    if let Some(dir) = args.dir {
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // Each command before its subcommands, in the order of --help.
        fn walk(cmd: clap::Command, pages: &mut Vec<clap::Command>) {
            let subs: Vec<_> = cmd.get_subcommands().filter(|c| !c.is_hide_set()).cloned().collect();
            pages.push(cmd);
            subs.into_iter().for_each(|c| walk(c, pages));
        }
        let mut pages = Vec::new();
        walk(cmd, &mut pages);
        for page in pages {
            let man = man_page(page);
            let path = dir.join(man.get_filename());
            let mut out = Vec::new();
            man.render(&mut out)?;
            std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
            print_all(format!("{}\n", path.display()).as_bytes())?;
        }
        return Ok(());
    }
    let mut page = cmd;
    for word in &args.command {
        page = page.find_subcommand(word).filter(|c| !c.is_hide_set()).cloned().ok_or_else(|| {
            client::fail(2, format!("no subcommand `keyhole {}`: see keyhole --help", args.command.join(" ")))
        })?;
    }
    let mut out = Vec::new();
    man_page(page).render(&mut out)?;
    print_all(&out)
}

/// One page, its footer naming keyhole and its version (not the subcommand's).
fn man_page(cmd: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(cmd).source(concat!("keyhole ", env!("CARGO_PKG_VERSION")))
}

/// Write to stdout; a reader that stopped early (`| head`) is no error.
fn print_all(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Where admin calls go: `--endpoint` (with its certificate files), or
/// the socket. `None` socket: the default for the command.
fn target(
    socket: Option<PathBuf>,
    endpoint: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> anyhow::Result<Option<client::Target>> {
    let Some(url) = endpoint else {
        return Ok(socket.map(client::Target::Socket));
    };
    match (cert, key, ca) {
        (Some(cert), Some(key), Some(ca)) => {
            Ok(Some(client::Target::Remote(Box::new(client::Remote { url, cert, key, ca }))))
        }
        _ => Err(client::fail(2, "--endpoint needs --cert, --key and --ca (or KEYHOLE_CERT, KEYHOLE_KEY, KEYHOLE_CA)")),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Our own crates at the level asked for; FUSE's chatter only if asked.
    let filter = if args.log_level.contains('=') || args.log_level.contains(',') {
        args.log_level.clone()
    } else {
        format!("{},fuse_backend_rs=warn", args.log_level)
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| client::fail(2, format!("--log-level {:?}: {e}", args.log_level)))?;
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).init(),
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
    let config = args.host.load()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(crate::broker::serve(config, args.takeover, args.new_audit_log)).map_err(|e| {
        // A tampered store or audit log: exit 6, as `audit --verify` does.
        if e.downcast_ref::<crate::broker::Tampered>().is_some() { client::fail(6, format!("{e:#}")) } else { e }
    })
}

async fn dispatch(command: Command, target: Option<client::Target>, json: bool) -> anyhow::Result<()> {
    if let Command::Whoami = command {
        // The workload socket, which is never served remotely.
        let target = match target {
            None => client::Target::Socket(Config::default_workload_socket()),
            Some(client::Target::Remote(_)) => {
                return Err(client::fail(2, "whoami asks the local workload socket; it is not served over --endpoint"));
            }
            Some(t) => t,
        };
        return inspect::whoami(&target, json).await;
    }
    let admin = target.unwrap_or_else(|| client::Target::Socket(Config::default_admin_socket()));
    let admin_socket = || &admin;
    match command {
        Command::Serve(_) | Command::Doctor(_) | Command::Completions { .. } | Command::Man(_) | Command::Whoami => {
            unreachable!("handled above")
        }
        Command::Secret(cmd) => secret::run(cmd, admin_socket(), json).await,
        Command::Workload(cmd) => policy::workload(cmd, admin_socket(), json).await,
        Command::Grant(args) => policy::grant(args, admin_socket(), json).await,
        Command::Template(cmd) => template::run(cmd, admin_socket(), json).await,
        Command::Revoke { secret, template, from } => {
            let secret = match template {
                Some(t) => format!("{}{t}", crate::secret::TEMPLATE_PREFIX),
                None => secret.unwrap_or_default(),
            };
            policy::revoke(secret, from, admin_socket(), json).await
        }
        Command::Grants { workload } => policy::grants(workload, admin_socket(), json).await,
        Command::Mounts => policy::mounts(admin_socket(), json).await,
        Command::Role(cmd) => roles::role(cmd, admin_socket(), json).await,
        Command::Apply(args) => roles::apply(args, false, admin_socket(), json).await,
        Command::Diff(args) => roles::apply(args, true, admin_socket(), json).await,
        Command::Export => roles::export(admin_socket(), json).await,
        Command::Status => inspect::status(admin_socket(), json).await,
        Command::Refresh { path, backend } => inspect::refresh(path, backend, admin_socket(), json).await,
        Command::Audit(args) => inspect::audit(args, admin_socket(), json).await,
        Command::Dynamic(cmd) => lease::dynamic(cmd, admin_socket(), json).await,
        Command::Cert(cmd) => lease::cert(cmd, admin_socket(), json).await,
        Command::Leases { workload } => lease::leases(workload, admin_socket(), json).await,
    }
}
