//! The [`Sink`] every protocol's fetcher writes through: it appends to the
//! partial file or the slot that [`Staging`](super::super::flash::staging::Staging)
//! names, never past the declared size, hands each batch to the Verify
//! actor (for a slot: each fsynced range, to be read back from the medium
//! and hashed there), has a checkpoint fsynced and reported every
//! `checkpoint_bytes`, and reports progress. The file I/O itself runs on
//! the disk writer's thread ([`super::disk`]), so the transfer reads on
//! while the disk writes and fsyncs. It also fails an attempt whose data
//! trickles in below `Transfer::min_rate` (a server that drips a byte a
//! second would otherwise never trip the idle timeout).

use super::super::flash::staging::{remove_partial, Staged};
use super::super::verify::VerifyMsg;
use super::super::JobEvent;
use super::disk::{Disk, Gate, Target};
use super::FetchJob;
use crate::fsutil;
use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use fwagent_state::{result_no, Event, Failure, JobId};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek};
use std::time::Duration;
use tokio::time::Instant;

/// Chunks handed to the verifier before we wait for it to catch up (4 keep
/// the pipeline full; each is a 256 KiB batch held in memory).
const VERIFY_WINDOW: usize = 4;
/// Bytes gathered before a write to the partial file.
pub(super) const WRITE_BATCH: usize = 256 << 10;

/// The partial file (or slot), the verifier and the progress reports, as
/// one writer.
pub struct Sink {
    job: JobId,
    path: std::path::PathBuf,
    /// The writer thread that owns the file.
    disk: Disk,
    /// The image goes into a slot: the verifier reads it back from the
    /// medium (told by the writer), so no chunk goes to it from here.
    slot: bool,
    pub(super) size: u64,
    /// Bytes handed to the writer (written, or queued to be).
    written: u64,
    buf: BytesMut,
    /// Where the last checkpoint was asked for.
    last_checkpoint: u64,
    checkpoint_bytes: u64,
    validator: Option<String>,
    events: Recipient<JobEvent>,
    verifier: Recipient<VerifyMsg>,
    in_flight: VecDeque<actix::dev::RecipientRequest<VerifyMsg>>,
    progress_every: Duration,
    last_progress: Instant,
    rate: RateFloor,
}

/// The least transfer rate: bytes are counted over windows of `window`, and
/// a window that ends with fewer than `min_rate` bytes per second is too
/// slow. The first window starts with the first bytes, so waiting for the
/// response is the idle timeout's business. Time is an argument.
#[derive(Debug)]
struct RateFloor {
    /// Bytes per second; 0 turns the check off.
    min_rate: u64,
    window: Duration,
    /// The current window's start and the bytes counted in it.
    current: Option<(Instant, u64)>,
}

impl RateFloor {
    fn new(min_rate: u64, window: Duration) -> Self {
        RateFloor {
            min_rate,
            window: window.max(Duration::from_secs(1)),
            current: None,
        }
    }

    /// Count `len` bytes arriving at `now`. `Err((bytes, elapsed))` when the
    /// window that just ended brought too few.
    fn count(&mut self, len: u64, now: Instant) -> Result<(), (u64, Duration)> {
        if self.min_rate == 0 {
            return Ok(());
        }
        let (start, bytes) = self.current.get_or_insert((now, 0));
        *bytes += len;
        let elapsed = now.saturating_duration_since(*start);
        if elapsed < self.window {
            return Ok(());
        }
        let least = (self.min_rate as f64 * elapsed.as_secs_f64()) as u64;
        if *bytes < least {
            return Err((*bytes, elapsed));
        }
        self.current = Some((now, 0));
        Ok(())
    }
}

pub(super) fn io_failure(what: &str, path: &std::path::Path, e: io::Error) -> Failure {
    let no_space = e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT);
    if no_space {
        return Failure::new(
            result_no::NO_STORAGE,
            format!("no space left writing {}", path.display()),
            false,
        );
    }
    Failure::new(
        result_no::TRANSFER,
        format!("{what} {}: {e}", path.display()),
        false,
    )
}

