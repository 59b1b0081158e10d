"""Ahead-of-time compilation of the Triton kernels for a GPU architecture, on a machine without a GPU.

Triton can lower a kernel to PTX and a cubin for a named target (``sm_80``, ``sm_90``) with no driver present.
That lets the CPU CI check what the interpreter cannot: that every kernel variant the launchers pick actually
compiles for real GPUs, how many registers it takes, whether it spills, and whether 16-bit dots become
tensor-core instructions (``wgmma`` on Hopper, ``mma`` on Ampere).

``python -m edge_kernels.backends.triton.aot [--json]`` prints the report for every variant. It must run with the
interpreter off (``TRITON_INTERPRET`` unset or 0): under the interpreter the kernels are not compilable objects.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List

import torch

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class CompiledKernel:
    name: str
    arch: int
    variant: str
    registers: int
    local_bytes: int  # stack + spills: 0 means nothing went to local memory
    shared_bytes: int
    tensor_core: str  # "wgmma", "mma" or "none"

    def row(self) -> str:
        return (f"{self.name:<32} sm_{self.arch:<3} {self.variant:<34} regs={self.registers:<4} "
                f"local={self.local_bytes:<5} smem={self.shared_bytes:<7} mma={self.tensor_core}")


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in fields.items()}


def compile_kernel(kernel, arg_types: Dict[str, str], constexprs: Dict[str, object], *, arch: int,
                   num_warps: int, num_stages: int, variant: str = "",
                   divisible_by_16: Iterable[str] = ()) -> CompiledKernel:
    """Compile ``kernel`` for ``sm_<arch>``. ``arg_types`` maps each runtime argument to a Triton type string
    (``"*bf16"``, ``"i32"``, ``"fp32"``...); ``constexprs`` gives every ``tl.constexpr`` argument;
    ``divisible_by_16`` names the runtime arguments a real launch would see as multiples of 16 (Triton
    specializes on that: pointers from the caching allocator always, sizes and strides when they are), so
    the compiled variant is the one that launch would run."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: ("constexpr" if n in constexprs else arg_types[n]) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible_by_16
             if n in names and n not in constexprs}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(n),): v for n, v in constexprs.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    usage = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none")
    return CompiledKernel(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), arch, variant,
                          usage.get("REG", -1), usage.get("STACK", 0) + usage.get("LOCAL", 0),
                          max(usage.get("SHARED", 0), compiled.metadata.shared), mma)


# the 7B shape's launches: N=8192, D=3584, V=152064 (all multiples of 16, as are the strides, the split width and
# the backward chunk); every pointer comes from the caching allocator (512-byte aligned)
_LINEAR_DIV16 = ("N", "V", "D", "stride_hn", "stride_wv", "cols_per_split", "num_splits", "col0", "n_cols",
                 "stride_dzn", "stride_dbn")
_LOGITS_DIV16 = ("N", "V", "T", "stride_b", "stride_t", "dstride_b", "dstride_t")


def _linear_variants(dtype: torch.dtype, softcap: bool = False, trunc: bool = False):
    from . import linear_logprob_entropy as op  # imports triton (optional third-party), as this whole tool does

    t = _TRITON_DTYPE[dtype]
    tiles, launch = op._tile_config(8192, 3584, dtype, interpret=False)
    upcast, precision = op._dot_settings(dtype, interpret=False)
    # unit strides are specialized to constants at launch (Triton does this for any int equal to 1)
    common = dict(UPCAST_DOT=upcast, DOT_PRECISION=precision, HAS_SOFTCAP=softcap, stride_hd=1, stride_wd=1,
                  HAS_TRUNC=trunc, **tiles)
    fwd_types = dict(H=f"*{t}", W=f"*{t}", BIAS=f"*{t}", TGT="*i64", PART_M="*fp32", PART_S="*fp32",
                     PART_B="*fp32", PART_ZT="*fp32", TAU="*fp32", LOGW="*fp32", inv_temp="fp32", softcap="fp32")
    bwd_types = dict(H=f"*{t}", W=f"*{t}", BIAS=f"*{t}", TGT="*i64", LSE="*fp32", ENT="*fp32", G_LOGP="*fp32",
                     G_ENT="*fp32", DZ=f"*{t}", PART_DB="*fp32", TAU="*fp32", LOGW="*fp32", inv_temp="fp32",
                     softcap="fp32")
    cap = " softcap" if softcap else (" top-p" if trunc else "")
    yield (op._linear_stats_fwd_kernel, fwd_types, dict(HAS_BIAS=True, **common), launch, f"{t} bias{cap}",
           _LINEAR_DIV16)
    yield (op._linear_grad_logits_kernel, bwd_types,
           dict(HAS_BIAS=True, HAS_GRAD_ENTROPY=True, WRITE_DB=True, GROUP_N=op.GROUP_N, STORE_LOGITS=False,
                **common), launch, f"{t} bias+entropy grad{cap}", _LINEAR_DIV16)
    if trunc:  # the threshold search's tiles: the gradient kernel storing fp32 logits
        yield (op._linear_grad_logits_kernel, dict(bwd_types, DZ="*fp32"),
               dict(HAS_BIAS=True, HAS_GRAD_ENTROPY=False, WRITE_DB=False, GROUP_N=op.GROUP_N, STORE_LOGITS=True,
                    **dict(common, HAS_TRUNC=False)), launch, f"{t} bias logits tiles", _LINEAR_DIV16)


