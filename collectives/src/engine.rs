//! Drives a [`Plan`] over the ring's two links and a reducer.
//!
//! One thread per rank does everything: it writes the next allowed frame to
//! the next rank, reads the next frame from the previous rank, and reduces a
//! slice as soon as it has arrived, with nonblocking sockets, so both
//! directions stay busy while the kernel's socket buffers carry the slices in
//! flight. When neither direction can move it sleeps in `poll` on exactly the
//! sockets that can unblock it. This suits few cores (no thread hand-offs, no
//! copies between threads) and needs no `unsafe`: the engine is the only
//! borrower of the caller's buffers.
//!
//! Payloads go straight from the caller's buffer to the socket, and copies
//! (allgather, broadcast) are received straight into place; only slices that
//! are reduced pass through one staging buffer.

use std::io::{IoSlice, IoSliceMut};
use std::time::{Duration, Instant};

use oxccl_kernels::{DType, DeviceMemory, KernelError, ReduceOp, Reducer};
use oxccl_transport::wire::{DESCRIPTOR_LEN, FrameHeader, Tag};
use oxccl_transport::{Link, TransportError, wait_watching};

use crate::schedule::{Commit, Plan, Progress, Src};

/// The two links of a rank in the ring.
pub(crate) struct Ring<'a> {
    /// To `rank + 1`.
    pub next: &'a mut dyn Link,
    /// From `rank - 1`.
    pub prev: &'a mut dyn Link,
}

