//! Failures: mismatched calls, timeouts, aborts, bad arguments and stray
//! connections. Each asserts the error text and that it arrives quickly.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxccl::{Communicator, Config, ErrorKind, ReduceOp, SingleCopy, Transport, run_in_process};
use oxccl_transport::store::{MemStore, Store};
use oxccl_transport::tcp::{self, TcpOptions};

fn quick(timeout_ms: u64) -> Config {
    Config {
        timeout: Duration::from_millis(timeout_ms),
        slice_bytes: 256,
        ..Config::default()
    }
}

/// [`quick`] over shared memory, then over TCP.
fn on_each_transport(timeout_ms: u64) -> [(Transport, Config); 2] {
    [Transport::Shm, Transport::Tcp].map(|transport| {
        (
            transport,
            Config {
                transport,
                ..quick(timeout_ms)
            },
        )
    })
}

#[test]
fn mismatched_collective_is_an_error_naming_both_calls_on_every_rank() {
    let t0 = Instant::now();
    let errors = run_in_process(4, quick(20_000), |comm| {
        let mut buf = vec![1.0f32; 1000];
        let first = if comm.rank() == 1 {
            let mut out = vec![0f32; 4000];
            comm.all_gather(&buf, &mut out)
        } else {
            comm.all_reduce_in_place(&mut buf, ReduceOp::Sum)
        };
        let e = first.unwrap_err();
        // Poisoned: the next call fails at once with the original cause.
        let again = comm.barrier().unwrap_err();
        (
            e.to_string(),
            e.kind(),
            again.kind(),
            again.cause_kind(),
            again.to_string(),
        )
    })
    .unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    for (rank, (msg, kind, again, cause, again_msg)) in errors.into_iter().enumerate() {
        assert!(
            msg.contains("all_gather #0") && msg.contains("all_reduce #0"),
            "rank {rank}: {msg}"
        );
        assert!(
            msg.starts_with(&format!("rank {rank}: ")),
            "rank {rank}: {msg}"
        );
        assert!(
            matches!(kind, ErrorKind::InvalidUsage | ErrorKind::Remote),
            "rank {rank}: {kind:?}"
        );
        assert_eq!(again, ErrorKind::Aborted);
        assert_eq!(cause, kind);
        assert!(
            again_msg.contains("all_gather #0"),
            "rank {rank}: {again_msg}"
        );
    }
}

#[test]
fn differing_counts_are_an_error_on_every_rank() {
    let errors = run_in_process(3, quick(20_000), |comm| {
        let n = if comm.rank() == 2 { 100 } else { 99 };
        let mut buf = vec![1i64; n];
        comm.all_reduce_in_place(&mut buf, ReduceOp::Sum)
            .unwrap_err()
            .to_string()
    })
    .unwrap();
    for (rank, msg) in errors.iter().enumerate() {
        assert!(
            msg.contains("100 elements") && msg.contains("99 elements"),
            "rank {rank}: {msg}"
        );
    }
}

#[test]
fn a_rank_that_never_calls_times_out_naming_it() {
    let t0 = Instant::now();
    let out = run_in_process(3, quick(500), |comm| {
        if comm.rank() == 2 {
            std::thread::sleep(Duration::from_millis(1500));
            return None;
        }
        let mut buf = vec![0u32; 64];
        let e = comm
            .all_reduce_in_place(&mut buf, ReduceOp::Sum)
            .unwrap_err();
        Some((e.kind(), e.to_string(), t0.elapsed()))
    })
    .unwrap();
    let (kind0, msg0, at0) = out[0].clone().unwrap();
    assert_eq!(kind0, ErrorKind::Timeout, "{msg0}");
    assert!(
        msg0.contains("data from rank 2") && msg0.contains("OXCCL_TIMEOUT"),
        "{msg0}"
    );
    assert!(at0 < Duration::from_millis(1400), "{at0:?}");
    // Rank 1 waits on rank 0, which is waiting on rank 2. Whichever times
    // out first, rank 1 names rank 2: it learns rank 0's cause (through rank
    // 0's closed links, or from the store during the grace it gives rank 0
    // after timing out itself).
    let (kind1, msg1, at1) = out[1].clone().unwrap();
    assert_eq!(kind1, ErrorKind::Remote, "{msg1}");
    assert!(msg1.contains("data from rank 2"), "{msg1}");
    assert!(at1 < Duration::from_millis(1400), "{at1:?}");
}

