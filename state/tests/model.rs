//! A property test of the state machine and its store against a simple
//! reference model.
//!
//! Random runs of requests (new, duplicate, same md5, other md5, too big,
//! malformed), events (including failing downloads, verifications, flashes
//! and boots), deliveries, clock steps and restarts (the store dropped and
//! reopened) drive the real `on_request`/`transition` + `Store::commit`, the
//! way the runtime does. The model below is written from PROTOCOL.md and
//! ARCHITECTURE.md, not from the machine's code; after every step the store
//! must agree with it on every job's phase, result, attempts (which the job's
//! log must name too) and offsets, on the active job, on the pending outbox
//! (messageIds and content, in order) and on the ack each messageId would
//! get again.

mod common;

use common::*;
use fwagent_state::{
    ack_no, on_request, percent, result_no, transition, Ack, Event, Failure, Incoming, Outcome,
    Outgoing, Phase, PhaseName, Policy, Store,
};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

const DEVICE: &str = "dev";
const MIDS: [&str; 5] = ["MID:r0", "MID:r1", "MID:r2", "MID:r3", "MID:r4"];
const MD5S: [char; 2] = ['a', 'b'];

#[derive(Clone, Debug)]
enum Ev {
    /// A start on the boot with this number (`None`: not known).
    Start(Option<u8>),
    Progress(u8),
    Checkpoint(u8),
    SourceChanged,
    Downloaded,
    DownloadFailed {
        retryable: bool,
        durable: u8,
    },
    Verified,
    VerifyFailed,
    /// Size and md5 match, the signature does not (32).
    SignatureInvalid,
    Flashed {
        reboot: bool,
    },
    FlashFailed,
    Booted {
        ok: bool,
    },
    Stranded,
    RebootPending,
    NotRebooted,
    RebootFailed,
    NotCommitted,
    Cancel,
}

#[derive(Clone, Debug)]
enum Op {
    /// A valid request; `small_disk` leaves too little room for the image.
    Submit {
        mid: usize,
        md5: usize,
        small_disk: bool,
    },
    /// A request the protocol module rejected (errorNo 4).
    Malformed { mid: usize },
    /// An event for the active upgrade (else the latest one).
    Event(Ev),
    /// The clock moves on.
    Advance { ms: u16 },
    /// The transport confirms one pending entry.
    Deliver { pick: usize },
    /// The agent stops and starts again: the store is dropped and reopened.
    Restart,
}

fn pct() -> impl Strategy<Value = u8> {
    0u8..=100
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        3 => prop::option::weighted(0.7, 0u8..3).prop_map(Ev::Start),
        4 => pct().prop_map(Ev::Progress),
        2 => pct().prop_map(Ev::Checkpoint),
        1 => Just(Ev::SourceChanged),
        2 => Just(Ev::Downloaded),
        2 => (any::<bool>(), pct())
            .prop_map(|(retryable, durable)| Ev::DownloadFailed { retryable, durable }),
        2 => Just(Ev::Verified),
        1 => Just(Ev::VerifyFailed),
        1 => Just(Ev::SignatureInvalid),
        2 => any::<bool>().prop_map(|reboot| Ev::Flashed { reboot }),
        1 => Just(Ev::FlashFailed),
        2 => any::<bool>().prop_map(|ok| Ev::Booted { ok }),
        1 => Just(Ev::Stranded),
        1 => Just(Ev::RebootPending),
        1 => Just(Ev::NotRebooted),
        1 => Just(Ev::RebootFailed),
        1 => Just(Ev::NotCommitted),
        1 => Just(Ev::Cancel),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..MIDS.len(), 0..MD5S.len(), prop::bool::weighted(0.15))
            .prop_map(|(mid, md5, small_disk)| Op::Submit { mid, md5, small_disk }),
        1 => (0..MIDS.len()).prop_map(|mid| Op::Malformed { mid }),
        10 => ev().prop_map(Op::Event),
        2 => (0u16..3000).prop_map(|ms| Op::Advance { ms }),
        3 => any::<usize>().prop_map(|pick| Op::Deliver { pick }),
        2 => Just(Op::Restart),
    ]
}

