//! The kill -9 harness: a child process commits transitions in a loop and
//! is killed (SIGKILL) at random moments; after each kill the store is
//! reopened and must hold every commit that returned, whole, and no commit
//! in part.
//!
//! The child is this test binary run again (`crash_child`, selected by the
//! `FWAGENT_CRASH_DIR` environment variable; without it that test does
//! nothing). It drives real upgrades through `on_request`/`transition` and
//! tags everything commit `n` writes with `c{n}`: the job record's
//! validator, the log entry's text, each outbox message's sessionId and the
//! recorded ack's. Before each commit it prints `intent n job=J out=K
//! ack=MID|-`, after the commit returns `done n`. The parent then checks:
//! - the commits in the store are exactly 1..=N (each commit is flushed
//!   before the next begins, so what survives is a prefix), and N is at least
//!   every `done`;
//! - each present commit is whole: its log entry, its K outbox entries, its
//!   recorded ack, and a job record at least as new as it;
//! - state, log and outbox agree: each job's phase is its last log entry's,
//!   at most one job is active and `active()` names it, outbox seqs have no
//!   gaps, reports carry `MID:<device>-<seq>`.
//!
//! `FWAGENT_CRASH_ROUNDS` (default 120) and `FWAGENT_CRASH_SEED` tune a run;
//! the seed is printed, so a failure can be replayed.

mod common;

use common::*;
use fwagent_state::store::Limits;
use fwagent_state::{
    on_request, result_no, transition, Event, Failure, Job, LogEntry, Outgoing, Phase, Policy,
    Store, Transition,
};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DEVICE: &str = "crash";
const ENV_DIR: &str = "FWAGENT_CRASH_DIR";
const ENV_NEXT: &str = "FWAGENT_CRASH_NEXT";

/// Open the store, waiting up to 10 s for the lock: the threads of a store
/// the other process dropped a moment ago may still hold it on a loaded
/// machine.
fn open_waiting(dir: &Path, limits: Limits) -> Result<Store, fwagent_state::StoreError> {
    let started = Instant::now();
    loop {
        match Store::open_with_limits(dir, DEVICE, limits) {
            Err(fwagent_state::StoreError::Locked { .. })
                if started.elapsed() < Duration::from_secs(10) => {}
            other => return other,
        }
    }
}

/// xorshift64*: enough randomness for kill times and choices.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn time_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9E37_79B9_7F4A_7C15)
}

fn tag(n: u64) -> String {
    format!("c{n}")
}

/// `c{n}` → n.
fn untag(s: &str) -> Option<u64> {
    s.strip_prefix('c')?.split(' ').next()?.parse().ok()
}

fn session_of(message: &Outgoing) -> &str {
    match message {
        Outgoing::Ack(ack) => &ack.session_id,
        Outgoing::Progress { subject, .. } | Outgoing::Result { subject, .. } => {
            &subject.session_id
        }
    }
}

// ---- the child ----------------------------------------------------------------------

/// The event the runtime would produce next for `job`.
fn next_event(job: &Job, rng: &mut Rng) -> Event {
    let size = job.request.firmware.size;
    let cancellable = matches!(
        job.phase,
        Phase::Accepted | Phase::Downloading { .. } | Phase::Verifying
    );
    if cancellable && rng.chance(2) {
        return Event::Cancel;
    }
    match job.phase {
        Phase::Accepted => Event::START,
        Phase::Downloading { offset } => {
            if job.bytes_done >= size && offset >= size {
                return Event::Downloaded;
            }
            match rng.range(0, 9) {
                0 => Event::DownloadFailed {
                    failure: Failure::new(result_no::CONNECT, "connection reset", true),
                    durable_offset: offset,
                },
                1..=3 => Event::Checkpoint {
                    offset: job.bytes_done,
                    validator: None,
                },
                _ => Event::Progress {
                    bytes_done: (job.bytes_done + rng.range(10, 120)).min(size),
                },
            }
        }
        Phase::Verifying => Event::Verified,
        Phase::Flashing => Event::Flashed {
            reboot: rng.chance(50),
        },
        Phase::AwaitingReboot => Event::Booted {
            ok: rng.chance(70),
            detail: "health check".into(),
        },
        Phase::Completed | Phase::Failed | Phase::Cancelled | Phase::RolledBack => Event::START,
    }
}

