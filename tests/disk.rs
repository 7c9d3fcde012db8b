//! A full disk, for real: each test mounts a small tmpfs (8 MiB) on the state
//! directory's `downloads/`, where partial images live, and unmounts it at the
//! end even when the test fails. The sled store stays on the ordinary disk, as
//! on a gateway whose download partition is the small one.
//!
//! A declared size above the free space is answered with ack 7 before
//! anything is fetched; a disk that fills up during the download ends the
//! upgrade with result 40, its partial file removed, the store intact, and
//! the agent goes on serving: the next request completes. The images come
//! from the test's own server (tests/common/hostile.rs), so no test servers
//! are needed, but mounting needs root (`make test` runs as root).

mod common;

#[path = "common/hostile.rs"]
mod hostile;

use common::*;
use hostile::{Behaviour, Hostile};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TMPFS_BYTES: u64 = 8 << 20;
const LIMIT: Duration = Duration::from_secs(60);

/// A tmpfs mounted on a directory; unmounted on drop (lazily if busy).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("create the mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={TMPFS_BYTES},mode=0700"))
            .arg("tmpfs")
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs on {} failed (these tests need root, as `make test` has): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |args: &[&str]| {
            std::process::Command::new("umount")
                .args(args)
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !umount(&[]) && !umount(&["-l"]) {
            eprintln!("could not unmount {}", self.dir.display());
        }
    }
}

/// `fwagent run` over stdio, kept running: requests are written one at a
/// time and its stdout read line by line. Killed on drop.
struct Agent {
    child: Child,
    /// Its stderr (the log), shown when a wait fails.
    log: PathBuf,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<Value>,
}

impl Agent {
    fn start(state: &Path, target: &Path, log: &Path) -> Agent {
        let mut cmd = fwagent([
            "run",
            "--transport",
            "stdio",
            "--idle-timeout",
            "5",
            "--download-attempts",
            "3",
            "--retry-base-ms",
            "50",
            "--state-dir",
        ]);
        cmd.arg(state)
            .arg("--flash")
            .arg(file_flash(target))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).expect("create the agent's log"));
        let mut child = cmd.spawn().expect("spawn fwagent");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Agent {
            child,
            log: log.to_path_buf(),
            stdin,
            lines,
            seen: Vec::new(),
        }
    }

    fn send(&mut self, req: &Value) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{req}").expect("write a request");
        stdin.flush().expect("flush");
    }

    /// The next stdout line that `pred` accepts (earlier ones are kept in
    /// `seen`); panics after [`LIMIT`].
    fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!(
                    "no {what} within {LIMIT:?}; saw {:#?}\n--- log\n{log}",
                    self.seen
                )
            });
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"));
            self.seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }

    /// Close stdin and wait for the agent to exit; its exit code.
    fn finish(mut self) -> Option<i32> {
        drop(self.stdin.take());
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "the agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_ack_of(v: &Value, req: &Value) -> bool {
    v["operator"] == "setCloudUpgradeConfig-Ack" && v["messageId"] == req["messageId"]
}

fn is_result_of(v: &Value, req: &Value) -> bool {
    v["operator"] == "reportCloudUpgradeResult" && v["info"]["requestMessageId"] == req["messageId"]
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Fill the file system of `dir` with one file until it reports no space.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create the filler");
    let block = vec![0xa5u8; 64 << 10];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("fill {}: {e}", path.display()),
        }
    }
    // The last partial block may have gone in: the disk is full now.
    path
}

