//! Running the real `fwagent` binary: with a timeout, over stdio with a
//! one-shot upgrade, with the short limits of the hostile-server cases, and
//! the kill -9 harness (SIGKILL at random moments, then one run to the end).

use super::md5_file;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// No extra environment for [`run_stdio_upgrade`].
pub fn no_env() -> HashMap<&'static str, &'static str> {
    HashMap::new()
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
    let mut accepted = false;
    for _ in 0..kills {
        let after = Duration::from_millis(50 + rng.next() % 400);
        // Until a run has committed the request (a loaded machine may kill
        // the first before it has), the next one is given it again, as a
        // cloud that got no ack would.
        run_and_kill(
            state,
            flash,
            extra,
            if accepted { "" } else { &input },
            after,
        );
        accepted = accepted || has_a_job(state);
    }
    let last = run_with_timeout(
        stdio_agent(state, flash, extra),
        b"",
        Duration::from_secs(300),
    );
    assert_eq!(last.code(), Some(0), "{last}");
    status_json(state)
}

/// The store in `state` holds an upgrade (no state dir, no store: none).
fn has_a_job(state: &Path) -> bool {
    !matches!(status_run(state).stdout.trim(), "" | "null")
}

/// `fwagent status --json --state-dir STATE`.
fn status_run(state: &Path) -> Run {
    let args: [&std::ffi::OsStr; 4] = [
        "status".as_ref(),
        "--json".as_ref(),
        "--state-dir".as_ref(),
        state.as_os_str(),
    ];
    run_fwagent(args, b"", SHORT_RUN_LIMIT)
}

/// `fwagent status --json` of the store in `state`, parsed.
pub fn status_json(state: &Path) -> serde_json::Value {
    let status = status_run(state);
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
