//! The `Workload` service: open to every caller.
#![forbid(unsafe_code)]

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::{WhoAmIRequest, WhoAmIResponse, workload_server};
use super::{ApiError, peer_of};
use crate::broker::Broker;

pub struct WorkloadService(pub Arc<Broker>);

#[tonic::async_trait]
impl workload_server::Workload for WorkloadService {
    async fn who_am_i(&self, req: Request<WhoAmIRequest>) -> Result<Response<WhoAmIResponse>, Status> {
        let peer = peer_of(&req)?;
        let id = self.0.attestor.attest(&peer).map_err(ApiError::from)?;
        Ok(Response::new(WhoAmIResponse {
            uid: id.uid,
            gid: id.gid,
            pid: id.pid as u32,
            selectors: id.selectors(),
            container_id: id.container_id.unwrap_or_default(),
            host_process: id.host,
            admin: id.admin,
        }))
    }
}
