//! The command line: clap definitions and dispatch. One file per command
//! group; each command is a plain function of its arguments and a client.

mod client;
mod inspect;
mod policy;
mod secret;

use std::path::PathBuf;
use std::process::ExitCode;

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
  5  unavailable: the broker (not running, socket unreachable), or a backend
  6  integrity failure: a tampered store record or audit log
  7  conflict: it changed meanwhile (--if-version, check-and-set), or exists already";

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
    #[arg(long, global = true, env = "KEYHOLE_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Print JSON instead of text (one object, or one per line for `audit`)
    #[arg(long, global = true)]
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

The file appears at once in <run-dir>/workloads/<workload>/. A grant of the
same secret to the same workload replaces the earlier one.")]
    Grant(policy::GrantArgs),

    /// Take a grant back; the file disappears from the mount at once
    Revoke {
        /// Secret path or prefix, as granted
        secret: String,
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

    /// Show the broker's state (admin)
    Status,

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
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (optional; unknown keys are rejected)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the key, store and audit log live [default: /var/lib/keyhole]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where the sockets (and mounts) live [default: /run/keyhole]
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Take over from the broker running on the same run dir: its live
    /// mounts, open files and sockets carry on without a failed read
    /// (a restart or an upgrade to this binary). SIGHUP to a broker
    /// starts such a successor itself.
    #[arg(long)]
    pub takeover: bool,
}

/// Parse the command line, run it, and turn the outcome into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        command => client::runtime().and_then(|rt| rt.block_on(dispatch(command, cli.socket, cli.json))),
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

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEYHOLE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuse_backend_rs=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let overrides = Overrides { state_dir: args.state_dir, run_dir: args.run_dir };
    let config = Config::load(args.config.as_deref(), overrides)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(crate::broker::serve(config, args.takeover))
}

async fn dispatch(command: Command, socket: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let admin_socket = || socket.clone().unwrap_or_else(Config::default_admin_socket);
    match command {
        Command::Serve(_) => unreachable!("handled in main"),
        Command::Secret(cmd) => secret::run(cmd, &admin_socket(), json).await,
        Command::Workload(cmd) => policy::workload(cmd, &admin_socket(), json).await,
        Command::Grant(args) => policy::grant(args, &admin_socket(), json).await,
        Command::Revoke { secret, from } => policy::revoke(secret, from, &admin_socket(), json).await,
        Command::Grants { workload } => policy::grants(workload, &admin_socket(), json).await,
        Command::Mounts => policy::mounts(&admin_socket(), json).await,
        Command::Status => inspect::status(&admin_socket(), json).await,
        Command::Audit(args) => inspect::audit(args, &admin_socket(), json).await,
        Command::Whoami => {
            let path = socket.clone().unwrap_or_else(Config::default_workload_socket);
            inspect::whoami(&path, json).await
        }
    }
}
