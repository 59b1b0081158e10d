"""edge_kernels.integrations.verl with the real verl (0.9.1) on CPU.

Losses are compared with verl's own ``vanilla`` / ``gspo`` policy losses (same ``ActorConfig``, every
``loss_agg_mode``, with and without verl's global-batch normalisation and rollout IS weights): fp32, the same
formula evaluated in a different order, so 1e-6 relative. Estimators are compared, on verl's input layout
(``token_level_rewards`` with the score on the last response token, right-padded ``response_mask``, shuffled
string ``uid`` groups), with the reference functions of :mod:`edge_kernels.advantage_formulas` (exact up to fp32
rounding) and ``edge_grpo`` with verl's ``grpo``.

The trainer hooks run inside verl's real trainer methods (v1 ``PPOTrainer._compute_advantage`` and the legacy
``RayPPOTrainer._compute_old_log_prob`` followed by ``compute_advantage``): only the actor workers and the
TransferQueue client are in-memory stand-ins. The post-import mechanism that installs the hooks is also tested
on a throw-away module.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from edge_kernels import advantage_formulas as A  # noqa: E402
from edge_kernels.integrations import verl as ev  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def actor_config(clip_low=0.2, clip_high=0.2, **global_batch_info) -> ActorConfig:
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=clip_low,
                      clip_ratio_high=clip_high)
    cfg.global_batch_info.update(global_batch_info)
    return cfg


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join([REPO, full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=120)


CHECK_REGISTERED = """
    import sys
    import verl
    # loaded by `import verl` itself, before anything else imports it
    assert "edge_kernels.integrations.verl" in sys.modules, "not loaded by import verl"
    ev = sys.modules["edge_kernels.integrations.verl"]
    from verl.trainer.ppo import core_algos as c
    assert all(c.get_adv_estimator_fn(n) is ev._ESTIMATOR_FNS[n] for n in ev.ESTIMATORS)
    assert all(c.get_policy_loss_fn(n) is ev._LOSS_FNS[n] for n in ev.POLICY_LOSSES)
    print("REGISTERED")
"""


# ----------------------------------------------------------------------------------------------------------
# loading on `import verl`


def _our_entry_points():
    return [ep for ep in importlib.metadata.entry_points(group="verl.plugins")
            if ep.value.split(":")[0] == "edge_kernels.integrations.verl"]


def test_entry_point_loads_on_import_verl():
    if not _our_entry_points():
        pytest.skip("the verl.plugins entry point of edge-kernels is not installed (pip install -e . after the "
                    "pyproject declares [project.entry-points.\"verl.plugins\"])")
    # a fresh interpreter that imports nothing but verl: the entry point must register everything
    out = _run(CHECK_REGISTERED, VERL_USE_EXTERNAL_MODULES="", VERL_USE_EXTERNAL_PLUGINS="auto")
    assert "REGISTERED" in out.stdout, out.stderr[-3000:]


def test_entry_point_mechanism_with_a_simulated_install(tmp_path):
    """The same entry point as pyproject's, declared by a throw-away dist-info on sys.path: verl's own
    entry-point discovery must import and register us (runs whether or not edge-kernels is installed)."""
    dist = tmp_path / "edge_kernels_plugin_probe-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: edge-kernels-plugin-probe\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[verl.plugins]\nedge_kernels_probe = edge_kernels.integrations.verl\n")
    out = _run(CHECK_REGISTERED, PYTHONPATH=str(tmp_path), VERL_USE_EXTERNAL_MODULES="",
               VERL_USE_EXTERNAL_PLUGINS="edge_kernels_probe")
    assert "REGISTERED" in out.stdout, out.stderr[-3000:]


def test_verl_use_external_modules_loads_during_import_verl():
    """The documented alternative; it also exercises the import from inside verl/__init__ (partially
    initialised verl), which is exactly when the entry point loads. With EDGE_KERNELS_VERL_FUSED_KERNELS=1 the
    same import routes verl's fused-kernel path to ours."""
    out = _run(CHECK_REGISTERED + """
    from verl.utils.kernel import linear_cross_entropy as lce
    assert lce.linear_cross_entropy is ev.edge_linear_cross_entropy
    print("PATCHED")
""", VERL_USE_EXTERNAL_MODULES="edge_kernels.integrations.verl", VERL_USE_EXTERNAL_PLUGINS="none",
               EDGE_KERNELS_VERL_FUSED_KERNELS="1")
    assert "REGISTERED" in out.stdout and "PATCHED" in out.stdout, out.stderr[-3000:]


