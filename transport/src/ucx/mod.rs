//! A link over UCX (feature `ucx`): InfiniBand and RoCE through verbs,
//! and UCX's shared-memory and TCP transports where there is no fabric.
//!
//! Each communicator has one UCP context and one worker ([`Worker`]); each
//! link is an endpoint on it to one peer's worker. A [`UcxLink`] is made
//! from a stream link that the bootstrap has already authenticated (the
//! challenge-response of [`crate::auth`]): the two sides swap their worker
//! addresses over that socket ([`upgrade`]), so an address is only ever
//! taken from a peer that proved the job's secret, and the socket stays on
//! as the link's death notice, as shared memory keeps its own: a peer that
//! dies closes it at once, whichever transport UCX picked (UCX itself learns
//! of a dead peer over TCP at once, but over shared memory only through its
//! keepalive, seconds later).
//!
//! A frame is one or two tagged messages. The 64-bit tag is the receiving
//! side's number for the link (chosen by the receiver, so that messages on
//! several links to one peer, as in a world of two, never match each
//! other's receives), the frame's sequence number on the link, and whether
//! it is the frame's first or second message. A frame of at most
//! [`INLINE`] payload bytes goes as one message, its header and payload
//! copied together; a larger one as its header and then its payload, posted
//! at once from the caller's memory (UCX sends it eagerly or, past its
//! rendezvous threshold, by zero-copy rendezvous: RDMA read or write on a
//! fabric). The receiver takes the first message into a buffer of the
//! link's, checks the header, and only then posts the payload's receive
//! into the caller's memory, so a mismatched frame never reaches it.
//!
//! Operations are nonblocking (`ucp_tag_send_nbx`, `ucp_tag_recv_nbx`) and
//! tested by the engine, each test progressing the worker. A link about to
//! sleep arms the worker (`ucp_worker_arm`) and sleeps on an epoll set of
//! the worker's event descriptor (`ucp_worker_get_efd`), its socket, and a
//! timer that bounds a sleep to 50 ms (UCX's TCP transport connects on a
//! thread of its own, which does not wake the worker; endpoints are also
//! wired up before a link is handed out, see `wire_up`).
//!
//! Device memory (feature `cuda` above, or any memory reached by address,
//! [`Lent::Device`]) goes to UCX as it is, with its memory type, always as
//! a payload message of its own (never copied inline: only UCX may read
//! it), when the context reports that memory type (`ucp_context_query`);
//! the link's capabilities say which kinds
//! ([`crate::Capabilities::by_address`]) and that frames of at most
//! [`INLINE`] bytes are better staged, since a receive by address cannot
//! take an inline payload.
//!
//! Memory is not registered by the link ([`crate::Capabilities::registration`] is
//! false): UCX registers what it sends from and receives into itself, in a
//! registration cache that its memory hooks invalidate when memory is
//! unmapped. A cache of the link's own (`ucp_mem_map` by address) could not
//! know that an address was freed and reused, and would then send from
//! pages no longer the caller's.
//!
//! # Safety
//!
//! This module is one of the places where oxccl uses `unsafe` (see the
//! architecture notes). The invariants it keeps:
//!
//! * The context, worker and endpoints are used only under the worker's
//!   mutex (the worker is created `UCS_THREAD_MODE_SERIALIZED`); an
//!   endpoint is closed, and every request on it completed or cancelled and
//!   freed, before the worker is destroyed, and the worker before the
//!   context ([`Shared`] owns both and is dropped last, by the last link).
//! * Memory posted to UCX stays valid until its request completes: an
//!   operation's memory is lent to the [`Outgoing`] or [`Incoming`] the
//!   caller keeps until the link reports it done or has withdrawn it
//!   ([`Endpoint::withdraw`] cancels receives and force-closes the endpoint
//!   under sends, progressing the worker until their requests complete);
//!   the link's own buffers and I/O vectors are not touched while a request
//!   uses them (one send and one receive at a time per link), and are kept
//!   in heap allocations that do not move with the link.
//! * A request pointer is freed exactly once, after it completed.
//! * The endpoint's error callback gets a pointer to a boxed atomic that
//!   lives as long as the endpoint.

use std::ffi::{CStr, c_void};
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use std::mem::MaybeUninit;

use rustix::event::{Timespec, epoll};
use smallvec::SmallVec;

use crate::TransportError;
use crate::codec::{Prefix, Reader, Writer};
use crate::link::{Direction, Endpoint, ShutdownHandle, StreamLink};
use crate::message::{Incoming, Lent, MessageLink, Outgoing, Status};
use crate::shm::handshake::{recv_exact, send_all};
use crate::wire::FrameHeader;
use crate::{Capabilities, Medium, MemoryKind, MemoryKinds};

mod sys;

const HDR: usize = FrameHeader::LEN;

/// The most payload bytes a frame carries in its first message, copied
/// with its header; larger payloads go as a message of their own from the
/// caller's memory.
pub const INLINE: usize = 8192;

/// Sends of at most this many bytes over shared memory ask UCX for fast
/// completion (`UCP_OP_ATTR_FLAG_FAST_CMPL`), which keeps them eager
/// (copied through UCX's shared-memory queue) up to UCX's larger
/// threshold, where a plain send goes by rendezvous from 8 KiB: measured
/// over `UCX_TLS=sm` on 2 ranks, a 16 KiB allreduce 7.7 -> 4.6 µs, 64 KiB
/// to 1 MiB unchanged; with every send so, 256 KiB was 1.5x slower
/// (rendezvous's single copy wins there).
const FAST_COMPLETION: usize = 32 << 10;

/// The version of UCX this build was compiled against.
pub const UCX_VERSION: &str = env!("OXCCL_UCX_VERSION");

/// How long a peer's closed socket may precede its last messages: the
/// socket and UCX's own connections are separate paths, and a peer that
/// completed a call and then died must not fail that call here.
const GRACE: Duration = Duration::from_millis(200);

/// How long teardown progresses the worker for cancelled requests.
const TEARDOWN: Duration = Duration::from_millis(500);

/// How long, when the peer is dead: UCX's shared-memory transports never
/// complete a rendezvous with a dead peer, and a request given up on is
/// left to UCX (its memory is not read again: the reader is gone).
const TEARDOWN_DEAD: Duration = Duration::from_millis(50);

/// How long a worker is progressed at most before it is destroyed, and for
/// how long it must have had nothing to do ([`Shared`]'s drop).
const DRAIN: Duration = Duration::from_millis(100);
const DRAIN_IDLE: Duration = Duration::from_millis(5);

/// The longest a link sleeps before it progresses the worker again, woken
/// by a timer: UCX handles some events (its TCP transport's connections) on
/// a thread of its own that does not wake a sleeping worker, and a wake-up
/// missed so must cost a moment, not the deadline.
const NAP: Duration = Duration::from_millis(50);

/// The magic of the address exchange.
const MAGIC: &[u8; 8] = b"OXUCXAD1";
/// The longest worker address accepted from a peer.
const MAX_ADDRESS: usize = 1 << 16;
/// The format name of the exchange, as decoding errors name it.
const OFFER: &str = "UCX address";

/// The text of a UCX status.
pub fn status_text(status: sys::ucs_status_t) -> String {
    // SAFETY: ucs_status_string returns a pointer to a static string for
    // every status, known or not.
    let p = unsafe { sys::ucs_status_string(status) };
    if p.is_null() {
        return format!("UCX status {status}");
    }
    // SAFETY: a non-null result is a NUL-terminated static string.
    let s = unsafe { CStr::from_ptr(p) };
    format!("{} (UCX status {status})", s.to_string_lossy())
}

