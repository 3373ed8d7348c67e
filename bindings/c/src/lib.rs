//! The C ABI of oxccl, shaped like `nccl.h` (see `include/oxccl.h`, generated
//! from this file by cbindgen).
//!
//! A caller of NCCL ports by renaming `nccl` to `oxccl`: the result codes,
//! data types and reduction ops have NCCL's values, every function takes
//! NCCL's arguments in NCCL's order, and the unique id is 128 bytes. Buffers
//! are host memory: `stream` must be NULL.
//!
//! # Safety
//!
//! Every entry point is an `unsafe extern "C" fn` whose `# Safety` section
//! states what the caller promises; this module keeps these invariants:
//!
//! - **No unwinding into C.** Every entry point runs its body inside
//!   [`std::panic::catch_unwind`] and turns a panic into
//!   `oxcclInternalError` with a message.
//! - **Enums arrive as integers.** Data types, ops and result codes are taken
//!   as `int` and range-checked, so an out-of-range value is
//!   `oxcclInvalidArgument`, never an invalid Rust enum.
//! - **Pointers are checked before use.** A NULL pointer is refused with
//!   `oxcclInvalidArgument`; a buffer of zero bytes is never dereferenced, so
//!   it may be NULL. Buffer sizes are computed with checked arithmetic and
//!   must fit in `isize`, the limit of a Rust slice.
//! - **No aliasing of `&mut`.** An input and an output slice never overlap:
//!   in-place calls (NCCL's pointer equalities) pass no input slice, and
//!   partially overlapping buffers are refused.
//! - **A communicator handle** (`oxcclComm_t`) is an `Arc<oxcclComm>` leaked
//!   by an init call (`Arc::into_raw`) and reclaimed by
//!   `oxcclCommDestroy`/`oxcclCommAbort`; every call takes its own count for
//!   its duration, so an abort from another thread never frees a
//!   communicator under a call in progress.
//!   Its `Communicator` sits behind a mutex, so calls from several threads on
//!   one handle are serialized rather than racing. Its rank, world, abort
//!   handle and asynchronous error live outside the mutex, so that
//!   `oxcclCommAbort` and `oxcclCommGetAsyncError` never wait for a
//!   collective in progress.
//! - **Groups** (`oxcclGroupStart`/`oxcclGroupEnd`) are per thread: the
//!   queue holds addresses only, and dereferences them at `oxcclGroupEnd`,
//!   when the caller promises (as with NCCL) that communicators and buffers
//!   are still valid.
//! - **The last error** is a thread-local C string, valid until the next
//!   failing oxccl call on the same thread.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use oxccl::{AbortHandle, Communicator, Config, DType, Descriptor, ErrorKind, Kind, ReduceOp};

// ---------------------------------------------------------------------------
// Version
// ---------------------------------------------------------------------------

/// Major version of oxccl.
pub const OXCCL_MAJOR: c_int = 0;
/// Minor version of oxccl.
pub const OXCCL_MINOR: c_int = 1;
/// Patch version of oxccl.
pub const OXCCL_PATCH: c_int = 0;
/// `OXCCL_MAJOR * 10000 + OXCCL_MINOR * 100 + OXCCL_PATCH`, as NCCL's
/// `NCCL_VERSION_CODE`; `oxcclGetVersion` returns it.
pub const OXCCL_VERSION_CODE: c_int = OXCCL_MAJOR * 10000 + OXCCL_MINOR * 100 + OXCCL_PATCH;

// ---------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------

/// An `oxcclResult_t` as it crosses the ABI: a plain `int` (the header
/// declares the enum `oxcclResult_t` with [`ResultCode`]'s values).
#[allow(non_camel_case_types)]
pub type oxcclResult_t = c_int;
/// An `oxcclDataType_t` as it crosses the ABI: a plain `int`, range-checked.
#[allow(non_camel_case_types)]
pub type oxcclDataType_t = c_int;
/// An `oxcclRedOp_t` as it crosses the ABI: a plain `int`, range-checked.
#[allow(non_camel_case_types)]
pub type oxcclRedOp_t = c_int;

/// Result of every oxccl call; NCCL's `ncclResult_t` values.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultCode {
    /// The call succeeded.
    oxcclSuccess = 0,
    /// A CUDA call failed (unused: this build has no CUDA backend).
    oxcclUnhandledCudaError = 1,
    /// The operating system failed a call (sockets, files, threads).
    oxcclSystemError = 2,
    /// A bug in oxccl.
    oxcclInternalError = 3,
    /// A bad argument: NULL pointer, bad enum value, bad count, rank or root.
    oxcclInvalidArgument = 4,
    /// A call that is not valid now, or ranks that disagree on a call.
    oxcclInvalidUsage = 5,
    /// Another rank failed: it died, closed its links or reported an error.
    oxcclRemoteError = 6,
    /// An operation is in progress (unused: oxccl calls are synchronous).
    oxcclInProgress = 7,
    /// A wait made no progress for OXCCL_TIMEOUT seconds.
    oxcclTimeout = 8,
}

/// Element type of a buffer; NCCL's `ncclDataType_t` values.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// `int8_t`.
    oxcclInt8 = 0,
    /// `uint8_t`.
    oxcclUint8 = 1,
    /// `int32_t`.
    oxcclInt32 = 2,
    /// `uint32_t`.
    oxcclUint32 = 3,
    /// `int64_t`.
    oxcclInt64 = 4,
    /// `uint64_t`.
    oxcclUint64 = 5,
    /// IEEE 754 half precision (pass `uint16_t` bit patterns).
    oxcclFloat16 = 6,
    /// `float`.
    oxcclFloat32 = 7,
    /// `double`.
    oxcclFloat64 = 8,
    /// bfloat16 (pass `uint16_t` bit patterns).
    oxcclBfloat16 = 9,
}

/// Alias of `oxcclInt8`, as NCCL's `ncclChar`.
#[allow(non_upper_case_globals)]
pub const oxcclChar: oxcclDataType_t = 0;
/// Alias of `oxcclInt32`, as NCCL's `ncclInt`.
#[allow(non_upper_case_globals)]
pub const oxcclInt: oxcclDataType_t = 2;
/// Alias of `oxcclFloat16`, as NCCL's `ncclHalf`.
#[allow(non_upper_case_globals)]
pub const oxcclHalf: oxcclDataType_t = 6;
/// Alias of `oxcclFloat32`, as NCCL's `ncclFloat`.
#[allow(non_upper_case_globals)]
pub const oxcclFloat: oxcclDataType_t = 7;
/// Alias of `oxcclFloat64`, as NCCL's `ncclDouble`.
#[allow(non_upper_case_globals)]
pub const oxcclDouble: oxcclDataType_t = 8;

/// Reduction operation; NCCL's `ncclRedOp_t` values.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedOp {
    /// Sum (integers wrap).
    oxcclSum = 0,
    /// Product (integers wrap).
    oxcclProd = 1,
    /// Maximum (NaN propagates).
    oxcclMax = 2,
    /// Minimum (NaN propagates).
    oxcclMin = 3,
    /// Sum divided by the number of ranks (integers: truncated toward zero).
    oxcclAvg = 4,
}

/// What every rank needs to find the others, made by `oxcclGetUniqueId` on
/// one rank and passed by the application to the others (128 bytes, as NCCL's).
/// It carries the job's secret, with which the store and every link are
/// authenticated: hand it to the other ranks as you would a password.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy)]
pub struct oxcclUniqueId {
    /// Opaque bytes.
    pub internal: [c_char; 128],
}

impl std::fmt::Debug for oxcclUniqueId {
    /// The bytes hold the job's secret: they are not shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("oxcclUniqueId(..)")
    }
}

/// A communicator: one rank's place in a world. Opaque to C.
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct oxcclComm {
    rank: usize,
    world: usize,
    abort: AbortHandle,
    /// `oxcclSuccess`, or the code of the error that poisoned the communicator.
    async_error: AtomicI32,
    comm: Mutex<Communicator>,
}

/// Handle of a communicator, as NCCL's `ncclComm_t`.
#[allow(non_camel_case_types)]
pub type oxcclComm_t = *mut oxcclComm;

// ---------------------------------------------------------------------------
// Errors: codes, messages, the thread's last error, the panic boundary
// ---------------------------------------------------------------------------

/// A failed call: its code and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    code: ResultCode,
    message: String,
}

impl Failure {
    fn new(code: ResultCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    fn arg(message: impl Into<String>) -> Failure {
        Failure::new(ResultCode::oxcclInvalidArgument, message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<oxccl::Error> for Failure {
    fn from(e: oxccl::Error) -> Failure {
        Failure::new(code_of(e.kind(), &e), e.to_string())
    }
}

/// The result code of an oxccl error of kind `kind`.
fn code_of(kind: ErrorKind, e: &oxccl::Error) -> ResultCode {
    match kind {
        ErrorKind::InvalidArgument => ResultCode::oxcclInvalidArgument,
        ErrorKind::InvalidUsage => ResultCode::oxcclInvalidUsage,
        ErrorKind::System => ResultCode::oxcclSystemError,
        ErrorKind::Remote => ResultCode::oxcclRemoteError,
        ErrorKind::Timeout => ResultCode::oxcclTimeout,
        // A backend this build or machine lacks: the call is not usable here
        // (oxcclUnhandledCudaError means a CUDA call failed, which it did not).
        ErrorKind::UnavailableBackend => ResultCode::oxcclInvalidUsage,
        ErrorKind::Internal => ResultCode::oxcclInternalError,
        ErrorKind::Aborted => match e.cause_kind() {
            // An abort without a deeper cause (cannot happen today).
            ErrorKind::Aborted => ResultCode::oxcclInvalidUsage,
            k => code_of(k, e),
        },
    }
}

type Outcome<T = ()> = Result<T, Failure>;

thread_local! {
    /// The message of this thread's last failed call.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    // During thread teardown the slot may be gone: the message is then lost.
    let _ = LAST_ERROR.try_with(|l| {
        if let Ok(mut slot) = l.try_borrow_mut() {
            *slot = c;
        }
    });
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with no message".to_owned()
    }
}

/// The panic boundary of every entry point: runs `f`, records a failure as
/// the thread's last error ("NAME: message") and returns its code.
fn boundary(name: &str, f: impl FnOnce() -> Outcome) -> oxcclResult_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => ResultCode::oxcclSuccess as c_int,
        Ok(Err(failure)) => {
            set_last_error(&format!("{name}: {failure}"));
            failure.code as c_int
        }
        Err(p) => {
            set_last_error(&format!(
                "{name}: internal error (a panic in oxccl): {}",
                panic_message(p.as_ref())
            ));
            ResultCode::oxcclInternalError as c_int
        }
    }
}

// ---------------------------------------------------------------------------
// Argument checks (pure: addresses are plain integers)
// ---------------------------------------------------------------------------

/// A byte range of the caller's memory, by address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    addr: usize,
    len: usize,
}

impl Span {
    fn overlaps(&self, other: &Span) -> bool {
        self.len > 0
            && other.len > 0
            && self.addr < other.addr + other.len
            && other.addr < self.addr + self.len
    }
}

/// A checked collective call, ready for `Communicator::run_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Call {
    desc: Descriptor,
    /// `None`: in place.
    input: Option<Span>,
    output: Span,
}

/// The arguments of a collective call as the C caller gave them.
#[derive(Debug, Clone, Copy)]
struct Args {
    kind: Kind,
    send: usize,
    recv: usize,
    count: usize,
    datatype: c_int,
    op: c_int,
    root: c_int,
    stream: usize,
}

fn dtype_of(datatype: c_int) -> Outcome<DType> {
    u8::try_from(datatype)
        .ok()
        .and_then(DType::from_u8)
        .ok_or_else(|| {
            Failure::arg(format!(
                "datatype {datatype} is not an oxcclDataType_t (0..=9)"
            ))
        })
}

fn op_of(op: c_int) -> Outcome<ReduceOp> {
    u8::try_from(op)
        .ok()
        .and_then(ReduceOp::from_u8)
        .ok_or_else(|| Failure::arg(format!("op {op} is not an oxcclRedOp_t (0..=4)")))
}

/// A buffer `name` of `len` bytes at `addr`: NULL is refused unless `len` is 0,
/// and the range must not wrap around the address space.
fn span(name: &str, addr: usize, len: usize) -> Outcome<Span> {
    if len > 0 && addr == 0 {
        return Err(Failure::arg(format!(
            "{name} is NULL but the call needs {len} bytes there"
        )));
    }
    if addr.checked_add(len).is_none() {
        return Err(Failure::arg(format!(
            "{name} + {len} bytes wraps around the address space"
        )));
    }
    Ok(Span { addr, len })
}

fn disjoint(input: Span, output: Span) -> Outcome<Span> {
    if input.overlaps(&output) {
        return Err(Failure::arg(
            "sendbuff and recvbuff overlap without being the in-place layout \
             (same pointer, or NCCL's offset for allgather and reduce-scatter)",
        ));
    }
    Ok(input)
}

