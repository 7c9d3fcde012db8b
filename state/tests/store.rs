//! Tests of the sled store: round trips of every record, the schema check,
//! the directory's mode, the outbox's order and messageIds, delivery, the
//! read methods, and the refusals that guard against a stale view.

mod common;

use common::*;
use fwagent_state::store::SCHEMA_VERSION;
use fwagent_state::{
    ack_no, on_request, transition, Ack, Event, Incoming, Job, Outcome, Outgoing, Phase, PhaseName,
    Policy, RequestView, Store, StoreError, Transition,
};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const DEVICE: &str = "gw-7";

fn open(dir: &Path) -> Store {
    Store::open(dir, DEVICE).expect("store opens")
}

/// Submit a valid request the way the runtime does: view, decide, commit.
fn submit(store: &Store, mid: &str, md5: &str) -> (Transition, Vec<fwagent_state::OutboxEntry>) {
    let view = store.request_view(mid, None).expect("view");
    let t = on_request(&view, valid(mid, md5), t0());
    let entries = store.commit(&t).expect("commit");
    (t, entries)
}

/// Apply `event` to the active job and commit it.
fn step(store: &Store, event: Event, ms: i64) -> (Transition, Vec<fwagent_state::OutboxEntry>) {
    let job = store.active().expect("read").expect("an active job");
    let t = transition(&job, event, at_ms(ms), &Policy::default()).expect("applies");
    let entries = store.commit(&t).expect("commit");
    (t, entries)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn the_state_directory_is_created_0700() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("a/b/state");
    let _store = open(&dir);
    assert_eq!(mode(&dir), 0o700);
    assert!(dir.join("db").is_dir());
}

/// A new store is built in `db.new` and renamed into place whole (sled
/// writes its `conf` unsynced: a cut during creation must leave no store
/// rather than one with an empty `conf`); what a cut left there is removed.
#[test]
fn a_new_store_is_created_beside_and_renamed_whole() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("state");
    std::fs::create_dir_all(dir.join("db.new")).expect("mkdir");
    std::fs::write(dir.join("db.new/conf"), b"").expect("a half-made store");
    let store = open(&dir);
    assert!(!dir.join("db.new").exists(), "the leftover is gone");
    let conf = std::fs::read(dir.join("db/conf")).expect("sled's conf");
    assert!(!conf.is_empty(), "sled's conf is whole");
    let t = on_request(&RequestView::default(), valid("MID:a", &md5('a')), t0());
    store.commit(&t).expect("commit");
    drop(store);
    let again = open(&dir);
    assert!(
        again.active().expect("read").is_some(),
        "the renamed store is the one in use"
    );
}

#[test]
fn an_existing_state_directory_is_made_0700() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("state");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let _store = open(&dir);
    assert_eq!(mode(&dir), 0o700);
}

#[test]
fn a_new_store_is_empty() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let view = store.request_view("MID:x", Some(5)).expect("view");
    assert_eq!(view.previous, None);
    assert_eq!(view.active, None);
    assert_eq!(view.next_id, 1);
    assert_eq!(view.free_bytes, Some(5));
    assert_eq!(store.active().expect("read"), None);
    assert_eq!(store.latest().expect("read"), None);
    assert!(store.history(None).expect("read").is_empty());
    assert!(store.pending_outbox().expect("read").is_empty());
    assert_eq!(store.job(1).expect("read"), None);
    assert_eq!(store.job_by_message_id("MID:x").expect("read"), None);
    assert!(store.log(1).expect("read").is_empty());
    assert!(store.outbox_of(1).expect("read").is_empty());
}

#[test]
fn an_accept_round_trips() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let (t, entries) = submit(&store, "MID:a", &md5('a'));
    let job = t.job.clone().expect("accepted");
    assert_eq!(job.id, 1);

    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].seq, 1);
    assert_eq!(entries[0].message_id, "MID:a", "an ack keeps its messageId");
    assert_eq!(entries[0].job, Some(1));
    assert_eq!(entries[0].message, t.outbox[0]);

    assert_eq!(store.job(1).expect("read"), Some(job.clone()));
    assert_eq!(
        store.job_by_message_id("MID:a").expect("read"),
        Some(job.clone())
    );
    assert_eq!(store.active().expect("read"), Some(job.clone()));
    assert_eq!(store.latest().expect("read"), Some(job.clone()));
    assert_eq!(
        store.log(1).expect("read"),
        vec![t.log.clone().expect("log")]
    );
    assert_eq!(store.pending_outbox().expect("read"), entries);
    assert_eq!(
        store.outbox_of(1).expect("read"),
        vec![(entries[0].clone(), None)]
    );

    let view = store.request_view("MID:a", None).expect("view");
    assert_eq!(view.previous, t.record_ack);
    assert_eq!(view.active, Some(job));
    assert_eq!(view.next_id, 2);
}

#[test]
fn credentials_survive_for_resuming() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    submit(&store, "MID:a", &md5('a'));
    drop(store);
    let job = open(tmp.path()).job(1).expect("read").expect("the job");
    assert_eq!(job.request.source.password.expose(), "hunter2");
    assert_eq!(job.request.source.user.expose(), "user");
    assert_eq!(
        job.request.pass_port.as_ref().map(|s| s.expose()),
        Some("pass-port-secret")
    );
}

