//! Builders shared by the state crate's integration tests: requests, jobs
//! in a given phase, and a fixed clock.

#![allow(dead_code)]

use fwagent_state::{
    Failure, Firmware, Incoming, Job, Outgoing, Phase, Pieces, Protocol, Secret, Source,
    UpgradeRequest,
};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

/// The image size every test request asks for.
pub const SIZE: u64 = 1000;

/// A fixed start of time.
pub fn t0() -> OffsetDateTime {
    datetime!(2024-05-01 12:00:00 UTC)
}

/// `t0` plus `ms` milliseconds.
pub fn at_ms(ms: i64) -> OffsetDateTime {
    t0() + Duration::milliseconds(ms)
}

/// An md5 made of one repeated hex digit.
pub fn md5(c: char) -> String {
    c.to_string().repeat(32)
}

/// A valid request for `firmware.bin` of [`SIZE`] bytes.
pub fn request(mid: &str, md5: &str) -> UpgradeRequest {
    UpgradeRequest {
        message_id: mid.to_string(),
        session_id: format!("SID:{mid}"),
        source: Source {
            protocol: Protocol::Http,
            host: "127.0.0.1".into(),
            port: 8080,
            path: "/fw/".into(),
            url: "http://127.0.0.1:8080/fw/firmware.bin".into(),
            user: Secret::new("user"),
            password: Secret::new("hunter2"),
        },
        firmware: Firmware {
            name: "firmware.bin".into(),
            md5: md5.to_string(),
            size: SIZE,
            signature: None,
        },
        pass_port: Some(Secret::new("pass-port-secret")),
    }
}

pub fn valid(mid: &str, md5: &str) -> Incoming {
    Incoming::Valid(Box::new(request(mid, md5)))
}

/// A job in `phase`, as if accepted at `t0`, with no attempts yet made.
pub fn job_in(phase: Phase) -> Job {
    Job {
        id: 1,
        request: request("MID:req-1", &md5('a')),
        phase,
        attempts: 0,
        bytes_done: 0,
        high_water: match phase {
            Phase::Downloading { offset } => offset,
            _ => 0,
        },
        fetched: 0,
        validator: None,
        result: None,
        last_error: None,
        last_progress: None,
        boot: None,
        machine_restarts: 0,
        joined: Vec::new(),
        installed_on_boot: None,
        reboot_failures: 0,
        pieces: Pieces::One,
        created_at: t0(),
        updated_at: t0(),
    }
}

pub fn retryable(error_no: u32) -> Failure {
    Failure::new(error_no, "connection reset", true)
}

pub fn fatal(error_no: u32) -> Failure {
    Failure::new(error_no, "final failure", false)
}

/// The result reports in `out`: (phase, errorNo).
pub fn results(out: &[Outgoing]) -> Vec<(fwagent_state::PhaseName, u32)> {
    out.iter()
        .filter_map(|m| match m {
            Outgoing::Result { phase, result, .. } => Some((*phase, result.error_no)),
            Outgoing::Ack(_) | Outgoing::Progress { .. } => None,
        })
        .collect()
}

/// The progress reports in `out`: (phase, percent).
pub fn progress(out: &[Outgoing]) -> Vec<(fwagent_state::PhaseName, u8)> {
    out.iter()
        .filter_map(|m| match m {
            Outgoing::Progress { phase, percent, .. } => Some((*phase, *percent)),
            Outgoing::Ack(_) | Outgoing::Result { .. } => None,
        })
        .collect()
}

/// The attempt count a job's log shows (ARCHITECTURE.md's `show`): the
/// count the latest entry names (`(attempt N)`, `(check N)` in
/// `awaiting_reboot`), else what the phase it entered starts at (0 for
/// `accepted` and `awaiting_reboot`, 1 for working phases). The entry that
/// ends an upgrade changes no count, so terminal entries are skipped.
pub fn logged_attempts(log: &[fwagent_state::LogEntry]) -> u32 {
    use fwagent_state::PhaseName;
    for e in log.iter().rev().filter(|e| !e.to.is_terminal()) {
        if let Some(n) = named_count(&e.event) {
            return n;
        }
        if e.from != Some(e.to) {
            return match e.to {
                PhaseName::Accepted | PhaseName::AwaitingReboot => 0,
                _ => 1,
            };
        }
    }
    0
}

/// `N` of a text ending in `(... attempt N)` or `(... check N)`.
fn named_count(text: &str) -> Option<u32> {
    let inner = text.strip_suffix(')')?.rsplit_once('(')?.1;
    let mut words = inner.rsplit(' ');
    let n = words.next()?.parse().ok()?;
    matches!(words.next()?, "attempt" | "check").then_some(n)
}

/// sled opened directly on a store's `db`, waiting (up to 10 s) for the
/// threads of a store dropped a moment ago to let go of its lock.
pub fn raw_sled(dir: &std::path::Path) -> sled::Db {
    let started = std::time::Instant::now();
    loop {
        match sled::open(dir.join("db")) {
            Ok(db) => return db,
            Err(e) if started.elapsed() < std::time::Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("sled opens {}: {e}", dir.display()),
        }
    }
}
