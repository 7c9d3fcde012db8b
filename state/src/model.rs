//! What an upgrade is, and what the agent says about it.
//!
//! These are the types shared by the pure state machine ([`crate::machine`]),
//! the store ([`crate::store`]) and the runtime's protocol module, which parses
//! wire JSON into an [`UpgradeRequest`] and renders an [`Outgoing`] as JSON.
//! Nothing here knows JSON text or does I/O.

use crate::secret::{Redactor, Secret};
use serde::{Deserialize, Serialize};
use std::fmt;
use time::OffsetDateTime;

/// The operator of the one request this agent serves.
pub const OP_UPGRADE: &str = "setCloudUpgradeConfig";
/// The operator of the progress report (device to cloud).
pub const OP_PROGRESS: &str = "reportCloudUpgradeProgress";
/// The operator of the result report (device to cloud).
pub const OP_RESULT: &str = "reportCloudUpgradeResult";

/// An upgrade's number in the store. Partial files are named after it, so a
/// messageId never becomes a file name.
pub type JobId = u64;

/// How the firmware is fetched. `Https` and `Ftps` are extensions to the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Https,
    Ftp,
    Ftps,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Ftp => "ftp",
            Protocol::Ftps => "ftps",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the firmware is. `url` never carries user info: credentials live in
/// `user` and `password` only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    /// The directory on the server, as the request gave it.
    pub path: String,
    /// The file's full URL, built from the parts above (no user info).
    pub url: String,
    /// Decoded user name; empty means none (FTP: anonymous).
    pub user: Secret,
    /// Decoded password; empty means none.
    pub password: Secret,
}

/// What the firmware must be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Firmware {
    /// A plain file name, trimmed.
    pub name: String,
    /// 32 lowercase hex digits.
    pub md5: String,
    /// Bytes; > 0.
    pub size: u64,
    /// The request's `info.fileInfo.signature`, if it had one: the 64-byte
    /// Ed25519 signature in canonical base64 (else the agent looks for
    /// `<name>.sig` beside the image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// A validated `setCloudUpgradeConfig` request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRequest {
    pub message_id: String,
    pub session_id: String,
    pub source: Source,
    pub firmware: Firmware,
    /// "Upgrade process credentials": echoed in this upgrade's reports only.
    pub pass_port: Option<Secret>,
}

impl UpgradeRequest {
    /// Drop the user name, password and passPort.
    pub fn forget_secrets(&mut self) {
        self.source.user = Secret::default();
        self.source.password = Secret::default();
        self.pass_port = None;
    }
}

/// A request with another messageId for the image of the upgrade under
/// way (the same md5 and size): it joined that upgrade, and gets each of
/// its reports too, under its own sessionId, messageId and passPort
/// (docs/PROTOCOL-NOTES.md, "The same image under another messageId").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    pub message_id: String,
    pub session_id: String,
    pub firmware_name: String,
    pub pass_port: Option<Secret>,
}

impl Outgoing {
    /// The same message without its passPort (what the store keeps once it
    /// is delivered).
    pub fn without_secrets(mut self) -> Self {
        match &mut self {
            Outgoing::Ack(_) => {}
            Outgoing::Progress { subject, .. } | Outgoing::Result { subject, .. } => {
                subject.pass_port = None;
            }
        }
        self
    }
}

/// `{"errorNo": n, "description": "..."}`: the result of an ack or an upgrade.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    #[serde(rename = "errorNo")]
    pub error_no: u32,
    pub description: String,
}

impl Outcome {
    pub fn new(error_no: u32, description: impl Into<String>) -> Self {
        Outcome {
            error_no,
            description: description.into(),
        }
    }

    pub fn ok() -> Self {
        Outcome::new(0, "ok")
    }

    pub fn is_ok(&self) -> bool {
        self.error_no == 0
    }
}

/// The ack numbers of PROTOCOL.md.
pub mod ack_no {
    pub const OK: u32 = 0;
    pub const MALFORMED: u32 = 1;
    pub const UNSUPPORTED_OPERATOR: u32 = 2;
    pub const MISSING_FIELD: u32 = 3;
    pub const INVALID_FIELD: u32 = 4;
    pub const UNSUPPORTED_PROTOCOL: u32 = 5;
    pub const BUSY: u32 = 6;
    pub const NO_STORAGE: u32 = 7;
    pub const STORE_FAILED: u32 = 8;
}

/// The result numbers of PROTOCOL.md (after the ack).
pub mod result_no {
    pub const OK: u32 = 0;
    pub const CONNECT: u32 = 20;
    pub const AUTH: u32 = 21;
    pub const NOT_FOUND: u32 = 22;
    pub const TRANSFER: u32 = 23;
    pub const SIZE_MISMATCH: u32 = 30;
    pub const MD5_MISMATCH: u32 = 31;
    /// The image's signature is missing (with `--require-signature`) or invalid.
    pub const SIGNATURE: u32 = 32;
    pub const NO_STORAGE: u32 = 40;
    pub const FLASH_FAILED: u32 = 50;
    pub const ROLLED_BACK: u32 = 51;
    pub const CANCELLED: u32 = 60;

