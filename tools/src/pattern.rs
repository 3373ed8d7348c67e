//! Deterministic data for checking collectives without a second exchange.
//!
//! Rank `r`'s input element `i` is [`value`]`(op, r, i)`, small integers that
//! every dtype represents exactly and whose sums and products stay exact in
//! f16 and bf16 for worlds up to 8 (up to 2^8 for products), so any rank can
//! compute any other rank's input and the exact expected result, and results
//! are compared bit for bit whatever order the ring reduced in.

use oxccl::kernels::Reducer;
use oxccl::kernels::reference::ReferenceReducer;
use oxccl::{Communicator, DType, Descriptor, Exchange, Kind, ReduceOp, bf16, f16};

/// Writes the expected elements `first..` into its first buffer (the second is scratch).
type Expected<'a> = dyn Fn(&mut [u8], &mut [u8], usize) + 'a;

/// Element `index` of rank `rank`'s input, as a number.
pub fn value(op: ReduceOp, rank: usize, index: usize) -> i64 {
    let h = (index as u64)
        .wrapping_mul(7)
        .wrapping_add(rank as u64 * 13 + 3);
    if op == ReduceOp::Prod {
        [-2, -1, 1, 2][(h % 4) as usize]
    } else {
        (h % 17) as i64 - 8
    }
}

/// Writes elements `first..first + out.len() / size` of rank `rank`'s input into `out`.
pub fn fill(dtype: DType, op: ReduceOp, rank: usize, first: usize, out: &mut [u8]) {
    let size = dtype.size();
    for (k, e) in out.chunks_exact_mut(size).enumerate() {
        let v = value(op, rank, first + k);
        match dtype {
            DType::I8 => e.copy_from_slice(&(v as i8).to_le_bytes()),
            DType::U8 => e.copy_from_slice(&(v as u8).to_le_bytes()),
            DType::I32 => e.copy_from_slice(&(v as i32).to_le_bytes()),
            DType::U32 => e.copy_from_slice(&(v as u32).to_le_bytes()),
            DType::I64 => e.copy_from_slice(&v.to_le_bytes()),
            DType::U64 => e.copy_from_slice(&(v as u64).to_le_bytes()),
            DType::F16 => e.copy_from_slice(&f16::from_f64(v as f64).to_le_bytes()),
            DType::BF16 => e.copy_from_slice(&bf16::from_f64(v as f64).to_le_bytes()),
            DType::F32 => e.copy_from_slice(&(v as f32).to_le_bytes()),
            DType::F64 => e.copy_from_slice(&(v as f64).to_le_bytes()),
        }
    }
}

/// Rank `rank`'s input for the call `d` in a world of `world`.
pub fn input(d: &Descriptor, world: usize, rank: usize) -> Vec<u8> {
    let n = match d.kind {
        Kind::ReduceScatter | Kind::AllToAll | Kind::Scatter => d.count * world,
        _ => d.count,
    };
    let mut v = vec![0u8; n * d.dtype.size()];
    fill(d.dtype, d.op, rank, 0, &mut v);
    v
}