#[test]
fn a_late_rank_learns_that_its_neighbour_timed_out_on_both_transports() {
    // Rank 0 gives up before rank 1 calls; the bytes rank 0 sent before
    // timing out are still in flight. Rank 1 must not complete with them: it
    // fails naming rank 0 and its cause, so that no rank reports success for
    // a call another rank reported failed.
    for (transport, cfg) in on_each_transport(300) {
        let out = run_in_process(2, cfg, |comm| {
            let mut x = [1.0f32];
            if comm.rank() == 1 {
                std::thread::sleep(Duration::from_millis(900));
            }
            let e = comm.all_reduce_in_place(&mut x, ReduceOp::Sum).unwrap_err();
            (e.kind(), e.to_string())
        })
        .unwrap();
        let (kind0, msg0) = &out[0];
        assert_eq!(*kind0, ErrorKind::Timeout, "{transport:?}: {msg0}");
        let (kind1, msg1) = &out[1];
        assert_eq!(*kind1, ErrorKind::Remote, "{transport:?}: {msg1}");
        assert!(
            msg1.contains("rank 0") && msg1.contains("OXCCL_TIMEOUT"),
            "{transport:?}: {msg1}"
        );
    }
}

#[test]
fn a_late_rank_completes_the_call_its_neighbours_completed_before_failing() {
    // Reduce to rank 2 along the chain 0 -> 1 -> 2: rank 1 finishes as soon
    // as its partial sums are sent, then fails (an abort) while the root,
    // late, has not read them yet. The root must still complete that reduce
    // with the right sum, as the other ranks did, and fail only the next
    // call. Over shared memory an abort discards the bytes of the call in
    // progress, never those of calls already completed.
    for (transport, cfg) in on_each_transport(5_000) {
        let out = run_in_process(3, cfg, |comm| {
            let mut x = [comm.rank() as u32 + 7; 16];
            if comm.rank() == 2 {
                std::thread::sleep(Duration::from_millis(300));
            }
            let first = comm.reduce_in_place(&mut x, ReduceOp::Sum, 2);
            if comm.rank() == 1 {
                comm.abort_handle().abort();
            }
            let second = comm.barrier().map_err(|e| e.kind());
            (first.map(|()| x).map_err(|e| e.to_string()), second)
        })
        .unwrap();
        for (rank, (first, second)) in out.into_iter().enumerate() {
            let want = if rank == 2 {
                7 + 8 + 9
            } else {
                rank as u32 + 7
            };
            assert_eq!(first, Ok([want; 16]), "{transport:?}: rank {rank}");
            assert!(second.is_err(), "{transport:?}: rank {rank}: {second:?}");
        }
    }
}

#[test]
fn a_rank_waiting_on_its_previous_rank_notices_its_next_rank_leave() {
    // Rank 1 has sent its first frame to rank 2 and waits for rank 0, which
    // is alive but late. Rank 2 then goes away. Rank 1 still owes rank 2 a
    // frame, so it must notice at once, naming rank 2, and not sit out its
    // timeout waiting on rank 0.
    for (transport, cfg) in on_each_transport(10_000) {
        let t0 = Instant::now();
        let out = run_in_process(3, cfg, |comm| {
            let mut buf = vec![1u32; 4];
            match comm.rank() {
                // Leaves (its communicator is dropped) without calling.
                2 => {
                    std::thread::sleep(Duration::from_millis(300));
                    None
                }
                1 => {
                    let e = comm
                        .all_reduce_in_place(&mut buf, ReduceOp::Sum)
                        .unwrap_err();
                    Some((e.to_string(), t0.elapsed()))
                }
                _ => {
                    std::thread::sleep(Duration::from_millis(2500));
                    let _ = comm.all_reduce_in_place(&mut buf, ReduceOp::Sum);
                    None
                }
            }
        })
        .unwrap();
        let (msg, at) = out[1].clone().unwrap();
        assert!(
            msg.contains("rank 2") && msg.contains("closed"),
            "{transport:?}: {msg}"
        );
        assert!(
            at < Duration::from_millis(2000),
            "{transport:?}: {at:?}: {msg}"
        );
    }
}

