//! Shrinking after a failure: the survivors agree on who is left, form a
//! new communicator in the old order, and go on; also when the caller
//! names the ranks to leave out, and when a rank neither comes nor is
//! reported gone (the decision waits `OXCCL_TIMEOUT` for it).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use oxccl::{Communicator, Config, ReduceOp, Transport, UniqueId, run_in_process};

fn config(transport: Transport, timeout_s: u64) -> Config {
    Config {
        transport,
        timeout: Duration::from_secs(timeout_s),
        ..Config::default()
    }
}

/// Sums each member's rank here (in the old numbering) over the new
/// communicator: (new rank, new world, the sum).
fn sum_of_old_ranks(old: usize, c: &mut Communicator) -> (usize, usize, i64) {
    let mut x = [old as i64];
    c.all_reduce_in_place(&mut x, ReduceOp::Sum).unwrap();
    (c.rank(), c.world(), x[0])
}

/// Rank 2 of 4 dies (aborts and leaves); the others' call fails naming it,
/// they shrink without saying whom to leave out, and go on as 3 ranks.
#[test]
fn survivors_of_a_failure_shrink_and_go_on() {
    for transport in [Transport::Shm, Transport::Tcp] {
        let out = run_in_process(4, config(transport, 10), |c: &mut Communicator| {
            let r = c.rank();
            if r == 2 {
                c.abort_handle().abort();
                return None;
            }
            let mut x = [1.0f32; 1000];
            let e = c.all_reduce_in_place(&mut x, ReduceOp::Sum).unwrap_err();
            assert!(e.to_string().contains("rank 2"), "{e}");
            let mut s = c.shrink(&[]).unwrap();
            Some(sum_of_old_ranks(r, &mut s))
        })
        .unwrap();
        assert_eq!(
            out,
            vec![Some((0, 3, 4)), Some((1, 3, 4)), None, Some((2, 3, 4))],
            "{transport:?}"
        );
    }
}

/// Ranks the caller names are left out at once; a healthy communicator
/// shrinks too; and a shrunk communicator's failures name ranks in the
/// numbering before.
#[test]
fn named_ranks_are_left_out_and_a_shrunk_communicator_names_old_ranks() {
    let out = run_in_process(4, config(Transport::Shm, 10), |c: &mut Communicator| {
        let r = c.rank();
        if r == 1 {
            return None;
        }
        let mut s = c.shrink(&[1]).unwrap();
        let got = sum_of_old_ranks(r, &mut s);
        // Old rank 3 (new rank 2) gives up; the others' error names it both ways.
        let e = if r == 3 {
            s.abort_handle().abort();
            None
        } else {
            let mut x = [1i32];
            Some(
                s.all_reduce_in_place(&mut x, ReduceOp::Sum)
                    .unwrap_err()
                    .to_string(),
            )
        };
        Some((got, e))
    })
    .unwrap();
    for r in [0, 2, 3] {
        let (got, _) = out[r].as_ref().unwrap();
        assert_eq!(got.1, 3);
        assert_eq!(got.2, 5);
    }
    let e = out[0].as_ref().unwrap().1.as_ref().unwrap();
    assert!(
        e.contains("[split: ranks 0, 1, 2 here are ranks 0, 2, 3 of the parent]"),
        "{e}"
    );
    let bad = run_in_process(2, config(Transport::Shm, 10), |c: &mut Communicator| {
        (
            c.shrink(&[7]).unwrap_err().to_string(),
            c.shrink(&[c.rank()]).unwrap_err().to_string(),
        )
    })
    .unwrap();
    assert!(
        bad[0]
            .0
            .contains("rank 7 to exclude is not below the world size 2"),
        "{}",
        bad[0].0
    );
    assert!(bad[0].1.contains("excludes itself"), "{}", bad[0].1);
}

/// A rank that neither comes nor is reported gone is waited for
/// `OXCCL_TIMEOUT`, then left out; coming later, it is told so.
#[test]
fn a_silent_rank_is_waited_for_then_left_out() {
    let out = run_in_process(3, config(Transport::Shm, 2), |c: &mut Communicator| {
        let r = c.rank();
        if r == 2 {
            std::thread::sleep(Duration::from_secs(4));
            return Err(c.shrink(&[]).unwrap_err().to_string());
        }
        let t = Instant::now();
        let mut s = c.shrink(&[]).unwrap();
        let took = t.elapsed();
        Ok((sum_of_old_ranks(r, &mut s), took))
    })
    .unwrap();
    for (r, o) in out.iter().take(2).enumerate() {
        let ((_, world, sum), took) = o.as_ref().unwrap();
        assert_eq!((*world, *sum), (2, 1));
        assert!(
            *took >= Duration::from_millis(1900),
            "rank {r} decided after {took:?}"
        );
    }
    let late = out[2].as_ref().unwrap_err();
    assert!(late.contains("decided without this rank"), "{late}");
}

/// Ranks that met through a unique id (oxccl's TCP store in rank 0's
/// process) lose rank 3 and shrink.
#[test]
fn a_unique_id_job_shrinks() {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let ranks: Vec<_> = (0..4)
        .map(|r| {
            std::thread::spawn(move || {
                let mut c =
                    Communicator::init_with_config(&id, r, 4, config(Transport::Tcp, 10)).unwrap();
                if r == 3 {
                    drop(c);
                    return None;
                }
                let mut x = [1u8; 4096];
                c.all_reduce_in_place(&mut x, ReduceOp::Max).unwrap_err();
                let mut s = c.shrink(&[]).unwrap();
                Some(sum_of_old_ranks(r, &mut s))
            })
        })
        .collect();
    let out: Vec<_> = ranks.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        out,
        vec![Some((0, 3, 3)), Some((1, 3, 3)), Some((2, 3, 3)), None]
    );
}
