//! The MQTT transport against real Mosquitto brokers: request → ack →
//! reports → result over the broker; the broker killed and restarted in the
//! middle of an upgrade; the agent killed before committing a request (the
//! broker delivers it again); a request sent while the agent is down;
//! malformed payloads; a broker that floods the agent with requests (taken
//! with back-pressure); a broker that never sends a PUBACK (a fake one,
//! [`FakeBroker`]: the publish goes out again after the timeout); TLS with a
//! CA file, a client certificate and a password; and the request-to-ack
//! latency figures (printed, never asserted).
//!
//! Tests that kill or restart a broker, or need one configured otherwise, use
//! a private one ([`Mosquitto::start`]);
//! the others share the broker of `scripts/test-servers.sh`, each with a device
//! id (and so topics) of its own. The cloud side is a rumqttc client in the
//! test ([`Cloud`]) with a persistent session, listening throughout.

mod common;

use common::*;
use fwagent::runtime::messaging::REQUESTS_WAITING;
use rumqttc::{Client, Event, MqttOptions, NetworkOptions, Packet, QoS};
use serde_json::Value;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- the cloud side

/// One message the cloud got.
#[derive(Clone, Debug)]
struct Msg {
    topic: String,
    payload: Vec<u8>,
    at: Instant,
}

impl Msg {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or(Value::Null)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// The cloud: a persistent-session rumqttc client subscribed (QoS 1) to a
/// device's response and status topics, recording what arrives; it also
/// publishes the requests. Reconnects on its own when the broker goes away.
struct Cloud {
    client: Client,
    got: Arc<Mutex<Vec<Msg>>>,
    stop: Arc<AtomicBool>,
    device: String,
}

impl Cloud {
    fn start(port: u16, device: &str) -> Cloud {
        Cloud::with_options(
            MqttOptions::new(unique_name("cloud"), "127.0.0.1", port),
            device,
        )
    }

