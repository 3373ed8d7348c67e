#!/usr/bin/env bash
# Compiles every CUDA kernel of oxccl-kernels (kernels/src/cuda/reduce.cu, the
# text the Rust code embeds) to PTX for compute_80 and compute_90 with NVRTC,
# then assembles each PTX with ptxas for sm_80 and sm_90. Fails on any error
# or warning. Needs no GPU: NVRTC, the CUDA headers and ptxas come from
# NVIDIA's PyPI wheels, installed into a venv (reused when present).
#
# Usage: ci/cuda-ptx.sh            (venv in $OXCCL_CUDA_VENV, default ~/.cache/oxccl/cuda-venv)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${OXCCL_CUDA_VENV:-$HOME/.cache/oxccl/cuda-venv}"
src="$root/kernels/src/cuda/reduce.cu"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import nvidia.cuda_nvrtc, nvidia.cuda_runtime, nvidia.cuda_nvcc' 2>/dev/null; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'nvidia-cuda-nvrtc-cu12' 'nvidia-cuda-runtime-cu12' 'nvidia-cuda-nvcc-cu12'
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

"$venv/bin/python" - "$src" "$out" <<'PY'
import ctypes, glob, os, sys

import nvidia.cuda_nvrtc, nvidia.cuda_runtime

def pkg_dir(mod):
    return list(mod.__path__)[0]

src_path, out = sys.argv[1], sys.argv[2]
libs = sorted(glob.glob(os.path.join(pkg_dir(nvidia.cuda_nvrtc), "lib", "libnvrtc.so*")))
libs = [l for l in libs if "builtins" not in l and "alt" not in l]
if not libs:
    sys.exit("libnvrtc.so not found in the nvidia-cuda-nvrtc wheel")
nvrtc = ctypes.CDLL(libs[0])
include = os.path.join(pkg_dir(nvidia.cuda_runtime), "include")
if not os.path.exists(os.path.join(include, "cuda_fp16.h")):
    sys.exit(f"cuda_fp16.h not in {include}")

major, minor = ctypes.c_int(), ctypes.c_int()
nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
print(f"NVRTC {major.value}.{minor.value} ({libs[0]})")
nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p

def check(code, what):
    if code != 0:
        sys.exit(f"{what}: {nvrtc.nvrtcGetErrorString(code).decode()}")

source = open(src_path, "rb").read()
failed = False
for arch in ("compute_80", "compute_90"):
    prog = ctypes.c_void_p()
    check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source, b"reduce.cu", 0, None, None),
          "nvrtcCreateProgram")
    # The options the Rust backend uses, plus -I for the wheel's headers.
    opts = [f"--gpu-architecture={arch}", "--std=c++17", "-I" + include]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    code = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    text = log.value.decode().strip()
    if code != 0 or text:
        print(f"{arch}: NVRTC {'failed' if code else 'warned'}:\n{text}")
        failed = True
        continue
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    check(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    path = os.path.join(out, f"reduce.{arch}.ptx")
    with open(path, "wb") as f:
        f.write(ptx.value)
    kernels = ptx.value.count(b".entry ")
    print(f"{arch}: {kernels} kernels, {len(ptx.value)} bytes of PTX")
    if kernels != 50:
        print(f"{arch}: expected 50 kernels (40 reduce + 10 avg)")
        failed = True
sys.exit(1 if failed else 0)
PY

nvcc_dir="$("$venv/bin/python" -c 'import nvidia.cuda_nvcc as m; print(list(m.__path__)[0])')"
ptxas="$nvcc_dir/bin/ptxas"
chmod +x "$ptxas" 2>/dev/null || true
status=0
for sm in 80 90; do
    err="$out/ptxas.sm_$sm.err"
    if ! "$ptxas" --gpu-name "sm_$sm" --warn-on-spills -o "$out/reduce.sm_$sm.cubin" \
        "$out/reduce.compute_$sm.ptx" 2>"$err"; then
        echo "ptxas sm_$sm failed:"; cat "$err"; status=1; continue
    fi
    if [ -s "$err" ]; then
        echo "ptxas sm_$sm printed warnings:"; cat "$err"; status=1; continue
    fi
    echo "sm_$sm: ptxas OK ($(stat -c %s "$out/reduce.sm_$sm.cubin") bytes of SASS)"
done
exit $status
