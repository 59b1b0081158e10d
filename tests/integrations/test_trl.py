"""edge_kernels.integrations.trl with the real TRL on CPU.

A tiny Qwen2 (hidden 32, 2 layers) and a character-level tokenizer are built here (no hub access); the model
is saved to a temporary directory so that TRL can load the reference model for ``beta > 0`` from its path.

Tolerance of the kernel-vs-native comparison (``test_edge_kernels_match_trl_native``): everything is fp32 on
the CPU; TRL's fused head and ours both accumulate the logits in fp32 but in a different order (TRL: one
``torch.mm`` per vocabulary chunk; ours: the chunked PyTorch path of edge-kernels), so per-token log-probs and
entropies agree to a few fp32 ulps of the logits (~1e-6). We assert 1e-5 absolute on log-probs / entropies, and
1e-5 relative + 1e-6 absolute on the loss and the gradients.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    Qwen2ForCausalLM,
)
from trl import GRPOConfig  # noqa: E402

from char_tokenizer import make_tokenizer  # noqa: E402
from tiny_qwen2 import save_tiny_qwen2  # noqa: E402
from edge_kernels import advantage_formulas as A  # noqa: E402
from edge_kernels.integrations.trl import (  # noqa: E402
    ESTIMATORS,
    EdgeGRPOConfig,
    EdgeGRPOTrainer,
    _unwrap_parallel,
    install_edge_lm_head,
)

G = 4  # completions per prompt


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    """The model is tiny: thread start-up and contention cost more than they save (and CI machines are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------
# tiny offline model, tokenizer, data, rewards


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), tokenizer)


GEMMA_SOFTCAP = 5.0  # Gemma 2 ships 30.0; 5.0 bites on this tiny model's logits (checked in the fixture)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, tokenizer):
    """A tiny randomly initialised Gemma-2 (soft-capped final logits, offline), saved like ``model_dir``."""
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                       max_position_embeddings=512, sliding_window=16, final_logit_softcapping=GEMMA_SOFTCAP,
                       tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                       attn_implementation="eager")
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(32.0)  # raw logits up to ~3 caps: saturated and linear entries both occur
        ids = torch.randint(3, len(tokenizer), (2, 12))
        raw = model.model(input_ids=ids).last_hidden_state @ model.lm_head.weight.t()
    assert raw.abs().max() > 1.5 * GEMMA_SOFTCAP, "the cap must bite for the Gemma tests to mean anything"
    path = tmp_path_factory.mktemp("tiny_gemma2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_dataset(with_answer=True, with_solution=True):
    data = {"prompt": ["1+1=", "2+3=", "4+4=", "9-3="]}
    if with_answer:
        data["answer"] = ["2", "5", "8", "6"]
    if with_solution:
        data["solution"] = ["1+1=2 so \\boxed{2}", "\\boxed{5}", "4+4 is \\boxed{8}", "\\boxed{6}"]
    return datasets.Dataset.from_dict(data)


def accuracy_reward(completions, answer, **kwargs):
    out = []
    for c, a in zip(completions, answer):
        found = re.findall(r"\\boxed\{([^}]*)\}", c)
        out.append(1.0 if found and found[-1] == a else 0.0)
    return out


def noise_reward(completions, **kwargs):
    """Deterministic in the text, varied across samples: gives groups non-zero reward variance (values < 1,
    so a completion is 'correct' for GEC only through accuracy_reward)."""
    return [(sum(map(ord, c)) % 3) / 4 for c in completions]


REWARDS = [accuracy_reward, noise_reward]


def make_config(tmp_path, **overrides) -> EdgeGRPOConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=G, num_generations=G,
        max_completion_length=8, max_steps=2, learning_rate=1e-2, use_cpu=True, report_to="none",
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, gec_max_new_tokens=6,
        correct_threshold=0.6, bf16=False,
    )
    kwargs.update(overrides)
    return EdgeGRPOConfig(**kwargs)


