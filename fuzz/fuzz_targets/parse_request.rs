//! Fuzz target for the request parser: any bytes through
//! `fwagent::protocol::parse_request` (default options, so no credentials
//! decoder runs and nothing does I/O), then the invariants of
//! `fwagent_fuzz::check_answer`: an answer for every input, never a panic,
//! and every rejection an ack that renders as one line of JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = fwagent_fuzz::check_answer(data) {
        panic!("{broken}");
    }
});
