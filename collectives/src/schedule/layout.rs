//! Byte layout: which elements a chunk and its slices cover.

use std::ops::Range;

/// Elements of chunk `chunk` when `count` elements are cut into `world`
/// chunks: `chunk*count/world .. (chunk+1)*count/world`. Sizes differ by at
/// most one element, the larger ones last; chunks may be empty.
pub fn chunk_range(count: usize, world: usize, chunk: usize) -> Range<usize> {
    let at = |c: usize| (c as u128 * count as u128 / world as u128) as usize;
    at(chunk)..at(chunk + 1)
}

/// The slices of `chunk`, each at most `slice_elems` elements. An empty chunk
/// is one empty slice, so that every step carries a frame.
pub fn slices(chunk: Range<usize>, slice_elems: usize) -> impl Iterator<Item = Range<usize>> {
    let len = chunk.len();
    let n = len.div_ceil(slice_elems).max(1);
    (0..n).map(move |j| {
        let start = chunk.start + j * slice_elems;
        start.min(chunk.end)..(start + slice_elems).min(chunk.end)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn chunks_tile_the_buffer(count in 0usize..10_000, world in 1usize..=16) {
            let mut next = 0;
            for c in 0..world {
                let r = chunk_range(count, world, c);
                prop_assert_eq!(r.start, next);
                prop_assert!(r.len() == count / world || r.len() == count / world + 1);
                next = r.end;
            }
            prop_assert_eq!(next, count);
        }

        #[test]
        fn slices_tile_the_chunk(start in 0usize..1000, len in 0usize..1000, slice in 1usize..300) {
            let chunk = start..start + len;
            let v: Vec<_> = slices(chunk.clone(), slice).collect();
            prop_assert!(!v.is_empty());
            prop_assert_eq!(v[0].start, chunk.start);
            prop_assert_eq!(v[v.len() - 1].end, chunk.end);
            for w in v.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
            }
            prop_assert!(v.iter().all(|s| s.len() <= slice));
            prop_assert!(len == 0 || v.iter().all(|s| !s.is_empty()));
        }
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        let r = chunk_range(usize::MAX / 2, 7, 6);
        assert_eq!(r.end, usize::MAX / 2);
    }
}