def make_trainer(model_dir, tokenizer, tmp_path, dataset=None, **overrides) -> EdgeGRPOTrainer:
    return EdgeGRPOTrainer(model=model_dir, reward_funcs=REWARDS, args=make_config(tmp_path, **overrides),
                           train_dataset=make_dataset() if dataset is None else dataset,
                           processing_class=tokenizer)


# ----------------------------------------------------------------------------------------------------------
# training: 2 steps per estimator, GEC on and off


@pytest.mark.parametrize("gec", [False, True], ids=["gec_off", "gec_on"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_two_training_steps(estimator, gec, model_dir, tokenizer, tmp_path):
    trainer = make_trainer(model_dir, tokenizer, tmp_path, advantage_estimator=estimator, gec=gec,
                           use_edge_kernels=True)
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    assert trainer.state.global_step == 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    if estimator != "grpo":
        assert all("edge/adv_group_var" in h for h in logs)
    if gec:
        assert all("gec/incorrect_frac" in h for h in logs)
        assert any(h["gec/regenerated_frac"] + h["gec/injected_frac"] + h["gec/replaced_frac"] > 0 for h in logs)
    # a non-zero advantage somewhere moved the LM head
    if any(h.get("edge/zero_adv_group_frac", 0.0) < 1.0 or h["reward_std"] > 0 for h in logs):
        assert not torch.equal(before, trainer.model.lm_head.weight.detach())


def test_trl_options_with_kl_and_current_entropy_eda(model_dir, tokenizer, tmp_path):
    """beta > 0 (reference model loaded from the saved path), clip-higher, sequence-level IS, entropy masking and
    bonus, DAPO loss, num_iterations > 1 (old log-probs kept), EDA with the current policy's entropy."""
    trainer = make_trainer(
        model_dir, tokenizer, tmp_path, advantage_estimator="eda", eda_entropy_source="current",
        eda_clamp=[0.5, 2.0], use_edge_kernels=True, beta=0.05, loss_type="dapo", epsilon_high=0.28,
        importance_sampling_level="sequence", top_entropy_quantile=0.5, entropy_coef=0.01, num_iterations=2,
    )
    assert trainer.ref_model is not None and getattr(trainer.ref_model, "_edge_kernels_lm_head", False)
    assert getattr(trainer.model, "_edge_kernels_lm_head", False)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("kl" in h for h in logs)


# ----------------------------------------------------------------------------------------------------------
# the kernel in place of TRL's fused LM head


def _fixed_batch(tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, P, T = 4, 5, 7
    vocab = len(tokenizer)
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    prompt_ids[0, :2] = tokenizer.pad_token_id
    completion_ids = torch.randint(3, vocab, (B, T), generator=g)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 6:] = 0
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.5, 0.25, -1.5]),
        "num_items_in_batch": completion_mask.sum(),
    }


@pytest.mark.parametrize("loss_type,is_level,model", [("grpo", "token", "model_dir"), ("dapo", "sequence", "model_dir"),
                                                      ("dr_grpo", "token", "model_dir"),
                                                      ("grpo", "token", "gemma_dir")])
