//! FTP upgrades end to end: the real `fwagent` binary against the shared
//! pyftpdlib (user and password) and vsftpd (anonymous) started by
//! `scripts/test-servers.sh`, and, where a test needs a server that misbehaves
//! on cue (throttled, or dropping the data connection once), a pyftpdlib of
//! its own on a port it binds itself. The seed's first message installs the
//! right image from both servers; refusals map to PROTOCOL.md's result numbers
//! (21, 22, 20, 30); a SIZE mismatch fetches nothing; kill -9 at random
//! moments resumes with REST; a dropped data connection resumes in the same
//! run; a file changed between crash and resume is fetched again, not spliced.

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(120);
/// The seed's directory, recreated under each server's root.
const SEED_DIR: &str = "download/DAP-2020SSA_3200_6200/C007V001";

/// The seed's first message pointed at an FTP server: its port and
/// credentials replaced, its path kept, the file one we put there.
fn seed_request(port: u16, user: &str, pass: &str, fw: &Firmware) -> Value {
    let text = include_str!("../examples/requests/seed-1-ftp.json");
    let mut req: Value = serde_json::from_str(text).expect("the seed example is JSON");
    let server = &mut req["info"]["serverConfig"];
    assert_eq!(
        server["host"], "127.0.0.1",
        "examples never name the seed's host"
    );
    assert_eq!(server["protocol"], "ftp");
    assert_eq!(server["path"], format!("/{SEED_DIR}/"));
    server["port"] = port.into();
    server["userName"] = b64(user).into();
    server["password"] = b64(pass).into();
    let file = &mut req["info"]["fileInfo"];
    file["firmwareName"] = format!("{} ", fw.name).into(); // the seed's trailing space
    file["md5sum"] = fw.md5.clone().into();
    file["upgradeFileSize"] = fw.len.into();
    req["messageId"] = format!("MID:{}", unique_name("seed")).into();
    req
}

/// A firmware file in the seed's directory under `root`.
fn put_in_seed_dir(root: &Path, len: u64) -> Firmware {
    let dir = root.join(SEED_DIR);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    Firmware::create(&dir, "seed", len)
}

#[test]
fn seed_message_installs_the_image_from_pyftpdlib_with_a_password() {
    let servers = Servers::from_env();
    let fw = put_in_seed_dir(&servers.ftp_root, 66143);
    let dir = temp_dir();
    let (state, target) = (dir.path().join("state"), dir.path().join("flash.bin"));
    let req = seed_request(servers.ftp_port, &servers.ftp_user, &servers.ftp_pass, &fw);
    let run = run_stdio_upgrade(&state, &target, std::slice::from_ref(&req), &no_env(), LONG);
    assert_installed(&run, &req, &fw, &state, &target);
    assert!(
        !run.stderr.contains(&servers.ftp_pass),
        "the password reached the log"
    );
    assert!(
        !run.stdout.contains(&servers.ftp_pass),
        "the password reached a report"
    );
    let served = PyftpdLog::shared(&servers).transfers(&fw.name);
    assert_eq!(served.len(), 1, "one RETR: {served:?}");
    assert_eq!((served[0].completed, served[0].bytes), (true, fw.len));
}

#[test]
fn seed_message_installs_the_image_from_vsftpd_anonymously() {
    let servers = Servers::from_env();
    let fw = put_in_seed_dir(&servers.vsftpd_root, 66143);
    let dir = temp_dir();
    let (state, target) = (dir.path().join("state"), dir.path().join("flash.bin"));
    let req = seed_request(servers.vsftpd_port, "", "", &fw);
    let run = run_stdio_upgrade(&state, &target, std::slice::from_ref(&req), &no_env(), LONG);
    assert_installed(&run, &req, &fw, &state, &target);
    let commands = vsftpd_commands(&servers, &fw.name);
    let size = commands.iter().position(|c| c.starts_with("SIZE "));
    let retr = commands.iter().position(|c| c.starts_with("RETR "));
    assert!(
        size.is_some() && size < retr,
        "SIZE, then RETR: {commands:?}"
    );
}