/// The report `n` of a store, as a number: `MID:gw-7-<n>`.
fn report_number(id: &str) -> u64 {
    let n = id.strip_prefix("MID:gw-7-").expect("MID:<deviceId>-<n>");
    n.parse().expect("<n> is a number")
}

/// Report messageIds keep the documented form `MID:<deviceId>-<n>`, run in
/// the outbox's order, stay the same when the store is reopened, and differ
/// between two stores of one device (a store wiped and created again, two
/// gateways with one host name), so a cloud that deduplicates by messageId
/// drops none. Before, every store began at `MID:gw-7-1`.
#[test]
fn report_message_ids_differ_between_stores_of_one_device() {
    let mut firsts = Vec::new();
    for _ in 0..2 {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = open(tmp.path());
        submit(&store, "MID:a", &md5('a'));
        let (_, started) = step(&store, Event::START, 0);
        let (_, downloaded) = step(&store, Event::Downloaded, 1);
        let first = report_number(&started[0].message_id);
        assert_eq!(report_number(&downloaded[0].message_id), first + 1);
        drop(store);
        let again = open(tmp.path());
        assert_eq!(again.report_message_id(2), started[0].message_id);
        firsts.push(first);
    }
    assert_ne!(firsts[0], firsts[1]);
}

#[test]
fn reports_get_device_message_ids_in_seq_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    submit(&store, "MID:a", &md5('a'));
    let (_, started) = step(&store, Event::START, 0);
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].seq, 2);
    assert_eq!(started[0].message_id, store.report_message_id(2));
    assert!(matches!(started[0].message, Outgoing::Progress { .. }));
    step(&store, Event::Downloaded, 1);
    step(&store, Event::Verified, 2);
    let (_, done) = step(&store, Event::Flashed { reboot: false }, 3);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].message_id, store.report_message_id(5));

    let pending = store.pending_outbox().expect("read");
    let seqs: Vec<u64> = pending.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    let ids: Vec<String> = pending.iter().map(|e| e.message_id.clone()).collect();
    let mut want = vec!["MID:a".to_string()];
    want.extend((2..=5).map(|seq| store.report_message_id(seq)));
    assert_eq!(ids, want);
    // The transition log, in order.
    let log: Vec<PhaseName> = store.log(1).expect("read").iter().map(|e| e.to).collect();
    assert_eq!(
        log,
        vec![
            PhaseName::Accepted,
            PhaseName::Downloading,
            PhaseName::Verifying,
            PhaseName::Flashing,
            PhaseName::Completed
        ]
    );
}

#[test]
fn a_terminal_job_is_no_longer_active_but_still_latest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    submit(&store, "MID:a", &md5('a'));
    let (t, _) = step(&store, Event::Cancel, 1);
    let cancelled = t.job.expect("job");
    assert_eq!(cancelled.phase, Phase::Cancelled);
    assert_eq!(store.active().expect("read"), None);
    assert_eq!(store.latest().expect("read"), Some(cancelled));
    let view = store.request_view("MID:b", None).expect("view");
    assert_eq!(view.active, None);
    assert_eq!(view.next_id, 2);
}

#[test]
fn history_is_newest_first_and_latest_prefers_the_active_job() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    for (i, mid) in ["MID:a", "MID:b", "MID:c"].into_iter().enumerate() {
        let (t, _) = submit(&store, mid, &md5('a'));
        assert_eq!(t.job.expect("accepted").id, i as u64 + 1);
        if mid != "MID:c" {
            step(&store, Event::Cancel, 1);
        }
    }
    let ids = |jobs: Vec<Job>| jobs.iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(ids(store.history(None).expect("read")), vec![3, 2, 1]);
    assert_eq!(ids(store.history(Some(2)).expect("read")), vec![3, 2]);
    assert_eq!(
        ids(store.history(Some(0)).expect("read")),
        Vec::<u64>::new()
    );
    assert_eq!(store.latest().expect("read").map(|j| j.id), Some(3));
    assert_eq!(
        store
            .job_by_message_id("MID:b")
            .expect("read")
            .map(|j| j.id),
        Some(2)
    );
}

#[test]
fn rejections_and_duplicates_are_recorded_without_a_job() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let rejection = Ack {
        operator: "setCloudUpgradeConfig".into(),
        session_id: "SID:1".into(),
        message_id: "MID:bad".into(),
        result: Outcome::new(ack_no::INVALID_FIELD, "info.fileInfo.md5sum: not hex"),
    };
    let view = store.request_view("MID:bad", None).expect("view");
    let t = on_request(&view, Incoming::Invalid(rejection.clone()), t0());
    let entries = store.commit(&t).expect("commit");
    assert_eq!(entries[0].job, None);
    assert_eq!(entries[0].message_id, "MID:bad");
    assert!(store.history(None).expect("read").is_empty());

    // The repeat gets the same ack, as a new outbox entry with the same id.
    let view = store.request_view("MID:bad", None).expect("view");
    assert_eq!(view.previous, Some(rejection.clone()));
    let again = on_request(&view, valid("MID:bad", &md5('a')), t0());
    let entries = store.commit(&again).expect("commit");
    assert_eq!(entries[0].seq, 2);
    assert_eq!(entries[0].message, Outgoing::Ack(rejection));
    assert!(store.history(None).expect("read").is_empty());
    assert_eq!(store.pending_outbox().expect("read").len(), 2);
}

