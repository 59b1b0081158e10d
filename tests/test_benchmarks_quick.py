"""CPU smoke test of the benchmark harness: ``python -m benchmarks --quick`` in a subprocess writes a Markdown
report with our rows (accurate against the float64 oracle), a JSON file and PNG plots; the ``train_step`` rows
(edge-train, naive, TRL) agree on the loss of the same batch."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUR_ERROR_COLUMNS = ("max err logp", "max err H")


def _markdown_tables(text: str):
    """Yield ``(header cells, row cells)`` for every body row of every Markdown table in ``text``."""
    header = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
        elif all(set(c) <= set("-:") for c in cells):
            continue
        else:
            yield header, cells


def test_quick_benchmarks_write_report(tmp_path):
    out = tmp_path / "bq"
    t0 = time.perf_counter()
    # --device cpu: the same smoke test on a GPU host (the GPU path is exercised by `--quick` without it)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=85,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

    md = (out / "results.md").read_text()
    assert md.startswith("# edge-kernels benchmark results")
    assert "- command: `python -m benchmarks --quick --device cpu --out" in md
    assert list(out.glob("*.png")), f"no PNG written in {out}"
    doc = json.loads((out / "results.json").read_text())
    assert doc["sections"] and doc["sweeps"]

    errors = []
    for header, row in _markdown_tables(md):
        if not row[0].startswith("ours") or not all(c in header for c in OUR_ERROR_COLUMNS):
            continue
        for col in OUR_ERROR_COLUMNS:
            try:
                errors.append((row[0], col, float(row[header.index(col)])))
            except ValueError:  # "-" (skipped row) or "n/a"
                pass
    assert errors, "no 'ours' row with an error value in results.md"
    bad = [e for e in errors if not (math.isfinite(e[2]) and e[2] < 1e-4)]
    assert not bad, f"our rows' errors vs the float64 oracle: {bad}"
    assert elapsed < 90, f"--quick took {elapsed:.0f} s"

    # train_step: one policy-update step of edge-train, the naive step and TRL's GRPOTrainer, on the same batch
    steps = [s for s in doc["sections"] if s["id"].startswith("train_step/")]
    assert len(steps) == 1, [s["id"] for s in doc["sections"]]
    rows = {r["impl"].split(" ")[0]: r for r in steps[0]["rows"]}
    assert set(rows) == {"ours", "naive", "TRL"}, list(rows)
    for key in ("ours", "naive") + (("TRL",) if importlib.util.find_spec("trl") else ()):
        assert rows[key]["status"] == "ok", rows[key]
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert all(r["ms"] > 0 and r["tok_s"] > 0 and r["wall_s"] < 20 for r in ok), ok
    tol = steps[0]["loss_tolerance"]
    assert tol <= 1e-4  # fp32 on the CPU
    bad = [(r["impl"], r["loss"], r["err_loss"]) for r in ok if not r["err_loss"] <= tol]
    assert not bad, f"losses vs the float64 reference {steps[0]['reference_loss']}: {bad}"
    assert max(r["loss"] for r in ok) - min(r["loss"] for r in ok) <= 2 * tol
