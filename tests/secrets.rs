//! Secrets stay secret, checked on every byte the real binary prints. Full
//! upgrades run with the most verbose logging (`-vv` and `RUST_LOG=trace`,
//! so dependencies' `log` records come through too); then every inspection
//! command, in text and `--json`, both through a running agent's control
//! socket and from the store directly, and `check` / `check --explain`. In
//! all of it (stdout, stderr) neither the decoded user name and password nor
//! their base64 forms (nor the Basic token made of them) may appear, and the
//! `passPort` only inside the reports of its own upgrade. On disk the store
//! keeps them sealed, inside the state directory alone (mode 0700), and
//! once the upgrade has ended no byte sequence of them (plain or base64)
//! is left anywhere, sled's log included.
//!
//! HTTP runs against the test's own server (tests/common/hostile.rs), which
//! checks the credentials; FTP against the shared pyftpdlib.

mod common;

#[path = "common/hostile.rs"]
mod hostile;

use base64::Engine as _;
use common::*;
use hostile::{Behaviour, Hostile};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);
const USER: &str = "gw-operator-Q7xZ";
const PASSWORD: &str = "pw-S3cr3t-9fKq!";
const WRONG_PASSWORD: &str = "pw-Wr0ng-Lm2v?";
const PASS_PORT: &str = "passport-Zk48-h5Tr";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Every form a secret could leak in: plain, base64 (without padding, so a
/// padded or unpadded copy both match), and the HTTP Basic token.
fn forms(user: &str, password: &str) -> Vec<String> {
    let unpadded = |s: String| s.trim_end_matches('=').to_string();
    vec![
        user.to_string(),
        password.to_string(),
        unpadded(b64(user)),
        unpadded(b64(password)),
        unpadded(b64(&format!("{user}:{password}"))),
    ]
}

/// `text` (named `what`) holds none of `secrets`.
fn assert_clean(what: &str, text: &str, secrets: &[String]) {
    for s in secrets {
        assert!(!text.contains(s.as_str()), "{what} shows {s:?}:\n{text}");
    }
}

/// Everything `fwagent` printed, with what produced it.
struct Printed(Vec<(String, String)>);

impl Printed {
    fn add(&mut self, what: impl Into<String>, run: &Run) {
        let what = what.into();
        self.0
            .push((format!("{what} (stdout)"), run.stdout.clone()));
        self.0
            .push((format!("{what} (stderr)"), run.stderr.clone()));
    }

    fn assert_clean(&self, secrets: &[String]) {
        assert!(!self.0.is_empty());
        for (what, text) in &self.0 {
            assert_clean(what, text, secrets);
        }
    }
}

/// `fwagent -vv ARGS` with `RUST_LOG=trace`.
fn verbose<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = fwagent(["-vv"]);
    cmd.args(args).env("RUST_LOG", "trace");
    cmd
}

fn run_agent(state: &Path, target: &Path, req: &Value) -> Run {
    let mut cmd = verbose(["run", "--transport", "stdio", "--retry-base-ms", "50"]);
    cmd.arg("--state-dir")
        .arg(state)
        .arg("--flash")
        .arg(file_flash(target));
    run_with_timeout(cmd, format!("{req}\n").as_bytes(), LIMIT)
}

fn only_result<'a>(lines: &'a [Value], req: &Value) -> &'a Value {
    let r: Vec<&Value> = lines
        .iter()
        .filter(|v| {
            v["operator"] == "reportCloudUpgradeResult"
                && v["info"]["requestMessageId"] == req["messageId"]
        })
        .collect();
    assert_eq!(r.len(), 1, "{lines:#?}");
    r[0]
}

/// Each inspection command, text and `--json`, `-vv`, for `ids`; `live`:
/// answered by a running agent (else read from the store), as the text
/// output says.
fn inspect_all(state: &Path, ids: &[&str], out: &mut Printed, live: bool) {
    let how = if live {
        "live from the running agent"
    } else {
        "no agent is running"
    };
    let state = state.to_str().unwrap();
    let mut commands: Vec<Vec<String>> = vec![
        vec!["status".into()],
        vec!["history".into()],
        vec!["history".into(), "--limit".into(), "1".into()],
    ];
    for id in ids {
        commands.push(vec!["show".into(), id.to_string()]);
    }
    for base in commands {
        for json in [false, true] {
            let mut args = base.clone();
            if json {
                args.push("--json".into());
            }
            args.extend(["--state-dir".into(), state.into()]);
            let run = run_with_timeout(verbose(&args), b"", LIMIT);
            assert_eq!(run.code(), Some(0), "{args:?}: {run}");
            assert!(!run.stdout.trim().is_empty(), "{args:?} printed nothing");
            if !json {
                assert!(run.stdout.contains(how), "{args:?} is not {how}: {run}");
            }
            out.add(format!("{how}: fwagent {}", args.join(" ")), &run);
        }
    }
}

