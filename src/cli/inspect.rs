//! `keyhole status`, `whoami` and `audit`.
#![forbid(unsafe_code)]

use std::io::Write;

use clap::Args;
use serde::Serialize;

use super::client::{Failure, Target, fail, print_json, rpc};
use crate::api::pb;

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// After the stored lines, keep printing new ones until interrupted
    #[arg(long, conflicts_with = "verify")]
    pub follow: bool,
    /// Check the HMAC chain instead of printing (exit 6 if broken)
    #[arg(long)]
    pub verify: bool,
}

pub async fn status(socket: &Target, json: bool) -> anyhow::Result<()> {
    let s = rpc!(admin, socket, Safe, status, pb::StatusRequest {})?;
    if json {
        #[derive(Serialize)]
        struct View<'a> {
            version: &'a str,
            pid: u32,
            uptime_seconds: u64,
            state_dir: &'a str,
            run_dir: &'a str,
            key_source: &'a str,
            secrets: u64,
            audit_lines: u64,
            history_depth: u32,
            max_value_bytes: u64,
            secret_buffers: u64,
            secret_buffers_locked: u64,
            backends: Vec<serde_json::Value>,
            leases: u64,
            revocations_pending: u64,
        }
        print_json(&View {
            version: &s.version,
            pid: s.pid,
            uptime_seconds: s.uptime_seconds,
            state_dir: &s.state_dir,
            run_dir: &s.run_dir,
            key_source: &s.key_source,
            secrets: s.secrets,
            audit_lines: s.audit_lines,
            history_depth: s.history_depth,
            max_value_bytes: s.max_value_bytes,
            secret_buffers: s.secret_buffers,
            secret_buffers_locked: s.secret_buffers_locked,
            backends: s.backends.iter().map(backend_json).collect(),
            leases: s.leases,
            revocations_pending: s.revocations_pending,
        });
        return Ok(());
    }
    let uptime = humantime::format_duration(std::time::Duration::from_secs(s.uptime_seconds));
    println!("keyhole {} (pid {}), up {uptime}", s.version, s.pid);
    println!("state dir      {}", s.state_dir);
    println!("run dir        {}", s.run_dir);
    println!("master key     {}", s.key_source);
    println!("secrets        {}", s.secrets);
    println!("history depth  {}", s.history_depth);
    println!("max value      {} bytes", s.max_value_bytes);
    println!("audit lines    {}", s.audit_lines);
    println!("locked buffers {}/{} secret buffers locked in RAM", s.secret_buffers_locked, s.secret_buffers);
    println!("leases         {}", s.leases);
    if s.revocations_pending > 0 {
        println!(
            "warning: {} lease revocation(s) failed and are retried (keyhole leases: \"revoke pending\"); \
             is the backend reachable?",
            s.revocations_pending
        );
    }
    for b in &s.backends {
        let last = if b.last_ok_unix_ms > 0 { super::client::time_ms(b.last_ok_unix_ms) } else { "never".into() };
        println!(
            "backend {}/    {} {} ({}): {}, last answered {last}, {} cached",
            b.name, b.kind, b.address, b.auth, b.state, b.cached_secrets
        );
        if b.addresses.len() > 1 {
            let at = b.addresses.iter().position(|a| *a == b.address).map_or(0, |i| i + 1);
            println!(
                "  cluster: node {at} of {} in use ({}), {} switch(es) since start",
                b.addresses.len(),
                b.addresses.join(", "),
                b.node_switches
            );
        }
        if !b.last_error.is_empty() {
            println!("  last error: {}", b.last_error);
        }
        println!(
            "  change detection: {}, last check {} request(s), {} bytes, {} dir(s), {} watched, {} read",
            b.change_detection, b.scan_requests, b.scan_bytes, b.scan_dirs, b.watched_secrets, b.scan_fetched
        );
        if !b.change_detection_note.is_empty() {
            println!("  per-secret because: {}", b.change_detection_note);
        }
    }
    Ok(())
}

