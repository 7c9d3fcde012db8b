//! The durable store: upgrades, their transition logs, the outbox and the
//! recorded acks, kept in sled 0.34 as versioned serde records.
//!
//! **When `commit` returns, the job record, its log entry and its outbox
//! entries are on disk together; after a crash at any moment the store holds
//! each commit whole or not at all.** [`Store::commit`] writes everything a
//! [`Transition`] asks for in one multi-tree sled transaction, then flushes
//! before it returns, so nothing is sent or started for a change that could
//! still be lost. The flush is sled's, followed by an `fdatasync` of sled's
//! data file: on Linux sled 0.34 syncs with `sync_file_range`, which writes
//! the pages but neither the file's new size nor the drive's cache, and a
//! gateway can lose power at any moment. A commit applied but not made
//! durable fails with [`StoreError::NotDurable`] ([`StoreError::is_fatal`]):
//! its caller must stop without sending or starting anything of it. Every
//! other error refused the change before anything was applied. A new store
//! is created in `db.new`, fsynced whole and renamed to `db` (sled writes
//! its files without fsync); sled's files are fsynced again on every open.
//! [`Store::delivered`] does not
//! flush: after a crash an entry may be sent again, with the same messageId,
//! which the cloud deduplicates.
//!
//! The directory is created (or reset to) mode 0700. An upgrade's user
//! name, password and passPort never go into its job record or its outbox
//! entries: they are written once, sealed under a key of the upgrade's own
//! in `keys/` ([`crate::vault`]), and the key is deleted when the upgrade
//! has ended and its last report is delivered. sled's log-structured files
//! keep old bytes until sled reuses their space; of the credentials they
//! hold only sealed copies, noise once the key is gone. sled allows one
//! process per store at a time.
//!
//! # Key layout
//!
//! Numbers in keys are big-endian `u64`, so sled's byte order is numeric
//! order. Values are JSON objects tagged with their record version
//! (`{"v":"1",...}`); a version this build does not know is reported as
//! [`StoreError::Corrupt`], never guessed at.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `jobs` | job id | `JobRecord` (a [`Job`] without its credentials) |
//! | `job_by_message_id` | request messageId (UTF-8) | job id (8 bytes) |
//! | `log` | job id ++ log seq | `LogRecord` (a [`LogEntry`]) |
//! | `outbox` | outbox seq | `OutboxRecord` (an [`OutboxEntry`] without its passPort), not yet delivered |
//! | `outbox_by_job` | job id ++ outbox seq | empty: which entries concern a job |
//! | `sent` | outbox seq | `SentRecord`: the entry and its delivered-at time |
//! | `acks` | request messageId (UTF-8) | `AckRecord` (an [`Ack`]): what a repeat gets |
//! | `acks_order` | outbox seq ++ 0 (schema-1 answers: 0 ++ n) | request messageId: the answers oldest first, for pruning |
//! | `secrets` | job id | `SecretsRecord`: the job's credentials, sealed under `keys/<job id>`; gone with the key |
//! | `meta` | `schema` | schema version (8 bytes); see [`SCHEMA_VERSION`] |
//! | `meta` | `next_seq` | the next outbox seq (8 bytes; starts at 1) |
//! | `meta` | `next_log` | the next log seq (8 bytes; starts at 1) |
//! | `meta` | `next_job` | the next job id (8 bytes; starts at 1) |
//! | `meta` | `active` | the id of the non-terminal job (8 bytes); absent when none |
//! | `meta` | `instance` | a random number, 1 to 2³²−1, drawn when the store is first opened: the high digits of report messageIds (8 bytes) |
//!
//! A store whose schema version is newer than [`SCHEMA_VERSION`] is refused
//! on open with [`StoreError::NewerSchema`] and left untouched.

use crate::machine::{RequestView, Transition};
use crate::model::{Ack, Job, JobId, LogEntry, OutboxEntry, Outgoing};
use crate::secret::Secret;
use crate::vault::{Credentials, Sealed, Vault};
pub use prune::{Limits, Pruned};
pub use recovery::Recovered;

mod compact;
mod prune;
mod recovery;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError, TransactionError, Transactional, TransactionalTree,
};
use std::fmt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// How long [`Store::open`] waits for sled's lock before it reports
/// [`StoreError::Locked`]: a store dropped a moment ago in this process
/// releases the lock only when sled's background threads have ended.
pub const LOCK_WAIT: Duration = Duration::from_secs(1);

/// sled 0.34 reports a held lock only as an I/O error with this text.
fn is_lock_error(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => io.to_string().contains("could not acquire lock"),
        _ => false,
    }
}

/// The schema this build writes and reads. Bump it (and migrate on open)
/// whenever the key layout or a record's meaning changes.
pub const SCHEMA_VERSION: u64 = 2;

/// The file mode of the state directory.
pub const STATE_DIR_MODE: u32 = 0o700;

const TREE_JOBS: &str = "jobs";
const TREE_JOB_INDEX: &str = "job_by_message_id";
const TREE_LOG: &str = "log";
const TREE_OUTBOX: &str = "outbox";
const TREE_OUTBOX_BY_JOB: &str = "outbox_by_job";
const TREE_SENT: &str = "sent";
const TREE_ACKS: &str = "acks";
const TREE_META: &str = "meta";
const TREE_SECRETS: &str = "secrets";
const TREE_ACKS_ORDER: &str = "acks_order";

