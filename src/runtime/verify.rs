//! The Verify actor: md5 and size over the image, streamed.
//!
//! The downloader hands every chunk here as it writes it, so the image is
//! hashed while it arrives, on this actor's own thread. After a restart the
//! downloader first asks for the durable prefix to be re-hashed ([`VerifyMsg::Prime`]).
//! When the upgrade enters `verifying`, [`VerifyMsg::Finish`] compares size
//! and digest (re-hashing the whole file from the medium if the streamed
//! state does not cover it) and reports `Verified` or `VerifyFailed`.
//!
//! An image that streams into an A/B slot is hashed from the medium
//! instead: after each checkpoint's fsync the downloader names the range it
//! made durable ([`VerifyMsg::Durable`], with the CRC-32 of the bytes it
//! received there), and this actor drops the range's cached pages, reads it
//! back from the medium and hashes that. So `Verified` for a slot means the
//! medium holds the image, and flashing it needs no second read; a range
//! whose read-back CRC differs from what was received is a card that lost
//! writes (50), not a bad download (1). The read-back runs here, beside the
//! transfer, one checkpoint behind it.
//!
//! With trusted keys (`--trust-key`) the same pass computes the image's
//! SHA-256 beside its md5 (a resumed download re-hashes its durable prefix
//! for both), and once size and md5 match, [`check_signature`] checks the
//! signature (the request's `info.fileInfo.signature`, else the `.sig` the
//! downloader fetched beside the image) before `Verified` may be reported:
//! missing (with `--require-signature`) or invalid is 32. Without trusted
//! keys no SHA-256 is computed, and the path stays as fast as before.

use super::flash::staging::Staging;
use super::JobEvent;
use crate::signature::{self, SignaturePolicy};
use crate::{crash, fsutil};
use actix::prelude::*;
use bytes::Bytes;
use fwagent_state::{result_no, Event, Failure, Firmware, JobId};
use md5::{Digest, Md5};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The SHA-256 being computed (only where signatures are checked).
type Sha = ring::digest::Context;

fn new_sha(wanted: bool) -> Option<Sha> {
    wanted.then(|| Sha::new(&ring::digest::SHA256))
}

/// Batches queued for the SHA-256 thread before a chunk waits for it (each
/// a reference to a batch the md5 holds anyway, 256 KiB).
const SHA_WINDOW: usize = 4;

/// The SHA-256 of a download, here or on a thread of its own. Streamed
/// chunks go to the thread, so md5 and SHA-256 run side by side and
/// checking signatures costs the transfer no more than md5 alone; what is
/// read here (a resumed prefix, a slot read back) is hashed here.
enum ShaState {
    Here(Box<Sha>),
    Thread(ShaThread),
}

enum ShaMsg {
    Data(Bytes),
    Finish(std::sync::mpsc::Sender<ring::digest::Digest>),
}

/// The thread's end of the channel; dropping it ends the thread.
struct ShaThread {
    tx: std::sync::mpsc::SyncSender<ShaMsg>,
}

impl ShaThread {
    fn start(mut sha: Sha) -> io::Result<ShaThread> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<ShaMsg>(SHA_WINDOW);
        std::thread::Builder::new()
            .name("fwagent-sha256".into())
            .spawn(move || {
                for msg in rx {
                    match msg {
                        ShaMsg::Data(b) => sha.update(&b),
                        ShaMsg::Finish(reply) => {
                            let _ = reply.send(sha.finish());
                            return;
                        }
                    }
                }
            })?;
        Ok(ShaThread { tx })
    }
}

impl ShaState {
    /// Bytes read here.
    fn update(&mut self, b: &[u8]) -> Result<(), ()> {
        match self {
            ShaState::Here(sha) => {
                sha.update(b);
                Ok(())
            }
            ShaState::Thread(t) => {
                t.tx.send(ShaMsg::Data(Bytes::copy_from_slice(b)))
                    .map_err(drop)
            }
        }
    }

