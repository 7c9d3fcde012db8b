//! Upgrades over https against the real nginx that `make test` starts: its TLS
//! listener serves the same docroot as the plain one, with a certificate for
//! `localhost` and `127.0.0.1` from a throwaway CA (`FWAGENT_TEST_TLS_CA`).
//! With `--https-ca` (flag or config key) the seed's message installs; without
//! it, or with another CA, the certificate is refused and the result says so;
//! a CA file that cannot be used stops `fwagent run` with the usage exit code.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(120);
const SHORT: Duration = Duration::from_secs(30);

/// The seed's first message (`examples/requests/seed-1-ftp.json`) for `fw`
/// on nginx's TLS listener: `"protocol":"https"`, no credentials, a fresh
/// messageId.
fn seed_over_https(servers: &Servers, fw: &Firmware) -> Value {
    let text = include_str!("../examples/requests/seed-1-ftp.json");
    let mut req = seed_on(text, "https", servers.nginx_tls_port, fw);
    req["info"]["serverConfig"]["userName"] = "".into();
    req["info"]["serverConfig"]["password"] = "".into();
    req
}

fn ca_arg(servers: &Servers) -> String {
    servers.tls_ca.display().to_string()
}

/// The requests nginx logged for `fw` on its TLS port (at least `n`, waited for).
fn tls_requests(servers: &Servers, fw: &Firmware, n: usize) -> Vec<NginxLogEntry> {
    servers
        .wait_nginx_requests(&fw.uri("/"), n, SHORT)
        .into_iter()
        .filter(|e| e.port == servers.nginx_tls_port)
        .collect()
}

#[test]
fn seed_message_over_https_installs_with_the_private_ca() {
    let servers = Servers::from_env();
    let fw = servers.put_http("https-seed", 300_000);
    let dir = temp_dir();
    let (state, target) = (dir.path().join("state"), dir.path().join("flash.bin"));
    let req = seed_over_https(&servers, &fw);
    let ca = ca_arg(&servers);
    let run = run_agent(
        &state,
        &target,
        &["--https-ca", &ca],
        std::slice::from_ref(&req),
        LONG,
    );
    assert_installed(&run, &req, &fw, &state, &target);
    assert_eq!(results(&run.json_lines())[0]["result"]["description"], "ok");
    let served = tls_requests(&servers, &fw, 1);
    assert_eq!(served.len(), 1, "one request, over TLS: {served:#?}");
    assert_eq!(served[0].status, 200);
    assert_eq!(served[0].body_bytes_sent, fw.len);
}

#[test]
fn the_config_file_key_trusts_the_ca_and_plain_http_still_works() {
    let servers = Servers::from_env();
    let fw = servers.put_http("https-config", 100_000);
    let dir = temp_dir();
    let config = dir.path().join("fwagent.toml");
    std::fs::write(
        &config,
        format!("https-ca = {:?}\n", servers.tls_ca.display().to_string()),
    )
    .unwrap();
    let config = config.display().to_string();

    let target = dir.path().join("flash-1.bin");
    let req = seed_over_https(&servers, &fw);
    let state = dir.path().join("s1");
    let run = run_agent(
        &state,
        &target,
        &["--config", &config],
        std::slice::from_ref(&req),
        LONG,
    );
    assert_installed(&run, &req, &fw, &state, &target);

    // The same client serves plain http.
    let target = dir.path().join("flash-2.bin");
    let req = servers.http_request(&fw);
    let state = dir.path().join("s2");
    let run = run_agent(
        &state,
        &target,
        &["--config", &config],
        std::slice::from_ref(&req),
        LONG,
    );
    assert_installed(&run, &req, &fw, &state, &target);
}

/// Runs the https request for `fw` with `extra` flags and two quick attempts;
/// returns the result's errorNo and description.
fn refused_run(servers: &Servers, fw: &Firmware, dir: &Path, extra: &[&str]) -> (i64, String) {
    let target = dir.join("flash.bin");
    let mut args = vec!["--download-attempts", "2", "--retry-base-ms", "50"];
    args.extend_from_slice(extra);
    let started = Instant::now();
    let run = run_agent(
        &dir.join("state"),
        &target,
        &args,
        &[seed_over_https(servers, fw)],
        LONG,
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the attempts are bounded: {run}"
    );
    assert_eq!(
        run.code(),
        Some(0),
        "a failed upgrade still ends the run: {run}"
    );
    let lines = run.json_lines();
    assert_eq!(lines[0]["result"]["errorNo"], 0, "accepted: {run}");
    let r = results(&lines);
    assert_eq!(r.len(), 1, "{run}");
    assert_eq!(r[0]["info"]["phase"], "failed", "{run}");
    assert!(unflashed(&target), "nothing is flashed: {run}");
    (
        r[0]["result"]["errorNo"].as_i64().unwrap(),
        r[0]["result"]["description"].as_str().unwrap().to_string(),
    )
}