fn ucx_err(what: impl Into<String>, status: sys::ucs_status_t) -> TransportError {
    TransportError::io(
        what,
        std::io::Error::other(format!("UCX: {}", status_text(status))),
    )
}

/// Whether `p`, returned by a UCX call that returns a status pointer, is an
/// error; its status.
fn ptr_status(p: *mut c_void) -> Option<sys::ucs_status_t> {
    let v = p as usize;
    // UCS_PTR_IS_ERR: the pointer is a negative status, [UCS_ERR_LAST, 0).
    if v >= (sys::UCS_ERR_LAST as isize) as usize {
        Some(v as isize as sys::ucs_status_t)
    } else {
        None
    }
}

/// Whether UCX on this host reports an RDMA device: its `ib` component
/// (verbs: InfiniBand and RoCE) has at least one memory domain. False
/// where UCX was built without verbs or no adapter is present.
pub fn rdma_available() -> bool {
    let mut list: *mut sys::uct_component_h = std::ptr::null_mut();
    let mut n: std::os::raw::c_uint = 0;
    // SAFETY: both out-pointers are valid; the list is released below.
    let st = unsafe { sys::uct_query_components(&mut list, &mut n) };
    if st != sys::UCS_OK || list.is_null() {
        return false;
    }
    let mut found = false;
    for i in 0..n as usize {
        // SAFETY: the list has `n` entries.
        let c = unsafe { *list.add(i) };
        let mut attr = sys::uct_component_attr_t {
            field_mask: (sys::UCT_COMPONENT_ATTR_FIELD_NAME
                | sys::UCT_COMPONENT_ATTR_FIELD_MD_RESOURCE_COUNT) as u64,
            ..Default::default()
        };
        // SAFETY: `c` is a component of the list and `attr` is writable;
        // the resources array is not asked for.
        if unsafe { sys::uct_component_query(c, &mut attr) } != sys::UCS_OK {
            continue;
        }
        // SAFETY: the name is a NUL-terminated array filled by the query
        // (zeroed by default, so terminated even if not).
        let name = unsafe { CStr::from_ptr(attr.name.as_ptr()) };
        if name.to_bytes() == b"ib" && attr.md_resource_count > 0 {
            found = true;
        }
    }
    // SAFETY: the list came from uct_query_components and is released once.
    unsafe { sys::uct_release_component_list(list) };
    found
}

/// The context and worker, used only under [`Shared::lock`].
struct Handles {
    context: sys::ucp_context_h,
    worker: sys::ucp_worker_h,
    /// The next number this worker gives a link for its incoming messages.
    next_id: u32,
    /// Endpoints ask UCX to report a dead peer (until UCX refuses, as its
    /// shared-memory transports do).
    peer_errors: bool,
}

// SAFETY: the handles are used only under the mutex that holds them, by one
// thread at a time, as UCS_THREAD_MODE_SERIALIZED allows.
unsafe impl Send for Handles {}

