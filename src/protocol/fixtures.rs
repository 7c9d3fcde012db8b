//! Requests and helpers shared by the protocol's unit tests: the seed's two
//! examples, JSON-pointer edits, and the accept/reject assertions.

use super::{parse_request, ParseOptions};
use fwagent_state::{Ack, Incoming, UpgradeRequest};
use serde_json::{json, Value};

/// The seed's first example, host rewritten to 127.0.0.1.
pub(super) fn seed1() -> Value {
    json!({
        "operator": "setCloudUpgradeConfig",
        "sessionId": "SID:1234567890-000001",
        "messageId": "MID:localhost-122334455667-12232323232323-000001",
        "info": {
            "serverConfig": {
                "port": 21,
                "host": "127.0.0.1",
                "userName": "dWZ0cA==",
                "password": "ZWNobzEyMw==",
                "protocol": "ftp",
                "path": "/download/DAP-2020SSA_3200_6200/C007V001/"
            },
            "fileInfo": {
                "firmwareName": "DAP-2020SSA_V1.3.2_20200702.bin ",
                "md5sum": "434092e44c45b65ba66ea086f697fc02",
                "upgradeFileSize": 66143
            }
        }
    })
}

/// The seed's second example (enciphered credentials), host rewritten.
pub(super) fn seed2() -> Value {
    json!({
        "operator": "setCloudUpgradeConfig",
        "sessionId": "SID:1234567890-000001",
        "messageId": "MID:localhost-122334455667-12232323232323-000001",
        "info": {
            "serverConfig": {
                "port": 21,
                "host": "127.0.0.1",
                "userName": "jwNebvyvn4jIteczpAhJUyih75dyFe4l",
                "password": "AZI5Wg0mg13O4Wx82AB4Km8XMt9oWmB8",
                "protocol": "ftp",
                "path": "/download/IPG-5950PCS-AI_20F1_50FA/C00AV001/"
            },
            "fileInfo": {
                "firmwareName": "UPDATE_T5AI_IPG-5950PCS-AI_V1.4.0_20240129_MQTT.bin",
                "md5sum": "8b8eabc41188601bf6cc28e395197b46",
                "totalSize": 41522432
            }
        }
    })
}

pub(super) fn parse_with(v: &Value, opts: &ParseOptions) -> Incoming {
    parse_request(v.to_string().as_bytes(), opts)
}

pub(super) fn parse(v: &Value) -> Incoming {
    parse_with(v, &ParseOptions::default())
}

#[track_caller]
pub(super) fn valid(incoming: Incoming) -> UpgradeRequest {
    match incoming {
        Incoming::Valid(r) => *r,
        Incoming::Invalid(ack) => panic!("expected a valid request, got {ack:?}"),
    }
}

#[track_caller]
pub(super) fn rejected(incoming: Incoming) -> Ack {
    match incoming {
        Incoming::Invalid(ack) => ack,
        Incoming::Valid(r) => panic!("expected a rejection, got {r:?}"),
    }
}

/// `v` with the JSON pointer `ptr` set to `new` (or removed when `None`).
pub(super) fn with(mut v: Value, ptr: &str, new: Option<Value>) -> Value {
    let (parent, key) = ptr.rsplit_once('/').expect("a pointer with a parent");
    let obj = v
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("the parent is an object");
    match new {
        Some(n) => {
            obj.insert(key.to_string(), n);
        }
        None => {
            obj.remove(key);
        }
    }
    v
}

pub(super) fn set(v: Value, ptr: &str, new: Value) -> Value {
    with(v, ptr, Some(new))
}

pub(super) fn remove(v: Value, ptr: &str) -> Value {
    with(v, ptr, None)
}

#[track_caller]
pub(super) fn assert_rejects(v: &Value, error_no: u32, needle: &str) -> Ack {
    let ack = rejected(parse(v));
    assert_eq!(ack.result.error_no, error_no, "{ack:?}");
    assert!(
        ack.result.description.contains(needle),
        "description {:?} should mention {needle:?}",
        ack.result.description
    );
    ack
}

pub(super) fn decoder(cmd: &str) -> ParseOptions {
    ParseOptions {
        credentials_decoder: Some(cmd.into()),
        ..ParseOptions::default()
    }
}
