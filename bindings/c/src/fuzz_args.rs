//! Fuzz targets of the C API's argument checks: the pure checks of a
//! collective's, a send's or receive's and an exchange's arguments (`plan`,
//! `plan_p2p`, `plan_exchange`, addresses as plain integers) on any
//! values, and the entry points themselves on random combinations of NULL
//! and valid pointers, communicator handles that are live, destroyed or
//! never made, enum values and roots out of range, and counts past the
//! address space. Every call returns a result code; none crashes. Only NULL
//! or valid pointers are passed, and a count that fits the buffers passed
//! or one that overflows the address space (refused before any access).
//! `OXCCL_FUZZ_CASES` sets the cases (see the README's reliability section).

#![allow(clippy::unwrap_used)]

// Shared with the transport's targets: case counts and edge values.
#[path = "../../../transport/src/fuzz/mutate.rs"]
mod mutate;

use std::sync::OnceLock;

use proptest::prelude::*;

use super::*;
use mutate::{config, edge_u64};

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::AllReduce),
        Just(Kind::Broadcast),
        Just(Kind::Reduce),
        Just(Kind::AllGather),
        Just(Kind::ReduceScatter),
        Just(Kind::Barrier),
    ]
}

/// Enum values: the valid ones, their neighbours, and any.
fn enum_value() -> impl Strategy<Value = c_int> {
    prop_oneof![-2..12, Just(c_int::MAX), Just(c_int::MIN), any::<c_int>()]
}

fn addr() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        edge_u64().prop_map(|v| v as usize),
        0x1000usize..0x1100
    ]
}

fn args() -> impl Strategy<Value = Args> {
    (
        kind(),
        addr(),
        addr(),
        edge_u64(),
        enum_value(),
        enum_value(),
        enum_value(),
        prop_oneof![4 => Just(0usize), 1 => addr()],
    )
        .prop_map(
            |(kind, send, recv, count, datatype, op, root, stream)| Args {
                kind,
                send,
                recv,
                count: count as usize,
                datatype,
                op,
                root,
                stream,
            },
        )
}

/// Per-peer counts or displacements of an alltoallv: small, at the edges,
/// or past the address space; usually `world` entries.
fn v_array(world: usize) -> impl Strategy<Value = Vec<usize>> {
    let entry = prop_oneof![
        6 => 0usize..8,
        1 => edge_u64().prop_map(|v| v as usize),
        1 => Just(usize::MAX),
    ];
    prop_oneof![
        8 => proptest::collection::vec(entry.clone(), world),
        1 => proptest::collection::vec(entry, 0..6),
    ]
}

fn xargs() -> impl Strategy<Value = (XArgs, usize, usize)> {
    (1usize..6).prop_flat_map(|world| {
        (
            prop_oneof![
                Just(Kind::AllToAll),
                Just(Kind::AllToAllV),
                Just(Kind::Gather),
                Just(Kind::Scatter),
                Just(Kind::AllReduce),
            ],
            (addr(), addr(), edge_u64()),
            (
                enum_value(),
                enum_value(),
                prop_oneof![4 => Just(0usize), 1 => addr()],
            ),
            (
                v_array(world),
                v_array(world),
                v_array(world),
                v_array(world),
            ),
            any::<bool>(),
            0..world,
        )
            .prop_map(
                move |(
                    kind,
                    (send, recv, count),
                    (datatype, root, stream),
                    (sc, sd, rc, rd),
                    no_v,
                    rank,
                )| {
                    let v = (kind == Kind::AllToAllV && !no_v).then_some(VArgs {
                        send_counts: sc,
                        send_displs: sd,
                        recv_counts: rc,
                        recv_displs: rd,
                    });
                    (
                        XArgs {
                            kind,
                            send,
                            recv,
                            count: count as usize,
                            v,
                            datatype,
                            root,
                            stream,
                        },
                        rank,
                        world,
                    )
                },
            )
    })
}

/// A handle for the entry point target.
#[derive(Debug, Clone, Copy)]
enum Handle {
    Null,
    /// A communicator of one rank, live for the whole test.
    Live,
    /// A handle destroyed before the cases run.
    Destroyed,
    /// An address oxccl never made a handle at.
    Never,
}

/// A world-1 communicator kept for the whole test, and a destroyed handle.
fn handles() -> (usize, usize) {
    static HANDLES: OnceLock<(usize, usize)> = OnceLock::new();
    *HANDLES.get_or_init(|| {
        let mut live: [oxcclComm_t; 1] = [std::ptr::null_mut()];
        // SAFETY: `live` is writable for one handle; devlist may be NULL.
        let made = unsafe { oxcclCommInitAll(live.as_mut_ptr(), 1, std::ptr::null()) };
        assert_eq!(made, 0);
        let mut dead: [oxcclComm_t; 1] = [std::ptr::null_mut()];
        // SAFETY: as above.
        let made = unsafe { oxcclCommInitAll(dead.as_mut_ptr(), 1, std::ptr::null()) };
        assert_eq!(made, 0);
        // SAFETY: a live handle, not used again but as a refused address.
        let destroyed = unsafe { oxcclCommDestroy(dead[0]) };
        assert_eq!(destroyed, 0);
        (live[0] as usize, dead[0] as usize)
    })
}