def test_edge_kernels_match_trl_native(loss_type, is_level, model, tokenizer, tmp_path, request):
    # gemma_dir: a soft-capped Gemma-2, whose final_logit_softcapping the adapter passes to the kernel
    model_dir = request.getfixturevalue(model)
    common = dict(beta=0.1, loss_type=loss_type, importance_sampling_level=is_level, top_entropy_quantile=0.6,
                  entropy_coef=0.05, epsilon_high=0.28, temperature=0.7)
    native = make_trainer(model_dir, tokenizer, tmp_path / "a", use_edge_kernels=False, **common)
    edge = make_trainer(model_dir, tokenizer, tmp_path / "b", use_edge_kernels=True, **common)
    assert not getattr(native.model, "_edge_kernels_lm_head", False)
    assert getattr(edge.model, "_edge_kernels_lm_head", False)
    batch = _fixed_batch(tokenizer)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    T = batch["completion_ids"].shape[1]
    m = batch["completion_mask"].bool()

    outs = []
    for tr in (native, edge):
        with torch.no_grad():
            lp, ent, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, am, T, compute_entropy=True)
            ref, _, _ = tr._get_per_token_logps_and_entropies(tr.ref_model, ids, am, T)
        outs.append((lp, ent, ref))
    for x, y in zip(outs[0], outs[1]):
        torch.testing.assert_close(x[m], y[m], atol=1e-5, rtol=0)
    # the entropies are the full-vocabulary ones at the sampling temperature (independent check)
    with torch.no_grad():
        logits = native.model(input_ids=ids, attention_mask=am).logits[:, -T - 1:-1] / 0.7
    ref_ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(outs[1][1][m], ref_ent[m], atol=1e-5, rtol=0)

    lp0 = outs[0][0]
    batch["old_per_token_logps"] = lp0 + 0.3 * torch.randn(lp0.shape, generator=torch.Generator().manual_seed(1))
    batch["ref_per_token_logps"] = outs[0][2] - 0.1
    losses, grads = [], []
    for tr in (native, edge):
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call _compute_loss directly
        tr.model.zero_grad()
        loss = tr._compute_loss(tr.model, dict(batch))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and "lm_head.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_all_masked_micro_batch_is_a_differentiable_zero(model_dir):
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    install_edge_lm_head(model, temperature=1.0)
    ids = torch.randint(3, 50, (2, 6))
    out = model(input_ids=ids, labels=torch.full_like(ids, -100), fused_lm_head=True)
    assert out.log_probs.shape == (2, 5) and not out.log_probs.any()
    out.log_probs.sum().backward()
    assert model.lm_head.weight.grad is not None and not model.lm_head.weight.grad.any()
    # generation still goes through the model's own forward
    assert model(input_ids=ids).logits.shape == (2, 6, model.config.vocab_size)


def test_soft_capped_model_trains_two_steps(gemma_dir, tokenizer, tmp_path):
    trainer = make_trainer(gemma_dir, tokenizer, tmp_path, advantage_estimator="eda", use_edge_kernels=True)
    assert getattr(trainer.model, "_edge_kernels_lm_head", False)
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and len(logs) == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    if any(h["reward_std"] > 0 for h in logs):
        assert not torch.equal(before, trainer.model.lm_head.weight.detach())


def test_edge_lm_head_applies_the_model_softcap(gemma_dir):
    """The fused head's log-probs are those of the model's own (soft-capped) logits, not of the raw ones."""
    model = Gemma2ForCausalLM.from_pretrained(gemma_dir, attn_implementation="eager")
    ids = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        install_edge_lm_head(model, temperature=1.0)
        out = model(input_ids=ids, labels=ids, fused_lm_head=True)
        model.config.final_logit_softcapping = None  # what the adapter computed before: no cap
        install_edge_lm_head(model, temperature=1.0)
        uncapped = model(input_ids=ids, labels=ids, fused_lm_head=True)
    torch.testing.assert_close(out.log_probs, ref, atol=1e-5, rtol=0)
    assert (uncapped.log_probs - ref).abs().max() > 0.1


@pytest.mark.parametrize("bad", [0.0, -30.0, float("nan")])
def test_install_edge_lm_head_refuses_a_bad_softcap(model_dir, bad):
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    model.config.final_logit_softcapping = bad
    with pytest.raises(ValueError, match="final_logit_softcapping.*softcap"):
        install_edge_lm_head(model, temperature=1.0)


# ----------------------------------------------------------------------------------------------------------
# the advantages the trainer trains on are the reference functions' (per group, before the shuffle)


