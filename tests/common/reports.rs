//! What the agent printed: its messages to the cloud, the one result
//! report, and the assertions the upgrade tests share.

use super::{md5_file, status_json, unflashed, Firmware, Run, ShortRun};
use std::path::Path;
use std::time::Duration;

// ---------------------------------------------------------------- agent output

/// A message's `operator` (`""` when absent).
pub fn operator(v: &serde_json::Value) -> &str {
    v["operator"].as_str().unwrap_or_default()
}

/// The result reports among `lines`.
pub fn results(lines: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    lines
        .iter()
        .filter(|v| operator(v) == "reportCloudUpgradeResult")
        .collect()
}

/// What a result report says.
#[derive(Debug)]
pub struct ResultReport {
    pub error_no: u64,
    pub phase: String,
    pub description: String,
}

/// The one result report among `lines` (asserted: exactly one); `what` says
/// where the lines came from, for the failure message.
pub fn only_result_among(
    lines: &[serde_json::Value],
    what: &dyn std::fmt::Display,
) -> ResultReport {
    let r = results(lines);
    assert_eq!(r.len(), 1, "one result report: {what}");
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    ResultReport {
        error_no: r[0]["result"]["errorNo"].as_u64().unwrap_or(u64::MAX),
        phase: text(&r[0]["info"]["phase"]),
        description: text(&r[0]["result"]["description"]),
    }
}

/// The one result report `run` printed (asserted: exactly one).
pub fn only_result(run: &Run) -> ResultReport {
    only_result_among(&run.json_lines(), run)
}

/// All stdout lines of several runs, in order.
pub fn all_lines<'a>(runs: impl IntoIterator<Item = &'a Run>) -> Vec<serde_json::Value> {
    runs.into_iter().flat_map(|r| r.json_lines()).collect()
}

/// The run installed `fw`: ack 0 echoing the request, progress, one result
/// 0 last, the right image, no partial file left.
pub fn assert_installed(
    run: &Run,
    req: &serde_json::Value,
    fw: &Firmware,
    state: &Path,
    target: &Path,
) {
    assert_eq!(run.code(), Some(0), "{run}");
    let lines = run.json_lines();
    assert_eq!(operator(&lines[0]), "setCloudUpgradeConfig-Ack", "{run}");
    assert_eq!(lines[0]["result"]["errorNo"], 0, "{run}");
    assert_eq!(lines[0]["messageId"], req["messageId"]);
    assert_eq!(lines[0]["sessionId"], req["sessionId"]);
    assert_eq!(lines[0]["info"], "none");
    let progress: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| operator(v) == "reportCloudUpgradeProgress")
        .collect();
    assert!(!progress.is_empty(), "no progress reports: {run}");
    for p in &progress {
        assert_eq!(p["info"]["requestMessageId"], req["messageId"]);
        assert_eq!(p["info"]["totalBytes"], fw.len);
    }
    let r = results(&lines);
    assert_eq!(r.len(), 1, "{run}");
    assert_eq!(r[0]["result"]["errorNo"], 0, "{run}");
    assert_eq!(r[0]["info"]["phase"], "completed");
    assert_eq!(
        operator(lines.last().unwrap()),
        "reportCloudUpgradeResult",
        "the result comes last"
    );
    assert_eq!(md5_file(target), fw.md5, "the right image");
    assert!(
        !state.join("downloads").read_dir().unwrap().any(|_| true),
        "the partial file is removed once the upgrade ends"
    );
}

impl ShortRun {
    /// Ended in `failed` with `error_no` within `bound`: acked 0, nothing
    /// flashed, no partial file, the store says the same. Returns the
    /// description.
    pub fn assert_failed(&self, error_no: u64, bound: Duration) -> String {
        let description = self.assert_result(error_no, "failed");
        let lines = self.run.json_lines();
        assert_eq!(lines[0]["result"]["errorNo"], 0, "acked: {}", self.run);
        assert!(
            self.took < bound,
            "took {:?}, bound {bound:?}: {}",
            self.took,
            self.run
        );
        assert!(unflashed(&self.target), "nothing is flashed");
        let job = status_json(&self.state);
        assert_eq!(job["phase"], "failed", "{job}");
        assert_eq!(job["result"]["errorNo"], error_no, "{job}");
        description
    }

    pub fn assert_completed(&self, fw: &Firmware) {
        self.assert_result(0, "completed");
        assert_eq!(md5_file(&self.target), fw.md5, "the right image");
    }

    /// Exit 0, one result report with `error_no` in `phase`, no partial
    /// file left. Returns the result's description.
    fn assert_result(&self, error_no: u64, phase: &str) -> String {
        assert_eq!(self.run.code(), Some(0), "{}", self.run);
        let r = only_result(&self.run);
        assert_eq!(
            (r.error_no, r.phase.as_str()),
            (error_no, phase),
            "{}\n{}",
            r.description,
            self.run
        );
        self.assert_no_partial_file();
        r.description
    }

    pub fn assert_no_partial_file(&self) {
        let left: Vec<_> = std::fs::read_dir(self.state.join("downloads"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "partial files left: {left:?}");
    }
}