/// Checks a call of rank `rank` in a world of `world` and maps it onto
/// `run_bytes`' buffers (see its documentation for the lengths).
fn plan(a: Args, rank: usize, world: usize) -> Outcome<Call> {
    if a.stream != 0 {
        return Err(Failure::arg(
            "stream is not NULL: CUDA streams need oxccl's cuda backend, which this build \
             does not have; pass NULL and host memory",
        ));
    }
    let dtype = dtype_of(a.datatype)?;
    let reduces = matches!(a.kind, Kind::AllReduce | Kind::Reduce | Kind::ReduceScatter);
    let op = if reduces { op_of(a.op)? } else { ReduceOp::Sum };
    let rooted = matches!(a.kind, Kind::Broadcast | Kind::Reduce);
    let root = if rooted {
        match usize::try_from(a.root) {
            Ok(r) if r < world => r,
            _ => {
                return Err(Failure::arg(format!(
                    "root {} is not a rank of this communicator (0..{world})",
                    a.root
                )));
            }
        }
    } else {
        0
    };
    let overflow = || {
        Failure::arg(format!(
            "count {} of {} bytes each overflows the address space",
            a.count,
            dtype.size()
        ))
    };
    let limit = isize::MAX as usize;
    let one = a
        .count
        .checked_mul(dtype.size())
        .filter(|n| *n <= limit)
        .ok_or_else(overflow)?;
    let full = one
        .checked_mul(world)
        .filter(|n| *n <= limit)
        .ok_or_else(overflow)?;
    let desc = Descriptor {
        kind: a.kind,
        dtype,
        op,
        root,
        count: a.count,
    };
    let (send, recv) = (a.send, a.recv);
    let (input, output) = match a.kind {
        Kind::AllReduce => {
            if send == recv {
                (None, span("recvbuff", recv, one)?)
            } else {
                let out = span("recvbuff", recv, one)?;
                (Some(disjoint(span("sendbuff", send, one)?, out)?), out)
            }
        }
        Kind::Broadcast => {
            let out = span("recvbuff", recv, one)?;
            if rank != root || send == recv {
                (None, out)
            } else {
                (Some(disjoint(span("sendbuff", send, one)?, out)?), out)
            }
        }
        Kind::Reduce => {
            if rank != root {
                // Non-root ranks only send; recvbuff is not used (may be NULL).
                (Some(span("sendbuff", send, one)?), Span { addr: 0, len: 0 })
            } else if send == recv {
                (None, span("recvbuff", recv, one)?)
            } else {
                let out = span("recvbuff", recv, one)?;
                (Some(disjoint(span("sendbuff", send, one)?, out)?), out)
            }
        }
        Kind::AllGather => {
            let out = span("recvbuff", recv, full)?;
            let in_place = rank
                .checked_mul(one)
                .and_then(|off| recv.checked_add(off))
                .is_some_and(|a| a == send);
            if in_place {
                (None, out)
            } else {
                (Some(disjoint(span("sendbuff", send, one)?, out)?), out)
            }
        }
        Kind::ReduceScatter => {
            let in_place = rank
                .checked_mul(one)
                .and_then(|off| send.checked_add(off))
                .is_some_and(|a| a == recv);
            if in_place {
                (None, span("sendbuff", send, full)?)
            } else {
                let out = span("recvbuff", recv, one)?;
                (Some(disjoint(span("sendbuff", send, full)?, out)?), out)
            }
        }
        Kind::Barrier => (None, Span { addr: 0, len: 0 }),
        Kind::AllToAll
        | Kind::Gather
        | Kind::Scatter
        | Kind::AllToAllV
        | Kind::AllGatherV
        | Kind::ReduceScatterV
        | Kind::SendRecv => {
            return Err(Failure::arg(format!(
                "{} does not take this path (a bug in the bindings)",
                a.kind.name()
            )));
        }
    };
    Ok(Call {
        desc,
        input,
        output,
    })
}

// ---------------------------------------------------------------------------
// Point-to-point and exchanges: argument checks (pure)
// ---------------------------------------------------------------------------

/// A checked `oxcclSend` (`send`) or `oxcclRecv`: `buf` goes to, or comes
/// from, rank `peer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct P2p {
    send: bool,
    dtype: DType,
    peer: usize,
    buf: Span,
}

/// The refusal of a non-NULL stream.
fn no_stream(stream: usize) -> Outcome {
    if stream != 0 {
        return Err(Failure::arg(
            "stream is not NULL: CUDA streams need oxccl's cuda backend, which this build \
             does not have; pass NULL and host memory",
        ));
    }
    Ok(())
}

/// `rank` (named `what`) as a rank of a world of `world`.
fn rank_in(what: &str, rank: c_int, world: usize) -> Outcome<usize> {
    match usize::try_from(rank) {
        Ok(r) if r < world => Ok(r),
        _ => Err(Failure::arg(format!(
            "{what} {rank} is not a rank of this communicator (0..{world})"
        ))),
    }
}

/// `count` elements of `size` bytes, as bytes: at most `isize::MAX`.
fn elements(what: &str, count: usize, size: usize) -> Outcome<usize> {
    count
        .checked_mul(size)
        .filter(|n| *n <= isize::MAX as usize)
        .ok_or_else(|| {
            Failure::arg(format!(
                "{what} {count} of {size} bytes each overflows the address space \
                 (a negative count passed as size_t?)"
            ))
        })
}

/// `world` blocks of `count` elements of `size` bytes, as bytes.
fn per_world(count: usize, size: usize, world: usize) -> Outcome<usize> {
    count
        .checked_mul(size)
        .and_then(|n| n.checked_mul(world))
        .filter(|n| *n <= isize::MAX as usize)
        .ok_or_else(|| {
            Failure::arg(format!(
                "count {count} of {size} bytes each for {world} ranks overflows the address \
                 space (a negative count passed as size_t?)"
            ))
        })
}

/// Checks a send (`send`) or receive of `count` elements at `addr` with
/// rank `peer`, on rank `rank` of a world of `world`.
fn plan_p2p(
    send: bool,
    addr: usize,
    count: usize,
    datatype: c_int,
    peer: c_int,
    stream: usize,
    world: usize,
) -> Outcome<P2p> {
    no_stream(stream)?;
    let dtype = dtype_of(datatype)?;
    let peer = rank_in("peer", peer, world)?;
    let len = elements("count", count, dtype.size())?;
    let buf = span(if send { "sendbuff" } else { "recvbuff" }, addr, len)?;
    Ok(P2p {
        send,
        dtype,
        peer,
        buf,
    })
}

/// Checks that `op` may join the send and receives `batch` of one
/// communicator, which run together: a receive's buffer overlaps no other
/// buffer of the batch (sends may share theirs).
fn joins_batch(batch: &[P2p], op: &P2p) -> Outcome {
    let clash = batch
        .iter()
        .find(|b| (op.send != b.send || !op.send) && b.buf.overlaps(&op.buf));
    match clash {
        Some(b) => Err(Failure::arg(format!(
            "this {} buffer (rank {}) overlaps the buffer of a {} (rank {}) queued in the same \
             group on this communicator; receive buffers must be apart from every other buffer",
            if op.send { "send" } else { "receive" },
            op.peer,
            if b.send { "send to" } else { "receive from" },
            b.peer,
        ))),
        None => Ok(()),
    }
}

/// An exchange as the bindings hold it (counts and displacements copied
/// from the caller's arrays, in elements).
#[derive(Debug, Clone, PartialEq, Eq)]
enum XKind {
    AllToAll {
        count: usize,
    },
    AllToAllV {
        send_counts: Vec<usize>,
        send_displs: Vec<usize>,
        recv_counts: Vec<usize>,
        recv_displs: Vec<usize>,
    },
    Gather {
        count: usize,
        root: usize,
    },
    Scatter {
        count: usize,
        root: usize,
    },
}

impl XKind {
    fn name(&self) -> &'static str {
        match self {
            XKind::AllToAll { .. } => "oxcclAllToAll",
            XKind::AllToAllV { .. } => "oxcclAllToAllv",
            XKind::Gather { .. } => "oxcclGather",
            XKind::Scatter { .. } => "oxcclScatter",
        }
    }

    fn exchange(&self) -> oxccl::Exchange<'_> {
        match self {
            XKind::AllToAll { count } => oxccl::Exchange::AllToAll { count: *count },
            XKind::AllToAllV {
                send_counts,
                send_displs,
                recv_counts,
                recv_displs,
            } => oxccl::Exchange::AllToAllV {
                send_counts,
                send_displs,
                recv_counts,
                recv_displs,
            },
            XKind::Gather { count, root } => oxccl::Exchange::Gather {
                count: *count,
                root: *root,
            },
            XKind::Scatter { count, root } => oxccl::Exchange::Scatter {
                count: *count,
                root: *root,
            },
        }
    }
}

/// A checked exchange, ready for `Communicator::run_exchange`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct XCall {
    x: XKind,
    dtype: DType,
    input: Span,
    output: Span,
}

/// The per-peer arrays of an `oxcclAllToAllv`, in elements, as read from
/// the caller (`world` entries each).
#[derive(Debug, Clone, PartialEq, Eq)]
struct VArgs {
    send_counts: Vec<usize>,
    send_displs: Vec<usize>,
    recv_counts: Vec<usize>,
    recv_displs: Vec<usize>,
}

/// The byte ranges of per-peer `counts` at `displs` (named `what`): each
/// must fit the address space; a zero count's displacement is not used
/// (it is set to 0, so that it never lengthens the buffer). Returns the
/// ranges and the length of buffer they need.
fn v_ranges(
    what: &str,
    counts: &mut [usize],
    displs: &mut [usize],
    size: usize,
) -> Outcome<(Vec<std::ops::Range<usize>>, usize)> {
    let mut ranges = Vec::with_capacity(counts.len());
    let mut need = 0usize;
    for (p, (c, d)) in counts.iter().zip(displs.iter_mut()).enumerate() {
        if *c == 0 {
            *d = 0;
            ranges.push(0..0);
            continue;
        }
        let end = d
            .checked_add(*c)
            .and_then(|e| e.checked_mul(size))
            .filter(|e| *e <= isize::MAX as usize)
            .ok_or_else(|| {
                Failure::arg(format!(
                    "{what}: peer {p}'s {c} elements at displacement {d} overflow the address \
                     space (a negative count or displacement passed as size_t?)"
                ))
            })?;
        ranges.push(*d * size..end);
        need = need.max(end);
    }
    Ok((ranges, need))
}

/// The exchange's arguments as the C caller gave them.
#[derive(Debug, Clone)]
struct XArgs {
    /// `AllToAll`, `AllToAllV`, `Gather` or `Scatter`.
    kind: Kind,
    send: usize,
    recv: usize,
    /// Elements per peer (alltoall), sent (gather) or received (scatter).
    count: usize,
    /// Per-peer arrays (alltoallv only).
    v: Option<VArgs>,
    datatype: c_int,
    root: c_int,
    stream: usize,
}

/// Checks an exchange of rank `rank` in a world of `world`: the stream, the
/// type, the root, counts and displacements that fit the address space,
/// receive ranges that do not overlap, buffers that are not NULL when they
/// have bytes and do not overlap each other (exchanges do not run in
/// place). The library checks it all again when it runs.
fn plan_exchange(a: XArgs, rank: usize, world: usize) -> Outcome<XCall> {
    no_stream(a.stream)?;
    let dtype = dtype_of(a.datatype)?;
    let size = dtype.size();
    let (x, in_len, out_len) = match a.kind {
        Kind::AllToAll => {
            let all = per_world(a.count, size, world)?;
            (XKind::AllToAll { count: a.count }, all, all)
        }
        Kind::Gather | Kind::Scatter => {
            let root = rank_in("root", a.root, world)?;
            let one = elements("count", a.count, size)?;
            let all = per_world(a.count, size, world)?;
            let mine = if rank == root { all } else { 0 };
            if a.kind == Kind::Gather {
                (
                    XKind::Gather {
                        count: a.count,
                        root,
                    },
                    one,
                    mine,
                )
            } else {
                (
                    XKind::Scatter {
                        count: a.count,
                        root,
                    },
                    mine,
                    one,
                )
            }
        }
        Kind::AllToAllV => {
            let Some(mut v) = a.v else {
                return Err(Failure::arg(
                    "oxcclAllToAllv without its arrays (a bug in the bindings)",
                ));
            };
            for (what, arr) in [
                ("sendcounts", &v.send_counts),
                ("sdispls", &v.send_displs),
                ("recvcounts", &v.recv_counts),
                ("rdispls", &v.recv_displs),
            ] {
                if arr.len() != world {
                    return Err(Failure::arg(format!(
                        "{what} has {} entries, expected {world} (a bug in the bindings)",
                        arr.len()
                    )));
                }
            }
            let (_, in_len) = v_ranges(
                "sendcounts/sdispls",
                &mut v.send_counts,
                &mut v.send_displs,
                size,
            )?;
            let (recvs, out_len) = v_ranges(
                "recvcounts/rdispls",
                &mut v.recv_counts,
                &mut v.recv_displs,
                size,
            )?;
            let mut by_start: Vec<(usize, &std::ops::Range<usize>)> = recvs
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.is_empty())
                .collect();
            by_start.sort_by_key(|(_, r)| r.start);
            if let Some(w) = by_start.windows(2).find(|w| w[0].1.end > w[1].1.start) {
                let ((p, r), (q, s)) = (w[0], w[1]);
                return Err(Failure::arg(format!(
                    "recvcounts/rdispls: the ranges of peer {p} (elements {}..{}) and peer {q} \
                     (elements {}..{}) overlap",
                    r.start / size,
                    r.end / size,
                    s.start / size,
                    s.end / size
                )));
            }
            if v.send_counts[rank] != v.recv_counts[rank] {
                return Err(Failure::arg(format!(
                    "sendcounts[{rank}] is {} but recvcounts[{rank}] is {}: this rank's block \
                     to itself must have one count",
                    v.send_counts[rank], v.recv_counts[rank]
                )));
            }
            let VArgs {
                send_counts,
                send_displs,
                recv_counts,
                recv_displs,
            } = v;
            (
                XKind::AllToAllV {
                    send_counts,
                    send_displs,
                    recv_counts,
                    recv_displs,
                },
                in_len,
                out_len,
            )
        }
        k => {
            return Err(Failure::arg(format!(
                "{} is not an exchange (a bug in the bindings)",
                k.name()
            )));
        }
    };
    let input = span("sendbuff", a.send, in_len)?;
    let output = span("recvbuff", a.recv, out_len)?;
    if input.overlaps(&output) {
        return Err(Failure::arg(format!(
            "sendbuff and recvbuff overlap: {} does not run in place; pass separate buffers",
            x.name()
        )));
    }
    Ok(XCall {
        x,
        dtype,
        input,
        output,
    })
}

