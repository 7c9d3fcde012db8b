//! Hosts, paths, file names and URLs: the rules of docs/PROTOCOL-NOTES.md
//! for what a request may name, [`normalize_host`] (also for
//! `--redirect-allow` and for comparing a redirect's host, [`host_of`]), and
//! [`build_url`], which makes the firmware's URL from the request's parts.
//! Each rule has a typed error whose `Display` is the description the ack
//! carries after the field's path; a refused host's user info is never shown.

use super::{shown, MAX_FIRMWARE_NAME_BYTES, MAX_PATH_BYTES, REDACTED};
use fwagent_state::Protocol;
use std::net::{Ipv4Addr, Ipv6Addr};
use url::Url;

/// Why a host is refused ([`normalize_host`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty")]
    Empty,
    #[error("longer than 255 bytes")]
    TooLong,
    /// Holds the host quoted, cut, its user info redacted.
    #[error("{0}: not a valid IPv6 address")]
    NotIpv6(String),
    /// Holds the host quoted, cut, its user info redacted.
    #[error("{0}: not a valid domain name or IP address")]
    NotAHost(String),
}

/// Why a path is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("contains control characters")]
    ControlCharacters,
    #[error("contains a `.` or `..` segment")]
    DotSegment,
}

/// Why a firmware name is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty")]
    Empty,
    #[error("longer than {MAX_FIRMWARE_NAME_BYTES} bytes")]
    TooLong,
    /// `.` or `..`.
    #[error("{0:?} is not a file name")]
    Dots(String),
    /// Holds the name as shown.
    #[error("{0}: a plain file name has no `/` or `\\`")]
    Separator(String),
    #[error("contains control characters")]
    ControlCharacters,
}

/// Why [`build_url`] cannot make a URL from its parts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("host: {0}")]
    Host(#[from] HostError),
    #[error("port 0 is not a valid port")]
    Port,
    #[error("path: {0}")]
    Path(#[from] PathError),
    #[error("firmware name: {0}")]
    FirmwareName(#[from] NameError),
    #[error("cannot build the URL: {0}")]
    Url(#[from] url::ParseError),
}

/// A refused host for a description: [`shown`], with anything up to its
/// last `@` (a user, a password) replaced by `<redacted>`.
fn shown_host(s: &str) -> String {
    match s.rsplit_once('@') {
        Some((_, host)) => shown(&format!("{REDACTED}@{host}")),
        None => shown(s),
    }
}

/// A host as the request gives it, normalised: an IPv4 literal as dotted
/// quad, an IPv6 literal without brackets (`[::1]` and `::1` both give `::1`),
/// a domain name lowercased and in its ASCII (punycode) form, without a
/// trailing dot. Domain labels are 1..=63 letters, digits, `-` (not first or
/// last) and `_`; the name is at most 253 bytes and its last label is not all
/// digits (`1.2.3` is neither an address nor a name). Anything else (a port, a
/// user, a scheme, white space inside) is refused.
pub fn normalize_host(raw: &str) -> Result<String, HostError> {
    let s = raw.trim();
    if s.is_empty() {
        return Err(HostError::Empty);
    }
    if s.len() > 255 {
        return Err(HostError::TooLong);
    }
    if let Some(inner) = s.strip_prefix('[') {
        return match inner.strip_suffix(']').map(str::parse::<Ipv6Addr>) {
            Some(Ok(ip)) => Ok(ip.to_string()),
            _ => Err(HostError::NotIpv6(shown_host(s))),
        };
    }
    if let Ok(ip) = s.parse::<Ipv6Addr>() {
        return Ok(ip.to_string());
    }
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok(ip.to_string());
    }
    let domain = if s.is_ascii() {
        s.to_ascii_lowercase()
    } else if s.contains('%') {
        return Err(HostError::NotAHost(shown_host(s)));
    } else {
        match url::Host::parse(s) {
            Ok(url::Host::Domain(d)) => d,
            _ => return Err(HostError::NotAHost(shown_host(s))),
        }
    };
    let domain = domain.strip_suffix('.').unwrap_or(&domain);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let last_numeric = domain
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if domain.len() > 253 || !domain.split('.').all(label_ok) || last_numeric {
        return Err(HostError::NotAHost(shown_host(s)));
    }
    Ok(domain.to_string())
}

/// The directory's segments: empty segments (doubled, leading or trailing
/// `/`) dropped. Refuses control characters and `.`/`..` segments.
pub(super) fn path_segments(path: &str) -> Result<Vec<&str>, PathError> {
    let path = path.trim();
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    if path.chars().any(char::is_control) {
        return Err(PathError::ControlCharacters);
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err(PathError::DotSegment);
    }
    Ok(segments)
}

/// A plain file name: not empty, at most 255 bytes, no `/`, `\`, NUL or other
/// control characters, not `.` or `..`. The caller trims.
pub(super) fn check_file_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        Err(NameError::Empty)
    } else if name.len() > MAX_FIRMWARE_NAME_BYTES {
        Err(NameError::TooLong)
    } else if name == "." || name == ".." {
        Err(NameError::Dots(name.to_string()))
    } else if name.contains(['/', '\\']) {
        Err(NameError::Separator(shown(name)))
    } else if name.chars().any(char::is_control) {
        Err(NameError::ControlCharacters)
    } else {
        Ok(())
    }
}