/// The same, through the control socket of an agent that runs meanwhile
/// (its output goes to files beside the state dir, read at the end).
fn inspect_through_the_socket(state: &Path, target: &Path, ids: &[&str], out: &mut Printed) {
    let logs = temp_dir();
    let (stdout, stderr) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut cmd = verbose(["run", "--transport", "stdio"]);
    cmd.arg("--state-dir")
        .arg(state)
        .arg("--flash")
        .arg(file_flash(target))
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&stdout).expect("create"))
        .stderr(std::fs::File::create(&stderr).expect("create"));
    let mut agent = cmd.spawn().expect("spawn fwagent");
    wait_until(LIMIT, "the control socket to answer", || {
        std::fs::read_to_string(&stderr).is_ok_and(|log| log.contains("control socket listening"))
    });
    inspect_all(state, ids, out, true);
    drop(agent.stdin.take());
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = agent.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = agent.kill();
            panic!("the agent did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let run = Run {
        status,
        stdout: std::fs::read_to_string(&stdout).unwrap_or_default(),
        stderr: std::fs::read_to_string(&stderr).unwrap_or_default(),
    };
    assert_eq!(run.code(), Some(0), "{run}");
    out.add("the agent serving the socket", &run);
}

/// Every file under `dir` outside `except`.
fn files_outside(dir: &Path, except: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.starts_with(except) {
                continue;
            }
            match entry.file_type() {
                Ok(t) if t.is_dir() => todo.push(path),
                Ok(t) if t.is_file() => out.push(path),
                _ => {}
            }
        }
    }
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn assert_state_dir_private(dir: &Path, state: &Path, secrets: &[String]) {
    assert_eq!(mode(state), 0o700, "{}", state.display());
    assert_eq!(mode(&state.join("downloads")), 0o700);
    for file in files_outside(dir, state) {
        let bytes = std::fs::read(&file).expect("read");
        let text = String::from_utf8_lossy(&bytes);
        assert_clean(&file.display().to_string(), &text, secrets);
    }
}