def test_registry_returns_ours():
    for name in ev.ESTIMATORS:
        assert core_algos.get_adv_estimator_fn(name) is ev._ESTIMATOR_FNS[name]
    assert core_algos.get_policy_loss_fn("edge_vanilla") is ev.edge_vanilla_policy_loss
    assert core_algos.get_policy_loss_fn("edge_gspo") is ev.edge_gspo_policy_loss
    ev.register()  # idempotent
    assert core_algos.get_adv_estimator_fn("edge_eda") is ev._ESTIMATOR_FNS["edge_eda"]


# ----------------------------------------------------------------------------------------------------------
# policy losses vs verl's


def _loss_inputs(seed=0, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    lengths = torch.tensor([9, 5, 1, 7, 0, 3])[:B]  # one fully masked row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g) * 3
    new = (old + 0.4 * torch.randn(B, T, generator=g)).requires_grad_(True)
    adv = torch.randn(B, generator=g)[:, None].expand(B, T) * mask
    w = torch.rand(B, T, generator=g) * 2
    w[:, ::3] = 0.0  # verl's rollout-correction masking mode zeroes out-of-range weights
    return old, new, adv.contiguous(), mask, w


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("gbi", [{}, {"dp_size": 2, "batch_num_tokens": 61, "global_batch_size": 11,
                                      "loss_scale_factor": 16}], ids=["local", "global"])
@pytest.mark.parametrize("weights", [False, True], ids=["no_is", "rollout_is"])
@pytest.mark.parametrize("mode", ["vanilla", "gspo"])
def test_policy_loss_matches_verl(mode, agg, gbi, weights):
    old, new, adv, mask, w = _loss_inputs()
    cfg = actor_config(0.2, 0.28, **gbi) if mode == "vanilla" else actor_config(3e-3, 4e-3, **gbi)
    ours_fn = core_algos.get_policy_loss_fn(f"edge_{mode}")
    verl_fn = core_algos.get_policy_loss_fn(mode)
    kw = dict(loss_agg_mode=agg, config=cfg, rollout_is_weights=w if weights else None)
    l_ours, m_ours = ours_fn(old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask, **kw)
    (g_ours,) = torch.autograd.grad(l_ours, new)
    l_verl, m_verl = verl_fn(old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask, **kw)
    (g_verl,) = torch.autograd.grad(l_verl, new)
    torch.testing.assert_close(l_ours, l_verl, rtol=1e-6, atol=1e-7)
    if mode == "vanilla":  # GSPO's gradient differs by design (see edge_kernels.losses)
        torch.testing.assert_close(g_ours, g_verl, rtol=1e-6, atol=1e-7)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert m_ours[key] == pytest.approx(m_verl[key], rel=1e-6, abs=1e-7), key


def test_ppo_kl_metric_clamps_the_log_ratio_like_verl():
    old, new, adv, mask, _ = _loss_inputs()
    old = old.clone()
    old[0, 0] = -60.0  # a token the old policy all but ruled out: log-ratio ~ +58
    cfg = actor_config(0.2, 0.28)
    _, m_ours = ev.edge_vanilla_policy_loss(old, new, adv, mask, "token-mean", cfg)
    _, m_verl = core_algos.get_policy_loss_fn("vanilla")(old_log_prob=old, log_prob=new, advantages=adv,
                                                         response_mask=mask, loss_agg_mode="token-mean", config=cfg)
    assert m_ours["actor/ppo_kl"] == pytest.approx(m_verl["actor/ppo_kl"], rel=1e-6)


def test_policy_loss_refuses_missing_global_info():
    old, new, adv, mask, _ = _loss_inputs()
    with pytest.raises(ValueError, match="batch_num_tokens"):
        ev.edge_vanilla_policy_loss(old, new, adv, mask, "token-mean", actor_config(dp_size=2))


# ----------------------------------------------------------------------------------------------------------
# estimators on verl's layout vs the reference functions


def _verl_batch(seed=0, groups=4, G=4, T=10):
    g = torch.Generator().manual_seed(seed)
    B = groups * G
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    scores = torch.randint(0, 2, (B,), generator=g).float()
    scores[:G] = 1.0  # an all-correct group
    scores[G:2 * G] = 0.0  # an all-incorrect group
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = scores
    uid = np.array([f"prompt-{i // G}" for i in range(B)], dtype=object)
    perm = torch.randperm(B, generator=g)  # verl's batches are not sorted by group
    logp = -torch.rand(B, T, generator=g) * 4
    ent = torch.rand(B, T, generator=g) * 3
    return (rewards[perm], mask[perm], uid[perm.numpy()], scores[perm], logp[perm] * mask[perm],
            ent[perm] * mask[perm])


def _gids(uid):
    return torch.as_tensor(np.unique(uid.astype(str), return_inverse=True)[1])


def _cfg(**edge):
    from omegaconf import OmegaConf

    return OmegaConf.create({"norm_adv_by_std_in_grpo": True, "edge": edge})


@pytest.mark.parametrize("name", ev.ESTIMATORS)
def test_estimators_match_reference(name):
    rewards, mask, uid, scores, logp, ent = _verl_batch()
    gid = _gids(uid)
    m = mask.bool()
    fn = core_algos.get_adv_estimator_fn(name)
    adv, ret = fn(token_level_rewards=rewards, response_mask=mask, config=_cfg(), index=uid,
                  old_log_probs=logp, entropys=ent)
    base = A.grpo_advantages(scores, group_ids=gid)
    if name == "edge_grpo":
        ref = base
    elif name == "edge_eda":
        ref = A.eda_advantages(base, A.seq_mean_entropy(ent, m), group_ids=gid)
    elif name == "edge_egpo":
        ref = A.egpo_advantages(scores, A.nll_uncertainty(logp, m), group_ids=gid)
    elif name == "edge_prog_grpo":
        ref = A.prog_grpo_advantages(base, logp, m, scores, group_ids=gid)
    else:
        ref = A.ep_grpo_token_advantages(base, ent, m, scores, group_ids=gid)
    ref = (ref[:, None] if ref.dim() == 1 else ref) * mask
    assert adv.shape == rewards.shape and torch.equal(adv, ret)
    torch.testing.assert_close(adv, ref, atol=1e-6, rtol=1e-6)


def test_edge_grpo_matches_verl_grpo_and_dr_grpo():
    rewards, mask, uid, *_ = _verl_batch(seed=1)
    for norm in (True, False):
        ours, _ = core_algos.get_adv_estimator_fn("edge_grpo")(
            token_level_rewards=rewards, response_mask=mask, config=_cfg() if norm else
            __import__("omegaconf").OmegaConf.create({"norm_adv_by_std_in_grpo": False}), index=uid)
        theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uid, norm_adv_by_std_in_grpo=norm)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_estimators_refuse_single_response_groups():
    rewards, mask, uid, *_ = _verl_batch()
    uid = uid.copy()
    uid[0] = "alone"
    with pytest.raises(ValueError, match="'alone' has a single response"):
        core_algos.get_adv_estimator_fn("edge_grpo")(token_level_rewards=rewards, response_mask=mask, config=_cfg(),
                                                     index=uid)


