//! One link's throughput and round-trip latency by message size, over an
//! in-process socket pair (`inproc::ring(2)`) and over loopback TCP
//! (`tcp::Listener` + `connect_start` with the handshake).
//!
//! A peer thread serves requests: `T` + length: read that many bytes, answer
//! one byte (throughput); `E` + length + count: echo that many messages of
//! that length (latency).

// criterion_group! and criterion_main! generate undocumented items.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used)]

use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use oxccl_transport::tcp::{Listener, TcpOptions, connect_start, hello};
use oxccl_transport::{Link, TransportError, inproc, wait};

/// The two directions of one end: `tx` sends, `rx` receives (the same link for TCP).
struct End {
    tx: Box<dyn Link>,
    rx: Option<Box<dyn Link>>,
}

impl End {
    fn send(&mut self, mut buf: &[u8]) -> Result<(), TransportError> {
        while !buf.is_empty() {
            let n = self.tx.try_write(&[IoSlice::new(buf)])?;
            if n == 0 {
                wait(None, Some(self.tx.as_ref()), Duration::from_secs(10))?;
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    fn recv(&mut self, mut buf: &mut [u8]) -> Result<(), TransportError> {
        let rx: &mut dyn Link = match &mut self.rx {
            Some(rx) => rx.as_mut(),
            None => self.tx.as_mut(),
        };
        while !buf.is_empty() {
            let n = rx.try_read(&mut [IoSliceMut::new(buf)])?;
            if n == 0 {
                wait(Some(&*rx), None, Duration::from_secs(10))?;
            }
            buf = &mut buf[n..];
        }
        Ok(())
    }
}

/// Serves requests until the other end closes.
fn serve(mut end: End) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut req = [0u8; 17];
        while end.recv(&mut req).is_ok() {
            let len = u64::from_le_bytes(req[1..9].try_into().unwrap()) as usize;
            let count = u64::from_le_bytes(req[9..17].try_into().unwrap());
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let ok = match req[0] {
                b'T' => {
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(buf.len());
                        if end.recv(&mut buf[..n]).is_err() {
                            return;
                        }
                        left -= n;
                    }
                    end.send(&[1])
                }
                _ => (0..count).try_for_each(|_| {
                    end.recv(&mut buf[..len])?;
                    end.send(&buf[..len])
                }),
            };
            if ok.is_err() {
                return;
            }
        }
    })
}

fn request(kind: u8, len: usize, count: u64) -> [u8; 17] {
    let mut r = [0u8; 17];
    r[0] = kind;
    r[1..9].copy_from_slice(&(len as u64).to_le_bytes());
    r[9..17].copy_from_slice(&count.to_le_bytes());
    r
}

/// An in-process socket pair: rank 0's end and rank 1's (served) end.
fn inproc_pair() -> (End, End) {
    let mut links = inproc::ring(2).unwrap();
    let one = links.pop().unwrap().unwrap();
    let zero = links.pop().unwrap().unwrap();
    (
        End {
            tx: Box::new(zero.next),
            rx: Some(Box::new(zero.prev)),
        },
        End {
            tx: Box::new(one.next),
            rx: Some(Box::new(one.prev)),
        },
    )
}

/// A loopback TCP connection, made with the handshake ranks use.
fn tcp_pair() -> (End, End) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let listener = Listener::bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
    let h = hello(0xBE4C, 2, 0, 1, 0);
    let pending = connect_start(
        listener.local_addr(),
        h,
        None,
        TcpOptions::default(),
        deadline,
    )
    .unwrap();
    let (accepted, _) = listener
        .accept_peer(h, None, TcpOptions::default(), deadline)
        .unwrap();
    let connected = pending.finish(deadline).unwrap();
    (
        End {
            tx: Box::new(connected),
            rx: None,
        },
        End {
            tx: Box::new(accepted),
            rx: None,
        },
    )
}

const THROUGHPUT_SIZES: [usize; 5] = [64, 4 << 10, 64 << 10, 1 << 20, 16 << 20];
const LATENCY_SIZES: [usize; 4] = [8, 4 << 10, 64 << 10, 1 << 20];

fn bench_link(c: &mut Criterion, name: &str, pair: fn() -> (End, End)) {
    let (mut end, peer) = pair();
    let server = serve(peer);
    let mut group = c.benchmark_group(format!("link/{name}/throughput"));
    for size in THROUGHPUT_SIZES {
        let msg = vec![7u8; size];
        let mut ack = [0u8; 1];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                end.send(&request(b'T', size * iters as usize, 0)).unwrap();
                for _ in 0..iters {
                    end.send(&msg).unwrap();
                }
                end.recv(&mut ack).unwrap();
                start.elapsed()
            })
        });
    }
    group.finish();
    let mut group = c.benchmark_group(format!("link/{name}/round_trip"));
    for size in LATENCY_SIZES {
        let msg = vec![7u8; size];
        let mut back = vec![0u8; size];
        group.throughput(Throughput::Bytes(2 * size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter_custom(|iters| {
                end.send(&request(b'E', size, iters)).unwrap();
                let start = Instant::now();
                for _ in 0..iters {
                    end.send(&msg).unwrap();
                    end.recv(&mut back).unwrap();
                }
                start.elapsed()
            })
        });
    }
    group.finish();
    drop(end);
    server.join().unwrap();
}

fn links(c: &mut Criterion) {
    bench_link(c, "inproc", inproc_pair);
    bench_link(c, "tcp", tcp_pair);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = links
}
criterion_main!(benches);
