#!/usr/bin/env bash
# The GPU checks a kernel change needs, in pieces that each fit one 10-minute command on a lent GPU.
#
#   bash benchmarks/gpu_checks.sh tests      # every test marked gpu (pytest -m gpu), bf16 at real shapes
#   bash benchmarks/gpu_checks.sh linear     # issue 2's table: fused linear op, fwd and fwd+bwd, both shapes
#   bash benchmarks/gpu_checks.sh logits     # logits-in op (Triton, CUDA), fused policy loss, edge-train step
#   bash benchmarks/gpu_checks.sh sweeps     # N and V scaling sweeps
#
# Results go to $OUT (or ./gpu-out): the piece's log and its benchmark directory; merge the fetched pieces with
#   python -m benchmarks --merge DIR... --out benchmarks/results/<device-slug>-<date>
#
# Packages the GPU image lacks travel as wheels in .whl/ (see the device tool's README); they are installed
# (--no-deps) into /tmp/site when .whl/ exists. The image (2026-11) has torch, triton, transformers, accelerate,
# peft, pandas, pyarrow, matplotlib, hypothesis, pytest-benchmark, but none of the anchors. For them:
#   trl                        TRL rows and train_step; with datasets, dill, multiprocess: TRL's backward imports
#                              trl.trainer.utils, which imports datasets (without them TRL's fwd+bwd rows fail)
#   liger-kernel, cut-cross-entropy   (need only torch + triton)
#   verl                       alone: its package __init__ needs ray, tensordict, omegaconf, ... (too big to
#                              carry); the benchmark then loads verl/utils/kernel/*.py on their own
# The "anchors" line below says which of them this machine has.
set -uo pipefail
cd "$(dirname "$0")/.."
piece=${1:?usage: gpu_checks.sh tests|linear|logits|sweeps}
out=${OUT:-./gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
python3 -c "import importlib.util as u; print('anchors:', ', '.join(m + (' ok' if u.find_spec(m) else ' MISSING') for m in
  ('trl', 'datasets', 'dill', 'multiprocess', 'liger_kernel', 'cut_cross_entropy', 'verl', 'matplotlib', 'hypothesis')))" \
    | tee -a "$out/device.txt"

# --budget-s 450: the clock starts after the wheel install and Python's start (~30-40 s), and the row in flight at
# the deadline still runs to its end (a torch.compile row or the CUDA extension's first build: ~1 min), all
# inside the device tool's 600 s per command. Tables are saved as they finish, so a kill loses one row at most.
case "$piece" in
    tests)
        python3 -m pytest -q -m gpu --durations=15 tests/ops tests/test_losses.py tests/test_cuda_ext.py 2>&1 | tee "$out/gpu-tests.log"
        ;;
    linear)
        python3 -m benchmarks --only linear --budget-s 450 --out "$out/bench-linear" 2>&1 | tee "$out/bench-linear.log"
        ;;
    logits)
        python3 -m benchmarks --only logits,policy,train_step --budget-s 450 --out "$out/bench-logits" 2>&1 \
            | tee "$out/bench-logits.log"
        ;;
    sweeps)
        python3 -m benchmarks --only sweep_n,sweep_v --budget-s 450 --no-compile --out "$out/bench-sweeps" 2>&1 \
            | tee "$out/bench-sweeps.log"
        ;;
    *)
        echo "unknown piece: $piece (tests|linear|logits|sweeps)" >&2
        exit 2
        ;;
esac