/// A communicator's UCP context and worker, shared by its links.
pub struct Shared {
    handles: Mutex<Handles>,
    /// The worker's event descriptor (owned by UCX).
    efd: i32,
    /// The worker's address, as peers connect to it.
    address: Vec<u8>,
    /// The kinds of memory this context moves by address: host always,
    /// CUDA where UCX was built with it and finds a device.
    memory: MemoryKinds,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ucx::Shared(address of {} bytes)", self.address.len())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Handles> {
        self.handles.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let h = self.lock();
        // UCX's own wire-up messages may still be on their way (over its TCP
        // transport, a reply waits for its connection): UCX 1.13 aborts
        // (an assertion in `ucp_request_send_state_ff`, removed in later
        // releases) when a worker is destroyed with one still queued. Let
        // them go first: progress until the worker has been idle a while,
        // within a bound.
        let until = Instant::now() + DRAIN;
        let mut idle_since = Instant::now();
        while Instant::now() < until {
            if UcxLink::progress(&h) {
                idle_since = Instant::now();
            } else if idle_since.elapsed() >= DRAIN_IDLE {
                break;
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: every link (each holding an Arc of this) is gone, and each
        // closed its endpoint and freed its requests: nothing uses the
        // worker, which is destroyed before its context.
        unsafe {
            sys::ucp_worker_destroy(h.worker);
            sys::ucp_cleanup(h.context);
        }
    }
}

/// A communicator's UCP context and worker: what its links share.
pub type Worker = Arc<Shared>;

/// Creates a context (tag matching, wake-up events) and a worker, reading
/// UCX's own configuration (`UCX_TLS`, `UCX_NET_DEVICES`, ...) from the
/// environment as UCX always does.
pub fn worker() -> Result<Worker, TransportError> {
    let mut config: *mut sys::ucp_config_t = std::ptr::null_mut();
    // SAFETY: null prefix and file mean UCX's defaults and the environment;
    // the out-pointer is valid.
    let st = unsafe { sys::ucp_config_read(std::ptr::null(), std::ptr::null(), &mut config) };
    if st != sys::UCS_OK {
        return Err(ucx_err("reading UCX's configuration", st));
    }
    let params = sys::ucp_params_t {
        field_mask: (sys::UCP_PARAM_FIELD_FEATURES | sys::UCP_PARAM_FIELD_MT_WORKERS_SHARED) as u64,
        features: (sys::UCP_FEATURE_TAG | sys::UCP_FEATURE_WAKEUP) as u64,
        mt_workers_shared: 0,
        ..Default::default()
    };
    let mut context: sys::ucp_context_h = std::ptr::null_mut();
    // SAFETY: ucp_init is a header inline that calls ucp_init_version with
    // the API version compiled against; params and config are valid, and
    // the config is released once whatever the result.
    let st = unsafe {
        let st = sys::ucp_init_version(
            sys::UCP_API_MAJOR,
            sys::UCP_API_MINOR,
            &params,
            config,
            &mut context,
        );
        sys::ucp_config_release(config);
        st
    };
    if st != sys::UCS_OK {
        return Err(ucx_err("creating a UCP context", st));
    }
    let memory = memory_kinds(context);
    let wparams = sys::ucp_worker_params_t {
        field_mask: sys::UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64,
        thread_mode: sys::UCS_THREAD_MODE_SERIALIZED,
        ..Default::default()
    };
    let mut worker: sys::ucp_worker_h = std::ptr::null_mut();
    // SAFETY: the context is live; the out-pointer is valid.
    let st = unsafe { sys::ucp_worker_create(context, &wparams, &mut worker) };
    if st != sys::UCS_OK {
        // SAFETY: the context is live and nothing else uses it.
        unsafe { sys::ucp_cleanup(context) };
        return Err(ucx_err("creating a UCP worker", st));
    }
    let fail = |what: &str, st| {
        // SAFETY: the worker and context are live and unused elsewhere.
        unsafe {
            sys::ucp_worker_destroy(worker);
            sys::ucp_cleanup(context);
        }
        Err(ucx_err(what, st))
    };
    let mut efd: std::os::raw::c_int = -1;
    // SAFETY: the worker is live (created with the wake-up feature).
    let st = unsafe { sys::ucp_worker_get_efd(worker, &mut efd) };
    if st != sys::UCS_OK {
        return fail("getting the UCP worker's event descriptor", st);
    }
    let mut addr: *mut sys::ucp_address_t = std::ptr::null_mut();
    let mut len: usize = 0;
    // SAFETY: the worker is live; the out-pointers are valid.
    let st = unsafe { sys::ucp_worker_get_address(worker, &mut addr, &mut len) };
    if st != sys::UCS_OK {
        return fail("getting the UCP worker's address", st);
    }
    // SAFETY: UCX returned `len` bytes at `addr`, released once after the copy.
    let address = unsafe {
        let v = std::slice::from_raw_parts(addr as *const u8, len).to_vec();
        sys::ucp_worker_release_address(worker, addr);
        v
    };
    Ok(Arc::new(Shared {
        handles: Mutex::new(Handles {
            context,
            worker,
            next_id: 1,
            peer_errors: true,
        }),
        efd,
        address,
        memory,
    }))
}

/// The kinds of memory a context can move by address (`ucp_context_query`'s
/// memory types): host memory always; CUDA memory when UCX has a CUDA
/// transport loaded (its `cuda_copy` module finds a driver and a device).
fn memory_kinds(context: sys::ucp_context_h) -> MemoryKinds {
    let mut attr = sys::ucp_context_attr_t {
        field_mask: sys::UCP_ATTR_FIELD_MEMORY_TYPES as u64,
        ..Default::default()
    };
    let host = MemoryKinds::NONE.with(MemoryKind::Host);
    // SAFETY: the context is live; `attr` is valid for UCX to fill.
    let st = unsafe { sys::ucp_context_query(context, &mut attr) };
    if st != sys::UCS_OK {
        return host;
    }
    if attr.memory_types & (1u64 << sys::UCS_MEMORY_TYPE_CUDA) != 0 {
        host.with(MemoryKind::Cuda)
    } else {
        host
    }
}

/// UCX's name for a kind of memory, given with every operation on memory
/// by address so that UCX need not look it up.
fn memory_type(kind: MemoryKind) -> sys::ucs_memory_type_t {
    match kind {
        MemoryKind::Host => sys::UCS_MEMORY_TYPE_HOST,
        MemoryKind::Cuda => sys::UCS_MEMORY_TYPE_CUDA,
    }
}

/// Addresses and lengths of an operation's memory, and its kind when reached
/// by address.
type Pieces = (SmallVec<[(usize, usize); 4]>, Option<MemoryKind>);

/// The memory of an operation's parts as UCX takes it: each part's address
/// and length (adjacent parts merged: the cells of one output range are
/// one piece of memory), and the kind of memory reached by address, if
/// any. Host parts and parts by address cannot be mixed in one operation.
fn pieces(parts: &mut [Lent<'_>], peer: usize) -> Result<Pieces, TransportError> {
    let mut out: SmallVec<[(usize, usize); 4]> = SmallVec::new();
    let mut kind: Option<Option<MemoryKind>> = None;
    for p in parts.iter_mut() {
        let (addr, len, k) = match p.device() {
            Some((a, n, k)) => (a, n, Some(k)),
            None => match p.bytes_mut() {
                Some(b) => (b.as_mut_ptr() as usize, b.len(), None),
                None => (p.bytes().as_ptr() as usize, p.bytes().len(), None),
            },
        };
        if len == 0 {
            continue;
        }
        match kind {
            Some(before) if before != k => {
                return Err(TransportError::Protocol {
                    peer,
                    reason: "one UCX message of host memory and memory by address together".into(),
                });
            }
            _ => kind = Some(k),
        }
        match out.last_mut() {
            Some((a, n)) if *a + *n == addr => *n += len,
            _ => out.push((addr, len)),
        }
    }
    Ok((out, kind.flatten()))
}

/// The error an endpoint reported through its callback (0: none).
struct EpError(AtomicI8);

unsafe extern "C" fn on_ep_error(arg: *mut c_void, _ep: sys::ucp_ep_h, status: sys::ucs_status_t) {
    // SAFETY: `arg` is the EpError boxed in the link, which outlives the endpoint.
    let e = unsafe { &*(arg as *const EpError) };
    e.0.store(status, Ordering::Release);
}

/// Which message of a frame a tag is for.
const FIRST: u64 = 0;
const SECOND: u64 = 1 << 63;

fn tag(which: u64, link: u32, seq: u32) -> u64 {
    which | (u64::from(link & 0x7fff_ffff) << 32) | u64::from(seq)
}

/// A request of the link's, or none.
#[derive(Debug, Clone, Copy)]
struct Req(*mut c_void);

impl Req {
    const NONE: Req = Req(std::ptr::null_mut());
    fn is_none(self) -> bool {
        self.0.is_null()
    }
}

/// The link's send side: the frame's requests and the memory they use.
#[derive(Debug)]
struct Tx {
    reqs: [Req; 2],
    /// Header (and inline payload) of the frame in flight.
    buf: Box<[u8]>,
    /// The payload's pieces, when it has several.
    iov: Vec<sys::ucp_dt_iov_t>,
    /// The error a request of the frame ended with.
    failed: Option<sys::ucs_status_t>,
}

/// Where the receive of a frame stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Idle,
    First,
    Second,
}

/// The link's receive side.
#[derive(Debug)]
struct Rx {
    req: Req,
    stage: Stage,
    seq: u32,
    /// The first message of a frame: header and inline payload.
    buf: Box<[u8]>,
    info: Box<sys::ucp_tag_recv_info_t>,
    iov: Vec<sys::ucp_dt_iov_t>,
}

/// One peer over UCX (see the module docs).
pub struct UcxLink {
    peer: usize,
    shared: Worker,
    ep: sys::ucp_ep_h,
    ep_error: Box<EpError>,
    /// The authenticated socket the link was made from: death notice, and
    /// the channel of a withdrawal.
    socket: StreamLink,
    /// The worker's event descriptor, the socket and `timer`.
    epoll: OwnedFd,
    /// A timer armed for [`NAP`] whenever the link is about to sleep.
    timer: OwnedFd,
    /// The peer's number for this link (in tags of messages to it).
    send_id: u32,
    /// This side's number for this link (in tags of messages from it).
    recv_id: u32,
    send_seq: u32,
    recv_seq: u32,
    tx: Tx,
    rx: Rx,
    /// When the socket was found closed, and how.
    dead: std::cell::Cell<Option<Instant>>,
    /// The peer withdrew a transfer (its call failed).
    peer_withdrew: std::cell::Cell<bool>,
    /// This side withdrew: the link carries nothing more.
    withdrawn: bool,
    description: String,
    /// The transport UCX carries the link's eager messages over. Over
    /// shared memory small sends ask for fast completion
    /// ([`FAST_COMPLETION`]). (Declaring such links `cheap_polling` too, so
    /// an idle engine tests them after every pause, made a 64 KiB allreduce
    /// on 2 ranks 1.6x slower: not done.)
    medium: Medium,
}

// SAFETY: the endpoint and request pointers are used only under the worker's
// mutex (see the module's safety notes); the buffers they point into are the
// link's own heap allocations or memory lent for the operation's lifetime.
unsafe impl Send for UcxLink {}

impl fmt::Debug for UcxLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UcxLink({})", self.description)
    }
}

/// Swaps worker addresses over each authenticated stream link of `links`
/// and makes each a [`UcxLink`] on `worker`, in the order given. Every rank
/// calls it with all its links at once: it writes all its addresses first,
/// then reads the peers', so no rank waits for one that waits for it.
pub fn upgrade(
    worker: &Worker,
    links: Vec<StreamLink>,
    deadline: Instant,
) -> Result<Vec<UcxLink>, TransportError> {
    let mut ids = Vec::with_capacity(links.len());
    let mut links = links;
    for link in &mut links {
        let id = {
            let mut h = worker.lock();
            let id = h.next_id;
            h.next_id = h.next_id.wrapping_add(1) & 0x7fff_ffff;
            id
        };
        let mut w = Writer::new();
        w.bytes(MAGIC).u32(id);
        w.bytes_prefixed(Prefix::U32, &worker.address)
            .map_err(|e| TransportError::Protocol {
                peer: link.peer(),
                reason: e.to_string(),
            })?;
        send_all(link, w.as_bytes(), deadline, "a UCX address")?;
        ids.push(id);
    }
    let mut out = Vec::with_capacity(links.len());
    for (link, id) in links.into_iter().zip(ids) {
        out.push(UcxLink::connect(worker, link, id, deadline)?);
    }
    wire_up(worker, &out, deadline)?;
    let h = worker.lock();
    for l in &mut out {
        let am = am_transport(&ep_info(&h, l.ep));
        l.medium = am.as_deref().map_or(Medium::UcxOther, medium);
        if let Some(t) = am {
            l.description = format!("{} over {t}", l.description);
        }
    }
    drop(h);
    Ok(out)
}

