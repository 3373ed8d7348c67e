//! The link abstraction: one nonblocking, ordered byte stream to one peer.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use oxccl_memory::MemoryKinds;
use rustix::event::{PollFd, PollFlags, Timespec};
use smallvec::SmallVec;

use crate::TransportError;
use crate::message::MessageLink;

/// What every link is, whatever it carries: a connection to one peer that
/// the caller can sleep on, take a posted send back from, and shut down.
///
/// [`MessageLink`] (what the engine drives) and [`Link`] (a byte stream,
/// which frames messages on top) both build on it.
pub trait Endpoint: Send + fmt::Debug {
    /// The peer's rank.
    fn peer(&self) -> usize;

    /// The descriptor to wait on.
    fn fd(&self) -> BorrowedFd<'_>;

    /// Prepares to sleep until the link can move bytes in `dir`.
    ///
    /// Returns the readiness to poll [`fd`](Self::fd) for, or `None` when the
    /// link can already move bytes (or has an error to report), in which case
    /// the caller must not sleep. Socket links simply poll their socket;
    /// shared-memory links announce that they sleep and poll their doorbell.
    /// Every `arm` is followed by a [`disarm`](Self::disarm) of the same direction.
    fn arm(&self, dir: Direction) -> Result<Option<Direction>, TransportError> {
        Ok(Some(dir))
    }

    /// Ends a wait begun by [`arm`](Self::arm).
    fn disarm(&self, _dir: Direction) {}

    /// What the link can do beyond moving bytes.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Marks every byte written so far as part of a completed collective.
    ///
    /// A shut-down link fails both sides at once, but a reader still gets the
    /// committed bytes first: a neighbour that completed a call and then
    /// failed the next must not take the completed call down with it. Shared
    /// memory discards the uncommitted rest (the abandoned call); a stream
    /// socket delivers every byte written before its end anyway, so this does
    /// nothing there.
    fn commit(&mut self) {}

    /// Takes back the operations in flight, so that the caller may free
    /// or reuse the memory of a send or receive not yet reported done: a
    /// send the peer may still be reading from the caller's memory (shared
    /// memory's single copy), a receive an adapter may still write (RDMA).
    ///
    /// Called when the caller abandons its call mid-message (an error, a
    /// panic), before it lets go of its memory, and without shutting the
    /// link down: whoever handles the failure may still have to report it
    /// before the links close. After it the link carries no more bytes this
    /// way: the peer fails its read of the rest, and this side fails its
    /// next write. Stream sockets copy the bytes out as they write them and
    /// never hold the caller's memory, so this does nothing there; shared
    /// memory takes back a posted single-copy transfer
    /// ([`TransportError::Withdrawn`] on the reader), and does nothing when
    /// none is posted. It must not panic: it runs while a panic unwinds.
    fn withdraw(&mut self) {}

    /// A handle that can shut the link down from another thread, waking any waiter.
    fn shutdown_handle(&self) -> Result<ShutdownHandle, TransportError>;

    /// "tcp 127.0.0.1:5000 -> 127.0.0.1:6000", "in-process", ...
    fn describe(&self) -> String;
}

/// What a link can do beyond moving bytes or messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Testing an operation that cannot progress costs about a memory load
    /// (shared memory), not a system call (sockets): a busy-polling caller
    /// may test after every pause.
    pub cheap_polling: bool,
    /// Memory must be registered ([`MessageLink::register`]) before a send
    /// or receive is posted from or into it (RDMA). Byte streams copy
    /// through the kernel or a ring and need no registration.
    pub registration: bool,
    /// Kinds of memory the link moves by address ([`Lent::Device`],
    /// [`Lent::DeviceMut`]): UCX hands device pointers to its own copy and
    /// RDMA paths. Empty for byte streams, which read and write host bytes
    /// themselves and refuse memory by address.
    ///
    /// [`Lent::Device`]: crate::Lent::Device
    /// [`Lent::DeviceMut`]: crate::Lent::DeviceMut
    pub by_address: MemoryKinds,
    /// Frames of at most this many payload bytes go best through host
    /// memory (UCX copies them with their header into one message), and a
    /// receive of one into memory by address fails if its sender sent it
    /// so: callers stage such frames on the host, on both sides alike.
    pub by_address_over: usize,
    /// What carries the link's messages, as far as their cost goes: the
    /// collectives choose their algorithms' cost model from it.
    pub medium: Medium,
}

