//! The real `fwagent` binary against a hostile HTTP server of the test's own
//! (tests/common/hostile.rs: tokio, on 127.0.0.1:0) that misbehaves on cue.
//! It sends more bytes than declared, fewer and then closes, drips one byte a
//! second, answers `Range` with the wrong `Content-Range`, redirects in a loop
//! or to another host (127.0.0.2, or `localhost` for `127.0.0.1`: loopback
//! only), and answers 500 before 200. Each run ends in PROTOCOL.md's result within a
//! bounded time (small `--idle-timeout`, `--download-attempts`,
//! `--retry-base-ms`); a failed upgrade flashes nothing and leaves no partial
//! file. Needs no test servers.

mod common;

#[path = "common/hostile.rs"]
mod hostile;

use common::*;
use hostile::{Behaviour, Hostile};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Generous: every case here is designed to end within seconds.
const LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- the agent

/// An image in a temp dir and its bytes, for a hostile server to serve.
fn image(dir: &Path, len: u64) -> (Firmware, Vec<u8>) {
    let fw = Firmware::create(dir, "hostile", len);
    let bytes = fw.bytes();
    (fw, bytes)
}

/// A request for `fw` at `http://127.0.0.1:port/`, with Basic credentials.
fn request(port: u16, fw: &Firmware) -> Value {
    upgrade_request("http", port, "/", fw, "fwuser", "fw-secret-pass")
}

struct Outcome {
    run: Run,
    took: Duration,
    state: PathBuf,
    target: PathBuf,
}

/// The short limits every case runs with (`extra` in [`run_agent`] may
/// replace them).
const LIMITS: [(&str, &str); 4] = [
    ("--connect-timeout", "2"),
    ("--idle-timeout", "2"),
    ("--download-attempts", "3"),
    ("--retry-base-ms", "50"),
];

/// `fwagent run` over stdio with [`LIMITS`] and `extra` flags, fed `req` then
/// EOF.
fn run_agent(dir: &Path, req: &Value, extra: &[(&str, &str)]) -> Outcome {
    let state = dir.join("state");
    let target = dir.join("flash.bin");
    let mut cmd = fwagent(["run", "--transport", "stdio"]);
    for (flag, value) in LIMITS {
        if !extra.iter().any(|(f, _)| *f == flag) {
            cmd.arg(flag).arg(value);
        }
    }
    for (flag, value) in extra {
        cmd.arg(flag).arg(value);
    }
    cmd.arg("--state-dir")
        .arg(&state)
        .arg("--flash")
        .arg(format!("file:{}", target.display()));
    let started = Instant::now();
    let run = run_with_timeout(cmd, format!("{req}\n").as_bytes(), LIMIT);
    Outcome {
        run,
        took: started.elapsed(),
        state,
        target,
    }
}

