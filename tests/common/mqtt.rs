//! Brokers for the MQTT tests: a lock for tests that stop the shared one,
//! a mosquitto of a test's own, and a fake broker that swallows a PUBACK.

use super::{free_port, spawn_detached, temp_dir, wait_port, wait_port_closed};
use bytes::BytesMut;
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck, SubscribeReasonCode,
};
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Serialises tests of one binary that kill or restart the shared broker (and the tests that
/// need it up meanwhile). A poisoned lock is taken anyway.
pub fn broker_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- a private broker

/// A mosquitto of the test's own, on a fresh port with its store in a temp dir: for tests
/// that kill and restart the broker without disturbing others. Killed on drop.
pub struct Mosquitto {
    pub port: u16,
    pub dir: tempfile::TempDir,
    cmdline: String,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::start_with("")
    }

    /// With `extra` lines appended to its configuration (`max_inflight_messages 0`, say).
    pub fn start_with(extra: &str) -> Mosquitto {
        let bin = std::env::var("FWAGENT_TEST_MOSQUITTO_BIN")
            .ok()
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| "/usr/sbin/mosquitto".into());
        let dir = temp_dir();
        let port = free_port();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let conf = dir.path().join("mosquitto.conf");
        fs::write(
            &conf,
            format!(
                "{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {d}/\nautosave_on_changes true\nautosave_interval 1\n\
                 log_dest file {d}/mosquitto.log\n{extra}",
                user = if root { "user root\n" } else { "" },
                d = dir.path().display()
            ),
        )
        .expect("write mosquitto.conf");
        let mut m = Mosquitto {
            port,
            cmdline: format!("'{bin}' -c '{}'", conf.display()),
            dir,
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        self.child = Some(spawn_detached(&self.cmdline));
        wait_port(self.port, Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, a crash: the broker keeps what it had saved, and it saves its store about a
    /// second after a change, so what arrived just before may be lost (as on a real crash).
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
    }

    /// SIGTERM: the broker saves its store and exits; everything it had survives.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
    }

    fn signal(&mut self, sig: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(c.id() as i32, sig) };
            let _ = c.wait();
            wait_port_closed(self.port, Duration::from_secs(10));
        }
    }

    /// Starts it again on the same port with the same store (after [`Self::kill`] or
    /// [`Self::stop`]; if it still runs, stops it first).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Its log file (connections, subscriptions, saves).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------- a fake broker

/// A PUBLISH the fake broker got from the agent.
#[derive(Clone, Debug)]
pub struct Published {
    /// 1 for the first connection, 2 for the next, ...
    pub connection: u32,
    pub topic: String,
    pub pkid: u16,
    pub payload: Vec<u8>,
    pub at: Instant,
    /// Whether the broker answered it with a PUBACK.
    pub acked: bool,
}

/// What the fake broker saw.
#[derive(Default)]
struct FakeState {
    connections: u32,
    published: Vec<Published>,
    /// The agent's PUBACKs for the request: (connection, pkid).
    request_acks: Vec<(u32, u16)>,
    swallowed: bool,
}

/// A broker of the test's own that speaks just enough MQTT 3.1.1 (CONNECT, SUBSCRIBE, QoS 1
/// PUBLISH and PUBACK, PINGREQ) to be one that loses a PUBACK, which Mosquitto cannot be told
/// to do: after the first connection's SUBACK it publishes `request` on `request_topic`, and it
/// never acknowledges the first publish on `swallow_topic`; everything else it acknowledges.
/// A reconnect finds the session present (as on a broker that keeps it). Its threads end with
/// the test binary.
pub struct FakeBroker {
    pub port: u16,
    state: Arc<Mutex<FakeState>>,
}

impl FakeBroker {
    pub fn start(request_topic: &str, request: &[u8], swallow_topic: &str) -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake broker");
        let port = listener.local_addr().expect("its address").port();
        let state = Arc::new(Mutex::new(FakeState::default()));
        let (st, request_topic, request, swallow_topic) = (
            state.clone(),
            request_topic.to_string(),
            request.to_vec(),
            swallow_topic.to_string(),
        );
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let connection = {
                    let mut s = st.lock().unwrap();
                    s.connections += 1;
                    s.connections
                };
                let (st, rt, rq, sw) = (
                    st.clone(),
                    request_topic.clone(),
                    request.clone(),
                    swallow_topic.clone(),
                );
                thread::spawn(move || {
                    let _ = serve(stream, connection, &st, &rt, &rq, &sw);
                });
            }
        });
        FakeBroker { port, state }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn connections(&self) -> u32 {
        self.state.lock().unwrap().connections
    }

    /// The publishes on `topic` so far, in order.
    pub fn published(&self, topic: &str) -> Vec<Published> {
        let s = self.state.lock().unwrap();
        s.published
            .iter()
            .filter(|p| p.topic == topic)
            .cloned()
            .collect()
    }

    /// The agent's PUBACKs for the request: (connection, pkid).
    pub fn request_acks(&self) -> Vec<(u32, u16)> {
        self.state.lock().unwrap().request_acks.clone()
    }
}

fn write_packet(stream: &mut TcpStream, packet: Packet) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    packet
        .write(&mut out, 1 << 20)
        .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    stream.write_all(&out)
}

/// One connection of the fake broker, until the agent closes it.
fn serve(
    mut stream: TcpStream,
    connection: u32,
    state: &Mutex<FakeState>,
    request_topic: &str,
    request: &[u8],
    swallow_topic: &str,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let packet = match Packet::read(&mut buf, 1 << 20) {
            Ok(p) => p,
            Err(rumqttc::Error::InsufficientBytes(_)) => {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
                continue;
            }
            Err(e) => return Err(std::io::Error::other(format!("{e:?}"))),
        };
        match packet {
            Packet::Connect(_) => write_packet(
                &mut stream,
                Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, connection > 1)),
            )?,
            Packet::Subscribe(sub) => {
                let codes = sub
                    .filters
                    .iter()
                    .map(|_| SubscribeReasonCode::Success(QoS::AtLeastOnce))
                    .collect();
                write_packet(&mut stream, Packet::SubAck(SubAck::new(sub.pkid, codes)))?;
                if connection == 1 {
                    let mut p = Publish::new(request_topic, QoS::AtLeastOnce, request.to_vec());
                    p.pkid = 1;
                    write_packet(&mut stream, Packet::Publish(p))?;
                }
            }
            Packet::Publish(p) => {
                let swallow = {
                    let mut s = state.lock().unwrap();
                    let swallow = p.topic == swallow_topic && !s.swallowed;
                    s.swallowed |= swallow;
                    s.published.push(Published {
                        connection,
                        topic: p.topic.clone(),
                        pkid: p.pkid,
                        payload: p.payload.to_vec(),
                        at: Instant::now(),
                        acked: !swallow,
                    });
                    swallow
                };
                if !swallow && p.qos != QoS::AtMostOnce {
                    write_packet(&mut stream, Packet::PubAck(PubAck::new(p.pkid)))?;
                }
            }
            Packet::PubAck(ack) => state
                .lock()
                .unwrap()
                .request_acks
                .push((connection, ack.pkid)),
            Packet::PingReq => write_packet(&mut stream, Packet::PingResp)?,
            Packet::Disconnect => return Ok(()),
            _ => {}
        }
    }
}