#[test]
fn wrong_password_is_21_and_never_shown() {
    let servers = Servers::from_env();
    let fw = servers.put_ftp("badpass", 10_000);
    let dir = temp_dir();
    let target = dir.path().join("flash.bin");
    let secret = "not-the-password-7f3a";
    let mut req = servers.ftp_request(&fw);
    req["info"]["serverConfig"]["password"] = b64(secret).into();
    let run = run_stdio_upgrade(&dir.path().join("state"), &target, &[req], &no_env(), LONG);
    let ResultReport {
        error_no: no,
        description,
        ..
    } = only_result(&run);
    assert_eq!(no, 21, "{run}");
    assert!(description.contains("530"), "{description}");
    assert!(
        !run.stdout.contains(secret) && !run.stderr.contains(secret),
        "the password was shown: {run}"
    );
    assert!(unflashed(&target), "nothing is flashed");
}

#[test]
fn missing_file_is_22_on_both_servers() {
    let servers = Servers::from_env();
    let dir = temp_dir();
    let target = dir.path().join("flash.bin");
    let fw = servers.put_ftp("missing", 1000);
    fs::remove_file(&fw.path).unwrap();
    let run = run_stdio_upgrade(
        &dir.path().join("s1"),
        &target,
        &[servers.ftp_request(&fw)],
        &no_env(),
        LONG,
    );
    let ResultReport {
        error_no: no,
        description,
        ..
    } = only_result(&run);
    assert_eq!(no, 22, "{run}");
    assert!(description.contains("550"), "{description}");

    let fw = servers.put_vsftpd("missing", 1000);
    fs::remove_file(&fw.path).unwrap();
    let run = run_stdio_upgrade(
        &dir.path().join("s2"),
        &target,
        &[servers.vsftpd_request(&fw)],
        &no_env(),
        LONG,
    );
    assert_eq!(only_result(&run).error_no, 22, "{run}");
    assert!(unflashed(&target), "nothing is flashed");
}

#[test]
fn nothing_listening_is_20_after_bounded_retries() {
    let servers = Servers::from_env();
    let fw = servers.put_ftp("nobody", 1000);
    let mut req = servers.ftp_request(&fw);
    req["info"]["serverConfig"]["port"] = free_port().into();
    let dir = temp_dir();
    let target = dir.path().join("flash.bin");
    let started = Instant::now();
    let run = run_agent(
        &dir.path().join("state"),
        &target,
        &["--download-attempts", "3", "--retry-base-ms", "50"],
        &[req],
        LONG,
    );
    let ResultReport {
        error_no: no,
        description,
        ..
    } = only_result(&run);
    assert_eq!(no, 20, "{run}");
    assert!(description.contains("127.0.0.1"), "{description}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "retries are bounded"
    );
    let retries = run.stderr.matches("download attempt failed").count();
    assert_eq!(retries, 3, "three attempts: {run}");
    assert!(unflashed(&target), "nothing is flashed");
}

#[test]
fn size_mismatch_is_30_without_retr_on_both_servers() {
    let servers = Servers::from_env();
    let dir = temp_dir();
    let target = dir.path().join("flash.bin");
    let fw = servers.put_ftp("badsize", 200_000);
    for size in [199_999u64, 200_001] {
        let mut req = servers.ftp_request(&fw);
        req["info"]["fileInfo"]["upgradeFileSize"] = size.into();
        let run = run_stdio_upgrade(
            &dir.path().join(format!("p-{size}")),
            &target,
            &[req],
            &no_env(),
            LONG,
        );
        let ResultReport {
            error_no: no,
            description,
            ..
        } = only_result(&run);
        assert_eq!(no, 30, "{run}");
        assert!(description.contains("200000"), "{description}");
    }
    assert_eq!(
        PyftpdLog::shared(&servers).transfers(&fw.name),
        vec![],
        "no RETR on pyftpdlib"
    );

    let fw = servers.put_vsftpd("badsize", 200_000);
    let mut req = servers.vsftpd_request(&fw);
    req["info"]["fileInfo"]["upgradeFileSize"] = 123_456.into();
    let run = run_stdio_upgrade(&dir.path().join("v"), &target, &[req], &no_env(), LONG);
    assert_eq!(only_result(&run).error_no, 30, "{run}");
    let commands = vsftpd_commands(&servers, &fw.name);
    assert!(
        commands.iter().any(|c| c.starts_with("SIZE ")),
        "{commands:?}"
    );
    assert!(
        !commands.iter().any(|c| c.starts_with("RETR ")),
        "no RETR on vsftpd: {commands:?}"
    );
    assert!(unflashed(&target), "nothing is flashed");
}

