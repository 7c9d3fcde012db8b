//! The one runner of external commands: the credentials decoder
//! (`--credentials-decoder`), the installer of `--flash command:CMD`,
//! `--reboot-command` and `--health-command`.
//!
//! Each runs as `/bin/sh -c CMD` in a process group of its own, with a
//! deadline; on the deadline the whole group is killed (`SIGKILL`). The shell
//! gets `SIGKILL` when the agent dies (`PR_SET_PDEATHSIG`). What the shell
//! started (the real installer under a wrapper script, a subshell) does not,
//! so the commands that write a partition run under a [`GroupLock`]: every
//! process of the group inherits a lock on a file that names the group, and
//! the next run (or the next start of the agent) that finds it held ends
//! that group first. Never two installers on one partition. What the
//! agent reads from a command is bounded: a captured stdout to the caller's
//! limit (the rest is read and dropped), a log line to [`MAX_LINE_BYTES`].
//!
//! Two ways to treat the output:
//! - [`run_shell`] (installer, reboot, health): stdin closed, stdout and
//!   stderr to the agent's log line by line (never to the agent's stdout,
//!   which is the stdio transport), the last non-empty line kept for the
//!   error description. Done when the shell exits; the output of something
//!   it left running in the background is waited for a moment only.
//! - [`capture_shell`] (the decoder): `input` on stdin, stdout captured,
//!   stderr discarded and nothing logged (either may hold a credential).
//!   Done when the shell has exited *and* closed stdout, both by the
//!   deadline: the output is the answer, so it must be whole.

use crate::crash;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A logged output line is cut to this many bytes (the rest of the line is
/// read and dropped), so a command that prints without newlines cannot fill
/// the agent's memory.
pub const MAX_LINE_BYTES: usize = 4096;

/// The last output line is cut to this many characters in descriptions.
const LAST_LINE_CHARS: usize = 200;

/// How often the runner looks at the command while nothing else happens.
const POLL: Duration = Duration::from_millis(20);

/// How often the runner looks for the exit once every output stream closed
/// (the exit follows at once, as a rule).
const REAP_POLL: Duration = Duration::from_millis(5);

/// How long a logged command's leftover output is waited for after it exited.
const GRACE: Duration = Duration::from_millis(500);

/// How long [`GroupLock::take`] waits for an ended group to let go of it.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// How a logged command ended ([`run_shell`]).
#[derive(Debug)]
pub enum Ran {
    /// It exited (or was killed by a signal of its own making).
    Exited {
        status: ExitStatus,
        /// Its last non-empty output line, for the error description.
        last_line: Option<String>,
    },
    /// It ran past its deadline; its process group was killed.
    TimedOut,
}

impl Ran {
    pub fn success(&self) -> bool {
        matches!(self, Ran::Exited { status, .. } if status.success())
    }

    /// "exit status 3 (last output: ...)", "killed by signal 9", "timed out after 2 s".
    pub fn describe(&self, timeout: Duration) -> String {
        match self {
            Ran::TimedOut => format!("timed out after {} s", timeout.as_secs_f64()),
            Ran::Exited { status, last_line } => {
                let how = match (status.code(), status.signal()) {
                    (Some(code), _) => format!("exit status {code}"),
                    (None, Some(sig)) => format!("killed by signal {sig}"),
                    (None, None) => status.to_string(),
                };
                match last_line {
                    Some(line) => format!("{how} (last output: {line})"),
                    None => how,
                }
            }
        }
    }
}

/// How a captured command ended ([`capture_shell`]).
#[derive(Debug)]
pub enum Captured {
    /// It exited and closed its stdout by the deadline.
    Exited {
        status: ExitStatus,
        /// What it printed: at most `max + 1` bytes, so that the caller can
        /// tell an output longer than `max`; or the error reading it.
        stdout: io::Result<Vec<u8>>,
    },
    /// It did not finish by the deadline; its process group was killed.
    TimedOut,
}

/// `s` quoted for `/bin/sh`: one word, whatever it holds.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Run `line` with `/bin/sh -c`, `envs` added to the environment, for at most
/// `timeout`, its output logged. `label` names it in the log ("installer",
/// "reboot", "health"). `crash_at` names the crash point reached once it runs
/// (`""`: none).
pub fn run_shell(
    label: &'static str,
    line: &str,
    envs: &[(&str, String)],
    timeout: Duration,
    crash_at: &str,
) -> io::Result<Ran> {
    run_logged(label, line, envs, timeout, crash_at, None)
}

/// [`run_shell`] under the [`GroupLock`] at `lock`: a group that still holds
/// it (left by an earlier run, of this agent or of one that died) is ended
/// first, and every process of this run's group holds it.
pub fn run_shell_exclusive(
    lock: &Path,
    label: &'static str,
    line: &str,
    envs: &[(&str, String)],
    timeout: Duration,
    crash_at: &str,
) -> io::Result<Ran> {
    let held = GroupLock::take(lock)?;
    run_logged(label, line, envs, timeout, crash_at, Some(&held))
}

fn run_logged(
    label: &'static str,
    line: &str,
    envs: &[(&str, String)],
    timeout: Duration,
    crash_at: &str,
    lock: Option<&GroupLock>,
) -> io::Result<Ran> {
    let mut child = spawn(line, envs, Stdio::null(), Stdio::piped(), lock)?;
    let pid = child.id();
    tracing::info!(command = label, pid, %line, "command started");
    crash::point(crash_at);
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        forward_lines("stdout", out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        forward_lines("stderr", err, tx.clone());
    }
    drop(tx);
    let mut last_line = None;
    let on_line = |stream: &'static str, text: String| {
        tracing::info!(command = label, stream, "{text}");
        if !text.trim().is_empty() {
            last_line = Some(text.chars().take(LAST_LINE_CHARS).collect());
        }
    };
    let waited = wait(&mut child, &rx, Wait::logged(timeout), on_line)?;
    match waited.status {
        Some(status) => {
            tracing::info!(command = label, pid, %status, "command finished");
            Ok(Ran::Exited { status, last_line })
        }
        None => {
            tracing::warn!(
                command = label,
                pid,
                ?timeout,
                "command timed out; its process group was killed"
            );
            Ok(Ran::TimedOut)
        }
    }
}

