//! `fwagent check` end to end: the real binary on the example requests.
//!
//! Each test runs `fwagent check` from the package root (so the examples'
//! relative paths work) and reads its first stdout line as the ack. Nothing
//! here touches the network or writes into the working tree: files the tests
//! make live in their own temporary directory.

use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const DECODER: &str = "examples/decode-credentials.sh";

/// Every secret the example requests carry, in base64 and in plain text
/// (plain as decoded, or as the toy decoder prints it).
const SECRETS: &[&str] = &[
    "dWZ0cA",
    "ZWNobzEyMw",
    "uftp",
    "echo123",
    "jwNebvyvn4jIteczpAhJUyih75dyFe4l",
    "AZI5Wg0mg13O4Wx82AB4Km8XMt9oWmB8",
    "demo-user",
    "demo-password",
    "ZndhZ2VudA",
    "czNjcjN0",
    "s3cr3t",
    "PP-7f3a9c-demo",
    "PP-0001-demo",
];

fn fwagent(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fwagent"))
        .arg("check")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the fwagent binary runs");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        // A refused flag ends `check` before it reads: a closed pipe then.
        if let Err(e) = pipe.write_all(bytes) {
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe,
                "write the request: {e}"
            );
        }
    }
    child.wait_with_output().expect("fwagent check finishes")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

