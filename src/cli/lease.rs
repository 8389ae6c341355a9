//! `keyhole dynamic ...`, `keyhole cert ...`, `keyhole leases`: the
//! sources of per-container leases and the live leases (see
//! `crate::lease`).
#![forbid(unsafe_code)]

use clap::Subcommand;

use super::client::{Target, print_json, print_table, rpc};
use crate::api::pb;

#[derive(Debug, Subcommand)]
pub enum DynamicCmd {
    /// Define a dynamic source: a backend's dynamic secrets path
    #[command(after_help = "\
Examples:
  keyhole dynamic add db --backend prod --path database/creds/web
  keyhole grant dynamic:db --to web --file db.json

Each container of the workload reads its own login from db.json:
  {\"username\": ..., \"password\": ..., \"expires_at\": \"2026-...Z\"}
issued on its first open, renewed while it runs, revoked when it ends.")]
    Add {
        /// The source's name (granted as dynamic:NAME)
        name: String,
        /// The [[backend]] that issues the leases
        #[arg(long)]
        backend: String,
        /// The engine path that issues one, e.g. database/creds/ROLE
        #[arg(long)]
        path: String,
    },
    /// List the dynamic sources
    Ls,
    /// Remove a dynamic source; its leases are revoked
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Define a certificate source: a backend's PKI issue path
    #[command(after_help = "\
Placeholders in --uri and --cn: {workload}, {container_name}, {container_id},
filled from the attested container.

Examples:
  keyhole cert add tls --backend prod --issue pki/issue/workload \\
      --uri 'spiffe://example.org/{workload}/{container_name}' --cn '{container_name}.svc' --ttl 1h
  keyhole grant cert:tls --to web --file tls.pem

tls.pem holds the container's certificate, the chain and its key (PEM).")]
    Add {
        /// The source's name (granted as cert:NAME)
        name: String,
        /// The [[backend]] whose PKI engine issues
        #[arg(long)]
        backend: String,
        /// The PKI issue path, e.g. pki/issue/ROLE
        #[arg(long, value_name = "PATH")]
        issue: String,
        /// The URI SAN, e.g. spiffe://example.org/{workload}/{container_name}
        #[arg(long)]
        uri: String,
        /// The common name [default: {container_name}]
        #[arg(long)]
        cn: Option<String>,
        /// The certificate's lifetime, e.g. 1h [default: the role's]
        #[arg(long)]
        ttl: Option<String>,
    },
    /// List the certificate sources
    Ls,
    /// Remove a certificate source; its certificates are revoked
    Rm { name: String },
}

fn source_json(s: &pb::SourceSpec) -> serde_json::Value {
    let opt = |v: &String| (!v.is_empty()).then(|| v.clone());
    serde_json::json!({
        "kind": s.kind, "name": s.name, "backend": s.backend, "path": s.path,
        "uri": opt(&s.uri), "cn": opt(&s.cn), "ttl": opt(&s.ttl),
    })
}

async fn add(spec: pb::SourceSpec, socket: &Target, json: bool) -> anyhow::Result<()> {
    let s = rpc!(admin, socket, ConnectOnly, add_source, spec)?;
    if json {
        print_json(&source_json(&s));
    } else {
        println!("{} source {} added: {} {}", s.kind, s.name, s.backend, s.path);
    }
    Ok(())
}

async fn ls(kind: &str, socket: &Target, json: bool) -> anyhow::Result<()> {
    let r = rpc!(admin, socket, Safe, list_sources, pb::ListSourcesRequest { kind: kind.into() })?;
    if json {
        print_json(&r.sources.iter().map(source_json).collect::<Vec<_>>());
        return Ok(());
    }
    let dash = |v: &String| if v.is_empty() { "-".to_owned() } else { v.clone() };
    let rows: Vec<_> = r
        .sources
        .iter()
        .map(|s| vec![format!("{}:{}", s.kind, s.name), s.backend.clone(), s.path.clone(), dash(&s.uri), dash(&s.ttl)])
        .collect();
    print_table(&["SOURCE", "BACKEND", "PATH", "URI", "TTL"], &rows, &[]);
    Ok(())
}

async fn rm(kind: &str, name: String, socket: &Target, json: bool) -> anyhow::Result<()> {
    let req = pb::RemoveSourceRequest { kind: kind.into(), name: name.clone() };
    rpc!(admin, socket, ConnectOnly, remove_source, req)?;
    if json {
        print_json(&serde_json::json!({ "kind": kind, "name": name }));
    } else {
        println!("{kind} source {name} removed; its leases are being revoked");
    }
    Ok(())
}

pub async fn dynamic(cmd: DynamicCmd, socket: &Target, json: bool) -> anyhow::Result<()> {
    match cmd {
        DynamicCmd::Add { name, backend, path } => {
            let spec = pb::SourceSpec { kind: "dynamic".into(), name, backend, path, ..Default::default() };
            add(spec, socket, json).await
        }
        DynamicCmd::Ls => ls("dynamic", socket, json).await,
        DynamicCmd::Rm { name } => rm("dynamic", name, socket, json).await,
    }
}

pub async fn cert(cmd: CertCmd, socket: &Target, json: bool) -> anyhow::Result<()> {
    match cmd {
        CertCmd::Add { name, backend, issue, uri, cn, ttl } => {
            let spec = pb::SourceSpec {
                kind: "cert".into(),
                name,
                backend,
                path: issue,
                uri,
                cn: cn.unwrap_or_default(),
                ttl: ttl.unwrap_or_default(),
            };
            add(spec, socket, json).await
        }
        CertCmd::Ls => ls("cert", socket, json).await,
        CertCmd::Rm { name } => rm("cert", name, socket, json).await,
    }
}

pub async fn leases(workload: Option<String>, socket: &Target, json: bool) -> anyhow::Result<()> {
    let req = pb::ListLeasesRequest { workload: workload.unwrap_or_default() };
    let r = rpc!(admin, socket, Safe, list_leases, req)?;
    let time = |t: i64| {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
        humantime::format_rfc3339_seconds(at).to_string()
    };
    if json {
        let rows: Vec<_> = r
            .leases
            .iter()
            .map(|l| {
                serde_json::json!({
                    "source": l.source, "workload": l.workload, "container": l.container,
                    "container_name": l.container_name, "backend": l.backend,
                    "issued_at": time(l.issued_unix), "expires_at": time(l.expires_unix),
                    "serial": (!l.serial.is_empty()).then(|| l.serial.clone()), "state": l.state,
                    "template": (!l.template.is_empty()).then(|| l.template.clone()),
                    "failures": l.failures,
                })
            })
            .collect();
        print_json(&rows);
        return Ok(());
    }
    let rows: Vec<_> = r
        .leases
        .iter()
        .map(|l| {
            let c = &l.container[..12.min(l.container.len())];
            vec![
                l.workload.clone(),
                if l.template.is_empty() { l.source.clone() } else { format!("{} ({})", l.source, l.template) },
                c.to_owned(),
                l.container_name.clone(),
                time(l.expires_unix),
                l.state.clone(),
            ]
        })
        .collect();
    print_table(&["WORKLOAD", "SOURCE", "CONTAINER", "NAME", "EXPIRES", "STATE"], &rows, &[]);
    Ok(())
}
