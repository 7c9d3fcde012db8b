//! Helpers shared by the integration tests: `mod common;` at the top of a test file.
//!
//! The real servers (nginx, pyftpdlib, vsftpd, mosquitto) are started by
//! `scripts/test-servers.sh start` (which `make test` and `make servers` run); it writes
//! `target/test-servers/env`, and `make test` runs `cargo test` with that file sourced.
//! [`Servers::from_env`] reads it back.
//!
//! Each test uses only some of these, hence the module-wide `allow(dead_code)`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use md5::{Digest, Md5};

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
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.nginx_requests(uri);
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "nginx logged {} request(s) for {uri} within {timeout:?}, wanted {n}: {got:#?}",
                got.len()
            );
            thread::sleep(Duration::from_millis(50));
        }
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

/// Serialises tests of one binary that kill or restart the shared broker (and the tests that
/// need it up meanwhile). A poisoned lock is taken anyway.
pub fn broker_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- firmware files

/// A firmware file a test wrote.
#[derive(Debug, Clone)]
pub struct Firmware {
    /// The file name (unique per test run).
    pub name: String,
    pub path: PathBuf,
    pub len: u64,
    /// Lowercase hex md5 of the content.
    pub md5: String,
    pub seed: u64,
}

impl Firmware {
    /// Writes `len` pseudo-random bytes (seeded from the unique name) into `dir`.
    pub fn create(dir: &Path, prefix: &str, len: u64) -> Firmware {
        let name = unique_name(prefix) + ".bin";
        let seed = seed_of(&name);
        let path = dir.join(&name);
        let md5 = write_firmware(&path, len, seed);
        Firmware {
            name,
            path,
            len,
            md5,
            seed,
        }
    }

    /// The `path` a request needs to reach this file under a server location such as
    /// `/slow/`: the location itself (the firmware name is appended by the agent).
    pub fn uri(&self, location: &str) -> String {
        format!("/{}/{}", location.trim_matches('/'), self.name).replace("//", "/")
    }

    /// Overwrites the file with other content of the same length (a changed image).
    pub fn rewrite(&mut self, seed: u64) {
        self.seed = seed;
        self.md5 = write_firmware(&self.path, self.len, seed);
    }

    pub fn bytes(&self) -> Vec<u8> {
        fs::read(&self.path).expect("read firmware back")
    }
}

fn seed_of(name: &str) -> u64 {
    // FNV-1a: a fixed function of the name, so a failing test's file can be made again.
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The deterministic byte stream behind [`write_firmware`]: xorshift64* words, little-endian.
pub struct FirmwareBytes {
    state: u64,
}

impl FirmwareBytes {
    pub fn new(seed: u64) -> Self {
        FirmwareBytes {
            state: seed | 1, // never zero
        }
    }

    /// Fills `buf` (its length a multiple of 8, except perhaps the last call).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.state;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.state = x;
            let w = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
}

/// `len` bytes from seed `seed` in memory (for small images).
pub fn firmware_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    FirmwareBytes::new(seed).fill(&mut v);
    v
}

/// Writes `len` bytes from seed `seed` to `path` (via a temporary name and a rename, so a
/// server never serves it half-written) and returns their md5 as lowercase hex.
pub fn write_firmware(path: &Path, len: u64, seed: u64) -> String {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    let mut out = BufWriter::with_capacity(
        1 << 20,
        File::create(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display())),
    );
    let mut gen = FirmwareBytes::new(seed);
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        gen.fill(&mut buf[..n]);
        md5.update(&buf[..n]);
        out.write_all(&buf[..n]).expect("write firmware");
        left -= n as u64;
    }
    out.into_inner()
        .expect("flush firmware")
        .sync_all()
        .expect("fsync firmware");
    fs::rename(&tmp, path).expect("rename firmware into place");
    hex::encode(md5.finalize())
}

/// md5 of a file as lowercase hex.
pub fn md5_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
    }
    hex::encode(md5.finalize())
}

/// `prefix-<pid>-<counter>-<nanos>`: unique across the tests of a run and across runs.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:09}", std::process::id())
}

/// A fresh temporary directory, removed when dropped (keep it with `into_path` to inspect).
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fwagent-test-")
        .tempdir()
        .expect("create temp dir")
}

// ---------------------------------------------------------------- requests