const META_SCHEMA: &str = "schema";
const META_NEXT_SEQ: &str = "next_seq";
const META_NEXT_LOG: &str = "next_log";
const META_NEXT_JOB: &str = "next_job";
/// A random number fixed when the store is created: the high digits of
/// every report messageId ([`Store::report_message_id`]).
const META_INSTANCE: &str = "instance";

/// Report messageIds are `MID:<deviceId>-<n>` with
/// `n = instance × REPORT_ID_SPAN + seq`.
const REPORT_ID_SPAN: u64 = 1_000_000_000;
const META_ACTIVE: &str = "active";

/// What can go wrong with the store. Every variant says where.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory could not be created or protected, or a file of
    /// the store could not be synced.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the store (`fwagent run`, most likely).
    #[error(
        "the store at {path} is in use by another process \
         (a running agent is reached through its control socket)"
    )]
    Locked { path: PathBuf },
    /// sled could not open the database (damaged, unreadable, not sled's).
    #[error("cannot open the store at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    /// The store was written by a newer fwagent; it is not read at all.
    #[error(
        "the store has schema version {found}, newer than the {supported} this fwagent \
         supports; refusing to read it (upgrade fwagent or use another --state-dir)"
    )]
    NewerSchema { found: u64, supported: u64 },
    /// A record or value on disk does not decode. `key` is `tree/key`.
    #[error("corrupt record {key}: {why}")]
    Corrupt { key: String, why: String },
    /// A record could not be encoded (a bug, not a disk problem).
    #[error("cannot encode record {key}: {why}")]
    Encode { key: String, why: String },
    /// The transition does not fit what the store holds (a stale view: a job
    /// id taken twice, a second active job, a log entry without a job).
    #[error("transition refused by the store: {why}")]
    Conflict { why: String },
    /// [`Store::delivered`] for a seq that was never committed.
    #[error("no outbox entry with seq {seq}")]
    UnknownOutbox { seq: u64 },
    /// sled failed while reading, writing or flushing.
    #[error("the store failed: {0}")]
    Sled(#[from] sled::Error),
    /// A commit was applied but could not be made durable (sled's flush or
    /// the `fdatasync` failed). The change may or may not survive a power
    /// cut, and after a failed fsync Linux may report later ones as
    /// successful: the process must stop, sending and starting nothing of
    /// that change, and the next start recovers from what is durable. See
    /// [`StoreError::is_fatal`].
    #[error("the store could not be made durable: {0}")]
    NotDurable(#[source] Box<StoreError>),
}

impl StoreError {
    /// This store handle must not be used any more: a commit was applied
    /// but is not known to be durable ([`StoreError::NotDurable`]). Any
    /// other error refused the change before anything was applied.
    pub fn is_fatal(&self) -> bool {
        matches!(self, StoreError::NotDurable(_))
    }
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

/// How a record is named in errors: `tree/key`, numbers shown as numbers.
fn key_name(tree: &str, key: &[u8]) -> String {
    let numeric = matches!(
        tree,
        TREE_JOBS | TREE_LOG | TREE_OUTBOX | TREE_OUTBOX_BY_JOB | TREE_SENT
    );
    match key.len() {
        8 if numeric => format!("{tree}/{}", be(key, 0)),
        16 if numeric => format!("{tree}/{}/{}", be(key, 0), be(key, 8)),
        _ => format!("{tree}/{}", String::from_utf8_lossy(key)),
    }
}

/// sled's page cache limit. Its default, 1 GiB, is more than a small
/// gateway has, and sled then logs an ERROR on every start ("cache capacity
/// is limited to the cgroup memory limit"); the store holds a few upgrades.
const SLED_CACHE: u64 = 32 << 20;

/// Open sled at `path`, waiting up to `wait` for its lock.
fn open_sled(path: &Path, wait: Duration) -> Result<sled::Db, StoreError> {
    let started = Instant::now();
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(SLED_CACHE)
            // No background flusher waking every 500 ms: every commit that
            // must be durable flushes itself, and what may wait (delivery
            // marks, lazy progress) goes with the next flush or the flush
            // at exit.
            .flush_every_ms(None)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(e) if is_lock_error(&e) => {
                if started.elapsed() >= wait {
                    return Err(StoreError::Locked {
                        path: path.to_path_buf(),
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(StoreError::Open {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Create a new sled database at `path` so that a power cut at any moment
/// leaves either no store or a whole one: sled 0.34 writes its files (its
/// `conf` among them) without any fsync, so it is created beside, in
/// `db.new`, every file and directory of it fsynced, then renamed into
/// place and the rename made durable. A `db.new` left by a cut is removed.
fn create_durably(state_dir: &Path, path: &Path) -> Result<(), StoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let fresh = state_dir.join("db.new");
    match std::fs::remove_dir_all(&fresh) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&fresh)(e)),
    }
    let db = open_sled(&fresh, LOCK_WAIT)?;
    db.flush()?;
    drop(db);
    sync_tree(&fresh)?;
    std::fs::rename(&fresh, path).map_err(io(path))?;
    sync_dir(state_dir)
}

/// fsync every file and directory under `dir`, and `dir` itself.
fn sync_tree(dir: &Path) -> Result<(), StoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        if entry.file_type().map_err(io(&path))?.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(&path))?;
        }
    }
    sync_dir(dir)
}

/// Make a directory's entries durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// The big-endian u64 at `at` (the caller checked the length).
fn be(key: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[at..at + 8]);
    u64::from_be_bytes(b)
}

fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

fn pair_key(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&b.to_be_bytes());
    k
}

/// A `u64` stored as 8 big-endian bytes.
fn decode_u64(tree: &str, key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        key: key_name(tree, key),
        why: format!("expected 8 bytes, found {}", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(b))
}

// ---- versioned records ------------------------------------------------------

#[derive(Serialize, Deserialize)]
#[serde(tag = "v")]
enum JobRecord {
    #[serde(rename = "1")]
    V1(Job),
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "v")]
enum LogRecord {
    #[serde(rename = "1")]
    V1(LogEntry),
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "v")]
enum OutboxRecord {
    #[serde(rename = "1")]
    V1(OutboxEntry),
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "v")]
enum SentRecord {
    #[serde(rename = "1")]
    V1 {
        entry: OutboxEntry,
        #[serde(with = "time::serde::rfc3339")]
        delivered_at: OffsetDateTime,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "v")]
enum SecretsRecord {
    #[serde(rename = "1")]
    V1(Sealed),
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "v")]
enum AckRecord {
    #[serde(rename = "1")]
    V1(Ack),
}

fn encode<R: Serialize>(tree: &str, key: &[u8], record: &R) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|e| StoreError::Encode {
        key: key_name(tree, key),
        why: e.to_string(),
    })
}

/// Decode a record. The error never quotes the record's content, which may
/// hold credentials: it names the version, or the place where decoding failed.
fn decode<R: DeserializeOwned>(tree: &str, key: &[u8], bytes: &[u8]) -> Result<R, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| {
        #[derive(Deserialize)]
        struct Tag {
            v: serde_json::Value,
        }
        let why = match serde_json::from_slice::<Tag>(bytes) {
            Ok(Tag {
                v: serde_json::Value::String(v),
            }) if v != "1" => format!("record version {v:?} is unknown to this fwagent"),
            Ok(_) | Err(_) => match e.classify() {
                serde_json::error::Category::Data => format!(
                    "the record does not have the expected shape (line {}, column {})",
                    e.line(),
                    e.column()
                ),
                serde_json::error::Category::Io
                | serde_json::error::Category::Syntax
                | serde_json::error::Category::Eof => e.to_string(),
            },
        };
        StoreError::Corrupt {
            key: key_name(tree, key),
            why,
        }
    })
}

/// The job as its record keeps it: without its credentials.
fn without_credentials(job: &Job) -> Job {
    let mut job = job.clone();
    job.forget_secrets();
    job
}

fn credentials_of(job: &Job) -> Credentials {
    Credentials {
        user: job.request.source.user.clone(),
        password: job.request.source.password.clone(),
        pass_port: job.request.pass_port.clone(),
        joined: job.joined.iter().map(|j| j.pass_port.clone()).collect(),
    }
}

fn decode_job(key: &[u8], bytes: &[u8]) -> Result<Job, StoreError> {
    let JobRecord::V1(job) = decode(TREE_JOBS, key, bytes)?;
    Ok(job)
}

fn decode_log(key: &[u8], bytes: &[u8]) -> Result<LogEntry, StoreError> {
    let LogRecord::V1(entry) = decode(TREE_LOG, key, bytes)?;
    Ok(entry)
}

fn decode_outbox(key: &[u8], bytes: &[u8]) -> Result<OutboxEntry, StoreError> {
    let OutboxRecord::V1(entry) = decode(TREE_OUTBOX, key, bytes)?;
    Ok(entry)
}

fn decode_sent(key: &[u8], bytes: &[u8]) -> Result<(OutboxEntry, OffsetDateTime), StoreError> {
    let SentRecord::V1 {
        entry,
        delivered_at,
    } = decode(TREE_SENT, key, bytes)?;
    Ok((entry, delivered_at))
}

fn decode_ack(key: &[u8], bytes: &[u8]) -> Result<Ack, StoreError> {
    let AckRecord::V1(ack) = decode(TREE_ACKS, key, bytes)?;
    Ok(ack)
}

// ---- inside transactions ----------------------------------------------------

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn tx_meta_u64(meta: &TransactionalTree, key: &str) -> TxResult<Option<u64>> {
    match meta.get(key)? {
        None => Ok(None),
        Some(v) => decode_u64(TREE_META, key.as_bytes(), &v)
            .map(Some)
            .or_else(abort),
    }
}

// ---- the store ----------------------------------------------------------------

