//! The agent's wiring: every actor on an arbiter of its own (so a long
//! write, hash or command never stalls another), the transport, the control
//! socket and the signal handler. `cli::run` builds the [`AgentConfig`] from
//! flags and a file and calls [`start`] inside the actix system.

use super::download::{Download, Fetchers};
use super::flash::staging::{Staging, StagingPeer};
use super::flash::{Flash, FlashOptions, FlashSpec};
use super::ftp::FtpFetcher;
use super::http::HttpFetcher;
use super::messaging::mqtt::{Mqtt, MqttSettings};
use super::messaging::stdio::Stdio;
use super::messaging::{Inbox, Messaging, Transport};
use super::upgrade::{Upgrade, Wire};
use super::verify::Verify;
use super::{Paths, Shutdown, Transfer};
use crate::protocol::ParseOptions;
use crate::signature::SignaturePolicy;
use actix::prelude::*;
use fwagent_state::{Policy, Protocol, Store};
use std::sync::Arc;

/// The agent's settings, defaults applied.
pub struct AgentConfig {
    pub paths: Paths,
    pub device_id: String,
    pub transport: String,
    /// Set when `transport` is `mqtt`.
    pub mqtt: Option<MqttSettings>,
    /// The `http` and `https` downloads (trusting `--https-ca` when given).
    pub http: Arc<HttpFetcher>,
    pub flash: FlashSpec,
    pub flash_options: FlashOptions,
    pub parse: ParseOptions,
    pub policy: Policy,
    pub transfer: Transfer,
    /// `--trust-key` and `--require-signature`.
    pub signatures: Arc<SignaturePolicy>,
    /// `--exit-code`: judged by `fwagent run` once the agent has exited.
    pub exit_code: bool,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--transport mqtt without MQTT settings")]
    NoMqttSettings,
    #[error("unknown transport `{0}`")]
    UnknownTransport(String),
}

/// Start every actor on an arbiter of its own and wire them together.
pub fn start(config: AgentConfig, store: Store) -> Result<(), StartError> {
    let fetchers = Fetchers::default()
        .with(Protocol::Http, config.http.clone())
        .with(Protocol::Https, config.http.clone())
        .with(Protocol::Ftp, Arc::new(FtpFetcher::new()));
    let protocols = fetchers.protocols();
    let AgentConfig {
        paths,
        transport,
        mqtt,
        flash,
        flash_options,
        parse,
        policy,
        transfer,
        signatures,
        ..
    } = config;
    let sig_files = signatures.checks().then(|| paths.clone());
    let control_socket = paths.control_socket();
    let staging = Staging::new(paths, &flash);
    let upgrade = Upgrade::start_in_arbiter(&Arbiter::new().handle(), move |_| {
        Upgrade::new(store, policy, transfer, protocols, boot_id())
    });
    let inbox = Inbox::new(parse, upgrade.clone().recipient(), staging.clone());
    let events = upgrade.clone().recipient();
    let flash = {
        let (events, staging) = (events.clone(), staging.clone());
        Flash::start_in_arbiter(&Arbiter::new().handle(), move |_| {
            Flash::new(flash, flash_options, staging, events)
        })
    };
    let verify = {
        let events = events.clone();
        Verify::start_in_arbiter(&Arbiter::new().handle(), move |_| {
            Verify::new(events, staging, signatures)
        })
    };
    let download = {
        let (events, verify) = (events.clone(), verify.clone().recipient());
        let staging = StagingPeer::of(&flash);
        Download::start_in_arbiter(&Arbiter::new().handle(), move |_| {
            Download::new(fetchers, staging, events, verify, sig_files)
        })
    };
    let transport: Box<dyn Transport> = match transport.as_str() {
        "stdio" => Box::new(Stdio),
        "mqtt" => Box::new(Mqtt::new(mqtt.ok_or(StartError::NoMqttSettings)?)),
        other => return Err(StartError::UnknownTransport(other.to_string())),
    };
    let messaging = {
        let (inbox, closed, delivered) = (
            inbox.clone(),
            upgrade.clone().recipient(),
            upgrade.clone().recipient(),
        );
        Messaging::start_in_arbiter(&Arbiter::new().handle(), move |_| {
            Messaging::new(transport, inbox, closed, delivered)
        })
    };
    upgrade.do_send(Wire {
        messaging: messaging.clone().recipient(),
        listen: messaging.recipient(),
        download: download.clone().recipient(),
        abort: download.clone().recipient(),
        drain: download.recipient(),
        verify: verify.recipient(),
        reboot: flash.clone().recipient(),
        check_boot: flash.clone().recipient(),
        end: flash.clone().recipient(),
        remove_stale: flash.clone().recipient(),
        flash: flash.recipient(),
    });
    crate::control::serve(
        control_socket,
        crate::control::Peers::new(upgrade.clone(), inbox),
    );
    stop_on_signals(upgrade);
    Ok(())
}

/// SIGTERM or SIGINT: a stop at the next safe point ([`Shutdown`]); a
/// second one stops at once (what is committed stands).
fn stop_on_signals(upgrade: Addr<Upgrade>) {
    actix_rt::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            if n > 0 {
                tracing::info!("second signal; stopping at once");
                System::current().stop();
                return;
            }
            upgrade.do_send(Shutdown);
        }
    });
}

/// What `FWAGENT_BOOT_ID` overrides: the tests restart the agent as if the
/// machine had restarted by giving each run another boot id.
const BOOT_ID_ENV: &str = "FWAGENT_BOOT_ID";

/// The machine's boot id: Linux makes a new one at every boot
/// (`/proc/sys/kernel/random/boot_id`). `None` where it cannot be read:
/// then every start counts as an attempt.
fn boot_id() -> Option<String> {
    let id = match std::env::var(BOOT_ID_ENV) {
        Ok(id) => id,
        Err(_) => std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?,
    };
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}
