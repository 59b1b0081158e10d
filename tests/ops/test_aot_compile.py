"""Every Triton kernel variant the launchers use compiles for real GPUs (sm_80, sm_90), checked on the CPU.

The interpreter runs the kernels' arithmetic but not the GPU compiler; this compiles them ahead of time to
cubins (no driver needed) and checks what a GPU run would otherwise reveal first: that 16-bit dots become
tensor-core instructions (wgmma on Hopper, mma on Ampere) and that no variant spills registers to local
memory on Hopper.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled():
    # a subprocess with the interpreter off: under TRITON_INTERPRET=1 kernels are not compilable objects
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "edge_kernels.backends.triton.aot", "--json"], capture_output=True,
                          text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [SimpleNamespace(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]
    for r in rows:
        r.row = (lambda r=r: f"{r.name} sm_{r.arch} {r.variant} regs={r.registers} local={r.local_bytes} "
                             f"mma={r.tensor_core}")
    return rows


def test_every_variant_compiles(compiled):
    names = {k.name for k in compiled}
    assert names == {"_linear_stats_fwd_kernel", "_linear_grad_logits_kernel", "_logits_stats_fwd_kernel",
                     "_logits_grad_kernel", "_logits_tile_kernel"}
    # archs x ((dtypes + bf16 with soft-cap) x kernels + bf16 sampling truncation: 4 kernels and 2 tile kernels)
    assert len(compiled) == 2 * ((3 + 1) * 4 + 6)
    assert sum("softcap" in k.variant for k in compiled) == 2 * 4
    assert sum("top-p" in k.variant or "tiles" in k.variant for k in compiled) == 2 * 6
    assert all(k.registers > 0 for k in compiled)


def test_linear_kernels_use_tensor_cores_for_16_bit(compiled):
    for k in compiled:
        if k.name.startswith("_linear") and not k.variant.startswith("fp32"):
            assert k.tensor_core == ("wgmma" if k.arch == 90 else "mma"), k.row()


def test_no_register_spills_on_hopper(compiled):
    for k in compiled:
        if k.arch == 90:
            assert k.local_bytes == 0, k.row()
