//! Replays the fuzzer's committed corpus (`fuzz/corpus/parse_request/`)
//! through `parse_request` on every `cargo test`, against the same invariants
//! the fuzz target checks (`fuzz/src/lib.rs`, included here by path, so there
//! is one copy of them). A fuzzer finding goes here as a named regression
//! test (none so far: the runs in docs/SECURITY.md found no crash and no
//! broken invariant). Fuzzing itself is `RUSTC_BOOTSTRAP=1 cargo fuzz run
//! parse_request` in `fuzz/` (docs/SECURITY.md); CI only replays.

#[path = "../fuzz/src/lib.rs"]
mod invariants;

use std::path::{Path, PathBuf};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse_request")
}

#[test]
fn every_corpus_file_gets_an_answer_that_keeps_the_invariants() {
    let dir = corpus_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("read a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        files.len() >= 50,
        "the corpus has {} files: is fuzz/corpus/parse_request committed?",
        files.len()
    );
    let mut broken = Vec::new();
    for path in &files {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if let Err(why) = invariants::check_answer(&bytes) {
            broken.push(format!("{}: {why}", path.display()));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn the_seed_examples_are_in_the_corpus_and_accepted_or_refused_as_documented() {
    use fwagent::protocol::{parse_request, ParseOptions};
    use fwagent_state::Incoming;
    for (name, error_no) in [
        ("example-seed-1-ftp", 0),
        ("example-seed-2-ftp-enciphered", 4),
        ("example-http-hostip-totalsize", 0),
        ("example-invalid-sftp", 5),
    ] {
        let bytes = std::fs::read(corpus_dir().join(name)).expect("a seed of the corpus");
        let got = match parse_request(&bytes, &ParseOptions::default()) {
            Incoming::Valid(_) => 0,
            Incoming::Invalid(ack) => ack.result.error_no,
        };
        assert_eq!(got, error_no, "{name}");
    }
}