/// The firmware's URL: `protocol://host:port` + `path` + `/` + the file name,
/// with exactly one `/` between segments. If the path's last non-empty segment
/// already is the file name, the path names the file itself. Every path
/// character is literal: what a URL path cannot carry (space, `#`, `?`, `%`,
/// non-ASCII...) is percent-encoded. An IPv6 host is bracketed; a default port
/// (80 for http, 443 for https, 21 for ftp) is left out, as the `url` crate
/// normalises it. The URL never has user info: credentials travel apart.
pub fn build_url(
    protocol: Protocol,
    host: &str,
    port: u16,
    path: &str,
    firmware_name: &str,
) -> Result<String, UrlError> {
    let host = normalize_host(host)?;
    if port == 0 {
        return Err(UrlError::Port);
    }
    let segments = path_segments(path)?;
    let name = firmware_name.trim();
    check_file_name(name)?;
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut url = Url::parse(&format!("{protocol}://{authority}/"))?;
    {
        let mut out = url
            .path_segments_mut()
            .map_err(|()| UrlError::Url(url::ParseError::RelativeUrlWithCannotBeABaseBase))?;
        out.clear();
        out.extend(&segments);
        if segments.last() != Some(&name) {
            out.push(name);
        }
    }
    Ok(url.into())
}

