//! The store's size on disk over years of service (issue 16, item 1):
//! `UPGRADES` small upgrades run to completed and `REFUSED` refused
//! requests, every message delivered, through the real state machine and
//! store; the store directory's size is printed as it goes.
//!
//! `cargo run --release -p fwagent-state --example store_soak -- DIR [UPGRADES] [REFUSED]`
//! (`make soak`: 10,000 and 100,000 in a tmpfs directory).

use fwagent_state::store::Limits;
use fwagent_state::{
    ack_no, on_request, transition, Ack, Event, Firmware, Incoming, Outcome, Policy, Protocol,
    Secret, Source, Store, UpgradeRequest,
};
use std::path::Path;
use time::OffsetDateTime;

const SIZE: u64 = 4096;

fn request(mid: &str) -> UpgradeRequest {
    UpgradeRequest {
        message_id: mid.to_string(),
        session_id: format!("SID:{mid}"),
        source: Source {
            protocol: Protocol::Http,
            host: "127.0.0.1".into(),
            port: 8080,
            path: "/fw/".into(),
            url: "http://127.0.0.1:8080/fw/firmware.bin".into(),
            user: Secret::new("soak-user"),
            password: Secret::new("soak-password"),
        },
        firmware: Firmware {
            name: "firmware.bin".into(),
            md5: format!("{:032x}", mid.len() as u128 * 7919),
            size: SIZE,
            signature: None,
        },
        pass_port: Some(Secret::new("soak-pass-port")),
    }
}

fn deliver(store: &Store) {
    for e in store.pending_outbox().expect("read") {
        store.delivered(e.seq).expect("delivered");
    }
}

fn upgrade(store: &Store, mid: &str) {
    let now = OffsetDateTime::now_utc();
    let view = store.request_view(mid, None).expect("view");
    store
        .commit(&on_request(
            &view,
            Incoming::Valid(Box::new(request(mid))),
            now,
        ))
        .expect("commit");
    let events = [
        Event::START,
        Event::Checkpoint {
            offset: SIZE,
            validator: None,
        },
        Event::Downloaded,
        Event::Verified,
        Event::Flashed { reboot: false },
    ];
    for event in events {
        let job = store.active().expect("read").expect("active");
        let t = transition(&job, event, now, &Policy::default()).expect("applies");
        store.commit(&t).expect("commit");
    }
    assert!(store.active().expect("read").is_none(), "{mid} completed");
    deliver(store);
}

fn refuse(store: &Store, mid: &str) {
    let ack = Ack {
        operator: "setCloudUpgradeConfig".into(),
        session_id: format!("SID:{mid}"),
        message_id: mid.into(),
        result: Outcome::new(ack_no::INVALID_FIELD, "info.fileInfo.md5sum: not hex"),
    };
    let view = store.request_view(mid, None).expect("view");
    let entries = store
        .commit(&on_request(
            &view,
            Incoming::Invalid(ack),
            OffsetDateTime::now_utc(),
        ))
        .expect("commit");
    for e in entries {
        store.delivered(e.seq).expect("delivered");
    }
}

fn size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let meta = entry.metadata().expect("stat");
            if meta.is_dir() {
                todo.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

/// The store's limits: the agent's, or with `SOAK_KEEP_ALL=1` none (the
/// store as it was before it pruned).
fn open(dir: &Path) -> Store {
    let limits = match std::env::var_os("SOAK_KEEP_ALL") {
        Some(_) => Limits::KEEP_ALL,
        None => Limits::default(),
    };
    Store::open_with_limits(dir, "soak", limits).expect("open")
}

/// Drop the store and open it again, as an agent restart does (which
/// compacts a store grown past its threshold).
fn restart(store: Store, dir: &Path) -> Store {
    drop(store);
    open(dir)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(
        args.get(1)
            .expect("usage: store_soak DIR [UPGRADES] [REFUSED]"),
    );
    let number = |i: usize, default: u64| {
        args.get(i)
            .map_or(default, |a| a.parse().expect("a number"))
    };
    let (upgrades, refused) = (number(2, 10_000), number(3, 100_000));
    let mut store = open(dir);
    let mib = |dir: &Path| size(dir) as f64 / 1048576.0;
    println!(
        "{:>9} {:>7}  {:>10}  {:>13}",
        "", "count", "store MiB", "after restart"
    );
    let marks =
        |n: u64, last: u64| n == 100 || n == 300 || n == 1000 || n % 10_000 == 0 || n == last;
    for i in 1..=upgrades {
        upgrade(&store, &format!("MID:soak-u{i}"));
        if marks(i, upgrades) {
            let before = mib(dir);
            store = restart(store, dir);
            println!(
                "{:>9} {i:>7}  {before:>10.2}  {:>13.2}",
                "upgrades",
                mib(dir)
            );
        }
    }
    for i in 1..=refused {
        refuse(&store, &format!("MID:soak-r{i}"));
        if marks(i, refused) {
            let before = mib(dir);
            store = restart(store, dir);
            println!(
                "{:>9} {i:>7}  {before:>10.2}  {:>13.2}",
                "refused",
                mib(dir)
            );
        }
    }
    println!(
        "kept: {} upgrades, {} in the outbox",
        store.history(None).expect("read").len(),
        store.pending_outbox().expect("read").len()
    );
}
