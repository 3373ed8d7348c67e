#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use smallvec::smallvec;

use super::*;
use crate::DevMut;
use crate::wire::Tag;

fn header(step: u32, len: usize) -> FrameHeader {
    FrameHeader {
        tag: Tag {
            seq: 4,
            step,
            slice: 0,
        },
        len: len as u32,
        descriptor: [5; 16],
    }
}

/// Two links between two workers of this process (as ranks 0 and 1), made
/// over a socket pair by the same exchange as between processes.
fn pair() -> (UcxLink, UcxLink) {
    let (a, b) = UnixStream::pair().unwrap();
    let (a, b) = (
        StreamLink::unix(1, a).unwrap(),
        StreamLink::unix(0, b).unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let t = std::thread::spawn(move || {
        let w = worker().unwrap();
        upgrade(&w, vec![b], deadline).unwrap().pop().unwrap()
    });
    let w = worker().unwrap();
    let x = upgrade(&w, vec![a], deadline).unwrap().pop().unwrap();
    (x, t.join().unwrap())
}

/// Drives a send on `a` and a receive on `b` to completion.
fn drive(
    a: &mut (impl MessageLink + ?Sized),
    tx: &mut Outgoing<'_>,
    b: &mut (impl MessageLink + ?Sized),
    rx: &mut Incoming<'_>,
) -> Result<(), TransportError> {
    let mut s = a.post_send(tx)?;
    let mut r = b.post_recv(rx)?;
    let until = Instant::now() + Duration::from_secs(20);
    while s == Status::Pending || r == Status::Pending {
        assert!(Instant::now() < until, "no progress");
        if s == Status::Pending {
            s = a.test_send(tx)?;
        }
        if r == Status::Pending {
            r = b.test_recv(rx)?;
        }
    }
    Ok(())
}

#[test]
fn frames_of_every_size_arrive_whole_in_one_and_several_pieces() {
    let (mut a, mut b) = pair();
    for (step, &n) in [0usize, 1, 100, INLINE, INLINE + 1, 100_000, 3 << 20]
        .iter()
        .enumerate()
    {
        let data: Vec<u8> = (0..n).map(|i| (i * 7 + step) as u8).collect();
        let h = header(step as u32, n);
        let cut = n / 3;
        let (x, y) = data.split_at(cut);
        let mut got = vec![0xEEu8; n];
        let (p, q) = got.split_at_mut(n - cut);
        let mut tx = Outgoing::new(&h, smallvec![Lent::Shared(x), Lent::Shared(y)]);
        let mut rx = Incoming::new(h, smallvec![Lent::Exclusive(p), Lent::Exclusive(q)]);
        drive(&mut a, &mut tx, &mut b, &mut rx).unwrap();
        drop((tx, rx));
        assert!(got == data, "{n} bytes differ");
        // And back, in one piece each.
        let mut back = vec![0u8; n];
        let mut tx = Outgoing::new(&h, smallvec![Lent::Shared(&data)]);
        let mut rx = Incoming::new(h, smallvec![Lent::Exclusive(&mut back)]);
        drive(&mut b, &mut tx, &mut a, &mut rx).unwrap();
        drop((tx, rx));
        assert!(back == data, "{n} bytes back differ");
    }
}

#[test]
fn a_wrong_header_leaves_the_receivers_memory_untouched() {
    let (mut a, mut b) = pair();
    for n in [10, 1 << 20] {
        let data = vec![7u8; n];
        let mut out = vec![0u8; n];
        let mut tx = Outgoing::new(&header(5, n), smallvec![Lent::Shared(&data)]);
        let mut rx = Incoming::new(header(4, n), smallvec![Lent::Exclusive(&mut out)]);
        let r = drive(&mut a, &mut tx, &mut b, &mut rx);
        match r {
            Err(TransportError::Unexpected {
                peer: 0,
                expected,
                got,
            }) => {
                assert_eq!(expected.tag.step, 4);
                assert_eq!(got.tag.step, 5);
            }
            other => panic!("{other:?}"),
        }
        a.withdraw();
        b.withdraw();
        drop((tx, rx));
        assert!(
            out.iter().all(|&x| x == 0),
            "payload bytes reached the caller's memory"
        );
        // The links are spent for this direction (a frame is half read);
        // make new ones for the next size.
        (a, b) = pair();
    }
}

#[test]
fn a_dead_peer_fails_a_receive_in_flight_naming_it() {
    let (a, mut b) = pair();
    let mut out = [0u8; 8];
    let mut rx = Incoming::new(header(0, 8), smallvec![Lent::Exclusive(&mut out)]);
    assert_eq!(b.post_recv(&mut rx).unwrap(), Status::Pending);
    drop(a);
    let t0 = Instant::now();
    let err = loop {
        assert!(t0.elapsed() < Duration::from_secs(10), "no failure");
        crate::wait(Some(&b), None, Duration::from_millis(100)).unwrap();
        match b.test_recv(&mut rx) {
            Ok(Status::Pending) => continue,
            Ok(Status::Done) => panic!("a receive completed from nothing"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, TransportError::PeerClosed { peer: 0, .. }),
        "{err}"
    );
}

#[test]
fn a_sleeper_wakes_when_a_message_comes() {
    let (mut a, mut b) = pair();
    let mut out = [0u8; 4];
    let h = header(1, 4);
    let mut rx = Incoming::new(h, smallvec![Lent::Exclusive(&mut out)]);
    assert_eq!(b.post_recv(&mut rx).unwrap(), Status::Pending);
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let data = [1u8, 2, 3, 4];
        let mut tx = Outgoing::new(&h, smallvec![Lent::Shared(&data)]);
        let mut s = a.post_send(&mut tx).unwrap();
        while s == Status::Pending {
            s = a.test_send(&mut tx).unwrap();
        }
        drop(tx);
        a
    });
    let t0 = Instant::now();
    let mut woke = 0;
    loop {
        if b.test_recv(&mut rx).unwrap() == Status::Done {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never woke");
        crate::wait(Some(&b), None, Duration::from_secs(10)).unwrap();
        woke += 1;
    }
    let _a = sender.join().unwrap();
    drop(rx);
    assert_eq!(out, [1, 2, 3, 4]);
    // Over shared memory it sleeps (a handful of wake-ups); UCX 1.13's TCP
    // transport may leave the worker's descriptor readable, and then it
    // polls (see `arm`): what is asserted is that the wait ends with the
    // message.
    eprintln!("woke {woke} times before the message came");
}

/// Two ranks (threads) stream large frames both ways at once, each
/// sleeping on its links whenever nothing can move, as the engine does:
/// every wake-up must come from UCX, not from the link's timer (a missed
/// one costs [`NAP`] per frame). A link's arming progresses the worker, and
/// what that moves (over UCX's TCP: a rendezvous's data sent on the peer's
/// request, completing the send) used to be followed by a sleep until the
/// timer, since the peer then waits for this side: 0.8 s here instead of
/// 60 ms, and 4-5x of the allreduce bandwidth from 4 MiB up. 32 frames of 1 MiB each way take tens of
/// milliseconds over UCX's TCP; the bound is a quarter nap per frame.
#[test]
fn large_frames_both_ways_with_sleeps_take_no_naps() {
    const FRAMES: usize = 32;
    const LEN: usize = 1 << 20;
    fn rank(out_link: &mut UcxLink, in_link: &mut UcxLink, me: u8) -> Duration {
        let data: Vec<u8> = (0..LEN).map(|i| (i as u8) ^ me).collect();
        let mut got = vec![0u8; LEN];
        let until = Instant::now() + Duration::from_secs(60);
        let mut took = Duration::ZERO;
        for f in 0..FRAMES {
            let t0 = Instant::now();
            let h = header(f as u32, LEN);
            let mut tx = Outgoing::new(&h, smallvec![Lent::Shared(&data)]);
            let mut rx = Incoming::new(h, smallvec![Lent::Exclusive(&mut got)]);
            let mut r = in_link.post_recv(&mut rx).unwrap();
            let mut s = out_link.post_send(&mut tx).unwrap();
            while s == Status::Pending || r == Status::Pending {
                assert!(Instant::now() < until, "rank {me}: frame {f} stuck");
                if s == Status::Pending {
                    s = out_link.test_send(&mut tx).unwrap();
                }
                if r == Status::Pending {
                    r = in_link.test_recv(&mut rx).unwrap();
                }
                if s == Status::Pending || r == Status::Pending {
                    let read = (r == Status::Pending).then_some(&*in_link as &dyn Endpoint);
                    let write = (s == Status::Pending).then_some(&*out_link as &dyn Endpoint);
                    crate::wait(read, write, Duration::from_secs(10)).unwrap();
                }
            }
            took += t0.elapsed();
            drop((tx, rx));
            assert!(
                got.iter()
                    .enumerate()
                    .all(|(i, &x)| x == (i as u8) ^ (1 - me)),
                "rank {me}: frame {f} differs"
            );
        }
        took
    }
    // Rank 0's link to rank 1 and rank 1's from rank 0, and the reverse:
    // two links between the same two workers, as a ring of two has.
    let (a0, b0) = UnixStream::pair().unwrap();
    let (a1, b1) = UnixStream::pair().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let t = std::thread::spawn(move || {
        let w = worker().unwrap();
        let links = vec![
            StreamLink::unix(0, b0).unwrap(),
            StreamLink::unix(0, b1).unwrap(),
        ];
        let mut l = upgrade(&w, links, deadline).unwrap();
        let (mut from0, mut to0) = (l.remove(0), l.remove(0));
        rank(&mut to0, &mut from0, 1)
    });
    let w = worker().unwrap();
    let links = vec![
        StreamLink::unix(1, a0).unwrap(),
        StreamLink::unix(1, a1).unwrap(),
    ];
    let mut l = upgrade(&w, links, deadline).unwrap();
    let (mut to1, mut from1) = (l.remove(0), l.remove(0));
    let took0 = rank(&mut to1, &mut from1, 0);
    let took1 = t.join().unwrap();
    let took = took0.max(took1);
    eprintln!("{FRAMES} frames of {LEN} bytes each way: {took:?}");
    assert!(
        took < NAP * FRAMES as u32 / 4,
        "{FRAMES} frames each way took {took:?}: sleeps ended by the timer, not by UCX"
    );
}

#[test]
fn rdma_detection_answers() {
    // No adapter here; on a fabric host this is true. Either way it must
    // not fail or hang.
    let _ = rdma_available();
}

/// `auto`: UCX only between hosts that both have a worker (an RDMA
/// device); a link within a host, or to a host without one, stays the
/// stream it was, on both sides, and still carries bytes.
#[test]
fn auto_upgrades_only_links_between_hosts_that_both_have_rdma() {
    for (host_a, host_b, a_rdma, b_rdma, upgraded) in [
        (1u8, 2u8, true, true, true),
        (1, 1, true, true, false),
        (1, 2, true, false, false),
        (1, 2, false, false, false),
    ] {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (
            StreamLink::unix(1, a).unwrap(),
            StreamLink::unix(0, b).unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let t = std::thread::spawn(move || {
            let w = b_rdma.then(|| worker().unwrap());
            upgrade_remote_from([host_b; 32], w.as_ref(), vec![b], deadline)
                .unwrap()
                .pop()
                .unwrap()
        });
        let w = a_rdma.then(|| worker().unwrap());
        let x = upgrade_remote_from([host_a; 32], w.as_ref(), vec![a], deadline)
            .unwrap()
            .pop()
            .unwrap();
        let y = t.join().unwrap();
        let case = format!("hosts {host_a} {host_b}, rdma {a_rdma} {b_rdma}");
        assert_eq!(x.is_ok(), upgraded, "{case}");
        assert_eq!(y.is_ok(), upgraded, "{case}");
        let h = header(0, 3);
        let mut got = [0u8; 3];
        let mut tx = Outgoing::new(&h, smallvec![Lent::Shared(b"abc")]);
        let mut rx = Incoming::new(h, smallvec![Lent::Exclusive(&mut got)]);
        match (x, y) {
            (Ok(mut x), Ok(mut y)) => drive(&mut x, &mut tx, &mut y, &mut rx).unwrap(),
            (Err(mut x), Err(mut y)) => drive(&mut x, &mut tx, &mut y, &mut rx).unwrap(),
            _ => unreachable!("checked above"),
        }
        drop((tx, rx));
        assert_eq!(&got, b"abc", "{case}");
    }
}

/// `len` bytes of `buf` from `at`, as memory by address (host memory: what
/// the engine lends from a host-backed device buffer).
fn by_address(buf: &mut [u8], at: usize, len: usize) -> DevMut<'_> {
    let region = &mut buf[at..at + len];
    // SAFETY: the region borrows `buf` exclusively for its lifetime, and
    // nothing reads or writes `buf` meanwhile but the link.
    unsafe { DevMut::new(region.as_mut_ptr() as usize, len, MemoryKind::Host) }
}

#[test]
fn memory_by_address_goes_both_ways_at_every_size() {
    let (mut a, mut b) = pair();
    let caps = a.capabilities();
    assert!(caps.by_address.contains(MemoryKind::Host), "{caps:?}");
    assert_eq!(caps.by_address_over, INLINE);
    // Sizes that UCX would send inline (a frame by address still goes as a
    // header and its payload), at the threshold, eager, and rendezvous.
    for (step, &n) in [1usize, 100, INLINE, INLINE + 1, 100_000, 3 << 20]
        .iter()
        .enumerate()
    {
        let mut data: Vec<u8> = (0..n).map(|i| (i * 13 + step) as u8).collect();
        let want = data.clone();
        let mut got = vec![0xEEu8; n + 2];
        let h = header(step as u32, n);
        {
            let src = by_address(&mut data, 0, n);
            let dst = by_address(&mut got, 1, n);
            let mut tx = Outgoing::new(&h, smallvec![Lent::Device(src.as_ref())]);
            let mut rx = Incoming::new(h, smallvec![Lent::DeviceMut(dst)]);
            drive(&mut a, &mut tx, &mut b, &mut rx).unwrap();
        }
        assert!(got[1..=n] == want[..], "{n} bytes differ");
        assert_eq!((got[0], got[n + 1]), (0xEE, 0xEE), "{n}: written outside");
        // Host memory one side, memory by address the other: the same wire.
        if n > INLINE {
            let mut back = vec![0u8; n];
            {
                let dst = by_address(&mut back, 0, n);
                let mut tx = Outgoing::new(&h, smallvec![Lent::Shared(&want)]);
                let mut rx = Incoming::new(h, smallvec![Lent::DeviceMut(dst)]);
                drive(&mut b, &mut tx, &mut a, &mut rx).unwrap();
            }
            assert!(back == want, "{n} bytes back differ");
        }
    }
}

#[test]
fn an_inline_frame_for_memory_by_address_is_refused() {
    let (mut a, mut b) = pair();
    let data = [3u8; 64];
    let mut out = [0u8; 64];
    let h = header(0, 64);
    let r = {
        let dst = by_address(&mut out, 0, 64);
        let mut tx = Outgoing::new(&h, smallvec![Lent::Shared(&data)]);
        let mut rx = Incoming::new(h, smallvec![Lent::DeviceMut(dst)]);
        drive(&mut a, &mut tx, &mut b, &mut rx)
    };
    match r {
        Err(TransportError::Protocol { reason, .. }) => {
            assert!(reason.contains("inline"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(out.iter().all(|&x| x == 0), "bytes reached the memory");
}

#[test]
fn stream_links_refuse_memory_by_address() {
    let (x, y) = UnixStream::pair().unwrap();
    let mut s = StreamLink::unix(1, x).unwrap();
    let _keep = y;
    let mut buf = [0u8; 16];
    let h = header(0, 16);
    let src = by_address(&mut buf, 0, 16);
    let mut tx = Outgoing::new(&h, smallvec![Lent::Device(src.as_ref())]);
    match s.post_send(&mut tx) {
        Err(TransportError::Protocol { reason, .. }) => {
            assert!(reason.contains("by address"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(s.capabilities().by_address.is_empty());
}

#[test]
fn a_link_knows_the_transport_ucx_chose() {
    let (a, _b) = pair();
    let info = a.endpoint_info();
    let am = am_transport(&info).unwrap_or_else(|| panic!("no am lane in:\n{info}"));
    let tls = std::env::var("UCX_TLS").unwrap_or_default();
    println!("UCX_TLS={tls}: eager messages over {am}; {}", a.describe());
    assert!(a.describe().ends_with(&format!("over {am}")));
    let shm = ["sysv/", "posix/", "xpmem/"]
        .iter()
        .any(|t| am.starts_with(t));
    let medium = a.capabilities().medium;
    assert_eq!(medium == Medium::UcxSharedMemory, shm, "{am}: {medium:?}");
    if tls == "tcp" {
        assert!(am.starts_with("tcp/"), "{am}");
        assert_eq!(medium, Medium::UcxSocket);
    }
    if tls == "sm" {
        assert!(shm, "{am}");
    }
}

#[test]
fn the_am_transport_is_read_from_the_report() {
    let sm = "#   lane[0]:  0:sysv/memory.0 md[0]  -> md[0]/sysv/sysdev[255] am am_bw#0\n\
              #   lane[1]:  2:cma/memory.0 md[2]   -> md[2]/cma/sysdev[255] rma_bw#0\n";
    assert_eq!(am_transport(sm).as_deref(), Some("sysv/memory"));
    let rc = "#   lane[0]:  1:rc_mlx5/mlx5_0:1.0 md[1] -> md[1]/ib/sysdev[0] rma_bw#0\n\
              #   lane[1]:  3:ud_mlx5/mlx5_0:1.0 md[1] -> md[1]/ib/sysdev[0] am am_bw#0 wireup\n";
    assert_eq!(am_transport(rc).as_deref(), Some("ud_mlx5/mlx5_0:1"));
    assert_eq!(am_transport("# nothing\n"), None);
    assert_eq!(medium("sysv/memory"), Medium::UcxSharedMemory);
    assert_eq!(medium("posix/memory"), Medium::UcxSharedMemory);
    assert_eq!(medium("tcp/lo"), Medium::UcxSocket);
    assert_eq!(medium("ud_mlx5/mlx5_0:1"), Medium::UcxOther);
}
