//! A small redundant record beside sled, so that a store that will not
//! open does not end the gateway's upgrades for good (sled 0.34 is no
//! longer maintained; its tracker has stores that no longer open after an
//! abrupt stop).
//!
//! `recovery/active.json` holds the upgrade under way as its last commit
//! left it (its record, without credentials, and its sealed credentials),
//! or none; it is replaced atomically (written, fsynced, renamed, the
//! directory fsynced) after every flushed commit of an upgrade.
//! `recovery/answered.log` holds the answered acks, one JSON line each,
//! appended and fsynced after the commit that recorded one, and cut back to
//! the answered window (rewritten, renamed) when it holds twice as many.
//!
//! [`Store::open_or_recover`] opens the store; when sled cannot open it, or
//! what it holds does not decode, the store is moved aside
//! (`db.unopenable-<unix time>`, 0700, kept for inspection), a fresh one is
//! made and seeded from the record: the upgrade under way resumes at its
//! durable offset with its credentials, and every answered messageId in the
//! record still gets its ack. Lost: the logs and reports of ended upgrades,
//! and messages not yet delivered. docs/DURABILITY.md, "A store that will
//! not open".

use super::*;
use std::io::Write;
use std::sync::atomic::Ordering;

const DIR: &str = "recovery";
const ACTIVE: &str = "active.json";
const ANSWERED: &str = "answered.log";

#[derive(Serialize, Deserialize)]
struct ActiveRecord {
    /// The next job id the store would give.
    next_job: u64,
    /// The upgrade under way, without its credentials.
    job: Option<Job>,
    /// Its `secrets` record as the store holds it (sealed).
    sealed: Option<serde_json::Value>,
}

/// What [`Store::open_or_recover`] did when the store would not open.
#[derive(Debug)]
pub struct Recovered {
    /// Why it would not open.
    pub error: StoreError,
    /// Where the store that would not open now is.
    pub moved_to: PathBuf,
    /// The upgrade under way it resumes, if any.
    pub active: Option<String>,
    /// Answered messageIds carried over.
    pub answered: usize,
}