def test_estimator_options_and_errors():
    rewards, mask, uid, scores, logp, ent = _verl_batch(seed=2)
    gid = _gids(uid)
    fn = ev._ESTIMATOR_FNS["edge_egpo"]
    adv, _ = fn(rewards, mask, config=_cfg(egpo_uncertainty="entropy", egpo_w_min=0.8, egpo_mode="symmetric"),
                index=uid, entropys=ent)
    ref = A.egpo_advantages(scores, A.seq_mean_entropy(ent, mask.bool()), group_ids=gid, w_min=0.8,
                            mode="symmetric")
    torch.testing.assert_close(adv, ref[:, None] * mask, atol=1e-6, rtol=1e-6)
    # verl's AlgoConfig dataclass works too (defaults)
    from verl.trainer.config import AlgoConfig

    fn(rewards, mask, config=AlgoConfig(), index=uid, old_log_probs=logp)
    with pytest.raises(ValueError, match="unknown algorithm.edge option"):
        fn(rewards, mask, config=_cfg(egpo_wmin=0.8), index=uid, old_log_probs=logp)
    with pytest.raises(ValueError, match="eda_entropy_source"):
        ev._ESTIMATOR_FNS["edge_eda"](rewards, mask, config=_cfg(eda_entropy_source="current"), index=uid,
                                      entropys=ent)
    with pytest.raises(ValueError, match="needs the old policy's per-token entropys"):
        ev._ESTIMATOR_FNS["edge_eda"](rewards, mask, config=_cfg(), index=uid)
    with pytest.raises(ValueError, match="group index"):
        ev._ESTIMATOR_FNS["edge_grpo"](rewards, mask, config=_cfg())
    with pytest.raises(TypeError, match="reward_baselines"):
        ev._ESTIMATOR_FNS["edge_grpo"](rewards, mask, config=_cfg(), index=uid, reward_baselines=scores)


