"""Every method variant trains, saves, reloads and yields the right dW (tiny random Llama, vocab 1000).

dW is checked through the analysis code itself (analysis.weights.load_pair / iter_matrices on a saved run
checkpoint) against the in-memory merge of the trained model minus the ORIGINAL base weights.
"""

import copy
import json

import pytest
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM

from lorascope.analysis.weights import iter_matrices, load_pair
from lorascope.config import MethodConfig
from lorascope.errors import ConfigError, LorascopeError
from lorascope.models import load_model
from lorascope.train.methods import (
    adapted_matrix_names,
    apply_method,
    checkpoint_size_bytes,
    param_groups,
    save_checkpoint,
    trainable_parameters,
)

VOCAB = 1000
BATCH = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """{tied: dir} of a saved tiny Llama, so that 'the ORIGINAL base' can be reloaded any time (a tokenizer
    beside it, so that it is a model spec the analysis code loads like any other)."""
    out = {}
    for tie in (True, False):
        d = tmp_path_factory.mktemp(f"tiny-{'tied' if tie else 'untied'}")
        make_tiny_llama(VOCAB, seed=1, tie=tie).save_pretrained(str(d))
        tokenizer.save_pretrained(str(d))
        out[tie] = d
    return out


def _load(d):
    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


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


def _maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def _merged_in_memory(model):
    """The trained model with its adapters merged (DoRA magnitude included); `model` itself is untouched."""
    return copy.deepcopy(model).merge_and_unload()


VARIANTS = {
    "gaussian": dict(rank=4),
    "rslora": dict(rank=4, use_rslora=True),
    "dora": dict(rank=4, use_dora=True),
    "loraplus": dict(rank=4, loraplus_lr_ratio=16),
    "pissa": dict(rank=4, init="pissa"),
    "olora": dict(rank=4, init="olora", use_rslora=True),
    "emb": dict(rank=4, train_embed_tokens=True, embedding_lr=1e-3),
    "attention-v1": dict(rank=4, targets="all-v1"),
}
LOW_RANK = ("gaussian", "rslora", "loraplus", "attention-v1", "emb")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_saves_reloads(variant, model_dirs, tmp_path):
    from peft import PeftModel

    base = _load(model_dirs[True])
    original = {k: v.clone() for k, v in base.state_dict().items()}
    m = MethodConfig(kind="lora", **VARIANTS[variant])
    model = apply_method(base, m, work_dir=tmp_path / "work")
    if m.init in ("pissa", "olora"):  # these inits move the base weights: dW must not be taken against them
        moved = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
        assert not torch.allclose(moved, original["model.layers.0.self_attn.q_proj.weight"])
    losses = _train(model, m)
    assert all(torch.isfinite(torch.tensor(losses)))
    ref = _logits(model)

    ck = tmp_path / "run" / "checkpoints" / "ck"
    save_checkpoint(model, m, ck, str(model_dirs[True]), {"tokens": 64, "step": 2})
    meta = json.loads((ck / "lorascope.json").read_text())
    assert meta == {"kind": "lora", "base": str(model_dirs[True]), "tokens": 64, "step": 2}
    assert not ck.with_name("ck.tmp").exists()
    if m.init in ("pissa", "olora"):  # converted to a plain LoRA of rank 2r on the original base
        assert json.loads((ck / "adapter_config.json").read_text())["r"] == 2 * m.rank
    reloaded = PeftModel.from_pretrained(_load(model_dirs[True]), str(ck)).eval()
    assert _maxdiff(_logits(reloaded), ref) <= 1e-4
    merged, _ = load_model(f"{tmp_path / 'run'}:ck", merge=True)  # what evaluations score
    assert not isinstance(merged, PeftModel) and _maxdiff(_logits(merged), ref) <= 1e-4

    # dW as the analysis computes it from the checkpoint == merged in memory - ORIGINAL base
    in_memory = _merged_in_memory(model)
    assert _maxdiff(_logits(model), ref) == 0.0  # merging a copy did not touch `model`
    pair = load_pair(f"{tmp_path / 'run'}:ck")
    assert _maxdiff(_logits(pair.tuned), ref) <= 1e-4
    dws = {mat.name: mat for mat in iter_matrices(pair.base, pair.tuned, only_changed=True)}
    assert {n + ".weight" for n in dws} <= set(adapted_matrix_names(model))
    for name, mat in dws.items():
        w0 = original[name + ".weight"]
        assert torch.equal(mat.w_base, w0), name  # the original base, not the one PiSSA/OLoRA moved
        assert _maxdiff(mat.delta, in_memory.get_submodule(name).weight - w0) <= 1e-5, name
        if variant in LOW_RANK and mat.layer is not None:
            assert torch.linalg.matrix_rank(mat.delta, rtol=1e-5).item() <= m.rank, name
        if m.init in ("pissa", "olora"):
            assert torch.linalg.matrix_rank(mat.delta, rtol=1e-5).item() <= 2 * m.rank, name
    n_layers = 2
    if variant == "attention-v1":
        assert {n.split(".")[-1] for n in dws} == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    elif variant != "emb":
        assert len(dws) == 7 * n_layers
    if variant == "emb":  # tied: the one shared matrix is trained and stays shared everywhere (no lm_head dW)
        assert "model.embed_tokens" in dws and "lm_head" not in dws
        assert torch.equal(in_memory.get_output_embeddings().weight, in_memory.get_input_embeddings().weight)
        assert torch.equal(reloaded.get_output_embeddings().weight, reloaded.get_input_embeddings().weight)
        with_emb = checkpoint_size_bytes(ck)
        assert with_emb > VOCAB * 64 * 4  # the adapter carries the full matrix