    /// A streamed chunk: to the thread (started on the first one).
    fn update_chunk(self, data: &Bytes) -> Result<ShaState, ()> {
        let thread = match self {
            ShaState::Here(sha) => ShaThread::start(*sha).map_err(drop)?,
            ShaState::Thread(t) => t,
        };
        thread.tx.send(ShaMsg::Data(data.clone())).map_err(drop)?;
        Ok(ShaState::Thread(thread))
    }

    /// The digest, once every byte given is hashed; `None` if the thread is gone.
    fn finish(self) -> Option<ring::digest::Digest> {
        match self {
            ShaState::Here(sha) => Some(sha.finish()),
            ShaState::Thread(t) => {
                let (reply, answer) = std::sync::mpsc::channel();
                t.tx.send(ShaMsg::Finish(reply)).ok()?;
                answer.recv().ok()
            }
        }
    }
}

/// Hash state of one download in progress.
struct Hashing {
    md5: Md5,
    /// With trusted keys only.
    sha: Option<ShaState>,
    len: u64,
    /// Hashed from the medium ([`VerifyMsg::Durable`]), not from the chunks.
    medium: Option<Medium>,
}

/// The image's file, read back range by range.
struct Medium {
    file: File,
    /// The first range whose read-back differed from what was received.
    differs: Option<(u64, u64)>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub enum VerifyMsg {
    /// Start a job's hash over the first `len` bytes of `path`; with
    /// `medium`, read from the medium, and hash what [`VerifyMsg::Durable`]
    /// names from then on rather than chunks.
    Prime {
        job: JobId,
        path: PathBuf,
        len: u64,
        medium: bool,
    },
    /// The next bytes of the image, in order.
    Chunk { job: JobId, data: Bytes },
    /// Bytes `from..to` of the image are durable (fsynced); `crc` is the
    /// CRC-32 of what was received there. Read them back from the medium.
    Durable {
        job: JobId,
        from: u64,
        to: u64,
        crc: u32,
    },
    /// The image is complete (where [`Staging::image`] finds it): check it
    /// against `firmware`.
    Finish { job: JobId, firmware: Firmware },
    /// Drop a job's state (cancelled).
    Forget { job: JobId },
}

pub struct Verify {
    jobs: HashMap<JobId, Hashing>,
    events: Recipient<JobEvent>,
    /// Where a job's image is (read only: the Flash actor owns it).
    staging: Staging,
    /// The read-back buffer, allocated on the first slot download.
    buf: Vec<u8>,
    /// The keys signatures are checked with, and whether one is required.
    signatures: Arc<SignaturePolicy>,
}

impl Verify {
    pub fn new(
        events: Recipient<JobEvent>,
        staging: Staging,
        signatures: Arc<SignaturePolicy>,
    ) -> Self {
        Verify {
            jobs: HashMap::new(),
            events,
            staging,
            buf: Vec::new(),
            signatures,
        }
    }

    /// Hash the first `len` bytes of `path`, from the medium with `medium`.
    fn prime(&mut self, path: &Path, len: u64, medium: bool) -> io::Result<Hashing> {
        let want_sha = self.signatures.checks();
        if !medium {
            let (md5, sha, len) = digests_of_prefix(path, len, want_sha)?;
            return Ok(Hashing {
                md5,
                sha: sha.map(|sha| ShaState::Here(Box::new(sha))),
                len,
                medium: None,
            });
        }
        let file = File::open(path)?;
        let mut md5 = Md5::new();
        let mut sha = new_sha(want_sha);
        fsutil::evict_range(&file, 0, len)?;
        let len = fsutil::read_range(&file, 0, len, read_buf(&mut self.buf), |b| {
            md5.update(b);
            if let Some(sha) = sha.as_mut() {
                sha.update(b);
            }
        })?;
        let medium = Some(Medium {
            file,
            differs: None,
        });
        Ok(Hashing {
            md5,
            sha: sha.map(|sha| ShaState::Here(Box::new(sha))),
            len,
            medium,
        })
    }