// ---------------------------------------------------------------------------
// Running calls
// ---------------------------------------------------------------------------

/// Takes a counted reference to the caller's handle, so that a concurrent
/// `oxcclCommAbort` cannot free the communicator under a call in progress.
///
/// # Safety
///
/// `comm` is NULL or a handle from an oxccl init call that has not been
/// destroyed (at the time of this call).
unsafe fn comm_ref(comm: oxcclComm_t) -> Outcome<Arc<oxcclComm>> {
    if comm.is_null() {
        return Err(Failure::arg("comm is NULL"));
    }
    // Under the registry's lock, so that a destroy on another thread cannot
    // free the communicator between the check and the increment.
    let live = live_handles();
    if !live.contains(&(comm as usize)) {
        return Err(not_live());
    }
    // SAFETY: a live handle (in the registry): made by `Arc::into_raw` in
    // `new_handle` and not yet destroyed, so its count is at least one.
    unsafe { Arc::increment_strong_count(comm.cast_const()) };
    drop(live);
    // SAFETY: as above; the increment is the count this Arc owns.
    Ok(unsafe { Arc::from_raw(comm.cast_const()) })
}

/// The handles made by `new_handle` and not yet destroyed, by address. A
/// call on anything else (a destroyed handle, a pointer oxccl never made)
/// is refused instead of reading freed memory, which NCCL leaves undefined.
/// An address that a later communicator reuses is that communicator's.
static LIVE: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());

fn live_handles() -> MutexGuard<'static, BTreeSet<usize>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn not_live() -> Failure {
    Failure::arg(
        "comm is not a live communicator: it was destroyed (or aborted) already, or oxccl never made it",
    )
}

/// Writes `value` through the out-pointer `ptr` named `name`.
///
/// # Safety
///
/// `ptr` is NULL or valid for a write of a `T`.
unsafe fn write_out<T>(name: &str, ptr: *mut T, value: T) -> Outcome {
    if ptr.is_null() {
        return Err(Failure::arg(format!("{name} is NULL")));
    }
    // SAFETY: non-NULL and, by the caller's promise, valid for writes.
    unsafe { ptr.write_unaligned(value) };
    Ok(())
}

fn lock(comm: &oxcclComm) -> Outcome<std::sync::MutexGuard<'_, Communicator>> {
    comm.comm.lock().map_err(|_| {
        Failure::new(
            ResultCode::oxcclInternalError,
            "the communicator is unusable after an internal panic in an earlier call",
        )
    })
}

/// Runs a checked call.
///
/// # Safety
///
/// The spans of `call` are the caller's memory: the input readable, the
/// output writable, for their lengths, not used by anything else during the
/// call (their being disjoint is checked by [`plan`]).
unsafe fn execute(comm: &oxcclComm, call: &Call) -> Outcome {
    let mut guard = lock(comm)?;
    // SAFETY: a non-empty span has a non-NULL address (checked by `span`) and,
    // by the caller's promise, is readable for its length; an empty one is
    // never dereferenced and gets a dangling, aligned pointer.
    let input = call.input.map(|s| unsafe { bytes(s) });
    // SAFETY: as above, and the output is writable and disjoint from the input.
    let output = unsafe { bytes_mut(call.output) };
    let result = guard.run_bytes(call.desc, input, output);
    settle(comm, guard, result)
}

/// The end of every call: a failure that poisoned the communicator becomes
/// its asynchronous error (the first one stays).
fn settle(
    comm: &oxcclComm,
    guard: MutexGuard<'_, Communicator>,
    result: oxccl::Result<()>,
) -> Outcome {
    if let Err(e) = &result {
        if guard.poisoned().is_some() {
            let code = code_of(e.cause_kind(), e) as c_int;
            let _ = comm.async_error.compare_exchange(
                ResultCode::oxcclSuccess as c_int,
                code,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
    }
    drop(guard);
    result.map_err(Failure::from)
}

/// Runs a checked exchange.
///
/// # Safety
///
/// As [`execute`]: the spans of `call` are the caller's memory (checked
/// disjoint by [`plan_exchange`]).
unsafe fn execute_exchange(comm: &oxcclComm, call: &XCall) -> Outcome {
    let mut guard = lock(comm)?;
    // SAFETY: as in `execute`: non-NULL when non-empty (checked by `span`),
    // readable for its length by the caller's promise.
    let input = unsafe { bytes(call.input) };
    // SAFETY: as above, writable, and disjoint from the input.
    let output = unsafe { bytes_mut(call.output) };
    let result = guard.run_exchange(call.x.exchange(), call.dtype, input, output);
    settle(comm, guard, result)
}

/// Runs checked sends and receives together, as one batch.
///
/// # Safety
///
/// The spans are the caller's memory (sends readable, receives writable,
/// for their lengths); no receive span overlaps another span of `ops`
/// (checked by [`joins_batch`] as they are queued).
unsafe fn execute_batch(comm: &oxcclComm, ops: &[P2p]) -> Outcome {
    let mut guard = lock(comm)?;
    let mut batch = oxccl::Batch::new();
    for op in ops {
        if op.send {
            // SAFETY: non-NULL when non-empty (checked by `span`), readable
            // by the caller's promise; other spans only read it too.
            batch.send_bytes(unsafe { bytes(op.buf) }, op.dtype, op.peer);
        } else {
            // SAFETY: as above, writable, and overlapping no other span of
            // the batch, so this `&mut` is not aliased.
            batch.recv_bytes(unsafe { bytes_mut(op.buf) }, op.dtype, op.peer);
        }
    }
    let result = guard.run_batch(batch);
    settle(comm, guard, result)
}

/// # Safety
///
/// `s.len > 0` implies `s.addr` is readable for `s.len` bytes for `'a`.
unsafe fn bytes<'a>(s: Span) -> &'a [u8] {
    if s.len == 0 {
        return &[];
    }
    let p = NonNull::new(s.addr as *mut u8).unwrap_or(NonNull::dangling());
    // SAFETY: non-NULL (checked by `span`), readable for `len` bytes (the
    // caller's promise), `len <= isize::MAX` (checked by `plan`).
    unsafe { std::slice::from_raw_parts(p.as_ptr(), s.len) }
}

/// # Safety
///
/// `s.len > 0` implies `s.addr` is writable for `s.len` bytes for `'a`, and
/// nothing else accesses them meanwhile.
unsafe fn bytes_mut<'a>(s: Span) -> &'a mut [u8] {
    if s.len == 0 {
        return &mut [];
    }
    let p = NonNull::new(s.addr as *mut u8).unwrap_or(NonNull::dangling());
    // SAFETY: non-NULL (checked by `span`), writable and unaliased for `len`
    // bytes (the caller's promise), `len <= isize::MAX` (checked by `plan`).
    unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), s.len) }
}

/// What every init entry point does first: [`ignore_sigpipe`], and a log
/// subscriber for oxccl's messages at `OXCCL_DEBUG` (default warn) on
/// stderr, unless the host process installed one already. The Rust library
/// installs none; a C host has no other way to see its warnings.
fn process_setup() {
    ignore_sigpipe();
    static LOGGING: std::sync::Once = std::sync::Once::new();
    LOGGING.call_once(|| {
        // A bad OXCCL_DEBUG is reported by the init call itself.
        let level = Config::from_env()
            .map(|c| c.debug)
            .unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                oxccl::config::log_filter(&level),
            ))
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .try_init();
    });
}

/// Sets SIGPIPE to "ignore" if it is at its default ("terminate"), once.
///
/// oxccl's links write to sockets; when a peer has died, such a write raises
/// SIGPIPE, whose default action would kill the host process instead of
/// letting the call fail with `oxcclRemoteError`. Rust programs ignore
/// SIGPIPE from their start; a C host does not, so every init entry point
/// calls this. A handler or disposition the host installed is left alone.
fn ignore_sigpipe() {
    #[cfg(unix)]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: sigaction with a zeroed (valid: empty mask, no flags)
            // struct and valid pointers; reading the current disposition and
            // replacing SIG_DFL by SIG_IGN installs no handler code.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut old) == 0
                    && old.sa_sigaction == libc::SIG_DFL
                {
                    let mut new: libc::sigaction = std::mem::zeroed();
                    new.sa_sigaction = libc::SIG_IGN;
                    libc::sigemptyset(&mut new.sa_mask);
                    libc::sigaction(libc::SIGPIPE, &new, std::ptr::null_mut());
                }
            }
        });
    }
}

fn new_handle(c: Communicator) -> oxcclComm_t {
    let handle = Arc::into_raw(Arc::new(oxcclComm {
        rank: c.rank(),
        world: c.world(),
        abort: c.abort_handle(),
        async_error: AtomicI32::new(ResultCode::oxcclSuccess as c_int),
        comm: Mutex::new(c),
    }))
    .cast_mut();
    live_handles().insert(handle as usize);
    handle
}

/// A collective entry point: check, then run now or queue in the open group.
///
/// # Safety
///
/// As the collective's own `# Safety` section.
unsafe fn collective(comm: oxcclComm_t, a: Args) -> Outcome {
    // SAFETY: the caller's promise.
    let c = unsafe { comm_ref(comm) }?;
    let call = plan(a, c.rank, c.world)?;
    if group::enqueue_call(comm as usize, call) {
        return Ok(());
    }
    // SAFETY: `plan` checked the spans; the caller promises the memory.
    unsafe { execute(&c, &call) }
}

/// A send or receive entry point: check, then run now (a batch of one) or
/// queue in the open group.
///
/// # Safety
///
/// As `oxcclSend`'s or `oxcclRecv`'s own `# Safety` section.
unsafe fn point_to_point(
    send: bool,
    buf: usize,
    count: usize,
    datatype: c_int,
    peer: c_int,
    comm: oxcclComm_t,
    stream: usize,
) -> Outcome {
    // SAFETY: the caller's promise.
    let c = unsafe { comm_ref(comm) }?;
    let op = plan_p2p(send, buf, count, datatype, peer, stream, c.world)?;
    if group::enqueue_p2p(comm as usize, op)? {
        return Ok(());
    }
    // SAFETY: `plan_p2p` checked the span; the caller promises the memory.
    unsafe { execute_batch(&c, &[op]) }
}

/// An exchange entry point: check, then run now or queue in the open group.
///
/// # Safety
///
/// As the exchange's own `# Safety` section; `a.v`'s arrays are already read.
unsafe fn exchange(comm: oxcclComm_t, a: XArgs) -> Outcome {
    // SAFETY: the caller's promise.
    let c = unsafe { comm_ref(comm) }?;
    let call = plan_exchange(a, c.rank, c.world)?;
    let Some(call) = group::enqueue_exchange(comm as usize, call) else {
        return Ok(());
    };
    // SAFETY: `plan_exchange` checked the spans; the caller promises the memory.
    unsafe { execute_exchange(&c, &call) }
}

// ---------------------------------------------------------------------------
// Groups
// ---------------------------------------------------------------------------

mod group {
    //! Per-thread queues of calls between `oxcclGroupStart` and `oxcclGroupEnd`.

    use super::*;

    /// A queued operation.
    #[derive(Debug)]
    pub(super) enum Pending {
        /// A collective on the communicator at `comm`.
        Call { comm: usize, call: Call },
        /// An exchange (alltoall, alltoallv, gather, scatter) on `comm`.
        Exchange { comm: usize, call: XCall },
        /// A send or receive on `comm`: consecutive ones on one
        /// communicator run together, as one batch.
        P2p { comm: usize, op: P2p },
        /// An `oxcclCommInitRank` writing its handle to `out`.
        Init {
            out: usize,
            id: oxccl::UniqueId,
            rank: usize,
            world: usize,
        },
    }

    impl Pending {
        /// The communicator of a queued call (`None`: an init).
        fn comm(&self) -> Option<usize> {
            match self {
                Pending::Call { comm, .. }
                | Pending::Exchange { comm, .. }
                | Pending::P2p { comm, .. } => Some(*comm),
                Pending::Init { .. } => None,
            }
        }
    }

    /// What one communicator runs at `oxcclGroupEnd`, in order.
    #[derive(Debug)]
    enum Step {
        Call(Call),
        Exchange(XCall),
        /// Consecutive sends and receives, as one batch.
        Batch(Vec<P2p>),
    }

    #[derive(Debug, Default)]
    pub(super) struct Group {
        pub depth: usize,
        pub queue: Vec<Pending>,
    }

