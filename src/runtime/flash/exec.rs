//! Running the external commands of the flash backends: the installer of
//! `--flash command:CMD`, `--reboot-command` and `--health-command`.
//!
//! Each runs as `/bin/sh -c CMD` in a process group of its own, with stdin
//! closed and a deadline; on the deadline the whole group is killed. Its
//! stdout and stderr go to the agent's log line by line (never to the agent's
//! stdout, which is the stdio transport). The shell gets `SIGKILL` when the
//! agent dies (`PR_SET_PDEATHSIG`), so a crash does not leave it running
//! beside the copy started after the restart.

use crate::crash;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How a command ended.
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

/// `s` quoted for `/bin/sh`: one word, whatever it holds.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The last output line is cut to this many characters in descriptions.
const LAST_LINE_CHARS: usize = 200;

enum Line {
    Text(&'static str, String),
    Eof,
}

fn forward(stream: &'static str, pipe: impl Read + Send + 'static, tx: mpsc::Sender<Line>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    if tx.send(Line::Text(stream, line)).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(Line::Eof);
    });
}

/// Run `line` with `/bin/sh -c`, `envs` added to the environment, for at most
/// `timeout`. `label` names it in the log ("installer", "reboot", "health").
/// `crash_at` names the crash point reached once it runs.
pub fn run_shell(
    label: &'static str,
    line: &str,
    envs: &[(&str, String)],
    timeout: Duration,
    crash_at: &str,
) -> io::Result<Ran> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(line)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    tracing::info!(command = label, pid, %line, "command started");
    crash::point(crash_at);
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        forward("stdout", out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        forward("stderr", err, tx.clone());
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut last_line = None;
    let mut eofs = 0;
    let mut exited: Option<(ExitStatus, Instant)> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Line::Text(stream, text)) => {
                tracing::info!(command = label, stream, "{text}");
                if !text.trim().is_empty() {
                    last_line = Some(text.chars().take(LAST_LINE_CHARS).collect());
                }
            }
            Ok(Line::Eof) => eofs += 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => eofs = 2,
        }
        match exited {
            None => {
                if let Some(status) = child.try_wait()? {
                    exited = Some((status, Instant::now()));
                } else if Instant::now() >= deadline {
                    // SAFETY: kill(2) on the process group we created for the child.
                    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
                    let _ = child.wait();
                    tracing::warn!(
                        command = label,
                        pid,
                        ?timeout,
                        "command timed out; its process group was killed"
                    );
                    return Ok(Ran::TimedOut);
                }
            }
            // The output of something it left running in the background is
            // not waited for beyond a moment.
            Some((status, at)) => {
                if eofs >= 2 || at.elapsed() > Duration::from_millis(500) {
                    tracing::info!(command = label, pid, %status, "command finished");
                    return Ok(Ran::Exited { status, last_line });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes_and_spaces() {
        let odd = "it's a \"file\" with $HOME and spaces";
        let ran = run_shell(
            "test",
            &format!("test {} = \"$X\"", shell_quote(odd)),
            &[("X", odd.to_string())],
            Duration::from_secs(10),
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
            Duration::from_secs(10),
            "",
        )
        .expect("sh runs");
        assert!(!ran.success());
        assert_eq!(
            ran.describe(Duration::ZERO),
            "exit status 3 (last output: last)"
        );
    }
}
