//! Sends and receives between pairs of ranks, alone or in batches that run
//! concurrently (NCCL's `ncclGroupStart`/`ncclGroupEnd` around
//! `ncclSend`/`ncclRecv`): any mix of sends and receives to any peers,
//! posted in any order on each rank, completes without a deadlock
//! ([`schedule::point_to_point`](crate::schedule::point_to_point) says
//! why). Messages between two ranks in one direction are matched in the
//! order they were posted, across batches.
//!
//! A send completes once its data has gone and its receiver has answered
//! that it agrees on the message (type and count), which the receiver
//! does as its batch starts, so that the answer crosses the data: a send
//! without a matching receive times out naming the peer, and counts that
//! differ fail on both sides, naming both. Links to peers beyond the ring
//! are made on first use ([`crate::lazy`]).

use oxccl_kernels::{DType, DeviceMemory, Element, ReduceOp};

use crate::comm::Communicator;
use crate::descriptor::Descriptor;
use crate::engine::{Input, Output};
use crate::schedule::{Kind, Message, point_to_point};
use crate::{Error, Result};

/// Memory a message is sent from.
enum SendMem<'b> {
    Host(&'b [u8]),
    Device(&'b dyn DeviceMemory),
}

/// Memory a message lands in.
enum RecvMem<'b> {
    Host(&'b mut [u8]),
    Device(&'b mut dyn DeviceMemory),
}

impl SendMem<'_> {
    fn len(&self) -> usize {
        match self {
            SendMem::Host(b) => b.len(),
            SendMem::Device(d) => d.len_bytes(),
        }
    }
}

impl RecvMem<'_> {
    fn len(&self) -> usize {
        match self {
            RecvMem::Host(b) => b.len(),
            RecvMem::Device(d) => d.len_bytes(),
        }
    }
}

struct Send<'b> {
    peer: usize,
    dtype: DType,
    buf: SendMem<'b>,
}

struct Recv<'b> {
    peer: usize,
    dtype: DType,
    buf: RecvMem<'b>,
}

/// A batch of sends and receives that run together
/// ([`Communicator::run_batch`]): NCCL's group of point-to-point calls.
///
/// ```
/// use oxccl::{Batch, Config, run_in_process};
///
/// // Every rank passes a value to the next and gets one from the previous.
/// let got = run_in_process(3, Config::default(), |comm| {
///     let (rank, world) = (comm.rank(), comm.world());
///     let mine = [rank as u32; 4];
///     let mut theirs = [0u32; 4];
///     let mut batch = Batch::new();
///     batch.send(&mine, (rank + 1) % world).recv(&mut theirs, (rank + world - 1) % world);
///     comm.run_batch(batch).map(|()| theirs[0])
/// })
/// .unwrap();
/// assert_eq!(got.into_iter().map(|r| r.unwrap()).collect::<Vec<_>>(), [2, 0, 1]);
/// ```
#[derive(Default)]
pub struct Batch<'b> {
    sends: Vec<Send<'b>>,
    recvs: Vec<Recv<'b>>,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Batch({} sends, {} receives)",
            self.sends.len(),
            self.recvs.len()
        )
    }
}