/// Base64 (standard alphabet, padded) as the protocol carries `userName` and `password`.
pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A `setCloudUpgradeConfig` request for `fw` at `protocol://127.0.0.1:port{path}` with a
/// unique messageId. Tweak the returned value for the invalid cases.
pub fn upgrade_request(
    protocol: &str,
    port: u16,
    path: &str,
    fw: &Firmware,
    user: &str,
    pass: &str,
) -> serde_json::Value {
    serde_json::json!({
        "operator": "setCloudUpgradeConfig",
        "sessionId": format!("SID:{}", unique_name("test")),
        "messageId": format!("MID:{}", unique_name("localhost")),
        "info": {
            "serverConfig": {
                "host": "127.0.0.1",
                "port": port,
                "userName": b64(user),
                "password": b64(pass),
                "protocol": protocol,
                "path": path,
            },
            "fileInfo": {
                "firmwareName": fw.name,
                "md5sum": fw.md5,
                "upgradeFileSize": fw.len,
            }
        }
    })
}

/// A seed example (`text`) with its server rewritten to `protocol` on
/// 127.0.0.1:`port`, path `/`, and its file to `fw`, under a fresh
/// messageId. The size goes under whichever spelling the example uses.
pub fn seed_on(text: &str, protocol: &str, port: u16, fw: &Firmware) -> serde_json::Value {
    let mut req: serde_json::Value = serde_json::from_str(text).expect("the seed example is JSON");
    let server = &mut req["info"]["serverConfig"];
    assert_eq!(
        server["host"], "127.0.0.1",
        "examples never name the seed's host"
    );
    server["protocol"] = protocol.into();
    server["port"] = port.into();
    server["path"] = "/".into();
    let file = &mut req["info"]["fileInfo"];
    file["firmwareName"] = format!("{} ", fw.name).into(); // as the seed: a trailing space
    file["md5sum"] = fw.md5.clone().into();
    let size_key = if file.get("totalSize").is_some() {
        "totalSize"
    } else {
        "upgradeFileSize"
    };
    file[size_key] = fw.len.into();
    req["messageId"] = format!("MID:{}", unique_name("seed")).into();
    req
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

// ---------------------------------------------------------------- ports and waiting

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// Waits until something accepts on 127.0.0.1:`port`.
pub fn wait_port(port: u16, timeout: Duration) {
    wait_until(timeout, &format!("127.0.0.1:{port} to accept"), || {
        port_open(port)
    });
}

/// Waits until nothing accepts on 127.0.0.1:`port`.
pub fn wait_port_closed(port: u16, timeout: Duration) {
    wait_until(timeout, &format!("127.0.0.1:{port} to close"), || {
        !port_open(port)
    });
}

/// The process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// A port that was free on 127.0.0.1 a moment ago (for servers a test starts itself).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Runs a shell command line in its own process group, detached from the test's stdio, and
/// does not wait for it.
fn spawn_detached(cmdline: &str) -> Child {
    Command::new("bash")
        .arg("-c")
        .arg(format!("exec {cmdline}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn `{cmdline}`: {e}"))
}

// ---------------------------------------------------------------- a private broker

/// A mosquitto of the test's own, on a fresh port with its store in a temp dir: for tests
/// that kill and restart the broker without disturbing others. Killed on drop.
pub struct Mosquitto {
    pub port: u16,
    pub dir: tempfile::TempDir,
    cmdline: String,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        let bin = std::env::var("FWAGENT_TEST_MOSQUITTO_BIN")
            .ok()
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| "/usr/sbin/mosquitto".into());
        let dir = temp_dir();
        let port = free_port();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let conf = dir.path().join("mosquitto.conf");
        fs::write(
            &conf,
            format!(
                "{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {d}/\nautosave_on_changes true\nautosave_interval 1\n\
                 log_dest file {d}/mosquitto.log\n",
                user = if root { "user root\n" } else { "" },
                d = dir.path().display()
            ),
        )
        .expect("write mosquitto.conf");
        let mut m = Mosquitto {
            port,
            cmdline: format!("'{bin}' -c '{}'", conf.display()),
            dir,
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        self.child = Some(spawn_detached(&self.cmdline));
        wait_port(self.port, Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, a crash: the broker keeps what it had saved, and it saves its store about a
    /// second after a change, so what arrived just before may be lost (as on a real crash).
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
    }

    /// SIGTERM: the broker saves its store and exits; everything it had survives.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
    }

    fn signal(&mut self, sig: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(c.id() as i32, sig) };
            let _ = c.wait();
            wait_port_closed(self.port, Duration::from_secs(10));
        }
    }

    /// Starts it again on the same port with the same store (after [`Self::kill`] or
    /// [`Self::stop`]; if it still runs, stops it first).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Its log file (connections, subscriptions, saves).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------- running fwagent

