//! The inspection and control commands (`status`, `history`, `show`, `watch`,
//! `submit`, `cancel`) run as the real binary against a real agent (`fwagent
//! run --transport stdio`, its stdin held open so it stays up) that downloads
//! from the test nginx, and against the store alone once the agent is gone.
//! Needs the test servers: `make test`, or `make servers` and
//! `. target/test-servers/env`.

mod common;

use common::{Firmware, Run, Servers};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(60);

/// A running `fwagent run --transport stdio`; killed on drop.
struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    state: PathBuf,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<String>>,
}

impl Agent {
    /// Start an agent with its state in `root/state`, flashing to
    /// `root/out.bin` (unless `extra` has a `--flash`), and wait until its
    /// control socket accepts.
    fn start(root: &Path, extra: &[&str]) -> Agent {
        let state = root.join("state");
        let mut cmd = common::fwagent(["run", "--transport", "stdio"]);
        cmd.arg("--state-dir").arg(&state);
        if !extra.contains(&"--flash") {
            cmd.arg("--flash")
                .arg(common::file_flash(&root.join("out.bin")));
        }
        cmd.args(extra).stdin(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn fwagent run");
        let stdin = child.stdin.take();
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("agent stdout");
        let lines = Arc::clone(&out);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let stderr = child.stderr.take().expect("agent stderr");
        let text = Arc::clone(&err);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut t = text.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
            }
        });
        let mut agent = Agent {
            child,
            stdin,
            state,
            out,
            err,
        };
        let socket = agent.socket();
        agent.wait_for("the control socket to accept", || {
            UnixStream::connect(&socket).is_ok()
        });
        agent
    }

    fn socket(&self) -> PathBuf {
        self.state.join("control.sock")
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Poll `cond` until it holds; fail early if the agent died.
    fn wait_for(&mut self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the agent exited ({status}) while waiting for {what}\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n--- agent stderr\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Write one request line to the agent's stdin (the stdio transport).
    fn send(&mut self, request: &Value) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{request}").expect("write to the agent");
        stdin.flush().expect("flush to the agent");
    }

    /// The first stdout message (acks, reports) that satisfies `pred`.
    fn wait_message(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let out = Arc::clone(&self.out);
        let find = || {
            out.lock()
                .unwrap()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| pred(v))
        };
        self.wait_for(what, || find().is_some());
        find().expect("found just now")
    }

    /// Close stdin (EOF: finish and exit) and wait for the exit.
    fn stop(&mut self) -> ExitStatus {
        drop(self.stdin.take());
        self.wait_exit()
    }

    /// SIGTERM (stop where it is: the upgrade stays under way) and wait for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let pid = i32::try_from(self.child.id()).expect("a pid");
        // SAFETY: kill(2) on our own child, which has not been waited for.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.wait_exit()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the agent") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every CLI output of a test, to check for secrets at the end.
#[derive(Default)]
struct Transcript(String);

impl Transcript {
    /// `fwagent ARGS... --state-dir STATE`.
    fn cli(&mut self, state: &Path, args: &[&str]) -> Run {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.push("--state-dir".into());
        all.push(state.display().to_string());
        let run = common::run_fwagent(&all, b"", CLI_TIMEOUT);
        self.0.push_str(&run.stdout);
        self.0.push_str(&run.stderr);
        run
    }

    /// The same, expecting exit code `code` and one JSON value on stdout.
    fn json(&mut self, state: &Path, args: &[&str], code: i32) -> Value {
        let run = self.cli(state, args);
        assert_eq!(run.code(), Some(code), "fwagent {args:?}\n{run}");
        serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e})\n{run}"))
    }

    fn assert_no_secrets(&self, secrets: &[&str]) {
        for s in secrets.iter().chain(&["passPort"]) {
            assert!(
                !self.0.contains(s),
                "{s:?} appeared in the CLI's output:\n{}",
                self.0
            );
        }
    }
}

