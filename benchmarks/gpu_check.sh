#!/usr/bin/env bash
# One prepared check for a GPU host with no network (issue 16): names the card, then measures, each step under its
# own timeout so the whole stays under 8 minutes, and appends one section to benchmarks/RESULTS.md:
#   1. the ViT-B-16 image tower in bf16, eager and CUDA-graphed, batch 1/64/256 (benchmarks/gpu_bench.py), against
#      the card's bf16 limit (its measured matmul rate over the tower's FLOPs: ~790 TFLOP/s / ~31-34 GFLOP, about
#      23,000-25,000 images/s on an H200);
#   2. the HQ-CLIP training step, ViT-B-16, batch 256, bf16: full objective vs contrastive only
#      (benchmarks/train_throughput.py);
#   3. the same tower through torch.compile, plain and with CUDA graphs (mode reduce-overhead), batch 256.
# FAISS on the GPU runs only where faiss with GPU support imports: faiss-gpu-cu12's cp312 wheel is 48 MB and needs
# CUDA 12's cuBLAS (nvidia-cublas-cu12, 581 MB), too big for the 64 MiB a device call carries; the section says so.
#
# The host it is made for (this workplace's nvidia-h200 lease): Python 3.12 with torch 2.11 (CUDA), timm, numpy,
# regex and the CPU onnxruntime, no network. What the benchmarks import beyond that travels as wheels in .whl/
# (ignored by git, ~5 MB), fetched here at the versions this checkout's .venv has:
#     bash benchmarks/gpu_check.sh --prepare-wheels
# On the GPU host, from the repository root (device tool: carry [".whl"], timeout_s 540):
#     bash benchmarks/gpu_check.sh --out "$OUT"        # then append $OUT/gpu_check.md to benchmarks/RESULTS.md here
# On a CPU, the same steps on a tiny random model in a few minutes (a smoke test of this script, no numbers):
#     bash benchmarks/gpu_check.sh --cpu --results /tmp/RESULTS.md --out /tmp/gpu_check
#
# Options: --out DIR (default build/gpu_check: the log, gpu_bench's JSON, and gpu_check.md, the section appended)
#          --results FILE (default benchmarks/RESULTS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(open_clip_torch ftfy wcwidth pydantic pydantic_core annotated-types typing-inspection typing_extensions)
PYTHON=${PYTHON:-python3}  # the H200's python3 holds torch; here: PYTHON=.venv/bin/python
mode=gpu
out=build/gpu_check
results=benchmarks/RESULTS.md
while (( $# )); do
  case $1 in
    --prepare-wheels) mode=wheels ;;
    --cpu) mode=cpu ;;
    --out) out=$2; shift ;;
    --results) results=$2; shift ;;
    *) echo "gpu_check.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

if [[ $mode == wheels ]]; then
  # The versions this checkout is tested with, for the H200's Python 3.12 (README of the device tool, "nvidia-h200").
  py=${PYTHON_VENV:-.venv/bin/python}
  rm -rf .whl && mkdir .whl
  for name in "${WHEELS[@]}"; do
    version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$name==$version"
  done
  du -sh .whl && ls .whl
  exit 0
fi

mkdir -p "$out" "$(dirname "$results")"
out=$(cd "$out" && pwd)
touch "$results"
results=$(cd "$(dirname "$results")" && pwd)/$(basename "$results")
log=$out/gpu_check.log
exec > >(tee "$log") 2>&1
start_bytes=$(stat -c %s "$results")
export PYTHONUNBUFFERED=1

if [[ $mode == gpu ]]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PYTHON" -c "import open_clip, pydantic, torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'" || {
    echo "gpu_check.sh: missing packages or no GPU; on a machine with network run" \
         "'bash benchmarks/gpu_check.sh --prepare-wheels' and carry .whl/ (or pass --cpu for a smoke test)"; exit 1; }
  card=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
  model=ViT-B-16 device=cuda
  tower=(--precisions bf16 --batch-sizes 1,64,256 --seconds 1 --repeats 3 --warmup 5)
  compiled=(--precisions bf16 --compiled-batch-sizes 256 --seconds 1 --repeats 3 --warmup 5)
  train=(--batch-size 256 --steps 5 --rounds 3)
  limits=(100 140 180)  # seconds per step: with the ~25 s of checks around them, under 8 minutes
