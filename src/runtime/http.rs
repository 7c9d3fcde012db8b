//! HTTP(S) downloads with hyper 1.
//!
//! Resumes with `Range` plus `If-Range` (a strong ETag, else Last-Modified),
//! so a file that changed on the server is fetched again from zero instead of
//! being spliced; a 206 is taken only with the validator it was asked for,
//! else the partial file starts again from zero and the whole file is asked
//! for. Follows at most `max_redirects` redirects, to the request's own host
//! or to a host in `Transfer::redirect_allow` (`--redirect-allow`), over
//! http or https only and never from https down to http; credentials go to
//! the request's own origin (scheme, host and port) alone. Every wait is
//! bounded: the connect by `connect_timeout`, the response head and each
//! body frame by `idle_timeout`. Status codes map to PROTOCOL.md: 401/403 →
//! 21, 404/410 → 22, 5xx and timeouts → 23 (retryable), unreachable → 20
//! (retryable).
//!
//! https trusts the CA file of `--https-ca` when given, else the web PKI
//! roots ([`crate::tls`]); a failed handshake is 20 (retryable), its
//! description in rustls' words (`invalid peer certificate: UnknownIssuer`).

use super::download::{no_data, size_mismatch, BoxFuture, FetchJob, Fetcher, Sink};
use crate::protocol::host_of;
use crate::tls::TlsError;
use base64::Engine;
use bytes::Bytes;
use fwagent_state::{result_no, Failure};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::path::Path;
use std::time::Duration;
use tokio::time::timeout;

/// One client for `http` and `https` (the connector speaks both).
pub struct HttpFetcher {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// Trusting `--https-ca` rather than the web PKI roots.
    private_ca: bool,
}

impl HttpFetcher {
    /// `ca`: PEM certificate(s) to trust for https servers instead of the web
    /// PKI roots (`--https-ca`).
    pub fn new(connect_timeout: Duration, ca: Option<&Path>) -> Result<Self, TlsError> {
        let config = crate::tls::client_config(ca, None)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(HttpFetcher {
            client,
            private_ca: ca.is_some(),
        })
    }

    /// Why a connection failed, in one line. A failed TLS handshake says so,
    /// with rustls' own words (`invalid peer certificate: UnknownIssuer`) and,
    /// for a certificate from an unknown CA, which roots were trusted.
    fn connect_error(&self, e: &hyper_util::client::legacy::Error) -> String {
        match tls_error(e) {
            Some(
                tls @ rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            ) => format!(
                "TLS handshake failed: {tls} (trusted: {})",
                if self.private_ca {
                    "the CA file of --https-ca"
                } else {
                    "the web PKI roots; a private CA needs --https-ca"
                }
            ),
            Some(tls) => format!("TLS handshake failed: {tls}"),
            None => source_chain(e),
        }
    }
}

/// The rustls error somewhere in `e`'s chain. tokio-rustls wraps it in an
/// `io::Error` and hyper-rustls that in another, and an `io::Error`'s
/// `source` skips what it wraps: so look inside each one.
fn tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(tls) = c.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        cause = match c.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    None
}

fn transfer(description: String, retryable: bool) -> Failure {
    Failure::new(result_no::TRANSFER, description, retryable)
}

/// The total size in a `Content-Range: bytes a-b/total` header, with its start.
fn content_range(value: &HeaderValue) -> Option<(u64, u64)> {
    let v = value.to_str().ok()?.strip_prefix("bytes ")?;
    let (range, total) = v.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()?))
}

