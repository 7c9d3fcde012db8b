//! Keeping the store within its limits: a gateway runs for years, and
//! every request and every message would otherwise stay for ever.
//!
//! What has ended is removed once the limits no longer keep it: the oldest
//! ended upgrades with their logs and delivered reports, the oldest
//! answered messageIds, the oldest delivered messages of no upgrade. Never
//! the upgrade under way, an answer of one of its requests, or anything of
//! a message still to be delivered. Each removal is one transaction (a
//! cut keeps it whole or not at all) and is not flushed: one a cut loses is
//! made again by the next prune. docs/DURABILITY.md, "What the store keeps".

use super::*;
use std::sync::atomic::Ordering;

/// How much the store keeps of what has ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Ended upgrades kept, newest first, with their logs and reports.
    pub ended_jobs: usize,
    /// Answered messageIds kept, newest first: a repeat of one gets its
    /// ack again; an older one is decided afresh.
    pub answered: usize,
    /// Delivered messages of no upgrade kept (the acks of requests that
    /// created none), newest first.
    pub sent_without_job: usize,
    /// Commits between two prunes (and one when the store opens).
    pub prune_every: u64,
    /// sled's data file size above which the store is compacted when it
    /// opens (`store::compact`).
    pub compact_above: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            ended_jobs: 50,
            answered: 1_000,
            sent_without_job: 1_000,
            prune_every: 64,
            compact_above: 4 << 20,
        }
    }
}

impl Limits {
    /// Keep everything, compact nothing (tests that check a whole history).
    pub const KEEP_ALL: Limits = Limits {
        ended_jobs: usize::MAX,
        answered: usize::MAX,
        sent_without_job: usize::MAX,
        prune_every: u64::MAX,
        compact_above: u64::MAX,
    };
}

/// What one prune removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: usize,
    pub answered: usize,
    pub sent: usize,
}

impl Store {
    /// Count a commit; prune every [`Limits::prune_every`]. Best effort: the
    /// commit is made whatever the prune finds, and the next prune does
    /// what this one could not.
    pub(super) fn maybe_prune(&self) {
        let s = &*self.inner;
        let n = s.commits.fetch_add(1, Ordering::Relaxed) + 1;
        if n % s.limits.prune_every.max(1) == 0 {
            let _ = self.prune();
        }
    }

    /// Remove what the limits no longer keep.
    pub fn prune(&self) -> Result<Pruned, StoreError> {
        Ok(Pruned {
            jobs: self.prune_jobs()?,
            answered: self.prune_answered()?,
            sent: self.prune_sent()?,
        })
    }

    /// The upgrade under way's requests: their answers are never pruned.
    fn active_message_ids(&self) -> Result<Vec<String>, StoreError> {
        let s = &*self.inner;
        let Some(id) = self.meta_u64(META_ACTIVE)? else {
            return Ok(Vec::new());
        };
        let key = id_key(id);
        let Some(v) = s.jobs.get(key)? else {
            return Ok(Vec::new());
        };
        let job = decode_job(&key, &v)?;
        Ok(std::iter::once(job.request.message_id)
            .chain(job.joined.into_iter().map(|j| j.message_id))
            .collect())
    }

    fn prune_jobs(&self) -> Result<usize, StoreError> {
        let s = &*self.inner;
        let active = self.meta_u64(META_ACTIVE)?;
        let mut ended = 0;
        let mut removed = 0;
        for kv in s.jobs.iter().rev() {
            let (k, v) = kv?;
            let id = be(&k, 0);
            if Some(id) == active {
                continue;
            }
            ended += 1;
            if ended <= s.limits.ended_jobs || self.awaits_delivery(id)? {
                continue;
            }
            self.remove_job(&decode_job(&k, &v)?)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Remove an ended upgrade whole: its record, its messageIds' index
    /// entries, its log, its delivered reports and anything sealed for it.
    fn remove_job(&self, job: &Job) -> Result<(), StoreError> {
        let s = &*self.inner;
        let key = id_key(job.id);
        let logs: Vec<sled::IVec> = s.log.scan_prefix(key).keys().collect::<Result<_, _>>()?;
        let reports: Vec<sled::IVec> = s
            .outbox_by_job
            .scan_prefix(key)
            .keys()
            .collect::<Result<_, _>>()?;
        let mids: Vec<&str> = std::iter::once(job.request.message_id.as_str())
            .chain(job.joined.iter().map(|j| j.message_id.as_str()))
            .collect();
        (
            &s.jobs,
            &s.job_index,
            &s.log,
            &s.outbox_by_job,
            &s.sent,
            &s.secrets,
        )
            .transaction(|(jobs, job_index, log, outbox_by_job, sent, secrets)| {
                jobs.remove(&key)?;
                secrets.remove(&key)?;
                for mid in &mids {
                    if job_index.get(mid.as_bytes())?.as_deref() == Some(&key[..]) {
                        job_index.remove(mid.as_bytes())?;
                    }
                }
                for k in &logs {
                    log.remove(k)?;
                }
                for k in &reports {
                    outbox_by_job.remove(k)?;
                    if k.len() == 16 {
                        sent.remove(&id_key(be(k, 8)))?;
                    }
                }
                Ok(())
            })?;
        s.vault.shred(job.id)
    }

    fn prune_answered(&self) -> Result<usize, StoreError> {
        let s = &*self.inner;
        let Some(mut excess) = s.acks_order.len().checked_sub(s.limits.answered) else {
            return Ok(0);
        };
        let keep = self.active_message_ids()?;
        let mut removed = 0;
        for kv in s.acks_order.iter() {
            if excess == 0 {
                break;
            }
            let (k, mid) = kv?;
            if keep.iter().any(|m| m.as_bytes() == &mid[..]) {
                continue;
            }
            excess -= 1;
            (&s.acks, &s.acks_order).transaction(|(acks, order)| {
                acks.remove(&mid)?;
                order.remove(&k)?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })?;
            removed += 1;
        }
        Ok(removed)
    }

    fn prune_sent(&self) -> Result<usize, StoreError> {
        let s = &*self.inner;
        let mut kept = 0;
        let mut doomed = Vec::new();
        for kv in s.sent.iter().rev() {
            let (k, v) = kv?;
            let (entry, _) = decode_sent(&k, &v)?;
            if entry.job.is_none() {
                kept += 1;
                if kept > s.limits.sent_without_job {
                    doomed.push(k);
                }
            }
        }
        for k in &doomed {
            s.sent.remove(k)?;
        }
        Ok(doomed.len())
    }
}