/// Counts the elements of rank `rank`'s `output` of call `d` that differ from
/// the exact result (NCCL tests' `#wrong`). Outputs that the call leaves
/// undefined (a non-root's reduce) count nothing.
pub fn count_wrong(d: &Descriptor, world: usize, rank: usize, output: &[u8]) -> usize {
    let size = d.dtype.size();
    const BLOCK: usize = 1 << 16;
    let mut wrong = 0;
    let mut want = vec![0u8; BLOCK * size];
    let mut other = vec![0u8; BLOCK * size];
    let reduced = |want: &mut [u8], other: &mut [u8], first: usize| {
        fill(d.dtype, d.op, 0, first, want);
        for r in 1..world {
            fill(d.dtype, d.op, r, first, other);
            // Same lengths and dtype: cannot fail.
            let _ = ReferenceReducer.reduce(d.dtype, d.op, want, other);
        }
        if d.op == ReduceOp::Avg {
            let _ = ReferenceReducer.finish_avg(d.dtype, want, world);
        }
    };
    let mut compare = |out: &[u8], first: usize, source: &Expected<'_>| {
        for (b, chunk) in out.chunks(BLOCK * size).enumerate() {
            let (w, o) = (&mut want[..chunk.len()], &mut other[..chunk.len()]);
            source(w, o, first + b * BLOCK);
            wrong += chunk
                .chunks_exact(size)
                .zip(w.chunks_exact(size))
                .filter(|(x, y)| x != y)
                .count();
        }
    };
    match d.kind {
        Kind::Barrier => {}
        Kind::AllReduce => compare(output, 0, &reduced),
        Kind::Reduce if rank == d.root => compare(output, 0, &reduced),
        Kind::Reduce => {}
        Kind::Broadcast => compare(output, 0, &|w, _, first| {
            fill(d.dtype, d.op, d.root, first, w)
        }),
        Kind::ReduceScatter => compare(output, rank * d.count, &reduced),
        Kind::AllGather => {
            for r in 0..world {
                let part = &output[r * d.count * size..(r + 1) * d.count * size];
                compare(part, 0, &|w, _, first| fill(d.dtype, d.op, r, first, w));
            }
        }
        // Block `p` is block `rank` of rank `p`'s input.
        Kind::AllToAll => {
            for p in 0..world {
                let part = &output[p * d.count * size..(p + 1) * d.count * size];
                compare(part, rank * d.count, &|w, _, first| {
                    fill(d.dtype, d.op, p, first, w)
                });
            }
        }
        Kind::Gather if rank == d.root => {
            for p in 0..world {
                let part = &output[p * d.count * size..(p + 1) * d.count * size];
                compare(part, 0, &|w, _, first| fill(d.dtype, d.op, p, first, w));
            }
        }
        Kind::Gather => {}
        Kind::Scatter => compare(output, rank * d.count, &|w, _, first| {
            fill(d.dtype, d.op, d.root, first, w)
        }),
        // A message: the sender's (`root`) input.
        Kind::SendRecv => compare(output, 0, &|w, _, first| {
            fill(d.dtype, d.op, d.root, first, w)
        }),
        // Per-rank counts: checked by the callers that know them.
        Kind::AllToAllV | Kind::AllGatherV | Kind::ReduceScatterV => {}
    }
    wrong
}

/// The [`Exchange`] of a call of equal blocks (alltoall, gather, scatter).
pub fn exchange(d: &Descriptor) -> Option<Exchange<'static>> {
    match d.kind {
        Kind::AllToAll => Some(Exchange::AllToAll { count: d.count }),
        Kind::Gather => Some(Exchange::Gather {
            count: d.count,
            root: d.root,
        }),
        Kind::Scatter => Some(Exchange::Scatter {
            count: d.count,
            root: d.root,
        }),
        _ => None,
    }
}

/// The length in bytes of rank `rank`'s output of `d`.
pub fn output_len(d: &Descriptor, world: usize, rank: usize) -> usize {
    let size = d.dtype.size();
    match d.kind {
        Kind::AllGather | Kind::AllToAll => d.count * world * size,
        Kind::Gather if rank == d.root => d.count * world * size,
        Kind::Gather => 0,
        _ => d.count * size,
    }
}

