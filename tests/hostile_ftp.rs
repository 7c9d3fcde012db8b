//! The real `fwagent` binary against a hostile FTP server of the test's own:
//! a small tokio server on 127.0.0.1:0 that speaks just enough FTP (USER,
//! PASS, TYPE, SIZE, MDTM, REST, PASV, RETR, QUIT) and misbehaves on cue
//! where tests/ftp_upgrade.rs's real servers cannot: its `PASV` reply names
//! another host, its data connection sends more than its `SIZE` said, stops
//! short every time, or drips a byte a second. (A wrong `SIZE` and a data
//! connection dropped once are tests/ftp_upgrade.rs's.) Each run ends in
//! PROTOCOL.md's result within a bounded time; a failed upgrade flashes
//! nothing and leaves no partial file.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// What the data connection does after `RETR`.
#[derive(Clone, Copy, Debug)]
enum Data {
    /// The image from the `REST` offset, then 226.
    Honest,
    /// The image and `extra` bytes more, then 226 (its `SIZE` was right).
    More { extra: usize },
    /// At most `cut` bytes from the offset, then the data connection closes
    /// and the reply is 426.
    Short { cut: usize },
    /// One byte a second.
    Drip,
}

/// A fake FTP server with its own runtime, stopped on drop.
struct FakeFtp {
    port: u16,
    /// Every command line it received.
    commands: Arc<Mutex<Vec<String>>>,
    /// Connections to the decoy the `PASV` replies name instead of us.
    decoy_hits: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

impl FakeFtp {
    /// With `decoy`, the `PASV` replies name 127.0.0.2 (where a listener on
    /// the same port counts connections) instead of 127.0.0.1.
    fn start(image: Vec<u8>, data: Data, decoy: bool) -> FakeFtp {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let control = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind the control port");
        let port = control.local_addr().unwrap().port();
        let commands = Arc::new(Mutex::new(Vec::new()));
        let decoy_hits = Arc::new(AtomicUsize::new(0));
        let image = Arc::new(image);
        let (c, hits) = (commands.clone(), decoy_hits.clone());
        rt.spawn(async move {
            while let Ok((stream, _)) = control.accept().await {
                let (c, image, hits) = (c.clone(), image.clone(), hits.clone());
                tokio::spawn(async move {
                    let _ = session(stream, &c, &image, data, decoy.then_some(hits)).await;
                });
            }
        });
        FakeFtp {
            port,
            commands,
            decoy_hits,
            _rt: rt,
        }
    }

    fn commands(&self) -> Vec<String> {
        self.commands.lock().unwrap().clone()
    }

