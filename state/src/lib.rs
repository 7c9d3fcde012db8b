//! `fwagent-state`: the upgrade state machine and its durable store.
//!
//! This crate decides; the runtime in `fwagent` does. [`machine`] holds the
//! pure transitions (no clock, no I/O), [`store`] the sled store that commits
//! a transition's job record, log entry and outbox entries in one transaction.
//! No actors, no network, no async runtime live here.

pub mod machine;
pub mod model;
pub mod secret;
pub mod store;
mod vault;

pub use machine::{
    on_request, store_failed, transition, Command, Event, Failure, Incoming, Policy, Refused,
    RequestView, Transition,
};
pub use model::*;
pub use secret::{Redactor, Secret};
pub use store::{Store, StoreError};
