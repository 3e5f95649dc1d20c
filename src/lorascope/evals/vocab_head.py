"""The output head run chunk by chunk on hidden states: no (positions x vocabulary) tensor is ever whole.

A scoring pass keeps only the final hidden states of the positions it scores (``captured_hidden``: the head's
input is taken by a forward pre-hook and the head itself gets no rows); ``VocabHead`` then runs the head on
``HEAD_CHUNK_BYTES`` of logits at a time, into one buffer allocated once and reused for every chunk of every
batch, and reduces each chunk at once (log-sum-exp, the target's logit, the argmax, a KL). At a 262k vocabulary
a batch of 2,048 positions would be 2.1 GB of fresh fp32 logits, which this kind of machine pays for in page
faults before any arithmetic; a chunk is 64 MiB, touched again and again.

Exactness: the same matmul on the same hidden states, so the logits are those of the model's own head up to
the float rounding of a matmul with fewer rows. Models that post-process logits after the head are supported
where the config says how (``final_logit_softcapping``); ``VocabHead.check`` compares against the model's own
logits on a probe and refuses a model whose logits it cannot reproduce.

Example::

    >>> head = VocabHead(model)
    >>> with captured_hidden(model, flat_idx) as got:
    ...     model(input_ids=ids)
    >>> nll = head.nll(got[0], targets)
"""

from __future__ import annotations

import contextlib
import weakref

import torch

_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # models whose logits VocabHead reproduces
# 64 MiB of fp32 logits a chunk, as the training head loss (train/headloss.py): smaller chunks read the head's
# weight more often per row (at 262k x 640 it is 671 MB) and run thinner, slower matmuls.
HEAD_CHUNK_BYTES = 64 << 20
# Reductions that need no whole row (logsumexp, a target's logit, the argmax) run the vocabulary in blocks of
# BLOCK_ROWS rows x VOCAB_BLOCK_BYTES, which stay in cache from the matmul through the exp and sums. Measured at a
# 262k vocabulary (one thread, rows x 640 x 262,144, process CPU time): the matmul alone runs at 49 / 64 / 69
# GFLOP/s at 64 / 128 / 256 rows, and a row-wide logsumexp pass after it nearly doubles the time (31 / 35 / 37).
BLOCK_ROWS = 256
VOCAB_BLOCK_BYTES = 4 << 20


