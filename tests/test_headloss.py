"""The chunked head loss (headloss.py) is transformers' loss: same value, same gradient on every trained
parameter, for full FT and LoRA, tied and untied heads, ignored labels, in one chunk or many; and it stands
aside where it would not be exact."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from lorascope.config import MethodConfig
from lorascope.train import headloss
from lorascope.train.headloss import HeadLoss
from lorascope.train.methods import apply_method

VOCAB = 320


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 24), generator=g)
    labels = ids.clone()
    labels[0, :9] = -100  # a prompt: not a target
    labels[2, 20:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _model(kind: str, tie: bool):
    torch.manual_seed(0)
    model = make_tiny_llama(VOCAB, tie=tie)
    m = MethodConfig(kind="full") if kind == "full" else MethodConfig(kind="lora", rank=4, targets="all", dropout=0.0)
    model = apply_method(model, m)
    if kind == "lora":  # B starts at zero: move it, so the LoRA gradients all flow through the head
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    return model.train()


def _grads(model, loss_fn) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind,tie", [("full", True), ("full", False), ("lora", True)])
@pytest.mark.parametrize("chunk_rows", [1000, 7])
def test_loss_and_gradients_equal_transformers(kind, tie, chunk_rows, monkeypatch):
    # chunk_rows 7: the 72 positions split evenly, 9 chunks of 8
    monkeypatch.setattr(headloss, "CHUNK_BYTES", 4 * VOCAB * chunk_rows)
    model, batch = _model(kind, tie), _batch()
    n = int((batch["labels"][:, 1:] != -100).sum())
    want, gw = _grads(model, lambda: model(**batch, num_items_in_batch=n).loss)
    hl = HeadLoss.install(model, {k: v[0] for k, v in _batch(1).items()}, "fp32")
    assert hl is not None
    got, gg = _grads(model, lambda: hl.loss(model, batch, n))
    assert got == pytest.approx(want, rel=1e-6)
    assert gw.keys() == gg.keys() and len(gw) > 4
    for name in gw:
        assert torch.allclose(gg[name], gw[name], rtol=1e-4, atol=1e-7), name
    # labels unset: the head is the plain head again (evaluation, generation)
    with torch.no_grad():
        assert model(input_ids=batch["input_ids"]).logits.shape == (3, 24, VOCAB)


@pytest.mark.parametrize("want_w", [False, True])
def test_a_chunk_holds_one_vocabulary_wide_block(want_w, monkeypatch):
    """While the loss runs, at most one (rows x vocabulary) block of a chunk is alive at a time (logits, their
    exponentials and the gradient share it), whatever needs a gradient."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    class Blocks(TorchDispatchMode):
        def __init__(self, weight):
            super().__init__()
            self.alive, self.most, self.weight = {}, 0, weight.untyped_storage().data_ptr()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (
                    isinstance(t, torch.Tensor)
                    and t.dim() == 2
                    and t.shape[1] == VOCAB
                    and t.shape[0] > 1
                    and t.untyped_storage().data_ptr() != self.weight
                ):  # not a view of the head's weight
                    self.alive[t.untyped_storage().data_ptr()] = weakref.ref(t)
            self.alive = {k: r for k, r in self.alive.items() if r() is not None}
            self.most = max(self.most, len(self.alive))
            return out

    monkeypatch.setattr(headloss, "CHUNK_BYTES", 4 * VOCAB * 16)  # 16 rows a chunk: 4 chunks of 64 rows
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 24, generator=g, requires_grad=True)
    w = torch.randn(VOCAB, 24, generator=g, requires_grad=want_w)
    labels = torch.randint(0, VOCAB, (64,), generator=g)
    blocks = Blocks(w)
    with blocks:
        headloss.linear_cross_entropy(h, w, labels, 64.0).backward()
    assert blocks.most == 1 and h.grad is not None


def test_stands_aside_where_it_would_not_be_exact(caplog):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    row = {k: v[0] for k, v in _batch().items()}  # a training row (its prompt is no target)
    # soft-capped logits (Gemma 2): the probe catches it, and the head is left as it was
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            final_logit_softcapping=0.5,
        )
    )
    with caplog.at_level("INFO", logger="lorascope.train.headloss"):
        assert HeadLoss.install(gemma, row, "fp32") is None
    assert "transformers gives" in caplog.text
    assert "forward" not in vars(gemma.get_output_embeddings())
    # bf16 (autocast) and an adapted head keep transformers' loss without a probe
    assert HeadLoss.install(_model("full", True), row, "bf16") is None
    lora_head = apply_method(
        make_tiny_llama(VOCAB, tie=False), MethodConfig(kind="lora", rank=4, targets=["q_proj", "lm_head"])
    )
    assert HeadLoss.install(lora_head, row, "fp32") is None
