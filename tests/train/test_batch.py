"""Packing and the scoring pass: the fused kernel's log-probs equal a full-logits oracle (tests only)."""

import torch

from train_helpers import tiny_model_and_tokenizer
from edge_kernels.train.batch import pack, response_hidden, score


def test_pack_layout():
    p = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0, injected=[[False, True], [True, False, False]])
    assert p.prompt_width == 3
    assert p.input_ids.tolist() == [[1, 2, 3, 5, 6, 0], [0, 0, 4, 7, 8, 9]]
    assert p.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert p.targets.tolist() == [[5, 6, 0], [7, 8, 9]]
    assert p.mask.tolist() == [[True, True, False], [True, True, True]]
    assert p.injected.tolist() == [[False, True, False], [True, False, False]]


def test_scoring_pass_matches_full_logits():
    model, tok = tiny_model_and_tokenizer()
    torch.manual_seed(0)
    V = len(tok)
    prompts = [torch.randint(3, V, (n,)).tolist() for n in (5, 9, 7)]
    responses = [torch.randint(3, V, (n,)).tolist() for n in (4, 1, 6)]
    p = pack(prompts, responses, pad_id=tok.pad_token_id)
    for temp in (1.0, 0.7):
        logp, ent = score(model, p, temperature=temp, micro_batch=2)
        with torch.no_grad():
            h = response_hidden(model, p)
            logits = model.lm_head(h).float() / temp
            lsm = torch.log_softmax(logits, -1)
            ref_lp = lsm.gather(-1, p.targets[..., None])[..., 0]
            ref_h = -(lsm.exp() * lsm).sum(-1)
        m = p.mask
        torch.testing.assert_close(logp[m], ref_lp[m], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent[m], ref_h[m], atol=1e-5, rtol=1e-5)
        assert (logp[~m] == 0).all() and (ent[~m] == 0).all()


def test_left_padding_does_not_change_scores():
    model, tok = tiny_model_and_tokenizer()
    torch.manual_seed(1)
    V = len(tok)
    prompt, resp = torch.randint(3, V, (5,)).tolist(), torch.randint(3, V, (4,)).tolist()
    alone = score(model, pack([prompt], [resp], tok.pad_token_id), temperature=1.0)[0]
    padded = score(model, pack([prompt, [7] * 12], [resp, [8] * 9], tok.pad_token_id), temperature=1.0)[0]
    torch.testing.assert_close(alone[0, :4], padded[0, :4], atol=1e-5, rtol=1e-5)
