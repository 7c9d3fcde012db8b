//! The agent at run time: actix actors around the `fwagent-state` machine.
//!
//! ```text
//!  transport ─bytes─▶ Messaging (parses) ─Request─▶ Upgrade (store owner) ─Outbound─▶ Messaging ─▶ transport
//!                                                    │  ▲ JobEvent
//!                                                    ├──┼──▶ Download ──Chunk──▶ Verify
//!                                                    └──┴──▶ Flash
//! ```
//!
//! Each actor runs on an arbiter (thread) of its own, so a slow fsync in one
//! never stalls another. Only [`upgrade::Upgrade`] writes the store; the
//! others report what happened as [`JobEvent`]s. Messages and the types more
//! than one actor uses ([`BoxFuture`], [`UNCOMMITTED`]) are defined here, so
//! that every actor names its peers only as `Recipient<M>`.

pub mod agent;
pub mod download;
pub mod flash;
pub mod ftp;
pub mod http;
pub mod messaging;
#[cfg(test)]
mod stand_in;
pub mod upgrade;
pub mod verify;

use actix::prelude::*;
use fwagent_state::{Ack, Event, Incoming, JobId};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future, for the object-safe traits (fetchers, transports).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Outbox entries sent without a commit (the store itself failed) carry this
/// sequence number and are never marked delivered.
pub const UNCOMMITTED: u64 = u64::MAX;

/// A request, parsed at the edge ([`messaging::Inbox`]): valid, or the ack
/// that refuses it.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Request {
    pub incoming: Incoming,
    /// The largest image there is room for, if known, measured as the
    /// request came in ([`flash::staging::Staging::room`]).
    pub free_bytes: Option<u64>,
    /// Told the ack once the decision is committed (control socket `submit`,
    /// MQTT manual acknowledgement).
    pub reply: Option<tokio::sync::oneshot::Sender<Ack>>,
}

/// Something happened to an upgrade.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct JobEvent {
    pub job: JobId,
    pub event: Event,
}

/// The transport confirmed an outgoing message.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Delivered {
    pub seq: u64,
}

/// The request source has ended (stdio EOF): take no new requests, finish.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct InputClosed;

/// SIGTERM or SIGINT: checkpoint, settle, deliver, then exit 0
/// ([`upgrade::Upgrade`] runs the stop; docs/DURABILITY.md).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Shutdown;

/// Where the agent keeps its files inside the state directory.
#[derive(Clone, Debug)]
pub struct Paths {
    pub state_dir: PathBuf,
}

impl Paths {
    pub fn downloads(&self) -> PathBuf {
        self.state_dir.join("downloads")
    }

    /// The partial (then complete) image of one upgrade.
    pub fn part(&self, job: JobId) -> PathBuf {
        self.downloads().join(format!("{job}.part"))
    }

    /// The signature fetched from beside an upgrade's image (`<name>.sig`).
    pub fn sig(&self, job: JobId) -> PathBuf {
        self.downloads().join(format!("{job}.sig"))
    }

    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }

    /// The lock the `command:` backend's commands run under
    /// ([`crate::exec::GroupLock`]).
    pub fn installer_lock(&self) -> PathBuf {
        self.state_dir.join("installer.lock")
    }
}

/// Limits of the transfer, all configurable.
#[derive(Clone, Debug)]
pub struct Transfer {
    /// Bytes between two durable checkpoints.
    pub checkpoint_bytes: u64,
    pub connect_timeout: Duration,
    /// No byte for this long fails the attempt.
    pub idle_timeout: Duration,
    /// Redirects followed per attempt.
    pub max_redirects: u32,
    /// Hosts (normalised as `protocol::normalize_host` does) that a redirect
    /// may lead to besides the request's own host; empty: none.
    pub redirect_allow: Vec<String>,
    /// Fewer bytes per second than this, averaged over `idle_timeout`, fail
    /// the attempt (a server that drips data); 0: no minimum.
    pub min_rate: u64,
    /// Minimum interval between two progress events.
    pub progress_every: Duration,
}

impl Default for Transfer {
    fn default() -> Self {
        Transfer {
            checkpoint_bytes: 4 << 20,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            max_redirects: 5,
            redirect_allow: Vec::new(),
            min_rate: 100,
            progress_every: Duration::from_millis(500),
        }
    }
}
