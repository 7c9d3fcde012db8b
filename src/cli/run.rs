//! `fwagent run`: the agent. Flags, an optional TOML file with the same keys
//! (flags win), and the actix system that runs until stopped.

use super::{at_least_one, exit, DEFAULT_STATE_DIR};
use crate::runtime::agent::{self, AgentConfig};
use crate::runtime::flash::{FlashOptions, FlashSpec};
use crate::runtime::http::HttpFetcher;
use crate::runtime::messaging::mqtt::{MqttArgs, MqttSettings, PUBACK_TIMEOUT};
use crate::runtime::{Paths, Transfer};
use crate::signature::SignaturePolicy;
use actix::prelude::*;
use fwagent_state::{Policy, Secret, Store};
use serde::Deserialize;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RunArgs {
    /// TOML file with the same keys as these flags; flags win.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Where the store, partial downloads and the control socket live
    /// [default: /var/lib/fwagent].
    #[arg(long, env = "FWAGENT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where requests come from and replies go: stdio or mqtt [default: stdio].
    #[arg(long)]
    pub transport: Option<String>,
    /// mqtt://[user:pass@]host:port or mqtts://... (never logged with its
    /// user info). A password here shows in the process list: prefer
    /// --mqtt-password-file, FWAGENT_MQTT_PASSWORD or FWAGENT_MQTT_URL.
    #[arg(long, value_parser = secret_arg, env = "FWAGENT_MQTT_URL", hide_env_values = true)]
    pub mqtt_url: Option<Secret>,
    /// A file whose first line is the MQTT password, for the user in
    /// --mqtt-url (the environment's FWAGENT_MQTT_PASSWORD does the same).
    #[arg(long, value_name = "FILE")]
    pub mqtt_password_file: Option<PathBuf>,
    /// mqtts: the CA certificate(s) (PEM) to trust instead of the web PKI roots.
    #[arg(long, value_name = "FILE")]
    pub mqtt_ca: Option<PathBuf>,
    /// mqtts: a client certificate chain (PEM), with --mqtt-key.
    #[arg(long, value_name = "FILE")]
    pub mqtt_cert: Option<PathBuf>,
    /// mqtts: the client certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub mqtt_key: Option<PathBuf>,
    /// https downloads: the CA certificate(s) (PEM) to trust for firmware
    /// servers instead of the web PKI roots.
    #[arg(long, value_name = "FILE")]
    pub https_ca: Option<PathBuf>,
    /// This gateway's id, used in topics and report messageIds [default: the host name].
    #[arg(long)]
    pub device_id: Option<String>,
    /// [default: devices/{deviceId}/request]
    #[arg(long)]
    pub request_topic: Option<String>,
    /// [default: devices/{deviceId}/response]
    #[arg(long)]
    pub response_topic: Option<String>,
    /// Retained `online`/`offline` (the last will) [default: devices/{deviceId}/status].
    #[arg(long)]
    pub status_topic: Option<String>,
    /// MQTT: seconds to wait for the broker's PUBACK of an ack or report;
    /// then the connection is dropped and the message published again on
    /// the next one [default: 30].
    #[arg(long, value_name = "SECS", value_parser = at_least_one::<NonZeroU64>)]
    pub mqtt_puback_timeout: Option<NonZeroU64>,
    /// Where images go: file:PATH (once verified), ab:DIR (streamed into the
    /// inactive slot, booted only once verified; docs/AB-SLOTS.md) or
    /// command:CMD (an installer; `{image}` is replaced by the image's path).
    #[arg(long)]
    pub flash: Option<String>,
    /// ab: the command that reboots into the new slot; "" = none, wait for
    /// someone else to reboot [default: reboot].
    #[arg(long, value_name = "CMD")]
    pub reboot_command: Option<String>,
    /// ab: run after a trial boot of the new slot; exit 0 = healthy, commit
    /// [default: none, booting is enough].
    #[arg(long, value_name = "CMD")]
    pub health_command: Option<String>,
    /// command: after the installer, reboot (--reboot-command) and run this
    /// on the first start on the new boot; exit 0 = the new image is
    /// confirmed, else 51 (e.g. `rauc status mark-good`) [default: none,
    /// the installer's exit status is the result].
    #[arg(long, value_name = "CMD")]
    pub commit_command: Option<String>,
    /// Seconds the installer (command:), the health check, the commit
    /// command and the reboot command may run before they are killed
    /// [default: 1800].
    #[arg(long, value_name = "SECS", value_parser = at_least_one::<NonZeroU64>)]
    pub install_timeout: Option<NonZeroU64>,
    /// ab: trial boots of a new slot before the bootloader falls back
    /// [default: 3].
    #[arg(long, value_name = "N", value_parser = at_least_one::<NonZeroU32>)]
    pub boot_tries: Option<NonZeroU32>,
    /// Larger images are refused with errorNo 4 [default: 1 GiB].
    #[arg(long, value_name = "BYTES", value_parser = at_least_one::<NonZeroU64>)]
    pub max_image_size: Option<NonZeroU64>,
    /// Larger requests are refused with errorNo 1 [default: 65536; at most 524288].
    #[arg(long, value_name = "BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Longer sessionId/messageId are refused with errorNo 4 [default: 256].
    #[arg(long, value_name = "BYTES")]
    pub max_id_bytes: Option<usize>,
    /// Command that turns non-text base64 credentials into text.
    #[arg(long, value_name = "CMD")]
    pub credentials_decoder: Option<String>,
    /// Send acks only, no progress or result reports.
    #[arg(long)]
    #[serde(default)]
    pub no_reports: bool,
    /// A stdio run exits 1 when an upgrade it carried (accepted or resumed,
    /// and ended in this run) ended with errorNo other than 0.
    #[arg(long)]
    #[serde(default)]
    pub exit_code: bool,
    /// Bytes between durable download checkpoints [default: 4 MiB].
    #[arg(long, value_name = "BYTES", value_parser = at_least_one::<NonZeroU64>)]
    pub checkpoint_bytes: Option<NonZeroU64>,
    /// Seconds to wait for a connection [default: 10].
    #[arg(long, value_name = "SECS", value_parser = at_least_one::<NonZeroU64>)]
    pub connect_timeout: Option<NonZeroU64>,
    /// Seconds without data before an attempt fails [default: 30].
    #[arg(long, value_name = "SECS", value_parser = at_least_one::<NonZeroU64>)]
    pub idle_timeout: Option<NonZeroU64>,
    /// Download attempts, retries and restarts together [default: 6].
    #[arg(long, value_name = "N", value_parser = at_least_one::<NonZeroU32>)]
    pub download_attempts: Option<NonZeroU32>,
    /// First retry delay in milliseconds, doubled per retry; 0 = retry at
    /// once [default: 1000].
    #[arg(long, value_name = "MS")]
    pub retry_base_ms: Option<u64>,
    /// Redirects followed per attempt; 0 = follow none [default: 5].
    #[arg(long, value_name = "N")]
    pub max_redirects: Option<u32>,
    /// A host that HTTP redirects may lead to besides the request's own
    /// (repeatable; credentials are never sent to it) [default: none].
    #[arg(long, value_name = "HOST")]
    #[serde(default)]
    pub redirect_allow: Vec<String>,
    /// Fewer bytes per second than this, averaged over --idle-timeout, fail
    /// the attempt; 0 = no minimum [default: 100].
    #[arg(long, value_name = "BYTES")]
    pub min_rate: Option<u64>,
    /// An Ed25519 public key (PEM, as `openssl pkey -pubout` writes it)
    /// whose signatures of images are trusted (repeatable: a key rotation
    /// trusts the old and the new). With one, every signature that comes
    /// with an image (`<firmwareName>.sig` beside it, or the request's
    /// `info.fileInfo.signature`) must be valid, else result 32
    /// [default: none, signatures not checked].
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub trust_key: Vec<PathBuf>,
    /// An image without a signature is refused (result 32); needs
    /// --trust-key.
    #[arg(long)]
    #[serde(default)]
    pub require_signature: bool,
}

