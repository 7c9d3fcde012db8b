//! The real `fwagent` binary against a hostile HTTP server of the test's own
//! (tests/common/hostile.rs: tokio, on 127.0.0.1:0) that misbehaves on cue.
//! It sends more bytes than declared, fewer and then closes, drips one byte a
//! second, answers `Range` with the wrong `Content-Range` or with a 206 of
//! another version of the file, redirects in a loop, to another port or to
//! another host (127.0.0.2, or `localhost` for `127.0.0.1`: loopback only),
//! and answers 500 before 200. Each run ends in PROTOCOL.md's result within
//! a bounded time (small `--idle-timeout`, `--download-attempts`,
//! `--retry-base-ms`); a failed upgrade flashes nothing and leaves no partial
//! file. Needs no test servers.

mod common;

#[path = "common/hostile.rs"]
mod hostile;

use common::*;
use hostile::{Behaviour, Hostile};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

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

/// The `Authorization` header of [`request`]'s credentials.
fn basic_auth() -> String {
    format!("Basic {}", b64("fwuser:fw-secret-pass"))
}

/// Another version of `fw`'s image: the same size, other bytes (from
/// another seed: the generator ignores a seed's lowest bit).
fn other_version(fw: &Firmware) -> Vec<u8> {
    firmware_bytes(fw.len as usize, fw.seed ^ 0x5a5a_0000)
}

/// The ranges the server was asked for, request by request.
fn ranges(server: &Hostile) -> Vec<Option<String>> {
    server.seen().into_iter().map(|s| s.range).collect()
}

/// How often the run entered `verifying` (each entry is reported).
fn verifications(out: &ShortRun) -> usize {
    out.run
        .json_lines()
        .iter()
        .filter(|l| {
            operator(l) == "reportCloudUpgradeProgress" && l["info"]["phase"] == "verifying"
        })
        .count()
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
        let out = run_short(&case, &request(server.port(), &fw), &[]);
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
    let out = run_short(dir.path(), &request(server.port(), &fw), &[]);
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
    let out = run_short(dir.path(), &request(server.port(), &fw), &[]);
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

/// A server that drops every answer partway and can never resume: each
/// start goes from byte 0 again and reaches the same checkpoints, which are
/// no progress (ARCHITECTURE.md, rule 8). It ends in 23 after the attempts,
/// not in a loop that fetches the same half file for ever.
#[test]
fn a_download_that_can_never_resume_ends_in_23_not_a_loop() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 400_000);
    let cases = [
        ("no-validator", Behaviour::NoResume { cut: 300_000 }),
        ("new-etag", Behaviour::NewValidatorEachTime { cut: 300_000 }),
    ];
    for (name, behaviour) in cases {
        let server = Hostile::start("127.0.0.1", bytes.clone(), behaviour);
        let out = run_short(
            &dir.path().join(name),
            &request(server.port(), &fw),
            &[("--checkpoint-bytes", "65536")],
        );
        let why = out.assert_failed(23, Duration::from_secs(30));
        let answers = server.seen().len();
        assert!(
            answers <= 3,
            "{name}: --download-attempts 3 allows 3 starts, the server saw {answers}: {why}"
        );
    }
}

#[test]
fn a_server_that_drips_a_byte_a_second_fails_the_attempt_as_too_slow() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 100_000);
    let server = Hostile::start("127.0.0.1", bytes, Behaviour::Drip);
    let out = run_short(
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
    let out = run_short(&dir.path().join("start"), &request(server.port(), &fw), &[]);
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
    let out = run_short(&dir.path().join("total"), &request(server.port(), &fw), &[]);
    let why = out.assert_failed(30, Duration::from_secs(20));
    assert!(why.contains("size mismatch"), "{why}");
    assert_eq!(server.seen().len(), 2);
}

/// A 206 whose ETag is not the one `If-Range` asked for (another one, or
/// none) is of another version of the file: it is never spliced onto the
/// partial file. The agent starts again from zero and asks for the whole
/// file within the same attempt, so no splice is ever verified.
#[test]
fn a_206_without_the_validator_asked_for_is_never_spliced() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 300_000);
    let other = Arc::new(other_version(&fw));
    let cut = 120_000;
    for (name, etag) in [("other-etag", Some("\"v2\"")), ("no-etag", None)] {
        let behaviour = Behaviour::StaleRanges {
            cut,
            other: other.clone(),
            etag: etag.map(str::to_string),
        };
        let server = Hostile::start("127.0.0.1", bytes.clone(), behaviour);
        let out = run_short(&dir.path().join(name), &request(server.port(), &fw), &[]);
        out.assert_completed(&fw);
        assert_eq!(
            ranges(&server),
            [None, Some(format!("bytes={cut}-")), None],
            "{name}: resumed, refused the 206, asked for the whole file"
        );
        assert_eq!(
            verifications(&out),
            1,
            "{name}: nothing spliced was verified"
        );
    }
}