#[test]
fn delivered_moves_an_entry_to_sent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    submit(&store, "MID:a", &md5('a'));
    step(&store, Event::START, 0);
    store.delivered(1).expect("delivered");
    store.delivered(1).expect("delivering twice is harmless");

    let pending = store.pending_outbox().expect("read");
    assert_eq!(pending.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2]);
    let all = store.outbox_of(1).expect("read");
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].0.seq, 1);
    let at = all[0].1.expect("a delivery time");
    assert!((time::OffsetDateTime::now_utc() - at).whole_seconds().abs() < 60);
    assert_eq!(all[1].0.seq, 2);
    assert_eq!(all[1].1, None);

    assert!(matches!(
        store.delivered(99),
        Err(StoreError::UnknownOutbox { seq: 99 })
    ));
}

#[test]
fn a_dropped_store_can_be_reopened_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for i in 0..20 {
        let store = open(tmp.path());
        assert_eq!(store.history(None).expect("read").len(), i);
        submit(&store, &format!("MID:{i}"), &md5('a'));
        step(&store, Event::Cancel, 1);
    }
}

#[test]
fn when_commit_returns_the_job_its_log_and_its_outbox_are_on_disk_together() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (job, log, outbox) = {
        let store = open(tmp.path());
        submit(&store, "MID:a", &md5('a'));
        step(&store, Event::START, 0);
        step(&store, Event::Progress { bytes_done: 500 }, 3000);
        step(
            &store,
            Event::Checkpoint {
                offset: 400,
                validator: Some("etag".into()),
            },
            3001,
        );
        store.delivered(2).expect("delivered");
        (
            store.active().expect("read"),
            store.log(1).expect("read"),
            store.outbox_of(1).expect("read"),
        )
    };
    let store = open(tmp.path());
    let reopened = store.active().expect("read");
    assert_eq!(reopened, job);
    assert_eq!(
        reopened.map(|j| j.phase),
        Some(Phase::Downloading { offset: 400 })
    );
    assert_eq!(store.log(1).expect("read"), log);
    assert_eq!(store.outbox_of(1).expect("read"), outbox);
    assert_eq!(store.request_view("MID:b", None).expect("view").next_id, 2);
    // Counters go on where they stopped.
    let (_, entries) = step(&store, Event::Downloaded, 4000);
    assert_eq!(entries[0].seq, 4);
}

#[test]
fn clones_share_one_database() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let other = store.clone();
    submit(&store, "MID:a", &md5('a'));
    assert_eq!(other.active().expect("read").map(|j| j.id), Some(1));
    assert!(format!("{other:?}").contains("gw-7"));
}

#[test]
fn a_second_process_handle_is_refused_while_the_store_is_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let _store = open(tmp.path());
    match Store::open(tmp.path(), DEVICE) {
        Err(e @ StoreError::Locked { .. }) => {
            let StoreError::Locked { path } = &e else {
                unreachable!()
            };
            assert_eq!(path, &tmp.path().join("db"));
            assert!(e.to_string().contains("in use"), "{e}");
        }
        other => panic!("expected Locked, got {other:?}"),
    }
}

// ---- schema and corruption ------------------------------------------------------

fn raw_insert(dir: &Path, tree: &str, key: &[u8], value: &[u8]) {
    let db = raw_sled(dir);
    db.open_tree(tree)
        .expect("tree")
        .insert(key, value)
        .expect("insert");
    db.flush().expect("flush");
}

#[test]
fn a_newer_schema_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    drop(open(tmp.path()));
    raw_insert(
        tmp.path(),
        "meta",
        b"schema",
        &(SCHEMA_VERSION + 1).to_be_bytes(),
    );
    match Store::open(tmp.path(), DEVICE) {
        Err(e @ StoreError::NewerSchema { found, supported }) => {
            assert_eq!(found, SCHEMA_VERSION + 1);
            assert_eq!(supported, SCHEMA_VERSION);
            let text = e.to_string();
            assert!(text.contains("newer"), "{text}");
            assert!(text.contains("refusing"), "{text}");
        }
        other => panic!("expected NewerSchema, got {other:?}"),
    }
}

#[test]
fn a_new_store_is_stamped_with_the_schema() {
    let tmp = tempfile::tempdir().expect("tempdir");
    drop(open(tmp.path()));
    let db = raw_sled(tmp.path());
    let meta = db.open_tree("meta").expect("tree");
    let schema = meta.get("schema").expect("read").expect("stamped");
    assert_eq!(&schema[..], &SCHEMA_VERSION.to_be_bytes());
}

