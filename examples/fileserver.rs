//! A small static file server for demos and tests, on 127.0.0.1 only:
//!
//!     cargo run --example fileserver -- --root DIR [--port 0] [--port-file F] [--rate BYTES_PER_SEC]
//!
//! Prints `listening on http://127.0.0.1:PORT` (and writes PORT to `--port-file` once it
//! listens, through a temporary file and a rename, so a reader never sees half a number).
//! Serves GET and HEAD with `Content-Length`, `ETag`, `Last-Modified`, `Accept-Ranges`; one
//! `Range: bytes=a-`, `bytes=a-b` or `bytes=-n` gives 206 with `Content-Range` (416 when it
//! starts past the end; several ranges are ignored: 200); `If-Range` is honoured. Files are
//! streamed in 64 KiB chunks (memory stays bounded whatever their size); connections are
//! kept alive. `--rate` throttles each response, to watch a download's progress.
//!
//! Unless `--quiet`, every response is logged to stderr when it ends, with the range asked
//! for and the body bytes actually written to the socket:
//! `GET /f.bin 206 1048576 bytes range="bytes=1048576-" start=1048576 1.002s`; a response the
//! client cut short ends with `... aborted after N bytes ...` instead. `--log-every BYTES`
//! adds a line `sending GET /f.bin start=S sent=N` each time another BYTES of a body went
//! out, so whoever reads the log live (scripts/powercut/, whose VM is killed mid-response)
//! knows how much left the server even when the final line never comes.
//!
//! HTTP/1.1 is parsed by hand on tokio: the workspace builds hyper with its client side
//! only (no `server` feature), and this server needs nothing beyond the above.

use std::io::SeekFrom;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use tokio::fs::File;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
#[command(about = "Static file server on 127.0.0.1 (GET/HEAD, single Range)")]
struct Args {
    /// Directory to serve.
    #[arg(long)]
    root: PathBuf,
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Write the bound port (decimal, newline) to this file.
    #[arg(long)]
    port_file: Option<PathBuf>,
    /// Send each response body at most this many bytes per second.
    #[arg(long)]
    rate: Option<u64>,
    /// Do not log requests to stderr.
    #[arg(long)]
    quiet: bool,
    /// Also log a line each time this many more body bytes of a response went out (0: off).
    #[arg(long, default_value_t = 0)]
    log_every: u64,
}

struct Config {
    root: PathBuf,
    rate: Option<u64>,
    quiet: bool,
    log_every: u64,
}

/// What one response has done so far, for the log line (also when it fails half-way).
#[derive(Default)]
struct Sent {
    start: u64,
    body: u64,
}

const CHUNK: usize = 64 * 1024;
const MAX_HEAD: usize = 16 * 1024;
const IDLE: Duration = Duration::from_secs(30);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let root = std::fs::canonicalize(&args.root).map_err(|e| {
        std::io::Error::new(e.kind(), format!("--root {}: {e}", args.root.display()))
    })?;
    let listener = TcpListener::bind(("127.0.0.1", args.port)).await?;
    let port = listener.local_addr()?.port();
    if let Some(f) = &args.port_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, format!("{port}\n"))?;
        std::fs::rename(&tmp, f)?;
    }
    println!(
        "listening on http://127.0.0.1:{port}/ serving {}",
        root.display()
    );
    let cfg = Arc::new(Config {
        root,
        rate: args.rate.filter(|r| *r > 0),
        quiet: args.quiet,
        log_every: args.log_every,
    });
    loop {
        let (stream, _) = listener.accept().await?;
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let _ = serve_connection(stream, &cfg).await;
        });
    }
}

/// One request's head.
struct Request {
    method: String,
    target: String,
    http10: bool,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn keep_alive(&self) -> bool {
        let conn = self.header("connection").unwrap_or("").to_ascii_lowercase();
        if self.http10 {
            conn.contains("keep-alive")
        } else {
            !conn.contains("close")
        }
    }
}

