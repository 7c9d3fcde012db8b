//! Upgrades over HTTP against the real nginx that `make test` starts: the
//! seed's message end to end, kill -9 at random moments and at every named
//! crash point, verification failures, a file that changes on the server
//! between crash and resume, and duplicate messageIds.

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(120);

/// The seed's first message on our nginx, without credentials.
fn seed_request(servers: &Servers, fw: &Firmware) -> Value {
    let text = include_str!("../examples/requests/seed-1-ftp.json");
    let mut req = seed_on(text, "http", servers.nginx_port, fw);
    req["info"]["serverConfig"]["userName"] = "".into();
    req["info"]["serverConfig"]["password"] = "".into();
    req
}

#[test]
fn seed_message_installs_the_image() {
    let servers = Servers::from_env();
    let fw = servers.put_http("seed", 66143);
    let dir = temp_dir();
    let target = dir.path().join("flash.bin");
    let req = seed_request(&servers, &fw);
    let run = run_stdio_upgrade(
        &dir.path().join("state"),
        &target,
        std::slice::from_ref(&req),
        &no_env(),
        LONG,
    );
    assert_installed(&run, &req, &fw, &dir.path().join("state"), &target);
}

#[test]
fn basic_auth_credentials_are_sent_and_wrong_ones_refused() {
    let servers = Servers::from_env();
    let fw = servers.put_http("auth", 100_000);
    let dir = temp_dir();
    let target = dir.path().join("flash.bin");
    let ok = servers.http_auth_request(&fw);
    let run = run_stdio_upgrade(&dir.path().join("s1"), &target, &[ok], &no_env(), LONG);
    assert_eq!(
        results(&run.json_lines())[0]["result"]["errorNo"],
        0,
        "{run}"
    );
    assert_eq!(md5_file(&target), fw.md5);

    let mut bad = servers.http_auth_request(&fw);
    bad["info"]["serverConfig"]["password"] = b64("not-the-password").into();
    let run = run_stdio_upgrade(&dir.path().join("s2"), &target, &[bad], &no_env(), LONG);
    let lines = run.json_lines();
    assert_eq!(results(&lines)[0]["result"]["errorNo"], 21, "{run}");
    assert!(
        !run.stderr.contains(&servers.http_pass),
        "the password reached the log"
    );
}

#[test]
fn missing_file_and_dead_server_map_to_their_results() {
    let servers = Servers::from_env();
    let mut fw = servers.put_http("missing", 1000);
    std::fs::remove_file(&fw.path).unwrap();
    let dir = temp_dir();
    let target = dir.path().join("flash.bin");
    let run = run_stdio_upgrade(
        &dir.path().join("s1"),
        &target,
        &[servers.http_request(&fw)],
        &no_env(),
        LONG,
    );
    assert_eq!(
        results(&run.json_lines())[0]["result"]["errorNo"],
        22,
        "{run}"
    );

    // Nothing listens on a port we just freed: 20 after the bounded retries.
    fw.name = "x.bin".into();
    let mut req = servers.http_request(&fw);
    req["info"]["serverConfig"]["port"] = free_port().into();
    let mut cmd = fwagent([
        "run",
        "--transport",
        "stdio",
        "--download-attempts",
        "3",
        "--retry-base-ms",
        "50",
        "--state-dir",
    ]);
    cmd.arg(dir.path().join("s2"))
        .arg("--flash")
        .arg(file_flash(&target));
    let started = Instant::now();
    let run = run_with_timeout(cmd, format!("{req}\n").as_bytes(), LONG);
    let lines = run.json_lines();
    assert_eq!(results(&lines)[0]["result"]["errorNo"], 20, "{run}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "retries are bounded"
    );
    assert!(unflashed(&target), "nothing is flashed");
}

