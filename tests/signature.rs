//! Signed images (issue 18) against the real nginx and pyftpdlib that
//! `make test` starts: `<firmwareName>.sig` beside the image, fetched with
//! the image's protocol and credentials, checked with `--trust-key` before
//! anything is flashed; `--require-signature`; key rotation; the request's
//! `info.fileInfo.signature`; `fwagent sign` and `fwagent verify`, also
//! against openssl's own key files and signatures.
//!
//! The keys are made by each test (ring, or openssl), in its own temporary
//! directory: no private key is committed.

mod common;

use base64::Engine as _;
use common::*;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);
/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410).
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<String> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8(c.to_vec()).expect("ascii"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// A test-only Ed25519 key pair, written as PEM files into a temp dir.
struct Key {
    pair: Ed25519KeyPair,
    /// `PRIVATE KEY` (PKCS#8).
    private: PathBuf,
    /// `PUBLIC KEY` (SubjectPublicKeyInfo).
    public: PathBuf,
}

impl Key {
    fn new(dir: &Path, name: &str) -> Key {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("generate");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key pair");
        let private = dir.join(format!("{name}.key.pem"));
        std::fs::write(&private, pem("PRIVATE KEY", pkcs8.as_ref())).expect("write key");
        let mut spki = SPKI_PREFIX.to_vec();
        spki.extend_from_slice(pair.public_key().as_ref());
        let public = dir.join(format!("{name}.pub.pem"));
        std::fs::write(&public, pem("PUBLIC KEY", &spki)).expect("write key");
        Key {
            pair,
            private,
            public,
        }
    }

    fn public(&self) -> &str {
        self.public.to_str().expect("utf-8 path")
    }

    /// Sign `name`, `size`, `sha256` directly (the statement of
    /// `fwagent::signature`), not through `fwagent sign`.
    fn sign_statement(&self, name: &str, size: u64, sha256: &[u8]) -> Vec<u8> {
        let text = fwagent::signature::statement(name, size, sha256);
        self.pair.sign(text.as_bytes()).as_ref().to_vec()
    }
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// `fwagent sign --key KEY IMAGE [extra...]`: asserted to succeed, IMAGE.sig written.
fn sign(key: &Key, image: &Path, extra: &[&str]) -> PathBuf {
    let mut cmd = fwagent(["sign", "--key"]);
    cmd.arg(&key.private).arg(image).args(extra);
    let run = run_with_timeout(cmd, b"", LONG);
    assert_eq!(run.code(), Some(0), "{run}");
    let sig = sig_of(image);
    assert_eq!(
        std::fs::metadata(&sig).expect("IMAGE.sig written").len(),
        64,
        "a .sig is the 64-byte Ed25519 signature"
    );
    sig
}

fn sig_of(image: &Path) -> PathBuf {
    PathBuf::from(format!("{}.sig", image.display()))
}

/// `fwagent run` over stdio with short limits and `flags`, fed `req`.
fn agent(dir: &Path, req: &Value, flags: &[&str]) -> ShortRun {
    let state = dir.join("state");
    let target = dir.join("flash.bin");
    let mut cmd = fwagent(["run", "--transport", "stdio"]);
    for (flag, value) in SHORT_LIMITS {
        cmd.arg(flag).arg(value);
    }
    cmd.args(flags)
        .arg("--state-dir")
        .arg(&state)
        .arg("--flash")
        .arg(file_flash(&target));
    let started = std::time::Instant::now();
    let run = run_with_timeout(cmd, format!("{req}\n").as_bytes(), SHORT_RUN_LIMIT);
    ShortRun {
        run,
        took: started.elapsed(),
        state,
        target,
    }
}

#[test]
fn a_signed_image_over_nginx_and_over_ftp_completes() {
    let servers = Servers::from_env();
    let dir = temp_dir();
    let key = Key::new(dir.path(), "vendor");
    let flags = ["--trust-key", key.public(), "--require-signature"];

    let fw = servers.put_http("signed", 300_000);
    sign(&key, &fw.path, &[]);
    let http = agent(&dir.path().join("http"), &servers.http_request(&fw), &flags);
    http.assert_completed(&fw);
    let sig_uri = format!("/{}.sig", fw.name);
    let fetched = servers.wait_nginx_requests(&sig_uri, 1, Duration::from_secs(10));
    assert_eq!(
        fetched[0].status, 200,
        "the .sig came from beside the image"
    );
    assert!(
        http.run.stderr.contains("signature verified"),
        "{}",
        http.run
    );

    // FTP with a login: the .sig is fetched with the same credentials.
    let fw = servers.put_ftp("signed-ftp", 300_000);
    sign(&key, &fw.path, &[]);
    let ftp = agent(&dir.path().join("ftp"), &servers.ftp_request(&fw), &flags);
    ftp.assert_completed(&fw);
    assert!(ftp.run.stderr.contains("signature verified"), "{}", ftp.run);

    // Behind Basic auth: the .sig needs the credentials too.
    let fw = servers.put_http("signed-auth", 100_000);
    sign(&key, &fw.path, &[]);
    let auth = agent(
        &dir.path().join("auth"),
        &servers.http_auth_request(&fw),
        &flags,
    );
    auth.assert_completed(&fw);
}

#[test]
fn a_tampered_image_whose_md5_was_changed_to_match_ends_in_32_untouched() {
    let servers = Servers::from_env();
    let dir = temp_dir();
    let key = Key::new(dir.path(), "vendor");
    let mut fw = servers.put_http("tampered", 200_000);
    sign(&key, &fw.path, &[]);
    // The attacker controls the server and the message: other bytes, the
    // request's md5 changed to match them, the vendor's .sig left in place.
    fw.rewrite(0x5eed);
    let req = servers.http_request(&fw);

    let checked = agent(
        &dir.path().join("checked"),
        &req,
        &["--trust-key", key.public()],
    );
    let why = checked.assert_failed(32, SHORT_RUN_LIMIT);
    assert!(why.contains("signature invalid"), "{why}");
    assert!(unflashed(&checked.target), "the target is untouched");

    // What the signature adds: without a trusted key the same request
    // installs the attacker's image (as every run did before issue 18).
    let unchecked = agent(&dir.path().join("unchecked"), &req, &[]);
    unchecked.assert_completed(&fw);
}

#[test]
fn a_signature_by_an_untrusted_key_is_32() {
    let servers = Servers::from_env();
    let dir = temp_dir();
    let trusted = Key::new(dir.path(), "trusted");
    let stranger = Key::new(dir.path(), "stranger");
    let fw = servers.put_ftp("untrusted", 100_000);
    sign(&stranger, &fw.path, &[]);
    let run = agent(
        dir.path(),
        &servers.ftp_request(&fw),
        &["--trust-key", trusted.public()],
    );
    let why = run.assert_failed(32, SHORT_RUN_LIMIT);
    assert!(why.contains("not a signature by a trusted key"), "{why}");
}

#[test]
fn a_signature_for_another_name_or_size_is_32() {
    let servers = Servers::from_env();
    let dir = temp_dir();
    let key = Key::new(dir.path(), "vendor");
    let fw = servers.put_http("replayed", 50_000);
    let sha = sha256(&fw.bytes());
    let sig = sig_of(&fw.path);
    let req = servers.http_request(&fw);
    let flags = ["--trust-key", key.public()];

    // The same key, the same content: a statement naming another file, or
    // another size, signs nothing of this image.
    let cases = [
        ("other-name", key.sign_statement("other.bin", fw.len, &sha)),
        ("other-size", key.sign_statement(&fw.name, fw.len + 1, &sha)),
    ];
    for (case, bytes) in cases {
        std::fs::write(&sig, bytes).expect("write .sig");
        let run = agent(&dir.path().join(case), &req, &flags);
        let why = run.assert_failed(32, SHORT_RUN_LIMIT);
        assert!(why.contains("signature invalid"), "{case}: {why}");
    }
    // `fwagent sign --name` signs for another firmwareName, too.
    sign(&key, &fw.path, &["--name", "another.bin"]);
    let run = agent(&dir.path().join("sign-name"), &req, &flags);
    run.assert_failed(32, SHORT_RUN_LIMIT);

    // Control: the statement as the test builds it, for this name and
    // size, is what the agent accepts.
    std::fs::write(&sig, key.sign_statement(&fw.name, fw.len, &sha)).expect("write .sig");
    let run = agent(&dir.path().join("right"), &req, &flags);
    run.assert_completed(&fw);
}

#[test]
fn a_missing_sig_is_32_with_require_signature_and_accepted_without() {
    let servers = Servers::from_env();
    let dir = temp_dir();
    let key = Key::new(dir.path(), "vendor");
    let fw = servers.put_http("unsigned", 100_000);
    let req = servers.http_request(&fw);

    let required = agent(
        &dir.path().join("required"),
        &req,
        &["--trust-key", key.public(), "--require-signature"],
    );
    let why = required.assert_failed(32, SHORT_RUN_LIMIT);
    assert!(why.contains("signature missing"), "{why}");
    // After the download was attempted: the image and its .sig were asked for.
    servers.wait_nginx_requests(&format!("/{}", fw.name), 1, Duration::from_secs(10));
    let sig = servers.wait_nginx_requests(&format!("/{}.sig", fw.name), 1, Duration::from_secs(10));
    assert_eq!(sig[0].status, 404);

    let optional = agent(
        &dir.path().join("optional"),
        &req,
        &["--trust-key", key.public()],
    );
    optional.assert_completed(&fw);

    // Over FTP a missing .sig (550) is as unsigned.
    let fw = servers.put_ftp("unsigned-ftp", 100_000);
    let run = agent(
        &dir.path().join("ftp"),
        &servers.ftp_request(&fw),
        &["--trust-key", key.public(), "--require-signature"],
    );
    run.assert_failed(32, SHORT_RUN_LIMIT);
}

#[test]
fn key_rotation_trusts_both_keys_from_flags_or_the_config_file() {
    let servers = Servers::from_env();
    let dir = temp_dir();
    let old = Key::new(dir.path(), "old");
    let new = Key::new(dir.path(), "new");
    let by_old = servers.put_http("rotation-old", 60_000);
    sign(&old, &by_old.path, &[]);
    let by_new = servers.put_http("rotation-new", 60_000);
    sign(&new, &by_new.path, &[]);
    let both = [
        "--trust-key",
        old.public(),
        "--trust-key",
        new.public(),
        "--require-signature",
    ];
    for (case, fw) in [("old", &by_old), ("new", &by_new)] {
        let run = agent(&dir.path().join(case), &servers.http_request(fw), &both);
        run.assert_completed(fw);
    }
    // The config file's `trust-key` list does the same.
    let config = dir.path().join("fwagent.toml");
    std::fs::write(
        &config,
        format!(
            "trust-key = [{:?}, {:?}]\nrequire-signature = true\n",
            old.public(),
            new.public()
        ),
    )
    .expect("write config");
    let config = config.to_str().expect("utf-8").to_string();
    let run = agent(
        &dir.path().join("config"),
        &servers.http_request(&by_new),
        &["--config", &config],
    );
    run.assert_completed(&by_new);
    // Once the old key is dropped, its images are refused.
    let run = agent(
        &dir.path().join("dropped"),
        &servers.http_request(&by_old),
        &["--trust-key", new.public()],
    );
    run.assert_failed(32, SHORT_RUN_LIMIT);
}

#[test]
fn a_malformed_trust_key_stops_run_at_start_with_exit_2() {
    let dir = temp_dir();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n",
    )
    .expect("write");
    let key = Key::new(dir.path(), "private-not-public");
    let private = key.private.to_str().expect("utf-8").to_string();
    let missing = dir.path().join("missing.pem");
    for bad in [
        garbage.to_str().unwrap(),
        &private,
        missing.to_str().unwrap(),
    ] {
        let run = run_agent(
            &dir.path().join("state"),
            &dir.path().join("flash.bin"),
            &["--trust-key", bad],
            &[],
            LONG,
        );
        assert_eq!(run.code(), Some(2), "{bad}: {run}");
        assert!(run.stderr.contains(bad), "names the file: {run}");
        assert!(run.stdout.is_empty(), "nothing runs: {run}");
    }
    // --require-signature with nothing to check with is a usage error too.
    let run = run_agent(
        &dir.path().join("state"),
        &dir.path().join("flash.bin"),
        &["--require-signature"],
        &[],
        LONG,
    );
    assert_eq!(run.code(), Some(2), "{run}");
    assert!(run.stderr.contains("--trust-key"), "{run}");
}

#[test]
fn the_request_may_carry_the_signature_and_a_malformed_one_is_ack_4() {
    let servers = Servers::from_env();
    let dir = temp_dir();
    let key = Key::new(dir.path(), "vendor");
    let fw = servers.put_http("in-request", 80_000);
    // Signed, but the .sig is not on the server: it comes in the request.
    let sig = sign(&key, &fw.path, &[]);
    let sig_b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&sig).unwrap());
    std::fs::remove_file(&sig).expect("remove the .sig");
    let flags = ["--trust-key", key.public(), "--require-signature"];
    let mut req = servers.http_request(&fw);
    req["info"]["fileInfo"]["signature"] = sig_b64.clone().into();
    let run = agent(&dir.path().join("field"), &req, &flags);
    run.assert_completed(&fw);
    assert!(
        servers
            .nginx_requests(&format!("/{}.sig", fw.name))
            .is_empty(),
        "no .sig is asked for when the request carries one"
    );

    // The field of another image's signature: 32.
    let other = servers.put_http("in-request-other", 80_000);
    let mut req = servers.http_request(&other);
    req["info"]["fileInfo"]["signature"] = sig_b64.into();
    let run = agent(&dir.path().join("other"), &req, &flags);
    run.assert_failed(32, SHORT_RUN_LIMIT);

    // Not base64, or not 64 bytes: refused in the ack, naming the field.
    for bad in ["not base64!", "AAAA"] {
        let mut req = servers.http_request(&fw);
        req["info"]["fileInfo"]["signature"] = bad.into();
        let run = agent(&dir.path().join("bad"), &req, &flags);
        let lines = run.run.json_lines();
        assert_eq!(lines[0]["result"]["errorNo"], 4, "{}", run.run);
        let description = lines[0]["result"]["description"].as_str().unwrap_or("");
        assert!(
            description.contains("info.fileInfo.signature"),
            "{description}"
        );
        assert!(results(&lines).is_empty(), "nothing started: {}", run.run);
    }
}

