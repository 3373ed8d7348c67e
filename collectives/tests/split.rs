//! Communicator split: groups by color, ordered by key then by parent rank;
//! ranks without a color; nested splits; the new communicators running
//! collectives at the same time as each other and as the parent.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use oxccl::{Communicator, Config, ReduceOp, Transport, run_in_process};

fn config(transport: Transport) -> Config {
    Config {
        transport,
        timeout: Duration::from_secs(30),
        ..Config::default()
    }
}

/// What one rank saw of its new communicator: (rank, world, the parent
/// ranks of its members in its order, the sum of their parent ranks).
fn describe(parent_rank: usize, c: &mut Communicator) -> (usize, usize, Vec<i64>, i64) {
    let mut members = vec![0i64; c.world()];
    c.all_gather(&[parent_rank as i64], &mut members).unwrap();
    let mut sum = [parent_rank as i64];
    c.all_reduce_in_place(&mut sum, ReduceOp::Sum).unwrap();
    (c.rank(), c.world(), members, sum[0])
}

/// The groups `split(color, key)` must form: members by color, ordered by
/// (key, parent rank).
fn expected(colors: &[Option<u32>], keys: &[i64], rank: usize) -> Option<Vec<i64>> {
    let color = colors[rank]?;
    let mut m: Vec<(i64, usize)> = (0..colors.len())
        .filter(|&r| colors[r] == Some(color))
        .map(|r| (keys[r], r))
        .collect();
    m.sort_unstable();
    Some(m.into_iter().map(|(_, r)| r as i64).collect())
}

