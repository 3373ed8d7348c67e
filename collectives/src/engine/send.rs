//! The send half: writes the plan's frames to their peers, each a header
//! and a payload taken straight from the caller's buffer (or staged from a
//! device), as far as the link takes them.

use std::io::IoSlice;

use oxccl_transport::wire::{FrameHeader, Tag};

use super::{Data, EngineError, HDR, Input, Output, Wire};
use crate::links::Links;
use crate::schedule::{Plan, Progress, Src};

/// The frame being written and the host copy of a device slice.
pub(super) struct SendHalf {
    hdr: [u8; HDR],
    /// Bytes of the current frame written, header included.
    pos: usize,
    /// Host bytes of a device slice about to be sent.
    stage: Vec<u8>,
}

impl SendHalf {
    pub(super) fn new(plan: &Plan, device: bool) -> SendHalf {
        let stage_len = if device {
            plan.sends.iter().map(|s| s.range.len()).max().unwrap_or(0)
        } else {
            0
        };
        SendHalf {
            hdr: [0; HDR],
            pos: 0,
            stage: vec![0; stage_len],
        }
    }

    /// Writes every frame that may go, until the link is full. Returns
    /// whether any byte went, and whether the link is full.
    #[inline]
    pub(super) fn pump(
        &mut self,
        links: &mut Links<'_>,
        plan: &Plan,
        progress: &mut Progress,
        wire: &Wire,
        data: &mut Data<'_>,
        single_copy_from: Option<u32>,
    ) -> Result<(bool, bool), EngineError> {
        let mut moved = false;
        while let Some(s) = progress.next_send(plan) {
            let Some(link) = links.link_to(s.peer) else {
                return Err(no_link(s.peer));
            };
            let len = s.range.len();
            let off = data.off;
            let payload: &[u8] = match (s.src, data.input, &data.output) {
                (Src::Input, Some(Input::Host(inp)), _) => {
                    &inp[s.range.start - off..s.range.end - off]
                }
                (Src::Input, Some(Input::Device(inp)), _) => {
                    if self.pos == 0 {
                        inp.read(s.range.start - off, &mut self.stage[..len])?;
                    }
                    &self.stage[..len]
                }
                (_, _, Output::Host(o)) => &o[s.range.clone()],
                (_, _, Output::Device(o)) => {
                    if self.pos == 0 {
                        o.read(s.range.start, &mut self.stage[..len])?;
                    }
                    &self.stage[..len]
                }
            };
            if self.pos == 0 {
                link.allow_single_copy(single_copy_from.is_some_and(|from| s.step >= from));
                self.hdr = FrameHeader {
                    tag: Tag {
                        seq: wire.seq,
                        step: s.step,
                        slice: s.slice,
                    },
                    // Slices and the small-message path are at most 1 GiB
                    // (Config::validate); a larger frame is a bug, not a wrap.
                    len: u32::try_from(len).map_err(|_| EngineError::Protocol {
                        peer: link.peer(),
                        reason: format!("a frame of {len} bytes exceeds the 4 GiB frame limit"),
                    })?,
                    descriptor: wire.descriptor,
                }
                .encode();
            }
            let n = if self.pos < HDR {
                link.try_write(&[IoSlice::new(&self.hdr[self.pos..]), IoSlice::new(payload)])?
            } else {
                link.try_write(&[IoSlice::new(&payload[self.pos - HDR..])])?
            };
            if n == 0 {
                return Ok((moved, true));
            }
            moved = true;
            self.pos += n;
            if self.pos == HDR + len {
                tracing::trace!(
                    seq = wire.seq,
                    step = s.step,
                    slice = s.slice,
                    bytes = len,
                    to = link.peer(),
                    "sent"
                );
                progress.handle_sent();
                self.pos = 0;
            }
        }
        Ok((moved, false))
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