/// The transport of the lane that carries an endpoint's eager messages
/// (`sysv/memory`, `tcp/lo`, `rc_mlx5/mlx5_0:1`, ...), from UCX's report
/// of it ([`ep_info`]).
fn am_transport(info: &str) -> Option<String> {
    info.lines()
        .filter(|l| l.contains("lane[") && l.split_whitespace().any(|w| w == "am"))
        .find_map(|l| {
            let tl = l.split_whitespace().find(|w| w.contains('/'))?;
            let tl = tl.split_once(':').map_or(tl, |(_, t)| t);
            Some(tl.rsplit_once('.').map_or(tl, |(t, _)| t).to_string())
        })
}

/// What an endpoint's eager lane ([`am_transport`]) says of the link's cost.
fn medium(transport: &str) -> Medium {
    if ["sysv/", "posix/", "xpmem/"]
        .iter()
        .any(|s| transport.starts_with(s))
    {
        Medium::UcxSharedMemory
    } else if transport.starts_with("tcp/") {
        Medium::UcxSocket
    } else {
        Medium::UcxOther
    }
}

/// Completes the connection of every endpoint of `links` (UCX's wire-up)
/// by flushing them, the peers doing the same at the same time, before
/// `deadline`. UCX establishes some connections (its TCP transport's) from
/// its own thread, which does not wake a sleeping worker: a first send
/// posted before then would wait for the sleeper's next wake-up.
fn wire_up(worker: &Worker, links: &[UcxLink], deadline: Instant) -> Result<(), TransportError> {
    let h = worker.lock();
    let mut pending: Vec<(usize, Req)> = Vec::new();
    for (i, l) in links.iter().enumerate() {
        let param = sys::ucp_request_param_t::default();
        // SAFETY: the endpoint is live and the worker locked.
        let p = unsafe { sys::ucp_ep_flush_nbx(l.ep, &param) };
        match ptr_status(p) {
            Some(st) => {
                return Err(TransportError::PeerClosed {
                    peer: l.peer,
                    how: format!("connecting to it over UCX: {}", status_text(st)),
                });
            }
            None if p.is_null() => {}
            None => pending.push((i, Req(p))),
        }
    }
    let started = Instant::now();
    while !pending.is_empty() {
        UcxLink::progress(&h);
        let mut failed = None;
        pending.retain_mut(|(i, r)| match UcxLink::poll_req(r) {
            Ok(done) => !done,
            Err(st) => {
                failed.get_or_insert((*i, st));
                false
            }
        });
        if let Some((i, st)) = failed {
            for (_, r) in &pending {
                // SAFETY: UCX releases a request freed before it completes
                // when it does; none is used again.
                unsafe { sys::ucp_request_free(r.0) };
            }
            return Err(TransportError::PeerClosed {
                peer: links[i].peer,
                how: format!("connecting to it over UCX: {}", status_text(st)),
            });
        }
        if Instant::now() >= deadline {
            let peers: Vec<usize> = pending.iter().map(|(i, _)| links[*i].peer).collect();
            for (_, r) in &pending {
                // SAFETY: as above.
                unsafe { sys::ucp_request_free(r.0) };
            }
            return Err(TransportError::Timeout {
                what: format!("connecting over UCX to ranks {peers:?}"),
                waited: started.elapsed(),
            });
        }
        std::thread::yield_now();
    }
    Ok(())
}

/// The magic of the `auto` negotiation.
const NEGOTIATE: &[u8; 8] = b"OXUCXNG1";
/// The format name of the negotiation, as decoding errors name it.
const NEGOTIATION: &str = "UCX negotiation";

/// This host, as far as the negotiation tells hosts apart: its name and
/// boot id (containers of one host have names of their own).
fn host_id() -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for f in [
        "/proc/sys/kernel/hostname",
        "/proc/sys/kernel/random/boot_id",
    ] {
        if let Ok(b) = std::fs::read(f) {
            h.update(b);
        }
    }
    h.finalize().into()
}

/// `auto`'s choice, link by link: a link goes over UCX when both ends have
/// a worker (`worker`: this side has an RDMA device, [`rdma_available`])
/// and are on different hosts; ranks of one host keep their stream link
/// (and go on to offer shared memory). Each side writes what it has on
/// every link first, then reads the peers', as [`upgrade`] does, and the
/// chosen links are then upgraded. Returns, in the order given, each link
/// upgraded or as it was.
pub fn upgrade_remote(
    worker: Option<&Worker>,
    links: Vec<StreamLink>,
    deadline: Instant,
) -> Result<Vec<Result<UcxLink, StreamLink>>, TransportError> {
    upgrade_remote_from(host_id(), worker, links, deadline)
}

/// [`upgrade_remote`] on the host `me`.
fn upgrade_remote_from(
    me: [u8; 32],
    worker: Option<&Worker>,
    links: Vec<StreamLink>,
    deadline: Instant,
) -> Result<Vec<Result<UcxLink, StreamLink>>, TransportError> {
    let mut links = links;
    for link in &mut links {
        let mut w = Writer::new();
        w.bytes(NEGOTIATE).u8(u8::from(worker.is_some())).bytes(&me);
        send_all(link, w.as_bytes(), deadline, "a UCX negotiation")?;
    }
    let mut chosen = Vec::with_capacity(links.len());
    for link in &mut links {
        let peer = link.peer();
        let bad = |e: crate::codec::DecodeError| TransportError::Protocol {
            peer,
            reason: e.to_string(),
        };
        let mut b = [0u8; 8 + 1 + 32];
        recv_exact(link, &mut b, deadline, "a UCX negotiation")?;
        let mut r = Reader::new(NEGOTIATION, &b);
        if r.array::<8>("magic").map_err(bad)? != *NEGOTIATE {
            return Err(TransportError::Protocol {
                peer,
                reason: "no UCX negotiation (is that rank built without feature ucx?)".into(),
            });
        }
        let rdma = r.u8("rdma").map_err(bad)? == 1;
        let host = r.array::<32>("host").map_err(bad)?;
        chosen.push(rdma && worker.is_some() && host != me);
    }
    let (up, keep): (Vec<_>, Vec<_>) = links
        .into_iter()
        .zip(chosen)
        .enumerate()
        .partition(|(_, (_, c))| *c);
    let mut out: Vec<(usize, Result<UcxLink, StreamLink>)> =
        keep.into_iter().map(|(i, (l, _))| (i, Err(l))).collect();
    if let Some(worker) = worker {
        let (at, up): (Vec<usize>, Vec<StreamLink>) =
            up.into_iter().map(|(i, (l, _))| (i, l)).unzip();
        for (i, l) in at.into_iter().zip(upgrade(worker, up, deadline)?) {
            out.push((i, Ok(l)));
        }
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, l)| l).collect())
}

