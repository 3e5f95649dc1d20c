"""Rank-r truncations of a fine-tuning update: W_base + best_rank_r(dW), saved as ordinary models.

Does full fine-tuning *need* its high-rank dW? Keep only the top r singular components of dW per matrix
(Eckart-Young: the best rank-r approximation in Frobenius norm) and evaluate the result like any model.
"e90" keeps, per matrix, the rank at 90% of dW's spectral energy.

What is truncated: every 2-D weight that lorascope.analysis.weights.iter_matrices yields (block linears;
embeddings / untied lm_head when they changed). Everything else (RMSNorm weights, biases, ...) is taken
unchanged from the TUNED model.

Example::

    lorascope truncate runs/full-ft --ranks 16,64,e90 --out trunc/full-ft
    # trunc/full-ft/r16/, r64/, re90/: config.json, model.safetensors, tokenizer, truncation.json
    lorascope eval trunc/full-ft/r16 --tasks humaneval,hellaswag --out evals/full-ft-r16
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import LorascopeError
from .svd import rank_at_energy, thin_svd
from .weights import iter_matrices, load_pair, save_hf_model, set_weight


def parse_ranks(ranks: str | list) -> list[int | float]:
    """'16,64,e90' (or [16, 64, "e90"]) -> [16, 64, 0.9]: ints are ranks, 'eNN' is an energy percentage."""
    out: list[int | float] = []
    for tok in (str(t).strip() for t in (ranks.split(",") if isinstance(ranks, str) else ranks)):
        if not tok:
            continue
        if tok.lower().startswith("e"):
            try:
                pct = float(tok[1:])
            except ValueError:
                pct = -1.0
            if not 0 < pct < 100:
                raise LorascopeError(f"ranks: '{tok}' must be eNN with 0 < NN < 100, e.g. e90")
            out.append(pct / 100)
        else:
            try:
                r = int(tok)
            except ValueError:
                r = 0
            if r < 1:
                raise LorascopeError(f"ranks: '{tok}' is neither a positive integer nor eNN (e.g. 16,64,e90)")
            out.append(r)
    if not out:
        raise LorascopeError("ranks: empty list (e.g. --ranks 16,64,e90)")
    return out


def rank_label(r: int | float) -> str:
    return f"r{r}" if isinstance(r, int) else f"re{round(r * 100):d}"


def truncate_models(base: torch.nn.Module, tuned: torch.nn.Module, ranks: list[int | float], progress: bool = True):
    """Yield (rank spec, model, per-matrix info) for each rank; `tuned` is modified in place each time.

    One SVD per matrix serves every rank: we keep U, s, Vh truncated to the largest rank any spec needs.
    """
    mats = list(iter_matrices(base, tuned, only_changed=True))
    originals = {m.name: m.w_tuned.clone() for m in mats}  # w_tuned views change when we write the model
    factors = {}
    for m in tqdm(mats, desc="svd of dW", unit="matrix", disable=not progress):
        u, s, vh = thin_svd(m.delta)
        per_spec = [min(r, s.numel()) if isinstance(r, int) else rank_at_energy(s, r) for r in ranks]
        k = max(per_spec)
        e = s.double() ** 2
        # relative Frobenius error of a rank-j truncation = sqrt(tail energy / total energy)
        tail = (e.sum() - torch.cumsum(e, 0)).clamp_min(0)
        rel = [float((tail[j - 1] / e.sum()).sqrt()) if j > 0 else 1.0 for j in per_spec]
        factors[m.name] = (u[:, :k].clone(), s[:k].clone(), vh[:k].clone(), per_spec, rel, m.w_base)
    for i, r in enumerate(ranks):
        info = {}
        for name, (u, s, vh, per_spec, rel, wb) in factors.items():
            j = per_spec[i]
            set_weight(tuned, name, wb + (u[:, :j] * s[:j]) @ vh[:j])
            info[name] = {"rank": j, "max_rank": min(wb.shape), "rel_frobenius_error": round(rel[i], 6)}
        yield r, tuned, info
    for name, w in originals.items():  # leave the caller's model as it was
        set_weight(tuned, name, w)


def write_truncations(run: str, ranks: str | list, out: Path) -> list[Path]:
    """Write OUT/r<r>/ (HF model dir + truncation.json) for every rank in `ranks` ('16,64,e90')."""
    specs = parse_ranks(ranks)
    t0 = time.time()
    pair = load_pair(run)
    if pair.checkpoint.kind != "full":
        print(f"note: {run} is a {pair.checkpoint.kind} run; truncating its merged dW all the same")
    out = Path(out)
    written = []
    for r, model, info in truncate_models(pair.base, pair.tuned, specs):
        errs = [v["rel_frobenius_error"] for v in info.values()]
        doc = {
            "run": str(pair.run_dir),
            "checkpoint": pair.checkpoint.path.name,
            "base": pair.checkpoint.base,
            "rank": rank_label(r)[1:],
            "energy": r if isinstance(r, float) else None,
            "kept_from_tuned": "every parameter that is not a truncated matrix (norms, biases)",
            "mean_rel_frobenius_error": round(sum(errs) / max(len(errs), 1), 6),
            "matrices": info,
        }
        written.append(save_hf_model(model, pair.tokenizer, out / rank_label(r), extra={"truncation.json": doc}))
        print(
            f"{rank_label(r)}: {len(info)} matrices, mean relative error of dW "
            f"{doc['mean_rel_frobenius_error']:.4f} -> {written[-1]}"
        )
    print(f"done in {time.time() - t0:.1f}s")
    return written
