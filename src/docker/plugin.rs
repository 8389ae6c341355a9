//! The Docker volume plugin: Docker's legacy plugin protocol (JSON over
//! HTTP POST) on `/run/docker/plugins/<name>.sock`, found by dockerd with
//! no other setup.
//!
//! `docker volume create -d keyhole -o workload=web NAME` records a volume;
//! every container start that mounts it calls `Mount` with an opaque id,
//! and gets its own FUSE mount under `<run-dir>/volumes/<id>` showing the
//! workload's grants. The id says nothing about the container, so who may
//! read is still decided at every open, from the calling process. Files
//! whose grant names no owner belong to the container's configured user.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::broker::Broker;
use crate::fs::{MountKey, VolumeMount};
use crate::policy::check_workload_name;

/// What `docker volume create -o ...` said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub workload: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Option<u32>,
}

/// A request from dockerd, any call.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Request {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub opts: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "ID")]
    pub id: String,
}

/// A request body as dockerd sends it (empty for some calls).
pub fn decode(body: &[u8]) -> Result<Request, String> {
    if body.is_empty() {
        return Ok(Request::default());
    }
    serde_json::from_slice(body).map_err(|e| format!("malformed request: {e}"))
}

/// `docker volume create -o` options, checked.
pub fn parse_opts(opts: &BTreeMap<String, String>) -> Result<VolumeSpec, String> {
    let num = |k: &str| -> Result<Option<u32>, String> {
        opts.get(k).map(|v| v.parse().map_err(|_| format!("{k}={v:?} is not a number"))).transpose()
    };
    if let Some(k) = opts.keys().find(|k| !["workload", "uid", "gid", "mode"].contains(&k.as_str())) {
        return Err(format!("unknown option {k:?}: keyhole volumes take workload=, uid=, gid=, mode="));
    }
    let workload = opts.get("workload").ok_or("the option workload= is required (-o workload=NAME)")?;
    check_workload_name(workload).map_err(|e| e.to_string())?;
    let mode = match opts.get("mode") {
        Some(m) => {
            let mode = u32::from_str_radix(m, 8).map_err(|_| format!("mode={m:?} is not an octal mode like 0400"))?;
            if mode == 0 || mode & !0o444 != 0 {
                return Err(format!("mode={m}: files are read-only, so only read bits (0400, 0440, 0444) are allowed"));
            }
            Some(mode)
        }
        None => None,
    };
    Ok(VolumeSpec { workload: workload.clone(), uid: num("uid")?, gid: num("gid")?, mode })
}

fn err(message: impl Into<String>) -> Value {
    json!({ "Err": message.into() })
}

fn spec_of(b: &Broker, name: &str) -> Result<Option<VolumeSpec>, String> {
    b.volume(name).map_err(|e| e.to_string())
}

fn mounts_of(b: &Broker, name: &str) -> Result<Vec<VolumeMount>, String> {
    b.mounts_of_volume(name).map_err(|e| e.to_string())
}

fn create(b: &Broker, r: &Request) -> Result<Value, String> {
    let spec = parse_opts(&r.opts.clone().unwrap_or_default())?;
    b.create_volume(&r.name, &spec).map_err(|e| e.to_string())?;
    Ok(json!({ "Err": "" }))
}

fn mount(b: &Broker, r: &Request, container: Option<String>) -> Result<Value, String> {
    let spec = spec_of(b, &r.name)?.ok_or_else(|| format!("no keyhole volume {}", r.name))?;
    if r.id.is_empty() || !r.id.bytes().all(|c| c.is_ascii_alphanumeric()) {
        return Err(format!("bad mount id {:?}", r.id));
    }
    // Podman sends one fixed id for every mount: keyed by volume instead.
    let id = super::podman::mount_key(&r.id, &r.name);
    let m = VolumeMount {
        id,
        volume: r.name.clone(),
        workload: spec.workload.clone(),
        uid: spec.uid,
        gid: spec.gid,
        mode: spec.mode,
        container,
    };
    let path = b.mount_volume(m).map_err(|e| e.to_string())?;
    Ok(json!({ "Mountpoint": path, "Err": "" }))
}

fn unmount(b: &Broker, r: &Request) -> Result<Value, String> {
    let id = super::podman::mount_key(&r.id, &r.name);
    b.unmount_volume(&id, &r.name).map_err(|e| e.to_string())?;
    Ok(json!({ "Err": "" }))
}

fn remove(b: &Broker, r: &Request) -> Result<Value, String> {
    b.remove_volume(&r.name).map_err(|e| e.to_string())?;
    Ok(json!({ "Err": "" }))
}