#[test]
fn a_damaged_record_is_reported_not_panicked_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    {
        let store = open(tmp.path());
        submit(&store, "MID:a", &md5('a'));
    }
    raw_insert(tmp.path(), "jobs", &2u64.to_be_bytes(), b"{not json");
    raw_insert(
        tmp.path(),
        "jobs",
        &3u64.to_be_bytes(),
        br#"{"v":"1","id":"hunter2"}"#,
    );
    raw_insert(tmp.path(), "jobs", &4u64.to_be_bytes(), br#"{"v":"9"}"#);
    raw_insert(tmp.path(), "meta", b"next_job", b"short");
    let store = open(tmp.path());
    assert!(store.job(1).expect("job 1 is fine").is_some());

    let corrupt = |r: Result<Option<Job>, StoreError>| match r {
        Err(StoreError::Corrupt { key, why }) => (key, why),
        other => panic!("expected Corrupt, got {other:?}"),
    };
    let (key, _) = corrupt(store.job(2));
    assert_eq!(key, "jobs/2");
    let (key, why) = corrupt(store.job(3));
    assert_eq!(key, "jobs/3");
    assert!(!why.contains("hunter2"), "the content never shows: {why}");
    let (_, why) = corrupt(store.job(4));
    assert!(why.contains("version \"9\""), "{why}");
    assert!(matches!(
        store.history(None),
        Err(StoreError::Corrupt { .. })
    ));
    match store.request_view("MID:b", None) {
        Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "meta/next_job"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

// ---- refusals of a stale view ---------------------------------------------------

#[test]
fn a_second_active_job_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    submit(&store, "MID:a", &md5('a'));
    // A view taken before MID:a was accepted.
    let stale = fwagent_state::RequestView {
        next_id: 2,
        ..Default::default()
    };
    let t = on_request(&stale, valid("MID:b", &md5('b')), t0());
    assert!(matches!(store.commit(&t), Err(StoreError::Conflict { .. })));
    // Nothing of it was written.
    assert_eq!(store.job(2).expect("read"), None);
    assert_eq!(
        store.request_view("MID:b", None).expect("view").previous,
        None
    );
    assert_eq!(store.pending_outbox().expect("read").len(), 1);
}

#[test]
fn a_job_id_taken_by_another_request_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    submit(&store, "MID:a", &md5('a'));
    step(&store, Event::Cancel, 1);
    let stale = fwagent_state::RequestView {
        next_id: 1,
        ..Default::default()
    };
    let t = on_request(&stale, valid("MID:b", &md5('b')), t0());
    assert!(matches!(store.commit(&t), Err(StoreError::Conflict { .. })));
    assert_eq!(
        store.job(1).expect("read").map(|j| j.request.message_id),
        Some("MID:a".to_string())
    );
}

#[test]
fn a_log_entry_without_a_job_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let accepted = on_request(
        &fwagent_state::RequestView::default(),
        valid("MID:a", &md5('a')),
        t0(),
    );
    let t = Transition {
        job: None,
        ..accepted
    };
    assert!(matches!(store.commit(&t), Err(StoreError::Conflict { .. })));
    assert!(store.pending_outbox().expect("read").is_empty());
}

#[test]
fn a_lazy_commit_takes_only_figures_is_read_at_once_and_made_durable_by_the_next_flush() {
    let tmp = tempfile::tempdir().expect("tempdir");
    {
        let store = open(tmp.path());
        submit(&store, "MID:lazy", &md5('l'));
        step(&store, Event::START, 1);
        // A progress figure with no report due: no log, outbox or command.
        let job = store.active().expect("read").expect("active");
        let t = transition(
            &job,
            Event::Progress { bytes_done: 7 },
            at_ms(2),
            &Policy::default(),
        )
        .expect("applies");
        assert!(t.log.is_none() && t.outbox.is_empty() && t.commands.is_empty());
        store.commit_lazily(&job, &t).expect("lazy commit");
        let read = store.active().expect("read").expect("active");
        assert_eq!(read.bytes_done, 7, "read at once");
        // A durable offset is no figure, even with nothing queued or logged.
        let job = store.active().expect("read").expect("active");
        let checkpoint = transition(
            &job,
            Event::Checkpoint {
                offset: 3,
                validator: Some("etag".into()),
            },
            at_ms(2),
            &Policy::default(),
        )
        .expect("applies");
        assert!(checkpoint.log.is_none() && checkpoint.outbox.is_empty());
        assert!(matches!(
            store.commit_lazily(&job, &checkpoint),
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(
            store.active().expect("read").expect("active").phase,
            Phase::Downloading { offset: 0 }
        );
        // Anything that queues, logs or starts something must be flushed.
        let job = store.active().expect("read").expect("active");
        let cancel =
            transition(&job, Event::Cancel, at_ms(3), &Policy::default()).expect("applies");
        assert!(matches!(
            store.commit_lazily(&job, &cancel),
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(
            store.active().expect("read").expect("active").phase,
            job.phase
        );
        // The next durable commit carries the figure with it.
        step(
            &store,
            Event::Checkpoint {
                offset: 5,
                validator: None,
            },
            4,
        );
    }
    let store = open(tmp.path());
    let job = store.active().expect("read").expect("active");
    assert_eq!(
        (job.bytes_done, job.phase),
        (7, Phase::Downloading { offset: 5 })
    );
}

#[test]
fn an_ended_upgrade_and_its_delivered_reports_keep_no_credentials() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    submit(&store, "MID:a", &md5('a'));
    step(&store, Event::START, 0);
    let (t, entries) = step(&store, Event::Cancel, 1);
    // The result report still carries its own passPort to the cloud.
    let result = entries.last().expect("the result report");
    match &result.message {
        Outgoing::Result { subject, .. } => assert_eq!(
            subject.pass_port.as_ref().map(|s| s.expose()),
            Some("pass-port-secret")
        ),
        other => panic!("not a result: {other:?}"),
    }
    assert!(t
        .commands
        .contains(&fwagent_state::Command::Cleanup { job: 1 }));
    for e in store.pending_outbox().expect("read") {
        store.delivered(e.seq).expect("delivered");
    }
    drop(store);
    let store = open(tmp.path());
    let job = store.job(1).expect("read").expect("the job");
    assert_eq!(job.phase, Phase::Cancelled);
    assert!(job.request.source.user.is_empty() && job.request.source.password.is_empty());
    assert_eq!(job.request.pass_port, None);
    for (entry, delivered) in store.outbox_of(1).expect("read") {
        assert!(delivered.is_some());
        if let Outgoing::Progress { subject, .. } | Outgoing::Result { subject, .. } =
            &entry.message
        {
            assert_eq!(subject.pass_port, None, "sent entry {}", entry.seq);
        }
    }
}

/// Every file under `dir` (sled's log, the key files, anything else),
/// searched for each of `needles`: the ones found.
fn found_on_disk(dir: &Path, needles: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).expect("read");
            for n in needles {
                if bytes.windows(n.len()).any(|w| w == n.as_bytes()) {
                    found.push(format!("{n:?} in {}", path.display()));
                }
            }
        }
    }
    found
}

