//! The Download actor and what every protocol's fetcher writes through.
//!
//! A [`Fetcher`] (HTTP, FTP) knows its protocol only; the [`Sink`] it writes
//! into does the rest, the same for every protocol (`sink`), with the file
//! I/O on a thread of its own (`disk`). The actor runs each transfer as a
//! spawned task and reports how it ended as a [`JobEvent`]; a new
//! `StartDownload` for the same job replaces the old task, so the command
//! is idempotent.
//!
//! Where signatures are checked (`--trust-key`) and the request carries
//! none, a transfer that has the whole image then fetches `<name>.sig`
//! from beside it, with the same protocol and credentials
//! ([`Fetcher::fetch_small`]), and keeps it durably in
//! `downloads/<job>.sig` for the Verify actor before it reports
//! `Downloaded`; a server without one (not found) leaves none there.

mod disk;
mod sink;

pub use sink::Sink;

use super::flash::staging::{Discard, Stage, StagingPeer};
use super::verify::VerifyMsg;
pub use super::BoxFuture;
use super::{JobEvent, Transfer};
use crate::{crash, fsutil, signature};
use actix::prelude::*;
use disk::Gate;
use fwagent_state::{result_no, Event, Failure, Firmware, JobId, Protocol, Redactor, Source};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What a fetcher needs to know.
#[derive(Clone, Debug)]
pub struct FetchJob {
    pub job: JobId,
    pub source: Source,
    pub firmware: Firmware,
    pub transfer: Transfer,
}

/// One protocol's way of fetching a file.
pub trait Fetcher: Send + Sync + 'static {
    /// Fetch `job.source` from `sink.offset()` to the end, writing every byte
    /// through `sink`. Resume from a non-zero offset only if the server's file
    /// still matches `sink.validator()`; otherwise call [`Sink::restart`].
    /// Return once `sink.offset()` equals the firmware's size, or with the
    /// failure in PROTOCOL.md's result numbers.
    fn fetch<'a>(
        &'a self,
        job: &'a FetchJob,
        sink: &'a mut Sink,
    ) -> BoxFuture<'a, Result<(), Failure>>;

    /// Fetch the small file at `url` (beside the image: its `.sig`) into
    /// memory, with `job`'s credentials and limits: at most `limit` bytes.
    /// `Ok(None)` when the server has no such file (HTTP 404/410, FTP
    /// 550); any other failure as PROTOCOL.md's result numbers.
    fn fetch_small<'a>(
        &'a self,
        job: &'a FetchJob,
        url: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, Failure>>;
}

/// Start (or restart) a job's transfer.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct StartDownload {
    pub fetch: FetchJob,
    pub offset: u64,
    pub validator: Option<String>,
    pub delay: Duration,
}

/// Stop a job's transfer, if one runs, and with `discard` remove what it
/// staged (the partial file, a slot's note). Doing it here, on the arbiter
/// that runs the transfers, means no task of the job can recreate it
/// afterwards.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct AbortDownload {
    pub job: JobId,
    pub discard: bool,
}

/// The agent stops: every transfer checkpoints what it has received
/// (fsync, then the offset committed) and ends; answered once all have, or
/// after [`DRAIN_WAIT`].
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Drain;

/// How long [`Drain`] waits for the transfers' last checkpoints (an fsync
/// and a commit each).
pub const DRAIN_WAIT: Duration = Duration::from_secs(10);

/// Fetchers by protocol.
#[derive(Clone, Default)]
pub struct Fetchers(HashMap<Protocol, Arc<dyn Fetcher>>);

impl Fetchers {
    pub fn with(mut self, protocol: Protocol, fetcher: Arc<dyn Fetcher>) -> Self {
        self.0.insert(protocol, fetcher);
        self
    }

    pub fn supports(&self, protocol: Protocol) -> bool {
        self.0.contains_key(&protocol)
    }

    /// The protocols there is a fetcher for.
    pub fn protocols(&self) -> std::collections::HashSet<Protocol> {
        self.0.keys().copied().collect()
    }
}

pub struct Download {
    fetchers: Fetchers,
    staging: StagingPeer,
    events: Recipient<JobEvent>,
    verifier: Recipient<VerifyMsg>,
    running: HashMap<JobId, Running>,
    /// Where signatures are checked: fetch each image's `.sig` into this
    /// state directory's `downloads/` ([`super::Paths::sig`]).
    signatures: Option<super::Paths>,
}

/// A transfer task, the switch that asks it to pause for a stop, and the
/// gate that stops its disk writer.
struct Running {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
    gate: Gate,
}

