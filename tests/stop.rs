//! SIGTERM and SIGINT (systemd sends SIGTERM on every reboot): the agent
//! checkpoints what it has received, lets the store settle, delivers its
//! outbox and exits 0, and the next start fetches none of those bytes again.
//! Against the real nginx of `make test` (its `/slow/` location, 1 MB/s).

mod common;

use common::*;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The offset in the first log line of stderr containing `what`.
fn logged_offset(stderr: &str, what: &str) -> Option<u64> {
    let line = stderr.lines().find(|l| l.contains(what))?;
    let at = line.find("offset=")? + "offset=".len();
    let digits: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Start the agent on `req` (stdin left open: the cloud is still there),
/// send `signal` after `after`, and return its exit code, stdout and stderr.
fn run_and_signal(
    state: &std::path::Path,
    target: &std::path::Path,
    req: &serde_json::Value,
    signal: i32,
    after: Duration,
) -> (Option<i32>, String, String) {
    let mut cmd = stdio_agent(state, &file_flash(target), &[]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn fwagent");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{req}").expect("write the request");
    std::thread::sleep(after);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the agent did not stop within 30 s of the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stdin);
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Before the fix a stop at 2.5 MB resumed from the last checkpoint (0 here,
/// at 4 MiB checkpoints), and everything received was fetched again.
#[test]
fn sigterm_mid_download_checkpoints_and_the_next_start_refetches_nothing() {
    let servers = Servers::from_env();
    for (signal, name) in [(libc::SIGTERM, "sigterm"), (libc::SIGINT, "sigint")] {
        let fw = servers.put_http(name, 12 << 20);
        let mut req = servers.http_request(&fw);
        req["info"]["serverConfig"]["path"] = "/slow/".into();
        let uri = fw.uri("/slow/");
        let dir = temp_dir();
        let state = dir.path().join("state");
        let target = dir.path().join("flash.bin");
        std::fs::write(&target, b"").expect("the flash target");
        let (code, stdout, stderr) =
            run_and_signal(&state, &target, &req, signal, Duration::from_millis(2500));
        assert_eq!(code, Some(0), "{name}: exit 0\n{stderr}");
        assert!(
            stdout.contains("setCloudUpgradeConfig-Ack"),
            "{name}: acked\n{stdout}"
        );
        let paused = logged_offset(&stderr, "download paused for the stop")
            .unwrap_or_else(|| panic!("{name}: no pause logged\n{stderr}"));
        assert!(
            paused > 0 && paused < 4 << 20,
            "{name}: paused at {paused}, before the first 4 MiB checkpoint\n{stderr}"
        );
        // The next start resumes exactly there.
        let second = run_with_timeout(
            stdio_agent(&state, &file_flash(&target), &[]),
            b"",
            Duration::from_secs(60),
        );
        assert_eq!(second.code(), Some(0), "{second}");
        assert_eq!(
            logged_offset(&second.stderr, "download starting"),
            Some(paused),
            "{name}: the next start resumes at the paused offset\n{}",
            second.stderr
        );
        assert_eq!(md5_file(&target), fw.md5, "{name}: the right image");
        let ranges: Vec<String> = servers
            .wait_nginx_requests(&uri, 2, Duration::from_secs(10))
            .into_iter()
            .map(|e| e.range)
            .collect();
        assert_eq!(
            ranges,
            ["".to_string(), format!("bytes={paused}-")],
            "{name}"
        );
        let sent = servers.nginx_body_bytes_sent(&uri);
        eprintln!(
            "{name}: nginx sent {sent} body bytes for a {}-byte image; {} of them again (socket buffers)",
            fw.len,
            sent.saturating_sub(fw.len)
        );
    }
}

/// A stdout that cannot take a write for a reason other than a closed pipe
/// (here ENOSPC: stdout is /dev/full) stops the agent with exit 3 and a log
/// line naming stdout, the outbox kept. Before the fix the agent retried the
/// ack for ever and never exited.
#[test]
fn a_full_stdout_stops_the_agent_with_exit_3() {
    let dir = temp_dir();
    let mut cmd = stdio_agent(
        &dir.path().join("state"),
        &file_flash(&dir.path().join("out.bin")),
        &[],
    );
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    cmd.stdin(Stdio::piped())
        .stdout(full)
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn fwagent");
    let mut stdin = child.stdin.take().expect("stdin");
    // A malformed request: its ack is the first thing written to stdout.
    writeln!(stdin, "not json").expect("write the request");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the agent did not stop on a full stdout within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stdin);
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "exit 3\n{stderr}");
    assert!(
        stderr.contains("cannot write stdout") && stderr.contains("stopping"),
        "a log line naming stdout\n{stderr}"
    );
}
