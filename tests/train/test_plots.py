"""PNG plots of metrics.jsonl, and the fidelity comparison figure."""

import json
import os

from edge_kernels.train.plots import OPTIONAL_PLOTS, PLOTS, plot_comparison, plot_metrics, read_metrics, smooth


def _rows(n, scale=1.0):
    return [{"step": i + 1, "reward_mean": 0.1 * i, "accuracy": 0.05 * i * scale, "entropy_mean": 1.0 / (i + 1),
             "adv_var": 0.5, "zero_adv_frac": 0.25, **({"eval_accuracy": 0.3} if i % 5 == 0 else {})}
            for i in range(n)]


def test_plot_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(30)))
    written = plot_metrics(str(path), str(tmp_path / "plots"))
    assert sorted(os.path.basename(p) for p in written) == sorted(set(PLOTS) - set(OPTIONAL_PLOTS))
    for p in written:
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(read_metrics(str(path))) == 30
    assert plot_metrics(str(tmp_path / "none.jsonl"), str(tmp_path / "p2")) == []
    vllm = tmp_path / "vllm.jsonl"  # --rollout vllm rows carry rollout_logp_diff: its plot too
    vllm.write_text("".join(json.dumps({**r, "rollout_logp_diff": 1e-7}) + "\n" for r in _rows(5)))
    assert sorted(os.path.basename(p) for p in plot_metrics(str(vllm), str(tmp_path / "p3"))) == sorted(PLOTS)


def test_smooth():
    assert smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


def test_plot_comparison(tmp_path):
    out = plot_comparison({"GRPO": [_rows(20), _rows(18)], "EDGE-GRPO": [_rows(20, 2.0)] * 3},
                          str(tmp_path / "fig.png"))
    with open(out, "rb") as fh:
        assert fh.read(4) == b"\x89PNG"
