//! Docker integration beyond identity: the volume plugin.

pub mod plugin;
pub mod podman;