impl RunArgs {
    /// Flags over the file's keys.
    fn merged(self) -> Result<RunArgs, String> {
        let Some(path) = &self.config else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
        let file: RunArgs =
            toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
        Ok(RunArgs {
            config: self.config,
            state_dir: self.state_dir.or(file.state_dir),
            transport: self.transport.or(file.transport),
            mqtt_url: self.mqtt_url.or(file.mqtt_url),
            mqtt_password_file: self.mqtt_password_file.or(file.mqtt_password_file),
            mqtt_ca: self.mqtt_ca.or(file.mqtt_ca),
            mqtt_cert: self.mqtt_cert.or(file.mqtt_cert),
            mqtt_key: self.mqtt_key.or(file.mqtt_key),
            https_ca: self.https_ca.or(file.https_ca),
            device_id: self.device_id.or(file.device_id),
            request_topic: self.request_topic.or(file.request_topic),
            response_topic: self.response_topic.or(file.response_topic),
            status_topic: self.status_topic.or(file.status_topic),
            mqtt_puback_timeout: self.mqtt_puback_timeout.or(file.mqtt_puback_timeout),
            flash: self.flash.or(file.flash),
            reboot_command: self.reboot_command.or(file.reboot_command),
            health_command: self.health_command.or(file.health_command),
            commit_command: self.commit_command.or(file.commit_command),
            install_timeout: self.install_timeout.or(file.install_timeout),
            boot_tries: self.boot_tries.or(file.boot_tries),
            max_image_size: self.max_image_size.or(file.max_image_size),
            max_request_bytes: self.max_request_bytes.or(file.max_request_bytes),
            max_id_bytes: self.max_id_bytes.or(file.max_id_bytes),
            credentials_decoder: self.credentials_decoder.or(file.credentials_decoder),
            no_reports: self.no_reports || file.no_reports,
            exit_code: self.exit_code || file.exit_code,
            checkpoint_bytes: self.checkpoint_bytes.or(file.checkpoint_bytes),
            connect_timeout: self.connect_timeout.or(file.connect_timeout),
            idle_timeout: self.idle_timeout.or(file.idle_timeout),
            download_attempts: self.download_attempts.or(file.download_attempts),
            retry_base_ms: self.retry_base_ms.or(file.retry_base_ms),
            max_redirects: self.max_redirects.or(file.max_redirects),
            redirect_allow: if self.redirect_allow.is_empty() {
                file.redirect_allow
            } else {
                self.redirect_allow
            },
            min_rate: self.min_rate.or(file.min_rate),
            trust_key: if self.trust_key.is_empty() {
                file.trust_key
            } else {
                self.trust_key
            },
            require_signature: self.require_signature || file.require_signature,
        })
    }
}