@pytest.mark.parametrize("estimator", ["eda", "egpo", "prog_grpo", "ep_grpo"])
def test_advantages_match_reference(estimator, model_dir, tokenizer, tmp_path):
    trainer = make_trainer(model_dir, tokenizer, tmp_path, advantage_estimator=estimator, use_edge_kernels=True,
                           egpo_uncertainty="nll")
    trainer.model.train()
    rows = [dict(r) for r in make_dataset() for _ in range(G)][:G * 2]
    torch.manual_seed(3)
    out = trainer._generate_and_score_completions(rows)
    rpf = trainer._edge_rewards_per_func
    rewards = (rpf * trainer.reward_weights).nansum(1)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    mask = out["completion_mask"].bool()
    with torch.no_grad():
        logp, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, mask.shape[1],
                                                                   compute_entropy=True)
    base = A.grpo_advantages(rewards, group_size=G, eps=1e-6)
    thr = trainer.args.correct_threshold
    if estimator == "eda":
        ref = A.eda_advantages(base, A.seq_mean_entropy(ent, mask), group_size=G)
    elif estimator == "egpo":
        ref = A.egpo_advantages(rewards, A.nll_uncertainty(logp, mask), group_size=G, correct_threshold=thr)
    elif estimator == "prog_grpo":
        ref = A.prog_grpo_advantages(base, logp, mask, rewards, group_size=G, correct_threshold=thr)
    else:
        ref = A.ep_grpo_token_advantages(base, ent, mask, rewards, group_size=G, correct_threshold=thr)
    assert out["advantages"].shape == ref.shape
    torch.testing.assert_close(out["advantages"], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("estimator", ["eda", "egpo"])
def test_fully_masked_completions_stay_out_of_the_group_means(estimator, model_dir, tokenizer, tmp_path):
    # mask_truncated_completions (or GEC with gec_mask_injected) can leave a completion with no token: its
    # P = U = 0 must not drag the group mean down (which halved the other rows' EDA advantages)
    trainer = make_trainer(model_dir, tokenizer, tmp_path, advantage_estimator=estimator, use_edge_kernels=True,
                           egpo_uncertainty="entropy")
    trainer.model.train()
    batch = {k: v for k, v in _fixed_batch(tokenizer).items() if k != "advantages"}
    batch["completion_mask"][2:] = 0  # rows 2 and 3 truncated away
    trainer._edge_rewards_per_func = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    out = trainer._edge_advantages(batch)
    mask = batch["completion_mask"].bool()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        _, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, mask.shape[1],
                                                                compute_entropy=True)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    p = A.seq_mean_entropy(ent, mask)
    if estimator == "eda":
        # only rows 0 and 1 form the mean: s_i = mean(P_0, P_1) / (P_i + eps); rows 2, 3 keep scale 1
        base = A.grpo_advantages(rewards, group_size=G, eps=1e-6)
        m01 = (p[0] + p[1]) / 2
        expected = base * torch.stack([m01 / (p[0] + 1e-6), m01 / (p[1] + 1e-6), torch.tensor(1.0),
                                       torch.tensor(1.0)])
    else:
        expected = A.egpo_advantages(rewards, p, group_size=G, correct_threshold=trainer.args.correct_threshold,
                                     valid=mask.any(-1))
    torch.testing.assert_close(out["advantages"], expected, atol=1e-5, rtol=1e-5)
    assert out["advantages"].abs().max() < 10  # no 1 / eps blow-up on the empty rows


def test_gec_strips_every_stop_token_before_correcting(model_dir, tokenizer, tmp_path):
    # a chat model stops on several tokens (generation_config.eos_token_id is a list): a completion that ended
    # on any of them must lose it before the injected text is appended, not keep it mid-completion
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 5]
    trainer = EdgeGRPOTrainer(model=model, reward_funcs=REWARDS,
                              args=make_config(tmp_path, gec=True, gec_p_regenerate=0.0,
                                               gec_p_inject=1.0, gec_p_reference=0.0),
                              train_dataset=make_dataset(), processing_class=tokenizer)
    assert 5 in trainer.eos_token_ids
    trainer.model.train()
    rows = [dict(r) for r in make_dataset()][:1] * 4
    trainer._edge_batch_inputs = rows
    prompts = [r["prompt"] for r in rows]
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    completion_ids = [[10, 11, 12, 5]] * 2 + [[10, 11, 12, tokenizer.eos_token_id]] * 2  # stopped on either
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    out = trainer._gec_correct(prompts, prompt_ids, completion_ids, None, completions, None, {}, None, [])
    injected = tokenizer.encode(trainer._gec_config().injection.replace("ANSWER", "2"), add_special_tokens=False)
    for ids in out[1]:
        assert ids == [10, 11, 12] + injected + [tokenizer.eos_token_id]  # the stop token is gone


