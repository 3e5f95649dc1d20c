"""The training loss without the (tokens x vocabulary) logits: the output head and cross-entropy in chunks.

transformers computes every position's logits, takes the log-softmax and keeps both for backward, whose
gradient is a third tensor of the same size: at seq 256 x batch 4 and a 49k vocabulary, 3 x 200 MB written and
read for one number per token. Here the head's matmul, the log-sum-exp and the gradients (softmax - one-hot)
run chunk by chunk during the forward pass, and backward only scales the stored gradients: the same loss and
gradients (tested against transformers'), no recomputation, no logits held. Liger-Kernel's fused linear
cross-entropy does this with Triton kernels for GPUs; no library does it in plain PyTorch, which a CPU needs.

``HeadLoss.install`` puts it in place only where it is exact: fp32 training, a plain bias-free ``nn.Linear`` head,
and a probe batch on which it gives transformers' loss (models that scale, soft-cap or slice their logits after
the head fail the probe and keep transformers' loss).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
IGNORE = -100
# About 64 MiB of logits a chunk (_rows_per_chunk), the one block a chunk holds at a time. Smaller chunks make
# the head's matmuls less efficient and barely lower the peak now that a chunk holds one block: the embedded model
# at seq 256 x batch 4 (1024 rows, 49k vocabulary; head forward + backward, medians of 8 alternated): 64 MiB 810
# ms, 48 MiB 845 ms, 32 MiB 944 ms; peak RSS of a training step, LoRA r16 / full: 2.66 / 3.85 GiB at 64 MiB, 2.66
# / 3.86 at 48 (2.82 / 3.98 at 64 MiB when a chunk held the logits, their log-softmax and the previous chunk's
# block). The full logits would take 600 MB.
CHUNK_BYTES = 64 * 2**20


def _rows_per_chunk(n_rows: int, vocab: int) -> int:
    """Rows per chunk: about CHUNK_BYTES of fp32 logits, the rows split evenly (1024 rows at 341 a chunk would
    leave a 1-row chunk whose two matrix-vector products run at a twentieth of the matmul speed)."""
    most = max(1, CHUNK_BYTES // (4 * vocab))
    chunks = max(1, round(n_rows / most))
    return -(-n_rows // chunks)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over kept positions of -log softmax(h W^T)[label], / n_items; gradients computed in the forward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, n_items: float):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.empty_like(h) if want_h else None
        gw = torch.zeros_like(weight) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = _rows_per_chunk(h.shape[0], weight.shape[0])
        for s in range(0, h.shape[0], rows):
            hc, y = h[s : s + rows], labels[s : s + rows]
            keep = y != IGNORE
            yk = torch.where(keep, y, 0)
            # One vocabulary-wide block a chunk: the logits become exp(z - max), then the weighted softmax
            # gradient, in place (log_softmax / logsumexp would each allocate a second block).
            z = hc @ weight.t()
            top = z.amax(dim=-1, keepdim=True)
            picked = z.gather(1, yk[:, None]).squeeze(1)
            sums = z.sub_(top).exp_().sum(dim=-1)
            total -= ((picked - top.squeeze(1) - sums.log()) * keep).sum()
            if want_h or want_w:
                w = (keep / n_items).to(z.dtype)
                z.mul_((w / sums)[:, None])  # now the gradient: softmax x the token's weight ...
                z[torch.arange(len(y), device=y.device), yk] -= w  # ... minus its one-hot
                if want_h:
                    torch.mm(z, weight, out=gh[s : s + rows])
                if want_w:
                    gw.addmm_(z.t(), hc)
            del z  # before the next chunk's logits exist
        ctx.save_for_backward(gh, gw)
        return total / n_items

    @staticmethod
    def backward(ctx, go):
        gh, gw = ctx.saved_tensors
        return (gh * go if gh is not None else None, gw * go if gw is not None else None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, n_items: float):
    """Causal-LM loss of hidden states `h` (..., d) under head `weight` (V, d) for unshifted `labels` (...),
    as transformers' ForCausalLMLoss with reduction sum / n_items."""
    shifted = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, shifted.reshape(-1), float(n_items))


class HeadLoss:
    """While `labels` are set, the model's output head returns the loss instead of the logits."""

    def __init__(self, head: torch.nn.Linear):
        self.head, self.plain_forward = head, head.forward
        self.labels, self.n_items = None, 1.0

    def _forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            return self.plain_forward(h)
        return linear_cross_entropy(h, self.head.weight, self.labels, self.n_items)

    def loss(self, model, inputs: dict, n_items: int) -> torch.Tensor:
        """The model's loss on `inputs` (with "labels"): sum of token losses / n_items."""
        self.labels, self.n_items = inputs["labels"], n_items
        try:
            return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        finally:
            self.labels = None

    @classmethod
    def install(cls, model, row: dict, precision: str) -> HeadLoss | None:
        """A HeadLoss on `model`'s output head where it is exact (module doc), else None (transformers' loss).
        `row`: a training row, whose first tokens make the probe."""
        head = model.get_output_embeddings()
        if precision != "fp32" or type(head) is not torch.nn.Linear or head.bias is not None:
            return None
        hl = cls(head)
        head.forward = hl._forward
        ok, why = hl._agrees(model, _probe(row))
        if not ok:
            del head.forward  # back to the class's own
            log.info("training loss: transformers' (the chunked head loss %s)", why)
            return None
        return hl

    def _agrees(self, model, probe: dict) -> tuple[bool, str]:
        was = model.training
        model.eval()
        n = n_targets(probe["labels"])
        try:
            with torch.no_grad():
                want = model(**probe, num_items_in_batch=n).loss
                got = self.loss(model, probe, n)
        except Exception as e:  # noqa: BLE001 - any failure means: not this model; say which
            return False, f"failed on a probe batch ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        finally:
            model.train(was)
        if got.shape != () or not torch.isclose(got.float(), want.float(), rtol=1e-5, atol=1e-6):
            return False, f"gave {got.flatten()[:1].tolist()} where transformers gives {float(want):.6f}"
        return True, ""


def n_targets(labels: torch.Tensor) -> int:
    """Predicted tokens of unshifted `labels` (a row, or a batch of rows): the loss's n_items, at least 1."""
    return max(1, int((labels[..., 1:] != IGNORE).sum()))


def _probe(row: dict, n: int = 32) -> dict:
    """A one-row batch of a training row's first `n` tokens, every one a target (an IFT row's prompt has none)."""
    batch = {k: v[None, :n] for k, v in row.items()}
    return {**batch, "labels": batch["input_ids"].clone()}