/// What UCX chose to carry an endpoint's messages: `ucp_ep_print_info`'s
/// report (its lanes and their transports, and the protocols by size).
fn ep_info(h: &Handles, ep: sys::ucp_ep_h) -> String {
    let _ = h;
    let mut buf: *mut libc::c_char = std::ptr::null_mut();
    let mut len: libc::size_t = 0;
    // SAFETY: open_memstream gets valid out-pointers; the stream is closed
    // once (which sets them), and the buffer freed once after the copy.
    unsafe {
        let f = libc::open_memstream(&mut buf, &mut len);
        if f.is_null() {
            return String::new();
        }
        sys::ucp_ep_print_info(ep, f.cast());
        libc::fclose(f);
        if buf.is_null() {
            return String::new();
        }
        let text =
            String::from_utf8_lossy(std::slice::from_raw_parts(buf.cast::<u8>(), len)).into_owned();
        libc::free(buf.cast());
        text
    }
}

impl UcxLink {
    /// UCX's report of this link's endpoint (lanes, transports, protocols).
    pub fn endpoint_info(&self) -> String {
        let h = self.shared.lock();
        ep_info(&h, self.ep)
    }

    fn connect(
        worker: &Worker,
        mut socket: StreamLink,
        recv_id: u32,
        deadline: Instant,
    ) -> Result<UcxLink, TransportError> {
        let peer = socket.peer();
        let bad = |e: crate::codec::DecodeError| TransportError::Protocol {
            peer,
            reason: e.to_string(),
        };
        let mut fixed = [0u8; 16];
        recv_exact(&mut socket, &mut fixed, deadline, "a UCX address")?;
        let mut r = Reader::new(OFFER, &fixed);
        if r.array::<8>("magic").map_err(bad)? != *MAGIC {
            return Err(TransportError::Protocol {
                peer,
                reason: "its answer to the UCX address exchange is not one (is it on another transport?)"
                    .into(),
            });
        }
        let send_id = r.u32("link number").map_err(bad)?;
        let len = r.u32("address length").map_err(bad)? as usize;
        if len == 0 || len > MAX_ADDRESS {
            return Err(TransportError::Protocol {
                peer,
                reason: format!("a UCX worker address of {len} bytes (at most {MAX_ADDRESS})"),
            });
        }
        let mut address = vec![0u8; len];
        recv_exact(&mut socket, &mut address, deadline, "a UCX address")?;

        let ep_error = Box::new(EpError(AtomicI8::new(0)));
        let params = sys::ucp_ep_params_t {
            field_mask: (sys::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                | sys::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                | sys::UCP_EP_PARAM_FIELD_ERR_HANDLER) as u64,
            address: address.as_ptr() as *const sys::ucp_address_t,
            err_mode: sys::UCP_ERR_HANDLING_MODE_PEER,
            err_handler: sys::ucp_err_handler_t {
                cb: Some(on_ep_error),
                arg: &*ep_error as *const EpError as *mut c_void,
            },
            ..Default::default()
        };
        let mut ep: sys::ucp_ep_h = std::ptr::null_mut();
        let h = worker.lock();
        let mut st = sys::UCS_ERR_UNREACHABLE;
        if h.peer_errors {
            // SAFETY: the worker is live and locked; the address is `len`
            // bytes UCX copies during the call; the error handler's argument
            // outlives the endpoint (closed before the box is dropped).
            st = unsafe { sys::ucp_ep_create(h.worker, &params, &mut ep) };
        }
        drop(h);
        if st == sys::UCS_ERR_UNREACHABLE {
            // UCX 1.13's shared-memory transports cannot detect a dead peer
            // and refuse endpoints that ask them to (UCX logs why, once per
            // worker): the control socket tells of one instead.
            let params = sys::ucp_ep_params_t {
                err_mode: sys::UCP_ERR_HANDLING_MODE_NONE,
                ..params
            };
            let mut h = worker.lock();
            // SAFETY: as above.
            st = unsafe { sys::ucp_ep_create(h.worker, &params, &mut ep) };
            if st == sys::UCS_OK {
                h.peer_errors = false;
            }
        }
        if st != sys::UCS_OK {
            return Err(TransportError::PeerClosed {
                peer,
                how: format!(
                    "UCX could not reach it ({}); UCX_TLS and UCX_NET_DEVICES choose the transports",
                    status_text(st)
                ),
            });
        }
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| TransportError::io("creating an epoll set", e.into()))?;
        // SAFETY: the worker's event descriptor lives as long as the worker,
        // which this link keeps alive; the borrow ends with the call (epoll
        // keeps its own reference to the file).
        let efd = unsafe { BorrowedFd::borrow_raw(worker.efd) };
        let add = |fd: BorrowedFd<'_>, flags, what: &str| {
            epoll::add(
                &epoll,
                fd,
                epoll::EventData::new_u64(fd.as_raw_fd() as u64),
                flags,
            )
            .map_err(|e| TransportError::io(format!("watching {what}"), e.into()))
        };
        // SAFETY: timerfd_create has no memory arguments; a descriptor it
        // returns is owned by nobody else.
        let timer = unsafe {
            let fd = libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            );
            if fd < 0 {
                return Err(TransportError::io(
                    "creating a timer",
                    std::io::Error::last_os_error(),
                ));
            }
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        };
        add(efd, epoll::EventFlags::IN, "the UCP worker")?;
        add(timer.as_fd(), epoll::EventFlags::IN, "a timer")?;
        add(
            socket.fd(),
            epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
            "the control socket",
        )?;
        let description = format!("ucx (control {})", socket.describe());
        Ok(UcxLink {
            peer,
            shared: worker.clone(),
            ep,
            ep_error,
            socket,
            epoll,
            timer,
            send_id,
            recv_id,
            send_seq: 0,
            recv_seq: 0,
            tx: Tx {
                reqs: [Req::NONE; 2],
                buf: vec![0u8; HDR + INLINE].into_boxed_slice(),
                iov: Vec::new(),
                failed: None,
            },
            rx: Rx {
                req: Req::NONE,
                stage: Stage::Idle,
                seq: 0,
                buf: vec![0u8; HDR + INLINE].into_boxed_slice(),
                info: Box::default(),
                iov: Vec::new(),
            },
            dead: std::cell::Cell::new(None),
            peer_withdrew: std::cell::Cell::new(false),
            withdrawn: false,
            description,
            medium: Medium::UcxOther,
        })
    }

    /// The error of an endpoint that failed, or of a peer whose socket
    /// closed (after [`GRACE`]), or that withdrew.
    fn failure(&self) -> Option<TransportError> {
        let st = self.ep_error.0.load(Ordering::Acquire);
        if st != 0 {
            return Some(TransportError::PeerClosed {
                peer: self.peer,
                how: format!("UCX: {}", status_text(st)),
            });
        }
        if self.peer_withdrew.get() {
            return Some(TransportError::Withdrawn { peer: self.peer });
        }
        match self.dead.get() {
            Some(t) if t.elapsed() >= GRACE => Some(TransportError::PeerClosed {
                peer: self.peer,
                how: "its control socket closed (the process ended) while a UCX transfer was in flight"
                    .into(),
            }),
            _ => None,
        }
    }

    /// Clears the timer and sets it to fire in [`NAP`].
    fn set_timer(&self) {
        let mut expirations = [0u8; 8];
        let _ = rustix::io::read(&self.timer, &mut expirations);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: NAP.as_nanos() as libc::c_long,
            },
        };
        // SAFETY: the timer descriptor is the link's own; `spec` is a valid
        // itimerspec and the old value is not asked for.
        unsafe {
            libc::timerfd_settime(
                std::os::fd::AsRawFd::as_raw_fd(&self.timer),
                0,
                &spec,
                std::ptr::null_mut(),
            );
        }
    }

    /// Looks at the control socket without blocking: its end, or a
    /// withdrawal notice.
    fn check_socket(&self) {
        if self.dead.get().is_some() || self.peer_withdrew.get() {
            return;
        }
        let mut b = [0u8; 1];
        match rustix::net::recv(self.socket.fd(), &mut b, rustix::net::RecvFlags::DONTWAIT) {
            Ok((0, _)) => self.dead.set(Some(Instant::now())),
            Ok(_) => self.peer_withdrew.set(true),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
            Err(_) => self.dead.set(Some(Instant::now())),
        }
    }

    fn refuse_if_withdrawn(&self) -> Result<(), TransportError> {
        if self.withdrawn || self.ep.is_null() {
            return Err(TransportError::Protocol {
                peer: self.peer,
                reason: "a post on a UCX link this side withdrew (its call failed)".into(),
            });
        }
        Ok(())
    }

    /// Posts a tagged send of `count` items of `datatype` at `buf`
    /// (`bytes` in all), of memory `mem` when reached by address.
    #[allow(clippy::too_many_arguments)]
    fn send_one(
        &self,
        h: &Handles,
        buf: *const c_void,
        count: usize,
        datatype: sys::ucp_datatype_t,
        tag: u64,
        mem: Option<MemoryKind>,
        bytes: usize,
    ) -> Result<Req, sys::ucs_status_t> {
        let _ = h;
        let mut param = sys::ucp_request_param_t {
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_DATATYPE,
            datatype,
            ..Default::default()
        };
        if let Some(kind) = mem {
            param.op_attr_mask |= sys::UCP_OP_ATTR_FIELD_MEMORY_TYPE;
            param.memory_type = memory_type(kind);
        }
        if self.medium == Medium::UcxSharedMemory && bytes <= FAST_COMPLETION {
            param.op_attr_mask |= sys::UCP_OP_ATTR_FLAG_FAST_CMPL;
        }
        // SAFETY: the endpoint is live (not withdrawn) and the worker locked
        // (`h`); `buf` is memory that stays valid and untouched until the
        // request completes (see the module's safety notes).
        let p = unsafe { sys::ucp_tag_send_nbx(self.ep, buf, count, tag, &param) };
        match ptr_status(p) {
            Some(st) => Err(st),
            None => Ok(Req(p)),
        }
    }

    /// Whether `req` is done: `Ok(true)` (freed), `Ok(false)` pending, or
    /// its error (freed).
    fn poll_req(req: &mut Req) -> Result<bool, sys::ucs_status_t> {
        if req.is_none() {
            return Ok(true);
        }
        // SAFETY: a live request of this worker (locked by the caller).
        let st = unsafe { sys::ucp_request_check_status(req.0) };
        if st == sys::UCS_INPROGRESS {
            return Ok(false);
        }
        // SAFETY: completed; freed once, then forgotten.
        unsafe { sys::ucp_request_free(req.0) };
        *req = Req::NONE;
        if st == sys::UCS_OK { Ok(true) } else { Err(st) }
    }

    /// Progresses the worker until it has nothing more to do; whether it
    /// did anything.
    fn progress(h: &Handles) -> bool {
        let mut any = false;
        // SAFETY: the worker is live and locked (`h`).
        while unsafe { sys::ucp_worker_progress(h.worker) } != 0 {
            any = true;
        }
        any
    }

    fn send_failed(&self, st: sys::ucs_status_t) -> TransportError {
        if let Some(e) = self.failure() {
            return e;
        }
        TransportError::PeerClosed {
            peer: self.peer,
            how: format!("a UCX send to it failed: {}", status_text(st)),
        }
    }

    /// Posts a receive of the link's next frame's `which` message into
    /// `count` items of `datatype` at `buf`.
    fn recv_one(
        &mut self,
        h: &Handles,
        buf: *mut c_void,
        count: usize,
        datatype: sys::ucp_datatype_t,
        which: u64,
        mem: Option<MemoryKind>,
    ) -> Result<Option<usize>, TransportError> {
        let mut param = sys::ucp_request_param_t {
            // Always a request, tested with ucp_tag_recv_request_test: UCX
            // 1.13 does not fill `recv_info` when an I/O-vector receive
            // completes at once.
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_DATATYPE | sys::UCP_OP_ATTR_FLAG_NO_IMM_CMPL,
            datatype,
            ..Default::default()
        };
        if let Some(kind) = mem {
            param.op_attr_mask |= sys::UCP_OP_ATTR_FIELD_MEMORY_TYPE;
            param.memory_type = memory_type(kind);
        }
        let t = tag(which, self.recv_id, self.rx.seq);
        // SAFETY: the worker is live and locked (`h`); `buf` stays valid and
        // untouched until the request completes or is cancelled.
        let p = unsafe { sys::ucp_tag_recv_nbx(h.worker, buf, count, t, u64::MAX, &param) };
        if let Some(st) = ptr_status(p) {
            return Err(self.recv_failed(st));
        }
        if p.is_null() {
            return Err(TransportError::Protocol {
                peer: self.peer,
                reason: "UCX completed a receive at once although told not to".into(),
            });
        }
        self.rx.req = Req(p);
        self.test_rx()
    }

    fn recv_failed(&self, st: sys::ucs_status_t) -> TransportError {
        if let Some(e) = self.failure() {
            return e;
        }
        if st == sys::UCS_ERR_MESSAGE_TRUNCATED {
            return TransportError::Protocol {
                peer: self.peer,
                reason: format!(
                    "a UCX message longer than the receive posted for it: {}",
                    status_text(st)
                ),
            };
        }
        TransportError::PeerClosed {
            peer: self.peer,
            how: format!("a UCX receive from it failed: {}", status_text(st)),
        }
    }

    /// Tests the posted receive: the received length once done.
    fn test_rx(&mut self) -> Result<Option<usize>, TransportError> {
        if self.rx.req.is_none() {
            return Ok(None);
        }
        // SAFETY: a live receive request of this worker (locked by the
        // caller); the info is written only when it is complete.
        let st = unsafe { sys::ucp_tag_recv_request_test(self.rx.req.0, &mut *self.rx.info) };
        if st == sys::UCS_INPROGRESS {
            return Ok(None);
        }
        // SAFETY: completed; freed once, then forgotten.
        unsafe { sys::ucp_request_free(self.rx.req.0) };
        self.rx.req = Req::NONE;
        if st != sys::UCS_OK {
            return Err(self.recv_failed(st));
        }
        Ok(Some(self.rx.info.length))
    }

    /// Posts the receive of the payload (the frame's second message) into
    /// the caller's memory.
    fn post_second(
        &mut self,
        h: &Handles,
        m: &mut Incoming<'_>,
    ) -> Result<Option<usize>, TransportError> {
        let (pieces, mem) = pieces(m.buffers_mut(), self.peer)?;
        self.rx.stage = Stage::Second;
        match pieces.as_slice() {
            &[(p, n)] => self.recv_one(h, p as *mut c_void, n, contig(), SECOND, mem),
            _ => {
                self.rx.iov.clear();
                self.rx
                    .iov
                    .extend(pieces.iter().map(|&(p, n)| sys::ucp_dt_iov_t {
                        buffer: p as *mut c_void,
                        length: n,
                    }));
                let (p, n) = (self.rx.iov.as_mut_ptr(), self.rx.iov.len());
                self.recv_one(h, p.cast(), n, iov(), SECOND, mem)
            }
        }
    }

    /// The frame's first message came, `n` bytes: checks its header and
    /// takes its inline payload, or posts the payload's receive.
    fn first_done(
        &mut self,
        h: &Handles,
        m: &mut Incoming<'_>,
        n: usize,
    ) -> Result<Status, TransportError> {
        let peer = self.peer;
        if n < HDR {
            self.rx.stage = Stage::Idle;
            return Err(TransportError::Protocol {
                peer,
                reason: format!("a UCX frame of {n} bytes, shorter than a header"),
            });
        }
        let mut head = [0u8; HDR];
        head.copy_from_slice(&self.rx.buf[..HDR]);
        if let Err(e) = m.check_received(&head, HDR, peer) {
            self.rx.stage = Stage::Idle;
            return Err(e);
        }
        let len = m.len();
        if n > HDR || len == 0 {
            self.rx.stage = Stage::Idle;
            if len > 0 && m.buffers().iter().any(|p| p.device().is_some()) {
                return Err(TransportError::Protocol {
                    peer,
                    reason: format!(
                        "a frame of {len} bytes came inline, with its header, for memory reached \
                         by address (frames of at most {INLINE} bytes must be received into host \
                         memory)"
                    ),
                });
            }
            if n - HDR != len {
                return Err(TransportError::Protocol {
                    peer,
                    reason: format!(
                        "a UCX frame of {} payload bytes under a header that says {len}",
                        n - HDR
                    ),
                });
            }
            let mut from = &self.rx.buf[HDR..n];
            for p in m.buffers_mut() {
                if let Some(b) = p.bytes_mut() {
                    let (now, rest) = from.split_at(b.len().min(from.len()));
                    b[..now.len()].copy_from_slice(now);
                    from = rest;
                }
            }
            m.set_moved(HDR + len);
            return Ok(Status::Done);
        }
        // A header alone: the payload follows as a message of its own (a
        // frame larger than INLINE, or one sent from memory by address).
        match self.post_second(h, m)? {
            Some(got) => self.second_done(m, got),
            None => Ok(Status::Pending),
        }
    }

    fn second_done(&mut self, m: &mut Incoming<'_>, got: usize) -> Result<Status, TransportError> {
        self.rx.stage = Stage::Idle;
        if got != m.len() {
            return Err(TransportError::Protocol {
                peer: self.peer,
                reason: format!(
                    "a UCX payload of {got} bytes where {} were expected (tag {:x})",
                    m.len(),
                    self.rx.info.sender_tag
                ),
            });
        }
        m.set_moved(HDR + got);
        Ok(Status::Done)
    }

    /// Cancels the receive in flight and waits (boundedly) for it.
    fn cancel_rx(&mut self, h: &Handles) {
        if self.rx.req.is_none() {
            self.rx.stage = Stage::Idle;
            return;
        }
        // SAFETY: a live receive request of this locked worker.
        unsafe { sys::ucp_request_cancel(h.worker, self.rx.req.0) };
        let dead = self.dead.get().is_some() || self.ep_error.0.load(Ordering::Acquire) != 0;
        let until = Instant::now() + if dead { TEARDOWN_DEAD } else { TEARDOWN };
        loop {
            Self::progress(h);
            // SAFETY: as above.
            let st = unsafe { sys::ucp_request_check_status(self.rx.req.0) };
            if st != sys::UCS_INPROGRESS {
                // SAFETY: completed (cancelled); freed once.
                unsafe { sys::ucp_request_free(self.rx.req.0) };
                break;
            }
            if Instant::now() > until {
                // A receive already matched to a rendezvous cannot be
                // cancelled; it completes when its data has come. A live
                // peer sends it within the bound; a dead one never will, and
                // then nothing will write the caller's memory: the request
                // is left to UCX.
                if !dead {
                    tracing::error!(
                        "rank {}: a cancelled UCX receive did not complete in {TEARDOWN:?}",
                        self.peer
                    );
                }
                // SAFETY: UCX releases a request freed before it completes
                // when it does complete; it is not used here again.
                unsafe { sys::ucp_request_free(self.rx.req.0) };
                break;
            }
        }
        self.rx.req = Req::NONE;
        self.rx.stage = Stage::Idle;
    }

    /// Force-closes the endpoint (cancelling the sends on it) and waits
    /// (boundedly) for the close and for the sends.
    fn close_ep(&mut self, h: &Handles) {
        if self.ep.is_null() {
            return;
        }
        let param = sys::ucp_request_param_t {
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
            flags: sys::UCP_EP_CLOSE_FLAG_FORCE,
            ..Default::default()
        };
        // SAFETY: the endpoint is live and the worker locked; closed once.
        let mut close = unsafe { sys::ucp_ep_close_nbx(self.ep, &param) };
        self.ep = std::ptr::null_mut();
        if ptr_status(close).is_some() {
            close = std::ptr::null_mut();
        }
        let dead = self.dead.get().is_some() || self.ep_error.0.load(Ordering::Acquire) != 0;
        let until = Instant::now() + if dead { TEARDOWN_DEAD } else { TEARDOWN };
        loop {
            Self::progress(h);
            let mut pending = false;
            for r in &mut self.tx.reqs {
                pending |= matches!(Self::poll_req(r), Ok(false));
            }
            if !close.is_null() {
                // SAFETY: the close request is live until freed here, once.
                let st = unsafe { sys::ucp_request_check_status(close) };
                if st == sys::UCS_INPROGRESS {
                    pending = true;
                } else {
                    // SAFETY: as above.
                    unsafe { sys::ucp_request_free(close) };
                    close = std::ptr::null_mut();
                }
            }
            if !pending {
                break;
            }
            if Instant::now() > until {
                if !dead {
                    tracing::warn!(
                        "rank {}: closing a UCX endpoint did not complete in {TEARDOWN:?}",
                        self.peer
                    );
                }
                for r in self.tx.reqs.iter_mut().chain([&mut Req(close)]) {
                    if !r.is_none() {
                        // SAFETY: UCX releases a request freed before it
                        // completes when it does; none is used again.
                        unsafe { sys::ucp_request_free(r.0) };
                        *r = Req::NONE;
                    }
                }
                break;
            }
        }
    }
}