/// The forms a credential could be found in: plain, and base64 as the
/// request carried it (unpadded, so a padded copy matches too).
fn plain_and_base64(secret: &str) -> Vec<String> {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in secret.as_bytes().chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            b64.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    vec![secret.to_string(), b64]
}

/// Issue 16, item 2: many commits of an upgrade (lazy progress ones too)
/// and a restart in the middle; once it has ended and its reports are
/// delivered, no byte sequence of its user name, password or passPort is
/// left anywhere under the state directory, while the restart still
/// resumed with all three.
#[test]
fn no_copy_of_an_ended_upgrades_credentials_is_left_on_disk() {
    const USER: &str = "op-Qz81-gw-user";
    const PASSWORD: &str = "pw-Lk29-zz!Tq";
    const PASS_PORT: &str = "pp-Hx55-token-W";
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let mut req = request("MID:s", &md5('a'));
    req.source.user = fwagent_state::Secret::new(USER);
    req.source.password = fwagent_state::Secret::new(PASSWORD);
    req.pass_port = Some(fwagent_state::Secret::new(PASS_PORT));
    let view = store.request_view("MID:s", None).expect("view");
    store
        .commit(&on_request(&view, Incoming::Valid(Box::new(req)), t0()))
        .expect("commit");
    step(&store, Event::START, 0);
    let progress = |store: &Store, from: u64, ms: i64| {
        for i in from..from + 10 {
            let job = store.active().expect("read").expect("active");
            let bytes_done = i * 40;
            let t = transition(
                &job,
                Event::Progress { bytes_done },
                at_ms(ms),
                &Policy::default(),
            )
            .expect("applies");
            store.commit_lazily(&job, &t).expect("lazy commit");
            let job = store.active().expect("read").expect("active");
            let checkpoint = Event::Checkpoint {
                offset: bytes_done,
                validator: None,
            };
            let t = transition(&job, checkpoint, at_ms(ms), &Policy::default()).expect("applies");
            store.commit(&t).expect("commit");
        }
    };
    progress(&store, 1, 1);
    drop(store);

    // A restart: the upgrade resumes with its credentials, and its reports
    // still to be sent carry their passPort.
    let store = open(tmp.path());
    let job = store.active().expect("read").expect("active");
    assert_eq!(job.request.source.user.expose(), USER);
    assert_eq!(job.request.source.password.expose(), PASSWORD);
    assert_eq!(
        job.request.pass_port.as_ref().map(|s| s.expose()),
        Some(PASS_PORT)
    );
    let pending = store.pending_outbox().expect("read");
    assert!(
        pending
            .iter()
            .any(|e| matches!(e.message, Outgoing::Progress { .. })),
        "reports wait: {pending:?}"
    );
    for e in &pending {
        if let Outgoing::Progress { subject, .. } | Outgoing::Result { subject, .. } = &e.message {
            assert_eq!(
                subject.pass_port.as_ref().map(|s| s.expose()),
                Some(PASS_PORT)
            );
        }
    }
    progress(&store, 11, 2);
    step(&store, Event::Cancel, 3);
    for e in store.pending_outbox().expect("read") {
        store.delivered(e.seq).expect("delivered");
    }
    drop(store);

    let mut needles = Vec::new();
    for s in [USER, PASSWORD, PASS_PORT] {
        needles.extend(plain_and_base64(s));
    }
    assert_eq!(found_on_disk(tmp.path(), &needles), Vec::<String>::new());
    // The search reads sled's files: the request's messageId is there.
    assert!(!found_on_disk(tmp.path(), &["SID:MID:s".to_string()]).is_empty());
}

/// The store keeps an upgrade's key until its last report is delivered:
/// a result still waiting after a restart carries its passPort; its
/// delivery shreds the key.
#[test]
fn an_ended_upgrades_key_lives_until_its_last_report_is_delivered() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    submit(&store, "MID:a", &md5('a'));
    step(&store, Event::START, 0);
    step(&store, Event::Cancel, 1);
    let key = tmp.path().join("keys/1");
    assert!(key.exists(), "reports wait: the key stays");
    drop(store);
    let store = open(tmp.path());
    let pending = store.pending_outbox().expect("read");
    let result = pending.last().expect("the result waits");
    match &result.message {
        Outgoing::Result { subject, .. } => assert_eq!(
            subject.pass_port.as_ref().map(|s| s.expose()),
            Some("pass-port-secret")
        ),
        other => panic!("not a result: {other:?}"),
    }
    let job = store.job(1).expect("read").expect("the job");
    assert!(
        job.request.source.password.is_empty(),
        "an ended job keeps none"
    );
    for e in &pending {
        assert!(key.exists(), "before the last delivery");
        store.delivered(e.seq).expect("delivered");
    }
    assert!(!key.exists(), "the last delivery shreds the key");
}