#[test]
fn ftps_is_answered_with_5_saying_it_is_not_built() {
    let servers = Servers::from_env();
    let fw = servers.put_ftp("ftps", 1000);
    let mut req = servers.ftp_request(&fw);
    req["info"]["serverConfig"]["protocol"] = "ftps".into();
    let dir = temp_dir();
    let run = run_stdio_upgrade(
        &dir.path().join("state"),
        &dir.path().join("flash.bin"),
        &[req],
        &no_env(),
        LONG,
    );
    let lines = run.json_lines();
    assert_eq!(lines.len(), 1, "an ack and nothing else: {run}");
    assert_eq!(lines[0]["result"]["errorNo"], 5, "{run}");
    let description = lines[0]["result"]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(
        description.contains("ftps") && description.contains("not built"),
        "{description}"
    );
}

#[test]
fn a_file_changed_between_crash_and_resume_is_fetched_again_not_spliced() {
    let servers = Servers::from_env();
    // The request names image B; the server first has A (same size), then B.
    let mut fw = servers.put_ftp("changed", 12 << 20);
    let b_seed = fw.seed ^ 0xdead_beef;
    let b_md5 = write_firmware(&temp_dir().path().join("b"), fw.len, b_seed);
    assert_ne!(fw.md5, b_md5);
    let mut req = servers.ftp_request(&fw);
    req["info"]["fileInfo"]["md5sum"] = b_md5.clone().into();
    let dir = temp_dir();
    let (state, target) = (dir.path().join("state"), dir.path().join("flash.bin"));
    let env = HashMap::from([("FWAGENT_CRASH_AT", "after-checkpoint")]);
    let first = run_stdio_upgrade(&state, &target, &[req], &env, LONG);
    assert_eq!(first.signal(), Some(libc::SIGKILL), "{first}");
    // Replace the file: same size, a later MDTM (whole seconds).
    std::thread::sleep(Duration::from_millis(1100));
    fw.rewrite(b_seed);
    let second = run_stdio_upgrade(&state, &target, &[], &no_env(), LONG);
    assert_eq!(
        only_result(&second).error_no,
        0,
        "no splice of A and B: {second}"
    );
    assert_eq!(md5_file(&target), b_md5);
    assert!(
        second.stderr.contains("starting from zero"),
        "the change was noticed: {second}"
    );
    let served = PyftpdLog::shared(&servers).transfers(&fw.name);
    assert_eq!(
        served.last().map(|t| (t.completed, t.bytes)),
        Some((true, fw.len)),
        "{served:?}"
    );
}

/// The data connection is dropped once, 5 MiB in: the same run resumes from
/// there with REST and completes (the server sends the rest, not the whole).
#[test]
fn a_dropped_data_connection_resumes_with_rest_in_the_same_run() {
    let size: u64 = 16 << 20;
    let drop_after: u64 = 5 << 20;
    let ftpd = PrivateFtpd::start(&["--drop-after", &drop_after.to_string()]);
    let fw = Firmware::create(&ftpd.root, "drop", size);
    let req = upgrade_request(
        "ftp",
        ftpd.port,
        "/",
        &fw,
        PrivateFtpd::USER,
        PrivateFtpd::PASS,
    );
    let dir = temp_dir();
    let (state, target) = (dir.path().join("state"), dir.path().join("flash.bin"));
    let run = run_agent(
        &state,
        &target,
        &["--retry-base-ms", "50"],
        std::slice::from_ref(&req),
        LONG,
    );
    assert_installed(&run, &req, &fw, &state, &target);
    assert!(
        run.stderr.contains("download attempt failed"),
        "the drop was seen: {run}"
    );
    let served = ftpd.log().wait_idle().transfers(&fw.name);
    assert_eq!(served.len(), 2, "{served:?}\n{run}");
    assert!(
        !served[0].completed && served[0].bytes >= drop_after,
        "{served:?}"
    );
    assert!(served[1].completed, "{served:?}");
    assert_eq!(
        served[0].bytes + served[1].bytes,
        size,
        "the second RETR began where the first ended (REST): {served:?}"
    );
}