/// The first stdout line, as JSON.
#[track_caller]
fn ack_of(out: &Output) -> Value {
    let text = stdout(out);
    let line = text.lines().next().expect("an ack line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("ack {line:?} is not JSON: {e}"))
}

#[track_caller]
fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[track_caller]
fn assert_no_secrets(out: &Output) {
    let all = format!("{}{}", stdout(out), String::from_utf8_lossy(&out.stderr));
    for secret in SECRETS {
        assert!(!all.contains(secret), "{secret} leaked:\n{all}");
    }
}

#[test]
fn seed_one_is_accepted_as_is() {
    let out = fwagent(&["examples/requests/seed-1-ftp.json"], None);
    assert_exit(&out, 0);
    let ack = ack_of(&out);
    assert_eq!(ack["operator"], "setCloudUpgradeConfig-Ack");
    assert_eq!(ack["sessionId"], "SID:1234567890-000001");
    assert_eq!(
        ack["messageId"],
        "MID:localhost-122334455667-12232323232323-000001"
    );
    assert_eq!(ack["info"], "none");
    assert_eq!(ack["result"]["errorNo"], 0);
    assert_eq!(ack["result"]["description"], "ok");
    assert_eq!(
        stdout(&out).lines().count(),
        1,
        "only the ack without --explain"
    );
    assert_no_secrets(&out);
}

#[test]
fn seed_two_needs_a_credentials_decoder() {
    let file = "examples/requests/seed-2-ftp-enciphered.json";
    let out = fwagent(&[file], None);
    assert_exit(&out, 1);
    let ack = ack_of(&out);
    assert_eq!(ack["result"]["errorNo"], 4);
    let why = ack["result"]["description"]
        .as_str()
        .expect("a description");
    assert!(why.contains("info.serverConfig.userName"), "{why}");
    assert_eq!(ack["sessionId"], "SID:1234567890-000001");
    assert_no_secrets(&out);

    let out = fwagent(&["--credentials-decoder", DECODER, file], None);
    assert_exit(&out, 0);
    assert_eq!(ack_of(&out)["result"]["errorNo"], 0);
    assert_no_secrets(&out);
}

#[test]
fn each_example_gets_the_ack_its_readme_promises() {
    // (file, extra arguments, errorNo, a word the description must contain)
    let table: &[(&str, &[&str], u64, &str)] = &[
        ("seed-1-ftp.json", &[], 0, "ok"),
        (
            "seed-2-ftp-enciphered.json",
            &[],
            4,
            "info.serverConfig.userName",
        ),
        (
            "seed-2-ftp-enciphered.json",
            &["--credentials-decoder", DECODER],
            0,
            "ok",
        ),
        ("http-hostip-totalsize.json", &[], 0, "ok"),
        ("http-port-string.json", &[], 0, "ok"),
        ("https-ipv6-passport.json", &[], 0, "ok"),
        ("ftp-path-is-file.json", &[], 0, "ok"),
        (
            "invalid-both-sizes-differ.json",
            &[],
            4,
            "info.fileInfo.totalSize",
        ),
        ("invalid-sftp.json", &[], 5, "\"sftp\""),
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/requests");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("examples/requests exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".json"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = table.iter().map(|(f, ..)| f.to_string()).collect();
    listed.sort();
    listed.dedup();
    assert_eq!(on_disk, listed, "every example file is checked here");

    for (file, extra, error_no, word) in table {
        let path = format!("examples/requests/{file}");
        let mut args = extra.to_vec();
        args.push(&path);
        let out = fwagent(&args, None);
        assert_exit(&out, if *error_no == 0 { 0 } else { 1 });
        let ack = ack_of(&out);
        assert_eq!(ack["result"]["errorNo"], *error_no, "{file}: {ack}");
        let why = ack["result"]["description"]
            .as_str()
            .expect("a description");
        assert!(
            why.contains(word),
            "{file}: {why:?} should contain {word:?}"
        );
        assert_eq!(ack["operator"], "setCloudUpgradeConfig-Ack", "{file}");
        assert_no_secrets(&out);
    }
}

#[test]
fn explain_shows_the_request_without_its_secrets() {
    let runs: &[&[&str]] = &[
        &["--explain", "examples/requests/seed-1-ftp.json"],
        &[
            "--explain",
            "--credentials-decoder",
            DECODER,
            "examples/requests/seed-2-ftp-enciphered.json",
        ],
        &["--explain", "examples/requests/http-port-string.json"],
        &["--explain", "examples/requests/https-ipv6-passport.json"],
        &["--explain", "examples/requests/ftp-path-is-file.json"],
    ];
    for args in runs {
        let out = fwagent(args, None);
        assert_exit(&out, 0);
        assert_no_secrets(&out);
        let text = stdout(&out);
        let (first, rest) = text.split_once('\n').expect("more than the ack");
        assert_eq!(
            serde_json::from_str::<Value>(first).expect("ack")["result"]["errorNo"],
            0
        );
        let explained: Value = serde_json::from_str(rest).expect("the explanation is JSON");
        assert!(explained["url"].as_str().is_some(), "{explained}");
        assert!(
            explained["serverConfig"]["userName"] == "<redacted>"
                || explained["serverConfig"]["userName"] == "",
            "{explained}"
        );
    }

    let out = fwagent(
        &["--explain", "examples/requests/https-ipv6-passport.json"],
        None,
    );
    let text = stdout(&out);
    let explained: Value =
        serde_json::from_str(text.split_once('\n').expect("two parts").1).expect("JSON");
    assert_eq!(
        explained["url"],
        "https://[::1]:8443/releases/2024%20Q1/gw-100%20v2.1.0%20%23rc1.bin"
    );
    assert_eq!(explained["fileInfo"]["passPort"], "<redacted>");

    let out = fwagent(
        &[
            "--explain",
            "--credentials-decoder",
            DECODER,
            "examples/requests/seed-2-ftp-enciphered.json",
        ],
        None,
    );
    let text = stdout(&out);
    let explained: Value =
        serde_json::from_str(text.split_once('\n').expect("two parts").1).expect("JSON");
    assert_eq!(explained["serverConfig"]["userName"], "<redacted>");
    assert_eq!(explained["serverConfig"]["password"], "<redacted>");
    assert_eq!(explained["fileInfo"]["upgradeFileSize"], 41522432);
}

#[test]
fn explain_of_a_rejected_request_prints_the_ack_only() {
    let out = fwagent(
        &["--explain", "examples/requests/seed-2-ftp-enciphered.json"],
        None,
    );
    assert_exit(&out, 1);
    assert_eq!(stdout(&out).lines().count(), 1);
    assert_no_secrets(&out);
}

#[test]
fn the_request_can_come_from_stdin() {
    let request = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/requests/seed-1-ftp.json"),
    )
    .expect("the example");
    for args in [&["-"][..], &[][..]] {
        let out = fwagent(args, Some(&request));
        assert_exit(&out, 0);
        assert_eq!(ack_of(&out)["result"]["errorNo"], 0);
    }
}

#[test]
fn malformed_input_gets_errno_1_from_an_unknown_operator() {
    let out = fwagent(&["-"], Some(b"{\"operator\": "));
    assert_exit(&out, 1);
    let ack = ack_of(&out);
    assert_eq!(ack["operator"], "unknown-Ack");
    assert_eq!(ack["result"]["errorNo"], 1);
    assert_eq!(ack["sessionId"], "");
    assert_eq!(ack["messageId"], "");

    let out = fwagent(&["-"], Some(b"[]"));
    assert_exit(&out, 1);
    assert_eq!(ack_of(&out)["result"]["errorNo"], 1);
}

#[test]
fn an_oversized_request_is_malformed() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("big.json");
    let mut big = br#"{"operator":"setCloudUpgradeConfig","pad":""#.to_vec();
    big.extend(vec![b'x'; 100 * 1024]);
    big.extend(b"\"}");
    std::fs::write(&path, &big).expect("write the request");
    let out = fwagent(&[path.to_str().expect("a UTF-8 path")], None);
    assert_exit(&out, 1);
    let ack = ack_of(&out);
    assert_eq!(ack["result"]["errorNo"], 1);
    assert!(ack["result"]["description"]
        .as_str()
        .is_some_and(|d| d.contains("65536")));
}