/// What a cut can leave behind is finished on open: a key whose job was
/// never committed, a half-written key, and a sealed record whose key is
/// already gone.
#[test]
fn open_shreds_what_a_cut_left() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    submit(&store, "MID:a", &md5('a'));
    step(&store, Event::START, 0);
    step(&store, Event::Cancel, 1);
    drop(store);
    let keys = tmp.path().join("keys");
    // A cut between the key's deletion and its record's.
    std::fs::remove_file(keys.join("1")).expect("rm");
    // A key written for a job whose commit a cut lost, and one cut short.
    std::fs::write(keys.join("7"), [1u8; 32]).expect("write");
    std::fs::write(keys.join("8.new"), [1u8; 5]).expect("write");
    let store = open(tmp.path());
    let left: Vec<_> = std::fs::read_dir(&keys)
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, Vec::<std::ffi::OsString>::new());
    drop(store);
    let db = raw_sled(tmp.path());
    let secrets = db.open_tree("secrets").expect("tree");
    assert_eq!(secrets.len(), 0, "the sealed record went with its key");
}

/// A schema-1 store kept an active upgrade's credentials in its record: it
/// is stamped 2, the upgrade resumes with them, and its next commit seals
/// them apart.
#[test]
fn a_schema_1_store_moves_the_active_credentials_into_the_vault() {
    let tmp = tempfile::tempdir().expect("tempdir");
    drop(open(tmp.path()));
    let mut job = job_in(Phase::Accepted);
    job.request.source.password = fwagent_state::Secret::new("pw-from-schema-1");
    let mut record = serde_json::to_value(&job).expect("json");
    record["v"] = "1".into();
    {
        let db = raw_sled(tmp.path());
        let tree = |name: &str| db.open_tree(name).expect("tree");
        tree("meta")
            .insert("schema", &1u64.to_be_bytes())
            .expect("insert");
        tree("meta")
            .insert("active", &1u64.to_be_bytes())
            .expect("insert");
        let record = record.to_string();
        tree("jobs")
            .insert(1u64.to_be_bytes(), record.as_bytes())
            .expect("insert");
        tree("job_by_message_id")
            .insert("MID:req-1", &1u64.to_be_bytes())
            .expect("insert");
        db.flush().expect("flush");
    }
    let store = open(tmp.path());
    let active = store.active().expect("read").expect("active");
    assert_eq!(active.request.source.password.expose(), "pw-from-schema-1");
    step(&store, Event::START, 0);
    drop(store);
    let store = open(tmp.path());
    let job = store.active().expect("read").expect("active");
    assert_eq!(job.request.source.password.expose(), "pw-from-schema-1");
    drop(store);
    let db = raw_sled(tmp.path());
    let meta = db.open_tree("meta").expect("tree");
    assert_eq!(
        &meta.get("schema").expect("read").expect("stamped")[..],
        &2u64.to_be_bytes()
    );
    let stored = db.open_tree("jobs").expect("tree").get(1u64.to_be_bytes());
    let stored =
        String::from_utf8(stored.expect("read").expect("the job").to_vec()).expect("utf-8");
    assert!(!stored.contains("pw-from-schema-1"), "{stored}");
    assert_eq!(db.open_tree("secrets").expect("tree").len(), 1);
}

