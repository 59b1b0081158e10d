"""``policy_loss`` under :func:`edge_kernels.integrations.trl_loss.policy_loss_options` equals TRL 1.16's own
``GRPOTrainer._compute_loss`` (a real trainer on a tiny offline Qwen2), loss and gradient, for every mapped
``loss_type``.

Both sides get the same per-token log-probs (TRL's ``_get_per_token_logps_and_entropies`` on the same model),
so the difference is only the loss formula's operation order in fp32: asserted at 1e-5 relative + 1e-6
absolute on the loss and on every parameter's gradient (as tests/integrations/test_trl.py does).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from char_tokenizer import make_tokenizer  # noqa: E402
from tiny_qwen2 import save_tiny_qwen2  # noqa: E402
from edge_kernels.integrations.trl_loss import policy_loss_options  # noqa: E402
from edge_kernels.losses import policy_loss  # noqa: E402

G = 4


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2_losses"), tokenizer)


def _reward(completions, **kwargs):
    return [0.0 for _ in completions]


def _trainer(model_dir, tokenizer, tmp_path, **overrides) -> GRPOTrainer:
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=G, num_generations=G,
                  max_completion_length=8, max_steps=1, use_cpu=True, report_to="none", save_strategy="no",
                  disable_tqdm=True, seed=0, bf16=False)
    kwargs.update(overrides)
    data = datasets.Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "9-3="]})
    return GRPOTrainer(model=model_dir, reward_funcs=[_reward], args=GRPOConfig(**kwargs), train_dataset=data,
                       processing_class=tokenizer)


def _batch(tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, P, T = G, 5, 8
    vocab = len(tokenizer)
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(3, vocab, (B, T), generator=g)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 7:] = 0
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.5, 0.25, -1.5]),
            "num_items_in_batch": completion_mask.sum()}


CASES = {
    "grpo_kl_bias": dict(loss_type="grpo", beta=0.1, epsilon_high=0.28),
    "grpo_kl_plain": dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=False),
    "bnpo_entropy": dict(loss_type="bnpo", entropy_coef=0.05),
    "dr_grpo": dict(loss_type="dr_grpo", beta=0.05),
    "dapo_gspo": dict(loss_type="dapo", importance_sampling_level="sequence", epsilon=3e-3, epsilon_high=4e-3),
    "cispo": dict(loss_type="cispo", epsilon_high=1.15),  # old log-probs spread wider below: ratios < 0.5 occur
    "sapo": dict(loss_type="sapo", sapo_temperature_pos=1.5, sapo_temperature_neg=2.5),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence", epsilon=0.05, epsilon_high=0.08),
    "vespo": dict(loss_type="vespo"),
    "off_policy_mask": dict(loss_type="grpo", off_policy_mask_threshold=0.02),
}


@pytest.mark.parametrize("case", list(CASES))
def test_policy_loss_matches_trl_compute_loss(case, model_dir, tokenizer, tmp_path):
    tr = _trainer(model_dir, tokenizer, tmp_path, **CASES[case])
    opts = policy_loss_options(tr.args)
    batch = _batch(tokenizer)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    T = batch["completion_ids"].shape[1]
    with torch.no_grad():
        lp0, _, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, am, T)
        ref = None
        if tr.beta != 0.0:
            ref, _, _ = tr._get_per_token_logps_and_entropies(tr.ref_model, ids, am, T)
    g = torch.Generator().manual_seed(1)
    spread = 0.8 if case == "cispo" else 0.3  # CISPO: TRL has no lower bound, so some ratios must be small
    batch["old_per_token_logps"] = lp0 + spread * torch.randn(lp0.shape, generator=g)
    if ref is not None:
        batch["ref_per_token_logps"] = ref - 0.1
    sampling = None
    if tr.off_policy_mask_threshold is not None:
        sampling = batch["old_per_token_logps"] + 0.05 * torch.randn(lp0.shape, generator=g)
        batch["sampling_per_token_logps"] = sampling
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call _compute_loss directly

    tr.model.zero_grad()
    loss_trl = tr._compute_loss(tr.model, dict(batch))
    loss_trl.backward()
    grads_trl = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}

    tr.model.zero_grad()
    lp, ent, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, am, T, compute_entropy=True)
    mask = batch["completion_mask"]
    loss, _ = policy_loss(lp, batch["old_per_token_logps"], batch["advantages"], mask, entropy=ent,
                          ref_logp=batch.get("ref_per_token_logps"), rollout_logp=sampling, options=opts)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(loss.detach(), loss_trl.detach(), rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_trl.keys() and "lm_head.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_trl[name], rtol=1e-5, atol=1e-6, msg=name)


def test_mapping_refuses_what_it_cannot_reproduce(model_dir, tokenizer, tmp_path):
    from types import SimpleNamespace

    base = GRPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", bf16=False)
    for change, match in [(dict(loss_type="nope"), "loss_type='nope' has no edge-kernels equivalent"),
                          (dict(delta=2.0), "delta"),
                          (dict(loss_type="luspo"), "loss_type='luspo': is_level='token' does not apply"),
                          (dict(loss_type="grpo", entropy_coef=0.1), "entropy_coef with loss_type='grpo'"),
                          (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
                          (dict(loss_type="cispo", epsilon_high=0.28), "epsilon_high is CISPO's absolute cap")]:
        args = SimpleNamespace(**{**vars(base), **change})
        with pytest.raises(ValueError, match=match):
            policy_loss_options(args)
    opts = policy_loss_options(SimpleNamespace(**{**vars(base), "use_vllm": True}))
    assert (opts.rollout_is, opts.rollout_is_max) == (base.vllm_importance_sampling_mode,
                                                       base.vllm_importance_sampling_clip_max)