impl<'b> Batch<'b> {
    /// An empty batch.
    pub fn new() -> Batch<'b> {
        Batch::default()
    }

    /// Sends `buf` to rank `peer`.
    pub fn send<T: Element>(&mut self, buf: &'b [T], peer: usize) -> &mut Self {
        self.send_bytes(bytemuck::cast_slice(buf), T::DTYPE, peer)
    }

    /// Receives from rank `peer` into `buf`, which the message fills exactly.
    pub fn recv<T: Element>(&mut self, buf: &'b mut [T], peer: usize) -> &mut Self {
        self.recv_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, peer)
    }

    /// Sends the elements of `dtype` in `buf` to rank `peer` (the bindings' form).
    pub fn send_bytes(&mut self, buf: &'b [u8], dtype: DType, peer: usize) -> &mut Self {
        self.sends.push(Send {
            peer,
            dtype,
            buf: SendMem::Host(buf),
        });
        self
    }

    /// Receives elements of `dtype` from rank `peer` into `buf`.
    pub fn recv_bytes(&mut self, buf: &'b mut [u8], dtype: DType, peer: usize) -> &mut Self {
        self.recvs.push(Recv {
            peer,
            dtype,
            buf: RecvMem::Host(buf),
        });
        self
    }

    /// Sends the device buffer `buf` (wgpu, CUDA) of `dtype` to rank `peer`.
    pub fn send_device(
        &mut self,
        buf: &'b dyn DeviceMemory,
        dtype: DType,
        peer: usize,
    ) -> &mut Self {
        self.sends.push(Send {
            peer,
            dtype,
            buf: SendMem::Device(buf),
        });
        self
    }

    /// Receives from rank `peer` into the device buffer `buf` of `dtype`.
    pub fn recv_device(
        &mut self,
        buf: &'b mut dyn DeviceMemory,
        dtype: DType,
        peer: usize,
    ) -> &mut Self {
        self.recvs.push(Recv {
            peer,
            dtype,
            buf: RecvMem::Device(buf),
        });
        self
    }

    /// Whether the batch has nothing in it.
    pub fn is_empty(&self) -> bool {
        self.sends.is_empty() && self.recvs.is_empty()
    }
}

impl Communicator {
    /// Sends `buf` to rank `peer`; returns once `peer` has received it
    /// (the first of its frames) and agreed on its type and count.
    pub fn send<T: Element>(&mut self, buf: &[T], peer: usize) -> Result<()> {
        let mut b = Batch::new();
        b.send(buf, peer);
        self.run_batch(b)
    }

    /// Receives a message from rank `peer` into `buf`, whose length it must have.
    pub fn recv<T: Element>(&mut self, buf: &mut [T], peer: usize) -> Result<()> {
        let mut b = Batch::new();
        b.recv(buf, peer);
        self.run_batch(b)
    }

    /// Runs every send and receive of `batch` together; returns when all
    /// are done. A failure fails the whole batch (and, as any failure,
    /// poisons the communicator).
    pub fn run_batch(&mut self, batch: Batch<'_>) -> Result<()> {
        let Batch { sends, recvs } = batch;
        let (rank, world) = (self.rank(), self.world());
        let named = Named::of(&sends, &recvs);
        let bad =
            |why: String| Error::InvalidArgument(format!("rank {rank}: {}: {why}", named.text()));
        for (what, peer, dtype, len) in sends
            .iter()
            .map(|s| ("send to", s.peer, s.dtype, s.buf.len()))
            .chain(
                recvs
                    .iter()
                    .map(|r| ("receive from", r.peer, r.dtype, r.buf.len())),
            )
        {
            if peer >= world {
                return Err(bad(format!(
                    "{what} rank {peer}: no such rank in a world of {world}"
                )));
            }
            if len % dtype.size() != 0 {
                return Err(bad(format!(
                    "{what} rank {peer}: {len} bytes are not whole elements of {dtype}"
                )));
            }
        }
        // Messages to this rank itself: matched in order, copied.
        let to_self = sends.iter().filter(|s| s.peer == rank).count();
        let from_self = recvs.iter().filter(|r| r.peer == rank).count();
        if to_self != from_self {
            return Err(bad(format!(
                "{to_self} sends to this rank itself but {from_self} receives from it"
            )));
        }
        for (s, r) in sends
            .iter()
            .filter(|s| s.peer == rank)
            .zip(recvs.iter().filter(|r| r.peer == rank))
        {
            if s.dtype != r.dtype || s.buf.len() != r.buf.len() {
                return Err(bad(format!(
                    "a send to itself of {} elements of {} meets a receive of {} elements of {}",
                    s.buf.len() / s.dtype.size(),
                    s.dtype,
                    r.buf.len() / r.dtype.size(),
                    r.dtype
                )));
            }
        }
        if sends.is_empty() && recvs.is_empty() {
            return Ok(());
        }
        self.enter(false)?;
        let result = self.run_checked(named, sends, recvs);
        self.leave();
        result
    }