def output_head(model):
    """The model's output embedding (its LM head), or None for a model without one."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


@contextlib.contextmanager
def captured_hidden(model, flat_idx: torch.Tensor):
    """While open, the model's head sees no rows; the hidden states it would have seen at ``flat_idx`` of the
    flattened (batch, position) grid are appended to the yielded list, one [n, hidden] tensor per forward."""
    head = output_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding to score with")
    got: list[torch.Tensor] = []

    def keep(_module, args):
        h = args[0]
        flat = h.reshape(-1, h.shape[-1])
        got.append(flat.index_select(0, flat_idx.to(h.device)) if flat_idx.numel() else flat[:0])
        return (h[..., :0, :],) + args[1:]

    handle = head.register_forward_pre_hook(keep)
    try:
        yield got
    finally:
        handle.remove()


def _text_config(model):
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


class VocabHead:
    """A model's output head (plus its logit soft-capping) over hidden states, HEAD_CHUNK_BYTES at a time."""

    def __init__(self, model):
        self.module = output_head(model)
        if self.module is None:
            raise ValueError(f"{type(model).__name__} has no output embedding to score with")
        self.weight = getattr(self.module, "weight", None)
        w = self.weight
        self.vocab = int(w.shape[0] if w is not None else _text_config(model).vocab_size)
        self.softcap = getattr(_text_config(model), "final_logit_softcapping", None)
        self.plain = type(self.module) is torch.nn.Linear and "forward" not in vars(self.module)
        self.rows = max(1, HEAD_CHUNK_BYTES // (4 * self.vocab))
        self._buf: torch.Tensor | None = None
        self._unchecked = None if model in _CHECKED else model  # checked at first use: a head never used costs none

    @torch.no_grad()
    def chunks(self, h: torch.Tensor):
        """(slice, fp32 logits of h[slice]) chunk by chunk. The logits of a plain fp32 head are written into one
        reused buffer: a chunk's tensor is overwritten by the next, and callers may change it in place."""
        self._check_once()
        n = h.shape[0]
        step = -(-n // -(-n // self.rows)) if n else 1  # even chunks: no one-row matmul at the end
        for a in range(0, n, step):
            c = slice(a, min(a + step, n))
            yield c, self._logits(h[c])

    def _buffer(self, n: int, device) -> torch.Tensor:
        """The first ``n`` floats of the one logits buffer (grown once to the largest ask, then reused)."""
        if self._buf is None or self._buf.numel() < n or self._buf.device != torch.device(device):
            with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
                self._buf = torch.empty(max(n, self.rows * self.vocab), dtype=torch.float32, device=device)
        return self._buf[:n]

    def _check_once(self) -> None:
        if self._unchecked is not None:
            model, self._unchecked = self._unchecked, None
            self.check(model)
            _CHECKED[model] = True

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.plain and w.dtype == torch.float32 and x.dtype == torch.float32:
            z = self._buffer(x.shape[0] * self.vocab, w.device).view(x.shape[0], self.vocab)
            torch.mm(x, w.t(), out=z)
            if self.module.bias is not None:
                z += self.module.bias
        else:
            z = self.module(x).float()
        if self.softcap:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    @torch.no_grad()
    def nll(self, h: torch.Tensor, targets: torch.Tensor, greedy: bool = False):
        """-log softmax(logits)[target] per row (and, with ``greedy``, whether the target is the argmax)."""
        lse, picked, top = self.reduce(h, targets.to(h.device), greedy)
        out = lse - picked
        return (out, top == targets.to(h.device)) if greedy else out

    @torch.no_grad()
    def reduce(self, h: torch.Tensor, targets: torch.Tensor | None = None, greedy: bool = False):
        """(logsumexp of the logits, the target's logit, the argmax) per row; None where not asked for."""
        if not self._blockable(h):
            return self._reduce_chunks(h, targets, greedy)
        n, d = h.shape
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        picked = torch.empty(n, dtype=torch.float32, device=h.device) if targets is not None else None
        top = torch.empty(n, dtype=torch.long, device=h.device) if greedy else None
        rows = min(BLOCK_ROWS, n) or 1
        cols = max(1, VOCAB_BLOCK_BYTES // (4 * rows))
        for a in range(0, n, rows):
            c = slice(a, min(a + rows, n))
            lse[c], p, t = self._reduce_rows(h[c], None if targets is None else targets[c], greedy, cols)
            if picked is not None:
                picked[c] = p
            if top is not None:
                top[c] = t
        return lse, picked, top

    def _blockable(self, h: torch.Tensor) -> bool:
        return self.plain and self.weight.dtype == torch.float32 and h.dtype == torch.float32

    def _reduce_rows(self, x: torch.Tensor, targets, greedy: bool, cols: int):
        """The vocabulary in blocks of ``cols`` whose logits stay in cache while reduced: an online logsumexp
        (running max m and sum s of exp(z - m)), the target's logit where its block passes, a running argmax."""
        self._check_once()
        r = x.shape[0]
        m = torch.full((r,), -torch.inf, dtype=torch.float32, device=x.device)
        s = torch.zeros(r, dtype=torch.float32, device=x.device)
        picked = torch.zeros(r, dtype=torch.float32, device=x.device) if targets is not None else None
        best = torch.full((r,), -torch.inf, dtype=torch.float32, device=x.device) if greedy else None
        arg = torch.zeros(r, dtype=torch.long, device=x.device) if greedy else None
        for v in range(0, self.vocab, cols):
            z = self._block(x, v, cols)
            if targets is not None:
                w = z.shape[1]
                here = (targets >= v) & (targets < v + w)
                picked = torch.where(here, z.gather(1, (targets - v).clamp(0, w - 1)[:, None])[:, 0], picked)
            bmax, bidx = z.max(-1)
            if greedy:
                better = bmax > best  # strictly: the first maximum wins, as argmax over the whole row
                best, arg = torch.where(better, bmax, best), torch.where(better, bidx + v, arg)
            new = torch.maximum(m, bmax)
            s = s * torch.exp(m - new) + z.sub_(new[:, None]).exp_().sum(-1)
            m = new
        return m + s.log(), picked, arg

    def _block(self, x: torch.Tensor, v: int, cols: int) -> torch.Tensor:
        """Logits of rows ``x`` over vocabulary entries v .. v + cols, in this head's buffer."""
        w = self.weight[v : v + cols]
        z = self._buffer(x.shape[0] * w.shape[0], x.device).view(x.shape[0], w.shape[0])
        torch.mm(x, w.t(), out=z)
        if self.module.bias is not None:
            z += self.module.bias[v : v + cols]
        if self.softcap:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def _reduce_chunks(self, h: torch.Tensor, targets, greedy: bool):
        n = h.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        picked = torch.empty(n, dtype=torch.float32, device=h.device) if targets is not None else None
        top = torch.empty(n, dtype=torch.long, device=h.device) if greedy else None
        for c, z in self.chunks(h):
            if targets is not None:
                picked[c] = z.gather(1, targets[c, None])[:, 0]
            if greedy:
                top[c] = z.argmax(-1)
            lse[c] = log_sum_exp_(z)
        return lse, picked, top

    def check(self, model) -> None:
        """Raise ValueError unless these logits are the model's own on a probe of 8 tokens (model in eval mode)."""
        probe = (torch.arange(1, 9) % self.vocab)[None].to(
            self.module.weight.device if self.weight is not None else "cpu"
        )
        with torch.inference_mode():
            want = model(input_ids=probe, use_cache=False).logits[0].float()
            idx = torch.arange(probe.shape[1])
            with captured_hidden(model, idx) as got:
                model(input_ids=probe, use_cache=False)
            have = torch.cat([z.clone() for _, z in self.chunks(got[0])])
        if have.shape != want.shape or not torch.allclose(have, want, rtol=1e-4, atol=1e-4):
            raise ValueError(
                f"{type(model).__name__}: its logits are post-processed in a way the chunked head does not know"
            )


def blockable(head_p: VocabHead, h_p: torch.Tensor, head_q: VocabHead, h_q: torch.Tensor) -> bool:
    """Whether kl_between can run both heads in vocabulary blocks (plain fp32 heads of one vocabulary)."""
    return head_p._blockable(h_p) and head_q._blockable(h_q) and head_p.vocab == head_q.vocab


@torch.no_grad()
def kl_between(head_p: VocabHead, h_p: torch.Tensor, head_q: VocabHead, h_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, p = softmax(head_p(h_p)), q = softmax(head_q(h_q)), the vocabulary in blocks: with
    running maxima and sums, KL = sum exp(zp - mp)(zp - zq) / sp - (mp + log sp) + (mq + log sq). Needs
    ``blockable``."""
    n = h_q.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=h_q.device)
    rows = min(BLOCK_ROWS, n) or 1
    cols = max(1, VOCAB_BLOCK_BYTES // (4 * rows))
    for a in range(0, n, rows):
        c = slice(a, min(a + rows, n))
        out[c] = _kl_rows(head_p, h_p[c], head_q, h_q[c], cols)
    return out


def _kl_rows(head_p: VocabHead, xp: torch.Tensor, head_q: VocabHead, xq: torch.Tensor, cols: int) -> torch.Tensor:
    head_p._check_once()
    head_q._check_once()
    r = xq.shape[0]
    mp = torch.full((r,), -torch.inf, device=xq.device)
    mq = torch.full((r,), -torch.inf, device=xq.device)
    sp, sq, acc = (torch.zeros(r, device=xq.device) for _ in range(3))
    for v in range(0, head_q.vocab, cols):
        zp, zq = head_p._block(xp, v, cols), head_q._block(xq, v, cols)  # each head's own buffer
        np_, nq = torch.maximum(mp, zp.amax(-1)), torch.maximum(mq, zq.amax(-1))
        sq = sq * torch.exp(mq - nq) + torch.exp(zq - nq[:, None]).sum(-1)
        zq.sub_(zp).neg_()  # zp - zq
        zp.sub_(np_[:, None]).exp_()  # exp(zp - mp)
        scale = torch.exp(mp - np_)
        sp = sp * scale + zp.sum(-1)
        acc = acc * scale + (zp * zq).sum(-1)
        mp, mq = np_, nq
    return acc / sp - (mp + sp.log()) + (mq + sq.log())


def log_sum_exp_(z: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension, overwriting ``z`` with exp(z - max) (no second vocabulary-wide block)."""
    top = z.amax(dim=-1, keepdim=True)
    return top[:, 0] + z.sub_(top).exp_().sum(-1).log()