#[test]
fn a_signed_download_resumed_after_a_crash_is_checked_whole() {
    let servers = Servers::from_env();
    let dir = temp_dir();
    let key = Key::new(dir.path(), "vendor");
    let fw = servers.put_http("resumed", 6 << 20);
    sign(&key, &fw.path, &[]);
    let req = servers.http_request(&fw);
    for point in ["after-checkpoint", "after-download", "mid-verify"] {
        let state = dir.path().join(point).join("state");
        let target = dir.path().join(point).join("flash.bin");
        let flags = [
            "--trust-key",
            key.public(),
            "--require-signature",
            "--checkpoint-bytes",
            "1048576",
        ];
        let input = format!("{req}\n");
        let mut first = stdio_agent(&state, &file_flash(&target), &flags);
        first.env("FWAGENT_CRASH_AT", point);
        let first = run_with_timeout(first, input.as_bytes(), LONG);
        assert_eq!(first.signal(), Some(libc::SIGKILL), "{point}: {first}");
        let second = run_with_timeout(stdio_agent(&state, &file_flash(&target), &flags), b"", LONG);
        assert_eq!(second.code(), Some(0), "{point}: {second}");
        let lines = all_lines([&first, &second]);
        let r = results(&lines);
        assert_eq!(r.len(), 1, "{point}: {lines:#?}");
        assert_eq!(r[0]["result"]["errorNo"], 0, "{point}: {second}");
        assert_eq!(md5_file(&target), fw.md5, "{point}");
        assert!(
            !state.join("downloads").read_dir().unwrap().any(|_| true),
            "{point}: no partial file or .sig left"
        );
    }
}

