//! Who is an admin: decided here, from the facts attestation found (or
//! the client certificate a remote caller showed) and the config's
//! `[admin]`. Attestation only reports facts; the API asks this module.
#![forbid(unsafe_code)]

use crate::config::AdminPolicy;
use crate::identity::Identity;

/// Whether `id` may call the Admin service.
///
/// - A remote client: only if its certificate's subject is listed in
///   `[admin] subjects` (every attribute matching). Its uid, gid and pid
///   (0) count for nothing.
/// - A local caller: only a host process (the broker's pid and mount
///   namespaces and container), with uid 0, an `[admin] uids` uid, or an
///   `[admin] gids` group as its gid or a supplementary group. Root in a
///   container, or in a pid namespace of its own, is not an admin.
pub fn is_admin(id: &Identity, admin: &AdminPolicy) -> bool {
    match &id.remote {
        Some(r) => r.subject.as_ref().is_ok_and(|s| admin.allows_subject(s)),
        None => id.host && admin.allows(id.uid, id.gid, &id.groups),
    }
}

/// `id` with its admin decided (attestation leaves it false).
pub fn decided(mut id: Identity, admin: &AdminPolicy) -> Identity {
    id.admin = is_admin(&id, admin);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_subject;

    fn host(uid: u32, gid: u32, groups: &[u32]) -> Identity {
        Identity { uid, gid, pid: 7, host: true, groups: groups.into(), ..Identity::default() }
    }

    #[test]
    fn a_host_process_is_an_admin_by_uid_gid_or_group() {
        let cfg = AdminPolicy { uids: vec![1000], gids: vec![50], ..AdminPolicy::default() };
        assert!(is_admin(&host(0, 0, &[]), &cfg), "root on the host");
        assert!(is_admin(&host(1000, 1000, &[]), &cfg));
        assert!(is_admin(&host(7, 50, &[]), &cfg));
        assert!(is_admin(&host(7, 7, &[3, 50]), &cfg), "a supplementary group");
        assert!(!is_admin(&host(7, 7, &[3]), &cfg));
        assert!(decided(host(1000, 1, &[]), &cfg).admin);
        assert!(!decided(host(1001, 1, &[]), &cfg).admin);
    }

    #[test]
    fn root_anywhere_but_the_host_is_not_an_admin() {
        let cfg = AdminPolicy::default();
        let in_container = Identity { host: false, container_id: Some("ab".repeat(32)), ..host(0, 0, &[0]) };
        assert!(!is_admin(&in_container, &cfg));
        assert!(!is_admin(&Identity::unattested(0, 0, 42), &cfg), "attestation failed: no facts, no admin");
    }

    #[test]
    fn a_remote_client_is_an_admin_by_its_subject_alone() {
        let cfg = AdminPolicy { subjects: vec![parse_subject("CN=ops,O=Example").unwrap()], ..AdminPolicy::default() };
        let at = Some("192.0.2.7:4431".parse().unwrap());
        assert!(is_admin(&Identity::remote(parse_subject("O=Example, CN=ops"), at), &cfg));
        // Its uid reads 0, which a local caller's would make an admin.
        let other = Identity::remote(parse_subject("CN=intern"), at);
        assert_eq!(other.uid, 0);
        assert!(!is_admin(&other, &cfg));
        assert!(!is_admin(&Identity::remote(Err("no client certificate".into()), at), &cfg));
        // Even if something marked it a host process.
        assert!(!is_admin(&Identity { host: true, ..other }, &cfg));
    }
}