/// Run `line` with `/bin/sh -c`, `envs` added to the environment and `input`
/// on stdin, for at most `timeout`; keep at most `max + 1` bytes of its
/// stdout, discard its stderr, log nothing.
pub fn capture_shell(
    line: &str,
    envs: &[(&str, String)],
    input: &[u8],
    max: usize,
    timeout: Duration,
) -> io::Result<Captured> {
    let mut child = spawn(line, envs, Stdio::piped(), Stdio::null(), None)?;
    if let Some(mut stdin) = child.stdin.take() {
        let input = input.to_vec();
        // On a thread of its own: a command that does not read its input
        // cannot block the runner. One that exits without reading is fine.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
    }
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        capture(out, max, tx);
    } else {
        drop(tx);
    }
    let waited = wait(&mut child, &rx, Wait::captured(timeout), |_, _| {})?;
    Ok(match waited.status {
        Some(status) => Captured::Exited {
            status,
            stdout: waited.captured.unwrap_or_else(|| Ok(Vec::new())),
        },
        None => Captured::TimedOut,
    })
}

/// Environment variables that may hold the agent's credentials: removed
/// from every command it runs.
pub const SECRET_ENV: [&str; 2] = ["FWAGENT_MQTT_PASSWORD", "FWAGENT_MQTT_URL"];