def test_side_inputs_reach_the_estimator_through_verl_compute_advantage_kwargs():
    """verl's compute_advantage calls fn(token_level_rewards=, response_mask=, config=, index=): the side
    inputs stashed by a trainer hook are consumed by that call, once."""
    rewards, mask, uid, scores, logp, ent = _verl_batch(seed=3)
    fn = core_algos.get_adv_estimator_fn("edge_eda")
    direct, _ = fn(token_level_rewards=rewards, response_mask=mask, config=_cfg(), index=uid, entropys=ent)
    with ev.side_inputs(entropys=ent):
        via_hook, _ = fn(token_level_rewards=rewards, response_mask=mask, config=_cfg(), index=uid)
    torch.testing.assert_close(via_hook, direct)
    ev.stash_side_inputs(entropys=ent)
    fn(token_level_rewards=rewards, response_mask=mask, config=_cfg(), index=uid)
    with pytest.raises(ValueError, match="entropys"):  # consumed
        fn(token_level_rewards=rewards, response_mask=mask, config=_cfg(), index=uid)
    with ev.side_inputs(entropys=ent[:, :-1]), pytest.raises(ValueError, match="shape"):
        fn(token_level_rewards=rewards, response_mask=mask, config=_cfg(), index=uid)


# ----------------------------------------------------------------------------------------------------------
# trainer hooks, on verl's real trainer classes (verl's own code runs; only the actor workers and the
# TransferQueue client are replaced by in-memory stand-ins)