// ---- the reference model ---------------------------------------------------------

/// What the cloud is told, as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Said {
    Ack { mid: String, error_no: u32 },
    Progress { phase: PhaseName, percent: u8 },
    Result { phase: PhaseName, error_no: u32 },
}

#[derive(Clone, Debug)]
struct MJob {
    mid: String,
    md5: String,
    phase: PhaseName,
    offset: u64,
    /// The highest durable offset reached, and the durable bytes fetched.
    high: u64,
    fetched: u64,
    bytes: u64,
    attempts: u32,
    /// The boot of the last start, and the starts of this phase after a
    /// restart of the machine.
    boot: Option<u8>,
    restarts: u32,
    result: Option<u32>,
    /// The last progress report: percent, phase, when (ms).
    mark: Option<(u8, PhaseName, i64)>,
    /// Its own request and those that joined it: each report goes to each.
    requesters: usize,
    /// Failed runs of the reboot command.
    reboot_failures: u32,
    /// A transfer resumed past byte 0, and whether the one fresh download
    /// after a wrong md5 is used.
    resumed: bool,
    refetched: bool,
}

#[derive(Debug, Default)]
struct Model {
    reports: bool,
    jobs: Vec<MJob>,
    acks: BTreeMap<String, u32>,
    pending: Vec<(u64, String, Said)>,
    next_seq: u64,
    now: i64,
}

fn terminal(p: PhaseName) -> bool {
    matches!(
        p,
        PhaseName::Completed | PhaseName::Failed | PhaseName::Cancelled | PhaseName::RolledBack
    )
}

impl Model {
    fn new(reports: bool) -> Self {
        Model {
            reports,
            next_seq: 1,
            ..Model::default()
        }
    }

    fn active(&self) -> Option<usize> {
        self.jobs.iter().position(|j| !terminal(j.phase))
    }

