//! The device path of the engine (device → host → wire → host → device, the
//! reduction on the device) with a host-backed stand-in for a GPU buffer, so
//! that it is checked on every machine. The wgpu backend runs the same path
//! for real in `tools/tests/wgpu.rs`.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use oxccl::{Config, DType, Descriptor, Kind, ReduceOp, run_in_process};
use oxccl_kernels::reference::ReferenceReducer;
use oxccl_kernels::{DeviceMemory, KernelError, Reducer};
use oxccl_tools::pattern::{count_wrong, exchange, input, output_len};

/// "Device" memory that lives on the host; counts the reductions it ran.
#[derive(Debug)]
struct FakeDevice {
    data: Vec<u8>,
    reductions: Arc<AtomicUsize>,
}

impl DeviceMemory for FakeDevice {
    fn backend(&self) -> &'static str {
        "fake"
    }
    fn len_bytes(&self) -> usize {
        self.data.len()
    }
    fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), KernelError> {
        dst.copy_from_slice(&self.data[offset..offset + dst.len()]);
        Ok(())
    }
    fn write(&mut self, offset: usize, src: &[u8]) -> Result<(), KernelError> {
        self.data[offset..offset + src.len()].copy_from_slice(src);
        Ok(())
    }
    fn reduce_from_host(
        &mut self,
        dtype: DType,
        op: ReduceOp,
        offset: usize,
        src: &[u8],
    ) -> Result<(), KernelError> {
        self.reductions.fetch_add(1, Ordering::Relaxed);
        ReferenceReducer.reduce(dtype, op, &mut self.data[offset..offset + src.len()], src)
    }
    fn finish_avg(
        &mut self,
        dtype: DType,
        offset: usize,
        len: usize,
        n: usize,
    ) -> Result<(), KernelError> {
        ReferenceReducer.finish_avg(dtype, &mut self.data[offset..offset + len], n)
    }
    fn alloc_like(&self, bytes: usize) -> Result<Box<dyn DeviceMemory>, KernelError> {
        Ok(Box::new(FakeDevice {
            data: vec![0; bytes],
            reductions: self.reductions.clone(),
        }))
    }
}

fn run(d: Descriptor, world: usize, in_place: bool) -> Vec<(usize, usize)> {
    let config = Config {
        slice_bytes: 3 * d.dtype.size(),
        timeout: Duration::from_secs(30),
        ..Config::default()
    };
    run_in_process(world, config, |comm| {
        let (rank, size) = (comm.rank(), d.dtype.size());
        let reductions = Arc::new(AtomicUsize::new(0));
        let dev = |data: Vec<u8>| FakeDevice {
            data,
            reductions: reductions.clone(),
        };
        let inp = input(&d, world, rank);
        let out_len = match d.kind {
            Kind::AllGather => d.count * world * size,
            _ => d.count * size,
        };
        let result = if in_place {
            let mut buf = match d.kind {
                Kind::AllGather => {
                    let mut b = vec![0u8; out_len];
                    b[rank * inp.len()..(rank + 1) * inp.len()].copy_from_slice(&inp);
                    dev(b)
                }
                _ => dev(inp.clone()),
            };
            comm.run_device(d, None, &mut buf).unwrap();
            match d.kind {
                Kind::ReduceScatter => {
                    buf.data[rank * d.count * size..(rank + 1) * d.count * size].to_vec()
                }
                _ => buf.data,
            }
        } else {
            let src = dev(inp.clone());
            let mut out = dev(vec![0xA5; out_len]);
            comm.run_device(d, Some(&src), &mut out).unwrap();
            assert_eq!(src.data, inp, "the input is not modified");
            out.data
        };
        (
            count_wrong(&d, world, rank, &result),
            reductions.load(Ordering::Relaxed),
        )
    })
    .unwrap()
}