    /// What a result number means, as PROTOCOL.md's table says it.
    pub fn meaning(n: u32) -> Option<&'static str> {
        Some(match n {
            OK => "completed",
            CONNECT => "could not connect to the server",
            AUTH => "authentication refused by the server",
            NOT_FOUND => "file not found on the server",
            TRANSFER => "transfer error",
            SIZE_MISMATCH => "size mismatch",
            MD5_MISMATCH => "md5 mismatch",
            SIGNATURE => "signature missing or invalid",
            NO_STORAGE => "not enough storage",
            FLASH_FAILED => "flashing failed",
            ROLLED_BACK => "rolled back: the new image did not boot or was not confirmed",
            CANCELLED => "cancelled",
            _ => return None,
        })
    }
}

/// `setCloudUpgradeConfig-Ack` (or `<operator>-Ack`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The request's operator, without `-Ack` (`unknown` when unreadable).
    pub operator: String,
    pub session_id: String,
    pub message_id: String,
    pub result: Outcome,
}

/// What the report is about: the fields every report carries in `info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportSubject {
    pub session_id: String,
    pub request_message_id: String,
    pub firmware_name: String,
    pub md5: String,
    pub pass_port: Option<Secret>,
}

/// A message the agent sends. Reports get their messageId when committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outgoing {
    Ack(Ack),
    Progress {
        subject: ReportSubject,
        phase: PhaseName,
        bytes_done: u64,
        total_bytes: u64,
        percent: u8,
    },
    Result {
        subject: ReportSubject,
        phase: PhaseName,
        result: Outcome,
    },
}

/// An outgoing message as committed: in order, with its messageId fixed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub seq: u64,
    pub message_id: String,
    pub job: Option<JobId>,
    pub message: Outgoing,
}

/// Where an upgrade is. States carry their data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Recorded and acknowledged; the download has not started.
    Accepted,
    /// Fetching; `offset` is the durable prefix of the partial file.
    Downloading {
        offset: u64,
    },
    /// The whole file is here; size and md5 are being checked.
    Verifying,
    /// The verified image is being written to the flash target.
    Flashing,
    /// Installed into the other slot; waiting for the reboot into it.
    AwaitingReboot,
    Completed,
    Failed,
    Cancelled,
    RolledBack,
}

/// A phase's name alone, as scripts see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseName {
    Accepted,
    Downloading,
    Verifying,
    Flashing,
    AwaitingReboot,
    Completed,
    Failed,
    Cancelled,
    RolledBack,
}

impl PhaseName {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseName::Accepted => "accepted",
            PhaseName::Downloading => "downloading",
            PhaseName::Verifying => "verifying",
            PhaseName::Flashing => "flashing",
            PhaseName::AwaitingReboot => "awaiting_reboot",
            PhaseName::Completed => "completed",
            PhaseName::Failed => "failed",
            PhaseName::Cancelled => "cancelled",
            PhaseName::RolledBack => "rolled_back",
        }
    }

    /// One of the four terminal phases ([`Phase::is_terminal`] asks this).
    pub fn is_terminal(self) -> bool {
        match self {
            PhaseName::Accepted
            | PhaseName::Downloading
            | PhaseName::Verifying
            | PhaseName::Flashing
            | PhaseName::AwaitingReboot => false,
            PhaseName::Completed
            | PhaseName::Failed
            | PhaseName::Cancelled
            | PhaseName::RolledBack => true,
        }
    }
}

impl fmt::Display for PhaseName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Phase {
    pub fn name(self) -> PhaseName {
        match self {
            Phase::Accepted => PhaseName::Accepted,
            Phase::Downloading { .. } => PhaseName::Downloading,
            Phase::Verifying => PhaseName::Verifying,
            Phase::Flashing => PhaseName::Flashing,
            Phase::AwaitingReboot => PhaseName::AwaitingReboot,
            Phase::Completed => PhaseName::Completed,
            Phase::Failed => PhaseName::Failed,
            Phase::Cancelled => PhaseName::Cancelled,
            Phase::RolledBack => PhaseName::RolledBack,
        }
    }

    pub fn is_terminal(self) -> bool {
        self.name().is_terminal()
    }
}

/// When the last progress report was queued, for throttling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressMark {
    pub percent: u8,
    pub phase: PhaseName,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// How a downloaded image was put together. A transfer that resumed at a
