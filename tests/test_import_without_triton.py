"""``import edge_kernels`` and every ``impl="torch"`` call work where triton cannot be imported (macOS, Windows:
pyproject installs triton on Linux only); ``impl="triton"`` then raises a clear error.

Checked in a subprocess whose ``sys.meta_path`` refuses every ``triton`` module, so this process's triton (and
its interpreter, which conftest switches on) is never involved.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys


    class NoTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError(f"triton is blocked in this test: {name}")
            return None


    sys.meta_path.insert(0, NoTriton())

    import torch
    import edge_kernels
    from edge_kernels import (fused_linear_policy_loss, grpo_advantages, linear_logprob_entropy, logprob_entropy,
                              policy_loss)
    from edge_kernels.train import config  # noqa: F401  (edge-train's modules import without triton too)

    torch.manual_seed(0)
    h = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    t = torch.randint(0, 10, (2, 3))
    for impl in ("torch", "auto"):
        for cap in (None, 5.0):
            logp, ent = linear_logprob_entropy(h, w, t, softcap=cap, impl=impl)
            (logp.sum() + ent.sum()).backward()
            x = (h.detach() @ w.detach().t()).requires_grad_()
            lp, en = logprob_entropy(x, t, softcap=cap, impl=impl)
            (lp.sum() + en.sum()).backward()
            assert torch.isfinite(x.grad).all() and torch.isfinite(h.grad).all()
    adv = grpo_advantages(torch.tensor([1.0, 0.0]), group_size=2)
    loss, _ = fused_linear_policy_loss(h, w, t, adv, torch.ones(2, 3), impl="torch")
    loss.backward()
    loss, _ = policy_loss(logp.detach().requires_grad_(), None, adv, torch.ones(2, 3))
    for op, args in ((linear_logprob_entropy, (h, w, t)), (logprob_entropy, (x.detach(), t))):
        try:
            op(*args, impl="triton")
        except RuntimeError as e:
            assert "triton" in str(e) and "impl='torch'" in str(e), e
        else:
            raise AssertionError("impl='triton' without triton must raise")
    assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules), "a triton module was imported"
    print("OK")
    """
)


def test_import_and_torch_path_without_triton(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")  # even with the interpreter requested, triton is never imported
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_the_blocker_really_blocks_triton(tmp_path):
    # the test above means something only if the finder stops `import triton` in that subprocess
    probe = SCRIPT.split("import torch")[0] + "import triton\n"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "triton is blocked" in proc.stderr