/// Runs `d` on `comm` with this rank's [`input`], in place or out of
/// place, and returns [`count_wrong`] of its result. Out of place, the
/// output starts poisoned (so an element never written counts as wrong)
/// and a modified input is an error; in place, a non-root's buffer of a
/// reduce must come back untouched.
pub fn check_call(comm: &mut Communicator, d: &Descriptor, in_place: bool) -> oxccl::Result<usize> {
    let (world, rank, size) = (comm.world(), comm.rank(), d.dtype.size());
    let inp = input(d, world, rank);
    let out_len = output_len(d, world, rank);
    if let Some(x) = exchange(d) {
        if in_place {
            return Err(oxccl::Error::InvalidArgument(format!(
                "{} has no in-place form",
                d.kind.name()
            )));
        }
        let mut out = vec![0xA5u8; out_len];
        comm.run_exchange(x, d.dtype, &inp, &mut out)?;
        return Ok(count_wrong(d, world, rank, &out));
    }
    if in_place {
        let mut buf = match d.kind {
            Kind::AllGather => {
                let mut b = vec![0u8; out_len];
                b[rank * inp.len()..(rank + 1) * inp.len()].copy_from_slice(&inp);
                b
            }
            _ => inp.clone(),
        };
        comm.run_bytes(*d, None, &mut buf)?;
        if d.kind == Kind::Reduce && rank != d.root && buf != inp {
            return Err(oxccl::Error::Internal(format!(
                "rank {rank}: {}: an in-place reduce changed a non-root's buffer",
                d.call(0)
            )));
        }
        let result = match d.kind {
            Kind::ReduceScatter => &buf[rank * d.count * size..(rank + 1) * d.count * size],
            _ => &buf[..],
        };
        Ok(count_wrong(d, world, rank, result))
    } else {
        let mut out = vec![0xA5u8; out_len];
        comm.run_bytes(*d, Some(&inp), &mut out)?;
        if inp != input(d, world, rank) {
            return Err(oxccl::Error::Internal(format!(
                "rank {rank}: {}: the call modified its input",
                d.call(0)
            )));
        }
        Ok(count_wrong(d, world, rank, &out))
    }
}

/// A deterministic call of per-rank counts (alltoallv, allgatherv,
/// reduce-scatter with per-rank counts) on a world of `world`, with blocks
/// of 0, half and all of `count` elements, and the exact data and results
/// that go with it, for checking those calls across processes.
#[derive(Debug, Clone)]
pub struct Uneven {
    /// Which call.
    pub kind: Kind,
    /// Element type.
    pub dtype: DType,
    /// Reduction (reduce-scatter only).
    pub op: ReduceOp,
    /// The largest block.
    pub count: usize,
    /// Ranks.
    pub world: usize,
}

/// Where each of `counts` starts when packed in order.
fn starts(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |at, &c| {
            let d = *at;
            *at += c;
            Some(d)
        })
        .collect()
}

impl Uneven {
    /// Elements of the block from rank `a` to rank `b` (alltoallv), or of
    /// rank `a`'s block (the others, which ignore `b`).
    pub fn block(&self, a: usize, b: usize) -> usize {
        match self.kind {
            Kind::AllToAllV => self.count * ((a + 2 * b) % 3) / 2,
            _ => self.count * ((a + 1) % 3) / 2,
        }
    }

    /// The per-rank counts of allgatherv and reduce-scatter.
    pub fn counts(&self) -> Vec<usize> {
        (0..self.world).map(|a| self.block(a, 0)).collect()
    }

    /// Rank `rank`'s send counts, send displacements, receive counts and
    /// receive displacements (alltoallv), packed in rank order.
    pub fn layout(&self, rank: usize) -> [Vec<usize>; 4] {
        let sc: Vec<usize> = (0..self.world).map(|p| self.block(rank, p)).collect();
        let rc: Vec<usize> = (0..self.world).map(|p| self.block(p, rank)).collect();
        let (sd, rd) = (starts(&sc), starts(&rc));
        [sc, sd, rc, rd]
    }

    /// The call as [`Communicator::run_exchange`] takes it, borrowing
    /// `counts` ([`Uneven::counts`]) or `layout` ([`Uneven::layout`]).
    pub fn exchange<'a>(&self, counts: &'a [usize], layout: &'a [Vec<usize>; 4]) -> Exchange<'a> {
        match self.kind {
            Kind::AllToAllV => Exchange::AllToAllV {
                send_counts: &layout[0],
                send_displs: &layout[1],
                recv_counts: &layout[2],
                recv_displs: &layout[3],
            },
            Kind::AllGatherV => Exchange::AllGatherV { counts },
            _ => Exchange::ReduceScatterV {
                counts,
                op: self.op,
            },
        }
    }

