//! What the control socket asks of the store's owner: read-only queries
//! ([`ReadStore`]) and cancelling an upgrade ([`CancelRequest`]).

use super::Upgrade;
use actix::prelude::*;
use fwagent_state::{transition, Event, Job, Refused, Store, StoreError};
use time::OffsetDateTime;

/// Run a read-only function over the store inside the actor that owns it
/// (the control socket's queries: sled allows one process per store).
pub struct ReadStore<R: Send + 'static>(pub Box<dyn FnOnce(&Store) -> R + Send>);

impl<R: Send + 'static> Message for ReadStore<R> {
    type Result = R;
}

impl<R: Send + 'static> Handler<ReadStore<R>> for Upgrade {
    type Result = MessageResult<ReadStore<R>>;

    fn handle(&mut self, msg: ReadStore<R>, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult((msg.0)(&self.store))
    }
}

/// Cancel an upgrade (the active one when `message_id` is `None`). Answers
/// the job as cancelled, or why it cannot be.
#[derive(Message, Debug)]
#[rtype(result = "Result<Job, CancelError>")]
pub struct CancelRequest {
    pub message_id: Option<String>,
}

/// Why a [`CancelRequest`] was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("the agent is stopping: its store could not be made durable")]
    Halted,
    #[error("no upgrade with messageId {0}")]
    NotFound(String),
    #[error("no upgrade is active")]
    NoneActive,
    /// The state machine refuses it (flashing has begun, already ended).
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("the cancel produced no record")]
    NoRecord,
    #[error("the state store failed: {0}")]
    Store(#[source] StoreError),
    /// The commit failed after it was applied: the agent stops.
    #[error("the state store failed: {0}; the agent stops, and its next start resumes from what is durable")]
    StoreFatal(#[source] StoreError),
}

impl Handler<CancelRequest> for Upgrade {
    type Result = Result<Job, CancelError>;

    fn handle(&mut self, msg: CancelRequest, ctx: &mut Context<Self>) -> Self::Result {
        if self.halted {
            return Err(CancelError::Halted);
        }
        let job = match &msg.message_id {
            Some(mid) => self.store.job_by_message_id(mid),
            None => self.store.active(),
        }
        .map_err(CancelError::Store)?;
        let job = job.ok_or_else(|| match msg.message_id {
            Some(mid) => CancelError::NotFound(mid),
            None => CancelError::NoneActive,
        })?;
        let t = transition(&job, Event::Cancel, OffsetDateTime::now_utc(), &self.policy)?;
        let cancelled = t.job.clone().ok_or(CancelError::NoRecord)?;
        self.commit_and_dispatch(t, ctx)
            .map_err(|e| match e.is_fatal() {
                true => CancelError::StoreFatal(e),
                false => CancelError::Store(e),
            })?;
        Ok(cancelled)
    }
}
