//! The `Workload` service: open to every caller.
#![forbid(unsafe_code)]

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::{WhoAmIRequest, WhoAmIResponse, workload_server};
use super::{blocking_bounded, peer_of};
use crate::audit::{Event, EventKind};
use crate::broker::Broker;
use crate::identity::Identity;

pub struct WorkloadService(pub Arc<Broker>);

#[tonic::async_trait]
impl workload_server::Workload for WorkloadService {
    async fn who_am_i(&self, req: Request<WhoAmIRequest>) -> Result<Response<WhoAmIResponse>, Status> {
        let peer = peer_of(&req)?;
        let b = self.0.clone();
        let (id, workloads, roles) = blocking_bounded(move || {
            let id = b.attestor().attest(&peer).map(|id| crate::policy::admin::decided(id, &b.config().admin));
            let id = id.inspect_err(|e| {
                // Someone spoke on a connection whose process is gone, or
                // cannot be read: a refusal worth a line.
                let who = Identity::unattested(peer.uid, peer.gid, peer.pid);
                let reason = e.to_string();
                let event = Event {
                    method: Some("WhoAmI"),
                    caller: Some(&who),
                    reason: Some(&reason),
                    ..Event::new(EventKind::Deny)
                };
                let _ = b.audit().deny(&crate::limits::caller_key(&who), &event);
            })?;
            b.allow_call(&id, "WhoAmI")?;
            let all = b.list_workloads()?;
            let names = all.into_iter().filter(|w| w.matches(&id)).map(|w| w.name).collect::<Vec<_>>();
            let facts = super::caller_facts(&id);
            let roles = b.roles().get().iter().filter(|r| r.matches(&facts)).map(|r| r.name.clone()).collect();
            Ok((id, names, roles))
        })
        .await?;
        Ok(Response::new(WhoAmIResponse {
            workloads,
            container_name: id.docker.as_ref().map(|d| d.name.clone()).unwrap_or_default(),
            uid: id.uid,
            gid: id.gid,
            pid: id.pid as u32,
            selectors: id.selectors(),
            container_id: id.container_id.unwrap_or_default(),
            host_process: id.host,
            admin: id.admin,
            roles,
        }))
    }
}