/// Issue 16, item 5, through the store: a request that joined the active
/// upgrade is indexed to it, its waiting reports keep its passPort over a
/// restart, both requests get a result, and a replay of it after the end
/// gets its first ack again, which claims nothing is in progress.
#[test]
fn a_joined_request_gets_the_reports_over_a_restart_and_its_ack_on_replay() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    submit(&store, "MID:a", &md5('a'));
    step(&store, Event::START, 0);
    let mut second = request("MID:b", &md5('a'));
    second.pass_port = Some(fwagent_state::Secret::new("pp-of-b"));
    let view = store.request_view("MID:b", None).expect("view");
    let t = on_request(&view, Incoming::Valid(Box::new(second.clone())), t0());
    store.commit(&t).expect("commit");
    let first_ack = store.pending_outbox().expect("read").last().cloned();
    assert_eq!(
        store
            .job_by_message_id("MID:b")
            .expect("read")
            .map(|j| j.id),
        Some(1)
    );
    drop(store);

    let store = open(tmp.path());
    step(&store, Event::Cancel, 5);
    let results: Vec<(String, Option<String>)> = store
        .pending_outbox()
        .expect("read")
        .into_iter()
        .filter_map(|e| match e.message {
            Outgoing::Result { subject, .. } => Some((
                subject.request_message_id,
                subject.pass_port.map(|p| p.expose().to_string()),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        results,
        [
            ("MID:a".to_string(), Some("pass-port-secret".to_string())),
            ("MID:b".to_string(), Some("pp-of-b".to_string()))
        ]
    );
    for e in store.pending_outbox().expect("read") {
        store.delivered(e.seq).expect("delivered");
    }
    let view = store.request_view("MID:b", None).expect("view");
    let replay = on_request(&view, Incoming::Valid(Box::new(second)), at_ms(10));
    let Some(Outgoing::Ack(ack)) = replay.outbox.first() else {
        panic!("an ack: {replay:?}");
    };
    assert_eq!(ack.result.description, "ok: joined upgrade MID:a");
    assert_eq!(
        first_ack.map(|e| e.message),
        Some(Outgoing::Ack(ack.clone()))
    );
    assert!(replay.job.is_none() && replay.commands.is_empty());
}

/// A request refused with 4, its ack delivered.
fn refuse(store: &Store, mid: &str) {
    let rejection = Ack {
        operator: "setCloudUpgradeConfig".into(),
        session_id: format!("SID:{mid}"),
        message_id: mid.into(),
        result: Outcome::new(ack_no::INVALID_FIELD, "info.fileInfo.md5sum: not hex"),
    };
    let view = store.request_view(mid, None).expect("view");
    let entries = store
        .commit(&on_request(&view, Incoming::Invalid(rejection), t0()))
        .expect("commit");
    for e in entries {
        store.delivered(e.seq).expect("delivered");
    }
}

/// Deliver what waits, but the reports of the upgrades in `keep`.
fn deliver_all_but(store: &Store, keep: &[u64]) {
    for e in store.pending_outbox().expect("read") {
        if !e.job.is_some_and(|j| keep.contains(&j)) {
            store.delivered(e.seq).expect("delivered");
        }
    }
}

/// An upgrade from request to cancelled, its reports delivered (but those
/// of the upgrades in `keep`).
fn upgrade_and_cancel(store: &Store, mid: &str, keep: &[u64]) {
    submit(store, mid, &md5('a'));
    step(store, Event::START, 0);
    step(store, Event::Cancel, 1);
    deliver_all_but(store, keep);
}

fn tree_len(dir: &Path, tree: &str) -> usize {
    let db = raw_sled(dir);
    let tree = db.open_tree(tree).expect("tree");
    tree.len()
}

const SMALL: fwagent_state::store::Limits = fwagent_state::store::Limits {
    ended_jobs: 3,
    answered: 20,
    sent_without_job: 5,
    prune_every: 4,
    compact_above: u64::MAX,
};

/// Issue 16, item 1: after many ended upgrades and refused requests the
/// store holds what its limits keep and no more; a repeat within the
/// answered window gets its ack again, one beyond it is decided afresh.
#[test]
fn the_store_keeps_what_has_ended_within_its_limits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with_limits(tmp.path(), DEVICE, SMALL).expect("opens");
    for i in 0..30 {
        upgrade_and_cancel(&store, &format!("MID:u{i}"), &[]);
    }
    for i in 0..100 {
        refuse(&store, &format!("MID:r{i}"));
    }
    store.prune().expect("prune");
    let ids: Vec<u64> = store
        .history(None)
        .expect("read")
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, [30, 29, 28], "the newest ended upgrades");
    assert!(store.job_by_message_id("MID:u0").expect("read").is_none());
    assert_eq!(store.log(1).expect("read"), []);
    assert!(store.outbox_of(1).expect("read").is_empty());
    assert!(!store.log(30).expect("read").is_empty());
    let view = store.request_view("MID:r99", None).expect("view");
    assert_eq!(
        view.previous.map(|a| a.result.error_no),
        Some(ack_no::INVALID_FIELD)
    );
    let view = store.request_view("MID:r0", None).expect("view");
    assert_eq!(view.previous, None, "beyond the window");
    drop(store);
    assert_eq!(tree_len(tmp.path(), "acks"), 20);
    assert_eq!(tree_len(tmp.path(), "acks_order"), 20);
    assert_eq!(tree_len(tmp.path(), "jobs"), 3);
    assert_eq!(tree_len(tmp.path(), "job_by_message_id"), 3);
    let per_job = tree_len(tmp.path(), "outbox_by_job") / 3;
    assert_eq!(tree_len(tmp.path(), "sent"), 3 * per_job + 5);
    assert_eq!(tree_len(tmp.path(), "outbox"), 0);
}

/// Pruning never takes the upgrade under way, its requests' answers, or an
/// ended upgrade whose report still waits for delivery.
#[test]
fn pruning_keeps_the_active_upgrade_and_what_waits_for_delivery() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with_limits(tmp.path(), DEVICE, SMALL).expect("opens");
    // Job 1 ends, and its result is never delivered.
    upgrade_and_cancel(&store, "MID:undelivered", &[1]);
    for i in 0..10 {
        upgrade_and_cancel(&store, &format!("MID:u{i}"), &[1]);
    }
    // The upgrade under way, answered before 100 other answers.
    submit(&store, "MID:active", &md5('c'));
    step(&store, Event::START, 2);
    deliver_all_but(&store, &[1]);
    for i in 0..100 {
        refuse(&store, &format!("MID:r{i}"));
    }
    store.prune().expect("prune");
    let active = store.active().expect("read").expect("still active");
    assert_eq!(active.request.message_id, "MID:active");
    let view = store.request_view("MID:active", None).expect("view");
    assert!(view.previous.is_some(), "its answer is kept");
    let kept = store.job(1).expect("read").expect("job 1 is kept");
    assert!(kept.phase.is_terminal());
    let waiting = store.pending_outbox().expect("read");
    assert!(!waiting.is_empty() && waiting.iter().all(|e| e.job == Some(1)));
    let ids: Vec<u64> = store
        .history(None)
        .expect("read")
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(
        ids,
        [12, 11, 10, 9, 1],
        "the active one, three ended, and job 1"
    );
    // Delivered at last, job 1 goes with the next prune.
    deliver_all_but(&store, &[]);
    store.prune().expect("prune");
    assert!(store.job(1).expect("read").is_none());
}

