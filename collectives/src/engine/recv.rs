//! The receive half: reads the plan's frames from their peers, checks
//! each header before any byte of its payload reaches the caller's buffer,
//! and copies or reduces the payload into place.

use std::io::IoSliceMut;

use oxccl_transport::wire::FrameHeader;

use super::send::no_link;
use super::{Data, EngineError, HDR, Input, Output, Wire};
use crate::links::Links;
use crate::schedule::{Commit, Plan, Progress, Src};

/// Copied frames up to this size are received through staging and copied
/// into place once their header is checked (a copy cheaper than the extra
/// read that receiving the header alone would cost); larger ones are
/// received in place, after their header alone.
pub(super) const STAGED_COPY: usize = 4096;

/// The frame being read and the buffer that takes what is not received in place.
pub(super) struct RecvHalf<'a> {
    hdr: [u8; HDR],
    /// Bytes of the current frame read, header included.
    pos: usize,
    /// Received payloads to reduce, small copies, and device slices.
    staging: &'a mut Vec<u8>,
    /// The current frame is received whole and waits to be committed
    /// until the send it depends on is done ([`RecvOp::after_send`]).
    ///
    /// [`RecvOp::after_send`]: crate::schedule::RecvOp::after_send
    held: bool,
}

impl<'a> RecvHalf<'a> {
    pub(super) fn new(plan: &Plan, device: bool, staging: &'a mut Vec<u8>) -> RecvHalf<'a> {
        let lens = plan.recvs.iter().map(|r| r.range.len());
        let need = if device {
            lens.max().unwrap_or(0)
        } else {
            plan.staging_len()
                .max(lens.filter(|&l| l <= STAGED_COPY).max().unwrap_or(0))
        };
        if staging.len() < need {
            staging.resize(need, 0);
        }
        RecvHalf {
            hdr: [0; HDR],
            pos: 0,
            staging,
            held: false,
        }
    }

    /// Whether a received frame waits for a send before it is committed.
    pub(super) fn holding(&self) -> bool {
        self.held
    }

    /// Reads every frame available. Returns whether any byte came.
    #[inline]
    pub(super) fn pump(
        &mut self,
        links: &mut Links<'_>,
        plan: &Plan,
        progress: &mut Progress,
        wire: &Wire,
        data: &mut Data<'_>,
    ) -> Result<bool, EngineError> {
        let mut moved = false;
        let mut empty = [0u8; 0];
        while let Some(r) = progress.next_recv(plan) {
            let peer = r.peer;
            let len = r.range.len();
            // No byte reaches the caller's buffer before its frame's header
            // is checked: a large copied frame is read in place after its
            // header alone; everything else goes through staging, whose
            // bytes count only once the frame is complete.
            let in_place = matches!((r.commit, &data.output), (Commit::Copy, Output::Host(_)))
                && len > STAGED_COPY;
            if self.held {
                if !progress.may_commit(r) {
                    break;
                }
                self.held = false;
            } else {
                let Some(link) = links.link_from(peer) else {
                    return Err(no_link(peer));
                };
                let target: &mut [u8] = match (r.commit, &mut data.output) {
                    (Commit::Copy, Output::Host(o)) if in_place => &mut o[r.range.clone()],
                    (Commit::Discard, _) => &mut empty,
                    _ => &mut self.staging[..len],
                };
                let was_header = self.pos < HDR;
                let n = if was_header && in_place {
                    link.try_read(&mut [IoSliceMut::new(&mut self.hdr[self.pos..])])?
                } else if was_header {
                    link.try_read(&mut [
                        IoSliceMut::new(&mut self.hdr[self.pos..]),
                        IoSliceMut::new(target),
                    ])?
                } else {
                    link.try_read(&mut [IoSliceMut::new(&mut target[self.pos - HDR..])])?
                };
                if n == 0 {
                    break;
                }
                moved = true;
                self.pos += n;
                if was_header && self.pos >= HDR {
                    check_header(&self.hdr, wire, r.step, r.slice, len, peer)?;
                }
                if self.pos < HDR + len {
                    continue;
                }
                if !progress.may_commit(r) {
                    // Complete, but its range is still being sent: it waits in
                    // staging (reductions always go through staging).
                    self.held = true;
                    break;
                }
            }
            // Not sized for frames received in place.
            let staged = || &self.staging[..len];
            match (r.commit, &mut data.output) {
                (Commit::Reduce { with, finish_avg }, Output::Host(o)) => {
                    let dst = &mut o[r.range.clone()];
                    if let (Src::Input, Some(Input::Host(inp))) = (with, data.input) {
                        dst.copy_from_slice(&inp[r.range.start - data.off..r.range.end - data.off]);
                    }
                    data.reducer.reduce(data.dtype, data.op, dst, staged())?;
                    if finish_avg {
                        data.reducer.finish_avg(data.dtype, dst, data.world)?;
                    }
                }
                (Commit::Reduce { with, finish_avg }, Output::Device(_)) => {
                    if with == Src::Input && data.input.is_some() {
                        data.copy_input(r.range.clone())?;
                    }
                    if let Output::Device(d) = &mut data.output {
                        d.reduce_from_host(data.dtype, data.op, r.range.start, staged())?;
                        if finish_avg {
                            d.finish_avg(data.dtype, r.range.start, len, data.world)?;
                        }
                    }
                }
                (Commit::Copy, Output::Device(d)) => d.write(r.range.start, staged())?,
                (Commit::Copy, Output::Host(o)) if !in_place => {
                    o[r.range.clone()].copy_from_slice(staged());
                }
                (Commit::Copy, Output::Host(_)) | (Commit::Discard, _) => {}
            }
            tracing::trace!(
                seq = wire.seq,
                step = r.step,
                slice = r.slice,
                bytes = len,
                from = peer,
                "received"
            );
            progress.handle_received();
            self.pos = 0;
        }
        Ok(moved)
    }
}

/// Checks a frame's header against the call and the frame the plan expects.
#[inline]
fn check_header(
    raw: &[u8; HDR],
    wire: &Wire,
    step: u32,
    slice: u32,
    len: usize,
    peer: usize,
) -> Result<(), EngineError> {
    let h = FrameHeader::parse(raw).map_err(|e| EngineError::Protocol {
        peer,
        reason: e.to_string(),
    })?;
    // Two words, not a memcmp call: this runs for every frame.
    let same = u128::from_ne_bytes(h.descriptor) == u128::from_ne_bytes(wire.descriptor);
    if !same || h.tag.seq != wire.seq {
        return Err(EngineError::Mismatch {
            peer,
            descriptor: h.descriptor,
            seq: h.tag.seq,
        });
    }
    if h.tag.step != step || h.tag.slice != slice || h.len as usize != len {
        return Err(EngineError::Protocol {
            peer,
            reason: format!(
                "expected frame step {step} slice {slice} of {len} bytes, got step {} slice {} of {} bytes",
                h.tag.step, h.tag.slice, h.len
            ),
        });
    }
    Ok(())
}