/// checkpoint joins bytes of two transfers; the validator (ETag,
/// Last-Modified, SIZE/MDTM) says they are of the same file, but a server
/// that keeps a validator while the file changes, or a partial file damaged
/// on disk, splices two files. So a wrong md5 of a resumed image is not yet
/// final: the image is fetched once more from byte 0, and only a wrong md5
/// of that one is 31.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pieces {
    /// One transfer from byte 0.
    #[default]
    One,
    /// At least one transfer resumed at a checkpoint.
    Resumed,
    /// The fresh download after a wrong md5 of a resumed image: a wrong md5
    /// now is final, resumed or not.
    Refetched,
}

/// One upgrade, as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub request: UpgradeRequest,
    pub phase: Phase,
    /// Starts of the current phase's work: retries and restarts both count.
    pub attempts: u32,
    /// Bytes fetched so far (may run ahead of the durable offset).
    pub bytes_done: u64,
    /// The highest durable offset this upgrade ever reached: only a
    /// checkpoint beyond it is progress (ARCHITECTURE.md, rule 8).
    #[serde(default)]
    pub high_water: u64,
    /// Durable bytes fetched over every attempt, restarts from zero
    /// included; bounded by [`crate::Policy::fetch_budget`].
    #[serde(default)]
    pub fetched: u64,
    /// What identifies the server's file (ETag, Last-Modified, FTP SIZE/MDTM),
    /// so a resume never splices two different files.
    pub validator: Option<String>,
    /// `None` until the phase is terminal.
    pub result: Option<Outcome>,
    /// The last error seen, retried or not.
    pub last_error: Option<String>,
    pub last_progress: Option<ProgressMark>,
    /// The machine's boot id at this upgrade's last start, so a start after
    /// a restart of the machine is told from one after an agent restart.
    #[serde(default)]
    pub boot: Option<String>,
    /// Starts of the current phase after a restart of the machine
    /// ([`crate::Policy::machine_restarts`]).
    #[serde(default)]
    pub machine_restarts: u32,
    /// Requests that joined this upgrade, in order; at most
    /// [`Job::MAX_JOINED`].
    #[serde(default)]
    pub joined: Vec<Joined>,
    /// The boot id when the image was installed with a reboot to come: a
    /// backend that tells the reboot only by the boot id (`command:` with
    /// `--commit-command`) compares it with the boot of each check.
    #[serde(default)]
    pub installed_on_boot: Option<String>,
    /// Failed runs of the reboot command for this upgrade
    /// ([`crate::Policy::reboot_attempts`]).
    #[serde(default)]
    pub reboot_failures: u32,
    /// How the image in the partial file was put together: what a wrong md5
    /// at verification means.
    #[serde(default)]
    pub pieces: Pieces,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl Job {
    /// How many requests may join one upgrade; one more is answered busy.
    pub const MAX_JOINED: usize = 8;

    pub fn subject(&self) -> ReportSubject {
        ReportSubject {
            session_id: self.request.session_id.clone(),
            request_message_id: self.request.message_id.clone(),
            firmware_name: self.request.firmware.name.clone(),
            md5: self.request.firmware.md5.clone(),
            pass_port: self.request.pass_port.clone(),
        }
    }

    /// Whom each report goes to: the upgrade's own request, then every
    /// request that joined it.
    pub fn subjects(&self) -> Vec<ReportSubject> {
        let own = self.subject();
        let joined = self.joined.iter().map(|j| ReportSubject {
            session_id: j.session_id.clone(),
            request_message_id: j.message_id.clone(),
            firmware_name: j.firmware_name.clone(),
            md5: own.md5.clone(),
            pass_port: j.pass_port.clone(),
        });
        std::iter::once(own.clone()).chain(joined).collect()
    }

    /// What hides this upgrade's user name, password and passPorts in free text.
    pub fn redactor(&self) -> Redactor {
        let s = &self.request.source;
        Redactor::new(
            [&s.user, &s.password]
                .into_iter()
                .chain(self.request.pass_port.as_ref())
                .chain(self.joined.iter().filter_map(|j| j.pass_port.as_ref())),
        )
    }

    /// Drop the user name, password and passPorts (an upgrade that has
    /// ended keeps no credentials).
    pub fn forget_secrets(&mut self) {
        self.request.forget_secrets();
        for j in &mut self.joined {
            j.pass_port = None;
        }
    }

    pub fn percent(&self) -> u8 {
        percent(self.bytes_done, self.request.firmware.size)
    }
}

/// `done` of `total` in whole percent, 0..=100.
pub fn percent(done: u64, total: u64) -> u8 {
    if total == 0 {
        return 100;
    }
    (done.min(total) as u128 * 100 / total as u128) as u8
}

/// One line of an upgrade's transition log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub from: Option<PhaseName>,
    pub to: PhaseName,
    /// What happened, in a few words (no secrets).
    pub event: String,
    pub error: Option<String>,
}