    /// Read `from..to` of a slot download back from the medium and hash it.
    fn durable(&mut self, job: JobId, from: u64, to: u64, crc: u32) -> io::Result<()> {
        let Verify { jobs, buf, .. } = self;
        let Some(h) = jobs.get_mut(&job) else {
            return Ok(());
        };
        let Some(medium) = h.medium.as_mut().filter(|_| h.len == from) else {
            // Out of step: Finish re-hashes the whole image instead.
            jobs.remove(&job);
            return Ok(());
        };
        fsutil::evict_range(&medium.file, from, to)?;
        let mut read = crc32fast::Hasher::new();
        let mut sha_lost = false;
        let n = fsutil::read_range(&medium.file, from, to, read_buf(buf), |b| {
            h.md5.update(b);
            if let Some(sha) = h.sha.as_mut() {
                sha_lost |= sha.update(b).is_err();
            }
            read.update(b);
        })?;
        if sha_lost {
            // Finish re-hashes the whole image instead.
            jobs.remove(&job);
            return Ok(());
        }
        h.len += n;
        if (n != to - from || read.finalize() != crc) && medium.differs.is_none() {
            medium.differs = Some((from, to));
        }
        Ok(())
    }
}

/// The read-back buffer, allocated on first use.
fn read_buf(buf: &mut Vec<u8>) -> &mut [u8] {
    if buf.is_empty() {
        buf.resize(fsutil::MEDIUM_READ_BUF, 0);
    }
    buf
}

impl Actor for Verify {
    type Context = Context<Self>;
}

/// The read buffer for hashing and flashing: big enough for sequential I/O,
/// small enough for a gateway's RAM (make bench measures peak RSS).
pub const IO_BUF: usize = 256 << 10;

/// md5 of the first `len` bytes of `path` (fewer if the file is shorter).
pub fn hash_prefix(path: &Path, len: u64) -> io::Result<(Md5, u64)> {
    let (md5, _, done) = digests_of_prefix(path, len, false)?;
    Ok((md5, done))
}

/// md5, and with `want_sha` SHA-256, of the first `len` bytes of `path`,
/// in one read.
fn digests_of_prefix(path: &Path, len: u64, want_sha: bool) -> io::Result<(Md5, Option<Sha>, u64)> {
    let mut md5 = Md5::new();
    let mut sha = new_sha(want_sha);
    let mut file = std::fs::File::open(path)?.take(len);
    let mut buf = vec![0u8; IO_BUF];
    let mut done = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
        if let Some(sha) = sha.as_mut() {
            sha.update(&buf[..n]);
        }
        done += n as u64;
    }
    Ok((md5, sha, done))
}

/// md5 (and with `want_sha` SHA-256) of the first `len` bytes of `path` as
/// its medium holds them (the file is fsynced first, so its pages are
/// clean and can be dropped).
fn hash_from_medium(path: &Path, len: u64, want_sha: bool) -> io::Result<(Md5, Option<Sha>, u64)> {
    let file = File::open(path)?;
    file.sync_data()?;
    let mut md5 = Md5::new();
    let mut sha = new_sha(want_sha);
    let len = fsutil::read_from_medium(&file, len, |b| {
        md5.update(b);
        if let Some(sha) = sha.as_mut() {
            sha.update(b);
        }
    })?;
    Ok((md5, sha, len))
}

/// What was read back from the medium at `path` (`read` bytes, md5
/// `digest`) is not the image: a card that acknowledged writes it dropped
/// (50). `range`: the first bytes known to differ, if known.
pub fn read_back_differs(
    path: &Path,
    read: u64,
    digest: &str,
    firmware: &Firmware,
    range: Option<(u64, u64)>,
) -> Failure {
    let at = match range {
        Some((from, to)) => format!(" in bytes {from}..{to}"),
        None => String::new(),
    };
    Failure::new(
        result_no::FLASH_FAILED,
        format!(
            "read-back of {} from the medium does not match the image{at}: {read} bytes, md5 {digest} (expected {} bytes, md5 {})",
            path.display(),
            firmware.size,
            firmware.md5
        ),
        false,
    )
}

/// Lowercase hex of a finished digest.
pub fn hex_digest(md5: Md5) -> String {
    hex::encode(md5.finalize())
}