fn contig() -> sys::ucp_datatype_t {
    // ucp_dt_make_contig(1)
    (1 << sys::UCP_DATATYPE_SHIFT) as sys::ucp_datatype_t
        | sys::UCP_DATATYPE_CONTIG as sys::ucp_datatype_t
}

fn iov() -> sys::ucp_datatype_t {
    sys::UCP_DATATYPE_IOV as sys::ucp_datatype_t
}

impl Endpoint for UcxLink {
    fn peer(&self) -> usize {
        self.peer
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }

    fn arm(&self, _dir: Direction) -> Result<Option<Direction>, TransportError> {
        self.check_socket();
        if self.dead.get().is_some() || self.peer_withdrew.get() {
            return Ok(None);
        }
        if self.ep_error.0.load(Ordering::Acquire) != 0 {
            return Ok(None);
        }
        let h = self.shared.lock();
        // The worker's descriptor is an epoll set of UCX's transports. Its
        // ready list keeps a transport's descriptor until someone waits on
        // the set and finds it quiet again; nobody else does (UCX's own
        // `ucp_worker_wait` would), so a wait on it would wake at once
        // forever. Consume it, then progress whatever it announced. (UCX
        // 1.13's TCP transport still leaves one of its descriptors readable
        // at times, and a rank then polls instead of sleeping; shared
        // memory and verbs sleep.)
        // SAFETY: the descriptor lives as long as the worker, kept alive by
        // this link.
        let efd = unsafe { BorrowedFd::borrow_raw(self.shared.efd) };
        let mut events = [MaybeUninit::<epoll::Event>::uninit(); 16];
        let _ = epoll::wait(efd, &mut events[..], Some(&Timespec::default()));
        // What this progress moves may be what the caller waits for: a
        // rendezvous's data sent on the peer's request, a request completed.
        // Nothing would wake a sleep for that (the peer waits for this side
        // now), so the caller looks again instead of sleeping until the
        // timer: over UCX's TCP each such miss cost a whole nap, 4-5x of
        // the bandwidth from 4 MiB up.
        if Self::progress(&h) {
            return Ok(None);
        }
        // SAFETY: the worker is live and locked.
        let st = unsafe { sys::ucp_worker_arm(h.worker) };
        match st {
            sys::UCS_OK => {
                self.set_timer();
                Ok(Some(Direction::Read))
            }
            sys::UCS_ERR_BUSY => Ok(None),
            st => Err(ucx_err("arming the UCP worker", st)),
        }
    }

