//! The JSON views of an upgrade (spec/INTERFACE.md, "Inspection and
//! control") and the queries that build them: what the control socket sends
//! and what the CLI prints, whether it asked the agent or read the store
//! itself. One copy of the queries ([`latest`], [`history`], [`by_message_id`],
//! [`detail`]) serves both, so both paths print alike; the human rendering
//! of these views lives in `cli::view`.
//!
//! A [`Job`] carries the upgrade's decoded credentials and its `passPort`, so
//! it is never serialised for output. [`JobView`] (what `status --json` and
//! `history --json` print) and [`DetailView`] (`show --json`) are built field
//! by field. Every free-text field (log events, errors, result descriptions)
//! is shown as stored: the state machine redacts each text it stores, once
//! (`fwagent_state::Redactor`), and the URL never carries user info
//! (`protocol::build_url`), so a second pass here would only garble text that
//! holds the marker already.

use crate::protocol::ack_operator;
use fwagent_state::{
    Job, LogEntry, OutboxEntry, Outcome, Outgoing, PhaseName, Store, StoreError, OP_PROGRESS,
    OP_RESULT,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One upgrade as scripts see it (`status --json`, an element of
/// `history --json`). The field names are a contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub message_id: String,
    pub session_id: String,
    pub firmware_name: String,
    /// Lowercase hex.
    pub md5sum: String,
    pub total_bytes: u64,
    pub bytes_done: u64,
    pub phase: PhaseName,
    pub attempts: u32,
    /// `null` until the phase is terminal.
    pub result: Option<Outcome>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// One upgrade with its history (`show --json`): the [`JobView`] fields, then
/// the URL it is fetched from (never with user info), the last error, the
/// transition log (oldest first) and the messages it sent or will send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DetailView {
    #[serde(flatten)]
    pub job: JobView,
    pub url: String,
    pub last_error: Option<String>,
    pub log: Vec<LogView>,
    pub outbox: Vec<OutboxView>,
}

/// One line of the transition log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogView {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// `null` for the first entry (the accept).
    pub from: Option<PhaseName>,
    pub to: PhaseName,
    pub event: String,
    pub error: Option<String>,
}

/// One outgoing message about the upgrade: what it says, not its wire text
/// (a report's wire text carries the `passPort`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxView {
    pub seq: u64,
    pub message_id: String,
    /// The wire operator: `setCloudUpgradeConfig-Ack`, `reportCloudUpgradeProgress`
    /// or `reportCloudUpgradeResult`.
    pub operator: String,
    pub phase: Option<PhaseName>,
    pub bytes_done: Option<u64>,
    pub percent: Option<u8>,
    pub result: Option<Outcome>,
    /// `null` while the message waits in the outbox.
    #[serde(with = "time::serde::rfc3339::option")]
    pub delivered_at: Option<OffsetDateTime>,
}