#[test]
fn abort_handle_stops_a_blocked_collective() {
    let out = run_in_process(2, quick(30_000), |comm| {
        if comm.rank() == 1 {
            // Never joins; its communicator is dropped, closing its links, only
            // after rank 0 has been aborted.
            std::thread::sleep(Duration::from_millis(800));
            return None;
        }
        let h = comm.abort_handle();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            h.abort();
        });
        let t0 = Instant::now();
        let e = comm.barrier().unwrap_err();
        t.join().unwrap();
        Some((e.to_string(), t0.elapsed()))
    })
    .unwrap();
    let (msg, took) = out[0].clone().unwrap();
    assert!(msg.contains("aborted by the application"), "{msg}");
    assert!(took < Duration::from_millis(700), "{took:?}");
}

#[test]
fn bad_arguments_are_refused_without_communicating() {
    let out = run_in_process(2, quick(5_000), |comm| {
        let mut small = vec![0f32; 3];
        let e1 = comm
            .all_reduce(&[1.0f32; 4], &mut small, ReduceOp::Sum)
            .unwrap_err();
        let e2 = comm.broadcast_in_place(&mut small, 5).unwrap_err();
        let e3 = comm.all_gather_in_place(&mut small).unwrap_err();
        // Nothing was sent: the communicator still works.
        let mut ok = vec![1u8; 5];
        comm.all_reduce_in_place(&mut ok, ReduceOp::Sum).unwrap();
        (
            e1.kind(),
            e1.to_string(),
            e2.to_string(),
            e3.to_string(),
            ok,
        )
    })
    .unwrap();
    for (k, m1, m2, m3, ok) in out {
        assert_eq!(k, ErrorKind::InvalidArgument);
        assert!(m1.contains("output has 12 bytes, expected 16"), "{m1}");
        assert!(m2.contains("root 5 is not below the world size 2"), "{m2}");
        assert!(m3.contains("does not divide by the world size"), "{m3}");
        assert_eq!(ok, vec![2u8; 5]);
    }
}