    fn run_checked(
        &mut self,
        named: Named,
        sends: Vec<Send<'_>>,
        recvs: Vec<Recv<'_>>,
    ) -> Result<()> {
        let rank = self.rank();
        let fail =
            |c: &mut Communicator, e: crate::engine::EngineError| c.fail_named(named.text(), e);
        // To itself: a copy, in posting order (the lists are only split
        // when there is one; `run_batch` matched the counts).
        let (mut sends, mut recvs) = (sends, recvs);
        if sends.iter().any(|s| s.peer == rank) {
            let (others, self_sends): (Vec<_>, Vec<_>) =
                sends.into_iter().partition(|s| s.peer != rank);
            let (from_others, self_recvs): (Vec<_>, Vec<_>) =
                recvs.into_iter().partition(|r| r.peer != rank);
            (sends, recvs) = (others, from_others);
            for (s, mut r) in self_sends.into_iter().zip(self_recvs) {
                let mut host = vec![0u8; s.buf.len()];
                let result =
                    read_from(&s.buf, &mut host).and_then(|()| write_into(&mut r.buf, &host));
                if let Err(e) = result {
                    return Err(fail(self, e.into()));
                }
            }
        }
        if sends.is_empty() && recvs.is_empty() {
            return Ok(());
        }
        // The order no batch deadlocks in: by peer, then as posted.
        sends.sort_by_key(|s| s.peer);
        recvs.sort_by_key(|r| r.peer);
        let mut peers: Vec<usize> = sends
            .iter()
            .map(|s| s.peer)
            .chain(recvs.iter().map(|r| r.peer))
            .collect();
        peers.sort_unstable();
        peers.dedup();
        self.ensure_links(&peers, &|| named.text())?;

        // One send and one receive run from and into the caller's memory;
        // more are packed into one host buffer each way.
        let direct_in = sends.len() <= 1;
        let direct_out = recvs.len() <= 1;
        let mut packed_in = Vec::new();
        if !direct_in {
            packed_in = vec![0u8; sends.iter().map(|s| s.buf.len()).sum()];
            let mut at = 0;
            for s in &sends {
                let n = s.buf.len();
                if let Err(e) = read_from(&s.buf, &mut packed_in[at..at + n]) {
                    return Err(fail(self, e.into()));
                }
                at += n;
            }
        }
        // Each message's number between its two ranks.
        let mut seqs = Vec::with_capacity(sends.len() + recvs.len());
        for s in &sends {
            seqs.push(self.p2p_sent[s.peer]);
            self.p2p_sent[s.peer] += 1;
        }
        for r in &recvs {
            seqs.push(self.p2p_received[r.peer]);
            self.p2p_received[r.peer] += 1;
        }
        let slice = self.config().slice_bytes.max(1);
        // A loop of the same batch (every step of a pipeline) builds its
        // plan once; only the messages' numbers change.
        let mut sig = Vec::with_capacity(3 + 3 * seqs.len());
        sig.extend([1, slice as u64, sends.len() as u64]);
        for (peer, dtype, n) in sends
            .iter()
            .map(|s| (s.peer, s.dtype, s.buf.len()))
            .chain(recvs.iter().map(|r| (r.peer, r.dtype, r.buf.len())))
        {
            sig.extend([peer as u64, dtype as u64, n as u64]);
        }
        let plan = match self.take_kept_plan(&sig) {
            Some(mut plan) => {
                // Tags in the order `point_to_point` made them: the data
                // of the sends, of the receives, then the answers to the
                // receives and those awaited for the sends.
                let (ns, nr) = (sends.len(), recvs.len());
                let order = (0..ns + nr).chain(ns..ns + nr).chain(0..ns);
                for (w, i) in plan.wires.iter_mut().zip(order) {
                    w.seq = seqs[i];
                }
                plan
            }
            None => {
                // Each side's messages packed in order from byte 0.
                let msgs = |list: &mut dyn Iterator<Item = (usize, DType, usize, u64, usize)>| {
                    let mut at = 0;
                    list.map(|(peer, dtype, n, seq, sender)| {
                        let m = Message {
                            peer,
                            range: at..at + n,
                            seq,
                            descriptor: message(dtype, n, sender).encode(),
                        };
                        at += n;
                        m
                    })
                    .collect::<Vec<Message>>()
                };
                let send_msgs = msgs(
                    &mut sends
                        .iter()
                        .zip(&seqs)
                        .map(|(s, &q)| (s.peer, s.dtype, s.buf.len(), q, rank)),
                );
                let recv_msgs = msgs(
                    &mut recvs
                        .iter()
                        .zip(&seqs[sends.len()..])
                        .map(|(r, &q)| (r.peer, r.dtype, r.buf.len(), q, r.peer)),
                );
                point_to_point(&send_msgs, &recv_msgs, 1, slice)
            }
        };
        let at: usize = recvs.iter().map(|r| r.buf.len()).sum();
        let d = message(DType::U8, 0, rank);
        let mut packed_out = if direct_out {
            Vec::new()
        } else {
            vec![0u8; at]
        };
        let input = match sends.first() {
            _ if !direct_in => Input::Host(&packed_in),
            Some(Send {
                buf: SendMem::Host(b),
                ..
            }) => Input::Host(b),
            Some(Send {
                buf: SendMem::Device(d),
                ..
            }) => Input::Device(*d),
            None => Input::Host(&[]),
        };
        let mut empty: [u8; 0] = [];
        let result = {
            let output = match recvs.first_mut() {
                _ if !direct_out => Output::Host(&mut packed_out),
                Some(Recv {
                    buf: RecvMem::Host(b),
                    ..
                }) => Output::Host(b),
                Some(Recv {
                    buf: RecvMem::Device(d),
                    ..
                }) => Output::Device(*d),
                None => Output::Host(&mut empty),
            };
            self.run_plan(&plan, 0, &d, Some(input), output)
        };
        self.keep_plan(sig, plan);
        if let Err(e) = result {
            return Err(fail(self, e));
        }
        if !direct_out {
            let mut at = 0;
            for r in &mut recvs {
                let n = r.buf.len();
                if let Err(e) = write_into(&mut r.buf, &packed_out[at..at + n]) {
                    return Err(fail(self, e.into()));
                }
                at += n;
            }
        }
        Ok(())
    }
}