    fn say(&mut self, said: Said) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mid = match &said {
            Said::Ack { mid, .. } => mid.clone(),
            Said::Progress { .. } | Said::Result { .. } => format!("report-{seq}"),
        };
        self.pending.push((seq, mid, said));
    }

    fn ack(&mut self, mid: &str, error_no: u32) {
        if !mid.is_empty() {
            self.acks.insert(mid.to_string(), error_no);
        }
        self.say(Said::Ack {
            mid: mid.to_string(),
            error_no,
        });
    }

    fn submit(&mut self, mid: &str, md5: &str, small_disk: bool) {
        if let Some(&error_no) = self.acks.get(mid) {
            self.say(Said::Ack {
                mid: mid.to_string(),
                error_no,
            });
            return;
        }
        if let Some(i) = self.active() {
            let j = &mut self.jobs[i];
            let joins = j.md5 == md5 && j.requesters <= fwagent_state::Job::MAX_JOINED;
            if joins {
                j.requesters += 1;
            }
            self.ack(mid, if joins { ack_no::OK } else { ack_no::BUSY });
            return;
        }
        if small_disk {
            self.ack(mid, ack_no::NO_STORAGE);
            return;
        }
        self.jobs.push(MJob {
            mid: mid.to_string(),
            md5: md5.to_string(),
            phase: PhaseName::Accepted,
            offset: 0,
            high: 0,
            fetched: 0,
            bytes: 0,
            attempts: 0,
            boot: None,
            restarts: 0,
            result: None,
            mark: None,
            requesters: 1,
            reboot_failures: 0,
            resumed: false,
            refetched: false,
        });
        self.ack(mid, ack_no::OK);
    }

    fn malformed(&mut self, mid: &str) {
        match self.acks.get(mid) {
            Some(&error_no) => self.say(Said::Ack {
                mid: mid.to_string(),
                error_no,
            }),
            None => self.ack(mid, ack_no::INVALID_FIELD),
        }
    }

    fn report_progress(&mut self, i: usize) {
        let j = &mut self.jobs[i];
        let p = percent(j.bytes, SIZE);
        j.mark = Some((p, j.phase, self.now));
        let (phase, requesters) = (j.phase, j.requesters);
        if self.reports {
            for _ in 0..requesters {
                self.say(Said::Progress { phase, percent: p });
            }
        }
    }

    fn maybe_progress(&mut self, i: usize) {
        let j = &self.jobs[i];
        let due = match j.mark {
            None => true,
            Some((p, phase, at)) => {
                phase != j.phase || (percent(j.bytes, SIZE) >= p + 5 && self.now - at >= 2000)
            }
        };
        if due {
            self.report_progress(i);
        }
    }

    fn enter(&mut self, i: usize, phase: PhaseName) {
        self.jobs[i].phase = phase;
        self.jobs[i].attempts = 1;
        self.jobs[i].restarts = 0;
        self.report_progress(i);
    }

    fn finish(&mut self, i: usize, phase: PhaseName, error_no: u32) {
        self.jobs[i].phase = phase;
        self.jobs[i].result = Some(error_no);
        if self.reports {
            for _ in 0..self.jobs[i].requesters {
                self.say(Said::Result { phase, error_no });
            }
        }
    }

    /// Apply an event to the job the runtime would give it to; `false` when
    /// the event is refused.
    fn event(&mut self, ev: &Ev) -> bool {
        let Some(i) = self.active().or(self.jobs.len().checked_sub(1)) else {
            return false;
        };
        let phase = self.jobs[i].phase;
        if terminal(phase) {
            return false;
        }
        let p = Policy::default();
        let downloading = phase == PhaseName::Downloading;
        match ev {
            Ev::Start(boot) => {
                let j = &mut self.jobs[i];
                // A start on another boot than the last one follows a
                // restart of the machine: downloading, verifying and
                // flashing count it apart, against a larger bound.
                let rebooted = j.boot.is_some() && boot.is_some() && j.boot != *boot;
                j.boot = boot.or(j.boot);
                let apart = matches!(
                    phase,
                    PhaseName::Downloading | PhaseName::Verifying | PhaseName::Flashing
                );
                let (max, error_no) = match phase {
                    PhaseName::Accepted | PhaseName::Downloading => {
                        (p.download_attempts, result_no::TRANSFER)
                    }
                    PhaseName::Verifying => (p.verify_attempts, result_no::TRANSFER),
                    PhaseName::Flashing => (p.flash_attempts, result_no::FLASH_FAILED),
                    _ => (p.boot_checks(), result_no::ROLLED_BACK),
                };
                let resumes = downloading && j.offset > 0;
                if rebooted && apart {
                    if j.restarts >= p.machine_restarts {
                        self.finish(i, PhaseName::Failed, error_no);
                    } else {
                        j.restarts += 1;
                        j.resumed |= resumes;
                    }
                } else if self.jobs[i].attempts >= max {
                    self.finish(i, PhaseName::Failed, error_no);
                } else if phase == PhaseName::Accepted {
                    self.enter(i, PhaseName::Downloading);
                } else {
                    self.jobs[i].attempts += 1;
                    self.jobs[i].resumed |= resumes;
                }
            }
            Ev::Progress(pc) if downloading => {
                self.jobs[i].bytes = u64::from(*pc) * SIZE / 100;
                self.maybe_progress(i);
            }
            Ev::Checkpoint(pc) if downloading => {
                let offset = u64::from(*pc) * SIZE / 100;
                let j = &mut self.jobs[i];
                let progressed = offset > j.high;
                j.fetched += offset.saturating_sub(j.offset);
                j.high = j.high.max(offset);
                j.offset = offset;
                j.bytes = j.bytes.max(offset);
                if j.fetched > p.fetch_budget * SIZE {
                    // Over the budget: it ends with the count it had.
                    self.finish(i, PhaseName::Failed, result_no::TRANSFER);
                } else {
                    if progressed {
                        // Only durable progress beyond the highest offset
                        // ever reached resets the attempt count.
                        j.attempts = 1;
                        j.restarts = 0;
                    }
                    self.maybe_progress(i);
                }
            }
            Ev::SourceChanged if downloading => {
                self.jobs[i].offset = 0;
                self.jobs[i].bytes = 0;
                self.jobs[i].resumed = false;
                // Not a phase change: reported only outside the 2 s interval;
                // the throttle's mark goes back to 0 % either way.
                match self.jobs[i].mark {
                    Some((_, phase, at)) if self.now - at < 2000 => {
                        self.jobs[i].mark = Some((0, phase, at));
                    }
                    _ => self.report_progress(i),
                }
            }
            Ev::Downloaded if downloading => {
                self.jobs[i].bytes = SIZE;
                self.enter(i, PhaseName::Verifying);
            }
            Ev::DownloadFailed { retryable, durable } if downloading => {
                let j = &mut self.jobs[i];
                let offset = j.offset.max(u64::from(*durable) * SIZE / 100);
                j.fetched += offset - j.offset;
                j.high = j.high.max(offset);
                j.offset = offset;
                if j.fetched > p.fetch_budget * SIZE {
                    self.finish(i, PhaseName::Failed, result_no::TRANSFER);
                } else if *retryable && j.attempts < p.download_attempts {
                    j.attempts += 1;
                    j.resumed |= offset > 0;
                } else {
                    self.finish(i, PhaseName::Failed, result_no::CONNECT);
                }
            }
            Ev::Verified if phase == PhaseName::Verifying => {
                self.enter(i, PhaseName::Flashing);
            }
            // A wrong md5 of an image joined from resumed transfers gets one
            // fresh download from byte 0, with a fetch budget of its own.
            Ev::VerifyFailed if phase == PhaseName::Verifying => {
                let j = &mut self.jobs[i];
                if j.resumed && !j.refetched {
                    j.refetched = true;
                    j.resumed = false;
                    (j.offset, j.bytes, j.high, j.fetched) = (0, 0, 0, 0);
                    self.enter(i, PhaseName::Downloading);
                } else {
                    self.finish(i, PhaseName::Failed, result_no::MD5_MISMATCH);
                }
            }
            // A bad signature of an image whose md5 matched is no splice:
            // final at once, resumed or not.
            Ev::SignatureInvalid if phase == PhaseName::Verifying => {
                self.finish(i, PhaseName::Failed, result_no::SIGNATURE);
            }
            Ev::Flashed { reboot } if phase == PhaseName::Flashing => {
                if *reboot {
                    self.enter(i, PhaseName::AwaitingReboot);
                    self.jobs[i].attempts = 0;
                } else {
                    self.finish(i, PhaseName::Completed, result_no::OK);
                }
            }
            Ev::FlashFailed if phase == PhaseName::Flashing => {
                self.finish(i, PhaseName::Failed, result_no::FLASH_FAILED);
            }
            Ev::Booted { ok } if phase == PhaseName::AwaitingReboot => {
                if *ok {
                    self.finish(i, PhaseName::Completed, result_no::OK);
                } else {
                    self.finish(i, PhaseName::RolledBack, result_no::ROLLED_BACK);
                }
            }
            // Rolled back, and rebooted into the old slot.
            Ev::Stranded if phase == PhaseName::AwaitingReboot => {
                self.finish(i, PhaseName::RolledBack, result_no::ROLLED_BACK);
            }
            // The check counted; the reboot is asked for again.
            Ev::NotRebooted if phase == PhaseName::AwaitingReboot => {}
            // Waiting for someone else's reboot is no boot check.
            Ev::RebootPending if phase == PhaseName::AwaitingReboot => {
                let j = &mut self.jobs[i];
                j.attempts = j.attempts.saturating_sub(1);
            }
            // Asked again after a backoff, until the last allowed failure.
            Ev::RebootFailed if phase == PhaseName::AwaitingReboot => {
                let j = &mut self.jobs[i];
                j.reboot_failures += 1;
                if j.reboot_failures >= p.reboot_attempts {
                    self.finish(i, PhaseName::Failed, result_no::ROLLED_BACK);
                }
            }
            // An installer's commit step failed: not confirmed, not rolled back.
            Ev::NotCommitted if phase == PhaseName::AwaitingReboot => {
                self.finish(i, PhaseName::Failed, result_no::ROLLED_BACK);
            }
            Ev::Cancel
                if matches!(
                    phase,
                    PhaseName::Accepted | PhaseName::Downloading | PhaseName::Verifying
                ) =>
            {
                self.finish(i, PhaseName::Cancelled, result_no::CANCELLED);
            }
            _ => return false,
        }
        true
    }
}

