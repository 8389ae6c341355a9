//! `keyhole workload ...`, `grant`, `revoke`, `grants`, `mounts`.
#![forbid(unsafe_code)]

use clap::{Args, Subcommand};

use super::client::{Target, print_json, print_table, rpc};
use crate::api::pb;

#[derive(Debug, Subcommand)]
pub enum WorkloadCmd {
    /// Define a workload: the callers that match every selector
    #[command(after_help = "\
Selectors:
  unix:uid:N  unix:gid:N                      the caller's uid / gid
  docker:id:ID                                a container id (or its 12+ digit prefix)
  docker:name:NAME  docker:image:REF          the container's name / image as run
  docker:label:KEY=VALUE                      a container label
  container:id|name|image|label:...           the same, for a container of any configured
                                              runtime (Docker or Podman); docker: ones
                                              match Docker's containers only

Examples:
  keyhole workload add web --selector docker:label:com.example.app=web
  keyhole workload add batch --selector unix:uid:1000 --selector unix:gid:1000

Each workload gets a mount at <run-dir>/workloads/<name>.")]
    Add {
        /// Workload name: [A-Za-z0-9._-], up to 64 characters
        name: String,
        /// A selector the caller must match (repeat for more; all must match)
        #[arg(long = "selector", value_name = "SEL", required = true)]
        selectors: Vec<String>,
    },
    /// List workloads and their selectors
    Ls,
    /// Remove a workload, its grants and its mount
    Rm {
        /// The workload to remove
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct GrantArgs {
    /// Secret path, or a prefix ending in /* (quote it: 'db/*'), or a
    /// dynamic source: dynamic:NAME, cert:NAME (each container reads its own)
    #[arg(required_unless_present = "template")]
    pub secret: Option<String>,
    /// Grant a template's rendered file instead of a secret (see
    /// `keyhole template put`); its inputs are granted for that file only
    #[arg(long, value_name = "NAME", conflicts_with = "secret")]
    pub template: Option<String>,
    /// The workload to grant it to
    #[arg(long, value_name = "WORKLOAD")]
    pub to: String,
    /// File name in the mount [default: the last path segment]
    #[arg(long, value_name = "NAME")]
    pub file: Option<String>,
    /// File mode, octal; read bits only [default: 0400]
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub mode: Option<u32>,
    /// File owner uid [default: 0]
    #[arg(long, value_name = "N")]
    pub uid: Option<u32>,
    /// File group gid [default: 0]
    #[arg(long, value_name = "N")]
    pub gid: Option<u32>,
    /// After each rotation, send this signal (HUP, USR1, ...) to every
    /// running container that read the secret through this grant
    #[arg(long, value_name = "SIGNAL")]
    pub notify: Option<String>,
    /// After the file changes, restart each container that read it, one
    /// at a time, waiting until it runs again (Docker/Podman containers
    /// only; the rotation itself does not wait for it)
    #[arg(long)]
    pub restart: bool,
    /// Pause between two restarts [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub restart_spacing: Option<String>,
    /// After the file changes, run CMD ARGS in each container that read
    /// it, through the Docker exec API (split like a shell would, but
    /// never run by one on the host), e.g. 'nginx -s reload'
    #[arg(long, value_name = "'CMD ARGS'")]
    pub exec: Option<String>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8).map_err(|_| format!("{s:?} is not an octal mode like 0400"))
}

pub async fn workload(cmd: WorkloadCmd, socket: &Target, json: bool) -> anyhow::Result<()> {
    match cmd {
        WorkloadCmd::Add { name, selectors } => {
            let spec = pb::WorkloadSpec { name, selectors };
            let w = rpc!(admin, socket, ConnectOnly, add_workload, spec)?;
            if json {
                print_json(&serde_json::json!({ "name": w.name, "selectors": w.selectors }));
            } else {
                println!("workload {} added: {}", w.name, w.selectors.join(" "));
            }
        }
        WorkloadCmd::Ls => {
            let r = rpc!(admin, socket, Safe, list_workloads, pb::ListWorkloadsRequest {})?;
            if json {
                let rows: Vec<_> = r
                    .workloads
                    .iter()
                    .map(|w| serde_json::json!({ "name": w.name, "selectors": w.selectors }))
                    .collect();
                print_json(&rows);
            } else {
                // One selector a line: a workload's selectors can be long.
                let rows: Vec<_> = r
                    .workloads
                    .iter()
                    .flat_map(|w| {
                        w.selectors
                            .iter()
                            .enumerate()
                            .map(|(i, s)| vec![if i == 0 { w.name.clone() } else { String::new() }, s.clone()])
                    })
                    .collect();
                print_table(&["WORKLOAD", "SELECTORS"], &rows, &[]);
            }
        }
        WorkloadCmd::Rm { name } => {
            let r =
                rpc!(admin, socket, ConnectOnly, remove_workload, pb::RemoveWorkloadRequest { name: name.clone() })?;
            if json {
                print_json(&serde_json::json!({ "name": name, "grants_removed": r.grants_removed }));
            } else {
                println!("workload {name} removed ({} grants)", r.grants_removed);
            }
        }
    }
    Ok(())
}

fn grant_json(g: &pb::GrantSpec) -> serde_json::Value {
    serde_json::json!({
        "secret": g.secret,
        "template": (!g.template.is_empty()).then_some(&g.template),
        "workload": g.workload,
        "file": (!g.file.is_empty()).then_some(&g.file),
        "mode": format!("{:04o}", g.mode),
        "uid": g.uid,
        "gid": g.gid,
        "notify": (!g.notify.is_empty()).then_some(&g.notify),
        "restart": g.restart,
        "restart_spacing": (!g.restart_spacing.is_empty()).then_some(&g.restart_spacing),
        "exec": (!g.exec.is_empty()).then_some(&g.exec),
    })
}

pub async fn grant(a: GrantArgs, socket: &Target, json: bool) -> anyhow::Result<()> {
    let spec = pb::GrantSpec {
        secret: a.secret.unwrap_or_default(),
        template: a.template.unwrap_or_default(),
        workload: a.to,
        file: a.file.unwrap_or_default(),
        mode: a.mode.unwrap_or(0),
        uid: a.uid,
        gid: a.gid,
        notify: a.notify.unwrap_or_default(),
        restart: a.restart,
        restart_spacing: a.restart_spacing.unwrap_or_default(),
        exec: a.exec.unwrap_or_default(),
    };
    let g = rpc!(admin, socket, ConnectOnly, grant, spec)?;
    if json {
        print_json(&grant_json(&g));
    } else {
        let what = if g.template.is_empty() { g.secret.clone() } else { format!("template {}", g.template) };
        println!("granted {what} to {} (mode {:04o})", g.workload, g.mode);
    }
    Ok(())
}

pub async fn revoke(secret: String, from: String, socket: &Target, json: bool) -> anyhow::Result<()> {
    let req = pb::RevokeRequest { secret: secret.clone(), workload: from.clone() };
    rpc!(admin, socket, ConnectOnly, revoke, req)?;
    if json {
        print_json(&serde_json::json!({ "secret": secret, "workload": from }));
    } else {
        println!("revoked {secret} from {from}");
    }
    Ok(())
}

/// What a grant does after its file changes: `notify SIGHUP, restart
/// 10s, exec 'nginx -s reload'`, or `-`.
fn on_change(g: &pb::GrantSpec) -> String {
    let mut parts = Vec::new();
    if !g.notify.is_empty() {
        parts.push(format!("notify {}", g.notify));
    }
    if g.restart {
        parts.push(format!("restart {}", g.restart_spacing).trim_end().to_owned());
    }
    if !g.exec.is_empty() {
        parts.push(format!("exec {}", shlex::try_quote(&g.exec).unwrap_or_default()));
    }
    if parts.is_empty() { "-".into() } else { parts.join(", ") }
}

pub async fn grants(workload: Option<String>, socket: &Target, json: bool) -> anyhow::Result<()> {
    let req = pb::ListGrantsRequest { workload: workload.unwrap_or_default() };
    let r = rpc!(admin, socket, Safe, list_grants, req)?;
    if json {
        print_json(&r.grants.iter().map(grant_json).collect::<Vec<_>>());
        return Ok(());
    }
    let id = |v: Option<u32>| v.map_or("-".to_owned(), |n| n.to_string());
    let mut rows: Vec<_> = r
        .grants
        .iter()
        .map(|g| {
            let file = if g.file.is_empty() { "-" } else { &g.file };
            let what = if g.template.is_empty() { g.secret.clone() } else { format!("template {}", g.template) };
            vec![g.workload.clone(), format!("{:04o}", g.mode), id(g.uid), id(g.gid), file.into(), what, on_change(g)]
        })
        .collect();
    let mut header = vec!["WORKLOAD", "MODE", "UID", "GID", "FILE", "SECRET", "ON CHANGE"];
    // The actions column only when a grant has one: the table fits 80 columns.
    if rows.iter().all(|r| r[6] == "-") {
        header.pop();
        rows.iter_mut().for_each(|r| drop(r.pop()));
    }
    print_table(&header, &rows, &[]);
    Ok(())
}

pub async fn mounts(socket: &Target, json: bool) -> anyhow::Result<()> {
    let r = rpc!(admin, socket, Safe, list_mounts, pb::ListMountsRequest {})?;
    if json {
        let rows: Vec<_> = r
            .mounts
            .iter()
            .map(|m| serde_json::json!({ "workload": m.workload, "path": m.path, "files": m.files }))
            .collect();
        print_json(&rows);
        return Ok(());
    }
    let rows: Vec<_> =
        r.mounts.iter().map(|m| vec![m.workload.clone(), m.files.len().to_string(), m.path.clone()]).collect();
    print_table(&["WORKLOAD", "FILES", "PATH"], &rows, &[1]);
    Ok(())
}
