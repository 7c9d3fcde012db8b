//! A card that lies: every write is acknowledged, some bytes never reach the
//! medium, and the kernel keeps the written pages cached, so a read-back
//! through the page cache sees the image while the medium holds something
//! else. `scripts/lyingfs.py` is that card, a FUSE file system over a
//! directory of the test's own (the "medium"), mounted for each test and
//! unmounted at its end even when it fails.
//!
//! Shown: `--flash file:` on such a card ends in result 50 (never 0), and so
//! does `--flash ab:` with its slots there, next-boot never switched to the
//! slot; on an honest card both complete, and with `ab:` the slot file the
//! download created is made durable in its directory (fsyncdir) before the
//! record points next-boot at it. A card whose fsync fails (EIO) under the
//! store stops the agent with exit 3, sending nothing of the failed commit.
//!
//! Needs root, /dev/fuse and fusepy for /usr/bin/python3 (Debian's
//! python3-fusepy, which `scripts/test-servers.sh start` installs), and the
//! test servers (nginx serves the images). Without them the tests fail,
//! saying what is missing: they never pass by doing nothing.

mod common;

use common::*;
use serde_json::Value;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);
/// The images: 4 MiB, the card loses what is written at 1 MiB..1.5 MiB.
const IMAGE: u64 = 4 << 20;
const LOST: (u64, u64) = (1 << 20, 3 << 19);
/// A range no image reaches: an honest card.
const HONEST: (u64, u64) = (1 << 40, (1 << 40) + 1);