#[test]
fn wrong_md5_fails_with_31_and_leaves_the_target_alone() {
    let servers = Servers::from_env();
    let fw = servers.put_http("badmd5", 200_000);
    let dir = temp_dir();
    let target = dir.path().join("flash.bin");
    std::fs::write(&target, b"the old image").unwrap();
    let mut req = servers.http_request(&fw);
    req["info"]["fileInfo"]["md5sum"] = "0123456789abcdef0123456789abcdef".into();
    let run = run_stdio_upgrade(&dir.path().join("state"), &target, &[req], &no_env(), LONG);
    let lines = run.json_lines();
    let r = results(&lines);
    assert_eq!(r.len(), 1, "{run}");
    assert_eq!(r[0]["result"]["errorNo"], 31, "{run}");
    assert_eq!(r[0]["info"]["phase"], "failed");
    assert_eq!(std::fs::read(&target).unwrap(), b"the old image");
}

/// `--exit-code`: a one-shot stdio run exits 1 when the upgrade it carried
/// ended with errorNo other than 0, 0 when it completed; without the flag it
/// exits 0 either way (INTERFACE.md). A restart that only finishes an upgrade
/// a crashed run left is judged by how that upgrade ends.
#[test]
fn exit_code_makes_a_failed_one_shot_upgrade_exit_1() {
    let servers = Servers::from_env();
    let fw = servers.put_http("exitcode", 100_000);
    let dir = temp_dir();
    let target = dir.path().join("flash.bin");
    std::fs::write(&target, b"the old image").unwrap();
    let good = servers.http_request(&fw);
    let mut bad = servers.http_request(&fw);
    bad["info"]["fileInfo"]["md5sum"] = "0123456789abcdef0123456789abcdef".into();
    for (name, req, flags, want) in [
        ("bad-with", &bad, &["--exit-code"][..], 1),
        ("bad-without", &bad, &[][..], 0),
        ("good-with", &good, &["--exit-code"][..], 0),
    ] {
        let state = dir.path().join(name);
        let run = run_agent(&state, &target, flags, std::slice::from_ref(req), LONG);
        let lines = run.json_lines();
        assert_eq!(results(&lines).len(), 1, "{name}: {run}");
        assert_eq!(run.code(), Some(want), "{name}: {run}");
        if want == 1 {
            assert!(run.stderr.contains("errorNo 31"), "{name}: {run}");
        }
        // A second run over the same store carries nothing: the failed
        // upgrade of the first is not judged again.
        let again = run_agent(&state, &target, flags, &[], LONG);
        assert_eq!(again.code(), Some(0), "{name}, again: {again}");
    }
}

#[test]
fn wrong_size_fails_with_30() {
    let servers = Servers::from_env();
    let fw = servers.put_http("badsize", 200_000);
    let dir = temp_dir();
    let target = dir.path().join("flash.bin");
    for size in [199_999u64, 200_001] {
        let mut req = servers.http_request(&fw);
        req["info"]["fileInfo"]["upgradeFileSize"] = size.into();
        let state = dir.path().join(format!("state-{size}"));
        let run = run_stdio_upgrade(&state, &target, &[req], &no_env(), LONG);
        assert_eq!(
            results(&run.json_lines())[0]["result"]["errorNo"],
            30,
            "{run}"
        );
        assert!(unflashed(&target), "nothing is flashed");
    }
}

#[test]
fn same_message_id_twice_gets_the_same_ack_and_one_download() {
    let servers = Servers::from_env();
    let fw = servers.put_http("dup", 300_000);
    let dir = temp_dir();
    let state = dir.path().join("state");
    let target = dir.path().join("flash.bin");
    let req = servers.http_request(&fw);
    let run = run_stdio_upgrade(
        &state,
        &target,
        &[req.clone(), req.clone()],
        &no_env(),
        LONG,
    );
    let lines = run.json_lines();
    let acks: Vec<_> = lines
        .iter()
        .filter(|v| operator(v) == "setCloudUpgradeConfig-Ack")
        .collect();
    assert_eq!(acks.len(), 2, "{run}");
    assert_eq!(acks[0], acks[1]);
    assert_eq!(acks[0]["result"]["errorNo"], 0);
    assert_eq!(results(&lines).len(), 1, "{run}");

    // Again after completion: the same ack, nothing new.
    let run = run_stdio_upgrade(&state, &target, &[req], &no_env(), LONG);
    let again = run.json_lines();
    assert_eq!(again.len(), 1, "{run}");
    assert_eq!(&again[0], acks[0]);
    let gets = servers.nginx_requests(&fw.uri("/"));
    assert_eq!(gets.len(), 1, "one download: {gets:#?}");
}