/// A byte that is never a communicator (its address is only compared).
static NEVER: u8 = 0;

fn last_error() -> String {
    let p = oxcclGetLastError(std::ptr::null_mut());
    // SAFETY: oxcclGetLastError returns a valid C string, valid until the
    // next failing call on this thread.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Counts for the entry point target: ones that fit the 64-element buffers
/// (the library cannot know their size), and ones past the address space.
fn count() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..=64,
        1 => Just(usize::MAX),
        1 => Just(isize::MAX as usize + 1),
    ]
}

/// A buffer argument: NULL, the send buffer or the receive buffer.
fn buffer() -> impl Strategy<Value = u8> {
    0u8..3
}

proptest! {
    #![proptest_config(config())]

    /// Any arguments, any rank of any world: the check refuses with
    /// `oxcclInvalidArgument` and a message, or passes only what is safe
    /// to touch: valid enums, a root in the world, buffers that are not
    /// NULL when they have bytes, do not wrap, and do not overlap.
    #[test]
    fn fuzz_c_plan_arbitrary_args(a in args(), world in prop_oneof![1usize..9, Just(usize::MAX), any::<usize>().prop_map(|w| w.max(1))], rank in any::<usize>()) {
        let rank = rank % world;
        match plan(a, rank, world) {
            Ok(call) => {
                prop_assert_eq!(a.stream, 0);
                prop_assert!((0..=9).contains(&a.datatype));
                let reduces = matches!(a.kind, Kind::AllReduce | Kind::Reduce | Kind::ReduceScatter);
                if reduces {
                    prop_assert!((0..=4).contains(&a.op));
                }
                if matches!(a.kind, Kind::Broadcast | Kind::Reduce) {
                    prop_assert!(usize::try_from(a.root).is_ok_and(|r| r < world));
                }
                prop_assert_eq!(call.desc.count, a.count);
                let spans = [Some(call.output), call.input];
                for s in spans.into_iter().flatten() {
                    prop_assert!(s.len <= isize::MAX as usize);
                    prop_assert!(s.len == 0 || s.addr != 0);
                    prop_assert!(s.addr.checked_add(s.len).is_some());
                }
                if let Some(i) = call.input {
                    prop_assert!(!i.overlaps(&call.output));
                }
            }
            Err(f) => {
                prop_assert_eq!(f.code, ResultCode::oxcclInvalidArgument);
                prop_assert!(!f.message.is_empty());
            }
        }
    }

    /// Any send or receive: refused with a message, or a valid type, a
    /// peer in the world and a buffer that is not NULL when it has bytes,
    /// does not wrap and fits a slice.
    #[test]
    fn fuzz_c_plan_p2p(send in any::<bool>(), addr in addr(), count in edge_u64(), datatype in enum_value(), peer in enum_value(), stream in prop_oneof![4 => Just(0usize), 1 => addr()], world in prop_oneof![1usize..9, any::<usize>().prop_map(|w| w.max(1))]) {
        match plan_p2p(send, addr, count as usize, datatype, peer, stream, world) {
            Ok(p) => {
                prop_assert_eq!(stream, 0);
                prop_assert_eq!(p.send, send);
                prop_assert_eq!(p.dtype as c_int, datatype);
                prop_assert!(usize::try_from(peer).is_ok_and(|r| r < world && r == p.peer));
                prop_assert_eq!(p.buf.len, count as usize * p.dtype.size());
                prop_assert!(p.buf.len <= isize::MAX as usize);
                prop_assert!(p.buf.len == 0 || p.buf.addr != 0);
                prop_assert!(p.buf.addr.checked_add(p.buf.len).is_some());
            }
            Err(f) => {
                prop_assert_eq!(f.code, ResultCode::oxcclInvalidArgument);
                prop_assert!(!f.message.is_empty());
            }
        }
    }

    /// Any exchange: refused with a message, or buffers that hold every
    /// range the call reads or writes, that are not NULL when they have
    /// bytes, do not wrap, fit a slice and do not overlap; received ranges
    /// of an alltoallv that do not overlap.
    #[test]
    fn fuzz_c_plan_exchange((a, rank, world) in xargs()) {
        match plan_exchange(a.clone(), rank, world) {
            Ok(c) => {
                prop_assert_eq!(a.stream, 0);
                prop_assert_eq!(c.dtype as c_int, a.datatype);
                for s in [c.input, c.output] {
                    prop_assert!(s.len <= isize::MAX as usize);
                    prop_assert!(s.len == 0 || s.addr != 0);
                    prop_assert!(s.addr.checked_add(s.len).is_some());
                }
                prop_assert!(!c.input.overlaps(&c.output));
                let size = c.dtype.size();
                match &c.x {
                    XKind::AllToAll { count } => {
                        prop_assert_eq!(c.input.len, count * size * world);
                        prop_assert_eq!(c.output.len, c.input.len);
                    }
                    XKind::Gather { count, root } | XKind::Scatter { count, root } => {
                        prop_assert!(*root < world);
                        prop_assert!(usize::try_from(a.root).is_ok_and(|r| r == *root));
                        let (mine, all) = (count * size, count * size * world);
                        let (i, o) = if matches!(c.x, XKind::Gather { .. }) {
                            (mine, if rank == *root { all } else { 0 })
                        } else {
                            (if rank == *root { all } else { 0 }, mine)
                        };
                        prop_assert_eq!((c.input.len, c.output.len), (i, o));
                    }
                    XKind::AllToAllV { send_counts, send_displs, recv_counts, recv_displs } => {
                        prop_assert_eq!(send_counts.len(), world);
                        prop_assert_eq!(send_counts[rank], recv_counts[rank]);
                        let mut got: Vec<(usize, usize)> = Vec::new();
                        for p in 0..world {
                            prop_assert!((send_displs[p] + send_counts[p]) * size <= c.input.len);
                            prop_assert!((recv_displs[p] + recv_counts[p]) * size <= c.output.len);
                            if recv_counts[p] > 0 {
                                got.push((recv_displs[p], recv_displs[p] + recv_counts[p]));
                            }
                        }
                        got.sort_unstable();
                        prop_assert!(got.windows(2).all(|w| w[0].1 <= w[1].0));
                    }
                }
            }
            Err(f) => {
                prop_assert_eq!(f.code, ResultCode::oxcclInvalidArgument);
                prop_assert!(!f.message.is_empty());
            }
        }
    }

    /// The entry points on random handles, pointers, enums, roots and
    /// counts: a result code every time, `oxcclInvalidArgument` with a
    /// message naming the culprit for every bad argument, success when all
    /// are good (a world of one rank runs the call).
    #[test]
    fn fuzz_c_entry_points(
        h in prop_oneof![Just(Handle::Null), Just(Handle::Live), Just(Handle::Destroyed), Just(Handle::Never)],
        which in 0u8..15,
        send in buffer(),
        recv in buffer(),
        count in count(),
        datatype in enum_value(),
        op in enum_value(),
        root in enum_value(),
        out_null in any::<bool>(),
        code in any::<c_int>(),
        id in any::<[u8; 32]>(),
        nranks in enum_value(),
        rank in enum_value(),
    ) {
        let (live, dead) = handles();
        let comm = match h {
            Handle::Null => std::ptr::null_mut(),
            Handle::Live => live as oxcclComm_t,
            Handle::Destroyed => dead as oxcclComm_t,
            Handle::Never => (&raw const NEVER).cast_mut().cast(),
        };
        // A destroyed handle's address may be reused by a communicator
        // another test makes: calls on it pass a bad datatype, so that
        // whichever communicator it is, nothing runs.
        let datatype = if matches!(h, Handle::Destroyed) { 99 } else { datatype };
        let mut sbuf = [7u64; 64];
        let mut rbuf = [0u64; 64];
        let ptr = |b: u8, s: &mut [u64; 64], r: &mut [u64; 64]| -> *mut c_void {
            match b {
                0 => std::ptr::null_mut(),
                1 => s.as_mut_ptr().cast(),
                _ => r.as_mut_ptr().cast(),
            }
        };
        let sp = ptr(send, &mut sbuf, &mut rbuf);
        let rp = ptr(recv, &mut sbuf, &mut rbuf);
        let mut out_int: c_int = -1;
        let out: *mut c_int = if out_null { std::ptr::null_mut() } else { &mut out_int };
        // SAFETY: every pointer is NULL or valid: `comm` is only compared
        // with the live handles before use, the buffers hold 64 elements of
        // up to 8 bytes and `count` is at most 64 or overflows the address
        // space (refused before any access), `out` is NULL or an int.
        let result = unsafe {
            match which {
                0 => oxcclCommCount(comm, out),
                1 => oxcclCommUserRank(comm, out),
                2 => oxcclCommGetAsyncError(comm, out),
                3 => oxcclAllReduce(sp, rp, count, datatype, op, comm, std::ptr::null_mut()),
                4 => oxcclBroadcast(sp, rp, count, datatype, root, comm, std::ptr::null_mut()),
                5 => oxcclReduce(sp, rp, count, datatype, op, root, comm, std::ptr::null_mut()),
                6 => oxcclAllGather(sp, rp, count, datatype, comm, std::ptr::null_mut()),
                7 => oxcclReduceScatter(sp, rp, count, datatype, op, comm, std::ptr::null_mut()),
                // A world of one: a send or receive alone (to itself) is
                // refused by the library, whatever the arguments.
                9 => oxcclSend(sp, count, datatype, root, comm, std::ptr::null_mut()),
                10 => oxcclRecv(rp, count, datatype, root, comm, std::ptr::null_mut()),
                11 => oxcclAllToAll(sp, rp, count, datatype, comm, std::ptr::null_mut()),
                12 => {
                    // One entry each (a world of one); `op` picks a NULL array.
                    let (counts, displs) = ([count], [0usize]);
                    let arr = |i: c_int, a: &[usize; 1]| if op == i { std::ptr::null() } else { a.as_ptr() };
                    oxcclAllToAllv(sp, arr(0, &counts), arr(1, &displs), rp, arr(2, &counts), arr(3, &displs), datatype, comm, std::ptr::null_mut())
                }
                13 => oxcclGather(sp, rp, count, datatype, root, comm, std::ptr::null_mut()),
                14 => oxcclScatter(sp, rp, count, datatype, root, comm, std::ptr::null_mut()),
                _ => {
                    // An id whose magic is wrong (a valid one would connect).
                    let mut internal = [0 as c_char; 128];
                    for (d, s) in internal.iter_mut().zip(id) {
                        *d = s as c_char;
                    }
                    internal[0] = b'X' as c_char;
                    let mut made: oxcclComm_t = std::ptr::null_mut();
                    let target: *mut oxcclComm_t = if out_null { std::ptr::null_mut() } else { &mut made };
                    let r = oxcclCommInitRank(target, nranks, oxcclUniqueId { internal }, rank);
                    prop_assert!(made.is_null());
                    r
                }
            }
        };
        // The error string of any code is a C string.
        // SAFETY: oxcclGetErrorString returns a static C string.
        let text = unsafe { CStr::from_ptr(oxcclGetErrorString(code)) };
        prop_assert!(!text.to_bytes().is_empty());
        // Unless another test's communicator took the destroyed address.
        let reused = matches!(h, Handle::Destroyed) && live_handles().contains(&dead);
        let bad_comm = !matches!(h, Handle::Live) && which != 8 && !reused;
        let dtype_ok = (0..=9).contains(&datatype);
        let op_ok = (0..=4).contains(&op);
        let size = usize::try_from(datatype).ok().and_then(|d| u8::try_from(d).ok()).and_then(DType::from_u8).map_or(1, |d| d.size());
        let fits = count.checked_mul(size).is_some_and(|n| n <= isize::MAX as usize);
        let good = match which {
            0..=2 => !bad_comm && !out_null,
            8..=10 => false,
            w => {
                let reduces = matches!(w, 3 | 5 | 7);
                let rooted = matches!(w, 4 | 5);
                // Buffers: non-NULL when they have bytes, the same or apart.
                let bytes = count > 0;
                let bufs = match w {
                    // Broadcast and reduce on the root (rank 0 of 1).
                    3..=7 => !bytes || (send != 0 && recv != 0),
                    // Exchanges: not in place either.
                    _ => !bytes || (send != 0 && recv != 0 && send != recv),
                };
                let rooted = rooted || matches!(w, 13 | 14);
                let arrays = w != 12 || !(0..=3).contains(&op);
                !bad_comm && dtype_ok && (!reduces || op_ok) && (!rooted || root == 0) && fits && bufs && arrays
            }
        };
        if good {
            prop_assert_eq!(result, 0, "{}", last_error());
        } else {
            prop_assert_eq!(result, ResultCode::oxcclInvalidArgument as c_int, "{}", last_error());
            let msg = last_error();
            prop_assert!(msg.starts_with("oxccl"), "{}", msg);
            if bad_comm {
                prop_assert!(msg.contains("comm"), "{}", msg);
            }
        }
        if result == 0 && which <= 2 {
            prop_assert!(out_int >= 0);
        }
        if result == 0 && which == 3 && count > 0 && send != recv {
            // A sum over one rank: the input, unchanged.
            let (s, r) = if send == 1 { (&sbuf, &rbuf) } else { (&rbuf, &sbuf) };
            let n = count * size;
            // SAFETY: both buffers are 512 bytes, `n` at most 512.
            let (s, r) = unsafe {
                (
                    std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), n),
                    std::slice::from_raw_parts(r.as_ptr().cast::<u8>(), n),
                )
            };
            prop_assert_eq!(s, r);
        }
    }
}