// ---- the system under test ---------------------------------------------------------

fn event_of(ev: &Ev) -> Event {
    let at = |pc: u8| u64::from(pc) * SIZE / 100;
    match ev {
        Ev::Start(boot) => Event::Start {
            boot: boot.map(|b| format!("boot-{b}")),
        },
        Ev::Progress(pc) => Event::Progress {
            bytes_done: at(*pc),
        },
        Ev::Checkpoint(pc) => Event::Checkpoint {
            offset: at(*pc),
            validator: Some("etag".into()),
        },
        Ev::SourceChanged => Event::SourceChanged {
            validator: Some("etag-2".into()),
        },
        Ev::Downloaded => Event::Downloaded,
        Ev::DownloadFailed { retryable, durable } => Event::DownloadFailed {
            failure: Failure::new(result_no::CONNECT, "connection refused", *retryable),
            durable_offset: at(*durable),
        },
        Ev::Verified => Event::Verified,
        Ev::VerifyFailed => Event::VerifyFailed {
            failure: Failure::new(result_no::MD5_MISMATCH, "md5 mismatch", false),
        },
        Ev::SignatureInvalid => Event::VerifyFailed {
            failure: Failure::new(result_no::SIGNATURE, "signature invalid", false),
        },
        Ev::Flashed { reboot } => Event::Flashed { reboot: *reboot },
        Ev::FlashFailed => Event::FlashFailed {
            failure: Failure::new(result_no::TRANSFER, "write failed", false),
        },
        Ev::Booted { ok } => Event::Booted {
            ok: *ok,
            detail: "health check".into(),
        },
        Ev::Stranded => Event::Stranded {
            detail: "runs a slot it will not boot again".into(),
        },
        Ev::NotRebooted => Event::NotRebooted {
            detail: "not rebooted".into(),
        },
        Ev::RebootPending => Event::RebootPending {
            detail: "no reboot command".into(),
        },
        Ev::RebootFailed => Event::RebootFailed {
            detail: "reboot: exit status 1".into(),
        },
        Ev::NotCommitted => Event::NotCommitted {
            detail: "mark-good: exit status 1".into(),
        },
        Ev::Cancel => Event::Cancel,
    }
}

