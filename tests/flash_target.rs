//! `--flash file:PATH` names a target that must exist: a regular file or a
//! block device at least as large as the image. The agent creates nothing
//! there, so a typo'd or absent device (`/dev/mmcblk0p3` missing) never
//! becomes a regular file in /dev (RAM) with a success reported.
//!
//! Shown: `run` refuses to start (exit 2, naming the path) when the target
//! does not exist or is neither a regular file nor a block device; a target
//! that vanishes after the start ends the upgrade in 50 with the reason, and
//! is not created; a block device smaller than the image is 50 before
//! anything is written to it, and one large enough is flashed and read back.
//! The block devices are loop devices over files of the test's own (root,
//! as `make test` has); nginx (the test servers) serves the images.

mod common;

use common::*;
use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// `fwagent run --flash file:TARGET` with stdin at EOF.
fn run_with_target(state: &Path, target: &str) -> Run {
    let cmd = stdio_agent(state, &format!("file:{target}"), &[]);
    run_with_timeout(cmd, b"", LIMIT)
}

#[test]
fn run_refuses_a_target_that_does_not_exist() {
    let dir = temp_dir();
    let dev = dir.path().join("dev");
    fs::create_dir(&dev).expect("mkdir dev");
    let target = dev.join("mmcblk0p3");
    let run = run_with_target(&dir.path().join("state"), target.to_str().unwrap());
    assert_eq!(run.code(), Some(2), "a usage error: {run}");
    assert!(
        run.stderr.contains(&target.display().to_string()) && run.stderr.contains("does not exist"),
        "names the target and says it is missing: {run}"
    );
    assert!(run.stdout.is_empty(), "{run}");
    assert!(!target.exists(), "nothing created");
    assert_eq!(fs::read_dir(&dev).unwrap().count(), 0, "nothing created");
}

#[test]
fn run_refuses_a_target_that_is_neither_a_file_nor_a_block_device() {
    let dir = temp_dir();
    let subdir = dir.path().join("a-directory");
    fs::create_dir(&subdir).expect("mkdir");
    for target in [subdir.to_str().unwrap(), "/dev/null"] {
        let run = run_with_target(&dir.path().join("state"), target);
        assert_eq!(run.code(), Some(2), "{target}: {run}");
        assert!(
            run.stderr.contains(target)
                && run
                    .stderr
                    .contains("neither a regular file nor a block device"),
            "{target}: {run}"
        );
    }
}

#[test]
fn a_target_that_vanishes_after_the_start_is_result_50_and_is_not_created() {
    let servers = Servers::from_env();
    let fw = servers.put_http("vanish", 1 << 20);
    let dir = temp_dir();
    let state = dir.path().join("state");
    let target = dir.path().join("flash.bin");
    fs::write(&target, b"").expect("the target exists at the start");
    let log = dir.path().join("agent.log");
    let mut child = stdio_agent(&state, &file_flash(&target), &[])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log).expect("create the log"))
        .spawn()
        .expect("spawn fwagent");
    // Past the start-up check once the control socket listens.
    wait_until(LIMIT, "the agent to listen", || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("control socket listening"))
    });
    fs::remove_file(&target).expect("the target vanishes");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{}", servers.http_request(&fw)).expect("send the request");
    drop(stdin);
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    let status = child.wait().expect("wait fwagent");
    let log = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{out}\n{log}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let r = only_result_among(&lines, &format!("{out}\n{log}"));
    assert_eq!((r.error_no, r.phase.as_str()), (50, "failed"), "{out}");
    assert!(
        r.description.contains("does not exist"),
        "says why: {}",
        r.description
    );
    assert!(!target.exists(), "the agent created the target");
}

/// A loop device over a file of `len` zero bytes; detached on drop.
struct Loop {
    dev: PathBuf,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn new(len: u64) -> Loop {
        let dir = temp_dir();
        let backing = dir.path().join("disk.img");
        fs::File::create(&backing)
            .and_then(|f| f.set_len(len))
            .expect("create the backing file");
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup failed (these tests need root and loop devices, as `make test` has): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Loop { dev, _dir: dir }
    }

    fn first_bytes(&self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        fs::File::open(&self.dev)
            .and_then(|mut f| f.read_exact(&mut buf))
            .expect("read the device");
        buf
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[test]
fn a_block_device_smaller_than_the_image_is_50_and_untouched_and_a_large_one_is_flashed() {
    let servers = Servers::from_env();
    let fw = servers.put_http("blockdev", 2 << 20);
    let dir = temp_dir();

    let small = Loop::new(1 << 20);
    let run = run_stdio_upgrade(
        &dir.path().join("state-small"),
        &small.dev,
        &[servers.http_request(&fw)],
        &no_env(),
        LIMIT,
    );
    let r = only_result(&run);
    assert_eq!((r.error_no, r.phase.as_str()), (50, "failed"), "{run}");
    assert!(
        r.description.contains("fewer than the image"),
        "says why: {}",
        r.description
    );
    assert!(
        small.first_bytes(1 << 20).iter().all(|&b| b == 0),
        "nothing written to a device too small for the image"
    );

    let large = Loop::new(4 << 20);
    let req = servers.http_request(&fw);
    let run = run_stdio_upgrade(
        &dir.path().join("state-large"),
        &large.dev,
        std::slice::from_ref(&req),
        &no_env(),
        LIMIT,
    );
    let r = only_result(&run);
    assert_eq!((r.error_no, r.phase.as_str()), (0, "completed"), "{run}");
    assert_eq!(large.first_bytes(2 << 20), fw.bytes(), "the image");
    let size = fs::File::open(&large.dev)
        .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
        .expect("size");
    assert_eq!(size, 4 << 20, "a block device keeps its size");
}
