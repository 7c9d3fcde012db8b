//! How the inspection commands show an upgrade to a person: the human
//! rendering of the JSON views in [`crate::views`] (which the control socket
//! sends and the CLI builds itself when it reads the store).
//!
//! The renderings take `now` as an argument (tests pin it) and a [`Paint`]
//! that adds colour only on a terminal without `NO_COLOR`. Times are shown
//! in UTC, absolute and relative; sizes and rates in binary units.

use crate::views::{DetailView, JobView, OutboxView};
use fwagent_state::{Outcome, PhaseName, OP_PROGRESS, OP_RESULT};
use indicatif::HumanBytes;
use std::fmt::Write as _;
use std::io::IsTerminal;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

// ---- human units --------------------------------------------------------------

/// `2024-05-01 12:01:02 UTC`.
pub fn abs_time(t: OffsetDateTime) -> String {
    let fmt = format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    t.to_offset(UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_else(|_| t.to_string())
}

/// `2024-05-01 12:01:02.345 UTC`, for log lines a few milliseconds apart.
pub fn abs_time_ms(t: OffsetDateTime) -> String {
    let fmt = format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3] UTC"
    );
    t.to_offset(UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_else(|_| t.to_string())
}

/// `just now`, `12 s ago`, `3 min ago`, `in 5 s` (a clock ahead of ours).
pub fn ago(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let secs = (now - t).whole_seconds();
    if secs < 0 {
        format!("in {}", span(secs.unsigned_abs()))
    } else if secs < 2 {
        "just now".to_string()
    } else {
        format!("{} ago", span(secs.unsigned_abs()))
    }
}

/// Both: `2024-05-01 12:01:02 UTC (3 min ago)`.
pub fn when(t: OffsetDateTime, now: OffsetDateTime) -> String {
    format!("{} ({})", abs_time(t), ago(t, now))
}

/// A length of time in at most two units: `45 s`, `3 min 12 s`, `2 h 5 min`, `3 d 4 h`.
pub fn span(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s} s"),
        (0, 0, _) if s == 0 => format!("{m} min"),
        (0, 0, _) => format!("{m} min {s} s"),
        (0, _, _) if m == 0 => format!("{h} h"),
        (0, _, _) => format!("{h} h {m} min"),
        _ if h == 0 => format!("{d} d"),
        _ => format!("{d} d {h} h"),
    }
}

/// `64.00 MiB`.
pub fn bytes(n: u64) -> String {
    HumanBytes(n).to_string()
}

/// `1.00 MiB/s`.
pub fn rate(bytes_per_sec: f64) -> String {
    format!("{}/s", HumanBytes(bytes_per_sec.max(0.0).round() as u64))
}

/// How fast the download went on average, and when it began and ended (or
/// was last recorded), from the log: bytes over the time since the upgrade
/// first entered `downloading`. Across an agent restart the downtime counts,
/// so it is an honest average, never an overestimate.
pub fn average_rate(d: &DetailView) -> Option<f64> {
    let start = d
        .log
        .iter()
        .find(|e| e.to == PhaseName::Downloading && e.from != Some(PhaseName::Downloading))?
        .at;
    let end = d
        .log
        .iter()
        .find(|e| e.from == Some(PhaseName::Downloading) && e.to != PhaseName::Downloading)
        .map(|e| e.at)
        .unwrap_or(d.job.updated_at);
    let secs = (end - start).as_seconds_f64();
    (secs >= 0.5 && d.job.bytes_done > 0).then(|| d.job.bytes_done as f64 / secs)
}

/// Seconds left at `rate`, for a download under way.
pub fn eta(view: &JobView, rate: f64) -> Option<u64> {
    (view.phase == PhaseName::Downloading && rate > 1.0)
        .then(|| (view.total_bytes.saturating_sub(view.bytes_done) as f64 / rate).ceil() as u64)
}