/// What identifies this version of the file: a strong ETag, else Last-Modified.
fn validator_of(headers: &hyper::HeaderMap) -> Option<String> {
    if let Some(etag) = headers.get(header::ETAG).and_then(|v| v.to_str().ok()) {
        if !etag.starts_with("W/") {
            return Some(etag.to_string());
        }
    }
    headers
        .get(header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Is the 206 with `headers` of the version `if_range` asked for? An entity
/// tag must be the response's ETag, a strong one, byte for byte; a date
/// its Last-Modified, exactly (RFC 9110, 13.1.5). A 206 without one, or
/// with another, is never spliced onto the partial file.
fn same_version(headers: &hyper::HeaderMap, if_range: &str) -> bool {
    if if_range.starts_with("W/") {
        // Never sent ([`validator_of`]), and never a match.
        return false;
    }
    let field = if if_range.starts_with('"') {
        header::ETAG
    } else {
        header::LAST_MODIFIED
    };
    headers.get(field).and_then(|v| v.to_str().ok()) == Some(if_range)
}

/// What [`accept`] made of a response.
#[derive(Debug, PartialEq, Eq)]
enum Accepted {
    /// Its body goes into the sink.
    Body,
    /// A 206 of another version than the partial file's: the sink starts
    /// again from zero, and the whole file must be asked for.
    WholeFile,
}

impl HttpFetcher {
    async fn fetch_inner(&self, job: &FetchJob, sink: &mut Sink) -> Result<(), Failure> {
        let resume = (sink.offset(), sink.validator().map(str::to_string));
        let mut response = self.follow(job, &resume).await?;
        if accept(&response, &resume, job.firmware.size, sink).await? == Accepted::WholeFile {
            // The sink is at byte 0 now: this GET has no `Range`, and at
            // byte 0 a response is never refused as another version.
            drop(response);
            let whole = (0, None);
            response = self.follow(job, &whole).await?;
            accept(&response, &whole, job.firmware.size, sink).await?;
        }
        stream(response.into_body(), job.transfer.idle_timeout, sink).await
    }

    /// The GET (a resume from the partial file's offset where its validator
    /// allows one), redirects followed within the rules, up to the response
    /// that is not a redirect.
    async fn follow(
        &self,
        job: &FetchJob,
        resume: &(u64, Option<String>),
    ) -> Result<Response<Incoming>, Failure> {
        let t = &job.transfer;
        let mut url = url::Url::parse(&job.source.url)
            .map_err(|e| transfer(format!("bad URL: {e}"), false))?;
        let origin = url.clone();
        let origin_host = host_of(&url);
        let mut redirects = 0;
        loop {
            let req = get(job, &url, &origin, resume)?;
            let wait = t.connect_timeout + t.idle_timeout;
            let resp = match timeout(wait, self.client.request(req)).await {
                Err(_) => return Err(transfer(format!("no response within {wait:?}"), true)),
                Ok(Err(e)) if e.is_connect() => {
                    return Err(Failure::new(
                        result_no::CONNECT,
                        format!(
                            "cannot connect to {}: {}",
                            host_port(&url),
                            self.connect_error(&e)
                        ),
                        true,
                    ))
                }
                Ok(Err(e)) => {
                    return Err(transfer(
                        format!("request failed: {}", source_chain(&e)),
                        true,
                    ))
                }
                Ok(Ok(resp)) => resp,
            };
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| transfer(format!("{} without a Location", resp.status()), false))?;
            let mut next = url
                .join(location)
                .map_err(|e| transfer(format!("bad redirect: {e}"), false))?;
            redirects += 1;
            if redirects > t.max_redirects {
                return Err(transfer(
                    format!("more than {} redirects", t.max_redirects),
                    false,
                ));
            }
            check_redirect(&url, &next, origin_host.as_deref(), &t.redirect_allow)?;
            // User info in a Location is never sent on.
            let _ = next.set_username("");
            let _ = next.set_password(None);
            url = next;
        }
    }
}

/// Are `a` and `b` of one origin (RFC 6454): the same scheme, host (as
/// [`host_of`] normalises it) and port (the scheme's default where none is
/// given)?
fn same_origin(a: &url::Url, b: &url::Url) -> bool {
    a.scheme() == b.scheme()
        && host_of(a) == host_of(b)
        && a.port_or_known_default() == b.port_or_known_default()
}

/// The GET of `url`: credentials only to the request's own origin
/// (`origin`: scheme, host and port, as curl does), so a redirect to
/// another port or scheme of the same host goes without them; a range only
/// where it can be proved to be the same file.
fn get(
    job: &FetchJob,
    url: &url::Url,
    origin: &url::Url,
    resume: &(u64, Option<String>),
) -> Result<Request<Empty<Bytes>>, Failure> {
    let mut req = Request::get(url.as_str()).header(
        header::USER_AGENT,
        concat!("fwagent/", env!("CARGO_PKG_VERSION")),
    );
    let user = job.source.user.expose();
    if !user.is_empty() && same_origin(url, origin) {
        let pair = format!("{}:{}", user, job.source.password.expose());
        let token = base64::engine::general_purpose::STANDARD.encode(pair);
        req = req.header(header::AUTHORIZATION, format!("Basic {token}"));
    }
    // Resume only what can be proved to be the same file: without a
    // validator the whole file is asked for (the 200 in `accept` restarts
    // the partial file from zero), never a splice of two versions.
    if let Some(v) = if_range(resume) {
        req = req
            .header(header::RANGE, format!("bytes={}-", resume.0))
            .header(header::IF_RANGE, v);
    }
    req.body(Empty::new())
        .map_err(|e| transfer(format!("cannot build the request: {e}"), false))
}

/// The `If-Range` that [`get`] sends for `resume`, if any.
fn if_range((offset, validator): &(u64, Option<String>)) -> Option<&str> {
    validator.as_deref().filter(|_| *offset > 0)
}

/// Is `response` (to the GET for `resume`) the image's bytes from the
/// partial file's offset? A 200 restarts the partial file from zero; a 206
/// must start at its offset and be of the version asked for ([`partial`]).
async fn accept(
    response: &Response<Incoming>,
    resume: &(u64, Option<String>),
    size: u64,
    sink: &mut Sink,
) -> Result<Accepted, Failure> {
    let status = response.status();
    let offset = sink.offset();
    match status {
        StatusCode::OK => {
            let length = response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(length) = length.filter(|&l| l != size) {
                return Err(size_mismatch(length, size));
            }
            let validator = validator_of(response.headers());
            if offset > 0 {
                sink.restart(validator).await?;
            } else {
                sink.set_validator(validator);
            }
            Ok(Accepted::Body)
        }
        StatusCode::PARTIAL_CONTENT => partial(response, if_range(resume), size, sink).await,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(Failure::new(
            result_no::AUTH,
            format!("the server refused the credentials ({status})"),
            false,
        )),
        StatusCode::NOT_FOUND | StatusCode::GONE => Err(Failure::new(
            result_no::NOT_FOUND,
            format!("file not found on the server ({status})"),
            false,
        )),
        s => Err(transfer(
            format!("the server answered {s}"),
            s.is_server_error(),
        )),
    }
}

/// A 206: the bytes from the partial file's offset, of the version
/// `if_range` asked for. One of another version (or of none, or a 206
/// nobody asked for) is not spliced: the sink starts again from zero, and
/// the caller asks for the whole file. At byte 0 there is nothing to
/// splice onto, so none is refused as another version.
async fn partial(
    response: &Response<Incoming>,
    if_range: Option<&str>,
    size: u64,
    sink: &mut Sink,
) -> Result<Accepted, Failure> {
    let offset = sink.offset();
    let headers = response.headers();
    if offset > 0 && !if_range.is_some_and(|v| same_version(headers, v)) {
        tracing::warn!(
            job = sink.job(),
            offset,
            asked = if_range.unwrap_or("nothing"),
            "a 206 of another version than the one asked for; not spliced"
        );
        sink.restart(None).await?;
        return Ok(Accepted::WholeFile);
    }
    let (start, total) = headers
        .get(header::CONTENT_RANGE)
        .and_then(content_range)
        .ok_or_else(|| transfer("206 without a valid Content-Range".into(), true))?;
    if total != size {
        return Err(size_mismatch(total, size));
    }
    if start != offset {
        return Err(transfer(
            format!("asked for byte {offset}, the server sent from {start}"),
            true,
        ));
    }
    if offset == 0 {
        sink.set_validator(validator_of(headers));
    }
    Ok(Accepted::Body)
}

/// The body into the sink, each frame within `idle` of the last.
async fn stream(mut body: Incoming, idle: Duration, sink: &mut Sink) -> Result<(), Failure> {
    loop {
        let frame = match timeout(idle, body.frame()).await {
            Err(_) => return Err(no_data(idle, sink.offset())),
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => {
                return Err(transfer(
                    format!("connection lost at byte {}: {e}", sink.offset()),
                    true,
                ))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            sink.write(data).await?;
        }
    }
}

/// May the fetch follow a redirect from `from` to `to`? Only to http or
/// https, never from https down to http, and only to the request's own host
/// (`origin`) or a host in `allow` (normalised hosts, `--redirect-allow`).
fn check_redirect(
    from: &url::Url,
    to: &url::Url,
    origin: Option<&str>,
    allow: &[String],
) -> Result<(), Failure> {
    if !matches!(to.scheme(), "http" | "https") {
        return Err(transfer(
            format!("redirect to a {} URL refused", to.scheme()),
            false,
        ));
    }
    if from.scheme() == "https" && to.scheme() == "http" {
        return Err(transfer(
            "redirect from https down to http refused".into(),
            false,
        ));
    }
    let host = host_of(to);
    let allowed = host.as_deref() == origin
        || host
            .as_deref()
            .is_some_and(|h| allow.iter().any(|a| a == h));
    if !allowed {
        return Err(transfer(
            format!(
                "redirect to another host ({}) refused: not in --redirect-allow",
                host.as_deref().or(to.host_str()).unwrap_or("?")
            ),
            false,
        ));
    }
    Ok(())
}

fn host_port(url: &url::Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or("?"),
        url.port_or_known_default().unwrap_or(0)
    )
}

/// An error and its causes, one line (hyper's outer errors say little).
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

impl HttpFetcher {
    /// GET `url` (the image's neighbour) with the image's credentials and
    /// redirect rules, whole, into memory: at most `limit` bytes.
    async fn fetch_small_inner(
        &self,
        job: &FetchJob,
        url: &str,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, Failure> {
        let mut small = job.clone();
        small.source.url = url.to_string();
        let response = self.follow(&small, &(0, None)).await?;
        let status = response.status();
        match status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::GONE => return Ok(None),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(Failure::new(
                    result_no::AUTH,
                    format!("the server refused the credentials ({status})"),
                    false,
                ))
            }
            s => {
                return Err(transfer(
                    format!("the server answered {s}"),
                    s.is_server_error(),
                ))
            }
        }
        let idle = job.transfer.idle_timeout;
        let mut body = response.into_body();
        let mut out = Vec::new();
        loop {
            let frame = match timeout(idle, body.frame()).await {
                Err(_) => return Err(no_data(idle, out.len() as u64)),
                Ok(None) => return Ok(Some(out)),
                Ok(Some(Err(e))) => {
                    return Err(transfer(
                        format!("connection lost at byte {}: {e}", out.len()),
                        true,
                    ))
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > limit {
                    return Err(transfer(
                        format!("larger than {limit} bytes: not a signature file"),
                        false,
                    ));
                }
                out.extend_from_slice(&data);
            }
        }
    }
}

impl Fetcher for HttpFetcher {
    fn fetch<'a>(
        &'a self,
        job: &'a FetchJob,
        sink: &'a mut Sink,
    ) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(self.fetch_inner(job, sink))
    }

    fn fetch_small<'a>(
        &'a self,
        job: &'a FetchJob,
        url: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, Failure>> {
        Box::pin(self.fetch_small_inner(job, url, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        let v = HeaderValue::from_static("bytes 100-199/1000");
        assert_eq!(content_range(&v), Some((100, 1000)));
        assert_eq!(
            content_range(&HeaderValue::from_static("bytes */1000")),
            None
        );
    }

    #[test]
    fn redirects_go_to_the_same_host_or_an_allowed_one_only() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        let allow = vec!["mirror.example".to_string(), "::1".to_string()];
        let ok = |from: &str, to: &str| {
            let from = u(from);
            check_redirect(&from, &u(to), host_of(&from).as_deref(), &allow)
                .map_err(|f| (f.error_no, f.retryable))
        };
        assert_eq!(ok("http://127.0.0.1:8/a", "http://127.0.0.1:9/b"), Ok(()));
        assert_eq!(ok("http://h.example/a", "https://H.example./b"), Ok(()));
        assert_eq!(ok("http://h.example/a", "http://mirror.example/b"), Ok(()));
        assert_eq!(ok("http://h.example/a", "http://[::1]:8/b"), Ok(()));
        let refused = Err((result_no::TRANSFER, false));
        assert_eq!(ok("http://127.0.0.1/a", "http://127.0.0.2/b"), refused);
        assert_eq!(ok("http://127.0.0.1/a", "http://localhost/b"), refused);
        assert_eq!(ok("https://h.example/a", "http://h.example/b"), refused);
        assert_eq!(ok("http://h.example/a", "ftp://h.example/b"), refused);
        assert_eq!(ok("http://h.example/a", "file:///etc/passwd"), refused);
    }

    #[test]
    fn a_206_is_of_the_version_asked_for_only_with_that_validator() {
        let date = "Mon, 01 Jan 2024 00:00:00 GMT";
        let headers = |pairs: &[(header::HeaderName, &'static str)]| {
            let mut h = hyper::HeaderMap::new();
            for (name, value) in pairs {
                h.insert(name.clone(), HeaderValue::from_static(value));
            }
            h
        };
        let etag = headers(&[(header::ETAG, "\"v1\""), (header::LAST_MODIFIED, date)]);
        assert!(same_version(&etag, "\"v1\""));
        assert!(!same_version(&etag, "\"v2\""));
        assert!(
            same_version(&etag, date),
            "a date is matched on Last-Modified"
        );
        assert!(!same_version(&headers(&[]), "\"v1\""), "none is no match");
        assert!(!same_version(&headers(&[]), date));
        let weak = headers(&[(header::ETAG, "W/\"v1\"")]);
        assert!(!same_version(&weak, "\"v1\""), "a weak ETag is no match");
        assert!(!same_version(&weak, "W/\"v1\""));
        let other_date = headers(&[(header::LAST_MODIFIED, "Tue, 02 Jan 2024 00:00:00 GMT")]);
        assert!(!same_version(&other_date, date));
        assert!(!same_version(&other_date, "\"v1\""));
    }

    #[test]
    fn credentials_go_to_the_same_scheme_host_and_port_only() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        let origin = u("http://fwuser@Firmware.Example:80/fw/image.bin");
        for same in [
            "http://firmware.example/other",
            "http://FIRMWARE.example.:80/fw/image.bin?x",
        ] {
            assert!(same_origin(&u(same), &origin), "{same}");
        }
        for other in [
            "http://firmware.example:8080/fw/image.bin",
            "https://firmware.example/fw/image.bin",
            "https://firmware.example:80/fw/image.bin",
            "http://mirror.example/fw/image.bin",
        ] {
            assert!(!same_origin(&u(other), &origin), "{other}");
        }
    }

    #[test]
    fn the_rustls_error_is_found_inside_io_errors() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("client error (Connect)")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let refused = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        // As hyper-rustls hands it over: tokio-rustls' io::Error in another.
        let e = Outer(std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            refused.clone(),
        )));
        assert_eq!(tls_error(&e), Some(&refused));
        assert_eq!(
            refused.to_string(),
            "invalid peer certificate: UnknownIssuer"
        );
        let refused_tcp = Outer(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(tls_error(&refused_tcp), None);
    }

    #[test]
    fn weak_etags_are_not_validators() {
        let mut h = hyper::HeaderMap::new();
        h.insert(header::ETAG, HeaderValue::from_static("W/\"abc\""));
        h.insert(
            header::LAST_MODIFIED,
            HeaderValue::from_static("Mon, 01 Jan 2024 00:00:00 GMT"),
        );
        assert_eq!(
            validator_of(&h).as_deref(),
            Some("Mon, 01 Jan 2024 00:00:00 GMT")
        );
        h.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        assert_eq!(validator_of(&h).as_deref(), Some("\"abc\""));
    }
}