#[test]
fn without_the_ca_the_certificate_is_refused_and_named() {
    let servers = Servers::from_env();
    let fw = servers.put_http("https-refused", 50_000);
    let dir = temp_dir();

    // Web PKI roots only: the throwaway CA is unknown.
    let (error_no, description) = refused_run(&servers, &fw, &dir.path().join("a"), &[]);
    eprintln!("without --https-ca: errorNo {error_no}: {description}");
    assert_eq!(error_no, 20, "could not connect: {description}");
    assert!(
        description.contains("TLS handshake failed: invalid peer certificate: UnknownIssuer"),
        "{description}"
    );
    assert!(
        description.contains("web PKI roots") && description.contains("--https-ca"),
        "the description says what was trusted: {description}"
    );

    // Another CA instead of the web PKI roots: still unknown.
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, OTHER_CA).unwrap();
    let other = other.display().to_string();
    let (error_no, description) = refused_run(
        &servers,
        &fw,
        &dir.path().join("b"),
        &["--https-ca", &other],
    );
    eprintln!("with another CA: errorNo {error_no}: {description}");
    assert_eq!(error_no, 20, "{description}");
    assert!(
        description.contains("invalid peer certificate: UnknownIssuer")
            && description.contains("the CA file of --https-ca"),
        "{description}"
    );

    // The handshake failed before any request: nginx served nothing.
    assert!(
        servers.nginx_requests(&fw.uri("/")).is_empty(),
        "no request reached nginx"
    );
}

/// A self-signed CA certificate that signed nothing nginx has (its key was
/// thrown away).
const OTHER_CA: &str = include_str!("data/unrelated-ca.pem");

#[test]
fn a_bad_https_ca_file_is_a_usage_error() {
    let dir = temp_dir();
    let file = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    };
    let empty = file("empty.pem", "");
    let text = file("text.pem", "this is not a certificate\n");
    let cut = file(
        "cut.pem",
        OTHER_CA
            .trim_end()
            .trim_end_matches("-----END CERTIFICATE-----"),
    );
    let missing = dir.path().join("missing.pem").display().to_string();
    let cases = [
        (&empty, "holds no certificate"),
        (&text, "holds no certificate"),
        (&cut, "a PEM section has no END line"),
        (&missing, "No such file"),
    ];
    for (path, why) in cases {
        let state = dir.path().join("state");
        let target = dir.path().join("flash.bin");
        let mut cmd = fwagent(["run", "--transport", "stdio", "--state-dir"]);
        cmd.arg(&state)
            .arg("--flash")
            .arg(format!("file:{}", target.display()))
            .args(["--https-ca", path.as_str()]);
        let run = run_with_timeout(cmd, b"", SHORT);
        assert_eq!(run.code(), Some(2), "{path}: the usage exit code\n{run}");
        let message = run.stderr.trim();
        eprintln!("{message}");
        assert_eq!(message.lines().count(), 1, "one line: {run}");
        assert!(
            message.starts_with("fwagent run: --https-ca: ")
                && message.contains(&format!("CA file {path}"))
                && message.contains(why),
            "{path}: wanted the flag, the file and {why:?}\n{run}"
        );
        assert!(run.stdout.is_empty(), "{run}");
        assert!(!state.exists(), "refused before anything is created");
    }

    // The same from the config file.
    let config = file("fwagent.toml", &format!("https-ca = {empty:?}\n"));
    let mut cmd = fwagent(["run", "--transport", "stdio", "--config", &config]);
    cmd.arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--flash")
        .arg(format!("file:{}", dir.path().join("flash.bin").display()));
    let run = run_with_timeout(cmd, b"", SHORT);
    assert_eq!(run.code(), Some(2), "{run}");
    assert!(
        run.stderr
            .contains(&format!("--https-ca: CA file {empty} holds no certificate")),
        "{run}"
    );
}
