"""The CUDA C++ extension (csrc/, ``impl="cuda"`` of ``logprob_entropy``).

CPU CI (no GPU, CPU-only torch, nvcc present):

* every ``csrc/*.cu`` compiles with nvcc for sm_80 and sm_90 (one nvcc call per architecture, both in parallel
  with the host compile of ``bindings.cpp``), with the flags torch's extension builder would use, and ptxas
  reports no register spills;
* the objects link into an extension that imports into this (CPU) torch, registers its ``torch.library``
  operators, and whose fake implementations trace (FakeTensor autograd, ``torch.export``). That build uses its
  own operator namespace (``EDGE_KERNELS_OPS_NS``), so it can never collide with the real extension;
* the Python side: dispatch errors, the cache folder, ``setup.py`` (plain wheel without a compiler).

The CPU torch wheel lacks ``c10/cuda/impl/cuda_cmake_macros.h`` (a CMake-generated header included by every
``c10/cuda`` and ``ATen/cuda`` header), so the sources use only ATen/c10 core headers; a test keeps it so.

GPU (``@pytest.mark.gpu``, skipped on CPU): the kernels against the float64 oracle and against Triton; odd V,
ignore_index, temperatures, all three dtypes, strided and misaligned rows, masked (-inf) logits, in-place
backward, split rows, N*V > 2^31, torch.compile, opcheck, and a just-in-time build from a clean cache.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from edge_kernels import linear_logprob_entropy, logprob_entropy
from edge_kernels.backends import cuda as _cuda
from edge_kernels.ops.backend_choice import resolve_impl
from edge_kernels import backends
from edge_kernels.ops import logprob_entropy as le_mod
from edge_kernels.core.params import LaunchParams
from edge_kernels.oracle import oracle_logprob_entropy
import data_builders

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))
ARCHS = ("80", "90")
TEST_NS = "edge_kernels_citest"
TEST_EXT = "edge_kernels_citest_ext"
HAS_CUDA = torch.cuda.is_available()

gpu = pytest.mark.gpu


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


# ----------------------------------------------------------------------------------------------------------
# CPU CI: compile, link, import


@pytest.fixture(scope="module")
def cpu_build(tmp_path_factory):
    """Compile csrc/ once: nvcc per architecture and the host compiler for bindings.cpp, all in parallel; then
    link the sm_90 objects with bindings into an importable extension. Returns a dict of results."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit on PATH, in CUDA_HOME or /usr/local/cuda): csrc/ cannot be "
                    "compiled")
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    out = tmp_path_factory.mktemp("csrc_build")
    nvcc_flags, cxx_flags = _cuda.standalone_compile_flags()
    _, cxx_flags_test = _cuda.standalone_compile_flags(TEST_EXT, defines=[f"EDGE_KERNELS_OPS_NS={TEST_NS}"])

    jobs = {}
    t0 = time.monotonic()
    for arch in ARCHS:
        odir = out / f"sm{arch}"
        odir.mkdir()
        cmd = [nvcc, "-c", *map(str, CU_SOURCES), "-odir", str(odir),
               "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", *nvcc_flags]
        jobs[f"sm{arch}"] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    if cxx:
        cmd = [cxx, "-c", str(CSRC / "bindings.cpp"), "-o", str(out / "bindings.o"), *cxx_flags_test]
        jobs["bindings"] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for key, (cmd, proc) in jobs.items():
        log, _ = proc.communicate(timeout=900)
        results[key] = dict(cmd=cmd, rc=proc.returncode, log=log, seconds=time.monotonic() - t0)

    results["link"] = None
    if cxx and results["bindings"]["rc"] == 0 and results["sm90"]["rc"] == 0:
        torch_lib = Path(torch.__file__).parent / "lib"
        so = out / f"{TEST_EXT}.so"
        objs = [str(out / "bindings.o")] + [str(out / "sm90" / (p.stem + ".o")) for p in CU_SOURCES]
        cmd = [nvcc, "-shared", "-o", str(so), *objs, f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu",
               "-ltorch_python", f"-Xlinker=-rpath,{torch_lib}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        results["link"] = dict(cmd=cmd, rc=proc.returncode, log=proc.stdout + proc.stderr, so=so)
    results["wall_seconds"] = time.monotonic() - t0
    results["nvcc_flags"] = nvcc_flags
    print(f"\ncsrc build: {results['wall_seconds']:.1f}s wall "
          + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in results.items() if isinstance(v, dict) and "seconds" in v))
    return results


def _fail_log(res):
    return f"command: {' '.join(res['cmd'])}\n{res['log'][-8000:]}"