/// The lines of `state_dir`'s answered log (0 when it has none).
pub(super) fn answered_lines(state_dir: &Path) -> usize {
    std::fs::read(state_dir.join(DIR).join(ANSWERED))
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `bytes` to `dir/name` whole: a new file, fsynced, renamed over.
fn replace(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}.new"));
    let path = dir.join(name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(io(&path))?;
    sync_dir(dir)
}

impl Store {
    fn recovery_dir(&self) -> Result<PathBuf, StoreError> {
        let dir = self.inner.state_dir.join(DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(STATE_DIR_MODE)
            .create(&dir)
            .map_err(io(&dir))?;
        Ok(dir)
    }

    /// After `t` is committed and flushed: bring the record up to date.
    pub(super) fn record_for_recovery(&self, t: &Transition) -> Result<(), StoreError> {
        if t.job.is_none() && t.record_ack.is_none() {
            return Ok(());
        }
        let dir = self.recovery_dir()?;
        if let Some(job) = &t.job {
            let active = (!job.phase.is_terminal()).then(|| without_credentials(job));
            let sealed = match &active {
                Some(j) => self.inner.secrets.get(id_key(j.id))?,
                None => None,
            };
            let record = ActiveRecord {
                next_job: self.meta_u64(META_NEXT_JOB)?.unwrap_or(1),
                job: active,
                sealed: sealed.and_then(|v| serde_json::from_slice(&v).ok()),
            };
            let bytes = encode(DIR, ACTIVE.as_bytes(), &record)?;
            replace(&dir, ACTIVE, &bytes)?;
        }
        if let Some(ack) = &t.record_ack {
            self.append_answered(&dir, ack)?;
        }
        Ok(())
    }

    fn append_answered(&self, dir: &Path, ack: &Ack) -> Result<(), StoreError> {
        let path = dir.join(ANSWERED);
        let mut line = encode(DIR, ANSWERED.as_bytes(), ack)?;
        line.push(b'\n');
        let append = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            f.write_all(&line)?;
            f.sync_data()
        };
        append().map_err(io(&path))?;
        let lines = self.inner.answered_lines.fetch_add(1, Ordering::Relaxed) + 1;
        let window = self.inner.limits.answered;
        if lines > window.saturating_mul(2) {
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            let all: Vec<&str> = text.lines().collect();
            let kept = all[all.len().saturating_sub(window)..].join("\n") + "\n";
            replace(dir, ANSWERED, kept.as_bytes())?;
            self.inner
                .answered_lines
                .store(all.len().min(window), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Open the store; if it will not open, move it aside and carry on
    /// with a fresh one seeded from the redundant record (the agent's
    /// start; inspection commands use [`Store::open`], which never moves a
    /// store aside). A store locked by another process, or of a newer schema,
    /// is an error as ever.
    pub fn open_or_recover(
        state_dir: &Path,
        device_id: &str,
    ) -> Result<(Store, Option<Recovered>), StoreError> {
        let opened = std::panic::catch_unwind(|| Store::open(state_dir, device_id));
        let opened = opened.unwrap_or_else(|_| {
            Err(StoreError::Corrupt {
                key: "db".into(),
                why: "sled panicked while opening the store".into(),
            })
        });
        // Only what says the store itself is damaged; a file system error
        // (a full or failing card), a lock, a newer schema stay errors.
        let error = match opened {
            Ok(store) => return Ok((store, None)),
            Err(
                e @ (StoreError::Open { .. } | StoreError::Corrupt { .. } | StoreError::Sled(_)),
            ) => e,
            Err(e) => return Err(e),
        };
        let db = state_dir.join("db");
        if !db.exists() {
            return Err(error);
        }
        let stamp = OffsetDateTime::now_utc().unix_timestamp();
        let moved_to = state_dir.join(format!("db.unopenable-{stamp}"));
        std::fs::rename(&db, &moved_to).map_err(io(&db))?;
        std::fs::set_permissions(&moved_to, std::fs::Permissions::from_mode(STATE_DIR_MODE))
            .map_err(io(&moved_to))?;
        sync_dir(state_dir)?;
        let store = Store::open_unswept(state_dir, device_id, Limits::default())?;
        let (active, answered) = store.seed(&error.to_string(), &moved_to)?;
        store.sweep()?;
        let recovered = Recovered {
            error,
            moved_to,
            active,
            answered,
        };
        Ok((store, Some(recovered)))
    }

    /// Fill a fresh store from the record: the upgrade under way (with a
    /// log entry that says what happened) and the answered acks.
    fn seed(&self, why: &str, moved_to: &Path) -> Result<(Option<String>, usize), StoreError> {
        let s = &*self.inner;
        let dir = self.recovery_dir()?;
        let record: Option<ActiveRecord> = std::fs::read(dir.join(ACTIVE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let text = std::fs::read_to_string(dir.join(ANSWERED)).unwrap_or_default();
        let acks: Vec<Ack> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let next_job = record.as_ref().map_or(1, |r| r.next_job);
        let job = record.as_ref().and_then(|r| r.job.clone());
        let sealed = record.and_then(|r| r.sealed);
        let log = job.as_ref().map(|j| LogEntry {
            at: OffsetDateTime::now_utc(),
            from: Some(j.phase.name()),
            to: j.phase.name(),
            event: format!(
                "the store would not open; moved to {}; resumed from its redundant record",
                moved_to.display()
            ),
            error: Some(why.to_string()),
        });
        let job_bytes = match &job {
            Some(j) => Some(encode(TREE_JOBS, &id_key(j.id), &JobRecord::V1(j.clone()))?),
            None => None,
        };
        let log_bytes = match &log {
            Some(l) => Some(encode(TREE_LOG, b"", &LogRecord::V1(l.clone()))?),
            None => None,
        };
        let ack_bytes: Vec<(Vec<u8>, Vec<u8>)> = acks
            .iter()
            .map(|a| {
                let key = a.message_id.as_bytes().to_vec();
                encode(TREE_ACKS, &key, &AckRecord::V1(a.clone())).map(|v| (key, v))
            })
            .collect::<Result<_, _>>()?;
        (
            &s.jobs,
            &s.job_index,
            &s.log,
            &s.meta,
            &s.secrets,
            &s.acks,
            &s.acks_order,
        )
            .transaction(|(jobs, job_index, log, meta, secrets, acks, order)| {
                let mut next = next_job;
                if let (Some(j), Some(bytes)) = (&job, &job_bytes) {
                    let key = id_key(j.id);
                    jobs.insert(&key, bytes.as_slice())?;
                    for mid in std::iter::once(&j.request.message_id)
                        .chain(j.joined.iter().map(|x| &x.message_id))
                    {
                        job_index.insert(mid.as_bytes(), &key)?;
                    }
                    meta.insert(META_ACTIVE, &key)?;
                    next = next.max(j.id + 1);
                    if let Some(sealed) = &sealed {
                        secrets.insert(&key, sealed.to_string().as_bytes())?;
                    }
                    if let Some(bytes) = &log_bytes {
                        log.insert(&pair_key(j.id, 1), bytes.as_slice())?;
                        meta.insert(META_NEXT_LOG, &id_key(2))?;
                    }
                }
                meta.insert(META_NEXT_JOB, &id_key(next))?;
                for (i, (key, bytes)) in ack_bytes.iter().enumerate() {
                    if acks.insert(key.as_slice(), bytes.as_slice())?.is_none() {
                        order.insert(&pair_key(0, i as u64), key.as_slice())?;
                    }
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })?;
        s.flush()?;
        let answered = s.acks.len();
        Ok((job.map(|j| j.request.message_id), answered))
    }
}