/// Open (or create) the partial file at `path`. A file or directory it
/// creates is made durable in its parent at once (an fsync of the file
/// does not make its directory entry durable on every file system): a
/// checkpoint's offset must never outlive the file it counts bytes of.
fn open_durably(path: &std::path::Path) -> Result<File, Failure> {
    let synced = |dir: &std::path::Path| {
        fsutil::sync_dir(dir).map_err(|e| io_failure("cannot fsync", dir, e))
    };
    let existed = path.exists();
    let dir = fsutil::parent_dir(path);
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| io_failure("cannot create", dir, e))?;
        synced(fsutil::parent_dir(dir))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_failure("cannot open", path, e))?;
    if !existed {
        synced(dir)?;
    }
    Ok(file)
}

/// Commit "the download starts again from byte 0" and wait for it, before
/// a byte is written over what the old offset vouched for: a crash in
/// between must not find the old offset with new bytes under it.
async fn reset(
    events: &Recipient<JobEvent>,
    job: JobId,
    validator: Option<String>,
) -> Result<(), Failure> {
    let event = Event::SourceChanged { validator };
    events.send(JobEvent { job, event }).await.map_err(|e| {
        Failure::new(
            result_no::TRANSFER,
            format!("cannot record the restart from zero: {e}"),
            true,
        )
    })
}

impl Sink {
    /// Open the staged file at `offset` (a regular file is cut back to it),
    /// and prime the verifier with that prefix. A file shorter than
    /// `offset`, or bytes that are not this upgrade's, start from zero.
    /// Closing `gate` stops the writer (the Download actor does before it
    /// removes what the job staged).
    pub async fn open(
        fetch: &FetchJob,
        staged: Staged,
        offset: u64,
        validator: Option<String>,
        peers: (Recipient<JobEvent>, Recipient<VerifyMsg>),
        gate: Gate,
    ) -> Result<Sink, Failure> {
        let (events, verifier) = peers;
        let Staged {
            path,
            resumable,
            read_back,
            stale,
        } = staged;
        let mut file = open_durably(&path)?;
        let meta = file
            .metadata()
            .map_err(|e| io_failure("cannot stat", &path, e))?;
        let regular = meta.is_file();
        // A block device holds whatever it holds; its metadata says 0.
        let len = if regular { meta.len() } else { u64::MAX };
        let mut offset = offset.min(fetch.firmware.size);
        let mut validator = validator;
        if offset > 0 && (len < offset || !resumable) {
            tracing::warn!(
                job = fetch.job,
                offset,
                path = %path.display(),
                "the bytes before the checkpoint are gone; starting from zero"
            );
            offset = 0;
            validator = None;
            reset(&events, fetch.job, None).await?;
        }
        // Only now that the store says "from zero" may bytes elsewhere go.
        if let Some(stale) = stale {
            remove_partial(fetch.job, &stale);
        }
        if regular {
            file.set_len(offset)
                .map_err(|e| io_failure("cannot truncate", &path, e))?;
        }
        file.seek(io::SeekFrom::Start(offset))
            .map_err(|e| io_failure("cannot seek", &path, e))?;
        verifier.do_send(VerifyMsg::Prime {
            job: fetch.job,
            path: path.clone(),
            len: offset,
            medium: read_back,
        });
        let target = Target {
            job: fetch.job,
            path: path.clone(),
            file,
            regular,
            written: offset,
            size: fetch.firmware.size,
            slot: read_back,
            events: events.clone(),
            verifier: verifier.clone(),
        };
        Ok(Sink {
            job: fetch.job,
            path,
            disk: Disk::start(target, gate)?,
            slot: read_back,
            size: fetch.firmware.size,
            written: offset,
            buf: BytesMut::with_capacity(WRITE_BATCH),
            last_checkpoint: offset,
            checkpoint_bytes: fetch.transfer.checkpoint_bytes.max(1),
            validator,
            events,
            verifier,
            in_flight: VecDeque::new(),
            progress_every: fetch.transfer.progress_every,
            last_progress: Instant::now(),
            rate: RateFloor::new(fetch.transfer.min_rate, fetch.transfer.idle_timeout),
        })
    }