/// A handle on the store. Clones share one sled database.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// sled's data file, opened for `fdatasync` after each flush.
    data_file: std::fs::File,
    data_path: PathBuf,
    device_id: String,
    /// See [`META_INSTANCE`].
    instance: u64,
    db: sled::Db,
    jobs: sled::Tree,
    job_index: sled::Tree,
    log: sled::Tree,
    outbox: sled::Tree,
    outbox_by_job: sled::Tree,
    sent: sled::Tree,
    acks: sled::Tree,
    meta: sled::Tree,
    /// Each job's sealed credentials; see [`crate::vault`].
    secrets: sled::Tree,
    vault: Vault,
    /// The answered messageIds in the order they were answered.
    acks_order: sled::Tree,
    limits: Limits,
    state_dir: PathBuf,
    /// Lines in `recovery/answered.log` (see `recovery`).
    answered_lines: std::sync::atomic::AtomicUsize,
    /// Commits since the store was opened ([`Limits::prune_every`]).
    commits: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .field("device_id", &self.inner.device_id)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Open (or create) the store in `state_dir`: the directory is created
    /// with mode 0700 (and set to 0700 if it exists), the database lives in
    /// `state_dir/db`. `device_id` goes into report messageIds.
    pub fn open(state_dir: &Path, device_id: &str) -> Result<Store, StoreError> {
        Store::open_with_limits(state_dir, device_id, Limits::default())
    }

    /// [`Store::open`] keeping what has ended within `limits`.
    pub fn open_with_limits(
        state_dir: &Path,
        device_id: &str,
        limits: Limits,
    ) -> Result<Store, StoreError> {
        let store = Store::open_unswept(state_dir, device_id, limits)?;
        store.sweep()?;
        Ok(store)
    }

    /// What a cut or the limits left behind: shredded and pruned.
    fn sweep(&self) -> Result<(), StoreError> {
        self.shred_ended()?;
        // Best effort: what a prune leaves is pruned by the next one.
        let _ = self.prune();
        Ok(())
    }

    /// The store opened, nothing of it removed yet.
    fn open_unswept(
        state_dir: &Path,
        device_id: &str,
        limits: Limits,
    ) -> Result<Store, StoreError> {
        let io = |source| StoreError::Io {
            path: state_dir.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(STATE_DIR_MODE)
            .create(state_dir)
            .map_err(io)?;
        std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(STATE_DIR_MODE))
            .map_err(io)?;

        let path = state_dir.join("db");
        // Just created, the lock is ours once sled's threads of the first
        // handle have ended; give a slow machine time for that.
        let wait = match path.exists() {
            true => LOCK_WAIT,
            false => {
                create_durably(state_dir, &path)?;
                10 * LOCK_WAIT
            }
        };
        // Best effort: a store that cannot be copied is used as it is. Once
        // copied, give sled's threads of the copy time to let go.
        let wait = match wait == LOCK_WAIT
            && compact::compact_if_large(state_dir, limits.compact_above).unwrap_or(false)
        {
            true => 10 * LOCK_WAIT,
            false => wait,
        };
        let db = open_sled(&path, wait)?;
        // Ours now: what a cut left of a compaction goes.
        compact::remove_leftover(&state_dir.join("db.new"))?;
        // sled 0.34 keeps its log in `db/db`; see the module doc for why the
        // store syncs it itself. sled rewrites `conf` (unsynced) when it
        // finds it empty: make it and the entries durable on every open.
        let data_path = path.join("db");
        let data_file = std::fs::File::open(&data_path).map_err(|source| StoreError::Io {
            path: data_path.clone(),
            source,
        })?;
        sync_tree(&path)?;
        sync_dir(state_dir)?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })
        };
        // The schema first: a newer store is refused before anything in it
        // is read or created.
        let meta = tree(TREE_META)?;
        let schema = meta
            .get(META_SCHEMA)?
            .map(|v| decode_u64(TREE_META, META_SCHEMA.as_bytes(), &v))
            .transpose()?;
        if let Some(found) = schema {
            if found > SCHEMA_VERSION {
                return Err(StoreError::NewerSchema {
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
        }
        let inner = Inner {
            jobs: tree(TREE_JOBS)?,
            job_index: tree(TREE_JOB_INDEX)?,
            log: tree(TREE_LOG)?,
            outbox: tree(TREE_OUTBOX)?,
            outbox_by_job: tree(TREE_OUTBOX_BY_JOB)?,
            sent: tree(TREE_SENT)?,
            acks: tree(TREE_ACKS)?,
            secrets: tree(TREE_SECRETS)?,
            vault: Vault::open(state_dir)?,
            acks_order: tree(TREE_ACKS_ORDER)?,
            limits,
            state_dir: state_dir.to_path_buf(),
            answered_lines: recovery::answered_lines(state_dir).into(),
            commits: Default::default(),
            meta,
            data_file,
            data_path,
            path,
            device_id: device_id.to_string(),
            instance: 0,
            db,
        };
        inner.check_schema(schema)?;
        let inner = Inner {
            instance: inner.instance()?,
            ..inner
        };
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// The messageId this store gives the report with outbox number `seq`:
    /// `MID:<deviceId>-<n>`, `n` unique to this store (see `instance`).
    pub fn report_message_id(&self, seq: u64) -> String {
        self.inner.report_message_id(seq)
    }

    /// Where the database lives (`state_dir/db`).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The device id that report messageIds carry.
    pub fn device_id(&self) -> &str {
        &self.inner.device_id
    }

    /// What [`crate::on_request`] needs: the ack already given to
    /// `message_id` (never for `""`), the active job and the next job id.
    pub fn request_view(
        &self,
        message_id: &str,
        free_bytes: Option<u64>,
    ) -> Result<RequestView, StoreError> {
        let previous = if message_id.is_empty() {
            None
        } else {
            self.inner
                .acks
                .get(message_id)?
                .map(|v| decode_ack(message_id.as_bytes(), &v))
                .transpose()?
        };
        Ok(RequestView {
            previous,
            active: self.active()?,
            next_id: self.meta_u64(META_NEXT_JOB)?.unwrap_or(1),
            free_bytes,
            supported: None,
        })
    }

    /// Commit `t` in one sled transaction over every tree it touches, then
    /// flush. Returns the outbox entries as committed (seq and messageId
    /// fixed), in order; send them, and start `t.commands`, only now.
    pub fn commit(&self, t: &Transition) -> Result<Vec<OutboxEntry>, StoreError> {
        let entries = self.apply(t)?;
        self.inner.flush()?;
        // Committed whatever happens next. The redundant record is best
        // effort (a store that opens does not need it); a shred that fails
        // is done again when the store is next opened.
        let _ = self.record_for_recovery(t);
        if let Some(job) = t.job.as_ref().filter(|j| j.phase.is_terminal()) {
            let _ = self.shred_if_ended(job.id);
        }
        self.maybe_prune();
        Ok(entries)
    }

    /// Commit a transition that a crash may lose without harm, without the
    /// flush: one that only moves a job's figures (`bytes_done` between two
    /// checkpoints) and queues nothing and starts nothing. It is as whole
    /// as any commit and reads see it at once; it becomes durable with the
    /// next flush. On a gateway's flash this saves an `fdatasync` (and the
    /// wear) per progress event. Anything else is refused: `from` is the
    /// record `t` was computed from (the store's, with one writer), and `t`
    /// may differ from it in the figures only.
    pub fn commit_lazily(&self, from: &Job, t: &Transition) -> Result<(), StoreError> {
        if !t.figures_only(from) {
            return Err(StoreError::Conflict {
                why: "only a transition that changes a job's figures may skip the flush".into(),
            });
        }
        self.apply(t).map(|_| ())
    }

    /// The transaction of [`Store::commit`], without the flush.
    fn apply(&self, t: &Transition) -> Result<Vec<OutboxEntry>, StoreError> {
        let s = &*self.inner;
        if t.log.is_some() && t.job.is_none() {
            return Err(StoreError::Conflict {
                why: "a log entry needs a job".into(),
            });
        }
        let job_bytes = match &t.job {
            Some(job) => Some(encode(
                TREE_JOBS,
                &id_key(job.id),
                &JobRecord::V1(without_credentials(job)),
            )?),
            None => None,
        };
        let sealed = match &t.job {
            Some(job) => self.seal_once(job)?,
            None => None,
        };
        let log_bytes = match &t.log {
            Some(entry) => Some(encode(TREE_LOG, b"", &LogRecord::V1(entry.clone()))?),
            None => None,
        };
        let ack_bytes = match &t.record_ack {
            Some(ack) => Some(encode(
                TREE_ACKS,
                ack.message_id.as_bytes(),
                &AckRecord::V1(ack.clone()),
            )?),
            None => None,
        };
        let job_id = t.job.as_ref().map(|j| j.id);

        let entries = (
            &s.jobs,
            &s.job_index,
            &s.log,
            &s.outbox,
            &s.outbox_by_job,
            &s.acks,
            &s.meta,
            &s.secrets,
            &s.acks_order,
        )
            .transaction(
                |(jobs, job_index, log, outbox, outbox_by_job, acks, meta, secrets, acks_order)| {
                    if let (Some(job), Some(bytes)) = (&t.job, &job_bytes) {
                        let key = id_key(job.id);
                        let mid = job.request.message_id.as_bytes();
                        match job_index.get(mid)? {
                            Some(v) => {
                                let known = decode_u64(TREE_JOB_INDEX, mid, &v).or_else(abort)?;
                                if known != job.id {
                                    return abort(StoreError::Conflict {
                                        why: format!(
                                            "request {} belongs to job {known}, not {}",
                                            job.request.message_id, job.id
                                        ),
                                    });
                                }
                            }
                            None => {
                                if jobs.get(key)?.is_some() {
                                    return abort(StoreError::Conflict {
                                        why: format!(
                                            "job id {} is taken by another upgrade",
                                            job.id
                                        ),
                                    });
                                }
                                job_index.insert(mid, &key)?;
                                let next = tx_meta_u64(meta, META_NEXT_JOB)?.unwrap_or(1);
                                if job.id >= next {
                                    meta.insert(META_NEXT_JOB, &id_key(job.id + 1))?;
                                }
                            }
                        }
                        jobs.insert(&key, bytes.as_slice())?;
                        for j in &job.joined {
                            if job_index.get(j.message_id.as_bytes())?.is_none() {
                                job_index.insert(j.message_id.as_bytes(), &key)?;
                            }
                        }
                        if let Some(sealed) = &sealed {
                            secrets.insert(&key, sealed.as_slice())?;
                        }
                        let active = tx_meta_u64(meta, META_ACTIVE)?;
                        if job.phase.is_terminal() {
                            if active == Some(job.id) {
                                meta.remove(META_ACTIVE)?;
                            }
                        } else {
                            match active {
                                Some(other) if other != job.id => {
                                    return abort(StoreError::Conflict {
                                        why: format!(
                                            "job {other} is active; job {} cannot be",
                                            job.id
                                        ),
                                    });
                                }
                                Some(_) => {}
                                None => {
                                    meta.insert(META_ACTIVE, &key)?;
                                }
                            }
                        }
                    }

                    if let (Some(id), Some(bytes)) = (job_id, &log_bytes) {
                        let n = tx_meta_u64(meta, META_NEXT_LOG)?.unwrap_or(1);
                        log.insert(&pair_key(id, n), bytes.as_slice())?;
                        meta.insert(META_NEXT_LOG, &id_key(n + 1))?;
                    }

                    let mut seq = tx_meta_u64(meta, META_NEXT_SEQ)?.unwrap_or(1);
                    // The answer's place in [`TREE_ACKS_ORDER`]: its first
                    // outbox number, unique to this commit.
                    let answered_at = pair_key(seq, 0);
                    let mut entries = Vec::with_capacity(t.outbox.len());
                    for message in &t.outbox {
                        let message_id = match message {
                            Outgoing::Ack(ack) => ack.message_id.clone(),
                            Outgoing::Progress { .. } | Outgoing::Result { .. } => {
                                s.report_message_id(seq)
                            }
                        };
                        let entry = OutboxEntry {
                            seq,
                            message_id,
                            job: job_id,
                            message: message.clone(),
                        };
                        let key = id_key(seq);
                        // On disk without its passPort: a restart takes it
                        // from the job's sealed credentials (`pending_outbox`).
                        let stored = OutboxEntry {
                            message: entry.message.clone().without_secrets(),
                            ..entry.clone()
                        };
                        let bytes =
                            encode(TREE_OUTBOX, &key, &OutboxRecord::V1(stored)).or_else(abort)?;
                        outbox.insert(&key, bytes)?;
                        if let Some(id) = job_id {
                            outbox_by_job.insert(&pair_key(id, seq), &[])?;
                        }
                        entries.push(entry);
                        seq += 1;
                    }
                    if !t.outbox.is_empty() {
                        meta.insert(META_NEXT_SEQ, &id_key(seq))?;
                    }

                    if let (Some(ack), Some(bytes)) = (&t.record_ack, &ack_bytes) {
                        let mid = ack.message_id.as_bytes();
                        if acks.insert(mid, bytes.as_slice())?.is_none() {
                            acks_order.insert(&answered_at, mid)?;
                        }
                    }
                    Ok(entries)
                },
            )?;
        Ok(entries)
    }

    /// Undelivered outbox entries, in seq order; reports carry their
    /// upgrade's passPort again (from its sealed credentials).
    pub fn pending_outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut pass_ports = std::collections::HashMap::new();
        let mut out = Vec::new();
        for kv in self.inner.outbox.iter() {
            let (k, v) = kv?;
            let mut entry = decode_outbox(&k, &v)?;
            if let (
                Some(id),
                Outgoing::Progress { subject, .. } | Outgoing::Result { subject, .. },
            ) = (entry.job, &mut entry.message)
            {
                if let std::collections::hash_map::Entry::Vacant(e) = pass_ports.entry(id) {
                    e.insert(self.pass_ports(id)?);
                }
                if let Some((_, p)) = pass_ports[&id]
                    .iter()
                    .find(|(mid, _)| *mid == subject.request_message_id)
                {
                    subject.pass_port = p.clone();
                }
            }
            out.push(entry);
        }
        Ok(out)
    }

    /// Each request of job `id` (its own, then those that joined it) with
    /// its passPort, while the job's key still opens them.
    fn pass_ports(&self, id: JobId) -> Result<Vec<(String, Option<Secret>)>, StoreError> {
        let key = id_key(id);
        let (Some(c), Some(v)) = (self.credentials(id)?, self.inner.jobs.get(key)?) else {
            return Ok(Vec::new());
        };
        let job = decode_job(&key, &v)?;
        let joined = job.joined.into_iter().map(|j| j.message_id).zip(c.joined);
        Ok(std::iter::once((job.request.message_id, c.pass_port))
            .chain(joined)
            .collect())
    }

    /// The transport confirmed entry `seq`: move it to `sent` with the time
    /// of delivery. Not flushed: after a crash the entry may be sent again
    /// with the same messageId. Idempotent. The last report of an ended
    /// upgrade shreds its credentials (flushed first, so a resend after a
    /// crash is not needed).
    pub fn delivered(&self, seq: u64) -> Result<(), StoreError> {
        let s = &*self.inner;
        let key = id_key(seq);
        let at = OffsetDateTime::now_utc();
        let job = (&s.outbox, &s.sent).transaction(|(outbox, sent)| {
            let Some(v) = outbox.remove(&key)? else {
                if sent.get(key)?.is_some() {
                    return Ok(None);
                }
                return abort(StoreError::UnknownOutbox { seq });
            };
            let mut entry = decode_outbox(&key, &v).or_else(abort)?;
            // A schema-1 store kept the passPort in the entry: not in `sent`.
            entry.message = entry.message.without_secrets();
            let job = entry.job;
            let record = SentRecord::V1 {
                entry,
                delivered_at: at,
            };
            let bytes = encode(TREE_SENT, &key, &record).or_else(abort)?;
            sent.insert(&key, bytes)?;
            Ok(job)
        })?;
        // Delivered whatever happens next: a shred that fails is done
        // again when the store is next opened.
        if let Some(id) = job {
            let _ = self.shred_if_ended(id);
        }
        Ok(())
    }

    /// Seal `job`'s credentials into its `secrets` record when a commit
    /// first brings them (a new upgrade, one a schema-1 store kept in its
    /// record, a request that joined it); `None` when there is nothing new.
    fn seal_once(&self, job: &Job) -> Result<Option<Vec<u8>>, StoreError> {
        let s = &*self.inner;
        let credentials = credentials_of(job);
        let key = id_key(job.id);
        if job.phase.is_terminal() || credentials.is_empty() {
            return Ok(None);
        }
        if let Some(v) = s.secrets.get(key)? {
            let SecretsRecord::V1(sealed) = decode(TREE_SECRETS, &key, &v)?;
            if sealed.joined >= job.joined.len() {
                return Ok(None);
            }
        }
        let sealed = s.vault.seal(job.id, &credentials)?;
        encode(TREE_SECRETS, &key, &SecretsRecord::V1(sealed)).map(Some)
    }

    /// `id`'s credentials, if its key still opens its `secrets` record.
    fn credentials(&self, id: JobId) -> Result<Option<Credentials>, StoreError> {
        let s = &*self.inner;
        let key = id_key(id);
        let Some(v) = s.secrets.get(key)? else {
            return Ok(None);
        };
        let SecretsRecord::V1(sealed) = decode(TREE_SECRETS, &key, &v)?;
        s.vault.open_sealed(id, &sealed)
    }

    /// A job as read from its record, with its credentials back in while
    /// it is under way (an ended upgrade keeps none).
    fn load_job(&self, key: &[u8], bytes: &[u8]) -> Result<Job, StoreError> {
        let mut job = decode_job(key, bytes)?;
        if !job.phase.is_terminal() {
            if let Some(c) = self.credentials(job.id)? {
                job.request.source.user = c.user;
                job.request.source.password = c.password;
                job.request.pass_port = c.pass_port;
                for (j, pass_port) in job.joined.iter_mut().zip(c.joined) {
                    j.pass_port = pass_port;
                }
            }
        }
        Ok(job)
    }

    /// Make `id`'s credentials unrecoverable once it has ended and none of
    /// its reports waits for delivery: flush (so no report of it is sent
    /// again), delete its key, then its sealed record. Crash-safe in any
    /// order of cuts: [`Store::open`] finishes what a cut left.
    fn shred_if_ended(&self, id: JobId) -> Result<(), StoreError> {
        let s = &*self.inner;
        let key = id_key(id);
        if !s.vault.has_key(id) {
            // Nothing opens it any more (most upgrades have no credentials
            // at all, and nothing to remove).
            if s.secrets.contains_key(key)? {
                s.secrets.remove(key)?;
            }
            return Ok(());
        }
        if self.meta_u64(META_ACTIVE)? == Some(id) || self.awaits_delivery(id)? {
            return Ok(());
        }
        s.flush()?;
        s.vault.shred(id)?;
        s.secrets.remove(key)?;
        Ok(())
    }

    /// Does a report of job `id` wait in the outbox?
    fn awaits_delivery(&self, id: JobId) -> Result<bool, StoreError> {
        let s = &*self.inner;
        for kv in s.outbox_by_job.scan_prefix(id_key(id)) {
            let (k, _) = kv?;
            if k.len() == 16 && s.outbox.contains_key(id_key(be(&k, 8)))? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// At open: shred what ended (or was never committed) while a cut
    /// stopped the store before it could.
    fn shred_ended(&self) -> Result<(), StoreError> {
        let s = &*self.inner;
        let mut ids = s.vault.jobs()?;
        for kv in s.secrets.iter() {
            let (k, _) = kv?;
            if k.len() == 8 {
                ids.push(be(&k, 0));
            }
        }
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            self.shred_if_ended(id)?;
        }
        Ok(())
    }

    /// One job by its id.
    pub fn job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let key = id_key(id);
        self.inner
            .jobs
            .get(key)?
            .map(|v| self.load_job(&key, &v))
            .transpose()
    }

    /// The job a request's messageId created, if it created one.
    pub fn job_by_message_id(&self, mid: &str) -> Result<Option<Job>, StoreError> {
        let Some(v) = self.inner.job_index.get(mid)? else {
            return Ok(None);
        };
        let id = decode_u64(TREE_JOB_INDEX, mid.as_bytes(), &v)?;
        self.job(id)?.map(Some).ok_or_else(|| StoreError::Corrupt {
            key: key_name(TREE_JOB_INDEX, mid.as_bytes()),
            why: format!("points at job {id}, which is missing"),
        })
    }

    /// The upgrade under way (non-terminal), if any.
    pub fn active(&self) -> Result<Option<Job>, StoreError> {
        let Some(id) = self.meta_u64(META_ACTIVE)? else {
            return Ok(None);
        };
        self.job(id)?.map(Some).ok_or_else(|| StoreError::Corrupt {
            key: key_name(TREE_META, META_ACTIVE.as_bytes()),
            why: format!("points at job {id}, which is missing"),
        })
    }

    /// What `status` shows: the active upgrade, else the most recent one.
    pub fn latest(&self) -> Result<Option<Job>, StoreError> {
        if let Some(job) = self.active()? {
            return Ok(Some(job));
        }
        self.inner
            .jobs
            .last()?
            .map(|(k, v)| self.load_job(&k, &v))
            .transpose()
    }

    /// Every upgrade, newest first; at most `limit` of them.
    pub fn history(&self, limit: Option<usize>) -> Result<Vec<Job>, StoreError> {
        self.inner
            .jobs
            .iter()
            .rev()
            .take(limit.unwrap_or(usize::MAX))
            .map(|kv| {
                let (k, v) = kv?;
                self.load_job(&k, &v)
            })
            .collect()
    }

    /// A job's transition log, oldest first.
    pub fn log(&self, id: JobId) -> Result<Vec<LogEntry>, StoreError> {
        self.inner
            .log
            .scan_prefix(id_key(id))
            .map(|kv| {
                let (k, v) = kv?;
                decode_log(&k, &v)
            })
            .collect()
    }

    /// A job's outbox entries in seq order, pending (`None`) and delivered
    /// (with the time of delivery).
    pub fn outbox_of(
        &self,
        id: JobId,
    ) -> Result<Vec<(OutboxEntry, Option<OffsetDateTime>)>, StoreError> {
        let s = &*self.inner;
        let mut out = Vec::new();
        for kv in s.outbox_by_job.scan_prefix(id_key(id)) {
            let (k, _) = kv?;
            if k.len() != 16 {
                return Err(StoreError::Corrupt {
                    key: key_name(TREE_OUTBOX_BY_JOB, &k),
                    why: format!("expected a 16-byte key, found {} bytes", k.len()),
                });
            }
            let key = id_key(be(&k, 8));
            // Outbox first, then sent: `delivered` moves an entry atomically
            // in that direction, so one of the two reads finds it.
            if let Some(v) = s.outbox.get(key)? {
                out.push((decode_outbox(&key, &v)?, None));
            } else if let Some(v) = s.sent.get(key)? {
                let (entry, at) = decode_sent(&key, &v)?;
                out.push((entry, Some(at)));
            } else {
                return Err(StoreError::Corrupt {
                    key: key_name(TREE_OUTBOX_BY_JOB, &k),
                    why: "the entry is neither in the outbox nor sent".into(),
                });
            }
        }
        Ok(out)
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.inner.meta_u64(key)
    }

    /// Make every write so far durable (delivery marks are not flushed one
    /// by one; the agent calls this before it exits).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
}

impl Inner {
    /// sled's flush, then `fdatasync` of its data file.
    fn flush(&self) -> Result<(), StoreError> {
        let synced = self.db.flush().map_err(StoreError::Sled).and_then(|_| {
            self.data_file.sync_data().map_err(|source| StoreError::Io {
                path: self.data_path.clone(),
                source,
            })
        });
        synced.map_err(|e| StoreError::NotDurable(Box::new(e)))
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.meta
            .get(key)?
            .map(|v| decode_u64(TREE_META, key.as_bytes(), &v))
            .transpose()
    }

    /// This store's instance number, made (at random, 1 to 2³²−1) and
    /// recorded the first time: so report messageIds differ between stores,
    /// a store created again after a wipe, and gateways that share a host
    /// name. It is durable before any messageId made from it (the commit
    /// that first uses it flushes it too).
    fn instance(&self) -> Result<u64, StoreError> {
        if let Some(v) = self.meta.get(META_INSTANCE)? {
            let instance = decode_u64(TREE_META, META_INSTANCE.as_bytes(), &v)?;
            if instance == 0 || instance > u64::from(u32::MAX) {
                return Err(StoreError::Corrupt {
                    key: key_name(TREE_META, META_INSTANCE.as_bytes()),
                    why: format!("instance {instance} is not 1 to 2^32-1"),
                });
            }
            return Ok(instance);
        }
        use std::hash::{BuildHasher, Hasher};
        // std's hasher keys come from the OS's random source.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(OffsetDateTime::now_utc().unix_timestamp_nanos() as u128);
        let instance = (h.finish() % u64::from(u32::MAX)) + 1;
        self.meta.insert(META_INSTANCE, &id_key(instance))?;
        Ok(instance)
    }

    /// The messageId of the report with outbox number `seq`: unique in this
    /// store for ever (`seq` only grows), and apart from other stores'
    /// for their first 10⁹ messages.
    fn report_message_id(&self, seq: u64) -> String {
        let n = self.instance * REPORT_ID_SPAN + seq;
        format!("MID:{}-{n}", self.device_id)
    }

    /// Accept our schema; stamp a new store with it.
    fn check_schema(&self, schema: Option<u64>) -> Result<(), StoreError> {
        let key = || key_name(TREE_META, META_SCHEMA.as_bytes());
        match schema {
            Some(SCHEMA_VERSION) => Ok(()),
            // Schema 1 kept credentials in job records; schema 2 seals them
            // apart. The active upgrade's move over on its next commit, and
            // an older fwagent no longer opens the store (it would find no
            // credentials in a record).
            Some(1) => {
                // Its answers get an order, oldest first, so they can be
                // pruned like any.
                for (i, kv) in self.acks.iter().enumerate() {
                    let (mid, _) = kv?;
                    self.acks_order.insert(pair_key(0, i as u64), mid)?;
                }
                self.meta.insert(META_SCHEMA, &id_key(SCHEMA_VERSION))?;
                self.flush()
            }
            Some(found) if found > SCHEMA_VERSION => Err(StoreError::NewerSchema {
                found,
                supported: SCHEMA_VERSION,
            }),
            Some(found) => Err(StoreError::Corrupt {
                key: key(),
                why: format!("schema version {found} was never written by fwagent"),
            }),
            None => {
                let empty = self.jobs.is_empty()
                    && self.job_index.is_empty()
                    && self.log.is_empty()
                    && self.outbox.is_empty()
                    && self.sent.is_empty()
                    && self.acks.is_empty();
                if !empty {
                    return Err(StoreError::Corrupt {
                        key: key(),
                        why: "missing, yet the store holds records".into(),
                    });
                }
                self.meta.insert(META_SCHEMA, &id_key(SCHEMA_VERSION))?;
                self.flush()?;
                Ok(())
            }
        }
    }
}
