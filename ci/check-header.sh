#!/usr/bin/env bash
# Regenerates bindings/c/include/oxccl.h with the pinned cbindgen into a
# temporary file and fails if it differs from the committed header.
set -euo pipefail
cd "$(dirname "$0")/.."

CBINDGEN_VERSION=0.29.4
if ! command -v cbindgen >/dev/null 2>&1 || [ "$(cbindgen --version)" != "cbindgen $CBINDGEN_VERSION" ]; then
    echo "+ cargo install cbindgen --version $CBINDGEN_VERSION --locked"
    cargo install cbindgen --version "$CBINDGEN_VERSION" --locked --force
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "+ (cd bindings/c && cbindgen --config cbindgen.toml --crate oxccl-ffi --output $tmp/oxccl.h)"
# cbindgen warns (on stderr) that it cannot find the int typedefs it is told
# to exclude; that is intended (the header declares them as enums).
(cd bindings/c && cbindgen --quiet --config cbindgen.toml --crate oxccl-ffi --output "$tmp/oxccl.h")
if ! diff -u bindings/c/include/oxccl.h "$tmp/oxccl.h"; then
    echo "bindings/c/include/oxccl.h is out of date: regenerate it with" >&2
    echo "  (cd bindings/c && cbindgen --config cbindgen.toml --crate oxccl-ffi --output include/oxccl.h)" >&2
    exit 1
fi
echo "header: bindings/c/include/oxccl.h is up to date (cbindgen $CBINDGEN_VERSION)"