    /// The job the bytes are for.
    pub fn job(&self) -> JobId {
        self.job
    }

    /// Bytes received so far: where the transfer continues.
    pub fn offset(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    /// Bytes still expected.
    pub fn remaining(&self) -> u64 {
        self.size - self.offset()
    }

    /// The offset the last fsync made durable.
    pub fn durable(&self) -> u64 {
        self.disk.durable()
    }

    /// What identified the server's file when the partial file was begun.
    pub fn validator(&self) -> Option<&str> {
        self.validator.as_deref()
    }

    /// Remember what identifies the server's file. It is committed at once
    /// (with the last durable offset, after what the writer has queued), so
    /// no resume can go without it.
    pub fn set_validator(&mut self, validator: Option<String>) {
        if validator == self.validator {
            return;
        }
        self.validator = validator;
        if let Err(failure) = self.disk.validator(self.validator.clone()) {
            // The next write fails the attempt with the writer's reason.
            tracing::warn!(job = self.job, error = %failure.description, "cannot record the validator");
        }
    }

    /// The server's file is not the one we began: drop what we have and
    /// start again from byte zero (once the store says so).
    pub async fn restart(&mut self, validator: Option<String>) -> Result<(), Failure> {
        tracing::info!(
            job = self.job,
            "the server's file changed; starting from zero"
        );
        self.buf.clear();
        self.disk.restart().await?;
        self.written = 0;
        self.last_checkpoint = 0;
        self.validator = validator.clone();
        reset(&self.events, self.job, validator).await?;
        self.verifier.do_send(VerifyMsg::Prime {
            job: self.job,
            path: self.path.clone(),
            len: 0,
            medium: self.slot,
        });
        Ok(())
    }

    /// Append bytes. More than the declared size is a size mismatch.
    pub async fn write(&mut self, mut data: Bytes) -> Result<(), Failure> {
        let len = data.len() as u64;
        if len > self.remaining() {
            return Err(Failure::new(
                result_no::SIZE_MISMATCH,
                format!(
                    "size mismatch: the server sent more than the declared {} bytes",
                    self.size
                ),
                false,
            ));
        }
        while !data.is_empty() {
            let room = WRITE_BATCH - self.buf.len();
            let part = data.split_to(room.min(data.len()));
            self.buf.extend_from_slice(&part);
            if self.buf.len() >= WRITE_BATCH {
                self.flush_buf().await?;
            }
        }
        self.check_rate(len)?;
        if self.written - self.last_checkpoint >= self.checkpoint_bytes {
            self.checkpoint()?;
        }
        if self.last_progress.elapsed() >= self.progress_every {
            self.last_progress = Instant::now();
            self.events.do_send(JobEvent {
                job: self.job,
                event: Event::Progress {
                    bytes_done: self.offset(),
                },
            });
        }
        Ok(())
    }

    /// Count `len` new bytes; once a window is over, fail the attempt (a
    /// retryable 23) if it brought fewer than `min_rate` bytes per second.
    /// The last bytes of the file are never refused.
    fn check_rate(&mut self, len: u64) -> Result<(), Failure> {
        if self.remaining() == 0 {
            return Ok(());
        }
        self.rate.count(len, Instant::now()).map_err(|(bytes, elapsed)| {
            Failure::new(
                result_no::TRANSFER,
                format!(
                    "too slow: {bytes} bytes in {:.1} s at byte {}, below the minimum of {} bytes/s",
                    elapsed.as_secs_f64(),
                    self.offset(),
                    self.rate.min_rate
                ),
                true,
            )
        })
    }

    /// Hand the gathered bytes to the writer and, unless they go into a
    /// slot, to the verifier.
    async fn flush_buf(&mut self) -> Result<(), Failure> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.written += chunk.len() as u64;
        if self.slot {
            self.disk.write(chunk).await?;
        } else {
            self.disk.write(chunk.clone()).await?;
            let job = self.job;
            self.tell_verifier(VerifyMsg::Chunk { job, data: chunk })
                .await;
        }
        Ok(())
    }

