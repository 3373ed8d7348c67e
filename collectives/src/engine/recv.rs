//! The receive half: posts the plan's receives, one at a time, each
//! expecting the exact header of its frame (the link checks it before any
//! byte of the payload reaches the caller's buffer), and copies or reduces
//! each payload into place.

use std::ops::Range;

use oxccl_transport::{DevMut, Incoming, Lent, Parts, Status, TransportError};

use super::send::no_link;
use super::{Data, EngineError, Input, Out, Wire, outside, register, take_back};
use crate::links::Links;
use crate::schedule::{Commit, Plan, Progress, RecvOp, Src};

/// Copied frames up to this size are received through staging and copied
/// into place once their header is checked (a copy cheaper than the extra
/// read that receiving the header alone would cost on a byte stream);
/// larger ones are received in place.
pub(super) const STAGED_COPY: usize = 4096;

/// The receive in flight and the staging buffer.
pub(super) struct RecvHalf<'a> {
    /// The operation of every receive, refilled for each
    /// ([`Incoming::fill`]); while `posted`, that of
    /// `plan.recvs[progress.received()]`, not yet done.
    op: Incoming<'a>,
    posted: bool,
    /// Received payloads to reduce, small copies, and device slices;
    /// `None` while lent to the receive in flight.
    staging: Option<Vec<u8>>,
    /// Where the staging buffer lives between calls.
    home: &'a mut Vec<u8>,
    /// The staging buffer holds a whole frame that waits to be committed
    /// until the send it depends on is done ([`RecvOp::after_send`]).
    held: bool,
    /// A device output by address: the part of its scratch beyond the frame
    /// a receive holds (the frame's own part is lent, then in `frame`).
    scratch_rest: Option<DevMut<'a>>,
    /// The device frame received into scratch, until it is committed.
    frame: Option<DevMut<'a>>,
}

impl<'a> RecvHalf<'a> {
    #[inline]
    pub(super) fn new(plan: &Plan, device: Option<usize>, home: &'a mut Vec<u8>) -> RecvHalf<'a> {
        let lens = plan.recvs.iter().map(|r| r.range.len());
        // Device slices up to `over` bytes are staged (all of them when the
        // links cannot move device memory by address).
        let need = match device {
            Some(over) => lens.filter(|&l| l <= over).max().unwrap_or(0),
            None => plan
                .staging_len()
                .max(lens.filter(|&l| l <= STAGED_COPY).max().unwrap_or(0)),
        };
        if home.len() < need {
            home.resize(need, 0);
        }
        RecvHalf {
            op: Incoming::empty(),
            posted: false,
            staging: Some(std::mem::take(home)),
            home,
            held: false,
            scratch_rest: None,
            frame: None,
        }
    }

    /// Whether a received frame waits for a send before it is committed.
    pub(super) fn holding(&self) -> bool {
        self.held
    }

    /// Receives and commits the next frame if it is available (one per
    /// turn, so the send half runs in between). Returns whether any byte came.
    #[inline]
    pub(super) fn pump(
        &mut self,
        links: &mut Links<'_>,
        plan: &Plan,
        progress: &mut Progress,
        wire: &Wire<'_>,
        data: &mut Data<'a>,
    ) -> Result<bool, EngineError> {
        let Some(r) = progress.next_recv(plan) else {
            return Ok(false);
        };
        let mut moved = false;
        {
            let in_place = in_place(r, data);
            if self.held {
                if !progress.may_commit(r) {
                    return Ok(false);
                }
                self.held = false;
                moved = true;
            } else {
                let registration = links.registration();
                let link = links.link_from(r.peer).ok_or_else(|| no_link(r.peer))?;
                let at = plan.recv_cuts(progress.received());
                let status = if self.posted {
                    let op = &mut self.op;
                    let before = op.moved();
                    let status = link.test_recv(op).map_err(unexpected)?;
                    moved |= op.moved() != before;
                    status
                } else {
                    if in_place && send_first(plan, progress, r, data.input.is_none()) {
                        return Ok(moved);
                    }
                    let expect = wire.header(r.step, r.slice, r.range.len(), r.peer)?;
                    let (op, staging, rest) =
                        (&mut self.op, &mut self.staging, &mut self.scratch_rest);
                    let lend = |into: &mut Parts<'a>| {
                        memory(staging, rest, r, in_place, at.clone(), data, into)
                    };
                    if !op.fill(expect, lend)? {
                        // A send in flight still reads its range.
                        return Ok(moved);
                    }
                    register(registration, link, op.buffers())?;
                    if !in_place {
                        op.set_scratch();
                    }
                    self.posted = true;
                    let status = link.post_recv(op).map_err(unexpected)?;
                    moved |= op.moved() != 0;
                    status
                };
                if status == Status::Pending {
                    return Ok(moved);
                }
                moved = true;
                self.posted = false;
                let mut parts = self.op.take_buffers();
                if self.scratch_rest.is_some() {
                    // Received into device scratch: kept for the commit.
                    match parts.pop() {
                        Some(Lent::DeviceMut(frame)) => self.frame = Some(frame),
                        _ => return Err(staging_gone()),
                    }
                }
                if let Some(buf) = take_back(parts, &r.range, at, data)? {
                    self.staging = Some(buf);
                }
                if !in_place && !progress.may_commit(r) {
                    // Complete, but its range is still being sent: it waits
                    // in staging (reductions always go through staging).
                    self.held = true;
                    return Ok(moved);
                }
            }
            if !in_place {
                self.commit(r, plan.recv_cuts(progress.received()), data)?;
            }
            tracing::trace!(
                seq = wire.seq,
                step = r.step,
                slice = r.slice,
                bytes = r.range.len(),
                from = r.peer,
                "received"
            );
            progress.handle_received();
        }
        // One frame per turn: a send that waited for this one (a ring or a
        // chain forwards what it received) goes before the next frame is
        // read. Reading on, the receive half would keep the send half
        // waiting for as long as frames keep coming, and the peers
        // downstream idle meanwhile (measured: a 64 MiB allgather over
        // shared memory on 2 ranks took 1.3x as long).
        Ok(moved)
    }

