#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use smallvec::smallvec;

use super::*;
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
    a: &mut UcxLink,
    tx: &mut Outgoing<'_>,
    b: &mut UcxLink,
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
            (Err(mut x), Err(mut y)) => {
                let until = Instant::now() + Duration::from_secs(10);
                let mut s = x.post_send(&mut tx).unwrap();
                let mut r = y.post_recv(&mut rx).unwrap();
                while s == Status::Pending || r == Status::Pending {
                    assert!(Instant::now() < until, "{case}: no progress");
                    if s == Status::Pending {
                        s = x.test_send(&mut tx).unwrap();
                    }
                    if r == Status::Pending {
                        r = y.test_recv(&mut rx).unwrap();
                    }
                }
            }
            _ => unreachable!("checked above"),
        }
        drop((tx, rx));
        assert_eq!(&got, b"abc", "{case}");
    }
}
