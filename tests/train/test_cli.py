"""The command line: help, clear errors (bad data rows, a model that is not a causal LM), the eval subcommand."""

import json
import os

import pytest

from edge_kernels.train import main
from edge_kernels.train.cli import main as cli_main
from train_helpers import TINY, run_cli, tiny_flags


def test_help_and_module_entry_point():
    proc = run_cli(["--help"])
    assert proc.returncode == 0
    for flag in ("--config", "--output", "--max-steps", "--estimator", "--gec", "--no-gec", "--group-size", "--seed",
                 "--model", "--data", "--eval-data", "--rollout", "--resume", "--device", "--problem-field"):
        assert flag in proc.stdout
    assert main is not None and callable(cli_main)


def test_bad_data_row_is_a_clear_error(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+1?", "answer": "2", "solution": "\\\\boxed{2}"}\n{"question": "x"}\n')
    rc = main(["--data", str(data), "--output", str(tmp_path / "o"), *tiny_flags()])
    err = capsys.readouterr().err
    assert rc == 2
    assert "edge-train: error:" in err and "d.jsonl:2: missing field 'problem'" in err


def test_gec_without_solutions_is_a_clear_error(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+1?", "answer": "2"}\n')
    rc = main(["--data", str(data), "--output", str(tmp_path / "o"), *tiny_flags(warmup_steps=0)])
    assert rc == 2 and "GEC's reference replacement needs a reference solution" in capsys.readouterr().err


def test_model_that_is_not_a_causal_lm(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    path = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(path)
    rc = main(["--model", str(path), "--output", str(tmp_path / "o"), *tiny_flags()])
    err = capsys.readouterr().err
    assert rc == 2 and "not a causal (decoder-only) language model" in err and "'bert'" in err
    rc = main(["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o2"), *tiny_flags()])
    assert rc == 2 and "no such directory" in capsys.readouterr().err
    rc = main(["eval", "--model", str(path), "--data", str(path / "config.json")])
    assert rc == 2 and "not a causal" in capsys.readouterr().err


def test_bad_option_values(tmp_path, capsys):
    assert main(["--output", str(tmp_path / "o"), "--group-size", "0"]) == 2
    assert "group_size must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects an unknown estimator itself
        main(["--estimator", "ppo"])


def test_train_then_eval_subcommand(tmp_path, capsys):
    out = tmp_path / "run"
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text("max_steps: 5\nestimator: grpo\n")
    # the YAML says 5 steps and grpo; the flag says 1 step
    assert main(["--config", str(yaml_cfg), "--output", str(out), *tiny_flags(max_steps=1)]) == 0
    printed = capsys.readouterr().out
    assert "eval after warm-up: greedy pass@1" in printed and "eval after RL:      greedy pass@1" in printed
    cfg_text = (out / "config.yaml").read_text()
    assert "estimator: grpo" in cfg_text and "max_steps: 1" in cfg_text
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    summary = json.loads((out / "summary.json").read_text())

    res_file = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(out), "--data", str(out / "data" / "eval.jsonl"), "--max-new-tokens",
               str(TINY["max_new_tokens"]), "--output", str(res_file)])
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(res_file.read_text())
    n = TINY["embedded_eval_size"]
    assert res["total"] == n and res["correct"] == sum(r["correct"] for r in res["results"])
    assert line == f"pass@1 = {res['correct']}/{n} = {res['correct'] / n:.4f}"
    # the standalone eval reproduces the run's own final evaluation (same prompt, greedy decoding)
    assert res["correct"] == summary["final_eval"]["correct"]
    assert os.path.isdir(out / "checkpoint" / "model")

    # the real-model path: --model DIR --data FILE, with micro-batching and gradient checkpointing
    out2 = tmp_path / "run2"
    data = out / "data"
    rc = main(["--model", str(out / "checkpoint" / "model"), "--data", str(data / "train.jsonl"), "--eval-data",
               str(data / "eval.jsonl"), "--output", str(out2), "--micro-batch-size", "4",
               "--gradient-checkpointing", "--estimator", "egpo", *tiny_flags(max_steps=2, warmup_steps=0)])
    assert rc == 0
    rows = [json.loads(x) for x in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert json.loads((out2 / "summary.json").read_text())["final_eval"]["total"] == n


def test_an_impl_the_device_cannot_run(tmp_path, capsys):
    assert main(["--output", str(tmp_path / "o"), "--impl", "cuda", *tiny_flags()]) == 2
    assert "--impl cuda" in capsys.readouterr().err


def test_float16_training_is_a_clear_error(tmp_path, capsys):
    # fp16 without loss scaling turned every weight into NaN after the first step
    assert main(["--output", str(tmp_path / "o"), "--dtype", "float16", *tiny_flags()]) == 2
    err = capsys.readouterr().err
    assert "edge-train: error:" in err and "--dtype float16" in err and "bfloat16" in err
    assert not (tmp_path / "o").exists()