async fn serve_connection(stream: TcpStream, cfg: &Config) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let req = match tokio::time::timeout(IDLE, read_head(&mut rd)).await {
            Err(_) | Ok(Ok(None)) => return Ok(()), // idle, or the client closed
            Ok(Err(_)) => {
                let _ = wr
                    .write_all(&simple(400, "Bad Request", &[], true, false))
                    .await;
                return Ok(());
            }
            Ok(Ok(Some(r))) => r,
        };
        // A body on GET/HEAD is not something this server reads: answer, then close.
        let has_body = req.header("transfer-encoding").is_some()
            || req
                .header("content-length")
                .is_some_and(|v| v.trim() != "0");
        let keep = req.keep_alive() && !has_body;
        let started = Instant::now();
        let mut sent = Sent::default();
        let outcome = respond(&req, &mut wr, cfg, keep, &mut sent).await;
        if !cfg.quiet {
            let status = match &outcome {
                Ok(code) => code.to_string(),
                Err(_) => "aborted after".to_string(),
            };
            eprintln!(
                "{} {} {} {} bytes range={:?} start={} {:.3}s",
                req.method,
                req.target,
                status,
                sent.body,
                req.header("range").unwrap_or(""),
                sent.start,
                started.elapsed().as_secs_f64()
            );
        }
        outcome?;
        if !keep {
            let _ = wr.shutdown().await;
            return Ok(());
        }
    }
}

/// Reads a request line and headers; `None` on EOF before any byte.
async fn read_head<R: AsyncBufReadExt + Unpin>(rd: &mut R) -> std::io::Result<Option<Request>> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut total = 0usize;
    let mut line = String::new();
    // Skip blank lines before a request line (RFC 9112 §2.2).
    loop {
        line.clear();
        let n = rd.read_line(&mut line).await?;
        if n == 0 {
            return Ok(None);
        }
        total += n;
        if total > MAX_HEAD {
            return Err(bad("request head too large"));
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_ascii_whitespace();
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) => (m.to_string(), t.to_string(), v.to_string()),
        _ => return Err(bad("bad request line")),
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad("unsupported HTTP version"));
    }
    let mut headers = Vec::new();
    loop {
        line.clear();
        let n = rd.read_line(&mut line).await?;
        if n == 0 {
            return Err(bad("EOF in headers"));
        }
        total += n;
        if total > MAX_HEAD {
            return Err(bad("request head too large"));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| bad("bad header line"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Some(Request {
        method,
        target,
        http10: version == "HTTP/1.0",
        headers,
    }))
}

/// A response with a short text body.
fn simple(code: u16, reason: &str, extra: &[(&str, String)], close: bool, head: bool) -> Vec<u8> {
    let body = format!("{code} {reason}\n");
    let mut h = format!(
        "HTTP/1.1 {code} {reason}\r\nServer: fwagent-fileserver\r\nDate: {}\r\n\
         Content-Type: text/plain\r\nContent-Length: {}\r\n",
        http_date(SystemTime::now()),
        body.len()
    );
    for (k, v) in extra {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        h.push_str("Connection: close\r\n");
    }
    h.push_str("\r\n");
    if !head {
        h.push_str(&body);
    }
    h.into_bytes()
}

async fn respond<W: AsyncWriteExt + Unpin>(
    req: &Request,
    wr: &mut W,
    cfg: &Config,
    keep: bool,
    sent: &mut Sent,
) -> std::io::Result<u16> {
    let head = req.method == "HEAD";
    if req.method != "GET" && !head {
        let r = simple(
            405,
            "Method Not Allowed",
            &[("Allow", "GET, HEAD".into())],
            !keep,
            false,
        );
        wr.write_all(&r).await?;
        return Ok(405);
    }
    let Some(path) = resolve(&cfg.root, &req.target) else {
        wr.write_all(&simple(404, "Not Found", &[], !keep, head))
            .await?;
        return Ok(404);
    };
    let opened = match File::open(&path).await {
        Ok(f) => match f.metadata().await {
            Ok(m) if m.is_file() => Some((f, m)),
            _ => None,
        },
        Err(_) => None,
    };
    let Some((mut file, meta)) = opened else {
        wr.write_all(&simple(404, "Not Found", &[], !keep, head))
            .await?;
        return Ok(404);
    };
    let len = meta.len();
    let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
    let mtime_secs = mtime
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let etag = format!("\"{mtime_secs:x}-{len:x}\"");
    let last_modified = http_date(mtime);

    // Range applies unless If-Range names another version of the file.
    let range_ok = match req.header("if-range") {
        None => true,
        Some(v) => v == etag || v == last_modified,
    };
    let range = if range_ok {
        req.header("range").map(|r| parse_range(r, len))
    } else {
        None
    };
    let (code, reason, start, count) = match range {
        None | Some(RangeSpec::Ignore) => (200, "OK", 0, len),
        Some(RangeSpec::Unsatisfiable) => {
            let r = simple(
                416,
                "Range Not Satisfiable",
                &[("Content-Range", format!("bytes */{len}"))],
                !keep,
                head,
            );
            wr.write_all(&r).await?;
            return Ok(416);
        }
        Some(RangeSpec::Bytes(a, b)) => (206, "Partial Content", a, b - a + 1),
    };

    let mut h = format!(
        "HTTP/1.1 {code} {reason}\r\nServer: fwagent-fileserver\r\nDate: {}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {count}\r\n\
         Last-Modified: {last_modified}\r\nETag: {etag}\r\nAccept-Ranges: bytes\r\n",
        http_date(SystemTime::now())
    );
    if code == 206 {
        h.push_str(&format!(
            "Content-Range: bytes {start}-{}/{len}\r\n",
            start + count - 1
        ));
    }
    if !keep {
        h.push_str("Connection: close\r\n");
    }
    h.push_str("\r\n");
    wr.write_all(h.as_bytes()).await?;
    if head {
        wr.flush().await?;
        return Ok(code);
    }

    sent.start = start;
    file.seek(SeekFrom::Start(start)).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut left = count;
    let mut next_log = cfg.log_every;
    let began = Instant::now();
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        let n = file.read(&mut buf[..want]).await?;
        if n == 0 {
            // The file shrank under us: the client sees a short body and the close.
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shrank while sending",
            ));
        }
        // Count what went out even when the write fails half-way (the client left).
        let mut off = 0;
        while off < n {
            let w = wr.write(&buf[off..n]).await?;
            if w == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            off += w;
            sent.body += w as u64;
        }
        left -= n as u64;
        if cfg.log_every > 0 && !cfg.quiet && sent.body >= next_log {
            eprintln!(
                "sending {} {} start={} sent={}",
                req.method, req.target, start, sent.body
            );
            next_log = sent.body + cfg.log_every;
        }
        if let Some(rate) = cfg.rate {
            let due = Duration::from_secs_f64(sent.body as f64 / rate as f64);
            let elapsed = began.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
    }
    wr.flush().await?;
    Ok(code)
}