/// `/bin/sh -c line` in a process group of its own, killed when the agent
/// dies; stdout piped, without [`SECRET_ENV`]. With `lock`, the group
/// inherits it and its file names the group.
fn spawn(
    line: &str,
    envs: &[(&str, String)],
    stdin: Stdio,
    stderr: Stdio,
    lock: Option<&GroupLock>,
) -> io::Result<Child> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(line)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .process_group(0);
    // The agent's own secrets stay with the agent (docs/SECURITY.md).
    for secret in SECRET_ENV {
        cmd.env_remove(secret);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let agent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    let lock = lock.map(|l| l.file.as_raw_fd());
    // SAFETY: between fork and exec only async-signal-safe calls (prctl,
    // getppid, fcntl, getpid, pwrite) on memory of the child's own stack.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != agent {
                // The agent died before the death signal was armed.
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            if let Some(fd) = lock {
                inherit_and_name(fd)?;
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// In the child, before exec: keep the lock `fd` open across exec (so
/// every process of the group holds it) and write the group's id (this
/// process's pid: it leads the group) into its file.
///
/// # Safety
/// Only async-signal-safe calls: it runs between fork and exec.
unsafe fn inherit_and_name(fd: RawFd) -> io::Result<()> {
    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut digits = [0u8; 24];
    let mut at = digits.len() - 1;
    digits[at] = b'\n';
    let mut n = libc::getpid().unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let text = &digits[at..];
    if libc::pwrite(fd, text.as_ptr().cast(), text.len(), 0) != text.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An exclusive `flock` on a small file that names the process group of the
/// command run under it. The command's processes inherit the lock, so it is
/// held as long as any of them runs, also after the agent died (a crash, a
/// kill -9: the shell gets `SIGKILL`, what it started does not). Whoever
/// takes it next ends that group first. A power cut ends every holder.
pub struct GroupLock {
    file: File,
}

impl GroupLock {
    /// Take the lock at `path` (created 0600): at once when no process
    /// holds it, else after ending (`SIGKILL`) the group its file names and
    /// waiting [`RELEASE_WAIT`] for it to let go. An error if a process
    /// still holds it then (one that left the group, or an unknown holder):
    /// no command runs beside it.
    pub fn take(path: &Path) -> io::Result<GroupLock> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        if !try_flock(&file)? {
            let mut text = String::new();
            file.read_to_string(&mut text)?;
            match text.trim().parse::<libc::pid_t>() {
                Ok(group) if group > 1 => {
                    tracing::warn!(
                        group,
                        lock = %path.display(),
                        "a command started before is still running; ending its process group"
                    );
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe {
                        libc::kill(-group, libc::SIGKILL);
                    }
                }
                _ => {
                    tracing::warn!(lock = %path.display(), "the command lock is held by an unknown process; waiting for it")
                }
            }
            let deadline = Instant::now() + RELEASE_WAIT;
            while !try_flock(&file)? {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!(
                            "a command started before still runs (it holds {} outside its process group); not starting another beside it",
                            path.display()
                        ),
                    ));
                }
                std::thread::sleep(POLL);
            }
        }
        file.set_len(0)?;
        Ok(GroupLock { file })
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: `false` when another open file holds it.
fn try_flock(file: &File) -> io::Result<bool> {
    loop {
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// What the reader threads tell the runner.
enum Msg {
    /// A logged output line, from `stdout` or `stderr`.
    Line(&'static str, String),
    /// The captured stdout, whole; the stream is closed.
    Captured(io::Result<Vec<u8>>),
    /// A logged stream closed.
    Eof,
}

/// Send `pipe`'s lines, each cut to [`MAX_LINE_BYTES`], then `Eof`.
fn forward_lines(stream: &'static str, pipe: impl Read + Send + 'static, tx: mpsc::Sender<Msg>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        while let Ok(true) = read_line_capped(&mut reader, &mut buf, MAX_LINE_BYTES) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            if tx.send(Msg::Line(stream, line)).is_err() {
                return;
            }
        }
        let _ = tx.send(Msg::Eof);
    });
}

/// Read one line into `buf` (cleared first), keeping at most `max` bytes of
/// it and dropping the rest up to the newline. `false` at the end of input.
fn read_line_capped(reader: &mut impl BufRead, buf: &mut Vec<u8>, max: usize) -> io::Result<bool> {
    buf.clear();
    let mut read_any = false;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(read_any);
        }
        read_any = true;
        let (upto, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..upto.min(room)]);
        reader.consume(upto);
        if done {
            return Ok(true);
        }
    }
}

/// Keep at most `max + 1` bytes of `pipe`, drain the rest (so the command
/// never blocks on a full pipe), then send them.
fn capture(pipe: ChildStdout, max: usize, tx: mpsc::Sender<Msg>) {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut limited = pipe.take(max as u64 + 1);
        let read = limited.read_to_end(&mut kept);
        let _ = io::copy(&mut limited.into_inner(), &mut io::sink());
        let _ = tx.send(Msg::Captured(read.map(|_| kept)));
    });
}

/// When the runner is done waiting.
struct Wait {
    deadline: Instant,
    /// Output streams the reader threads watch.
    streams: usize,
    /// `Some(grace)`: done once the command exited and either every stream
    /// closed or `grace` passed; it may be reaped before its streams close.
    /// `None`: done only when it exited and every stream closed.
    grace: Option<Duration>,
}

impl Wait {
    fn logged(timeout: Duration) -> Wait {
        Wait {
            deadline: Instant::now() + timeout,
            streams: 2,
            grace: Some(GRACE),
        }
    }

    fn captured(timeout: Duration) -> Wait {
        Wait {
            deadline: Instant::now() + timeout,
            streams: 1,
            grace: None,
        }
    }
}

/// How [`wait`] ended: the exit status, `None` when the deadline came first
/// (the group was then killed and the child reaped); the captured stdout
/// when it arrived.
struct Waited {
    status: Option<ExitStatus>,
    captured: Option<io::Result<Vec<u8>>>,
}

