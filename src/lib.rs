//! keyhole: a secrets broker for container hosts.
//!
//! It keeps secrets in its own encrypted store or in Vault/OpenBao, and
//! serves them to containers as files in per-workload FUSE mounts,
//! attributing every open and every call to the process the kernel says
//! made it. See README.md and the book in docs/ (docs/src/SUMMARY.md) for
//! use, and `../shared/DESIGN.md` for the design.
//!
//! # Layout
//!
//! - [`cli`]: clap definitions and dispatch; one file per command group.
//! - [`broker`]: `keyhole serve` — wiring, directories, sockets, shutdown;
//!   `broker::ops`, the one write operation per change (store, update the
//!   touched mounts, announce, audit), returning [`broker::BrokerError`].
//! - [`api`]: the tonic services, peer credentials on Unix sockets, and
//!   the one place errors become `tonic::Status`.
//! - [`identity`]: peer → pinned process → identity (cgroup → container
//!   → Docker inspect).
//! - [`policy`]: workloads, selectors, grants, and `decide`; who is an admin
//!   ([`policy::admin`], from the facts attestation found) (pure).
//! - [`fs`]: one FUSE filesystem per workload, the mount table that
//!   keeps them in step with the store, and the one pool of workers that
//!   serves every mount (parking requests that must wait).
//! - [`backend`]: where values live, behind one [`backend::SecretSource`]
//!   trait; `local` is the broker's store (embedded redb,
//!   AES-256-GCM-sealed records: secrets, policy, volumes, Vault copies),
//!   `vault` is Vault/OpenBao KV v2; `health` is whether a source answers.
//! - [`docker`]: the Docker volume plugin (per-container mounts).
//! - [`audit`]: the HMAC-chained JSON-lines audit log.
//! - [`crypto`]: the master key, key derivation, sealing.
//! - [`secret`]: [`secret::SecretBytes`] (locked, zeroized, redacted) and
//!   secret path rules.
//! - [`config`]: TOML config, raw → validated.
//! - [`actions`]: actions on change (`grant --restart`, `--exec`) and
//!   the containers that read each file (pure bookkeeping).
//! - [`sys`]: the few raw kernel calls; the only `unsafe` outside
//!   `secret`'s allocator.

pub mod actions;
pub mod alerts;
pub mod api;
pub mod audit;
pub mod backend;
pub mod broker;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod docker;
pub mod fs;
pub mod identity;
pub mod lease;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod secret;
pub mod sys;
pub mod template;

/// An error and its sources, on one line: what actually failed, e.g.
/// "connection refused", under a generic top error. A layer that repeats
/// the one below it is said once.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut out: Vec<String> = Vec::new();
    for m in std::iter::successors(Some(e), |e| e.source()).map(ToString::to_string) {
        if !out.last().is_some_and(|l| l.contains(&m)) {
            out.push(m);
        }
    }
    out.join(": ")
}