    fn withdraw(&mut self) {
        let busy = !self.rx.req.is_none() || self.tx.reqs.iter().any(|r| !r.is_none());
        if !busy {
            self.rx.stage = Stage::Idle;
            return;
        }
        let shared = self.shared.clone();
        let h = shared.lock();
        // A receive of a payload already under way (matched to a rendezvous)
        // cannot be cancelled: the endpoint it runs over is closed by force
        // first, which fails what UCX still has in flight on it, and the
        // receive is then waited for (boundedly, see `cancel_rx`).
        let matched = self.rx.stage == Stage::Second && !self.rx.req.is_none();
        let sending = self.tx.reqs.iter().any(|r| !r.is_none());
        if matched || sending {
            self.close_ep(&h);
        }
        self.cancel_rx(&h);
        if matched || sending {
            self.withdrawn = true;
            // Tell the peer, whose receive of the rest must fail now; the
            // socket may be gone already, which tells it as well.
            let _ = rustix::net::send(
                self.socket.fd(),
                b"W",
                rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
            );
        }
    }

    fn shutdown_handle(&self) -> Result<ShutdownHandle, TransportError> {
        self.socket.shutdown_handle()
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            by_address: self.shared.memory,
            by_address_over: INLINE,
            medium: self.medium,
            ..Capabilities::default()
        }
    }
}