def test_reference_model_head_goes_inside_parallel_wrappers(model_dir):
    # TRL wraps the reference model (FSDP1, DeepSpeed, DDP) before our head is installed: the head must go on
    # the model inside, or the wrapper's forward (which unshards the weights) would be bypassed
    from transformers import AutoModelForCausalLM

    inner = AutoModelForCausalLM.from_pretrained(model_dir)

    class FullyShardedDataParallel(torch.nn.Module):  # the name is what the unwrapping looks at
        def __init__(self, module):
            super().__init__()
            self.module = module

    class DeepSpeedEngine(FullyShardedDataParallel):
        pass

    assert _unwrap_parallel(DeepSpeedEngine(FullyShardedDataParallel(inner))) is inner
    assert _unwrap_parallel(inner) is inner


def test_eda_current_entropy_source_has_the_entropy_gradient(model_dir, tokenizer, tmp_path):
    """At the sampling weights the current entropy equals the scoring pass's, so the loss is the 'old' one;
    the gradient differs by the 1/P_i term (docs/algorithms.md section 2, 'current')."""
    trainer = make_trainer(model_dir, tokenizer, tmp_path, advantage_estimator="eda", eda_entropy_source="current",
                           use_edge_kernels=True)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = [dict(r) for r in make_dataset() for _ in range(G)][:G * 2]
    out = trainer._generate_and_score_completions(rows)
    assert {"edge_base_advantages", "edge_group_ids"} <= out.keys()
    old_mode = {k: v for k, v in out.items() if not k.startswith("edge_")}  # TRL's path, A^ from the old pass
    losses, grads = [], []
    for batch in (out, old_mode):
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(trainer.model.lm_head.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert torch.equal(out["advantages"], old_mode["advantages"])  # the buffered batch is not mutated


# ----------------------------------------------------------------------------------------------------------
# GEC


def test_gec_answer_injection_rescored_and_masked(model_dir, tokenizer, tmp_path):
    trainer = make_trainer(model_dir, tokenizer, tmp_path, advantage_estimator="grpo", gec=True,
                           gec_p_regenerate=0.0, gec_p_inject=1.0, gec_p_reference=0.0,
                           gec_mask_injected=True)
    trainer.model.train()
    rows = [dict(r) for r in make_dataset() for _ in range(G)][:G]
    out = trainer._generate_and_score_completions(rows)
    # every sampled completion was incorrect, got the answer injected, and TRL re-scored it as correct
    acc = trainer._edge_rewards_per_func[:, 0]
    assert torch.all(acc == 1.0)
    texts = tokenizer.batch_decode(out["completion_ids"], skip_special_tokens=True)
    assert all(t.endswith("the correct answer is \\boxed{2}.") for t in texts)
    # the injected text (and its EOS) is masked out of the loss; sampled tokens stay in
    inj = len(tokenizer("\nWait! Something is wrong here. After verification, the correct answer is \\boxed{2}.",
                        add_special_tokens=False).input_ids) + 1
    lengths = out["completion_mask"].sum(1)
    for row in range(G):
        n = int(lengths[row])
        assert out["tool_mask"][row, n - inj:n].sum() == 0
        assert out["tool_mask"][row, :n - inj].all()
    assert trainer._metrics["train"]["gec/injected_frac"][-1] == 1.0


def test_gec_replacement_and_regeneration(model_dir, tokenizer, tmp_path):
    trainer = make_trainer(model_dir, tokenizer, tmp_path, advantage_estimator="eda", gec=True,
                           gec_p_regenerate=0.5, gec_p_inject=0.0, gec_p_reference=0.5, gec_seed=1)
    trainer.model.train()
    rows = [dict(r) for r in make_dataset() for _ in range(G)][:G * 2]
    out = trainer._generate_and_score_completions(rows)
    texts = tokenizer.batch_decode(out["completion_ids"], skip_special_tokens=True)
    m = trainer._metrics["train"]
    assert m["gec/regenerated_frac"][-1] > 0 and m["gec/replaced_frac"][-1] > 0
    assert any(t in {r["solution"] for r in rows} for t in texts)
    assert any(" Wait! Something is wrong here." in t for t in texts)
    assert "tool_mask" not in out  # injected text is trained on by default


def test_gec_requires_answer_and_solution_columns(model_dir, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"needs the dataset column\(s\) \['answer', 'solution'\]"):
        make_trainer(model_dir, tokenizer, tmp_path, dataset=make_dataset(False, False), gec=True)
    with pytest.raises(ValueError, match=r"\['solution'\]"):
        make_trainer(model_dir, tokenizer, tmp_path, dataset=make_dataset(True, False), gec=True)
    # without injection / replacement no column is needed
    make_trainer(model_dir, tokenizer, tmp_path, dataset=make_dataset(False, False), gec=True,
                 gec_p_regenerate=1.0, gec_p_inject=0.0, gec_p_reference=0.0)


# ----------------------------------------------------------------------------------------------------------
# refusals


def test_refusals(model_dir, tokenizer, tmp_path):
    with pytest.raises(TypeError, match="EdgeGRPOConfig"):
        EdgeGRPOTrainer(model=model_dir, reward_funcs=REWARDS, processing_class=tokenizer,
                        args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                        per_device_train_batch_size=G, num_generations=G),
                        train_dataset=make_dataset())
    with pytest.raises(ValueError, match="sum_then_normalize"):
        make_trainer(model_dir, tokenizer, tmp_path, advantage_estimator="egpo",
                     multi_objective_aggregation="normalize_then_sum")
    with pytest.raises(ValueError, match="prog_baseline"):
        make_config(tmp_path, advantage_estimator="prog_grpo", prog_baseline="prompt")
    with pytest.raises(ValueError, match="eda_entropy_source='current'"):
        make_config(tmp_path, advantage_estimator="egpo", eda_entropy_source="current")
    with pytest.raises(ValueError, match="advantage_estimator"):
        make_config(tmp_path, advantage_estimator="ppo")
    with pytest.raises(ValueError, match="egpo_w_min must be > 0"):
        make_config(tmp_path, advantage_estimator="egpo", egpo_w_min=0.0)
    with pytest.raises(ValueError, match="must hold whole groups"):  # TRL shuffles groups across its steps
        make_trainer(model_dir, tokenizer, tmp_path, advantage_estimator="eda", eda_entropy_source="current",
                     steps_per_generation=2)
    with pytest.raises(ValueError, match="sum to at most 1"):
        make_config(tmp_path, gec_p_regenerate=0.6, gec_p_inject=0.6)
    with pytest.raises(ValueError, match="use_vllm=True with vllm_mode='server'"):  # colocate: tests/vllm_rollout
        make_trainer(model_dir, tokenizer, tmp_path, gec=True, use_vllm=True, vllm_mode="server")
    with pytest.raises(ValueError, match="rollout_func"):
        EdgeGRPOTrainer(model=model_dir, reward_funcs=REWARDS, processing_class=tokenizer, train_dataset=make_dataset(),
                        args=make_config(tmp_path, gec=True), rollout_func=lambda prompts, trainer: {})