#[test]
fn every_collective_on_device_buffers() {
    for world in 1..=5 {
        for kind in [
            Kind::AllReduce,
            Kind::Broadcast,
            Kind::Reduce,
            Kind::AllGather,
            Kind::ReduceScatter,
        ] {
            for (dtype, op) in [
                (DType::F32, ReduceOp::Sum),
                (DType::BF16, ReduceOp::Avg),
                (DType::I8, ReduceOp::Max),
                (DType::U64, ReduceOp::Prod),
            ] {
                for count in [0, 1, world + 1, 50] {
                    for in_place in [false, true] {
                        let d = Descriptor {
                            kind,
                            dtype,
                            op,
                            root: world / 2,
                            count,
                        };
                        let out = run(d, world, in_place);
                        let ctx = format!("{} world {world} in_place {in_place}", d.call(0));
                        assert!(out.iter().all(|(wrong, _)| *wrong == 0), "{ctx}: {out:?}");
                        // Reductions ran on the "device" whenever data was reduced.
                        if d.reduces() && world > 1 && count > 0 {
                            assert!(
                                out.iter().map(|(_, r)| r).sum::<usize>() > 0,
                                "{ctx}: no device reduction"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A small allreduce on device buffers takes a latency algorithm, and still
/// reduces on the device: on two ranks the small-message path (one gather,
/// then `world - 1` reductions in rank order), on four recursive doubling
/// (`log2 world` exchanges, one reduction per slice each); not the ring's `world - 1`
/// per slice of every chunk.
#[test]
fn a_small_device_allreduce_gathers_once_and_reduces_on_the_device() {
    for world in [2, 4] {
        for in_place in [false, true] {
            let d = Descriptor {
                kind: Kind::AllReduce,
                dtype: DType::F32,
                op: ReduceOp::Avg,
                root: 0,
                count: 30,
            };
            let out = run(d, world, in_place);
            for (rank, (wrong, reductions)) in out.into_iter().enumerate() {
                assert_eq!(wrong, 0, "world {world} rank {rank}");
                // Recursive doubling cuts the buffer into slices of 3 (the
                // slice size of `run`); the gather never does.
                let want = if world == 2 {
                    1
                } else {
                    world.ilog2() as usize * 30usize.div_ceil(3)
                };
                assert_eq!(reductions, want, "world {world} rank {rank}");
            }
        }
    }
}

/// The exchanges and a batch of sends and receives on device buffers:
/// blocks go device → host → wire → host → device; a reduce-scatter with
/// per-rank counts reduces on the device.
#[test]
fn exchanges_and_messages_on_device_buffers() {
    let config = Config {
        slice_bytes: 64,
        timeout: Duration::from_secs(30),
        ..Config::default()
    };
    for world in 1..=4 {
        for kind in [Kind::AllToAll, Kind::Gather, Kind::Scatter] {
            for count in [0, 1, 37] {
                let d = Descriptor {
                    kind,
                    dtype: DType::F16,
                    op: ReduceOp::Sum,
                    root: world - 1,
                    count,
                };
                let wrong = run_in_process(world, config.clone(), |comm| {
                    let rank = comm.rank();
                    let reductions = Arc::new(AtomicUsize::new(0));
                    let src = FakeDevice {
                        data: input(&d, world, rank),
                        reductions: reductions.clone(),
                    };
                    let mut out = FakeDevice {
                        data: vec![0xA5; output_len(&d, world, rank)],
                        reductions,
                    };
                    let x = exchange(&d).unwrap();
                    comm.run_exchange_device(x, d.dtype, &src, &mut out)
                        .unwrap();
                    count_wrong(&d, world, rank, &out.data)
                })
                .unwrap();
                assert!(
                    wrong.iter().all(|w| *w == 0),
                    "{} world {world}: {wrong:?}",
                    d.call(0)
                );
            }
        }
        // Uneven blocks reduced on the device.
        let counts: Vec<usize> = (0..world).map(|p| [3, 0, 70, 5][p]).collect();
        let total: usize = counts.iter().sum();
        let got = run_in_process(world, config.clone(), |comm| {
            let rank = comm.rank();
            let reductions = Arc::new(AtomicUsize::new(0));
            let vals: Vec<f32> = (0..total).map(|i| (i % 7) as f32 + rank as f32).collect();
            let src = FakeDevice {
                data: bytemuck::cast_slice(&vals).to_vec(),
                reductions: reductions.clone(),
            };
            let mut out = FakeDevice {
                data: vec![0; counts[rank] * 4],
                reductions: reductions.clone(),
            };
            comm.run_exchange_device(
                oxccl::Exchange::ReduceScatterV {
                    counts: &counts,
                    op: ReduceOp::Sum,
                },
                DType::F32,
                &src,
                &mut out,
            )
            .unwrap();
            let got: Vec<f32> = out
                .data
                .chunks_exact(4)
                .map(bytemuck::pod_read_unaligned::<f32>)
                .collect();
            (got, reductions.load(Ordering::Relaxed))
        })
        .unwrap();
        let rank_sum = (world * (world - 1) / 2) as f32;
        let mut at = 0;
        for (rank, (got, reductions)) in got.into_iter().enumerate() {
            for (i, x) in got.iter().enumerate() {
                let want = ((at + i) % 7) as f32 * world as f32 + rank_sum;
                assert_eq!(*x, want, "world {world} rank {rank} element {i}");
            }
            if world > 1 && counts[rank] > 0 {
                assert!(
                    reductions > 0,
                    "world {world} rank {rank}: no device reduction"
                );
            }
            at += counts[rank];
        }
        // A ring shift of messages between device buffers.
        let got = run_in_process(world, config.clone(), |comm| {
            let (rank, w) = (comm.rank(), comm.world());
            let src = FakeDevice {
                data: vec![rank as u8; 1000],
                reductions: Arc::default(),
            };
            let mut dst = FakeDevice {
                data: vec![0xA5; 1000],
                reductions: Arc::default(),
            };
            let mut b = oxccl::Batch::new();
            b.send_device(&src, DType::U8, (rank + 1) % w).recv_device(
                &mut dst,
                DType::U8,
                (rank + w - 1) % w,
            );
            comm.run_batch(b).unwrap();
            dst.data
        })
        .unwrap();
        for (rank, data) in got.iter().enumerate() {
            let prev = ((rank + world - 1) % world) as u8;
            assert!(data.iter().all(|x| *x == prev), "world {world} rank {rank}");
        }
    }
}