impl Outcome {
    /// The one result report: (errorNo, phase, description).
    fn result(&self) -> (u64, String, String) {
        let lines = self.run.json_lines();
        let results: Vec<&Value> = lines
            .iter()
            .filter(|v| v["operator"] == "reportCloudUpgradeResult")
            .collect();
        assert_eq!(results.len(), 1, "one result report: {}", self.run);
        let r = results[0];
        (
            r["result"]["errorNo"].as_u64().unwrap_or(u64::MAX),
            r["info"]["phase"].as_str().unwrap_or_default().to_string(),
            r["result"]["description"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    }

    /// Ended in `failed` with `error_no` within `bound`: acked 0, nothing
    /// flashed, no partial file, the store says the same. Returns the
    /// description.
    fn assert_failed(&self, error_no: u64, bound: Duration) -> String {
        assert_eq!(self.run.code(), Some(0), "{}", self.run);
        let lines = self.run.json_lines();
        assert_eq!(lines[0]["result"]["errorNo"], 0, "acked: {}", self.run);
        let (no, phase, description) = self.result();
        assert_eq!(
            (no, phase.as_str()),
            (error_no, "failed"),
            "{description}\n{}",
            self.run
        );
        assert!(
            self.took < bound,
            "took {:?}, bound {bound:?}: {}",
            self.took,
            self.run
        );
        assert!(!self.target.exists(), "nothing is flashed");
        self.assert_no_partial_file();
        let status = run_fwagent(
            [
                "status",
                "--json",
                "--state-dir",
                self.state.to_str().unwrap(),
            ],
            b"",
            LIMIT,
        );
        let job: Value =
            serde_json::from_str(status.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {status}"));
        assert_eq!(job["phase"], "failed", "{status}");
        assert_eq!(job["result"]["errorNo"], error_no, "{status}");
        description
    }

    fn assert_completed(&self, fw: &Firmware) {
        assert_eq!(self.run.code(), Some(0), "{}", self.run);
        let (no, phase, description) = self.result();
        assert_eq!(
            (no, phase.as_str()),
            (0, "completed"),
            "{description}\n{}",
            self.run
        );
        assert_eq!(md5_file(&self.target), fw.md5, "the right image");
        self.assert_no_partial_file();
    }

    fn assert_no_partial_file(&self) {
        let left: Vec<_> = std::fs::read_dir(self.state.join("downloads"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "partial files left: {left:?}");
    }
}

// ---------------------------------------------------------------- the cases

#[test]
fn more_bytes_than_declared_is_30_and_never_written() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 100_000);
    for length in [false, true] {
        let server = Hostile::start(
            "127.0.0.1",
            bytes.clone(),
            Behaviour::MoreThanDeclared {
                extra: 4096,
                length,
            },
        );
        let case = dir.path().join(format!("length-{length}"));
        let out = run_agent(&case, &request(server.port(), &fw), &[]);
        let why = out.assert_failed(30, Duration::from_secs(20));
        assert!(why.contains("size mismatch"), "{why}");
        assert_eq!(server.seen().len(), 1, "a size mismatch is not retried");
    }
}

#[test]
fn fewer_bytes_then_close_resumes_with_range_and_completes() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 300_000);
    let cut = 120_000;
    let server = Hostile::start(
        "127.0.0.1",
        bytes,
        Behaviour::FewerThenClose {
            cut,
            then_honest: true,
        },
    );
    let out = run_agent(dir.path(), &request(server.port(), &fw), &[]);
    out.assert_completed(&fw);
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(seen[0].range, None);
    assert_eq!(
        seen[1].range.as_deref(),
        Some(format!("bytes={cut}-").as_str()),
        "resumed where the first answer stopped"
    );
    assert_eq!(seen[1].if_range.as_deref(), Some("\"v1\""));
}

#[test]
fn fewer_bytes_then_close_every_time_is_23_after_the_attempts() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 300_000);
    let server = Hostile::start(
        "127.0.0.1",
        bytes,
        Behaviour::FewerThenClose {
            cut: 10_000,
            then_honest: false,
        },
    );
    let out = run_agent(dir.path(), &request(server.port(), &fw), &[]);
    out.assert_failed(23, Duration::from_secs(20));
    let ranges: Vec<_> = server.seen().into_iter().map(|s| s.range).collect();
    assert_eq!(
        ranges,
        [
            None,
            Some("bytes=10000-".to_string()),
            Some("bytes=20000-".to_string())
        ],
        "three attempts (--download-attempts 3), each resuming"
    );
}

#[test]
fn a_server_that_drips_a_byte_a_second_fails_the_attempt_as_too_slow() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 100_000);
    let server = Hostile::start("127.0.0.1", bytes, Behaviour::Drip);
    let out = run_agent(
        dir.path(),
        &request(server.port(), &fw),
        &[("--download-attempts", "2")],
    );
    // Two attempts of about --idle-timeout (2 s) each.
    let why = out.assert_failed(23, Duration::from_secs(20));
    assert!(why.contains("too slow"), "{why}");
    assert_eq!(server.seen().len(), 2);
}

