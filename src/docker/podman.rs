//! Podman's use of the volume plugin protocol, and what it changes.
//!
//! Podman speaks Docker's legacy plugin protocol to the plugins listed in
//! `containers.conf` (`[engine.volume_plugins] NAME = "/path.sock"`), with
//! three differences that matter here: every `Mount` and `Unmount` carries
//! the same fixed id ([`PODMAN_MOUNT_ID`], the sha256 of "placeholder\n")
//! whatever the volume and container; Podman counts a volume's users
//! itself (only the first container's start mounts, only the last stop
//! unmounts); and it gives up on a plugin call after 5 s. So a Podman
//! mount is keyed by its volume name ([`mount_key`]), and nothing asks
//! any runtime's API from inside its `Mount` (Podman's own API would not
//! answer until the call timed out and failed the start). Who may read
//! is still decided at every open, from the calling process.
#![forbid(unsafe_code)]

use sha2::Digest;

/// The id Podman (4.x) sends with every `Mount` and `Unmount`.
pub const PODMAN_MOUNT_ID: &str = "2f73349cfc4630255319c6c8dfc1b46a8996ace9d14d8e07563b165915918ec2";

/// Whether a plugin call comes from Podman (by its fixed mount id; only
/// root reaches the plugin socket, so nobody else sends it).
pub fn is_podman(mount_id: &str) -> bool {
    mount_id == PODMAN_MOUNT_ID
}

/// The key a volume mount is kept under: Docker's per-mount id as it is;
/// for Podman's fixed id, one key per volume name (64 hex digits, so it
/// is a mount id like Docker's wherever one is expected).
pub fn mount_key(mount_id: &str, volume: &str) -> String {
    if !is_podman(mount_id) {
        return mount_id.to_owned();
    }
    let mut h = sha2::Sha256::new();
    h.update(b"keyhole podman volume\0");
    h.update(volume.as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podmans_fixed_id_is_keyed_by_volume_and_dockers_ids_are_kept() {
        assert_eq!(hex::encode(sha2::Sha256::digest(b"placeholder\n")), PODMAN_MOUNT_ID);
        let (a, b) = (mount_key(PODMAN_MOUNT_ID, "web"), mount_key(PODMAN_MOUNT_ID, "db"));
        assert_ne!(a, b, "two volumes, two mounts");
        assert_eq!(a, mount_key(PODMAN_MOUNT_ID, "web"), "the same volume, the same mount");
        assert!(a.len() == 64 && a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(mount_key("abc123", "web"), "abc123");
        assert!(!is_podman("abc123"));
    }
}
