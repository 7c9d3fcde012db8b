//! The installing backends end to end, with the real `fwagent` binary and
//! images served by the real nginx that `make test` starts.
//!
//! `--flash ab:DIR` runs against a bootloader stand-in ([`Gateway::power_on`]):
//! on each power-on it boots `next` while tries are left (taking one), else
//! `active`, and writes `booted`, as docs/AB-SLOTS.md describes a real one; a
//! slot holding a broken image resets the board (a watchdog) and the
//! bootloader runs again. The "reboot" the agent asks for is a command that
//! notes it in a file; the test then powers the board on and starts the agent
//! again with stdin at EOF, as init would after a reboot. Shown: the healthy
//! path (result only after the commit), the fall-back (51, old slot still
//! active), a failed health check, kill -9 at every crash point of the slot
//! write and of the commit, and the loop guards. `--flash command:CMD` runs
//! installers that succeed, fail, hang past `--install-timeout`, die with the
//! agent, and kill the agent.

mod common;

use common::*;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(120);
/// What slot a held before any upgrade.
const OLD_IMAGE: &[u8] = b"the image the gateway runs today\n";

/// `fwagent status --json` of the store (no agent runs).
fn status(state: &Path) -> Value {
    let mut cmd = fwagent(["status", "--json", "--state-dir"]);
    cmd.arg(state);
    let run = run_with_timeout(cmd, b"", LONG);
    serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("status is not JSON ({e}): {run}"))
}

/// A gateway with two slots (a runs [`OLD_IMAGE`]) and a state dir.
struct Gateway {
    _dir: tempfile::TempDir,
    state: PathBuf,
    slots: PathBuf,
    /// One line per reboot the agent asked for.
    reboots: PathBuf,
}

impl Gateway {
    fn new() -> Gateway {
        let dir = temp_dir();
        let slots = dir.path().join("slots");
        fs::create_dir(&slots).expect("mkdir slots");
        fs::write(slots.join("slot-a"), OLD_IMAGE).expect("write slot a");
        Gateway {
            state: dir.path().join("state"),
            reboots: dir.path().join("reboots"),
            slots,
            _dir: dir,
        }
    }

    fn flash(&self) -> String {
        format!("ab:{}", self.slots.display())
    }