/// Issue 16, item 5 (docs/PROTOCOL-NOTES.md): a second messageId for the
/// active upgrade's image joins it: one download, a result report for each
/// request, and a replay later gets the join's ack again.
#[test]
fn the_same_image_under_another_message_id_joins_and_gets_its_own_result() {
    let servers = Servers::from_env();
    let fw = servers.put_http("join", 300_000);
    let dir = temp_dir();
    let state = dir.path().join("state");
    let target = dir.path().join("flash.bin");
    // 1 MB/s: the second request comes while the first is downloading.
    let first = upgrade_request("http", servers.nginx_port, "/slow/", &fw, "", "");
    let mut second = first.clone();
    second["messageId"] = "MID:join-second".into();
    second["sessionId"] = "SID:join-second".into();
    let run = run_stdio_upgrade(
        &state,
        &target,
        &[first.clone(), second.clone()],
        &no_env(),
        LONG,
    );
    let lines = run.json_lines();
    let ack = lines
        .iter()
        .find(|v| v["messageId"] == "MID:join-second")
        .expect("the second request's ack");
    assert_eq!(ack["result"]["errorNo"], 0, "{run}");
    let joined = format!(
        "ok: joined upgrade {}",
        first["messageId"].as_str().unwrap()
    );
    assert_eq!(ack["result"]["description"], joined.as_str(), "{run}");
    let results = results(&lines);
    let mut answered: Vec<_> = results
        .iter()
        .map(|r| {
            assert_eq!(r["result"]["errorNo"], 0, "{r}");
            (
                r["info"]["requestMessageId"].clone(),
                r["sessionId"].clone(),
            )
        })
        .collect();
    answered.sort_by_key(|(mid, _)| mid.to_string());
    let mut expected = vec![
        (first["messageId"].clone(), first["sessionId"].clone()),
        (second["messageId"].clone(), second["sessionId"].clone()),
    ];
    expected.sort_by_key(|(mid, _)| mid.to_string());
    assert_eq!(answered, expected, "{run}");
    assert_eq!(std::fs::read(&target).expect("flashed"), fw.bytes());

    let run = run_stdio_upgrade(&state, &target, &[second], &no_env(), LONG);
    let again = run.json_lines();
    assert_eq!(again.len(), 1, "{run}");
    assert_eq!(&again[0], ack);
    let gets = servers.nginx_requests(&fw.uri("/slow/"));
    assert_eq!(gets.len(), 1, "one download: {gets:#?}");
}

/// Issue 16, item 11, on the real binary: the agent is killed mid-download,
/// sled's files are damaged so that the store no longer opens, and the next
/// start moves the store aside, says so, resumes from the redundant record
/// and completes the upgrade; the repeated request still gets its ack.
#[test]
fn a_store_that_will_not_open_does_not_end_the_upgrade() {
    let servers = Servers::from_env();
    let (fw, req) = twelve_mib_upgrade(&servers, "unopenable");
    let dir = temp_dir();
    let state = dir.path().join("state");
    let target = dir.path().join("flash.bin");
    let env = HashMap::from([("FWAGENT_CRASH_AT", "after-checkpoint")]);
    let first = run_stdio_upgrade(&state, &target, std::slice::from_ref(&req), &env, LONG);
    assert_eq!(first.signal(), Some(libc::SIGKILL), "{first}");
    std::fs::write(state.join("db/conf"), b"\x00garbage\x01").expect("write");
    let data = state.join("db/db");
    let len = std::fs::metadata(&data).expect("stat").len();
    std::fs::write(&data, vec![0xA5u8; len as usize]).expect("write");

    let second = run_stdio_upgrade(&state, &target, std::slice::from_ref(&req), &no_env(), LONG);
    assert_eq!(second.code(), Some(0), "{second}");
    assert!(
        second.stderr.contains("THE STORE WOULD NOT OPEN"),
        "{second}"
    );
    let lines = second.json_lines();
    let ack = &lines[0];
    assert_eq!(operator(ack), "setCloudUpgradeConfig-Ack", "{second}");
    assert_eq!(ack["result"]["errorNo"], 0, "the first ack again: {second}");
    let r = results(&lines);
    assert_eq!(r.len(), 1, "{second}");
    assert_eq!(r[0]["result"]["errorNo"], 0, "{second}");
    assert_eq!(std::fs::read(&target).expect("flashed"), fw.bytes());
    let kept: Vec<_> = std::fs::read_dir(&state)
        .expect("read_dir")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("db.unopenable-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the old store is kept for inspection");
}