    thread_local! {
        pub(super) static GROUP: RefCell<Group> = RefCell::new(Group::default());
    }

    fn with<R>(f: impl FnOnce(&mut Group) -> R) -> Option<R> {
        GROUP
            .try_with(|g| g.try_borrow_mut().ok().map(|mut g| f(&mut g)))
            .ok()
            .flatten()
    }

    /// Queues `p` if this thread has an open group; returns whether it did.
    fn enqueue(p: Pending) -> bool {
        let mut p = Some(p);
        with(|g| {
            if g.depth > 0 {
                if let Some(p) = p.take() {
                    g.queue.push(p);
                }
                true
            } else {
                false
            }
        })
        .unwrap_or(false)
    }

    pub(super) fn enqueue_call(comm: usize, call: Call) -> bool {
        enqueue(Pending::Call { comm, call })
    }

    /// Queues `call` if this thread has an open group; else gives it back.
    pub(super) fn enqueue_exchange(comm: usize, call: XCall) -> Option<XCall> {
        let mut call = Some(call);
        with(|g| {
            if g.depth > 0 {
                if let Some(call) = call.take() {
                    g.queue.push(Pending::Exchange { comm, call });
                }
            }
        });
        call
    }

    /// Queues `op` if this thread has an open group, after checking that it
    /// may join the sends and receives queued on `comm` since its last
    /// other call (they will run as one batch); returns whether it did.
    pub(super) fn enqueue_p2p(comm: usize, op: P2p) -> Outcome<bool> {
        with(|g| {
            if g.depth == 0 {
                return Ok(false);
            }
            let batch: Vec<P2p> = g
                .queue
                .iter()
                .rev()
                .filter(|p| p.comm() == Some(comm))
                .map_while(|p| match p {
                    Pending::P2p { op, .. } => Some(*op),
                    _ => None,
                })
                .collect();
            joins_batch(&batch, &op)?;
            g.queue.push(Pending::P2p { comm, op });
            Ok(true)
        })
        .unwrap_or(Ok(false))
    }

    pub(super) fn enqueue_init(out: usize, id: oxccl::UniqueId, rank: usize, world: usize) -> bool {
        enqueue(Pending::Init {
            out,
            id,
            rank,
            world,
        })
    }

    /// Whether this thread has an open group.
    pub(super) fn open() -> bool {
        with(|g| g.depth > 0).unwrap_or(false)
    }

    pub(super) fn start() -> Outcome {
        with(|g| g.depth += 1)
            .ok_or_else(|| Failure::new(ResultCode::oxcclInternalError, "no group state"))
    }

    /// Calls queued on `comm` by this thread.
    pub(super) fn queued_on(comm: usize) -> usize {
        with(|g| g.queue.iter().filter(|p| p.comm() == Some(comm)).count()).unwrap_or(0)
    }

    /// Closes one level; at the outermost, returns the queue to run.
    pub(super) fn end() -> Outcome<Option<Vec<Pending>>> {
        with(|g| {
            if g.depth == 0 {
                return Err(Failure::new(
                    ResultCode::oxcclInvalidUsage,
                    "no group is open on this thread (oxcclGroupEnd without oxcclGroupStart)",
                ));
            }
            g.depth -= 1;
            Ok((g.depth == 0).then(|| std::mem::take(&mut g.queue)))
        })
        .unwrap_or_else(|| {
            Err(Failure::new(
                ResultCode::oxcclInternalError,
                "no group state",
            ))
        })
    }

    /// Runs a closed group: inits first (all at once, so that ranks of one
    /// world initialized by one thread meet), then each communicator's calls
    /// in order, each communicator on its own thread; consecutive sends and
    /// receives on one communicator run together as one batch (in any
    /// order of posting, without a deadlock). Returns the first failure.
    ///
    /// # Safety
    ///
    /// Every queued communicator and buffer is still valid (the contract of
    /// `oxcclGroupEnd`), and every `Init`'s `out` is writable.
    pub(super) unsafe fn run(queue: Vec<Pending>) -> Outcome {
        let mut inits = Vec::new();
        let mut per_comm: Vec<(usize, Vec<Step>)> = Vec::new();
        for p in queue {
            let (comm, step) = match p {
                Pending::Init {
                    out,
                    id,
                    rank,
                    world,
                } => {
                    inits.push((out, id, rank, world));
                    continue;
                }
                Pending::Call { comm, call } => (comm, Step::Call(call)),
                Pending::Exchange { comm, call } => (comm, Step::Exchange(call)),
                Pending::P2p { comm, op } => (comm, Step::Batch(vec![op])),
            };
            let i = match per_comm.iter().position(|(c, _)| *c == comm) {
                Some(i) => i,
                None => {
                    per_comm.push((comm, Vec::new()));
                    per_comm.len() - 1
                }
            };
            let steps = &mut per_comm[i].1;
            match (steps.last_mut(), step) {
                (Some(Step::Batch(ops)), Step::Batch(more)) => ops.extend(more),
                (_, step) => steps.push(step),
            }
        }
        let mut first: Option<Failure> = None;
        let init_results = parallel(&inits, |(_, id, rank, world)| {
            Communicator::init(id, *rank, *world).map_err(Failure::from)
        });
        for ((out, ..), r) in inits.iter().zip(init_results) {
            match r {
                Ok(c) => {
                    // SAFETY: the caller of oxcclCommInitRank promised `out`
                    // writable until oxcclGroupEnd returns.
                    unsafe { (*out as *mut oxcclComm_t).write_unaligned(new_handle(c)) };
                }
                Err(f) => {
                    first.get_or_insert(f);
                }
            }
        }
        let results = parallel(&per_comm, |(comm, steps)| {
            // SAFETY: the caller promised the communicator alive until
            // oxcclGroupEnd returns; `oxcclComm` is Send and Sync.
            let c = unsafe { comm_ref(*comm as oxcclComm_t) }?;
            let mut first = None;
            for step in steps {
                // SAFETY: checked by `plan`, `plan_exchange`, `plan_p2p` and
                // `joins_batch` when queued; the caller promised the buffers
                // valid until oxcclGroupEnd returns.
                let result = unsafe {
                    match step {
                        Step::Call(call) => execute(&c, call),
                        Step::Exchange(call) => execute_exchange(&c, call),
                        Step::Batch(ops) => execute_batch(&c, ops),
                    }
                };
                if let Err(f) = result {
                    first.get_or_insert(f);
                }
            }
            first.map_or(Ok(()), Err)
        });
        for r in results {
            if let Err(f) = r {
                first.get_or_insert(f);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Runs `f` on every item, each on its own scoped thread (inline for one).
    fn parallel<T: Sync, R: Send>(
        items: &[T],
        f: impl Fn(&T) -> Result<R, Failure> + Sync,
    ) -> Vec<Result<R, Failure>> {
        if items.len() <= 1 {
            return items.iter().map(&f).collect();
        }
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = items
                .iter()
                .map(|item| {
                    std::thread::Builder::new()
                        .name("oxccl-group".into())
                        .spawn_scoped(s, move || {
                            catch_unwind(AssertUnwindSafe(|| f(item))).unwrap_or_else(|p| {
                                Err(Failure::new(
                                    ResultCode::oxcclInternalError,
                                    format!(
                                        "internal error (a panic in oxccl): {}",
                                        panic_message(p.as_ref())
                                    ),
                                ))
                            })
                        })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h.join().unwrap_or_else(|_| {
                        Err(Failure::new(
                            ResultCode::oxcclInternalError,
                            "a group thread panicked",
                        ))
                    }),
                    Err(e) => Err(Failure::new(
                        ResultCode::oxcclSystemError,
                        format!("cannot start a thread for the group: {e}"),
                    )),
                })
                .collect()
        })
    }
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

/// Writes `OXCCL_VERSION_CODE` to `*version`.
///
/// # Safety
///
/// `version` is NULL or valid for writing an `int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclGetVersion(version: *mut c_int) -> oxcclResult_t {
    boundary("oxcclGetVersion", || {
        // SAFETY: the caller's promise.
        unsafe { write_out("version", version, OXCCL_VERSION_CODE) }
    })
}

/// Creates a unique id (serving a rendezvous store on OXCCL_BOOTSTRAP_ADDR,
/// default 127.0.0.1, from this process) for `oxcclCommInitRank`. Call it on
/// one rank and pass the bytes to the others. The id carries the job's
/// secret: OXCCL_JOB_SECRET's if set, else fresh random bytes (none with
/// OXCCL_AUTH=off).
///
/// # Safety
///
/// `unique_id` is NULL or valid for writing an `oxcclUniqueId`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclGetUniqueId(unique_id: *mut oxcclUniqueId) -> oxcclResult_t {
    boundary("oxcclGetUniqueId", || {
        process_setup();
        if unique_id.is_null() {
            return Err(Failure::arg("unique_id is NULL"));
        }
        let bytes = oxccl::UniqueId::new()?.to_bytes();
        let mut id = oxcclUniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(bytes) {
            *d = s as c_char;
        }
        // SAFETY: non-NULL, and writable by the caller's promise.
        unsafe { write_out("unique_id", unique_id, id) }
    })
}

fn rank_and_world(nranks: c_int, rank: c_int) -> Outcome<(usize, usize)> {
    let world = usize::try_from(nranks)
        .ok()
        .filter(|w| *w >= 1)
        .ok_or_else(|| Failure::arg(format!("nranks {nranks} is not at least 1")))?;
    let r = usize::try_from(rank)
        .ok()
        .filter(|r| *r < world)
        .ok_or_else(|| Failure::arg(format!("rank {rank} is not in 0..{nranks}")))?;
    Ok((r, world))
}

/// Creates rank `rank` of a world of `nranks` from a unique id. Blocks until
/// every rank has joined (at most OXCCL_TIMEOUT seconds). Inside a group, the
/// handle is written at `oxcclGroupEnd`, so that one thread can initialize
/// several ranks.
///
/// # Safety
///
/// `comm` is NULL or valid for writing an `oxcclComm_t` (inside a group:
/// until `oxcclGroupEnd` returns).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclCommInitRank(
    comm: *mut oxcclComm_t,
    nranks: c_int,
    comm_id: oxcclUniqueId,
    rank: c_int,
) -> oxcclResult_t {
    boundary("oxcclCommInitRank", || {
        process_setup();
        if comm.is_null() {
            return Err(Failure::arg("comm is NULL"));
        }
        let (rank, world) = rank_and_world(nranks, rank)?;
        let mut bytes = [0u8; 128];
        for (d, s) in bytes.iter_mut().zip(comm_id.internal) {
            *d = s as u8;
        }
        let id = oxccl::UniqueId::from_bytes(&bytes)?;
        if group::enqueue_init(comm as usize, id, rank, world) {
            return Ok(());
        }
        let c = Communicator::init(&id, rank, world)?;
        // SAFETY: non-NULL, and writable by the caller's promise.
        unsafe { write_out("comm", comm, new_handle(c)) }
    })
}

/// Creates `ndev` communicators of one world in this process (rank `i` in
/// `comms[i]`), connected by socket pairs; drive each from its own thread, or
/// all from one thread inside a group. `devlist` may be NULL; its entries
/// (device numbers, which host memory does not use) must not be negative.
///
/// # Safety
///
/// `comms` is NULL or valid for writing `ndev` handles; `devlist` is NULL or
/// valid for reading `ndev` ints.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclCommInitAll(
    comms: *mut oxcclComm_t,
    ndev: c_int,
    devlist: *const c_int,
) -> oxcclResult_t {
    boundary("oxcclCommInitAll", || {
        process_setup();
        if comms.is_null() {
            return Err(Failure::arg("comms is NULL"));
        }
        let n = usize::try_from(ndev)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| Failure::arg(format!("ndev {ndev} is not at least 1")))?;
        if !devlist.is_null() {
            // SAFETY: non-NULL, and readable for `ndev` ints by the caller's promise.
            let devs = unsafe { std::slice::from_raw_parts(devlist, n) };
            if let Some((i, d)) = devs.iter().enumerate().find(|(_, d)| **d < 0) {
                return Err(Failure::arg(format!(
                    "devlist[{i}] is {d}, a negative device"
                )));
            }
        }
        let all = Communicator::in_process(n, Config::from_env()?)?;
        for (i, c) in all.into_iter().enumerate() {
            // SAFETY: `i < ndev`, and `comms` is writable for `ndev` handles
            // by the caller's promise.
            unsafe { comms.add(i).write_unaligned(new_handle(c)) };
        }
        Ok(())
    })
}

/// Creates this process's communicator from its launcher's environment
/// (oxrun, torchrun, mpirun, srun: rank, world size and rank 0's address).
///
/// # Safety
///
/// `comm` is NULL or valid for writing an `oxcclComm_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclCommInitFromEnv(comm: *mut oxcclComm_t) -> oxcclResult_t {
    boundary("oxcclCommInitFromEnv", || {
        process_setup();
        if comm.is_null() {
            return Err(Failure::arg("comm is NULL"));
        }
        let c = Communicator::from_env()?;
        // SAFETY: non-NULL, and writable by the caller's promise.
        unsafe { write_out("comm", comm, new_handle(c)) }
    })
}

