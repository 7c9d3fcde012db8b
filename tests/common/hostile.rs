//! A hostile HTTP server for the integration tests: a small tokio server on
//! an address of the test's choosing (`127.0.0.1:0`, or `127.0.0.2:0` as
//! "another host"), with a runtime of its own that stops when it is dropped.
//! It serves one image and misbehaves as its [`Behaviour`] says, recording
//! every request it sees. Test files include it with
//! `#[path = "common/hostile.rs"] mod hostile;`; each uses only some of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How the server misbehaves.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// The image served honestly: `Range` answered with 206, a strong ETag.
    Honest,
    /// 200 and the image, then `extra` bytes more; with `length`, a
    /// `Content-Length` that counts them, else the body ends at the close.
    MoreThanDeclared { extra: usize, length: bool },
    /// 200 with the image's `Content-Length`, but the connection closes after
    /// `cut` bytes. With `then_honest`, later requests are served honestly.
    FewerThenClose { cut: usize, then_honest: bool },
    /// 200 with the right `Content-Length`, one byte a second.
    Drip,
    /// Every request gets 200 and the whole image's `Content-Length`, with
    /// no ETag or Last-Modified and `Range` ignored, and the connection
    /// closes after `cut` bytes: a download that can never resume.
    NoResume { cut: usize },
    /// Every answer carries a new strong ETag, so `If-Range` never matches
    /// and the whole file comes each time, closed after `cut` bytes: a
    /// validator that never matches twice.
    NewValidatorEachTime { cut: usize },
    /// The first answer stops after `cut` bytes (so the agent resumes); every
    /// `Range` request gets a 206 from byte `start` of a file of `total` bytes.
    WrongContentRange { cut: usize, start: u64, total: u64 },
    /// 302 to the same URL, forever.
    RedirectLoop,
    /// 302 to this URL.
    RedirectTo(String),
    /// 302 to this URL for the first request, then honest.
    RedirectFirst(String),
    /// The first answer stops after `cut` bytes (so the agent resumes).
    /// Every `Range` request gets a 206 from the byte asked for over the
    /// bytes of `other`, another version of the file (a stale mirror behind
    /// the same name), with `etag` as its ETag (none where `None`). Later
    /// requests without `Range` are honest.
    StaleRanges {
        cut: usize,
        other: Arc<Vec<u8>>,
        etag: Option<String>,
    },
    /// A mirror that changed its file but kept its validator: the first
    /// answer is of the image and stops after `cut` bytes; every later one
    /// (a 206 for a `Range`, else a 200) is of `other`, with the image's
    /// strong ETag.
    LyingMirror { cut: usize, other: Arc<Vec<u8>> },
    /// 500 for the first `n` requests, then honest.
    FailFirst(usize),
    /// 401 unless the `Authorization` header is exactly this, then honest.
    RequireAuth(String),
    /// The first answer sends `at` bytes, then waits until the gate opens
    /// (see [`gate`]) and sends the rest; later requests are honest.
    Gated {
        at: usize,
        gate: Arc<watch::Sender<bool>>,
    },
}

/// A closed gate for [`Behaviour::Gated`]; [`open`] opens it.
pub fn gate() -> Arc<watch::Sender<bool>> {
    Arc::new(watch::channel(false).0)
}

/// Open a gate: the server sends the rest of its answer.
pub fn open(gate: &watch::Sender<bool>) {
    gate.send_replace(true);
}

/// One request the server saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
    /// The `Authorization` header as sent.
    pub authorization: Option<String>,
}

/// A hostile server: its own tokio runtime, stopped on drop.
pub struct Hostile {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    _rt: tokio::runtime::Runtime,
}

impl Hostile {
    pub fn start(ip: &str, image: Vec<u8>, behaviour: Behaviour) -> Hostile {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let listener = rt
            .block_on(TcpListener::bind((ip, 0)))
            .unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
        let addr = listener.local_addr().expect("the bound address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let image = Arc::new(image);
        {
            let seen = seen.clone();
            rt.spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (seen, image, behaviour) = (seen.clone(), image.clone(), behaviour.clone());
                    tokio::spawn(async move {
                        let _ = serve(stream, &seen, &image, &behaviour).await;
                    });
                }
            });
        }
        Hostile {
            addr,
            seen,
            _rt: rt,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Read one request head; `None` if the client went away first.
async fn read_head(stream: &mut TcpStream) -> Option<Seen> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 << 10 || stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let path = lines.next()?.split(' ').nth(1)?.to_string();
    let mut seen = Seen {
        path,
        range: None,
        if_range: None,
        authorization: None,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_string();
        match name.trim().to_ascii_lowercase().as_str() {
            "range" => seen.range = Some(value),
            "if-range" => seen.if_range = Some(value),
            "authorization" => seen.authorization = Some(value),
            _ => {}
        }
    }
    Some(seen)
}

/// `bytes=N-` as N.
fn range_start(range: &str) -> Option<u64> {
    range
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .parse()
        .ok()
}

/// A 206 of `other` from byte `start`, with `etag` as its ETag (or none).
fn stale_range(other: &[u8], start: usize, etag: Option<&str>) -> (String, Vec<u8>) {
    let len = other.len();
    let start = start.min(len.saturating_sub(1));
    let etag = etag.map(|e| format!("ETag: {e}\r\n")).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nConnection: close\r\n{etag}\
         Content-Length: {}\r\nContent-Range: bytes {start}-{}/{len}\r\n\r\n",
        len - start,
        len - 1
    );
    (head, other[start..].to_vec())
}