/// Where a job's signature is to be found, and the policy it is held to.
struct SignatureCheck<'a> {
    policy: &'a SignaturePolicy,
    /// The `.sig` the downloader fetched from beside the image (absent:
    /// there was none, or none was asked for).
    sig_file: PathBuf,
}

fn check(
    path: &Path,
    firmware: &Firmware,
    streamed: Option<Hashing>,
    signatures: &SignatureCheck<'_>,
) -> Event {
    let failed = |error_no, description: String, retryable| Event::VerifyFailed {
        failure: Failure::new(error_no, description, retryable),
    };
    let unreadable = |e: io::Error| {
        if e.kind() == io::ErrorKind::NotFound {
            // Downloaded, then lost (its directory entry was not durable,
            // or someone removed it): fetch it again.
            return Event::ImageMissing {
                detail: format!("the image {} is gone: {e}", path.display()),
            };
        }
        failed(
            result_no::TRANSFER,
            format!("cannot read the image {}: {e}", path.display()),
            false,
        )
    };
    let mismatch = |size: u64| {
        failed(
            result_no::SIZE_MISMATCH,
            format!("size mismatch: {size} bytes, expected {}", firmware.size),
            false,
        )
    };
    // A file must be the image's size; a block device (a slot) holds the
    // image in its first `size` bytes.
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() != firmware.size => return mismatch(m.len()),
        Ok(_) => {}
        Err(e) => return unreadable(e),
    }
    let want_sha = signatures.policy.checks();
    let streamed = streamed.filter(|h| h.len == firmware.size && h.sha.is_some() == want_sha);
    // The streamed digests, unless the SHA-256 thread was lost.
    let streamed = streamed.and_then(|h| {
        let sha = match h.sha {
            Some(sha) => Some(sha.finish()?),
            None => None,
        };
        Some((h.md5, sha, h.medium.and_then(|m| m.differs)))
    });
    let (md5, sha, differs) = match streamed {
        Some(digests) => digests,
        None => match hash_from_medium(path, firmware.size, want_sha) {
            Ok((md5, sha, len)) if len == firmware.size => (md5, sha.map(Sha::finish), None),
            Ok((_, _, len)) => return mismatch(len),
            Err(e) => return unreadable(e),
        },
    };
    let digest = hex_digest(md5);
    if let Some(range) = differs {
        return Event::VerifyFailed {
            failure: read_back_differs(path, firmware.size, &digest, firmware, Some(range)),
        };
    }
    if digest != firmware.md5 {
        return failed(
            result_no::MD5_MISMATCH,
            format!("md5 mismatch: got {digest}, expected {}", firmware.md5),
            false,
        );
    }
    match check_signature(firmware, sha.as_ref().map(|d| d.as_ref()), signatures) {
        Ok(()) => Event::Verified,
        Err(failure) => Event::VerifyFailed { failure },
    }
}

/// The signature of an image whose size and md5 match: the request's
/// field, else the `.sig` fetched beside it. `sha256`: the image's, where
/// signatures are checked.
fn check_signature(
    firmware: &Firmware,
    sha256: Option<&[u8]>,
    signatures: &SignatureCheck<'_>,
) -> Result<(), Failure> {
    let policy = signatures.policy;
    let refused = |why: String| Failure::new(result_no::SIGNATURE, why, false);
    let (sig, from) = match &firmware.signature {
        Some(field) => (
            signature::parse_field(field)
                .map_err(|e| refused(format!("info.fileInfo.signature: {e}"))),
            "info.fileInfo.signature".to_string(),
        ),
        None => {
            let from = format!("{}{}", firmware.name, signature::SIG_SUFFIX);
            match std::fs::read(&signatures.sig_file) {
                Ok(bytes) => (
                    signature::parse_sig(&bytes).map_err(|e| refused(format!("{from}: {e}"))),
                    from,
                ),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if policy.required {
                        return Err(refused(format!(
                            "signature missing: no info.fileInfo.signature and no {from} beside the image, and --require-signature is set"
                        )));
                    }
                    if policy.checks() {
                        tracing::info!(name = %firmware.name, "the image is not signed (no {from}); accepted: --require-signature is not set");
                    }
                    return Ok(());
                }
                Err(e) => {
                    return Err(Failure::new(
                        result_no::TRANSFER,
                        format!(
                            "cannot read the signature {}: {e}",
                            signatures.sig_file.display()
                        ),
                        false,
                    ))
                }
            }
        }
    };
    let Some(sha256) = sha256.filter(|_| policy.checks()) else {
        tracing::info!(name = %firmware.name, "a signature ({from}) came with the image, but no --trust-key is set to check it with: ignored");
        return Ok(());
    };
    let sig = sig?;
    let statement = signature::statement(&firmware.name, firmware.size, sha256);
    match policy.signer(statement.as_bytes(), &sig) {
        Some(key) => {
            tracing::info!(name = %firmware.name, key = %key.id(), path = %key.path.display(), "signature verified");
            Ok(())
        }
        None => Err(refused(format!(
            "signature invalid: {from} is not a signature by a trusted key ({} of them) of {} ({} bytes, sha256 {})",
            policy.keys.len(),
            firmware.name,
            firmware.size,
            hex::encode(sha256)
        ))),
    }
}

