//! `make demo` is the first thing a newcomer runs: run it here, in each of
//! its modes, so CI notices when it breaks. It builds with cargo, serves the
//! image on 127.0.0.1 and runs the real binary (scripts/demo.sh).

use std::process::Command;

fn demo(env: &[(&str, &str)]) {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/demo.sh"))
        .envs(env.iter().copied())
        .current_dir(root)
        .output()
        .expect("run scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("the upgrade is complete"),
        "demo {env:?} failed: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
}

#[test]
fn the_demo_upgrades_a_file_over_http() {
    demo(&[]);
}

#[test]
fn the_demo_upgrades_a_file_over_ftp_with_the_seeds_credentials() {
    demo(&[("PROTOCOL", "ftp")]);
}

#[test]
fn the_demo_upgrades_an_ab_slot_through_a_simulated_reboot() {
    demo(&[("FLASH", "ab")]);
}