/// A URL's host as [`normalize_host`] writes hosts (IPv6 without brackets,
/// names lowercase, no trailing dot); `None` when it has none, or one that
/// [`normalize_host`] refuses.
pub fn host_of(url: &Url) -> Option<String> {
    normalize_host(url.host_str()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::fixtures::*;
    use crate::protocol::MAX_PATH_BYTES;
    use fwagent_state::ack_no::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn hosts_must_be_names_or_addresses() {
        for (host, want) in [
            ("localhost", "localhost"),
            ("Firmware.Example.COM", "firmware.example.com"),
            ("fw.example.com.", "fw.example.com"),
            ("my_server", "my_server"),
            ("a-b.c0", "a-b.c0"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("[0:0:0:0:0:0:0:1]", "::1"),
            ("10.0.0.1", "10.0.0.1"),
            ("bücher.example", "xn--bcher-kva.example"),
        ] {
            let r = valid(parse(&set(seed1(), "/info/serverConfig/host", json!(host))));
            assert_eq!(r.source.host, want, "{host}");
        }
        let label64 = format!("{}.com", "a".repeat(64));
        let long_name = vec!["abcdefghi"; 26].join(".");
        for bad in [
            "",
            "  ",
            "bad host",
            "a/b",
            "127.0.0.1:21",
            "ftp://127.0.0.1",
            "user@127.0.0.1",
            "1.2.3",
            "256.1.1.1",
            "123",
            "0x7f.1",
            "-a.com",
            "a-.com",
            "a..com",
            ".com",
            "[::1",
            "[127.0.0.1]",
            "fe80::1%eth0",
            "ex%61mple.com",
            "bü%61.example",
            "a\u{0}b",
            label64.as_str(),
            long_name.as_str(),
        ] {
            assert_rejects(
                &set(seed1(), "/info/serverConfig/host", json!(bad)),
                INVALID_FIELD,
                "info.serverConfig.host",
            );
        }
        assert_rejects(
            &set(seed1(), "/info/serverConfig/host", json!(["127.0.0.1"])),
            INVALID_FIELD,
            "info.serverConfig.host",
        );
    }

    #[test]
    fn a_refused_host_never_shows_its_user_info() {
        for host in [
            "uftp@127.0.0.1",
            "ftp://uftp:echo123@127.0.0.1",
            "uftp:echo123@127.0.0.1:21",
            "[uftp:echo123@::1]",
        ] {
            let ack = assert_rejects(
                &set(seed1(), "/info/serverConfig/host", json!(host)),
                INVALID_FIELD,
                "info.serverConfig.host",
            );
            let said = &ack.result.description;
            assert!(
                !said.contains("uftp") && !said.contains("echo123"),
                "{said}"
            );
            assert!(said.contains("\"<redacted>@"), "{said}");
        }
        assert_eq!(
            normalize_host("me@fw.example:21").map_err(|e| e.to_string()),
            Err("\"<redacted>@fw.example:21\": not a valid domain name or IP address".into())
        );
    }

    #[test]
    fn the_typed_errors_say_what_the_strings_said() {
        let said = |r: Result<String, HostError>| r.map_err(|e| e.to_string());
        assert_eq!(said(normalize_host(" ")), Err("empty".into()));
        assert_eq!(
            said(normalize_host(&"a".repeat(256))),
            Err("longer than 255 bytes".into())
        );
        assert_eq!(
            said(normalize_host("[::1")),
            Err("\"[::1\": not a valid IPv6 address".into())
        );
        assert_eq!(
            said(normalize_host("1.2.3")),
            Err("\"1.2.3\": not a valid domain name or IP address".into())
        );
        let path = |p: &str| path_segments(p).map_err(|e| e.to_string()).err();
        assert_eq!(
            path("/a/../b").as_deref(),
            Some("contains a `.` or `..` segment")
        );
        assert_eq!(
            path("/a\nb").as_deref(),
            Some("contains control characters")
        );
        assert_eq!(
            path(&"/".repeat(MAX_PATH_BYTES + 1)).as_deref(),
            Some("longer than 4096 bytes")
        );
        let name = |n: &str| check_file_name(n).map_err(|e| e.to_string()).err();
        assert_eq!(name("").as_deref(), Some("empty"));
        assert_eq!(name("..").as_deref(), Some("\"..\" is not a file name"));
        assert_eq!(
            name("a/b").as_deref(),
            Some("\"a/b\": a plain file name has no `/` or `\\`")
        );
        assert_eq!(
            name(&"n".repeat(256)).as_deref(),
            Some("longer than 255 bytes")
        );
        assert_eq!(
            name("a\u{1}").as_deref(),
            Some("contains control characters")
        );
        let ack = rejected(parse(&set(
            seed1(),
            "/info/serverConfig/path",
            json!("/a/../b"),
        )));
        assert_eq!(
            ack.result.description,
            "invalid field info.serverConfig.path: contains a `.` or `..` segment"
        );
        assert_eq!(
            UrlError::from(PathError::DotSegment).to_string(),
            "path: contains a `.` or `..` segment"
        );
    }

    #[test]
    fn host_of_writes_a_url_host_as_normalize_host_does() {
        let h = |s: &str| host_of(&Url::parse(s).expect("a URL"));
        assert_eq!(h("http://[::1]:8/x").as_deref(), Some("::1"));
        assert_eq!(h("http://H.Example./x").as_deref(), Some("h.example"));
        assert_eq!(h("https://127.0.0.1/x").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            h("http://bücher.example/").as_deref(),
            Some("xn--bcher-kva.example")
        );
        assert_eq!(h("file:///etc/passwd"), None);
    }

    #[test]
    fn paths_refuse_dot_segments_and_control_characters() {
        for bad in [
            json!("/download/../etc/"),
            json!("/download/./x"),
            json!(".."),
            json!("/a\u{7}b/"),
            json!("/a\nb/"),
            json!("/".repeat(MAX_PATH_BYTES + 1)),
            json!(5),
        ] {
            assert_rejects(
                &set(seed1(), "/info/serverConfig/path", bad),
                INVALID_FIELD,
                "info.serverConfig.path",
            );
        }
        for ok in ["", "/", "download", "/a/.../b/", "/..a/b../"] {
            valid(parse(&set(seed1(), "/info/serverConfig/path", json!(ok))));
        }
    }

    #[test]
    fn firmware_names_are_trimmed_plain_file_names() {
        let r = valid(parse(&set(
            seed1(),
            "/info/fileInfo/firmwareName",
            json!("\t fw 1.bin \n"),
        )));
        assert_eq!(r.firmware.name, "fw 1.bin");
        let longest = "n".repeat(MAX_FIRMWARE_NAME_BYTES);
        valid(parse(&set(
            seed1(),
            "/info/fileInfo/firmwareName",
            json!(longest),
        )));
        for bad in [
            json!(""),
            json!("   "),
            json!("."),
            json!(".."),
            json!(" .. "),
            json!("dir/fw.bin"),
            json!("/fw.bin"),
            json!("dir\\fw.bin"),
            json!("fw\u{0}.bin"),
            json!("fw\u{1b}.bin"),
            json!("n".repeat(MAX_FIRMWARE_NAME_BYTES + 1)),
            json!(12),
        ] {
            assert_rejects(
                &set(seed1(), "/info/fileInfo/firmwareName", bad),
                INVALID_FIELD,
                "info.fileInfo.firmwareName",
            );
        }
    }

    // --- URLs -----------------------------------------------------------------------

    #[test]
    fn urls_join_path_and_name_with_one_slash() {
        let u = |path: &str| build_url(Protocol::Http, "127.0.0.1", 8080, path, "fw.bin");
        for path in ["/dl/", "/dl", "dl", "dl/", "//dl//", "/dl/ "] {
            assert_eq!(
                u(path).as_deref(),
                Ok("http://127.0.0.1:8080/dl/fw.bin"),
                "{path:?}"
            );
        }
        for path in ["", "/", "//"] {
            assert_eq!(
                u(path).as_deref(),
                Ok("http://127.0.0.1:8080/fw.bin"),
                "{path:?}"
            );
        }
        assert_eq!(
            u("/a//b/c/").as_deref(),
            Ok("http://127.0.0.1:8080/a/b/c/fw.bin")
        );
    }

    #[test]
    fn a_path_ending_in_the_name_is_the_file_itself() {
        let u = |path: &str| build_url(Protocol::Ftp, "localhost", 2121, path, " fw.bin ");
        assert_eq!(
            u("/dl/fw.bin").as_deref(),
            Ok("ftp://localhost:2121/dl/fw.bin")
        );
        assert_eq!(
            u("/dl/fw.bin/").as_deref(),
            Ok("ftp://localhost:2121/dl/fw.bin")
        );
        assert_eq!(
            u("/fw.bin/dl").as_deref(),
            Ok("ftp://localhost:2121/fw.bin/dl/fw.bin")
        );
        let v = set(
            seed1(),
            "/info/serverConfig/path",
            json!("/download/DAP-2020SSA_V1.3.2_20200702.bin"),
        );
        assert_eq!(
            valid(parse(&v)).source.url,
            "ftp://127.0.0.1/download/DAP-2020SSA_V1.3.2_20200702.bin"
        );
    }

    #[test]
    fn urls_bracket_ipv6_hosts() {
        for host in ["::1", "[::1]", " ::1 "] {
            assert_eq!(
                build_url(Protocol::Http, host, 8080, "/x/", "fw.bin").as_deref(),
                Ok("http://[::1]:8080/x/fw.bin")
            );
        }
        assert_eq!(
            build_url(Protocol::Ftps, "fe80::1:2", 990, "/x", "fw.bin").as_deref(),
            Ok("ftps://[fe80::1:2]:990/x/fw.bin")
        );
        let v = set(seed1(), "/info/serverConfig/host", json!("::1"));
        let r = valid(parse(&set(v, "/info/serverConfig/port", json!(2121))));
        assert_eq!(r.source.host, "::1");
        assert!(r.source.url.starts_with("ftp://[::1]:2121/download/"));
    }

    #[test]
    fn urls_percent_encode_what_they_must() {
        let url = build_url(
            Protocol::Http,
            "localhost",
            8000,
            "/my dir/ü/100%/a?b#c/",
            "fw #1?v=2%.bin",
        )
        .expect("a valid URL");
        assert_eq!(
            url,
            "http://localhost:8000/my%20dir/%C3%BC/100%25/a%3Fb%23c/fw%20%231%3Fv=2%25.bin"
        );
        let parsed = Url::parse(&url).expect("parses back");
        assert_eq!(parsed.query(), None);
        assert_eq!(parsed.fragment(), None);
        assert_eq!(parsed.path_segments().map(|s| s.count()), Some(5));
        // A backslash is a separator in http URLs: it must be encoded too.
        assert_eq!(
            build_url(Protocol::Http, "localhost", 8000, "/a\\b/", "fw.bin").as_deref(),
            Ok("http://localhost:8000/a%5Cb/fw.bin")
        );
    }

    #[test]
    fn urls_drop_default_ports_and_keep_others() {
        let u = |p, port| build_url(p, "127.0.0.1", port, "/", "f");
        assert_eq!(u(Protocol::Http, 80).as_deref(), Ok("http://127.0.0.1/f"));
        assert_eq!(
            u(Protocol::Https, 443).as_deref(),
            Ok("https://127.0.0.1/f")
        );
        assert_eq!(u(Protocol::Ftp, 21).as_deref(), Ok("ftp://127.0.0.1/f"));
        assert_eq!(
            u(Protocol::Ftp, 2121).as_deref(),
            Ok("ftp://127.0.0.1:2121/f")
        );
        assert_eq!(
            u(Protocol::Https, 8443).as_deref(),
            Ok("https://127.0.0.1:8443/f")
        );
        assert_eq!(
            u(Protocol::Ftps, 990).as_deref(),
            Ok("ftps://127.0.0.1:990/f")
        );
    }

    #[test]
    fn build_url_refuses_bad_parts_and_never_carries_user_info() {
        assert!(matches!(
            build_url(Protocol::Http, "user:pw@127.0.0.1", 80, "/", "f"),
            Err(UrlError::Host(_))
        ));
        assert!(matches!(
            build_url(Protocol::Http, "127.0.0.1", 0, "/", "f"),
            Err(UrlError::Port)
        ));
        assert!(matches!(
            build_url(Protocol::Http, "127.0.0.1", 80, "/../", "f"),
            Err(UrlError::Path(_))
        ));
        assert!(matches!(
            build_url(Protocol::Http, "127.0.0.1", 80, "/", "a/f"),
            Err(UrlError::FirmwareName(_))
        ));
        let r = valid(parse(&seed1()));
        let url = Url::parse(&r.source.url).expect("a URL");
        assert_eq!(url.username(), "");
        assert_eq!(url.password(), None);
        assert!(!r.source.url.contains("uftp"));
    }

    proptest! {
        #[test]
        fn any_plain_path_and_name_give_a_url_ending_in_the_name(
            path in "[ -~]{0,40}",
            name in "[^/\\\\\\p{Cc}]{1,40}",
            port in 1u16..,
        ) {
            prop_assume!(!matches!(name.trim(), "" | "." | ".."));
            prop_assume!(path.trim().split('/').all(|s| s != "." && s != ".."));
            let url = build_url(Protocol::Https, "fw.example", port, &path, &name)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let parsed = Url::parse(&url).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let origin = if port == 443 {
                "https://fw.example/".to_string()
            } else {
                format!("https://fw.example:{port}/")
            };
            prop_assert!(url.starts_with(&origin), "{} does not start with {}", url, origin);
            prop_assert_eq!(parsed.query(), None);
            prop_assert_eq!(parsed.fragment(), None);
            prop_assert!(!parsed.path().contains("//"));
            let last = parsed.path_segments().and_then(|mut s| s.next_back()).unwrap_or_default();
            let decoded = percent_decode(last);
            prop_assert_eq!(decoded, name.trim());
        }
    }

    /// `%XX` sequences back to bytes (a test's own inverse of the encoding).
    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex
                .filter(|_| b[i] == b'%')
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(byte) => {
                    out.push(byte);
                    i += 3;
                }
                None => {
                    out.push(b[i]);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