/// Reclaims a handle, after refusing it while this thread's open group still
/// holds calls on it.
///
/// # Safety
///
/// `comm` is a live handle, not used again by the caller.
unsafe fn destroy(comm: oxcclComm_t, abort: bool) -> Outcome {
    let queued = group::queued_on(comm as usize);
    if queued > 0 {
        return Err(Failure::new(
            ResultCode::oxcclInvalidUsage,
            format!(
                "the open group of this thread still holds {queued} calls on this communicator"
            ),
        ));
    }
    if !live_handles().remove(&(comm as usize)) {
        return Err(not_live());
    }
    // SAFETY: a handle made by `new_handle` (Arc::into_raw) and, having been
    // in the registry, not destroyed before: this takes back the count the
    // handle owned. A call in progress on another thread holds its own
    // count, so the communicator is dropped (its links closed) when the
    // last of them ends.
    let c = unsafe { Arc::from_raw(comm.cast_const()) };
    if abort {
        c.abort.abort();
    }
    drop(c);
    Ok(())
}

/// Frees a communicator and closes its links (the other ranks' next call
/// fails with `oxcclRemoteError`). NULL is accepted and ignored, as by NCCL.
/// Refused (`oxcclInvalidUsage`) while this thread's open group holds calls
/// on it.
///
/// # Safety
///
/// `comm` is NULL or a live handle, not used again after this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclCommDestroy(comm: oxcclComm_t) -> oxcclResult_t {
    boundary("oxcclCommDestroy", || {
        if comm.is_null() {
            return Ok(());
        }
        // SAFETY: the caller's promise.
        unsafe { destroy(comm, false) }
    })
}

/// Aborts a communicator, then frees it: a call in progress on another
/// thread fails at once (`oxcclInvalidUsage`, "aborted by the application")
/// and the other ranks learn of it within milliseconds. NULL is accepted and
/// ignored.
///
/// # Safety
///
/// `comm` is NULL or a live handle; no call on it starts after this one (a
/// call already in progress holds the communicator until it returns).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclCommAbort(comm: oxcclComm_t) -> oxcclResult_t {
    boundary("oxcclCommAbort", || {
        if comm.is_null() {
            return Ok(());
        }
        // SAFETY: the caller's promise.
        unsafe { destroy(comm, true) }
    })
}

/// The color of a rank that joins no new communicator in
/// [`oxcclCommSplit`], as NCCL's `NCCL_SPLIT_NOCOLOR`.
pub const OXCCL_SPLIT_NOCOLOR: c_int = -1;

/// Splits `comm`, as NCCL's `ncclCommSplit`: the ranks that pass the same
/// `color` (not negative) form a new communicator, ranked by `key` and then
/// by their rank in `comm`, written to `*newcomm`; a rank that passes
/// [`OXCCL_SPLIT_NOCOLOR`] gets NULL. Every rank of `comm` calls it, in the
/// same order as its other calls (not inside a group). The new
/// communicator has `comm`'s settings, its own links, and fails on its own;
/// destroy it with `oxcclCommDestroy`. `config` is reserved: pass NULL.
///
/// # Safety
///
/// `comm` is NULL or a live handle; `newcomm` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclCommSplit(
    comm: oxcclComm_t,
    color: c_int,
    key: c_int,
    newcomm: *mut oxcclComm_t,
    config: *mut std::ffi::c_void,
) -> oxcclResult_t {
    boundary("oxcclCommSplit", || {
        if newcomm.is_null() {
            return Err(Failure::arg("newcomm is NULL"));
        }
        if !config.is_null() {
            return Err(Failure::arg("config is reserved: pass NULL"));
        }
        let color = match color {
            OXCCL_SPLIT_NOCOLOR => None,
            c => Some(u32::try_from(c).map_err(|_| {
                Failure::arg(format!(
                    "color {c} is negative (and not OXCCL_SPLIT_NOCOLOR)"
                ))
            })?),
        };
        if group::open() {
            return Err(Failure::new(
                ResultCode::oxcclInvalidUsage,
                "oxcclCommSplit inside a group: call it outside oxcclGroupStart/oxcclGroupEnd",
            ));
        }
        // SAFETY: the caller's promise.
        let c = unsafe { comm_ref(comm) }?;
        let sub = lock(&c)?.split(color, i64::from(key))?;
        let handle = sub.map_or(std::ptr::null_mut(), new_handle);
        // SAFETY: non-NULL, and writable by the caller's promise.
        unsafe { write_out("newcomm", newcomm, handle) }
    })
}

/// Forms a new communicator of the ranks of `comm` that survived a
/// failure, as NCCL's `ncclCommShrink`, written to `*newcomm`: every
/// survivor calls it (after its call on `comm` failed, or on a healthy
/// `comm`), naming in `exclude_ranks_list` (`exclude_ranks_count` entries;
/// NULL when 0) the ranks it knows to be gone. The survivors agree through the
/// store on who is left: the ranks named, and the rank each survivor's last
/// failure started at, are not waited for; a rank that neither comes nor
/// is named is waited for `OXCCL_TIMEOUT`, then left out. Members keep
/// their order; the new communicator's errors name ranks in `comm`'s
/// numbering too. A job whose rank 0 served the store (`oxrun`, a unique
/// id) and died cannot shrink. `config` is reserved (NULL) and
/// `shrink_flags` must be 0. Not inside a group.
///
/// # Safety
///
/// `comm` is NULL or a live handle; `exclude_ranks_list` is NULL or points
/// to `exclude_ranks_count` readable ints; `newcomm` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclCommShrink(
    comm: oxcclComm_t,
    exclude_ranks_list: *const c_int,
    exclude_ranks_count: c_int,
    newcomm: *mut oxcclComm_t,
    config: *mut std::ffi::c_void,
    shrink_flags: c_int,
) -> oxcclResult_t {
    boundary("oxcclCommShrink", || {
        if newcomm.is_null() {
            return Err(Failure::arg("newcomm is NULL"));
        }
        if !config.is_null() {
            return Err(Failure::arg("config is reserved: pass NULL"));
        }
        if shrink_flags != 0 {
            return Err(Failure::arg(format!(
                "shrinkFlags {shrink_flags} is not 0 (the only mode)"
            )));
        }
        let n = usize::try_from(exclude_ranks_count).map_err(|_| {
            Failure::arg(format!(
                "excludeRanksCount {exclude_ranks_count} is negative"
            ))
        })?;
        let exclude: Vec<usize> = if n == 0 {
            Vec::new()
        } else if exclude_ranks_list.is_null() {
            return Err(Failure::arg(format!(
                "excludeRanksList is NULL but excludeRanksCount is {n}"
            )));
        } else {
            // SAFETY: non-NULL, and `n` readable ints by the caller's promise.
            let list = unsafe { std::slice::from_raw_parts(exclude_ranks_list, n) };
            list.iter()
                .map(|&r| {
                    usize::try_from(r)
                        .map_err(|_| Failure::arg(format!("rank {r} to exclude is negative")))
                })
                .collect::<Outcome<_>>()?
        };
        if group::open() {
            return Err(Failure::new(
                ResultCode::oxcclInvalidUsage,
                "oxcclCommShrink inside a group: call it outside oxcclGroupStart/oxcclGroupEnd",
            ));
        }
        // SAFETY: the caller's promise.
        let c = unsafe { comm_ref(comm) }?;
        let sub = lock(&c)?.shrink(&exclude)?;
        // SAFETY: non-NULL, and writable by the caller's promise.
        unsafe { write_out("newcomm", newcomm, new_handle(sub)) }
    })
}

/// Writes the number of ranks to `*count`.
///
/// # Safety
///
/// `comm` is NULL or a live handle; `count` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclCommCount(comm: oxcclComm_t, count: *mut c_int) -> oxcclResult_t {
    boundary("oxcclCommCount", || {
        // SAFETY: the caller's promise.
        let c = unsafe { comm_ref(comm) }?;
        let n = c_int::try_from(c.world)
            .map_err(|_| Failure::new(ResultCode::oxcclInternalError, "world exceeds INT_MAX"))?;
        // SAFETY: the caller's promise.
        unsafe { write_out("count", count, n) }
    })
}

/// Writes this rank to `*rank`.
///
/// # Safety
///
/// `comm` is NULL or a live handle; `rank` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclCommUserRank(comm: oxcclComm_t, rank: *mut c_int) -> oxcclResult_t {
    boundary("oxcclCommUserRank", || {
        // SAFETY: the caller's promise.
        let c = unsafe { comm_ref(comm) }?;
        let r = c_int::try_from(c.rank)
            .map_err(|_| Failure::new(ResultCode::oxcclInternalError, "rank exceeds INT_MAX"))?;
        // SAFETY: the caller's promise.
        unsafe { write_out("rank", rank, r) }
    })
}

/// Writes `oxcclSuccess` to `*async_error_out`, or the code of the failure that
/// poisoned the communicator (after which every call on it fails with that
/// code). Never waits for a call in progress.
///
/// # Safety
///
/// `comm` is NULL or a live handle; `async_error_out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclCommGetAsyncError(
    comm: oxcclComm_t,
    async_error_out: *mut oxcclResult_t,
) -> oxcclResult_t {
    boundary("oxcclCommGetAsyncError", || {
        // SAFETY: the caller's promise.
        let c = unsafe { comm_ref(comm) }?;
        let code = c.async_error.load(Ordering::SeqCst);
        // SAFETY: the caller's promise.
        unsafe { write_out("async_error_out", async_error_out, code) }
    })
}

/// Reduces `count` elements of every rank's `sendbuff` into every rank's
/// `recvbuff`; in place when `sendbuff == recvbuff`.
///
/// # Safety
///
/// `comm` is NULL or a live handle; `sendbuff` is readable and `recvbuff`
/// writable for `count` elements (either may be NULL when `count` is 0);
/// inside a group, all stay valid until `oxcclGroupEnd` returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclAllReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: oxcclDataType_t,
    op: oxcclRedOp_t,
    comm: oxcclComm_t,
    stream: *mut c_void,
) -> oxcclResult_t {
    let a = Args {
        kind: Kind::AllReduce,
        send: sendbuff as usize,
        recv: recvbuff as usize,
        count,
        datatype,
        op,
        root: 0,
        stream: stream as usize,
    };
    // SAFETY: the caller's promise, forwarded.
    boundary("oxcclAllReduce", || unsafe { collective(comm, a) })
}

/// Copies `count` elements of the root's `sendbuff` into every rank's
/// `recvbuff`; in place when `sendbuff == recvbuff`. Other ranks' `sendbuff`
/// is not read (may be NULL).
///
/// # Safety
///
/// As `oxcclAllReduce`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclBroadcast(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: oxcclDataType_t,
    root: c_int,
    comm: oxcclComm_t,
    stream: *mut c_void,
) -> oxcclResult_t {
    let a = Args {
        kind: Kind::Broadcast,
        send: sendbuff as usize,
        recv: recvbuff as usize,
        count,
        datatype,
        op: 0,
        root,
        stream: stream as usize,
    };
    // SAFETY: the caller's promise, forwarded.
    boundary("oxcclBroadcast", || unsafe { collective(comm, a) })
}

/// Reduces `count` elements of every rank's `sendbuff` into the root's
/// `recvbuff`; in place when `sendbuff == recvbuff`. Other ranks' `recvbuff`
/// is not written (may be NULL).
///
/// # Safety
///
/// As `oxcclAllReduce`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: oxcclDataType_t,
    op: oxcclRedOp_t,
    root: c_int,
    comm: oxcclComm_t,
    stream: *mut c_void,
) -> oxcclResult_t {
    let a = Args {
        kind: Kind::Reduce,
        send: sendbuff as usize,
        recv: recvbuff as usize,
        count,
        datatype,
        op,
        root,
        stream: stream as usize,
    };
    // SAFETY: the caller's promise, forwarded.
    boundary("oxcclReduce", || unsafe { collective(comm, a) })
}

/// Gathers `sendcount` elements from every rank into every rank's
/// `recvbuff` (`nranks * sendcount` elements, in rank order); in place when
/// `sendbuff == recvbuff + rank * sendcount` elements.
///
/// # Safety
///
/// As `oxcclAllReduce`, with `recvbuff` writable for `nranks * sendcount`
/// elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclAllGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: oxcclDataType_t,
    comm: oxcclComm_t,
    stream: *mut c_void,
) -> oxcclResult_t {
    let a = Args {
        kind: Kind::AllGather,
        send: sendbuff as usize,
        recv: recvbuff as usize,
        count: sendcount,
        datatype,
        op: 0,
        root: 0,
        stream: stream as usize,
    };
    // SAFETY: the caller's promise, forwarded.
    boundary("oxcclAllGather", || unsafe { collective(comm, a) })
}

/// Reduces every rank's `sendbuff` (`nranks * recvcount` elements); rank `r`
/// receives block `r` of the result in `recvbuff` (`recvcount` elements). In
/// place when `recvbuff == sendbuff + rank * recvcount` elements.
///
/// # Safety
///
/// As `oxcclAllReduce`, with `sendbuff` readable for `nranks * recvcount`
/// elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclReduceScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    recvcount: usize,
    datatype: oxcclDataType_t,
    op: oxcclRedOp_t,
    comm: oxcclComm_t,
    stream: *mut c_void,
) -> oxcclResult_t {
    let a = Args {
        kind: Kind::ReduceScatter,
        send: sendbuff as usize,
        recv: recvbuff as usize,
        count: recvcount,
        datatype,
        op,
        root: 0,
        stream: stream as usize,
    };
    // SAFETY: the caller's promise, forwarded.
    boundary("oxcclReduceScatter", || unsafe { collective(comm, a) })
}

