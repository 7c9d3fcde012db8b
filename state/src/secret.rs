//! A credential that never prints: `Debug` and `Display` show `<redacted>`.
//!
//! The plain text is reachable only through [`Secret::expose`], so every place
//! that handles a user name, password or `passPort` in clear is easy to find.
//! Serialisation writes the plain text (the store needs it to resume), which is
//! why the store lives in a 0700 directory and no CLI shape serialises a `Secret`.
//! [`Redactor`] puts `<redacted>` over secrets in free text (what servers and
//! commands say) before the state machine stores or reports it.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Secret(text.into())
    }

    /// The plain text. Call only where the credential is used, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Puts `<redacted>` over every occurrence of some secrets in free text
/// (an error a server sent back, a command's last line of output).
/// Secrets shorter than three characters are left alone: replacing every
/// `a` would garble the text without protecting anything.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    /// Longest first, so a secret containing another is replaced whole.
    secrets: Vec<String>,
}

impl Redactor {
    pub const REDACTED: &'static str = "<redacted>";
    const MIN_LEN: usize = 3;

    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a Secret>) -> Self {
        let mut secrets: Vec<String> = secrets
            .into_iter()
            .map(|s| s.expose().to_string())
            .filter(|s| s.chars().count() >= Self::MIN_LEN)
            .collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor { secrets }
    }

    /// One pass, left to right, the longest secret first at each place: a
    /// secret inside another, or inside the marker, is not replaced twice.
    pub fn text(&self, text: &str) -> String {
        if self.secrets.is_empty() {
            return text.to_string();
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            match self.secrets.iter().find(|s| rest.starts_with(s.as_str())) {
                Some(secret) => {
                    out.push_str(Self::REDACTED);
                    rest = &rest[secret.len()..];
                }
                None => {
                    out.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{s}"), "<redacted>");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn the_redactor_covers_long_secrets_whole_and_leaves_short_ones() {
        let (user, pass, short) = (
            Secret::new("uftp"),
            Secret::new("uftp-echo123"),
            Secret::new("ab"),
        );
        let r = Redactor::new([&user, &pass, &short]);
        assert_eq!(
            r.text("530 user uftp, password uftp-echo123, tab"),
            "530 user <redacted>, password <redacted>, tab"
        );
        assert_eq!(Redactor::default().text("as is"), "as is");
        // Neither a secret inside a longer one nor one inside the marker is
        // replaced again.
        let (long, inner, marker) = (
            Secret::new("secret-act"),
            Secret::new("act"),
            Secret::new("red"),
        );
        let r = Redactor::new([&inner, &long, &marker]);
        assert_eq!(r.text("x secret-act y act"), "x <redacted> y <redacted>");
        assert_eq!(r.text("ünï act ü"), "ünï <redacted> ü");
    }
}
