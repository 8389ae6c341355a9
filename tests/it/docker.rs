//! Real containers reading real mounts: the right container reads, the
//! wrong one is denied even with the right directory bound in, and
//! rotation, revocation and broker restarts reach a running container.

use crate::support::*;

fn secrets_bind(b: &Broker, workload: &str) -> String {
    format!("{}:/run/secrets:ro,rslave", b.mount(workload).display())
}

/// A unique label value per test, so parallel tests never match each other.
fn tag(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

#[test]
fn a_container_reads_its_workloads_secret_and_another_is_denied() {
    needs!(docker);
    let b = Broker::start();
    let (ta, tb) = (tag("a"), tag("b"));
    b.put("db/password", b"container-secret-c0ffee");
    b.ok(&["workload", "add", "a", "--selector", &format!("docker:label:keyhole.test={ta}")]);
    b.ok(&["workload", "add", "b", "--selector", &format!("docker:label:keyhole.test={tb}")]);
    b.ok(&["grant", "db/password", "--to", "a"]);

    let a = Container::start(&["--label", &format!("keyhole.test={ta}"), "-v", &secrets_bind(&b, "a")]);
    assert_eq!(a.cat("/run/secrets/password").unwrap(), b"container-secret-c0ffee");

    // Workload b's container, with a's directory bound in, is denied.
    let intruder = Container::start(&["--label", &format!("keyhole.test={tb}"), "-v", &secrets_bind(&b, "a")]);
    let err = intruder.cat("/run/secrets/password").unwrap_err();
    assert!(err.contains("Permission denied"), "{err}");
    // So is an unlabelled container.
    let stranger = Container::start(&["-v", &secrets_bind(&b, "a")]);
    assert!(stranger.cat("/run/secrets/password").unwrap_err().contains("Permission denied"));

    // The audit names each container, by id and name.
    let name = |c: &Container| {
        let o = docker(&["inspect", "--format", "{{.Name}}", &c.id]);
        String::from_utf8(o.stdout).unwrap().trim().trim_start_matches('/').to_owned()
    };
    let reads = b.audit_events("read");
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0]["caller"]["container_id"], a.id.as_str());
    assert_eq!(reads[0]["caller"]["container_name"], name(&a).as_str());
    assert_eq!(reads[0]["workload"], "a");
    let denies = b.audit_events("deny");
    let denied: Vec<&str> = denies.iter().map(|d| d["caller"]["container_id"].as_str().unwrap()).collect();
    assert_eq!(denied, [intruder.id.as_str(), stranger.id.as_str()]);
    b.assert_never_leaked(&[b"container-secret-c0ffee"]);
}

#[test]
fn a_running_container_sees_rotation_revocation_and_broker_restarts() {
    needs!(docker);
    let mut b = Broker::start();
    let t = tag("live");
    b.put("api/token", b"token-v1");
    b.ok(&["workload", "add", "web", "--selector", &format!("docker:label:keyhole.test={t}")]);
    b.ok(&["grant", "api/token", "--to", "web"]);
    let c = Container::start(&["--label", &format!("keyhole.test={t}"), "-v", &secrets_bind(&b, "web")]);
    assert_eq!(c.cat("/run/secrets/token").unwrap(), b"token-v1");

    b.cli_in(&["secret", "rotate", "api/token", "--stdin"], Some(b"token-v2"));
    assert_eq!(c.cat("/run/secrets/token").unwrap(), b"token-v2");

    b.ok(&["revoke", "api/token", "--from", "web"]);
    assert!(c.cat("/run/secrets/token").unwrap_err().contains("No such file"));
    b.ok(&["grant", "api/token", "--to", "web"]);
    assert_eq!(c.cat("/run/secrets/token").unwrap(), b"token-v2");

    // A clean restart: the mount goes and comes back inside the container.
    assert!(b.terminate().success());
    b.restart();
    assert_eq!(c.cat("/run/secrets/token").unwrap(), b"token-v2");
    // kill -9: the dead mount is replaced, still without restarting the container.
    b.kill9();
    b.restart();
    assert_eq!(c.cat("/run/secrets/token").unwrap(), b"token-v2");
    let reads = b.audit_events("read");
    assert!(reads.iter().all(|r| r["caller"]["container_id"] == c.id.as_str()));
}