/// Mark everything `t` writes as commit `n`'s, and give it a log entry if
/// it has none, so that every commit leaves a trace in the log.
fn mark(t: &mut Transition, n: u64, from: &Job) {
    let c = tag(n);
    if let Some(job) = &mut t.job {
        job.validator = Some(c.clone());
        if t.log.is_none() {
            t.log = Some(LogEntry {
                at: job.updated_at,
                from: Some(from.phase.name()),
                to: job.phase.name(),
                event: "progress".into(),
                error: None,
            });
        }
    }
    if let Some(log) = &mut t.log {
        log.event = format!("{c} {}", log.event);
    }
    for message in &mut t.outbox {
        match message {
            Outgoing::Ack(ack) => ack.session_id = c.clone(),
            Outgoing::Progress { subject, .. } | Outgoing::Result { subject, .. } => {
                subject.session_id = c.clone()
            }
        }
    }
    if let Some(ack) = &mut t.record_ack {
        ack.session_id = c;
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A dead parent only ends the child sooner.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The child: commits until killed (or, orphaned, for at most 30 s).
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(ENV_DIR) else {
        return; // run as the child of kill_9_... only
    };
    let mut n: u64 = std::env::var(ENV_NEXT)
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("FWAGENT_CRASH_NEXT");
    let mut rng = Rng::new(time_seed() ^ u64::from(std::process::id()));
    let policy = Policy::default();
    // The whole history is checked: nothing is pruned (`prune_child`
    // checks pruning under kill -9).
    let store = open_waiting(Path::new(&dir), Limits::KEEP_ALL).expect("child opens the store");
    // libtest may have left "test crash_child ... " without a newline.
    say("");
    say("ready");
    let mut restarted = true;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let now = time::OffsetDateTime::now_utc();
        let (mut t, from) = match store.active().expect("read") {
            Some(job) => {
                // After a restart the runtime starts the phase's work again.
                let event = if restarted {
                    Event::START
                } else {
                    next_event(&job, &mut rng)
                };
                let t = transition(&job, event, now, &policy).expect("the event applies");
                (t, job)
            }
            None => {
                let mid = format!("MID:crash-{n}");
                let view = store.request_view(&mid, None).expect("view");
                let t = on_request(&view, valid(&mid, &md5('a')), now);
                let job = t.job.clone().expect("accepted: nothing is active");
                (t, job)
            }
        };
        restarted = false;
        mark(&mut t, n, &from);
        let job = t
            .job
            .as_ref()
            .map(|j| j.id)
            .expect("every commit has a job");
        let ack = t
            .record_ack
            .as_ref()
            .map(|a| a.message_id.clone())
            .unwrap_or_else(|| "-".into());
        say(&format!(
            "intent {n} job={job} out={} ack={ack}",
            t.outbox.len()
        ));
        let entries = store.commit(&t).expect("commit");
        say(&format!("done {n}"));
        if rng.chance(50) {
            for e in &entries {
                store.delivered(e.seq).expect("delivered");
            }
        }
        n += 1;
    }
}

// ---- the parent ---------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
struct Intent {
    job: u64,
    out: usize,
    ack: Option<String>,
}

fn parse_intent(line: &str) -> Option<(u64, Intent)> {
    let mut words = line.strip_prefix("intent ")?.split(' ');
    let n = words.next()?.parse().ok()?;
    let job = words.next()?.strip_prefix("job=")?.parse().ok()?;
    let out = words.next()?.strip_prefix("out=")?.parse().ok()?;
    let ack = match words.next()?.strip_prefix("ack=")? {
        "-" => None,
        mid => Some(mid.to_string()),
    };
    Some((n, Intent { job, out, ack }))
}

