//! The audit log: every admin call recorded, never a value, and the HMAC
//! chain catches edits and cuts.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::support::*;

#[test]
fn every_admin_call_is_audited_without_values() {
    needs!(root);
    let b = Broker::start();
    b.put("app/key", b"audit-me-not-9d3c");
    b.ok(&["secret", "rotate", "app/key", "--generate", "12"]);
    b.get("app/key");
    b.ok(&["secret", "ls"]);
    b.ok(&["secret", "history", "app/key"]);
    let _ = b.cli(&["secret", "get", "app/missing"]);
    b.ok(&["secret", "rm", "app/key"]);
    let lines = b.audit_lines();
    let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    // The broker's own readiness probe (status) precedes the test's calls.
    let from = events.iter().position(|e| *e == "put").unwrap();
    assert_eq!(&events[from..], ["put", "rotate", "get", "ls", "history", "get", "rm"]);
    let put = &lines[from];
    assert_eq!(put["path"], "app/key");
    assert_eq!(put["version"], 1);
    assert_eq!(put["caller"]["uid"], 0);
    assert!(put["caller"]["pid"].as_u64().unwrap() > 0);
    assert_eq!(lines[from + 2]["version"], 2, "get names the version it read");
    assert!(lines[from + 5]["reason"].as_str().unwrap().contains("does not exist"));
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seq"], i as u64 + 1);
        assert_eq!(l["hmac"].as_str().unwrap().len(), 64);
    }
    b.assert_never_leaked(&[b"audit-me-not-9d3c"]);
}

#[test]
fn verify_passes_then_fails_after_an_edit_or_a_cut() {
    needs!(root);
    let mut b = Broker::start();
    for i in 0..5 {
        b.put(&format!("s/{i}"), b"v");
    }
    let ok = b.ok(&["audit", "--verify"]);
    assert!(String::from_utf8(ok).unwrap().starts_with("audit log verified:"));
    let log = b.state().join("audit.log");
    let original = std::fs::read_to_string(&log).unwrap();

    // An edit: change which secret a line names.
    std::fs::write(&log, original.replacen("\"s/2\"", "\"s/7\"", 1)).unwrap();
    assert_fails(&b.cli(&["audit", "--verify"]), 6, "hmac mismatch");
    let j = b.cli(&["audit", "--verify", "--json"]);
    assert_eq!(json(&j.stdout)["ok"], false);

    // A cut in the middle.
    let lines: Vec<&str> = original.lines().collect();
    let cut: String = lines.iter().enumerate().filter(|(i, _)| *i != 3).map(|(_, l)| format!("{l}\n")).collect();
    std::fs::write(&log, cut).unwrap();
    assert_fails(&b.cli(&["audit", "--verify"]), 6, "line 4");

    // A cut tail: every remaining line is intact, but the broker knows more
    // were written.
    let head: String = lines[..4].iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&log, head).unwrap();
    assert_fails(&b.cli(&["audit", "--verify"]), 6, "truncated");

    // A broker does not start on a broken log: it says what to do.
    b.kill9();
    std::fs::write(&log, original.replacen("\"s/2\"", "\"s/7\"", 1)).unwrap();
    let out = b.serve_command().stderr(Stdio::piped()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("move") && err.contains("audit.log aside"), "{err}");
    // Restored, it starts and continues the chain.
    std::fs::write(&log, &original).unwrap();
    b.restart();
    b.ok(&["audit", "--verify"]);
}

#[test]
fn follow_streams_new_lines() {
    needs!(root);
    let b = Broker::start();
    let mut f = Command::new(BIN)
        .args(["audit", "--follow"])
        .env("KEYHOLE_SOCKET", b.socket())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(f.stdout.take().unwrap()).lines();
    // Stored lines first (start, the readiness status, this audit_read).
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("\"event\":\"start\""), "{first}");
    b.put("follow/me", b"followed-value-61b0");
    let found = lines.by_ref().take(20).map(Result::unwrap).any(|l| l.contains("\"path\":\"follow/me\""));
    f.kill().unwrap();
    f.wait().unwrap();
    assert!(found, "the put never reached the follower");
}

#[test]
fn with_reads_not_audited_denials_still_are() {
    needs!(root);
    let b = Broker::start_with("[audit]\nreads = false\n");
    b.put("app/key", b"quiet");
    b.ok(&["workload", "add", "w", "--selector", "unix:uid:1000"]);
    b.ok(&["grant", "app/key", "--to", "w", "--mode", "0444"]);
    let file = b.mount("w").join("key");
    let file = file.to_str().unwrap();
    assert_eq!(run_as(1000, &["cat", file]).stdout, b"quiet");
    assert!(!run_as(1001, &["cat", file]).status.success());
    assert!(b.audit_events("read").is_empty(), "a read was audited with [audit] reads = false");
    assert_eq!(b.audit_events("deny").len(), 1);
    assert_eq!(b.audit_events("grant").len(), 1);
    b.ok(&["audit", "--verify"]);
}

#[test]
fn a_rotated_audit_log_verifies_across_files_and_restarts_quickly() {
    needs!(root);
    let mut b = Broker::start_with("[audit]\nmax_bytes = 4096\nkeep = 2\nmin_keep = \"0s\"\n");
    for i in 0..40 {
        b.put(&format!("rot/{i}"), b"rotated-never-logged-5c1a");
    }
    let files = |b: &Broker| {
        let mut f: Vec<String> = std::fs::read_dir(b.state())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("audit.log."))
            .collect();
        f.sort();
        f
    };
    assert_eq!(files(&b).len(), 2, "keep = 2: {:?}", files(&b));
    let v = json(&b.ok(&["audit", "--verify", "--json"]));
    assert_eq!(v["ok"], true, "{v}");
    // `audit` prints the kept files and the current one, seq without gaps.
    let out = String::from_utf8(b.ok(&["audit"])).unwrap();
    let seqs: Vec<u64> = out.lines().map(|l| json(l.as_bytes())["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert_eq!(v["lines"].as_u64().unwrap() + 1, seqs.len() as u64, "verify, then its own line");
    assert!(out.contains("\"event\":\"audit_rotate\""));

    // A kill -9 and a start: only the current file is verified, and the
    // chain goes on across files.
    b.kill9();
    b.restart();
    b.put("rot/after", b"x");
    assert_eq!(json(&b.ok(&["audit", "--verify", "--json"]))["ok"], true);

    // An edit in a rotated file is caught.
    let oldest = b.state().join(&files(&b)[0]);
    let text = std::fs::read_to_string(&oldest).unwrap();
    let edited = text.replacen("\"rot/", "\"tor/", 1);
    assert_ne!(text, edited);
    std::fs::write(&oldest, edited).unwrap();
    assert_fails(&b.cli(&["audit", "--verify"]), 6, "hmac mismatch");
    b.assert_never_leaked(&[b"rotated-never-logged-5c1a"]);
}
