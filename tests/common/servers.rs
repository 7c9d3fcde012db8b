//! The servers `scripts/test-servers.sh` started (nginx, pyftpdlib, vsftpd,
//! the shared mosquitto), as its env file describes them: their URLs, files
//! put into their roots, requests for those files, nginx's access log, and
//! stopping and starting the shared broker.

use super::{
    alive, spawn_detached, upgrade_request, wait_port, wait_port_closed, wait_until, Firmware,
};
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

const HINT: &str = "the integration tests need the real test servers: run `make test`, or \
                    `make servers` and then `. target/test-servers/env` before `cargo test`";

/// The servers started by `scripts/test-servers.sh`, as its env file describes them.
/// Every server listens on 127.0.0.1 only.
#[derive(Debug, Clone)]
pub struct Servers {
    /// The run directory (`target/test-servers`).
    pub dir: PathBuf,
    /// nginx: plain HTTP port; `/` serves `nginx_root`, `/slow/` the same at 1 MiB/s,
    /// `/slow256k/`, `/slow2m/`, `/slow4m/`, `/slow8m/` at those rates, `/rate/300k/` or any
    /// `/rate/N[k|m]/` at that rate (nginx lets a response run about a second ahead of its
    /// rate: N bytes take about N/rate - 1 s), `/auth/` behind Basic auth (`http_user`/`http_pass`),
    /// `/norange/` ignoring `Range`, `/status/{403,404,500,503}`, `/redirect/X` → 302 `/X`.
    pub nginx_port: u16,
    /// nginx: the same server over TLS, certificate for `localhost` and `127.0.0.1` signed by
    /// the CA in `tls_ca`.
    pub nginx_tls_port: u16,
    pub nginx_root: PathBuf,
    /// nginx's access log: one JSON object per line (see [`NginxLogEntry`]).
    pub nginx_log: PathBuf,
    pub http_user: String,
    pub http_pass: String,
    pub tls_ca: PathBuf,
    /// pyftpdlib: one user (`ftp_user`/`ftp_pass`) with full rights over `ftp_root`.
    pub ftp_port: u16,
    pub ftp_user: String,
    pub ftp_pass: String,
    pub ftp_root: PathBuf,
    /// vsftpd: anonymous only, read-only, over `vsftpd_root`.
    pub vsftpd_port: u16,
    pub vsftpd_root: PathBuf,
    /// mosquitto: anonymous, persistent (its store is saved about a second after a change).
    pub mqtt_port: u16,
    /// mosquitto over TLS (same CA as nginx).
    pub mqtts_port: u16,
    /// The shared broker's full command line, to restart it after [`Servers::kill_mosquitto`].
    pub mosquitto_cmd: String,
    pub mosquitto_pidfile: PathBuf,
    pub mosquitto_log: PathBuf,
}

fn env_var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("${name} is not set. {HINT}"),
    }
}

fn env_port(name: &str) -> u16 {
    let v = env_var(name);
    v.parse()
        .unwrap_or_else(|_| panic!("${name}={v:?} is not a port. {HINT}"))
}

impl Servers {
    /// Reads the `FWAGENT_TEST_*` variables; panics with instructions when they are missing.
    pub fn from_env() -> Servers {
        let s = Servers {
            dir: env_var("FWAGENT_TEST_SERVERS_DIR").into(),
            nginx_port: env_port("FWAGENT_TEST_NGINX_PORT"),
            nginx_tls_port: env_port("FWAGENT_TEST_NGINX_TLS_PORT"),
            nginx_root: env_var("FWAGENT_TEST_NGINX_ROOT").into(),
            nginx_log: env_var("FWAGENT_TEST_NGINX_LOG").into(),
            http_user: env_var("FWAGENT_TEST_NGINX_AUTH_USER"),
            http_pass: env_var("FWAGENT_TEST_NGINX_AUTH_PASS"),
            tls_ca: env_var("FWAGENT_TEST_TLS_CA").into(),
            ftp_port: env_port("FWAGENT_TEST_FTP_PORT"),
            ftp_user: env_var("FWAGENT_TEST_FTP_USER"),
            ftp_pass: env_var("FWAGENT_TEST_FTP_PASS"),
            ftp_root: env_var("FWAGENT_TEST_FTP_ROOT").into(),
            vsftpd_port: env_port("FWAGENT_TEST_VSFTPD_PORT"),
            vsftpd_root: env_var("FWAGENT_TEST_VSFTPD_ROOT").into(),
            mqtt_port: env_port("FWAGENT_TEST_MQTT_PORT"),
            mqtts_port: env_port("FWAGENT_TEST_MQTTS_PORT"),
            mosquitto_cmd: env_var("FWAGENT_TEST_MOSQUITTO_CMD"),
            mosquitto_pidfile: env_var("FWAGENT_TEST_MOSQUITTO_PIDFILE").into(),
            mosquitto_log: env_var("FWAGENT_TEST_MOSQUITTO_LOG").into(),
        };
        for root in [&s.nginx_root, &s.ftp_root, &s.vsftpd_root] {
            assert!(
                root.is_dir(),
                "{} does not exist: the test servers are not running. {HINT}",
                root.display()
            );
        }
        s
    }