/// Spawn the agent and SIGKILL it after `after`; feed it `input` (then EOF).
#[test]
fn kill_9_at_random_moments_resumes_with_rest_and_completes() {
    let size: u64 = 64 << 20;
    let checkpoint: u64 = 4 << 20;
    // 16 MB/s: a run killed after 50-450 ms gets a few MiB, so the kills land
    // all over the download, and most runs pass a checkpoint or two.
    let ftpd = PrivateFtpd::start(&["--rate", "16000000"]);
    let fw = Firmware::create(&ftpd.root, "kill9", size);
    let req = upgrade_request(
        "ftp",
        ftpd.port,
        "/",
        &fw,
        PrivateFtpd::USER,
        PrivateFtpd::PASS,
    );
    let dir = temp_dir();
    let (state, target) = (dir.path().join("state"), dir.path().join("flash.bin"));
    // Every restart counts as a download attempt (state machine policy): allow them all.
    let checkpoint_flag = checkpoint.to_string();
    let extra = [
        "--checkpoint-bytes",
        &checkpoint_flag,
        "--download-attempts",
        "100",
    ];
    let kills: u64 = 30;
    kill_rounds_then_complete(&state, &target, &extra, &req, kills, &fw.md5);
    let served = ftpd.log().wait_idle().transfers(&fw.name);
    let sent: u64 = served.iter().map(|t| t.bytes).sum();
    let interrupted = served.iter().filter(|t| !t.completed).count();
    eprintln!(
        "served {sent} bytes in {} RETRs ({interrupted} cut short) for a {size}-byte image over {kills} kills",
        served.len()
    );
    eprintln!(
        "bytes per RETR: {:?}",
        served.iter().map(|t| t.bytes).collect::<Vec<_>>()
    );
    assert!(
        interrupted >= 5,
        "kills landed during the download: {interrupted} RETRs cut short: {served:?}"
    );
    assert!(
        sent <= size + kills * checkpoint,
        "resumed rather than restarted: served {sent} bytes, bound {}",
        size + kills * checkpoint
    );
}

// ---------------------------------------------------------------- servers' logs

/// One transfer as pyftpdlib logs it when the data connection closes.
#[derive(Debug, Clone, PartialEq)]
struct Transfer {
    completed: bool,
    bytes: u64,
}

/// A pyftpdlib log (INFO): sessions and `RETR <path> completed=0|1 bytes=N` lines.
struct PyftpdLog(PathBuf);

impl PyftpdLog {
    fn shared(servers: &Servers) -> PyftpdLog {
        PyftpdLog(servers.dir.join("ftp/ftpd.log"))
    }

    fn text(&self) -> String {
        fs::read_to_string(&self.0).unwrap_or_else(|e| panic!("read {}: {e}", self.0.display()))
    }

    /// Waits until every session opened is closed (so every transfer is logged).
    fn wait_idle(self) -> Self {
        wait_until(
            Duration::from_secs(20),
            "pyftpdlib to log every session's end",
            || {
                let text = self.text();
                text.matches("FTP session opened").count()
                    == text.matches("FTP session closed").count()
            },
        );
        self
    }

    /// The RETRs of files named `name`, in order.
    fn transfers(&self, name: &str) -> Vec<Transfer> {
        self.text()
            .lines()
            .filter_map(|line| {
                let (_, rest) = line.split_once(" RETR ")?;
                let (path, fields) = rest.rsplit_once(" completed=")?;
                if !path.ends_with(&format!("/{name}")) {
                    return None;
                }
                let completed = fields.starts_with('1');
                let bytes = fields
                    .split_once("bytes=")?
                    .1
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()?;
                Some(Transfer { completed, bytes })
            })
            .collect()
    }
}

