//! An upgrade's credentials, kept apart from its job record and sealed
//! under a key of its own, so that they can be made unrecoverable.
//!
//! The store writes a job's user name, password and passPort once, into
//! `secrets/<job id>`, sealed with ChaCha20-Poly1305 under a random 256-bit
//! key that lives in a small file of its own, `keys/<job id>` (0600, in a
//! 0700 directory). Job records and outbox entries are written without
//! them. When the upgrade has ended and its last report is delivered, the
//! key file is deleted: every copy of the sealed bytes that sled's log may
//! still hold is then noise (crypto-shredding). The key file is durable
//! (file and directory fsynced) before any record sealed under it.

use crate::secret::Secret;
use crate::store::StoreError;
use crate::JobId;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What a job's record leaves out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Credentials {
    pub user: Secret,
    pub password: Secret,
    pub pass_port: Option<Secret>,
    /// The passPorts of the requests that joined the upgrade, in order.
    #[serde(default)]
    pub joined: Vec<Option<Secret>>,
}

impl Credentials {
    pub fn is_empty(&self) -> bool {
        self.user.is_empty()
            && self.password.is_empty()
            && self.pass_port.is_none()
            && self.joined.iter().all(Option::is_none)
    }
}

/// The sealed credentials as the `secrets` tree keeps them.
#[derive(Serialize, Deserialize)]
pub(crate) struct Sealed {
    /// Hex.
    nonce: String,
    /// Hex: the ciphertext and its tag.
    sealed: String,
    /// How many joined requests' passPorts it holds: a join seals again.
    #[serde(default)]
    pub joined: usize,
}

/// The `keys` directory.
#[derive(Debug)]
pub(crate) struct Vault {
    dir: PathBuf,
}

const KEY_LEN: usize = 32;

impl Vault {
    /// `state_dir/keys`, created 0700.
    pub fn open(state_dir: &Path) -> Result<Vault, StoreError> {
        let dir = state_dir.join("keys");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| io(&dir, source))?;
        Ok(Vault { dir })
    }

    fn path(&self, job: JobId) -> PathBuf {
        self.dir.join(job.to_string())
    }

    /// Seal `c` under `job`'s key, made (and on disk) first if it has none.
    pub fn seal(&self, job: JobId, c: &Credentials) -> Result<Sealed, StoreError> {
        let rng = SystemRandom::new();
        let random = |out: &mut [u8]| {
            rng.fill(out).map_err(|_| StoreError::Conflict {
                why: "the system's random source failed".into(),
            })
        };
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let key = match self.key(job)? {
            Some(key) => key,
            None => {
                let mut key = [0u8; KEY_LEN];
                random(&mut key)?;
                self.write_key(job, &key)?;
                key
            }
        };
        let mut bytes = serde_json::to_vec(c).map_err(|e| StoreError::Encode {
            key: format!("secrets/{job}"),
            why: e.to_string(),
        })?;
        aead_key(&key)
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(job.to_be_bytes()),
                &mut bytes,
            )
            .map_err(|_| StoreError::Encode {
                key: format!("secrets/{job}"),
                why: "sealing failed".into(),
            })?;
        Ok(Sealed {
            nonce: hex(&nonce),
            sealed: hex(&bytes),
            joined: c.joined.len(),
        })
    }

    /// `job`'s key, if it has a whole one.
    fn key(&self, job: JobId) -> Result<Option<[u8; KEY_LEN]>, StoreError> {
        match std::fs::read(self.path(job)) {
            Ok(k) => Ok(k.try_into().ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&self.path(job), e)),
        }
    }

    /// The credentials of `job`, or `None` when its key is gone (shredded,
    /// or lost) or the sealed bytes do not open under it.
    pub fn open_sealed(&self, job: JobId, s: &Sealed) -> Result<Option<Credentials>, StoreError> {
        let Some(key) = self.key(job)? else {
            return Ok(None);
        };
        let (Some(nonce), Some(mut bytes)) = (unhex(&s.nonce), unhex(&s.sealed)) else {
            return Ok(None);
        };
        let Ok(nonce) = Nonce::try_assume_unique_for_key(&nonce) else {
            return Ok(None);
        };
        let Ok(plain) =
            aead_key(&key).open_in_place(nonce, Aad::from(job.to_be_bytes()), &mut bytes)
        else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(plain).ok())
    }

    pub fn has_key(&self, job: JobId) -> bool {
        self.path(job).exists()
    }

    /// Delete `job`'s key (and make the deletion durable). Idempotent.
    pub fn shred(&self, job: JobId) -> Result<(), StoreError> {
        match std::fs::remove_file(self.path(job)) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&self.path(job), e)),
        }
    }

    /// The jobs that have a key file; a half-written key is removed, other
    /// names are left alone.
    pub fn jobs(&self) -> Result<Vec<JobId>, StoreError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io(&self.dir, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io(&self.dir, e))?;
            let name = entry.file_name();
            let name = name.to_str().unwrap_or("");
            if let Ok(id) = name.parse() {
                out.push(id);
            } else if name.ends_with(".new") {
                // A key a cut stopped before its rename: nothing is sealed under it.
                std::fs::remove_file(entry.path()).map_err(|e| io(&entry.path(), e))?;
            }
        }
        Ok(out)
    }

    /// Write the key to `keys/<job>.new`, fsync, rename, fsync the directory.
    fn write_key(&self, job: JobId, key: &[u8; KEY_LEN]) -> Result<(), StoreError> {
        let path = self.path(job);
        let tmp = self.dir.join(format!("{job}.new"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(key)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| io(&path, e))?;
        sync_dir(&self.dir)
    }
}

fn aead_key(key: &[u8]) -> LessSafeKey {
    // A 32-byte key always makes a ChaCha20-Poly1305 key.
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte key"))
}

fn io(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}
