#!/usr/bin/env bash
# oxccl under the launchers people use, run for real and nested as clusters
# nest them: torchrun (with and without --standalone), srun, an sbatch
# script, mpirun inside salloc, torchrun inside srun. Every job runs
# oxccl-check, which checks every element on every rank and exits non-zero on
# any wrong one.
#
# Installs what it needs: torch from PyPI (CPU use), Open MPI and a
# single-node Slurm (../shared/launchers/slurm-up.sh, munge and slurm-wlm
# from Debian). Needs target/release/oxccl-check (cargo build --release -p oxccl-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
check=$PWD/target/release/oxccl-check
[ -x "$check" ] || { echo "build target/release/oxccl-check first" >&2; exit 1; }
export OXCCL_TIMEOUT=60
args=(-c all_reduce -b 1M -i 2 -w 1)
passed=0 failed=0
run() {  # run NAME COMMAND...: a job passes when it exits 0 within 5 minutes
  local name=$1; shift
  echo "-- $name: $*"
  if timeout 300 "$@"; then passed=$((passed + 1)); echo "-- $name: ok"
  else failed=$((failed + 1)); echo "-- $name: FAILED (exit $?)"; fi
}

if ! python3 -c 'import torch.distributed.run' 2>/dev/null; then
  python3 -m pip install -q torch==2.15.0
fi
if ! command -v mpirun >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin >/dev/null
fi

# torchrun's agent serves its store on MASTER_PORT; oxccl uses it as a client.
run "torchrun 2 ranks" torchrun --nproc-per-node 2 --no-python "$check" "${args[@]}"
run "torchrun --standalone 4 ranks" torchrun --standalone --nproc-per-node 4 --no-python "$check" "${args[@]}"
run "torchrun 2 ranks, every collective" torchrun --nproc-per-node 2 --master-port 29611 --no-python "$check" -c all -b 64K -i 1 -w 0
# A job secret shared by every rank, required: torch's store cannot be
# authenticated (oxccl says so), the ring links are.
secret=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
OXCCL_JOB_SECRET=$secret OXCCL_AUTH=require run "torchrun 2 ranks, authenticated links" torchrun --nproc-per-node 2 --master-port 29613 --no-python "$check" "${args[@]}"

# A single-node Slurm. SLURM_* reach every task; the innermost launcher wins.
# Without MASTER_ADDR, rank 0's address and port come from the launcher (one
# node: 127.0.0.1; the port from the job and step id).
bash ../shared/launchers/slurm-up.sh
mpi=(mpirun --allow-run-as-root --oversubscribe --bind-to none)
run "srun -n 4" srun -n 4 "$check" "${args[@]}"
run "mpirun inside salloc -n 4" salloc -n 4 "${mpi[@]}" -np 4 "$check" "${args[@]}"
run "torchrun inside srun" srun -n 1 torchrun --nproc-per-node 2 --no-python "$check" "${args[@]}"
OXCCL_JOB_SECRET=$secret OXCCL_AUTH=require run "srun -n 2, authenticated" srun -n 2 "$check" "${args[@]}"
OXCCL_JOB_SECRET=$secret OXCCL_AUTH=require run "mpirun -x OXCCL_JOB_SECRET inside salloc -n 2, authenticated" salloc -n 2 "${mpi[@]}" -x OXCCL_JOB_SECRET -x OXCCL_AUTH -np 2 "$check" "${args[@]}"
MASTER_ADDR=127.0.0.1 MASTER_PORT=29621 run "srun -n 2, rank 0's address given" srun -n 2 "$check" "${args[@]}"
job=$(mktemp -d)
cat >"$job/job.sh" <<EOF
#!/bin/bash
#SBATCH --job-name=oxccl-check
#SBATCH --ntasks=4
#SBATCH --output=$job/out.txt
srun $check ${args[*]}
EOF
run "sbatch --wait (srun inside)" sbatch --wait "$job/job.sh"
cat "$job/out.txt" || true
cat >"$job/mpi.sh" <<EOF
#!/bin/bash
#SBATCH --ntasks=4
#SBATCH --output=$job/mpi.txt
${mpi[*]} -np 4 $check ${args[*]}
EOF
run "sbatch --wait (mpirun inside)" sbatch --wait "$job/mpi.sh"
cat "$job/mpi.txt" || true
# Two jobs on one node at once: their derived ports differ.
srun -n 2 "$check" -c all_reduce -b 16M -i 3 -w 1 >"$job/a.txt" 2>&1 &
a=$!
run "a second job beside a running one" srun -n 2 "$check" "${args[@]}"
if wait "$a"; then passed=$((passed + 1)); echo "-- the first job: ok"
else failed=$((failed + 1)); echo "-- the first job: FAILED"; cat "$job/a.txt"; fi
echo "launchers: $passed passed, $failed failed"
[ "$failed" = 0 ]
