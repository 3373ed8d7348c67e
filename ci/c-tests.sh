#!/usr/bin/env bash
# The C API's checks: the committed header matches a fresh cbindgen run; the
# Rust unit tests of oxccl-ffi; liboxccl installed by ci/install-c; the C
# tests of bindings/c/tests compiled (C99, -Wall -Wextra -Werror) against the
# static and the shared library and run in one process and through oxrun
# (2 and 4 ranks); the same under valgrind and under AddressSanitizer (with
# UndefinedBehaviorSanitizer, the C side instrumented); the README example;
# a program that calls every entry point of the installed library with
# NCCL's argument lists (C and C++).
# Run from anywhere: bash ci/c-tests.sh (honours CARGO_TARGET_DIR; default target/).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
case $CARGO_TARGET_DIR in /*) ;; *) CARGO_TARGET_DIR=$root/$CARGO_TARGET_DIR ;; esac
CC=${CC:-cc}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
results=$work/results.txt
: > "$results"

run() {
    echo "+ $*"
    "$@"
}

# Runs a test program (with its launcher), keeps its "N passed, M failed"
# lines for the total, and fails on a non-zero exit.
run_test() {
    local log=$work/log.txt
    echo "+ $*"
    set +e
    "$@" 2>&1 | tee "$log"
    local status=${PIPESTATUS[0]}
    set -e
    grep -Eo '[0-9]+ passed, [0-9]+ failed' "$log" >> "$results" || true
    if [ "$status" -ne 0 ]; then
        echo "FAILED (exit $status): $*" >&2
        exit 1
    fi
    if ! grep -Eq '[0-9]+ passed, 0 failed' "$log"; then
        echo "FAILED (no passing summary line): $*" >&2
        exit 1
    fi
}

echo "== tools"
if ! command -v valgrind >/dev/null 2>&1 || ! command -v pkg-config >/dev/null 2>&1; then
    run apt-get update -qq
    run apt-get install -y -qq valgrind pkg-config
fi
cc_version=$($CC --version)
echo "${cc_version%%$'\n'*}"
valgrind --version

echo "== header (cbindgen, pinned)"
run bash ci/check-header.sh

echo "== Rust unit tests of oxccl-ffi"
run cargo test -p oxccl-ffi

echo "== install"
prefix=$work/prefix
run bash ci/install-c "$prefix"
run cargo build --release -p oxccl-tools --bin oxrun
oxrun=$CARGO_TARGET_DIR/release/oxrun
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
run readelf -d "$prefix/lib/liboxccl.so" | grep SONAME
echo "exported symbols:"
nm -D --defined-only "$prefix/lib/liboxccl.so" | awk '$2 == "T" { print "  " $3 }' | tee "$work/symbols.txt"
for sym in oxcclGetVersion oxcclGetUniqueId oxcclCommInitRank oxcclCommInitAll oxcclCommInitFromEnv \
    oxcclCommDestroy oxcclCommAbort oxcclCommCount oxcclCommUserRank oxcclCommGetAsyncError \
    oxcclAllReduce oxcclBroadcast oxcclReduce oxcclAllGather oxcclReduceScatter \
    oxcclSend oxcclRecv oxcclAllToAll oxcclAllToAllv oxcclGather oxcclScatter \
    oxcclCommSplit oxcclCommShrink oxcclGroupStart oxcclGroupEnd oxcclGetErrorString oxcclGetLastError; do
    grep -qx "  $sym" "$work/symbols.txt" || { echo "missing symbol $sym" >&2; exit 1; }
done
if grep -v '^  oxccl' "$work/symbols.txt"; then
    echo "liboxccl.so exports symbols outside the oxccl namespace (above)" >&2
    exit 1
fi

echo "== compile (C99, -Wall -Wextra -Werror; static and shared)"
cflags=(-std=c99 -Wall -Wextra -Werror -pedantic -g -O1)
# The header alone, as C99 and (when a C++ compiler is there) as C++.
printf '#include <oxccl.h>\nint main(void) { return OXCCL_VERSION_CODE == 100 ? 0 : 1; }\n' > "$work/header.c"
run $CC "${cflags[@]}" $(pkg-config --cflags oxccl) "$work/header.c" -o "$work/header"
if command -v c++ >/dev/null 2>&1; then
    run c++ -x c++ -Wall -Wextra -Werror $(pkg-config --cflags oxccl) "$work/header.c" -o "$work/header-cxx"
fi
# Every entry point through the installed header and shared library, with
# NCCL's argument types (a wrong prototype fails to compile as C or C++):
# each refuses a NULL communicator with oxcclInvalidArgument. (As C++ it
# names oxcclFloat32: the alias oxcclFloat is an int, which C++ does not
# convert to the enum.)
cat > "$work/entry.c" <<'C'
#include <stddef.h>
#include <stdio.h>
#include <oxccl.h>
static int bad = 0;
static void refused(oxcclResult_t r, const char *name) {
  if (r != oxcclInvalidArgument) { fprintf(stderr, "%s returned %d\n", name, (int)r); bad = 1; }
}
int main(void) {
  float a[4] = {0}, b[4] = {0};
  size_t counts[1] = {1}, displs[1] = {0};
  oxcclComm_t c = NULL;
  refused(oxcclAllReduce(a, b, 4, oxcclFloat32, oxcclSum, c, NULL), "oxcclAllReduce");
  refused(oxcclBroadcast(a, b, 4, oxcclFloat32, 0, c, NULL), "oxcclBroadcast");
  refused(oxcclReduce(a, b, 4, oxcclFloat32, oxcclSum, 0, c, NULL), "oxcclReduce");
  refused(oxcclAllGather(a, b, 1, oxcclFloat32, c, NULL), "oxcclAllGather");
  refused(oxcclReduceScatter(a, b, 1, oxcclFloat32, oxcclSum, c, NULL), "oxcclReduceScatter");
  refused(oxcclSend(a, 4, oxcclFloat32, 0, c, NULL), "oxcclSend");
  refused(oxcclRecv(b, 4, oxcclFloat32, 0, c, NULL), "oxcclRecv");
  refused(oxcclAllToAll(a, b, 1, oxcclFloat32, c, NULL), "oxcclAllToAll");
  refused(oxcclAllToAllv(a, counts, displs, b, counts, displs, oxcclFloat32, c, NULL), "oxcclAllToAllv");
  refused(oxcclGather(a, b, 1, oxcclFloat32, 0, c, NULL), "oxcclGather");
  refused(oxcclScatter(a, b, 1, oxcclFloat32, 0, c, NULL), "oxcclScatter");
  if (!bad) printf("entry points: 11 passed, 0 failed\n");
  return bad;
}
C
run $CC "${cflags[@]}" "$work/entry.c" $(pkg-config --cflags --libs oxccl) -Wl,-rpath,"$prefix/lib" -o "$work/entry"
if command -v c++ >/dev/null 2>&1; then
    run c++ -x c++ -Wall -Wextra -Werror "$work/entry.c" $(pkg-config --cflags --libs oxccl) \
        -Wl,-rpath,"$prefix/lib" -o "$work/entry-cxx"
fi
asan=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
for t in collectives errors threads leaks; do
    run $CC "${cflags[@]}" "${asan[@]}" -I "$prefix/include" "bindings/c/tests/$t.c" \
        "$prefix/lib/liboxccl.a" -lpthread -ldl -lm -o "$work/$t-asan"
    run $CC "${cflags[@]}" -I "$prefix/include" "bindings/c/tests/$t.c" \
        "$prefix/lib/liboxccl.a" -lpthread -ldl -lm -o "$work/$t-static"
    run $CC "${cflags[@]}" "bindings/c/tests/$t.c" $(pkg-config --cflags --libs oxccl) \
        -lpthread -Wl,-rpath,"$prefix/lib" -o "$work/$t-shared"
done
# The README example, built exactly as the README says.
run $CC "${cflags[@]}" bindings/c/examples/allreduce.c $(pkg-config --cflags --libs oxccl) \
    -Wl,-rpath,"$prefix/lib" -o "$work/allreduce"
# ldd's output is captured before it is searched: `ldd | grep -q` under pipefail
# fails when grep exits at the first match and ldd dies writing the rest.
shared_deps=$(ldd "$work/threads-shared")
static_deps=$(ldd "$work/threads-static")
grep -q "liboxccl.so.0 => $prefix/lib/" <<<"$shared_deps" || { echo "shared test not linked to liboxccl.so.0:" >&2; echo "$shared_deps" >&2; exit 1; }
if grep -q liboxccl <<<"$static_deps"; then echo "static test links liboxccl.so:" >&2; echo "$static_deps" >&2; exit 1; fi

echo "== run"
cd "$work"
run_test ./entry
if [ -x ./entry-cxx ]; then run_test ./entry-cxx; fi
for kind in static shared; do
    run_test "./threads-$kind"
    run_test "./leaks-$kind"
    for n in 2 4; do
        run_test "$oxrun" -n "$n" --timeout 300 -- "./collectives-$kind" "$work/id-$kind-$n"
        run_test "$oxrun" -n "$n" --timeout 300 -- "./errors-$kind"
    done
    # A world that is no power of two: averages round to the type.
    run_test "$oxrun" -n 3 --timeout 300 -- "./collectives-$kind" "$work/id-$kind-3"
done
echo "+ $oxrun -n 3 -- ./allreduce"
"$oxrun" -n 3 --timeout 120 -- ./allreduce | tee "$work/example.txt"
[ "$(grep -c 'sum 3 (expected 3)' "$work/example.txt")" -eq 3 ] || { echo "example: wrong sums" >&2; exit 1; }
echo "1 passed, 0 failed" >> "$results"

echo "== valgrind"
vg=(valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite --show-leak-kinds=definite)
run_test "${vg[@]}" ./threads-static
run_test "${vg[@]}" ./threads-shared
run_test env OXCCL_TIMEOUT=120 "$oxrun" -n 2 --timeout 600 -- "${vg[@]}" ./collectives-static "$work/id-vg"
run_test env OXCCL_TIMEOUT=120 "$oxrun" -n 2 --timeout 600 -- "${vg[@]}" ./errors-shared

echo "== AddressSanitizer and UndefinedBehaviorSanitizer (the C side; leaks are valgrind's)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
run_test ./threads-asan
run_test ./leaks-asan
for n in 2 4; do
    run_test "$oxrun" -n "$n" --timeout 300 -- ./collectives-asan "$work/id-asan-$n"
    run_test "$oxrun" -n "$n" --timeout 300 -- ./errors-asan
done
unset ASAN_OPTIONS UBSAN_OPTIONS

cd "$root"
passed=$(awk '{ p += $1 } END { print p + 0 }' "$results")
failed=$(awk '{ f += $3 } END { print f + 0 }' "$results")
echo "== C API checks done ($(wc -l < "$results") programs or ranks)"
echo "c-tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