    /// Copies or reduces a staged payload into place.
    fn commit(
        &mut self,
        r: &RecvOp,
        at: Range<usize>,
        data: &mut Data<'a>,
    ) -> Result<(), EngineError> {
        if r.commit == Commit::Discard {
            return Ok(());
        }
        let len = r.range.len();
        if let Out::Addressed(_) = &data.output {
            return self.commit_addressed(r, at, data);
        }
        let staged = self
            .staging
            .as_deref()
            .and_then(|s| s.get(..len))
            .ok_or_else(staging_gone)?;
        if let Out::Host(cells) = &mut data.output {
            let (dtype, op, world, reducer) = (data.dtype, data.op, data.world, data.reducer);
            return match r.commit {
                Commit::Reduce { with, finish_avg } => {
                    let local = match (with, data.input) {
                        (Src::Input, Some(Input::Host(inp))) => {
                            Some(&inp[r.range.start - data.off..r.range.end - data.off])
                        }
                        _ => None,
                    };
                    cells.each_mut(&r.range, at, |off, dst| {
                        if let Some(local) = local {
                            dst.copy_from_slice(&local[off..off + dst.len()]);
                        }
                        reducer.reduce(dtype, op, dst, &staged[off..off + dst.len()])?;
                        if finish_avg {
                            reducer.finish_avg(dtype, dst, world)?;
                        }
                        Ok(())
                    })
                }
                Commit::Copy => cells.each_mut(&r.range, at, |off, dst| {
                    dst.copy_from_slice(&staged[off..off + dst.len()]);
                    Ok(())
                }),
                Commit::Discard => Ok(()),
            };
        }
        match r.commit {
            Commit::Reduce { with, finish_avg } => {
                if with == Src::Input && data.input.is_some() {
                    data.copy_input(r.range.clone())?;
                }
                if let Out::Device(d) = &mut data.output {
                    d.reduce_from_host(data.dtype, data.op, r.range.start, staged)?;
                    if finish_avg {
                        d.finish_avg(data.dtype, r.range.start, len, data.world)?;
                    }
                }
            }
            Commit::Copy => {
                if let Out::Device(d) = &mut data.output {
                    d.write(r.range.start, staged)?;
                }
            }
            Commit::Discard => {}
        }
        Ok(())
    }
}

impl<'a> RecvHalf<'a> {
    /// Copies or reduces a frame into a device output by address: from
    /// device scratch (a large frame received there) or from host staging
    /// (a small one), with the device's own operations.
    fn commit_addressed(
        &mut self,
        r: &RecvOp,
        at: Range<usize>,
        data: &mut Data<'a>,
    ) -> Result<(), EngineError> {
        let (dtype, op, world, off) = (data.dtype, data.op, data.world, data.off);
        let input = match data.input {
            Some(Input::Addressed(i)) => Some(i),
            _ => None,
        };
        let Out::Addressed(o) = &mut data.output else {
            return Err(staging_gone());
        };
        let len = r.range.len();
        let frame = self.frame.take();
        let staged = match &frame {
            Some(_) => None,
            None => Some(
                self.staging
                    .as_deref()
                    .and_then(|s| s.get(..len))
                    .ok_or_else(staging_gone)?,
            ),
        };
        let (ops, cells) = (&o.ops, &mut o.cells);
        let result = cells.each_mut(&r.range, at, |from, cell| {
            let piece = from..from + cell.len();
            let host = staged.map(|s| &s[piece.clone()]);
            let device = frame.as_ref().and_then(|f| f.as_ref().slice(piece.clone()));
            match r.commit {
                Commit::Reduce { with, finish_avg } => {
                    if let (Src::Input, Some(i)) = (with, input) {
                        let own = r.range.start - off + from;
                        let own = i
                            .slice(own..own + cell.len())
                            .ok_or_else(|| outside("input", &r.range))?;
                        ops.copy(cell.reborrow(), own)?;
                    }
                    match (device, host) {
                        (Some(d), _) => ops.reduce(dtype, op, cell.reborrow(), d)?,
                        (None, Some(h)) => ops.reduce_from_host(dtype, op, cell.reborrow(), h)?,
                        (None, None) => return Err(staging_gone()),
                    }
                    if finish_avg {
                        ops.finish_avg(dtype, cell.reborrow(), world)?;
                    }
                }
                Commit::Copy => match (device, host) {
                    (Some(d), _) => ops.copy(cell.reborrow(), d)?,
                    (None, Some(h)) => ops.write(cell.reborrow(), h)?,
                    (None, None) => return Err(staging_gone()),
                },
                Commit::Discard => {}
            }
            Ok(())
        });
        // The frame's scratch goes back whole, whatever the commit did.
        if let Some(frame) = frame {
            let rest = self.scratch_rest.take().ok_or_else(staging_gone)?;
            o.scratch = Some(frame.join(rest).map_err(|_| staging_gone())?);
        }
        result
    }
}

