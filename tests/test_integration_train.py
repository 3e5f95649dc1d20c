"""The embedded model, real code-cpt data: full FT and LoRA r=16 train 8,192 tokens; their artifacts reload
with plain transformers/peft and give the in-memory model's logits."""

import json

import pytest
import torch

from lorascope.config import RunConfig
from lorascope.models import find_checkpoint, load_base
from lorascope.train import train

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("method,lr", [({"kind": "lora", "rank": 16, "targets": "all"}, 5e-4),
                                       ({"kind": "full"}, 5e-5)])
def test_embedded_trains_and_reloads(tmp_path, method, lr):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = RunConfig(model="embedded", method=method, data={"dataset": "code-cpt"},
                    train={"seq_len": 256, "batch_size": 4, "max_tokens": 8192, "lr": lr, "save_state_every": 100})
    run = train(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(l)["loss"] for l in (run / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    ck = find_checkpoint(run)
    x = torch.tensor([[1, 504, 2774, 338, 28, 42, 9, 1047]])
    if method["kind"] == "lora":
        base, _ = load_base("embedded")
        adapter = PeftModel.from_pretrained(base, str(ck.path)).eval()
        with torch.no_grad():
            ref = adapter(input_ids=x).logits
        merged_dir = tmp_path / "merged"
        adapter.merge_and_unload().save_pretrained(merged_dir)
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
        with torch.no_grad():
            assert (merged(input_ids=x).logits - ref).abs().max().item() <= 1e-4
    else:
        model = AutoModelForCausalLM.from_pretrained(str(ck.path), dtype=torch.float32).eval()
        with torch.no_grad():
            ref = model(input_ids=x).logits
        base, _ = load_base("embedded")
        with torch.no_grad():
            assert (base(input_ids=x).logits - ref).abs().max().item() > 1e-3  # it did move
