"""What lorascope changes inside peft's LoRA layers for training speed; the adapters and checkpoints stay peft's.

    speed_up(peft_model, dropout=0.05)   # called by methods.apply_method on every LoRA model it builds

Two changes, each measured on the training step (bench/RESULTS.md), each equal to peft's LoRA up to float rounding:
- Dropout (``p`` > 0): ONE mask per input tensor, shared by every adapter reading that input (q/k/v read the
  same normed hidden states, gate/up the same MLP input): peft would draw and copy one per adapter, 7 per block
  where 4 inputs exist. Each adapter still sees its input with dropout applied as in the LoRA paper; what
  changes is only that adapters of one input see the same dropped copy. With p = 0 peft's no-copy Identity stays.
- The update of a plain LoRA ``Linear`` (no DoRA or other variant, no LoRA bias) is added into the base output
  by one ``addmm`` with the scaling applied to the rank-r product (``FusedUpdate``), where peft scales and adds
  the full-width update in two more passes over the output, forward and backward.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer, LoraVariant

_BITS = 16  # random bits a mask entry: the drop rate is realised to 2**-16 (see realised_p)


def realised_p(p: float) -> float:
    """The drop probability keep_mask realises for `p`: p rounded to a multiple of 2**-16 (0.05 -> 0.0500031)."""
    return round(p * 2**_BITS) / 2**_BITS


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Bool tensor shaped like x, each entry True with probability 1 - realised_p(p), from torch's generator.

    16 random bits an entry, taken as quarters of 64-bit draws: torch's CPU generator (a Mersenne twister, one
    thread) is the cost, and 16 bits an entry draws half of 32 (1024 x 576 entries, 2 cores, medians of 50:
    0.78 ms against 1.37) and a quarter of ``rand_like(x) >= p``'s fp32 path (2.0 ms). Seeded, and saved with a
    training state, with torch's RNG like nn.Dropout."""
    cut = int(realised_p(p) * 2**_BITS)  # entry u in [0, 2**16) is kept when u >= cut
    if cut >= 2**_BITS:  # the int16 threshold 2**15 would wrap around in the comparison
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
    threshold = cut - 2 ** (_BITS - 1)  # as int16: u - 2**15 against the same shift
    return (bits.view(torch.int16)[:n] >= threshold).view(x.shape)


class ForwardCount:
    """Counts a model's forward passes (as its forward pre-hook): a dropped copy is shared within one pass only."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, module, args) -> None:
        self.n += 1


class SharedInputDropout(torch.nn.Dropout):
    """nn.Dropout that hands every adapter fed the same input tensor the same dropped copy (one mask, one copy).

    The dropped copy is kept as an attribute of the input tensor itself, so it lives exactly as long as that
    input (no cache to clear, nothing held across steps); an in-place change of the input (its version), another
    p or another forward pass of the model (``passes``) draws afresh: an input tensor fed unchanged to two passes
    gets two masks, and the second pass does not reuse the first one's graph. The graph keeps a bool mask
    (``keep_mask``) rather than nn.Dropout's: on CPU that one multiplies by an fp32 noise tensor from
    ``bernoulli_`` and keeps it for backward (4 bytes an element against 1), and measured slower (LoRA r16
    training 149 vs 162 tokens/s on 2 cores; ``native_dropout``'s bool path was slower still, 131). Kept entries
    are scaled by 1 / (1 - realised_p(p)), so the expectation is the input, as nn.Dropout's."""

    _ATTR = "_lorascope_lora_dropout"

    def __init__(self, p: float, passes: ForwardCount) -> None:
        super().__init__(p)
        self.passes = passes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        key = (self.p, x._version, self.passes.n)
        hit = getattr(x, self._ATTR, None)
        if hit is not None and hit[0] == key:
            return hit[1]
        keep = 1.0 - realised_p(self.p)
        out = torch.where(keep_mask(x, self.p), x, 0.0).mul_(1.0 / keep if keep else 0.0)
        setattr(x, self._ATTR, (key, out))
        return out


class FusedUpdate(LoraVariant):
    """Plain LoRA as a peft variant: base output + B (A x * scaling) in one ``addmm``.

    peft computes ``result + lora_B(lora_A(x)) * scaling``: the scaling multiplies the full-width update (tokens x
    out_features) and the sum is another full-width pass, and backward multiplies the full-width gradient by the
    scaling again. Here the scaling multiplies the rank-r product and BLAS adds the update into a copy of the base
    output. Merging (into weights) is peft's vanilla arithmetic, so merge / unmerge / merge_and_unload agree
    with a model without this variant."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs) -> None:  # nothing beyond peft's own init
        return None

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(
        module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        lora_b = module.lora_B[active_adapter]
        h = module.lora_A[active_adapter](module.lora_dropout[active_adapter](x))
        scaling = module.scaling[active_adapter]
        if scaling != 1:
            h = h * scaling
        if h.dtype != result.dtype or lora_b.weight.dtype != result.dtype:
            return result + lora_b(h)  # mixed precision (e.g. fp32 adapters on a bf16 base): peft's promotion
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_b.weight.t())
        return out.view(result.shape)


def speed_up(model, dropout: float) -> None:
    """Install both changes (module doc) on a PeftModel's LoRA layers; with dropout 0 only the fused update."""
    passes = None
    if dropout > 0:
        passes = ForwardCount()
        model.register_forward_pre_hook(passes)
    for mod in model.modules():
        if not isinstance(mod, LoraLayer):
            continue
        for name in list(mod.lora_A.keys()):
            d = mod.lora_dropout[name]
            if passes is not None and isinstance(d, torch.nn.Dropout):
                shared = SharedInputDropout(dropout, passes)
                shared.train(d.training)
                mod.lora_dropout[name] = shared
            if type(mod) is LoraLinear and name not in mod.lora_variant and not mod.lora_bias[name]:
                mod.lora_variant[name] = FusedUpdate()
