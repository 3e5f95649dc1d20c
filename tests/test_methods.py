"""Every method variant trains, saves, reloads and yields the right dW (tiny random Llama)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorascope.config import MethodConfig
from lorascope.errors import ConfigError
from lorascope.methods import (apply_method, merged_state_dict, param_groups, save_checkpoint,
                               trainable_parameters, weight_deltas)

BATCH = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))


def _load(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)


def _train(model, m, steps=2, lr=1e-2):
    opt = torch.optim.AdamW(param_groups(model, m, lr, 0.0))
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=BATCH, labels=BATCH).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _logits(model):
    with torch.no_grad():
        return model(input_ids=BATCH).logits


VARIANTS = {
    "gaussian": dict(rank=4),
    "rslora": dict(rank=4, use_rslora=True),
    "dora": dict(rank=4, use_dora=True),
    "loraplus": dict(rank=4, loraplus_lr_ratio=16),
    "pissa": dict(rank=4, init="pissa"),
    "olora": dict(rank=4, init="olora"),
    "emb": dict(rank=4, train_embed_tokens=True, embedding_lr=1e-3),
    "attention-v1": dict(rank=4, targets="all-v1"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_saves_reloads(variant, tiny_model_dir, tmp_path):
    from peft import PeftModel

    base = _load(tiny_model_dir)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    m = MethodConfig(kind="lora", **VARIANTS[variant])
    model = apply_method(base, m, work_dir=tmp_path / "work")
    losses = _train(model, m)
    assert all(torch.isfinite(torch.tensor(losses)))
    ref = _logits(model)
    ck = tmp_path / "ck"
    save_checkpoint(model, m, ck, str(tiny_model_dir), {"tokens": 64, "step": 2})
    meta = json.loads((ck / "lorascope.json").read_text())
    if meta["kind"] == "lora":
        reloaded = PeftModel.from_pretrained(_load(tiny_model_dir), str(ck))
    else:  # loftq: merged full model
        assert meta["adapter_init"] == "loftq"
        reloaded = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
    reloaded.eval()
    assert (_logits(reloaded) - ref).abs().max().item() <= 1e-4
    # dW = merged - ORIGINAL base (right also for inits that move the base)
    merged = merged_state_dict(model)
    dws = weight_deltas(base_state, merged)
    assert dws, "training changed nothing"
    for name, dw in dws.items():
        assert torch.allclose(base_state[name] + dw, merged[name])
        if variant in ("gaussian", "rslora", "loraplus", "attention-v1"):
            assert torch.linalg.matrix_rank(dw, rtol=1e-5).item() <= m.rank, name
    if variant == "attention-v1":
        assert not any("gate_proj" in n for n in dws)
    if variant == "emb":
        sd = merged
        assert torch.equal(sd["model.embed_tokens.weight"], sd["lm_head.weight"]) or "lm_head.weight" not in sd
        assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr() \
            or torch.equal(reloaded.get_output_embeddings().weight, reloaded.get_input_embeddings().weight)


def test_full_and_counts(tiny_model, tiny_model_dir, tmp_path):
    total = sum(p.numel() for p in {id(p): p for p in tiny_model.parameters()}.values())
    full = apply_method(tiny_model, MethodConfig(kind="full", attention_dropout=0.1))
    assert trainable_parameters(full) == total
    assert all(getattr(mod, "attention_dropout", 0.1) == 0.1 for mod in full.modules())
    lora = apply_method(_load(tiny_model_dir), MethodConfig(kind="lora", rank=16, targets="all"))
    # per block: q(64->64) k,v(64->32) o(64->64) gate,up(64->128) down(128->64); r*(in+out) each
    per_block = 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert trainable_parameters(lora) == 2 * per_block


def test_loraplus_groups(tiny_model):
    m = MethodConfig(kind="lora", rank=4, loraplus_lr_ratio=16)
    model = apply_method(tiny_model, m)
    groups = {g["name"]: g for g in param_groups(model, m, 1e-4, 0.0)}
    assert groups["lora_B"]["lr"] == pytest.approx(16e-4)
    assert groups["decay" if "decay" in groups else "no_decay"]["lr"] == pytest.approx(1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error path")
def test_loftq_says_why_on_cpu(tiny_model):
    from lorascope.errors import LorascopeError

    with pytest.raises(LorascopeError, match="loftq needs a CUDA GPU"):
        apply_method(tiny_model, MethodConfig(kind="lora", rank=4, init="loftq"))


def test_unknown_target_names_field(tiny_model):
    with pytest.raises(ConfigError, match="method.targets: module 'qkv_proj'"):
        apply_method(tiny_model, MethodConfig(kind="lora", targets=["qkv_proj"]))
