//! `keyhole secret ...`
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use base64::Engine;
use clap::{Args, Subcommand};
use serde::Serialize;

use super::client::{self, Retry, Target, fail, print_json, rpc, time_ms};
use crate::api::pb::{self, put_secret_request::Source};
use crate::config::MAX_VALUE_BYTES_CEILING;

#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Create a secret, or add a new version to it
    #[command(after_help = "\
The value never goes on the command line. Examples:
  printf '%s' \"$DB_PASSWORD\" | keyhole secret put db/password --stdin
  keyhole secret put tls/key.pem --from-file ./key.pem
  keyhole secret put api/token --generate 40

--stdin keeps every byte as given, a trailing newline too (`echo` adds one).")]
    Put(PutArgs),

    /// Add a new version to an existing secret
    #[command(after_help = "\
Examples:
  keyhole secret rotate db/password --generate 32
  keyhole secret rotate tls/key.pem --from-file ./new-key.pem
Fails (exit 3) if the secret does not exist; use `put` to create it.")]
    Rotate(PutArgs),

    /// Print a secret's value (raw bytes) to standard output
    #[command(after_help = "\
Examples:
  keyhole secret get db/password
  keyhole secret get db/password --version 2
  keyhole secret get db/password --json      (value in base64)")]
    Get {
        /// Secret path, e.g. db/password
        path: String,
        /// A kept earlier version (see `secret history`) [default: current]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        version: Option<u64>,
    },

    /// List secrets, optionally under a path prefix
    Ls {
        /// Only secrets at or under this path, e.g. db
        prefix: Option<String>,
    },

    /// List the kept versions of a secret
    History {
        /// Secret path
        path: String,
    },

    /// Remove a secret and all its versions
    Rm {
        /// Secret path
        path: String,
    },
}

#[derive(Debug, Args)]
pub struct PutArgs {
    /// Secret path: segments of [A-Za-z0-9._-] joined by '/', e.g. db/password
    pub path: String,
    #[command(flatten)]
    pub source: ValueSource,
    /// Only if the secret is at version N now (0: only if it does not
    /// exist yet); otherwise nothing is written and the exit status is 7
    #[arg(long, value_name = "N")]
    pub if_version: Option<u64>,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ValueSource {
    /// Read the value from standard input (every byte, as given)
    #[arg(long)]
    pub stdin: bool,
    /// Read the value from a file
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
    /// Have the broker generate N random characters from [A-Za-z0-9]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_VALUE_BYTES_CEILING as i64))]
    pub generate: Option<u32>,
}

#[derive(Serialize)]
struct VersionView<'a> {
    path: &'a str,
    version: u64,
    created: String,
    size: u64,
}

impl<'a> From<&'a pb::SecretVersion> for VersionView<'a> {
    fn from(v: &'a pb::SecretVersion) -> Self {
        VersionView { path: &v.path, version: v.version, created: time_ms(v.created_unix_ms), size: v.size }
    }
}

/// Read at most the hard ceiling plus one byte, so an endless stream
/// fails cleanly instead of exhausting memory.
fn read_capped(r: impl Read, what: &str) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.take(MAX_VALUE_BYTES_CEILING + 1)
        .read_to_end(&mut buf)
        .map_err(|e| fail(1, format!("cannot read {what}: {e}")))?;
    if buf.len() as u64 > MAX_VALUE_BYTES_CEILING {
        return Err(fail(2, format!("{what} is larger than {MAX_VALUE_BYTES_CEILING} bytes")));
    }
    Ok(buf)
}

fn source(s: ValueSource) -> anyhow::Result<Source> {
    if let Some(n) = s.generate {
        return Ok(Source::GenerateLength(n));
    }
    let value = if let Some(path) = s.from_file {
        let f = std::fs::File::open(&path).map_err(|e| fail(1, format!("cannot open {}: {e}", path.display())))?;
        read_capped(f, &path.display().to_string())?
    } else {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            eprintln!("keyhole: reading the value from the terminal; end it with Ctrl-D");
        }
        read_capped(stdin.lock(), "standard input")?
    };
    if value.is_empty() {
        return Err(fail(2, "the value is empty"));
    }
    Ok(Source::Value(value))
}