@pytest.mark.parametrize("arch", ARCHS)
def test_cu_sources_compile_for_arch(cpu_build, arch):
    assert CU_SOURCES, "no csrc/*.cu"
    res = cpu_build[f"sm{arch}"]
    assert res["rc"] == 0, _fail_log(res)
    for src in CU_SOURCES:
        obj = Path(res["cmd"][res["cmd"].index("-odir") + 1]) / (src.stem + ".o")
        assert obj.is_file() and obj.stat().st_size > 0
    # every kernel of the hot paths keeps its state in registers: no local-memory spills
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res["log"])
    assert spills, res["log"][-2000:]
    assert all(int(a) == 0 and int(b) == 0 for a, b in spills), res["log"]


def test_sources_avoid_headers_missing_from_the_cpu_wheel():
    """c10/cuda and ATen/cuda headers include c10/cuda/impl/cuda_cmake_macros.h, which CPU torch wheels do not
    ship: sources including them would compile on a GPU machine and fail on CPU CI."""
    inc = Path(torch.__file__).parent / "include"
    if torch.version.cuda is None:  # the fact the rule rests on (a CUDA torch has the header: the rule stays)
        assert (inc / "c10" / "cuda" / "CUDAMacros.h").is_file()
        assert not (inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists()
    for src in sorted(CSRC.iterdir()):
        if src.suffix in (".cu", ".cuh", ".cpp", ".h"):
            text = src.read_text()
            bad = re.findall(r'#include\s*[<"]((?:c10|ATen)/cuda/[^>"]+)[>"]', text)
            assert not bad, f"{src.name} includes {bad}; the CPU torch wheel cannot compile them"


@pytest.fixture(scope="module")
def test_ext(cpu_build):
    """The CPU-built extension (operator namespace TEST_NS) imported into this process, fakes registered."""
    if cpu_build["link"] is None:
        if "bindings" not in cpu_build:
            pytest.skip("no host C++ compiler (c++/g++) to compile bindings.cpp")
        pytest.fail("bindings.cpp or the sm_90 objects did not compile:\n"
                    + _fail_log(cpu_build["bindings"] if cpu_build["bindings"]["rc"] else cpu_build["sm90"]))
    link = cpu_build["link"]
    assert link["rc"] == 0, _fail_log(link)
    spec = importlib.util.spec_from_file_location(TEST_EXT, link["so"])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _cuda._register_fakes(TEST_NS)
    return mod


def test_bindings_compile_link_and_import(test_ext):
    ops = getattr(torch.ops, TEST_NS)
    assert test_ext.OPS_NAMESPACE == TEST_NS
    fwd = str(ops.logprob_entropy_fwd.default._schema)
    bwd = str(ops.logprob_entropy_bwd.default._schema)
    assert "int splits=0, float softcap=0.) -> (Tensor logp, Tensor entropy, Tensor lse)" in fwd
    assert "Tensor(a!) out" in bwd and "float softcap=0." in bwd and bwd.endswith("-> ()")
    x, t = torch.randn(2, 3, 11), torch.zeros(6, dtype=torch.long)
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{TEST_NS}::logprob_entropy_fwd", "CPU"):
        # only a CUDA kernel is registered: CPU tensors are refused with the dispatcher's message
        with pytest.raises(NotImplementedError, match="CPU"):
            ops.logprob_entropy_fwd(x, t, 1.0, -100)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):  # the pybind11 entry checks itself
        test_ext.logprob_entropy_fwd(x, t, 1.0, -100)


def test_row_split_plan(test_ext):
    """Host-side planning (runs on CPU): a row per block when rows fill the GPU, else rows split into chunks that
    are whole 16-byte vectors, cover the vocabulary exactly, and keep >= one vector per thread."""
    plan = test_ext.plan_rows
    assert plan(8192, 152064, 2, 132) == (1, 152064)
    for n, v, dt, vec in [(1, 152064, 2, 8), (64, 152064, 1, 8), (100, 50257, 0, 4), (7, 4099, 2, 8), (3, 1, 0, 4)]:
        splits, chunk = plan(n, v, dt, 132)
        assert chunk % vec == 0 and (splits - 1) * chunk < v <= splits * chunk
        assert splits == 1 or chunk >= 256 * vec
        assert n * splits <= 132 * 16 + n
    assert plan(1, 152064, 2, 132)[0] == 152064 // (256 * 8)
    assert plan(8192, 1000, 2, 132, requested=3) == (3, 336)  # forced: 3 chunks of 336 = 42 vectors
    assert plan(4, 10, 0, 132, requested=1000) == (3, 4)  # never an empty chunk