impl JobView {
    pub fn of(job: &Job) -> JobView {
        JobView {
            message_id: job.request.message_id.clone(),
            session_id: job.request.session_id.clone(),
            firmware_name: job.request.firmware.name.clone(),
            md5sum: job.request.firmware.md5.clone(),
            total_bytes: job.request.firmware.size,
            bytes_done: job.bytes_done,
            phase: job.phase.name(),
            attempts: job.attempts,
            result: job.result.clone(),
            created_at: job.created_at,
            updated_at: job.updated_at,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.phase.is_terminal()
    }

    pub fn percent(&self) -> u8 {
        fwagent_state::percent(self.bytes_done, self.total_bytes)
    }
}

impl LogView {
    pub fn of(entry: &LogEntry) -> LogView {
        LogView {
            at: entry.at,
            from: entry.from,
            to: entry.to,
            event: entry.event.clone(),
            error: entry.error.clone(),
        }
    }
}

impl OutboxView {
    pub fn of(entry: &OutboxEntry, delivered_at: Option<OffsetDateTime>) -> OutboxView {
        let base = OutboxView {
            seq: entry.seq,
            message_id: entry.message_id.clone(),
            operator: String::new(),
            phase: None,
            bytes_done: None,
            percent: None,
            result: None,
            delivered_at,
        };
        match &entry.message {
            Outgoing::Ack(ack) => OutboxView {
                operator: ack_operator(ack),
                result: Some(ack.result.clone()),
                ..base
            },
            Outgoing::Progress {
                phase,
                bytes_done,
                percent,
                ..
            } => OutboxView {
                operator: OP_PROGRESS.to_string(),
                phase: Some(*phase),
                bytes_done: Some(*bytes_done),
                percent: Some(*percent),
                ..base
            },
            Outgoing::Result { phase, result, .. } => OutboxView {
                operator: OP_RESULT.to_string(),
                phase: Some(*phase),
                result: Some(result.clone()),
                ..base
            },
        }
    }
}

// ---- the queries (the control socket's and the offline CLI's) ---------------

/// `status`: the active upgrade, else the most recent one.
pub fn latest(store: &Store) -> Result<Option<JobView>, StoreError> {
    Ok(store.latest()?.as_ref().map(JobView::of))
}

/// `history`: every upgrade, newest first; at most `limit`.
pub fn history(store: &Store, limit: Option<usize>) -> Result<Vec<JobView>, StoreError> {
    Ok(store.history(limit)?.iter().map(JobView::of).collect())
}

/// One upgrade by its request's messageId.
pub fn by_message_id(store: &Store, message_id: &str) -> Result<Option<JobView>, StoreError> {
    Ok(store
        .job_by_message_id(message_id)?
        .as_ref()
        .map(JobView::of))
}

/// `show`: one upgrade with its log and outbox.
pub fn detail(store: &Store, message_id: &str) -> Result<Option<DetailView>, StoreError> {
    let Some(job) = store.job_by_message_id(message_id)? else {
        return Ok(None);
    };
    let log = store.log(job.id)?.iter().map(LogView::of).collect();
    let outbox = store
        .outbox_of(job.id)?
        .iter()
        .map(|(e, at)| OutboxView::of(e, *at))
        .collect();
    Ok(Some(DetailView {
        job: JobView::of(&job),
        url: job.request.source.url.clone(),
        last_error: job.last_error.clone(),
        log,
        outbox,
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fwagent_state::{Firmware, Phase, Protocol, Secret, Source, UpgradeRequest};
    use time::macros::datetime;

    /// A text as the state machine stores it: the job's secrets redacted.
    fn stored(job: &Job, text: &str) -> String {
        job.redactor().text(text)
    }

    pub(crate) fn job() -> Job {
        let mut job = Job {
            id: 1,
            request: UpgradeRequest {
                message_id: "MID:1".into(),
                session_id: "SID:1".into(),
                source: Source {
                    protocol: Protocol::Http,
                    host: "127.0.0.1".into(),
                    port: 8080,
                    path: "/fw/".into(),
                    url: "http://127.0.0.1:8080/fw/x.bin".into(),
                    user: Secret::new("operator7"),
                    password: Secret::new("hunter2hunter2"),
                },
                firmware: Firmware {
                    name: "x.bin".into(),
                    md5: "0123456789abcdef0123456789abcdef".into(),
                    size: 64 << 20,
                    signature: None,
                },
                pass_port: Some(Secret::new("pp-4711")),
            },
            phase: Phase::Downloading { offset: 4 << 20 },
            attempts: 2,
            bytes_done: 16 << 20,
            high_water: 4 << 20,
            fetched: 4 << 20,
            validator: None,
            result: None,
            last_error: None,
            last_progress: None,
            boot: None,
            machine_restarts: 0,
            joined: Vec::new(),
            installed_on_boot: None,
            reboot_failures: 0,
            pieces: fwagent_state::Pieces::One,
            created_at: datetime!(2024-05-01 12:00:00 UTC),
            updated_at: datetime!(2024-05-01 12:00:16 UTC),
        };
        job.last_error = Some(stored(
            &job,
            "login as operator7 with hunter2hunter2 refused (pp-4711)",
        ));
        job
    }

    pub(crate) fn detail_of(job: &Job) -> DetailView {
        DetailView {
            job: JobView::of(job),
            url: job.request.source.url.clone(),
            last_error: job.last_error.clone(),
            log: vec![
                LogView::of(&LogEntry {
                    at: datetime!(2024-05-01 12:00:00 UTC),
                    from: None,
                    to: PhaseName::Accepted,
                    event: "request accepted".into(),
                    error: None,
                }),
                LogView::of(&LogEntry {
                    at: datetime!(2024-05-01 12:00:00.5 UTC),
                    from: Some(PhaseName::Accepted),
                    to: PhaseName::Downloading,
                    event: "download started".into(),
                    error: None,
                }),
                LogView::of(&LogEntry {
                    at: datetime!(2024-05-01 12:00:08 UTC),
                    from: Some(PhaseName::Downloading),
                    to: PhaseName::Downloading,
                    event: "retry 1 from byte 4194304 (attempt 2)".into(),
                    error: Some(stored(job, "connection reset; user operator7")),
                }),
            ],
            outbox: vec![],
        }
    }

    #[test]
    fn the_json_view_has_the_interface_shape_and_no_secrets() {
        let j = job();
        let v = serde_json::to_value(JobView::of(&j)).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "attempts",
                "bytesDone",
                "createdAt",
                "firmwareName",
                "md5sum",
                "messageId",
                "phase",
                "result",
                "sessionId",
                "totalBytes",
                "updatedAt"
            ]
        );
        assert_eq!(v["phase"], "downloading");
        assert_eq!(v["result"], serde_json::Value::Null);
        assert_eq!(v["createdAt"], "2024-05-01T12:00:00Z");
        let d = serde_json::to_string(&detail_of(&j)).unwrap();
        for secret in ["operator7", "hunter2hunter2", "pp-4711", "passPort"] {
            assert!(!d.contains(secret), "{secret} in {d}");
        }
        assert!(d.contains(
            "\"lastError\":\"login as <redacted> with <redacted> refused (<redacted>)\""
        ));
        let back: DetailView = serde_json::from_str(&d).unwrap();
        assert_eq!(back, detail_of(&j));
    }

    #[test]
    fn stored_text_is_shown_as_stored_and_never_redacted_twice() {
        // A password inside the marker: the state machine's one pass leaves
        // the marker whole, and the view shows it so. A second pass over the
        // stored text (as the views once made) garbled it.
        let mut j = job();
        j.request.source.password = Secret::new("acted");
        j.last_error = Some(stored(&j, "login refused: acted"));
        assert_eq!(j.last_error.as_deref(), Some("login refused: <redacted>"));
        assert_eq!(
            detail_of(&j).last_error.as_deref(),
            Some("login refused: <redacted>")
        );
        assert_eq!(
            stored(&j, "login refused: <redacted>"),
            "login refused: <red<redacted>>"
        );
    }

    #[test]
    fn acks_in_the_outbox_show_their_wire_operator() {
        let entry = OutboxEntry {
            seq: 1,
            message_id: "MID:1".into(),
            job: Some(1),
            message: Outgoing::Ack(fwagent_state::Ack {
                operator: "setCloudUpgradeConfig".into(),
                session_id: "SID:1".into(),
                message_id: "MID:1".into(),
                result: Outcome::ok(),
            }),
        };
        let view = OutboxView::of(&entry, None);
        assert_eq!(view.operator, "setCloudUpgradeConfig-Ack");
        assert_eq!(view.result, Some(Outcome::ok()));
    }
}
