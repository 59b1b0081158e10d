"""Atomic checkpoints: write-then-rename, the fallback to checkpoint.old, RNG states."""

import os
import random

import torch

from edge_kernels.train import checkpoint as ckpt
from edge_kernels.train import embedded as E


def _model():
    tr, _ = E.make_task(0, 40, 0)
    tok = E.build_tokenizer(E.tokenizer_corpus(tr), vocab_size=300)
    cfg = E.ModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1)
    return E.build_model(tok, cfg), tok


def test_save_find_load(tmp_path):
    model, tok = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[3, 4, 5]])).logits.sum().backward()
    opt.step()
    out = str(tmp_path)
    path = ckpt.save(out, model=model, tokenizer=tok, optimizer=opt, state={"step": 3})
    assert path == os.path.join(out, "checkpoint")
    assert not os.path.exists(os.path.join(out, "checkpoint.tmp"))
    assert ckpt.find(out) == path and ckpt.load_state(path) == {"step": 3}
    ckpt.save(out, model=model, tokenizer=tok, optimizer=opt, state={"step": 4})
    assert ckpt.load_state(ckpt.find(out)) == {"step": 4}
    assert sorted(os.listdir(out)) == ["checkpoint"]
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt.load_optimizer(path, opt2)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_a_kill_between_the_renames_leaves_the_old_checkpoint(tmp_path):
    model, tok = _model()
    out = str(tmp_path)
    ckpt.save(out, model=model, tokenizer=tok, optimizer=None, state={"step": 1})
    # the state right after "checkpoint -> checkpoint.old" and before "checkpoint.tmp -> checkpoint"
    os.replace(os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.old"))
    os.makedirs(os.path.join(out, "checkpoint.tmp"))  # an incomplete new one
    assert ckpt.find(out) == os.path.join(out, "checkpoint.old")
    ckpt.save(out, model=model, tokenizer=tok, optimizer=None, state={"step": 2})
    assert sorted(os.listdir(out)) == ["checkpoint"]
    assert ckpt.load_state(ckpt.find(out))["step"] == 2
    assert ckpt.find(str(tmp_path / "nothing")) is None


def test_rng_roundtrip(tmp_path):
    torch.manual_seed(0)
    random.seed(0)
    state = ckpt.rng_state()
    a = (torch.rand(3), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
