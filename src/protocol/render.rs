//! What the agent says, on the wire and for people: [`render`] and
//! [`render_ack`] turn an outbox entry or an ack into one JSON line in the
//! field order of PROTOCOL.md (a report carries its own upgrade's `passPort`,
//! the one place it leaves the agent), [`ack_operator`] is the operator an
//! ack goes out with, and [`explain`] shows a parsed request with its
//! credentials and `passPort` redacted.

use super::REDACTED;
use fwagent_state::{
    Ack, OutboxEntry, Outcome, Outgoing, PhaseName, ReportSubject, Secret, UpgradeRequest,
    OP_PROGRESS, OP_RESULT, OP_UPGRADE,
};
use serde::Serialize;
use serde_json::{json, Value};

/// One outgoing message on the wire (field order as in PROTOCOL.md).
#[derive(Serialize)]
struct Wire<'a, I: Serialize> {
    operator: &'a str,
    #[serde(rename = "sessionId")]
    session_id: &'a str,
    #[serde(rename = "messageId")]
    message_id: &'a str,
    info: I,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Outcome>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReportInfo<'a> {
    request_message_id: &'a str,
    firmware_name: &'a str,
    md5sum: &'a str,
    phase: PhaseName,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_done: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    percent: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pass_port: Option<&'a str>,
}

impl<'a> ReportInfo<'a> {
    fn new(subject: &'a ReportSubject, phase: PhaseName) -> Self {
        ReportInfo {
            request_message_id: &subject.request_message_id,
            firmware_name: &subject.firmware_name,
            md5sum: &subject.md5,
            phase,
            bytes_done: None,
            total_bytes: None,
            percent: None,
            // The one place a passPort leaves the agent: back to the cloud.
            pass_port: subject.pass_port.as_ref().map(Secret::expose),
        }
    }
}

fn to_line(value: &impl Serialize) -> String {
    // Only strings, integers and enums of unit variants go in: cannot fail.
    serde_json::to_string(value).expect("serialising plain strings and integers cannot fail")
}

/// The operator an ack goes out with: the request's (or `unknown`), then
/// `-Ack`.
pub fn ack_operator(ack: &Ack) -> String {
    format!("{}-Ack", ack.operator)
}

/// An ack as one JSON line (no trailing newline).
pub fn render_ack(ack: &Ack) -> String {
    let operator = ack_operator(ack);
    to_line(&Wire {
        operator: &operator,
        session_id: &ack.session_id,
        message_id: &ack.message_id,
        info: "none",
        result: Some(&ack.result),
    })
}

/// An outbox entry as one JSON line (no trailing newline). An ack keeps the
/// request's messageId; a report's messageId is `entry.message_id`.
pub fn render(entry: &OutboxEntry) -> String {
    match &entry.message {
        Outgoing::Ack(ack) => render_ack(ack),
        Outgoing::Progress {
            subject,
            phase,
            bytes_done,
            total_bytes,
            percent,
        } => to_line(&Wire {
            operator: OP_PROGRESS,
            session_id: &subject.session_id,
            message_id: &entry.message_id,
            info: ReportInfo {
                bytes_done: Some(*bytes_done),
                total_bytes: Some(*total_bytes),
                percent: Some(*percent),
                ..ReportInfo::new(subject, *phase)
            },
            result: None,
        }),
        Outgoing::Result {
            subject,
            phase,
            result,
        } => to_line(&Wire {
            operator: OP_RESULT,
            session_id: &subject.session_id,
            message_id: &entry.message_id,
            info: ReportInfo::new(subject, *phase),
            result: Some(result),
        }),
    }
}

