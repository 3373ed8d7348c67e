//! The send half: posts the plan's frames to their peers, one at a time,
//! each a header and a payload lent straight from the caller's buffer (an
//! input range, or the output's cells) or staged from a device, and tests
//! the frame in flight until its link is done with it.

use std::ops::Range;

use oxccl_transport::{Lent, Outgoing, Parts, Status};

use super::{Data, EngineError, Input, Out, Wire, outside, register, take_back};
use crate::links::Links;
use crate::schedule::{Plan, Progress, SendOp, Src};

/// The frame in flight and the host copy of a device slice.
pub(super) struct SendHalf<'a> {
    /// The operation of every frame, refilled for each
    /// ([`Outgoing::fill`]); while `posted`, that of
    /// `plan.sends[progress.sent()]`, not yet done.
    op: Outgoing<'a>,
    posted: bool,
    /// Host bytes of a device slice about to be sent; owned by the frame
    /// in flight while it carries one.
    stage: Vec<u8>,
}

impl<'a> SendHalf<'a> {
    #[inline]
    pub(super) fn new(plan: &Plan, device: Option<usize>) -> SendHalf<'a> {
        // Device slices up to `device` bytes are staged (all of them when
        // the links cannot move device memory by address).
        let stage_len = match device {
            Some(over) => plan
                .sends
                .iter()
                .map(|s| s.range.len())
                .filter(|&l| l <= over)
                .max()
                .unwrap_or(0),
            None => 0,
        };
        SendHalf {
            op: Outgoing::empty(),
            posted: false,
            stage: vec![0; stage_len],
        }
    }

    /// Posts every frame that may go and tests the one in flight, until a
    /// link cannot take more now. Returns whether any byte went, and
    /// whether a link is full.
    #[inline]
    pub(super) fn pump(
        &mut self,
        links: &mut Links<'_>,
        plan: &Plan,
        progress: &mut Progress,
        wire: &Wire<'_>,
        data: &mut Data<'a>,
        single_copy_from: Option<u32>,
    ) -> Result<(bool, bool), EngineError> {
        let mut moved = false;
        loop {
            let op = &mut self.op;
            let (s, status) = if self.posted {
                let Some(s) = plan.sends.get(progress.sent()) else {
                    return Err(protocol("a frame in flight that the plan does not send"));
                };
                let link = links.link_to(s.peer).ok_or_else(|| no_link(s.peer))?;
                let before = op.moved();
                let status = link.test_send(op)?;
                moved |= op.moved() != before;
                (s, status)
            } else {
                let Some(s) = progress.next_send(plan) else {
                    return Ok((moved, false));
                };
                let header = wire.header(s.step, s.slice, s.range.len(), s.peer)?;
                let at = plan.send_cuts(progress.sent());
                let stage = &mut self.stage;
                if !op.fill(&header, |out| payload(stage, s, at, data, out))? {
                    // A receive posted early holds part of its range.
                    return Ok((moved, false));
                }
                let registration = links.registration();
                let link = links.link_to(s.peer).ok_or_else(|| no_link(s.peer))?;
                register(registration, link, op.payload())?;
                op.set_single_copy(single_copy_from.is_some_and(|from| s.step >= from));
                self.posted = true;
                let status = link.post_send(op)?;
                moved |= op.moved() != 0;
                (s, status)
            };
            if status == Status::Pending {
                return Ok((moved, true));
            }
            self.posted = false;
            let at = plan.send_cuts(progress.sent());
            if let Some(buf) = take_back(op.take_payload(), &s.range, at, data)? {
                self.stage = buf;
            }
            moved = true;
            tracing::trace!(
                seq = wire.seq,
                step = s.step,
                slice = s.slice,
                bytes = s.range.len(),
                to = s.peer,
                "sent"
            );
            progress.handle_sent();
        }
    }
}

/// Appends the memory a frame's payload is lent from to `out`; false
/// while a receive in flight holds part of it.
#[inline]
fn payload<'a>(
    stage: &mut Vec<u8>,
    s: &SendOp,
    at: Range<usize>,
    data: &mut Data<'a>,
    out: &mut Parts<'a>,
) -> Result<bool, EngineError> {
    let len = s.range.len();
    let off = data.off;
    let mut staged = |read: &mut dyn FnMut(&mut [u8]) -> Result<(), EngineError>| {
        let mut buf = std::mem::take(stage);
        let Some(dst) = buf.get_mut(..len) else {
            return Err(protocol("a device slice larger than the send staging"));
        };
        read(dst)?;
        out.push(Lent::Owned { buf, len });
        Ok(true)
    };
    // The input's coordinates of the range (for sends from the input only).
    let src = || s.range.start - off..s.range.end - off;
    match (s.src, data.input, &mut data.output) {
        (Src::Input, Some(Input::Host(inp)), _) => {
            out.push(Lent::Shared(&inp[src()]));
            Ok(true)
        }
        (Src::Input, Some(Input::Device(inp)), _) => {
            staged(&mut |dst| Ok(inp.read(src().start, dst)?))
        }
        (Src::Input, Some(Input::Addressed(inp)), Out::Addressed(o)) => {
            let from = inp.slice(src()).ok_or_else(|| outside("input", &src()))?;
            if len > o.over {
                out.push(Lent::Device(from));
                Ok(true)
            } else {
                let ops = &o.ops;
                staged(&mut |dst| Ok(ops.read(from, dst)?))
            }
        }
        (Src::Input, Some(Input::Addressed(_)), _) => Err(protocol(
            "a device input by address with an output that is not",
        )),
        (_, _, Out::Host(cells)) => cells.lend(&s.range, at, out),
        (_, _, Out::Device(o)) => staged(&mut |dst| Ok(o.read(s.range.start, dst)?)),
        (_, _, Out::Addressed(o)) if len > o.over => o.cells.lend(&s.range, at, out),
        (_, _, Out::Addressed(o)) => {
            let (ops, cells) = (&o.ops, &mut o.cells);
            staged(&mut |dst| {
                cells.each_mut(&s.range, at.clone(), |from, cell| {
                    let to = dst
                        .get_mut(from..from + cell.len())
                        .ok_or_else(|| protocol("a device slice larger than the send staging"))?;
                    Ok(ops.read(cell.as_ref(), to)?)
                })
            })
        }
    }
}

fn protocol(reason: &str) -> EngineError {
    EngineError::Protocol {
        peer: 0,
        reason: reason.into(),
    }
}

/// A plan names a peer this rank has no link to: a bug in choosing the
/// links or the algorithm, reported rather than panicked on.
pub(super) fn no_link(peer: usize) -> EngineError {
    EngineError::Protocol {
        peer,
        reason: format!(
            "the plan exchanges frames with rank {peer}, but this rank has no link to it"
        ),
    }
}
