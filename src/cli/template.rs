//! `keyhole template ...`: put, get, list and remove templates.
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::client::{Target, fail, print_json, print_table, rpc, time_ms};
use crate::api::pb;

#[derive(Debug, Subcommand)]
pub enum TemplateCmd {
    /// Create a template, or add a new version to it
    #[command(after_help = "\
The template is Jinja2 (minijinja), e.g.:
  {\"user\": {{ secret(\"db/user\") | tojson }}, \"password\": {{ secret(\"db/password\") | tojson }}}
Functions: secret(\"path\"). Filters: tojson, b64encode, b64decode, env, yaml,
indent, and minijinja's builtins. It is checked now: a syntax error, an unknown
function, or a secret that does not exist is refused (exit 2) with its line and
column. The secrets it reads are recorded as its inputs.

Examples:
  keyhole template put app-config --from-file ./config.json.j2
  keyhole template put app-env --stdin < app.env.j2
  keyhole grant --template app-config --to web --file config.json")]
    Put(PutArgs),
    /// Print a template's source
    Get {
        /// Template name
        name: String,
        /// A kept earlier version [default: current]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        version: Option<u64>,
    },
    /// List templates with their version and inputs
    Ls,
    /// Remove a template and its versions (refused while it is granted)
    Rm {
        /// Template name
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct PutArgs {
    /// Template name: 1 to 128 of [A-Za-z0-9._-]
    pub name: String,
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct SourceArgs {
    /// Read the template from standard input
    #[arg(long)]
    pub stdin: bool,
    /// Read the template from a file
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
}

/// The most source read (the broker refuses more anyway).
const MAX_SOURCE: u64 = crate::template::MAX_SOURCE as u64;

fn read_source(s: SourceArgs) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    let what = match &s.from_file {
        Some(p) => {
            let f = std::fs::File::open(p).map_err(|e| fail(1, format!("cannot open {}: {e}", p.display())))?;
            f.take(MAX_SOURCE + 1).read_to_end(&mut buf).map_err(|e| fail(1, format!("cannot read it: {e}")))?;
            p.display().to_string()
        }
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!("keyhole: reading the template from the terminal; end it with Ctrl-D");
            }
            stdin.lock().take(MAX_SOURCE + 1).read_to_end(&mut buf).map_err(|e| fail(1, format!("{e}")))?;
            "standard input".into()
        }
    };
    if buf.len() as u64 > MAX_SOURCE {
        return Err(fail(2, format!("{what} is larger than {MAX_SOURCE} bytes")));
    }
    if buf.is_empty() {
        return Err(fail(2, format!("{what} is empty")));
    }
    String::from_utf8(buf).map_err(|_| fail(2, format!("{what} is not UTF-8 text")))
}

fn view(t: &pb::TemplateVersion) -> serde_json::Value {
    serde_json::json!({
        "name": t.name,
        "version": t.version,
        "created": time_ms(t.created_unix_ms),
        "inputs": t.inputs,
        "size": t.size,
    })
}

pub async fn run(cmd: TemplateCmd, socket: &Target, json: bool) -> anyhow::Result<()> {
    match cmd {
        TemplateCmd::Put(a) => {
            let req = pb::PutTemplateRequest { name: a.name, source: read_source(a.source)? };
            let t = rpc!(admin, socket, ConnectOnly, put_template, req)?;
            if json {
                print_json(&view(&t));
            } else {
                println!("template {}: version {} (reads {})", t.name, t.version, t.inputs.join(", "));
            }
        }
        TemplateCmd::Get { name, version } => {
            let req = pb::GetTemplateRequest { name, version: version.unwrap_or(0) };
            let r = rpc!(admin, socket, Safe, get_template, req)?;
            if json {
                let mut v = r.meta.as_ref().map(view).unwrap_or_default();
                v["source"] = serde_json::Value::String(r.source);
                print_json(&v);
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(r.source.as_bytes())?;
                out.flush()?;
            }
        }
        TemplateCmd::Ls => {
            let r = rpc!(admin, socket, Safe, list_templates, pb::ListTemplatesRequest {})?;
            if json {
                print_json(&r.templates.iter().map(view).collect::<Vec<_>>());
            } else {
                let rows: Vec<_> = r
                    .templates
                    .iter()
                    .map(|t| {
                        vec![t.name.clone(), t.version.to_string(), time_ms(t.created_unix_ms), t.inputs.join(" ")]
                    })
                    .collect();
                print_table(&["TEMPLATE", "VERSION", "CREATED", "INPUTS"], &rows, &[1]);
            }
        }
        TemplateCmd::Rm { name } => {
            let req = pb::DeleteTemplateRequest { name: name.clone() };
            let r = rpc!(admin, socket, ConnectOnly, delete_template, req)?;
            if json {
                print_json(&serde_json::json!({ "name": name, "versions_removed": r.versions_removed }));
            } else {
                println!("template {name} removed ({} versions)", r.versions_removed);
            }
        }
    }
    Ok(())
}
