//! Calls that disagree, over the UCX link (feature `ucx`): ranks as
//! threads, each with its own UCP context and worker, linked through a
//! store as processes are. UCX's transports are what `UCX_TLS` says (CI
//! runs this with `tcp` and with `sm`).

#![cfg(feature = "ucx")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use oxccl::{Communicator, Config, ErrorKind, ReduceOp, Transport};
use oxccl_transport::store::MemStore;

/// Runs `f` on `n` ranks linked over UCX, one thread each.
fn over_ucx<T: Send>(
    n: usize,
    config: Config,
    f: impl Fn(&mut Communicator) -> T + Sync,
) -> Vec<T> {
    let store = Arc::new(MemStore::new());
    let config = Config {
        transport: Transport::Ucx,
        ..config
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let (store, config, f) = (store.clone(), config.clone(), &f);
                s.spawn(move || {
                    let mut c = Communicator::with_store(store, rank, n, config).unwrap();
                    f(&mut c)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn quick() -> Config {
    Config {
        timeout: Duration::from_secs(20),
        slice_bytes: 4096,
        ..Config::default()
    }
}

#[test]
fn collectives_over_ucx_in_threads_agree_with_the_sum() {
    for n in [2, 3] {
        let sums = over_ucx(n, quick(), |comm| {
            let mut v: Vec<i64> = (0..100_000).map(|i| i + comm.rank() as i64).collect();
            comm.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
            v
        });
        let tri = (n * (n - 1) / 2) as i64;
        for v in sums {
            assert!(
                v.iter()
                    .enumerate()
                    .all(|(i, x)| *x == n as i64 * i as i64 + tri)
            );
        }
    }
}

#[test]
fn a_mismatched_collective_over_ucx_is_an_error_naming_both_calls_on_every_rank() {
    let t0 = Instant::now();
    let errors = over_ucx(4, quick(), |comm| {
        let mut buf = vec![1.0f32; 1000];
        let first = if comm.rank() == 1 {
            let mut out = vec![0f32; 4000];
            comm.all_gather(&buf, &mut out)
        } else {
            comm.all_reduce_in_place(&mut buf, ReduceOp::Sum)
        };
        let e = first.unwrap_err();
        let again = comm.barrier().unwrap_err();
        (e.to_string(), e.kind(), again.kind())
    });
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t0.elapsed()
    );
    for (rank, (msg, kind, again)) in errors.into_iter().enumerate() {
        assert!(
            msg.contains("all_gather #0") && msg.contains("all_reduce #0"),
            "rank {rank}: {msg}"
        );
        assert!(
            matches!(kind, ErrorKind::InvalidUsage | ErrorKind::Remote),
            "rank {rank}: {kind:?}"
        );
        assert_eq!(again, ErrorKind::Aborted);
    }
}

/// A frame whose header does not match is refused before any of its bytes
/// reach the caller's buffer: small frames (one message with the header)
/// and large ones (header first, the payload's receive posted only after).
#[test]
fn a_mismatched_frame_over_ucx_never_reaches_the_callers_buffer() {
    const SENTINEL: u32 = 0xDEAD_BEEF;
    for (n, slice) in [(100usize, 256usize), (100_000, 64 << 10)] {
        let config = Config {
            slice_bytes: slice,
            ..quick()
        };
        let outputs = over_ucx(2, config, |comm| {
            let count = if comm.rank() == 0 { n } else { n + 1 };
            let input = vec![comm.rank() as u32 + 1; count];
            let mut output = vec![SENTINEL; 2 * count];
            let e = comm.all_gather(&input, &mut output).unwrap_err();
            assert!(e.to_string().contains("mismatch"), "{e}");
            (count, output)
        });
        for (rank, (count, output)) in outputs.into_iter().enumerate() {
            let peer = 1 - rank;
            let theirs = &output[peer * count..(peer + 1) * count];
            let touched = theirs.iter().filter(|v| **v != SENTINEL).count();
            assert_eq!(
                touched, 0,
                "{n} elements: rank {rank} got {touched} elements of the mismatched frame"
            );
        }
    }
}