/// The Python that has fusepy (Debian's module `fusepy`).
fn python() -> String {
    std::env::var("FWAGENT_TEST_FUSE_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into())
}

/// `scripts/lyingfs.py` mounted on `DIR/mnt` over `DIR/medium`.
struct LyingFs {
    dir: tempfile::TempDir,
    child: Child,
    mounted: bool,
}

impl LyingFs {
    fn mount(lost: (u64, u64)) -> LyingFs {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: these tests need FUSE (and root, as `make test` has)"
        );
        let dir = temp_dir();
        for sub in ["medium", "mnt"] {
            fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lyingfs.py");
        let ready = dir.path().join("ready");
        let child = Command::new(python())
            .arg(&script)
            .arg(dir.path().join("medium"))
            .arg(dir.path().join("mnt"))
            .arg("--drop")
            .arg(format!("{}:{}", lost.0, lost.1))
            .arg("--log")
            .arg(dir.path().join("ops.log"))
            .arg("--ready")
            .arg(&ready)
            .arg("--fail-fsync-while")
            .arg(dir.path().join("fail-fsync"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("fuse.err")).expect("create fuse.err"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} {}: {e}", python(), script.display()));
        let mut fs = LyingFs {
            dir,
            child,
            mounted: false,
        };
        let mnt = fs.mnt();
        wait_until(Duration::from_secs(30), "the lying FUSE mount", || {
            if let Ok(Some(status)) = fs.child.try_wait() {
                let err = fs::read_to_string(fs.dir.path().join("fuse.err")).unwrap_or_default();
                panic!(
                    "lyingfs.py exited with {status} (python3-fusepy for {} and root are needed; \
                     scripts/test-servers.sh start installs it): {err}",
                    python()
                );
            }
            ready.exists() && is_mount(&mnt)
        });
        fs.mounted = true;
        fs
    }

    /// Where the agent writes.
    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// What the card really holds under `rel`.
    fn medium(&self, rel: &str) -> PathBuf {
        self.dir.path().join("medium").join(rel)
    }

    /// The operations log (`create PATH`, `rename OLD NEW`, `fsyncdir PATH`...).
    fn ops(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("ops.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// From now on every fsync on the card fails with EIO (`on`), or works.
    fn fail_fsync(&self, on: bool) {
        let flag = self.dir.path().join("fail-fsync");
        match on {
            true => fs::write(&flag, b"").expect("the fsync switch"),
            false => fs::remove_file(&flag).expect("the fsync switch"),
        }
    }

    /// A state directory beside the card, on the ordinary disk.
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

impl Drop for LyingFs {
    fn drop(&mut self) {
        if self.mounted {
            let mnt = self.mnt();
            let umount = |args: &[&str]| {
                Command::new("umount")
                    .args(args)
                    .arg(&mnt)
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !umount(&[]) && !umount(&["-l"]) {
                eprintln!("could not unmount {}", mnt.display());
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_mount(dir: &Path) -> bool {
    let want = dir.to_string_lossy().into_owned();
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

/// The result reports of several runs, as (errorNo, description).
fn result_numbers(runs: &[&Run]) -> Vec<(u64, String)> {
    results(&all_lines(runs.iter().copied()))
        .into_iter()
        .map(|r| {
            (
                r["result"]["errorNo"].as_u64().unwrap_or(u64::MAX),
                r["result"]["description"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

#[test]
fn file_target_on_a_card_that_drops_writes_is_result_50() {
    let servers = Servers::from_env();
    let fw = servers.put_http("lying-file", IMAGE);
    let card = LyingFs::mount(LOST);
    let target = card.mnt().join("flash.bin");
    fs::write(&target, b"").expect("the target exists (an empty partition)");

    let run = run_stdio_upgrade(
        &card.state(),
        &target,
        &[servers.http_request(&fw)],
        &no_env(),
        LIMIT,
    );
    assert_eq!(run.code(), Some(0), "{run}");
    let medium = md5_file(&card.medium("flash.bin"));
    assert_ne!(medium, fw.md5, "the card lost bytes: the test's premise");
    let r = only_result(&run);
    assert_eq!(
        (r.error_no, r.phase.as_str()),
        (50, "failed"),
        "the medium holds md5 {medium}, not the image {}: {}\n{run}",
        fw.md5,
        r.description
    );
    assert!(
        r.description.contains("read-back") && r.description.contains(&medium),
        "says the read-back differs and what it read: {}",
        r.description
    );
}

#[test]
fn file_target_on_an_honest_card_completes() {
    let servers = Servers::from_env();
    let fw = servers.put_http("honest-file", IMAGE);
    let card = LyingFs::mount(HONEST);
    let target = card.mnt().join("flash.bin");
    fs::write(&target, b"old").expect("the target exists");
    let req = servers.http_request(&fw);
    let run = run_stdio_upgrade(
        &card.state(),
        &target,
        std::slice::from_ref(&req),
        &no_env(),
        LIMIT,
    );
    assert_installed(&run, &req, &fw, &card.state(), &target);
    assert_eq!(md5_file(&card.medium("flash.bin")), fw.md5);
}

/// Slots `DIR/slot-a` (the running image) and `DIR/slot-b` on the card.
fn slots_on(card: &LyingFs) -> PathBuf {
    let slots = card.mnt().join("slots");
    fs::create_dir(&slots).expect("mkdir slots");
    fs::write(slots.join("slot-a"), b"the running image\n").expect("write slot a");
    slots
}

fn ab_run(card: &LyingFs, slots: &Path, requests: &[Value]) -> Run {
    let input: String = requests.iter().map(|r| format!("{r}\n")).collect();
    let flash = format!("ab:{}", slots.display());
    let cmd = stdio_agent(&card.state(), &flash, &["--reboot-command", ""]);
    run_with_timeout(cmd, input.as_bytes(), LIMIT)
}

fn record(slots: &Path) -> Value {
    let text = fs::read_to_string(slots.join("bootctl.json")).expect("read bootctl.json");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bootctl.json ({e}): {text}"))
}

/// The bootloader of docs/AB-SLOTS.md: one power-on.
fn power_on(slots: &Path) {
    let mut r = record(slots);
    let tries = r["tries"].as_u64().expect("tries");
    match r["next"].as_str().map(str::to_string) {
        Some(next) if tries > 0 => {
            r["tries"] = (tries - 1).into();
            r["booted"] = next.into();
        }
        _ => {
            r["next"] = Value::Null;
            r["tries"] = 0.into();
            r["booted"] = r["active"].clone();
        }
    }
    fs::write(slots.join("bootctl.json"), format!("{r}\n")).expect("write bootctl.json");
}

#[test]
fn ab_slot_on_a_card_that_drops_writes_is_result_50_and_never_booted() {
    let servers = Servers::from_env();
    let fw = servers.put_http("lying-ab", IMAGE);
    let card = LyingFs::mount(LOST);
    let slots = slots_on(&card);

    let first = ab_run(&card, &slots, &[servers.http_request(&fw)]);
    assert_eq!(first.code(), Some(0), "{first}");
    let medium = md5_file(&card.medium("slots/slot-b"));
    assert_ne!(medium, fw.md5, "the card lost bytes: the test's premise");
    let r = record(&slots);
    let switched = r["next"].as_str() == Some("b");
    // Whatever happened, the board reboots and the agent starts again: a
    // switched slot would be booted and committed now.
    power_on(&slots);
    let second = ab_run(&card, &slots, &[]);
    assert_eq!(
        result_numbers(&[&first, &second])
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        vec![50],
        "one result, 50: slot b holds md5 {medium}, not the image {}\n{first}\n{second}",
        fw.md5
    );
    assert!(!switched, "next-boot was switched to slot b: {r}");
    let (_, description) = result_numbers(&[&first]).remove(0);
    assert!(
        description.contains("read-back") && description.contains(&medium),
        "says the read-back differs and what it read: {description}"
    );
    let r = record(&slots);
    assert_eq!(
        (r["active"].as_str(), r["next"].as_str(), &r["trial"]),
        (Some("a"), None, &Value::Null),
        "{r}"
    );
    assert!(r["md5"]["b"].is_null(), "slot b is no known image: {r}");
}

#[test]
fn ab_slot_on_an_honest_card_is_made_durable_then_switched_and_committed() {
    let servers = Servers::from_env();
    let fw = servers.put_http("honest-ab", IMAGE);
    let card = LyingFs::mount(HONEST);
    let slots = slots_on(&card);

    let first = ab_run(&card, &slots, &[servers.http_request(&fw)]);
    assert_eq!(first.code(), Some(0), "{first}");
    assert_eq!(record(&slots)["next"], "b", "{first}");
    // The download created slot-b; its directory entry is durable (an
    // fsync of the directory) before the record that points next-boot at
    // it is renamed into place.
    let ops = card.ops();
    let created = ops
        .iter()
        .position(|l| l == "create /slots/slot-b")
        .unwrap_or_else(|| panic!("slot-b was created on the card: {ops:#?}"));
    let switch = ops
        .iter()
        .rposition(|l| l == "rename /slots/.bootctl.json.tmp /slots/bootctl.json")
        .expect("the record was renamed into place");
    assert!(
        created < switch && ops[created..switch].iter().any(|l| l == "fsyncdir /slots"),
        "no fsync of /slots between the slot's creation and the switch: {ops:#?}"
    );

    power_on(&slots);
    let second = ab_run(&card, &slots, &[]);
    assert_eq!(
        result_numbers(&[&first, &second])
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        vec![0],
        "{first}\n{second}"
    );
    assert_eq!(md5_file(&card.medium("slots/slot-b")), fw.md5);
    assert_eq!(record(&slots)["active"], "b");
}

/// A store whose flush fails after the commit was applied (the card's fsync
/// says EIO): the agent stops with exit 3 and sends nothing of that change,
/// above all no errorNo 8 while the upgrade is in fact active and its "ok"
/// waits in the outbox. The next start, on a working card, recovers from
/// what is durable: one upgrade, acked 0, completed (ARCHITECTURE.md, rule 7).
#[test]
fn a_store_whose_flush_fails_stops_the_agent_and_says_nothing_of_it() {
    let servers = Servers::from_env();
    let card = LyingFs::mount(HONEST);
    let state = card.mnt().join("state");
    let target = card.state().with_file_name("flash.bin");
    fs::write(&target, b"").expect("the flash target");
    let fw = servers.put_http("fsync-eio", IMAGE);
    let req = servers.http_request(&fw);

    let mut cmd = stdio_agent(&state, &file_flash(&target), &[]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut agent = cmd.spawn().expect("spawn fwagent");
    let mut stdin = agent.stdin.take().expect("stdin");
    let stderr = agent.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // The store is open once the control socket is tried (a FUSE card
    // without mknod refuses the socket; the agent goes on without it).
    let started = Instant::now();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the agent's start-up log");
        if line.contains("control socket") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30));
    }
    card.fail_fsync(true);
    writeln!(stdin, "{req}").expect("the request");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = agent.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = agent.kill();
            let _ = agent.wait();
            let mut out = String::new();
            let _ = agent.stdout.take().map(|mut o| o.read_to_string(&mut out));
            panic!("the agent went on after its store failed to flush; it sent:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stdin);
    let mut stdout = String::new();
    agent
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("stdout");
    let log = reader.join().expect("the stderr reader");
    assert_eq!(status.code(), Some(3), "exit 3\n{stdout}\n{log}");
    assert_eq!(
        stdout.trim(),
        "",
        "nothing of the failed commit is sent\n{log}"
    );
    assert!(
        card.ops().iter().any(|op| op.ends_with("EIO")),
        "the card failed an fsync: {:?}",
        card.ops()
    );

    card.fail_fsync(false);
    let second = run_agent(
        &state,
        &target,
        &[],
        std::slice::from_ref(&req),
        Duration::from_secs(60),
    );
    assert_eq!(second.code(), Some(0), "{second}");
    let lines = second.json_lines();
    let acks: Vec<_> = lines
        .iter()
        .filter(|v| operator(v) == "setCloudUpgradeConfig-Ack")
        .collect();
    assert!(!acks.is_empty(), "{second}");
    assert!(
        acks.iter().all(|a| a["result"]["errorNo"] == 0),
        "only ok: {second}"
    );
    let ResultReport {
        error_no, phase, ..
    } = only_result(&second);
    assert_eq!((error_no, phase.as_str()), (0, "completed"), "{second}");
    assert_eq!(md5_file(&target), fw.md5);
}