#[test]
fn an_unreadable_file_exits_2() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let missing = dir.path().join("no-such-request.json");
    let out = fwagent(&[missing.to_str().expect("a UTF-8 path")], None);
    assert_exit(&out, 2);
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-request.json"));

    // A directory opens but cannot be read.
    let out = fwagent(&[dir.path().to_str().expect("a UTF-8 path")], None);
    assert_exit(&out, 2);
    assert!(out.stdout.is_empty());
}

#[test]
fn max_image_size_refuses_larger_images() {
    let file = "examples/requests/seed-1-ftp.json";
    let out = fwagent(&["--max-image-size", "66142", file], None);
    assert_exit(&out, 1);
    let ack = ack_of(&out);
    assert_eq!(ack["result"]["errorNo"], 4);
    assert!(ack["result"]["description"]
        .as_str()
        .is_some_and(|d| d.contains("info.fileInfo.upgradeFileSize")));
    let out = fwagent(&["--max-image-size", "66143", file], None);
    assert_exit(&out, 0);
}

#[test]
fn a_failing_decoder_is_a_rejection_that_hides_the_credential() {
    let out = fwagent(
        &[
            "--credentials-decoder",
            "echo demo-user; exit 9",
            "examples/requests/seed-2-ftp-enciphered.json",
        ],
        None,
    );
    assert_exit(&out, 1);
    let ack = ack_of(&out);
    assert_eq!(ack["result"]["errorNo"], 4);
    assert_no_secrets(&out);
}

#[test]
fn limit_flags_the_agent_refuses_are_refused_by_check_too() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (flag, value, says) in [
        ("--max-request-bytes", "0", "--max-request-bytes must be"),
        (
            "--max-request-bytes",
            "99999999",
            "--max-request-bytes must be",
        ),
        ("--max-id-bytes", "0", "--max-id-bytes must be at least 1"),
    ] {
        let check = fwagent(&[flag, value, "-"], Some(b"{}"));
        assert_exit(&check, 2);
        assert!(stdout(&check).is_empty(), "no ack for a usage error");
        let state = dir.path().join("state");
        let run = Command::new(env!("CARGO_BIN_EXE_fwagent"))
            .args(["run", "--transport", "stdio", "--flash", "file:/dev/null"])
            .arg("--state-dir")
            .arg(&state)
            .args([flag, value])
            .stdin(Stdio::null())
            .output()
            .expect("fwagent run");
        for out in [&check, &run] {
            assert_eq!(out.status.code(), Some(2), "{flag} {value}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(says), "{flag} {value}: {err}");
        }
    }
}