    /// The agent's flags besides `--flash`: `extra`, and the stand-in reboot
    /// unless `extra` names a reboot command of its own.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if !extra.contains(&"--reboot-command") {
            args.push("--reboot-command".into());
            args.push(format!("echo reboot >> '{}'", self.reboots.display()));
        }
        args
    }

    /// `fwagent run` over stdio with `--flash ab:SLOTS`, not started yet.
    fn command(&self, extra: &[&str], crash_at: Option<&str>) -> std::process::Command {
        let args = self.args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = stdio_agent(&self.state, &self.flash(), &args);
        if let Some(point) = crash_at {
            cmd.env("FWAGENT_CRASH_AT", point);
        }
        cmd
    }

    /// [`Gateway::command`] fed `requests` then EOF.
    fn run(&self, requests: &[&Value], extra: &[&str], crash_at: Option<&str>) -> Run {
        let input: String = requests.iter().map(|r| format!("{r}\n")).collect();
        run_with_timeout(self.command(extra, crash_at), input.as_bytes(), LONG)
    }

    /// Files in the state directory's `downloads/`.
    fn partial_files(&self) -> Vec<String> {
        fs::read_dir(self.state.join("downloads"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn reboots(&self) -> usize {
        fs::read_to_string(&self.reboots)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn record(&self) -> Value {
        let text = fs::read_to_string(self.slots.join("bootctl.json")).expect("read bootctl.json");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("bootctl.json is not JSON ({e}): {text}"))
    }

    fn slot_md5(&self, slot: &str) -> String {
        md5_file(&self.slots.join(format!("slot-{slot}")))
    }

    /// The bootloader stand-in: one power-on. Returns the slot that came up.
    /// A slot whose image has the md5 `broken` never comes up: the watchdog
    /// resets the board and the bootloader runs again.
    fn power_on(&self, broken: Option<&str>) -> String {
        let path = self.slots.join("bootctl.json");
        for _ in 0..16 {
            let mut r = self.record();
            let next = r["next"].as_str().map(str::to_string);
            let tries = r["tries"].as_u64().expect("tries is a number");
            let slot = match next {
                Some(next) if tries > 0 => {
                    r["tries"] = (tries - 1).into();
                    next
                }
                _ => {
                    r["next"] = Value::Null;
                    r["tries"] = 0.into();
                    r["active"].as_str().expect("active is a slot").to_string()
                }
            };
            r["booted"] = slot.clone().into();
            fs::write(&path, format!("{r}\n")).expect("write bootctl.json");
            if Some(self.slot_md5(&slot).as_str()) != broken {
                return slot;
            }
        }
        panic!(
            "the bootloader stand-in never booted a working slot: {}",
            self.record()
        );
    }
}

fn assert_record(r: &Value, active: &str, next: Option<&str>, booted: &str) {
    assert_eq!(r["version"], 1, "{r}");
    assert_eq!(r["active"], active, "{r}");
    assert_eq!(r["next"].as_str(), next, "{r}");
    assert_eq!(r["booted"], booted, "{r}");
}

#[test]
fn ab_healthy_path_commits_after_the_reboot_then_the_next_upgrade_uses_the_other_slot() {
    let servers = Servers::from_env();
    let fw = servers.put_http("ab-ok", 3 << 20);
    let gw = Gateway::new();
    let req = servers.http_request(&fw);

    // The request: the inactive slot is written, next-boot switched, reboot asked for.
    let first = gw.run(&[&req], &[], None);
    assert_eq!(first.code(), Some(0), "{first}");
    let lines = first.json_lines();
    assert_eq!(lines[0]["result"]["errorNo"], 0, "{first}");
    assert!(
        results(&lines).is_empty(),
        "no result before the reboot: {first}"
    );
    assert!(
        lines
            .iter()
            .any(|v| v["info"]["phase"] == "awaiting_reboot"),
        "progress reports awaiting_reboot: {first}"
    );
    assert_eq!(status(&gw.state)["phase"], "awaiting_reboot");
    assert_eq!(
        gw.reboots(),
        1,
        "the reboot was asked for once, before the agent exited"
    );
    let r = gw.record();
    assert_record(&r, "a", Some("b"), "a");
    assert_eq!(r["tries"], 3, "{r}");
    assert_eq!(r["md5"]["b"], fw.md5.as_str(), "{r}");
    assert!(r["writing"].is_null(), "{r}");
    assert_eq!(
        gw.slot_md5("b"),
        fw.md5,
        "the inactive slot holds the image"
    );
    assert_eq!(
        gw.partial_files(),
        Vec::<String>::new(),
        "the image went into the slot, not the state directory"
    );
    assert_eq!(
        fs::read(gw.slots.join("slot-a")).expect("slot a"),
        OLD_IMAGE,
        "the running slot is untouched"
    );

    // The reboot: the new slot comes up on a trial boot.
    assert_eq!(gw.power_on(None), "b");
    let health = "test \"$FWAGENT_SLOT\" = b && echo health-check-ran";
    let second = gw.run(&[], &["--health-command", health], None);
    assert_eq!(second.code(), Some(0), "{second}");
    assert!(
        second.stderr.contains("health-check-ran"),
        "the health check ran, logged: {second}"
    );
    let lines = second.json_lines();
    let r = results(&lines);
    assert_eq!(r.len(), 1, "{second}");
    assert_eq!(r[0]["result"]["errorNo"], 0, "{second}");
    assert_eq!(r[0]["info"]["phase"], "completed");
    assert_eq!(r[0]["info"]["requestMessageId"], req["messageId"]);
    let rec = gw.record();
    assert_record(&rec, "b", None, "b");
    assert_eq!(rec["tries"], 0, "{rec}");
    assert_eq!(status(&gw.state)["phase"], "completed");
    assert_eq!(gw.reboots(), 1);

    // The result is sent once: a later start says nothing.
    assert_eq!(gw.power_on(None), "b", "committed: b boots from now on");
    let third = gw.run(&[], &[], None);
    assert_eq!(third.code(), Some(0), "{third}");
    assert!(third.json_lines().is_empty(), "{third}");

    // The next upgrade writes slot a, which no longer runs.
    let fw2 = servers.put_http("ab-ok2", 1 << 20);
    let req2 = servers.http_request(&fw2);
    let fourth = gw.run(&[&req2], &[], None);
    assert_eq!(fourth.code(), Some(0), "{fourth}");
    assert_record(&gw.record(), "b", Some("a"), "b");
    assert_eq!(gw.slot_md5("a"), fw2.md5);
    assert_eq!(gw.slot_md5("b"), fw.md5);
    assert_eq!(gw.power_on(None), "a");
    let fifth = gw.run(&[], &[], None);
    let r = results(&fifth.json_lines())
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(r.len(), 1, "{fifth}");
    assert_eq!(r[0]["result"]["errorNo"], 0, "{fifth}");
    assert_record(&gw.record(), "a", None, "a");
}

#[test]
fn ab_new_slot_that_never_boots_falls_back_and_reports_51() {
    let servers = Servers::from_env();
    let fw = servers.put_http("ab-dead", 1 << 20);
    let gw = Gateway::new();
    let first = gw.run(&[&servers.http_request(&fw)], &[], None);
    assert_eq!(first.code(), Some(0), "{first}");
    assert_record(&gw.record(), "a", Some("b"), "a");

    // Slot b dies on each of its three tries; the bootloader falls back to a.
    assert_eq!(gw.power_on(Some(&fw.md5)), "a");
    let r = gw.record();
    assert_record(&r, "a", None, "a");
    assert_eq!(r["tries"], 0, "{r}");

    let second = gw.run(&[], &[], None);
    assert_eq!(second.code(), Some(0), "{second}");
    let res = only_result(&second);
    assert_eq!(res.error_no, 51, "{second}");
    assert_eq!(res.phase, "rolled_back");
    assert!(res.description.contains("fell back"), "{second}");
    assert_eq!(status(&gw.state)["phase"], "rolled_back");
    assert_record(&gw.record(), "a", None, "a");
    assert_eq!(
        fs::read(gw.slots.join("slot-a")).expect("slot a"),
        OLD_IMAGE,
        "the old slot is intact"
    );
    assert_eq!(
        gw.reboots(),
        1,
        "no reboot after a fall-back: the old slot already runs"
    );
}

#[test]
fn ab_failed_health_check_rolls_back_and_reboots_into_the_old_slot() {
    let servers = Servers::from_env();
    let fw = servers.put_http("ab-sick", 1 << 20);
    let gw = Gateway::new();
    let first = gw.run(&[&servers.http_request(&fw)], &[], None);
    assert_eq!(first.code(), Some(0), "{first}");
    assert_eq!(gw.power_on(None), "b");

    let second = gw.run(
        &[],
        &["--health-command", "echo app-not-responding >&2; exit 1"],
        None,
    );
    assert_eq!(second.code(), Some(0), "{second}");
    let res = only_result(&second);
    assert_eq!(res.error_no, 51, "{second}");
    assert_eq!(res.phase, "rolled_back");
    let description = res.description;
    assert!(
        description.contains("health check failed") && description.contains("app-not-responding"),
        "{description}"
    );
    assert_record(&gw.record(), "a", None, "b");
    assert_eq!(
        gw.reboots(),
        2,
        "the agent asked for the reboot back into the old slot"
    );
    assert_eq!(gw.power_on(None), "a");
    let third = gw.run(&[], &["--health-command", "exit 1"], None);
    assert!(
        third.json_lines().is_empty(),
        "nothing more to say: {third}"
    );
}

/// Crash at `point` in the first run (1 MiB checkpoints); then restart,
/// reboot, restart: completed, one result.
fn crash_before_the_reboot_then_complete(servers: &Servers, point: &str) {
    let fw = servers.put_http(&format!("ab-{point}"), 3 << 20);
    let gw = Gateway::new();
    let req = servers.http_request(&fw);
    let checkpoints = ["--checkpoint-bytes", "1048576"];
    let first = gw.run(&[&req], &checkpoints, Some(point));
    assert_eq!(
        first.signal(),
        Some(libc::SIGKILL),
        "{point}: the crash point fired: {first}"
    );
    if let Ok(text) = fs::read_to_string(gw.slots.join("bootctl.json")) {
        let r: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{point}: torn record ({e}): {text}"));
        if point != "after-flash" && point != "before-reboot" {
            assert!(
                r["next"].is_null(),
                "{point}: next-boot switched before the slot was verified: {r}"
            );
        }
    }
    assert_eq!(
        gw.reboots(),
        0,
        "{point}: no reboot before awaiting_reboot is committed"
    );

    let second = gw.run(&[], &[], None);
    assert_eq!(second.code(), Some(0), "{point}: {second}");
    assert_eq!(status(&gw.state)["phase"], "awaiting_reboot", "{point}");
    assert_eq!(gw.reboots(), 1, "{point}");
    assert_record(&gw.record(), "a", Some("b"), "a");
    assert_eq!(gw.slot_md5("b"), fw.md5, "{point}");

    assert_eq!(gw.power_on(None), "b");
    let third = gw.run(&[], &[], None);
    assert_eq!(third.code(), Some(0), "{point}: {third}");
    let lines = all_lines([&first, &second, &third]);
    let res = only_result_among(&lines, &format!("{point}: {lines:#?}"));
    assert_eq!(res.error_no, 0, "{point}: {lines:#?}");
    assert_record(&gw.record(), "b", None, "b");
}

#[test]
fn ab_kill_9_while_the_slot_is_written_or_switched_recovers() {
    let servers = Servers::from_env();
    for point in [
        "mid-download",
        "after-checkpoint-fsync",
        "after-download",
        "mid-verify",
        "after-slot-write",
        "before-switch-rename",
        "after-flash",
        "before-reboot",
    ] {
        crash_before_the_reboot_then_complete(&servers, point);
    }
}

#[test]
fn ab_kill_9_during_the_commit_recovers_and_reports_once_after_it() {
    let servers = Servers::from_env();
    for point in ["mid-health", "before-commit-rename", "after-boot-commit"] {
        let fw = servers.put_http(&format!("ab-{point}"), 1 << 20);
        let gw = Gateway::new();
        let first = gw.run(&[&servers.http_request(&fw)], &[], None);
        assert_eq!(first.code(), Some(0), "{point}: {first}");
        assert_eq!(gw.power_on(None), "b");
        let health = ["--health-command", "sleep 0.2"];
        let second = gw.run(&[], &health, Some(point));
        assert_eq!(
            second.signal(),
            Some(libc::SIGKILL),
            "{point}: the crash point fired: {second}"
        );
        assert!(
            results(&second.json_lines()).is_empty(),
            "{point}: no result before the commit is recorded: {second}"
        );
        let committed = point == "after-boot-commit";
        assert_record(
            &gw.record(),
            if committed { "b" } else { "a" },
            if committed { None } else { Some("b") },
            "b",
        );
        assert_eq!(status(&gw.state)["phase"], "awaiting_reboot", "{point}");

        let third = gw.run(&[], &health, None);
        assert_eq!(third.code(), Some(0), "{point}: {third}");
        let lines = all_lines([&first, &second, &third]);
        let res = only_result_among(&lines, &format!("{point}: {lines:#?}"));
        assert_eq!(res.error_no, 0, "{point}: {lines:#?}");
        assert_record(&gw.record(), "b", None, "b");
        assert_eq!(status(&gw.state)["phase"], "completed", "{point}");
    }
}

#[test]
fn ab_an_image_that_kills_the_agent_on_every_boot_ends_rolled_back() {
    let servers = Servers::from_env();
    let fw = servers.put_http("ab-killer", 1 << 20);
    let gw = Gateway::new();
    let first = gw.run(&[&servers.http_request(&fw)], &[], None);
    assert_eq!(first.code(), Some(0), "{first}");
    // The new image boots, but the agent dies before it can commit, boot after boot.
    let mut runs = 0;
    loop {
        let slot = gw.power_on(None);
        runs += 1;
        assert!(runs <= 8, "no end after {runs} boots: {}", gw.record());
        if slot == "a" {
            break;
        }
        let run = gw.run(&[], &[], Some("before-commit-rename"));
        assert_eq!(run.signal(), Some(libc::SIGKILL), "{run}");
    }
    assert_eq!(runs, 4, "three trial boots, then the old slot");
    let last = gw.run(&[], &[], None);
    assert_eq!(last.code(), Some(0), "{last}");
    let res = only_result(&last);
    assert_eq!(res.error_no, 51, "{last}");
    assert_eq!(res.phase, "rolled_back", "{last}");
    assert_record(&gw.record(), "a", None, "a");
}

#[test]
fn ab_a_reboot_that_never_happens_ends_failed_not_in_a_loop() {
    let servers = Servers::from_env();
    let fw = servers.put_http("ab-noreboot", 1 << 20);
    let gw = Gateway::new();
    // One try: the agent gives up after 1 + 2 starts in awaiting_reboot.
    let args = ["--boot-tries", "1"];
    let first = gw.run(&[&servers.http_request(&fw)], &args, None);
    assert_eq!(first.code(), Some(0), "{first}");
    let mut runs = Vec::new();
    loop {
        let run = gw.run(&[], &args, None);
        assert_eq!(run.code(), Some(0), "{run}");
        let done = !results(&run.json_lines()).is_empty();
        runs.push(run);
        if done {
            break;
        }
        assert!(runs.len() < 10, "no end after {} starts", runs.len());
    }
    assert_eq!(
        runs.len(),
        4,
        "three boot checks, then the fourth start gives up"
    );
    assert_eq!(gw.reboots(), 4, "every check asked for the reboot again");
    let last = runs.last().expect("a run");
    let res = only_result(last);
    assert_eq!(res.error_no, 51, "{last}");
    assert_eq!(res.phase, "failed", "{last}");
    // The trial is taken back: the device never boots what was reported failed.
    let r = gw.record();
    assert_record(&r, "a", None, "a");
    assert!(r["trial"].is_null(), "{r}");
    assert_eq!(gw.power_on(None), "a");
}

/// Issue 16, item 7: the trial slot boots, but the agent on it dies at
/// every check and is restarted on the same boot (a service manager's
/// restart) until the checks run out. The 51 then means rolled back: the
/// trial is withdrawn and the reboot into the good slot is asked for, and
/// the next upgrade starts from the good slot.
#[test]
fn ab_boot_checks_run_out_on_the_trial_slot_and_it_reboots_into_the_good_one() {
    let servers = Servers::from_env();
    let fw = servers.put_http("ab-stuck-on-trial", 1 << 20);
    let gw = Gateway::new();
    let args = ["--boot-tries", "1"];
    let first = gw.run(&[&servers.http_request(&fw)], &args, None);
    assert_eq!(first.code(), Some(0), "{first}");
    assert_eq!(gw.reboots(), 1, "{first}");
    assert_eq!(gw.power_on(None), "b", "the trial boots");
    let mut runs = 0;
    let last = loop {
        let run = gw.run(&[], &args, Some("before-commit-rename"));
        runs += 1;
        assert!(runs < 10, "no end after {runs} starts: {}", gw.record());
        if run.signal() != Some(libc::SIGKILL) {
            break run;
        }
    };
    assert_eq!(last.code(), Some(0), "{last}");
    let res = only_result(&last);
    assert_eq!(res.error_no, 51, "{last}");
    assert_eq!(
        gw.reboots(),
        2,
        "the reboot out of the rejected slot: {last}"
    );
    let r = gw.record();
    assert_record(&r, "a", None, "b");
    assert!(r["trial"].is_null(), "{r}");
    assert_eq!(gw.power_on(None), "a", "back on the good slot");

    // The next upgrade writes the other slot again and completes.
    let fw2 = servers.put_http("ab-after-stuck", 1 << 20);
    let run = gw.run(&[&servers.http_request(&fw2)], &args, None);
    assert_eq!(run.code(), Some(0), "{run}");
    assert_eq!(gw.power_on(None), "b");
    let run = gw.run(&[], &args, None);
    let res = only_result(&run);
    assert_eq!(
        (res.error_no, res.phase.as_str()),
        (0, "completed"),
        "{run}"
    );
}

#[test]
fn ab_without_a_reboot_command_agent_restarts_before_the_reboot_do_not_count() {
    let servers = Servers::from_env();
    let fw = servers.put_http("ab-later", 1 << 20);
    let gw = Gateway::new();
    // Someone else reboots (a maintenance window): `--reboot-command ""`.
    let args = ["--boot-tries", "1", "--reboot-command", ""];
    let first = gw.run(&[&servers.http_request(&fw)], &args, None);
    assert_eq!(first.code(), Some(0), "{first}");
    // Far more restarts than the boot checks allowed (1 + 2).
    for start in 0..8 {
        let run = gw.run(&[], &args, None);
        assert_eq!(run.code(), Some(0), "start {start}: {run}");
        assert!(
            results(&run.json_lines()).is_empty(),
            "start {start}: {run}"
        );
        assert_eq!(status(&gw.state)["phase"], "awaiting_reboot");
    }
    assert_eq!(gw.reboots(), 0, "the agent never asked for a reboot");
    assert_record(&gw.record(), "a", Some("b"), "a");
    // The reboot, at last.
    assert_eq!(gw.power_on(None), "b");
    let last = gw.run(&[], &args, None);
    assert_eq!(only_result(&last).error_no, 0, "{last}");
    assert_record(&gw.record(), "b", None, "b");
}

#[test]
fn ab_slots_can_be_block_devices_named_in_slots_toml() {
    let servers = Servers::from_env();
    let fw = servers.put_http("ab-devices", 1 << 20);
    let gw = Gateway::new();
    let devices = gw.slots.parent().expect("parent").join("dev");
    fs::create_dir(&devices).expect("mkdir");
    fs::write(devices.join("p2"), OLD_IMAGE).expect("write p2");
    fs::write(
        gw.slots.join("slots.toml"),
        format!(
            "a = \"{}\"\nb = \"{}\"\n",
            devices.join("p2").display(),
            devices.join("p3").display()
        ),
    )
    .expect("write slots.toml");
    let first = gw.run(&[&servers.http_request(&fw)], &[], None);
    assert_eq!(first.code(), Some(0), "{first}");
    assert_eq!(md5_file(&devices.join("p3")), fw.md5);
    assert_eq!(fs::read(devices.join("p2")).expect("p2"), OLD_IMAGE);
    assert!(!gw.slots.join("slot-b").exists());
}

#[test]
fn ab_the_image_streams_into_the_inactive_slot_while_it_downloads() {
    let servers = Servers::from_env();
    // 4 MiB at 1 MB/s: about four seconds of download to look at.
    let fw = servers.put_http("ab-stream", 4 << 20);
    let gw = Gateway::new();
    let mut req = servers.http_request(&fw);
    req["info"]["serverConfig"]["path"] = "/slow/".into();
    let mut child = gw
        .command(&["--checkpoint-bytes", "1048576"], None)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn fwagent");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{req}").expect("write the request");
    }
    let slot_b = gw.slots.join("slot-b");
    wait_until(Duration::from_secs(60), "slot b half written", || {
        fs::metadata(&slot_b).is_ok_and(|m| m.len() >= 2 << 20)
    });
    // Mid-download: the bytes are in the slot, nothing points at it yet.
    let job = status(&gw.state);
    assert_eq!(job["phase"], "downloading", "{job}");
    let r = gw.record();
    assert_record(&r, "a", None, "a");
    assert!(r["md5"]["b"].is_null() && r["trial"].is_null(), "{r}");
    assert_eq!(r["writing"]["slot"], "b", "{r}");
    assert_eq!(r["writing"]["md5"], fw.md5.as_str(), "{r}");
    assert_eq!(r["writing"]["size"], fw.len, "{r}");
    assert_eq!(gw.partial_files(), Vec::<String>::new());
    let written = fs::metadata(&slot_b).expect("slot b").len();
    assert!(written < fw.len, "still downloading: {written}");
    let prefix = fs::read(&slot_b).expect("read slot b");
    assert_eq!(
        prefix[..],
        fw.bytes()[..prefix.len()],
        "the slot holds the image's first bytes"
    );

    let out = child.wait_with_output().expect("wait for fwagent");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(status(&gw.state)["phase"], "awaiting_reboot");
    let r = gw.record();
    assert_record(&r, "a", Some("b"), "a");
    assert!(r["writing"].is_null(), "the note goes with the switch: {r}");
    assert_eq!(gw.slot_md5("b"), fw.md5);
    assert_eq!(fs::read(gw.slots.join("slot-a")).expect("a"), OLD_IMAGE);
}