    /// The data rank `a` sends rank `b` in an alltoallv.
    fn pair(&self, a: usize, b: usize, out: &mut [u8]) {
        fill(self.dtype, ReduceOp::Sum, a * self.world + b + 1, 0, out);
    }

    /// Rank `rank`'s input.
    pub fn input(&self, rank: usize) -> Vec<u8> {
        let size = self.dtype.size();
        match self.kind {
            Kind::AllToAllV => {
                let [sc, sd, ..] = self.layout(rank);
                let mut v = vec![0u8; sc.iter().sum::<usize>() * size];
                for p in 0..self.world {
                    self.pair(rank, p, &mut v[sd[p] * size..(sd[p] + sc[p]) * size]);
                }
                v
            }
            Kind::AllGatherV => {
                let mut v = vec![0u8; self.block(rank, 0) * size];
                fill(self.dtype, ReduceOp::Sum, rank, 0, &mut v);
                v
            }
            _ => {
                let mut v = vec![0u8; self.counts().iter().sum::<usize>() * size];
                fill(self.dtype, self.op, rank, 0, &mut v);
                v
            }
        }
    }

    /// The length in bytes of rank `rank`'s output.
    pub fn output_len(&self, rank: usize) -> usize {
        let size = self.dtype.size();
        match self.kind {
            Kind::AllToAllV => self.layout(rank)[2].iter().sum::<usize>() * size,
            Kind::AllGatherV => self.counts().iter().sum::<usize>() * size,
            _ => self.block(rank, 0) * size,
        }
    }

    /// The elements of rank `rank`'s `output` that differ from the exact result.
    pub fn count_wrong(&self, rank: usize, output: &[u8]) -> usize {
        let size = self.dtype.size();
        let mut want = vec![0u8; output.len()];
        match self.kind {
            Kind::AllToAllV => {
                let [_, _, rc, rd] = self.layout(rank);
                for p in 0..self.world {
                    self.pair(p, rank, &mut want[rd[p] * size..(rd[p] + rc[p]) * size]);
                }
            }
            Kind::AllGatherV => {
                let counts = self.counts();
                for (p, at) in starts(&counts).into_iter().enumerate() {
                    let w = &mut want[at * size..(at + counts[p]) * size];
                    fill(self.dtype, ReduceOp::Sum, p, 0, w);
                }
            }
            _ => {
                let at = starts(&self.counts())[rank];
                let mut other = vec![0u8; want.len()];
                fill(self.dtype, self.op, 0, at, &mut want);
                for r in 1..self.world {
                    fill(self.dtype, self.op, r, at, &mut other);
                    // Same lengths and dtype: cannot fail.
                    let _ = ReferenceReducer.reduce(self.dtype, self.op, &mut want, &other);
                }
                if self.op == ReduceOp::Avg {
                    let _ = ReferenceReducer.finish_avg(self.dtype, &mut want, self.world);
                }
            }
        }
        output
            .chunks_exact(size)
            .zip(want.chunks_exact(size))
            .filter(|(x, y)| x != y)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_a_wrong_element() {
        let d = Descriptor {
            kind: Kind::AllReduce,
            dtype: DType::F32,
            op: ReduceOp::Sum,
            root: 0,
            count: 100,
        };
        let mut out = input(&d, 1, 0);
        assert_eq!(count_wrong(&d, 1, 0, &out), 0);
        out[4 * 37] ^= 1;
        assert_eq!(count_wrong(&d, 1, 0, &out), 1);
    }

    #[test]
    fn products_stay_exact_in_bf16() {
        for i in 0..64 {
            let p: i64 = (0..8).map(|r| value(ReduceOp::Prod, r, i)).product();
            assert!(p.abs() <= 256);
        }
    }
}
