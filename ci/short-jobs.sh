#!/usr/bin/env bash
# short-jobs.sh -- many short jobs in a row (oxrun, 4 ranks, a few
# collectives each, alternating shared memory and TCP, now and then a job
# whose rank is killed mid-run): afterwards no shared-memory segment, rank
# process, listening socket or store of theirs may be left behind. Prints
# the counts before and after, and fails on any leftover.
#
#   JOBS=200 bash ci/short-jobs.sh     # the long run (README, "Reliability")
#   JOBS=6 bash ci/short-jobs.sh       # CI
set -euo pipefail
cd "$(dirname "$0")/.."
command -v ss >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; }
command -v pgrep >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq procps >/dev/null; }
JOBS=${JOBS:-6}
BIN=${CARGO_TARGET_DIR:-target}/release
[ -x "$BIN/oxccl-check" ] && [ -x "$BIN/oxrun" ] || cargo build --release -p oxccl-tools >&2

segments() { find /dev/shm -maxdepth 1 -name 'oxccl*' 2>/dev/null | wc -l; }
ranks() { pgrep -f "$BIN/(oxccl-check|oxrun)" | wc -l || true; }
# Listening sockets of oxccl's programs (others on the machine come and go).
listening() { ss -Hltnp 2>/dev/null | grep -c -e '"oxccl-check"' -e '"oxrun"' || true; }

before="segments $(segments), ranks and launchers $(ranks), their listening sockets $(listening)"
echo "# short-jobs: $JOBS jobs; before: $before"
killed=0
start=$(date +%s)
for j in $(seq 1 "$JOBS"); do
  transport=$([ $((j % 2)) = 0 ] && echo shm || echo tcp)
  if [ $((j % 10)) = 5 ]; then
    # Every tenth job: a rank (the newest) is killed mid-run; oxrun must
    # stop the rest, and their segments must go with them.
    OXCCL_TRANSPORT=$transport OXCCL_TIMEOUT=5 "$BIN/oxrun" -n 4 -- "$BIN/oxccl-check" \
      -c all_reduce -b 1M -i 100000 > /dev/null 2>&1 &
    sleep 0.5
    pkill -9 -f "$BIN/oxccl-check" -n || true
    wait || true
    killed=$((killed + 1))
  else
    OXCCL_TRANSPORT=$transport "$BIN/oxrun" -n 4 -- "$BIN/oxccl-check" -c all -b 64K -i 1 -w 0 > /dev/null
  fi
done
sleep 1
after="segments $(segments), ranks and launchers $(ranks), their listening sockets $(listening)"
echo "# short-jobs: $JOBS jobs ($killed with a rank killed) in $(( $(date +%s) - start )) s; after: $after"
if [ "$before" != "$after" ]; then
  echo "short-jobs: something was left behind" >&2
  find /dev/shm -maxdepth 1 -name 'oxccl*' >&2 || true
  exit 1
fi
