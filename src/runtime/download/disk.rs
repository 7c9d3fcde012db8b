//! The sink's disk writer: a thread of its own that appends the batches the
//! transfer hands it, fsyncs at the checkpoints and reports what each fsync
//! made durable, in order. So the transfer never waits for the disk: it
//! queues a batch and reads on, and waits only when [`QUEUE`] batches are
//! still unwritten (the disk is slower than the network). The durability
//! rule is unchanged: a checkpoint's offset is reported for commit only
//! after the fsync of every byte before it, and a slot's verifier hears of
//! a range only once it is durable (super::verify reads it back from the
//! medium).

use super::super::verify::VerifyMsg;
use super::super::JobEvent;
use super::sink::io_failure;
use crate::{crash, fsutil};
use actix::prelude::*;
use bytes::Bytes;
use fwagent_state::{result_no, Event, Failure, JobId};
use std::fs::File;
use std::io::{self, Seek, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Batches handed to the writer and not yet written before the transfer
/// waits (each one write batch, 256 KiB: 1 MiB in all).
pub const QUEUE: usize = 4;

/// Closed, a writer starts no more operations; closing waits for the one
/// under way. The Download actor closes a job's gate before it removes what
/// the job staged, so no write lands after that.
#[derive(Clone, Debug, Default)]
pub struct Gate(Arc<Mutex<bool>>);

impl Gate {
    pub fn close(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = true;
    }
}

enum Op {
    /// Append these bytes.
    Write(Bytes),
    /// fsync; then tell a slot's verifier the range, report a checkpoint
    /// (with this validator) when asked, and answer the durable offset.
    Sync {
        checkpoint: Option<Option<String>>,
        done: Option<oneshot::Sender<u64>>,
    },
    /// Report the durable offset again, with a new validator.
    Validator(Option<String>),
    /// Cut a regular file back to zero and write from there.
    Restart { done: oneshot::Sender<()> },
}

/// What the file is and who hears of it.
pub struct Target {
    pub job: JobId,
    pub path: PathBuf,
    /// Positioned at `written`.
    pub file: File,
    pub regular: bool,
    /// Bytes in the file, all durable.
    pub written: u64,
    /// The image's size (for the `mid-download` crash point).
    pub size: u64,
    /// A slot: verified as read back from the medium, range by range.
    pub slot: bool,
    pub events: Recipient<JobEvent>,
    pub verifier: Recipient<VerifyMsg>,
}

/// The transfer's end of the writer.
pub struct Disk {
    ops: mpsc::UnboundedSender<Op>,
    room: Arc<Semaphore>,
    failed: Arc<Mutex<Option<Failure>>>,
    durable: Arc<AtomicU64>,
    gate: Gate,
}

impl Disk {
    /// Start the writer thread of `target`, stopped by `gate`.
    pub fn start(target: Target, gate: Gate) -> Result<Disk, Failure> {
        let (ops, queued) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(QUEUE));
        let failed = Arc::new(Mutex::new(None));
        let durable = Arc::new(AtomicU64::new(target.written));
        let writer = Writer {
            received: target.slot.then(crc32fast::Hasher::new),
            told: target.written,
            target,
            durable: durable.clone(),
        };
        let (r, f, g) = (room.clone(), failed.clone(), gate.clone());
        std::thread::Builder::new()
            .name("fwagent-disk".into())
            .spawn(move || writer.run(queued, r, f, g))
            .map_err(|e| {
                Failure::new(
                    result_no::TRANSFER,
                    format!("cannot start the disk writer: {e}"),
                    true,
                )
            })?;
        Ok(Disk {
            ops,
            room,
            failed,
            durable,
            gate,
        })
    }

    /// The offset the last fsync made durable.
    pub fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Queue `data` for writing; waits only while [`QUEUE`] batches are.
    pub async fn write(&self, data: Bytes) -> Result<(), Failure> {
        match self.room.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return Err(self.failure()),
        }
        self.send(Op::Write(data))
    }

    /// Ask for a checkpoint: fsync, then report `offset` with `validator`
    /// for commit. Does not wait.
    pub fn checkpoint(&self, validator: Option<String>) -> Result<(), Failure> {
        self.send(Op::Sync {
            checkpoint: Some(validator),
            done: None,
        })
    }

    /// fsync everything queued; returns the durable offset.
    pub async fn sync(&self) -> Result<u64, Failure> {
        let (done, synced) = oneshot::channel();
        let done = Some(done);
        self.send(Op::Sync {
            checkpoint: None,
            done,
        })?;
        synced.await.map_err(|_| self.failure())
    }

    /// Report the durable offset again with `validator`, after what is queued.
    pub fn validator(&self, validator: Option<String>) -> Result<(), Failure> {
        self.send(Op::Validator(validator))
    }

    /// Cut the file back to zero once what is queued is written.
    pub async fn restart(&self) -> Result<(), Failure> {
        let (done, restarted) = oneshot::channel();
        self.send(Op::Restart { done })?;
        restarted.await.map_err(|_| self.failure())
    }

    fn send(&self, op: Op) -> Result<(), Failure> {
        self.ops.send(op).map_err(|_| self.failure())
    }

    /// Why the writer stopped.
    fn failure(&self) -> Failure {
        let failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        failed.clone().unwrap_or_else(|| {
            Failure::new(
                result_no::TRANSFER,
                "the disk writer stopped".to_string(),
                true,
            )
        })
    }
}