fn backend_json(b: &pb::BackendStatus) -> serde_json::Value {
    serde_json::json!({
        "name": b.name,
        "kind": b.kind,
        "address": b.address,
        "addresses": b.addresses,
        "node_switches": b.node_switches,
        "auth": b.auth,
        "state": b.state,
        "last_ok": (b.last_ok_unix_ms > 0).then(|| super::client::time_ms(b.last_ok_unix_ms)),
        "last_error": (!b.last_error.is_empty()).then_some(&b.last_error),
        "cached_secrets": b.cached_secrets,
        "change_detection": b.change_detection,
        "change_detection_note": (!b.change_detection_note.is_empty()).then_some(&b.change_detection_note),
        "last_scan": {
            "at": (b.last_scan_unix_ms > 0).then(|| super::client::time_ms(b.last_scan_unix_ms)),
            "dirs": b.scan_dirs,
            "requests": b.scan_requests,
            "bytes": b.scan_bytes,
            "watched": b.watched_secrets,
            "fetched": b.scan_fetched,
            "sparse_dirs": b.scan_sparse_dirs,
        },
    })
}

pub async fn whoami(socket: &Target, json: bool) -> anyhow::Result<()> {
    let w = rpc!(workload, socket, Safe, who_am_i, pb::WhoAmIRequest {})?;
    if json {
        print_json(&serde_json::json!({
            "uid": w.uid,
            "gid": w.gid,
            "pid": w.pid,
            "container_id": (!w.container_id.is_empty()).then_some(&w.container_id),
            "host_process": w.host_process,
            "admin": w.admin,
            "selectors": w.selectors,
            "workloads": w.workloads,
            "container_name": (!w.container_name.is_empty()).then_some(&w.container_name),
            "roles": w.roles,
        }));
        return Ok(());
    }
    let place = match (w.container_id.as_str(), w.host_process) {
        ("", true) => "a host process".to_owned(),
        ("", false) => "a process in another namespace (not a host process)".to_owned(),
        (id, _) => format!("container {id}"),
    };
    println!("pid {} uid {} gid {}: {place}", w.pid, w.uid, w.gid);
    if !w.container_name.is_empty() {
        println!("container name: {}", w.container_name);
    }
    match (w.admin, w.roles.as_slice()) {
        (true, _) => println!("admin: yes"),
        (false, []) => println!("admin: no"),
        (false, roles) => println!("admin: scoped, roles {}", roles.join(", ")),
    }
    match w.workloads.as_slice() {
        [] => println!("workloads: none match"),
        names => println!("workloads: {}", names.join(", ")),
    }
    for s in &w.selectors {
        println!("selector {s}");
    }
    Ok(())
}

pub async fn audit(args: AuditArgs, socket: &Target, json: bool) -> anyhow::Result<()> {
    if args.verify {
        let r = rpc!(admin, socket, Safe, audit_verify, pb::AuditVerifyRequest {})?;
        if json {
            print_json(&serde_json::json!({ "ok": r.ok, "lines": r.lines, "problem": r.problem }));
        } else if r.ok {
            println!("audit log verified: {} lines, HMAC chain intact", r.lines);
        }
        return if r.ok { Ok(()) } else { Err(fail(6, r.problem)) };
    }
    let mut stream = rpc!(admin, socket, Safe, audit_log, pb::AuditLogRequest { follow: args.follow })?;
    let mut out = std::io::stdout().lock();
    while let Some(line) = stream.message().await.map_err(Failure::from)? {
        // Lines are JSON already, so --json changes nothing here.
        if writeln!(out, "{}", line.json).and_then(|()| out.flush()).is_err() {
            break; // stdout closed (e.g. `| head`): stop quietly.
        }
    }
    Ok(())
}

/// `keyhole refresh`: what each backend's check found.
pub async fn refresh(path: Option<String>, backend: Option<String>, socket: &Target, json: bool) -> anyhow::Result<()> {
    let req = pb::RefreshRequest { path: path.clone().unwrap_or_default(), backend: backend.unwrap_or_default() };
    let r = rpc!(admin, socket, Safe, refresh, req)?;
    if json {
        let out: Vec<serde_json::Value> = r
            .backends
            .iter()
            .map(|b| {
                serde_json::json!({
                    "backend": b.name,
                    "change_detection": b.change_detection,
                    "requests": b.requests,
                    "watched": b.watched,
                    "changed": b.changed,
                    "path_watched": path.as_ref().map(|_| b.path_watched),
                })
            })
            .collect();
        print_json(&serde_json::Value::Array(out));
        return Ok(());
    }
    for b in &r.backends {
        println!(
            "{}/: {} watched, {} changed ({} request(s), by {})",
            b.name,
            b.watched,
            b.changed.len(),
            b.requests,
            b.change_detection
        );
        for c in &b.changed {
            println!("  {c}");
        }
        if let Some(p) = path.as_ref().filter(|_| !b.path_watched) {
            println!("  note: no grant shows {p}; nothing watches it on this host");
        }
    }
    Ok(())
}
