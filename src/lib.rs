//! `fwagent`: the runtime of the firmware-upgrade agent.
//!
//! The decisions live in the `fwagent-state` crate; this crate parses the wire
//! protocol ([`protocol`]), runs the actors that download, verify and flash
//! ([`runtime`]), talks to the cloud over a transport, and serves the command
//! line ([`cli`]) and the control socket ([`control`]), both with the JSON
//! views of [`views`]. [`tls`] loads the CA and client certificates that MQTT
//! over TLS and https downloads trust and present; [`exec`] runs every
//! external command (the credentials decoder, the installer, reboot and
//! health commands).

pub mod cli;
pub mod control;
pub mod crash;
pub mod exec;
pub mod fsutil;
pub mod logging;
pub mod protocol;
pub mod runtime;
pub mod signature;
pub mod tls;
pub mod views;