@pytest.mark.parametrize(
    "flags",
    [dict(train_embed_tokens=True), dict(train_lm_head=True), dict(train_embed_tokens=True, train_lm_head=True)],
)
def test_untied_embedding_flags_each_add_their_module(flags, model_dirs, tmp_path):
    from peft import PeftModel

    m = MethodConfig(kind="lora", rank=2, targets=["q_proj"], **flags)
    model = apply_method(_load(model_dirs[False]), m)
    _train(model, m)
    dws = {mat.name for mat in iter_matrices(_load(model_dirs[False]), _merged_in_memory(model), only_changed=True)}
    assert ("model.embed_tokens" in dws) == bool(flags.get("train_embed_tokens"))
    assert ("lm_head" in dws) == bool(flags.get("train_lm_head"))
    save_checkpoint(model, m, tmp_path / "ck", "x", {})
    reloaded = PeftModel.from_pretrained(_load(model_dirs[False]), str(tmp_path / "ck")).eval()
    assert _maxdiff(_logits(reloaded), _logits(model)) <= 1e-4


def test_full_finetuning_groups_save_reload(model_dirs, tmp_path):
    model = _load(model_dirs[True])
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    m = MethodConfig(kind="full", attention_dropout=0.1)
    model = apply_method(model, m)
    assert trainable_parameters(model) == total
    assert model.config.attention_dropout == 0.1
    assert all(mod.attention_dropout == 0.1 for mod in model.modules() if hasattr(mod, "attention_dropout"))
    groups = {g["name"]: g for g in param_groups(model, m, 1e-3, 0.1)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"])  # norms (and biases) are not decayed
    assert len(groups["no_decay"]["params"]) == 2 * 2 + 1
    assert all(torch.isfinite(torch.tensor(_train(model, m))))
    ref = _logits(model)
    save_checkpoint(model, m, tmp_path / "ck", "embedded", {"tokens": 8})
    assert json.loads((tmp_path / "ck/lorascope.json").read_text())["kind"] == "full"
    reloaded = _load(tmp_path / "ck")
    assert _maxdiff(_logits(reloaded), ref) <= 1e-5
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert checkpoint_size_bytes(tmp_path / "ck") >= total * 4


def test_rank16_counts(model_dirs):
    lora = apply_method(_load(model_dirs[True]), MethodConfig(kind="lora", rank=16, targets="all"))
    # per block: q(64->64) k,v(64->32) o(64->64) gate,up(64->128) down(128->64); r*(in+out) each
    per_block = 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert trainable_parameters(lora) == 2 * per_block
    assert len(adapted_matrix_names(lora)) == 14


def test_loraplus_groups(model_dirs):
    m = MethodConfig(
        kind="lora", rank=4, loraplus_lr_ratio=16, use_dora=True, train_embed_tokens=True, embedding_lr=5e-5
    )
    model = apply_method(_load(model_dirs[True]), m)
    groups = {g["name"]: g for g in param_groups(model, m, 1e-4, 0.01)}
    assert groups["lora_B"]["lr"] == pytest.approx(16e-4)
    assert all("lora_B" in n for n, p in model.named_parameters() if any(p is q for q in groups["lora_B"]["params"]))
    assert groups["lora_B_vec"]["lr"] == pytest.approx(16e-4)  # DoRA magnitudes, as peft's LoRA+ does
    assert groups["embedding"]["lr"] == pytest.approx(5e-5)
    a = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert a and all(any(p is q for q in groups["decay"]["params"]) for p in a) and groups["decay"]["lr"] == 1e-4
    n_grouped = sum(len(g["params"]) for g in groups.values())
    assert n_grouped == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error path")
def test_loftq_says_why_on_cpu(model_dirs):
    with pytest.raises(LorascopeError, match="loftq needs a CUDA GPU"):
        apply_method(_load(model_dirs[True]), MethodConfig(kind="lora", rank=4, init="loftq"))


def test_bad_inputs_name_the_field(model_dirs, tmp_path):
    base = _load(model_dirs[True])
    with pytest.raises(ConfigError, match="method.targets: module 'qkv_proj'"):
        apply_method(base, MethodConfig(kind="lora", targets=["qkv_proj"]))
    with pytest.raises(ConfigError, match="method.use_dora: cannot be combined with method.init=pissa"):
        apply_method(base, MethodConfig(kind="lora", init="pissa", use_dora=True), work_dir=tmp_path)
    with pytest.raises(ConfigError, match="method.train_lm_head: cannot be combined with method.init=olora"):
        apply_method(base, MethodConfig(kind="lora", init="olora", train_lm_head=True), work_dir=tmp_path)
    with pytest.raises(LorascopeError, match="needs a work_dir"):
        apply_method(base, MethodConfig(kind="lora", init="pissa"))


@pytest.mark.integration
def test_embedded_lora_r16_all_reloads(tmp_path):
    from peft import PeftModel

    from lorascope.models import load_base

    base, _ = load_base("embedded")
    base.eval()
    m = MethodConfig(kind="lora", rank=16, targets="all")
    model = apply_method(base, m)
    assert not model.training  # the base's eval mode is kept (peft's new dropouts start in training mode)
    # a non-zero B so that the check is not trivially base == base
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3, generator=torch.Generator().manual_seed(len(n)))
    x = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=x).logits
        with model.disable_adapter():
            assert _maxdiff(model(input_ids=x).logits, ref) > 1e-3
    save_checkpoint(model, m, tmp_path / "ck", "embedded", {"tokens": 0})
    fresh, _ = load_base("embedded")
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "ck")).eval()
    with torch.no_grad():
        assert _maxdiff(reloaded(input_ids=x).logits, ref) <= 1e-4
    reloaded.merge_and_unload().save_pretrained(str(tmp_path / "merged"))
    del reloaded, fresh
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert _maxdiff(plain(input_ids=x).logits, ref) <= 1e-4


