//! The wire protocol of spec/PROTOCOL.md: JSON text in, typed values out, and
//! back.
//!
//! - [`parse`]: [`parse_request`] turns one request's bytes into an
//!   [`Incoming`](fwagent_state::Incoming): a validated
//!   [`UpgradeRequest`](fwagent_state::UpgradeRequest), or the rejection
//!   [`Ack`](fwagent_state::Ack) it gets (errorNo 1–5, [`Rejection`]).
//! - [`credentials`]: `userName` and `password` from base64, through the
//!   credentials decoder ([`crate::exec`]) when they are not text.
//! - [`url`](mod@self::url): the host, path and file-name rules,
//!   [`normalize_host`], [`host_of`], and [`build_url`], which makes the
//!   firmware's URL from the request's parts.
//! - [`render`](mod@render): [`render`](fn@render) and [`render_ack`] turn
//!   what the agent says into one JSON line, [`ack_operator`] is an ack's
//!   operator; [`explain`] shows a parsed request with its credentials
//!   redacted.
//!
//! The limits below are the ones docs/SECURITY.md lists. Rules that
//! PROTOCOL.md leaves open (length limits, where `passPort` may sit, the
//! credentials decoder's contract) are written down in docs/PROTOCOL-NOTES.md.
//! Nothing here logs, and no error description ever carries a decoded
//! credential, a `passPort` or a host's user info.

pub mod credentials;
pub mod parse;
pub mod render;
pub mod url;

#[cfg(test)]
mod fixtures;

pub use self::url::{
    build_url, host_of, normalize_host, HostError, NameError, PathError, UrlError,
};
pub use credentials::DecoderError;
pub use parse::{parse_request, Rejection};
pub use render::{ack_operator, explain, render, render_ack};

use fwagent_state::Redactor;
use std::time::Duration;

/// Requests larger than this are refused with errorNo 1 without being parsed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The largest `--max-request-bytes` accepted (well inside the 1 MiB MQTT
/// packet limit of the transport).
pub const MAX_REQUEST_BYTES_CEILING: usize = 512 << 10;
/// The largest image accepted when [`ParseOptions::max_image_size`] is `None`:
/// 1 GiB, far above any gateway firmware and low enough that a typo in the
/// cloud (an extra digit) is refused before it fills the disk.
pub const DEFAULT_MAX_IMAGE_SIZE: u64 = 1 << 30;
/// The longest `sessionId` or `messageId` accepted, in bytes (errorNo 4 beyond).
pub const MAX_ID_BYTES: usize = 256;
/// The longest operator echoed in an ack; a longer one is answered as `unknown-Ack`.
pub const MAX_OPERATOR_BYTES: usize = 256;
/// The longest `firmwareName`, in bytes after trimming (a file name limit).
pub const MAX_FIRMWARE_NAME_BYTES: usize = 255;
/// The longest `path`, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// The longest `userName` or `password`, in bytes of base64 text.
pub const MAX_CREDENTIAL_BYTES: usize = 1024;
/// The longest `passPort`, in bytes.
pub const MAX_PASS_PORT_BYTES: usize = 1024;
/// How long the credentials decoder may run before it is killed (errorNo 4).
pub const DECODER_TIMEOUT: Duration = Duration::from_secs(5);
/// The most the credentials decoder may print, in bytes (errorNo 4 beyond).
pub const MAX_DECODER_OUTPUT_BYTES: usize = 4096;
/// The environment variable that tells the decoder which field it decodes
/// (`userName` or `password`).
pub const DECODER_FIELD_ENV: &str = "FWAGENT_CREDENTIAL_FIELD";
/// What [`explain`] shows instead of a credential or a `passPort`: the one
/// marker of the state crate's [`Redactor`].
pub const REDACTED: &str = Redactor::REDACTED;
/// The ack's operator (before `-Ack`) when the request's cannot be read.
pub const UNKNOWN_OPERATOR: &str = "unknown";

/// How [`parse_request`] treats the parts that depend on the device.
#[derive(Clone, Debug, Default)]
pub struct ParseOptions {
    /// Larger images are refused with errorNo 4; `None` means
    /// [`DEFAULT_MAX_IMAGE_SIZE`].
    pub max_image_size: Option<u64>,
    /// A shell command (`sh -c CMD`) that turns a credential whose base64
    /// does not decode to text into the plain credential; see
    /// docs/PROTOCOL-NOTES.md for its contract.
    pub credentials_decoder: Option<String>,
    /// Larger requests are refused as malformed (errorNo 1); `None` means
    /// [`MAX_REQUEST_BYTES`]. Capped at [`MAX_REQUEST_BYTES_CEILING`].
    pub max_request_bytes: Option<usize>,
    /// Longer `sessionId`/`messageId` are refused (errorNo 4); `None` means
    /// [`MAX_ID_BYTES`].
    pub max_id_bytes: Option<usize>,
}

impl ParseOptions {
    /// The effective maximum image size in bytes.
    pub fn max_image_size(&self) -> u64 {
        self.max_image_size.unwrap_or(DEFAULT_MAX_IMAGE_SIZE)
    }

    /// The effective maximum request size in bytes.
    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
            .unwrap_or(MAX_REQUEST_BYTES)
            .min(MAX_REQUEST_BYTES_CEILING)
    }

    /// The effective maximum id length in bytes.
    pub fn max_id_bytes(&self) -> usize {
        self.max_id_bytes.unwrap_or(MAX_ID_BYTES)
    }
}

/// `s` quoted for a description, cut to 64 characters.
fn shown(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut:?}...")
    }
}