/// A parsed request for people: wire names, the URL it will fetch, and
/// `"<redacted>"` for every credential and the `passPort` (an empty
/// credential shows as `""`: there is none; an absent `passPort` as `null`).
pub fn explain(req: &UpgradeRequest) -> Value {
    let redact = |s: &Secret| if s.is_empty() { "" } else { REDACTED };
    json!({
        "operator": OP_UPGRADE,
        "sessionId": req.session_id,
        "messageId": req.message_id,
        "url": req.source.url,
        "serverConfig": {
            "protocol": req.source.protocol.as_str(),
            "host": req.source.host,
            "port": req.source.port,
            "path": req.source.path,
            "userName": redact(&req.source.user),
            "password": redact(&req.source.password),
        },
        "fileInfo": {
            "firmwareName": req.firmware.name,
            "md5sum": req.firmware.md5,
            "upgradeFileSize": req.firmware.size,
            "passPort": req.pass_port.as_ref().map(|_| REDACTED),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::fixtures::*;
    use crate::protocol::UNKNOWN_OPERATOR;
    use fwagent_state::Incoming;

    // --- rendering ------------------------------------------------------------------

    fn subject(pass_port: Option<&str>) -> ReportSubject {
        ReportSubject {
            session_id: "SID:1".into(),
            request_message_id: "MID:req".into(),
            firmware_name: "fw.bin".into(),
            md5: "434092e44c45b65ba66ea086f697fc02".into(),
            pass_port: pass_port.map(Secret::new),
        }
    }

    fn entry(message: Outgoing) -> OutboxEntry {
        OutboxEntry {
            seq: 7,
            message_id: "MID:gw-1-7".into(),
            job: Some(1),
            message,
        }
    }

    #[test]
    fn acks_render_in_the_wire_shape() {
        let ack = Ack {
            operator: OP_UPGRADE.into(),
            session_id: "SID:1".into(),
            message_id: "MID:1".into(),
            result: Outcome::ok(),
        };
        let want = r#"{"operator":"setCloudUpgradeConfig-Ack","sessionId":"SID:1","messageId":"MID:1","info":"none","result":{"errorNo":0,"description":"ok"}}"#;
        assert_eq!(render_ack(&ack), want);
        assert_eq!(render(&entry(Outgoing::Ack(ack))), want);
        let odd = Ack {
            operator: UNKNOWN_OPERATOR.into(),
            session_id: String::new(),
            message_id: String::new(),
            result: Outcome::new(1, "malformed request: \"quoted\"\n"),
        };
        let line = render_ack(&odd);
        assert!(!line.contains('\n'));
        let back: Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(back["operator"], "unknown-Ack");
        assert_eq!(
            back["result"]["description"],
            "malformed request: \"quoted\"\n"
        );
    }

    #[test]
    fn progress_reports_render_in_the_wire_shape() {
        let e = entry(Outgoing::Progress {
            subject: subject(None),
            phase: PhaseName::Downloading,
            bytes_done: 123,
            total_bytes: 456,
            percent: 26,
        });
        assert_eq!(
            render(&e),
            r#"{"operator":"reportCloudUpgradeProgress","sessionId":"SID:1","messageId":"MID:gw-1-7","info":{"requestMessageId":"MID:req","firmwareName":"fw.bin","md5sum":"434092e44c45b65ba66ea086f697fc02","phase":"downloading","bytesDone":123,"totalBytes":456,"percent":26}}"#
        );
    }

    #[test]
    fn result_reports_render_in_the_wire_shape() {
        let e = entry(Outgoing::Result {
            subject: subject(None),
            phase: PhaseName::RolledBack,
            result: Outcome::new(51, "rolled back"),
        });
        assert_eq!(
            render(&e),
            r#"{"operator":"reportCloudUpgradeResult","sessionId":"SID:1","messageId":"MID:gw-1-7","info":{"requestMessageId":"MID:req","firmwareName":"fw.bin","md5sum":"434092e44c45b65ba66ea086f697fc02","phase":"rolled_back"},"result":{"errorNo":51,"description":"rolled back"}}"#
        );
    }

    #[test]
    fn reports_carry_pass_port_only_when_the_upgrade_has_one() {
        for message in [
            Outgoing::Progress {
                subject: subject(Some("pp-9")),
                phase: PhaseName::Verifying,
                bytes_done: 1,
                total_bytes: 1,
                percent: 100,
            },
            Outgoing::Result {
                subject: subject(Some("pp-9")),
                phase: PhaseName::Completed,
                result: Outcome::ok(),
            },
        ] {
            let v: Value = serde_json::from_str(&render(&entry(message))).expect("JSON");
            assert_eq!(v["info"]["passPort"], "pp-9");
        }
        let v: Value = serde_json::from_str(&render(&entry(Outgoing::Result {
            subject: subject(None),
            phase: PhaseName::Completed,
            result: Outcome::ok(),
        })))
        .expect("JSON");
        assert!(v["info"].get("passPort").is_none());
    }

    // --- redaction ------------------------------------------------------------------

    fn with_secrets() -> UpgradeRequest {
        let v = set(seed1(), "/info/fileInfo/passPort", json!("pp-secret"));
        valid(parse(&v))
    }

    #[test]
    fn explain_redacts_credentials_and_pass_port() {
        let r = with_secrets();
        let v = explain(&r);
        let text = v.to_string();
        for secret in ["uftp", "echo123", "dWZ0cA", "ZWNobzEyMw", "pp-secret"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert_eq!(v["serverConfig"]["userName"], REDACTED);
        assert_eq!(v["serverConfig"]["password"], REDACTED);
        assert_eq!(v["fileInfo"]["passPort"], REDACTED);
        assert_eq!(
            v["fileInfo"]["firmwareName"],
            "DAP-2020SSA_V1.3.2_20200702.bin"
        );
        assert_eq!(v["fileInfo"]["upgradeFileSize"], 66143);
        assert_eq!(v["serverConfig"]["host"], "127.0.0.1");
        assert_eq!(v["serverConfig"]["port"], 21);
        assert_eq!(v["url"], r.source.url.as_str());
        assert_eq!(v["messageId"], r.message_id.as_str());

        let anonymous = set(seed1(), "/info/serverConfig/userName", json!(""));
        let anonymous = set(anonymous, "/info/serverConfig/password", json!(""));
        let v = explain(&valid(parse(&anonymous)));
        assert_eq!(v["serverConfig"]["userName"], "");
        assert_eq!(v["serverConfig"]["password"], "");
        assert_eq!(v["fileInfo"]["passPort"], Value::Null);
    }

    #[test]
    fn debug_redacts_credentials_and_pass_port() {
        let r = with_secrets();
        let text = format!("{r:?} {:?}", Incoming::Valid(Box::new(r.clone())));
        for secret in ["uftp", "echo123", "pp-secret"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert!(text.contains(REDACTED));
    }
}