fn twelve_mib_upgrade(servers: &Servers, prefix: &str) -> (Firmware, Value) {
    let fw = servers.put_http(prefix, 12 << 20);
    let req = servers.http_request(&fw);
    (fw, req)
}

#[test]
fn every_crash_point_recovers_to_a_completed_upgrade() {
    let servers = Servers::from_env();
    let points = [
        "before-request-commit",
        "after-accept",
        "mid-download",
        "after-checkpoint-fsync",
        "after-checkpoint",
        "after-download",
        "mid-verify",
        "mid-flash",
        "after-flash",
        "before-delivered",
    ];
    for point in points {
        let (fw, req) = twelve_mib_upgrade(&servers, point);
        let dir = temp_dir();
        let state = dir.path().join("state");
        let target = dir.path().join("flash.bin");
        let env = HashMap::from([("FWAGENT_CRASH_AT", point)]);
        let first = run_stdio_upgrade(&state, &target, std::slice::from_ref(&req), &env, LONG);
        assert_eq!(
            first.signal(),
            Some(libc::SIGKILL),
            "{point}: the crash point fired: {first}"
        );
        // Over stdio a request read but never committed is gone: the cloud
        // (or MQTT's redelivery) sends it again.
        let again: Vec<Value> = if point == "before-request-commit" {
            vec![req.clone()]
        } else {
            vec![]
        };
        let second = run_stdio_upgrade(&state, &target, &again, &no_env(), LONG);
        assert_eq!(second.code(), Some(0), "{point}: {second}");
        let lines = all_lines(&[first, second]);
        let first_ack = lines
            .iter()
            .position(|v| operator(v) == "setCloudUpgradeConfig-Ack");
        let first_report = lines.iter().position(|v| operator(v).starts_with("report"));
        assert!(
            first_ack.is_some() && first_ack < first_report,
            "{point}: the ack comes first: {lines:#?}"
        );
        let r = results(&lines);
        assert!(!r.is_empty(), "{point}: a result was reported");
        assert!(
            r.iter()
                .all(|v| v["result"]["errorNo"] == 0 && v["messageId"] == r[0]["messageId"]),
            "{point}: one result, completed: {r:#?}"
        );
        assert_eq!(md5_file(&target), fw.md5, "{point}: the right image");
    }
}

/// The partial file gone after a crash in `verifying` or `flashing` (its
/// directory entry was never durable, or someone removed it): the image is
/// downloaded again and the upgrade completes. Before, verifying ended in a
/// final 23 and flashing in 50 ("cannot open the image").
#[test]
fn an_image_gone_after_a_crash_is_downloaded_again() {
    let servers = Servers::from_env();
    for point in ["mid-verify", "mid-flash"] {
        let (fw, req) = twelve_mib_upgrade(&servers, point);
        let dir = temp_dir();
        let state = dir.path().join("state");
        let target = dir.path().join("flash.bin");
        let env = HashMap::from([("FWAGENT_CRASH_AT", point)]);
        let first = run_stdio_upgrade(&state, &target, std::slice::from_ref(&req), &env, LONG);
        assert_eq!(first.signal(), Some(libc::SIGKILL), "{point}: {first}");
        let parts: Vec<_> = std::fs::read_dir(state.join("downloads"))
            .expect("downloads/")
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(parts.len(), 1, "{point}: one partial file: {parts:?}");
        std::fs::remove_file(&parts[0]).expect("remove the partial file");
        let second = run_stdio_upgrade(&state, &target, &[], &no_env(), LONG);
        assert_eq!(second.code(), Some(0), "{point}: {second}");
        let ResultReport {
            error_no, phase, ..
        } = only_result(&second);
        assert_eq!(
            (error_no, phase.as_str()),
            (0, "completed"),
            "{point}: {second}"
        );
        assert_eq!(md5_file(&target), fw.md5, "{point}: the right image");
        assert_eq!(
            servers.nginx_requests(&fw.uri("/")).len(),
            2,
            "{point}: fetched once more"
        );
    }
}

