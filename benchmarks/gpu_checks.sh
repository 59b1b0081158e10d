#!/usr/bin/env bash
# The GPU checks a kernel change needs, in pieces that each fit one 10-minute command on a lent GPU.
#
#   bash benchmarks/gpu_checks.sh tests      # every test marked gpu (+ the CPU suite of the ops), bf16 at real shapes
#   bash benchmarks/gpu_checks.sh linear     # issue 2's table: fused linear op, fwd and fwd+bwd, both shapes
#   bash benchmarks/gpu_checks.sh logits     # logits-in op (Triton, CUDA), fused policy loss, edge-train step
#   bash benchmarks/gpu_checks.sh sweeps     # N and V scaling sweeps
#
# Results go to $OUT (or ./gpu-out): the piece's log and its benchmark directory; merge the fetched pieces with
#   python -m benchmarks --merge DIR... --out benchmarks/results/<device-slug>-<date>
#
# Packages the GPU image lacks travel as wheels in .whl/ (see the device tool's README): at least hypothesis
# (the op tests import it) and, for the anchors, trl, liger-kernel, cut-cross-entropy, verl. They are installed
# into /tmp/site when .whl/ exists.
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

case "$piece" in
    tests)
        python3 -m pytest -q -m gpu tests/ops tests/test_losses.py tests/test_cuda_ext.py 2>&1 | tee "$out/gpu-tests.log"
        ;;
    linear)
        python3 -m benchmarks --only linear --budget-s 500 --out "$out/bench-linear" 2>&1 | tee "$out/bench-linear.log"
        ;;
    logits)
        python3 -m benchmarks --only logits,policy,train_step --budget-s 500 --out "$out/bench-logits" 2>&1 \
            | tee "$out/bench-logits.log"
        ;;
    sweeps)
        python3 -m benchmarks --only sweep_n,sweep_v --budget-s 500 --no-compile --out "$out/bench-sweeps" 2>&1 \
            | tee "$out/bench-sweeps.log"
        ;;
    *)
        echo "unknown piece: $piece (tests|linear|logits|sweeps)" >&2
        exit 2
        ;;
esac