pub async fn run(cmd: SecretCmd, socket: &Target, json: bool) -> anyhow::Result<()> {
    match cmd {
        SecretCmd::Put(args) => put(args, pb::PutMode::Put, socket, json).await,
        SecretCmd::Rotate(args) => put(args, pb::PutMode::Rotate, socket, json).await,
        SecretCmd::Get { path, version } => get(path, version.unwrap_or(0), socket, json).await,
        SecretCmd::Ls { prefix } => ls(prefix.unwrap_or_default(), socket, json).await,
        SecretCmd::History { path } => history(path, socket, json).await,
        SecretCmd::Rm { path } => rm(path, socket, json).await,
    }
}

async fn put(args: PutArgs, mode: pb::PutMode, socket: &Target, json: bool) -> anyhow::Result<()> {
    let source = source(args.source)?;
    let req =
        pb::PutSecretRequest { path: args.path, mode: mode as i32, source: Some(source), if_version: args.if_version };
    // Sent once, never cloned: it holds the value.
    let req = std::cell::Cell::new(Some(req));
    let v = client::admin(socket, Retry::ConnectOnly, |mut c| {
        let req = req.take().expect("a ConnectOnly call is made once");
        async move { c.put_secret(req).await }
    })
    .await?;
    if json {
        print_json(&VersionView::from(&v));
    } else {
        println!("{}: version {} ({} bytes)", v.path, v.version, v.size);
    }
    Ok(())
}

async fn get(path: String, version: u64, socket: &Target, json: bool) -> anyhow::Result<()> {
    let req = pb::GetSecretRequest { path, version };
    let r = rpc!(admin, socket, Safe, get_secret, req)?;
    if json {
        #[derive(Serialize)]
        struct View<'a> {
            #[serde(flatten)]
            meta: VersionView<'a>,
            value_base64: String,
        }
        let meta = r.meta.as_ref().ok_or_else(|| fail(1, "the broker sent no metadata"))?;
        let value_base64 = base64::engine::general_purpose::STANDARD.encode(&r.value);
        print_json(&View { meta: meta.into(), value_base64 });
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(&r.value)?;
        out.flush()?;
    }
    Ok(())
}

async fn ls(prefix: String, socket: &Target, json: bool) -> anyhow::Result<()> {
    let req = pb::ListSecretsRequest { prefix };
    let r = rpc!(admin, socket, Safe, list_secrets, req)?;
    if json {
        print_json(&r.secrets.iter().map(VersionView::from).collect::<Vec<_>>());
        return Ok(());
    }
    let rows: Vec<_> = r
        .secrets
        .iter()
        .map(|s| vec![s.version.to_string(), s.size.to_string(), time_ms(s.created_unix_ms), s.path.clone()])
        .collect();
    client::print_table(&["VERSION", "SIZE", "UPDATED", "PATH"], &rows, &[0, 1]);
    Ok(())
}

async fn history(path: String, socket: &Target, json: bool) -> anyhow::Result<()> {
    let req = pb::SecretHistoryRequest { path };
    let r = rpc!(admin, socket, Safe, secret_history, req)?;
    if json {
        print_json(&r.versions.iter().map(VersionView::from).collect::<Vec<_>>());
        return Ok(());
    }
    let last = r.versions.len().saturating_sub(1);
    let rows: Vec<_> = r
        .versions
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mark = if i == last { "current" } else { "" };
            vec![v.version.to_string(), v.size.to_string(), time_ms(v.created_unix_ms), mark.into()]
        })
        .collect();
    client::print_table(&["VERSION", "SIZE", "CREATED", ""], &rows, &[0, 1]);
    Ok(())
}

async fn rm(path: String, socket: &Target, json: bool) -> anyhow::Result<()> {
    let req = pb::DeleteSecretRequest { path: path.clone() };
    let r = rpc!(admin, socket, ConnectOnly, delete_secret, req)?;
    if json {
        print_json(&serde_json::json!({ "path": path, "versions_removed": r.versions_removed }));
    } else {
        println!("removed {path} ({} versions)", r.versions_removed);
    }
    Ok(())
}
