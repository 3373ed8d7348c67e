//! A call's host output, cut into cells at every boundary of its plan's
//! ranges, so that a frame in flight can own exactly the bytes it covers.
//!
//! A send from the output lends the link the cells of its range until the
//! link reports it done, while receives and reductions write other cells;
//! a receive in place lends its cells the same way. The borrow checker sees
//! only disjoint `&mut` slices (`split_at_mut`), so no `unsafe` is needed
//! and no byte is read and written at once. A frame whose cells are lent
//! waits for them (a receive posted early, into the range a send still
//! reads); writing into a lent range is an engine error, never a data race.

use std::ops::Range;

use oxccl_transport::{DevMut, Lent, Parts};
use smallvec::SmallVec;

use super::EngineError;
use crate::schedule::Plan;

/// The cells of one buffer: host bytes, or device memory reached by
/// address (a [`Cell`] either way).
pub(super) struct Cells<'b, P: Cell<'b> = &'b mut [u8]> {
    /// Where each cell starts, then the buffer's end.
    bounds: Bounds<'b>,
    /// Each cell, or `None` while it is lent to a frame in flight.
    cells: SmallVec<[Option<P>; INLINE]>,
}

/// A piece of an output buffer lent for `'b`, that a frame can own.
pub(super) trait Cell<'b>: Sized {
    fn len(&self) -> usize;
    /// Its first `mid` bytes and the rest.
    fn split(self, mid: usize) -> (Self, Self);
    /// As the memory of a posted operation.
    fn lent(self) -> Lent<'b>;
    /// Back from a completed operation; `None` for memory of another sort.
    fn back(lent: Lent<'b>) -> Option<Self>;
}

impl<'b> Cell<'b> for &'b mut [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn split(self, mid: usize) -> (Self, Self) {
        self.split_at_mut(mid.min(<[u8]>::len(self)))
    }
    fn lent(self) -> Lent<'b> {
        Lent::Exclusive(self)
    }
    fn back(lent: Lent<'b>) -> Option<Self> {
        match lent {
            Lent::Exclusive(c) => Some(c),
            _ => None,
        }
    }
}

impl<'b> Cell<'b> for DevMut<'b> {
    fn len(&self) -> usize {
        DevMut::len(self)
    }
    fn split(self, mid: usize) -> (Self, Self) {
        self.split_at(mid)
    }
    fn lent(self) -> Lent<'b> {
        Lent::DeviceMut(self)
    }
    fn back(lent: Lent<'b>) -> Option<Self> {
        match lent {
            Lent::DeviceMut(c) => Some(c),
            _ => None,
        }
    }
}

/// The plan's cuts when they end at the buffer's end (the usual case: no
/// work per call), else those that fall in the buffer and its end.
enum Bounds<'b> {
    Plan(&'b [usize]),
    Own(Vec<usize>),
}

/// Cells kept without a heap allocation: the plans of small calls, which
/// must not pay one per call.
const INLINE: usize = 4;

impl<'b, P: Cell<'b>> Cells<'b, P> {
    /// Cuts `buf` at every boundary of `plan`'s ranges ([`Plan::cuts`]).
    #[inline]
    pub(super) fn new(buf: P, plan: &'b Plan) -> Cells<'b, P> {
        let len = buf.len();
        let cuts = plan.cuts();
        let bounds = if cuts.last() == Some(&len) {
            Bounds::Plan(cuts)
        } else {
            let mut own: Vec<usize> = cuts.iter().copied().filter(|&c| c < len).collect();
            own.push(len);
            Bounds::Own(own)
        };
        let b: &[usize] = match &bounds {
            Bounds::Plan(b) => b,
            Bounds::Own(b) => b,
        };
        let mut rest = Some(buf);
        let cells = b
            .windows(2)
            .map(|w| {
                let (cell, tail) = rest.take()?.split(w[1] - w[0]);
                rest = Some(tail);
                Some(cell)
            })
            .collect();
        Cells { bounds, cells }
    }

    fn bounds(&self) -> &[usize] {
        match &self.bounds {
            Bounds::Plan(b) => b,
            Bounds::Own(b) => b,
        }
    }

    /// The cells that make up `range` exactly: `at` when it names them
    /// (the plan's own indices of the range's cuts, [`Plan::send_cuts`]:
    /// two comparisons), else found by a search.
    #[inline]
    fn span(&self, range: &Range<usize>, at: Range<usize>) -> Result<Range<usize>, EngineError> {
        let bounds = self.bounds();
        if at.start <= at.end
            && bounds.get(at.start) == Some(&range.start)
            && bounds.get(at.end) == Some(&range.end)
        {
            return Ok(at);
        }
        self.search(range)
    }

    #[cold]
    fn search(&self, range: &Range<usize>) -> Result<Range<usize>, EngineError> {
        let bounds = self.bounds();
        let find = |at: usize| bounds.binary_search(&at).ok();
        match (find(range.start), find(range.end)) {
            (Some(a), Some(b)) if a <= b => Ok(a..b),
            _ => Err(EngineError::Protocol {
                peer: 0,
                reason: format!(
                    "bytes {range:?} are not a range of the call's plan (a buffer of {} bytes)",
                    bounds.last().copied().unwrap_or(0)
                ),
            }),
        }
    }

    /// Lends the cells of `range` (at cuts `at`, see [`Cells::span`]) to a
    /// frame, appending them to `out`; false (and nothing appended) while
    /// a frame in flight holds some of them.
    #[inline]
    pub(super) fn lend(
        &mut self,
        range: &Range<usize>,
        at: Range<usize>,
        out: &mut Parts<'b>,
    ) -> Result<bool, EngineError> {
        let span = self.span(range, at)?;
        let cells = &mut self.cells[span];
        if let [one] = cells {
            // Most frames: one cell.
            return Ok(one.take().map(|c| out.push(c.lent())).is_some());
        }
        if cells.iter().any(Option::is_none) {
            return Ok(false);
        }
        out.extend(cells.iter_mut().filter_map(Option::take).map(P::lent));
        Ok(true)
    }

    /// Takes back the cells of `range` (at cuts `at`) from a completed frame.
    #[inline]
    pub(super) fn give_back(
        &mut self,
        range: &Range<usize>,
        at: Range<usize>,
        mut lent: Parts<'b>,
    ) -> Result<(), EngineError> {
        let span = self.span(range, at)?;
        let slots = &mut self.cells[span];
        if let ([slot @ None], 1) = (&mut *slots, lent.len()) {
            if let Some(cell) = lent.pop().and_then(P::back) {
                *slot = Some(cell);
                return Ok(());
            }
            return Err(in_flight(range));
        }
        let mut back = lent.into_iter();
        for slot in slots {
            match back.next().and_then(P::back) {
                Some(cell) if slot.is_none() => *slot = Some(cell),
                _ => return Err(in_flight(range)),
            }
        }
        Ok(())
    }

    /// Calls `f(offset in range, cell)` for each cell of `range` (at cuts
    /// `at`), in order.
    pub(super) fn each_mut(
        &mut self,
        range: &Range<usize>,
        at: Range<usize>,
        mut f: impl FnMut(usize, &mut P) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let span = self.span(range, at)?;
        let mut off = 0;
        for slot in &mut self.cells[span] {
            let Some(cell) = slot.as_mut() else {
                return Err(in_flight(range));
            };
            f(off, cell)?;
            off += cell.len();
        }
        Ok(())
    }
}

