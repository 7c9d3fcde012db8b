//! Unit tests of the pure state machine: every transition of `on_request`
//! and `transition`, and every refusal.

mod common;

use common::*;
use fwagent_state::{
    ack_no, on_request, result_no, transition, Ack, Command, Event, Failure, Incoming, Job,
    Outcome, Outgoing, Phase, PhaseName, Pieces, Policy, ProgressMark, Refused, RequestView,
    Transition,
};
use std::time::Duration;

fn policy() -> Policy {
    Policy::default()
}

fn apply(job: &Job, event: Event, ms: i64) -> Transition {
    transition(job, event, at_ms(ms), &policy()).expect("event applies")
}

fn job_after(job: &Job, event: Event, ms: i64) -> Job {
    apply(job, event, ms).job.expect("a job record")
}

fn only_ack(t: &Transition) -> &Ack {
    match t.outbox.as_slice() {
        [Outgoing::Ack(ack)] => ack,
        other => panic!("expected one ack, got {other:?}"),
    }
}

/// A job that has just started downloading.
fn downloading() -> Job {
    job_after(&job_in(Phase::Accepted), Event::START, 0)
}

fn at_phase(phase: Phase, attempts: u32) -> Job {
    Job {
        attempts,
        ..job_in(phase)
    }
}

// ---- on_request ---------------------------------------------------------------

#[test]
fn accept_records_job_log_ack_and_begins() {
    let view = RequestView {
        next_id: 7,
        ..RequestView::default()
    };
    let t = on_request(&view, valid("MID:a", &md5('a')), t0());
    let job = t.job.clone().expect("a job");
    assert_eq!(job.id, 7);
    assert_eq!(job.phase, Phase::Accepted);
    assert_eq!(job.attempts, 0);
    assert_eq!(job.result, None);
    assert_eq!(job.created_at, t0());
    let log = t.log.clone().expect("a log entry");
    assert_eq!((log.from, log.to), (None, PhaseName::Accepted));
    let ack = only_ack(&t);
    assert_eq!(ack.message_id, "MID:a");
    assert_eq!(ack.session_id, "SID:MID:a");
    assert_eq!(ack.operator, "setCloudUpgradeConfig");
    assert_eq!(ack.result, Outcome::ok());
    assert_eq!(t.record_ack.as_ref(), Some(ack));
    assert_eq!(t.commands, vec![Command::Begin { job: 7 }]);
}

#[test]
fn duplicate_message_id_gets_the_same_ack_and_nothing_new() {
    let first = on_request(&RequestView::default(), valid("MID:a", &md5('a')), t0());
    let previous = first.record_ack.clone().expect("recorded");
    let view = RequestView {
        previous: Some(previous.clone()),
        active: first.job.clone(),
        next_id: 2,
        free_bytes: Some(0),
        supported: None,
    };
    // Even a different md5, or a malformed resend, gets the first answer.
    for incoming in [
        valid("MID:a", &md5('a')),
        valid("MID:a", &md5('b')),
        Incoming::Invalid(Ack {
            operator: "setCloudUpgradeConfig".into(),
            session_id: "SID:x".into(),
            message_id: "MID:a".into(),
            result: Outcome::new(ack_no::INVALID_FIELD, "info.fileInfo.md5sum: not hex"),
        }),
    ] {
        let t = on_request(&view, incoming, at_ms(10));
        assert_eq!(only_ack(&t), &previous);
        assert_eq!(t.job, None);
        assert_eq!(t.log, None);
        assert_eq!(t.record_ack, None);
        assert!(t.commands.is_empty());
    }
}

#[test]
fn empty_message_id_is_never_a_duplicate() {
    let previous = Ack {
        operator: "setCloudUpgradeConfig".into(),
        session_id: String::new(),
        message_id: String::new(),
        result: Outcome::new(ack_no::MALFORMED, "not JSON"),
    };
    let view = RequestView {
        previous: Some(previous),
        ..RequestView::default()
    };
    let t = on_request(&view, valid("", &md5('a')), t0());
    assert!(
        t.job.is_some(),
        "a request without messageId is decided afresh"
    );
}