/// A mirror that changed its file but kept its ETag splices two versions
/// into one image, however careful the resume. A wrong md5 of an image
/// joined from resumed transfers is therefore fetched once more, whole,
/// before it counts: the honest server's image then completes, the lying
/// mirror's ends in 31 after that one fresh download.
#[test]
fn an_md5_mismatch_after_a_resume_gets_one_fresh_download_before_31() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 300_000);
    let other = Arc::new(other_version(&fw));
    let cut = 120_000;

    let stale = Behaviour::StaleRanges {
        cut,
        other: other.clone(),
        etag: Some("\"v1\"".into()),
    };
    let server = Hostile::start("127.0.0.1", bytes.clone(), stale);
    let out = run_short(&dir.path().join("stale"), &request(server.port(), &fw), &[]);
    out.assert_completed(&fw);
    assert_eq!(
        ranges(&server),
        [None, Some(format!("bytes={cut}-")), None],
        "resumed, spliced, then fetched whole"
    );
    assert_eq!(verifications(&out), 2, "the splice, then the fresh image");

    let lying = Behaviour::LyingMirror { cut, other };
    let server = Hostile::start("127.0.0.1", bytes, lying);
    let out = run_short(&dir.path().join("lying"), &request(server.port(), &fw), &[]);
    let why = out.assert_failed(31, Duration::from_secs(20));
    assert!(why.contains("md5 mismatch"), "{why}");
    assert_eq!(
        ranges(&server),
        [None, Some(format!("bytes={cut}-")), None],
        "one fresh download, no more"
    );
    assert_eq!(verifications(&out), 2);
}

/// An image fetched in one transfer from byte 0 is not fetched again: its
/// wrong md5 is the server's file's own.
#[test]
fn an_md5_mismatch_of_one_whole_transfer_is_31_at_once() {
    let dir = temp_dir();
    let (fw, _) = image(dir.path(), 300_000);
    let server = Hostile::start("127.0.0.1", other_version(&fw), Behaviour::Honest);
    let out = run_short(dir.path(), &request(server.port(), &fw), &[]);
    let why = out.assert_failed(31, Duration::from_secs(20));
    assert!(why.contains("md5 mismatch"), "{why}");
    assert_eq!(ranges(&server), [None]);
    assert_eq!(verifications(&out), 1);
}

#[test]
fn a_redirect_loop_ends_after_max_redirects() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 1000);
    let server = Hostile::start("127.0.0.1", bytes, Behaviour::RedirectLoop);
    let out = run_short(
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

    let out = run_short(&dir.path().join("refused"), &req, &[]);
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
    let out = run_short(
        &dir.path().join("by-name"),
        &request(named.port(), &fw),
        &[],
    );
    let why = out.assert_failed(23, Duration::from_secs(20));
    assert!(why.contains("another host (localhost)"), "{why}");

    // Allowed: followed, and the credentials stay with the request's host.
    let out = run_short(
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

/// Credentials follow a redirect only within the request's origin (scheme,
/// host and port): another port of the same host may be redirected to, and
/// is, without the `Authorization` header; another path on the same server
/// gets it.
#[test]
fn credentials_follow_a_redirect_to_the_same_origin_only() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 50_000);
    let other_port = Hostile::start("127.0.0.1", bytes.clone(), Behaviour::Honest);
    let to_port = format!("http://127.0.0.1:{}/{}", other_port.port(), fw.name);
    let server = Hostile::start("127.0.0.1", bytes.clone(), Behaviour::RedirectTo(to_port));
    let out = run_short(
        &dir.path().join("other-port"),
        &request(server.port(), &fw),
        &[],
    );
    out.assert_completed(&fw);
    let auth: Vec<_> = server.seen().into_iter().map(|s| s.authorization).collect();
    assert_eq!(auth, [Some(basic_auth())], "the request's origin");
    let at_other = other_port.seen();
    assert_eq!(at_other.len(), 1, "{at_other:#?}");
    assert_eq!(
        at_other[0].authorization, None,
        "no credentials for another port of the same host"
    );

    let moved = format!("/moved/{}", fw.name);
    let within = Hostile::start("127.0.0.1", bytes, Behaviour::RedirectFirst(moved.clone()));
    let out = run_short(
        &dir.path().join("within"),
        &request(within.port(), &fw),
        &[],
    );
    out.assert_completed(&fw);
    let seen = within.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(seen[1].path, moved);
    assert!(
        seen.iter().all(|s| s.authorization == Some(basic_auth())),
        "the same origin gets the credentials: {seen:#?}"
    );
}

#[test]
fn a_500_then_200_is_retried_and_completes() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 100_000);
    let server = Hostile::start("127.0.0.1", bytes.clone(), Behaviour::FailFirst(1));
    let out = run_short(&dir.path().join("once"), &request(server.port(), &fw), &[]);
    out.assert_completed(&fw);
    assert_eq!(server.seen().len(), 2);

    // 500 for ever: 23 after the attempts, no more requests than them.
    let server = Hostile::start("127.0.0.1", bytes, Behaviour::FailFirst(usize::MAX));
    let out = run_short(
        &dir.path().join("always"),
        &request(server.port(), &fw),
        &[],
    );
    let why = out.assert_failed(23, Duration::from_secs(20));
    assert!(why.contains("500"), "{why}");
    assert_eq!(server.seen().len(), 3);
}