/// Wait for `child` as `how` says, handing each logged line to `on_line`.
/// The child is killed (its whole group) only before it is reaped, so its
/// pid cannot have been reused by then.
fn wait(
    child: &mut Child,
    rx: &mpsc::Receiver<Msg>,
    how: Wait,
    mut on_line: impl FnMut(&'static str, String),
) -> io::Result<Waited> {
    let mut closed = 0;
    let mut captured = None;
    let mut exited: Option<(ExitStatus, Instant)> = None;
    loop {
        let left = how.deadline.saturating_duration_since(Instant::now());
        let nap = POLL.min(left.max(Duration::from_millis(1)));
        if closed >= how.streams {
            std::thread::sleep(nap.min(REAP_POLL));
        } else {
            match rx.recv_timeout(nap) {
                Ok(Msg::Line(stream, text)) => on_line(stream, text),
                Ok(Msg::Captured(kept)) => {
                    captured = Some(kept);
                    closed += 1;
                }
                Ok(Msg::Eof) => closed += 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => closed = how.streams,
            }
        }
        let may_reap = how.grace.is_some() || closed >= how.streams;
        if exited.is_none() && may_reap {
            exited = child.try_wait()?.map(|status| (status, Instant::now()));
        }
        match exited {
            Some((status, at)) => {
                let waited_enough = how.grace.is_some_and(|g| at.elapsed() > g);
                if closed >= how.streams || waited_enough {
                    let status = Some(status);
                    return Ok(Waited { status, captured });
                }
            }
            None if Instant::now() >= how.deadline => {
                kill_group(child);
                let _ = child.wait();
                let status = None;
                return Ok(Waited { status, captured });
            }
            None => {}
        }
    }
}

/// Kill the command and everything it started (it leads its own group).
fn kill_group(child: &Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN_S: Duration = Duration::from_secs(10);

    fn captured(line: &str, input: &str, max: usize, timeout: Duration) -> Captured {
        capture_shell(line, &[], input.as_bytes(), max, timeout).expect("sh runs")
    }

    #[test]
    fn quoting_survives_quotes_and_spaces() {
        let odd = "it's a \"file\" with $HOME and spaces";
        let ran = run_shell(
            "test",
            &format!("test {} = \"$X\"", shell_quote(odd)),
            &[("X", odd.to_string())],
            TEN_S,
            "",
        )
        .expect("sh runs");
        assert!(ran.success(), "{}", ran.describe(Duration::ZERO));
    }

    #[test]
    fn exit_status_and_last_line_are_described() {
        let ran = run_shell(
            "test",
            // One stream: lines on stdout and stderr are read by two
            // threads, so their order across streams is not defined.
            "echo first >&2; echo last >&2; exit 3",
            &[],
            TEN_S,
            "",
        )
        .expect("sh runs");
        assert!(!ran.success());
        assert_eq!(
            ran.describe(Duration::ZERO),
            "exit status 3 (last output: last)"
        );
    }

    #[test]
    fn a_logged_command_is_killed_with_its_group_at_the_deadline() {
        let started = Instant::now();
        let ran = run_shell(
            "test",
            "sleep 30 & sleep 30",
            &[],
            Duration::from_millis(300),
            "",
        )
        .expect("sh runs");
        assert!(matches!(ran, Ran::TimedOut), "{ran:?}");
        assert_eq!(ran.describe(Duration::from_secs(2)), "timed out after 2 s");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_logged_command_leaving_a_child_behind_is_done_when_it_exits() {
        let started = Instant::now();
        let ran = run_shell("test", "sleep 30 & echo bye", &[], TEN_S, "").expect("sh runs");
        assert!(ran.success(), "{ran:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_quiet_command_that_closed_its_output_is_waited_for() {
        let ran =
            run_shell("test", "exec >&- 2>&-; sleep 0.3; exit 4", &[], TEN_S, "").expect("sh runs");
        assert_eq!(ran.describe(Duration::ZERO), "exit status 4");
    }

    fn pid_in(path: &Path) -> libc::pid_t {
        std::fs::read_to_string(path)
            .expect("pid file")
            .trim()
            .parse()
            .expect("a pid")
    }

    fn gone(pid: libc::pid_t) -> bool {
        let deadline = Instant::now() + TEN_S;
        // SAFETY: kill(2) with signal 0 only checks for the process.
        while unsafe { libc::kill(pid, 0) } == 0 {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
        true
    }

    /// Issue 16, item 6: what an installer left running (here a
    /// background child, as a wrapper script leaves the real installer
    /// when the agent dies) still holds the lock; the next taker ends its
    /// whole group before anything else runs.
    #[test]
    fn a_group_left_running_under_the_lock_is_ended_by_the_next_taker() {
        let dir = tempfile::tempdir().expect("temp dir");
        let lock = dir.path().join("installer.lock");
        let pid = dir.path().join("child.pid");
        let line = format!(
            "sleep 30 & echo $! > {}",
            shell_quote(&pid.to_string_lossy())
        );
        let ran = run_shell_exclusive(&lock, "test", &line, &[], TEN_S, "").expect("sh runs");
        assert!(ran.success(), "{ran:?}");
        let child = pid_in(&pid);
        let named: libc::pid_t = std::fs::read_to_string(&lock)
            .expect("lock file")
            .trim()
            .parse()
            .expect("the lock names the group");
        // SAFETY: getpgid(2) has no memory-safety preconditions.
        assert_eq!(
            unsafe { libc::getpgid(child) },
            named,
            "the child is in the named group"
        );
        assert!(
            !gone_at_once(child),
            "the child runs on after its shell exited"
        );
        let _held = GroupLock::take(&lock).expect("taken after ending the group");
        assert!(gone(child), "the group was ended");
    }

    /// A holder outside the named group (it moved to a session of its
    /// own) cannot be ended by the group: nothing runs beside it.
    #[test]
    fn a_holder_that_left_its_group_keeps_the_next_command_from_running() {
        let dir = tempfile::tempdir().expect("temp dir");
        let lock = dir.path().join("installer.lock");
        let pid = dir.path().join("child.pid");
        let line = format!(
            "setsid sleep 30 & echo $! > {}",
            shell_quote(&pid.to_string_lossy())
        );
        run_shell_exclusive(&lock, "test", &line, &[], TEN_S, "").expect("sh runs");
        let child = pid_in(&pid);
        let marker = dir.path().join("ran");
        let next = format!("touch {}", shell_quote(&marker.to_string_lossy()));
        let refused = run_shell_exclusive(&lock, "test", &next, &[], TEN_S, "");
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(child, libc::SIGKILL);
        }
        let e = refused.expect_err("refused while the holder runs");
        assert!(e.to_string().contains("still runs"), "{e}");
        assert!(!marker.exists(), "the second command never ran");
        assert!(gone(child));
        GroupLock::take(&lock).expect("free once the holder is gone");
    }

    fn gone_at_once(pid: libc::pid_t) -> bool {
        // SAFETY: kill(2) with signal 0 only checks for the process.
        unsafe { libc::kill(pid, 0) != 0 }
    }

    #[test]
    fn long_lines_are_cut_for_the_log() {
        let mut reader = BufReader::with_capacity(7, &b"abcdefghij\nxy\nz"[..]);
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        while read_line_capped(&mut reader, &mut buf, 4).expect("reads") {
            lines.push(String::from_utf8_lossy(&buf).into_owned());
        }
        assert_eq!(lines, ["abcd", "xy\n", "z"]);
        let ran = run_shell(
            "test",
            &format!(
                "head -c {} /dev/zero | tr '\\0' x; echo; echo end",
                10 * MAX_LINE_BYTES
            ),
            &[],
            TEN_S,
            "",
        )
        .expect("sh runs");
        assert_eq!(
            ran.describe(Duration::ZERO),
            "exit status 0 (last output: end)"
        );
    }

    #[test]
    fn captured_output_comes_back_with_its_input_and_environment() {
        let envs = [("FIELD", "password".to_string())];
        let ran = capture_shell(
            "cat; echo \"$FIELD\"; echo noise >&2",
            &envs,
            b"in\n",
            64,
            TEN_S,
        )
        .expect("sh runs");
        match ran {
            Captured::Exited { status, stdout } => {
                assert!(status.success());
                assert_eq!(stdout.expect("read"), b"in\npassword\n");
            }
            Captured::TimedOut => panic!("timed out"),
        }
    }

    #[test]
    fn captured_output_is_cut_one_byte_past_the_limit() {
        match captured("head -c 100000 /dev/zero", "", 10, TEN_S) {
            Captured::Exited { status, stdout } => {
                assert!(status.success());
                assert_eq!(stdout.expect("read").len(), 11);
            }
            Captured::TimedOut => panic!("timed out"),
        }
    }

    #[test]
    fn a_captured_command_must_close_its_output_by_the_deadline() {
        let started = Instant::now();
        // The shell exits at once, but its background child holds stdout open.
        let ran = captured("sleep 30 & echo early", "", 64, Duration::from_millis(300));
        assert!(matches!(ran, Captured::TimedOut), "{ran:?}");
        let ran = captured("sleep 30", "", 64, Duration::from_millis(300));
        assert!(matches!(ran, Captured::TimedOut), "{ran:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