enum RangeSpec {
    /// Serve the whole file (malformed, several ranges, or not bytes).
    Ignore,
    Unsatisfiable,
    /// Inclusive, within the file.
    Bytes(u64, u64),
}

fn parse_range(value: &str, len: u64) -> RangeSpec {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeSpec::Ignore;
    };
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (a.is_empty(), b.is_empty()) {
        // bytes=-n: the last n bytes
        (true, false) => match num(b) {
            Some(0) => RangeSpec::Unsatisfiable,
            Some(_) if len == 0 => RangeSpec::Unsatisfiable,
            Some(n) => RangeSpec::Bytes(len.saturating_sub(n), len - 1),
            None => RangeSpec::Ignore,
        },
        // bytes=a-
        (false, true) => match num(a) {
            Some(a) if a < len => RangeSpec::Bytes(a, len - 1),
            Some(_) => RangeSpec::Unsatisfiable,
            None => RangeSpec::Ignore,
        },
        // bytes=a-b
        (false, false) => match (num(a), num(b)) {
            (Some(a), Some(b)) if a > b => RangeSpec::Ignore,
            (Some(a), Some(_)) if a >= len => RangeSpec::Unsatisfiable,
            (Some(a), Some(b)) => RangeSpec::Bytes(a, b.min(len - 1)),
            _ => RangeSpec::Ignore,
        },
        (true, true) => RangeSpec::Ignore,
    }
}

/// The file under `root` that `target` names, or `None` if it would leave `root`.
fn resolve(root: &Path, target: &str) -> Option<PathBuf> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return None;
    }
    let decoded = percent_decode(path)?;
    let mut out = root.to_path_buf();
    for comp in Path::new(&decoded).components() {
        match comp {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(c) => out.push(c),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    // Symlinks must not lead out of the root either.
    let real = std::fs::canonicalize(&out).ok()?;
    real.starts_with(root).then_some(real)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            let v = u8::from_str_radix(hex, 16).ok()?;
            if v == 0 {
                return None;
            }
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        WD[(days % 7) as usize],
        d,
        MON[(m - 1) as usize],
        y,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}
