//! Actor tests of the Upgrade actor: a real store in a temporary directory,
//! stand-in peers that record what they are sent, and a timeout on every
//! wait.

use super::*;
use crate::protocol::{parse_request, ParseOptions};
use crate::runtime::flash::staging::{EndJob, RemoveStale};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the peers were sent, in order; for a message to the cloud, whether
/// the store's outbox held it by then (committed before it was sent).
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    Listen,
    Outbound { operator: String, committed: bool },
    StartDownload { offset: u64 },
    Other(&'static str),
}

/// Every peer of the Upgrade actor in one stand-in.
struct Peers {
    sent: Arc<Mutex<Vec<Sent>>>,
    /// A second handle on the store (clones share one sled database).
    store: Store,
}

impl Peers {
    fn push(&self, sent: Sent) {
        self.sent.lock().expect("lock").push(sent);
    }
}

impl Actor for Peers {
    type Context = Context<Self>;
}

impl Handler<Outbound> for Peers {
    type Result = ();

    fn handle(&mut self, msg: Outbound, _ctx: &mut Context<Self>) {
        let committed = self
            .store
            .pending_outbox()
            .is_ok_and(|p| p.iter().any(|e| e.seq == msg.0.seq));
        let operator = match &msg.0.message {
            Outgoing::Ack(ack) => crate::protocol::ack_operator(ack),
            Outgoing::Progress { .. } => "progress".into(),
            Outgoing::Result { .. } => "result".into(),
        };
        self.push(Sent::Outbound {
            operator,
            committed,
        });
    }
}

impl Handler<Listen> for Peers {
    type Result = ();

    fn handle(&mut self, _msg: Listen, _ctx: &mut Context<Self>) {
        self.push(Sent::Listen);
    }
}

impl Handler<StartDownload> for Peers {
    type Result = ();

    fn handle(&mut self, msg: StartDownload, _ctx: &mut Context<Self>) {
        self.push(Sent::StartDownload { offset: msg.offset });
    }
}

/// The peers the test does not look into.
macro_rules! ignored {
    ($($msg:ty => $result:ty = $answer:expr),* $(,)?) => {$(
        impl Handler<$msg> for Peers {
            type Result = MessageResult<$msg>;

            fn handle(&mut self, _msg: $msg, _ctx: &mut Context<Self>) -> Self::Result {
                self.push(Sent::Other(stringify!($msg)));
                MessageResult($answer)
            }
        }
    )*};
}

ignored! {
    AbortDownload => () = (),
    Drain => () = (),
    VerifyMsg => () = (),
    FlashImage => () = (),
    RequestReboot => Rebooting = Rebooting::Asked,
    CheckBoot => Event = Event::RebootPending { detail: String::new() },
    EndJob => () = (),
    RemoveStale => () = (),
}

fn request(message_id: &str) -> Incoming {
    let json = serde_json::json!({
        "operator": "setCloudUpgradeConfig",
        "sessionId": "SID:1",
        "messageId": message_id,
        "info": {
            "serverConfig": {
                "port": 8080,
                "host": "127.0.0.1",
                "userName": "",
                "password": "",
                "protocol": "http",
                "path": "/fw/"
            },
            "fileInfo": {
                "firmwareName": "image.bin",
                "md5sum": "434092e44c45b65ba66ea086f697fc02",
                "upgradeFileSize": 4096
            }
        }
    });
    parse_request(json.to_string().as_bytes(), &ParseOptions::default())
}

/// Wait until `sent` holds `n` entries (at most 10 s).
async fn wait_for(sent: &Arc<Mutex<Vec<Sent>>>, n: usize) {
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while sent.lock().expect("lock").len() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    waited.await.expect("the peers were told in time");
}

#[actix::test]
async fn a_request_is_committed_before_its_ack_goes_out_and_its_download_starts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), "gw-1").expect("store");
    let sent = Arc::new(Mutex::new(Vec::new()));
    let peers = Peers {
        sent: sent.clone(),
        store: store.clone(),
    }
    .start();
    let protocols = [Protocol::Http].into_iter().collect();
    let upgrade = Upgrade::new(
        store.clone(),
        Policy::default(),
        Transfer::default(),
        protocols,
        Some("boot-1".into()),
    )
    .start();
    upgrade
        .send(Wire {
            messaging: peers.clone().recipient(),
            listen: peers.clone().recipient(),
            download: peers.clone().recipient(),
            abort: peers.clone().recipient(),
            drain: peers.clone().recipient(),
            verify: peers.clone().recipient(),
            flash: peers.clone().recipient(),
            reboot: peers.clone().recipient(),
            check_boot: peers.clone().recipient(),
            end: peers.clone().recipient(),
            remove_stale: peers.clone().recipient(),
        })
        .await
        .expect("wired");
    let (reply, acked) = tokio::sync::oneshot::channel();
    let incoming = request("MID:1");
    upgrade
        .send(Request {
            incoming: incoming.clone(),
            free_bytes: None,
            reply: Some(reply),
        })
        .await
        .expect("decided");
    let ack = tokio::time::timeout(Duration::from_secs(10), acked);
    let ack = ack.await.expect("in time").expect("an ack");
    assert_eq!(ack.result.error_no, 0, "{ack:?}");
    wait_for(&sent, 5).await;
    {
        let sent = sent.lock().expect("lock");
        // Leftovers of ended upgrades are cleared before anything is taken.
        assert_eq!(sent[..2], [Sent::Other("RemoveStale"), Sent::Listen]);
        for outbound in ["setCloudUpgradeConfig-Ack", "progress"] {
            let sent_committed = Sent::Outbound {
                operator: outbound.into(),
                committed: true,
            };
            assert!(
                sent[2..5].contains(&sent_committed),
                "{outbound} goes out once it is in the store's outbox: {sent:?}"
            );
        }
        assert!(
            sent[2..5].contains(&Sent::StartDownload { offset: 0 }),
            "{sent:?}"
        );
    }

    // The same messageId again: the same ack, nothing new started.
    let (reply, acked) = tokio::sync::oneshot::channel();
    let again = Request {
        incoming,
        free_bytes: None,
        reply: Some(reply),
    };
    upgrade.send(again).await.expect("decided");
    let again = tokio::time::timeout(Duration::from_secs(10), acked);
    assert_eq!(again.await.expect("in time").expect("an ack"), ack);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let starts = sent
        .lock()
        .expect("lock")
        .iter()
        .filter(|s| matches!(s, Sent::StartDownload { .. }))
        .count();
    assert_eq!(starts, 1, "one download for one messageId");
    assert_eq!(store.history(None).expect("history").len(), 1);
}