impl Drop for RecvHalf<'_> {
    /// Puts the staging buffer back for the next call (lost only when a
    /// failed call dropped it with the receive it was lent to).
    fn drop(&mut self) {
        let buf = self.staging.take().or_else(|| {
            self.op.take_buffers().into_iter().find_map(|l| match l {
                Lent::Owned { buf, .. } => Some(buf),
                _ => None,
            })
        });
        if let Some(buf) = buf {
            *self.home = buf;
        }
    }
}

/// Appends the memory a receive is posted into to `into`: the
/// output's cells for a large copy to the host (false while a send in
/// flight reads some of them), else the staging buffer.
#[inline]
fn memory<'a>(
    staging: &mut Option<Vec<u8>>,
    scratch_rest: &mut Option<DevMut<'a>>,
    r: &RecvOp,
    in_place: bool,
    at: Range<usize>,
    data: &mut Data<'a>,
    into: &mut Parts<'a>,
) -> Result<bool, EngineError> {
    if r.commit == Commit::Discard {
        return Ok(true);
    }
    match &mut data.output {
        Out::Host(cells) if in_place => cells.lend(&r.range, at, into),
        Out::Addressed(o) if in_place => o.cells.lend(&r.range, at, into),
        Out::Addressed(o) if r.range.len() > o.over => {
            // A large frame to reduce: into device scratch.
            let scratch = o.scratch.take().ok_or_else(staging_gone)?;
            let (frame, rest) = scratch.split_at(r.range.len());
            *scratch_rest = Some(rest);
            into.push(Lent::DeviceMut(frame));
            Ok(true)
        }
        _ => {
            let buf = staging.take().ok_or_else(staging_gone)?;
            into.push(Lent::Owned {
                buf,
                len: r.range.len(),
            });
            Ok(true)
        }
    }
}

/// Whether a send that reads what `r` overwrites in place has still to go
/// first: a send not yet done, from the output (or an in-place call's
/// input), over bytes of `r`'s range, that does not itself wait for `r` or
/// a later receive. Byte streams got this order for free (the bytes of `r`
/// could only come once the peer had that send's), but a receive posted
/// early owns its memory, and the send could then never be posted.
///
/// Sends are taken in plan order and wait for receives in plan order, so
/// the scan stops at the first send that waits for `r` or later: it covers
/// only the few frames the send half is behind.
fn send_first(plan: &Plan, progress: &Progress, r: &RecvOp, in_place_call: bool) -> bool {
    let i = progress.received();
    plan.sends
        .get(progress.sent()..)
        .unwrap_or_default()
        .iter()
        .take_while(|s| s.after_recv.is_none_or(|a| a < i))
        .any(|s| {
            (s.src == Src::Output || in_place_call)
                && s.range.start < r.range.end
                && r.range.start < s.range.end
        })
}

/// Whether `r` is received straight into the caller's host output.
#[inline]
fn in_place(r: &RecvOp, data: &Data<'_>) -> bool {
    match (r.commit, &data.output) {
        (Commit::Copy, Out::Host(_)) => r.range.len() > STAGED_COPY,
        (Commit::Copy, Out::Addressed(o)) => r.range.len() > o.over,
        _ => false,
    }
}

fn staging_gone() -> EngineError {
    EngineError::Protocol {
        peer: 0,
        reason: "the staging buffer is lent to another frame".into(),
    }
}

/// A frame whose header is not the expected one: another call (a
/// mismatch between ranks), or this call out of step.
fn unexpected(e: TransportError) -> EngineError {
    match e {
        TransportError::Unexpected {
            peer,
            expected,
            got,
        } => {
            let same = got.descriptor == expected.descriptor;
            if !same || got.tag.seq != expected.tag.seq {
                EngineError::Mismatch {
                    peer,
                    descriptor: got.descriptor,
                    seq: got.tag.seq,
                }
            } else {
                EngineError::Protocol {
                    peer,
                    reason: format!(
                        "expected frame step {} slice {} of {} bytes, got step {} slice {} of {} bytes",
                        expected.tag.step,
                        expected.tag.slice,
                        expected.len,
                        got.tag.step,
                        got.tag.slice,
                        got.len
                    ),
                }
            }
        }
        e => EngineError::Transport(e),
    }
}
