//! Who may make admin calls: host root and configured uids, nobody else.

use std::os::unix::fs::PermissionsExt;

use crate::support::*;

const NOBODY: u32 = 65534;

#[test]
fn a_non_admin_caller_is_denied_and_audited() {
    needs!(root);
    let b = Broker::start();
    b.put("db/password", b"nobody-must-not-see-3a7f");
    // The workload socket is open to everyone; admin calls on it are not.
    let ws = b.workload_socket();
    let calls: [&[&str]; 5] = [
        &["secret", "get", "db/password"],
        &["secret", "put", "db/password", "--generate", "8"],
        &["secret", "ls"],
        &["status"],
        &["audit"],
    ];
    for args in calls {
        let o = cli_as(&ws, args, None, Some(NOBODY));
        assert_fails(&o, 4, "needs an admin caller");
        assert!(stderr(&o).contains("host uid 65534"), "{}", stderr(&o));
        assert!(!contains(&o.stdout, b"nobody-must-not-see"));
    }
    // Even with the admin socket opened up, the caller is still not admin.
    std::fs::set_permissions(b.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = cli_as(&b.socket(), &["secret", "get", "db/password"], None, Some(NOBODY));
    assert_fails(&o, 4, "needs an admin caller");
    // With the socket at its proper 0600, the kernel refuses the connect.
    std::fs::set_permissions(b.socket(), std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = cli_as(&b.socket(), &["secret", "ls"], None, Some(NOBODY));
    assert_fails(&o, 4, "permission denied opening");

    // A caller's first denials are written in full (a burst of four),
    // the rest summed up at most once a second.
    let denials: Vec<_> = b.audit_lines().into_iter().filter(|l| l["event"] == "deny").collect();
    assert!(denials.iter().all(|d| d["caller"]["uid"] == NOBODY && d["reason"] == "not an admin"));
    let methods: Vec<&str> = denials.iter().map(|d| d["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["GetSecret", "PutSecret", "ListSecrets", "Status"]);
    eventually(5, "the other two denials summed up", || b.denials() == 6);
    let summary = b.audit_events("deny_summary").pop().unwrap();
    assert_eq!(summary["caller"]["uid"], NOBODY);
    let files = summary["files"].to_string();
    assert!(files.contains("AuditLog") && files.contains("GetSecret"), "{summary}");
    // The secret is untouched and the chain still verifies.
    assert_eq!(b.get("db/password"), b"nobody-must-not-see-3a7f");
    b.ok(&["audit", "--verify"]);
    b.assert_never_leaked(&[b"nobody-must-not-see-3a7f"]);
}

#[test]
fn configured_admin_uids_are_admins() {
    needs!(root);
    let b = Broker::start_with("[admin]\nuids = [65534]\n");
    let ws = b.workload_socket();
    let o = cli_as(&ws, &["secret", "put", "ops/token", "--generate", "16"], None, Some(NOBODY));
    assert!(o.status.success(), "{}", stderr(&o));
    let who = cli_as(&ws, &["whoami", "--json"], None, Some(NOBODY));
    let w = json(&who.stdout);
    assert_eq!((w["uid"].as_u64(), w["admin"].as_bool()), (Some(NOBODY as u64), Some(true)));
    // Another uid still is not.
    let o = cli_as(&ws, &["secret", "ls"], None, Some(65533));
    assert_fails(&o, 4, "needs an admin caller");
}

#[test]
fn whoami_tells_each_caller_what_the_broker_sees() {
    needs!(root);
    let b = Broker::start();
    let o = cli_as(&b.workload_socket(), &["whoami", "--json"], None, None);
    let me = json(&o.stdout);
    assert_eq!(me["uid"], 0);
    assert_eq!(me["host_process"], true);
    assert_eq!(me["admin"], true);
    assert_eq!(me["container_id"], serde_json::Value::Null);
    assert!(me["selectors"].as_array().unwrap().iter().any(|s| s == "unix:uid:0"));
    let o = cli_as(&b.workload_socket(), &["whoami"], None, Some(NOBODY));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("uid 65534 gid 65534: a host process") && text.contains("admin: no"), "{text}");
    assert!(text.contains("selector unix:uid:65534"), "{text}");
}