    /// Hand `msg` to the verifier, first waiting for it to catch up if
    /// [`VERIFY_WINDOW`] messages are still pending.
    async fn tell_verifier(&mut self, msg: VerifyMsg) {
        if self.in_flight.len() >= VERIFY_WINDOW {
            if let Some(oldest) = self.in_flight.pop_front() {
                let _ = oldest.await;
            }
        }
        self.in_flight.push_back(self.verifier.send(msg));
    }

    /// Make everything received durable, and return the durable offset.
    pub(super) async fn sync(&mut self) -> Result<u64, Failure> {
        self.flush_buf().await?;
        self.disk.sync().await
    }

    /// The agent stops: make every byte received so far durable and wait
    /// until its offset is committed, so the next start re-fetches none of
    /// them. Returns the durable offset.
    pub(super) async fn pause(&mut self) -> Result<u64, Failure> {
        let offset = self.sync().await?;
        if offset > self.last_checkpoint {
            self.last_checkpoint = offset;
            let event = Event::Checkpoint {
                offset,
                validator: self.validator.clone(),
            };
            let job = self.job;
            self.events
                .send(JobEvent { job, event })
                .await
                .map_err(|e| {
                    Failure::new(
                        result_no::TRANSFER,
                        format!("cannot record the checkpoint: {e}"),
                        true,
                    )
                })?;
        }
        Ok(offset)
    }

    /// Have the writer fsync what it has and then report the offset for
    /// commit; the transfer goes on meanwhile.
    fn checkpoint(&mut self) -> Result<(), Failure> {
        // At what is handed over; a batch still being gathered counts in
        // the next one.
        self.last_checkpoint = self.written;
        self.disk.checkpoint(self.validator.clone())
    }