/// Sends `count` elements of `sendbuff` to rank `peer`, as NCCL's
/// `ncclSend`. Outside a group it returns once `peer` has received the
/// message (the first of its frames) and agreed on its type and count, so a
/// send and a receive between two ranks must be in a group on at least one
/// of them (or on another thread). Inside a group, the sends and receives
/// queued on one communicator run together at the outermost
/// `oxcclGroupEnd`, in any order of posting, without a deadlock; messages
/// between two ranks in one direction are matched in the order they were
/// posted. A send to this rank itself needs a receive from itself in the
/// same group. `peer` out of range, a bad type, a NULL `sendbuff` with a
/// count, or a count that overflows the address space (a negative one
/// passed as `size_t`) are refused before anything is sent. A send that no
/// receive meets fails with `oxcclTimeout` after `OXCCL_TIMEOUT`, naming the
/// peer and the call; a receive of another count or type fails on both
/// ranks, naming both calls (`oxcclInvalidUsage` on the rank that finds the
/// mismatch, `oxcclRemoteError` on the other).
///
/// # Safety
///
/// `comm` is NULL or a live handle; `sendbuff` is readable for `count`
/// elements (may be NULL when `count` is 0); inside a group, both stay
/// valid until `oxcclGroupEnd` returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclSend(
    sendbuff: *const c_void,
    count: usize,
    datatype: oxcclDataType_t,
    peer: c_int,
    comm: oxcclComm_t,
    stream: *mut c_void,
) -> oxcclResult_t {
    let (buf, stream) = (sendbuff as usize, stream as usize);
    // SAFETY: the caller's promise, forwarded.
    boundary("oxcclSend", || unsafe {
        point_to_point(true, buf, count, datatype, peer, comm, stream)
    })
}

/// Receives `count` elements from rank `peer` into `recvbuff`, as NCCL's
/// `ncclRecv`; the message must have exactly that count and type. Groups,
/// ordering and failures as `oxcclSend`. Inside a group, a receive buffer
/// must not overlap any other buffer queued with it on the communicator.
///
/// # Safety
///
/// `comm` is NULL or a live handle; `recvbuff` is writable for `count`
/// elements (may be NULL when `count` is 0); inside a group, both stay
/// valid until `oxcclGroupEnd` returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclRecv(
    recvbuff: *mut c_void,
    count: usize,
    datatype: oxcclDataType_t,
    peer: c_int,
    comm: oxcclComm_t,
    stream: *mut c_void,
) -> oxcclResult_t {
    let (buf, stream) = (recvbuff as usize, stream as usize);
    // SAFETY: the caller's promise, forwarded.
    boundary("oxcclRecv", || unsafe {
        point_to_point(false, buf, count, datatype, peer, comm, stream)
    })
}

/// Sends block `p` of `sendbuff` (`count` elements at `p * count`) to rank
/// `p`, and receives rank `p`'s block for this rank into block `p` of
/// `recvbuff`, as RCCL's `ncclAllToAll`. Both buffers hold
/// `nranks * count` elements and must not overlap (not in place).
///
/// # Safety
///
/// `comm` is NULL or a live handle; `sendbuff` is readable and `recvbuff`
/// writable for `nranks * count` elements (either may be NULL when `count`
/// is 0); inside a group, all stay valid until `oxcclGroupEnd` returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclAllToAll(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: oxcclDataType_t,
    comm: oxcclComm_t,
    stream: *mut c_void,
) -> oxcclResult_t {
    let a = XArgs {
        kind: Kind::AllToAll,
        send: sendbuff as usize,
        recv: recvbuff as usize,
        count,
        v: None,
        datatype,
        root: 0,
        stream: stream as usize,
    };
    // SAFETY: the caller's promise, forwarded.
    boundary("oxcclAllToAll", || unsafe { exchange(comm, a) })
}

/// Reads `name`, an array of `n` `size_t`s at `ptr` (NULL is refused).
///
/// # Safety
///
/// `ptr` is NULL or readable for `n` `size_t`s.
unsafe fn read_array(name: &str, ptr: *const usize, n: usize) -> Outcome<Vec<usize>> {
    if ptr.is_null() {
        return Err(Failure::arg(format!(
            "{name} is NULL: it needs one entry per rank"
        )));
    }
    // SAFETY: non-NULL, and readable for `n` entries by the caller's
    // promise; read unaligned, as a C caller may pass any address.
    Ok((0..n)
        .map(|i| unsafe { ptr.add(i).read_unaligned() })
        .collect())
}

/// Alltoall with per-peer counts and displacements (in elements), as RCCL's
/// `ncclAllToAllv` and `MPI_Alltoallv`: `sendcounts[p]` elements at
/// `sdispls[p]` of `sendbuff` go to rank `p`; `recvcounts[p]` elements from
/// rank `p` land at `rdispls[p]` of `recvbuff`. Each array has `nranks`
/// entries (read at this call, even inside a group) and must not be NULL.
/// `sendcounts[p]` on this rank must equal `recvcounts[this rank]` on rank
/// `p`: counts that disagree fail on both ranks, naming both. Received ranges must not overlap, `sendcounts[rank]` must
/// equal `recvcounts[rank]`, and a count or displacement that overflows the
/// address space (a negative one passed as `size_t`) is refused before
/// anything is sent. The buffers must not overlap (not in place). A zero
/// count's displacement is not used.
///
/// # Safety
///
/// `comm` is NULL or a live handle; the four arrays are NULL or readable for
/// `nranks` entries; `sendbuff` is readable for every `[sdispls[p],
/// sdispls[p] + sendcounts[p])` and `recvbuff` writable for every
/// `[rdispls[p], rdispls[p] + recvcounts[p])` range (in elements; NULL when
/// all are empty); inside a group, the buffers stay valid until
/// `oxcclGroupEnd` returns.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn oxcclAllToAllv(
    sendbuff: *const c_void,
    sendcounts: *const usize,
    sdispls: *const usize,
    recvbuff: *mut c_void,
    recvcounts: *const usize,
    rdispls: *const usize,
    datatype: oxcclDataType_t,
    comm: oxcclComm_t,
    stream: *mut c_void,
) -> oxcclResult_t {
    let (send, recv, stream) = (sendbuff as usize, recvbuff as usize, stream as usize);
    boundary("oxcclAllToAllv", || {
        // SAFETY: the caller's promise.
        let world = unsafe { comm_ref(comm) }?.world;
        // SAFETY: the caller's promise: NULL (refused) or `world` entries.
        let v = unsafe {
            VArgs {
                send_counts: read_array("sendcounts", sendcounts, world)?,
                send_displs: read_array("sdispls", sdispls, world)?,
                recv_counts: read_array("recvcounts", recvcounts, world)?,
                recv_displs: read_array("rdispls", rdispls, world)?,
            }
        };
        let a = XArgs {
            kind: Kind::AllToAllV,
            send,
            recv,
            count: 0,
            v: Some(v),
            datatype,
            root: 0,
            stream,
        };
        // SAFETY: the caller's promise, forwarded.
        unsafe { exchange(comm, a) }
    })
}

/// Gathers `sendcount` elements of every rank's `sendbuff` into the root's
/// `recvbuff` (`nranks * sendcount` elements, in rank order), as RCCL's
/// `ncclGather`. Other ranks' `recvbuff` is not written (may be NULL). Not
/// in place: the root's buffers must not overlap.
///
/// # Safety
///
/// `comm` is NULL or a live handle; `sendbuff` is readable for `sendcount`
/// elements and, on the root, `recvbuff` writable for `nranks * sendcount`
/// (NULL when that is 0); inside a group, all stay valid until
/// `oxcclGroupEnd` returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: oxcclDataType_t,
    root: c_int,
    comm: oxcclComm_t,
    stream: *mut c_void,
) -> oxcclResult_t {
    let a = XArgs {
        kind: Kind::Gather,
        send: sendbuff as usize,
        recv: recvbuff as usize,
        count: sendcount,
        v: None,
        datatype,
        root,
        stream: stream as usize,
    };
    // SAFETY: the caller's promise, forwarded.
    boundary("oxcclGather", || unsafe { exchange(comm, a) })
}

/// Sends block `p` of the root's `sendbuff` (`recvcount` elements at
/// `p * recvcount`; `nranks * recvcount` in all) to rank `p`'s `recvbuff`,
/// as RCCL's `ncclScatter`. Other ranks' `sendbuff` is not read (may be
/// NULL). Not in place: the root's buffers must not overlap.
///
/// # Safety
///
/// `comm` is NULL or a live handle; `recvbuff` is writable for `recvcount`
/// elements and, on the root, `sendbuff` readable for `nranks * recvcount`
/// (NULL when that is 0); inside a group, all stay valid until
/// `oxcclGroupEnd` returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn oxcclScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    recvcount: usize,
    datatype: oxcclDataType_t,
    root: c_int,
    comm: oxcclComm_t,
    stream: *mut c_void,
) -> oxcclResult_t {
    let a = XArgs {
        kind: Kind::Scatter,
        send: sendbuff as usize,
        recv: recvbuff as usize,
        count: recvcount,
        v: None,
        datatype,
        root,
        stream: stream as usize,
    };
    // SAFETY: the caller's promise, forwarded.
    boundary("oxcclScatter", || unsafe { exchange(comm, a) })
}

/// Opens a group on this thread (groups nest): later collectives,
/// exchanges, sends, receives and `oxcclCommInitRank` calls are checked at
/// once, queued, and run at the outermost `oxcclGroupEnd`.
#[unsafe(no_mangle)]
pub extern "C" fn oxcclGroupStart() -> oxcclResult_t {
    boundary("oxcclGroupStart", group::start)
}

/// Closes a group; the outermost runs the queued calls: inits first, then
/// each communicator's calls in order, each communicator on its own thread,
/// and waits for all. Sends and receives queued one after another on a
/// communicator run together, as one batch, whatever their order; a
/// collective or exchange queued between them splits them into two batches
/// that run in turn (so a group that mixes them must put them in the same
/// order on every rank). Returns the first failure. Communicators, buffers
/// and out-pointers of the queued calls must stay valid until it returns.
#[unsafe(no_mangle)]
pub extern "C" fn oxcclGroupEnd() -> oxcclResult_t {
    boundary("oxcclGroupEnd", || match group::end()? {
        // SAFETY: the documented contract of the queued calls: everything
        // they point to is valid until oxcclGroupEnd returns.
        Some(queue) => unsafe { group::run(queue) },
        None => Ok(()),
    })
}

/// A static string describing `result`.
#[unsafe(no_mangle)]
pub extern "C" fn oxcclGetErrorString(result: oxcclResult_t) -> *const c_char {
    let s: &'static CStr = match result {
        0 => c"no error",
        1 => c"unhandled cuda error (this build has no CUDA backend)",
        2 => c"unhandled system error (see oxcclGetLastError)",
        3 => c"internal error - please report this issue to the oxccl developers",
        4 => c"invalid argument (see oxcclGetLastError)",
        5 => c"invalid usage (see oxcclGetLastError)",
        6 => c"remote process exited or there was a network error (see oxcclGetLastError)",
        7 => c"operation in progress",
        8 => c"timeout: no progress for OXCCL_TIMEOUT seconds (see oxcclGetLastError)",
        _ => c"unknown result code",
    };
    s.as_ptr()
}

/// The message of the last failed oxccl call of the calling thread ("" if
/// none). `comm` is ignored and may be NULL. The string stays valid until the
/// next failing oxccl call on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn oxcclGetLastError(comm: oxcclComm_t) -> *const c_char {
    let _ = comm;
    LAST_ERROR
        .try_with(|l| l.try_borrow().map(|s| s.as_ptr()).ok())
        .ok()
        .flatten()
        .unwrap_or(c"".as_ptr())
}