/// Power cuts during flashing, again and again: a start of flashing after a
/// restart of the machine (another boot id) is no attempt, so four cuts in a
/// row still end completed; restarts of the agent alone (the same boot id, a
/// crash loop) give up after three. Before, the fourth start gave up with 50
/// either way (`make powercut CUTS=100`, seed 795654798, round 15).
#[test]
fn power_cuts_during_flashing_are_no_attempts_but_crash_loops_are() {
    let servers = Servers::from_env();
    for reboots in [true, false] {
        let (fw, req) = twelve_mib_upgrade(&servers, &format!("cuts-{reboots}"));
        let dir = temp_dir();
        let state = dir.path().join("state");
        let target = dir.path().join("flash.bin");
        let mut runs = Vec::new();
        let mut input = vec![req.clone()];
        let last = loop {
            let n = runs.len();
            let boot = format!("boot-{}", if reboots { n } else { 0 });
            let mut env = HashMap::from([("FWAGENT_BOOT_ID", boot.as_str())]);
            if n < 4 {
                env.insert("FWAGENT_CRASH_AT", "mid-flash");
            }
            let run = run_stdio_upgrade(&state, &target, &input, &env, LONG);
            input.clear();
            if run.signal() != Some(libc::SIGKILL) {
                break run;
            }
            assert!(
                n < 4,
                "reboots={reboots}: crashed without a crash point: {run}"
            );
            runs.push(run);
        };
        assert_eq!(last.code(), Some(0), "reboots={reboots}: {last}");
        let ResultReport {
            error_no,
            phase,
            description,
            ..
        } = only_result(&last);
        if reboots {
            assert_eq!(runs.len(), 4, "four cuts during flashing: {last}");
            assert_eq!(
                (error_no, phase.as_str()),
                (0, "completed"),
                "{description}"
            );
            assert_eq!(md5_file(&target), fw.md5, "the right image");
        } else {
            assert_eq!(runs.len(), 3, "the third restart gives up: {last}");
            assert_eq!((error_no, phase.as_str()), (50, "failed"), "{description}");
            assert!(
                description.contains("gave up after 3 attempts at flashing"),
                "{description}"
            );
        }
    }
}

#[test]
fn kill_9_at_random_moments_resumes_and_completes() {
    let servers = Servers::from_env();
    let size: u64 = 64 << 20;
    let checkpoint: u64 = 4 << 20;
    let fw = servers.put_http("kill9", size);
    // Served at a limited rate, so the kills land across the whole download.
    let mut req = servers.http_request(&fw);
    req["info"]["serverConfig"]["path"] = "/slow8m/".into();
    let uri = fw.uri("/slow8m/");
    let dir = temp_dir();
    let state = dir.path().join("state");
    let target = dir.path().join("flash.bin");
    // Kills every few hundred ms often land before a checkpoint; this test is
    // about resuming, not about the loop guard (state/tests has that).
    let extra = [
        "--checkpoint-bytes",
        "4194304",
        "--download-attempts",
        "100",
    ];
    let kills: u64 = 30;
    kill_rounds_then_complete(&state, &target, &extra, &req, kills, &fw.md5);
    let sent = servers.nginx_body_bytes_sent(&uri);
    eprintln!("served {sent} bytes for a {size}-byte image over {kills} kills");
    assert!(
        sent <= size + kills * checkpoint,
        "resumed rather than restarted: served {sent} bytes, bound {}",
        size + kills * checkpoint
    );
}