impl MessageLink for UcxLink {
    fn post_send(&mut self, m: &mut Outgoing<'_>) -> Result<Status, TransportError> {
        m.check(self.peer)?;
        self.refuse_if_withdrawn()?;
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let seq = self.send_seq;
        self.send_seq = self.send_seq.wrapping_add(1);
        let len = m.len();
        let shared = self.shared.clone();
        let h = shared.lock();
        self.tx.failed = None;
        self.tx.buf[..HDR].copy_from_slice(m.header_bytes());
        let first = tag(FIRST, self.send_id, seq);
        let by_address = m.payload().iter().any(|p| p.device().is_some());
        let r = if len <= INLINE && !by_address {
            let mut at = HDR;
            for p in m.payload() {
                let b = p.bytes();
                self.tx.buf[at..at + b.len()].copy_from_slice(b);
                at += b.len();
            }
            self.send_one(
                &h,
                self.tx.buf.as_ptr().cast(),
                HDR + len,
                contig(),
                first,
                None,
                HDR + len,
            )
            .map(|r| [r, Req::NONE])
        } else {
            // The header, then the payload from the caller's memory
            // (memory by address always so: only UCX may read it).
            let (pieces, mem) = match pieces(m.payload_mut(), self.peer) {
                Ok(p) => p,
                Err(e) => {
                    drop(h);
                    return Err(e);
                }
            };
            self.send_one(
                &h,
                self.tx.buf.as_ptr().cast(),
                HDR,
                contig(),
                first,
                None,
                HDR,
            )
            .and_then(|a| {
                let second = tag(SECOND, self.send_id, seq);
                let b = match pieces.as_slice() {
                    &[(p, n)] => self.send_one(&h, p as *const c_void, n, contig(), second, mem, n),
                    _ => {
                        self.tx.iov.clear();
                        self.tx
                            .iov
                            .extend(pieces.iter().map(|&(p, n)| sys::ucp_dt_iov_t {
                                buffer: p as *mut c_void,
                                length: n,
                            }));
                        self.send_one(
                            &h,
                            self.tx.iov.as_ptr().cast(),
                            self.tx.iov.len(),
                            iov(),
                            second,
                            mem,
                            len,
                        )
                    }
                };
                match b {
                    Ok(b) => Ok([a, b]),
                    Err(st) => {
                        self.tx.reqs = [a, Req::NONE];
                        Err(st)
                    }
                }
            })
        };
        match r {
            Ok(reqs) => self.tx.reqs = reqs,
            Err(st) => {
                drop(h);
                return Err(self.send_failed(st));
            }
        }
        drop(h);
        self.test_send(m)
    }

    fn test_send(&mut self, m: &mut Outgoing<'_>) -> Result<Status, TransportError> {
        if self.tx.reqs.iter().all(|r| r.is_none()) {
            m.set_moved(HDR + m.len());
            return Ok(Status::Done);
        }
        let shared = self.shared.clone();
        let h = shared.lock();
        Self::progress(&h);
        let mut done = true;
        for r in &mut self.tx.reqs {
            match Self::poll_req(r) {
                Ok(d) => done &= d,
                Err(st) => {
                    self.tx.failed.get_or_insert(st);
                }
            }
        }
        drop(h);
        if let Some(st) = self.tx.failed {
            if self.tx.reqs.iter().all(|r| r.is_none()) {
                return Err(self.send_failed(st));
            }
            return Ok(Status::Pending);
        }
        if done {
            m.set_moved(HDR + m.len());
            return Ok(Status::Done);
        }
        if let Some(e) = self.failure() {
            return Err(e);
        }
        Ok(Status::Pending)
    }

    fn post_recv(&mut self, m: &mut Incoming<'_>) -> Result<Status, TransportError> {
        m.check(self.peer)?;
        self.refuse_if_withdrawn()?;
        self.rx.seq = self.recv_seq;
        self.recv_seq = self.recv_seq.wrapping_add(1);
        self.rx.stage = Stage::First;
        let shared = self.shared.clone();
        let h = shared.lock();
        let (p, n) = (self.rx.buf.as_mut_ptr(), self.rx.buf.len());
        let got = match self.recv_one(&h, p.cast(), n, contig(), FIRST, None) {
            Ok(g) => g,
            Err(e) => {
                self.rx.stage = Stage::Idle;
                return Err(e);
            }
        };
        match got {
            Some(n) => self.first_done(&h, m, n),
            None => {
                drop(h);
                self.test_recv(m)
            }
        }
    }

    fn test_recv(&mut self, m: &mut Incoming<'_>) -> Result<Status, TransportError> {
        let shared = self.shared.clone();
        let h = shared.lock();
        Self::progress(&h);
        let got = match self.test_rx() {
            Ok(g) => g,
            Err(e) => {
                self.rx.stage = Stage::Idle;
                return Err(e);
            }
        };
        match (self.rx.stage, got) {
            (Stage::First, Some(n)) => self.first_done(&h, m, n),
            (Stage::Second, Some(n)) => self.second_done(m, n),
            (Stage::Idle, _) => Ok(Status::Done),
            (_, None) => {
                drop(h);
                match self.failure() {
                    Some(e) => {
                        let shared = self.shared.clone();
                        let h = shared.lock();
                        self.cancel_rx(&h);
                        Err(e)
                    }
                    None => Ok(Status::Pending),
                }
            }
        }
    }
}

impl Drop for UcxLink {
    fn drop(&mut self) {
        let shared = self.shared.clone();
        let h = shared.lock();
        self.cancel_rx(&h);
        self.close_ep(&h);
    }
}

#[cfg(test)]
mod tests;
