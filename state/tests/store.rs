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
    let db = sled::open(dir.join("db")).expect("sled opens");
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
    let db = sled::open(tmp.path().join("db")).expect("sled opens");
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
