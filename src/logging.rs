//! Logging setup: `tracing` to stderr only (stdout belongs to the stdio
//! transport and to CLI output). Called once, from `main`.

use std::io::IsTerminal;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub fn init(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = filter(std::env::var("RUST_LOG").ok().as_deref(), default);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(filter)
        .try_init();
}

/// `RUST_LOG` as env_logger reads it (`info`, `fwagent=debug,sled=warn`),
/// else `default`. Targets and levels only: no span or field filters, so
/// no regex engine in the binary. A `RUST_LOG` that does not parse is
/// ignored.
fn filter(rust_log: Option<&str>, default: &str) -> Targets {
    rust_log
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| default.parse().expect("a level parses"))
}

#[cfg(test)]
mod tests {
    use super::filter;
    use tracing::level_filters::LevelFilter;

    #[test]
    fn rust_log_names_levels_per_target_and_a_bad_one_is_ignored() {
        let f = filter(Some("warn,fwagent::runtime=trace"), "info");
        assert!(f.would_enable("fwagent::runtime::download", &tracing::Level::TRACE));
        assert!(!f.would_enable("sled::pagecache", &tracing::Level::INFO));
        let bad = filter(Some("fwagent=loud"), "debug");
        assert!(bad.would_enable("fwagent", &tracing::Level::DEBUG));
        assert!(!bad.would_enable("fwagent", &tracing::Level::TRACE));
        assert_eq!(
            filter(None, "info").default_level(),
            Some(LevelFilter::INFO)
        );
    }
}