/// Check the store against the intents; returns N, the last commit in it.
fn verify(dir: &Path, intents: &BTreeMap<u64, Intent>, done_max: u64) -> Result<u64, String> {
    let store = open_waiting(dir, Limits::KEEP_ALL).map_err(|e| format!("reopen: {e}"))?;
    let jobs = store.history(None).map_err(|e| e.to_string())?;
    let mut logged: BTreeMap<u64, u64> = BTreeMap::new(); // commit -> job
    let mut outboxed: BTreeMap<u64, Vec<u64>> = BTreeMap::new(); // commit -> seqs
    let mut seqs = Vec::new();
    let mut active = Vec::new();
    for job in &jobs {
        let log = store.log(job.id).map_err(|e| e.to_string())?;
        for entry in &log {
            let n = untag(&entry.event).ok_or(format!("untagged log entry {entry:?}"))?;
            if logged.insert(n, job.id).is_some() {
                return Err(format!("commit {n} logged twice"));
            }
        }
        match log.last() {
            Some(last) if last.to == job.phase.name() => {}
            other => {
                return Err(format!(
                    "job {} is {:?} but its log ends {other:?}",
                    job.id, job.phase
                ))
            }
        }
        for (entry, _) in store.outbox_of(job.id).map_err(|e| e.to_string())? {
            let n = untag(session_of(&entry.message))
                .ok_or(format!("untagged outbox entry {entry:?}"))?;
            if entry.job != Some(job.id) {
                return Err(format!(
                    "outbox entry {} filed under job {}",
                    entry.seq, job.id
                ));
            }
            let expected_mid = match &entry.message {
                Outgoing::Ack(ack) => ack.message_id.clone(),
                Outgoing::Progress { .. } | Outgoing::Result { .. } => {
                    store.report_message_id(entry.seq)
                }
            };
            if entry.message_id != expected_mid {
                return Err(format!(
                    "outbox entry {} has messageId {}",
                    entry.seq, entry.message_id
                ));
            }
            outboxed.entry(n).or_default().push(entry.seq);
            seqs.push(entry.seq);
        }
        if !job.phase.is_terminal() {
            active.push(job.id);
        }
    }

    // What survives is a prefix of the commits, and holds every `done`.
    let last = logged.keys().next_back().copied().unwrap_or(0);
    if logged.keys().copied().ne(1..=last) {
        let missing: Vec<u64> = (1..=last).filter(|n| !logged.contains_key(n)).collect();
        return Err(format!(
            "commits missing from the log below {last}: {missing:?}"
        ));
    }
    if done_max > last {
        return Err(format!(
            "commit {done_max} returned but the store ends at {last}"
        ));
    }

    // Each present commit is whole; no later commit left anything.
    let mut newest: BTreeMap<u64, u64> = BTreeMap::new(); // job -> its last commit
    for n in 1..=last {
        let intent = intents.get(&n).ok_or(format!(
            "commit {n} is in the store but was never announced"
        ))?;
        if logged.get(&n) != Some(&intent.job) {
            return Err(format!("commit {n}: log entry under the wrong job"));
        }
        let found = outboxed.get(&n).map_or(0, Vec::len);
        if found != intent.out {
            return Err(format!(
                "commit {n}: {found} of its {} outbox entries",
                intent.out
            ));
        }
        if let Some(mid) = &intent.ack {
            let ack = store
                .request_view(mid, None)
                .map_err(|e| e.to_string())?
                .previous
                .ok_or(format!("commit {n}: the ack for {mid} is missing"))?;
            if ack.session_id != tag(n) {
                return Err(format!("commit {n}: the ack for {mid} is {ack:?}"));
            }
        }
        newest.insert(intent.job, n);
    }
    for n in outboxed.keys() {
        if *n > last {
            return Err(format!("commit {n} left outbox entries but no log entry"));
        }
    }
    for (n, intent) in intents.range(last + 1..) {
        if let Some(mid) = &intent.ack {
            let view = store.request_view(mid, None).map_err(|e| e.to_string())?;
            if view.previous.is_some() {
                return Err(format!("commit {n} left its ack but no log entry"));
            }
        }
    }
    for job in &jobs {
        let n = job
            .validator
            .as_deref()
            .and_then(untag)
            .ok_or(format!("job {} is untagged", job.id))?;
        if newest.get(&job.id) != Some(&n) {
            return Err(format!(
                "job {} is as of commit {n}, its log as of {:?}",
                job.id,
                newest.get(&job.id)
            ));
        }
    }

    // State and outbox agree.
    if active.len() > 1 {
        return Err(format!("several active jobs: {active:?}"));
    }
    let pointer = store.active().map_err(|e| e.to_string())?.map(|j| j.id);
    if pointer != active.first().copied() {
        return Err(format!("active() is {pointer:?}, the jobs say {active:?}"));
    }
    seqs.sort_unstable();
    if seqs.iter().copied().ne(1..=seqs.len() as u64) {
        return Err(format!("outbox seqs have gaps: {seqs:?}"));
    }
    let next_id = store
        .request_view("", None)
        .map_err(|e| e.to_string())?
        .next_id;
    if next_id != jobs.len() as u64 + 1 {
        return Err(format!("next job id {next_id} with {} jobs", jobs.len()));
    }
    Ok(last)
}