def _nested(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch.nested.as_nested_tensor([x[i, : int(lengths[i])] for i in range(x.shape[0])], layout=torch.jagged)


class _InMemoryTransferQueue:
    """The two calls verl's v1 ``PPOTrainer._compute_advantage`` makes on the ``transfer_queue`` client."""

    def __init__(self, fields: dict, batch: int):
        self.fields, self.batch, self.gets, self.puts = fields, batch, [], {}

    def kv_batch_get(self, keys, partition_id, select_fields):
        from tensordict import TensorDict

        self.gets.append(list(select_fields))
        return TensorDict({f: self.fields[f] for f in select_fields if f in self.fields}, batch_size=[self.batch])

    def kv_batch_put(self, keys, partition_id, fields):
        self.puts.update(fields.items())
        return "meta-after-put"


class _KVBatchMeta:
    def __init__(self, batch: int):
        self.keys, self.partition_id = [f"key-{i}" for i in range(batch)], "train"

    def __len__(self):
        return len(self.keys)


@pytest.mark.parametrize("name", ["edge_eda", "edge_prog_grpo", "edge_grpo"])
def test_v1_trainer_compute_advantage_keeps_side_inputs(name, monkeypatch):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.v1 import trainer_base

    ev.install_hooks()
    assert ev.hooked(trainer_base.PPOTrainer._compute_advantage), "hook not installed"
    rewards, mask, uid, scores, logp, ent = _verl_batch(seed=7)
    batch, lengths = mask.shape[0], mask.sum(1).long()
    tq = _InMemoryTransferQueue({
        "uid": _gids(uid), "response_mask": _nested(mask, lengths), "rm_scores": _nested(rewards, lengths),
        "old_log_probs": _nested(logp, lengths), "entropy": _nested(ent, lengths),
    }, batch)
    monkeypatch.setattr(trainer_base, "tq", tq)
    trainer_cls = type("Trainer", (trainer_base.PPOTrainer,), {"on_sample_end": lambda *a, **k: None,
                                                                "on_step_end": lambda *a, **k: None})
    trainer = object.__new__(trainer_cls)  # the parts of __init__ _compute_advantage reads
    trainer.config = OmegaConf.create({
        "algorithm": {"adv_estimator": name, "use_kl_in_reward": False, "gamma": 1.0, "lam": 1.0,
                      "norm_adv_by_std_in_grpo": True, "edge": {}},
        "actor_rollout_ref": {"rollout": {"n": 4}},
    })
    assert trainer._compute_advantage(_KVBatchMeta(batch), {}) == "meta-after-put"
    adv = tq.puts["advantages"].to_padded_tensor(0.0)
    ref, _ = ev._ESTIMATOR_FNS[name](rewards, mask, config=_cfg(), index=uid, entropys=ent, old_log_probs=logp)
    torch.testing.assert_close(adv, ref[:, : adv.shape[1]], rtol=1e-6, atol=1e-6)
    side_reads = [g for g in tq.gets if "rm_scores" not in g]  # verl's own read asks for rm_scores
    assert side_reads == ([[{"edge_eda": "entropy", "edge_prog_grpo": "old_log_probs"}[name], "response_mask"]]
                          if name != "edge_grpo" else [])
    assert ev._PENDING is None
    if name == "edge_eda":  # without the hook verl's trainer cannot give the estimator the entropies
        with pytest.raises(ValueError, match="entrop"):
            trainer_base.PPOTrainer._compute_advantage.__wrapped__(trainer, _KVBatchMeta(batch), {})


def test_v1_trainer_refuses_multi_output_agent_sessions(monkeypatch):
    # v1 keys rows {uid}_{session}_{index}; several outputs of one session would each count as a group member
    from omegaconf import OmegaConf
    from verl.trainer.ppo.v1 import trainer_base

    ev.install_hooks()
    trainer_cls = type("Trainer", (trainer_base.PPOTrainer,), {"on_sample_end": lambda *a, **k: None,
                                                                "on_step_end": lambda *a, **k: None})
    trainer = object.__new__(trainer_cls)
    trainer.config = OmegaConf.create({"algorithm": {"adv_estimator": "edge_grpo", "edge": {}}})
    meta = _KVBatchMeta(4)
    meta.keys = ["u1_0_0", "u1_0_1", "u1_1_0", "u1_2_0"]
    monkeypatch.setattr(trainer_base, "tq", _InMemoryTransferQueue({}, 4))
    with pytest.raises(NotImplementedError, match="several outputs for session u1_0"):
        trainer._compute_advantage(meta, {})
    ev._refuse_multi_output_sessions("edge_grpo", ["u1_0_0", "u1_1_0", "u2_0_0"])  # one output each: fine


def test_legacy_trainer_keeps_entropies_that_fit_pops():
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo import ray_trainer
    from verl.utils import tensordict_utils as tu

    ev.install_hooks()
    assert ev.hooked(ray_trainer.RayPPOTrainer._compute_old_log_prob)
    rewards, mask, uid, scores, logp, ent = _verl_batch(seed=8)
    batch, resp_len, prompt_len = mask.shape[0], mask.shape[1], 3
    g = torch.Generator().manual_seed(0)
    prompt_lens = torch.randint(1, prompt_len + 1, (batch,), generator=g)
    prompt_mask = (torch.arange(prompt_len)[None, :] >= (prompt_len - prompt_lens)[:, None]).long()  # left pad
    attention = torch.cat([prompt_mask, mask.long()], 1)
    prompts = torch.randint(5, 50, (batch, prompt_len), generator=g) * prompt_mask
    responses = torch.randint(5, 50, (batch, resp_len), generator=g) * mask.long()
    data = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
                 "attention_mask": attention, "position_ids": (attention.cumsum(1) - 1).clamp(min=0),
                 "response_mask": mask, "token_level_rewards": rewards},
        non_tensors={"uid": uid})
    # the actor's output: one value per real token, position t scoring token t+1 (what verl un-pads)
    per_token = {"log_probs": [], "entropy": []}
    for i in range(batch):
        p, r = int(prompt_lens[i]), int(mask[i].sum())
        for key, src in (("log_probs", logp), ("entropy", ent)):
            row = torch.zeros(p + r)
            row[p - 1: p - 1 + r] = src[i, :r]
            per_token[key].append(row)

    class ActorWorkers:
        def compute_log_prob(self, batch_td):
            out = tu.get_tensordict({k: torch.nested.as_nested_tensor(v, layout=torch.jagged)
                                     for k, v in per_token.items()})
            tu.assign_non_tensor(out, metrics={"mfu": 0.0})
            return out

    trainer = object.__new__(ray_trainer.RayPPOTrainer)
    trainer.config = OmegaConf.create({"algorithm": {"adv_estimator": "edge_ep_grpo", "edge": {},
                                                     "norm_adv_by_std_in_grpo": True},
                                       "actor_rollout_ref": {"actor": {}}})
    trainer.actor_rollout_wg = ActorWorkers()
    old, _ = trainer._compute_old_log_prob(data)
    data = data.union(old)
    data.batch.pop("entropys")  # what RayPPOTrainer.fit() does before computing advantages
    out = ray_trainer.compute_advantage(data, adv_estimator="edge_ep_grpo", config=trainer.config.algorithm)
    ref, _ = ev._ESTIMATOR_FNS["edge_ep_grpo"](rewards, mask, config=_cfg(), index=uid, entropys=ent)
    torch.testing.assert_close(out.batch["advantages"], ref, rtol=1e-6, atol=1e-6)
    assert ev._PENDING is None