def _logits_variants(dtype: torch.dtype, softcap: bool = False, trunc: bool = False):
    from . import logprob_entropy as op  # imports triton (optional third-party), as this whole tool does

    t = _TRITON_DTYPE[dtype]
    cfg, launch = op._config(8192, 152064, dtype, interpret=False)
    cap = " softcap" if softcap else (" top-p" if trunc else "")
    yield (op._logits_stats_fwd_kernel, dict(X=f"*{t}", TGT="*i64", LOGP="*fp32", ENT="*fp32", LSE="*fp32",
                                             TAU="*fp32", LOGW="*fp32", inv_temp="fp32", softcap="fp32"),
           dict(HAS_SOFTCAP=softcap, HAS_TRUNC=trunc, **cfg), launch, f"{t}{cap}", _LOGITS_DIV16)
    yield (op._logits_grad_kernel, dict(X=f"*{t}", DX=f"*{t}", TGT="*i64", LSE="*fp32", ENT="*fp32",
                                        G_LOGP="*fp32", G_ENT="*fp32", TAU="*fp32", LOGW="*fp32", inv_temp="fp32",
                                        softcap="fp32"),
           dict(HAS_GRAD_ENTROPY=True, HAS_SOFTCAP=softcap, HAS_TRUNC=trunc, **cfg), launch,
           f"{t} entropy grad{cap}", _LOGITS_DIV16)
    if trunc:
        yield (op._logits_tile_kernel, dict(X=f"*{t}", OUT="*fp32", inv_temp="fp32", softcap="fp32"),
               dict(HAS_SOFTCAP=softcap, **cfg), launch, f"{t} logits tiles", _LOGITS_DIV16)


def _variants(dtype: torch.dtype):
    """Every kernel without the soft-cap; with it (Gemma 2/3, served in bf16) for bf16 only."""
    yield from _linear_variants(dtype)
    yield from _logits_variants(dtype)
    if dtype == torch.bfloat16:
        yield from _linear_variants(dtype, softcap=True)
        yield from _logits_variants(dtype, softcap=True)
        # sampling truncation (top_k/top_p/min_p): the HAS_TRUNC kernels and the threshold search's tile kernels
        yield from _linear_variants(dtype, trunc=True)
        yield from _logits_variants(dtype, trunc=True)


def report(archs=(80, 90), dtypes=(torch.bfloat16, torch.float16, torch.float32)) -> List[CompiledKernel]:
    """Compile every kernel variant the launchers use at a large shape, for each architecture."""
    out = []
    for arch in archs:
        for dtype in dtypes:
            for kernel, types, constexprs, launch, variant, div16 in _variants(dtype):
                # integer runtime arguments (sizes, strides, offsets) default to i32: Triton specializes them
                full_types = {n: types.get(n, "i32") for n in kernel.arg_names}
                pointers = [n for n, ty in full_types.items() if ty.startswith("*")]
                out.append(compile_kernel(kernel, full_types, constexprs, arch=arch,
                                          num_warps=launch.get("num_warps", 4),
                                          num_stages=launch.get("num_stages", 3), variant=variant,
                                          divisible_by_16=[*pointers, *div16]))
    return out


if __name__ == "__main__":  # pragma: no cover
    import dataclasses
    import json
    import sys

    rows = report()
    if "--json" in sys.argv:
        print(json.dumps([dataclasses.asdict(k) for k in rows]))
    else:
        for k in rows:
            print(k.row())