#[test]
fn whoami_inside_a_container_names_the_container_and_its_workloads() {
    needs!(docker);
    let b = Broker::start();
    let t = tag("who");
    b.ok(&["workload", "add", "web", "--selector", &format!("docker:label:keyhole.test={t}")]);
    b.ok(&["workload", "add", "img", "--selector", &format!("docker:image:{IMAGE}")]);
    b.ok(&["workload", "add", "other", "--selector", "docker:label:keyhole.test=nope"]);
    let sock = format!("{}:/run/keyhole/workload.sock", b.workload_socket().display());
    let admin = format!("{}:/run/keyhole/admin.sock", b.socket().display());
    let bin = format!("{BIN}:/usr/local/bin/keyhole:ro");
    let c = Container::start(&[
        "--label",
        &format!("keyhole.test={t}"),
        "-v",
        &sock,
        "-v",
        &admin,
        "-v",
        &bin,
        "-v",
        "/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu:ro",
        "-v",
        "/lib64:/lib64:ro",
    ]);
    let o = c.exec(&["/usr/local/bin/keyhole", "whoami", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = json(&o.stdout);
    assert_eq!(w["container_id"], c.id.as_str());
    assert_eq!(w["host_process"], false);
    assert_eq!(w["admin"], false);
    assert_eq!(w["workloads"], serde_json::json!(["img", "web"]));
    assert!(w["selectors"].as_array().unwrap().iter().any(|s| *s == format!("docker:label:keyhole.test={t}").as_str()));
    // The same container, as root, is not an admin.
    let o = c.exec(&["/usr/local/bin/keyhole", "--socket", "/run/keyhole/workload.sock", "secret", "ls"]);
    assert_eq!(o.status.code(), Some(4), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("in container"));
    // Nor through the admin socket itself, bound in: who calls counts.
    let o = c.exec(&["/usr/local/bin/keyhole", "--socket", "/run/keyhole/admin.sock", "secret", "ls"]);
    assert_eq!(o.status.code(), Some(4), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("in container"));
}

#[test]
fn a_container_started_before_its_workload_existed_gets_the_mount() {
    needs!(docker);
    let b = Broker::start();
    let t = tag("early");
    // The directory does not exist yet: bind the workloads dir's future
    // child by creating it first, as an operator's unit would.
    std::fs::create_dir_all(b.mount("late")).unwrap();
    let c = Container::start(&["--label", &format!("keyhole.test={t}"), "-v", &secrets_bind(&b, "late")]);
    assert_eq!(c.exec(&["ls", "/run/secrets"]).stdout, b"");
    b.put("late/key", b"arrived-later");
    b.ok(&["workload", "add", "late", "--selector", &format!("docker:label:keyhole.test={t}")]);
    b.ok(&["grant", "late/key", "--to", "late"]);
    assert_eq!(c.cat("/run/secrets/key").unwrap(), b"arrived-later");
}

#[test]
fn a_renamed_container_loses_a_name_selector_through_the_event_stream() {
    needs!(docker);
    let b = Broker::start();
    let name = tag("named");
    b.put("n/key", b"by-name");
    b.ok(&["workload", "add", "byname", "--selector", &format!("docker:name:{name}")]);
    b.ok(&["grant", "n/key", "--to", "byname"]);
    let c = Container::start(&["--name", &name, "-v", &secrets_bind(&b, "byname")]);
    assert_eq!(c.cat("/run/secrets/key").unwrap(), b"by-name");
    assert!(docker(&["rename", &name, &format!("{name}-renamed")]).status.success());
    // The rename event evicts the cached name; allow the stream a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match c.cat("/run/secrets/key") {
            Err(e) if e.contains("Permission denied") => break,
            _ => assert!(std::time::Instant::now() < deadline, "the renamed container can still read"),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
#[ignore = "restarts dockerd, stopping every container: scripts/test.sh runs it alone"]
fn the_broker_follows_docker_across_a_dockerd_restart() {
    needs!(docker);
    let b = Broker::start();
    let name = tag("across");
    b.put("r/key", b"outlives-dockerd");
    b.ok(&["workload", "add", "across", "--selector", &format!("docker:name:{name}")]);
    b.ok(&["grant", "r/key", "--to", "across"]);
    let before = Container::start(&["--name", &name, "-v", &secrets_bind(&b, "across")]);
    assert_eq!(before.cat("/run/secrets/key").unwrap(), b"outlives-dockerd");

    restart_dockerd();
    drop(before);
    // A new container under the same name is looked up afresh and reads.
    let after = Container::start(&["--name", &name, "-v", &secrets_bind(&b, "across")]);
    assert_eq!(after.cat("/run/secrets/key").unwrap(), b"outlives-dockerd");
    // The events stream is back: a rename still evicts the cached name.
    assert!(docker(&["rename", &name, &format!("{name}-renamed")]).status.success());
    eventually(20, "the renamed container to be denied", || {
        after.cat("/run/secrets/key").is_err_and(|e| e.contains("Permission denied"))
    });
    assert!(b.log().contains("docker events stream back"), "{}", b.log());
}

#[test]
fn the_volume_driver_gives_each_container_its_own_checked_mount() {
    needs!(docker);
    let b = Broker::start_with_plugin();
    let d = b.plugin.as_str();
    let (tw, ta) = (tag("vol-web"), tag("vol-api"));
    b.put("db/password", b"web-volume-secret");
    b.put("api/token", b"api-volume-secret");
    b.ok(&["workload", "add", "web", "--selector", &format!("docker:label:keyhole.test={tw}")]);
    b.ok(&["workload", "add", "api", "--selector", &format!("docker:label:keyhole.test={ta}")]);
    b.ok(&["grant", "db/password", "--to", "web"]);
    b.ok(&["grant", "api/token", "--to", "api"]);

    // Bad options: a clear error from `docker volume create`.
    for (opts, words) in [
        (&["-o", "workload=nope"][..], "workload nope does not exist"),
        (&["-o", "size=1g"], "unknown option"),
        (&[], "workload= is required"),
        (&["-o", "workload=web", "-o", "mode=0600"], "only read bits"),
    ] {
        let mut args = vec!["volume", "create", "-d", d];
        args.extend_from_slice(opts);
        args.push("kh-bad");
        let o = docker(&args);
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains(words), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (vw, va) = (unique("web-secrets"), unique("api-secrets"));
    assert!(docker(&["volume", "create", "-d", d, "-o", "workload=web", &vw]).status.success());
    assert!(docker(&["volume", "create", "-d", d, "-o", "workload=api", &va]).status.success());

    let run = |label: &str, vol: &str, user: &str, cmd: &str| {
        let o = docker(&[
            "run",
            "--rm",
            "--user",
            user,
            "--label",
            &format!("keyhole.test={label}"),
            "-v",
            &format!("{vol}:/run/secrets"),
            IMAGE,
            "sh",
            "-c",
            cmd,
        ]);
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
    };
    // Each workload's container reads its own, as a non-root user too:
    // files belong to the container's configured user.
    assert_eq!(run(&tw, &vw, "1000", "cat /run/secrets/password"), (true, "web-volume-secret".into()));
    assert_eq!(run(&ta, &va, "0", "cat /run/secrets/token"), (true, "api-volume-secret".into()));
    let (_, listing) = run(&tw, &vw, "1000:1000", "stat -c '%u %g %a' /run/secrets/password");
    assert_eq!(listing.trim(), "1000 1000 400");
    // A user given by name is resolved through the container's own passwd.
    let (_, listing) = run(&tw, &vw, "app", "id -u; stat -c '%u %g' /run/secrets/password");
    assert_eq!(listing.split_whitespace().collect::<Vec<_>>(), ["1001", "1001", "1002"]);
    // A container of another workload that mounts the volume is denied.
    let (ok, out) = run(&ta, &vw, "0", "cat /run/secrets/password");
    assert!(!ok && out.contains("Permission denied"), "{out}");
    let denied = b.audit_events("deny");
    assert!(denied.iter().any(|e| e["workload"] == "web" && e["path"] == "db/password"));

    // Every container's mount is gone once it exits.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&b.run().join("volumes").display().to_string()), "volume mounts left behind");
    assert!(docker(&["volume", "rm", &vw]).status.success());
    assert!(docker(&["volume", "rm", &va]).status.success());
    let events: Vec<String> = b.audit_lines().iter().map(|l| l["event"].as_str().unwrap().to_owned()).collect();
    for e in ["volume_create", "volume_mount", "volume_unmount", "volume_remove"] {
        assert!(events.iter().any(|x| x == e), "no {e} in the audit log");
    }
    b.assert_never_leaked(&[b"web-volume-secret", b"api-volume-secret"]);
}

#[test]
fn notify_signals_the_containers_that_read_a_rotated_secret() {
    needs!(docker);
    let b = Broker::start();
    let t = tag("notify");
    b.put("app/config", b"cfg-v1");
    b.put("app/other", b"o1");
    b.ok(&["workload", "add", "app", "--selector", &format!("docker:label:keyhole.test={t}")]);
    b.ok(&["grant", "app/config", "--to", "app", "--notify", "HUP"]);
    b.ok(&["grant", "app/other", "--to", "app"]);
    assert_fails(&b.cli(&["grant", "app/config", "--to", "app", "--notify", "KILL"]), 2, "is not one of");
    let bind = secrets_bind(&b, "app");
    // PID 1 records each SIGHUP it gets.
    let script = "trap 'echo hup >> /tmp/hups' HUP; while true; do sleep 0.1; done";
    let label = format!("keyhole.test={t}");
    let opts = ["--label", label.as_str(), "-v", bind.as_str()];
    let reader = Container::run(&opts, &["sh", "-c", script]);
    let idle = Container::run(&opts, &["sh", "-c", script]);
    assert_eq!(reader.cat("/run/secrets/config").unwrap(), b"cfg-v1");
    // A grant without --notify signals nobody.
    b.cli_in(&["secret", "rotate", "app/other", "--stdin"], Some(b"o2"));
    b.cli_in(&["secret", "rotate", "app/config", "--stdin"], Some(b"cfg-v2"));
    eventually(10, "the reader got SIGHUP", || reader.cat("/tmp/hups").is_ok_and(|h| h == b"hup\n"));
    assert_eq!(reader.cat("/run/secrets/config").unwrap(), b"cfg-v2");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(idle.cat("/tmp/hups").is_err(), "a container that never read the secret was signalled");
    assert_eq!(reader.cat("/tmp/hups").unwrap(), b"hup\n", "signalled more than once");
    let n = b.audit_events("notify");
    assert_eq!(n.len(), 1);
    assert!(n[0]["reason"].as_str().unwrap().contains(&format!("sent SIGHUP to container {}", reader.id)));
}

#[test]
fn volume_mounts_past_max_mounts_are_refused_and_audited() {
    needs!(docker);
    // The workload's own mount is one; one container's volume the second.
    let b = Broker::start_with_plugin_config("[limits]\nmax_mounts = 2\n");
    let d = b.plugin.as_str();
    let t = tag("maxmounts");
    b.put("db/password", b"limited-volume-secret");
    b.ok(&["workload", "add", "web", "--selector", &format!("docker:label:keyhole.test={t}")]);
    b.ok(&["grant", "db/password", "--to", "web"]);
    let vol = unique("limited");
    assert!(docker(&["volume", "create", "-d", d, "-o", "workload=web", &vol]).status.success());
    let first = Container::run(
        &["--label", &format!("keyhole.test={t}"), "-v", &format!("{vol}:/run/secrets")],
        &["sleep", "600"],
    );
    assert_eq!(first.cat("/run/secrets/password").unwrap(), b"limited-volume-secret");
    let label = format!("keyhole.test={t}");
    let mount = format!("{vol}:/run/secrets");
    let another = |cmd: &[&str]| {
        let mut args = vec!["run", "--rm", "--label", &label, "-v", &mount, IMAGE];
        args.extend_from_slice(cmd);
        docker(&args)
    };
    let second = another(&["true"]);
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("max_mounts (2) reached"), "{err}");
    let limit = b.audit_events("limit");
    assert!(limit[0]["reason"].as_str().unwrap().starts_with("max_mounts (2) reached"), "{limit:?}");
    drop(first);
    eventually(30, "the first container's mount to go", || {
        json(&b.ok(&["mounts", "--json"])).as_array().unwrap().len() == 1
    });
    let third = another(&["cat", "/run/secrets/password"]);
    assert!(third.status.success(), "{}", String::from_utf8_lossy(&third.stderr));
    assert!(docker(&["volume", "rm", &vol]).status.success());
}

/// A container reading its own secret in a loop (each `cat` a new pid)
/// cannot fill the audit log: its first read of each version is a `read`
/// line, the rest are summed up in `read_summary` lines a second, and the
/// counts add up to every open. Before 0.2.0 each open wrote a line
/// (about 80,000 a second from one container on 2 cores).
#[test]
fn a_container_reading_in_a_loop_writes_a_line_per_version_and_a_summary_a_second() {
    needs!(docker);
    let addr = format!("127.0.0.1:{}", free_port());
    let b = Broker::start_with(&format!("[metrics]\nlisten = \"{addr}\"\n"));
    let t = tag("loop");
    b.put("app/key", b"looped-value-v1-7d21");
    b.ok(&["workload", "add", "w", "--selector", &format!("docker:label:keyhole.test={t}")]);
    b.ok(&["grant", "app/key", "--to", "w"]);
    let c = Container::start(&["--label", &format!("keyhole.test={t}"), "-v", &secrets_bind(&b, "w")]);
    const N: u64 = 2000;
    let started = std::time::Instant::now();
    let script = format!("i=0; while [ $i -lt {N} ]; do cat /run/secrets/key >/dev/null || exit 1; i=$((i+1)); done");
    let o = c.exec(&["sh", "-c", &script]);
    assert!(o.status.success(), "{}", stderr(&o));
    b.put("app/key", b"looped-value-v2-7d21");
    assert_eq!(c.cat("/run/secrets/key").unwrap(), b"looped-value-v2-7d21");
    let secs = started.elapsed().as_secs() + 2;

    let mine = |l: &serde_json::Value| l["caller"]["container_id"] == c.id.as_str();
    let reads: Vec<_> = b.audit_events("read").into_iter().filter(mine).collect();
    let versions: Vec<_> = reads.iter().map(|r| r["version"].as_u64().unwrap()).collect();
    assert!(versions == [1, 2], "one line in full per version read, not {} lines", versions.len());
    // Every open is accounted for once the last summary is written.
    let mut summed = 0;
    eventually(10, "the reads summed up", || {
        summed = b.audit_events("read_summary").iter().filter(|l| mine(l)).map(|l| l["count"].as_u64().unwrap()).sum();
        summed == N - 1
    });
    let summaries: Vec<_> = b.audit_events("read_summary").into_iter().filter(mine).collect();
    assert!(summaries.len() as u64 <= secs + 1, "{} summaries for {N} reads in {secs} s", summaries.len());
    assert!(summaries.iter().all(|s| s["files"] == serde_json::json!(["w:app/key@1"])), "{summaries:?}");
    // The metrics count every open.
    let m = scrape(&addr);
    assert_eq!(sample(&m, "keyhole_reads_total{workload=\"w\",secret=\"app/key\"}"), (N + 1) as f64, "{m}");
    b.ok(&["audit", "--verify"]);
    b.assert_never_leaked(&[b"looped-value-v1-7d21", b"looped-value-v2-7d21"]);
}