def test_post_import_hook(tmp_path, monkeypatch):
    (tmp_path / "edge_fake_target.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = ev._PostImportHook("edge_fake_target", lambda m: seen.append(m.VALUE))
    sys.meta_path.insert(0, hook)
    try:
        import edge_fake_target  # noqa: F401

        assert seen == [1] and hook not in sys.meta_path
    finally:
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)
        sys.modules.pop("edge_fake_target", None)


def test_import_verl_registers_and_installs_nothing_else():
    """``import verl`` (through which the entry point loads us) registers the losses and estimators and nothing
    else: no sys.meta_path finder, verl's trainer methods untouched; EDGE_KERNELS_VERL_HOOKS=1 asks for the
    hooks, which then land when verl imports its trainer modules."""
    check = CHECK_REGISTERED + """
    from edge_kernels.integrations.verl import _PostImportHook
    armed = [f for f in sys.meta_path if isinstance(f, _PostImportHook)]
    from verl.trainer.ppo import ray_trainer
    from verl.trainer.ppo.v1 import trainer_base
    hooked = (ev.hooked(ray_trainer.RayPPOTrainer._compute_old_log_prob),
              ev.hooked(trainer_base.PPOTrainer._compute_advantage))
    print("ARMED", len(armed), "HOOKED", hooked)
"""
    env = dict(VERL_USE_EXTERNAL_MODULES="edge_kernels.integrations.verl", VERL_USE_EXTERNAL_PLUGINS="none")
    plain = _run(check, EDGE_KERNELS_VERL_HOOKS="", **env)
    assert "REGISTERED" in plain.stdout and "ARMED 0 HOOKED (False, False)" in plain.stdout, plain.stderr[-3000:]
    asked = _run(check, EDGE_KERNELS_VERL_HOOKS="1", **env)
    assert "ARMED 2 HOOKED (True, True)" in asked.stdout, asked.stderr[-3000:]


def test_a_hook_that_cannot_be_installed_raises_with_the_reason(tmp_path, monkeypatch):
    import types

    with pytest.raises(RuntimeError, match=r"edge_fake_trainer\.PPOTrainer\._compute_advantage does not exist"):
        ev._patch_v1(types.ModuleType("edge_fake_trainer"))
    # deferred: the failure surfaces as the failed import of that trainer module, not as a log line
    (tmp_path / "edge_fake_trainer2.py").write_text("class RayPPOTrainer:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hook = ev._PostImportHook("edge_fake_trainer2", ev._patch_legacy)
    sys.meta_path.insert(0, hook)
    try:
        with pytest.raises(RuntimeError, match="RayPPOTrainer._compute_old_log_prob does not exist"):
            import edge_fake_trainer2  # noqa: F401
    finally:
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)
        sys.modules.pop("edge_fake_trainer2", None)


# ----------------------------------------------------------------------------------------------------------
# use_fused_kernels -> our kernel


@pytest.fixture
def restore_verl_kernels():
    from verl.utils.experimental import torch_functional as tf
    from verl.utils.kernel import linear_cross_entropy as lce

    from verl.models.transformers import monkey_patch as mp

    saved = (lce.linear_cross_entropy, tf.FusedLinearForPPO.forward, mp.patch_forward_with_backends)
    yield lce, tf
    lce.linear_cross_entropy, tf.FusedLinearForPPO.forward, mp.patch_forward_with_backends = saved


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg)