#[test]
fn range_answered_with_the_wrong_content_range_is_never_spliced() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 200_000);
    let len = bytes.len() as u64;
    // From the wrong byte: retried (23) until the attempts run out.
    let server = Hostile::start(
        "127.0.0.1",
        bytes.clone(),
        Behaviour::WrongContentRange {
            cut: 50_000,
            start: 0,
            total: len,
        },
    );
    let out = run_agent(&dir.path().join("start"), &request(server.port(), &fw), &[]);
    let why = out.assert_failed(23, Duration::from_secs(20));
    assert!(why.contains("the server sent from 0"), "{why}");
    assert_eq!(server.seen().len(), 3, "{:#?}", server.seen());

    // A file of another size: 30 at once.
    let server = Hostile::start(
        "127.0.0.1",
        bytes,
        Behaviour::WrongContentRange {
            cut: 50_000,
            start: 50_000,
            total: len + 1,
        },
    );
    let out = run_agent(&dir.path().join("total"), &request(server.port(), &fw), &[]);
    let why = out.assert_failed(30, Duration::from_secs(20));
    assert!(why.contains("size mismatch"), "{why}");
    assert_eq!(server.seen().len(), 2);
}

#[test]
fn a_redirect_loop_ends_after_max_redirects() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 1000);
    let server = Hostile::start("127.0.0.1", bytes, Behaviour::RedirectLoop);
    let out = run_agent(
        dir.path(),
        &request(server.port(), &fw),
        &[("--max-redirects", "3")],
    );
    let why = out.assert_failed(23, Duration::from_secs(20));
    assert!(why.contains("more than 3 redirects"), "{why}");
    assert_eq!(
        server.seen().len(),
        4,
        "the request and 3 redirects, one attempt (not retried)"
    );
}

#[test]
fn a_redirect_to_another_host_is_refused_unless_allowed() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 50_000);
    let other = Hostile::start("127.0.0.2", bytes.clone(), Behaviour::Honest);
    let to_other = format!("http://127.0.0.2:{}/{}", other.port(), fw.name);
    let server = Hostile::start("127.0.0.1", bytes.clone(), Behaviour::RedirectTo(to_other));
    let req = request(server.port(), &fw);

    let out = run_agent(&dir.path().join("refused"), &req, &[]);
    let why = out.assert_failed(23, Duration::from_secs(20));
    assert!(why.contains("another host (127.0.0.2)"), "{why}");
    assert!(
        other.seen().is_empty(),
        "the other host was never contacted"
    );
    assert_eq!(server.seen().len(), 1, "a refusal is not retried");

    // `localhost` is another host name than `127.0.0.1`, loopback or not.
    let by_name = format!("http://localhost:{}/{}", server.port(), fw.name);
    let named = Hostile::start("127.0.0.1", bytes, Behaviour::RedirectTo(by_name));
    let out = run_agent(
        &dir.path().join("by-name"),
        &request(named.port(), &fw),
        &[],
    );
    let why = out.assert_failed(23, Duration::from_secs(20));
    assert!(why.contains("another host (localhost)"), "{why}");

    // Allowed: followed, and the credentials stay with the request's host.
    let out = run_agent(
        &dir.path().join("allowed"),
        &req,
        &[("--redirect-allow", "127.0.0.2")],
    );
    out.assert_completed(&fw);
    let at_origin = server.seen();
    let at_other = other.seen();
    assert_eq!(at_other.len(), 1, "{at_other:#?}");
    assert!(
        at_origin.iter().all(|s| s.authorization.is_some()),
        "{at_origin:#?}"
    );
    assert!(
        at_other[0].authorization.is_none(),
        "no credentials for the other host"
    );
}

#[test]
fn a_500_then_200_is_retried_and_completes() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 100_000);
    let server = Hostile::start("127.0.0.1", bytes.clone(), Behaviour::FailFirst(1));
    let out = run_agent(&dir.path().join("once"), &request(server.port(), &fw), &[]);
    out.assert_completed(&fw);
    assert_eq!(server.seen().len(), 2);

    // 500 for ever: 23 after the attempts, no more requests than them.
    let server = Hostile::start("127.0.0.1", bytes, Behaviour::FailFirst(usize::MAX));
    let out = run_agent(
        &dir.path().join("always"),
        &request(server.port(), &fw),
        &[],
    );
    let why = out.assert_failed(23, Duration::from_secs(20));
    assert!(why.contains("500"), "{why}");
    assert_eq!(server.seen().len(), 3);
}