/// Where the engine reads a call's input.
#[derive(Clone, Copy)]
pub(crate) enum Input<'a> {
    /// Host memory: sent straight from here.
    Host(&'a [u8]),
    /// Device memory: read to the host slice by slice.
    Device(&'a dyn DeviceMemory),
}

/// Where the engine writes a call's result.
pub(crate) enum Output<'a> {
    /// Host memory: received straight into place, reduced by the host reducer.
    Host(&'a mut [u8]),
    /// Device memory: each received slice is staged on the host, then
    /// written or reduced into the device by the device's own kernels.
    Device(&'a mut dyn DeviceMemory),
}

/// One collective for the engine to run.
pub(crate) struct Job<'a> {
    pub plan: &'a Plan,
    pub seq: u64,
    pub descriptor: [u8; DESCRIPTOR_LEN],
    /// `None` for an in-place call.
    pub input: Option<Input<'a>>,
    pub output: Output<'a>,
    pub dtype: DType,
    pub op: ReduceOp,
    pub world: usize,
    pub reducer: &'a dyn Reducer,
    pub staging: &'a mut Vec<u8>,
    pub timeout: Duration,
    /// How long to busy-poll before sleeping in `poll`.
    pub spin: Duration,
    /// Frames of this step and later may go by single copy where the link
    /// offers it ([`Link::allow_single_copy`], set before every frame);
    /// `None`: none may.
    pub single_copy_from: Option<u32>,
}

/// Why the engine stopped.
#[derive(Debug)]
pub(crate) enum EngineError {
    Transport(TransportError),
    Timeout {
        peer: usize,
        what: String,
        waited: Duration,
    },
    Mismatch {
        peer: usize,
        descriptor: [u8; DESCRIPTOR_LEN],
        seq: u64,
    },
    Protocol {
        peer: usize,
        reason: String,
    },
    Kernel(KernelError),
}

impl From<TransportError> for EngineError {
    fn from(e: TransportError) -> Self {
        EngineError::Transport(e)
    }
}

impl From<KernelError> for EngineError {
    fn from(e: KernelError) -> Self {
        EngineError::Kernel(e)
    }
}

const HDR: usize = FrameHeader::LEN;

/// Copied frames up to this size are received through staging and copied
/// into place once their header is checked (a copy cheaper than the extra
/// read that receiving the header alone would cost); larger ones are
/// received in place, after their header alone.
const STAGED_COPY: usize = 4096;

/// How long an idle engine spins on the CPU alone before it starts yielding
/// the core to other threads between checks.
const PAUSE_SPIN: Duration = Duration::from_micros(2);

/// Runs `job`. `ring` may be `None` only when the plan has no frames.
pub(crate) fn run(ring: Option<Ring<'_>>, job: Job<'_>) -> Result<(), EngineError> {
    let Job {
        plan,
        seq,
        descriptor,
        input,
        output,
        dtype,
        op,
        world,
        reducer,
        staging,
        timeout,
        spin,
        single_copy_from,
    } = job;
    let mut output = output;
    let off = plan.input_offset;
    // Host bytes for device slices: received (staging), about to be sent
    // (send_stage), or an out-of-place input on its way to the output (bounce).
    let device = matches!(output, Output::Device(_));
    let mut send_stage: Vec<u8> = Vec::new();
    let mut bounce: Vec<u8> = Vec::new();
    let has_frames = !(plan.sends.is_empty() && plan.recvs.is_empty());
    // A deferrable prologue waits for the first moment without traffic.
    let mut deferred = None;
    if let (Some(r), Some(inp)) = (plan.prologue_copy.clone(), input) {
        if plan.prologue_deferrable && has_frames {
            deferred = Some((inp, r));
        } else {
            copy_input(inp, &mut output, r, off, &mut bounce)?;
        }
    }
    if let Some(r) = plan.local_avg.clone() {
        match &mut output {
            Output::Host(o) => reducer.finish_avg(dtype, &mut o[r], world)?,
            Output::Device(d) => d.finish_avg(dtype, r.start, r.len(), world)?,
        }
    }
    if !has_frames {
        return Ok(());
    }
    let Some(ring) = ring else {
        return Err(EngineError::Protocol {
            peer: 0,
            reason: "a plan with frames but no links".into(),
        });
    };
    let need = if device {
        plan.recvs.iter().map(|r| r.range.len()).max().unwrap_or(0)
    } else {
        let staged_copies = plan.recvs.iter().map(|r| r.range.len());
        plan.staging_len().max(
            staged_copies
                .filter(|&l| l <= STAGED_COPY)
                .max()
                .unwrap_or(0),
        )
    };
    if staging.len() < need {
        staging.resize(need, 0);
    }
    if device {
        send_stage.resize(
            plan.sends.iter().map(|s| s.range.len()).max().unwrap_or(0),
            0,
        );
    }
    let next_rank = ring.next.peer();
    let prev_rank = ring.prev.peer();
    let pauses_per_check = if ring.next.cheap_to_poll() && ring.prev.cheap_to_poll() {
        1
    } else {
        64
    };

    let mut progress = Progress::default();
    let mut send_hdr = [0u8; HDR];
    let mut send_pos = 0usize; // bytes of the current frame written, header included
    let mut recv_hdr = [0u8; HDR];
    let mut recv_pos = 0usize; // bytes of the current frame read, header included
    let mut empty = [0u8; 0];
    // When the current stretch without progress began: the busy-poll's
    // start and the deadline's. Set at the first check that moves nothing,
    // so a call whose bytes are already there reads no clock at all.
    let mut idle_since: Option<Instant> = None;

    loop {
        let mut moved = false;
        let mut send_full = false;

        // Send every frame that may go, until the socket is full.
        while let Some(s) = progress.next_send(plan) {
            let len = s.range.len();
            let payload: &[u8] = match (s.src, input, &output) {
                (Src::Input, Some(Input::Host(inp)), _) => {
                    &inp[s.range.start - off..s.range.end - off]
                }
                (Src::Input, Some(Input::Device(inp)), _) => {
                    if send_pos == 0 {
                        inp.read(s.range.start - off, &mut send_stage[..len])?;
                    }
                    &send_stage[..len]
                }
                (_, _, Output::Host(o)) => &o[s.range.clone()],
                (_, _, Output::Device(o)) => {
                    if send_pos == 0 {
                        o.read(s.range.start, &mut send_stage[..len])?;
                    }
                    &send_stage[..len]
                }
            };
            if send_pos == 0 {
                ring.next
                    .allow_single_copy(single_copy_from.is_some_and(|from| s.step >= from));
                send_hdr = FrameHeader {
                    tag: Tag {
                        seq,
                        step: s.step,
                        slice: s.slice,
                    },
                    // Slices and the small-message path are at most 1 GiB
                    // (Config::validate); a larger frame is a bug, not a wrap.
                    len: u32::try_from(payload.len()).map_err(|_| EngineError::Protocol {
                        peer: next_rank,
                        reason: format!(
                            "a frame of {} bytes exceeds the 4 GiB frame limit",
                            payload.len()
                        ),
                    })?,
                    descriptor,
                }
                .encode();
            }
            let n = if send_pos < HDR {
                ring.next
                    .try_write(&[IoSlice::new(&send_hdr[send_pos..]), IoSlice::new(payload)])?
            } else {
                ring.next
                    .try_write(&[IoSlice::new(&payload[send_pos - HDR..])])?
            };
            if n == 0 {
                send_full = true;
                break;
            }
            moved = true;
            send_pos += n;
            if send_pos == HDR + payload.len() {
                tracing::trace!(
                    seq,
                    step = s.step,
                    slice = s.slice,
                    bytes = payload.len(),
                    to = next_rank,
                    "sent"
                );
                progress.handle_sent();
                send_pos = 0;
            }
        }

        // Receive every frame available.
        while let Some(r) = progress.next_recv(plan) {
            let len = r.range.len();
            // No byte reaches the caller's buffer before its frame's header
            // is checked: a large copied frame is read in place after its
            // header alone; everything else goes through staging, whose
            // bytes count only once the frame is complete.
            let in_place =
                matches!((r.commit, &output), (Commit::Copy, Output::Host(_))) && len > STAGED_COPY;
            let target: &mut [u8] = match (r.commit, &mut output) {
                (Commit::Copy, Output::Host(o)) if in_place => &mut o[r.range.clone()],
                (Commit::Discard, _) => &mut empty,
                _ => &mut staging[..len],
            };
            let was_header = recv_pos < HDR;
            let n = if was_header && in_place {
                ring.prev
                    .try_read(&mut [IoSliceMut::new(&mut recv_hdr[recv_pos..])])?
            } else if was_header {
                ring.prev.try_read(&mut [
                    IoSliceMut::new(&mut recv_hdr[recv_pos..]),
                    IoSliceMut::new(target),
                ])?
            } else {
                ring.prev
                    .try_read(&mut [IoSliceMut::new(&mut target[recv_pos - HDR..])])?
            };
            if n == 0 {
                break;
            }
            moved = true;
            recv_pos += n;
            if was_header && recv_pos >= HDR {
                check_header(&recv_hdr, seq, &descriptor, r.step, r.slice, len, prev_rank)?;
            }
            if recv_pos == HDR + len {
                match (r.commit, &mut output) {
                    (Commit::Reduce { with, finish_avg }, Output::Host(o)) => {
                        let dst = &mut o[r.range.clone()];
                        if let (Src::Input, Some(Input::Host(inp))) = (with, input) {
                            dst.copy_from_slice(&inp[r.range.start - off..r.range.end - off]);
                        }
                        reducer.reduce(dtype, op, dst, &staging[..len])?;
                        if finish_avg {
                            reducer.finish_avg(dtype, dst, world)?;
                        }
                    }
                    (Commit::Reduce { with, finish_avg }, out @ Output::Device(_)) => {
                        if let (Src::Input, Some(inp)) = (with, input) {
                            copy_input(inp, out, r.range.clone(), off, &mut bounce)?;
                        }
                        if let Output::Device(d) = out {
                            d.reduce_from_host(dtype, op, r.range.start, &staging[..len])?;
                            if finish_avg {
                                d.finish_avg(dtype, r.range.start, len, world)?;
                            }
                        }
                    }
                    (Commit::Copy, Output::Device(d)) => d.write(r.range.start, &staging[..len])?,
                    (Commit::Copy, Output::Host(o)) if !in_place => {
                        o[r.range.clone()].copy_from_slice(&staging[..len]);
                    }
                    (Commit::Copy, Output::Host(_)) | (Commit::Discard, _) => {}
                }
                tracing::trace!(
                    seq,
                    step = r.step,
                    slice = r.slice,
                    bytes = len,
                    from = prev_rank,
                    "received"
                );
                progress.handle_received();
                recv_pos = 0;
            }
        }

        if progress.done(plan) {
            if let Some((inp, r)) = deferred.take() {
                copy_input(inp, &mut output, r, off, &mut bounce)?;
            }
            return Ok(());
        }
        if moved {
            idle_since = None;
            continue;
        }
        if let Some((inp, r)) = deferred.take() {
            copy_input(inp, &mut output, r, off, &mut bounce)?;
            continue;
        }
        // Busy-poll a little before sleeping: a wake-up from poll costs tens
        // of microseconds, more than a small message takes to arrive.
        let now = Instant::now();
        let idle = now.duration_since(*idle_since.get_or_insert(now));
        if idle < spin {
            if idle < PAUSE_SPIN {
                // Shared memory delivers in well under a microsecond: a
                // system call per check would cost more than the wait. A
                // pause takes tens to hundreds of cycles (65 on AMD Zen 2,
                // 140 on Intel Skylake): shared-memory links, whose checks
                // are memory loads, are checked after every pause; sockets,
                // whose checks are system calls that contend with the
                // kernel's delivery into the same socket, after 64.
                for _ in 0..pauses_per_check {
                    std::hint::spin_loop();
                }
            } else {
                // Let another rank on this core run (oversubscription).
                std::thread::yield_now();
            }
            continue;
        }
        let waited = idle;
        let want_read = progress.next_recv(plan);
        if waited >= timeout {
            let peer = if want_read.is_some() {
                prev_rank
            } else {
                next_rank
            };
            let what = match want_read {
                Some(r) => format!(
                    "data from rank {prev_rank} (step {}, slice {}; {} of {} frames received)",
                    r.step,
                    r.slice,
                    progress.received(),
                    plan.recvs.len()
                ),
                None => format!(
                    "rank {next_rank} to take data ({} of {} frames sent)",
                    progress.sent(),
                    plan.sends.len()
                ),
            };
            return Err(EngineError::Timeout { what, waited, peer });
        }
        let read_link: Option<&dyn Link> = if want_read.is_some() {
            Some(&*ring.prev)
        } else {
            None
        };
        let write_link: Option<&dyn Link> = if send_full { Some(&*ring.next) } else { None };
        // Frames still owed to the next rank: watch its link for a hang-up
        // too, so that its death is noticed now, from its own socket.
        let watch: Option<&dyn Link> = if write_link.is_none() && progress.sent() < plan.sends.len()
        {
            Some(&*ring.next)
        } else {
            None
        };
        let ready = wait_watching(read_link, write_link, watch, timeout - waited)?;
        if ready.hung_up {
            return Err(EngineError::Transport(TransportError::PeerClosed {
                peer: next_rank,
                how: format!(
                    "hung up while {} of {} frames were still to be sent to it",
                    plan.sends.len() - progress.sent(),
                    plan.sends.len()
                ),
            }));
        }
    }
}

/// `output[range] = input[range - off]`, through `bounce` when either side is on a device.
fn copy_input(
    input: Input<'_>,
    output: &mut Output<'_>,
    range: std::ops::Range<usize>,
    off: usize,
    bounce: &mut Vec<u8>,
) -> Result<(), EngineError> {
    let src = range.start - off..range.end - off;
    match (input, output) {
        (Input::Host(i), Output::Host(o)) => o[range].copy_from_slice(&i[src]),
        (Input::Host(i), Output::Device(o)) => o.write(range.start, &i[src])?,
        (Input::Device(i), Output::Host(o)) => i.read(src.start, &mut o[range])?,
        (Input::Device(i), Output::Device(o)) => {
            bounce.resize(range.len(), 0);
            i.read(src.start, bounce)?;
            o.write(range.start, bounce)?;
        }
    }
    Ok(())
}

fn check_header(
    raw: &[u8; HDR],
    seq: u64,
    descriptor: &[u8; DESCRIPTOR_LEN],
    step: u32,
    slice: u32,
    len: usize,
    peer: usize,
) -> Result<(), EngineError> {
    let h = FrameHeader::decode(raw).map_err(|reason| EngineError::Protocol { peer, reason })?;
    if h.descriptor != *descriptor || h.tag.seq != seq {
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
