//! The one socket option oxccl sets that neither `socket2` nor `rustix`
//! offers: `TCP_NOTSENT_LOWAT`.
//!
//! # Safety
//!
//! `setsockopt` reads `optlen` bytes at `optval`: here a `c_int` on the
//! stack, alive for the call, with its exact size. The descriptor is
//! borrowed for the call, so it is open; a descriptor that is not a TCP
//! socket makes the call fail with an error, never touch other memory.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Caps the bytes a TCP socket keeps queued unsent in the kernel
/// (`TCP_NOTSENT_LOWAT`): a write takes about this much beyond what is in
/// flight, and the socket is writable again once the unsent bytes fall
/// below it. Byte values above `i32::MAX` are clamped.
pub(crate) fn set_tcp_notsent_lowat(sock: impl AsFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: see the module's note: `value` outlives the call and `optlen`
    // is its size; the descriptor is borrowed, hence open.
    let r = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The socket's `TCP_NOTSENT_LOWAT` (0: unset, the system's default).
#[cfg(test)]
pub(crate) fn tcp_notsent_lowat(sock: impl AsFd) -> io::Result<usize> {
    let mut got: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `got` and `len` outlive the call; `len` is `got`'s size.
    let r = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&raw mut got).cast(),
            &raw mut len,
        )
    };
    if r == 0 {
        Ok(usize::try_from(got).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_option_is_set_on_a_tcp_socket_and_refused_elsewhere() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert_eq!(tcp_notsent_lowat(&s).unwrap(), 0);
        set_tcp_notsent_lowat(&s, 128 << 10).unwrap();
        assert_eq!(tcp_notsent_lowat(&s).unwrap(), 128 << 10);
        // Not a TCP socket: an error, not a crash.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(set_tcp_notsent_lowat(&a, 4096).is_err());
    }
}
