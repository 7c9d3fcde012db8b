//! The MQTT settings of `fwagent run`, checked up front: the broker URL
//! (never shown with its user info), the topics, the client id, TLS (files
//! read here), and the rumqttc options they make.

use super::STATUS_OFFLINE;
use crate::tls::{self, ClientCert, TlsError};
use fwagent_state::Secret;
use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Default topics; `{deviceId}` is replaced by the device id (in configured
/// topics too).
pub const DEFAULT_REQUEST_TOPIC: &str = "devices/{deviceId}/request";
pub const DEFAULT_RESPONSE_TOPIC: &str = "devices/{deviceId}/response";
pub const DEFAULT_STATUS_TOPIC: &str = "devices/{deviceId}/status";

/// The largest packet the agent reads; a larger one breaks the connection.
pub const MAX_INCOMING_PACKET: usize = 1 << 20;
/// The largest packet the agent writes (reports are a few hundred bytes).
const MAX_OUTGOING_PACKET: usize = 1 << 20;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// The default of `--mqtt-puback-timeout`.
pub const PUBACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests queued towards rumqttc's event loop: one publish, a subscribe,
/// and the manual acks (the broker keeps at most its inflight window unacked).
pub(super) const REQUEST_CHANNEL: usize = 256;

/// What can be wrong with the MQTT settings. No variant carries the URL.
#[derive(Debug, thiserror::Error)]
pub enum MqttConfigError {
    #[error("--mqtt-url is required with --transport mqtt")]
    MissingUrl,
    #[error("--mqtt-url is not a URL ({0}); expected mqtt://[user:pass@]host:port or mqtts://...")]
    Url(url::ParseError),
    #[error("--mqtt-url scheme `{0}` is not supported; use mqtt:// or mqtts://")]
    Scheme(String),
    #[error("--mqtt-url has no host")]
    NoHost,
    #[error("--mqtt-url must name only the broker: no path, query or fragment")]
    Extra,
    #[error("an MQTT password (in --mqtt-url, --mqtt-password-file or FWAGENT_MQTT_PASSWORD) needs a user name in --mqtt-url")]
    PasswordWithoutUser,
    #[error("--mqtt-url: the {0} is not valid percent-encoded UTF-8")]
    UserInfo(&'static str),
    #[error("--mqtt-ca, --mqtt-cert and --mqtt-key need an mqtts:// URL")]
    TlsOptionsWithoutTls,
    #[error("--mqtt-cert and --mqtt-key go together")]
    HalfClientCert,
    /// The CA file, the client certificate or its key (the message names the file).
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{which} topic `{topic}` is invalid: {why}")]
    Topic {
        which: &'static str,
        topic: String,
        why: &'static str,
    },
    #[error("device id `{0}` cannot be an MQTT client id: it must be non-empty, without `/`, `+`, `#` or control characters")]
    DeviceId(String),
}

/// `mqtt://[user:pass@]host:port` or `mqtts://...`, parsed. Shown without
/// its user info.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub user: Option<Secret>,
    pub password: Option<Secret>,
}

impl BrokerUrl {
    pub fn parse(text: &str) -> Result<BrokerUrl, MqttConfigError> {
        let url = url::Url::parse(text.trim()).map_err(MqttConfigError::Url)?;
        let (tls, default_port) = match url.scheme() {
            "mqtt" => (false, 1883),
            "mqtts" => (true, 8883),
            other => return Err(MqttConfigError::Scheme(other.to_string())),
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => format!("[{a}]"),
            _ => return Err(MqttConfigError::NoHost),
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(MqttConfigError::Extra);
        }
        let decode = |s: &str, what| percent_decode(s).ok_or(MqttConfigError::UserInfo(what));
        let user = (!url.username().is_empty())
            .then(|| decode(url.username(), "user name"))
            .transpose()?;
        let password = url.password().map(|p| decode(p, "password")).transpose()?;
        if user.is_none() && password.is_some() {
            return Err(MqttConfigError::PasswordWithoutUser);
        }
        Ok(BrokerUrl {
            tls,
            host,
            port: url.port().unwrap_or(default_port),
            user: user.map(Secret::new),
            password: password.map(Secret::new),
        })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        let creds = if self.user.is_some() {
            "<redacted>@"
        } else {
            ""
        };
        write!(f, "{scheme}://{creds}{}:{}", self.host, self.port)
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Everything the transport needs, validated (files read) up front.
#[derive(Clone)]
pub struct MqttSettings {
    pub url: BrokerUrl,
    /// The MQTT client id: the device id.
    pub client_id: String,
    pub request_topic: String,
    pub response_topic: String,
    pub status_topic: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    /// How long a publish waits for its PUBACK before the connection is
    /// dropped and the publish sent again on the next one.
    pub puback_timeout: Duration,
}

impl fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSettings")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("request_topic", &self.request_topic)
            .field("response_topic", &self.response_topic)
            .field("status_topic", &self.status_topic)
            .field("tls", &self.tls.is_some())
            .field("puback_timeout", &self.puback_timeout)
            .finish()
    }
}

/// The raw MQTT options of `fwagent run`.
#[derive(Clone, Debug, Default)]
pub struct MqttArgs<'a> {
    pub url: Option<&'a Secret>,
    /// Replaces the URL's password (kept off the command line).
    pub password: Option<Secret>,
    pub device_id: &'a str,
    pub request_topic: Option<&'a str>,
    pub response_topic: Option<&'a str>,
    pub status_topic: Option<&'a str>,
    pub ca: Option<&'a Path>,
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    pub connect_timeout: Duration,
    pub puback_timeout: Duration,
}