def test_fake_impls_propagate_shapes_and_autograd(test_ext, monkeypatch):
    """The Function of impl='cuda' (launchers, custom ops, fakes) run under FakeTensorMode, forward and backward,
    in place and not: what torch.compile traces."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(_cuda, "_module", test_ext)
    monkeypatch.setattr(_cuda, "OPS_NAMESPACE", TEST_NS)
    for dtype in (torch.float32, torch.bfloat16):
        for inplace in (False, True):
            with FakeTensorMode():
                x = torch.randn(2, 5, 97, dtype=dtype, requires_grad=True)
                buf = x * 1
                t = torch.randint(0, 97, (10,))
                logp, ent = le_mod.LogprobEntropyFunction.apply(buf, t, LaunchParams(1.0 / 0.7, -100), inplace, "cuda")
                assert logp.shape == ent.shape == (10,) and logp.dtype == ent.dtype == torch.float32
                (logp.sum() + ent.sum()).backward()
                assert x.grad.shape == x.shape and x.grad.dtype == dtype


@pytest.fixture(scope="module")
def test_ext_with_cpu_kernels(test_ext):
    """The test extension's operators given CPU kernels written with the reference implementation, so that
    torch.compile can run (not only trace) the impl='cuda' path on a CPU."""
    from edge_kernels.backends import torch as torch_backend

    lib = torch.library.Library(TEST_NS, "IMPL")

    def fwd(x, targets, inv_temp, ignore_index, splits=0, softcap=0.0):
        logp, ent, lse = torch_backend.logprob_entropy_fwd(x.reshape(-1, x.shape[-1]), targets, inv_temp, ignore_index,
                                                       softcap=softcap or None)
        return logp, ent, torch.where(targets != ignore_index, lse, 0.0)  # the kernels' convention

    def bwd(x, targets, lse, entropy, grad_logp, grad_entropy, inv_temp, out, splits=0, softcap=0.0):
        torch_backend.logits_backward(x, targets, lse, entropy, grad_logp, grad_entropy, LaunchParams(inv_temp, -100,
                                                                                          softcap or None), out)

    lib.impl("logprob_entropy_fwd", fwd, "CPU")
    lib.impl("logprob_entropy_bwd", bwd, "CPU")
    yield test_ext
    lib._destroy()


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_torch_compile_runs_the_cuda_path(test_ext_with_cpu_kernels, monkeypatch, softcap):
    """torch.compile captures the operators of impl='cuda' (dynamo, fullgraph) and traces forward and backward
    through their fake implementations (AOTAutograd); run here with the CPU reference kernels."""
    monkeypatch.setattr(_cuda, "_module", test_ext_with_cpu_kernels)
    monkeypatch.setattr(_cuda, "OPS_NAMESPACE", TEST_NS)
    logits = torch.randn(2, 6, 37, dtype=torch.float64).float()
    targets = torch.randint(0, 37, (12,))
    targets[3] = -100

    def step(x, t, impl="cuda"):
        logp, ent = le_mod.LogprobEntropyFunction.apply(x, t, LaunchParams(1.0 / 0.8, -100, softcap), False, impl)
        return (logp * 2 + ent).sum()

    def run(fn, impl="cuda"):
        x = logits.clone().requires_grad_()
        loss = fn(x, targets, impl)
        loss.backward()
        return loss.detach(), x.grad

    ref_loss, ref_grad = run(step, "torch")
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    for backend in (recording_backend, "aot_eager"):
        torch._dynamo.reset()
        loss, grad = run(torch.compile(step, backend=backend, fullgraph=True))
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)
    assert any(f"{TEST_NS}.logprob_entropy_fwd" in g for g in graphs), graphs
    torch._dynamo.reset()


def test_ops_trace_with_torch_export(test_ext):
    ops = getattr(torch.ops, TEST_NS)

    class Fwd(torch.nn.Module):
        def forward(self, x, t):
            return ops.logprob_entropy_fwd(x, t, 1.25, -100)

    class Bwd(torch.nn.Module):
        def forward(self, x, t, lse, ent, gl, ge):
            out = torch.empty_like(x)
            ops.logprob_entropy_bwd(x, t, lse, ent, gl, ge, 1.25, out)
            return out

    n = torch.export.Dim("n", min=2, max=1 << 20)
    x, t = torch.randn(8, 33), torch.randint(0, 33, (8,))
    ep = torch.export.export(Fwd(), (x, t), dynamic_shapes={"x": {0: n}, "t": {0: n}})
    targets = [node.target for node in ep.graph.nodes if node.op == "call_function"]
    assert ops.logprob_entropy_fwd.default in targets
    outs = [node for node in ep.graph.nodes if node.op == "output"][0].args[0]
    assert len(outs) == 3 and all(isinstance(o.meta["val"].shape[0], torch.SymInt) for o in outs)

    r = torch.randn(8)
    ep = torch.export.export(Bwd(), (x, t, r, r, r, r))
    names = " ".join(str(node.target) for node in ep.graph.nodes)
    assert "logprob_entropy_bwd" in names  # as an auto_functionalized mutation of out


# ----------------------------------------------------------------------------------------------------------
# CPU CI: Python side


def test_cuda_launchers_have_the_triton_signatures():
    from edge_kernels.backends.triton import logprob_entropy as tri

    fwd, bwd = backends.REGISTRY[("logprob_entropy", "cuda")]
    assert inspect.signature(fwd).parameters.keys() == inspect.signature(tri.triton_fwd).parameters.keys()
    assert inspect.signature(bwd).parameters.keys() == inspect.signature(tri.triton_bwd).parameters.keys()
    for f in (fwd, bwd, tri.triton_fwd, tri.triton_bwd, *backends.REGISTRY[("logprob_entropy", "torch")]):
        assert "params" in inspect.signature(f).parameters
    assert list(inspect.signature(_cuda.logprob_entropy_fwd).parameters) == list(inspect.signature(fwd).parameters)
    assert list(inspect.signature(_cuda.logprob_entropy_bwd).parameters) == list(inspect.signature(bwd).parameters)


def test_linear_op_has_no_cuda_impl():
    h, w, t = torch.randn(4, 8), torch.randn(16, 8), torch.randint(0, 16, (4,))
    with pytest.raises(NotImplementedError, match=r"only for edge_kernels\.logprob_entropy.*linear_logprob_entropy"):
        linear_logprob_entropy(h, w, t, impl="cuda")
    if HAS_CUDA:
        with pytest.raises(NotImplementedError, match="only for edge_kernels.logprob_entropy"):
            linear_logprob_entropy(h.cuda(), w.cuda(), t.cuda(), impl="cuda")


def test_cuda_impl_refuses_cpu_tensors():
    x, t = torch.randn(3, 10), torch.randint(0, 10, (3,))
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
        logprob_entropy(x, t, impl="cuda")


def test_auto_keeps_triton_or_torch():
    assert resolve_impl("auto", torch.zeros(1), op="logprob_entropy") == "torch"


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the message of a CPU-only torch build")
def test_cpu_only_torch_gets_a_clear_error():
    reason = _cuda.unavailable_reason()
    assert reason is not None and "CPU-only build" in reason and torch.__version__ in reason
    assert not _cuda.is_available()
    with pytest.raises(RuntimeError, match="impl='cuda' is unavailable: .*CPU-only build"):
        _cuda.load()


def test_cache_dir_is_per_torch_cuda_and_arch(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    flags, tag = _cuda.arch_flags()
    assert flags == [] and tag == "arch-8.0_9.0+PTX"
    monkeypatch.setenv("EDGE_KERNELS_CACHE_DIR", str(tmp_path / "c"))
    d = _cuda.cache_dir()
    assert d.parent == tmp_path / "c"
    assert d.name.startswith(f"torch{torch.__version__}-cu{torch.version.cuda}-") and d.name.endswith(tag)
    monkeypatch.delenv("EDGE_KERNELS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cuda.cache_dir().parent == tmp_path / "xdg" / "edge_kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _cuda.cache_dir().parent == Path.home() / ".cache" / "edge_kernels"


def test_sources_are_found():
    assert [p.name for p in _cuda.source_files()] == list(_cuda.SOURCES)
    assert all(p.is_file() for p in _cuda.source_files())


def _load_setup_py():
    spec = importlib.util.spec_from_file_location("_edge_kernels_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ != "__main__": setup() is not called
    return mod


def test_setup_py_is_pure_python_unless_asked(monkeypatch):
    setup_py = _load_setup_py()
    monkeypatch.delenv("EDGE_KERNELS_BUILD_CUDA", raising=False)
    kw = setup_py.setup_kwargs()
    assert "ext_modules" not in kw and set(kw["cmdclass"]) == {"build_py"}
    monkeypatch.setenv("EDGE_KERNELS_BUILD_CUDA", "1")
    if torch.version.cuda is None:
        with pytest.raises(SystemExit, match="CPU-only build"):
            setup_py.setup_kwargs()
    elif _cuda._nvcc_path() is not None:
        kw = setup_py.setup_kwargs()
        (ext,) = kw["ext_modules"]
        assert ext.name == "edge_kernels._cuda_ext" and "build_ext" in kw["cmdclass"]


def test_plain_wheel_needs_no_compiler_and_ships_the_sources(tmp_path):
    """Build the wheel as pip would (without the CUDA flag) from a copy of the project: no extension, and the
    csrc/ sources inside the package for the just-in-time build."""
    setuptools = pytest.importorskip("setuptools")
    # pyproject's license string (PEP 639) needs setuptools >= 77: build offline with this environment's
    # setuptools when it is recent enough, else let pip fetch the build requirements (isolated build)
    isolation = [] if int(setuptools.__version__.split(".")[0]) >= 77 else ["--use-pep517"]
    offline = not isolation
    src = tmp_path / "src"  # the project as a checkout has it, without build products and environments
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
        ".benchmarks", "results", "*.so", ".whl", ".gl"))
    assert not (src / "edge_kernels" / "csrc").exists()
    if not (src / "README.md").exists():
        (src / "README.md").write_text("edge-kernels\n")
    env = {k: v for k, v in os.environ.items() if k != "EDGE_KERNELS_BUILD_CUDA"}
    env["PATH"] = "/nonexistent"  # no compiler reachable: the build must not need one
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)]
    cmd += ["--no-build-isolation"] if offline else isolation
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = (tmp_path / "dist").glob("edge_kernels-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    for s in _cuda.SOURCES + _cuda.HEADERS:
        assert f"edge_kernels/csrc/{s}" in names
    assert not [n for n in names if n.endswith((".so", ".pyd"))]


# ----------------------------------------------------------------------------------------------------------
# GPU: the kernels


UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def ext():
    reason = _cuda.unavailable_reason()
    if reason is not None:
        pytest.skip(f"impl='cuda' unavailable: {reason}")
    return _cuda.load()


def make_logits(shape, v, *, device="cuda", **kw):
    return data_builders.make_logits(shape, v, device=device, **kw)


def _run(impl, logits, targets, temperature, g_logp, g_ent, ignore_index=-100, inplace=False, feed=None,
         softcap=None):
    x = logits.clone().requires_grad_()
    buf = feed(x) if feed is not None else (x * 1 if inplace else x)  # what the op reads (and may overwrite)
    logp, ent = logprob_entropy(buf, targets, temperature=temperature, ignore_index=ignore_index, impl=impl,
                                inplace_backward=inplace, softcap=softcap)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp, ent, x.grad


def _check_against_oracle(logits, targets, temperature, *, ignore_index=-100, inplace=False, seed=0,
                          with_triton=True, feed=None, softcap=None):
    g = torch.Generator().manual_seed(seed + 1)
    g_logp = torch.randn(targets.shape, generator=g).to(logits.device)
    g_ent = torch.randn(targets.shape, generator=g).to(logits.device)
    logp, ent, grad = _run("cuda", logits, targets, temperature, g_logp, g_ent, ignore_index, inplace, feed,
                           softcap)

    x64 = logits.double().requires_grad_()
    r_logp, r_ent = oracle_logprob_entropy(x64, targets, temperature, ignore_index, softcap=softcap)
    ((r_logp * g_logp.double()).sum() + (r_ent * g_ent.double()).sum()).backward()

    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == targets.shape
    assert (logp.double() - r_logp).abs().max() <= 1e-4
    assert (ent.double() - r_ent).abs().max() <= 1e-4
    assert grad.dtype == logits.dtype and torch.isfinite(grad).all()
    finite = logits.double().nan_to_num(0.0, 0.0, 0.0)
    row_atol = 1e-6 * (g_logp.abs() + g_ent.abs()).double()[..., None] * (1 + finite.abs().max())
    err = (grad.double() - x64.grad).abs()
    assert (err <= UNIT[logits.dtype] * x64.grad.abs() + row_atol).all(), err.max()

    if with_triton:  # the same op through Triton: same answers up to fp32 summation order and one rounding
        t_logp, t_ent, t_grad = _run("triton", logits, targets, temperature, g_logp, g_ent, ignore_index, inplace,
                                     feed, softcap)
        assert (logp - t_logp).abs().max() <= 2e-5
        assert (ent - t_ent).abs().max() <= 2e-5
        terr = (grad.double() - t_grad.double()).abs()
        assert (terr <= 2 * UNIT[logits.dtype] * x64.grad.abs() + row_atol).all(), terr.max()
    return logp, ent, grad


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, v, temperature", [
    ((1,), 1, 1.0), ((7,), 13, 0.6), ((3, 5), 127, 1.7), ((64,), 1000, 1.0), ((2, 3, 4), 4099, 0.6),
    ((33,), 32003, 1.0), ((5, 7), 50257, 0.8), ((4,), 152064, 1.0), ((300,), 8200, 1.3),
])
def test_matches_float64_oracle_and_triton(ext, shape, v, temperature, dtype):
    logits, targets = make_logits(shape, v, dtype=dtype, seed=v)
    _check_against_oracle(logits, targets, temperature, seed=v)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap, temperature", [(5.0, 1.0), (30.0, 0.7)])
@pytest.mark.parametrize("shape, v", [((7,), 13), ((3, 5), 4099), ((33,), 32003), ((4,), 152064)])
def test_softcap_matches_float64_oracle_and_triton(ext, shape, v, softcap, temperature, dtype):
    """Soft-capped logits (Gemma 2/3): logits reach several times the cap; a -inf entry stays masked."""
    logits, targets = make_logits(shape, v, dtype=torch.float32, seed=v)
    logits = logits * (softcap / 3.0)
    logits.view(-1, v)[0, v // 2] = float("-inf")
    assert logits[torch.isfinite(logits)].abs().max() > 1.5 * softcap
    _check_against_oracle(logits.to(dtype), targets, temperature, seed=v, softcap=softcap)
    # the uncapped op on the same logits differs: the cap is not ignored
    capped = logprob_entropy(logits.to(dtype), targets, softcap=softcap, impl="cuda")[0]
    plain = logprob_entropy(logits.to(dtype), targets, impl="cuda")[0]
    assert (capped - plain).abs().max() > 0.1


@gpu
@pytest.mark.parametrize("splits", [1, 7])
def test_softcap_split_rows_and_misaligned_input(ext, splits):
    logits, targets = make_logits((5,), 20011, dtype=torch.float32, seed=3)
    x = (logits * 10).to(torch.bfloat16)
    buf = torch.empty(5, 20011 + 3, device="cuda", dtype=torch.bfloat16)[:, 3:]  # rows off the 16-byte grid
    buf.copy_(x)
    ops = torch.ops.edge_kernels
    got = ops.logprob_entropy_fwd(buf, targets, 1.0, -100, splits, softcap=5.0)
    r_logp, r_ent = oracle_logprob_entropy(x.double(), targets, softcap=5.0)
    assert (got[0].double() - r_logp).abs().max() <= 1e-4 and (got[1].double() - r_ent).abs().max() <= 1e-4
    with pytest.raises(RuntimeError, match="softcap"):
        ops.logprob_entropy_fwd(buf, targets, 1.0, -100, 0, softcap=-1.0)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_and_misaligned_rows(ext, dtype):
    full, targets = make_logits((3, 9), 2011, dtype=dtype, seed=1)
    view = full[:, :-1]  # rows strided, vocab contiguous
    assert not view.is_contiguous()
    _check_against_oracle(view, targets[:, :-1], 0.9, seed=1)
    # rows starting off the 16-byte grid (storage offset 1, odd row stride): a scalar head and tail per row, and
    # a fresh gradient buffer misaligned relative to the logits (the scalar backward path); in place too
    def misaligned(x):
        buf = torch.zeros(x.shape[0] * 1001 + 1, device=x.device, dtype=x.dtype)
        view = buf[1:].view(x.shape[0], 1001)[:, : x.shape[1]]
        view.copy_(x)  # keeps the autograd path back to x
        assert view.data_ptr() % 16 != 0 and view.stride(0) == 1001
        return view

    src, t2 = make_logits((5,), 997, dtype=dtype, seed=2)
    _check_against_oracle(src, t2, 1.1, seed=2, feed=misaligned)
    _check_against_oracle(src, t2, 1.1, seed=2, feed=misaligned, inplace=True)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward_overwrites_logits(ext, dtype):
    logits, targets = make_logits((4, 6), 3001, dtype=dtype, seed=3)
    _, _, ref = _check_against_oracle(logits, targets, 0.7, seed=3)
    x = logits.clone().requires_grad_()
    buf = x * 1
    logp, ent = logprob_entropy(buf, targets, temperature=0.7, impl="cuda", inplace_backward=True)
    g = torch.Generator().manual_seed(4)
    g_logp = torch.randn(targets.shape, generator=g).cuda()
    g_ent = torch.randn(targets.shape, generator=g).cuda()
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    assert torch.equal(buf.detach(), x.grad)  # the gradient was written over the buffer
    plain = logits.clone().requires_grad_()
    lp2, en2 = logprob_entropy(plain, targets, temperature=0.7, impl="cuda")
    ((lp2 * g_logp).sum() + (en2 * g_ent).sum()).backward()
    assert torch.equal(plain.grad, x.grad)  # in place or not: bit-identical


@gpu
@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 5])
def test_ignore_index(ext, ignore_index):
    logits, targets = make_logits((40,), 777, seed=5, ignore_frac=0.3, ignore_index=ignore_index)
    logp, ent, grad = _check_against_oracle(logits, targets, 1.0, ignore_index=ignore_index, seed=5)
    ign = targets == ignore_index
    assert ign.any() and (logp[ign] == 0).all() and (ent[ign] == 0).all() and (grad[ign] == 0).all()


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_vocabulary_entries(ext, dtype):
    logits, targets = make_logits((16,), 2053, dtype=dtype, seed=6, ignore_frac=0.0)
    logits[:, 1000:1500] = float("-inf")
    logits[3, :] = float("-inf")  # one row almost fully masked: only its target survives
    logits[3, targets[3]] = 0.5
    logits[:, 1000:1500][targets[:, None].expand(-1, 500) == torch.arange(1000, 1500, device="cuda")] = 1.0
    _check_against_oracle(logits, targets, 0.8, seed=6)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab,column", [(513, 100), (4096, 0), (8191, 0), (8191, 4000)])
def test_nan_logits_propagate(ext, dtype, vocab, column):
    # V >= 4096: each thread reads several vectors, and a NaN in a thread's first vector once vanished (the
    # exponent was clamped with fmaxf, which drops NaN, before the running sum saw it)
    logits, targets = make_logits((4,), vocab, seed=7, ignore_frac=0.0)
    logits = logits.to(dtype)
    logits[1, column] = float("nan")
    logp, ent = logprob_entropy(logits, targets, impl="cuda")
    assert torch.isnan(logp[1]) and torch.isnan(ent[1])
    assert torch.isfinite(logp[[0, 2, 3]]).all() and torch.isfinite(ent[[0, 2, 3]]).all()


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 2, 7, 64])
def test_forced_row_splits_agree(ext, dtype, splits):
    """The split forward (partial stats + merge kernel) and split backward give the single-block answers."""
    logits, targets = make_logits((6,), 20011, dtype=dtype, seed=8)
    ops = torch.ops.edge_kernels
    x3 = logits.unsqueeze(0)
    base = ops.logprob_entropy_fwd(x3, targets, 1.0 / 0.9, -100, 1)
    got = ops.logprob_entropy_fwd(x3, targets, 1.0 / 0.9, -100, splits)
    for a, b in zip(base, got):
        assert (a - b).abs().max() <= 1e-5
    r_logp, r_ent = oracle_logprob_entropy(logits.double(), targets, 0.9)
    assert (got[0].double() - r_logp).abs().max() <= 1e-4 and (got[1].double() - r_ent).abs().max() <= 1e-4
    valid = targets != -100  # as the autograd Function does: no upstream gradient on ignored rows
    gl = torch.where(valid, torch.randn(6, device="cuda"), 0.0)
    ge = torch.where(valid, torch.randn(6, device="cuda"), 0.0)
    outs = []
    for s in (1, splits):
        out = torch.empty_like(x3)
        ops.logprob_entropy_bwd(x3, targets, base[2], base[1], gl, ge, 1.0 / 0.9, out, s)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


@gpu
def test_row_offsets_beyond_int32(ext):
    """N * V > 2^31 (bf16, 4.3 GB): the last rows' element offsets exceed 2^31. Checked on sampled rows against
    the oracle, forward and in-place backward, through a strided [B, T, V] view."""
    free, _ = torch.cuda.mem_get_info()
    v, b, t = 131101, 2, 8200  # N = 16400 rows, N * V = 2.15e9 > 2^31
    if free < 6 * 2**30:
        pytest.skip("needs ~6 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(9)
    full = torch.empty(b, t + 1, v, device="cuda", dtype=torch.bfloat16)
    full.normal_(generator=g)
    view = full[:, 1:]  # strided rows; full.stride(0) * B > 2^31
    targets = torch.randint(0, v, (b, t), device="cuda", generator=g)
    targets[0, 5] = -100
    rows = torch.tensor([0, 1, 5, t - 1, t, t + 1, 2 * t - 2, 2 * t - 1], device="cuda")
    rb, rt = rows // t, rows % t
    sample = view[rb, rt].double()  # just those rows (view.reshape would copy all 4.3 GB)
    t_rows = targets[rb, rt]
    r_logp, r_ent = oracle_logprob_entropy(sample, t_rows)
    logp, ent = logprob_entropy(view, targets, impl="cuda")
    assert (logp[rb, rt].double() - r_logp).abs().max() <= 1e-4
    assert (ent[rb, rt].double() - r_ent).abs().max() <= 1e-4

    # backward in place (out = the logits view), through the operator
    t1 = targets.reshape(-1)
    _, ent1, lse1 = torch.ops.edge_kernels.logprob_entropy_fwd(view, t1, 1.0, -100)
    gl = torch.where(t1 != -100, 1.0, 0.0).float()
    ge = 0.5 * gl
    torch.ops.edge_kernels.logprob_entropy_bwd(view, t1, lse1, ent1, gl, ge, 1.0, view)
    s64 = sample.clone().requires_grad_()
    o_logp, o_ent = oracle_logprob_entropy(s64, t_rows)
    (o_logp * gl[rows].double() + o_ent * ge[rows].double()).sum().backward()
    got = view[rb, rt].double()
    assert ((got - s64.grad).abs() <= 2.0**-8 * s64.grad.abs() + 1e-6 * (1 + sample.abs().max())).all()
    assert (got[2] == 0).all()  # the ignored row
    del full, view


@gpu
def test_torch_compile_traces_callers(ext):
    logits, targets = make_logits((3, 7), 1003, dtype=torch.bfloat16, seed=10)
    t1 = targets.reshape(-1)

    def step(x, t):
        logp, ent = le_mod.LogprobEntropyFunction.apply(x, t, LaunchParams(1.0, -100), False, "cuda")
        return (logp * 2 + ent).sum()

    def run(fn):
        x = logits.clone().requires_grad_()
        loss = fn(x, t1)
        loss.backward()
        return loss.detach(), x.grad

    ref_loss, ref_grad = run(step)

    graphs = []  # what dynamo captured: the operator must be in it (as a call, not a graph break)

    def recording_backend(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    loss, grad = run(torch.compile(step, backend=recording_backend))
    assert any("logprob_entropy_fwd" in g for g in graphs), graphs
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)

    loss, grad = run(torch.compile(step))  # inductor, forward and backward graphs
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)

    # the public function (its input validation graph-breaks; the op itself is captured)
    pub = torch.compile(lambda x, t: logprob_entropy(x, t, impl="cuda"))
    torch.testing.assert_close(pub(logits, targets), logprob_entropy(logits, targets, impl="cuda"))


@gpu
def test_opcheck(ext):
    logits, targets = make_logits((2, 5), 301, seed=11)
    t1 = targets.reshape(-1)
    torch.library.opcheck(torch.ops.edge_kernels.logprob_entropy_fwd.default, (logits, t1, 1.3, -100))
    logp, ent, lse = torch.ops.edge_kernels.logprob_entropy_fwd(logits, t1, 1.3, -100)
    gl = torch.randn(10, device="cuda")
    torch.library.opcheck(torch.ops.edge_kernels.logprob_entropy_bwd.default,
                          (logits, t1, lse, ent, gl, gl.clone(), 1.3, torch.empty_like(logits)))
    torch.library.opcheck(torch.ops.edge_kernels.logprob_entropy_bwd.default,
                          (logits, t1, lse, None, gl, None, 1.3, torch.empty_like(logits)))


@gpu
def test_jit_build_from_a_clean_cache(tmp_path):
    """A fresh process builds the extension with ninja into an empty cache folder, loads it and runs it; a second
    process reuses the cache."""
    reason = _cuda.unavailable_reason()
    if reason is not None and ("nvcc" in reason or "ninja" in reason):
        pytest.fail(f"the extension cannot be built on this GPU machine: {reason}")
    env = dict(os.environ, EDGE_KERNELS_CACHE_DIR=str(tmp_path / "cache"), EDGE_KERNELS_CUDA_JIT="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = (
        "import time, torch, edge_kernels.backends.cuda as c\n"
        "t0 = time.time(); m = c.load(); dt = time.time() - t0\n"
        "x = torch.randn(4, 1000, device='cuda'); t = torch.randint(0, 1000, (4,), device='cuda')\n"
        "logp, ent, lse = torch.ops.edge_kernels.logprob_entropy_fwd(x.unsqueeze(0), t, 1.0, -100)\n"
        "ref = torch.log_softmax(x, -1).gather(1, t[:, None])[:, 0]\n"
        "assert (logp - ref).abs().max() < 1e-4, (logp, ref)\n"
        "print('LOADED', m.__file__, f'{dt:.1f}s')\n"
    )
    for attempt in range(2):
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "LOADED" in proc.stdout
        print(attempt, proc.stdout.strip())
    built = list((tmp_path / "cache").rglob("*.so"))
    assert built and list((tmp_path / "cache").rglob("build.ninja"))