/// What carries a link's messages, as far as their cost goes.
///
/// A byte stream through the kernel and a ring in shared memory copy every
/// frame through a bounded pipe, so a frame to a new partner costs more per
/// byte than a stream to one neighbour. UCX moves frames over its inline
/// size by rendezvous: one handshake per frame (about 21 µs over its TCP
/// transport here, next to 4 µs for an eager message), then one copy of the
/// whole frame (over shared memory, a single `process_vm_readv`), whoever
/// the partner is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Medium {
    /// A socket stream through the kernel (TCP), or not known.
    #[default]
    Socket,
    /// This project's rings in memory shared by the processes of one host.
    SharedMemory,
    /// UCX over its shared-memory transports (`sysv`, `posix`, `xpmem`;
    /// large frames by CMA or xpmem).
    UcxSharedMemory,
    /// UCX over its TCP transport.
    UcxSocket,
    /// UCX over any other transport (InfiniBand and RoCE verbs, ...).
    UcxOther,
}

/// One ordered, reliable byte stream to one peer, used without blocking.
///
/// `try_write` and `try_read` never block: they return `Ok(0)` when the
/// stream cannot take or give bytes now. A closed or reset stream is
/// [`TransportError::PeerClosed`]. Callers wait for readiness with [`wait`].
/// Every byte stream is a [`MessageLink`], framing each message on the
/// stream.
pub trait Link: MessageLink {
    /// Writes some bytes from `bufs` (in order), returning how many; `Ok(0)` if the stream is full.
    fn try_write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, TransportError>;