#[test]
fn sign_and_verify_offline() {
    let dir = temp_dir();
    let key = Key::new(dir.path(), "vendor");
    let other = Key::new(dir.path(), "other");
    let image = Firmware::create(dir.path(), "offline", 10_000);
    sign(&key, &image.path, &[]);
    let verify = |keys: &[&Key], extra: &[&Path]| {
        let mut cmd = fwagent(["verify"]);
        for k in keys {
            cmd.arg("--trust-key").arg(&k.public);
        }
        cmd.arg(&image.path).args(extra);
        run_with_timeout(cmd, b"", LONG)
    };
    let run = verify(&[&key], &[]);
    assert_eq!(run.code(), Some(0), "{run}");
    assert!(run.stdout.starts_with("valid"), "{run}");
    assert_eq!(verify(&[&other, &key], &[]).code(), Some(0), "rotation");
    assert_eq!(verify(&[&other], &[]).code(), Some(1), "untrusted key");
    // An explicit SIG argument; a missing one is invalid (1), a bad key usage (2).
    let moved = dir.path().join("moved.sig");
    std::fs::rename(sig_of(&image.path), &moved).expect("move");
    assert_eq!(verify(&[&key], &[&moved]).code(), Some(0));
    assert_eq!(verify(&[&key], &[]).code(), Some(1), "no IMAGE.sig");
    let mut cmd = fwagent(["verify", "--trust-key"]);
    cmd.arg(&key.private).arg(&image.path).arg(&moved);
    assert_eq!(
        run_with_timeout(cmd, b"", LONG).code(),
        Some(2),
        "a private key as trusted"
    );
    // A changed image no longer verifies.
    let mut bytes = image.bytes();
    bytes[5000] ^= 1;
    std::fs::write(&image.path, bytes).expect("write");
    assert_eq!(verify(&[&key], &[&moved]).code(), Some(1), "tampered");
}