/// Answer one request the way `behaviour` says, then close.
async fn serve(
    mut stream: TcpStream,
    seen: &Mutex<Vec<Seen>>,
    image: &[u8],
    behaviour: &Behaviour,
) -> std::io::Result<()> {
    let Some(req) = read_head(&mut stream).await else {
        return Ok(());
    };
    let nth = {
        let mut all = seen.lock().unwrap();
        all.push(req.clone());
        all.len() - 1
    };
    let len = image.len();
    let head = |status: &str, extra: &str| {
        format!("HTTP/1.1 {status}\r\nConnection: close\r\nETag: \"v1\"\r\n{extra}\r\n")
    };
    let honest = |req: &Seen| match req.range.as_deref().and_then(range_start) {
        Some(start) if (start as usize) < len => (
            head(
                "206 Partial Content",
                &format!(
                    "Content-Length: {}\r\nContent-Range: bytes {start}-{}/{len}\r\n",
                    len - start as usize,
                    len - 1
                ),
            ),
            &image[start as usize..],
        ),
        _ => (head("200 OK", &format!("Content-Length: {len}\r\n")), image),
    };
    let (head, body): (String, Vec<u8>) = match behaviour {
        Behaviour::Honest => {
            let (h, b) = honest(&req);
            (h, b.to_vec())
        }
        Behaviour::MoreThanDeclared { extra, length } => {
            let mut body = image.to_vec();
            body.extend(vec![0x5a; *extra]);
            let length = if *length {
                format!("Content-Length: {}\r\n", body.len())
            } else {
                String::new()
            };
            (head("200 OK", &length), body)
        }
        Behaviour::FewerThenClose { cut, then_honest } => {
            if nth > 0 && *then_honest {
                let (h, b) = honest(&req);
                (h, b.to_vec())
            } else {
                let start = req.range.as_deref().and_then(range_start).unwrap_or(0) as usize;
                let (h, _) = honest(&req);
                let end = (start + cut).min(len);
                (h, image[start..end].to_vec())
            }
        }
        Behaviour::NoResume { cut } => {
            let head =
                format!("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n");
            (head, image[..(*cut).min(len)].to_vec())
        }
        Behaviour::NewValidatorEachTime { cut } => {
            // `If-Range` names an older ETag, so the whole file comes, as
            // from an honest server whose file keeps changing.
            let head = format!(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nETag: \"v{}\"\r\nContent-Length: {len}\r\n\r\n",
                nth + 1
            );
            (head, image[..(*cut).min(len)].to_vec())
        }
        Behaviour::Drip => {
            stream
                .write_all(head("200 OK", &format!("Content-Length: {len}\r\n")).as_bytes())
                .await?;
            for b in image {
                stream.write_all(&[*b]).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            return Ok(());
        }
        Behaviour::WrongContentRange { cut, start, total } => match &req.range {
            None => (
                head("200 OK", &format!("Content-Length: {len}\r\n")),
                image[..*cut].to_vec(),
            ),
            Some(_) => {
                let body = &image[*start as usize..];
                (
                    head(
                        "206 Partial Content",
                        &format!(
                            "Content-Length: {}\r\nContent-Range: bytes {start}-{}/{total}\r\n",
                            body.len(),
                            start + body.len() as u64 - 1
                        ),
                    ),
                    body.to_vec(),
                )
            }
        },
        Behaviour::RedirectLoop => (
            head(
                "302 Found",
                &format!("Location: {}\r\nContent-Length: 0\r\n", req.path),
            ),
            Vec::new(),
        ),
        Behaviour::RedirectTo(url) => (
            head(
                "302 Found",
                &format!("Location: {url}\r\nContent-Length: 0\r\n"),
            ),
            Vec::new(),
        ),
        Behaviour::RedirectFirst(url) if nth == 0 => (
            head(
                "302 Found",
                &format!("Location: {url}\r\nContent-Length: 0\r\n"),
            ),
            Vec::new(),
        ),
        Behaviour::StaleRanges { cut, other, etag } => {
            match req.range.as_deref().and_then(range_start) {
                Some(start) => stale_range(other, start as usize, etag.as_deref()),
                None if nth == 0 => (honest(&req).0, image[..(*cut).min(len)].to_vec()),
                None => (honest(&req).0, image.to_vec()),
            }
        }
        Behaviour::LyingMirror { cut, .. } if nth == 0 => {
            (honest(&req).0, image[..(*cut).min(len)].to_vec())
        }
        Behaviour::LyingMirror { other, .. } => match req.range.as_deref().and_then(range_start) {
            Some(start) => stale_range(other, start as usize, Some("\"v1\"")),
            None => (honest(&req).0, other.to_vec()),
        },
        Behaviour::Gated { at, gate } if nth == 0 => {
            let (h, _) = honest(&req);
            stream.write_all(h.as_bytes()).await?;
            stream.write_all(&image[..*at]).await?;
            stream.flush().await?;
            let _ = gate.subscribe().wait_for(|open| *open).await;
            (String::new(), image[*at..].to_vec())
        }
        Behaviour::Gated { .. } | Behaviour::RedirectFirst(_) => {
            let (h, b) = honest(&req);
            (h, b.to_vec())
        }
        Behaviour::RequireAuth(expected) => {
            if req.authorization.as_deref() == Some(expected.as_str()) {
                let (h, b) = honest(&req);
                (h, b.to_vec())
            } else {
                (
                    head(
                        "401 Unauthorized",
                        "WWW-Authenticate: Basic realm=\"fw\"\r\nContent-Length: 0\r\n",
                    ),
                    Vec::new(),
                )
            }
        }
        Behaviour::FailFirst(n) => {
            if nth < *n {
                (
                    head("500 Internal Server Error", "Content-Length: 0\r\n"),
                    Vec::new(),
                )
            } else {
                let (h, b) = honest(&req);
                (h, b.to_vec())
            }
        }
    };
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await?;
    stream.shutdown().await
}