/// Issue 16, item 5: another messageId for the active upgrade's image
/// joins it (ack 0 naming it) and gets its reports; the ack says nothing a
/// replay after the end would make untrue.
#[test]
fn same_image_under_another_message_id_joins_the_active_upgrade() {
    let view = RequestView {
        active: Some(downloading()),
        next_id: 2,
        ..RequestView::default()
    };
    let mut second = request("MID:b", &md5('a'));
    second.pass_port = Some(fwagent_state::Secret::new("pp-b"));
    let t = on_request(&view, Incoming::Valid(Box::new(second)), t0());
    let ack = only_ack(&t);
    assert_eq!(
        ack.result,
        Outcome::new(ack_no::OK, "ok: joined upgrade MID:req-1")
    );
    assert_eq!(ack.message_id, "MID:b");
    assert_eq!(t.record_ack.as_ref(), Some(ack));
    assert!(t.commands.is_empty(), "nothing new starts");
    let job = t.job.expect("the active upgrade, joined");
    assert_eq!((job.id, job.phase), (1, Phase::Downloading { offset: 0 }));
    assert_eq!(job.joined.len(), 1);
    // Its reports go to both requests, each with its own passPort.
    let t = transition(&job, Event::Cancel, at_ms(5), &Policy::default()).expect("applies");
    let results: Vec<_> = t
        .outbox
        .iter()
        .filter_map(|m| match m {
            Outgoing::Result { subject, .. } => Some((
                subject.request_message_id.as_str(),
                subject.pass_port.as_ref().map(|p| p.expose().to_string()),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        results,
        [
            ("MID:req-1", Some("pass-port-secret".to_string())),
            ("MID:b", Some("pp-b".to_string()))
        ]
    );
    let ended = t.job.expect("the job");
    assert!(ended.joined.iter().all(|j| j.pass_port.is_none()));
}

/// The same size is part of the same image; and joins are bounded.
#[test]
fn another_size_or_one_join_too_many_is_busy() {
    let mut active = downloading();
    let mut other_size = request("MID:b", &md5('a'));
    other_size.firmware.size += 1;
    let view = RequestView {
        active: Some(active.clone()),
        next_id: 2,
        ..RequestView::default()
    };
    let t = on_request(&view, Incoming::Valid(Box::new(other_size)), t0());
    assert_eq!(only_ack(&t).result.error_no, ack_no::BUSY);
    for i in 0..Job::MAX_JOINED {
        let view = RequestView {
            active: Some(active.clone()),
            ..RequestView::default()
        };
        let t = on_request(&view, valid(&format!("MID:j{i}"), &md5('a')), t0());
        active = t.job.expect("joined");
    }
    let view = RequestView {
        active: Some(active),
        ..RequestView::default()
    };
    let t = on_request(&view, valid("MID:late", &md5('a')), t0());
    assert_eq!(only_ack(&t).result.error_no, ack_no::BUSY);
    assert_eq!(t.job, None);
}

#[test]
fn another_md5_while_active_is_busy_6() {
    let view = RequestView {
        active: Some(downloading()),
        next_id: 2,
        ..RequestView::default()
    };
    let t = on_request(&view, valid("MID:b", &md5('b')), t0());
    let ack = only_ack(&t);
    assert_eq!(ack.result.error_no, ack_no::BUSY);
    assert!(ack.result.description.contains("MID:req-1"), "{ack:?}");
    assert_eq!(t.record_ack.as_ref(), Some(ack));
    assert_eq!(t.job, None);
}

/// A protocol the agent has no fetcher for is refused with 5, before busy
/// and storage are looked at, and the answer is recorded like any other.
#[test]
fn an_unsupported_protocol_is_5_and_recorded() {
    let view = RequestView {
        supported: Some([fwagent_state::Protocol::Ftp].into_iter().collect()),
        active: Some(job_in(Phase::Flashing)),
        free_bytes: Some(0),
        ..RequestView::default()
    };
    let t = on_request(&view, valid("MID:h", &md5('b')), t0());
    let ack = only_ack(&t);
    assert_eq!(ack.result.error_no, ack_no::UNSUPPORTED_PROTOCOL);
    assert!(ack.result.description.contains("http"), "{:?}", ack.result);
    assert_eq!(t.record_ack.as_ref(), Some(ack));
    assert!(t.job.is_none());
    // Supported: decided as before (busy here).
    let view = RequestView {
        supported: Some([fwagent_state::Protocol::Http].into_iter().collect()),
        ..view
    };
    let t = on_request(&view, valid("MID:h", &md5('b')), t0());
    assert_eq!(only_ack(&t).result.error_no, ack_no::BUSY);
}

#[test]
fn not_enough_storage_is_7_with_both_numbers() {
    let view = RequestView {
        free_bytes: Some(SIZE - 1),
        supported: None,
        next_id: 1,
        ..RequestView::default()
    };
    let t = on_request(&view, valid("MID:a", &md5('a')), t0());
    let ack = only_ack(&t);
    assert_eq!(ack.result.error_no, ack_no::NO_STORAGE);
    assert!(ack.result.description.contains(&SIZE.to_string()));
    assert!(ack.result.description.contains(&(SIZE - 1).to_string()));
    assert_eq!(t.record_ack.as_ref(), Some(ack));
    assert_eq!(t.job, None);

    for free in [Some(SIZE), None] {
        let view = RequestView {
            free_bytes: free,
            supported: None,
            ..RequestView::default()
        };
        let t = on_request(&view, valid("MID:a", &md5('a')), t0());
        assert!(t.job.is_some(), "free {free:?} is enough");
    }
}

#[test]
fn busy_is_decided_before_storage() {
    let view = RequestView {
        active: Some(downloading()),
        free_bytes: Some(0),
        supported: None,
        ..RequestView::default()
    };
    let t = on_request(&view, valid("MID:b", &md5('b')), t0());
    assert_eq!(only_ack(&t).result.error_no, ack_no::BUSY);
}

#[test]
fn rejection_is_sent_and_recorded() {
    let rejection = Ack {
        operator: "setCloudUpgradeConfig".into(),
        session_id: "SID:1".into(),
        message_id: "MID:bad".into(),
        result: Outcome::new(ack_no::UNSUPPORTED_PROTOCOL, "gopher"),
    };
    let t = on_request(
        &RequestView::default(),
        Incoming::Invalid(rejection.clone()),
        t0(),
    );
    assert_eq!(only_ack(&t), &rejection);
    assert_eq!(t.record_ack, Some(rejection));
    assert_eq!(t.job, None);
    assert_eq!(t.log, None);
    assert!(t.commands.is_empty());
}

#[test]
fn rejection_without_message_id_is_sent_not_recorded() {
    let rejection = Ack {
        operator: "unknown".into(),
        session_id: String::new(),
        message_id: String::new(),
        result: Outcome::new(ack_no::MALFORMED, "expected value at line 1 column 1"),
    };
    let t = on_request(
        &RequestView::default(),
        Incoming::Invalid(rejection.clone()),
        t0(),
    );
    assert_eq!(only_ack(&t), &rejection);
    assert_eq!(t.record_ack, None);
}

// ---- Start: first start, restarts, attempt bounds -------------------------------

#[test]
fn start_from_accepted_begins_the_download_and_reports_it() {
    let t = apply(&job_in(Phase::Accepted), Event::START, 5);
    let job = t.job.clone().expect("job");
    assert_eq!(job.phase, Phase::Downloading { offset: 0 });
    assert_eq!(job.attempts, 1);
    assert_eq!(job.updated_at, at_ms(5));
    assert_eq!(
        t.commands,
        vec![Command::Download {
            job: 1,
            offset: 0,
            validator: None,
            delay: Duration::ZERO
        }]
    );
    let log = t.log.expect("log");
    assert_eq!(
        (log.from, log.to),
        (Some(PhaseName::Accepted), PhaseName::Downloading)
    );
    assert_eq!(progress(&t.outbox), vec![(PhaseName::Downloading, 0)]);
}

#[test]
fn restart_while_downloading_resumes_at_the_committed_offset() {
    let job = Job {
        validator: Some("\"etag-1\"".into()),
        bytes_done: 700,
        ..at_phase(Phase::Downloading { offset: 512 }, 2)
    };
    let t = apply(&job, Event::START, 0);
    assert_eq!(t.job.as_ref().map(|j| j.attempts), Some(3));
    assert_eq!(
        t.commands,
        vec![Command::Download {
            job: 1,
            offset: 512,
            validator: Some("\"etag-1\"".into()),
            delay: Duration::ZERO
        }]
    );
    assert!(t.log.is_some());
    assert!(t.outbox.is_empty());
}

#[test]
fn restart_repeats_verify_flash_and_boot_check() {
    for (phase, command) in [
        (Phase::Verifying, Command::Verify { job: 1 }),
        (Phase::Flashing, Command::Flash { job: 1 }),
        (Phase::AwaitingReboot, Command::CheckBoot { job: 1 }),
    ] {
        let t = apply(&at_phase(phase, 1), Event::START, 0);
        let job = t.job.clone().expect("job");
        assert_eq!(job.phase, phase);
        assert_eq!(job.attempts, 2);
        assert_eq!(t.commands, vec![command]);
        assert!(t.log.is_some());
    }
}

#[test]
fn start_beyond_the_attempt_bound_fails_the_upgrade() {
    let p = policy();
    for (phase, bound, error_no) in [
        (
            Phase::Downloading { offset: 10 },
            p.download_attempts,
            result_no::TRANSFER,
        ),
        (Phase::Verifying, p.verify_attempts, result_no::TRANSFER),
        (Phase::Flashing, p.flash_attempts, result_no::FLASH_FAILED),
        (
            Phase::AwaitingReboot,
            p.boot_checks(),
            result_no::ROLLED_BACK,
        ),
    ] {
        // The last allowed start still runs...
        let t = apply(&at_phase(phase, bound - 1), Event::START, 0);
        assert_eq!(t.job.expect("job").phase, phase);
        // ...one more gives up, with a result report.
        let t = apply(&at_phase(phase, bound), Event::START, 0);
        let job = t.job.clone().expect("job");
        assert_eq!(job.phase, Phase::Failed, "{phase:?}");
        assert_eq!(job.result.as_ref().map(|r| r.error_no), Some(error_no));
        assert_eq!(results(&t.outbox), vec![(PhaseName::Failed, error_no)]);
        // Out of checks in awaiting_reboot, the device may run the
        // rejected slot: the runtime leaves it if so (issue 16, item 7).
        let mut commands = vec![Command::Cleanup { job: 1 }];
        if phase == Phase::AwaitingReboot {
            commands.push(Command::LeaveRejected { job: 1 });
        }
        assert_eq!(t.commands, commands, "{phase:?}");
    }
}

/// After the reboot: a rejected image on a device that runs a slot it will
/// not boot again is rolled back and rebooted; one not rebooted into yet is
/// asked for again. Both are the state machine's commands.
#[test]
fn a_stranded_device_is_rebooted_and_a_missing_reboot_asked_again() {
    let waiting = at_phase(Phase::AwaitingReboot, 1);
    let t = apply(
        &waiting,
        Event::Stranded {
            detail: "health check failed".into(),
        },
        0,
    );
    assert_eq!(t.job.as_ref().expect("job").phase, Phase::RolledBack);
    assert_eq!(
        t.commands,
        vec![
            Command::Cleanup { job: 1 },
            Command::Reboot {
                job: 1,
                delay: Duration::ZERO
            }
        ]
    );
    assert_eq!(
        results(&t.outbox),
        vec![(PhaseName::RolledBack, result_no::ROLLED_BACK)]
    );
    let t = apply(
        &waiting,
        Event::NotRebooted {
            detail: "slot b is next".into(),
        },
        0,
    );
    let job = t.job.expect("job");
    assert_eq!((job.phase, job.attempts), (Phase::AwaitingReboot, 1));
    assert_eq!(
        t.commands,
        vec![Command::Reboot {
            job: 1,
            delay: Duration::ZERO
        }]
    );
    assert!(t.outbox.is_empty());
}

/// Issue 16, item 6: a failing reboot command is asked again after the
/// backoff, and the last allowed failure ends the upgrade (51, `failed`),
/// its boot switch taken back by the clean-up.
#[test]
fn a_failing_reboot_command_is_retried_with_backoff_then_ends_the_upgrade() {
    let policy = policy();
    let mut job = at_phase(Phase::AwaitingReboot, 1);
    for failure in 1..policy.reboot_attempts {
        let t = apply(
            &job,
            Event::RebootFailed {
                detail: "reboot: exit status 1".into(),
            },
            0,
        );
        assert_eq!(
            t.commands,
            vec![Command::Reboot {
                job: 1,
                delay: policy.backoff(failure)
            }],
            "failure {failure}"
        );
        assert!(t.outbox.is_empty(), "no report while retrying");
        job = t.job.expect("job");
        assert_eq!(
            (job.phase, job.reboot_failures),
            (Phase::AwaitingReboot, failure)
        );
    }
    assert!(policy.backoff(2) > policy.backoff(1), "the delay grows");
    let t = apply(
        &job,
        Event::RebootFailed {
            detail: "reboot: exit status 1".into(),
        },
        0,
    );
    let end = t.job.as_ref().expect("job");
    assert_eq!(end.phase, Phase::Failed);
    let result = end.result.as_ref().expect("a result");
    assert_eq!(result.error_no, result_no::ROLLED_BACK);
    assert!(
        result.description.contains("failed 5 times")
            && result.description.contains("exit status 1"),
        "{}",
        result.description
    );
    assert_eq!(t.commands, vec![Command::Cleanup { job: 1 }]);
    assert_eq!(
        results(&t.outbox),
        vec![(PhaseName::Failed, result_no::ROLLED_BACK)]
    );
}

/// Issue 16, item 6: `command:` with `--commit-command` reboots after the
/// installer, remembers the boot it installed on, and a failed commit is
/// 51 in `failed` (nothing was rolled back by the agent).
#[test]
fn an_installer_with_a_commit_step_waits_for_the_reboot_and_a_failed_commit_is_51() {
    let flashing = Job {
        boot: Some("boot-1".into()),
        ..at_phase(Phase::Flashing, 1)
    };
    let t = apply(&flashing, Event::Flashed { reboot: true }, 0);
    let waiting = t.job.clone().expect("job");
    assert_eq!(waiting.phase, Phase::AwaitingReboot);
    assert_eq!(waiting.installed_on_boot.as_deref(), Some("boot-1"));
    assert_eq!(
        t.commands,
        vec![Command::Reboot {
            job: 1,
            delay: Duration::ZERO
        }]
    );
    assert!(
        results(&t.outbox).is_empty(),
        "no result before the reboot: {:?}",
        t.outbox
    );
    let t = apply(
        &waiting,
        Event::NotCommitted {
            detail: "the commit command failed: exit status 2".into(),
        },
        0,
    );
    let end = t.job.as_ref().expect("job");
    assert_eq!(end.phase, Phase::Failed);
    assert_eq!(
        results(&t.outbox),
        vec![(PhaseName::Failed, result_no::ROLLED_BACK)]
    );
}

fn start_on(boot: &str) -> Event {
    Event::Start {
        boot: Some(boot.into()),
    }
}

/// A start on another boot than the last one follows a restart of the
/// machine (a power cut): in downloading, verifying and flashing it is no
/// attempt but one of `machine_restarts`, a larger bound; starts on the same
/// boot (the agent restarted: a crash loop) are attempts as before.
#[test]
fn starts_after_a_restart_of_the_machine_are_counted_apart() {
    let p = policy();
    for (phase, error_no) in [
        (Phase::Downloading { offset: 10 }, result_no::TRANSFER),
        (Phase::Verifying, result_no::TRANSFER),
        (Phase::Flashing, result_no::FLASH_FAILED),
    ] {
        let mut job = job_after(&at_phase(phase, 1), start_on("boot-0"), 0);
        assert_eq!((job.attempts, job.machine_restarts), (2, 0), "{phase:?}");
        for n in 1..=p.machine_restarts {
            let t = apply(&job, start_on(&format!("boot-{n}")), 0);
            job = t.job.expect("job");
            assert_eq!(job.phase, phase, "{phase:?}: restart {n}");
            assert_eq!((job.attempts, job.machine_restarts), (2, n), "{phase:?}");
            let log = t.log.expect("a log line").event;
            assert!(log.contains("after a restart of the machine"), "{log}");
        }
        // One more restart of the machine gives up...
        let t = apply(&job, start_on("boot-x"), 0);
        let failed = t.job.expect("job");
        assert_eq!(failed.phase, Phase::Failed, "{phase:?}");
        let result = failed.result.expect("a result");
        assert_eq!(result.error_no, error_no);
        assert!(
            result.description.starts_with(&format!(
                "gave up after {} restarts of the machine at",
                p.machine_restarts
            )),
            "{}",
            result.description
        );
        // ...and so does the agent restarting on the same boot, at its own bound.
        while !job.phase.is_terminal() {
            job = job_after(&job, start_on(&format!("boot-{}", p.machine_restarts)), 0);
        }
        assert!(
            job.result
                .expect("a result")
                .description
                .contains(" attempts at "),
            "{phase:?}"
        );
    }
}

/// A start whose boot is not known, and the first start that records one,
/// are attempts; `awaiting_reboot` counts every start as a boot check.
#[test]
fn unknown_boots_and_boot_checks_are_attempts() {
    let job = job_after(
        &at_phase(Phase::Downloading { offset: 10 }, 1),
        Event::START,
        0,
    );
    assert_eq!(
        (job.attempts, job.machine_restarts, job.boot.clone()),
        (2, 0, None)
    );
    let job = job_after(&job, start_on("boot-0"), 0);
    assert_eq!((job.attempts, job.machine_restarts), (3, 0));
    let job = job_after(&job, Event::START, 0);
    assert_eq!((job.attempts, job.boot.as_deref()), (4, Some("boot-0")));
    let boot = job_after(&at_phase(Phase::AwaitingReboot, 1), start_on("boot-0"), 0);
    let boot = job_after(&boot, start_on("boot-1"), 0);
    assert_eq!((boot.attempts, boot.machine_restarts), (3, 0));
}

/// `command:` installers may restart the machine themselves: with
/// `flash_outlives_restarts` off, every start of flashing is an attempt.
#[test]
fn an_installer_that_restarts_the_machine_cannot_loop() {
    let p = Policy {
        flash_outlives_restarts: false,
        ..policy()
    };
    let mut job = at_phase(Phase::Flashing, 1);
    let mut n = 0;
    while !job.phase.is_terminal() {
        n += 1;
        job = transition(&job, start_on(&format!("boot-{n}")), at_ms(0), &p)
            .expect("allowed")
            .job
            .expect("job");
    }
    assert_eq!(n, p.flash_attempts);
    assert_eq!(
        job.result.expect("a result").error_no,
        result_no::FLASH_FAILED
    );
}

/// Durable progress resets the restarts of the machine with the attempts.
#[test]
fn download_progress_resets_the_restarts_of_the_machine() {
    let mut job = job_after(
        &at_phase(Phase::Downloading { offset: 10 }, 1),
        start_on("a"),
        0,
    );
    job = job_after(&job, start_on("b"), 0);
    job = job_after(&job, start_on("c"), 0);
    assert_eq!(job.machine_restarts, 2);
    job.high_water = 10;
    let job = job_after(
        &job,
        Event::Checkpoint {
            offset: 20,
            validator: None,
        },
        0,
    );
    assert_eq!((job.attempts, job.machine_restarts), (1, 0));
}

#[test]
fn download_attempts_are_bounded_across_restarts_and_retries() {
    let p = policy();
    let mut job = job_in(Phase::Accepted);
    let mut starts = 0;
    let mut ms = 0;
    // Alternate a restart and a retryable failure until the machine gives up.
    while !job.phase.is_terminal() {
        ms += 1000;
        let t = apply(&job, Event::START, ms);
        if t.commands
            .iter()
            .any(|c| matches!(c, Command::Download { .. }))
        {
            starts += 1;
        }
        job = t.job.expect("job");
        if job.phase.is_terminal() {
            break;
        }
        let t = apply(
            &job,
            Event::DownloadFailed {
                failure: retryable(result_no::CONNECT),
                durable_offset: 0,
            },
            ms + 1,
        );
        if t.commands
            .iter()
            .any(|c| matches!(c, Command::Download { .. }))
        {
            starts += 1;
        }
        job = t.job.expect("job");
        assert!(job.attempts <= p.download_attempts);
    }
    assert_eq!(starts, p.download_attempts);
    assert_eq!(job.phase, Phase::Failed);
}

#[test]
fn durable_progress_resets_the_attempt_count_so_many_crashes_can_finish() {
    let p = policy();
    let mut job = downloading();
    // Far more restarts than the bound, each with a checkpoint in between.
    for round in 0..(3 * p.download_attempts) {
        let ms = 1000 * i64::from(round + 1);
        job = job_after(&job, Event::START, ms);
        assert_eq!(job.phase.name(), PhaseName::Downloading, "round {round}");
        let offset = u64::from(round) + 1;
        job = job_after(
            &job,
            Event::Checkpoint {
                offset,
                validator: None,
            },
            ms + 1,
        );
        assert_eq!(job.attempts, 1, "progress resets the count");
    }
    // A checkpoint that does not move the offset is no progress.
    let stuck = at_phase(Phase::Downloading { offset: 100 }, 3);
    let after = job_after(
        &stuck,
        Event::Checkpoint {
            offset: 100,
            validator: None,
        },
        1,
    );
    assert_eq!(after.attempts, 3);
}

// ---- downloading ----------------------------------------------------------------

#[test]
fn progress_needs_5_percent_and_2_seconds() {
    let job = downloading(); // reported 0 % at t=0
                             // 4 % later: nothing, however long after.
    let t = apply(&job, Event::Progress { bytes_done: 40 }, 10_000);
    assert!(t.outbox.is_empty());
    assert_eq!(t.job.as_ref().map(|j| j.bytes_done), Some(40));
    assert_eq!(t.log, None);
    // 5 % but within 2 s: nothing.
    let t = apply(&job, Event::Progress { bytes_done: 50 }, 1999);
    assert!(t.outbox.is_empty());
    // 5 % and 2 s: reported, and the mark moves.
    let t = apply(&job, Event::Progress { bytes_done: 50 }, 2000);
    assert_eq!(progress(&t.outbox), vec![(PhaseName::Downloading, 5)]);
    let job = t.job.expect("job");
    assert_eq!(
        job.last_progress,
        Some(ProgressMark {
            percent: 5,
            phase: PhaseName::Downloading,
            at: at_ms(2000)
        })
    );
    // The next one needs 10 % and 4 s.
    assert!(apply(&job, Event::Progress { bytes_done: 99 }, 9000)
        .outbox
        .is_empty());
    assert!(apply(&job, Event::Progress { bytes_done: 100 }, 3999)
        .outbox
        .is_empty());
    assert_eq!(
        progress(&apply(&job, Event::Progress { bytes_done: 100 }, 4000).outbox),
        vec![(PhaseName::Downloading, 10)]
    );
}

#[test]
fn progress_is_clamped_to_the_size() {
    let t = apply(&downloading(), Event::Progress { bytes_done: 5000 }, 3000);
    assert_eq!(t.job.as_ref().map(|j| j.bytes_done), Some(SIZE));
    assert_eq!(progress(&t.outbox), vec![(PhaseName::Downloading, 100)]);
}

#[test]
fn phase_changes_are_always_reported() {
    // Within 2 s and with no growth, each new phase is still reported.
    let job = downloading();
    let t = apply(&job, Event::Downloaded, 1);
    assert_eq!(progress(&t.outbox), vec![(PhaseName::Verifying, 100)]);
    let job = t.job.expect("job");
    let t = apply(&job, Event::Verified, 2);
    assert_eq!(progress(&t.outbox), vec![(PhaseName::Flashing, 100)]);
    let job = t.job.expect("job");
    let t = apply(&job, Event::Flashed { reboot: true }, 3);
    assert_eq!(progress(&t.outbox), vec![(PhaseName::AwaitingReboot, 100)]);
}

#[test]
fn checkpoint_moves_the_durable_offset_and_keeps_the_validator() {
    let job = downloading();
    let job = job_after(
        &job,
        Event::Checkpoint {
            offset: 300,
            validator: Some("v1".into()),
        },
        1,
    );
    assert_eq!(job.phase, Phase::Downloading { offset: 300 });
    assert_eq!(job.bytes_done, 300);
    assert_eq!(job.validator.as_deref(), Some("v1"));
    let job = job_after(
        &job,
        Event::Checkpoint {
            offset: 5000,
            validator: None,
        },
        2,
    );
    assert_eq!(job.phase, Phase::Downloading { offset: SIZE });
    assert_eq!(job.validator.as_deref(), Some("v1"));
}

/// A download that restarts from zero every time reaches the same
/// checkpoints again: that is no progress, so the attempts run out
/// (ARCHITECTURE.md, rule 8). Before, each first checkpoint reset them and
/// the agent fetched the same half file for ever.
#[test]
fn restarts_from_zero_are_no_progress_and_run_out_of_attempts() {
    let p = policy();
    let mut job = downloading();
    let mut ended = None;
    for round in 0..50 {
        for offset in [100, 200, 300] {
            let t = transition(
                &job,
                Event::Checkpoint {
                    offset,
                    validator: None,
                },
                at_ms(round * 10),
                &p,
            )
            .expect("applies");
            job = t.job.expect("job");
        }
        assert_eq!(job.high_water, 300);
        let t = transition(
            &job,
            Event::DownloadFailed {
                failure: retryable(result_no::TRANSFER),
                durable_offset: 300,
            },
            at_ms(round * 10 + 5),
            &p,
        )
        .expect("applies");
        job = t.job.clone().expect("job");
        if job.phase.is_terminal() {
            ended = Some((round, t));
            break;
        }
        let t = transition(
            &job,
            Event::SourceChanged { validator: None },
            at_ms(round * 10 + 6),
            &p,
        )
        .expect("applies");
        job = t.job.expect("job");
    }
    let (round, t) = ended.expect("the attempts run out");
    assert_eq!(round + 1, p.download_attempts as i64, "one start per round");
    assert_eq!(
        results(&t.outbox),
        vec![(PhaseName::Failed, result_no::TRANSFER)]
    );
}

/// A restart from zero that goes beyond the old high-water mark is
/// progress; but the durable bytes fetched over all attempts are bounded by
/// `fetch_budget` times the size, so a download that creeps a little
/// further each time still ends, in 23, with the reason.
#[test]
fn the_bytes_fetched_are_bounded_by_the_budget() {
    let p = policy();
    let mut job = downloading();
    let mut reach = 100;
    let t = loop {
        let mut last = None;
        for offset in (100..=reach).step_by(100) {
            let t = transition(
                &job,
                Event::Checkpoint {
                    offset,
                    validator: None,
                },
                at_ms(1),
                &p,
            )
            .expect("applies");
            job = t.job.clone().expect("job");
            if job.phase.is_terminal() {
                last = Some(t);
                break;
            }
        }
        if let Some(t) = last {
            break t;
        }
        assert_eq!(job.attempts, 1, "beyond the high-water mark: progress");
        job = job_after(&job, Event::SourceChanged { validator: None }, 2);
        reach = (reach + 100).min(SIZE - 100);
    };
    assert_eq!(job.phase, Phase::Failed);
    assert!(job.fetched > p.fetch_budget * SIZE, "{}", job.fetched);
    assert!(
        job.fetched <= p.fetch_budget * SIZE + 100,
        "{}",
        job.fetched
    );
    assert_eq!(
        results(&t.outbox),
        vec![(PhaseName::Failed, result_no::TRANSFER)]
    );
    let why = job.result.expect("a result").description;
    assert!(why.contains("more than 3 times its size"), "{why}");
    assert!(t.commands.contains(&Command::Cleanup { job: job.id }));
}

/// A partial file gone in `verifying` or `flashing` (a power cut took its
/// directory entry) is downloaded again, not a final 23.
#[test]
fn a_missing_image_goes_back_to_downloading_from_zero() {
    for phase in [Phase::Verifying, Phase::Flashing] {
        let job = Job {
            bytes_done: SIZE,
            validator: Some("v1".into()),
            high_water: SIZE,
            fetched: SIZE,
            ..at_phase(phase, 1)
        };
        let t = apply(
            &job,
            Event::ImageMissing {
                detail: "no such file".into(),
            },
            1,
        );
        let next = t.job.clone().expect("job");
        assert_eq!(next.phase, Phase::Downloading { offset: 0 }, "{phase:?}");
        assert_eq!((next.bytes_done, next.validator.as_deref()), (0, None));
        assert_eq!(next.attempts, 1);
        assert_eq!(
            t.commands,
            vec![Command::Download {
                job: 1,
                offset: 0,
                validator: None,
                delay: Duration::ZERO
            }]
        );
        assert!(results(&t.outbox).is_empty(), "not the end of the upgrade");
        assert_eq!(progress(&t.outbox), vec![(PhaseName::Downloading, 0)]);
    }
}

#[test]
fn source_changed_starts_again_from_zero_and_reports_it() {
    let job = Job {
        bytes_done: 800,
        validator: Some("old".into()),
        last_progress: Some(ProgressMark {
            percent: 80,
            phase: PhaseName::Downloading,
            at: t0(),
        }),
        ..at_phase(Phase::Downloading { offset: 600 }, 1)
    };
    let t = apply(
        &job,
        Event::SourceChanged {
            validator: Some("new".into()),
        },
        100,
    );
    let next = t.job.clone().expect("job");
    assert_eq!(next.phase, Phase::Downloading { offset: 0 });
    assert_eq!(next.bytes_done, 0);
    assert_eq!(next.validator.as_deref(), Some("new"));
    assert!(t.log.is_some());
    // Within 2 s of the last report nothing is sent (this is no phase
    // change), but the throttle's mark goes back to 0 %, so the new
    // download's progress is reported again once the interval has passed.
    assert_eq!(progress(&t.outbox), vec![]);
    let t = apply(&next, Event::Progress { bytes_done: 60 }, 2100);
    assert_eq!(progress(&t.outbox), vec![(PhaseName::Downloading, 6)]);
    // Outside the interval the cloud hears that progress went back to 0 %.
    let t = apply(
        &job,
        Event::SourceChanged {
            validator: Some("new".into()),
        },
        2500,
    );
    assert_eq!(progress(&t.outbox), vec![(PhaseName::Downloading, 0)]);
}

#[test]
fn downloaded_goes_to_verifying() {
    let t = apply(&downloading(), Event::Downloaded, 1);
    let job = t.job.clone().expect("job");
    assert_eq!(job.phase, Phase::Verifying);
    assert_eq!(job.bytes_done, SIZE);
    assert_eq!(job.attempts, 1);
    assert_eq!(t.commands, vec![Command::Verify { job: 1 }]);
}

#[test]
fn retryable_download_failure_retries_with_backoff_from_the_durable_offset() {
    let job = job_after(
        &downloading(),
        Event::Checkpoint {
            offset: 200,
            validator: Some("v".into()),
        },
        1,
    );
    let t = apply(
        &job,
        Event::DownloadFailed {
            failure: retryable(result_no::TRANSFER),
            durable_offset: 300,
        },
        2,
    );
    let next = t.job.clone().expect("job");
    assert_eq!(next.phase, Phase::Downloading { offset: 300 });
    assert_eq!(next.attempts, 2);
    assert_eq!(next.last_error.as_deref(), Some("connection reset"));
    assert_eq!(
        t.commands,
        vec![Command::Download {
            job: 1,
            offset: 300,
            validator: Some("v".into()),
            delay: policy().backoff(1)
        }]
    );
    assert!(results(&t.outbox).is_empty());
    // A smaller durable offset never moves the resume point back.
    let t = apply(
        &next,
        Event::DownloadFailed {
            failure: retryable(result_no::TRANSFER),
            durable_offset: 0,
        },
        3,
    );
    assert_eq!(
        t.job.expect("job").phase,
        Phase::Downloading { offset: 300 }
    );
}

#[test]
fn final_download_failure_fails_with_its_number() {
    for error_no in [
        result_no::AUTH,
        result_no::NOT_FOUND,
        result_no::SIZE_MISMATCH,
        result_no::NO_STORAGE,
    ] {
        let t = apply(
            &downloading(),
            Event::DownloadFailed {
                failure: fatal(error_no),
                durable_offset: 0,
            },
            1,
        );
        let job = t.job.clone().expect("job");
        assert_eq!(job.phase, Phase::Failed);
        assert_eq!(job.result, Some(Outcome::new(error_no, "final failure")));
        assert_eq!(results(&t.outbox), vec![(PhaseName::Failed, error_no)]);
        assert_eq!(t.commands, vec![Command::Cleanup { job: 1 }]);
    }
}

#[test]
fn retryable_failure_on_the_last_attempt_fails() {
    let job = at_phase(Phase::Downloading { offset: 0 }, policy().download_attempts);
    let t = apply(
        &job,
        Event::DownloadFailed {
            failure: retryable(result_no::CONNECT),
            durable_offset: 0,
        },
        1,
    );
    assert_eq!(
        results(&t.outbox),
        vec![(PhaseName::Failed, result_no::CONNECT)]
    );
}

#[test]
fn backoff_doubles_up_to_the_maximum() {
    let p = policy();
    assert_eq!(p.backoff(1), Duration::from_secs(1));
    assert_eq!(p.backoff(2), Duration::from_secs(2));
    assert_eq!(p.backoff(3), Duration::from_secs(4));
    assert_eq!(p.backoff(6), Duration::from_secs(30));
    assert_eq!(p.backoff(40), Duration::from_secs(30));
}

// ---- verifying, flashing, rebooting ---------------------------------------------

#[test]
fn verified_goes_to_flashing() {
    let t = apply(&at_phase(Phase::Verifying, 2), Event::Verified, 1);
    let job = t.job.clone().expect("job");
    assert_eq!(job.phase, Phase::Flashing);
    assert_eq!(job.attempts, 1);
    assert_eq!(t.commands, vec![Command::Flash { job: 1 }]);
}

#[test]
fn verify_failure_fails_with_its_number() {
    let t = apply(
        &at_phase(Phase::Verifying, 1),
        Event::VerifyFailed {
            failure: fatal(result_no::MD5_MISMATCH),
        },
        1,
    );
    assert_eq!(t.job.expect("job").phase, Phase::Failed);
    assert_eq!(
        results(&t.outbox),
        vec![(PhaseName::Failed, result_no::MD5_MISMATCH)]
    );
}

/// Run a job from a start in `Downloading { offset }` to verification, as
/// the runtime would: the download resumes there and completes.
fn verifying_after_a_start_at(offset: u64) -> Job {
    let job = Job {
        validator: Some("\"etag-1\"".into()),
        ..at_phase(Phase::Downloading { offset }, 1)
    };
    let job = job_after(&job, Event::START, 0);
    job_after(&job, Event::Downloaded, 1)
}

#[test]
fn an_md5_mismatch_of_a_resumed_image_fetches_it_once_more_from_zero() {
    let mismatch = || Event::VerifyFailed {
        failure: fatal(result_no::MD5_MISMATCH),
    };
    let resumed = verifying_after_a_start_at(512);
    assert_eq!(resumed.pieces, Pieces::Resumed);
    let t = apply(&resumed, mismatch(), 2);
    let again = t.job.clone().expect("job");
    assert_eq!(again.phase, Phase::Downloading { offset: 0 });
    assert_eq!(again.pieces, Pieces::Refetched);
    assert_eq!(
        (again.bytes_done, again.fetched, again.high_water),
        (0, 0, 0)
    );
    assert_eq!(
        again.validator, None,
        "a fresh download trusts no validator"
    );
    assert_eq!(again.last_error.as_deref(), Some("final failure"));
    assert_eq!(
        t.commands,
        vec![Command::Download {
            job: 1,
            offset: 0,
            validator: None,
            delay: Duration::ZERO
        }]
    );
    assert!(results(&t.outbox).is_empty(), "not the end of the upgrade");
    assert_eq!(progress(&t.outbox), vec![(PhaseName::Downloading, 0)]);

    // Resumed again or not, a second mismatch is final.
    let once_more = job_after(
        &again,
        Event::Checkpoint {
            offset: 256,
            validator: None,
        },
        3,
    );
    let once_more = job_after(&once_more, Event::START, 4);
    let once_more = job_after(&once_more, Event::Downloaded, 5);
    assert_eq!(once_more.pieces, Pieces::Refetched);
    let t = apply(&once_more, mismatch(), 6);
    assert_eq!(t.job.expect("job").phase, Phase::Failed);
    assert_eq!(
        results(&t.outbox),
        vec![(PhaseName::Failed, result_no::MD5_MISMATCH)]
    );
}

#[test]
fn a_bad_signature_is_final_even_for_an_image_in_pieces() {
    // The md5 matched, so the pieces joined right: the signature is the
    // image's own, and 32 ends the upgrade without another download.
    for job in [
        verifying_after_a_start_at(0),
        verifying_after_a_start_at(512),
    ] {
        let t = apply(
            &job,
            Event::VerifyFailed {
                failure: fatal(result_no::SIGNATURE),
            },
            2,
        );
        assert_eq!(t.job.expect("job").phase, Phase::Failed);
        assert_eq!(
            results(&t.outbox),
            vec![(PhaseName::Failed, result_no::SIGNATURE)]
        );
        assert!(
            !t.commands
                .iter()
                .any(|c| matches!(c, Command::Download { .. } | Command::Flash { .. })),
            "nothing fetched again, nothing flashed: {:?}",
            t.commands
        );
    }
}

#[test]
fn only_an_md5_mismatch_of_an_image_in_pieces_is_fetched_again() {
    // One transfer from zero: the mismatch is the image's own.
    let whole = verifying_after_a_start_at(0);
    assert_eq!(whole.pieces, Pieces::One);
    // Resumed, then restarted from zero by the server: one piece again.
    let restarted = job_after(
        &Job {
            validator: Some("\"etag-1\"".into()),
            ..at_phase(Phase::Downloading { offset: 512 }, 1)
        },
        Event::START,
        0,
    );
    assert_eq!(restarted.pieces, Pieces::Resumed);
    let restarted = job_after(
        &restarted,
        Event::SourceChanged {
            validator: Some("\"etag-2\"".into()),
        },
        1,
    );
    assert_eq!(restarted.pieces, Pieces::One);
    let restarted = job_after(&restarted, Event::Downloaded, 2);
    for job in [whole, restarted] {
        let t = apply(
            &job,
            Event::VerifyFailed {
                failure: fatal(result_no::MD5_MISMATCH),
            },
            3,
        );
        assert_eq!(
            results(&t.outbox),
            vec![(PhaseName::Failed, result_no::MD5_MISMATCH)]
        );
    }
    // A resumed image of the wrong size: no splice makes that, it is final.
    let t = apply(
        &verifying_after_a_start_at(512),
        Event::VerifyFailed {
            failure: fatal(result_no::SIZE_MISMATCH),
        },
        3,
    );
    assert_eq!(
        results(&t.outbox),
        vec![(PhaseName::Failed, result_no::SIZE_MISMATCH)]
    );
}

#[test]
fn flashed_without_reboot_completes() {
    let t = apply(
        &at_phase(Phase::Flashing, 1),
        Event::Flashed { reboot: false },
        1,
    );
    let job = t.job.clone().expect("job");
    assert_eq!(job.phase, Phase::Completed);
    assert_eq!(job.result, Some(Outcome::ok()));
    assert_eq!(results(&t.outbox), vec![(PhaseName::Completed, 0)]);
    assert_eq!(t.commands, vec![Command::Cleanup { job: 1 }]);
}

#[test]
fn flashed_with_reboot_awaits_it() {
    let t = apply(
        &at_phase(Phase::Flashing, 1),
        Event::Flashed { reboot: true },
        1,
    );
    let job = t.job.clone().expect("job");
    assert_eq!(job.phase, Phase::AwaitingReboot);
    assert_eq!(
        job.attempts, 0,
        "the boot check after the reboot is attempt 1"
    );
    assert_eq!(job.result, None);
    assert_eq!(
        t.commands,
        vec![Command::Reboot {
            job: 1,
            delay: Duration::ZERO
        }]
    );
    assert!(results(&t.outbox).is_empty());
}

#[test]
fn flash_failure_is_always_50() {
    let t = apply(
        &at_phase(Phase::Flashing, 1),
        Event::FlashFailed {
            failure: retryable(result_no::TRANSFER),
        },
        1,
    );
    assert_eq!(
        results(&t.outbox),
        vec![(PhaseName::Failed, result_no::FLASH_FAILED)]
    );
}

#[test]
fn booted_ok_completes_and_not_ok_rolls_back() {
    let waiting = at_phase(Phase::AwaitingReboot, 1);
    let t = apply(
        &waiting,
        Event::Booted {
            ok: true,
            detail: "slot b".into(),
        },
        1,
    );
    assert_eq!(t.job.expect("job").phase, Phase::Completed);
    assert_eq!(results(&t.outbox), vec![(PhaseName::Completed, 0)]);

    let t = apply(
        &waiting,
        Event::Booted {
            ok: false,
            detail: "booted slot a".into(),
        },
        1,
    );
    let job = t.job.clone().expect("job");
    assert_eq!(job.phase, Phase::RolledBack);
    assert_eq!(
        job.result,
        Some(Outcome::new(result_no::ROLLED_BACK, "booted slot a"))
    );
    assert_eq!(
        results(&t.outbox),
        vec![(PhaseName::RolledBack, result_no::ROLLED_BACK)]
    );
}

#[test]
fn a_start_that_finds_the_reboot_still_pending_does_not_count() {
    let p = policy();
    let mut job = at_phase(Phase::AwaitingReboot, 0);
    // Far more agent starts than boot checks, each finding no reboot yet.
    for i in 0..(p.boot_checks() * 4) {
        let t = apply(&job, Event::START, i64::from(i));
        assert_eq!(t.commands, vec![Command::CheckBoot { job: 1 }]);
        job = t.job.expect("job");
        let t = apply(
            &job,
            Event::RebootPending {
                detail: "slot b is next".into(),
            },
            i64::from(i),
        );
        assert!(t.outbox.is_empty() && t.commands.is_empty());
        assert!(t.log.expect("logged").event.contains("slot b is next"));
        job = t.job.expect("job");
        assert_eq!(job.phase, Phase::AwaitingReboot);
        assert_eq!(job.attempts, 0);
    }
    // Checks that do not end still count: the bound holds.
    for _ in 0..p.boot_checks() {
        job = apply(&job, Event::START, 100).job.expect("job");
    }
    let t = apply(&job, Event::START, 101);
    assert_eq!(
        results(&t.outbox),
        vec![(PhaseName::Failed, result_no::ROLLED_BACK)]
    );
}

// ---- cancel -----------------------------------------------------------------------

#[test]
fn cancel_is_allowed_until_flashing() {
    for phase in [
        Phase::Accepted,
        Phase::Downloading { offset: 40 },
        Phase::Verifying,
    ] {
        let t = apply(&at_phase(phase, 1), Event::Cancel, 1);
        let job = t.job.clone().expect("job");
        assert_eq!(job.phase, Phase::Cancelled);
        assert_eq!(
            job.result,
            Some(Outcome::new(result_no::CANCELLED, "cancelled"))
        );
        assert_eq!(
            results(&t.outbox),
            vec![(PhaseName::Cancelled, result_no::CANCELLED)]
        );
        assert_eq!(
            t.commands,
            vec![Command::Abort { job: 1 }, Command::Cleanup { job: 1 }]
        );
    }
}

#[test]
fn cancel_is_refused_once_flashing_began() {
    for phase in [Phase::Flashing, Phase::AwaitingReboot] {
        assert_eq!(
            transition(&at_phase(phase, 1), Event::Cancel, t0(), &policy()),
            Err(Refused::FlashingBegun(phase.name()))
        );
    }
}

// ---- refusals -----------------------------------------------------------------------

fn every_event() -> Vec<Event> {
    vec![
        Event::START,
        Event::Progress { bytes_done: 1 },
        Event::Checkpoint {
            offset: 1,
            validator: None,
        },
        Event::SourceChanged { validator: None },
        Event::Downloaded,
        Event::DownloadFailed {
            failure: retryable(result_no::CONNECT),
            durable_offset: 0,
        },
        Event::ImageMissing {
            detail: String::new(),
        },
        Event::Verified,
        Event::VerifyFailed {
            failure: fatal(result_no::MD5_MISMATCH),
        },
        Event::Flashed { reboot: false },
        Event::FlashFailed {
            failure: fatal(result_no::FLASH_FAILED),
        },
        Event::Booted {
            ok: true,
            detail: String::new(),
        },
        Event::Stranded {
            detail: String::new(),
        },
        Event::RebootPending {
            detail: String::new(),
        },
        Event::NotRebooted {
            detail: String::new(),
        },
        Event::RebootFailed {
            detail: String::new(),
        },
        Event::NotCommitted {
            detail: String::new(),
        },
        Event::Cancel,
    ]
}

/// Does `event` apply in `phase` (non-terminal)? Written out by hand from
/// ARCHITECTURE.md's phases, not derived from the machine.
fn applies(event: &Event, phase: Phase) -> bool {
    let downloading = matches!(phase, Phase::Downloading { .. });
    match event {
        Event::Start { .. } | Event::Cancel => true,
        Event::Progress { .. }
        | Event::Checkpoint { .. }
        | Event::SourceChanged { .. }
        | Event::Downloaded
        | Event::DownloadFailed { .. } => downloading,
        Event::ImageMissing { .. } => matches!(phase, Phase::Verifying | Phase::Flashing),
        Event::Verified | Event::VerifyFailed { .. } => phase == Phase::Verifying,
        Event::Flashed { .. } | Event::FlashFailed { .. } => phase == Phase::Flashing,
        Event::Booted { .. }
        | Event::Stranded { .. }
        | Event::RebootPending { .. }
        | Event::NotRebooted { .. }
        | Event::RebootFailed { .. }
        | Event::NotCommitted { .. } => phase == Phase::AwaitingReboot,
    }
}

#[test]
fn every_event_in_a_wrong_phase_is_refused() {
    for phase in [
        Phase::Accepted,
        Phase::Downloading { offset: 0 },
        Phase::Verifying,
        Phase::Flashing,
        Phase::AwaitingReboot,
    ] {
        for event in every_event() {
            let outcome = transition(&at_phase(phase, 1), event.clone(), t0(), &policy());
            match (applies(&event, phase), outcome) {
                (true, Ok(t)) => assert!(t.job.is_some()),
                (true, Err(Refused::FlashingBegun(_))) => {
                    assert_eq!(event, Event::Cancel);
                    assert!(matches!(phase, Phase::Flashing | Phase::AwaitingReboot));
                }
                (false, Err(Refused::WrongPhase { phase: p, .. })) => {
                    assert_eq!(p, phase.name());
                }
                (applies, outcome) => {
                    panic!("{event:?} in {phase:?} (applies: {applies}) gave {outcome:?}")
                }
            }
        }
    }
}

#[test]
fn every_event_after_the_end_is_refused() {
    for phase in [
        Phase::Completed,
        Phase::Failed,
        Phase::Cancelled,
        Phase::RolledBack,
    ] {
        for event in every_event() {
            assert_eq!(
                transition(&at_phase(phase, 1), event, t0(), &policy()),
                Err(Refused::Ended(phase.name()))
            );
        }
    }
}

#[test]
fn refusals_name_the_event_and_phase() {
    let err = transition(
        &at_phase(Phase::Verifying, 1),
        Event::Downloaded,
        t0(),
        &policy(),
    )
    .expect_err("refused");
    assert_eq!(
        err.to_string(),
        "event `downloaded` does not apply in phase verifying"
    );
}

// ---- whole upgrades -----------------------------------------------------------------

/// Run an upgrade from accept to the end, returning everything queued.
fn run_to_end(policy: &Policy, reboot: bool) -> (Job, Vec<Outgoing>) {
    let accept = on_request(&RequestView::default(), valid("MID:a", &md5('a')), t0());
    let mut out = accept.outbox.clone();
    let mut job = accept.job.expect("accepted");
    let mut events = vec![Event::START];
    events.extend((1..=10).map(|i| Event::Progress {
        bytes_done: i * 100,
    }));
    events.extend([
        Event::Downloaded,
        Event::Verified,
        Event::Flashed { reboot },
    ]);
    if reboot {
        events.extend([
            Event::START,
            Event::Booted {
                ok: true,
                detail: "ok".into(),
            },
        ]);
    }
    for (i, event) in events.into_iter().enumerate() {
        let t = transition(&job, event, at_ms(i as i64 * 3000), policy).expect("applies");
        out.extend(t.outbox);
        job = t.job.expect("job");
    }
    (job, out)
}

#[test]
fn exactly_one_result_report_per_upgrade() {
    for reboot in [false, true] {
        let (job, out) = run_to_end(&policy(), reboot);
        assert_eq!(job.phase, Phase::Completed);
        assert_eq!(results(&out), vec![(PhaseName::Completed, 0)]);
        // Progress went up in steps and every phase was announced.
        let reported = progress(&out);
        assert!(reported.contains(&(PhaseName::Downloading, 100)));
        assert!(reported.contains(&(PhaseName::Flashing, 100)));
        // Nothing more can happen.
        for event in every_event() {
            assert!(transition(&job, event, t0(), &policy()).is_err());
        }
    }
}

#[test]
fn no_reports_when_reports_are_off() {
    let quiet = Policy {
        reports: false,
        ..Policy::default()
    };
    let (job, out) = run_to_end(&quiet, true);
    assert_eq!(job.phase, Phase::Completed);
    assert!(out.iter().all(|m| matches!(m, Outgoing::Ack(_))), "{out:?}");
    assert_eq!(out.len(), 1, "the accept's ack only");
    // Failures and cancels are silent too.
    let t = transition(&downloading(), Event::Cancel, t0(), &quiet).expect("applies");
    assert!(t.outbox.is_empty());
    assert_eq!(t.job.expect("job").phase, Phase::Cancelled);
}

#[test]
fn what_servers_say_reaches_no_record_or_report_with_a_credential_in_it() {
    let job = at_phase(Phase::Downloading { offset: 0 }, 1);
    let said = "530 login user refused password hunter2 (pass-port-secret)";
    let t = apply(
        &job,
        Event::DownloadFailed {
            failure: fwagent_state::Failure::new(result_no::AUTH, said, false),
            durable_offset: 0,
        },
        1,
    );
    let clean = "530 login <redacted> refused password <redacted> (<redacted>)";
    let ended = t.job.clone().expect("job");
    assert_eq!(ended.last_error.as_deref(), Some(clean));
    assert_eq!(
        ended.result.as_ref().map(|o| o.description.as_str()),
        Some(clean)
    );
    assert_eq!(t.log.as_ref().and_then(|l| l.error.as_deref()), Some(clean));
    let report = t
        .outbox
        .iter()
        .find_map(|o| match o {
            Outgoing::Result {
                result, subject, ..
            } => Some((result, subject)),
            _ => None,
        })
        .expect("a result report");
    assert_eq!(report.0.description, clean);
    // The report still carries its own passPort; the record no longer does.
    assert_eq!(
        report.1.pass_port.as_ref().map(|s| s.expose()),
        Some("pass-port-secret")
    );
    assert!(ended.request.source.user.is_empty() && ended.request.source.password.is_empty());
    assert_eq!(ended.request.pass_port, None);
    // Text stored before redaction existed is redacted when it is reused.
    let old = Job {
        last_error: Some("550 /home/user/fw.bin: no access".into()),
        ..at_phase(Phase::Downloading { offset: 0 }, policy().download_attempts)
    };
    let t = apply(&old, Event::START, 1);
    let result = t.job.expect("job").result.expect("gave up");
    assert!(
        result
            .description
            .ends_with("550 /home/<redacted>/fw.bin: no access"),
        "{}",
        result.description
    );
    // Details of a boot check are redacted too.
    let t = apply(
        &at_phase(Phase::AwaitingReboot, 1),
        Event::Booted {
            ok: false,
            detail: "health check printed hunter2".into(),
        },
        1,
    );
    assert_eq!(
        t.job.expect("job").last_error.as_deref(),
        Some("health check printed <redacted>")
    );
}

// ---- the attempt count and the log ------------------------------------------------

/// `attempts` (what `status` and `show` print) is what the log says:
/// every change of the count is logged with the new count, and a start
/// that does not count says so. Before, durable progress set the count back
/// to 1 without a word (the log's last "attempt 4" stood beside 1), and a
/// start that found the reboot still to come took its check back while the
/// log still said "check 2".
#[test]
fn the_log_names_every_change_of_the_attempt_count() {
    let steps: Vec<(Event, u32)> = vec![
        (Event::START, 1),
        (failed_retryable(0), 2),
        (start_on("boot-0"), 3),
        (start_on("boot-1"), 3),
        (failed_retryable(10), 4),
        (
            Event::Checkpoint {
                offset: 50,
                validator: None,
            },
            1,
        ),
        (failed_retryable(50), 2),
        (Event::Downloaded, 1),
        (Event::Verified, 1),
        (Event::Flashed { reboot: true }, 0),
        (start_on("boot-1"), 1),
        (start_on("boot-1"), 2),
        (
            Event::RebootPending {
                detail: "slot b is next".into(),
            },
            1,
        ),
    ];
    let mut job = job_in(Phase::Accepted);
    let mut log = Vec::new();
    for (i, (event, attempts)) in steps.into_iter().enumerate() {
        let what = format!("{event:?}");
        let t = apply(&job, event, i as i64 * 1000);
        log.extend(t.log.clone());
        job = t.job.expect("a job");
        assert_eq!(job.attempts, attempts, "after {what}");
        assert_eq!(
            logged_attempts(&log),
            job.attempts,
            "after {what}, the log says:\n{:#?}",
            log.iter().map(|e| &e.event).collect::<Vec<_>>()
        );
    }
}

fn failed_retryable(durable_offset: u64) -> Event {
    Event::DownloadFailed {
        failure: Failure::new(result_no::TRANSFER, "connection reset", true),
        durable_offset,
    }
}