#[test]
fn a_file_changed_between_crash_and_resume_is_fetched_again_not_spliced() {
    let servers = Servers::from_env();
    // The request names image B; the server first has A (same size), then B.
    let (mut fw, mut req) = twelve_mib_upgrade(&servers, "changed");
    let a_md5 = fw.md5.clone();
    let b_seed = fw.seed ^ 0xdead_beef;
    let b_md5 = write_firmware(&temp_dir().path().join("b"), fw.len, b_seed);
    assert_ne!(a_md5, b_md5);
    req["info"]["fileInfo"]["md5sum"] = b_md5.clone().into();
    let dir = temp_dir();
    let state = dir.path().join("state");
    let target = dir.path().join("flash.bin");
    let env = HashMap::from([("FWAGENT_CRASH_AT", "after-checkpoint")]);
    let first = run_stdio_upgrade(&state, &target, &[req], &env, LONG);
    assert_eq!(first.signal(), Some(libc::SIGKILL), "{first}");
    // Replace the file (a new mtime, so a new ETag and Last-Modified).
    std::thread::sleep(Duration::from_millis(1100));
    fw.rewrite(b_seed);
    assert_eq!(fw.md5, b_md5);
    let second = run_stdio_upgrade(&state, &target, &[], &no_env(), LONG);
    let lines = second.json_lines();
    let r = results(&lines);
    assert_eq!(r.len(), 1, "{second}");
    assert_eq!(
        r[0]["result"]["errorNo"], 0,
        "no splice of A and B: {second}"
    );
    assert_eq!(md5_file(&target), b_md5);
}

#[test]
fn request_size_and_id_limits_come_from_the_flags() {
    let servers = Servers::from_env();
    let fw = servers.put_http("limits", 1000);
    let dir = temp_dir();
    let mut cmd = fwagent([
        "run",
        "--transport",
        "stdio",
        "--max-request-bytes",
        "300",
        "--max-id-bytes",
        "12",
        "--state-dir",
    ]);
    cmd.arg(dir.path().join("state"))
        .arg("--flash")
        .arg(file_flash(&dir.path().join("flash.bin")));
    let big = servers.http_request(&fw); // longer than 300 bytes
    assert!(big.to_string().len() > 300);
    let run = run_with_timeout(cmd, format!("{big}\n").as_bytes(), LONG);
    let lines = run.json_lines();
    assert_eq!(lines.len(), 1, "{run}");
    assert_eq!(lines[0]["result"]["errorNo"], 1, "{run}");
    assert!(
        lines[0]["result"]["description"]
            .as_str()
            .unwrap()
            .contains("300"),
        "{run}"
    );

    let mut cmd = fwagent([
        "run",
        "--transport",
        "stdio",
        "--max-id-bytes",
        "12",
        "--state-dir",
    ]);
    cmd.arg(dir.path().join("state2"))
        .arg("--flash")
        .arg(file_flash(&dir.path().join("flash.bin")));
    let run = run_with_timeout(cmd, format!("{big}\n").as_bytes(), LONG);
    let lines = run.json_lines();
    assert_eq!(lines[0]["result"]["errorNo"], 4, "{run}");
    assert!(
        lines[0]["result"]["description"]
            .as_str()
            .unwrap()
            .contains("sessionId"),
        "{run}"
    );
}

/// The seed's second message carries enciphered credentials: with a
/// credentials decoder the agent parses it off its actor and installs it,
/// and stdin's EOF right behind it does not end the agent before the decision.
#[test]
fn seed_two_with_a_credentials_decoder_installs_the_image() {
    let servers = Servers::from_env();
    let fw = servers.put_http("seed2", 50_000);
    let text = include_str!("../examples/requests/seed-2-ftp-enciphered.json");
    assert!(
        text.contains("totalSize"),
        "the second seed spells the size totalSize"
    );
    let req = seed_on(text, "http", servers.nginx_port, &fw);
    let dir = temp_dir();
    let target = dir.path().join("flash.bin");
    let decoder = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/decode-credentials.sh"
    );
    let mut cmd = fwagent([
        "run",
        "--transport",
        "stdio",
        "--credentials-decoder",
        decoder,
        "--state-dir",
    ]);
    cmd.arg(dir.path().join("state"))
        .arg("--flash")
        .arg(file_flash(&target));
    let run = run_with_timeout(cmd, format!("{req}\n").as_bytes(), LONG);
    assert_installed(&run, &req, &fw, &dir.path().join("state"), &target);
}