else
  card="CPU $(lscpu | sed -n 's/^Model name: *//p' | head -1), no GPU: a smoke test of gpu_check.sh, not a benchmark"
  model=$out/tiny device=cpu
  "$PYTHON" -c "import sys; from testkit.tiny import write_tiny_checkpoint; write_tiny_checkpoint(sys.argv[1])" "$model"
  tower=(--precisions fp32 --batch-sizes 1,4 --seconds 0.2 --repeats 1 --warmup 2)
  compiled=(--precisions fp32 --compiled-batch-sizes 4 --seconds 0.2 --repeats 1 --warmup 2)
  train=(--batch-size 8 --steps 1 --rounds 1 --vocab 100)
  limits=(600 600 600)  # a shared 2-core box compiles slowly
fi
echo "gpu_check: $card"

if "$PYTHON" -c "import faiss, sys; sys.exit(faiss.get_num_gpus() == 0)" 2>/dev/null; then
  faiss_vectors=1000000 faiss_note="FAISS sees a GPU: flat and ivfpq, GPU vs CPU, 1M vectors, in the first table."
else
  faiss_vectors=0 faiss_note="FAISS on the GPU: not run (no faiss with GPU support here). faiss-gpu-cu12's cp312 \
wheel is 48 MB and needs CUDA 12's cuBLAS (nvidia-cublas-cu12 12.9, 581 MB) where this host has CUDA 13 only: over \
the 64 MiB a device call carries."
fi
py_facts=$("$PYTHON" -c "import platform, torch, os; print(f'Python {platform.python_version()}, torch \
{torch.__version__} (CUDA {torch.version.cuda}), {os.cpu_count()} CPU cores')")
{
  echo
  echo "## GPU check (benchmarks/gpu_check.sh): $card, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "$py_facts. Each step runs under its own timeout; a step that ran out says so below."
  echo "The serving runtimes (ONNX Runtime's CUDA and TensorRT providers, in process or in Triton) are not measured"
  echo "here: onnxruntime-gpu's cp312 wheel is 277 MB, over the carry, and the host has the CPU build; the torch rows"
  echo "bound what the tower can do on this card. $faiss_note"
} >> "$results"

failed=0
step() {  # step SECONDS NAME COMMAND...: run it; on a timeout or failure the section says so, with its rows so far
  local seconds=$1 name=$2 rc=0 own=$out/step.log
  shift 2
  echo "gpu_check: $name (timeout ${seconds}s)"
  timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$own" || rc=${PIPESTATUS[0]}
  if (( rc )); then
    local why="failed (exit $rc)"
    (( rc == 124 || rc == 137 )) && why="ran out of its ${seconds} s"
    { printf '\n%s: %s (the log: gpu_check.log). Its rows so far:\n\n' "$name" "$why"
      grep '^| ' "$own" || echo "(none)"; } >> "$results"
    failed=1
  fi
  rm -f "$own"
}

bench=(benchmarks/gpu_bench.py --model "$model" --device "$device" --workdir "$out/work" --record "$results")
step "${limits[0]}" "image tower, eager and CUDA-graphed" "$PYTHON" "${bench[@]}" --runtimes torch-eager,torch-cudagraph \
  "${tower[@]}" --faiss-vectors "$faiss_vectors" --json "$out/gpu_bench_eager.json"
step "${limits[1]}" "training step" "$PYTHON" benchmarks/train_throughput.py --model "$model" --device "$device" "${train[@]}" \
  --record "$results"
step "${limits[2]}" "image tower, torch.compile" "$PYTHON" "${bench[@]}" --runtimes torch-compile,torch-compile-cudagraph \
  "${compiled[@]}" --faiss-vectors 0 --json "$out/gpu_bench_compiled.json"

tail -c +"$((start_bytes + 1))" "$results" > "$out/gpu_check.md"
echo "gpu_check: done$( (( failed )) && echo ', with failed steps'); the section is in $out/gpu_check.md and was" \
     "appended to $results"
exit "$failed"