/// `--mqtt-url` as a [`Secret`]: clap never echoes it in an error, and
/// `Debug` of the arguments never shows it. It is parsed in `from_args`.
fn secret_arg(s: &str) -> Result<Secret, std::convert::Infallible> {
    Ok(Secret::new(s))
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "fwagent".to_string())
}

impl AgentConfig {
    pub fn from_args(args: RunArgs) -> Result<AgentConfig, String> {
        let a = args.merged()?;
        let parse = super::parse_options(
            a.max_image_size,
            a.credentials_decoder.clone(),
            a.max_request_bytes,
            a.max_id_bytes,
        )?;
        let flash = a
            .flash
            .as_deref()
            .ok_or(
                "--flash is required: where verified images go (file:PATH, ab:DIR or command:CMD)",
            )?
            .parse::<FlashSpec>()?;
        if a.commit_command.is_some() && !matches!(flash, FlashSpec::Command(_)) {
            return Err(format!(
                "--commit-command is for --flash command:CMD, not {flash}"
            ));
        }
        if a.require_signature && a.trust_key.is_empty() {
            return Err(
                "--require-signature needs at least one --trust-key to check signatures with"
                    .into(),
            );
        }
        let signatures = SignaturePolicy::load(&a.trust_key, a.require_signature)
            .map_err(|e| format!("--trust-key: {e}"))?;
        let transport = a.transport.clone().unwrap_or_else(|| "stdio".into());
        let device_id = a.device_id.clone().unwrap_or_else(host_name);
        let connect_timeout = a
            .connect_timeout
            .map(|s| Duration::from_secs(s.get()))
            .unwrap_or(Transfer::default().connect_timeout);
        let http =
            HttpFetcher::new(connect_timeout, a.https_ca.as_deref()).map_err(|e| {
                match &a.https_ca {
                    Some(_) => format!("--https-ca: {e}"),
                    None => e.to_string(),
                }
            })?;
        let mqtt = mqtt_settings(&a, &transport, &device_id, connect_timeout)?;
        let transfer = transfer(&a, connect_timeout)?;
        let flash_options = flash_options(&a);
        let defaults = Policy::default();
        let boot_tries = flash_options.boot_tries;
        let flash_outlives_restarts = flash.outlives_restarts();
        Ok(AgentConfig {
            paths: Paths {
                state_dir: a
                    .state_dir
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            },
            device_id,
            transport,
            mqtt,
            http: Arc::new(http),
            flash,
            flash_options,
            parse,
            policy: Policy {
                download_attempts: a
                    .download_attempts
                    .map_or(defaults.download_attempts, NonZeroU32::get),
                backoff_base: a
                    .retry_base_ms
                    .map(Duration::from_millis)
                    .unwrap_or(defaults.backoff_base),
                reports: !a.no_reports,
                boot_tries,
                flash_outlives_restarts,
                ..defaults
            },
            transfer,
            signatures: Arc::new(signatures),
            exit_code: a.exit_code,
        })
    }
}