    /// Reads some bytes into `bufs` (in order), returning how many; `Ok(0)` if none are available.
    fn try_read(&mut self, bufs: &mut [IoSliceMut<'_>]) -> Result<usize, TransportError>;

    /// Whether the following writes may go by single copy, where the stream
    /// offers it (shared memory: the reader copies large buffers straight
    /// from the writer's memory). Set by the framing from each message's
    /// [`Outgoing::set_single_copy`](crate::message::Outgoing::set_single_copy).
    fn allow_single_copy(&mut self, _allowed: bool) {}

    /// Whether each of the following writes ends a record, where the stream
    /// has them (TCP's `MSG_EOR`: the segment that carries the write's end
    /// is neither held back to merge with later bytes nor merged with
    /// them). Set by the framing for each message
    /// ([`RECORD_MIN`](crate::message::RECORD_MIN)).
    fn set_record_ends(&mut self, _on: bool) {}
}

/// A borrowed link is a link: a caller may lend its links to a driver and
/// look at them again afterwards.
impl<L: Endpoint + ?Sized> Endpoint for &mut L {
    fn peer(&self) -> usize {
        (**self).peer()
    }
    fn fd(&self) -> BorrowedFd<'_> {
        (**self).fd()
    }
    fn arm(&self, dir: Direction) -> Result<Option<Direction>, TransportError> {
        (**self).arm(dir)
    }
    fn disarm(&self, dir: Direction) {
        (**self).disarm(dir)
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn commit(&mut self) {
        (**self).commit()
    }
    fn withdraw(&mut self) {
        (**self).withdraw()
    }
    fn shutdown_handle(&self) -> Result<ShutdownHandle, TransportError> {
        (**self).shutdown_handle()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

impl<L: Link + ?Sized> Link for &mut L {
    fn try_write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, TransportError> {
        (**self).try_write(bufs)
    }
    fn try_read(&mut self, bufs: &mut [IoSliceMut<'_>]) -> Result<usize, TransportError> {
        (**self).try_read(bufs)
    }
    fn allow_single_copy(&mut self, allowed: bool) {
        (**self).allow_single_copy(allowed)
    }
    fn set_record_ends(&mut self, on: bool) {
        (**self).set_record_ends(on)
    }
}

/// A direction of a link's traffic, from this side's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Bytes coming in.
    Read,
    /// Bytes going out.
    Write,
}

/// The socket types a [`StreamLink`] can carry.
#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A [`Link`] over a stream socket (TCP or a Unix socket pair).
#[derive(Debug)]
pub struct StreamLink {
    peer: usize,
    stream: Stream,
    description: String,
    /// Writes end TCP records ([`Link::set_record_ends`]).
    record_ends: bool,
}

impl StreamLink {
    /// Wraps a connected TCP stream (switching it to nonblocking mode).
    pub fn tcp(peer: usize, stream: TcpStream) -> Result<StreamLink, TransportError> {
        stream.set_nonblocking(true).map_err(|e| {
            TransportError::io(format!("making the link to rank {peer} nonblocking"), e)
        })?;
        let description = match (stream.local_addr(), stream.peer_addr()) {
            (Ok(l), Ok(p)) => format!("tcp {l} -> {p}"),
            _ => "tcp".to_string(),
        };
        Ok(StreamLink {
            peer,
            stream: Stream::Tcp(stream),
            description,
            record_ends: true,
        })
    }

    /// Wraps one end of a Unix socket pair (switching it to nonblocking mode).
    pub fn unix(peer: usize, stream: UnixStream) -> Result<StreamLink, TransportError> {
        stream.set_nonblocking(true).map_err(|e| {
            TransportError::io(format!("making the link to rank {peer} nonblocking"), e)
        })?;
        Ok(StreamLink {
            peer,
            stream: Stream::Unix(stream),
            description: "in-process socket pair".to_string(),
            record_ends: true,
        })
    }

    fn classify(&self, dir: &str, e: io::Error) -> Result<usize, TransportError> {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected => Err(TransportError::PeerClosed {
                peer: self.peer,
                how: format!("{e} while {dir}"),
            }),
            _ => Err(TransportError::io(
                format!("{dir} (rank {} over {})", self.peer, self.description),
                e,
            )),
        }
    }
}

impl Endpoint for StreamLink {
    fn peer(&self) -> usize {
        self.peer
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match &self.stream {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }

    fn shutdown_handle(&self) -> Result<ShutdownHandle, TransportError> {
        let what = || format!("duplicating the link to rank {}", self.peer);
        let stream = match &self.stream {
            Stream::Tcp(s) => {
                Stream::Tcp(s.try_clone().map_err(|e| TransportError::io(what(), e))?)
            }
            Stream::Unix(s) => {
                Stream::Unix(s.try_clone().map_err(|e| TransportError::io(what(), e))?)
            }
        };
        Ok(ShutdownHandle {
            stream,
            before: None,
        })
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

impl Link for StreamLink {
    fn try_write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, TransportError> {
        // sendmsg with MSG_NOSIGNAL: a peer that died is an EPIPE error here,
        // never a SIGPIPE that kills a host process which did not ignore it
        // (C programs do not).
        //
        // Over TCP, MSG_EOR where the framing asks for it (frames of at
        // least one 64 KiB GSO packet): the message layer writes the rest of
        // one frame per call, and a segment marked as a record's end is
        // never autocorked. Without it, Linux holds back a frame's short
        // tail (a 64 KiB slice's last few hundred bytes, past one 64 KiB GSO
        // packet) until the packets before it have left the host, and a
        // rate-limited queue holds those for a millisecond: recursive
        // doubling of 64 KiB on 8 rate-limited hosts took 3-4 times its
        // model (benches/RESULTS.md, scale study). Smaller frames go
        // without: a record end also keeps later writes out of its
        // segment, so a sender that flow control holds back would queue
        // one segment per small frame, each sent later from the receiver's
        // own system calls as they open the window (a 4 KiB gather on 4
        // ranks took 72 µs so, 2.7 without).
        let flags = match self.stream {
            Stream::Tcp(_) if self.record_ends => {
                rustix::net::SendFlags::NOSIGNAL | rustix::net::SendFlags::EOR
            }
            _ => rustix::net::SendFlags::NOSIGNAL,
        };
        let r = rustix::net::sendmsg(
            self.fd(),
            bufs,
            &mut rustix::net::SendAncillaryBuffer::default(),
            flags,
        )
        .map_err(std::io::Error::from);
        match r {
            Ok(n) => Ok(n),
            Err(e) => self.classify("sending", e),
        }
    }

    fn set_record_ends(&mut self, on: bool) {
        self.record_ends = on;
    }

    fn try_read(&mut self, bufs: &mut [IoSliceMut<'_>]) -> Result<usize, TransportError> {
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        let r = match &mut self.stream {
            Stream::Tcp(s) => s.read_vectored(bufs),
            Stream::Unix(s) => s.read_vectored(bufs),
        };
        match r {
            Ok(0) if want > 0 => Err(TransportError::PeerClosed {
                peer: self.peer,
                how: "end of stream".into(),
            }),
            Ok(n) => Ok(n),
            Err(e) => self.classify("receiving", e),
        }
    }
}

/// Shuts a link down from any thread: both directions, so that the peer sees
/// the end of the stream at once and a local waiter wakes up.
pub struct ShutdownHandle {
    stream: Stream,
    /// Runs before the socket is shut: links that carry their bytes elsewhere
    /// (shared memory) mark themselves dead there first.
    before: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("stream", &self.stream)
            .field("before", &self.before.is_some())
            .finish()
    }
}

impl ShutdownHandle {
    /// A handle on a Unix socket of the caller's.
    pub(crate) fn unix(stream: UnixStream) -> ShutdownHandle {
        ShutdownHandle {
            stream: Stream::Unix(stream),
            before: None,
        }
    }

    /// The same handle, running `hook` before shutting the socket down.
    pub(crate) fn with_hook(mut self, hook: Arc<dyn Fn() + Send + Sync>) -> ShutdownHandle {
        self.before = Some(hook);
        self
    }

    /// Shuts both directions down. Errors (already closed) are ignored.
    pub fn shutdown(&self) {
        if let Some(hook) = &self.before {
            hook();
        }
        let _ = match &self.stream {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

/// The longest [`wait_watching`] pauses when given nothing to wait on.
const IDLE_PAUSE: Duration = Duration::from_millis(1);

/// What [`wait`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Readiness {
    /// The link waited on for reading has bytes (or an error/hang-up) to report.
    pub readable: bool,
    /// The link waited on for writing has room (or an error/hang-up) to report.
    pub writable: bool,
    /// The link watched for a hang-up ([`wait_watching`]) was closed or reset
    /// by its peer.
    pub hung_up: bool,
}

/// Waits until `read` is readable or `write` is writable, or `timeout` passes.
///
/// Either may be `None`. Hang-ups and errors count as ready, so that the next
/// `try_read`/`try_write` reports them. Returns an empty [`Readiness`] on timeout.
pub fn wait(
    read: Option<&dyn Endpoint>,
    write: Option<&dyn Endpoint>,
    timeout: Duration,
) -> Result<Readiness, TransportError> {
    wait_watching(read, write, None, timeout)
}

/// [`wait`], also returning as soon as the peer of `watch` closes or resets
/// it ([`Readiness::hung_up`]).
///
/// A rank waiting for data from its previous rank still owes frames to its
/// next one; watching that link means a dead next rank is noticed at once,
/// from its own socket, instead of later and second-hand (for instance
/// through the previous rank giving up on the same failure).
///
/// With no link to wait on (all three `None`), it returns an empty
/// [`Readiness`] after a pause of at most a millisecond, whatever `timeout`.
pub fn wait_watching(
    read: Option<&dyn Endpoint>,
    write: Option<&dyn Endpoint>,
    watch: Option<&dyn Endpoint>,
    timeout: Duration,
) -> Result<Readiness, TransportError> {
    // On the stack: a rank that sleeps between frames comes here per frame.
    let mut fds: SmallVec<[PollFd<'_>; 3]> = SmallVec::new();
    let mut read_idx = None;
    let mut write_idx = None;
    let mut watch_idx = None;
    let mut ready = Readiness::default();
    let mut armed: SmallVec<[(&dyn Endpoint, Direction); 2]> = SmallVec::new();
    let arm = |l: &dyn Endpoint, dir: Direction| -> Result<Option<PollFlags>, TransportError> {
        Ok(l.arm(dir)?.map(|d| match d {
            Direction::Read => PollFlags::IN,
            Direction::Write => PollFlags::OUT,
        }))
    };
    let result = (|| {
        if let Some(l) = read {
            armed.push((l, Direction::Read));
            match arm(l, Direction::Read)? {
                None => ready.readable = true,
                Some(flags) => {
                    read_idx = Some(fds.len());
                    fds.push(PollFd::from_borrowed_fd(l.fd(), flags));
                }
            }
        }
        if let Some(l) = write {
            armed.push((l, Direction::Write));
            match arm(l, Direction::Write)? {
                None => ready.writable = true,
                Some(flags) => {
                    write_idx = Some(fds.len());
                    fds.push(PollFd::from_borrowed_fd(l.fd(), flags));
                }
            }
        }
        if ready.readable || ready.writable {
            return Ok(ready);
        }
        if let Some(l) = watch {
            // Only the peer's close or reset: the bytes (or doorbells) that
            // may arrive on this socket are not what we wait for.
            watch_idx = Some(fds.len());
            fds.push(PollFd::from_borrowed_fd(l.fd(), PollFlags::RDHUP));
        }
        if fds.is_empty() {
            // Nothing can end this wait early, and the timeout may be
            // minutes: a caller that loops until its own deadline must
            // neither sleep through it in one go nor spin.
            std::thread::sleep(timeout.min(IDLE_PAUSE));
            return Ok(ready);
        }
        let ts = Timespec::try_from(timeout).unwrap_or(Timespec {
            tv_sec: i64::MAX / 2,
            tv_nsec: 0,
        });
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(ready),
            Err(e) => return Err(TransportError::io("waiting for links", e.into())),
        }
        let fired = |i: Option<usize>| i.is_some_and(|i| !fds[i].revents().is_empty());
        Ok(Readiness {
            readable: fired(read_idx),
            writable: fired(write_idx),
            hung_up: fired(watch_idx),
        })
    })();
    for (l, dir) in armed {
        l.disarm(dir);
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pair() -> (StreamLink, StreamLink) {
        let (a, b) = UnixStream::pair().unwrap();
        (
            StreamLink::unix(1, a).unwrap(),
            StreamLink::unix(0, b).unwrap(),
        )
    }

    #[test]
    fn bytes_flow_and_would_block_is_zero() {
        let (mut a, mut b) = pair();
        let mut buf = [0u8; 8];
        assert_eq!(b.try_read(&mut [IoSliceMut::new(&mut buf)]).unwrap(), 0);
        let n = a
            .try_write(&[IoSlice::new(b"abc"), IoSlice::new(b"def")])
            .unwrap();
        assert_eq!(n, 6);
        let r = wait(Some(&b), None, Duration::from_secs(5)).unwrap();
        assert!(r.readable);
        let n = b.try_read(&mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(&buf[..n], b"abcdef");
    }

    #[test]
    fn closed_peer_is_reported_with_its_rank() {
        let (a, mut b) = pair();
        drop(a);
        let mut buf = [0u8; 4];
        match b.try_read(&mut [IoSliceMut::new(&mut buf)]) {
            Err(TransportError::PeerClosed { peer: 0, .. }) => {}
            other => panic!("expected PeerClosed from rank 0, got {other:?}"),
        }
    }

    #[test]
    fn shutdown_handle_wakes_a_waiter() {
        let (a, b) = pair();
        let h = b.shutdown_handle().unwrap();
        let t = std::thread::spawn(move || {
            let r = wait(Some(&b), None, Duration::from_secs(10)).unwrap();
            (r, b)
        });
        std::thread::sleep(Duration::from_millis(50));
        h.shutdown();
        let (r, _b) = t.join().unwrap();
        assert!(r.readable);
        drop(a);
    }

    #[test]
    fn a_watched_link_wakes_the_waiter_when_its_peer_goes_but_not_for_bytes() {
        // `b` waits to read from `prev` while watching `next`, whose other
        // end is `c`.
        let (_prev_peer, prev) = pair();
        let (mut c, next) = pair();
        // Bytes on the watched link are not a hang-up.
        assert_eq!(c.try_write(&[IoSlice::new(b"noise")]).unwrap(), 5);
        let r = wait_watching(Some(&prev), None, Some(&next), Duration::from_millis(30)).unwrap();
        assert_eq!(r, Readiness::default());
        // Its peer's end going away is, at once.
        let t = std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            let r = wait_watching(Some(&prev), None, Some(&next), Duration::from_secs(10));
            (r.unwrap(), t0.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        drop(c);
        let (r, waited) = t.join().unwrap();
        assert!(r.hung_up && !r.readable && !r.writable, "{r:?}");
        assert!(waited < Duration::from_secs(5), "woke after {waited:?}");
    }

    /// Runs `f` on a thread; `None` if it did not return within `limit`
    /// (the thread is left behind).
    fn within<T: Send + 'static>(
        limit: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit).ok()
    }

    #[test]
    fn nothing_to_wait_on_returns_promptly_whatever_the_timeout() {
        for timeout in [Duration::from_secs(300), Duration::MAX] {
            let r = within(Duration::from_secs(5), move || {
                let t0 = std::time::Instant::now();
                (
                    wait_watching(None, None, None, timeout).unwrap(),
                    t0.elapsed(),
                )
            });
            let (r, waited) = r.unwrap_or_else(|| panic!("still waiting after 5 s ({timeout:?})"));
            assert_eq!(r, Readiness::default());
            assert!(waited < Duration::from_millis(500), "waited {waited:?}");
        }
    }

    #[test]
    fn huge_timeouts_wait_until_ready_without_overflow() {
        for timeout in [
            Duration::MAX,
            Duration::from_secs(i64::MAX as u64),
            Duration::from_secs(i64::MAX as u64 / 2 + 1),
            Duration::new(u64::MAX / 3, 999_999_999),
        ] {
            let (mut a, b) = pair();
            let writer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                a.try_write(&[IoSlice::new(b"x")]).unwrap();
                a
            });
            let r = within(Duration::from_secs(5), move || {
                wait_watching(Some(&b), None, Some(&b), timeout).map(|r| (r, b))
            });
            let _a = writer.join().unwrap();
            let r = r.unwrap_or_else(|| panic!("still waiting after 5 s ({timeout:?})"));
            let (r, _b) = r.unwrap_or_else(|e| panic!("{timeout:?}: {e}"));
            assert!(r.readable, "{timeout:?}: {r:?}");
        }
    }

    #[test]
    fn wait_times_out() {
        let (_a, b) = pair();
        let t0 = std::time::Instant::now();
        let r = wait(Some(&b), None, Duration::from_millis(30)).unwrap();
        assert_eq!(r, Readiness::default());
        assert!(t0.elapsed() >= Duration::from_millis(25));
    }
}