fn check(world: usize, colors: Vec<Option<u32>>, keys: Vec<i64>, transport: Transport) {
    let got = run_in_process(world, config(transport), |c: &mut Communicator| {
        let r = c.rank();
        let sub = c.split(colors[r], keys[r]).unwrap();
        // The parent still works, after and around its children.
        let mut x = [1u32];
        c.all_reduce_in_place(&mut x, ReduceOp::Sum).unwrap();
        assert_eq!(x[0], world as u32);
        sub.map(|mut s| describe(r, &mut s))
    })
    .unwrap();
    for (r, g) in got.into_iter().enumerate() {
        match (expected(&colors, &keys, r), g) {
            (None, None) => {}
            (Some(members), Some((rank, size, seen, sum))) => {
                assert_eq!(seen, members, "rank {r}: members in order");
                assert_eq!(size, members.len());
                assert_eq!(members[rank], r as i64, "rank {r}: its new rank");
                assert_eq!(sum, members.iter().sum::<i64>());
            }
            (want, got) => panic!("rank {r}: expected {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn colors_group_and_keys_order() {
    // Even and odd ranks, each group in reverse order of rank.
    let keys: Vec<i64> = (0..6).map(|r| -r).collect();
    check(
        6,
        (0..6).map(|r| Some(r % 2)).collect(),
        keys,
        Transport::Shm,
    );
    // Equal keys: ties keep the parent's order; one color over TCP.
    check(4, vec![Some(7); 4], vec![0; 4], Transport::Tcp);
}

#[test]
fn ranks_without_a_color_get_none() {
    check(
        5,
        vec![None, Some(3), None, Some(3), Some(1)],
        vec![0, 5, 0, 2, 9],
        Transport::Shm,
    );
}

/// Random colorings (a seeded generator: the same on every run).
#[test]
fn random_colorings() {
    let mut s = 0x5EED_u64;
    let mut next = move |n: u64| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) % n
    };
    for _ in 0..6 {
        let world = 2 + next(6) as usize;
        let colors = (0..world)
            .map(|_| match next(4) {
                0 => None,
                c => Some(c as u32),
            })
            .collect();
        let keys = (0..world).map(|_| next(3) as i64 - 1).collect();
        let transport = if next(2) == 0 {
            Transport::Shm
        } else {
            Transport::Tcp
        };
        check(world, colors, keys, transport);
    }
}

/// A split of a split, and both levels used at once: the grandchildren run
/// allreduces while the children and the parent run theirs.
#[test]
fn nested_splits_run_at_the_same_time() {
    let world = 8;
    let out = run_in_process(world, config(Transport::Shm), |c: &mut Communicator| {
        let r = c.rank();
        let mut half = c.split(Some((r / 4) as u32), 0).unwrap().unwrap();
        let mut pair = half
            .split(Some((half.rank() / 2) as u32), 0)
            .unwrap()
            .unwrap();
        let mut sums = Vec::new();
        for i in 0..20i64 {
            let mut a = [r as i64 + i];
            pair.all_reduce_in_place(&mut a, ReduceOp::Sum).unwrap();
            let mut b = [r as i64];
            half.all_reduce_in_place(&mut b, ReduceOp::Max).unwrap();
            let mut d = [1i64];
            c.all_reduce_in_place(&mut d, ReduceOp::Sum).unwrap();
            sums.push((a[0], b[0], d[0]));
        }
        (pair.world(), sums)
    })
    .unwrap();
    for (r, (pair_world, sums)) in out.into_iter().enumerate() {
        assert_eq!(pair_world, 2);
        let mate = r ^ 1;
        for (i, (a, b, d)) in sums.into_iter().enumerate() {
            let i = i as i64;
            assert_eq!(a, (r + mate) as i64 + 2 * i, "rank {r}, call {i}");
            assert_eq!(b, (r / 4 * 4 + 3) as i64);
            assert_eq!(d, world as i64);
        }
    }
}

/// Ranks that meet through a unique id (a TCP store, a job secret) split
/// the same way; the new communicators authenticate with the parent's
/// secret and bootstrap through its store.
#[test]
fn a_unique_id_world_splits() {
    let id = oxccl::UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    assert!(id.has_secret());
    let ranks: Vec<_> = (0..4)
        .map(|r| {
            std::thread::spawn(move || {
                let mut c =
                    Communicator::init_with_config(&id, r, 4, config(Transport::Tcp)).unwrap();
                let mut s = c.split(Some((r % 2) as u32), 0).unwrap().unwrap();
                describe(r, &mut s)
            })
        })
        .collect();
    for (r, t) in ranks.into_iter().enumerate() {
        let (rank, world, members, sum) = t.join().unwrap();
        assert_eq!((rank, world), (r / 2, 2));
        assert_eq!(members, vec![(r % 2) as i64, (r % 2 + 2) as i64]);
        assert_eq!(sum, (2 * (r % 2) + 2) as i64);
    }
}

/// A failure in one new communicator fails its own ranks, naming the rank
/// that failed in both numberings; the other group and the parent go on.
#[test]
fn a_failure_stays_in_its_group() {
    let out = run_in_process(4, config(Transport::Shm), |c: &mut Communicator| {
        let r = c.rank();
        // Groups {0, 2} and {1, 3}, in reverse order: rank 0 here is rank
        // 2 of the parent, rank 1 is rank 0.
        let mut s = c.split(Some((r % 2) as u32), -(r as i64)).unwrap().unwrap();
        let result = if r == 2 {
            // Parent rank 2 gives up; its partner's call must fail.
            s.abort_handle().abort();
            Ok(())
        } else {
            let mut x = [1i32];
            s.all_reduce_in_place(&mut x, ReduceOp::Sum)
                .map(|()| assert_eq!(x[0], 2))
        };
        let mut y = [1i32];
        c.all_reduce_in_place(&mut y, ReduceOp::Sum).unwrap();
        (result.map_err(|e| e.to_string()), y[0])
    })
    .unwrap();
    let (partner, _) = &out[0];
    let e = partner.as_ref().unwrap_err();
    assert!(e.contains("rank 1: ") && e.contains("rank 0"), "{e}");
    assert!(
        e.contains("[split: ranks 0, 1 here are ranks 2, 0 of the parent]"),
        "{e}"
    );
    for (r, (result, parent_sum)) in out.iter().enumerate() {
        assert_eq!(*parent_sum, 4, "rank {r}: the parent still works");
        if r % 2 == 1 {
            assert!(result.is_ok(), "rank {r}: {result:?}");
        }
    }
}