/// The MQTT settings `--transport` asks for (none over stdio).
fn mqtt_settings(
    a: &RunArgs,
    transport: &str,
    device_id: &str,
    connect_timeout: Duration,
) -> Result<Option<MqttSettings>, String> {
    match transport {
        "stdio" => Ok(None),
        "mqtt" => MqttSettings::new(MqttArgs {
            url: a.mqtt_url.as_ref(),
            password: mqtt_password(a)?,
            device_id,
            request_topic: a.request_topic.as_deref(),
            response_topic: a.response_topic.as_deref(),
            status_topic: a.status_topic.as_deref(),
            ca: a.mqtt_ca.as_deref(),
            cert: a.mqtt_cert.as_deref(),
            key: a.mqtt_key.as_deref(),
            connect_timeout,
            puback_timeout: a
                .mqtt_puback_timeout
                .map_or(PUBACK_TIMEOUT, |s| Duration::from_secs(s.get())),
        })
        .map(Some)
        .map_err(|e| e.to_string()),
        other => Err(format!("unknown transport `{other}`: use stdio or mqtt")),
    }
}

/// The environment variable that carries the MQTT password.
const MQTT_PASSWORD_ENV: &str = "FWAGENT_MQTT_PASSWORD";

/// The MQTT password kept off the command line: `--mqtt-password-file`'s
/// first line, else `FWAGENT_MQTT_PASSWORD`. Errors never show it.
fn mqtt_password(a: &RunArgs) -> Result<Option<Secret>, String> {
    let text = match &a.mqtt_password_file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read --mqtt-password-file {}: {}",
                path.display(),
                e.kind()
            )
        })?,
        None => match std::env::var(MQTT_PASSWORD_ENV) {
            Ok(text) => text,
            Err(_) => return Ok(None),
        },
    };
    let password = text.lines().next().unwrap_or_default();
    if password.is_empty() {
        return Err(match &a.mqtt_password_file {
            Some(path) => format!(
                "--mqtt-password-file {}: the first line is empty",
                path.display()
            ),
            None => format!("{MQTT_PASSWORD_ENV} is empty"),
        });
    }
    Ok(Some(Secret::new(password)))
}