def _grads(model, seed=0):
    """Loss and the trained parameters' gradients of one forward + backward (dropout masks drawn from `seed`)."""
    model.train()
    torch.manual_seed(seed)
    loss = model(input_ids=BATCH, labels=BATCH).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _nonzero_b(model):
    """A non-zero B everywhere (peft starts B at zero, where the update and A's gradient vanish)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))


def _assert_close_grads(a, b):
    (loss_a, ga), (loss_b, gb) = a, b
    assert abs(loss_a - loss_b) <= 1e-6 * abs(loss_b)
    assert ga.keys() == gb.keys() and any("lora_A" in n for n in ga)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-7), n


@pytest.mark.parametrize("rslora", [False, True])
def test_fused_update_trains_as_stock_peft(model_dirs, rslora):
    """With dropout 0, our LoRA layers (the update fused into the base output) give stock peft's loss and
    gradients to float rounding, and train to the same losses."""
    from peft import LoraConfig, get_peft_model

    from lorascope.train.lora_layers import FusedUpdate

    m = MethodConfig(kind="lora", rank=4, dropout=0.0, use_rslora=rslora)
    torch.manual_seed(0)
    ours = apply_method(_load(model_dirs[True]), m)
    torch.manual_seed(0)
    stock = get_peft_model(
        _load(model_dirs[True]),
        LoraConfig(
            r=4,
            lora_alpha=m.lora_alpha,
            lora_dropout=0.0,
            target_modules=m.target_modules,
            use_rslora=rslora,
            task_type="CAUSAL_LM",
        ),
    )
    fused = [v for mod in ours.modules() for v in getattr(mod, "lora_variant", {}).values()]
    assert len(fused) == len(m.target_modules) * 2 and all(isinstance(v, FusedUpdate) for v in fused)
    _nonzero_b(ours)
    _nonzero_b(stock)
    _assert_close_grads(_grads(ours), _grads(stock))
    losses, want = _train(ours, m, steps=3), _train(stock, m, steps=3)
    assert losses != pytest.approx(losses[:1] * 3)  # it trains
    assert losses == pytest.approx(want, rel=1e-5)


def test_fused_update_with_dropout_and_merging_equal_peft_arithmetic(model_dirs):
    """With dropout (the same masks) the fused update gives peft's own update's loss and gradients; merging
    through it (merge_and_unload, merge / unmerge) is peft's vanilla arithmetic."""
    m = MethodConfig(kind="lora", rank=4, dropout=0.1)
    fused = apply_method(_load(model_dirs[False]), m)
    _nonzero_b(fused)
    plain = copy.deepcopy(fused)
    for mod in plain.modules():
        getattr(mod, "lora_variant", {}).clear()  # peft's own forward and merge, same dropout layers
    _assert_close_grads(_grads(fused, seed=5), _grads(plain, seed=5))
    fused.eval()
    want = _logits(fused)
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    w0 = layer.base_layer.weight.clone()
    layer.merge()
    assert _maxdiff(layer.base_layer.weight, w0) > 1e-4
    layer.unmerge()
    assert _maxdiff(layer.base_layer.weight, w0) <= 1e-6
    assert _maxdiff(_logits(fused.merge_and_unload()), want) <= 1e-5