    /// The transfer is over: make it durable and let the verifier catch up.
    pub(super) async fn complete(&mut self) -> Result<(), Failure> {
        self.sync().await?;
        while let Some(pending) = self.in_flight.pop_front() {
            let _ = pending.await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Transfer;
    use fwagent_state::{Firmware, Protocol, Secret, Source};
    use std::sync::{Arc, Mutex};

    /// What the sink told its peers, in order (one mailbox for both).
    #[derive(Debug, PartialEq, Eq)]
    enum Told {
        Prime { len: u64, medium: bool },
        Chunk(usize),
        Durable { from: u64, to: u64, crc: u32 },
        Checkpoint(u64),
    }

    /// A stand-in for the Upgrade and the Verify actor.
    #[derive(Clone, Default)]
    struct Peers(Arc<Mutex<Vec<Told>>>);

    impl Actor for Peers {
        type Context = Context<Self>;
    }

    impl Handler<JobEvent> for Peers {
        type Result = ();

        fn handle(&mut self, msg: JobEvent, _ctx: &mut Context<Self>) {
            if let Event::Checkpoint { offset, .. } = msg.event {
                self.0.lock().expect("lock").push(Told::Checkpoint(offset));
            }
        }
    }

    impl Handler<VerifyMsg> for Peers {
        type Result = ();

        fn handle(&mut self, msg: VerifyMsg, _ctx: &mut Context<Self>) {
            let told = match msg {
                VerifyMsg::Prime { len, medium, .. } => Told::Prime { len, medium },
                VerifyMsg::Chunk { data, .. } => Told::Chunk(data.len()),
                VerifyMsg::Durable { from, to, crc, .. } => Told::Durable { from, to, crc },
                VerifyMsg::Finish { .. } | VerifyMsg::Forget { .. } => return,
            };
            self.0.lock().expect("lock").push(told);
        }
    }

    fn fetch_job(size: u64) -> FetchJob {
        FetchJob {
            job: 1,
            source: Source {
                protocol: Protocol::Http,
                host: "127.0.0.1".into(),
                port: 80,
                path: "/".into(),
                url: "http://127.0.0.1/image".into(),
                user: Secret::default(),
                password: Secret::default(),
            },
            firmware: Firmware {
                name: "image".into(),
                md5: String::new(),
                size,
                signature: None,
            },
            transfer: Transfer::default(),
        }
    }

    /// 10 MiB through a sink in 1 MiB writes; what its peers were told.
    async fn stream(slot: bool) -> (Vec<Told>, Vec<u8>, Vec<u8>) {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("image");
        let image: Vec<u8> = (0..10 * MIB).map(|i| (i * 31 % 251) as u8).collect();
        let peers = Peers::default();
        let told = peers.0.clone();
        let addr = peers.start();
        let staged = Staged {
            path: path.clone(),
            resumable: true,
            read_back: slot,
            stale: None,
        };
        let job = fetch_job(image.len() as u64);
        let peers = (addr.clone().recipient(), addr.recipient());
        let mut sink = Sink::open(&job, staged, 0, None, peers, Gate::default())
            .await
            .expect("opened");
        for piece in image.chunks(MIB as usize) {
            let piece = Bytes::copy_from_slice(piece);
            sink.write(piece).await.expect("written");
        }
        sink.complete().await.expect("complete");
        // Let the mailbox drain (the last checkpoint is sent, not awaited).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let told = std::mem::take(&mut *told.lock().expect("lock"));
        (told, image, std::fs::read(&path).expect("read"))
    }

    #[actix::test]
    async fn a_slot_download_names_each_fsynced_range_with_the_crc_of_what_was_received() {
        let run = tokio::time::timeout(Duration::from_secs(30), stream(true));
        let (told, image, file) = run.await.expect("in time");
        assert!(file == image, "the slot holds the image");
        let mib = 1u64 << 20;
        let durable = |from: u64, to: u64| Told::Durable {
            from,
            to,
            crc: crc32fast::hash(&image[from as usize..to as usize]),
        };
        assert_eq!(
            told,
            vec![
                Told::Prime {
                    len: 0,
                    medium: true
                },
                durable(0, 4 * mib),
                Told::Checkpoint(4 * mib),
                durable(4 * mib, 8 * mib),
                Told::Checkpoint(8 * mib),
                durable(8 * mib, 10 * mib),
            ],
            "the verifier hears of a range only once it is fsynced, before its checkpoint"
        );
    }

    #[actix::test]
    async fn a_partial_file_download_hands_every_batch_to_the_verifier() {
        let run = tokio::time::timeout(Duration::from_secs(30), stream(false));
        let (told, image, file) = run.await.expect("in time");
        assert!(file == image);
        let chunks: usize = told
            .iter()
            .map(|t| match t {
                Told::Chunk(n) => *n,
                _ => 0,
            })
            .sum();
        assert_eq!(chunks, image.len(), "every byte, in batches");
        assert!(!told.iter().any(|t| matches!(t, Told::Durable { .. })));
        let checkpoints: Vec<&Told> = told
            .iter()
            .filter(|t| matches!(t, Told::Checkpoint(_)))
            .collect();
        assert_eq!(
            checkpoints,
            [&Told::Checkpoint(4 << 20), &Told::Checkpoint(8 << 20)]
        );
    }

    #[test]
    fn a_drip_fails_once_its_window_ends_and_a_steady_flow_never_does() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // 100 bytes/s over 2 s windows; one byte a second.
        let mut drip = RateFloor::new(100, Duration::from_secs(2));
        assert_eq!(drip.count(1, at(0)), Ok(()));
        assert_eq!(drip.count(1, at(1000)), Ok(()));
        assert_eq!(drip.count(1, at(2000)), Err((3, Duration::from_secs(2))));
        // 150 bytes a second, for a minute: each window passes and restarts.
        let mut steady = RateFloor::new(100, Duration::from_secs(2));
        for s in 0..60 {
            assert_eq!(steady.count(150, at(s * 1000)), Ok(()), "second {s}");
        }
        // A long wait, then plenty: judged on the bytes, not the wait.
        let mut burst = RateFloor::new(100, Duration::from_secs(2));
        assert_eq!(burst.count(10, at(0)), Ok(()));
        assert_eq!(burst.count(100_000, at(9000)), Ok(()));
        // Off.
        let mut off = RateFloor::new(0, Duration::from_secs(2));
        assert_eq!(off.count(1, at(0)), Ok(()));
        assert_eq!(off.count(1, at(60_000)), Ok(()));
    }
}