impl MqttSettings {
    pub fn new(a: MqttArgs<'_>) -> Result<MqttSettings, MqttConfigError> {
        let mut url = BrokerUrl::parse(a.url.ok_or(MqttConfigError::MissingUrl)?.expose())?;
        if let Some(password) = a.password {
            if url.user.is_none() {
                return Err(MqttConfigError::PasswordWithoutUser);
            }
            url.password = Some(password);
        }
        let id = a.device_id;
        if id.is_empty()
            || id
                .chars()
                .any(|c| c.is_control() || matches!(c, '/' | '+' | '#'))
        {
            return Err(MqttConfigError::DeviceId(id.to_string()));
        }
        let topic = |which, given: Option<&str>, default: &str| {
            let topic = given.unwrap_or(default).replace("{deviceId}", id);
            check_topic(which, &topic)?;
            Ok::<_, MqttConfigError>(topic)
        };
        let request_topic = topic("request", a.request_topic, DEFAULT_REQUEST_TOPIC)?;
        let response_topic = topic("response", a.response_topic, DEFAULT_RESPONSE_TOPIC)?;
        let status_topic = topic("status", a.status_topic, DEFAULT_STATUS_TOPIC)?;
        if !url.tls && (a.ca.is_some() || a.cert.is_some() || a.key.is_some()) {
            return Err(MqttConfigError::TlsOptionsWithoutTls);
        }
        let tls = if url.tls {
            Some(Arc::new(tls_config(a.ca, a.cert, a.key)?))
        } else {
            None
        };
        Ok(MqttSettings {
            url,
            client_id: id.to_string(),
            request_topic,
            response_topic,
            status_topic,
            tls,
            connect_timeout: a.connect_timeout,
            puback_timeout: a.puback_timeout,
        })
    }

    pub(super) fn options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(self.client_id.clone(), self.url.host.clone(), self.url.port);
        o.set_keep_alive(KEEP_ALIVE)
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
            .set_request_channel_capacity(REQUEST_CHANNEL)
            .set_last_will(LastWill::new(
                self.status_topic.clone(),
                STATUS_OFFLINE,
                QoS::AtLeastOnce,
                true,
            ));
        if let Some(user) = &self.url.user {
            let password = self.url.password.as_ref().map(Secret::expose).unwrap_or("");
            o.set_credentials(user.expose(), password);
        }
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        o
    }
}

fn check_topic(which: &'static str, topic: &str) -> Result<(), MqttConfigError> {
    let why = if topic.is_empty() {
        "it is empty"
    } else if topic.contains(['+', '#']) {
        "wildcards (`+`, `#`) are not allowed"
    } else if topic.contains('\0') {
        "it contains NUL"
    } else if topic.len() > 65535 {
        "it is longer than 65535 bytes"
    } else {
        return Ok(());
    };
    Err(MqttConfigError::Topic {
        which,
        topic: topic.to_string(),
        why,
    })
}