def test_shared_dropout_backward_keeps_a_bool_mask_and_is_dropout():
    """The dropped copy's backward is mask / (1 - p) (what nn.Dropout computes) and its graph saves a bool mask,
    not the fp32 noise nn.Dropout keeps on CPU: 4x less activation memory per adapter input."""
    from lorascope.train.lora_layers import ForwardCount, SharedInputDropout

    torch.manual_seed(0)
    x = torch.randn(64, 48, requires_grad=True)
    out = SharedInputDropout(0.25, ForwardCount()).train()(x)
    saved, todo = [], [out.grad_fn]
    while todo:  # every tensor the graph between x and out keeps for backward
        fn = todo.pop()
        saved += [getattr(fn, a) for a in dir(fn) if a.startswith("_saved_")]
        todo += [f for f, _ in fn.next_functions if f is not None and not hasattr(f, "variable")]
    tensors = [t for t in saved if isinstance(t, torch.Tensor)]
    assert any(t.dtype == torch.bool for t in tensors)
    assert not any(t.is_floating_point() and t.numel() == x.numel() for t in tensors)
    up = torch.randn_like(out)
    out.backward(up)
    kept = out != 0
    assert torch.allclose(x.grad, up * kept / 0.75) and torch.allclose(out[kept], x[kept] / 0.75)
    assert 0.2 < 1 - kept.float().mean().item() < 0.3