impl Handler<VerifyMsg> for Verify {
    type Result = ();

    fn handle(&mut self, msg: VerifyMsg, _ctx: &mut Context<Self>) {
        match msg {
            VerifyMsg::Prime {
                job,
                path,
                len,
                medium,
            } => {
                let hashing = match self.prime(&path, len, medium) {
                    Ok(h) => h,
                    Err(e) if e.kind() == io::ErrorKind::NotFound && len == 0 && !medium => {
                        Hashing {
                            md5: Md5::new(),
                            sha: new_sha(self.signatures.checks())
                                .map(|sha| ShaState::Here(Box::new(sha))),
                            len: 0,
                            medium: None,
                        }
                    }
                    Err(e) => {
                        // Finish will re-hash the whole file; nothing is lost.
                        tracing::warn!(job = job, error = %e, path = %path.display(), "cannot re-hash the durable prefix");
                        self.jobs.remove(&job);
                        return;
                    }
                };
                self.jobs.insert(job, hashing);
            }
            VerifyMsg::Chunk { job, data } => {
                if let Some(h) = self.jobs.get_mut(&job) {
                    // The SHA-256 thread first, so it hashes while md5 does.
                    let sha = h.sha.take().map(|sha| sha.update_chunk(&data));
                    h.md5.update(&data);
                    h.len += data.len() as u64;
                    match sha {
                        None => {}
                        Some(Ok(sha)) => h.sha = Some(sha),
                        Some(Err(())) => {
                            // Finish re-hashes the whole image instead.
                            tracing::warn!(job = job, "the SHA-256 thread is gone");
                            self.jobs.remove(&job);
                        }
                    }
                }
            }
            VerifyMsg::Durable { job, from, to, crc } => {
                if let Err(e) = self.durable(job, from, to, crc) {
                    // Finish reads the whole image back instead.
                    tracing::warn!(job = job, error = %e, "cannot read the slot back");
                    self.jobs.remove(&job);
                }
            }
            VerifyMsg::Finish { job, firmware } => {
                crash::point("mid-verify");
                let path = self.staging.image(job, &firmware);
                let signatures = SignatureCheck {
                    policy: &self.signatures,
                    sig_file: self.staging.sig(job),
                };
                let event = check(&path, &firmware, self.jobs.remove(&job), &signatures);
                tracing::info!(
                    job = job,
                    ok = matches!(event, Event::Verified),
                    "verification finished"
                );
                self.events.do_send(JobEvent { job, event });
            }
            VerifyMsg::Forget { job } => {
                self.jobs.remove(&job);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::flash::FlashSpec;
    use super::*;
    use base64::Engine;

    fn firmware_of(bytes: &[u8]) -> Firmware {
        Firmware {
            name: "image".into(),
            md5: hex_digest(Md5::new_with_prefix(bytes)),
            size: bytes.len() as u64,
            signature: None,
        }
    }

    /// A slot download of `received` (in two durable ranges) whose medium
    /// then holds `on_medium`, verified against `firmware`.
    async fn verify_slot(on_medium: &[u8], received: &[u8], firmware: Firmware) -> Event {
        let dir = tempfile::tempdir().expect("temp dir");
        let paths = super::super::Paths {
            state_dir: dir.path().to_path_buf(),
        };
        let job = 7;
        // Where Staging finds job 7's image (with file: it is not in a slot).
        let path = paths.part(job);
        std::fs::create_dir_all(paths.downloads()).expect("mkdir");
        std::fs::write(&path, on_medium).expect("write the image");
        let staging = Staging::new(paths, &FlashSpec::File("unused".into()));
        let (events, mut rx) = super::super::stand_in::events();
        let verify = Verify::new(events, staging, Default::default()).start();
        let prime = VerifyMsg::Prime {
            job,
            path: path.clone(),
            len: 0,
            medium: true,
        };
        verify.send(prime).await.expect("primed");
        let half = received.len() as u64 / 2;
        for (from, to) in [(0, half), (half, received.len() as u64)] {
            let crc = crc32fast::hash(&received[from as usize..to as usize]);
            let durable = VerifyMsg::Durable { job, from, to, crc };
            verify.send(durable).await.expect("read back");
        }
        let finish = VerifyMsg::Finish { job, firmware };
        verify.send(finish).await.expect("finished");
        let event = super::super::stand_in::next_event(&mut rx).await;
        assert_eq!(event.job, job);
        event.event
    }

    /// How the image reaches the verifier in [`verify_signed`].
    #[derive(Clone, Copy, Debug)]
    enum Feed {
        /// A slot: read back from the medium range by range.
        Slot,
        /// A partial file resumed at `prefix` (re-hashed), the rest as chunks.
        Resumed { prefix: usize },
        /// Nothing streamed (a restart in `verifying`): Finish reads it all.
        Unstreamed,
    }

    /// `image` fed as `feed`, checked against `firmware` with a key of
    /// `policy`, its `.sig` (if any) written where the downloader puts it.
    async fn verify_signed(
        feed: Feed,
        image: &[u8],
        firmware: Firmware,
        policy: SignaturePolicy,
        sig: Option<&[u8]>,
    ) -> Event {
        let dir = tempfile::tempdir().expect("temp dir");
        let paths = super::super::Paths {
            state_dir: dir.path().to_path_buf(),
        };
        let job = 9;
        let path = paths.part(job);
        std::fs::create_dir_all(paths.downloads()).expect("mkdir");
        std::fs::write(&path, image).expect("write the image");
        if let Some(sig) = sig {
            std::fs::write(paths.sig(job), sig).expect("write the .sig");
        }
        let staging = Staging::new(paths, &FlashSpec::File("unused".into()));
        let (events, mut rx) = super::super::stand_in::events();
        let verify = Verify::new(events, staging, Arc::new(policy)).start();
        let len = image.len() as u64;
        match feed {
            Feed::Slot => {
                let prime = VerifyMsg::Prime {
                    job,
                    path: path.clone(),
                    len: 0,
                    medium: true,
                };
                verify.send(prime).await.expect("primed");
                let crc = crc32fast::hash(image);
                let durable = VerifyMsg::Durable {
                    job,
                    from: 0,
                    to: len,
                    crc,
                };
                verify.send(durable).await.expect("read back");
            }
            Feed::Resumed { prefix } => {
                let prime = VerifyMsg::Prime {
                    job,
                    path: path.clone(),
                    len: prefix as u64,
                    medium: false,
                };
                verify.send(prime).await.expect("primed");
                for piece in image[prefix..].chunks(1000) {
                    let data = Bytes::copy_from_slice(piece);
                    verify
                        .send(VerifyMsg::Chunk { job, data })
                        .await
                        .expect("chunk");
                }
            }
            Feed::Unstreamed => {}
        }
        let finish = VerifyMsg::Finish { job, firmware };
        verify.send(finish).await.expect("finished");
        super::super::stand_in::next_event(&mut rx).await.event
    }

    #[actix::test]
    async fn the_signature_is_checked_over_the_sha256_of_every_way_the_image_arrives() {
        use ring::signature::KeyPair;
        let dir = tempfile::tempdir().expect("temp dir");
        let pkcs8 =
            ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .expect("key");
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
        let mut spki = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        spki.extend_from_slice(pair.public_key().as_ref());
        let b64 = base64::engine::general_purpose::STANDARD.encode(&spki);
        let public = dir.path().join("k.pem");
        std::fs::write(
            &public,
            format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n"),
        )
        .expect("write");
        let policy = || SignaturePolicy::load(std::slice::from_ref(&public), true).expect("key");

        let image: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let fw = firmware_of(&image);
        let sha = ring::digest::digest(&ring::digest::SHA256, &image);
        let sig = pair.sign(signature::statement(&fw.name, fw.size, sha.as_ref()).as_bytes());
        // Other bytes of the same size, the firmware's md5 made to match them.
        let mut other = image.clone();
        other[4321] ^= 0x40;
        let other_fw = firmware_of(&other);
        for feed in [
            Feed::Slot,
            Feed::Resumed { prefix: 0 },
            Feed::Resumed { prefix: 4096 },
            Feed::Unstreamed,
        ] {
            let ok = verify_signed(feed, &image, fw.clone(), policy(), Some(sig.as_ref())).await;
            assert_eq!(ok, Event::Verified, "{feed:?}");
            let f = failure(
                verify_signed(feed, &other, other_fw.clone(), policy(), Some(sig.as_ref())).await,
            );
            assert_eq!(
                f.error_no,
                result_no::SIGNATURE,
                "{feed:?}: {}",
                f.description
            );
            // No .sig, signature required: 32; not required: verified.
            let f = failure(verify_signed(feed, &image, fw.clone(), policy(), None).await);
            assert_eq!(
                f.error_no,
                result_no::SIGNATURE,
                "{feed:?}: {}",
                f.description
            );
            let optional = SignaturePolicy {
                required: false,
                ..policy()
            };
            assert_eq!(
                verify_signed(feed, &image, fw.clone(), optional, None).await,
                Event::Verified
            );
        }
        // The request's own signature is used before any .sig file.
        let field = Firmware {
            signature: Some(signature::encode_sig(
                &<[u8; 64]>::try_from(sig.as_ref()).expect("64"),
            )),
            ..fw.clone()
        };
        let garbage = [0u8; 64];
        let ok = verify_signed(Feed::Unstreamed, &image, field, policy(), Some(&garbage)).await;
        assert_eq!(ok, Event::Verified);
        // A wrong md5 is still 31, whatever the signature.
        let wrong_md5 = Firmware {
            md5: "0".repeat(32),
            ..fw
        };
        let f = failure(
            verify_signed(
                Feed::Unstreamed,
                &image,
                wrong_md5,
                policy(),
                Some(sig.as_ref()),
            )
            .await,
        );
        assert_eq!(f.error_no, result_no::MD5_MISMATCH);
    }

    fn failure(event: Event) -> Failure {
        match event {
            Event::VerifyFailed { failure } => failure,
            other => panic!("not a failed verification: {other:?}"),
        }
    }

    #[actix::test]
    async fn a_slot_is_verified_as_its_medium_holds_it() {
        let image: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let fw = firmware_of(&image);
        assert_eq!(
            verify_slot(&image, &image, fw.clone()).await,
            Event::Verified
        );

        // A card that lost writes in the second range: 50, naming it and
        // the md5 of what the medium holds.
        let mut lost = image.clone();
        lost[6000..7000].fill(0);
        let f = failure(verify_slot(&lost, &image, fw.clone()).await);
        assert_eq!(f.error_no, result_no::FLASH_FAILED, "{}", f.description);
        let medium_md5 = hex_digest(Md5::new_with_prefix(&lost));
        assert!(
            f.description.contains("bytes 5000..10000") && f.description.contains(&medium_md5),
            "{}",
            f.description
        );

        // The medium holds what was received, and that is not the image:
        // a bad download (31), not a bad card.
        let mut bad = image.clone();
        bad[0] ^= 1;
        let f = failure(verify_slot(&bad, &bad, fw).await);
        assert_eq!(f.error_no, result_no::MD5_MISMATCH, "{}", f.description);
    }
}
