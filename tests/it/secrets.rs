//! The secret CLI end to end: values, versions, listing, input rules.

use crate::support::*;

#[test]
fn binary_values_round_trip_exactly() {
    needs!(root);
    let b = Broker::start();
    let value: Vec<u8> = (0..=255u8).chain([0, 0, b'\n', 0xff]).collect();
    assert_eq!(b.put("bin/blob", &value), 1);
    assert_eq!(b.get("bin/blob"), value);
    let j = json(&b.ok(&["secret", "get", "bin/blob", "--json"]));
    assert_eq!(j["version"], 1);
    assert_eq!(j["size"], value.len());
    // A file source keeps every byte too.
    let f = b.dir.path().join("v.bin");
    std::fs::write(&f, &value[..100]).unwrap();
    b.ok(&["secret", "put", "bin/file", "--from-file", f.to_str().unwrap()]);
    assert_eq!(b.get("bin/file"), &value[..100]);
}

#[test]
fn rotate_adds_versions_and_history_keeps_them() {
    needs!(root);
    let b = Broker::start_with("history_depth = 3\n");
    b.put("db/password", b"pw-one-4f9a");
    let out = b.cli(&["secret", "rotate", "db/password", "--generate", "32", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = json(&out.stdout);
    assert_eq!((v["version"].as_u64(), v["size"].as_u64()), (Some(2), Some(32)));
    assert!(!contains(&out.stdout, &b.get("db/password")), "a generated value was echoed");
    let generated = b.get("db/password");
    assert_eq!(generated.len(), 32);
    assert!(generated.iter().all(u8::is_ascii_alphanumeric));
    b.cli_in(&["secret", "rotate", "db/password", "--stdin"], Some(b"pw-three-77c1"));
    b.cli_in(&["secret", "rotate", "db/password", "--stdin"], Some(b"pw-four-0b2e"));
    let h = json(&b.ok(&["secret", "history", "db/password", "--json"]));
    let kept: Vec<u64> = h.as_array().unwrap().iter().map(|v| v["version"].as_u64().unwrap()).collect();
    assert_eq!(kept, [2, 3, 4], "history_depth = 3 keeps the last three");
    assert_eq!(b.ok(&["secret", "get", "db/password", "--version", "3"]), b"pw-three-77c1");
    assert_eq!(b.get("db/password"), b"pw-four-0b2e");
    assert_fails(&b.cli(&["secret", "get", "db/password", "--version", "1"]), 3, "no version 1 (kept: 2-4)");
    // Rotating something that does not exist is an error; put creates.
    assert_fails(&b.cli(&["secret", "rotate", "db/nope", "--generate", "8"]), 3, "db/nope does not exist");
    let text = String::from_utf8(b.ok(&["secret", "history", "db/password"])).unwrap();
    assert!(text.lines().last().unwrap().ends_with("  current"), "{text}");
    b.assert_never_leaked(&[b"pw-one-4f9a", b"pw-three-77c1", b"pw-four-0b2e", &generated]);
}

#[test]
fn ls_and_rm() {
    needs!(root);
    let b = Broker::start();
    for p in ["db/a", "db/b", "dbx", "web/token"] {
        b.put(p, b"x");
    }
    let names = |args: &[&str]| -> Vec<String> {
        json(&b.ok(args)).as_array().unwrap().iter().map(|v| v["path"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(names(&["secret", "ls", "--json"]), ["db/a", "db/b", "dbx", "web/token"]);
    assert_eq!(names(&["secret", "ls", "db", "--json"]), ["db/a", "db/b"]);
    let table = String::from_utf8(b.ok(&["secret", "ls"])).unwrap();
    assert!(table.starts_with("VERSION") && table.lines().nth(4).unwrap().ends_with("  web/token"), "{table}");
    assert_eq!(String::from_utf8(b.ok(&["secret", "rm", "db/a"])).unwrap(), "removed db/a (1 versions)\n");
    assert_fails(&b.cli(&["secret", "get", "db/a"]), 3, "does not exist");
    assert_fails(&b.cli(&["secret", "rm", "db/a"]), 3, "does not exist");
    assert_eq!(names(&["secret", "ls", "db", "--json"]), ["db/b"]);
}

#[test]
fn the_store_files_never_hold_a_plaintext_value() {
    needs!(root);
    let mut b = Broker::start();
    let values: Vec<Vec<u8>> = (0..20).map(|i| format!("plaintext-marker-{i:03}-e1c9d2").into_bytes()).collect();
    for (i, v) in values.iter().enumerate() {
        b.put(&format!("scan/s{}", i % 5), v);
    }
    assert!(b.terminate().success());
    let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    b.assert_never_leaked(&refs);
    let store = std::fs::read(b.state().join("store.redb")).unwrap();
    assert!(!contains(&store, b"plaintext-marker"), "plaintext in store.redb");
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    needs!(root);
    let b = Broker::start_with("max_value_bytes = 1024\n");
    b.put("ok", b"kept-value-5d1e");
    for (path, words) in [
        ("../etc/passwd", "'.' or '..' segment"),
        ("/abs", "empty segment"),
        ("a b", "character outside"),
        ("a//b", "empty segment"),
    ] {
        assert_fails(&b.cli(&["secret", "put", path, "--generate", "4"]), 2, words);
    }
    let long = "a".repeat(257);
    assert_fails(&b.cli(&["secret", "put", &long, "--generate", "4"]), 2, "257 bytes; the limit is 256");
    assert_fails(
        &b.cli_in(&["secret", "put", "ok", "--stdin"], Some(&[b'x'; 1025])),
        2,
        "1025 bytes; the limit is 1024",
    );
    assert_fails(&b.cli_in(&["secret", "put", "ok", "--stdin"], Some(b"")), 2, "the value is empty");
    assert_fails(&b.cli(&["secret", "put", "ok", "--generate", "2000"]), 2, "must be 1 to 1024");
    assert!(b.cli_in(&["secret", "put", "max", "--stdin"], Some(&[b'y'; 1024])).status.success());
    // Usage errors come from clap, with exit 2.
    for args in [
        &["secret", "put", "x"][..],
        &["secret", "put", "x", "--stdin", "--generate", "3"],
        &["secret", "put", "x", "--generate", "0"],
        &["secret", "get"],
        &["secret", "frobnicate"],
    ] {
        let o = b.cli(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    let missing = b.cli(&["secret", "put", "x", "--from-file", "/nonexistent/file"]);
    assert_fails(&missing, 1, "cannot open /nonexistent/file");
    // Nothing above touched the stored secret.
    assert_eq!(b.get("ok"), b"kept-value-5d1e");
    assert_eq!(json(&b.ok(&["secret", "history", "ok", "--json"])).as_array().unwrap().len(), 1);
}

#[test]
fn an_unreachable_broker_is_exit_5() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin.sock");
    let o = cli_as(&sock, &["secret", "ls"], None, None);
    assert_fails(&o, 5, "is `keyhole serve` running?");
    // A stale socket file with no listener behind it.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert_fails(&cli_as(&sock, &["status"], None, None), 5, "not running");
}

#[test]
fn help_documents_exit_codes_and_examples() {
    let o = std::process::Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8(o.stdout).unwrap();
    assert!(help.contains("Exit status:") && help.contains("6  integrity failure"), "{help}");
    let o = std::process::Command::new(BIN).args(["secret", "put", "--help"]).output().unwrap();
    let help = String::from_utf8(o.stdout).unwrap();
    assert!(help.contains("--generate <N>") && help.contains("never goes on the command line"), "{help}");
}
