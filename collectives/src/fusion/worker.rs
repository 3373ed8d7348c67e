//! The background thread: negotiation cycles, fusion, completion.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use oxccl_kernels::ReduceOp;
use serde_json::json;

use super::plan::buckets;
use super::timeline::Timeline;
use super::wire::{Meta, RequestList, Response, ResponseList, Stall, coordinate, ranks};
use super::{Buffer, Flush, Outcome, Shared, Submission};
use crate::schedule::Kind;
use crate::{Communicator, Descriptor, Error, ErrorKind, Result};

/// Most names the response cache holds; later names are negotiated every time.
const CACHE_CAPACITY: usize = 4096;

/// How long after the start of a flushed cycle that completed nothing (the
/// `misses`-th such in a row) the next one starts: at once after the first
/// (the other ranks may submit at any moment, and a cycle waits for them in
/// its collective, where a rank that waited for its timer would hold every
/// other rank up to a `cycle_time`), then 50 us, 100 us, ... doubling up to
/// `cycle_time`, so that ranks that all flush and cannot agree (a name some
/// rank never submits) do not spin through empty cycles.
fn retry_after(misses: u32, cycle_time: Duration) -> Duration {
    if misses <= 1 {
        return Duration::ZERO;
    }
    let step = Duration::from_micros(50).saturating_mul(1 << (misses - 2).min(20));
    step.min(cycle_time)
}

/// An engine with nothing submitted starts its next cycle this many cycle
/// times after the last. Its cycles serve only the other ranks (their stall
/// checks and errors, a shutdown): an idle engine wakes at its own first
/// submission, so that the cycles it ran at the cycle time spent CPU beside
/// the training and, when one was in flight as a step's gradients came,
/// made the step wait for it.
const IDLE_CYCLE_TIMES: u32 = 16;

/// A tensor this rank submitted that has not run yet.
struct Entry {
    meta: Meta,
    buf: Box<dyn Buffer>,
    tx: Sender<Outcome>,
    seq: u64,
    at: Instant,
    /// Handles of later submissions of the same name (an error).
    dups: Vec<Sender<Outcome>>,
}

/// Names with their agreed metadata, in the same slots on every rank.
#[derive(Default)]
struct Cache {
    slots: Vec<(String, Meta)>,
    index: HashMap<String, usize>,
}

impl Cache {
    fn hit(&self, name: &str, meta: &Meta) -> Option<usize> {
        self.index
            .get(name)
            .copied()
            .filter(|i| self.slots[*i].1 == *meta)
    }

    fn put(&mut self, name: &str, meta: Meta) {
        match self.index.get(name) {
            Some(i) => self.slots[*i].1 = meta,
            None if self.slots.len() < CACHE_CAPACITY => {
                self.index.insert(name.to_string(), self.slots.len());
                self.slots.push((name.to_string(), meta));
            }
            None => {}
        }
    }
}

pub(super) struct Worker {
    comm: Communicator,
    shared: Arc<Shared>,
    rank: usize,
    world: usize,
    cycle_time: Duration,
    threshold: usize,
    direct: usize,
    stall: Stall,
    /// How old a pending tensor must be to force a coordination round (stall check).
    stall_check: Duration,
    last_stall_check: Instant,
    /// Completions seen at the last cycle's start: whether that cycle
    /// completed anything, which keeps a flush going.
    completed_seen: u64,
    /// Flushed cycles in a row that completed nothing (see [`retry_after`]).
    flush_misses: u32,
    pending: HashMap<String, Entry>,
    seq: u64,
    cache: Cache,
    fusion: Vec<u8>,
    gathered: Vec<u8>,
    timeline: Option<Timeline>,
}

fn share(rank: usize, e: &Error) -> Error {
    Error::Aborted {
        rank,
        kind: e.cause_kind(),
        cause: e.to_string(),
    }
}

impl Worker {
    pub(super) fn new(comm: Communicator, shared: Arc<Shared>) -> Result<Worker> {
        let c = comm.config().clone();
        let start = Instant::now();
        let timeline = match &c.timeline {
            Some(p) => Some(Timeline::create(p, comm.rank(), start)?),
            None => None,
        };
        let stall_check = c
            .stall_shutdown
            .map_or(c.stall_warning, |s| s.min(c.stall_warning));
        Ok(Worker {
            rank: comm.rank(),
            world: comm.world(),
            cycle_time: c.cycle_time,
            threshold: c.fusion_threshold,
            direct: c.fusion_direct,
            stall: Stall::new(c.stall_warning, c.stall_shutdown),
            stall_check,
            last_stall_check: start,
            completed_seen: 0,
            flush_misses: 0,
            comm,
            shared,
            pending: HashMap::new(),
            seq: 0,
            cache: Cache::default(),
            fusion: Vec::new(),
            gathered: Vec::new(),
            timeline,
        })
    }