#[test]
fn http_secrets_never_leave_the_store_except_passport_in_its_own_reports() {
    let dir = temp_dir();
    let state = dir.path().join("state");
    let target = dir.path().join("flash.bin");
    let images = temp_dir();
    let fw = Firmware::create(images.path(), "secret", 300_000);
    let token = format!("Basic {}", b64(&format!("{USER}:{PASSWORD}")));
    let server = Hostile::start("127.0.0.1", fw.bytes(), Behaviour::RequireAuth(token));
    let mut printed = Printed(Vec::new());

    // 1: the right credentials and a passPort: installed.
    let mut good = upgrade_request("http", server.port(), "/", &fw, USER, PASSWORD);
    good["info"]["fileInfo"]["passPort"] = PASS_PORT.into();
    let run = run_agent(&state, &target, &good);
    assert_eq!(run.code(), Some(0), "{run}");
    let lines = run.json_lines();
    assert_eq!(only_result(&lines, &good)["result"]["errorNo"], 0, "{run}");
    assert!(
        run.stderr.contains("TRACE") || run.stderr.contains("DEBUG"),
        "verbose logging is on: {run}"
    );
    // passPort: in every report of this upgrade, nowhere else.
    for line in &lines {
        let text = line.to_string();
        if line["operator"]
            .as_str()
            .unwrap_or("")
            .starts_with("report")
        {
            assert_eq!(line["info"]["passPort"], PASS_PORT, "{line}");
        } else {
            assert_clean("an ack", &text, &[PASS_PORT.to_string()]);
        }
    }
    assert_clean("the log", &run.stderr, &[PASS_PORT.to_string()]);
    printed.add("the agent, a good upgrade", &run);
    assert!(
        server.seen().iter().any(|s| s.authorization.is_some()),
        "the credentials were used"
    );

    // 2: a wrong password and no passPort: 21, and nothing of either shows.
    let bad = upgrade_request("http", server.port(), "/", &fw, USER, WRONG_PASSWORD);
    let run = run_agent(&state, &target, &bad);
    let lines = run.json_lines();
    assert_eq!(only_result(&lines, &bad)["result"]["errorNo"], 21, "{run}");
    for line in &lines {
        assert!(line["info"].get("passPort").is_none(), "{line}");
    }
    assert_clean("the second upgrade", &run.stdout, &[PASS_PORT.to_string()]);
    printed.add("the agent, a refused upgrade", &run);

    // `check`, with and without --explain, reads the request from stdin.
    for args in [vec!["check", "-"], vec!["check", "--explain", "-"]] {
        let run = run_with_timeout(verbose(&args), good.to_string().as_bytes(), LIMIT);
        assert_eq!(run.code(), Some(0), "{run}");
        printed.add(format!("fwagent {}", args.join(" ")), &run);
    }

    // The inspection commands, from the store and through a running agent.
    let ids = [
        good["messageId"].as_str().unwrap(),
        bad["messageId"].as_str().unwrap(),
    ];
    inspect_all(&state, &ids, &mut printed, false);
    inspect_through_the_socket(&state, &target, &ids, &mut printed);

    let mut secrets = forms(USER, PASSWORD);
    secrets.extend(forms(USER, WRONG_PASSWORD));
    let agent_stdout: Vec<String> = printed
        .0
        .iter()
        .filter(|(what, _)| what.starts_with("the agent") && what.ends_with("(stdout)"))
        .map(|(_, text)| text.clone())
        .collect();
    printed.assert_clean(&secrets);
    // passPort: outside the agent's own stdout (the reports), nowhere.
    let pass_port = [PASS_PORT.to_string()];
    for (what, text) in &printed.0 {
        if !(what.starts_with("the agent") && what.ends_with("(stdout)")) {
            assert_clean(what, text, &pass_port);
        }
    }
    assert!(agent_stdout.iter().any(|t| t.contains(PASS_PORT)));

    // The store's records: both upgrades have ended, so none keeps a
    // credential, and no delivered report keeps its passPort.
    let store = fwagent_state::Store::open(&state, "secrets").expect("open the store");
    for id in ids {
        let job = store
            .job_by_message_id(id)
            .expect("read")
            .expect("the upgrade");
        assert!(job.phase.is_terminal(), "{id}");
        let r = &job.request;
        assert!(
            r.source.user.is_empty() && r.source.password.is_empty(),
            "{id}"
        );
        assert!(r.pass_port.is_none(), "{id}");
        for (entry, delivered) in store.outbox_of(job.id).expect("read") {
            let text = serde_json::to_string(&entry.message).expect("serialise");
            assert!(delivered.is_some(), "{id}: {text}");
            assert_clean("a sent report", &text, &[PASS_PORT.to_string()]);
        }
    }
    drop(store);

    // On disk: nowhere, the state directory included (sled's log keeps
    // old record versions, but only sealed copies of the credentials, and
    // their keys went with the upgrades).
    let mut all = secrets.clone();
    all.push(PASS_PORT.to_string());
    all.push(b64(PASS_PORT).trim_end_matches('=').to_string());
    assert_state_dir_private(dir.path(), &state, &all);
    assert_nowhere_in(&state, &all);
}

/// No file under `state` holds any of `secrets`; the search reads sled's
/// files (the firmware's request messageId is found there).
fn assert_nowhere_in(state: &Path, secrets: &[String]) {
    let files = files_outside(state, Path::new("/nonexistent"));
    let mut seen_store = false;
    for file in &files {
        let bytes = std::fs::read(file).expect("read");
        seen_store |= bytes.windows(4).any(|w| w == b"MID:");
        for s in secrets {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                "{} holds {s:?}",
                file.display()
            );
        }
    }
    assert!(seen_store, "the search read the store: {files:?}");
}

#[test]
fn ftp_secrets_never_leave_the_store() {
    let servers = Servers::from_env();
    let dir = temp_dir();
    let state = dir.path().join("state");
    let target = dir.path().join("flash.bin");
    let fw = servers.put_ftp("secret", 200_000);
    let mut printed = Printed(Vec::new());

    let good = servers.ftp_request(&fw);
    let run = run_agent(&state, &target, &good);
    assert_eq!(
        only_result(&run.json_lines(), &good)["result"]["errorNo"],
        0,
        "{run}"
    );
    printed.add("the agent, a good FTP upgrade", &run);

    let bad = upgrade_request(
        "ftp",
        servers.ftp_port,
        "/",
        &fw,
        &servers.ftp_user,
        WRONG_PASSWORD,
    );
    let run = run_agent(&state, &target, &bad);
    assert_eq!(
        only_result(&run.json_lines(), &bad)["result"]["errorNo"],
        21,
        "{run}"
    );
    printed.add("the agent, a refused FTP login", &run);

    let ids = [
        good["messageId"].as_str().unwrap(),
        bad["messageId"].as_str().unwrap(),
    ];
    inspect_all(&state, &ids, &mut printed, false);

    let mut secrets = forms(&servers.ftp_user, &servers.ftp_pass);
    secrets.extend(forms(&servers.ftp_user, WRONG_PASSWORD));
    printed.assert_clean(&secrets);
    assert_state_dir_private(dir.path(), &state, &secrets);
    assert_nowhere_in(&state, &secrets);
}