    /// The commands starting with `verb`.
    fn sent(&self, verb: &str) -> Vec<String> {
        self.commands()
            .into_iter()
            .filter(|c| c.starts_with(verb))
            .collect()
    }
}

/// Bind a data listener on 127.0.0.1 and, for a decoy, one on 127.0.0.2 with
/// the same port that counts whoever connects to it.
async fn data_listener(decoy: Option<&Arc<AtomicUsize>>) -> std::io::Result<TcpListener> {
    for _ in 0..20 {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let Some(hits) = decoy else {
            return Ok(listener);
        };
        let port = listener.local_addr()?.port();
        let Ok(trap) = TcpListener::bind(("127.0.0.2", port)).await else {
            continue; // that port is taken on 127.0.0.2: try another
        };
        let hits = hits.clone();
        tokio::spawn(async move {
            while trap.accept().await.is_ok() {
                hits.fetch_add(1, Ordering::SeqCst);
            }
        });
        return Ok(listener);
    }
    Err(std::io::Error::other("no port free on both addresses"))
}

async fn session(
    stream: TcpStream,
    commands: &Mutex<Vec<String>>,
    image: &[u8],
    data: Data,
    decoy: Option<Arc<AtomicUsize>>,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    w.write_all(b"220 fake ftp\r\n").await?;
    let mut offset = 0usize;
    let mut passive: Option<TcpListener> = None;
    while let Some(line) = lines.next_line().await? {
        commands.lock().unwrap().push(line.clone());
        let (verb, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let reply = match verb.to_ascii_uppercase().as_str() {
            "USER" => "331 password please".to_string(),
            "PASS" => "230 logged in".to_string(),
            "TYPE" => "200 binary".to_string(),
            "SIZE" => format!("213 {}", image.len()),
            "MDTM" => "213 20200702000000".to_string(),
            "REST" => {
                offset = arg.trim().parse().unwrap_or(0);
                format!("350 restarting at {offset}")
            }
            "PASV" => {
                let listener = data_listener(decoy.as_ref()).await?;
                let port = listener.local_addr()?.port();
                passive = Some(listener);
                let host = if decoy.is_some() {
                    "127,0,0,2"
                } else {
                    "127,0,0,1"
                };
                format!(
                    "227 Entering Passive Mode ({host},{},{})",
                    port >> 8,
                    port & 0xff
                )
            }
            "RETR" => {
                let Some(listener) = passive.take() else {
                    w.write_all(b"425 use PASV first\r\n").await?;
                    continue;
                };
                w.write_all(b"150 here it comes\r\n").await?;
                let accepted =
                    tokio::time::timeout(Duration::from_secs(10), listener.accept()).await;
                let Ok(Ok((mut conn, _))) = accepted else {
                    w.write_all(b"425 no data connection\r\n").await?;
                    continue;
                };
                let from = offset.min(image.len());
                offset = 0;
                let complete = send_data(&mut conn, &image[from..], data).await;
                drop(conn);
                if complete {
                    "226 transfer complete".to_string()
                } else {
                    "426 connection closed; transfer aborted".to_string()
                }
            }
            "QUIT" => {
                w.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => "502 not implemented".to_string(),
        };
        w.write_all(format!("{reply}\r\n").as_bytes()).await?;
    }
    Ok(())
}

/// Send the image's remaining `rest` as `data` says; true when the server
/// would call the transfer complete.
async fn send_data(conn: &mut TcpStream, rest: &[u8], data: Data) -> bool {
    match data {
        Data::Honest => conn.write_all(rest).await.is_ok(),
        Data::More { extra } => {
            conn.write_all(rest).await.is_ok() && conn.write_all(&vec![0x5a; extra]).await.is_ok()
        }
        Data::Short { cut } => {
            let _ = conn.write_all(&rest[..cut.min(rest.len())]).await;
            false
        }
        Data::Drip => {
            for b in rest {
                if conn.write_all(&[*b]).await.is_err() {
                    return false;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            true
        }
    }
}

// ---------------------------------------------------------------- the agent

fn image(dir: &Path, len: u64) -> (Firmware, Vec<u8>) {
    let fw = Firmware::create(dir, "hostile-ftp", len);
    let bytes = fw.bytes();
    (fw, bytes)
}

fn request(port: u16, fw: &Firmware) -> Value {
    upgrade_request("ftp", port, "/", fw, "fwuser", "fw-ftp-pass")
}

// ---------------------------------------------------------------- the cases

#[test]
fn a_pasv_reply_naming_another_host_is_not_followed() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 200_000);
    let server = FakeFtp::start(bytes, Data::Honest, true);
    let out = run_short(
        dir.path(),
        &request(server.port, &fw),
        &[("--download-attempts", "2")],
    );
    assert_eq!(out.run.code(), Some(0), "{}", out.run);
    assert_eq!(only_result(&out.run).error_no, 0, "{}", out.run);
    assert_eq!(md5_file(&out.target), fw.md5);
    assert_eq!(
        server.decoy_hits.load(Ordering::SeqCst),
        0,
        "the host in the PASV reply was contacted"
    );
}

#[test]
fn more_data_than_size_said_is_30() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 200_000);
    let server = FakeFtp::start(bytes, Data::More { extra: 10_000 }, false);
    let out = run_short(
        dir.path(),
        &request(server.port, &fw),
        &[("--download-attempts", "3")],
    );
    let why = out.assert_failed(30, Duration::from_secs(30));
    assert!(why.contains("more than the declared"), "{why}");
    assert_eq!(
        server.sent("RETR").len(),
        1,
        "a size mismatch is not retried"
    );
}

#[test]
fn a_data_connection_that_stops_short_every_time_is_23_after_the_attempts() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 200_000);
    let server = FakeFtp::start(bytes, Data::Short { cut: 30_000 }, false);
    let out = run_short(
        dir.path(),
        &request(server.port, &fw),
        &[("--download-attempts", "3")],
    );
    out.assert_failed(23, Duration::from_secs(30));
    assert_eq!(server.sent("RETR").len(), 3, "{:#?}", server.commands());
    assert_eq!(
        server.sent("REST"),
        ["REST 30000", "REST 60000"],
        "each attempt resumes where the last stopped"
    );
}

#[test]
fn a_data_connection_that_drips_is_too_slow() {
    let dir = temp_dir();
    let (fw, bytes) = image(dir.path(), 100_000);
    let server = FakeFtp::start(bytes, Data::Drip, false);
    let out = run_short(
        dir.path(),
        &request(server.port, &fw),
        &[("--download-attempts", "2")],
    );
    let why = out.assert_failed(23, Duration::from_secs(30));
    assert!(why.contains("too slow"), "{why}");
    assert_eq!(server.sent("RETR").len(), 2);
}