/// A store grown past its threshold is copied whole when it opens: every
/// record is kept, the data file is smaller, and what a cut left of an
/// earlier copy is removed.
#[test]
fn a_large_store_is_compacted_when_it_opens_and_keeps_every_record() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let limits = fwagent_state::store::Limits {
        compact_above: 0,
        ..SMALL
    };
    let store = Store::open_with_limits(tmp.path(), DEVICE, SMALL).expect("opens");
    for i in 0..10 {
        upgrade_and_cancel(&store, &format!("MID:u{i}"), &[]);
    }
    submit(&store, "MID:active", &md5('c'));
    for i in 0..1000 {
        refuse(&store, &format!("MID:r{i}"));
    }
    let history = store.history(None).expect("read");
    let pending = store.pending_outbox().expect("read");
    drop(store);
    let data = tmp.path().join("db/db");
    let before = std::fs::metadata(&data).expect("stat").len();
    std::fs::create_dir(tmp.path().join("db.new")).expect("a leftover");
    std::fs::write(tmp.path().join("db.new/db"), b"left by a cut").expect("write");

    let store = Store::open_with_limits(tmp.path(), DEVICE, limits).expect("opens");
    let after = std::fs::metadata(&data).expect("stat").len();
    assert!(after < before, "compacted: {before} -> {after} bytes");
    assert!(!tmp.path().join("db.new").exists());
    assert_eq!(store.history(None).expect("read"), history);
    assert_eq!(store.pending_outbox().expect("read"), pending);
    let view = store.request_view("MID:r999", None).expect("view");
    assert_eq!(
        view.previous.map(|a| a.result.error_no),
        Some(ack_no::INVALID_FIELD)
    );
    let job = store.active().expect("read").expect("active");
    assert_eq!(
        job.request.source.password.expose(),
        "hunter2",
        "the key still opens it"
    );
    // It works as ever after the copy.
    step(&store, Event::START, 0);
}

/// Issue 16, item 11: a store sled will not open is moved aside (0700, kept
/// for inspection) and a fresh one is seeded from the redundant record: the
/// upgrade under way resumes at its durable offset with its credentials,
/// and every answered messageId still gets its ack.
#[test]
fn a_store_that_will_not_open_is_moved_aside_and_the_upgrade_resumes_from_its_record() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    for i in 0..3 {
        refuse(&store, &format!("MID:r{i}"));
    }
    submit(&store, "MID:a", &md5('a'));
    step(&store, Event::START, 0);
    let checkpoint = Event::Checkpoint {
        offset: 400,
        validator: Some("\"etag-1\"".into()),
    };
    step(&store, checkpoint, 1);
    let answers: Vec<_> = ["MID:r0", "MID:r1", "MID:r2", "MID:a"]
        .iter()
        .map(|m| store.request_view(m, None).expect("view").previous)
        .collect();
    assert!(answers.iter().all(Option::is_some));
    drop(store);
    // Damage sled's files the way an abrupt stop can leave them.
    std::fs::write(tmp.path().join("db/conf"), b"\x00garbage\x01").expect("write");
    let data = tmp.path().join("db/db");
    let len = std::fs::metadata(&data).expect("stat").len();
    std::fs::write(&data, vec![0xA5u8; len as usize]).expect("write");
    assert!(
        Store::open(tmp.path(), DEVICE).is_err(),
        "sled no longer opens it"
    );

    let (store, recovered) = Store::open_or_recover(tmp.path(), DEVICE).expect("recovers");
    let r = recovered.expect("it was recovered");
    assert!(
        r.moved_to.join("conf").exists(),
        "kept: {}",
        r.moved_to.display()
    );
    assert_eq!(mode(&r.moved_to), 0o700);
    assert_eq!(r.active.as_deref(), Some("MID:a"));
    assert_eq!(r.answered, 4);
    let job = store.active().expect("read").expect("resumed");
    assert_eq!(job.phase, Phase::Downloading { offset: 400 });
    assert_eq!(job.validator.as_deref(), Some("\"etag-1\""));
    assert_eq!(job.request.source.password.expose(), "hunter2");
    let again: Vec<_> = ["MID:r0", "MID:r1", "MID:r2", "MID:a"]
        .iter()
        .map(|m| store.request_view(m, None).expect("view").previous)
        .collect();
    assert_eq!(again, answers);
    let log = store.log(job.id).expect("read");
    assert!(
        log.last().expect("a line").event.contains("would not open"),
        "{log:?}"
    );
    // It carries on, and a healthy store is opened as it is.
    step(&store, Event::Downloaded, 2);
    drop(store);
    let (store, none) = Store::open_or_recover(tmp.path(), DEVICE).expect("opens");
    assert!(none.is_none());
    assert_eq!(
        store.active().expect("read").expect("active").phase,
        Phase::Verifying
    );
}
