//! Case counts and byte mutations shared by the fuzz targets of every crate
//! (the collectives and the C API include this file with `#[path]`).

// Each crate that includes this file uses a part of it.
#![allow(dead_code)]

use proptest::prelude::*;
use proptest::test_runner::Config;

/// Cases per target when `OXCCL_FUZZ_CASES` is not set: small, so that the
/// short run in the README's test command stays within seconds.
pub const DEFAULT_CASES: u32 = 512;

/// Cases per target: `OXCCL_FUZZ_CASES`, else [`DEFAULT_CASES`]. A value
/// that is not a number fails the run rather than being ignored.
pub fn cases() -> u32 {
    match std::env::var("OXCCL_FUZZ_CASES") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("OXCCL_FUZZ_CASES={v:?} is not a number of cases")),
        Err(_) => DEFAULT_CASES,
    }
}

/// The proptest configuration of every fuzz target: [`cases`] cases.
pub fn config() -> Config {
    Config {
        cases: cases(),
        ..Config::default()
    }
}

/// The same, with at most `max` cases, for targets whose cases cost a
/// connection or a thread.
pub fn config_at_most(max: u32) -> Config {
    Config {
        cases: cases().min(max),
        ..Config::default()
    }
}

/// A `div`th of the cases (at least 16), at most `max`, for targets whose
/// cases cost a wait.
pub fn config_scaled(div: u32, max: u32) -> Config {
    Config {
        cases: (cases() / div.max(1)).clamp(16.min(max), max),
        ..Config::default()
    }
}

/// Values at the edges of what a field holds, and any other.
pub fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(2),
        Just(7),
        Just(8),
        Just(0xff),
        Just(0x100),
        Just(u64::from(u16::MAX)),
        Just(u64::from(u32::MAX)),
        Just(u64::from(u32::MAX) + 1),
        Just(64 << 20),
        Just((64 << 20) + 1),
        Just(i64::MAX as u64),
        Just(i64::MIN as u64),
        Just(u64::MAX - 1),
        Just(u64::MAX),
        any::<u64>(),
        0u64..300,
    ]
}

/// One change to a valid encoding.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Flip bit `.1 % 8` of the byte at `.0` (modulo the length).
    Flip(usize, u8),
    /// Put a field of `.2` bytes (1, 2, 4 or 8), little-endian, holding an
    /// edge value, at `.0`: lengths past the buffer, counts of zero or max.
    Field(usize, u64, u8),
    /// Cut to `.0` bytes (modulo the length plus one).
    Truncate(usize),
    /// Append bytes.
    Extend(Vec<u8>),
}

/// A mutation.
pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        3 => (any::<usize>(), edge_u64(), prop_oneof![Just(1u8), Just(2), Just(4), Just(8)])
            .prop_map(|(i, v, w)| Mutation::Field(i, v, w)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => proptest::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Extend),
    ]
}

/// One to four mutations.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 1..4)
}

/// `bytes` with `ms` applied in order.
pub fn mutate(mut bytes: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        match m {
            Mutation::Flip(i, b) => {
                if !bytes.is_empty() {
                    let i = i % bytes.len();
                    bytes[i] ^= 1 << (b % 8);
                }
            }
            Mutation::Field(i, v, w) => {
                if !bytes.is_empty() {
                    let i = i % bytes.len();
                    let w = usize::from(*w).min(bytes.len() - i);
                    bytes[i..i + w].copy_from_slice(&v.to_le_bytes()[..w]);
                }
            }
            Mutation::Truncate(n) => bytes.truncate(n % (bytes.len() + 1)),
            Mutation::Extend(more) => bytes.extend_from_slice(more),
        }
    }
    bytes
}

/// Arbitrary bytes of a length up to `max`, biased to short inputs.
pub fn any_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => proptest::collection::vec(any::<u8>(), 0..=max.min(64)),
        1 => proptest::collection::vec(any::<u8>(), 0..=max),
    ]
}