#[cfg(test)]
mod fuzz_args;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(kind: Kind, send: usize, recv: usize, count: usize) -> Args {
        Args {
            kind,
            send,
            recv,
            count,
            datatype: DataType::oxcclFloat32 as c_int,
            op: RedOp::oxcclSum as c_int,
            root: 0,
            stream: 0,
        }
    }

    fn code(r: Outcome<Call>) -> ResultCode {
        match r {
            Ok(_) => ResultCode::oxcclSuccess,
            Err(f) => f.code,
        }
    }

    #[test]
    fn unique_ids_carry_a_fresh_secret_that_init_uses() {
        let get = || {
            let mut id = oxcclUniqueId { internal: [0; 128] };
            // SAFETY: a writable id.
            assert_eq!(unsafe { oxcclGetUniqueId(&mut id) }, 0);
            id
        };
        let (a, b) = (get(), get());
        let bytes = |id: &oxcclUniqueId| id.internal.map(|c| c as u8);
        // Byte 40 says a secret follows at 48..80; each id has its own.
        assert_eq!(bytes(&a)[40], 1);
        assert_ne!(bytes(&a)[48..80], bytes(&b)[48..80]);
        assert_eq!(format!("{a:?}"), "oxcclUniqueId(..)");
        // An id with another secret is refused by the store, by name.
        let mut forged = a;
        forged.internal[60] ^= 0x55;
        let mut c = std::ptr::null_mut();
        // SAFETY: a writable handle.
        assert_ne!(unsafe { oxcclCommInitRank(&mut c, 2, forged, 1) }, 0);
        let msg = oxcclGetLastError(std::ptr::null_mut());
        // SAFETY: a valid C string from oxcclGetLastError.
        let msg = unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned();
        assert!(msg.contains("belongs to another job"), "{msg}");
        // The real id works.
        let ranks: Vec<_> = (0..2)
            .map(|r| {
                std::thread::spawn(move || {
                    let mut c = std::ptr::null_mut();
                    // SAFETY: a writable handle.
                    let rc = unsafe { oxcclCommInitRank(&mut c, 2, a, r) };
                    if rc == 0 {
                        // SAFETY: a communicator made above, destroyed once.
                        assert_eq!(unsafe { oxcclCommDestroy(c) }, 0);
                    }
                    rc
                })
            })
            .collect();
        for t in ranks {
            assert_eq!(t.join().unwrap(), 0);
        }
    }

    #[test]
    fn version_matches_the_crate() {
        assert_eq!(
            OXCCL_MAJOR.to_string(),
            env!("CARGO_PKG_VERSION_MAJOR"),
            "OXCCL_MAJOR"
        );
        assert_eq!(OXCCL_MINOR.to_string(), env!("CARGO_PKG_VERSION_MINOR"));
        assert_eq!(OXCCL_PATCH.to_string(), env!("CARGO_PKG_VERSION_PATCH"));
        assert_eq!(OXCCL_VERSION_CODE, 100);
        let mut v = 0;
        // SAFETY: a valid int.
        assert_eq!(unsafe { oxcclGetVersion(&mut v) }, 0);
        assert_eq!(v, OXCCL_VERSION_CODE);
    }

    #[test]
    fn enum_values_are_nccls() {
        for d in DType::ALL {
            assert_eq!(dtype_of(d as c_int), Ok(d));
        }
        assert_eq!(DataType::oxcclBfloat16 as c_int, DType::BF16 as c_int);
        assert_eq!(DataType::oxcclFloat16 as c_int, DType::F16 as c_int);
        assert_eq!(oxcclFloat, DataType::oxcclFloat32 as c_int);
        assert_eq!(oxcclHalf, DataType::oxcclFloat16 as c_int);
        assert_eq!(oxcclChar, DataType::oxcclInt8 as c_int);
        assert_eq!(oxcclInt, DataType::oxcclInt32 as c_int);
        assert_eq!(oxcclDouble, DataType::oxcclFloat64 as c_int);
        for o in ReduceOp::ALL {
            assert_eq!(op_of(o as c_int), Ok(o));
        }
        assert_eq!(RedOp::oxcclAvg as c_int, ReduceOp::Avg as c_int);
        for bad in [-1, 10, 256, c_int::MAX, c_int::MIN] {
            assert_eq!(
                dtype_of(bad).map_err(|f| f.code),
                Err(ResultCode::oxcclInvalidArgument)
            );
        }
        for bad in [-1, 5, 256 + 1] {
            assert_eq!(
                op_of(bad).map_err(|f| f.code),
                Err(ResultCode::oxcclInvalidArgument)
            );
        }
    }

    #[test]
    fn error_kinds_map_to_ncclish_codes() {
        let e = |k: ErrorKind, err: oxccl::Error| code_of(k, &err) as c_int;
        let any = || oxccl::Error::Internal("x".into());
        assert_eq!(e(ErrorKind::InvalidArgument, any()), 4);
        assert_eq!(e(ErrorKind::InvalidUsage, any()), 5);
        assert_eq!(e(ErrorKind::System, any()), 2);
        assert_eq!(e(ErrorKind::Remote, any()), 6);
        assert_eq!(e(ErrorKind::Timeout, any()), 8);
        assert_eq!(e(ErrorKind::Internal, any()), 3);
        assert_eq!(e(ErrorKind::UnavailableBackend, any()), 5);
        let aborted = oxccl::Error::Aborted {
            rank: 0,
            kind: ErrorKind::Remote,
            cause: "rank 1 died".into(),
        };
        assert_eq!(Failure::from(aborted).code, ResultCode::oxcclRemoteError);
        let aborted = oxccl::Error::Aborted {
            rank: 0,
            kind: ErrorKind::Timeout,
            cause: "slow".into(),
        };
        assert_eq!(Failure::from(aborted).code, ResultCode::oxcclTimeout);
    }

    #[test]
    fn allreduce_in_and_out_of_place() {
        let c = plan(args(Kind::AllReduce, 0x1000, 0x1000, 10), 0, 2).unwrap();
        assert_eq!(c.input, None);
        assert_eq!(
            c.output,
            Span {
                addr: 0x1000,
                len: 40
            }
        );
        let c = plan(args(Kind::AllReduce, 0x1000, 0x2000, 10), 1, 2).unwrap();
        assert_eq!(
            c.input,
            Some(Span {
                addr: 0x1000,
                len: 40
            })
        );
        assert_eq!(
            c.output,
            Span {
                addr: 0x2000,
                len: 40
            }
        );
        // Partial overlap is refused.
        assert_eq!(
            code(plan(args(Kind::AllReduce, 0x1000, 0x1004, 10), 0, 2)),
            ResultCode::oxcclInvalidArgument
        );
        // NULL with count 0 is fine, NULL with a count is not.
        assert!(plan(args(Kind::AllReduce, 0, 0, 0), 0, 2).is_ok());
        assert!(plan(args(Kind::AllReduce, 0, 0x10, 0), 0, 2).is_ok());
        for (s, r) in [(0, 0x1000), (0x1000, 0)] {
            let e = plan(args(Kind::AllReduce, s, r, 1), 0, 2).unwrap_err();
            assert_eq!(e.code, ResultCode::oxcclInvalidArgument);
            assert!(e.message.contains("NULL"), "{}", e.message);
        }
    }

    #[test]
    fn overflowing_counts_and_streams_are_invalid_arguments() {
        for count in [usize::MAX, usize::MAX / 2, isize::MAX as usize / 4 + 1] {
            let e = plan(args(Kind::AllReduce, 0x1000, 0x2000, count), 0, 2).unwrap_err();
            assert_eq!(e.code, ResultCode::oxcclInvalidArgument);
            assert!(e.message.contains("overflows"), "{}", e.message);
        }
        // count * size fits, but world * count * size does not.
        let n = isize::MAX as usize / 4 / 2 + 1;
        assert_eq!(
            code(plan(args(Kind::AllGather, 0x1000, 0x2000, n), 0, 2)),
            ResultCode::oxcclInvalidArgument
        );
        // The range would wrap around the address space.
        assert_eq!(
            code(plan(args(Kind::AllReduce, usize::MAX - 3, 0x1000, 2), 0, 2)),
            ResultCode::oxcclInvalidArgument
        );
        let mut a = args(Kind::AllReduce, 0x1000, 0x2000, 1);
        a.stream = 0x42;
        let e = plan(a, 0, 2).unwrap_err();
        assert_eq!(e.code, ResultCode::oxcclInvalidArgument);
        assert!(e.message.contains("cuda"), "{}", e.message);
    }

    #[test]
    fn bad_enums_and_roots() {
        let mut a = args(Kind::AllReduce, 0x1000, 0x2000, 1);
        a.datatype = 10;
        assert_eq!(code(plan(a, 0, 2)), ResultCode::oxcclInvalidArgument);
        let mut a = args(Kind::AllReduce, 0x1000, 0x2000, 1);
        a.op = -1;
        assert_eq!(code(plan(a, 0, 2)), ResultCode::oxcclInvalidArgument);
        // The op is not read by broadcast and allgather.
        let mut a = args(Kind::AllGather, 0x1000, 0x2000, 1);
        a.op = 99;
        assert!(plan(a, 0, 2).is_ok());
        for root in [-1, 2, c_int::MAX] {
            for kind in [Kind::Broadcast, Kind::Reduce] {
                let mut a = args(kind, 0x1000, 0x2000, 1);
                a.root = root;
                assert_eq!(code(plan(a, 0, 2)), ResultCode::oxcclInvalidArgument);
            }
        }
    }

    #[test]
    fn rooted_calls_ignore_the_unused_buffer() {
        let mut a = args(Kind::Broadcast, 0, 0x2000, 4);
        a.root = 1;
        let c = plan(a, 0, 2).unwrap();
        assert_eq!(
            (c.input, c.output),
            (
                None,
                Span {
                    addr: 0x2000,
                    len: 16
                }
            )
        );
        // ...but the root needs its sendbuff.
        assert_eq!(code(plan(a, 1, 2)), ResultCode::oxcclInvalidArgument);
        let mut a = args(Kind::Reduce, 0x1000, 0, 4);
        a.root = 1;
        let c = plan(a, 0, 2).unwrap();
        assert_eq!(
            c.input,
            Some(Span {
                addr: 0x1000,
                len: 16
            })
        );
        assert_eq!(c.output.len, 0);
        assert_eq!(code(plan(a, 1, 2)), ResultCode::oxcclInvalidArgument);
    }

    #[test]
    fn allgather_and_reduce_scatter_in_place_at_nccls_offsets() {
        // allgather: sendbuff == recvbuff + rank * count * size.
        let c = plan(args(Kind::AllGather, 0x1000 + 2 * 40, 0x1000, 10), 2, 4).unwrap();
        assert_eq!(
            (c.input, c.output),
            (
                None,
                Span {
                    addr: 0x1000,
                    len: 160
                }
            )
        );
        let c = plan(args(Kind::AllGather, 0x9000, 0x1000, 10), 2, 4).unwrap();
        assert_eq!(
            c.input,
            Some(Span {
                addr: 0x9000,
                len: 40
            })
        );
        // Inside recvbuff but at another rank's offset: overlap.
        assert_eq!(
            code(plan(args(Kind::AllGather, 0x1000 + 40, 0x1000, 10), 2, 4)),
            ResultCode::oxcclInvalidArgument
        );
        // reduce-scatter: recvbuff == sendbuff + rank * count * size.
        let c = plan(args(Kind::ReduceScatter, 0x1000, 0x1000 + 3 * 40, 10), 3, 4).unwrap();
        assert_eq!(
            (c.input, c.output),
            (
                None,
                Span {
                    addr: 0x1000,
                    len: 160
                }
            )
        );
        let c = plan(args(Kind::ReduceScatter, 0x1000, 0x9000, 10), 3, 4).unwrap();
        assert_eq!(
            c.input,
            Some(Span {
                addr: 0x1000,
                len: 160
            })
        );
        assert_eq!(
            c.output,
            Span {
                addr: 0x9000,
                len: 40
            }
        );
        assert_eq!(
            code(plan(args(Kind::ReduceScatter, 0x1000, 0x1000, 10), 3, 4)),
            ResultCode::oxcclInvalidArgument
        );
    }

    #[test]
    fn entry_points_refuse_null_and_record_the_thread_message() {
        // SAFETY: NULL pointers are what is tested; they are refused before use.
        unsafe {
            assert_eq!(oxcclGetVersion(std::ptr::null_mut()), 4);
            let msg = CStr::from_ptr(oxcclGetLastError(std::ptr::null_mut()));
            assert!(msg.to_str().unwrap().contains("version is NULL"));
            let mut n = 0;
            assert_eq!(oxcclCommCount(std::ptr::null_mut(), &mut n), 4);
            assert_eq!(
                oxcclAllReduce(
                    std::ptr::null(),
                    std::ptr::null_mut(),
                    0,
                    7,
                    0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut()
                ),
                4
            );
            assert_eq!(oxcclCommDestroy(std::ptr::null_mut()), 0);
            assert_eq!(
                oxcclCommInitAll(std::ptr::null_mut(), 2, std::ptr::null()),
                4
            );
            let mut comms = [std::ptr::null_mut(); 2];
            assert_eq!(oxcclCommInitAll(comms.as_mut_ptr(), 0, std::ptr::null()), 4);
            assert_eq!(
                oxcclCommInitAll(comms.as_mut_ptr(), -3, std::ptr::null()),
                4
            );
            let id = oxcclUniqueId { internal: [0; 128] };
            let mut c = std::ptr::null_mut();
            assert_eq!(oxcclCommInitRank(&mut c, 2, id, 0), 4, "bad magic");
            assert_eq!(oxcclCommInitRank(&mut c, -1, id, 0), 4);
            assert_eq!(oxcclCommInitRank(&mut c, 2, id, 2), 4);
            assert_eq!(oxcclGroupEnd(), 5);
        }
        // Another thread's last error is its own.
        std::thread::spawn(|| {
            let msg = oxcclGetLastError(std::ptr::null_mut());
            // SAFETY: a valid C string from oxcclGetLastError.
            assert_eq!(unsafe { CStr::from_ptr(msg) }.to_bytes(), b"");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn group_runs_all_ranks_from_one_thread() {
        let mut comms = [std::ptr::null_mut(); 3];
        // SAFETY: a writable array of 3 handles.
        let r = unsafe { oxcclCommInitAll(comms.as_mut_ptr(), 3, std::ptr::null()) };
        assert_eq!(r, 0);
        let mut bufs: Vec<Vec<f32>> = (0..3).map(|r| vec![r as f32 + 1.0; 5]).collect();
        assert_eq!(oxcclGroupStart(), 0);
        assert_eq!(oxcclGroupStart(), 0);
        for (c, b) in comms.iter().zip(bufs.iter_mut()) {
            let p = b.as_mut_ptr().cast::<c_void>();
            // SAFETY: live handles and buffers that outlive oxcclGroupEnd.
            let r = unsafe { oxcclAllReduce(p, p, 5, 7, 0, *c, std::ptr::null_mut()) };
            assert_eq!(r, 0);
        }
        assert_eq!(oxcclGroupEnd(), 0);
        // Still queued: the outer group is open; destroying a queued comm is refused.
        // SAFETY: a live handle.
        assert_eq!(unsafe { oxcclCommDestroy(comms[0]) }, 5);
        assert_eq!(bufs[0][0], 1.0);
        assert_eq!(oxcclGroupEnd(), 0);
        for b in &bufs {
            assert_eq!(b, &vec![6.0; 5]);
        }
        for c in comms {
            // SAFETY: live handles, destroyed once.
            assert_eq!(unsafe { oxcclCommDestroy(c) }, 0);
        }
    }

    fn xargs(kind: Kind, send: usize, recv: usize, count: usize) -> XArgs {
        XArgs {
            kind,
            send,
            recv,
            count,
            v: None,
            datatype: DataType::oxcclFloat32 as c_int,
            root: 0,
            stream: 0,
        }
    }

    fn v_args(sc: &[usize], sd: &[usize], rc: &[usize], rd: &[usize]) -> XArgs {
        let mut a = xargs(Kind::AllToAllV, 0x1000, 0x9000, 0);
        a.v = Some(VArgs {
            send_counts: sc.to_vec(),
            send_displs: sd.to_vec(),
            recv_counts: rc.to_vec(),
            recv_displs: rd.to_vec(),
        });
        a
    }

    fn message<T: std::fmt::Debug>(r: Outcome<T>) -> String {
        let f = r.unwrap_err();
        assert_eq!(f.code, ResultCode::oxcclInvalidArgument, "{}", f.message);
        f.message
    }

    #[test]
    fn p2p_checks_peer_type_count_and_buffer() {
        let p = plan_p2p(true, 0x1000, 10, 7, 3, 0, 4).unwrap();
        assert_eq!(
            (p.send, p.peer, p.dtype, p.buf),
            (
                true,
                3,
                DType::F32,
                Span {
                    addr: 0x1000,
                    len: 40
                }
            )
        );
        assert!(message(plan_p2p(true, 0x1000, 1, 7, 4, 0, 4)).contains("peer 4"));
        assert!(message(plan_p2p(false, 0x1000, 1, 7, -1, 0, 4)).contains("peer -1"));
        assert!(message(plan_p2p(false, 0, 1, 7, 0, 0, 4)).contains("recvbuff is NULL"));
        assert!(message(plan_p2p(true, 0, 1, 7, 0, 0, 4)).contains("sendbuff is NULL"));
        assert!(plan_p2p(true, 0, 0, 7, 0, 0, 4).is_ok());
        // A negative count passed as size_t.
        assert!(message(plan_p2p(true, 0x1000, -1isize as usize, 7, 0, 0, 4)).contains("negative"));
        assert!(message(plan_p2p(true, 0x1000, 1, 10, 0, 0, 4)).contains("datatype"));
        assert!(message(plan_p2p(true, 0x1000, 1, 7, 0, 0x42, 4)).contains("stream"));
    }

    #[test]
    fn receives_of_one_batch_need_their_own_memory() {
        let op = |send, addr, len| P2p {
            send,
            dtype: DType::U8,
            peer: 1,
            buf: Span { addr, len },
        };
        let batch = [op(true, 0x1000, 16), op(false, 0x2000, 16)];
        // Sends may share memory; a receive may not overlap anything.
        assert!(joins_batch(&batch, &op(true, 0x1008, 16)).is_ok());
        assert!(joins_batch(&batch, &op(false, 0x3000, 16)).is_ok());
        assert!(message(joins_batch(&batch, &op(false, 0x1008, 16))).contains("overlaps"));
        assert!(message(joins_batch(&batch, &op(false, 0x200f, 1))).contains("overlaps"));
        assert!(message(joins_batch(&batch, &op(true, 0x2000, 1))).contains("overlaps"));
        assert!(joins_batch(&batch, &op(false, 0x2010, 4)).is_ok());
    }

    #[test]
    fn exchanges_size_their_buffers() {
        let c = plan_exchange(xargs(Kind::AllToAll, 0x1000, 0x9000, 3), 1, 4).unwrap();
        assert_eq!((c.input.len, c.output.len), (48, 48));
        assert_eq!(c.x, XKind::AllToAll { count: 3 });
        // Gather: the root's output is world blocks, others' is not used.
        let mut a = xargs(Kind::Gather, 0x1000, 0, 3);
        a.root = 2;
        let c = plan_exchange(a.clone(), 1, 4).unwrap();
        assert_eq!((c.input.len, c.output.len), (12, 0));
        assert!(message(plan_exchange(a.clone(), 2, 4)).contains("recvbuff is NULL"));
        a.root = 4;
        assert!(message(plan_exchange(a.clone(), 2, 4)).contains("root 4"));
        a.root = -1;
        assert!(message(plan_exchange(a, 2, 4)).contains("root -1"));
        // Scatter: the root's input is world blocks.
        let mut a = xargs(Kind::Scatter, 0, 0x9000, 3);
        a.root = 0;
        let c = plan_exchange(a.clone(), 1, 4).unwrap();
        assert_eq!((c.input.len, c.output.len), (0, 12));
        assert!(message(plan_exchange(a, 0, 4)).contains("sendbuff is NULL"));
        // Not in place.
        assert!(
            message(plan_exchange(
                xargs(Kind::AllToAll, 0x1000, 0x1000, 3),
                0,
                4
            ))
            .contains("in place")
        );
        assert!(
            message(plan_exchange(
                xargs(Kind::AllToAll, 0x1000, 0x1010, 3),
                0,
                4
            ))
            .contains("in place")
        );
        // Counts past the address space.
        for n in [usize::MAX, isize::MAX as usize / 8] {
            assert!(
                message(plan_exchange(
                    xargs(Kind::AllToAll, 0x1000, 0x9000, n),
                    0,
                    4
                ))
                .contains("overflows")
            );
        }
        assert!(message(plan_exchange(xargs(Kind::AllReduce, 0, 0, 0), 0, 4)).contains("bug"));
    }

    #[test]
    fn alltoallv_checks_counts_and_displacements() {
        // Uneven, with zeros (whose displacements are not used).
        let a = v_args(&[1, 0, 2], &[0, 99, 1], &[1, 0, 3], &[0, 1 << 60, 1]);
        let c = plan_exchange(a, 0, 3).unwrap();
        assert_eq!((c.input.len, c.output.len), (12, 16));
        match &c.x {
            XKind::AllToAllV {
                send_displs,
                recv_displs,
                ..
            } => {
                assert_eq!(send_displs, &[0, 0, 1]);
                assert_eq!(recv_displs, &[0, 0, 1]);
            }
            x => panic!("{x:?}"),
        }
        // Overlapping receive ranges.
        let a = v_args(&[1, 1, 1], &[0, 1, 2], &[1, 2, 2], &[0, 1, 2]);
        let m = message(plan_exchange(a, 0, 3));
        assert!(
            m.contains("peer 1") && m.contains("peer 2") && m.contains("overlap"),
            "{m}"
        );
        // Overrunning the address space (a negative displacement).
        let a = v_args(
            &[1, 1, 1],
            &[0, -1isize as usize, 2],
            &[1, 1, 1],
            &[0, 1, 2],
        );
        assert!(message(plan_exchange(a, 0, 3)).contains("sdispls"));
        let a = v_args(
            &[1, 1, 1],
            &[0, 1, 2],
            &[1, -2isize as usize, 1],
            &[0, 1, 2],
        );
        assert!(message(plan_exchange(a, 0, 3)).contains("recvcounts"));
        // This rank's block to itself has one count.
        let a = v_args(&[1, 1, 1], &[0, 1, 2], &[2, 1, 1], &[0, 2, 3]);
        assert!(message(plan_exchange(a, 0, 3)).contains("sendcounts[0]"));
        // Arrays of the wrong length, missing arrays.
        let a = v_args(&[1, 1], &[0, 1], &[1, 1], &[0, 1]);
        assert!(message(plan_exchange(a, 0, 3)).contains("entries"));
        assert!(message(plan_exchange(xargs(Kind::AllToAllV, 0, 0, 0), 0, 3)).contains("arrays"));
        // All empty: NULL buffers are fine.
        let mut a = v_args(&[0, 0], &[5, 5], &[0, 0], &[7, 7]);
        a.send = 0;
        a.recv = 0;
        assert!(plan_exchange(a, 1, 2).is_ok());
    }

    /// Sends, receives and exchanges of 4 ranks driven from one thread in a
    /// group, posted in orders that would deadlock if run as posted.
    #[test]
    fn group_of_sends_and_receives_in_any_order() {
        const N: usize = 4;
        let mut comms = [std::ptr::null_mut(); N];
        assert_eq!(
            // SAFETY: a writable array of N handles.
            unsafe { oxcclCommInitAll(comms.as_mut_ptr(), N as c_int, std::ptr::null()) },
            0
        );
        let send: Vec<Vec<f32>> = (0..N).map(|r| vec![r as f32; 1000]).collect();
        let mut recv: Vec<[Vec<f32>; 2]> = (0..N)
            .map(|_| [vec![-1.0; 1000], vec![-1.0; 1000]])
            .collect();
        // Rank 0 sends to 1 then 3, rank 2 to 3 then 1; 1 receives from 2
        // then 0, 3 from 0 then 2.
        let plan: [(&[c_int], &[c_int]); N] = [
            (&[1, 3], &[]),
            (&[], &[2, 0]),
            (&[3, 1], &[]),
            (&[], &[0, 2]),
        ];
        assert_eq!(oxcclGroupStart(), 0);
        for (r, (to, from)) in plan.iter().enumerate() {
            for &p in *to {
                // SAFETY: live handles and buffers that outlive oxcclGroupEnd.
                let rc = unsafe {
                    oxcclSend(
                        send[r].as_ptr().cast(),
                        1000,
                        7,
                        p,
                        comms[r],
                        std::ptr::null_mut(),
                    )
                };
                assert_eq!(rc, 0);
            }
            for (i, &p) in from.iter().enumerate() {
                // SAFETY: as above.
                let rc = unsafe {
                    oxcclRecv(
                        recv[r][i].as_mut_ptr().cast(),
                        1000,
                        7,
                        p,
                        comms[r],
                        std::ptr::null_mut(),
                    )
                };
                assert_eq!(rc, 0);
            }
        }
        // A receive into memory already queued is refused at once.
        // SAFETY: as above; refused before it is queued.
        let rc = unsafe {
            oxcclRecv(
                recv[1][0].as_mut_ptr().cast(),
                10,
                7,
                3,
                comms[1],
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 4);
        assert_eq!(oxcclGroupEnd(), 0);
        assert_eq!(recv[1][0], vec![2.0; 1000]);
        assert_eq!(recv[1][1], vec![0.0; 1000]);
        assert_eq!(recv[3][0], vec![0.0; 1000]);
        assert_eq!(recv[3][1], vec![2.0; 1000]);

        // Alltoall and gather in a group, then a send outside a group: refused peer.
        let input: Vec<Vec<u32>> = (0..N)
            .map(|r| (0..N as u32 * 2).map(|i| r as u32 * 100 + i).collect())
            .collect();
        let mut output = vec![vec![0u32; N * 2]; N];
        let mut gathered = vec![0u32; N];
        assert_eq!(oxcclGroupStart(), 0);
        for r in 0..N {
            // SAFETY: as above.
            unsafe {
                assert_eq!(
                    oxcclAllToAll(
                        input[r].as_ptr().cast(),
                        output[r].as_mut_ptr().cast(),
                        2,
                        3,
                        comms[r],
                        std::ptr::null_mut()
                    ),
                    0
                );
                let out = if r == 1 {
                    gathered.as_mut_ptr().cast()
                } else {
                    std::ptr::null_mut()
                };
                assert_eq!(
                    oxcclGather(
                        input[r].as_ptr().cast(),
                        out,
                        1,
                        3,
                        1,
                        comms[r],
                        std::ptr::null_mut()
                    ),
                    0
                );
            }
        }
        assert_eq!(oxcclGroupEnd(), 0);
        for (r, out) in output.iter().enumerate() {
            let want: Vec<u32> = (0..N as u32)
                .flat_map(|p| [p * 100 + 2 * r as u32, p * 100 + 2 * r as u32 + 1])
                .collect();
            assert_eq!(out, &want);
        }
        assert_eq!(gathered, [0, 100, 200, 300]);
        // SAFETY: refused before any access: the peer is out of range.
        let rc = unsafe {
            oxcclSend(
                send[0].as_ptr().cast(),
                1,
                7,
                4,
                comms[0],
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 4);
        for c in comms {
            // SAFETY: live handles, destroyed once.
            assert_eq!(unsafe { oxcclCommDestroy(c) }, 0);
        }
    }

    #[test]
    fn error_strings_are_static_and_distinct() {
        let all: Vec<&CStr> = (0..=9)
            // SAFETY: oxcclGetErrorString returns static C strings.
            .map(|c| unsafe { CStr::from_ptr(oxcclGetErrorString(c)) })
            .collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // SAFETY: as above.
        let neg = unsafe { CStr::from_ptr(oxcclGetErrorString(-1)) };
        assert_eq!(neg, all[9]);
    }
}