/// What both ends of a message agree on: `bytes` of `dtype` from `sender`.
fn message(dtype: DType, bytes: usize, sender: usize) -> Descriptor {
    Descriptor {
        kind: Kind::SendRecv,
        dtype,
        op: ReduceOp::Sum,
        root: sender,
        count: bytes / dtype.size(),
    }
}

/// What names a batch in messages, kept without formatting (which only an
/// error pays for): its counts and its first message.
#[derive(Clone, Copy)]
struct Named {
    sends: usize,
    recvs: usize,
    /// Whether the first is a send, its peer, dtype and elements.
    first: Option<(bool, usize, DType, usize)>,
}

impl Named {
    fn of(sends: &[Send<'_>], recvs: &[Recv<'_>]) -> Named {
        let first = match (sends.first(), recvs.first()) {
            (Some(s), _) => Some((true, s.peer, s.dtype, s.buf.len() / s.dtype.size())),
            (None, Some(r)) => Some((false, r.peer, r.dtype, r.buf.len() / r.dtype.size())),
            (None, None) => None,
        };
        Named {
            sends: sends.len(),
            recvs: recvs.len(),
            first,
        }
    }

    /// "send to rank 1 (f32, 10 elements)", or "a batch of 3 sends and 2
    /// receives (the first: ...)".
    fn text(&self) -> String {
        let one = match self.first {
            Some((true, peer, dtype, n)) => format!("send to rank {peer} ({dtype}, {n} elements)"),
            Some((false, peer, dtype, n)) => {
                format!("receive from rank {peer} ({dtype}, {n} elements)")
            }
            None => "an empty batch".into(),
        };
        match (self.sends, self.recvs) {
            (0, 1) | (1, 0) => one,
            (s, r) => format!("a batch of {s} sends and {r} receives (the first: {one})"),
        }
    }
}

fn read_from(
    from: &SendMem<'_>,
    dst: &mut [u8],
) -> std::result::Result<(), oxccl_kernels::KernelError> {
    match from {
        SendMem::Host(b) => {
            dst.copy_from_slice(b);
            Ok(())
        }
        SendMem::Device(d) => d.read(0, dst),
    }
}

fn write_into(
    into: &mut RecvMem<'_>,
    src: &[u8],
) -> std::result::Result<(), oxccl_kernels::KernelError> {
    match into {
        RecvMem::Host(b) => {
            b.copy_from_slice(src);
            Ok(())
        }
        RecvMem::Device(d) => d.write(0, src),
    }
}