impl Drop for Disk {
    /// A transfer dropped (aborted, replaced, ended) writes nothing more.
    fn drop(&mut self) {
        self.gate.close();
    }
}

struct Writer {
    target: Target,
    /// CRC-32 of the bytes since the last range a slot's verifier was told of.
    received: Option<crc32fast::Hasher>,
    /// Where that range begins.
    told: u64,
    durable: Arc<AtomicU64>,
}

impl Writer {
    fn run(
        mut self,
        mut queued: mpsc::UnboundedReceiver<Op>,
        room: Arc<Semaphore>,
        failed: Arc<Mutex<Option<Failure>>>,
        gate: Gate,
    ) {
        while let Some(op) = queued.blocking_recv() {
            let closed = gate.0.lock().unwrap_or_else(PoisonError::into_inner);
            if *closed {
                break;
            }
            let wrote = matches!(op, Op::Write(_));
            if let Err(failure) = self.apply(op) {
                *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(failure);
                break;
            }
            drop(closed);
            if wrote {
                room.add_permits(1);
            }
        }
        // The file closes first: once the transfer learns that the writer
        // ended (a closed `room`, a dropped sync reply), the upgrade may end
        // and its partial file be removed, and a next request counts the
        // free space; an unlinked file still open would hold its blocks.
        drop(self);
        // The transfer's next write or sync learns why.
        room.close();
        drop(queued);
    }

    fn apply(&mut self, op: Op) -> Result<(), Failure> {
        match op {
            Op::Write(data) => {
                let t = &mut self.target;
                t.file
                    .write_all(&data)
                    .map_err(|e| io_failure("cannot write", &t.path, e))?;
                if let Some(crc) = &mut self.received {
                    crc.update(&data);
                }
                let before = t.written;
                t.written += data.len() as u64;
                // Start writing the batch out now, so the checkpoint's
                // fsync finds little left to do and the queue drains fast.
                fsutil::start_write_out(&t.file, before, t.written);
                if before * 2 < t.size && t.written * 2 >= t.size {
                    crash::point("mid-download");
                }
            }
            Op::Sync { checkpoint, done } => {
                let offset = self.sync()?;
                if let Some(validator) = checkpoint {
                    crash::point("after-checkpoint-fsync");
                    let event = Event::Checkpoint { offset, validator };
                    let job = self.target.job;
                    self.target.events.do_send(JobEvent { job, event });
                }
                if let Some(done) = done {
                    let _ = done.send(offset);
                }
            }
            Op::Validator(validator) => {
                let t = &self.target;
                let offset = self.durable.load(Ordering::Acquire);
                let event = Event::Checkpoint { offset, validator };
                t.events.do_send(JobEvent { job: t.job, event });
            }
            Op::Restart { done } => {
                let t = &mut self.target;
                if t.regular {
                    t.file
                        .set_len(0)
                        .map_err(|e| io_failure("cannot truncate", &t.path, e))?;
                }
                t.file
                    .seek(io::SeekFrom::Start(0))
                    .map_err(|e| io_failure("cannot seek", &t.path, e))?;
                t.written = 0;
                self.told = 0;
                if let Some(crc) = &mut self.received {
                    crc.reset();
                }
                self.durable.store(0, Ordering::Release);
                let _ = done.send(());
            }
        }
        Ok(())
    }

    /// fsync what is written; a slot's verifier is told which bytes it can
    /// now read back. Returns the durable offset.
    fn sync(&mut self) -> Result<u64, Failure> {
        let t = &mut self.target;
        t.file
            .sync_data()
            .map_err(|e| io_failure("cannot fsync", &t.path, e))?;
        let (from, to) = (self.told, t.written);
        if let Some(received) = self.received.as_mut().filter(|_| to > from) {
            let crc = std::mem::take(received).finalize();
            self.told = to;
            let job = t.job;
            t.verifier
                .do_send(VerifyMsg::Durable { job, from, to, crc });
        }
        self.durable.store(to, Ordering::Release);
        Ok(to)
    }
}