/// The `fwagent` binary cargo built for these tests.
pub fn fwagent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fwagent"))
}

/// `fwagent` with `args`: stdin closed, output captured, `NO_COLOR`, no inherited crash point.
pub fn fwagent<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(fwagent_bin());
    c.args(args)
        .env("NO_COLOR", "1")
        .env_remove("FWAGENT_CRASH_AT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// What a finished `fwagent` run gave.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Each non-empty stdout line parsed as JSON (panics, showing the output, if one is not).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}\n{self}"))
            })
            .collect()
    }

    /// Killed by a signal (e.g. a crash point's SIGKILL): the signal number.
    pub fn signal(&self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        self.status.signal()
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fwagent exited with {}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` with `stdin` as its standard input; kills it and panics after `timeout`
/// (so a hung agent fails its test instead of hanging CI).
pub fn run_with_timeout(mut cmd: Command, stdin: &[u8], timeout: Duration) -> Run {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn fwagent");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = thread::spawn(move || {
        let _ = input.write_all(&data);
        // dropping `input` closes stdin: EOF for the agent
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait fwagent") {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
    match status {
        Some(status) => Run {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "fwagent did not finish within {timeout:?}; killed it\n--- stdout\n{stdout}--- stderr\n{stderr}"
        ),
    }
}

/// `fwagent args...` with `stdin`, at most `timeout`.
pub fn run_fwagent<I, S>(args: I, stdin: &[u8], timeout: Duration) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run_with_timeout(fwagent(args), stdin, timeout)
}

/// `fwagent run --transport stdio --state-dir STATE --flash file:TARGET` fed `requests`
/// (one JSON per line) then EOF: a one-shot upgrade. `env` adds variables (e.g.
/// `FWAGENT_CRASH_AT`).
pub fn run_stdio_upgrade(
    state: &Path,
    target: &Path,
    requests: &[serde_json::Value],
    env: &HashMap<&str, &str>,
    timeout: Duration,
) -> Run {
    let flash = file_flash(target);
    let mut cmd = fwagent(["run", "--transport", "stdio", "--state-dir"]);
    cmd.arg(state).arg("--flash").arg(flash);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut input = String::new();
    for r in requests {
        input.push_str(&r.to_string());
        input.push('\n');
    }
    run_with_timeout(cmd, input.as_bytes(), timeout)
}

// ---------------------------------------------------------------- agent output

/// A message's `operator` (`""` when absent).
pub fn operator(v: &serde_json::Value) -> &str {
    v["operator"].as_str().unwrap_or_default()
}

/// The result reports among `lines`.
pub fn results(lines: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    lines
        .iter()
        .filter(|v| operator(v) == "reportCloudUpgradeResult")
        .collect()
}

/// What a result report says.
#[derive(Debug)]
pub struct ResultReport {
    pub error_no: u64,
    pub phase: String,
    pub description: String,
}

/// The one result report among `lines` (asserted: exactly one); `what` says
/// where the lines came from, for the failure message.
pub fn only_result_among(
    lines: &[serde_json::Value],
    what: &dyn std::fmt::Display,
) -> ResultReport {
    let r = results(lines);
    assert_eq!(r.len(), 1, "one result report: {what}");
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    ResultReport {
        error_no: r[0]["result"]["errorNo"].as_u64().unwrap_or(u64::MAX),
        phase: text(&r[0]["info"]["phase"]),
        description: text(&r[0]["result"]["description"]),
    }
}

/// The one result report `run` printed (asserted: exactly one).
pub fn only_result(run: &Run) -> ResultReport {
    only_result_among(&run.json_lines(), run)
}

/// All stdout lines of several runs, in order.
pub fn all_lines<'a>(runs: impl IntoIterator<Item = &'a Run>) -> Vec<serde_json::Value> {
    runs.into_iter().flat_map(|r| r.json_lines()).collect()
}

/// No extra environment for [`run_stdio_upgrade`].
pub fn no_env() -> HashMap<&'static str, &'static str> {
    HashMap::new()
}

/// The run installed `fw`: ack 0 echoing the request, progress, one result
/// 0 last, the right image, no partial file left.
pub fn assert_installed(
    run: &Run,
    req: &serde_json::Value,
    fw: &Firmware,
    state: &Path,
    target: &Path,
) {
    assert_eq!(run.code(), Some(0), "{run}");
    let lines = run.json_lines();
    assert_eq!(operator(&lines[0]), "setCloudUpgradeConfig-Ack", "{run}");
    assert_eq!(lines[0]["result"]["errorNo"], 0, "{run}");
    assert_eq!(lines[0]["messageId"], req["messageId"]);
    assert_eq!(lines[0]["sessionId"], req["sessionId"]);
    assert_eq!(lines[0]["info"], "none");
    let progress: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| operator(v) == "reportCloudUpgradeProgress")
        .collect();
    assert!(!progress.is_empty(), "no progress reports: {run}");
    for p in &progress {
        assert_eq!(p["info"]["requestMessageId"], req["messageId"]);
        assert_eq!(p["info"]["totalBytes"], fw.len);
    }
    let r = results(&lines);
    assert_eq!(r.len(), 1, "{run}");
    assert_eq!(r[0]["result"]["errorNo"], 0, "{run}");
    assert_eq!(r[0]["info"]["phase"], "completed");
    assert_eq!(
        operator(lines.last().unwrap()),
        "reportCloudUpgradeResult",
        "the result comes last"
    );
    assert_eq!(md5_file(target), fw.md5, "the right image");
    assert!(
        !state.join("downloads").read_dir().unwrap().any(|_| true),
        "the partial file is removed once the upgrade ends"
    );
}

// ---------------------------------------------------------------- hostile servers

/// Generous: every hostile case is designed to end within seconds.
pub const SHORT_RUN_LIMIT: Duration = Duration::from_secs(60);

/// One run of the agent against a misbehaving server ([`run_short`]).
pub struct ShortRun {
    pub run: Run,
    pub took: Duration,
    pub state: PathBuf,
    pub target: PathBuf,
}

/// The short limits every hostile case runs with (`extra` in [`run_short`]
/// may replace them).
pub const SHORT_LIMITS: [(&str, &str); 4] = [
    ("--connect-timeout", "2"),
    ("--idle-timeout", "2"),
    ("--download-attempts", "3"),
    ("--retry-base-ms", "50"),
];

/// `fwagent run` over stdio with [`SHORT_LIMITS`] and `extra` flags, fed
/// `req` then EOF, into `DIR/state` and `--flash file:DIR/flash.bin`.
pub fn run_short(dir: &Path, req: &serde_json::Value, extra: &[(&str, &str)]) -> ShortRun {
    let state = dir.join("state");
    let target = dir.join("flash.bin");
    let mut cmd = fwagent(["run", "--transport", "stdio"]);
    for (flag, value) in SHORT_LIMITS {
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
        .arg(file_flash(&target));
    let started = Instant::now();
    let run = run_with_timeout(cmd, format!("{req}\n").as_bytes(), SHORT_RUN_LIMIT);
    ShortRun {
        run,
        took: started.elapsed(),
        state,
        target,
    }
}

impl ShortRun {
    /// Ended in `failed` with `error_no` within `bound`: acked 0, nothing
    /// flashed, no partial file, the store says the same. Returns the
    /// description.
    pub fn assert_failed(&self, error_no: u64, bound: Duration) -> String {
        assert_eq!(self.run.code(), Some(0), "{}", self.run);
        let lines = self.run.json_lines();
        assert_eq!(lines[0]["result"]["errorNo"], 0, "acked: {}", self.run);
        let ResultReport {
            error_no: no,
            phase,
            description,
        } = only_result(&self.run);
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
        assert!(unflashed(&self.target), "nothing is flashed");
        self.assert_no_partial_file();
        let status = run_fwagent(
            [
                "status",
                "--json",
                "--state-dir",
                self.state.to_str().unwrap(),
            ],
            b"",
            SHORT_RUN_LIMIT,
        );
        let job: serde_json::Value =
            serde_json::from_str(status.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {status}"));
        assert_eq!(job["phase"], "failed", "{status}");
        assert_eq!(job["result"]["errorNo"], error_no, "{status}");
        description
    }

    pub fn assert_completed(&self, fw: &Firmware) {
        assert_eq!(self.run.code(), Some(0), "{}", self.run);
        let ResultReport {
            error_no: no,
            phase,
            description,
        } = only_result(&self.run);
        assert_eq!(
            (no, phase.as_str()),
            (0, "completed"),
            "{description}\n{}",
            self.run
        );
        assert_eq!(md5_file(&self.target), fw.md5, "the right image");
        self.assert_no_partial_file();
    }

    pub fn assert_no_partial_file(&self) {
        let left: Vec<_> = std::fs::read_dir(self.state.join("downloads"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "partial files left: {left:?}");
    }
}

// ---------------------------------------------------------------- kill -9 rounds

/// `fwagent run --transport stdio --state-dir STATE --flash FLASH EXTRA...`,
/// not started yet.
pub fn stdio_agent(state: &Path, flash: &str, extra: &[&str]) -> Command {
    let mut cmd = fwagent(["run", "--transport", "stdio", "--state-dir"]);
    cmd.arg(state).arg("--flash").arg(flash).args(extra);
    cmd
}

/// `--flash file:TARGET`, TARGET created empty first unless it exists (the
/// agent flashes only an existing file or block device: an empty partition).
pub fn file_flash(target: &Path) -> String {
    if !target.exists() {
        if let Some(dir) = target.parent() {
            fs::create_dir_all(dir).expect("create the target's directory");
        }
        File::create(target).unwrap_or_else(|e| panic!("create {}: {e}", target.display()));
    }
    format!("file:{}", target.display())
}

/// Nothing was flashed to a target made by [`file_flash`]: it is still empty.
pub fn unflashed(target: &Path) -> bool {
    fs::metadata(target).is_ok_and(|m| m.len() == 0)
}

/// [`stdio_agent`] fed `requests` (one JSON per line) then EOF, at most `timeout`.
pub fn run_agent(
    state: &Path,
    target: &Path,
    extra: &[&str],
    requests: &[serde_json::Value],
    timeout: Duration,
) -> Run {
    let input: String = requests.iter().map(|r| format!("{r}\n")).collect();
    let cmd = stdio_agent(state, &file_flash(target), extra);
    run_with_timeout(cmd, input.as_bytes(), timeout)
}

/// Start [`stdio_agent`], write `input` to it (then EOF), and SIGKILL it after
/// `after`, wherever it is.
pub fn run_and_kill(state: &Path, flash: &str, extra: &[&str], input: &str, after: Duration) {
    let mut cmd = stdio_agent(state, flash, extra);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("spawn fwagent");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    thread::sleep(after);
    let _ = child.kill();
    let _ = child.wait();
}

/// A small deterministic generator for kill moments, seeded from
/// `FWAGENT_TEST_SEED` or the clock; the seed is printed, so a failing run can
/// be replayed.
pub struct XorShift(u64);

impl XorShift {
    pub fn from_env_or_clock() -> XorShift {
        let seed = std::env::var("FWAGENT_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(7)
                    | 1
            });
        eprintln!("kill -9 test seed: {seed}");
        XorShift(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The kill -9 rounds of the crash tests: SIGKILL the agent (`--flash
/// FLASH`) `kills` times at random moments 50–450 ms after its start (the
/// first run is fed `request`, the others nothing), then let one run finish
/// with stdin at EOF. Returns `fwagent status --json` of the store.
pub fn kill_rounds(
    state: &Path,
    flash: &str,
    extra: &[&str],
    request: &serde_json::Value,
    kills: u64,
) -> serde_json::Value {
    let mut rng = XorShift::from_env_or_clock();
    let input = format!("{request}\n");
    for round in 0..kills {
        let after = Duration::from_millis(50 + rng.next() % 400);
        run_and_kill(
            state,
            flash,
            extra,
            if round == 0 { &input } else { "" },
            after,
        );
    }
    let last = run_with_timeout(
        stdio_agent(state, flash, extra),
        b"",
        Duration::from_secs(300),
    );
    assert_eq!(last.code(), Some(0), "{last}");
    let status = run_fwagent(
        [
            "status",
            "--json",
            "--state-dir",
            &state.display().to_string(),
        ],
        b"",
        Duration::from_secs(60),
    );
    serde_json::from_str(status.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {status}"))
}

/// [`kill_rounds`] with `--flash file:TARGET`, then check in the store that
/// the upgrade completed with `md5` at `target` (its result may have been
/// sent before the last kill).
pub fn kill_rounds_then_complete(
    state: &Path,
    target: &Path,
    extra: &[&str],
    request: &serde_json::Value,
    kills: u64,
    md5: &str,
) {
    let job = kill_rounds(state, &file_flash(target), extra, request, kills);
    assert_eq!(job["phase"], "completed", "{job}");
    assert_eq!(md5_file(target), md5, "the right image");
}