fn ellipsize(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn outcome_text(o: &Outcome) -> String {
    format!("{} {}", o.error_no, o.description)
}

// ---- colour ---------------------------------------------------------------------

/// ANSI colour for a terminal, nothing otherwise (or with `NO_COLOR` set).
#[derive(Clone, Copy, Debug)]
pub struct Paint(pub bool);

impl Paint {
    pub fn stdout() -> Paint {
        Paint(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
    }

    fn wrap(self, code: &str, text: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    pub fn bold(self, text: &str) -> String {
        self.wrap("1", text)
    }

    pub fn dim(self, text: &str) -> String {
        self.wrap("2", text)
    }

    pub fn red(self, text: &str) -> String {
        self.wrap("31", text)
    }

    /// A phase name (already padded) in its colour: green done, red failed,
    /// yellow cancelled, cyan under way.
    pub fn phase(self, phase: PhaseName, text: &str) -> String {
        let code = match phase {
            PhaseName::Completed => "1;32",
            PhaseName::Failed | PhaseName::RolledBack => "1;31",
            PhaseName::Cancelled => "1;33",
            PhaseName::Accepted
            | PhaseName::Downloading
            | PhaseName::Verifying
            | PhaseName::Flashing
            | PhaseName::AwaitingReboot => "1;36",
        };
        self.wrap(code, text)
    }
}

// ---- human renderings -------------------------------------------------------------

/// The headline: phase first, then how far or how it ended.
pub fn headline(view: &JobView, avg: Option<f64>, paint: Paint) -> String {
    let phase = paint.phase(view.phase, view.phase.as_str());
    let mut parts = vec![phase];
    match view.phase {
        PhaseName::Accepted => parts.push(format!("waiting to start; {}", bytes(view.total_bytes))),
        PhaseName::Downloading => {
            parts.push(format!(
                "{}%  {} of {}",
                view.percent(),
                bytes(view.bytes_done),
                bytes(view.total_bytes)
            ));
            if let Some(r) = avg {
                let mut s = format!("{} average", rate(r));
                if let Some(left) = eta(view, r) {
                    let _ = write!(s, ", about {} left", span(left));
                }
                parts.push(s);
            }
        }
        PhaseName::Verifying => parts.push(format!(
            "checking size and md5 of {}",
            bytes(view.total_bytes)
        )),
        PhaseName::Flashing => parts.push(format!(
            "writing {} to the flash target",
            bytes(view.total_bytes)
        )),
        PhaseName::AwaitingReboot => {
            parts.push("installed; waiting for a reboot into the new image".into())
        }
        PhaseName::Completed | PhaseName::Failed | PhaseName::Cancelled | PhaseName::RolledBack => {
            if let Some(o) = &view.result {
                // The number's meaning beside it (`result 32 (signature
                // missing or invalid): ...`), where it is not plain success.
                let meaning = fwagent_state::result_no::meaning(o.error_no)
                    .filter(|_| !o.is_ok())
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default();
                parts.push(format!("result {}{meaning}: {}", o.error_no, o.description));
            }
            if view.phase == PhaseName::Completed {
                match avg {
                    Some(r) => parts.push(format!(
                        "{} at {} average",
                        bytes(view.total_bytes),
                        rate(r)
                    )),
                    None => parts.push(bytes(view.total_bytes)),
                }
            } else if view.bytes_done > 0 {
                parts.push(format!(
                    "stopped at {}% ({} of {})",
                    view.percent(),
                    bytes(view.bytes_done),
                    bytes(view.total_bytes)
                ));
            }
        }
    }
    parts.join("  ·  ")
}

/// Label/value lines with the labels padded to one width.
fn fields(out: &mut String, rows: &[(&str, String)], paint: Paint) {
    let width = rows
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    for (label, value) in rows {
        let _ = writeln!(out, "{}  {value}", paint.dim(&format!("{label:<width$}")));
    }
}

/// The average rate `status` shows: from a running agent, or for an upgrade
/// that has ended (how fast it went). Read from the store while no agent
/// runs, an upgrade under way is not moving: it gets no rate, nor the ETA
/// that would follow from one.
fn shown_rate(d: &DetailView, live: bool) -> Option<f64> {
    average_rate(d).filter(|_| live || d.job.is_terminal())
}

/// `status` (and the top of `show`): the phase and the last error first;
/// `live` when the view came from the running agent.
pub fn render_status(d: &DetailView, now: OffsetDateTime, live: bool, paint: Paint) -> String {
    let v = &d.job;
    let mut out = String::new();
    let _ = writeln!(out, "{}", headline(v, shown_rate(d, live), paint));
    let mut rows: Vec<(&str, String)> = Vec::new();
    if let Some(err) = &d.last_error {
        let at = d.log.iter().rev().find(|e| e.error.is_some()).map(|e| e.at);
        let mut text = paint.red(err);
        if let Some(at) = at {
            let _ = write!(text, "  ({})", ago(at, now));
        }
        rows.push(("last error", text));
    }
    rows.push((
        "firmware",
        format!(
            "{}  ({}, md5 {})",
            v.firmware_name,
            bytes(v.total_bytes),
            v.md5sum
        ),
    ));
    rows.push(("from", d.url.clone()));
    rows.push(("message id", v.message_id.clone()));
    rows.push(("session id", v.session_id.clone()));
    rows.push(("attempts", v.attempts.to_string()));
    rows.push(("created", when(v.created_at, now)));
    rows.push(("updated", when(v.updated_at, now)));
    fields(&mut out, &rows, paint);
    out
}

/// `history`: one aligned row per upgrade, newest first.
pub fn render_history(jobs: &[JobView], now: OffsetDateTime, paint: Paint) -> String {
    if jobs.is_empty() {
        return "no upgrades recorded yet\n".to_string();
    }
    let header = [
        "UPDATED",
        "PHASE",
        "RESULT / PROGRESS",
        "SIZE",
        "FIRMWARE",
        "MESSAGE ID",
    ];
    let rows: Vec<[String; 6]> = jobs
        .iter()
        .map(|v| {
            let progress = match &v.result {
                Some(o) => ellipsize(&outcome_text(o), 40),
                None => format!("{}%  {}", v.percent(), bytes(v.bytes_done)),
            };
            [
                when(v.updated_at, now),
                v.phase.as_str().to_string(),
                progress,
                bytes(v.total_bytes),
                v.firmware_name.clone(),
                v.message_id.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let pad = |text: &str, w: usize| format!("{text:<w$}");
    let mut out = String::new();
    let head: Vec<String> = header.iter().zip(widths).map(|(h, w)| pad(h, w)).collect();
    let _ = writeln!(out, "{}", paint.bold(head.join("  ").trim_end()));
    for (v, row) in jobs.iter().zip(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                let padded = pad(cell, w);
                if i == 1 {
                    paint.phase(v.phase, &padded)
                } else {
                    padded
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

/// `show`: the status block, the transition log and the messages.
pub fn render_show(d: &DetailView, now: OffsetDateTime, live: bool, paint: Paint) -> String {
    let mut out = render_status(d, now, live, paint);
    let _ = writeln!(out, "\n{}", paint.bold("transitions"));
    let from_w = d
        .log
        .iter()
        .map(|e| e.from.map(|p| p.as_str().len()).unwrap_or(0))
        .max()
        .unwrap_or(0);
    let to_w = d.log.iter().map(|e| e.to.as_str().len()).max().unwrap_or(0);
    for e in &d.log {
        let from = e.from.map(|p| p.as_str()).unwrap_or("");
        let _ = writeln!(
            out,
            "  {}  {from:>from_w$} → {:<to_w$}  {}",
            paint.dim(&abs_time_ms(e.at)),
            e.to.as_str(),
            e.event
        );
        if let Some(err) = &e.error {
            let indent = 2 + abs_time_ms(e.at).chars().count() + 2 + from_w + 3 + to_w + 2;
            let _ = writeln!(out, "{:indent$}{}", "", paint.red(&format!("error: {err}")));
        }
    }
    if d.log.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    let _ = writeln!(out, "\n{}", paint.bold("messages to the cloud"));
    let what: Vec<String> = d
        .outbox
        .iter()
        .map(|o| match (&o.result, o.phase, o.percent) {
            (Some(r), _, _) => ellipsize(&outcome_text(r), 48),
            (None, Some(p), Some(pct)) => format!("{p} {pct}%"),
            (None, Some(p), None) => p.to_string(),
            (None, None, _) => String::new(),
        })
        .collect();
    let kind = |o: &OutboxView| match o.operator.as_str() {
        OP_PROGRESS => "progress",
        OP_RESULT => "result",
        _ => "ack",
    };
    let seq_w = d
        .outbox
        .iter()
        .map(|o| o.seq.to_string().len() + 1)
        .max()
        .unwrap_or(0);
    let what_w = what.iter().map(|w| w.chars().count()).max().unwrap_or(0);
    let mid_w = d
        .outbox
        .iter()
        .map(|o| o.message_id.chars().count())
        .max()
        .unwrap_or(0);
    for (o, what) in d.outbox.iter().zip(&what) {
        let delivered = match o.delivered_at {
            Some(at) => format!("delivered {}", when(at, now)),
            None => "pending".to_string(),
        };
        let _ = writeln!(
            out,
            "  {:>seq_w$}  {:<8}  {what:<what_w$}  {:<mid_w$}  {delivered}",
            format!("#{}", o.seq),
            kind(o),
            o.message_id,
        );
    }
    if d.outbox.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    out
}

/// One plain progress line for `watch` when stdout is not a terminal.
pub fn progress_line(v: &JobView, rate_now: Option<f64>) -> String {
    let mut s = format!(
        "{:<11}  {:>3}%  {} of {}",
        v.phase.as_str(),
        v.percent(),
        bytes(v.bytes_done),
        bytes(v.total_bytes)
    );
    if let Some(r) = rate_now.filter(|_| v.phase == PhaseName::Downloading) {
        let _ = write!(s, "  {}", rate(r));
        if let Some(left) = eta(v, r) {
            let _ = write!(s, "  ETA {}", span(left));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::tests::{detail_of, job};
    use time::macros::datetime;

    #[test]
    fn human_units() {
        assert_eq!(span(0), "0 s");
        assert_eq!(span(59), "59 s");
        assert_eq!(span(60), "1 min");
        assert_eq!(span(192), "3 min 12 s");
        assert_eq!(span(7_500), "2 h 5 min");
        assert_eq!(span(3 * 86_400 + 4 * 3_600 + 5), "3 d 4 h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(64 << 20), "64.00 MiB");
        assert_eq!(rate(1_048_576.0), "1.00 MiB/s");
        let t = datetime!(2024-05-01 12:00:00 UTC);
        assert_eq!(ago(t, t), "just now");
        assert_eq!(ago(t, datetime!(2024-05-01 12:03:00 UTC)), "3 min ago");
        assert_eq!(ago(datetime!(2024-05-01 12:00:05 UTC), t), "in 5 s");
        assert_eq!(
            when(t, datetime!(2024-05-01 12:00:12 UTC)),
            "2024-05-01 12:00:00 UTC (12 s ago)"
        );
        assert_eq!(
            abs_time_ms(datetime!(2024-05-01 12:00:00.25 UTC)),
            "2024-05-01 12:00:00.250 UTC"
        );
    }

    #[test]
    fn status_puts_phase_and_last_error_first() {
        let d = detail_of(&job());
        let text = render_status(&d, datetime!(2024-05-01 12:01:00 UTC), true, Paint(false));
        let lines: Vec<&str> = text.lines().collect();
        // 16 MiB in 15.5 s since the download started: about 1.03 MiB/s.
        assert_eq!(
            lines[0],
            "downloading  ·  25%  16.00 MiB of 64.00 MiB  ·  1.03 MiB/s average, about 47 s left"
        );
        assert_eq!(
            lines[1],
            "last error  login as <redacted> with <redacted> refused (<redacted>)  (52 s ago)"
        );
        assert!(lines
            .iter()
            .any(|l| l.starts_with("created     2024-05-01 12:00:00 UTC (1 min ago)")));
    }

    #[test]
    fn offline_an_upgrade_under_way_has_no_speed_or_eta() {
        let d = detail_of(&job());
        let now = datetime!(2024-05-01 12:01:00 UTC);
        let text = render_status(&d, now, false, Paint(false));
        assert_eq!(
            text.lines().next(),
            Some("downloading  ·  25%  16.00 MiB of 64.00 MiB")
        );
        let mut done = detail_of(&job());
        done.job.phase = PhaseName::Completed;
        done.job.result = Some(Outcome::ok());
        let text = render_status(&done, now, false, Paint(false));
        assert!(text.contains("average"), "how fast it went: {text}");
    }

    #[test]
    fn show_lists_transitions_with_their_errors() {
        let d = detail_of(&job());
        let text = render_show(&d, datetime!(2024-05-01 12:01:00 UTC), true, Paint(false));
        assert!(text.contains(
            "2024-05-01 12:00:08.000 UTC  downloading → downloading  retry 1 from byte 4194304 (attempt 2)"
        ));
        assert!(text.contains("error: connection reset; user <redacted>"));
        assert!(!text.contains("operator7"));
    }

    #[test]
    fn history_columns_line_up() {
        let mut a = JobView::of(&job());
        a.phase = PhaseName::Cancelled;
        a.result = Some(Outcome::new(60, "cancelled"));
        let mut b = a.clone();
        b.phase = PhaseName::Completed;
        b.result = Some(Outcome::ok());
        b.firmware_name = "a-much-longer-name.bin".into();
        let text = render_history(&[a, b], datetime!(2024-05-01 12:01:00 UTC), Paint(false));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = |l: &str| l.find("MID:1").or_else(|| l.find("MESSAGE ID"));
        assert_eq!(col(lines[0]), col(lines[1]));
        assert_eq!(col(lines[1]), col(lines[2]));
        assert!(lines[1].contains("cancelled") && lines[1].contains("60 cancelled"));
    }
}
