//! Which ready tensors share a fusion buffer (pure).

use super::wire::Meta;

/// An open bucket: fusion key, bytes so far, members.
type Open = ((u8, u8, u8, usize), usize, Vec<usize>);

/// Groups `metas` (in their agreed order) into buckets, each run as one
/// collective, in the order returned. Tensors of one key (kind, dtype, op,
/// root) share a bucket while its buffer stays within `threshold` bytes; a
/// tensor larger than the threshold, or of at least `direct` bytes, goes
/// alone (and is not copied: above `direct` a call of its own costs less
/// than copying in and out of the fusion buffer). The result depends only
/// on its inputs, so every rank computes the same.
pub(crate) fn buckets(
    metas: &[Meta],
    world: usize,
    threshold: usize,
    direct: usize,
) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    // Open buckets, in the order they were opened: (key, bytes, members).
    let mut open: Vec<Open> = Vec::new();
    for (i, m) in metas.iter().enumerate() {
        let bytes = m.bytes(world);
        if bytes > threshold || bytes >= direct {
            out.push(vec![i]);
            continue;
        }
        let key = m.key();
        match open.iter().position(|(k, _, _)| *k == key) {
            Some(p) if open[p].1.saturating_add(bytes) <= threshold => {
                open[p].1 += bytes;
                open[p].2.push(i);
            }
            Some(p) => {
                let (_, _, members) = open.remove(p);
                out.push(members);
                open.push((key, bytes, vec![i]));
            }
            None => open.push((key, bytes, vec![i])),
        }
    }
    out.extend(open.into_iter().map(|(_, _, m)| m));
    out
}

#[cfg(test)]
mod tests {
    use oxccl_kernels::{DType, ReduceOp};

    use super::*;
    use crate::schedule::Kind;

    fn m(kind: Kind, dtype: DType, count: usize) -> Meta {
        Meta::new(kind, dtype, ReduceOp::Sum, 0, count)
    }

    #[test]
    fn fuses_by_key_within_threshold() {
        let metas = [
            m(Kind::AllReduce, DType::F32, 4),  // 16 bytes
            m(Kind::AllReduce, DType::F64, 2),  // 16
            m(Kind::AllReduce, DType::F32, 4),  // 16 -> 32
            m(Kind::AllReduce, DType::F32, 20), // 80 > 64: alone
            m(Kind::AllReduce, DType::F32, 8),  // 32 -> 64
            m(Kind::AllReduce, DType::F32, 1),  // 4: 68 > 64, new bucket
            m(Kind::AllGather, DType::F32, 4),  // 16 * 2 ranks
            m(Kind::AllReduce, DType::F32, 0),
        ];
        assert_eq!(
            buckets(&metas, 2, 64, usize::MAX),
            vec![vec![3], vec![0, 2, 4], vec![1], vec![5, 7], vec![6]]
        );
        // Tensors of at least `direct` bytes go alone.
        assert_eq!(
            buckets(&metas, 2, 64, 32),
            vec![vec![3], vec![4], vec![6], vec![0, 2, 5, 7], vec![1]]
        );
        // Threshold 0: no fusion, nothing copied (but count-0 tensors still share).
        assert_eq!(buckets(&metas[..3], 2, 0, usize::MAX).len(), 3);
    }
}
