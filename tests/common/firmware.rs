//! Firmware files the tests write (deterministic bytes from a seed, named
//! uniquely), their md5, and the `setCloudUpgradeConfig` requests for them.

use super::unique_name;
use base64::Engine as _;
use md5::{Digest, Md5};
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------- firmware files

/// A firmware file a test wrote.
#[derive(Debug, Clone)]
pub struct Firmware {
    /// The file name (unique per test run).
    pub name: String,
    pub path: PathBuf,
    pub len: u64,
    /// Lowercase hex md5 of the content.
    pub md5: String,
    pub seed: u64,
}

impl Firmware {
    /// Writes `len` pseudo-random bytes (seeded from the unique name) into `dir`.
    pub fn create(dir: &Path, prefix: &str, len: u64) -> Firmware {
        let name = unique_name(prefix) + ".bin";
        let seed = seed_of(&name);
        let path = dir.join(&name);
        let md5 = write_firmware(&path, len, seed);
        Firmware {
            name,
            path,
            len,
            md5,
            seed,
        }
    }

    /// The `path` a request needs to reach this file under a server location such as
    /// `/slow/`: the location itself (the firmware name is appended by the agent).
    pub fn uri(&self, location: &str) -> String {
        format!("/{}/{}", location.trim_matches('/'), self.name).replace("//", "/")
    }

    /// Overwrites the file with other content of the same length (a changed image).
    pub fn rewrite(&mut self, seed: u64) {
        self.seed = seed;
        self.md5 = write_firmware(&self.path, self.len, seed);
    }

    pub fn bytes(&self) -> Vec<u8> {
        fs::read(&self.path).expect("read firmware back")
    }
}

fn seed_of(name: &str) -> u64 {
    // FNV-1a: a fixed function of the name, so a failing test's file can be made again.
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The deterministic byte stream behind [`write_firmware`]: xorshift64* words, little-endian.
pub struct FirmwareBytes {
    state: u64,
}

impl FirmwareBytes {
    pub fn new(seed: u64) -> Self {
        FirmwareBytes {
            state: seed | 1, // never zero
        }
    }

    /// Fills `buf` (its length a multiple of 8, except perhaps the last call).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.state;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.state = x;
            let w = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
}

/// `len` bytes from seed `seed` in memory (for small images).
pub fn firmware_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    FirmwareBytes::new(seed).fill(&mut v);
    v
}

/// Writes `len` bytes from seed `seed` to `path` (via a temporary name and a rename, so a
/// server never serves it half-written) and returns their md5 as lowercase hex.
pub fn write_firmware(path: &Path, len: u64, seed: u64) -> String {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    let mut out = BufWriter::with_capacity(
        1 << 20,
        File::create(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display())),
    );
    let mut gen = FirmwareBytes::new(seed);
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        gen.fill(&mut buf[..n]);
        md5.update(&buf[..n]);
        out.write_all(&buf[..n]).expect("write firmware");
        left -= n as u64;
    }
    out.into_inner()
        .expect("flush firmware")
        .sync_all()
        .expect("fsync firmware");
    fs::rename(&tmp, path).expect("rename firmware into place");
    hex::encode(md5.finalize())
}

/// md5 of a file as lowercase hex.
pub fn md5_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
    }
    hex::encode(md5.finalize())
}

// ---------------------------------------------------------------- requests

/// Base64 (standard alphabet, padded) as the protocol carries `userName` and `password`.
pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A `setCloudUpgradeConfig` request for `fw` at `protocol://127.0.0.1:port{path}` with a
/// unique messageId. Tweak the returned value for the invalid cases.
pub fn upgrade_request(
    protocol: &str,
    port: u16,
    path: &str,
    fw: &Firmware,
    user: &str,
    pass: &str,
) -> serde_json::Value {
    serde_json::json!({
        "operator": "setCloudUpgradeConfig",
        "sessionId": format!("SID:{}", unique_name("test")),
        "messageId": format!("MID:{}", unique_name("localhost")),
        "info": {
            "serverConfig": {
                "host": "127.0.0.1",
                "port": port,
                "userName": b64(user),
                "password": b64(pass),
                "protocol": protocol,
                "path": path,
            },
            "fileInfo": {
                "firmwareName": fw.name,
                "md5sum": fw.md5,
                "upgradeFileSize": fw.len,
            }
        }
    })
}

/// A seed example (`text`) with its server rewritten to `protocol` on
/// 127.0.0.1:`port`, path `/`, and its file to `fw`, under a fresh
/// messageId. The size goes under whichever spelling the example uses.
pub fn seed_on(text: &str, protocol: &str, port: u16, fw: &Firmware) -> serde_json::Value {
    let mut req: serde_json::Value = serde_json::from_str(text).expect("the seed example is JSON");
    let server = &mut req["info"]["serverConfig"];
    assert_eq!(
        server["host"], "127.0.0.1",
        "examples never name the seed's host"
    );
    server["protocol"] = protocol.into();
    server["port"] = port.into();
    server["path"] = "/".into();
    let file = &mut req["info"]["fileInfo"];
    file["firmwareName"] = format!("{} ", fw.name).into(); // as the seed: a trailing space
    file["md5sum"] = fw.md5.clone().into();
    let size_key = if file.get("totalSize").is_some() {
        "totalSize"
    } else {
        "upgradeFileSize"
    };
    file[size_key] = fw.len.into();
    req["messageId"] = format!("MID:{}", unique_name("seed")).into();
    req
}