    /// With options of the test's own (credentials, say).
    fn with_options(mut o: MqttOptions, device: &str) -> Cloud {
        o.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(1))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = Client::new(o, 64);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        connection.eventloop.set_network_options(net);
        let topics = [
            format!("devices/{device}/response"),
            format!("devices/{device}/status"),
        ];
        for t in &topics {
            client
                .subscribe(t.clone(), QoS::AtLeastOnce)
                .expect("queue subscribe");
        }
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let subacks = Arc::new(AtomicUsize::new(0));
        {
            let (got, stop, subacks, client) =
                (got.clone(), stop.clone(), subacks.clone(), client.clone());
            thread::spawn(move || {
                let mut connected_once = false;
                for event in connection.iter() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match event {
                        Ok(Event::Incoming(Packet::Publish(p))) => got.lock().unwrap().push(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            at: Instant::now(),
                        }),
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subacks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            // A broker that lost our session lost the subscriptions too.
                            if connected_once && !ack.session_present {
                                for t in &topics {
                                    let _ = client.try_subscribe(t.clone(), QoS::AtLeastOnce);
                                }
                            }
                            connected_once = true;
                        }
                        Ok(_) => {}
                        Err(_) => thread::sleep(Duration::from_millis(100)),
                    }
                }
            });
        }
        // Built before the wait, so a timeout drops it and stops the thread.
        let cloud = Cloud {
            client,
            got,
            stop,
            device: device.to_string(),
        };
        wait_until(SHORT, "the cloud client to subscribe", || {
            subacks.load(Ordering::SeqCst) >= 2
        });
        cloud
    }

    fn request_topic(&self) -> String {
        format!("devices/{}/request", self.device)
    }

    /// Publishes `payload` (QoS 1) on the device's request topic; returns when it was handed over.
    fn send(&self, payload: impl Into<Vec<u8>>) -> Instant {
        let at = Instant::now();
        self.client
            .publish(self.request_topic(), QoS::AtLeastOnce, false, payload)
            .expect("queue publish");
        at
    }

    fn send_json(&self, v: &Value) -> Instant {
        self.send(v.to_string())
    }

    fn all(&self) -> Vec<Msg> {
        self.got.lock().unwrap().clone()
    }

    /// Everything on the response topic, as JSON.
    fn responses(&self) -> Vec<Value> {
        let topic = format!("devices/{}/response", self.device);
        self.all()
            .iter()
            .filter(|m| m.topic == topic)
            .map(Msg::json)
            .collect()
    }

    /// Waits until `f` finds what it looks for among the messages so far; panics with them
    /// (and the agent's log) after `timeout`.
    fn wait<T>(
        &self,
        timeout: Duration,
        what: &str,
        agent: Option<&Agent>,
        mut f: impl FnMut(&[Msg]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let msgs = self.all();
            if let Some(t) = f(&msgs) {
                return t;
            }
            if Instant::now() >= deadline {
                let dump: Vec<String> = msgs
                    .iter()
                    .map(|m| format!("{} {}", m.topic, m.text()))
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n--- the cloud got\n{}\n--- agent log\n{}",
                    dump.join("\n"),
                    agent.map(Agent::log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The first response for which `pred` holds, with its arrival time.
    fn wait_response(
        &self,
        timeout: Duration,
        what: &str,
        agent: &Agent,
        pred: impl Fn(&Value) -> bool,
    ) -> (Value, Instant) {
        let topic = format!("devices/{}/response", self.device);
        self.wait(timeout, what, Some(agent), |msgs| {
            msgs.iter()
                .filter(|m| m.topic == topic)
                .map(|m| (m.json(), m.at))
                .find(|(v, _)| pred(v))
        })
    }

    fn wait_status(&self, status: &str, agent: Option<&Agent>) {
        let topic = format!("devices/{}/status", self.device);
        self.wait(SHORT, &format!("status `{status}`"), agent, |msgs| {
            msgs.iter()
                .rev()
                .find(|m| m.topic == topic)
                .filter(|m| m.text() == status)
                .map(|_| ())
        });
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.try_disconnect();
    }
}

fn operator(v: &Value) -> &str {
    v["operator"].as_str().unwrap_or_default()
}

fn is_ack_of(v: &Value, mid: &str) -> bool {
    operator(v).ends_with("-Ack") && v["messageId"] == mid
}

fn is_result_of(v: &Value, mid: &str) -> bool {
    operator(v) == "reportCloudUpgradeResult" && v["info"]["requestMessageId"] == mid
}

fn is_progress_of(v: &Value, mid: &str) -> bool {
    operator(v) == "reportCloudUpgradeProgress" && v["info"]["requestMessageId"] == mid
}

fn mid_of(req: &Value) -> String {
    req["messageId"]
        .as_str()
        .expect("request has a messageId")
        .to_string()
}

/// The seq in a report's messageId `MID:<device>-<seq>`.
fn report_seq(v: &Value, device: &str) -> u64 {
    let mid = v["messageId"].as_str().unwrap_or_default();
    let n: u64 = mid
        .strip_prefix(&format!("MID:{device}-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("report messageId {mid:?} is not MID:{device}-<n>"));
    // n = the store's instance × 10⁹ + the outbox number (docs/PROTOCOL-NOTES.md).
    n % 1_000_000_000
}

// ---------------------------------------------------------------- the agent

/// `fwagent run --transport mqtt` in the background, its log in a file. Killed on drop.
struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

struct AgentSpec<'a> {
    url: String,
    device: &'a str,
    state: &'a Path,
    target: &'a Path,
    extra: Vec<String>,
    env: Vec<(&'a str, &'a str)>,
}

impl<'a> AgentSpec<'a> {
    fn new(url: String, device: &'a str, dir: &'a Path) -> AgentSpec<'a> {
        AgentSpec {
            url,
            device,
            state: dir,
            target: dir,
            extra: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl Agent {
    /// Starts the agent with state in `dir/state`, flashing to `dir/flash.bin`, logging to
    /// `dir/agent-N.log`.
    fn start(spec: &AgentSpec<'_>) -> Agent {
        let log = spec.state.join(format!("{}.log", unique_name("agent")));
        let mut cmd = fwagent(["run", "--transport", "mqtt", "--mqtt-url"]);
        cmd.arg(&spec.url)
            .arg("--device-id")
            .arg(spec.device)
            .arg("--state-dir")
            .arg(spec.state.join("state"))
            .arg("--flash")
            .arg(file_flash(&spec.target.join("flash.bin")))
            .args(&spec.extra)
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create the agent log"));
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        Agent {
            child: Some(cmd.spawn().expect("spawn fwagent")),
            log,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("agent running").id() as i32
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Waits for the agent to exit on its own (a crash point).
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("agent running");
        loop {
            if let Some(st) = child.try_wait().expect("wait fwagent") {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {timeout:?}\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits (SIGKILL and panic after 20 s).
    fn stop(&mut self) -> ExitStatus {
        let pid = self.child.as_ref().expect("agent running").id() as i32;
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(20))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The upgrades in a stopped agent's store.
fn history(state_dir: &Path, device: &str) -> Vec<fwagent_state::Job> {
    let store = fwagent_state::Store::open(state_dir, device).expect("open the agent's store");
    store.history(None).expect("read the history")
}

/// Nothing is stuck in a stopped agent's outbox: an entry still marked pending was received
/// by the cloud all the same (its PUBACK came after the stop began, or its delivery mark was
/// not yet durable; it goes out again after a restart with the same messageId).
fn assert_outbox_reached(cloud: &Cloud, state_dir: &Path, device: &str) {
    let store = fwagent_state::Store::open(state_dir, device).expect("open the agent's store");
    let pending = store.pending_outbox().expect("read the outbox");
    let got: Vec<Value> = cloud.responses();
    for entry in pending {
        assert!(
            got.iter()
                .any(|v| v["messageId"] == entry.message_id.as_str()),
            "outbox entry {} ({}) never reached the cloud: {got:#?}",
            entry.seq,
            entry.message_id
        );
    }
}

/// A request for `fw` behind nginx's `location` (e.g. `/slow/`).
fn request_at(servers: &Servers, location: &str, fw: &Firmware) -> Value {
    upgrade_request("http", servers.nginx_port, location, fw, "", "")
}

fn shared_url(servers: &Servers) -> String {
    servers.mqtt_url()
}

// ---------------------------------------------------------------- tests

#[test]
fn request_gets_ack_then_reports_then_result() {
    let servers = Servers::from_env();
    let device = unique_name("gw");
    let dir = temp_dir();
    let cloud = Cloud::start(servers.mqtt_port, &device);
    let agent = Agent::start(&AgentSpec::new(shared_url(&servers), &device, dir.path()));
    cloud.wait_status("online", Some(&agent));

    let fw = servers.put_http("mqtt-basic", 300_000);
    let req = servers.http_request(&fw);
    let mid = mid_of(&req);
    cloud.send_json(&req);
    cloud.wait_response(LONG, "the result", &agent, |v| is_result_of(v, &mid));

    let responses = cloud.responses();
    let kinds: Vec<&str> = responses.iter().map(operator).collect();
    assert_eq!(
        kinds.first(),
        Some(&"setCloudUpgradeConfig-Ack"),
        "{responses:#?}"
    );
    assert_eq!(
        kinds.last(),
        Some(&"reportCloudUpgradeResult"),
        "{responses:#?}"
    );
    assert!(
        kinds[1..kinds.len() - 1]
            .iter()
            .all(|k| *k == "reportCloudUpgradeProgress"),
        "{responses:#?}"
    );
    assert!(
        kinds.len() >= 3,
        "at least one progress report: {responses:#?}"
    );
    let ack = &responses[0];
    assert_eq!(ack["messageId"], mid);
    assert_eq!(ack["sessionId"], req["sessionId"]);
    assert_eq!(ack["result"]["errorNo"], 0, "{ack}");
    let result = responses.last().unwrap();
    assert_eq!(result["result"]["errorNo"], 0, "{result}");
    assert_eq!(result["info"]["phase"], "completed");
    assert_eq!(md5_file(&dir.path().join("flash.bin")), fw.md5);
}

#[test]
fn malformed_payloads_get_their_acks_and_never_stop_the_agent() {
    let servers = Servers::from_env();
    let device = unique_name("gw");
    let dir = temp_dir();
    let cloud = Cloud::start(servers.mqtt_port, &device);
    let mut agent = Agent::start(&AgentSpec::new(shared_url(&servers), &device, dir.path()));
    cloud.wait_status("online", Some(&agent));

    let mut too_large = br#"{"operator":"setCloudUpgradeConfig","pad":""#.to_vec();
    too_large.resize(100_000, b'x');
    too_large.extend_from_slice(br#""}"#);
    let cases: Vec<(Vec<u8>, u64)> = vec![
        (b"not json".to_vec(), 1),
        (vec![0xff, 0xfe, 0x00, 0x7b], 1),
        (b"[1,2,3]".to_vec(), 1),
        (b"{\"operator\":".to_vec(), 1),
        (too_large, 1),
        (br#"{"operator":"reboot","sessionId":"SID:1","messageId":"MID:x-1","info":{}}"#.to_vec(), 2),
        (br#"{"operator":"setCloudUpgradeConfig","sessionId":"SID:1","messageId":"MID:x-2","info":{}}"#.to_vec(), 3),
    ];
    for (payload, _) in &cases {
        cloud.send(payload.clone());
    }
    // Blank payloads (an empty one clears a retained message) are ignored, like blank lines on stdin.
    cloud.send(Vec::new());
    cloud.send(b"  \n".to_vec());
    let fw = servers.put_http("mqtt-after-garbage", 10_000);
    let req = servers.http_request(&fw);
    let mid = mid_of(&req);
    cloud.send_json(&req);
    cloud.wait_response(LONG, "the valid request's result", &agent, |v| {
        is_result_of(v, &mid)
    });

    let responses = cloud.responses();
    let acks: Vec<&Value> = responses
        .iter()
        .filter(|v| operator(v).ends_with("-Ack"))
        .collect();
    assert_eq!(
        acks.len(),
        cases.len() + 1,
        "one ack per non-blank payload, in order: {acks:#?}"
    );
    for ((_, error_no), ack) in cases.iter().zip(&acks) {
        assert_eq!(ack["result"]["errorNo"], *error_no, "{ack}");
    }
    assert_eq!(operator(acks[0]), "unknown-Ack");
    assert_eq!(operator(acks[5]), "reboot-Ack");
    assert_eq!(acks[5]["messageId"], "MID:x-1");
    assert_eq!(acks[6]["result"]["errorNo"], 3);
    assert!(
        is_ack_of(acks[7], &mid) && acks[7]["result"]["errorNo"] == 0,
        "{}",
        acks[7]
    );
    assert!(agent.running(), "the agent stopped:\n{}", agent.log());
}

/// Kill -9 the broker while the image downloads: the upgrade goes on, the replies wait in
/// the outbox, and after the restart every ack and report reaches the cloud, in order, with
/// the same messageIds.
#[test]
fn broker_killed_and_restarted_mid_upgrade_loses_nothing() {
    let servers = Servers::from_env();
    let mut broker = Mosquitto::start();
    let device = unique_name("gw");
    let dir = temp_dir();
    let cloud = Cloud::start(broker.port, &device);
    let agent = Agent::start(&AgentSpec::new(broker.url(), &device, dir.path()));
    cloud.wait_status("online", Some(&agent));

    // 1 MB/s: about 8 s of download, a progress report every 2 s or so.
    let fw = servers.put_http("mqtt-broker-kill", 8 << 20);
    let req = request_at(&servers, "/slow/", &fw);
    let mid = mid_of(&req);
    cloud.send_json(&req);
    let (report, _) = cloud.wait_response(LONG, "a progress report with bytes done", &agent, |v| {
        is_progress_of(v, &mid) && v["info"]["bytesDone"].as_u64().unwrap_or(0) > 0
    });
    // Right after a report arrived, and long before the next one is due.
    broker.kill();
    let killed_at_report = report_seq(&report, &device);
    thread::sleep(Duration::from_millis(2500));
    broker.restart();

    let (result, _) = cloud.wait_response(LONG, "the result after the restart", &agent, |v| {
        is_result_of(v, &mid)
    });
    assert_eq!(result["result"]["errorNo"], 0, "{result}");
    assert_eq!(md5_file(&dir.path().join("flash.bin")), fw.md5);
    assert!(
        agent.log().contains("lost the MQTT connection"),
        "{}",
        agent.log()
    );

    // Every outbox entry arrived: the ack (seq 1) and the reports, seq 2..=result's, no gaps;
    // first arrivals in seq order. Duplicates are allowed (same messageId).
    let responses = cloud.responses();
    let acks: Vec<&Value> = responses.iter().filter(|v| is_ack_of(v, &mid)).collect();
    assert!(
        !acks.is_empty() && acks.iter().all(|a| a["result"]["errorNo"] == 0),
        "{responses:#?}"
    );
    let mut first_seen = Vec::new();
    for v in responses
        .iter()
        .filter(|v| is_progress_of(v, &mid) || is_result_of(v, &mid))
    {
        let seq = report_seq(v, &device);
        if !first_seen.contains(&seq) {
            first_seen.push(seq);
        }
    }
    let last = report_seq(&result, &device);
    assert_eq!(
        first_seen,
        (2..=last).collect::<Vec<_>>(),
        "reports lost or out of order: {responses:#?}"
    );
    assert!(
        last > killed_at_report + 1,
        "some reports were made while the broker was down: {responses:#?}"
    );
    let mut agent = agent;
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.log());
    assert_outbox_reached(&cloud, &dir.path().join("state"), &device);
}

/// The broker comes back without its store (the agent's session, subscription and queued
/// messages gone): the agent subscribes again, says it is online, publishes what it had in
/// flight again, and takes new requests.
#[test]
fn broker_restarted_without_its_store_is_subscribed_again() {
    let servers = Servers::from_env();
    let mut broker = Mosquitto::start();
    let device = unique_name("gw");
    let dir = temp_dir();
    let cloud = Cloud::start(broker.port, &device);
    let mut agent = Agent::start(&AgentSpec::new(broker.url(), &device, dir.path()));
    cloud.wait_status("online", Some(&agent));

    let fw = servers.put_http("mqtt-store-lost", 4 << 20);
    let req = request_at(&servers, "/slow/", &fw);
    let mid = mid_of(&req);
    cloud.send_json(&req);
    cloud.wait_response(LONG, "the first progress report", &agent, |v| {
        is_progress_of(v, &mid)
    });
    broker.kill();
    for entry in fs::read_dir(broker.dir.path())
        .expect("read the broker's dir")
        .flatten()
    {
        if entry.file_name().to_string_lossy().ends_with(".db") {
            fs::remove_file(entry.path()).expect("remove the broker's store");
        }
    }
    broker.restart();
    wait_until(SHORT, "the agent to reconnect without a session", || {
        agent.log().matches("session_present=false").count() >= 2
    });
    let (result, _) = cloud.wait_response(LONG, "the result", &agent, |v| is_result_of(v, &mid));
    assert_eq!(result["result"]["errorNo"], 0, "{result}");

    let fw2 = servers.put_http("mqtt-store-lost-2", 10_000);
    let req2 = servers.http_request(&fw2);
    let mid2 = mid_of(&req2);
    cloud.send_json(&req2);
    cloud.wait_response(LONG, "the second result", &agent, |v| {
        is_result_of(v, &mid2)
    });
    assert_eq!(md5_file(&dir.path().join("flash.bin")), fw2.md5);
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.log());
    assert_outbox_reached(&cloud, &dir.path().join("state"), &device);
}

/// The agent dies (SIGKILL) after receiving a request and before committing it: it never
/// acknowledged the PUBLISH, so the broker delivers it again to the restarted agent, which
/// runs exactly one upgrade and sends exactly one ack.
#[test]
fn agent_killed_before_commit_gets_the_request_again() {
    let servers = Servers::from_env();
    let broker = Mosquitto::start();
    let device = unique_name("gw");
    let dir = temp_dir();
    let cloud = Cloud::start(broker.port, &device);
    let mut spec = AgentSpec::new(broker.url(), &device, dir.path());
    spec.env = vec![("FWAGENT_CRASH_AT", "before-request-commit")];
    let mut agent = Agent::start(&spec);
    cloud.wait_status("online", Some(&agent));

    let fw = servers.put_http("mqtt-crash", 50_000);
    let req = servers.http_request(&fw);
    let mid = mid_of(&req);
    cloud.send_json(&req);
    let status = agent.wait_exit(SHORT);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "{}",
        agent.log()
    );
    cloud.wait_status("offline", None); // the last will
    assert!(
        cloud.responses().is_empty(),
        "nothing was committed, so nothing was said"
    );

    spec.env.clear();
    let mut agent = Agent::start(&spec);
    let (result, _) = cloud.wait_response(LONG, "the result", &agent, |v| is_result_of(v, &mid));
    assert_eq!(result["result"]["errorNo"], 0, "{result}");
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.log());

    let responses = cloud.responses();
    let acks: Vec<&Value> = responses.iter().filter(|v| is_ack_of(v, &mid)).collect();
    assert_eq!(acks.len(), 1, "exactly one ack: {responses:#?}");
    assert_eq!(acks[0]["result"]["errorNo"], 0);
    assert_eq!(
        responses.iter().filter(|v| is_result_of(v, &mid)).count(),
        1,
        "{responses:#?}"
    );
    let jobs = history(&dir.path().join("state"), &device);
    assert_eq!(jobs.len(), 1, "exactly one upgrade: {jobs:#?}");
    assert_eq!(md5_file(&dir.path().join("flash.bin")), fw.md5);
}

/// The broker keeps a request for the agent's persistent session while the agent is
/// stopped; the agent handles it when it comes back.
#[test]
fn request_sent_while_the_agent_is_down_is_handled_when_it_returns() {
    let servers = Servers::from_env();
    let broker = Mosquitto::start();
    let device = unique_name("gw");
    let dir = temp_dir();
    let cloud = Cloud::start(broker.port, &device);
    let spec = AgentSpec::new(broker.url(), &device, dir.path());
    let mut agent = Agent::start(&spec);
    cloud.wait_status("online", Some(&agent));
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.log());
    cloud.wait_status("offline", None);

    let fw = servers.put_http("mqtt-offline", 20_000);
    let req = servers.http_request(&fw);
    let mid = mid_of(&req);
    cloud.send_json(&req);
    thread::sleep(Duration::from_millis(300));
    assert!(cloud.responses().is_empty());

    let agent = Agent::start(&spec);
    let (ack, _) = cloud.wait_response(LONG, "the ack", &agent, |v| is_ack_of(v, &mid));
    assert_eq!(ack["result"]["errorNo"], 0, "{ack}");
    let (result, _) = cloud.wait_response(LONG, "the result", &agent, |v| is_result_of(v, &mid));
    assert_eq!(result["result"]["errorNo"], 0, "{result}");
    assert_eq!(md5_file(&dir.path().join("flash.bin")), fw.md5);
}

/// A kibibyte figure of `/proc/PID/status` (`VmRSS`, `VmHWM`).
fn vm_kib(pid: i32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The most requests the agent ever held at once, by its log: received from the broker
/// (`request received`, debug) and not yet decided (`request answered`, `request accepted`).
fn most_requests_held(log: &str) -> usize {
    let (mut held, mut most) = (0usize, 0usize);
    for line in log.lines() {
        if line.contains("request received") {
            held += 1;
            most = most.max(held);
        } else if line.contains("request answered") || line.contains("request accepted") {
            held = held.saturating_sub(1);
        }
    }
    most
}

/// A broker that floods the agent: Mosquitto with no inflight window hands the agent every
/// request queued for its session at once when it connects, here 500 of 400 KiB each, while
/// an upgrade is under way. The agent takes requests only as fast as it decides them: it never
/// holds more than a few (the bounded request channels), its memory stays flat, the rest wait
/// in the broker unacknowledged, and every request gets its ack exactly once.
#[test]
fn a_flood_of_requests_is_taken_with_back_pressure() {
    const FLOOD: usize = 500;
    const PAD: usize = 400 << 10;
    let servers = Servers::from_env();
    let broker = Mosquitto::start_with(
        "max_inflight_messages 0\nmax_queued_messages 0\nset_tcp_nodelay true\npersistence false\n",
    );
    let device = unique_name("gw");
    let dir = temp_dir();
    let cloud = Cloud::start(broker.port, &device);
    let mut spec = AgentSpec::new(broker.url(), &device, dir.path());
    spec.env = vec![("RUST_LOG", "info,fwagent=debug")];
    spec.extra = vec!["--max-request-bytes".into(), (512 << 10).to_string()];
    let mut agent = Agent::start(&spec);
    cloud.wait_status("online", Some(&agent));

    // Busy: an upgrade at 256 KiB/s for half a minute, resumed by the next start.
    let fw = servers.put_http("mqtt-flood", 8 << 20);
    let busy = request_at(&servers, "/slow256k/", &fw);
    let busy_mid = mid_of(&busy);
    cloud.send_json(&busy);
    let (ack, _) = cloud.wait_response(LONG, "the first ack", &agent, |v| is_ack_of(v, &busy_mid));
    assert_eq!(ack["result"]["errorNo"], 0, "{ack}");
    let rss_idle = vm_kib(agent.pid(), "VmRSS");
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.log());
    cloud.wait_status("offline", None);

    // About 200 MiB of requests for the agent's session: each asks for another image (busy:
    // errorNo 6), padded. The broker has them all before the agent is back.
    let pad = "x".repeat(PAD);
    let mut mids = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let mut req = request_at(&servers, "/slow256k/", &fw);
        req["info"]["fileInfo"]["firmwareName"] = format!("other-{i}.bin").into();
        req["info"]["fileInfo"]["md5sum"] = format!("{i:032x}").into();
        req["info"]["pad"] = pad.clone().into();
        mids.push(mid_of(&req));
        cloud.send_json(&req);
    }
    thread::sleep(Duration::from_secs(3));

    let agent = Agent::start(&spec);
    let started = Instant::now();
    cloud.wait(
        Duration::from_secs(240),
        "an ack for every request of the flood",
        Some(&agent),
        |msgs| {
            let acked: std::collections::HashSet<String> = msgs
                .iter()
                .map(Msg::json)
                .filter(|v| operator(v).ends_with("-Ack"))
                .filter_map(|v| v["messageId"].as_str().map(str::to_string))
                .collect();
            mids.iter().all(|m| acked.contains(m)).then_some(())
        },
    );
    let took = started.elapsed();
    let hwm = vm_kib(agent.pid(), "VmHWM");
    let log = agent.log();
    let held = most_requests_held(&log);
    eprintln!(
        "flood of {FLOOD} requests of {PAD} bytes: answered in {took:?}; the agent held at most \
         {held} at once; VmRSS idle {rss_idle} KiB, VmHWM under the flood {hwm} KiB"
    );

    let responses = cloud.responses();
    for mid in mids.iter().chain([&busy_mid]) {
        let acks: Vec<&Value> = responses.iter().filter(|v| is_ack_of(v, mid)).collect();
        assert_eq!(acks.len(), 1, "one ack for {mid}: {acks:#?}");
        if *mid != busy_mid {
            assert_eq!(acks[0]["result"]["errorNo"], 6, "{}", acks[0]);
        }
    }
    assert!(
        !log.contains("lost the MQTT connection"),
        "the connection held throughout\n{log}"
    );
    // Undecided requests sit in the channel to the PUBACKs (REQUESTS_WAITING), one with the
    // task awaiting its decision, and one with the connection task waiting for room.
    assert!(
        held <= REQUESTS_WAITING + 2,
        "the agent held {held} requests at once (bounded by the request channels)"
    );
    assert!(
        hwm.saturating_sub(rss_idle) < 64 << 10,
        "the agent grew from {rss_idle} KiB to {hwm} KiB under a flood of {} MiB",
        (FLOOD * PAD) >> 20
    );
}

/// A broker that never acknowledges a publish (its PUBACK lost on a link that otherwise
/// works): after `--mqtt-puback-timeout` the agent drops the connection and publishes the
/// message again, with the same messageId, on the next one; it leaves the outbox only when a
/// PUBACK comes.
#[test]
fn a_publish_whose_puback_never_comes_is_published_again_after_the_timeout() {
    let device = unique_name("gw");
    let dir = temp_dir();
    let request_topic = format!("devices/{device}/request");
    let response_topic = format!("devices/{device}/response");
    let request =
        br#"{"operator":"reboot","sessionId":"SID:puback","messageId":"MID:puback-1","info":{}}"#;
    let broker = FakeBroker::start(&request_topic, request, &response_topic);
    let mut spec = AgentSpec::new(broker.url(), &device, dir.path());
    spec.extra = vec!["--mqtt-puback-timeout".into(), "2".into()];
    let mut agent = Agent::start(&spec);

    let ack_of =
        |p: &Published| -> Value { serde_json::from_slice(&p.payload).unwrap_or(Value::Null) };
    wait_until(SHORT, "the ack to be published", || {
        !broker.published(&response_topic).is_empty()
    });
    let first = broker.published(&response_topic)[0].clone();
    assert!(!first.acked, "the fake broker swallows the first PUBACK");
    assert_eq!(ack_of(&first)["messageId"], "MID:puback-1");
    assert_eq!(ack_of(&first)["result"]["errorNo"], 2);
    assert_eq!(
        broker.request_acks(),
        [(1, 1)],
        "the request was acknowledged once decided"
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.published(&response_topic).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the ack was not published again within 20 s of a lost PUBACK \
             (connections: {})\n--- agent log\n{}",
            broker.connections(),
            agent.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let again = broker.published(&response_topic);
    assert_eq!(again.len(), 2, "published again once: {again:#?}");
    let second = &again[1];
    assert_eq!(
        ack_of(second),
        ack_of(&first),
        "the same ack, the same messageId"
    );
    assert!(second.acked);
    let waited = second.at - first.at;
    assert!(
        waited >= Duration::from_millis(1900),
        "published again after {waited:?}, before the timeout"
    );
    assert!(
        agent.log().contains("no PUBACK"),
        "the log says why\n{}",
        agent.log()
    );
    // Delivered now: the outbox is empty after a clean stop.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.log());
    let store =
        fwagent_state::Store::open(&dir.path().join("state"), &device).expect("open the store");
    let pending = store.pending_outbox().expect("read the outbox");
    assert!(pending.is_empty(), "still in the outbox: {pending:#?}");
}

/// mqtts:// to the shared broker's TLS listener, trusting the test CA.
#[test]
fn mqtts_with_a_ca_file() {
    let servers = Servers::from_env();
    let device = unique_name("gw");
    let dir = temp_dir();
    let cloud = Cloud::start(servers.mqtt_port, &device);
    let mut spec = AgentSpec::new(
        format!("mqtts://localhost:{}", servers.mqtts_port),
        &device,
        dir.path(),
    );
    spec.extra = vec!["--mqtt-ca".into(), servers.tls_ca.display().to_string()];
    let agent = Agent::start(&spec);
    cloud.wait_status("online", Some(&agent));
    let fw = servers.put_http("mqtt-tls", 10_000);
    let req = servers.http_request(&fw);
    let mid = mid_of(&req);
    cloud.send_json(&req);
    let (result, _) = cloud.wait_response(LONG, "the result", &agent, |v| is_result_of(v, &mid));
    assert_eq!(result["result"]["errorNo"], 0, "{result}");
}

/// A broker of our own that wants a password on one listener and a client certificate on
/// the other. The password never shows in the agent's log, even when the broker refuses it.
#[test]
fn password_and_client_certificate() {
    let servers = Servers::from_env();
    let dir = temp_dir();
    let d = dir.path();
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A client certificate signed by the test CA.
    let ca_key = servers.tls_ca.with_file_name("ca.key");
    let (key, csr, cert, ext) = (
        d.join("client.key"),
        d.join("client.csr"),
        d.join("client.pem"),
        d.join("ext.cnf"),
    );
    fs::write(&ext, "extendedKeyUsage=clientAuth\n").unwrap();
    run(Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(&key));
    run(Command::new("openssl")
        .args(["req", "-new", "-subj", "/CN=fwagent-test"])
        .arg("-key")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-set_serial", "0x2a"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(&servers.tls_ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert));
    let passwords = d.join("passwords");
    run(Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwords)
        .args(["fwagent", "pa55-w0rd"]));
    let (plain, tls) = (free_port(), free_port());
    let tls_dir = servers.tls_ca.parent().unwrap();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let conf = d.join("mosquitto.conf");
    fs::write(
        &conf,
        format!(
            "{user}per_listener_settings true\npersistence false\nlog_dest file {d}/mosquitto.log\n\
             listener {plain} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\n\
             listener {tls} 127.0.0.1\nallow_anonymous false\nuse_identity_as_username true\nrequire_certificate true\n\
             cafile {ca}\ncertfile {t}/server.pem\nkeyfile {t}/server.key\n",
            user = if root { "user root\n" } else { "" },
            d = d.display(),
            pw = passwords.display(),
            ca = servers.tls_ca.display(),
            t = tls_dir.display(),
        ),
    )
    .unwrap();
    let _broker = spawn_broker(&conf, plain);
    wait_port(tls, SHORT);

    // The cloud logs in with the password on the plain listener.
    let device_pw = unique_name("gw");
    let cloud = {
        let mut o = MqttOptions::new(unique_name("cloud"), "127.0.0.1", plain);
        o.set_credentials("fwagent", "pa55-w0rd");
        Cloud::with_options(o, &device_pw)
    };
    let state = d.join("pw");
    fs::create_dir_all(&state).unwrap();
    let agent = Agent::start(&AgentSpec::new(
        format!("mqtt://fwagent:pa55-w0rd@127.0.0.1:{plain}"),
        &device_pw,
        &state,
    ));
    cloud.wait_status("online", Some(&agent));
    let fw = servers.put_http("mqtt-auth", 10_000);
    let req = servers.http_request(&fw);
    let mid = mid_of(&req);
    cloud.send_json(&req);
    cloud.wait_response(LONG, "the ack over a password login", &agent, |v| {
        is_ack_of(v, &mid) && v["result"]["errorNo"] == 0
    });

    // The password kept off the command line: from a file, and from the
    // environment; the process list shows neither.
    let pw_file = d.join("mqtt-password");
    fs::write(&pw_file, "pa55-w0rd\n").unwrap();
    for from_file in [true, false] {
        let device = unique_name("gw");
        let cloud = {
            let mut o = MqttOptions::new(unique_name("cloud"), "127.0.0.1", plain);
            o.set_credentials("fwagent", "pa55-w0rd");
            Cloud::with_options(o, &device)
        };
        let state = d.join(format!("pw-off-argv-{from_file}"));
        fs::create_dir_all(&state).unwrap();
        let mut spec = AgentSpec::new(format!("mqtt://fwagent@127.0.0.1:{plain}"), &device, &state);
        let file_arg = pw_file.display().to_string();
        if from_file {
            spec.extra = vec!["--mqtt-password-file".into(), file_arg];
        } else {
            spec.env = vec![("FWAGENT_MQTT_PASSWORD", "pa55-w0rd")];
        }
        let agent = Agent::start(&spec);
        let pid = agent.child.as_ref().expect("running").id();
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        assert!(
            !String::from_utf8_lossy(&cmdline).contains("pa55-w0rd"),
            "the password is not in the process list"
        );
        cloud.wait_status("online", Some(&agent));
        let req = servers.http_request(&fw);
        let mid = mid_of(&req);
        cloud.send_json(&req);
        cloud.wait_response(LONG, "the ack, the password off argv", &agent, |v| {
            is_ack_of(v, &mid) && v["result"]["errorNo"] == 0
        });
        assert!(!agent.log().contains("pa55-w0rd"), "{}", agent.log());
    }

    // The same broker over TLS with the client certificate; its cloud listens on the plain listener.
    let device_cert = unique_name("gw");
    let cloud_cert = {
        let mut o = MqttOptions::new(unique_name("cloud"), "127.0.0.1", plain);
        o.set_credentials("fwagent", "pa55-w0rd");
        Cloud::with_options(o, &device_cert)
    };
    let state = d.join("cert");
    fs::create_dir_all(&state).unwrap();
    let mut spec = AgentSpec::new(format!("mqtts://127.0.0.1:{tls}"), &device_cert, &state);
    spec.extra = [
        "--mqtt-ca",
        &servers.tls_ca.display().to_string(),
        "--mqtt-cert",
        &cert.display().to_string(),
        "--mqtt-key",
        &key.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let agent_cert = Agent::start(&spec);
    let req = servers.http_request(&fw);
    let mid = mid_of(&req);
    cloud_cert.wait_status("online", Some(&agent_cert));
    cloud_cert.send_json(&req);
    cloud_cert.wait_response(
        LONG,
        "the ack over a client certificate",
        &agent_cert,
        |v| is_ack_of(v, &mid),
    );

    // A wrong password: refused, retried, never shown.
    let state = d.join("wrong");
    fs::create_dir_all(&state).unwrap();
    let mut wrong = Agent::start(&AgentSpec::new(
        format!("mqtt://fwagent:Wr0ng-pa55@127.0.0.1:{plain}"),
        &unique_name("gw"),
        &state,
    ));
    wait_until(SHORT, "the refused login to be logged", || {
        wrong.log().contains("cannot connect to the MQTT broker")
    });
    assert!(wrong.running(), "{}", wrong.log());
    for (a, secret) in [(&agent, "pa55-w0rd"), (&wrong, "Wr0ng-pa55")] {
        let log = a.log();
        assert!(
            !log.contains(secret) && !log.contains("fwagent:"),
            "credentials in the log:\n{log}"
        );
        assert!(
            log.contains("<redacted>@127.0.0.1"),
            "the broker is named, redacted:\n{log}"
        );
    }
}

/// A mosquitto with a configuration of the test's own, killed on drop.
struct KillOnDrop(Child);

fn spawn_broker(conf: &Path, port: u16) -> KillOnDrop {
    let bin = std::env::var("FWAGENT_TEST_MOSQUITTO_BIN")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "/usr/sbin/mosquitto".into());
    let child = Command::new(bin)
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto");
    let broker = KillOnDrop(child);
    wait_port(port, SHORT);
    broker
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Usage errors come before any connection, and never echo the URL's credentials.
#[test]
fn bad_mqtt_settings_are_usage_errors() {
    let dir = temp_dir();
    let state = dir.path().join("state");
    let flash = format!("file:{}", dir.path().join("flash.bin").display());
    for (args, wanted) in [
        (vec!["--transport", "mqtt"], "--mqtt-url is required"),
        (
            vec![
                "--transport",
                "mqtt",
                "--mqtt-url",
                "http://u:hunter2@127.0.0.1:1",
            ],
            "scheme `http`",
        ),
        (
            vec![
                "--transport",
                "mqtt",
                "--mqtt-url",
                "mqtt://u:hunter2@127.0.0.1:1/x",
            ],
            "no path",
        ),
        (
            vec![
                "--transport",
                "mqtt",
                "--mqtt-url",
                "mqtt://u:hunter2@127.0.0.1:1",
                "--mqtt-ca",
                "/nonexistent",
            ],
            "need an mqtts:// URL",
        ),
        (
            vec![
                "--transport",
                "mqtt",
                "--mqtt-url",
                "mqtts://u:hunter2@127.0.0.1:1",
                "--mqtt-ca",
                "/nonexistent/ca.pem",
            ],
            "/nonexistent/ca.pem",
        ),
        (
            vec![
                "--transport",
                "mqtt",
                "--mqtt-url",
                "mqtt://127.0.0.1:1",
                "--request-topic",
                "a/#",
            ],
            "wildcards",
        ),
        (vec!["--transport", "carrier-pigeon"], "unknown transport"),
    ] {
        let mut cmd = fwagent([
            "run",
            "--device-id",
            "gw-1",
            "--flash",
            &flash,
            "--state-dir",
        ]);
        cmd.arg(&state).args(&args);
        let run = run_with_timeout(cmd, b"", SHORT);
        assert_eq!(run.code(), Some(2), "{args:?}\n{run}");
        assert!(
            run.stderr.contains(wanted),
            "{args:?}: wanted {wanted:?}\n{run}"
        );
        assert!(!run.stderr.contains("hunter2"), "{args:?}\n{run}");
    }
}

/// The figure for the notes: request-to-ack latency over Mosquitto on loopback, as the
/// cloud sees it (publish handed over → ack received; the decision is committed and
/// flushed to the store before the ack leaves). Printed, never asserted: run with
/// `cargo test --test mqtt latency -- --nocapture`.
///
/// Two brokers: Mosquitto as [`Mosquitto::start`] sets it up (persistent, saving after
/// every change, Nagle's algorithm on, as Mosquitto's default), and a tuned one
/// (`set_tcp_nodelay true`, no persistence) that shows the agent's own share.
#[test]
fn latency_request_to_ack() {
    let servers = Servers::from_env();
    let fw = servers.put_http("mqtt-latency", 4096);
    let default_broker = Mosquitto::start();
    let dir = temp_dir();
    let port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    fs::write(
        &conf,
        format!(
            "{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n",
            user = if root { "user root\n" } else { "" },
        ),
    )
    .unwrap();
    let _tuned = spawn_broker(&conf, port);
    for (broker, port) in [
        ("mosquitto defaults, persistent", default_broker.port),
        ("set_tcp_nodelay, no persistence", port),
    ] {
        let device = unique_name("gw");
        let dir = temp_dir();
        let cloud = Cloud::start(port, &device);
        let agent = Agent::start(&AgentSpec::new(
            format!("mqtt://127.0.0.1:{port}"),
            &device,
            dir.path(),
        ));
        cloud.wait_status("online", Some(&agent));
        // Accepted requests, one upgrade after another (the ack, then wait for the result).
        let mut accepted = Vec::new();
        for _ in 0..20 {
            let req = servers.http_request(&fw);
            let mid = mid_of(&req);
            let sent = cloud.send_json(&req);
            let (ack, at) = cloud.wait_response(LONG, "the ack", &agent, |v| is_ack_of(v, &mid));
            assert_eq!(ack["result"]["errorNo"], 0, "{ack}");
            accepted.push(at - sent);
            let (result, _) =
                cloud.wait_response(LONG, "the result", &agent, |v| is_result_of(v, &mid));
            assert_eq!(result["result"]["errorNo"], 0, "{result}");
        }
        // Refused requests (unsupported protocol: the refusal is recorded, then acked).
        let mut refused = Vec::new();
        for _ in 0..100 {
            let mut req = servers.http_request(&fw);
            req["info"]["serverConfig"]["protocol"] = "gopher".into();
            let mid = mid_of(&req);
            let sent = cloud.send_json(&req);
            let (ack, at) = cloud.wait_response(LONG, "the ack", &agent, |v| is_ack_of(v, &mid));
            assert_eq!(ack["result"]["errorNo"], 5, "{ack}");
            refused.push(at - sent);
        }
        for (what, mut d) in [("accepted", accepted), ("refused", refused)] {
            d.sort();
            let pct = |p: f64| d[((d.len() as f64 * p).ceil() as usize).clamp(1, d.len()) - 1];
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            eprintln!(
                "mqtt request-to-ack latency [{broker}] {what} (n={}): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                d.len(),
                ms(pct(0.50)),
                ms(pct(0.99)),
                ms(d[d.len() - 1]),
            );
        }
    }
}
