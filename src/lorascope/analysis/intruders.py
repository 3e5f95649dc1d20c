"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

A top-k left singular vector u_i of W_tuned = W_base + dW is an *intruder* when its largest |cosine| with
every left singular vector of W_base is below epsilon: a new, strong direction that the base never had.
Vectors are taken from the SVD of W_tuned (not of dW), as the paper and PEFT's mitigation do.

Mitigation scales those components: W' = W_tuned + (lambda - 1) * sum_i sigma_i u_i v_i^T. PEFT ships this
only for LoRA adapters (``peft.tuners.lora.intruders``); here it runs on merged weights, so it works for any
method, and writes a plain HF model dir.

Example::

    lorascope intruders runs/lora-r16 --out models/lora-r16-mitigated --scale 0.7
    lorascope eval models/lora-r16-mitigated --tasks hellaswag --out evals/mitigated

    from lorascope.analysis.intruders import find_intruders
    idx, cos = find_intruders(U_base, U_tuned, top_k=10, epsilon=0.5)   # e.g. [0], tensor([0.03, 0.99, ...])
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import LorascopeError
from .svd import thin_svd
from .weights import iter_matrices, load_pair, save_hf_model, set_weight


def check_params(top_k: int, epsilon: float, scale: float | None = None) -> None:
    if top_k < 1:
        raise LorascopeError(f"top_k must be >= 1 (got {top_k})")
    if not 0.0 < epsilon < 1.0:
        raise LorascopeError(f"epsilon must be in (0, 1) (got {epsilon})")
    if scale is not None and scale < 0.0:
        raise LorascopeError(f"scale must be >= 0 (got {scale})")


def max_cosines(u_base: torch.Tensor, u_tuned: torch.Tensor, top_k: int) -> torch.Tensor:
    """For each of the top_k columns of u_tuned: max |cos| with any column of u_base (both orthonormal)."""
    k = min(top_k, u_tuned.shape[1])
    return (u_tuned[:, :k].T.double() @ u_base.double()).abs().amax(dim=1).float()


def find_intruders(
    u_base: torch.Tensor, u_tuned: torch.Tensor, top_k: int = 10, epsilon: float = 0.5
) -> tuple[list[int], torch.Tensor]:
    """Indices (into the tuned spectrum, 0 = largest) of intruder vectors, and the top_k max |cos| values."""
    cos = max_cosines(u_base, u_tuned, top_k)
    return [int(i) for i in torch.nonzero(cos < epsilon).flatten()], cos


def scale_components(
    w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, idx: list[int], scale: float
) -> torch.Tensor:
    """w + (scale - 1) * sum_{i in idx} s_i u_i vh_i: the chosen singular components multiplied by scale."""
    if not idx:
        return w.clone()
    i = torch.as_tensor(idx)
    return w + (scale - 1.0) * (u[:, i] * s[i]) @ vh[i]


def mitigate(
    base: torch.nn.Module,
    tuned: torch.nn.Module,
    scale: float = 0.7,
    top_k: int = 10,
    epsilon: float = 0.5,
    progress: bool = True,
) -> dict[str, dict]:
    """Scale the intruder components of every changed matrix of `tuned` in place; returns what was done."""
    check_params(top_k, epsilon, scale)
    done: dict[str, dict] = {}
    mats = list(iter_matrices(base, tuned, only_changed=True))
    for m in tqdm(mats, desc="intruders", unit="matrix", disable=not progress):
        ub = thin_svd(m.w_base)[0]
        # A full (thin) SVD of W_tuned: scaling needs its right vectors too.
        ut, st, vht = thin_svd(m.w_tuned)
        idx, cos = find_intruders(ub, ut, top_k, epsilon)
        if idx:
            set_weight(tuned, m.name, scale_components(m.w_tuned, ut, st, vht, idx, scale))
        done[m.name] = {
            "intruders": idx,
            "sigma": [round(float(st[i]), 6) for i in idx],
            "max_cos": [round(float(c), 4) for c in cos],
        }
    return done


def mitigate_cli(run: str, out: Path, scale: float, top_k: int, epsilon: float) -> Path:
    """Write OUT/ as an HF model dir (+ intruders.json): RUN's tuned model with intruders scaled by `scale`."""
    check_params(top_k, epsilon, scale)
    t0 = time.time()
    pair = load_pair(run)
    report = mitigate(pair.base, pair.tuned, scale=scale, top_k=top_k, epsilon=epsilon)
    n = sum(len(r["intruders"]) for r in report.values())
    header = {
        "run": str(run),
        "checkpoint": pair.checkpoint.path.name,
        "kind": pair.checkpoint.kind,
        "base": pair.checkpoint.base,
        "scale": scale,
        "top_k": top_k,
        "epsilon": epsilon,
        "intruders_total": n,
        "matrices_with_intruders": sum(bool(r["intruders"]) for r in report.values()),
        "seconds": round(time.time() - t0, 2),
    }
    save_hf_model(pair.tuned, pair.tokenizer, out, extra={"intruders.json": {**header, "matrices": report}})
    print(
        f"{n} intruder components scaled by {scale} in {header['matrices_with_intruders']} of "
        f"{len(report)} changed matrices -> {out}"
    )
    return Path(out)


def load_report(model_dir: Path) -> dict:
    """The intruders.json written next to a mitigated model."""
    return json.loads((Path(model_dir) / "intruders.json").read_text())