fn describe(b: &Broker, name: &str, spec: &VolumeSpec) -> Result<Value, String> {
    let mountpoint = mounts_of(b, name)?
        .first()
        .map(|m| b.mount_path(&MountKey::Volume(m.id.clone())).display().to_string())
        .unwrap_or_default();
    Ok(json!({ "Name": name, "Mountpoint": mountpoint, "Status": { "workload": spec.workload } }))
}

fn handle(b: &Broker, call: &str, r: &Request, container: Option<String>) -> Result<Value, String> {
    match call {
        "Plugin.Activate" => Ok(json!({ "Implements": ["VolumeDriver"] })),
        "VolumeDriver.Capabilities" => Ok(json!({ "Capabilities": { "Scope": "local" } })),
        "VolumeDriver.Create" => create(b, r),
        "VolumeDriver.Remove" => remove(b, r),
        "VolumeDriver.Mount" => mount(b, r, container),
        "VolumeDriver.Unmount" => unmount(b, r),
        "VolumeDriver.Get" => {
            let spec = spec_of(b, &r.name)?.ok_or_else(|| format!("no keyhole volume {}", r.name))?;
            Ok(json!({ "Volume": describe(b, &r.name, &spec)?, "Err": "" }))
        }
        "VolumeDriver.Path" => {
            let spec = spec_of(b, &r.name)?.ok_or_else(|| format!("no keyhole volume {}", r.name))?;
            Ok(json!({ "Mountpoint": describe(b, &r.name, &spec)?["Mountpoint"], "Err": "" }))
        }
        "VolumeDriver.List" => {
            let all = b.volumes().map_err(|e| e.to_string())?;
            let vols = all.iter().map(|(n, s)| describe(b, n, s)).collect::<Result<Vec<_>, _>>()?;
            Ok(json!({ "Volumes": vols, "Err": "" }))
        }
        other => Err(format!("keyhole does not implement {other}")),
    }
}

/// An error answer: `{"Err": …}` with a 500 status. dockerd reads `Err`
/// whatever the status; Podman reads it only from a status other than 200
/// (and takes a 200 as success, whatever it says).
type Answer = (axum::http::StatusCode, axum::Json<Value>);

fn answer(v: Value) -> Answer {
    let failed = v.get("Err").and_then(Value::as_str).is_some_and(|e| !e.is_empty());
    let status = if failed { axum::http::StatusCode::INTERNAL_SERVER_ERROR } else { axum::http::StatusCode::OK };
    (status, axum::Json(v))
}

async fn call(State(b): State<Arc<Broker>>, UrlPath(call): UrlPath<String>, body: Bytes) -> Answer {
    let r = match decode(&body) {
        Ok(r) => r,
        Err(e) => return answer(err(e)),
    };
    // Files in a container's mount belong to its configured user: note
    // the (one) not-yet-running container that mounts this volume. Never
    // for Podman: it names no container, and its API would not answer
    // until its 5 s plugin timeout failed the start.
    let container = match (call.as_str(), b.docker()) {
        ("VolumeDriver.Mount", Some(d)) if !super::podman::is_podman(&r.id) => d.starting_container(&r.name).await,
        _ => None,
    };
    let b2 = b.clone();
    let outcome = tokio::task::spawn_blocking(move || handle(&b2, &call, &r, container)).await;
    answer(match outcome {
        Ok(Ok(v)) => v,
        Ok(Err(message)) => err(message),
        Err(e) => err(format!("internal error: {e}")),
    })
}

/// Serve the plugin protocol on `socket` until the broker stops.
pub async fn serve(broker: Arc<Broker>, listener: tokio::net::UnixListener, socket: &Path) {
    let app = Router::new().route("/{call}", post(call)).with_state(broker.clone());
    let mut stopping = broker.stopping();
    let shutdown = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(socket = %socket.display(), error = %e, "volume plugin stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn volume_options() {
        let s = parse_opts(&opts(&[("workload", "web"), ("uid", "1000"), ("mode", "0440")])).unwrap();
        assert_eq!(s, VolumeSpec { workload: "web".into(), uid: Some(1000), gid: None, mode: Some(0o440) });
        assert!(parse_opts(&opts(&[])).unwrap_err().contains("workload= is required"));
        assert!(parse_opts(&opts(&[("workload", "web"), ("size", "1g")])).unwrap_err().contains("unknown option"));
        assert!(parse_opts(&opts(&[("workload", "web"), ("uid", "x")])).unwrap_err().contains("not a number"));
        assert!(parse_opts(&opts(&[("workload", "web"), ("mode", "0600")])).unwrap_err().contains("read bits"));
        assert!(parse_opts(&opts(&[("workload", "../x")])).is_err());
    }
}
