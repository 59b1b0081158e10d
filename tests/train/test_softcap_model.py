"""edge-train with a soft-capped model (``--model`` of a Gemma-2 config, ``final_logit_softcapping``): the
warm-up, the scoring pass and the update pass the model's cap to the fused kernels, so the scored log-probs are
those of the model's own logits, and a training step runs."""

import pytest
import torch

from edge_kernels.train.batch import head_softcap, pack, score
from edge_kernels.train.config import TrainConfig
from edge_kernels.train.loop import Trainer
from train_helpers import TINY, tiny_model_and_tokenizer

SOFTCAP = 5.0  # small enough to bite on this tiny model's logits (checked below)


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from edge_kernels.train.data import Problem, write_problems
    from edge_kernels.train.embedded import make_task

    _, tok = tiny_model_and_tokenizer()
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                       max_position_embeddings=256, sliding_window=32, final_logit_softcapping=SOFTCAP,
                       tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       attn_implementation="eager")
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(32.0)  # raw logits beyond the cap
    root = tmp_path_factory.mktemp("gemma_train")
    model.save_pretrained(root / "m")
    tok.save_pretrained(root / "m")
    rows, _ = make_task(0, 8, 0)
    write_problems([Problem(**r) for r in rows], str(root / "train.jsonl"))
    return root


def test_a_soft_capped_model_trains(gemma_run, tmp_path):
    cfg = TrainConfig(**{**TINY, "output": str(tmp_path / "run"), "model": str(gemma_run / "m"),
                         "data": str(gemma_run / "train.jsonl"), "warmup_steps": 1})
    tr = Trainer(cfg, log=lambda s: None)
    tr.setup()
    assert head_softcap(tr.model) == SOFTCAP

    # the scoring pass gives the log-probs of the model's own (capped) logits
    prompts = [tr.train_prompts[0], tr.train_prompts[1]]
    responses = [[5, 6, 7, 8], [9, 10, 11]]
    packed = pack(prompts, responses, tr.pad_id, device=tr.device)
    logp, _ = score(tr.model, packed, temperature=0.7)
    with torch.no_grad():
        out = tr.model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                       position_ids=packed.position_ids)
        raw = tr.model.model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                             position_ids=packed.position_ids).last_hidden_state @ tr.model.lm_head.weight.t()
    assert raw.abs().max() > 1.5 * SOFTCAP
    P, T = packed.prompt_width, packed.targets.shape[1]
    ref = (out.logits[:, P - 1:P - 1 + T] / 0.7).log_softmax(-1).gather(-1, packed.targets[..., None])[..., 0]
    m = packed.mask
    torch.testing.assert_close(logp[m], ref[m], atol=1e-4, rtol=0)

    tr.warmup()
    before = tr.model.lm_head.weight.detach().clone()
    rec = tr.rl_step()
    assert all(v == v for v in rec.values())  # no NaN
    assert not torch.equal(before, tr.model.lm_head.weight.detach())
