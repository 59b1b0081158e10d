"""Imports the CPU suite never executes: the GPU-only branches' function-local imports, and the mixed-precision
probe the PyTorch backend calls on 16-bit CUDA tensors (it once imported a name that had moved, an ImportError
on every bf16/fp16 ``impl="torch"`` call on a GPU that no CPU test reached).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# the optional third-party packages a function-local import may need (the layer rule's only exception)
OPTIONAL = ("triton", "vllm", "trl", "verl", "deepspeed", "megatron")


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "integrations":
        parts = ["edge_kernels", "integrations"] + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _local_imports(path: Path, module: str):
    """``(module, names, line)`` of every import inside a function body of ``path`` (the module ``module``)."""
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = _package_of(module, path).split(".")
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                yield base, [a.name for a in node.names], node.lineno
            elif isinstance(node, ast.Import):
                for a in node.names:
                    yield a.name, [], node.lineno


def _sources():
    for top in ("edge_kernels", "integrations"):
        yield from sorted((ROOT / top).rglob("*.py"))


def _check(path: Path, module: str = ""):
    """Problems of ``path``'s function-local imports: a module that does not exist or a name it lacks."""
    problems = []
    for base, names, line in _local_imports(path, module or _module_of(path)):
        root = base.split(".")[0]
        if root in OPTIONAL and importlib.util.find_spec(root) is None:
            continue  # that package is absent here; where it is installed the import is checked
        try:
            mod = importlib.import_module(base)
        except ImportError as e:
            problems.append(f"{path.name}:{line}: import {base}: {e}")
            continue
        for name in names:
            if not hasattr(mod, name) and not (hasattr(mod, "__path__") and
                                               importlib.util.find_spec(f"{base}.{name}") is not None):
                problems.append(f"{path.name}:{line}: {base} has no {name}")
    return problems


def test_every_function_local_import_resolves():
    """Each import inside a function (GPU-only branches, optional packages) names a module and names that
    exist, so a moved function fails here on the CPU instead of at its first call on a GPU."""
    problems = [p for path in _sources() for p in _check(path)]
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_moved_name(tmp_path):
    # the check above means something only if it flags the old crash itself: edge_kernels/reference.py's
    # function-local import of a probe that had moved out of ops/linear_logprob_entropy.py
    old = tmp_path / "reference.py"
    old.write_text("def _mixed_mm_ok(t):\n    from .ops.linear_logprob_entropy import _mixed_mm_support\n")
    problems = _check(old, module="edge_kernels.reference")
    assert len(problems) == 1 and "edge_kernels.ops.linear_logprob_entropy has no _mixed_mm_support" in problems[0]


def test_torch_backend_mixed_mm_probe_on_a_16bit_cuda_tensor(monkeypatch):
    """The probe path ``impl="torch"`` takes for bf16/fp16 CUDA tensors, run on the CPU: a stand-in with the
    attributes the probe reads (``is_cuda``, ``dtype``, ``device``), outside a CUDA-graph capture. It must
    answer (True where this torch multiplies bf16 into fp32) instead of raising."""
    from edge_kernels.backends import torch as torch_backend
    from edge_kernels.core import probes

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    fake = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert torch_backend.mixed_mm_ok(fake) == (probes.mixed_mm_support(torch.device("cpu")) in ("addmm", "mm"))
    assert probes.mixed_mm_support(torch.device("cpu")) in ("addmm", "mm", "none")
    fp32 = types.SimpleNamespace(is_cuda=True, dtype=torch.float32, device=torch.device("cpu"))
    assert torch_backend.mixed_mm_ok(fp32) is False  # fp32 needs no mixed-precision GEMM


@pytest.mark.parametrize("module", ["edge_kernels.core.probes", "edge_kernels.core.stats",
                                    "edge_kernels.core.tiles", "edge_kernels.core.params", "edge_kernels.oracle"])
def test_bottom_modules_import_nothing_of_the_package(module):
    tree = ast.parse(Path(importlib.import_module(module).__file__).read_text())
    own = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.level or
                                                                          (n.module or "").startswith("edge_kernels"))]
    assert not own, f"{module} imports {[(n.module, n.level) for n in own]}"


def test_no_function_local_import_of_the_package_below_the_trainers():
    """Below edge-train and the adapters, a function-local import of the package's own modules is allowed only
    for a module that imports an optional third-party package, named in a comment on that line (or the one
    above): anything else is a hidden cycle the layer contract should see."""
    bad = []
    for path in sorted((ROOT / "edge_kernels").rglob("*.py")):
        if "train" in path.relative_to(ROOT / "edge_kernels").parts:
            continue
        lines = path.read_text().splitlines()
        for base, _, line in _local_imports(path, _module_of(path)):
            if not base.startswith("edge_kernels"):
                continue
            near = " ".join(lines[max(0, line - 2): line + 1])
            if not any(pkg in near for pkg in OPTIONAL):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {base}")
    assert not bad, "\n".join(bad)


def test_nothing_below_the_adapters_imports_them():
    """The adapters (integrations/, installed as edge_kernels.integrations) are the top layer; import-linter
    cannot see that mapped package, so this test checks the arrow into it."""
    bad = []
    for path in sorted((ROOT / "edge_kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n.startswith(("edge_kernels.integrations", "integrations")) for n in names):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, "\n".join(bad)