impl Running {
    /// Abort the task; once this returns, its writer writes nothing more.
    /// Whether it was still running: a task that reported how it ended
    /// (its last act) has finished, and aborting it stops nothing.
    fn abort(self) -> bool {
        let was_running = !self.task.is_finished();
        self.task.abort();
        self.gate.close();
        was_running
    }
}

impl Download {
    pub fn new(
        fetchers: Fetchers,
        staging: StagingPeer,
        events: Recipient<JobEvent>,
        verifier: Recipient<VerifyMsg>,
        signatures: Option<super::Paths>,
    ) -> Self {
        Download {
            fetchers,
            staging,
            events,
            verifier,
            running: HashMap::new(),
            signatures,
        }
    }
}

impl Actor for Download {
    type Context = Context<Self>;
}

impl Handler<StartDownload> for Download {
    type Result = ();

    fn handle(&mut self, msg: StartDownload, _ctx: &mut Context<Self>) {
        let job = msg.fetch.job;
        if let Some(old) = self.running.remove(&job) {
            old.abort();
        }
        let events = self.events.clone();
        let verifier = self.verifier.clone();
        let fetcher = self.fetchers.0.get(&msg.fetch.source.protocol).cloned();
        let stage = self.staging.stage.clone();
        // The request's own signature needs no file.
        let sig_file = self
            .signatures
            .as_ref()
            .filter(|_| msg.fetch.firmware.signature.is_none())
            .map(|paths| paths.sig(job));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let gate = Gate::default();
        let writer_gate = gate.clone();
        let task = actix_rt::spawn(async move {
            if !msg.delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(msg.delay) => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
            }
            let peers = (events.clone(), verifier);
            let ended = run(msg, fetcher, sig_file, &stage, peers, writer_gate, stopped).await;
            if let Some(event) = ended {
                events.do_send(JobEvent { job, event });
            }
        });
        self.running.retain(|_, r| !r.task.is_finished());
        self.running.insert(job, Running { task, stop, gate });
    }
}

impl Handler<Drain> for Download {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Drain, _ctx: &mut Context<Self>) -> Self::Result {
        let tasks: Vec<_> = self
            .running
            .drain()
            .map(|(_, r)| {
                r.stop.send_replace(true);
                r.task
            })
            .collect();
        Box::pin(async move {
            let all = futures_join(tasks);
            if tokio::time::timeout(DRAIN_WAIT, all).await.is_err() {
                tracing::warn!("a transfer did not reach its checkpoint in time; stopping anyway (it resumes from the last one)");
            }
        })
    }
}

/// Wait for every task (their results do not matter).
async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

impl Handler<AbortDownload> for Download {
    type Result = ();

    fn handle(&mut self, msg: AbortDownload, _ctx: &mut Context<Self>) {
        // The clean-up of an ended upgrade comes here too, after its
        // transfer has finished: only a transfer still running is aborted.
        if let Some(running) = self.running.remove(&msg.job) {
            if running.abort() {
                tracing::info!(job = msg.job, "download aborted");
            }
        }
        self.verifier.do_send(VerifyMsg::Forget { job: msg.job });
        if msg.discard {
            self.staging.discard.do_send(Discard { job: msg.job });
        }
    }
}

/// The server's file is `server` bytes, not the image's `size` (30, final).
pub fn size_mismatch(server: u64, size: u64) -> Failure {
    Failure::new(
        result_no::SIZE_MISMATCH,
        format!("size mismatch: the server's file is {server} bytes, expected {size}"),
        false,
    )
}

/// Nothing arrived for `idle` at byte `offset` (retryable).
pub fn no_data(idle: Duration, offset: u64) -> Failure {
    Failure::new(
        result_no::TRANSFER,
        format!("no data for {idle:?} at byte {offset}"),
        true,
    )
}