def test_unscorable_completion_is_refused(model_dir, tokenizer, tmp_path):
    def none_reward(completions, **kwargs):
        return [None] * len(completions)

    trainer = EdgeGRPOTrainer(model=model_dir, reward_funcs=[none_reward], processing_class=tokenizer,
                              args=make_config(tmp_path, advantage_estimator="eda"), train_dataset=make_dataset())
    trainer.model.train()
    rows = [dict(r) for r in make_dataset() for _ in range(G)][:G]
    with pytest.raises(ValueError, match="returned None"):
        trainer._generate_and_score_completions(rows)


# ----------------------------------------------------------------------------------------------------------
# the example script


def test_example_script_smoke(tmp_path):
    """integrations/examples/trl_edge_grpo.py --smoke, as a new user runs it: edge-train's embedded model after its
    warm-up (mixed rewards within groups), EDA + GEC + our kernel; the run shows non-zero advantages, GEC
    corrections and a loss that moves."""
    pytest.importorskip("math_verify")
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "integrations", "examples", "trl_edge_grpo.py")
    spec = importlib.util.spec_from_file_location("trl_edge_grpo_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.main(["--smoke", "--output-dir", str(tmp_path / "run")])
    assert trainer.args.gec and trainer.args.advantage_estimator == "eda"
    assert getattr(trainer.model, "_edge_kernels_lm_head", False)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == trainer.state.global_step >= 2
    assert all(h["edge/zero_adv_group_frac"] < 1 and h["edge/adv_group_var"] > 0 for h in logs)
    assert all(h["gec/regenerated_frac"] + h["gec/injected_frac"] + h["gec/replaced_frac"] > 0 for h in logs)
    losses = [h["loss"] for h in logs]
    assert all(loss != 0 for loss in losses) and len(set(losses)) > 1


# ----------------------------------------------------------------------------------------------------------
# one estimator layer: the same batch through edge-train, the TRL adapter and the verl estimator


# Non-default values of every option each estimator reads, under the one set of names of all three front ends.
_CONSISTENCY_OPTIONS = {
    "eda": dict(eda_clamp=[0.7, 1.5], eda_eps=1e-5),
    "egpo": dict(egpo_uncertainty="entropy", egpo_w_min=0.8, egpo_w_max=1.5, egpo_mode="symmetric",
                 egpo_renorm=True, egpo_nsr_value=-0.5, egpo_eps=1e-5),
    "prog_grpo": dict(prog_alpha=0.5, prog_low_frac=0.3),
    "ep_grpo": dict(ep_g_min=0.6, ep_g_max=1.8, ep_num_buckets=3, ep_lambda=0.2, ep_eps=1e-5),
}


def _consistency_batch():
    g = torch.Generator().manual_seed(7)
    B, T, D, V = 2 * G, 6, 8, 11
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0])  # group 2 entirely incorrect
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[6, 2:] = 0
    hidden = torch.randn(B, T, D, generator=g)
    weight = torch.randn(V, D, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    from edge_kernels import linear_logprob_entropy

    logp, ent = linear_logprob_entropy(hidden, weight, targets, return_entropy=True, impl="torch")
    return rewards, mask, hidden, weight, targets, logp, ent


def _moved(weight):
    """The LM head after some updates: the policy being updated is no longer the one that scored the batch, so
    EDA "current" (P and its group mean from this policy) differs from "old"."""
    return weight * torch.linspace(0.5, 1.5, weight.shape[0])[:, None]


def _through_edge_train(estimator, source, opts, batch, tmp_path):
    """edge-train: Trainer._advantages, and for EDA "current" the advantages its fused loss trains on."""
    import edge_kernels.losses as L
    from edge_kernels.train.config import TrainConfig
    from edge_kernels.train.loop import Trainer

    rewards, mask, hidden, weight, targets, logp, ent = batch
    cfg = TrainConfig(output=str(tmp_path / "et"), estimator=estimator, eda_entropy_source=source, group_size=G,
                      correct_threshold=0.6, **opts)
    tr = Trainer(cfg, log=lambda s: None)
    est = tr._advantages(rewards, logp.detach(), ent.detach(), mask.bool())
    if not est.rescale_in_loss:
        return est.advantages
    import edge_kernels.losses.objectives as objectives

    seen = []
    real = objectives._eda_current  # where the loss rescales the advantages (docs/algorithms.md section 2)
    objectives._eda_current = lambda *a, **k: (lambda out: (seen.append(out[0]), out)[1])(real(*a, **k))
    try:
        o = tr.estimator_options
        L.fused_linear_policy_loss(hidden.clone().requires_grad_(), _moved(weight), targets, est.base, mask,
                                   eda="current", group_size=G, eda_eps=o.eda_eps, eda_clamp=o.eda_clamp, impl="torch")
    finally:
        objectives._eda_current = real
    assert seen[0].requires_grad  # gradient through 1 / P_i
    assert not torch.allclose(seen[0], est.advantages)  # the moved policy's entropies, group mean included
    return seen[0]


def _through_trl(source, batch, trainer):
    """The TRL adapter: _edge_advantages on the generation batch, and for EDA "current" the loss-time rescale
    with the current policy's entropies."""
    rewards, mask, hidden, weight, targets, logp, ent = batch
    trainer.model.train()
    trainer._edge_rewards_per_func = rewards[:, None]
    trainer.reward_weights = torch.ones(1)
    trainer._edge_scoring_pass = lambda output, mode: (logp.detach(), ent.detach())  # the batch's scoring pass
    out = trainer._edge_advantages({"completion_ids": targets, "completion_mask": mask.long(),
                                    "old_per_token_logps": logp.detach()})
    if source == "old":
        return out["advantages"]
    assert {"edge_base_advantages", "edge_group_ids"} <= out.keys()
    from edge_kernels import linear_logprob_entropy

    _, current = linear_logprob_entropy(hidden.clone().requires_grad_(), _moved(weight), targets,
                                        return_entropy=True, impl="torch")
    adv = trainer._edge_eda_current({**out, "completion_mask": mask.long()}, current)
    assert adv.requires_grad
    return adv


def _through_verl(estimator, opts, batch):
    import numpy as np

    import edge_kernels.integrations.verl as ev

    rewards, mask, hidden, weight, targets, logp, ent = batch
    T = mask.shape[1]
    token_rewards = torch.zeros(mask.shape)
    token_rewards[:, -1] = rewards
    index = np.array([f"q{i // G}" for i in range(mask.shape[0])], dtype=object)
    name = "edge_grpo" if estimator in ("grpo", "dr_grpo") else f"edge_{estimator}"
    config = {"norm_adv_by_std_in_grpo": estimator != "dr_grpo", "edge": {"correct_threshold": 0.6, **opts}}
    adv, _ = ev._ESTIMATOR_FNS[name](token_rewards, mask, config=config, index=index, old_log_probs=logp.detach(),
                                     entropys=ent.detach())
    assert adv.shape == (mask.shape[0], T)
    return adv


@pytest.mark.parametrize("estimator, source", [("grpo", "old"), ("dr_grpo", "old"), ("eda", "old"),
                                               ("eda", "current"), ("egpo", "old"), ("prog_grpo", "old"),
                                               ("ep_grpo", "old")])
def test_one_batch_gives_the_same_advantages_everywhere(estimator, source, model_dir, tokenizer, tmp_path):
    """edge-train's step, the TRL adapter and the verl estimator map their options onto the one estimator layer:
    identical advantages for every estimator and both EDA entropy sources (docs/algorithms.md section 2: 'current'
    = the entropy of the policy being updated, gradient through 1/P_i, group mean detached)."""
    batch = _consistency_batch()
    mask = batch[1]
    opts = _CONSISTENCY_OPTIONS.get(estimator, {})
    ours = _through_edge_train(estimator, source, opts, batch, tmp_path)
    tokens = lambda a: (a[:, None] if a.dim() == 1 else a) * mask  # noqa: E731 - verl's [B, T] layout
    if estimator in ("eda", "egpo", "prog_grpo", "ep_grpo"):  # TRL's own "grpo" keeps TRL's advantages
        trainer = make_trainer(model_dir, tokenizer, tmp_path, advantage_estimator=estimator,
                               eda_entropy_source=source, correct_threshold=0.6, **opts)
        torch.testing.assert_close(_through_trl(source, batch, trainer), ours, rtol=0, atol=0)
    if source == "old":
        torch.testing.assert_close(_through_verl(estimator, opts, batch), tokens(ours.detach()), rtol=0, atol=0)
    else:  # verl's policy-loss functions receive no entropies: "current" is refused with a clear error
        with pytest.raises(ValueError, match="eda_entropy_source must be 'old' in verl"):
            _through_verl(estimator, {**opts, "eda_entropy_source": "current"}, batch)
    assert bool((ours != 0).any())