#[test]
fn ab_a_bad_image_in_the_slot_is_never_made_bootable() {
    let servers = Servers::from_env();
    let fw = servers.put_http("ab-bad", 1 << 20);
    let gw = Gateway::new();
    let mut req = servers.http_request(&fw);
    req["info"]["fileInfo"]["md5sum"] = "0123456789abcdef0123456789abcdef".into();
    let run = gw.run(&[&req], &[], None);
    assert_eq!(run.code(), Some(0), "{run}");
    assert_eq!(only_result(&run).error_no, 31, "{run}");
    let r = gw.record();
    assert_record(&r, "a", None, "a");
    assert!(r["md5"]["b"].is_null() && r["trial"].is_null(), "{r}");
    assert!(
        r["writing"].is_null(),
        "the note goes with the upgrade: {r}"
    );
    assert_eq!(fs::read(gw.slots.join("slot-a")).expect("a"), OLD_IMAGE);
    assert_eq!(gw.reboots(), 0);
}

#[test]
fn ab_kill_9_at_random_moments_resumes_the_slot_from_its_checkpoint() {
    let servers = Servers::from_env();
    let size: u64 = 64 << 20;
    let checkpoint: u64 = 4 << 20;
    let fw = servers.put_http("ab-kill9", size);
    let mut req = servers.http_request(&fw);
    req["info"]["serverConfig"]["path"] = "/slow8m/".into();
    let gw = Gateway::new();
    let checkpoint_flag = checkpoint.to_string();
    let args = gw.args(&[
        "--checkpoint-bytes",
        &checkpoint_flag,
        "--download-attempts",
        "100",
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let kills: u64 = 20;
    let job = kill_rounds(&gw.state, &gw.flash(), &args, &req, kills);
    assert_eq!(job["phase"], "awaiting_reboot", "{job}");
    assert_eq!(gw.slot_md5("b"), fw.md5, "the slot holds the image");
    assert_record(&gw.record(), "a", Some("b"), "a");
    assert_eq!(gw.partial_files(), Vec::<String>::new());
    // Resumed, not restarted: at most one checkpoint's worth (plus what the
    // socket buffers held) is fetched again per kill.
    let sent = servers.nginx_body_bytes_sent(&fw.uri("/slow8m/"));
    let bound = size + kills * (checkpoint + (4 << 20));
    eprintln!("nginx sent {sent} bytes for a {size}-byte image over {kills} kills");
    assert!(
        sent <= bound,
        "{sent} > {bound}: a kill restarted from zero"
    );
    assert_eq!(gw.power_on(None), "b");
    let last = gw.run(&[], &[], None);
    let res = results(&last.json_lines()).len();
    assert_eq!(res, 1, "{last}");
    assert_record(&gw.record(), "b", None, "b");
}

/// Two loop devices, detached on drop.
struct LoopDevices(Vec<String>);

impl LoopDevices {
    /// Attach a loop device to each backing file (`losetup` needs root, as
    /// `make test` has).
    fn attach(files: &[&Path]) -> LoopDevices {
        let mut devices = LoopDevices(Vec::new());
        for file in files {
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .arg(file)
                .output()
                .expect("run losetup");
            assert!(
                out.status.success(),
                "losetup failed (this test needs root and loop devices, as `make test` has): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            devices
                .0
                .push(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        devices
    }
}

impl Drop for LoopDevices {
    fn drop(&mut self) {
        for dev in &self.0 {
            let _ = std::process::Command::new("losetup")
                .args(["--detach", dev])
                .status();
        }
    }
}

#[test]
fn ab_slots_on_real_block_devices_take_the_stream_and_keep_their_size() {
    let servers = Servers::from_env();
    let gw = Gateway::new();
    let device_size: u64 = 8 << 20;
    let (_loops, _p2, p3) = loop_slots(&gw, device_size);

    // Bigger than the slot: refused with the ack, before any byte is fetched.
    let big = servers.put_http("ab-dev-big", device_size + 1);
    let run = gw.run(&[&servers.http_request(&big)], &[], None);
    let lines = run.json_lines();
    assert_eq!(lines[0]["result"]["errorNo"], 7, "no room: {run}");
    assert!(servers.nginx_requests(&big.uri("/")).is_empty(), "{run}");

    // Killed once a checkpoint is committed, resumed into the device,
    // verified from it. (Not `mid-download`: on a loaded machine the kill at
    // half the image can come before any checkpoint's commit, and the
    // resume is then rightly from 0.)
    let fw = servers.put_http("ab-dev", 5 << 20);
    let req = servers.http_request(&fw);
    let first = gw.run(
        &[&req],
        &["--checkpoint-bytes", "1048576"],
        Some("after-checkpoint"),
    );
    assert_eq!(first.signal(), Some(libc::SIGKILL), "{first}");
    let second = gw.run(&[], &["--checkpoint-bytes", "1048576"], None);
    assert_eq!(second.code(), Some(0), "{second}");
    assert_eq!(status(&gw.state)["phase"], "awaiting_reboot");
    let resumed_at: u64 = second
        .stderr
        .split("download resumed at byte ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume logged: {second}"));
    assert!(resumed_at > 0, "resumed from its checkpoint: {second}");
    let dev = fs::read(&p3).expect("read slot b's backing file");
    assert_eq!(dev.len() as u64, device_size, "a device keeps its size");
    assert_eq!(
        dev[..fw.len as usize],
        fw.bytes()[..],
        "slot b holds the image"
    );
    assert!(
        dev[fw.len as usize..].iter().all(|&b| b == 0),
        "nothing past it"
    );
    assert_record(&gw.record(), "a", Some("b"), "a");
}

/// Slots a and b on two fresh loop devices of `size` bytes, named in slots.toml.
fn loop_slots(gw: &Gateway, size: u64) -> (LoopDevices, PathBuf, PathBuf) {
    let backing = gw.slots.parent().expect("parent").join("disks");
    fs::create_dir_all(&backing).expect("mkdir");
    let (p2, p3) = (backing.join("p2.img"), backing.join("p3.img"));
    for p in [&p2, &p3] {
        let f = fs::File::create(p).expect("create backing file");
        f.set_len(size).expect("size backing file");
    }
    let loops = LoopDevices::attach(&[&p2, &p3]);
    fs::write(
        gw.slots.join("slots.toml"),
        format!("a = \"{}\"\nb = \"{}\"\n", loops.0[0], loops.0[1]),
    )
    .expect("write slots.toml");
    (loops, p2, p3)
}

#[test]
fn ab_never_resumes_a_slot_over_an_offset_that_another_flash_target_made() {
    let servers = Servers::from_env();
    let gw = Gateway::new();
    let (_loops, _p2, p3) = loop_slots(&gw, 8 << 20);
    let fw = servers.put_http("ab-switch", 5 << 20);
    let req = servers.http_request(&fw);
    let target = gw.slots.parent().expect("parent").join("flash.bin");
    let crash = |flash: &str, checkpoint: &str, input: &str| {
        let args = gw.args(&["--checkpoint-bytes", checkpoint]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = stdio_agent(&gw.state, flash, &args);
        cmd.env("FWAGENT_CRASH_AT", "after-checkpoint");
        let run = run_with_timeout(cmd, input.as_bytes(), LONG);
        assert_eq!(run.signal(), Some(libc::SIGKILL), "{run}");
    };
    // 1 MiB durable in slot b; then, under file:, 3 MiB durable in the
    // partial file; then ab: again. Resuming slot b at 3 MiB would splice
    // (only its first MiB is the image): it must start over.
    crash(&gw.flash(), "1048576", &format!("{req}\n"));
    crash(&file_flash(&target), "3145728", "");
    assert_eq!(status(&gw.state)["phase"], "downloading");
    let last = gw.run(&[], &[], None);
    assert_eq!(last.code(), Some(0), "{last}");
    assert_eq!(status(&gw.state)["phase"], "awaiting_reboot", "{last}");
    let dev = fs::read(&p3).expect("read slot b's backing file");
    assert_eq!(
        dev[..fw.len as usize],
        fw.bytes()[..],
        "slot b holds the image"
    );
    assert_eq!(
        gw.partial_files(),
        Vec::<String>::new(),
        "the partial file is gone"
    );
    assert!(unflashed(&target), "file: never got as far as flashing");
}

#[test]
fn ab_power_lost_after_the_switch_but_before_its_commit_still_completes() {
    let servers = Servers::from_env();
    let fw = servers.put_http("ab-early-boot", 1 << 20);
    let gw = Gateway::new();
    let first = gw.run(&[&servers.http_request(&fw)], &[], Some("after-flash"));
    assert_eq!(first.signal(), Some(libc::SIGKILL), "{first}");
    assert_eq!(status(&gw.state)["phase"], "flashing");
    assert_eq!(gw.reboots(), 0);
    // The board resets and the bootloader takes the trial the record offers.
    assert_eq!(gw.power_on(None), "b");
    let second = gw.run(&[], &[], None);
    assert_eq!(second.code(), Some(0), "{second}");
    let lines = all_lines([&first, &second]);
    let res = only_result_among(&lines, &second);
    assert_eq!(res.error_no, 0, "{second}");
    assert_record(&gw.record(), "b", None, "b");
    assert_eq!(gw.reboots(), 0, "no reboot: the new slot already ran");
}

#[test]
fn a_trial_left_by_an_upgrade_that_is_no_longer_under_way_is_withdrawn_at_start() {
    let gw = Gateway::new();
    // As an agent that died between an upgrade's failure and its cleanup
    // would leave it: the trial still offered to the bootloader.
    let md5 = "0123456789abcdef0123456789abcdef";
    let record = serde_json::json!({
        "version": 1, "active": "a", "next": "b", "tries": 3, "booted": "a",
        "md5": {"a": null, "b": md5}, "trial": {"slot": "b", "md5": md5},
        "writing": null,
    });
    fs::write(gw.slots.join("bootctl.json"), format!("{record}\n")).expect("write record");
    let run = gw.run(&[], &[], None);
    assert_eq!(run.code(), Some(0), "{run}");
    let r = gw.record();
    assert_record(&r, "a", None, "a");
    assert!(r["trial"].is_null(), "{r}");
    assert_eq!(r["md5"]["b"], md5, "the slot's bytes are still known: {r}");
    assert_eq!(gw.power_on(None), "a");
}

// ---------------------------------------------------------------- command:

/// `fwagent run --flash command:CMD` over stdio, fed `requests` then EOF.
fn run_installer(
    state: &Path,
    cmd: &str,
    requests: &[&Value],
    extra: &[&str],
    crash_at: Option<&str>,
) -> Run {
    let mut c = installer_agent(state, cmd, extra);
    if let Some(point) = crash_at {
        c.env("FWAGENT_CRASH_AT", point);
    }
    let input: String = requests.iter().map(|r| format!("{r}\n")).collect();
    run_with_timeout(c, input.as_bytes(), LONG)
}

/// `fwagent run --flash command:CMD` over stdio, not started yet.
fn installer_agent(state: &Path, cmd: &str, extra: &[&str]) -> std::process::Command {
    let mut c = fwagent(["run", "--transport", "stdio", "--state-dir"]);
    c.arg(state)
        .arg("--flash")
        .arg(format!("command:{cmd}"))
        .args(extra);
    c
}

fn q(p: &Path) -> String {
    format!("'{}'", p.display())
}

#[test]
fn command_installer_that_succeeds_completes_with_its_output_in_the_log() {
    let servers = Servers::from_env();
    let fw = servers.put_http("cmd-ok", 1 << 20);
    let dir = temp_dir();
    let target = dir.path().join("installed.bin");
    let cmd = format!(
        "cp {{image}} {} && echo installer-stdout-line && echo installer-stderr-line >&2",
        q(&target)
    );
    let run = run_installer(
        &dir.path().join("state"),
        &cmd,
        &[&servers.http_request(&fw)],
        &[],
        None,
    );
    assert_eq!(run.code(), Some(0), "{run}");
    let res = only_result(&run); // every stdout line is protocol JSON
    assert_eq!(res.error_no, 0, "{run}");
    assert_eq!(res.phase, "completed");
    assert_eq!(md5_file(&target), fw.md5);
    assert!(
        run.stderr.contains("installer-stdout-line")
            && run.stderr.contains("installer-stderr-line"),
        "{run}"
    );
    assert!(
        !run.stdout.contains("installer-"),
        "installer output never reaches stdout: {run}"
    );
}

#[test]
fn command_installer_that_fails_gives_50() {
    let servers = Servers::from_env();
    let fw = servers.put_http("cmd-fail", 100_000);
    let dir = temp_dir();
    let cmd = "echo bundle-signature-invalid >&2; exit 3 # {image}";
    let run = run_installer(
        &dir.path().join("state"),
        cmd,
        &[&servers.http_request(&fw)],
        &[],
        None,
    );
    assert_eq!(run.code(), Some(0), "{run}");
    let res = only_result(&run);
    assert_eq!(res.error_no, 50, "{run}");
    assert_eq!(res.phase, "failed");
    let description = res.description;
    assert!(
        description.contains("exit status 3") && description.contains("bundle-signature-invalid"),
        "{description}"
    );
}

#[test]
fn command_installer_that_hangs_is_killed_at_the_timeout_with_50() {
    let servers = Servers::from_env();
    let fw = servers.put_http("cmd-hang", 100_000);
    let dir = temp_dir();
    let pidfile = dir.path().join("sleep.pid");
    let cmd = format!("sleep 600 & echo $! > {}; wait # {{image}}", q(&pidfile));
    let started = Instant::now();
    let run = run_installer(
        &dir.path().join("state"),
        &cmd,
        &[&servers.http_request(&fw)],
        &["--install-timeout", "2"],
        None,
    );
    assert_eq!(run.code(), Some(0), "{run}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "bounded by the timeout"
    );
    let res = only_result(&run);
    assert_eq!(res.error_no, 50, "{run}");
    assert!(res.description.contains("timed out after 2 s"), "{run}");
    let pid: i32 = fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    wait_until(
        Duration::from_secs(5),
        "the installer's children to be killed",
        || !alive(pid),
    );
}

#[test]
fn command_installer_interrupted_by_a_crash_is_run_again_on_restart() {
    let servers = Servers::from_env();
    let fw = servers.put_http("cmd-crash", 1 << 20);
    let dir = temp_dir();
    let state = dir.path().join("state");
    let target = dir.path().join("installed.bin");
    let log = dir.path().join("installer.log");
    let cmd = format!(
        "echo start >> {log}; sleep 1; cp {{image}} {t} && echo done >> {log}",
        log = q(&log),
        t = q(&target)
    );
    let first = run_installer(
        &state,
        &cmd,
        &[&servers.http_request(&fw)],
        &[],
        Some("mid-install"),
    );
    assert_eq!(first.signal(), Some(libc::SIGKILL), "{first}");
    // The installer dies with the agent: nothing finishes behind the restart's back.
    std::thread::sleep(Duration::from_millis(1500));
    let before = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !before.contains("done"),
        "the orphaned installer went on: {before}"
    );
    let second = run_installer(&state, &cmd, &[], &[], None);
    assert_eq!(second.code(), Some(0), "{second}");
    let lines = all_lines([&first, &second]);
    let res = only_result_among(&lines, &format!("{lines:#?}"));
    assert_eq!(res.error_no, 0, "{lines:#?}");
    assert_eq!(md5_file(&target), fw.md5);
    let after = fs::read_to_string(&log).expect("installer log");
    assert_eq!(after.matches("done").count(), 1, "{after}");
}

#[test]
fn command_installer_that_kills_the_agent_ends_failed_not_in_a_loop() {
    let servers = Servers::from_env();
    let fw = servers.put_http("cmd-killer", 100_000);
    let dir = temp_dir();
    let state = dir.path().join("state");
    // `$PPID` of the installer's shell is the agent.
    let cmd = "kill -9 $PPID # {image}";
    let req = servers.http_request(&fw);
    let mut runs = vec![run_installer(&state, cmd, &[&req], &[], None)];
    while runs.last().map(|r| r.signal()) == Some(Some(libc::SIGKILL)) {
        assert!(runs.len() < 10, "no end after {} runs", runs.len());
        runs.push(run_installer(&state, cmd, &[], &[], None));
    }
    let last = runs.last().expect("a run");
    assert_eq!(last.code(), Some(0), "{last}");
    assert_eq!(
        runs.len(),
        4,
        "three flash attempts, then the fourth start gives up"
    );
    let res = only_result(last);
    assert_eq!(res.error_no, 50, "{last}");
    assert_eq!(res.phase, "failed");
}

/// Issue 16, item 6: an installer whose shell dies with the agent may
/// leave the real work running (a wrapper script's child, a subshell).
/// The next start ends it before anything else: never two installers on
/// one partition. Here the first run's installer forks a slow writer, then
/// kills the agent; without the installer lock the writer finished after
/// the second run's installer had already run.
#[test]
fn command_installer_left_running_by_a_dead_agent_is_ended_before_the_next_one() {
    let servers = Servers::from_env();
    let fw = servers.put_http("cmd-orphan", 100_000);
    let dir = temp_dir();
    let state = dir.path().join("state");
    let log = dir.path().join("installer.log");
    let marker = dir.path().join("first-run");
    let cmd = format!(
        "if [ ! -e {m} ]; then touch {m}; \
           (sleep 2; echo orphan-wrote >> {log}) & \
           sleep 0.3; kill -9 $PPID; wait; \
         fi; echo second-installer >> {log} # {{image}}",
        m = q(&marker),
        log = q(&log),
    );
    let first = run_installer(&state, &cmd, &[&servers.http_request(&fw)], &[], None);
    assert_eq!(first.signal(), Some(libc::SIGKILL), "{first}");
    let second = run_installer(&state, &cmd, &[], &[], None);
    assert_eq!(second.code(), Some(0), "{second}");
    let res = only_result(&second);
    assert_eq!(res.error_no, 0, "{second}");
    // Past the moment the orphan would have written.
    std::thread::sleep(Duration::from_secs(3));
    let text = fs::read_to_string(&log).expect("installer log");
    assert_eq!(
        text, "second-installer\n",
        "the first installer went on beside the second"
    );
    assert!(
        second.stderr.contains("ending its process group"),
        "the ending is logged: {second}"
    );
}

/// `command:` + `--commit-command`: after the installer the agent asks for
/// the reboot and reports nothing final; a restart on the same boot asks
/// again; the first start on a new boot runs the commit command, and only
/// then is the result 0 reported.
#[test]
fn command_installer_with_a_commit_command_completes_only_after_the_reboot() {
    let servers = Servers::from_env();
    let fw = servers.put_http("cmd-commit", 100_000);
    let dir = temp_dir();
    let state = dir.path().join("state");
    let target = dir.path().join("installed.bin");
    let commits = dir.path().join("commits");
    let reboots = dir.path().join("reboots");
    let cmd = format!("cp {{image}} {}", q(&target));
    let commit = format!("echo \"$FWAGENT_MD5\" >> {}", q(&commits));
    let reboot = format!("echo reboot >> {}", q(&reboots));
    let args = ["--commit-command", &commit, "--reboot-command", &reboot];
    let on = |boot: &str, requests: &[&Value]| {
        let mut c = installer_agent(&state, &cmd, &args);
        c.env("FWAGENT_BOOT_ID", boot);
        let input: String = requests.iter().map(|r| format!("{r}\n")).collect();
        run_with_timeout(c, input.as_bytes(), LONG)
    };
    let lines = |path: &Path| {
        fs::read_to_string(path)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let first = on("boot-1", &[&servers.http_request(&fw)]);
    assert_eq!(first.code(), Some(0), "{first}");
    assert!(
        results(&first.json_lines()).is_empty(),
        "no result before the reboot: {first}"
    );
    assert_eq!(md5_file(&target), fw.md5, "installed");
    assert_eq!((lines(&reboots), lines(&commits)), (1, 0), "{first}");
    assert_eq!(status(&state)["phase"], "awaiting_reboot");
    // The agent restarted, the machine did not: no commit, the reboot asked again.
    let again = on("boot-1", &[]);
    assert!(results(&again.json_lines()).is_empty(), "{again}");
    assert_eq!((lines(&reboots), lines(&commits)), (2, 0), "{again}");
    let after = on("boot-2", &[]);
    assert_eq!(after.code(), Some(0), "{after}");
    let res = only_result(&after);
    assert_eq!(
        (res.error_no, res.phase.as_str()),
        (0, "completed"),
        "{after}"
    );
    assert_eq!(
        fs::read_to_string(&commits).expect("commits"),
        format!("{}\n", fw.md5)
    );
    assert_eq!(lines(&reboots), 2, "no reboot after the commit");
}

#[test]
fn command_commit_command_that_fails_after_the_reboot_gives_51() {
    let servers = Servers::from_env();
    let fw = servers.put_http("cmd-nocommit", 100_000);
    let dir = temp_dir();
    let state = dir.path().join("state");
    let args = [
        "--commit-command",
        "echo mark-good-refused >&2; exit 2",
        "--reboot-command",
        "true",
    ];
    let mut first = installer_agent(&state, "true # {image}", &args);
    first.env("FWAGENT_BOOT_ID", "boot-1");
    let input = format!("{}\n", servers.http_request(&fw));
    let first = run_with_timeout(first, input.as_bytes(), LONG);
    assert!(results(&first.json_lines()).is_empty(), "{first}");
    let mut after = installer_agent(&state, "true # {image}", &args);
    after.env("FWAGENT_BOOT_ID", "boot-2");
    let after = run_with_timeout(after, b"", LONG);
    let res = only_result(&after);
    assert_eq!(
        (res.error_no, res.phase.as_str()),
        (51, "failed"),
        "{after}"
    );
    assert!(
        res.description.contains("exit status 2") && res.description.contains("mark-good-refused"),
        "{}",
        res.description
    );
}

/// Issue 16, item 6: a reboot command that fails is asked again with a
/// backoff within the same run, and after the last try the upgrade ends
/// (51) with the boot switch taken back: the device never boots an image
/// that was reported failed.
#[test]
fn ab_a_failing_reboot_command_is_retried_then_ends_with_the_switch_taken_back() {
    let servers = Servers::from_env();
    let fw = servers.put_http("ab-rebootfail", 1 << 20);
    let gw = Gateway::new();
    let tries = gw.reboots.display().to_string();
    let reboot = format!("echo try >> '{tries}'; echo reboot-refused >&2; exit 1");
    let args = ["--reboot-command", &reboot, "--retry-base-ms", "50"];
    let run = gw.run(&[&servers.http_request(&fw)], &args, None);
    assert_eq!(run.code(), Some(0), "{run}");
    assert_eq!(gw.reboots(), 5, "five tries: {run}");
    let res = only_result(&run);
    assert_eq!((res.error_no, res.phase.as_str()), (51, "failed"), "{run}");
    assert!(
        res.description.contains("failed 5 times") && res.description.contains("reboot-refused"),
        "{}",
        res.description
    );
    let r = gw.record();
    assert_record(&r, "a", None, "a");
    assert!(r["trial"].is_null(), "{r}");
    assert_eq!(gw.power_on(None), "a");
}