#[test]
fn a_declared_size_above_the_free_space_is_ack_7_before_any_fetch() {
    let dir = temp_dir();
    let state = dir.path().join("state");
    let _tmpfs = Tmpfs::mount(&state.join("downloads"));
    let (fw, bytes) = {
        let fw = Firmware::create(dir.path(), "toobig", 2 * TMPFS_BYTES);
        let bytes = fw.bytes();
        (fw, bytes)
    };
    let server = Hostile::start("127.0.0.1", bytes, Behaviour::Honest);
    let target = dir.path().join("flash.bin");
    let req = upgrade_request("http", server.port(), "/", &fw, "", "");
    let run = run_stdio_upgrade(
        &state,
        &target,
        std::slice::from_ref(&req),
        &Default::default(),
        LIMIT,
    );
    assert_eq!(run.code(), Some(0), "{run}");
    let lines = run.json_lines();
    assert_eq!(lines.len(), 1, "the ack alone: {run}");
    assert!(is_ack_of(&lines[0], &req), "{run}");
    assert_eq!(lines[0]["result"]["errorNo"], 7, "{run}");
    let description = lines[0]["result"]["description"].as_str().unwrap();
    assert!(
        description.contains(&format!("{} bytes needed", fw.len)),
        "{description}"
    );
    assert!(server.seen().is_empty(), "nothing was fetched");
    assert!(files_in(&state.join("downloads")).is_empty());
    assert!(unflashed(&target));
    // The refusal is recorded: the same messageId gets the same ack.
    let again = run_stdio_upgrade(&state, &target, &[req], &Default::default(), LIMIT);
    assert_eq!(again.json_lines(), lines, "{again}");
}

#[test]
fn a_disk_that_fills_during_the_download_is_40_and_the_agent_goes_on() {
    let dir = temp_dir();
    let state = dir.path().join("state");
    let downloads = state.join("downloads");
    let tmpfs = Tmpfs::mount(&downloads);
    let len: u64 = 6 << 20;
    let (fw, bytes) = {
        let fw = Firmware::create(dir.path(), "fill", len);
        let bytes = fw.bytes();
        (fw, bytes)
    };
    let gate = hostile::gate();
    let server = Hostile::start(
        "127.0.0.1",
        bytes,
        Behaviour::Gated {
            at: 3 << 20,
            gate: gate.clone(),
        },
    );
    let target = dir.path().join("flash.bin");
    let mut agent = Agent::start(&state, &target, &dir.path().join("agent.log"));

    // Accepted (6 MiB fit in 8), then half of it arrives and the server waits.
    let first = upgrade_request("http", server.port(), "/", &fw, "", "");
    agent.send(&first);
    let ack = agent.wait_for("the first ack", |v| is_ack_of(v, &first));
    assert_eq!(ack["result"]["errorNo"], 0, "{ack}");
    wait_until(LIMIT, "half the image in the partial file", || {
        files_in(&downloads)
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .any(|m| m.len() >= 2 << 20)
    });
    // Someone else takes the rest of the disk; then the server goes on.
    let filler = fill(&tmpfs.dir);
    hostile::open(&gate);
    let result = agent.wait_for("the first result", |v| is_result_of(v, &first));
    assert_eq!(result["result"]["errorNo"], 40, "{result}");
    assert_eq!(result["info"]["phase"], "failed", "{result}");
    assert!(unflashed(&target), "nothing is flashed");
    wait_until(LIMIT, "the partial file to be removed", || {
        files_in(&downloads) == [filler.clone()]
    });

    // The agent still serves: with the space back, the next request completes.
    std::fs::remove_file(&filler).expect("remove the filler");
    let second = upgrade_request("http", server.port(), "/", &fw, "", "");
    agent.send(&second);
    let ack = agent.wait_for("the second ack", |v| is_ack_of(v, &second));
    assert_eq!(ack["result"]["errorNo"], 0, "{ack}");
    let result = agent.wait_for("the second result", |v| is_result_of(v, &second));
    assert_eq!(result["result"]["errorNo"], 0, "{result}");
    assert_eq!(agent.finish(), Some(0));
    assert_eq!(md5_file(&target), fw.md5);
    assert!(files_in(&downloads).is_empty());

    // The store is intact: both upgrades, as they ended.
    let history = run_fwagent(
        ["history", "--json", "--state-dir", state.to_str().unwrap()],
        b"",
        LIMIT,
    );
    assert_eq!(history.code(), Some(0), "{history}");
    let jobs: Value =
        serde_json::from_str(history.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {history}"));
    let summary: Vec<(Value, Value, Value)> = jobs
        .as_array()
        .expect("an array")
        .iter()
        .map(|j| {
            (
                j["messageId"].clone(),
                j["phase"].clone(),
                j["result"]["errorNo"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (second["messageId"].clone(), "completed".into(), 0.into()),
            (first["messageId"].clone(), "failed".into(), 40.into()),
        ],
        "{history}"
    );
}