/// One transfer attempt, start to end, as the event that reports it; `None`
/// when `stop` paused it (what it received is durable and committed).
async fn run(
    msg: StartDownload,
    fetcher: Option<Arc<dyn Fetcher>>,
    sig_file: Option<PathBuf>,
    stage: &Recipient<Stage>,
    peers: (Recipient<JobEvent>, Recipient<VerifyMsg>),
    gate: Gate,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Option<Event> {
    let Some(fetcher) = fetcher else {
        return Some(Event::DownloadFailed {
            failure: Failure::new(
                result_no::TRANSFER,
                format!("no downloader for {}", msg.fetch.source.protocol),
                false,
            ),
            durable_offset: msg.offset,
        });
    };
    let staged = stage.send(Stage {
        job: msg.fetch.job,
        firmware: msg.fetch.firmware.clone(),
    });
    let staged = tokio::select! {
        staged = staged => staged.unwrap_or_else(|e| {
            Err(Failure::new(result_no::FLASH_FAILED, format!("the flash actor did not stage the image: {e}"), false))
        }),
        _ = stop.wait_for(|s| *s) => return None,
    };
    let opened = match staged {
        Ok(staged) => {
            let validator = msg.validator.clone();
            let open = Sink::open(&msg.fetch, staged, msg.offset, validator, peers, gate);
            tokio::select! {
                opened = open => opened,
                _ = stop.wait_for(|s| *s) => return None,
            }
        }
        Err(failure) => Err(failure),
    };
    let mut sink = match opened {
        Ok(sink) => sink,
        Err(failure) => {
            return Some(Event::DownloadFailed {
                failure,
                durable_offset: 0,
            })
        }
    };
    tracing::info!(job = msg.fetch.job, offset = sink.offset(), url = %msg.fetch.source.url, "download starting");
    let fetched = if sink.remaining() == 0 {
        Ok(())
    } else {
        // A stop drops the fetch between two writes: what the sink holds
        // is whole, and is made durable and committed before the exit.
        let fetch = fetcher.fetch(&msg.fetch, &mut sink);
        let stopped = tokio::select! {
            fetched = fetch => Ok(fetched),
            _ = stop.wait_for(|s| *s) => Err(()),
        };
        match stopped {
            Ok(fetched) => fetched,
            Err(()) => {
                match sink.pause().await {
                    Ok(offset) => tracing::info!(
                        job = msg.fetch.job,
                        offset,
                        "download paused for the stop; every byte received is durable"
                    ),
                    Err(failure) => {
                        tracing::warn!(job = msg.fetch.job, error = %failure.description, "download stopped; it resumes from the last checkpoint")
                    }
                }
                return None;
            }
        }
    };
    let fetched = match (fetched, sig_file) {
        (Ok(()), Some(sig_file)) if sink.remaining() == 0 => {
            fetch_signature(&msg.fetch, fetcher.as_ref(), &sig_file).await
        }
        (fetched, _) => fetched,
    };
    Some(ended(&msg, &mut sink, fetched).await)
}

/// The image is in: fetch `<name>.sig` from beside it into `sig_file`
/// (made durable before `Downloaded` is reported), or make sure none is
/// there when the server has none.
async fn fetch_signature(
    job: &FetchJob,
    fetcher: &dyn Fetcher,
    sig_file: &Path,
) -> Result<(), Failure> {
    let url = format!("{}{}", job.source.url, signature::SIG_SUFFIX);
    let fetched = fetcher
        .fetch_small(job, &url, signature::MAX_SIG_FILE)
        .await
        .map_err(|mut f| {
            f.description = format!("fetching the signature {url}: {}", f.description);
            f
        })?;
    let Some(bytes) = fetched else {
        tracing::info!(job = job.job, url = %url, "no signature beside the image");
        return match std::fs::remove_file(sig_file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(sink::io_failure("cannot remove", sig_file, e)),
        };
    };
    write_durably(sig_file, &bytes)?;
    tracing::info!(job = job.job, url = %url, bytes = bytes.len(), "signature fetched");
    Ok(())
}

/// Write `bytes` to `path` whole or not at all: a temporary file, fsynced,
/// renamed over it, the directory fsynced.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    let dir = fsutil::parent_dir(path);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        fsutil::sync_dir(dir)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        sink::io_failure("cannot write", path, e)
    })
}

/// How a transfer that ran to its end (or failed) is reported.
async fn ended(msg: &StartDownload, sink: &mut Sink, fetched: Result<(), Failure>) -> Event {
    let fetched = fetched.and_then(|()| {
        if sink.remaining() == 0 {
            Ok(())
        } else {
            Err(Failure::new(
                result_no::TRANSFER,
                format!("transfer ended at byte {} of {}", sink.offset(), sink.size),
                true,
            ))
        }
    });
    match fetched {
        Ok(()) => match sink.complete().await {
            Ok(()) => {
                crash::point("after-download");
                Event::Downloaded
            }
            Err(failure) => Event::DownloadFailed {
                failure,
                durable_offset: sink.durable(),
            },
        },
        Err(failure) => {
            // The server's words, before the state machine redacts them.
            let source = &msg.fetch.source;
            let said = Redactor::new([&source.user, &source.password]).text(&failure.description);
            tracing::warn!(job = msg.fetch.job, error = %said, "download attempt failed");
            let durable_offset = match sink.sync().await {
                Ok(offset) => offset,
                Err(_) => sink.durable(),
            };
            Event::DownloadFailed {
                failure,
                durable_offset,
            }
        }
    }
}
