//! `keyhole role ...` (scoped admins), and policy as a file: `apply`,
//! `diff`, `export`.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use super::client::{Target, fail, print_json, print_table, rpc};
use crate::api::pb;

/// `keyhole diff`'s exit status when the broker differs from the file:
/// distinct from every error's (1-7), so CI tells drift from failure.
pub const EXIT_DRIFT: u8 = 10;

#[derive(Debug, Subcommand)]
pub enum RoleCmd {
    /// Add (or replace) a role: principals who may act as admins within
    /// secret path and workload patterns, with these verbs
    #[command(after_help = "\
Principals:
  uid:N  gid:N           a host process with this uid / primary or supplementary gid
  subject:CN=...,O=...   a remote admin's client certificate subject (every attribute)

Verbs (comma-separated or repeated):
  read      get, history, ls (ls shows only the role's paths)
  write     put, rotate, rm
  grant     grant, revoke: a secret in the role's paths to a workload in its patterns
  workload  workload add, rm within its patterns (selectors: docker:label:K=V with V
            in its workload patterns, or the admin's own unix:uid / unix:gid)
  audit     audit log, audit --verify
  apply     keyhole apply / diff (every item checked as above)
  template  template put, get, ls, rm: every input in the role's paths; with grant,
            grant --template to a workload in its patterns (each input as a grant)
  dynamic   dynamic add, ls, rm: BACKEND/PATH in the role's paths (--backend prod
            --path database/creds/a-web needs prod/database/creds/a-web); with grant,
            grant dynamic:NAME to a workload in its patterns
  cert      the same for cert add (BACKEND/ISSUE-PATH); --uri must end in /{workload}
            and --cn be {workload} or {workload}.DOMAIN
  leases    keyhole leases (the role's workloads only)
  refresh   keyhole refresh (a named path must be in the role's paths)

Examples:
  keyhole role add team-a --principal uid:1001 --principal 'subject:CN=alice,O=Example' \\
      --paths 'team-a/*' --workloads 'a-*' --verbs read,write,grant,workload,apply

Root and [admin] uids, gids and subjects stay full admins; only they manage roles.")]
    Add {
        /// Role name: [A-Za-z0-9._-], up to 64 characters
        name: String,
        /// Who holds the role (repeat for more)
        #[arg(long = "principal", value_name = "uid:N|gid:N|subject:DN", required = true)]
        principals: Vec<String>,
        /// Secret path patterns: 'team-a/*' or an exact path (repeat for more)
        #[arg(long = "paths", value_name = "PATTERN")]
        paths: Vec<String>,
        /// Workload name patterns, '*' matching anything: 'a-*' (repeat for more)
        #[arg(long = "workloads", value_name = "PATTERN")]
        workloads: Vec<String>,
        /// What the role may do: read,write,grant,workload,audit,apply,...
        #[arg(long = "verbs", value_name = "VERB,...", required = true)]
        verbs: Vec<String>,
    },
    /// List roles
    Ls,
    /// Remove a role; its principals are no admins from their next call
    Rm {
        /// The role to remove
        name: String,
    },
}

/// `keyhole apply` and `keyhole diff`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The policy file (TOML; `-` for stdin)
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// Also remove what the file does not name: workloads, grants,
    /// templates, sources, roles (within the caller's scope)
    #[arg(long)]
    pub prune: bool,
    /// Allow a prune that revokes live leases (a removed dynamic or cert
    /// source, a grant of one, or a workload holding them); without it
    /// such an apply changes nothing and says so
    #[arg(long)]
    pub revoke_leases: bool,
}

fn role_json(r: &pb::RoleSpec) -> serde_json::Value {
    serde_json::json!({
        "name": r.name,
        "principals": r.principals,
        "paths": r.paths,
        "workloads": r.workloads,
        "verbs": r.verbs,
    })
}

pub async fn role(cmd: RoleCmd, socket: &Target, json: bool) -> anyhow::Result<()> {
    match cmd {
        RoleCmd::Add { name, principals, paths, workloads, verbs } => {
            let spec = pb::RoleSpec { name, principals, paths, workloads, verbs };
            let r = rpc!(admin, socket, ConnectOnly, add_role, spec)?;
            if json {
                print_json(&role_json(&r));
            } else {
                println!("role {} added: {} for {}", r.name, r.verbs.join(","), r.principals.join(" "));
            }
        }
        RoleCmd::Ls => {
            let r = rpc!(admin, socket, Safe, list_roles, pb::ListRolesRequest {})?;
            if json {
                print_json(&r.roles.iter().map(role_json).collect::<Vec<_>>());
                return Ok(());
            }
            let rows: Vec<_> = r
                .roles
                .iter()
                .map(|r| {
                    vec![
                        r.name.clone(),
                        r.verbs.join(","),
                        r.principals.join(" "),
                        r.paths.join(" "),
                        r.workloads.join(" "),
                    ]
                })
                .collect();
            print_table(&["ROLE", "VERBS", "PRINCIPALS", "PATHS", "WORKLOADS"], &rows, &[]);
        }
        RoleCmd::Rm { name } => {
            rpc!(admin, socket, ConnectOnly, remove_role, pb::RemoveRoleRequest { name: name.clone() })?;
            if json {
                print_json(&serde_json::json!({ "name": name }));
            } else {
                println!("role {name} removed");
            }
        }
    }
    Ok(())
}

fn read_file(path: &PathBuf) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("cannot read the policy from stdin")?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(|e| fail(2, format!("cannot read {}: {e}", path.display())))
}

/// `keyhole apply` (`dry_run` false) or `keyhole diff` (true).
pub async fn apply(a: ApplyArgs, dry_run: bool, socket: &Target, json: bool) -> anyhow::Result<()> {
    let text = read_file(&a.file)?;
    let req = pb::ApplyPolicyRequest { text, prune: a.prune, dry_run, revoke_leases: a.revoke_leases };
    let r = rpc!(admin, socket, ConnectOnly, apply_policy, req)?;
    let n = r.changes.len();
    if json {
        print_json(&serde_json::json!({ "changes": r.changes, "applied": !dry_run }));
    } else {
        for c in &r.changes {
            println!("{c}");
        }
        match (dry_run, n) {
            (true, 0) => println!("no changes: the broker matches {}", a.file.display()),
            (true, n) => println!("{n} changes would be made (keyhole apply -f {})", a.file.display()),
            (false, n) => println!("applied: {n} changes"),
        }
    }
    if dry_run && n > 0 {
        // Drift is not an error: exit EXIT_DRIFT without an error line.
        let _ = std::io::Write::flush(&mut std::io::stdout());
        std::process::exit(i32::from(EXIT_DRIFT));
    }
    Ok(())
}

pub async fn export(socket: &Target, json: bool) -> anyhow::Result<()> {
    let r = rpc!(admin, socket, Safe, export_policy, pb::ExportPolicyRequest {})?;
    if json {
        print_json(&serde_json::json!({ "toml": r.text }));
    } else {
        print!("{}", r.text);
    }
    Ok(())
}