fn in_flight(range: &Range<usize>) -> EngineError {
    EngineError::Protocol {
        peer: 0,
        reason: format!(
            "the plan touches bytes {range:?} while a frame in flight holds some of them"
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::schedule::{Commit, RecvOp, SendOp, Src};

    fn plan(sends: &[Range<usize>], recvs: &[Range<usize>]) -> Plan {
        Plan {
            sends: sends
                .iter()
                .map(|r| SendOp {
                    peer: 1,
                    step: 0,
                    slice: 0,
                    src: Src::Output,
                    range: r.clone(),
                    after_recv: None,
                })
                .collect(),
            recvs: recvs
                .iter()
                .map(|r| RecvOp {
                    peer: 1,
                    step: 0,
                    slice: 0,
                    range: r.clone(),
                    commit: Commit::Copy,
                    after_send: None,
                })
                .collect(),
            ..Plan::default()
        }
    }

    #[test]
    fn a_lent_range_is_refused_until_given_back() {
        let mut buf: Vec<u8> = (0..10).collect();
        let p = plan(&[0..4, 4..10], &[2..6]);
        let mut cells = Cells::new(&mut buf[..], &p);
        let mut lent = Parts::new();
        assert!(cells.lend(&(4..10), 0..0, &mut lent).unwrap());
        let bytes: Vec<u8> = lent.iter().flat_map(|l| l.bytes().to_vec()).collect();
        assert_eq!(bytes, (4..10).collect::<Vec<u8>>());
        // 2..6 overlaps the lent 4..10: neither lent again nor written.
        assert!(!cells.lend(&(2..6), 0..0, &mut Parts::new()).unwrap());
        assert!(cells.each_mut(&(2..6), 0..0, |_, _| Ok(())).is_err());
        // 0..4 is free.
        cells
            .each_mut(&(0..4), 0..0, |off, c| {
                c.fill(100 + off as u8);
                Ok(())
            })
            .unwrap();
        cells.give_back(&(4..10), 0..0, lent).unwrap();
        cells
            .each_mut(&(2..6), 0..0, |_, c| {
                c.iter_mut().for_each(|b| *b += 1);
                Ok(())
            })
            .unwrap();
        drop(cells);
        assert_eq!(buf, [100, 100, 103, 103, 5, 6, 6, 7, 8, 9]);
    }

    #[test]
    fn ranges_off_the_plan_are_errors_not_panics() {
        let mut buf = [0u8; 8];
        let p = plan(&[0..4], &[4..20]);
        let mut cells = Cells::new(&mut buf[..], &p);
        let mut out = Parts::new();
        assert!(cells.lend(&(1..3), 0..0, &mut out).is_err());
        // Clamped to the buffer: 4..20 is cut at 8.
        assert!(cells.lend(&(4..20), 0..0, &mut out).is_err());
        assert!(cells.lend(&(4..8), 0..0, &mut out).unwrap());
        assert_eq!(out.len(), 1);
        assert!(cells.lend(&(0..0), 0..0, &mut out).unwrap());
        assert_eq!(out.len(), 1);
        // Giving back what was not lent is refused.
        assert!(
            cells
                .give_back(&(0..4), 0..0, smallvec::smallvec![Lent::Shared(&[0; 4])])
                .is_err()
        );
    }
}
