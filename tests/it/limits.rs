//! Limits and back-pressure: a caller that floods the broker with
//! connections, garbage or calls is held to its share, audited, and the
//! broker keeps serving everyone else.

use std::time::Duration;

use crate::support::*;

const NOBODY: u32 = 65534;

#[test]
fn a_connection_flood_is_held_to_its_share_and_the_broker_serves_on() {
    needs!(root);
    let b = Broker::start_with("[limits]\nmax_connections = 200\nmax_connections_per_caller = 50\n");
    b.put("db/pw", b"flood-must-not-show-2f7e");
    let ws = b.workload_socket();
    // One caller opens as many connections as it may (10,000 if its hard
    // file limit allows): it keeps 50.
    let flood = Flood::start(NOBODY, &ws, 10_000, 0);
    assert!(flood.tried >= 900, "only {} connections tried", flood.tried);
    assert_eq!(flood.kept, 50, "{} of {} kept", flood.kept, flood.tried);
    // Others are served meanwhile, on both sockets.
    let who = cli_as(&ws, &["whoami", "--json"], None, Some(1));
    assert!(who.status.success(), "{}", stderr(&who));
    assert_eq!(b.get("db/pw"), b"flood-must-not-show-2f7e");
    let limit = b.audit_events("limit");
    assert!(!limit.is_empty());
    assert_eq!(limit[0]["caller"]["uid"], NOBODY);
    assert!(
        limit[0]["reason"].as_str().unwrap().starts_with("max_connections_per_caller (50) reached on workload.sock")
    );
    assert!(limit.len() <= 5, "refusals are audited at most once a second: {}", limit.len());

    // Garbage instead of HTTP/2: those connections are dropped.
    let junk = Flood::start(2, &ws, 40, 40);
    assert_eq!(junk.kept, 0, "garbage connections stay open");
    // Enough callers to reach the socket's total: the admin socket, with
    // its own limit, still serves the operator.
    let more: Vec<Flood> = (3..6).map(|uid| Flood::start(uid, &ws, 60, 0)).collect();
    let kept: usize = more.iter().map(|f| f.kept).sum::<usize>() + flood.kept;
    assert_eq!(kept, 200, "the socket's total");
    assert!(b.audit_events("limit").iter().any(|l| l["reason"].as_str().unwrap().starts_with("max_connections (200)")));
    assert_eq!(b.get("db/pw"), b"flood-must-not-show-2f7e");
    drop(more);
    drop(flood);
    // Closed connections give their places back.
    eventually(10, "whoami to be served again", || cli_as(&ws, &["whoami"], None, Some(NOBODY)).status.success());
    b.ok(&["audit", "--verify"]);
}

#[test]
fn a_caller_over_its_call_rate_is_refused_and_audited_others_are_not() {
    needs!(root);
    let b = Broker::start_with("[limits]\ncalls_per_second = 3\n");
    let ws = b.workload_socket();
    let outcomes: Vec<_> = (0..12).map(|_| cli_as(&ws, &["whoami"], None, Some(NOBODY))).collect();
    let refused: Vec<_> = outcomes.iter().filter(|o| !o.status.success()).collect();
    assert!(!refused.is_empty(), "12 calls at 3 a second all passed");
    assert!(refused.len() < 12, "none passed");
    assert_fails(refused[0], 5, "too many calls from this caller (limit 3 a second)");
    // Another caller has its own allowance.
    assert!(b.cli(&["status"]).status.success());
    let limit = b.audit_events("limit");
    assert!(limit.iter().all(|l| l["caller"]["uid"] == NOBODY), "{limit:?}");
    assert!(limit[0]["reason"].as_str().unwrap().contains("calls_per_second (3) for uid 65534"));
    std::thread::sleep(Duration::from_millis(1100));
    assert!(cli_as(&ws, &["whoami"], None, Some(NOBODY)).status.success(), "the allowance refills");
}
