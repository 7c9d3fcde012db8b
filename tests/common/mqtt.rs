//! Brokers for the MQTT tests: a lock for tests that stop the shared one,
//! and a mosquitto of a test's own.

use super::{free_port, spawn_detached, temp_dir, wait_port, wait_port_closed};
use std::fs;
use std::process::Child;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Serialises tests of one binary that kill or restart the shared broker (and the tests that
/// need it up meanwhile). A poisoned lock is taken anyway.
pub fn broker_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- a private broker

/// A mosquitto of the test's own, on a fresh port with its store in a temp dir: for tests
/// that kill and restart the broker without disturbing others. Killed on drop.
pub struct Mosquitto {
    pub port: u16,
    pub dir: tempfile::TempDir,
    cmdline: String,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        let bin = std::env::var("FWAGENT_TEST_MOSQUITTO_BIN")
            .ok()
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| "/usr/sbin/mosquitto".into());
        let dir = temp_dir();
        let port = free_port();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let conf = dir.path().join("mosquitto.conf");
        fs::write(
            &conf,
            format!(
                "{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {d}/\nautosave_on_changes true\nautosave_interval 1\n\
                 log_dest file {d}/mosquitto.log\n",
                user = if root { "user root\n" } else { "" },
                d = dir.path().display()
            ),
        )
        .expect("write mosquitto.conf");
        let mut m = Mosquitto {
            port,
            cmdline: format!("'{bin}' -c '{}'", conf.display()),
            dir,
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        self.child = Some(spawn_detached(&self.cmdline));
        wait_port(self.port, Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, a crash: the broker keeps what it had saved, and it saves its store about a
    /// second after a change, so what arrived just before may be lost (as on a real crash).
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
    }

    /// SIGTERM: the broker saves its store and exits; everything it had survives.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
    }

    fn signal(&mut self, sig: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(c.id() as i32, sig) };
            let _ = c.wait();
            wait_port_closed(self.port, Duration::from_secs(10));
        }
    }

    /// Starts it again on the same port with the same store (after [`Self::kill`] or
    /// [`Self::stop`]; if it still runs, stops it first).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Its log file (connections, subscriptions, saves).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