/// `fwagent run` with `args` (and `--state-dir DIR/state`, `--flash
/// file:DIR/target`), stdin closed: with no request it exits at once.
fn run_agent(dir: &Path, args: &[&str]) -> Output {
    let target = dir.join("target");
    std::fs::write(&target, b"").expect("the flash target");
    Command::new(env!("CARGO_BIN_EXE_fwagent"))
        .args(["run", "--transport", "stdio"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--flash")
        .arg(format!("file:{}", target.display()))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("fwagent run")
}

/// Every numeric flag of `run` where 0 would mean nothing is refused as a
/// usage error naming the flag, on the command line and as a config key;
/// the zeros that mean something (documented in `--help`) are taken.
#[test]
fn meaningless_zeros_are_usage_errors_naming_the_flag() {
    let dir = tempfile::tempdir().expect("temp dir");
    for flag in [
        "--download-attempts",
        "--checkpoint-bytes",
        "--connect-timeout",
        "--idle-timeout",
        "--install-timeout",
        "--boot-tries",
        "--max-image-size",
        "--mqtt-puback-timeout",
    ] {
        let run = run_agent(dir.path(), &[flag, "0"]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{flag} 0: {err}");
        assert!(
            err.contains(flag) && err.contains("must be at least 1"),
            "{flag} 0: {err}"
        );
        let key = flag.trim_start_matches("--");
        let config = dir.path().join("fwagent.toml");
        std::fs::write(&config, format!("{key} = 0\n")).expect("write the config");
        let run = run_agent(dir.path(), &["--config", &config.display().to_string()]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{key} = 0: {err}");
        assert!(
            err.contains(key) && err.contains("nonzero"),
            "{key} = 0: {err}"
        );
    }
    let check = fwagent(&["--max-image-size", "0", "-"], Some(b"{}"));
    assert_exit(&check, 2);
    assert!(String::from_utf8_lossy(&check.stderr).contains("--max-image-size"));
    // 0 = no minimum rate, follow no redirect, retry at once: meant.
    for (flag, value) in [
        ("--min-rate", "0"),
        ("--max-redirects", "0"),
        ("--retry-base-ms", "0"),
    ] {
        let run = run_agent(dir.path(), &[flag, value]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(0), "{flag} {value}: {err}");
    }
}

/// `fwagent ARGS` (no `check` in front), from the package root.
fn fwagent_bare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fwagent"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run fwagent")
}

/// `--version` names the version and the commit the binary was built from
/// (with `+dirty` for a tree with uncommitted changes): the commit of this
/// checkout when it is one.
#[test]
fn version_names_the_git_commit() {
    let out = fwagent_bare(&["--version"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("fwagent {} (", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&want), "{text}");
    let commit = text[want.len()..].trim_end().trim_end_matches(')');
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(head) => assert_eq!(commit.trim_end_matches("+dirty"), head, "{text}"),
        None => assert_eq!(commit, "unknown", "{text}"),
    }
}

/// `fwagent completions SHELL` prints a script made from the same clap
/// definitions: every subcommand is in it, the bash one parses, and an
/// unknown shell is a usage error.
#[test]
fn completions_cover_every_subcommand_in_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let out = fwagent_bare(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8_lossy(&out.stdout);
        for sub in [
            "run", "check", "status", "history", "show", "watch", "submit", "cancel", "sign",
            "verify",
        ] {
            assert!(script.contains(sub), "{shell}: no {sub}");
        }
        assert!(script.contains("state-dir"), "{shell}");
        if shell == "bash" {
            let dir =
                std::env::temp_dir().join(format!("fwagent-completions-{}", std::process::id()));
            std::fs::write(&dir, script.as_bytes()).unwrap();
            let parsed = Command::new("bash").arg("-n").arg(&dir).status().unwrap();
            std::fs::remove_file(&dir).ok();
            assert!(parsed.success(), "bash -n rejects the script");
        }
    }
    let out = fwagent_bare(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