/// The CA file's certificates as the only roots when given, else the web
/// PKI roots; a client certificate when both halves are given.
fn tls_config(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<rustls::ClientConfig, MqttConfigError> {
    let client = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(ClientCert { cert, key }),
        _ => return Err(MqttConfigError::HalfClientCert),
    };
    Ok(tls::client_config(ca, client)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s)
    }

    fn args(url: &Secret) -> MqttArgs<'_> {
        MqttArgs {
            url: Some(url),
            device_id: "gw-1",
            connect_timeout: Duration::from_secs(10),
            ..MqttArgs::default()
        }
    }

    #[test]
    fn urls_parse_and_never_show_credentials() {
        let u = BrokerUrl::parse("mqtt://al%40ice:s3cr%3At@broker.local:1884").unwrap();
        assert!(!u.tls);
        assert_eq!((u.host.as_str(), u.port), ("broker.local", 1884));
        assert_eq!(u.user.as_ref().unwrap().expose(), "al@ice");
        assert_eq!(u.password.as_ref().unwrap().expose(), "s3cr:t");
        for shown in [u.to_string(), format!("{u:?}")] {
            assert_eq!(shown, "mqtt://<redacted>@broker.local:1884");
        }
        let u = BrokerUrl::parse("mqtts://127.0.0.1").unwrap();
        assert_eq!((u.tls, u.port, u.user.is_none()), (true, 8883, true));
        assert_eq!(BrokerUrl::parse("mqtt://h").unwrap().port, 1883);
        assert_eq!(BrokerUrl::parse("mqtt://[::1]:1").unwrap().host, "[::1]");
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        for bad in [
            "http://u:hunter2@h:1",
            "mqtt://u:hunter2@h:1/path",
            "mqtt://u:hunter2@h:1?x=1",
            "mqtt://:hunter2@h:1",
            "mqtt://u:hunter2@:1",
            "mqtt://u:%ff%fehunter2@h:1",
            "hunter2",
        ] {
            let e = BrokerUrl::parse(bad).expect_err(bad);
            assert!(!e.to_string().contains("hunter2"), "{bad}: {e}");
        }
    }

    #[test]
    fn topics_default_from_the_device_id_and_take_placeholders() {
        let url = secret("mqtt://127.0.0.1:1883");
        let s = MqttSettings::new(args(&url)).unwrap();
        assert_eq!(s.client_id, "gw-1");
        assert_eq!(s.request_topic, "devices/gw-1/request");
        assert_eq!(s.response_topic, "devices/gw-1/response");
        assert_eq!(s.status_topic, "devices/gw-1/status");
        let s = MqttSettings::new(MqttArgs {
            request_topic: Some("fw/{deviceId}/in"),
            response_topic: Some("fw/out"),
            status_topic: Some("fw/{deviceId}"),
            ..args(&url)
        })
        .unwrap();
        assert_eq!(
            (
                s.request_topic.as_str(),
                s.response_topic.as_str(),
                s.status_topic.as_str()
            ),
            ("fw/gw-1/in", "fw/out", "fw/gw-1")
        );
        let options = s.options();
        assert!(!options.clean_session());
        assert!(options.manual_acks());
        assert_eq!(options.client_id(), "gw-1");
        let will = options.last_will().unwrap();
        assert_eq!(
            (will.topic.as_str(), &will.message[..], will.retain),
            ("fw/gw-1", &b"offline"[..], true)
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        let url = secret("mqtt://127.0.0.1:1883");
        assert!(matches!(
            MqttSettings::new(MqttArgs {
                request_topic: Some("a/+/b"),
                ..args(&url)
            }),
            Err(MqttConfigError::Topic {
                which: "request",
                ..
            })
        ));
        assert!(matches!(
            MqttSettings::new(MqttArgs {
                response_topic: Some(""),
                ..args(&url)
            }),
            Err(MqttConfigError::Topic {
                which: "response",
                ..
            })
        ));
        assert!(matches!(
            MqttSettings::new(MqttArgs {
                device_id: "a/b",
                ..args(&url)
            }),
            Err(MqttConfigError::DeviceId(_))
        ));
        assert!(matches!(
            MqttSettings::new(MqttArgs {
                ca: Some(Path::new("/nonexistent")),
                ..args(&url)
            }),
            Err(MqttConfigError::TlsOptionsWithoutTls)
        ));
        assert!(matches!(
            MqttSettings::new(MqttArgs {
                url: None,
                ..args(&url)
            }),
            Err(MqttConfigError::MissingUrl)
        ));
        let tls = secret("mqtts://127.0.0.1:8883");
        assert!(matches!(
            MqttSettings::new(MqttArgs {
                ca: Some(Path::new("/nonexistent/ca.pem")),
                ..args(&tls)
            }),
            Err(MqttConfigError::Tls(TlsError::Pem {
                what: "CA file",
                ..
            }))
        ));
        assert!(matches!(
            MqttSettings::new(MqttArgs {
                cert: Some(Path::new("/nonexistent/c.pem")),
                ..args(&tls)
            }),
            Err(MqttConfigError::HalfClientCert)
        ));
        // Web PKI roots when no CA file is given.
        assert!(MqttSettings::new(args(&tls)).unwrap().tls.is_some());
    }

    #[test]
    fn a_credentials_url_leaves_no_trace_in_debug() {
        let url = secret("mqtt://user:hunter2@127.0.0.1:1883");
        let s = MqttSettings::new(args(&url)).unwrap();
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("user:"),
            "{shown}"
        );
    }
}