def test_lora_dropout_one_mask_per_input(model_dirs):
    """Adapters reading one input (q/k/v; gate/up) get the same dropped copy; other inputs and other forward
    passes get their own masks; eval mode drops nothing."""
    m = MethodConfig(kind="lora", rank=4, dropout=0.5)
    model = apply_method(_load(model_dirs[True]), m)
    seen = {}
    for name, mod in model.named_modules():
        if name.endswith("lora_A.default"):
            key = name.split(".")[-3]  # q_proj, ..., down_proj (first block only: hooks overwrite per block)
            if ".layers.0." in name:
                mod.register_forward_pre_hook(lambda _m, args, key=key: seen.__setitem__(key, args[0]))
    model.train()
    model(input_ids=BATCH)
    first = dict(seen)
    assert first["q_proj"] is first["k_proj"] is first["v_proj"] and first["gate_proj"] is first["up_proj"]
    assert first["o_proj"] is not first["q_proj"] and first["down_proj"] is not first["gate_proj"]
    zeros = (first["q_proj"] == 0).float().mean().item()
    assert 0.4 < zeros < 0.6  # p = 0.5 of the entries dropped, the rest scaled by 1/(1-p)
    model(input_ids=BATCH)
    assert not torch.equal(seen["q_proj"] == 0, first["q_proj"] == 0)  # a new mask each forward pass
    model.eval()
    model(input_ids=BATCH)
    assert (seen["q_proj"] == 0).float().mean().item() < 0.01


def test_keep_mask_rate_and_seeding():
    """Each entry kept with probability 1 - realised_p(p) (p to 2**-17); the same seed gives the same mask, the
    next draw another; a p that rounds to 1 drops everything, and the dropout then gives zeros, not NaN."""
    from lorascope.train.lora_layers import ForwardCount, SharedInputDropout, keep_mask, realised_p

    x = torch.empty(400, 500)
    torch.manual_seed(3)
    m1, m2 = keep_mask(x, 0.05), keep_mask(x, 0.05)
    torch.manual_seed(3)
    assert torch.equal(keep_mask(x, 0.05), m1) and not torch.equal(m1, m2)
    assert m1.shape == x.shape and m1.dtype == torch.bool
    for p in (0.05, 0.3, 2**-16):
        drop = 1 - keep_mask(x, p).float().mean().item()
        assert abs(drop - realised_p(p)) < 4 * (p * (1 - p) / x.numel()) ** 0.5  # within 4 standard errors
    ps = torch.rand(1000, generator=torch.Generator().manual_seed(0)).tolist()
    assert max(abs(realised_p(p) - p) for p in ps) <= 2**-17 and realised_p(0.25) == 0.25
    assert keep_mask(torch.empty(7), 0.0).all() and not keep_mask(torch.empty(1001), 1.0 - 2**-33).any()
    odd = keep_mask(torch.empty(3, 3), 0.5)  # 9 entries: part of the last 64-bit draw unused
    assert odd.shape == (3, 3) and odd.dtype == torch.bool
    zeros = SharedInputDropout(1.0 - 2**-20, ForwardCount()).train()(torch.randn(5, 5))
    assert torch.equal(zeros, torch.zeros(5, 5))


def test_one_input_tensor_in_two_forward_passes_gets_two_masks():
    """An adapted layer fed the same unchanged tensor in two training passes draws a new mask each pass (and the
    second backward does not reach into the first pass's freed graph)."""
    from peft import LoraConfig, get_peft_model

    from lorascope.train.lora_layers import speed_up

    class Direct(torch.nn.Module):  # the adapted layer reads the model's input as it is
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Direct(), LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=["proj"]))
    speed_up(model, 0.5)
    seen = []
    model.base_model.model.proj.lora_dropout["default"].register_forward_hook(lambda _m, _a, out: seen.append(out))
    model.train()
    x = torch.randn(64, 8)
    for _ in range(2):
        model(x).sum().backward()
    assert not torch.equal(seen[0] == 0, seen[1] == 0)
