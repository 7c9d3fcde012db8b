//! Helpers shared by the integration tests: `mod common;` at the top of a test file.
//!
//! The real servers (nginx, pyftpdlib, vsftpd, mosquitto) are started by
//! `scripts/test-servers.sh start` (which `make test` and `make servers` run); it writes
//! `target/test-servers/env`, and `make test` runs `cargo test` with that file sourced.
//! [`Servers::from_env`] reads it back.
//!
//! - [`servers`]: the test servers, their URLs and files, nginx's access log;
//! - [`firmware`]: firmware files and the requests for them;
//! - [`agent`]: running the real binary, the hostile-server runs, the kill -9 harness;
//! - [`reports`]: what the agent printed, and the shared assertions on it;
//! - [`mqtt`]: brokers of a test's own, and the lock for the shared one;
//! - here: unique names, temporary directories, ports, waiting.
//!
//! Everything is re-exported here, so a test file says `use common::*;`.
//! Each test uses only some of these, hence the module-wide `allow(dead_code)`.
#![allow(dead_code)]

mod agent;
mod firmware;
mod mqtt;
mod reports;
mod servers;

// A test file uses only some of them.
#[allow(unused_imports)]
pub use {agent::*, firmware::*, mqtt::*, reports::*, servers::*};

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