#[test]
fn kill_9_at_random_moments_leaves_every_commit_whole_or_absent() {
    let rounds: u32 = std::env::var("FWAGENT_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let seed: u64 = std::env::var("FWAGENT_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(time_seed);
    eprintln!("crash harness: {rounds} rounds, FWAGENT_CRASH_SEED={seed}");
    let mut rng = Rng::new(seed);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("state");
    let stderr_path = tmp.path().join("child.stderr");
    let exe = std::env::current_exe().expect("the test binary");

    let started = Instant::now();
    let mut intents: BTreeMap<u64, Intent> = BTreeMap::new();
    let mut last = 0u64;
    let mut done_max = 0u64;
    let mut killed_mid_commit = 0u32;
    let mut killed_before_ready = 0u32;
    for round in 0..rounds {
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(ENV_DIR, &dir)
            .env(ENV_NEXT, (last + 1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn the child");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });

        let mut lines = Vec::new();
        // Most rounds kill the child while it commits; some while sled
        // recovers the store on open.
        if rng.chance(10) {
            killed_before_ready += 1;
            std::thread::sleep(Duration::from_millis(rng.range(0, 8)));
        } else {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(line) if line == "ready" => break,
                    Ok(line) => lines.push(line),
                    Err(e) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                        panic!("round {round}: the child never got ready ({e}); stderr:\n{err}");
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(rng.range(5, 50)));
        }
        // Child::kill is SIGKILL on Unix.
        let _ = child.kill();
        let status = child.wait().expect("wait for the child");
        reader.join().expect("reader thread");
        lines.extend(rx.try_iter());
        {
            use std::os::unix::process::ExitStatusExt;
            if status.signal() != Some(9) {
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                panic!("round {round}: the child ended by itself ({status}); stderr:\n{err}");
            }
        }

        let mut announced = None;
        for line in &lines {
            if let Some((n, intent)) = parse_intent(line) {
                intents.insert(n, intent);
                announced = Some(n);
            } else if let Some(n) = line.strip_prefix("done ").and_then(|n| n.parse().ok()) {
                done_max = done_max.max(n);
            }
        }
        if announced.is_some_and(|n| n > done_max) {
            killed_mid_commit += 1;
        }
        let now_last = verify(&dir, &intents, done_max).unwrap_or_else(|e| {
            panic!("round {round} (FWAGENT_CRASH_SEED={seed}): {e}");
        });
        assert!(now_last >= last, "round {round}: commits went missing");
        last = now_last;
        // Announced but never committed: those numbers are used again.
        intents.retain(|n, _| *n <= last);
    }
    eprintln!(
        "crash harness: {rounds} kills ({killed_before_ready} while opening, \
         {killed_mid_commit} between intent and return), {last} commits survived whole, \
         {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        u64::from(rounds) / 2 < last,
        "the children made too little progress to mean anything ({last} commits)"
    );
}

const ENV_PRUNE_DIR: &str = "FWAGENT_PRUNE_DIR";

/// Small limits, a prune after every commit and a compaction on every open:
/// kill -9 lands in the middle of both often.
const PRUNE_LIMITS: Limits = Limits {
    ended_jobs: 3,
    answered: 10,
    sent_without_job: 3,
    prune_every: 1,
    compact_above: 0,
};

/// The child of `kill_9_while_pruning_...`: upgrades (some of their reports
/// left undelivered) and refused requests, for ever.
#[test]
fn prune_child() {
    let Some(dir) = std::env::var_os(ENV_PRUNE_DIR) else {
        return;
    };
    let mut rng = Rng::new(time_seed() ^ u64::from(std::process::id()));
    let store = open_waiting(Path::new(&dir), PRUNE_LIMITS).expect("opens");
    say("");
    say("ready");
    let now = time::OffsetDateTime::now_utc();
    let policy = Policy::default();
    for i in 0.. {
        let mid = format!("MID:p{}-{i}", rng.next() % 1_000_000);
        let view = store.request_view(&mid, None).expect("view");
        if view.active.is_none() && rng.chance(50) {
            store
                .commit(&on_request(&view, valid(&mid, &md5('a')), now))
                .expect("commit");
        } else if let Some(job) = view.active {
            let event = if rng.chance(50) {
                Event::START
            } else {
                Event::Cancel
            };
            let t = transition(&job, event, now, &policy).expect("applies");
            store.commit(&t).expect("commit");
        } else {
            let refused = fwagent_state::Ack {
                operator: "setCloudUpgradeConfig".into(),
                session_id: "SID:p".into(),
                message_id: mid.clone(),
                result: fwagent_state::Outcome::new(4, "info.fileInfo.md5sum: not hex"),
            };
            let t = on_request(&view, fwagent_state::Incoming::Invalid(refused), now);
            store.commit(&t).expect("commit");
        }
        for e in store.pending_outbox().expect("read") {
            if !rng.chance(20) {
                store.delivered(e.seq).expect("delivered");
            }
        }
    }
}

/// The store after a kill during pruning and compaction: every record it
/// holds belongs to a whole upgrade, nothing waiting for delivery lost its
/// upgrade, and every answer has its place in the answered order.
fn verify_pruned(dir: &Path) -> Result<(), String> {
    let e = |e: fwagent_state::StoreError| e.to_string();
    let store = open_waiting(dir, PRUNE_LIMITS).map_err(e)?;
    let jobs: Vec<u64> = store
        .history(None)
        .map_err(e)?
        .iter()
        .map(|j| j.id)
        .collect();
    for job in store.history(None).map_err(e)? {
        let log = store.log(job.id).map_err(e)?;
        if log.last().map(|l| l.to) != Some(job.phase.name()) {
            return Err(format!(
                "job {}: {:?} with the log {log:?}",
                job.id, job.phase
            ));
        }
        store.outbox_of(job.id).map_err(e)?;
    }
    for entry in store.pending_outbox().map_err(e)? {
        if entry.job.is_some_and(|j| !jobs.contains(&j)) {
            return Err(format!("outbox entry {} lost its upgrade", entry.seq));
        }
    }
    store.active().map_err(e)?;
    drop(store);
    let db = raw_sled(dir);
    let tree = |name: &str| db.open_tree(name).expect("tree");
    let job_of = |k: &[u8]| u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
    for name in ["log", "outbox_by_job", "secrets"] {
        for kv in tree(name).iter() {
            let (k, _) = kv.map_err(|e| e.to_string())?;
            if !jobs.contains(&job_of(&k)) {
                return Err(format!(
                    "{name} keeps a record of the pruned job {}",
                    job_of(&k)
                ));
            }
        }
    }
    for kv in tree("job_by_message_id").iter() {
        let (_, v) = kv.map_err(|e| e.to_string())?;
        if !jobs.contains(&job_of(&v)) {
            return Err(format!("the index points at the pruned job {}", job_of(&v)));
        }
    }
    let acks = tree("acks");
    let order = tree("acks_order");
    for kv in order.iter() {
        let (_, mid) = kv.map_err(|e| e.to_string())?;
        if !acks.contains_key(&mid).map_err(|e| e.to_string())? {
            return Err(format!("an order entry without its answer: {mid:?}"));
        }
    }
    if acks.len() != order.len() {
        return Err(format!("{} answers, {} in order", acks.len(), order.len()));
    }
    // The open above pruned: within the limit (the active upgrade's own
    // answer may come on top).
    if acks.len() > PRUNE_LIMITS.answered + 1 {
        return Err(format!("{} answers kept", acks.len()));
    }
    Ok(())
}

/// Pruning and compaction are crash-safe: kill -9 at random moments of a
/// store that prunes after every commit and compacts on every open.
#[test]
fn kill_9_while_pruning_and_compacting_leaves_whole_upgrades() {
    let rounds: u32 = std::env::var("FWAGENT_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(40, |r: u32| r / 3);
    let seed = time_seed();
    eprintln!("prune harness: {rounds} rounds, seed {seed}");
    let mut rng = Rng::new(seed);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("state");
    let exe = std::env::current_exe().expect("the test binary");
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "prune_child",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(ENV_PRUNE_DIR, &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the child");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        if rng.chance(25) {
            // While it opens: sled's recovery, the prune and the compaction.
            std::thread::sleep(Duration::from_millis(rng.range(0, 30)));
        } else {
            while let Some(Ok(line)) = lines.next() {
                if line == "ready" {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(rng.range(5, 80)));
        }
        let _ = child.kill();
        let _ = child.wait();
        verify_pruned(&dir).unwrap_or_else(|e| panic!("round {round} (seed {seed}): {e}"));
    }
}