/// The FTP commands vsftpd logged that mention `name` (its log has every command).
fn vsftpd_commands(servers: &Servers, name: &str) -> Vec<String> {
    let log = servers.dir.join("vsftpd/vsftpd.log");
    let text = fs::read_to_string(&log).unwrap_or_else(|e| panic!("read {}: {e}", log.display()));
    text.lines()
        .filter_map(|l| {
            l.split_once("FTP command: Client \"127.0.0.1\", \"")?
                .1
                .strip_suffix('"')
        })
        .filter(|c| c.contains(name))
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------- a private pyftpdlib

/// pyftpdlib with a throttle and a one-time data-connection drop, for the
/// tests that need a server to misbehave on cue. Binds 127.0.0.1:0 and writes
/// the port it got to a file.
const PRIVATE_FTPD: &str = r#"
import argparse, logging, os, sys, time
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler, ThrottledDTPHandler
from pyftpdlib.servers import FTPServer

ap = argparse.ArgumentParser()
ap.add_argument("--root", required=True)
ap.add_argument("--port-file", required=True)
ap.add_argument("--user", required=True)
ap.add_argument("--password", required=True)
ap.add_argument("--rate", type=int, default=0, help="bytes per second per transfer, smoothly")
ap.add_argument("--drop-after", type=int, default=0, help="drop the first transfer after this many bytes")
args = ap.parse_args()
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
log = logging.getLogger("pyftpdlib")
dropped = []

class DTP(ThrottledDTPHandler):
    # ThrottledDTPHandler for its plumbing (no sendfile, a cancellable timer);
    # its own limit sends a second's worth at once, so the rate is kept here.
    def send(self, data):
        if args.drop_after and not dropped and self.tot_bytes_sent >= args.drop_after:
            dropped.append(True)
            log.info("dropping the data connection after %d bytes", self.tot_bytes_sent)
            self._resp = ("426 Connection closed by the test; transfer aborted.", log.info)
            self.close()
            return 0
        if args.rate:
            if not hasattr(self, "t0"):
                self.t0 = time.monotonic()
            budget = int(args.rate * (time.monotonic() - self.t0 + 0.02)) - self.tot_bytes_sent
            if budget <= 0:
                self.del_channel()
                self._cancel_throttler()
                self._throttler = self.ioloop.call_later(
                    0.01, lambda: self.add_channel(events=self.ioloop.WRITE), _errback=self.handle_error
                )
                return 0
            data = data[:budget]
        return super().send(data)

authorizer = DummyAuthorizer()
authorizer.add_user(args.user, args.password, args.root, perm="elr")

class Handler(FTPHandler):
    pass

Handler.authorizer = authorizer
Handler.dtp_handler = DTP
Handler.use_sendfile = False
Handler.permit_foreign_addresses = False
Handler.timeout = 600
server = FTPServer(("127.0.0.1", 0), Handler)
tmp = args.port_file + ".tmp"
with open(tmp, "w") as f:
    f.write(str(server.socket.getsockname()[1]))
os.rename(tmp, args.port_file)
server.serve_forever(handle_exit=True)
"#;

struct PrivateFtpd {
    port: u16,
    root: PathBuf,
    log: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl PrivateFtpd {
    const USER: &'static str = "tester";
    const PASS: &'static str = "s3cret";

    fn start(extra: &[&str]) -> PrivateFtpd {
        let dir = temp_dir();
        let root = dir.path().join("root");
        fs::create_dir_all(&root).expect("create the server's root");
        let script = dir.path().join("ftpd.py");
        fs::write(&script, PRIVATE_FTPD).expect("write the server script");
        let port_file = dir.path().join("port");
        let log = dir.path().join("ftpd.log");
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let child = Command::new(&python)
            .arg(&script)
            .arg("--root")
            .arg(&root)
            .arg("--port-file")
            .arg(&port_file)
            .args(["--user", Self::USER, "--password", Self::PASS])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("create the server's log"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("spawn {python} (with pyftpdlib, as scripts/test-servers.sh installs): {e}")
            });
        let mut ftpd = PrivateFtpd {
            port: 0,
            root,
            log,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        ftpd.port = loop {
            if let Some(port) = fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
            {
                break port;
            }
            if let Ok(Some(status)) = ftpd.child.try_wait() {
                panic!(
                    "the private pyftpdlib exited ({status}): {}",
                    fs::read_to_string(&ftpd.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the private pyftpdlib did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        ftpd
    }

    fn log(&self) -> PyftpdLog {
        PyftpdLog(self.log.clone())
    }
}

impl Drop for PrivateFtpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