    pub(super) fn run(mut self) -> Communicator {
        let mut last = Instant::now() - self.cycle_time;
        loop {
            let (incoming, shutdown) = self.wait_for_cycle(last);
            last = Instant::now();
            match self.cycle(incoming, shutdown) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    let kind = e.cause_kind();
                    let msg = e.to_string();
                    tracing::error!("rank {}: fusion engine stops: {msg}", self.rank);
                    self.close(kind, msg, |rank, _, _| share(rank, &e));
                    break;
                }
            }
            if let Some(t) = &mut self.timeline {
                t.flush();
            }
        }
        if let Some(t) = &mut self.timeline {
            t.finish();
        }
        self.comm
    }

    /// Sleeps until the next cycle is due (a cycle time after the last, or
    /// [`IDLE_CYCLE_TIMES`] while idle); an idle engine wakes at the first
    /// submission, a flushed one ([`FusionEngine::flush`]) at once while its
    /// cycles complete something, and soon after one that completed nothing
    /// (see [`retry_after`]). Submissions under a [`Hold`](super::Hold) stay
    /// out until it drops. Returns the new submissions and whether to shut
    /// down.
    fn wait_for_cycle(&mut self, last: Instant) -> (Vec<Submission>, bool) {
        let idle = self.pending.is_empty();
        let due = last
            + if idle {
                self.cycle_time.saturating_mul(IDLE_CYCLE_TIMES)
            } else {
                self.cycle_time
            };
        let mut st = self.shared.lock();
        let progressed = st.completed != self.completed_seen;
        if progressed || st.flush != Flush::On {
            self.flush_misses = 0;
        } else {
            self.flush_misses = self.flush_misses.saturating_add(1);
        }
        let retry = last + retry_after(self.flush_misses, self.cycle_time);
        loop {
            let now = Instant::now();
            let incoming = st.holds == 0 && !st.incoming.is_empty();
            let work = !idle || incoming;
            let flushed = work
                && match st.flush {
                    Flush::Off => false,
                    Flush::Asked => true,
                    Flush::On => progressed || now >= retry,
                };
            if st.shutdown || now >= due || (idle && incoming) || flushed {
                break;
            }
            let until = if work && st.flush == Flush::On {
                due.min(retry)
            } else {
                due
            };
            st = self
                .shared
                .wake
                .wait_timeout(st, until.saturating_duration_since(now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if st.flush == Flush::Asked {
            st.flush = Flush::On;
        }
        self.completed_seen = st.completed;
        let incoming = if st.holds == 0 {
            std::mem::take(&mut st.incoming)
        } else {
            Vec::new()
        };
        (incoming, st.shutdown)
    }

    /// Completes handles: sends the outcomes and updates the counters.
    fn complete(&self, outcomes: Vec<(Sender<Outcome>, Outcome)>) {
        if outcomes.is_empty() {
            return;
        }
        let n = outcomes.len() as u64;
        let failed = outcomes.iter().filter(|(_, o)| o.is_err()).count() as u64;
        for (tx, o) in outcomes {
            let _ = tx.send(o);
        }
        let mut st = self.shared.lock();
        st.outstanding = st.outstanding.saturating_sub(n);
        st.completed += n;
        if st.outstanding == 0 {
            st.flush = Flush::Off;
        }
        st.stats.failed += failed;
        drop(st);
        self.shared.done.notify_all();
    }

    /// Fails every pending handle (and later submissions) and marks the engine closed.
    fn close(&mut self, kind: ErrorKind, cause: String, err: impl Fn(usize, &str, &Meta) -> Error) {
        let mut outcomes = Vec::new();
        let mut st = self.shared.lock();
        st.closed = Some((kind, cause));
        let late = std::mem::take(&mut st.incoming);
        drop(st);
        for s in late {
            outcomes.push((s.tx, Err(err(self.rank, &s.name, &s.meta))));
        }
        for (name, e) in self.pending.drain() {
            for d in e.dups {
                outcomes.push((d, Err(err(self.rank, &name, &e.meta))));
            }
            outcomes.push((e.tx, Err(err(self.rank, &name, &e.meta))));
        }
        self.complete(outcomes);
    }

    /// One negotiation cycle and the collectives it agrees on. Returns
    /// whether the engine goes on.
    fn cycle(&mut self, incoming: Vec<Submission>, shutdown: bool) -> Result<bool> {
        let now = Instant::now();
        for s in incoming {
            match self.pending.get_mut(&s.name) {
                Some(e) => e.dups.push(s.tx),
                None => {
                    self.seq += 1;
                    self.pending.insert(
                        s.name,
                        Entry {
                            meta: s.meta,
                            buf: s.buf,
                            tx: s.tx,
                            seq: self.seq,
                            at: s.at,
                            dups: Vec::new(),
                        },
                    );
                }
            }
        }

        // The cache round: [needs coordination, shutting down, one per cache slot].
        let slots = self.cache.slots.len();
        let mut bits = vec![0u32; 2 + slots];
        let mut need = shutdown;
        let mut oldest = now;
        for (name, e) in &self.pending {
            oldest = oldest.min(e.at);
            match self.cache.hit(name, &e.meta) {
                Some(i) if e.dups.is_empty() => bits[2 + i] = 1,
                _ => need = true,
            }
        }
        if now.duration_since(oldest) >= self.stall_check
            && now.duration_since(self.last_stall_check)
                >= (self.stall_check / 4).max(self.cycle_time)
        {
            self.last_stall_check = now;
            need = true;
        }
        bits[0] = u32::from(need);
        bits[1] = u32::from(shutdown);
        self.comm.all_reduce_in_place(&mut bits, ReduceOp::Sum)?;
        let world = self.world as u32;
        let mut ready: Vec<(String, Meta)> = Vec::new();
        for (i, b) in bits[2..].iter().enumerate() {
            if *b == world {
                ready.push(self.cache.slots[i].clone());
            }
        }
        let cache_hits = ready.len() as u64;

        let mut responses = ResponseList::default();
        if bits[0] > 0 {
            let t0 = Instant::now();
            responses = self.coordinate(&ready, shutdown, now)?;
            if let Some(t) = &mut self.timeline {
                t.span(
                    None,
                    "COORDINATION",
                    t0,
                    Instant::now(),
                    json!({"responses": responses.responses.len()}),
                );
            }
        }
        let mut negotiated = 0u64;
        let mut failures = Vec::new();
        for r in &responses.responses {
            match r {
                Response::Ready { name, meta } => {
                    self.cache.put(name, *meta);
                    ready.push((name.clone(), *meta));
                    negotiated += 1;
                }
                Response::Error { name, message } => {
                    if let Some(e) = self.pending.remove(name) {
                        for d in e.dups {
                            failures.push((d, Err(Error::InvalidUsage(message.clone()))));
                        }
                        failures.push((e.tx, Err(Error::InvalidUsage(message.clone()))));
                    }
                }
            }
        }
        for w in &responses.warnings {
            if self.rank == 0 {
                tracing::warn!("fusion stall: {w} (OXCCL_STALL_WARNING_SECS)");
            }
        }
        {
            let mut st = self.shared.lock();
            st.stats.cycles += 1;
            st.stats.coordination_rounds += u64::from(bits[0] > 0);
            st.stats.cache_hits += cache_hits;
            st.stats.negotiated += negotiated;
            st.stats.cache_entries = self.cache.slots.len() as u64;
            st.warnings.extend(responses.warnings.iter().cloned());
        }
        self.complete(failures);

        if let Some(cause) = responses.abort {
            let msg = format!("rank {}: {cause}", self.rank);
            tracing::error!("{msg}");
            self.close(ErrorKind::InvalidUsage, msg.clone(), |_, _, _| {
                Error::InvalidUsage(msg.clone())
            });
            return Ok(false);
        }

        self.execute(ready)?;

        if bits[1] > 0 {
            let who = ranks(&responses.shutdown_ranks);
            let cause = format!("{who} shut the fusion engine down");
            self.close(ErrorKind::InvalidUsage, cause, |rank, name, meta| {
                Error::InvalidUsage(format!(
                    "rank {rank}: tensor '{name}' ({meta}) cannot complete: {who} shut the fusion engine down"
                ))
            });
            return Ok(false);
        }
        Ok(true)
    }

    /// A coordination round: every rank's pending list to rank 0, rank 0's
    /// answer to every rank.
    fn coordinate(
        &mut self,
        scheduled: &[(String, Meta)],
        shutdown: bool,
        now: Instant,
    ) -> Result<ResponseList> {
        let mut list = RequestList {
            shutdown,
            requests: Vec::new(),
        };
        let mut mine: Vec<(&String, &Entry)> = self
            .pending
            .iter()
            .filter(|(n, _)| !scheduled.iter().any(|(s, _)| s == *n))
            .collect();
        mine.sort_by_key(|(_, e)| e.seq);
        for (name, e) in mine {
            list.requests.push(super::wire::Request {
                name: name.clone(),
                meta: e.meta,
                seq: e.seq,
                age_ms: now.duration_since(e.at).as_millis() as u64,
                duplicate: !e.dups.is_empty(),
            });
        }
        let bytes = list.encode();
        let mut lens = vec![0u64; self.world];
        self.comm.all_gather(&[bytes.len() as u64], &mut lens)?;
        let max = lens.iter().copied().max().unwrap_or(0);
        let max = usize::try_from(max).map_err(|_| self.corrupt("request length"))?;
        let mut padded = bytes;
        padded.resize(max, 0);
        let mut all = vec![0u8; max * self.world];
        self.comm.all_gather(&padded, &mut all)?;

        let mut answer = Vec::new();
        if self.rank == 0 {
            let mut lists = Vec::with_capacity(self.world);
            for (r, len) in lens.iter().enumerate() {
                let len = usize::try_from(*len).map_err(|_| self.corrupt("request length"))?;
                let part = all
                    .get(r * max..r * max + len)
                    .ok_or_else(|| self.corrupt("request length"))?;
                lists.push(
                    RequestList::decode(part)
                        .map_err(|e| self.corrupt(&format!("rank {r}'s requests: {e}")))?,
                );
            }
            answer = coordinate(&lists, &mut self.stall, now).encode();
        }
        let mut len = [answer.len() as u64];
        self.comm.broadcast_in_place(&mut len, 0)?;
        let len = usize::try_from(len[0]).map_err(|_| self.corrupt("response length"))?;
        answer.resize(len, 0);
        self.comm.broadcast_in_place(&mut answer, 0)?;
        ResponseList::decode(&answer).map_err(|e| self.corrupt(&format!("rank 0's response: {e}")))
    }

    fn corrupt(&self, what: &str) -> Error {
        Error::Internal(format!(
            "rank {}: fusion coordination: malformed {what}",
            self.rank
        ))
    }

    /// Runs the agreed tensors, bucket by bucket.
    fn execute(&mut self, ready: Vec<(String, Meta)>) -> Result<()> {
        if ready.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let mut items = Vec::with_capacity(ready.len());
        for (name, meta) in ready {
            let entry = self.pending.remove(&name).ok_or_else(|| {
                Error::Internal(format!(
                    "rank {}: fusion: tensor '{name}' was agreed but is not pending here",
                    self.rank
                ))
            })?;
            if entry.meta != meta {
                let msg = format!("rank {}: fusion: tensor '{name}' changed", self.rank);
                let _ = entry.tx.send(Err(Error::Internal(msg.clone())));
                return Err(Error::Internal(msg));
            }
            if let Some(t) = &mut self.timeline {
                t.span(
                    Some(&name),
                    "NEGOTIATE",
                    entry.at,
                    now,
                    json!({"call": meta.to_string()}),
                );
            }
            items.push(Some((name, entry)));
        }
        let metas: Vec<Meta> = items.iter().flatten().map(|(_, e)| e.meta).collect();
        for bucket in buckets(&metas, self.world, self.threshold, self.direct) {
            let mut group = Vec::with_capacity(bucket.len());
            for i in bucket {
                if let Some(it) = items.get_mut(i).and_then(Option::take) {
                    group.push(it);
                }
            }
            self.run_bucket(group)?;
        }
        Ok(())
    }

    /// Runs one bucket and completes its handles; on failure fails them too.
    fn run_bucket(&mut self, mut group: Vec<(String, Entry)>) -> Result<()> {
        let Some(meta) = group.first().map(|(_, e)| e.meta) else {
            return Ok(());
        };
        let world = self.world;
        let size = meta.dtype.size();
        let total: usize = group.iter().map(|(_, e)| e.meta.count).sum();
        let desc = Descriptor {
            kind: meta.kind,
            dtype: meta.dtype,
            op: meta.op,
            root: meta.root,
            count: total,
        };
        let bytes = desc.count
            * size
            * if meta.kind == Kind::AllGather {
                world
            } else {
                1
            };
        let t0 = Instant::now();
        let mut t1 = t0;
        let t2;
        let result: Result<Vec<Box<dyn Buffer>>> = if group.len() == 1 {
            // Alone: in place (allgather into a fresh output).
            let (_, e) = &mut group[0];
            if meta.kind == Kind::AllGather {
                let mut out = e.buf.zeroed(world * meta.count);
                let r = self
                    .comm
                    .run_bytes(desc, Some(e.buf.bytes()), out.bytes_mut());
                t2 = Instant::now();
                r.map(|()| vec![out])
            } else {
                let r = self.comm.run_bytes(desc, None, e.buf.bytes_mut());
                t2 = Instant::now();
                r.map(|()| Vec::new())
            }
        } else {
            let n = total * size;
            self.fusion.clear();
            self.fusion.reserve(n);
            for (_, e) in &group {
                self.fusion.extend_from_slice(e.buf.bytes());
            }
            t1 = Instant::now();
            if meta.kind == Kind::AllGather {
                self.gathered.resize(n * world, 0);
                let r =
                    self.comm
                        .run_bytes(desc, Some(&self.fusion), &mut self.gathered[..n * world]);
                t2 = Instant::now();
                r.map(|()| {
                    let mut outs = Vec::with_capacity(group.len());
                    let mut off = 0;
                    for (_, e) in &group {
                        let c = e.meta.count * size;
                        let mut out = e.buf.zeroed(world * e.meta.count);
                        let ob = out.bytes_mut();
                        for r in 0..world {
                            ob[r * c..(r + 1) * c]
                                .copy_from_slice(&self.gathered[r * n + off..r * n + off + c]);
                        }
                        off += c;
                        outs.push(out);
                    }
                    outs
                })
            } else {
                let r = self.comm.run_bytes(desc, None, &mut self.fusion[..n]);
                t2 = Instant::now();
                r.map(|()| {
                    let mut off = 0;
                    for (_, e) in &mut group {
                        let b = e.buf.bytes_mut();
                        b.copy_from_slice(&self.fusion[off..off + b.len()]);
                        off += b.len();
                    }
                    Vec::new()
                })
            }
        };
        let t3 = Instant::now();
        let fused = group.len() > 1;
        if let Some(t) = &mut self.timeline {
            let args = json!({"bucket_bytes": bytes, "bucket_tensors": group.len(),
                "call": desc.to_string(), "in_place": !fused});
            for (name, _) in &group {
                if fused {
                    t.span(Some(name), "PACK", t0, t1, args.clone());
                }
                t.span(Some(name), "COLLECTIVE", t1, t2, args.clone());
                if fused {
                    t.span(Some(name), "UNPACK", t2, t3, args.clone());
                }
            }
        }
        match result {
            Ok(outs) => {
                let count = group.len() as u64;
                let mut outs = outs.into_iter();
                let outcomes = group
                    .into_iter()
                    .map(|(_, e)| {
                        let buf = if meta.kind == Kind::AllGather {
                            outs.next().unwrap_or(e.buf)
                        } else {
                            e.buf
                        };
                        (e.tx, Ok(buf))
                    })
                    .collect();
                {
                    let mut st = self.shared.lock();
                    st.stats.collectives += 1;
                    st.stats.fused_collectives += u64::from(fused);
                    st.stats.tensors += count;
                    st.stats.bytes += bytes as u64;
                }
                self.complete(outcomes);
                Ok(())
            }
            Err(e) => {
                let outcomes = group
                    .into_iter()
                    .map(|(_, en)| (en.tx, Err(share(self.rank, &e))))
                    .collect();
                self.complete(outcomes);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_at_once_then_backs_off_to_the_cycle_time() {
        let cycle = Duration::from_millis(5);
        let us = Duration::from_micros;
        let got: Vec<Duration> = (0..10).map(|m| retry_after(m, cycle)).collect();
        assert_eq!(
            got,
            [
                us(0),
                us(0),
                us(50),
                us(100),
                us(200),
                us(400),
                us(800),
                us(1600),
                us(3200),
                cycle
            ]
        );
        assert_eq!(retry_after(u32::MAX, cycle), cycle);
        assert_eq!(retry_after(3, Duration::ZERO), Duration::ZERO);
    }
}