#[test]
fn stray_connections_are_refused_and_the_job_completes() {
    let store = Arc::new(MemStore::new());
    let cfg = Config {
        timeout: Duration::from_secs(20),
        ..Config::default()
    };
    let start = |rank: usize| {
        let (store, cfg) = (store.clone(), cfg.clone());
        std::thread::spawn(move || {
            let mut c = Communicator::with_store(store, rank, 3, cfg).unwrap();
            let mut v = vec![rank as i32 + 1; 10_000];
            c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
            (v, c.stats().refused_connections)
        })
    };
    // Ranks 0 and 1 start and publish their addresses; rank 0 then waits for rank 2.
    let r0 = start(0);
    let r1 = start(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    // The keys of store-based groups: the job id, then each rank's address.
    let job = store.get("oxccl/job", deadline).unwrap();
    let job_id = u64::from_le_bytes(job.as_slice().try_into().unwrap());
    let addr_key = format!("oxccl/{job_id:x}/addr/0");
    let addr: SocketAddr = String::from_utf8(store.get(&addr_key, deadline).unwrap())
        .unwrap()
        .parse()
        .unwrap();
    // Garbage, a silent connection, and an oxccl peer of another job.
    let mut garbage = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(
        &mut garbage,
        b"GET / HTTP/1.0\r\n\r\n and more bytes than a hello",
    )
    .unwrap();
    let _silent = std::net::TcpStream::connect(addr).unwrap();
    let other = tcp::connect_start(
        addr,
        tcp::hello(job_id ^ 1, 3, 2, 0, 1),
        None,
        TcpOptions::default(),
        deadline,
    )
    .unwrap();
    // Now the real rank 2; rank 0 accepts once every rank has registered,
    // the strays first.
    let r2 = start(2);
    let refusal = other.finish(deadline).unwrap_err().to_string();
    assert!(refusal.contains("another job"), "{refusal}");
    let results: Vec<_> = [r0, r1, r2]
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for (v, _) in &results {
        assert!(v.iter().all(|x| *x == 6));
    }
    assert!(
        results[0].1 >= 2,
        "rank 0 refused {} connections",
        results[0].1
    );
}

/// A frame whose header does not match the call is refused before any of
/// its bytes reach the caller's buffer: after a mismatched allgather, the
/// peer's part of the output still holds what the caller put there. Small
/// frames (received through staging) and large ones (header first, then in
/// place), over both transports.
#[test]
fn a_mismatched_frame_never_reaches_the_callers_buffer() {
    const SENTINEL: u32 = 0xDEAD_BEEF;
    for (n, slice) in [(100usize, 256usize), (100_000, 64 << 10)] {
        for (transport, config) in on_each_transport(20_000) {
            let config = Config {
                slice_bytes: slice,
                ..config
            };
            let outputs = run_in_process(2, config, |comm| {
                let count = if comm.rank() == 0 { n } else { n + 1 };
                let input = vec![comm.rank() as u32 + 1; count];
                let mut output = vec![SENTINEL; 2 * count];
                let e = comm.all_gather(&input, &mut output).unwrap_err();
                assert!(e.to_string().contains("mismatch"), "{e}");
                (count, output)
            })
            .unwrap();
            for (rank, (count, output)) in outputs.into_iter().enumerate() {
                let peer = 1 - rank;
                let theirs = &output[peer * count..(peer + 1) * count];
                let touched = theirs.iter().filter(|v| **v != SENTINEL).count();
                assert_eq!(
                    touched, 0,
                    "{transport:?}, {n} elements: rank {rank} got {touched} elements of the mismatched frame"
                );
            }
        }
    }
}

/// Whether this machine lets a shared-memory reader copy straight from the
/// writer's memory (some sandboxes forbid `process_vm_readv`): a write over
/// the threshold is then posted, and reported written only once copied.
fn single_copy_here() -> bool {
    let (mut a, _b) = oxccl_transport::shm::pair(0, 1, 0).unwrap();
    a.set_single_copy(Some(1));
    oxccl_transport::Link::try_write(&mut a, &[std::io::IoSlice::new(&[0u8; 64])]).unwrap() == 0
}

/// "Device" memory on the host whose writes may panic, as a driver bug would.
#[derive(Debug)]
struct HostDevice {
    data: Vec<u8>,
    panics_on_write: bool,
}

impl oxccl::DeviceMemory for HostDevice {
    fn backend(&self) -> &'static str {
        "host"
    }
    fn len_bytes(&self) -> usize {
        self.data.len()
    }
    fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), oxccl_kernels::KernelError> {
        dst.copy_from_slice(&self.data[offset..offset + dst.len()]);
        Ok(())
    }
    fn write(&mut self, offset: usize, src: &[u8]) -> Result<(), oxccl_kernels::KernelError> {
        assert!(!self.panics_on_write, "a device fault");
        self.data[offset..offset + src.len()].copy_from_slice(src);
        Ok(())
    }
    fn reduce_from_host(
        &mut self,
        _: oxccl::DType,
        _: ReduceOp,
        _: usize,
        _: &[u8],
    ) -> Result<(), oxccl_kernels::KernelError> {
        unreachable!("a broadcast reduces nothing")
    }
    fn finish_avg(
        &mut self,
        _: oxccl::DType,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<(), oxccl_kernels::KernelError> {
        unreachable!("a broadcast averages nothing")
    }
}