def test_fused_kernel_switch(restore_verl_kernels, monkeypatch):
    lce, tf = restore_verl_kernels
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 16, generator=g)
    weight = torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (2, 5), generator=g)
    # verl's torch backend, before the switch (runs on CPU)
    ref_lp, ref_ent = tf.FusedLinearForPPO(impl_backend="torch")(hidden, weight, labels, 0.7)
    ev.patch_verl_fused_kernels()
    assert lce.linear_cross_entropy is ev.edge_linear_cross_entropy
    lp, ent = lce.linear_cross_entropy(hidden, weight, labels, 0.7, "none")
    assert lp.shape == (10,) and ent.shape == (10,)  # verl's flat layout
    torch.testing.assert_close(lp, ref_lp.reshape(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent.reshape(-1), atol=1e-5, rtol=1e-5)
    lp2, ent2 = tf.FusedLinearForPPO(impl_backend="torch")(hidden, weight, labels, 0.7)
    assert lp2.shape == (2, 5)
    torch.testing.assert_close(lp2, ref_lp, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="reduction"):
        lce.linear_cross_entropy(hidden, weight, labels, 0.7, "mean")

    # end to end through verl's own monkey patch of a HF model (use_fused_kernels=True, triton backend)
    from transformers import Qwen2ForCausalLM
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    model = _tiny_qwen2()
    ids = torch.randint(0, 97, (2, 6), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids).logits / 0.8
    monkeypatch.setattr(Qwen2ForCausalLM, "forward", Qwen2ForCausalLM.forward)  # restored after the test
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="triton")
    out = model(input_ids=ids, temperature=0.8, return_dict=True)
    rolled = torch.roll(ids, shifts=-1, dims=-1)
    ref = logits.log_softmax(-1).gather(-1, rolled[..., None])[..., 0]
    ref_h = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(out.log_probs.reshape(2, 6), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy.reshape(2, 6), ref_h, atol=1e-5, rtol=1e-5)
    out.log_probs.sum().backward()
    assert model.lm_head.weight.grad is not None and torch.isfinite(model.lm_head.weight.grad).all()


def test_fused_kernel_switch_refuses_a_soft_capped_model(restore_verl_kernels, monkeypatch):
    # verl's fused forward passes no final_logit_softcapping to the kernel: refused, not silently uncapped
    from transformers import Qwen2ForCausalLM
    from verl.models.transformers import monkey_patch as mp

    ev.patch_verl_fused_kernels()
    ev.patch_verl_fused_kernels()  # idempotent: wrapped once
    assert not ev.hooked(mp.patch_forward_with_backends.__wrapped__)
    monkeypatch.setattr(Qwen2ForCausalLM, "forward", Qwen2ForCausalLM.forward)
    model = _tiny_qwen2()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping=30.0.*use_fused_kernels=False"):
        mp.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    mp.patch_forward_with_backends(model, use_fused_kernels=False)  # verl's unfused path: the model's own logits
    model.config.final_logit_softcapping = None
    mp.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")


# ----------------------------------------------------------------------------------------------------------
# the example launch command


@pytest.mark.filterwarnings("ignore:Disabled critic")
def test_example_launch_composes_with_verls_config():
    """integrations/examples/verl_edge_grpo.sh's overrides compose with verl's own ppo_trainer config, pass
    verl's validate_config, and resolve to our estimator (with its options), loss and actor config."""
    import re
    import shlex

    import verl
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    text = open(os.path.join(REPO, "integrations", "examples", "verl_edge_grpo.sh")).read()
    cmd = text[text.index("python3 -m verl.trainer.main_ppo"):text.index('"$@"')]
    env = {"MODEL": "Qwen/Qwen2.5-Math-1.5B", "TRAIN": "/data/train.parquet", "VAL": "/data/test.parquet",
           "NGPUS": "8"}
    cmd = re.sub(r'\$\{(\w+):-[^}]*\}|"\$(\w+)"', lambda m: env[m.group(1) or m.group(2)], cmd)
    overrides = shlex.split(cmd.replace("\\\n", " "))[3:]
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"),
                               version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert core_algos.get_adv_estimator_fn(cfg.algorithm.adv_estimator) is ev._ESTIMATOR_FNS["edge_eda"]
    assert core_algos.get_policy_loss_fn(cfg.actor_rollout_ref.actor.policy_loss.loss_mode) is \
        ev.edge_vanilla_policy_loss
    assert ev._options(cfg.algorithm).adv_eps == 1e-6 and ev.needed_side_inputs("edge_eda", cfg.algorithm) == (
        "entropys",)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert actor.clip_ratio_high == 0.28
    assert cfg.actor_rollout_ref.model.use_fused_kernels
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.EDGE_KERNELS_VERL_FUSED_KERNELS == "1"
