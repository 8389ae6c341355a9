//! Container id → what Docker says of it (name, image, labels, user), from
//! the Engine API. Answers are cached; the events stream evicts containers
//! that are destroyed, renamed or updated. A lost stream clears the cache
//! and reconnects asking dockerd to replay the events since it was lost.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use tokio_stream::StreamExt;

use crate::policy::ContainerInfo;

/// How long an open may wait for Docker on a cache miss.
const INSPECT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct DockerCache {
    client: Docker,
    cache: Mutex<HashMap<String, Arc<ContainerInfo>>>,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for DockerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerCache").finish_non_exhaustive()
    }
}

impl DockerCache {
    /// Connect lazily to the Engine API on `socket`; nothing is sent yet.
    pub fn connect(socket: &Path, rt: tokio::runtime::Handle) -> Result<Arc<Self>, bollard::errors::Error> {
        let client = Docker::connect_with_unix(&socket.to_string_lossy(), 5, bollard::API_DEFAULT_VERSION)?;
        Ok(Arc::new(DockerCache { client, cache: Mutex::default(), rt }))
    }

    fn cached(&self, id: &str) -> Option<Arc<ContainerInfo>> {
        self.cache.lock().expect("docker cache lock").get(id).cloned()
    }

    async fn inspect(&self, id: &str) -> Option<ContainerInfo> {
        let r = tokio::time::timeout(INSPECT_TIMEOUT, self.client.inspect_container(id, None)).await;
        let c = match r {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(container = %&id[..12.min(id.len())], error = %e, "docker inspect failed");
                return None;
            }
            Err(_) => {
                tracing::warn!(container = %&id[..12.min(id.len())], "docker inspect timed out");
                return None;
            }
        };
        let config = c.config.unwrap_or_default();
        Some(ContainerInfo {
            name: c.name.unwrap_or_default().trim_start_matches('/').to_owned(),
            image: config.image.unwrap_or_default(),
            labels: config.labels.unwrap_or_default().into_iter().collect(),
            user: config.user.unwrap_or_default(),
        })
    }

    fn remember(&self, id: &str, info: ContainerInfo) -> Arc<ContainerInfo> {
        let info = Arc::new(info);
        self.cache.lock().expect("docker cache lock").insert(id.to_owned(), info.clone());
        info
    }

    /// The cache, else one bounded inspect.
    pub async fn lookup(&self, id: &str) -> Option<Arc<ContainerInfo>> {
        if let Some(hit) = self.cached(id) {
            return Some(hit);
        }
        let info = self.inspect(id).await?;
        Some(self.remember(id, info))
    }

    /// [`Self::lookup`] from a thread that may block (FUSE request
    /// threads, the blocking pool).
    pub fn lookup_blocking(&self, id: &str) -> Option<Arc<ContainerInfo>> {
        self.rt.block_on(self.lookup(id))
    }

    /// The container being started with `volume`: the one container that
    /// mounts it and is not running yet. None if Docker does not say, or
    /// more than one could be meant. (Docker lists it, but cannot inspect
    /// it until the start is under way.)
    pub async fn starting_container(&self, volume: &str) -> Option<String> {
        let filters = HashMap::from([("volume".to_owned(), vec![volume.to_owned()])]);
        let opts = bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let list = match tokio::time::timeout(INSPECT_TIMEOUT, self.client.list_containers(Some(opts))).await {
            Ok(Ok(list)) => list,
            Ok(Err(e)) => {
                tracing::warn!(%volume, error = %e, "cannot list the containers that mount a volume");
                return None;
            }
            Err(_) => {
                tracing::warn!(%volume, "listing the containers that mount a volume timed out");
                return None;
            }
        };
        let running = bollard::models::ContainerSummaryStateEnum::RUNNING;
        let mut starting = list.into_iter().filter(|c| c.state != Some(running));
        match (starting.next(), starting.next()) {
            (Some(only), None) => only.id,
            _ => {
                tracing::info!(%volume, "cannot tell which container mounts the volume; files keep the grant's owner");
                None
            }
        }
    }

    /// Send `signal` (e.g. "SIGHUP") to a running container.
    pub async fn signal(&self, id: &str, signal: &str) -> Result<(), String> {
        let opts = bollard::query_parameters::KillContainerOptions { signal: signal.to_owned() };
        match tokio::time::timeout(INSPECT_TIMEOUT, self.client.kill_container(id, Some(opts))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Keep the cache honest from the events stream, reconnecting forever.
    pub async fn watch(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(200);
        // After a lost stream, reconnect asking for the events since it was
        // lost: dockerd replays what it has, so none is missed across a
        // broker-side hiccup, and a restarted dockerd replays its own.
        let mut since: Option<u64> = None;
        loop {
            let filters = HashMap::from([("type".to_owned(), vec!["container".to_owned()])]);
            let opts = bollard::query_parameters::EventsOptions {
                filters: Some(filters),
                since: since.map(|t| t.to_string()),
                ..Default::default()
            };
            let mut events = self.client.events(Some(opts));
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(ev) => {
                        if since.take().is_some() {
                            tracing::info!("docker events stream back");
                        }
                        backoff = Duration::from_millis(200);
                        let action = ev.action.unwrap_or_default();
                        let id = ev.actor.and_then(|a| a.id).unwrap_or_default();
                        if matches!(action.as_str(), "destroy" | "rename" | "update") {
                            self.cache.lock().expect("docker cache lock").remove(&id);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "docker events stream ended");
                        break;
                    }
                }
            }
            if since.is_none() {
                tracing::warn!("docker events stream lost; reconnecting");
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                since = Some(now.as_secs().saturating_sub(1));
            }
            // Whatever the replay cannot cover (a dockerd restart loses its
            // event log) is forgotten: the next open asks Docker again.
            self.cache.lock().expect("docker cache lock").clear();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
