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

/// Device buffers whose links move their memory themselves: every
/// collective and an exchange on [`HostDevice`] buffers (host memory reached
/// only by address, as a GPU's is) over UCX, checked against the reference.
/// Frames larger than UCX's inline size go by address, straight from and
/// into the buffers (and the reductions run on the buffers' own operations),
/// so a call of such frames stages no byte through the host; over
/// in-process links (no memory by address) the same calls stage every byte.
#[test]
fn device_buffers_go_to_ucx_by_address_with_no_host_staging() {
    use oxccl::{DType, Descriptor, Kind, run_in_process};
    use oxccl_kernels::hostdev::HostDevice;
    use oxccl_tools::pattern::{count_wrong, input};

    let kinds = [
        Kind::AllReduce,
        Kind::Broadcast,
        Kind::Reduce,
        Kind::AllGather,
        Kind::ReduceScatter,
    ];
    // (wrong elements, bytes staged) on each rank.
    let one = |comm: &mut Communicator, d: Descriptor, in_place: bool| -> (usize, usize) {
        let (world, rank, size) = (comm.world(), comm.rank(), d.dtype.size());
        let inp = input(&d, world, rank);
        let out_len = match d.kind {
            Kind::AllGather => d.count * world * size,
            _ => d.count * size,
        };
        if in_place {
            let mut b = match d.kind {
                Kind::AllGather => {
                    let mut b = vec![0u8; out_len];
                    b[rank * inp.len()..(rank + 1) * inp.len()].copy_from_slice(&inp);
                    b
                }
                _ => inp.clone(),
            };
            let mut buf = HostDevice::from_host(&b);
            comm.run_device(d, None, &mut buf).unwrap();
            b = buf.to_host();
            if d.kind == Kind::ReduceScatter {
                b = b[rank * d.count * size..(rank + 1) * d.count * size].to_vec();
            }
            (count_wrong(&d, world, rank, &b), buf.staged_bytes())
        } else {
            let src = HostDevice::from_host(&inp);
            let mut out = HostDevice::from_host(&vec![0xA5; out_len]);
            comm.run_device(d, Some(&src), &mut out).unwrap();
            assert_eq!(src.to_host(), inp, "the input is not modified");
            let staged = src.staged_bytes() + out.staged_bytes();
            (count_wrong(&d, world, rank, &out.to_host()), staged)
        }
    };
    let config = Config {
        slice_bytes: 64 << 10,
        ..quick()
    };
    for world in [2, 3] {
        for kind in kinds {
            for (dtype, op) in [
                (DType::F32, ReduceOp::Sum),
                (DType::BF16, ReduceOp::Avg),
                (DType::I64, ReduceOp::Max),
            ] {
                // Small (staged: frames up to the inline size go through
                // the host), uneven, and large (frames by address).
                for count in [0, 1, world * 1000 + 1, 300_000] {
                    for in_place in [false, true] {
                        let d = Descriptor {
                            kind,
                            dtype,
                            op,
                            root: world - 1,
                            count,
                        };
                        let ctx = format!("{} world {world} in place {in_place}", d.call(0));
                        let out = over_ucx(world, config.clone(), |comm| one(comm, d, in_place));
                        assert!(out.iter().all(|(wrong, _)| *wrong == 0), "{ctx}: {out:?}");
                        if count == 300_000 && dtype == DType::F32 {
                            assert!(
                                out.iter().all(|(_, staged)| *staged == 0),
                                "{ctx}: bytes staged through the host: {out:?}"
                            );
                            // The same call over in-process links stages.
                            let there = run_in_process(world, config.clone(), |comm| {
                                one(comm, d, in_place)
                            })
                            .unwrap();
                            assert!(there.iter().all(|(wrong, _)| *wrong == 0), "{ctx}");
                            assert!(
                                there.iter().any(|(_, staged)| *staged > 0),
                                "{ctx}: nothing staged over in-process links"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// CUDA buffers over UCX (features `ucx` and `cuda`, run by `ci/gpu-test`):
/// device pointers go to UCX as they are when UCX has CUDA support
/// (`cuda_copy`, `cuda_ipc`, GPUDirect RDMA), staged through the host when
/// it has not; the result is right either way. Without a GPU it says so
/// and returns, unless `OXCCL_REQUIRE_CUDA=1`.
#[cfg(feature = "cuda")]
#[test]
fn cuda_buffers_over_ucx_agree_with_the_reference() {
    use oxccl::{DType, Descriptor, Kind};
    use oxccl_kernels::DeviceMemory;
    use oxccl_kernels::cuda::{CudaBuffer, CudaReducer, CudaSettings};
    use oxccl_tools::pattern::{count_wrong, input};

    let settings = CudaSettings {
        ordinal: 0,
        include_dirs: std::env::var_os("OXCCL_CUDA_INCLUDE")
            .map(std::path::PathBuf::from)
            .into_iter()
            .collect(),
    };
    let reducer = match CudaReducer::new(&settings) {
        Ok(r) => r,
        Err(e) => {
            let required = std::env::var("OXCCL_REQUIRE_CUDA").is_ok_and(|v| v == "1");
            assert!(!required, "OXCCL_REQUIRE_CUDA=1 but: {e}");
            eprintln!("cannot run here (no usable CUDA device): {e}");
            return;
        }
    };
    for kind in [Kind::AllReduce, Kind::AllGather, Kind::ReduceScatter] {
        for count in [1, 300_000] {
            let d = Descriptor {
                kind,
                dtype: DType::F32,
                op: ReduceOp::Sum,
                root: 0,
                count,
            };
            let wrong = over_ucx(2, quick(), |comm| {
                let (world, rank) = (comm.world(), comm.rank());
                let inp = input(&d, world, rank);
                let out_len = match kind {
                    Kind::AllGather => count * world * 4,
                    _ => count * 4,
                };
                let src = CudaBuffer::from_host(Arc::clone(&reducer), &inp).unwrap();
                let mut out = CudaBuffer::new(Arc::clone(&reducer), out_len).unwrap();
                comm.run_device(d, Some(&src), &mut out).unwrap();
                assert_eq!(out.len_bytes(), out_len);
                count_wrong(&d, world, rank, &out.to_host().unwrap())
            });
            assert!(wrong.iter().all(|&w| w == 0), "{}: {wrong:?}", d.call(0));
        }
    }
}

/// Exchanges and a ring of messages on [`HostDevice`] buffers over UCX, 4
/// ranks: blocks larger than UCX's inline size go by address (no byte
/// staged), smaller ones through the host; every result against the
/// reference.
#[test]
fn exchanges_and_messages_on_device_buffers_by_address() {
    use oxccl::{DType, Descriptor, Kind};
    use oxccl_kernels::hostdev::HostDevice;
    use oxccl_tools::pattern::{count_wrong, exchange, input, output_len};

    let world = 4;
    let config = Config {
        slice_bytes: 64 << 10,
        ..quick()
    };
    for kind in [Kind::AllToAll, Kind::Gather, Kind::Scatter] {
        for count in [0, 1, 37, 20_000] {
            let d = Descriptor {
                kind,
                dtype: DType::F32,
                op: ReduceOp::Sum,
                root: world - 1,
                count,
            };
            let out = over_ucx(world, config.clone(), |comm| {
                let rank = comm.rank();
                let src = HostDevice::from_host(&input(&d, world, rank));
                let mut out = HostDevice::from_host(&vec![0xA5; output_len(&d, world, rank)]);
                comm.run_exchange_device(exchange(&d).unwrap(), d.dtype, &src, &mut out)
                    .unwrap();
                let wrong = count_wrong(&d, world, rank, &out.to_host());
                (wrong, src.staged_bytes() + out.staged_bytes())
            });
            let ctx = format!("{} world {world}", d.call(0));
            assert!(out.iter().all(|(w, _)| *w == 0), "{ctx}: {out:?}");
            if count == 20_000 {
                // 80 KB blocks: all by address.
                assert!(out.iter().all(|(_, s)| *s == 0), "{ctx}: staged {out:?}");
            }
        }
    }
    // A ring shift of messages, small and large.
    for n in [1000usize, 100_000] {
        let got = over_ucx(world, config.clone(), |comm| {
            let (rank, w) = (comm.rank(), comm.world());
            let src = HostDevice::from_host(&vec![rank as u8 + 1; n]);
            let mut dst = HostDevice::zeroed(n);
            let mut b = oxccl::Batch::new();
            b.send_device(&src, DType::U8, (rank + 1) % w).recv_device(
                &mut dst,
                DType::U8,
                (rank + w - 1) % w,
            );
            comm.run_batch(b).unwrap();
            (dst.to_host(), src.staged_bytes() + dst.staged_bytes())
        });
        for (rank, (data, staged)) in got.iter().enumerate() {
            let from = (rank + world - 1) % world;
            assert!(
                data.iter().all(|&x| x == from as u8 + 1),
                "{n} B at rank {rank}"
            );
            if n > 8192 {
                assert_eq!(*staged, 0, "{n} B at rank {rank}: staged");
            }
        }
    }
}