fn with_pass_port(mut request: Value, pass_port: &str) -> Value {
    request["info"]["fileInfo"]["passPort"] = Value::String(pass_port.to_string());
    request
}

fn message_id(request: &Value) -> String {
    request["messageId"]
        .as_str()
        .expect("messageId")
        .to_string()
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok()
    })
}

/// Poll `status --json` until `pred` holds; the view that satisfied it.
fn wait_status(
    t: &mut Transcript,
    agent: &mut Agent,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let state = agent.state.clone();
    let mut last = Value::Null;
    agent.wait_for(what, || {
        last = t.json(&state, &["status", "--json"], 0);
        pred(&last)
    });
    last
}

fn part_files(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state.join("downloads"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The issue's story: live status while nginx trickles the image, cancel,
/// a new request through `submit` (twice: same ack), and after the agent is
/// gone, history and show from the store. No output carries a credential.
#[test]
fn live_status_cancel_submit_then_history_and_show_offline() {
    let servers = Servers::from_env();
    let tmp = common::temp_dir();
    let mut t = Transcript::default();
    let pass_port = format!("pp-{}", common::unique_name("secret"));

    let mut agent = Agent::start(tmp.path(), &[]);
    let state = agent.state.clone();
    let socket_mode = std::fs::metadata(agent.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(socket_mode & 0o777, 0o600, "control socket mode");

    // 1. A slow download (nginx `limit_rate 1m`), with credentials nginx ignores there.
    let slow = servers.put_http("cli-slow", 24 << 20);
    let first = with_pass_port(
        common::upgrade_request(
            "http",
            servers.nginx_port,
            "/slow/",
            &slow,
            &servers.http_user,
            &servers.http_pass,
        ),
        &pass_port,
    );
    let mid1 = message_id(&first);
    agent.send(&first);
    agent.wait_message("the first ack", |m| {
        m["messageId"] == mid1.as_str() && m["result"]["errorNo"] == 0
    });

    // 2. `status --json`: downloading, and bytesDone grows between two calls.
    let a = wait_status(&mut t, &mut agent, "a download under way", |v| {
        v["phase"] == "downloading" && v["bytesDone"].as_u64() > Some(0)
    });
    assert_eq!(a["messageId"], mid1.as_str());
    assert_eq!(a["totalBytes"], slow.len);
    assert_eq!(a["result"], Value::Null);
    assert!(
        is_rfc3339(&a["createdAt"]) && is_rfc3339(&a["updatedAt"]),
        "{a}"
    );
    let before = a["bytesDone"].as_u64().unwrap();
    let b = wait_status(&mut t, &mut agent, "bytesDone to grow", |v| {
        v["phase"] == "downloading" && v["bytesDone"].as_u64() > Some(before)
    });
    assert!(
        b["bytesDone"].as_u64().unwrap() < slow.len,
        "still downloading: {b}"
    );

    let human = t.cli(&state, &["status"]);
    assert_eq!(human.code(), Some(0), "{human}");
    assert!(
        human.stdout.starts_with("downloading"),
        "phase first:\n{human}"
    );
    assert!(
        human.stdout.contains("live from the running agent"),
        "{human}"
    );
    assert!(human.stdout.contains("MiB"), "human units:\n{human}");

    // 3. Cancel during the download: cancelled, result 60 reported, partial file gone.
    let cancelled = t.json(&state, &["cancel", "--json"], 0);
    assert_eq!(cancelled["messageId"], mid1.as_str());
    assert_eq!(cancelled["phase"], "cancelled");
    assert_eq!(cancelled["result"]["errorNo"], 60);
    agent.wait_message("the result report 60", |m| {
        m["operator"] == "reportCloudUpgradeResult"
            && m["info"]["requestMessageId"] == mid1.as_str()
            && m["result"]["errorNo"] == 60
    });
    agent.wait_for("the partial file to go", || part_files(&state).is_empty());
    let again = t.cli(&state, &["cancel"]);
    assert_eq!(again.code(), Some(1), "nothing left to cancel\n{again}");
    assert!(again.stderr.contains("refused"), "{again}");

    // 4. A new request is accepted, through `submit`; the same file twice, the same ack.
    let fast = servers.put_http("cli-fast", 256 << 10);
    let second = with_pass_port(servers.http_auth_request(&fast), &pass_port);
    let mid2 = message_id(&second);
    let file = tmp.path().join("request.json");
    std::fs::write(&file, second.to_string()).unwrap();
    let file_arg = file.display().to_string();
    let s1 = t.cli(&state, &["submit", &file_arg, "--json"]);
    assert_eq!(s1.code(), Some(0), "{s1}");
    let ack: Value = serde_json::from_str(s1.stdout.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("the ack is JSON ({e})\n{s1}"));
    assert_eq!(ack["operator"], "setCloudUpgradeConfig-Ack");
    assert_eq!(ack["messageId"], mid2.as_str());
    assert_eq!(ack["sessionId"], second["sessionId"]);
    assert_eq!(ack["result"]["errorNo"], 0);
    let transport_ack = agent.wait_message("the ack on the transport", |m| {
        m["operator"] == "setCloudUpgradeConfig-Ack" && m["messageId"] == mid2.as_str()
    });
    assert_eq!(transport_ack, ack, "submit prints the transport's ack");
    let s2 = t.cli(&state, &["submit", &file_arg]);
    assert_eq!(s2.code(), Some(0), "{s2}");
    assert_eq!(
        s2.stdout.lines().next(),
        s1.stdout.lines().next(),
        "a repeat gets the same ack"
    );
    let done = wait_status(&mut t, &mut agent, "the second upgrade to complete", |v| {
        v["messageId"] == mid2.as_str() && v["phase"] == "completed"
    });
    assert_eq!(done["result"]["errorNo"], 0);
    assert_eq!(done["bytesDone"], fast.len);

    // 5. The agent goes; the store answers.
    assert!(agent.stop().success(), "agent exit\n{}", agent.stderr());
    // The cancel stopped a download; the completed upgrade stopped none.
    let stderr = agent.stderr();
    let aborted: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("download aborted"))
        .collect();
    assert!(
        aborted.len() == 1 && aborted[0].contains("job=1"),
        "one download aborted, the cancelled one's: {aborted:#?}"
    );
    let history = t.cli(&state, &["history", "--json"]);
    assert_eq!(history.code(), Some(0), "{history}");
    assert!(
        history.stderr.contains("no agent is running"),
        "says it read the store\n{history}"
    );
    let jobs: Value = serde_json::from_str(history.stdout.trim()).expect("history is JSON");
    let ids: Vec<&str> = jobs
        .as_array()
        .expect("an array")
        .iter()
        .map(|j| j["messageId"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        ids,
        [mid2.as_str(), mid1.as_str()],
        "every upgrade, newest first"
    );
    assert_eq!(jobs[1]["phase"], "cancelled");
    let limited = t.json(&state, &["history", "--json", "--limit", "1"], 0);
    assert_eq!(limited.as_array().map(Vec::len), Some(1));

    let shown = t.json(&state, &["show", &mid1, "--json"], 0);
    let log = shown["log"].as_array().expect("a log");
    let path: Vec<&str> = log
        .iter()
        .map(|e| e["to"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(path.first(), Some(&"accepted"), "{shown}");
    assert!(path.contains(&"downloading"), "{shown}");
    assert_eq!(path.last(), Some(&"cancelled"), "{shown}");
    assert!(
        log.iter().all(|e| is_rfc3339(&e["at"])),
        "timestamped: {shown}"
    );
    let outbox = shown["outbox"].as_array().expect("an outbox");
    assert!(
        outbox
            .iter()
            .any(|o| o["operator"] == "reportCloudUpgradeResult"
                && o["result"]["errorNo"] == 60
                && is_rfc3339(&o["deliveredAt"])),
        "the result report, delivered: {shown}"
    );
    let human = t.cli(&state, &["show", &mid1]);
    assert_eq!(human.code(), Some(0), "{human}");
    assert!(human.stdout.starts_with("cancelled"), "{human}");
    assert!(
        human.stdout.contains("transitions") && human.stdout.contains("→ cancelled"),
        "{human}"
    );
    let human = t.cli(&state, &["history"]);
    assert_eq!(human.code(), Some(0), "{human}");
    assert!(
        human.stdout.contains(&mid1) && human.stdout.contains(&mid2),
        "{human}"
    );

    t.assert_no_secrets(&[&servers.http_user, &servers.http_pass, &pass_port]);
}

/// `show` gives the retries and the errors, live and then offline; `status`
/// puts the phase and the last error first.
#[test]
fn show_lists_retries_and_errors() {
    let servers = Servers::from_env();
    let tmp = common::temp_dir();
    let mut t = Transcript::default();
    let mut agent = Agent::start(
        tmp.path(),
        &["--download-attempts", "2", "--retry-base-ms", "50"],
    );
    let state = agent.state.clone();
    // nginx answers /status/503 with 503 (retryable): one retry, then failure.
    let fw = Firmware {
        name: "503".into(),
        path: PathBuf::new(),
        len: 1000,
        md5: "0123456789abcdef0123456789abcdef".into(),
        seed: 0,
    };
    let request = common::upgrade_request("http", servers.nginx_port, "/status/503", &fw, "", "");
    let mid = message_id(&request);
    agent.send(&request);
    agent.wait_message("the failure report", |m| {
        m["operator"] == "reportCloudUpgradeResult" && m["info"]["requestMessageId"] == mid.as_str()
    });

    let shown = t.json(&state, &["show", &mid, "--json"], 0);
    assert_eq!(shown["phase"], "failed", "{shown}");
    assert_eq!(shown["result"]["errorNo"], 23, "{shown}");
    assert!(
        shown["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{shown}"
    );
    let log = shown["log"].as_array().expect("a log");
    assert!(
        log.iter()
            .any(|e| e["event"].as_str().is_some_and(|s| s.contains("retry"))
                && e["error"].as_str().is_some_and(|s| s.contains("503"))),
        "a retry with its error: {shown}"
    );
    let missing = t.cli(&state, &["show", "MID:no-such-upgrade"]);
    assert_eq!(missing.code(), Some(1), "{missing}");

    assert!(agent.stop().success(), "{}", agent.stderr());
    assert!(
        !agent.stderr().contains("download aborted"),
        "a download that ended is aborted by nobody:\n{}",
        agent.stderr()
    );
    let human = t.cli(&state, &["status"]);
    assert_eq!(human.code(), Some(0), "{human}");
    let lines: Vec<&str> = human.stdout.lines().collect();
    assert!(
        lines[0].starts_with("failed") && lines[0].contains("result 23"),
        "{human}"
    );
    assert!(
        lines[1].starts_with("last error") && lines[1].contains("503"),
        "{human}"
    );
    let human = t.cli(&state, &["show", &mid]);
    assert!(
        human.stdout.contains("retry 1") && human.stdout.contains("error: "),
        "{human}"
    );
}

/// A speed and an ETA are figures of a running download: live `status` and
/// `show` give them; once the agent is gone (stopped mid-download, the
/// upgrade still under way in the store) they give neither, and `--json`
/// keeps the shape of INTERFACE.md either way.
#[test]
fn offline_status_shows_no_speed_or_eta() {
    let servers = Servers::from_env();
    let tmp = common::temp_dir();
    let mut t = Transcript::default();
    let mut agent = Agent::start(tmp.path(), &["--checkpoint-bytes", "262144"]);
    let state = agent.state.clone();
    let fw = servers.put_http("cli-offline", 16 << 20);
    let request = common::upgrade_request("http", servers.nginx_port, "/slow/", &fw, "", "");
    let mid = message_id(&request);
    agent.send(&request);
    wait_status(&mut t, &mut agent, "a second of download", |v| {
        v["phase"] == "downloading" && v["bytesDone"].as_u64() > Some(3 << 19)
    });
    let live = t.cli(&state, &["status"]);
    let headline = live.stdout.lines().next().unwrap_or_default().to_string();
    assert!(
        headline.contains("/s average") && headline.contains("left"),
        "live: a speed and an ETA\n{live}"
    );

    assert!(agent.terminate().success(), "{}", agent.stderr());
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
        k.sort_unstable();
        k
    };
    let offline = t.json(&state, &["status", "--json"], 0);
    assert_eq!(offline["phase"], "downloading", "{offline}");
    assert_eq!(keys(&offline), {
        let mut k: Vec<String> = [
            "messageId",
            "sessionId",
            "firmwareName",
            "md5sum",
            "totalBytes",
            "bytesDone",
            "phase",
            "attempts",
            "result",
            "createdAt",
            "updatedAt",
        ]
        .map(String::from)
        .to_vec();
        k.sort_unstable();
        k
    });
    for args in [vec!["status"], vec!["show", &mid]] {
        let run = t.cli(&state, &args);
        assert_eq!(run.code(), Some(0), "{run}");
        let headline = run.stdout.lines().next().unwrap_or_default();
        assert!(
            headline.starts_with("downloading") && headline.contains("MiB of"),
            "{args:?}: how far it got\n{run}"
        );
        assert!(
            !headline.contains("/s") && !headline.contains("left"),
            "{args:?}: no speed or ETA offline\n{run}"
        );
        assert!(run.stdout.contains("no agent is running"), "{run}");
    }
}

/// A `fwagent watch` running in the background, its stdout read line by line.
struct Watcher {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: thread::JoinHandle<String>,
}

impl Watcher {
    fn spawn(args: &[&str]) -> Watcher {
        let mut child = common::fwagent(args).spawn().expect("spawn fwagent watch");
        let stdout = child.stdout.take().expect("watch stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().expect("watch stderr");
        let stderr = thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        Watcher {
            child,
            lines,
            stderr,
        }
    }

    /// Its first line: it has connected and shows the upgrade.
    fn first_line(&self) -> String {
        self.lines
            .recv_timeout(WAIT)
            .expect("watch printed nothing")
    }

    /// Wait for the exit: the code and every later line.
    fn finish(mut self) -> (Option<i32>, Vec<String>, String) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for watch") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("watch did not end");
            }
            thread::sleep(Duration::from_millis(50));
        };
        let stderr = self.stderr.join().unwrap_or_default();
        (status.code(), self.lines.iter().collect(), stderr)
    }
}

/// `watch` follows an upgrade to its end, even when the agent exits right
/// after it (stdin closed: a one-shot run): plain lines when stdout is not a
/// terminal, one JSON view per change with `--json`.
#[test]
fn watch_follows_an_upgrade_to_the_end() {
    let servers = Servers::from_env();
    let tmp = common::temp_dir();
    let mut agent = Agent::start(tmp.path(), &[]);
    let state = agent.state.display().to_string();
    let fw = servers.put_http("cli-watch", 3 << 20);
    let request = common::upgrade_request("http", servers.nginx_port, "/slow/", &fw, "", "");
    let mid = message_id(&request);
    agent.send(&request);
    agent.wait_message("the ack", |m| m["messageId"] == mid.as_str());

    let plain = Watcher::spawn(&["watch", "--state-dir", &state]);
    let json = Watcher::spawn(&["watch", "--json", "--state-dir", &state]);
    let plain_first = plain.first_line();
    let json_first = json.first_line();
    // EOF: the agent finishes the upgrade, then exits.
    assert!(agent.stop().success(), "{}", agent.stderr());

    let (code, rest, stderr) = plain.finish();
    assert_eq!(code, Some(0), "{plain_first}\n{rest:#?}\n{stderr}");
    assert!(
        plain_first.starts_with("downloading") || plain_first.starts_with("accepted"),
        "{plain_first}"
    );
    assert!(
        rest.last().is_some_and(|l| l.starts_with("completed")),
        "{rest:#?}"
    );
    assert!(
        rest.iter().all(|l| !l.contains('\x1b')),
        "no escapes off a terminal: {rest:#?}"
    );

    let (code, rest, stderr) = json.finish();
    assert_eq!(code, Some(0), "{json_first}\n{rest:#?}\n{stderr}");
    let views: Vec<Value> = std::iter::once(&json_first)
        .chain(&rest)
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        views.iter().all(|v| v["messageId"] == mid.as_str()),
        "{views:#?}"
    );
    assert_eq!(
        views.last().map(|v| v["phase"].clone()),
        Some("completed".into()),
        "{views:#?}"
    );
    let done: Vec<u64> = views
        .iter()
        .filter_map(|v| v["bytesDone"].as_u64())
        .collect();
    assert!(
        done.windows(2).all(|w| w[0] <= w[1]),
        "progress only grows: {done:?}"
    );
}

/// `cancel` refuses an upgrade that has begun flashing, and says why. The
/// installer never ends, so flashing lasts (it dies with the agent).
#[test]
fn cancel_is_refused_once_flashing_has_begun() {
    let servers = Servers::from_env();
    let tmp = common::temp_dir();
    let mut t = Transcript::default();
    let mut agent = Agent::start(tmp.path(), &["--flash", "command:exec sleep 600 # {image}"]);
    let state = agent.state.clone();
    let fw = servers.put_http("cli-flash", 64 << 10);
    let request = common::upgrade_request("http", servers.nginx_port, "/", &fw, "", "");
    let mid = message_id(&request);
    agent.send(&request);
    wait_status(&mut t, &mut agent, "flashing to begin", |v| {
        v["messageId"] == mid.as_str() && v["phase"] == "flashing"
    });
    let refused = t.cli(&state, &["cancel", &mid]);
    assert_eq!(refused.code(), Some(1), "{refused}");
    assert!(refused.stdout.is_empty(), "{refused}");
    assert!(
        refused.stderr.contains("refused") && refused.stderr.contains("flashing has begun"),
        "says why: {refused}"
    );
    let still = t.json(&state, &["status", "--json"], 0);
    assert_eq!(still["phase"], "flashing", "{still}");
    // The agent is killed on drop, blocked as it is.
}

/// Without an agent: no state dir is exit 3; an empty one prints `null`; a
/// stale socket is not an agent; `submit` and `cancel` need one; `watch`
/// prints one line; bad arguments are usage errors.
#[test]
fn without_an_agent() {
    let tmp = common::temp_dir();
    let mut t = Transcript::default();
    let missing = tmp.path().join("nowhere");
    let run = t.cli(&missing, &["status", "--json"]);
    assert_eq!(run.code(), Some(3), "{run}");
    assert!(run.stderr.contains("no state directory"), "{run}");

    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // A socket file whose server is gone.
    drop(UnixListener::bind(state.join("control.sock")).unwrap());
    let run = t.cli(&state, &["status", "--json"]);
    assert_eq!((run.code(), run.stdout.trim()), (Some(0), "null"), "{run}");
    assert!(run.stderr.contains("no agent is running"), "{run}");
    assert_eq!(
        t.json(&state, &["history", "--json"], 0),
        Value::Array(vec![])
    );
    let run = t.cli(&state, &["status"]);
    assert_eq!(run.code(), Some(0), "{run}");
    assert!(run.stdout.contains("no upgrade recorded yet"), "{run}");
    let run = t.cli(&state, &["watch"]);
    assert_eq!(run.code(), Some(0), "{run}");

    let file = tmp.path().join("request.json");
    std::fs::write(&file, "{}").unwrap();
    let run = t.cli(&state, &["submit", &file.display().to_string()]);
    assert_eq!(run.code(), Some(3), "{run}");
    assert!(run.stderr.contains("no agent is running"), "{run}");
    let run = t.cli(&state, &["cancel"]);
    assert_eq!(run.code(), Some(3), "{run}");
    let run = t.cli(
        &state,
        &[
            "submit",
            &tmp.path().join("absent.json").display().to_string(),
        ],
    );
    assert_eq!(
        run.code(),
        Some(2),
        "an unreadable file is a usage error\n{run}"
    );
    let run = t.cli(&state, &["history", "--limit", "many"]);
    assert_eq!(run.code(), Some(2), "{run}");
    let run = t.cli(&state, &["show"]);
    assert_eq!(run.code(), Some(2), "{run}");
}

/// A store held by an agent whose socket does not answer is unreachable
/// (exit 3), not empty.
#[test]
fn a_locked_store_without_its_socket_is_unreachable() {
    let tmp = common::temp_dir();
    let mut t = Transcript::default();
    let mut agent = Agent::start(tmp.path(), &[]);
    let state = agent.state.clone();
    std::fs::remove_file(agent.socket()).expect("remove the socket");
    for args in [["status", "--json"], ["history", "--json"]] {
        let run = t.cli(&state, &args);
        assert_eq!(run.code(), Some(3), "{run}");
        assert!(run.stdout.is_empty(), "{run}");
        assert!(run.stderr.contains("held by another process"), "{run}");
    }
    assert!(agent.stop().success(), "{}", agent.stderr());
}

/// The control socket serves at most 8 clients at once: a ninth is told so
/// in one `unavailable` line and closed, and once a client leaves, a new
/// one is served again. Before the cap the ninth was served like the others
/// (here: it got no such line).
#[test]
fn the_control_socket_caps_its_clients() {
    let dir = common::temp_dir();
    let agent = Agent::start(dir.path(), &[]);
    // Each of the eight is served (it answers a `hello`); a place the
    // start-up probe held may take a moment to come free.
    let mut held: Vec<UnixStream> = (0..8).map(|_| served(&agent.socket())).collect();
    let ninth = UnixStream::connect(agent.socket()).expect("connect the ninth");
    ninth.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = BufReader::new(&ninth);
    let mut line = String::new();
    reader.read_line(&mut line).expect("the ninth is told");
    assert!(
        line.contains(r#""code":"unavailable""#) && line.contains("at most 8"),
        "{line}"
    );
    line.clear();
    assert_eq!(
        reader.read_line(&mut line).expect("closed"),
        0,
        "then closed"
    );
    drop(held.pop());
    served(&agent.socket());
}

/// A control connection that answers `hello`, connecting again while the
/// agent says it has no place (at most [`WAIT`]).
fn served(socket: &Path) -> UnixStream {
    let started = Instant::now();
    loop {
        let mut c = UnixStream::connect(socket).expect("connect");
        c.set_read_timeout(Some(WAIT)).unwrap();
        // A client turned away may be closed before it writes: its answer
        // is read all the same.
        let _ = writeln!(c, r#"{{"cmd":"hello"}}"#);
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).expect("answered");
        if line.contains(r#""ok":true"#) {
            return c;
        }
        assert!(
            line.contains(r#""code":"unavailable""#) && started.elapsed() < WAIT,
            "{line}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A control client that sends nothing for 60 s is dropped: the agent closes
/// its connection (and so its place among the eight). Before the fix it was
/// held open for ever (here: no end of stream within 90 s).
#[test]
fn an_idle_control_client_is_dropped() {
    let dir = common::temp_dir();
    let agent = Agent::start(dir.path(), &[]);
    let idle = served(&agent.socket());
    idle.set_read_timeout(Some(Duration::from_secs(90)))
        .unwrap();
    let mut line = String::new();
    let n = BufReader::new(&idle)
        .read_line(&mut line)
        .expect("the agent closes an idle client");
    assert_eq!(n, 0, "closed, nothing said: {line}");
}
