#!/usr/bin/env bash
# GPU checks of issue 11 (long traces) and issue 10 (generation) in one device budget.
#
# Prepared, NOT YET RUN (no device was lent to the session that wrote it). Runs on a lent
# NVIDIA H200 (torch and transformers installed there, TransformerLens not) in the
# repository root, writing under $OUT (or results/gpu when OUT is unset):
#
# 1. Long traces (bench_attention.py): DeepSeek-R1-Distill-Qwen-1.5B's shape (preset
#    r1-1.5b: 28 layers, d_model 1536, 12 heads / 2 KV heads, d_mlp 8960), random
#    weights, bf16, at 8k / 16k / 32k tokens. Methods: the plain HF SDPA forward (base of
#    the ratios), the bridge's eager forward, residual capture of every layer,
#    attention="sentence" and ["vertical", "columns"] (blockwise), TransformerLens's
#    run_with_cache of every pattern (recorded as OOM where it is: 28 x 12 x T^2 x 2 B is
#    22.5 GB at 8k and 361 GB at 32k). CUDA peak = torch.cuda.max_memory_allocated.
#    2 interleaved rounds at 8k and 16k; 32k gets the memory pass only (its time is that
#    pass: one round).
# 2. Generation (bench_generate.py): the organism (built locally, no download) on CUDA,
#    think_batch / generate_ids against plain HF generate; vLLM rows only if vllm
#    imports there (it is not in the machine's package list).
#
# Prepare here, once (wheels travel with `carry`, see /work/.library/device/README.md):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl transformer-lens==4.3.0 transformers==5.19.0 \
#     fancy-einsum==0.0.3 beartype==0.23.1 typeguard==4.6.1 plotly==7.1.0 gguf==0.19.0 \
#     transformers-stream-generator==0.0.5 better-abc==0.0.3 wandb==0.31.0 datasets==5.2.0
#   (transformers is pinned: the bridge needs < 5.24; keep one version of each wheel.
#   Any import error in the first step below names a further missing wheel.)
#   .venv/bin/python benchmarks/bench_attention.py --preset r1-1.5b --build-only  # not needed:
#   the script builds the random model there (a 1.5B bf16 folder, 3.5 GB, is too big to carry)
#
# Run (device tool): command "bash benchmarks/gpu_long_traces.sh", carry [".whl"],
# timeout_s 600. Budget: about 1-2 min start + installs ~1 min + attention ~6 min +
# generation ~2 min; each step has its own timeout so one step's overrun leaves the other.
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$OUT/machine.txt" 2>&1

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
# thinklens itself, without its dependencies (from the working tree)
python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . \
  > "$OUT/install.log" 2>&1 || { echo "thinklens install failed"; tail -20 "$OUT/install.log"; exit 1; }
python3 -c "import transformer_lens, thinklens; print('imports ok')" || exit 1

cd benchmarks || exit 1
echo "== long traces (issue 11)"
timeout 390 python3 bench_attention.py --preset r1-1.5b --device cuda --dtype bfloat16 \
  --tokens 8192,16384,32768 --time-tokens 8192,16384 --repeats 2 --eager-max 32768 \
  --methods sdpa,forward,residual,sentence,vertical,tl_cache --threads 0 \
  --out "$OUT/attention-cuda.json" 2>&1 | tee "$OUT/attention.log"
echo "attention rc=${PIPESTATUS[0]}"

echo "== generation (issue 10)"
timeout 150 python3 bench_generate.py --device cuda --models organism --samples 100 \
  --rounds 3 --threads 0 --out "$OUT/generate-cuda.json" 2>&1 | tee "$OUT/generate.log"
echo "generate rc=${PIPESTATUS[0]}"