fn said(message: &Outgoing) -> Said {
    match message {
        Outgoing::Ack(ack) => Said::Ack {
            mid: ack.message_id.clone(),
            error_no: ack.result.error_no,
        },
        Outgoing::Progress { phase, percent, .. } => Said::Progress {
            phase: *phase,
            percent: *percent,
        },
        Outgoing::Result { phase, result, .. } => Said::Result {
            phase: *phase,
            error_no: result.error_no,
        },
    }
}

struct Sut {
    store: Option<Store>,
    policy: Policy,
}

impl Sut {
    fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is open")
    }

    fn submit(&self, incoming: Incoming, small_disk: bool, now: i64) {
        let free = Some(if small_disk { SIZE - 1 } else { SIZE * 10 });
        let view = self
            .store()
            .request_view(incoming.message_id(), free)
            .expect("view");
        let t = on_request(&view, incoming, at_ms(now));
        self.store().commit(&t).expect("commit");
    }

    /// The runtime gives an event to the active job; the CLI's cancel and
    /// late events may also hit the latest, finished one.
    fn event(&self, ev: &Ev, now: i64) -> bool {
        let Some(job) = self.store().latest().expect("read") else {
            return false;
        };
        match transition(&job, event_of(ev), at_ms(now), &self.policy) {
            Ok(t) => {
                self.store().commit(&t).expect("commit");
                true
            }
            Err(_) => false,
        }
    }
}