fn openssl(args: &[&str]) -> std::process::Output {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (scripts/test-servers.sh needs it too)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn openssl_keys_and_signatures_interoperate() {
    let dir = temp_dir();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (private, public) = (p("k.pem"), p("k.pub.pem"));
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", &private]);
    openssl(&["pkey", "-in", &private, "-pubout", "-out", &public]);
    let image = Firmware::create(dir.path(), "openssl", 20_000);
    // fwagent sign with openssl's key; openssl verifies the statement.
    let mut cmd = fwagent(["sign", "--key", &private]);
    cmd.arg(&image.path);
    assert_eq!(run_with_timeout(cmd, b"", LONG).code(), Some(0));
    let statement = fwagent::signature::statement(&image.name, image.len, &sha256(&image.bytes()));
    let text = p("statement.txt");
    std::fs::write(&text, &statement).expect("write");
    let sig = sig_of(&image.path).to_str().unwrap().to_string();
    openssl(&[
        "pkeyutl", "-verify", "-pubin", "-inkey", &public, "-rawin", "-in", &text, "-sigfile", &sig,
    ]);
    // openssl signs the statement; fwagent verify accepts it.
    let by_openssl = p("by-openssl.sig");
    openssl(&[
        "pkeyutl",
        "-sign",
        "-inkey",
        &private,
        "-rawin",
        "-in",
        &text,
        "-out",
        &by_openssl,
    ]);
    let mut cmd = fwagent(["verify", "--trust-key", &public]);
    cmd.arg(&image.path).arg(&by_openssl);
    let run = run_with_timeout(cmd, b"", LONG);
    assert_eq!(run.code(), Some(0), "{run}");
}

#[test]
fn show_explains_result_32() {
    let servers = Servers::from_env();
    let dir = temp_dir();
    let key = Key::new(dir.path(), "vendor");
    let fw = servers.put_http("show", 10_000);
    let req = servers.http_request(&fw);
    let run = agent(
        dir.path(),
        &req,
        &["--trust-key", key.public(), "--require-signature"],
    );
    run.assert_failed(32, SHORT_RUN_LIMIT);
    let mid = req["messageId"].as_str().unwrap();
    let mut cmd = fwagent(["show", "--state-dir"]);
    cmd.arg(&run.state).arg(mid).env("NO_COLOR", "1");
    let show = run_with_timeout(cmd, b"", LONG);
    assert_eq!(show.code(), Some(0), "{show}");
    assert!(
        show.stdout
            .contains("result 32 (signature missing or invalid)"),
        "{show}"
    );
}

/// A tiny HTTP server of the test's own on 127.0.0.1:0: `GET /NAME` is the
/// image, `GET /NAME.sig` answers 503 the first `fail_sig` times, then the
/// signature. Every request line is recorded.
struct SigServer {
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl SigServer {
    fn start(name: &str, image: Vec<u8>, sig: Vec<u8>, fail_sig: usize) -> SigServer {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let (image_path, sig_path) = (format!("/{name}"), format!("/{name}.sig"));
        std::thread::spawn(move || {
            let mut failed = 0;
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // The rest of the head.
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                        break;
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                log.lock().expect("lock").push(path.clone());
                let (status, body): (&str, &[u8]) = if path == image_path {
                    ("200 OK", &image)
                } else if path == sig_path && failed < fail_sig {
                    failed += 1;
                    ("503 Service Unavailable", b"busy")
                } else if path == sig_path {
                    ("200 OK", &sig)
                } else {
                    ("404 Not Found", b"")
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nETag: \"v1\"\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            }
        });
        SigServer { port, seen }
    }

    fn requests_for(&self, path: &str) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|p| *p == path)
            .count()
    }
}

#[test]
fn a_sig_fetch_that_fails_is_retried_never_taken_for_unsigned() {
    let dir = temp_dir();
    let key = Key::new(dir.path(), "vendor");
    let fw = Firmware::create(dir.path(), "flaky-sig", 40_000);
    let sig = key.sign_statement(&fw.name, fw.len, &sha256(&fw.bytes()));
    let flags = ["--trust-key", key.public(), "--require-signature"];

    // A 503 on the .sig is a transfer error, retried: then it completes.
    let once = SigServer::start(&fw.name, fw.bytes(), sig.clone(), 1);
    let req = upgrade_request("http", once.port, "/", &fw, "", "");
    let run = agent(&dir.path().join("once"), &req, &flags);
    run.assert_completed(&fw);
    assert_eq!(
        once.requests_for(&format!("/{}.sig", fw.name)),
        2,
        "{}",
        run.run
    );

    // A server that never serves it: 23 once the attempts run out, never
    // "unsigned" (which --require-signature would make 32, and without it 0).
    let never = SigServer::start(&fw.name, fw.bytes(), sig, usize::MAX);
    let req = upgrade_request("http", never.port, "/", &fw, "", "");
    let run = agent(
        &dir.path().join("never"),
        &req,
        &["--trust-key", key.public()],
    );
    let why = run.assert_failed(23, SHORT_RUN_LIMIT);
    assert!(why.contains(".sig"), "{why}");
}

#[test]
fn an_image_streamed_into_an_ab_slot_is_checked_as_read_back() {
    let servers = Servers::from_env();
    let dir = temp_dir();
    let key = Key::new(dir.path(), "vendor");
    let mut fw = servers.put_http("slot", 3 << 20);
    sign(&key, &fw.path, &[]);
    let run_ab = |case: &str, fw: &Firmware| {
        let state = dir.path().join(case).join("state");
        let slots = dir.path().join(case).join("slots");
        std::fs::create_dir_all(&slots).expect("mkdir");
        let flash = format!("ab:{}", slots.display());
        let flags = [
            "--trust-key",
            key.public(),
            "--require-signature",
            "--reboot-command",
            "",
            "--checkpoint-bytes",
            "1048576",
        ];
        let req = servers.http_request(fw);
        let run = run_with_timeout(
            stdio_agent(&state, &flash, &flags),
            format!("{req}\n").as_bytes(),
            LONG,
        );
        assert_eq!(run.code(), Some(0), "{case}: {run}");
        (run, status_json(&state))
    };
    // Signed: verified from the slot as read back, installed, waiting for the reboot.
    let (run, job) = run_ab("signed", &fw);
    assert_eq!(job["phase"], "awaiting_reboot", "{job}\n{run}");
    assert!(run.stderr.contains("signature verified"), "{run}");
    // Other bytes, the md5 made to match: 32, the slot never made bootable.
    fw.rewrite(0xab);
    let (run, job) = run_ab("tampered", &fw);
    assert_eq!(job["phase"], "failed", "{job}\n{run}");
    assert_eq!(job["result"]["errorNo"], 32, "{job}");
}