/// The transfer limits from the flags, the rest from [`Transfer::default`].
fn transfer(a: &RunArgs, connect_timeout: Duration) -> Result<Transfer, String> {
    let redirect_allow = a
        .redirect_allow
        .iter()
        .map(|h| {
            crate::protocol::normalize_host(h).map_err(|why| format!("--redirect-allow: {why}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let defaults = Transfer::default();
    Ok(Transfer {
        checkpoint_bytes: a
            .checkpoint_bytes
            .map_or(defaults.checkpoint_bytes, NonZeroU64::get),
        connect_timeout,
        idle_timeout: a
            .idle_timeout
            .map(|s| Duration::from_secs(s.get()))
            .unwrap_or(defaults.idle_timeout),
        max_redirects: a.max_redirects.unwrap_or(defaults.max_redirects),
        redirect_allow,
        min_rate: a.min_rate.unwrap_or(defaults.min_rate),
        ..defaults
    })
}

/// The reboot, health and installer settings; an empty command is none.
fn flash_options(a: &RunArgs) -> FlashOptions {
    let defaults = FlashOptions::default();
    FlashOptions {
        reboot_command: match &a.reboot_command {
            Some(cmd) if cmd.trim().is_empty() => None,
            Some(cmd) => Some(cmd.clone()),
            None => defaults.reboot_command,
        },
        health_command: a
            .health_command
            .clone()
            .filter(|cmd| !cmd.trim().is_empty()),
        commit_command: a
            .commit_command
            .clone()
            .filter(|cmd| !cmd.trim().is_empty()),
        command_timeout: a
            .install_timeout
            .map(|s| Duration::from_secs(s.get()))
            .unwrap_or(defaults.command_timeout),
        boot_tries: a.boot_tries.map_or(defaults.boot_tries, NonZeroU32::get),
    }
}

pub fn main(args: Box<RunArgs>) -> ExitCode {
    let config = match AgentConfig::from_args(*args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fwagent run: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    // `file:PATH` names an existing file or block device: never create one.
    if let FlashSpec::File(target) = &config.flash {
        if let Err(e) = crate::runtime::flash::file_target(target) {
            eprintln!("fwagent run: --flash file:{}: {e}", target.display());
            return ExitCode::from(exit::USAGE);
        }
    }
    if let Err(e) = crate::fsutil::private_dir(&config.paths.state_dir)
        .and_then(|()| crate::fsutil::private_dir(&config.paths.downloads()))
    {
        eprintln!(
            "fwagent run: cannot create the state directory {}: {e}",
            config.paths.state_dir.display()
        );
        return ExitCode::from(exit::UNREACHABLE);
    }
    let store = match Store::open_or_recover(&config.paths.state_dir, &config.device_id) {
        Ok((store, recovered)) => {
            if let Some(r) = recovered {
                say_recovered(&r);
            }
            store
        }
        Err(e) => {
            eprintln!("fwagent run: cannot open the store: {e}");
            return ExitCode::from(exit::UNREACHABLE);
        }
    };
    // What `--exit-code` looks at once the run is over.
    let judge = (config.exit_code && config.transport == "stdio").then(|| {
        (
            config.paths.state_dir.clone(),
            config.device_id.clone(),
            time::OffsetDateTime::now_utc(),
        )
    });
    let system = System::new();
    let started = system.block_on(async move { agent::start(config, store) });
    if let Err(e) = started {
        eprintln!("fwagent run: {e}");
        return ExitCode::from(exit::UNREACHABLE);
    }
    match system.run_with_code() {
        Ok(0) => match judge {
            Some((state_dir, device_id, since)) => carried_outcome(&state_dir, &device_id, since),
            None => ExitCode::SUCCESS,
        },
        Ok(code) => ExitCode::from(code.clamp(1, 255) as u8),
        Err(e) => {
            eprintln!("fwagent run: {e}");
            ExitCode::from(exit::UNREACHABLE)
        }
    }
}

/// `--exit-code`: 1 when an upgrade that ended during this run (its last
/// change at or after `since`, in a terminal phase) ended with errorNo other
/// than 0; 0 when none did; 3 when the store cannot be read again.
fn carried_outcome(
    state_dir: &std::path::Path,
    device_id: &str,
    since: time::OffsetDateTime,
) -> ExitCode {
    let history = Store::open(state_dir, device_id).and_then(|s| s.history(None));
    let jobs = match history {
        Ok(jobs) => jobs,
        Err(e) => {
            eprintln!("fwagent run: --exit-code: cannot read the store again: {e}");
            return ExitCode::from(exit::UNREACHABLE);
        }
    };
    let failed = jobs.iter().find(|j| {
        j.phase.is_terminal()
            && j.updated_at >= since
            && j.result.as_ref().is_some_and(|r| !r.is_ok())
    });
    match failed {
        Some(job) => {
            let r = job.result.as_ref().expect("a failed upgrade has a result");
            eprintln!(
                "fwagent run: upgrade {} ended {} with errorNo {}: exit 1 (--exit-code)",
                job.request.message_id,
                job.phase.name(),
                r.error_no
            );
            ExitCode::from(1)
        }
        None => ExitCode::SUCCESS,
    }
}

/// A store that would not open was moved aside and a fresh one seeded from
/// its redundant record (docs/DURABILITY.md, "A store that will not open"):
/// said on stderr and in the log, at error level.
fn say_recovered(r: &fwagent_state::store::Recovered) {
    let active = r.active.as_deref().unwrap_or("none");
    eprintln!(
        "fwagent run: THE STORE WOULD NOT OPEN ({}); it is kept in {}; a fresh store carries on \
         from the redundant record: upgrade under way {active}, {} answered messageIds",
        r.error,
        r.moved_to.display(),
        r.answered
    );
    tracing::error!(
        error = %r.error,
        moved_to = %r.moved_to.display(),
        upgrade = active,
        answered = r.answered,
        "the store would not open; carrying on from its redundant record"
    );
}