fn check(model: &Model, store: &Store) -> Result<(), TestCaseError> {
    let pending: Vec<(u64, String, Said)> = store
        .pending_outbox()
        .expect("read")
        .iter()
        .map(|e| {
            // A report's messageId is the store's for its number.
            let mid = match e.message_id == store.report_message_id(e.seq) {
                true => format!("report-{}", e.seq),
                false => e.message_id.clone(),
            };
            (e.seq, mid, said(&e.message))
        })
        .collect();
    prop_assert_eq!(&pending, &model.pending);

    let active = store.active().expect("read").map(|j| j.id);
    prop_assert_eq!(active, model.active().map(|i| i as u64 + 1));
    prop_assert_eq!(store.history(None).expect("read").len(), model.jobs.len());
    for (i, m) in model.jobs.iter().enumerate() {
        let job = store.job(i as u64 + 1).expect("read").expect("the job");
        prop_assert_eq!(&job.request.message_id, &m.mid);
        prop_assert_eq!(job.phase.name(), m.phase);
        prop_assert_eq!(job.result.as_ref().map(|r| r.error_no), m.result);
        prop_assert_eq!(job.attempts, m.attempts);
        // What `show` prints agrees with itself: the log names the count.
        let log = store.log(job.id).expect("read");
        prop_assert_eq!(logged_attempts(&log), job.attempts, "log: {:#?}", log);
        prop_assert_eq!(job.machine_restarts, m.restarts);
        prop_assert_eq!(job.bytes_done, m.bytes);
        if let Phase::Downloading { offset } = job.phase {
            prop_assert_eq!(offset, m.offset);
        }
        // One result report per request of a finished upgrade, none before.
        let results = store
            .outbox_of(job.id)
            .expect("read")
            .iter()
            .filter(|(e, _)| matches!(e.message, Outgoing::Result { .. }))
            .count();
        let expected = match model.reports && terminal(m.phase) {
            true => m.requesters,
            false => 0,
        };
        prop_assert_eq!(results, expected);
    }
    for mid in MIDS {
        let previous = store.request_view(mid, None).expect("view").previous;
        prop_assert_eq!(
            previous.map(|a| a.result.error_no),
            model.acks.get(mid).copied()
        );
    }
    Ok(())
}

fn run(dir: &Path, reports: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut model = Model::new(reports);
    let mut sut = Sut {
        store: Some(Store::open(dir, DEVICE).expect("open")),
        policy: Policy {
            reports,
            ..Policy::default()
        },
    };
    for op in ops {
        match op {
            Op::Submit {
                mid,
                md5: m,
                small_disk,
            } => {
                let md5 = md5(MD5S[*m]);
                sut.submit(valid(MIDS[*mid], &md5), *small_disk, model.now);
                model.submit(MIDS[*mid], &md5, *small_disk);
            }
            Op::Malformed { mid } => {
                let ack = Ack {
                    operator: "setCloudUpgradeConfig".into(),
                    session_id: "SID:x".into(),
                    message_id: MIDS[*mid].into(),
                    result: Outcome::new(ack_no::INVALID_FIELD, "info.serverConfig.port: 0"),
                };
                sut.submit(Incoming::Invalid(ack), false, model.now);
                model.malformed(MIDS[*mid]);
            }
            Op::Event(ev) => {
                let applied = sut.event(ev, model.now);
                prop_assert_eq!(applied, model.event(ev), "event {:?}", ev);
            }
            Op::Advance { ms } => model.now += i64::from(*ms),
            Op::Deliver { pick } => {
                if !model.pending.is_empty() {
                    let (seq, _, _) = model.pending.remove(pick % model.pending.len());
                    sut.store().delivered(seq).expect("delivered");
                }
            }
            Op::Restart => {
                sut.store = None;
                sut.store = Some(Store::open(dir, DEVICE).expect("reopen"));
            }
        }
        check(&model, sut.store())?;
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn store_and_machine_agree_with_the_model(
        reports in prop::bool::weighted(0.8),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let tmp = tempfile::tempdir().expect("tempdir");
        run(tmp.path(), reports, &ops)?;
    }
}
