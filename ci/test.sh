#!/usr/bin/env bash
# The checks CI runs on every submission, in order of cost.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== toolchain"
cargo --version
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== format"
cargo fmt --all -- --check

echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== tests (the README's test command)"
cargo test --workspace

echo "== quick start: the README's main job"
cargo build --release -p oxccl
target/release/oxrun -n 4 --timeout 300 -- target/release/oxccl-check -c all_reduce -b 64M
target/release/oxrun -n 2 --timeout 300 -- target/release/oxccl-check -c all -b 4M
