"""Options: YAML file < command-line flags, validation, the "auto" defaults."""

import argparse

import pytest

from edge_kernels.train.config import ConfigError, TrainConfig, add_arguments, build_config, load_yaml, resolve


def parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return vars(p.parse_args(argv))


def test_defaults():
    cfg = build_config(parse([]))
    assert cfg.estimator == "eda" and cfg.gec is None and cfg.rollout == "hf" and cfg.output == "./edge-train-out"
    r = resolve(cfg)
    assert r.gec is False  # the embedded default: EDA without GEC (docs/edge-train.md, the fidelity study)
    assert r.max_steps == 40 and r.warmup_steps == 600 and r.lr == 1.5e-4 and r.eval_every == 20
    assert r.loss_agg == "token-mean"
    real = resolve(build_config(parse(["--model", "/m", "--estimator", "dr_grpo"])))
    assert real.gec is True and real.warmup_steps == 0 and real.lr == 1e-6
    assert real.loss_agg == "seq-mean-token-sum-norm"
    assert real.max_new_tokens == 1024 and real.gec_max_new_tokens == 256


def test_yaml_then_flags_take_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("estimator: grpo\ngroup-size: 4\ngec: false\nlr: 0.01\neda_clamp: [0.5, 2]\nseed: 3\n")
    cfg = build_config(parse(["--config", str(y), "--group-size", "6", "--gec", "--seed", "9"]))
    assert cfg.estimator == "grpo"  # from the file
    assert cfg.lr == 0.01 and cfg.eda_clamp == [0.5, 2.0]
    assert cfg.group_size == 6 and cfg.gec is True and cfg.seed == 9  # flags beat the file


def test_every_option_is_a_flag_and_a_yaml_key(tmp_path):
    import dataclasses

    p = argparse.ArgumentParser()
    add_arguments(p)
    flags = {a.dest for a in p._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in flags
    y = tmp_path / "c.yaml"
    y.write_text("max-steps: 7\nno_such_option: 1\n")
    with pytest.raises(ConfigError, match="unknown option 'no_such_option'"):
        load_yaml(str(y))


@pytest.mark.parametrize("yaml_text, message", [
    ("group_size: two\n", "group_size"),
    ("gec: maybe\n", "gec must be true or false"),
    ("estimator: ppo\n", "estimator must be one of"),
    ("max_steps: 1.5\n", "max_steps must be an integer"),
    ("- a\n- b\n", "must hold a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_yaml(tmp_path, yaml_text, message):
    y = tmp_path / "c.yaml"
    y.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        build_config({"config": str(y)})


@pytest.mark.parametrize("flags, message", [
    (["--group-size", "0"], "group_size must be > 0"),
    (["--gec-p-regenerate", "0.9"], "sum to at most 1"),
    (["--micro-batch-size", "6", "--group-size", "4"], "multiple of group_size"),
    (["--top-p", "0"], "top_p"),
    (["--egpo-w-min", "0"], "egpo_w_min must be > 0"),
    (["--estimator", "egpo", "--eda-entropy-source", "current"], "applies to the 'eda' estimator only"),
    (["--prog-baseline", "prompt"], "prog_baseline must be 'group' in edge-train"),
    (["--gec-injection", "no placeholder"], "ANSWER"),
])
def test_bad_values(flags, message):
    with pytest.raises(ConfigError, match=message):
        build_config(parse(flags))


def test_kl_coef_is_not_an_option(capsys):
    # edge-train keeps no reference model: there is no KL option to refuse
    with pytest.raises(SystemExit):
        parse(["--kl-coef", "0.1"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_config({"config": str(tmp_path / "none.yaml")})


def test_resume_reads_the_saved_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("estimator: egpo\nmax_steps: 3\nseed: 5\noutput: elsewhere\n")
    cfg = build_config(parse(["--resume", str(run), "--max-steps", "6"]))
    assert cfg.estimator == "egpo" and cfg.seed == 5 and cfg.max_steps == 6
    assert cfg.output == str(run)  # a resumed run writes where it was
    with pytest.raises(ConfigError, match="no config.yaml"):
        build_config(parse(["--resume", str(tmp_path)]))


def test_save_every_default_depends_on_the_run():
    assert resolve(build_config(parse([]))).save_every == 1  # embedded: the resume tests rely on it
    assert resolve(build_config(parse(["--model", "/m"]))).save_every == 50  # a 7B checkpoint is ~90 GB
    assert resolve(build_config(parse(["--model", "/m", "--save-every", "3"]))).save_every == 3
    assert resolve(build_config(parse(["--save-every", "7"]))).save_every == 7


def test_float16_training_is_refused_with_a_pointer_to_bfloat16():
    with pytest.raises(ConfigError, match=r"--dtype float16 cannot train.*--dtype bfloat16"):
        build_config(parse(["--dtype", "float16"]))
    with pytest.raises(ConfigError, match="--param-dtype bfloat16 needs bfloat16 compute"):
        build_config(parse(["--dtype", "float32", "--param-dtype", "bfloat16"]))
    cfg = build_config(parse(["--dtype", "bfloat16"]))
    assert cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"  # fp32 master weights by default