#[test]
fn a_sender_that_panics_mid_call_fails_its_reader_instead_of_feeding_it_freed_bytes() {
    // Over shared memory with single copies, the root of a broadcast posts
    // its one frame's payload (staged from its device buffer) for rank 1 to
    // copy, then panics (its device's write of the deferred local copy)
    // before rank 1 has called. The panic is caught, as the C API does: the
    // staging buffer is gone, its memory reused, and no failure handling
    // ran, so the link is still up. Rank 1 then calls: it must fail naming
    // rank 0, not complete with what the freed buffer holds now.
    if !single_copy_here() {
        eprintln!(
            "skipping: no single copy on this machine (process_vm_readv refused); \
             nothing is posted"
        );
        return;
    }
    let config = Config {
        transport: Transport::Shm,
        shm_single_copy: SingleCopy::From(64),
        slice_bytes: 4096,
        timeout: Duration::from_secs(2),
        ..Config::default()
    };
    let mut comms = Communicator::in_process(2, config).unwrap();
    const COUNT: usize = 256;
    let d = oxccl::Descriptor {
        kind: oxccl::Kind::Broadcast,
        dtype: oxccl::DType::F32,
        op: ReduceOp::Sum,
        root: 0,
        count: COUNT,
    };
    let sent: Vec<f32> = (0..COUNT).map(|i| i as f32 + 0.5).collect();
    let input = HostDevice {
        data: bytemuck::cast_slice(&sent).to_vec(),
        panics_on_write: false,
    };
    let mut output = HostDevice {
        data: vec![0; COUNT * 4],
        panics_on_write: true,
    };
    let root = &mut comms[0];
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        root.run_device(d, Some(&input), &mut output)
    }));
    assert!(caught.is_err(), "the device did not panic: {caught:?}");
    // The freed staging buffer's memory goes to the next allocations.
    let reused: Vec<Vec<u8>> = (0..8).map(|_| vec![0xEE; COUNT * 4]).collect();
    let t0 = Instant::now();
    const SENTINEL: f32 = -1.0;
    let mut got = vec![SENTINEL; COUNT];
    let r = comms[1].broadcast_in_place(&mut got, 0);
    let took = t0.elapsed();
    drop(reused);
    match r {
        Err(e) => {
            let msg = e.to_string();
            assert_eq!(e.kind(), ErrorKind::Remote, "{msg}");
            assert!(
                msg.contains("rank 0") && msg.contains("withdrew a transfer"),
                "{msg}"
            );
            assert!(took < Duration::from_secs(5), "{took:?}");
        }
        Ok(()) => {
            let wrong = got.iter().zip(&sent).filter(|(g, s)| g != s).count();
            panic!(
                "rank 1 completed a call rank 0 abandoned, with {wrong} of {COUNT} elements wrong"
            );
        }
    }
    assert!(
        got.iter().all(|&x| x == SENTINEL),
        "bytes of the abandoned call reached rank 1's buffer"
    );
    // The root's next call finds the call that unwound and fails: the
    // communicator is poisoned, never run on links out of step.
    let mut again = vec![0f32; 4];
    let e = comms[0].broadcast_in_place(&mut again, 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Aborted, "{e}");
    assert_eq!(e.cause_kind(), ErrorKind::Internal, "{e}");
    assert!(
        e.to_string()
            .contains("call #0 did not return (it panicked)"),
        "{e}"
    );
}

/// The origin a failure message names: its first "rank N failed", else the
/// rank its own timeout waited on.
fn origin_named(msg: &str) -> Option<usize> {
    let after = |pat: &str, end: &str| {
        msg.match_indices(pat).find_map(|(i, _)| {
            let rest = &msg[i + pat.len()..];
            let n = rest.bytes().take_while(u8::is_ascii_digit).count();
            (n > 0 && rest[n..].starts_with(end)).then(|| rest[..n].parse().ok())?
        })
    };
    after("rank ", " failed")
        .or_else(|| after("data from rank ", ""))
        .or_else(|| after("rank ", " to take data"))
}

#[test]
fn every_rank_names_a_stuck_rank_as_the_origin_however_far_round_the_ring() {
    // Rank 2 never calls. Rank 3 waits on it, rank 0 on rank 3, rank 1 on
    // rank 0 (or on rank 2, to take data): every one of them times out, and
    // every one follows the reports of whom each waited on to rank 2.
    for (transport, config) in on_each_transport(500) {
        let t0 = Instant::now();
        let out = run_in_process(4, config, |comm| {
            if comm.rank() == 2 {
                std::thread::sleep(Duration::from_millis(2500));
                return None;
            }
            let mut buf = vec![0u32; 4096];
            let e = comm
                .all_reduce_in_place(&mut buf, ReduceOp::Sum)
                .unwrap_err();
            Some((e.to_string(), t0.elapsed()))
        })
        .unwrap();
        for (rank, o) in out.into_iter().enumerate() {
            let Some((msg, at)) = o else { continue };
            assert_eq!(
                origin_named(&msg),
                Some(2),
                "{transport:?} rank {rank}: {msg}"
            );
            // The timeout, then the grace (half of it) following the waits.
            assert!(
                at < Duration::from_millis(2000),
                "{transport:?} rank {rank}: {at:?}"
            );
        }
    }
}