    /// `Some` when the env file has been sourced, for tests that can do without servers.
    pub fn try_from_env() -> Option<Servers> {
        std::env::var_os("FWAGENT_TEST_NGINX_PORT").map(|_| Servers::from_env())
    }

    /// `http://127.0.0.1:PORT/` + `path` (a leading `/` is optional).
    pub fn http_url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.nginx_port,
            path.trim_start_matches('/')
        )
    }

    pub fn https_url(&self, path: &str) -> String {
        format!(
            "https://localhost:{}/{}",
            self.nginx_tls_port,
            path.trim_start_matches('/')
        )
    }

    pub fn ftp_url(&self, path: &str) -> String {
        format!(
            "ftp://{}:{}@127.0.0.1:{}/{}",
            self.ftp_user,
            self.ftp_pass,
            self.ftp_port,
            path.trim_start_matches('/')
        )
    }

    pub fn vsftpd_url(&self, path: &str) -> String {
        format!(
            "ftp://127.0.0.1:{}/{}",
            self.vsftpd_port,
            path.trim_start_matches('/')
        )
    }

    pub fn mqtt_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt_port)
    }

    /// A firmware file of `len` bytes in nginx's docroot (also reachable under `/slow/`,
    /// `/auth/`, ...), with a unique name starting with `prefix`.
    pub fn put_http(&self, prefix: &str, len: u64) -> Firmware {
        Firmware::create(&self.nginx_root, prefix, len)
    }

    /// A firmware file in pyftpdlib's root (user `ftp_user`).
    pub fn put_ftp(&self, prefix: &str, len: u64) -> Firmware {
        Firmware::create(&self.ftp_root, prefix, len)
    }

    /// A firmware file in vsftpd's root (anonymous).
    pub fn put_vsftpd(&self, prefix: &str, len: u64) -> Firmware {
        Firmware::create(&self.vsftpd_root, prefix, len)
    }

    /// Every access-log line whose `request_uri` is `uri`, or whose path (before `?`) is.
    pub fn nginx_requests(&self, uri: &str) -> Vec<NginxLogEntry> {
        nginx_log_entries(&self.nginx_log)
            .into_iter()
            .filter(|e| e.request_uri == uri || e.request_uri.split('?').next() == Some(uri))
            .collect()
    }

    /// Sum of `$bytes_sent` (headers included) over the requests for `uri`. nginx logs a
    /// request when it ends, so wait for the client to be gone first (see
    /// [`Servers::wait_nginx_requests`]). Bytes that nginx wrote into a socket whose client
    /// then died count too (up to a few MB of socket buffers on loopback).
    pub fn nginx_bytes_sent(&self, uri: &str) -> u64 {
        self.nginx_requests(uri).iter().map(|e| e.bytes_sent).sum()
    }

    /// Sum of `$body_bytes_sent` over the requests for `uri`.
    pub fn nginx_body_bytes_sent(&self, uri: &str) -> u64 {
        self.nginx_requests(uri)
            .iter()
            .map(|e| e.body_bytes_sent)
            .sum()
    }

    /// Waits until at least `n` requests for `uri` are logged; panics after `timeout`.
    pub fn wait_nginx_requests(
        &self,
        uri: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<NginxLogEntry> {
        let mut got = Vec::new();
        wait_until(
            timeout,
            &format!("nginx to log {n} request(s) for {uri}"),
            || {
                got = self.nginx_requests(uri);
                got.len() >= n
            },
        );
        got
    }

    /// The pid of the shared broker, from its pid file.
    pub fn mosquitto_pid(&self) -> Option<i32> {
        fs::read_to_string(&self.mosquitto_pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// SIGKILLs the shared broker and waits until its port is closed: a crash, so what
    /// arrived in the last second or so before may be lost (it saves its store about a second
    /// after each change). Take [`broker_lock`] in every test of a binary that stops the
    /// shared broker, or better, use a broker of the test's own: [`Mosquitto::start`].
    pub fn kill_mosquitto(&self) {
        self.signal_mosquitto(libc::SIGKILL);
    }

    /// SIGTERM: the shared broker saves its store and exits; everything it had survives.
    pub fn stop_mosquitto(&self) {
        self.signal_mosquitto(libc::SIGTERM);
    }

    fn signal_mosquitto(&self, sig: i32) {
        let pid = self
            .mosquitto_pid()
            .expect("no mosquitto pid file: is the broker running?");
        assert!(pid > 1);
        // SAFETY: kill(2) on a pid read from the broker's own pid file.
        unsafe { libc::kill(pid, sig) };
        wait_port_closed(self.mqtt_port, Duration::from_secs(10));
        wait_until(Duration::from_secs(10), "mosquitto to exit", || !alive(pid));
        let _ = fs::remove_file(&self.mosquitto_pidfile);
    }

    /// Starts the shared broker again from `FWAGENT_TEST_MOSQUITTO_CMD` (same port, same
    /// store) and waits until it accepts connections. `make test` stops it at the end.
    pub fn start_mosquitto(&self) {
        let mut child = spawn_detached(&self.mosquitto_cmd);
        // Reap it whenever it exits (killed by a later test, or by `make test`'s stop).
        thread::spawn(move || child.wait());
        wait_port(self.mqtt_port, Duration::from_secs(10));
    }

    /// Stops (SIGTERM) and starts the shared broker.
    pub fn restart_mosquitto(&self) {
        self.stop_mosquitto();
        self.start_mosquitto();
    }

    /// An `setCloudUpgradeConfig` request for `fw` on nginx (`http`, anonymous).
    pub fn http_request(&self, fw: &Firmware) -> serde_json::Value {
        upgrade_request("http", self.nginx_port, "/", fw, "", "")
    }

    /// The same behind `/auth/` with the right Basic credentials.
    pub fn http_auth_request(&self, fw: &Firmware) -> serde_json::Value {
        upgrade_request(
            "http",
            self.nginx_port,
            "/auth/",
            fw,
            &self.http_user,
            &self.http_pass,
        )
    }

    /// A request for `fw` on pyftpdlib (user and password).
    pub fn ftp_request(&self, fw: &Firmware) -> serde_json::Value {
        upgrade_request(
            "ftp",
            self.ftp_port,
            "/",
            fw,
            &self.ftp_user,
            &self.ftp_pass,
        )
    }

    /// A request for `fw` on vsftpd (anonymous: empty credentials).
    pub fn vsftpd_request(&self, fw: &Firmware) -> serde_json::Value {
        upgrade_request("ftp", self.vsftpd_port, "/", fw, "", "")
    }
}

// ---------------------------------------------------------------- nginx access log

/// One line of nginx's access log (the `fwjson` format in scripts/test-servers.sh).
#[derive(Debug, Clone, PartialEq)]
pub struct NginxLogEntry {
    pub method: String,
    /// As the client sent it, query string included.
    pub request_uri: String,
    pub status: u16,
    /// Bytes written to the client, headers included.
    pub bytes_sent: u64,
    pub body_bytes_sent: u64,
    /// The `Range` header, `""` when absent.
    pub range: String,
    /// The Basic-auth user name, `""` when none.
    pub user: String,
    /// nginx's connection serial number (same value: same keep-alive connection).
    pub connection: u64,
    pub request_time: f64,
    pub port: u16,
}

/// All entries of an nginx access log in our JSON format; unparsable lines are skipped
/// (a line being written right now).
pub fn nginx_log_entries(log: &Path) -> Vec<NginxLogEntry> {
    let text = fs::read_to_string(log).unwrap_or_else(|e| panic!("read {}: {e}", log.display()));
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            let n = |k: &str| v[k].as_u64().unwrap_or_default();
            NginxLogEntry {
                method: s("method"),
                request_uri: s("request_uri"),
                status: n("status") as u16,
                bytes_sent: n("bytes_sent"),
                body_bytes_sent: n("body_bytes_sent"),
                range: s("range"),
                user: s("user"),
                connection: n("connection"),
                request_time: v["request_time"].as_f64().unwrap_or_default(),
                port: n("port") as u16,
            }
        })
        .collect()
}
