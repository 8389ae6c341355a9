//! Handing the mounts to a successor broker and taking them up: quiesce
//! (no changes, no requests taken; the parked ones answered), the state
//! of every mount with its `/dev/fuse` fd ([`MountState`]), adopting a
//! predecessor's live mounts, and serving again if a handover failed.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::backend::VersionMeta;

use super::lifecycle::{LifecycleError, State};
use super::pool::Conn;
use super::workload::{self, Node, View, WorkloadFs};
use super::{Catalog, Loaded, Mount, MountKey, MountTable};

/// One live mount as handed to a successor broker; its `/dev/fuse`
/// descriptor travels beside it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MountState {
    pub key: MountKey,
    pub fs: workload::FsState,
}

/// How long a handover waits for parked requests to be answered (they
/// wait at most [`pool::PARK_FOR`], then take a blocking thread).
const PARKED_DRAIN: Duration = Duration::from_secs(5);

impl MountTable {
    /// Serving → quiescing, ahead of a handover: no more FUSE requests
    /// taken and no more changes applied; the request each worker holds
    /// is answered, then the parked ones (bounded). The mounts stay; new
    /// requests queue in the kernel.
    pub fn quiesce(&self) -> Result<(), LifecycleError> {
        // A change under way finishes first.
        let _serial = self.sync_lock.lock().expect("sync lock");
        if !self.pool.pause(PARKED_DRAIN)? {
            // The successor asks the kernel to send those again.
            tracing::warn!("handing over with FUSE requests unanswered");
        }
        Ok(())
    }

    /// Quiescing → serving, after a handover that did not happen.
    pub fn resume(&self) -> Result<(), LifecycleError> {
        let _serial = self.sync_lock.lock().expect("sync lock");
        self.pool.resume()
    }

    /// Quiescing → handed over: a successor serves the mounts now; this
    /// broker changes, serves and unmounts nothing any more.
    pub fn handed_over(&self) -> Result<(), LifecycleError> {
        let _serial = self.sync_lock.lock().expect("sync lock");
        self.pool.handed_over()
    }

    /// Where the mounts are in their life.
    pub fn state(&self) -> State {
        self.pool.state()
    }

    /// The state of every mount, each with its /dev/fuse fd, and the next
    /// inode number, for a successor broker. Only while quiescing: a
    /// serving mount's state moves under the copy.
    pub fn snapshot(&self) -> std::io::Result<(Vec<(MountState, OwnedFd)>, u64)> {
        let state = self.state();
        if state != State::Quiescing {
            let refused = format!("the mounts are {state}, not quiescing: no state to hand over");
            return Err(std::io::Error::other(refused));
        }
        let mounts = self.mounts.lock().expect("mounts lock");
        let mut handed = Vec::with_capacity(mounts.by_key.len());
        for (key, m) in mounts.by_key.iter() {
            handed.push((MountState { key: key.clone(), fs: m.fs.export() }, m.conn.dev().try_clone()?.into()));
        }
        Ok((handed, self.next_ino.load(Ordering::SeqCst)))
    }

    /// Take up the live mounts a predecessor handed over: each keeps its
    /// kernel connection, inode numbers and open handles, and is served
    /// from the next [`MountTable::sync`] on. A mount nothing wants any
    /// more is detached.
    pub fn adopt(&self, cat: &impl Catalog, handed: Vec<(MountState, File)>, next_ino: u64) -> anyhow::Result<()> {
        let wanted = Self::wanted(cat)?;
        let mut mounts = self.mounts.lock().expect("mounts lock");
        let load = |n: Node, workload: &str| {
            let meta = VersionMeta { version: n.version, created_unix_ms: n.mtime_ms, size: 0 };
            let loaded = cat.load(&n.secret, &meta).unwrap_or(Loaded { value: None, health: None, template: None });
            let reads = crate::metrics::reads_of(workload, &n.secret);
            Arc::new(Node { value: loaded.value, health: loaded.health, reads, template: loaded.template, ..n })
        };
        for (st, dev) in handed {
            let path = self.path_of(&st.key);
            self.leftovers.lock().expect("leftovers lock").retain(|p| *p != path);
            let Some(shape) = wanted.get(&st.key).cloned() else {
                Self::detach_all(&path);
                let _ = std::fs::remove_dir(&path);
                continue;
            };
            // O_NONBLOCK travels with the descriptor; make sure.
            crate::sys::set_nonblocking(&dev)?;
            let owner = workload::Owner::new(shape.uid, shape.gid, shape.container.clone());
            let mut fs = WorkloadFs::new(shape.workload.clone(), owner, self.shared.clone());
            let workload = shape.workload.name.clone();
            let view = View::new(st.fs.nodes.iter().cloned().map(|n| load(n, &workload)));
            let handles = st
                .fs
                .handles
                .iter()
                .map(|(fh, n)| (*fh, view.by_ino.get(&n.ino).cloned().unwrap_or_else(|| load(n.clone(), &workload))))
                .collect();
            fs.restore(st.fs, view, handles);
            let fs = Arc::new(fs);
            let conn = Conn::new(dev, fs.clone());
            tracing::info!(path = %path.display(), "took over the live mount");
            let m = Mount { shape, fs, conn, served: false, grants: Vec::new(), secrets: BTreeMap::new() };
            mounts.insert(st.key, m);
        }
        self.next_ino.fetch_max(next_ino, Ordering::SeqCst);
        Ok(())
    }
}
