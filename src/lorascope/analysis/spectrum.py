"""Spectrum of W_base, W_tuned and dW for every adapted matrix: is the update low-rank?

The paper's statistic (Biderman et al. 2024, sec. 4) is the rank at an energy fraction: the smallest k with
sum_{i<=k} s_i^2 >= energy * sum_i s_i^2 (default 0.9). Next to it we report stable rank (||W||_F^2/||W||_2^2),
effective rank (exp of the entropy of s/sum(s), Roy & Vetterli 2007), numerical rank, intruder counts, and
two random-matrix baselines through the same statistic: an i.i.d. Gaussian matrix of dW's shape (one draw
per shape; the statistic does not depend on the scale), and W_base + Gaussian noise with ||noise||_F = ||dW||_F.
A square Gaussian needs ~51% of its singular values for 90% energy, so a full-FT dW near that is noise-like.

Decompositions and the per-spectrum statistics live in svd.py (exact LAPACK or an fp64 Gram path by size).
We do not use torch.svd_lowrank: rank@90% of a noise-like dW needs about half the spectrum, so a sketch would
need q ~ n/2 and cost as much as the exact SVD while adding sketch error.

Example::

    lorascope spectrum runs/full-ft --out analysis/full-ft          # spectrum.json + singular_values.safetensors

    from lorascope.analysis.spectrum import compute_spectrum, aggregate
    res = compute_spectrum("runs/lora-r16", energy=0.9)      # a LoRA r=16 run on the embedded model
    res.records[0]["rank_at_energy"]   # layer-0 q_proj: {'base': 68, 'tuned': 68, 'delta': 14}
    aggregate(res.records, lora_rank=16)["by_module"]["q_proj"]["delta_rank_over_lora_rank"]   # 0.875

    lorascope spectrum runs/full-ft:all --out analysis/full-ft     # every checkpoint + trajectory.json
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import LorascopeError
from ..fileio import atomic_path, atomic_write_text
from .intruders import check_params, find_intruders
from .svd import EPS32, left_svd, rank_at_energy, singular_values, spectrum_stats, svd_method
from .weights import Matrix, iter_matrices, load_pair

KINDS = ("base", "tuned", "delta")


# ---------------------------------------------------------------------------------------------------------
# one matrix


def _gaussian(shape: tuple[int, int], fro: float, seed: int) -> torch.Tensor:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return g * (fro / float(g.norm()))


def matrix_spectrum(
    m: Matrix,
    energy: float = 0.9,
    top_k: int = 10,
    epsilon: float = 0.5,
    method: str = "auto",
    seed: int = 0,
    gaussian_cache: dict | None = None,
    base_cache: dict | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The record of one matrix and its singular values {base, tuned, delta}.

    base_cache (name -> (U, s) of W_base) lets several checkpoints of one run share the base's SVD.
    """
    shape = tuple(m.w_base.shape)
    how = svd_method(shape, method)
    if base_cache is not None and (m.name, how) in base_cache:
        ub, sb = base_cache[(m.name, how)]
    else:
        ub, sb = left_svd(m.w_base, how)
        if base_cache is not None:
            base_cache[(m.name, how)] = (ub, sb)
    changed = m.changed
    if changed:
        ut, st = left_svd(m.w_tuned, how)
        sd = singular_values(m.delta, how)
    else:
        ut, st, sd = ub, sb, torch.zeros_like(sb)
    stats = {
        "base": spectrum_stats(sb, shape, energy),
        "tuned": spectrum_stats(st, shape, energy),
        # dW = merged - base in fp32 carries rounding noise up to eps32 * ||W_tuned||_F; the floor keeps
        # that noise out of the numerical rank (so a LoRA dW reads as rank <= r).
        "delta": spectrum_stats(sd, shape, energy, floor=EPS32 * float(st.double().norm())),
    }
    rec = {"name": m.name, "layer": m.layer, "module": m.module, "shape": list(shape), "changed": changed, "svd": how}
    for key in ("rank_at_energy", "stable_rank", "effective_rank", "numerical_rank"):
        rec[key] = {k: stats[k][key] for k in KINDS}
    rec["rank_fraction_delta"] = round(rec["rank_at_energy"]["delta"] / min(shape), 4)
    fro_d = float(sd.double().norm())
    rec["norm"] = {
        "base_fro": round(float(sb.double().norm()), 6),
        "delta_fro": round(fro_d, 8),
        "delta_rel": round(fro_d / max(float(sb.double().norm()), 1e-30), 8),
        "delta_spectral": round(float(sd[0]), 8),
    }
    if changed:
        cache = gaussian_cache if gaussian_cache is not None else {}
        if shape not in cache:  # scale-free statistic: one draw per shape is enough
            cache[shape] = rank_at_energy(singular_values(_gaussian(shape, 1.0, seed), how), energy)
        noisy = m.w_base + _gaussian(shape, fro_d, seed + 1 + (m.layer or 0))
        rec["baseline_rank_at_energy"] = {
            "gaussian": cache[shape],
            "base_plus_noise": rank_at_energy(singular_values(noisy, how), energy),
        }
        idx, cos = find_intruders(ub, ut, top_k, epsilon)
    else:
        rec["baseline_rank_at_energy"] = {"gaussian": None, "base_plus_noise": None}
        idx, cos = [], torch.ones(min(top_k, ut.shape[1]))
    rec["intruders"] = len(idx)
    rec["intruder_indices"] = idx
    rec["intruder_max_cos"] = [round(float(c), 4) for c in cos]
    return rec, {"base": sb, "tuned": st, "delta": sd}


# ---------------------------------------------------------------------------------------------------------
# a whole run


@dataclass
class SpectrumResult:
    header: dict
    records: list[dict]
    singular_values: dict[str, torch.Tensor]  # "<matrix name>.<base|tuned|delta>" -> fp32 vector


def check_energy(energy: float) -> None:
    if not 0.0 < energy < 1.0:
        raise LorascopeError(f"energy must be in (0, 1) (got {energy})")


def spectrum_of_models(
    base: torch.nn.Module,
    tuned: torch.nn.Module,
    energy: float = 0.9,
    top_k: int = 10,
    epsilon: float = 0.5,
    method: str = "auto",
    progress: bool = True,
    base_cache: dict | None = None,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Records and singular values for every adapted matrix of an in-memory (base, tuned) pair."""
    check_energy(energy)
    check_params(top_k, epsilon)
    mats = list(iter_matrices(base, tuned))
    records, svals, cache = [], {}, {}
    for m in tqdm(mats, desc="spectrum", unit="matrix", disable=not progress):
        rec, sv = matrix_spectrum(m, energy, top_k, epsilon, method, gaussian_cache=cache, base_cache=base_cache)
        records.append(rec)
        # clone: an unchanged matrix shares one spectrum for base and tuned, which safetensors refuses
        svals.update({f"{m.name}.{k}": v.float().clone() for k, v in sv.items()})
    return records, svals


def compute_spectrum(
    run: str, energy: float = 0.9, top_k: int = 10, epsilon: float = 0.5, method: str = "auto", progress: bool = True
) -> SpectrumResult:
    """Load RUN[:CHECKPOINT] and its base, and analyse every adapted matrix."""
    check_energy(energy)
    check_params(top_k, epsilon)
    t0 = time.time()
    pair = load_pair(run)
    t1 = time.time()
    records, svals = spectrum_of_models(pair.base, pair.tuned, energy, top_k, epsilon, method, progress)
    header = _header(
        pair.run_dir,
        pair.checkpoint,
        pair.meta,
        records,
        energy,
        top_k,
        epsilon,
        {"load_s": round(t1 - t0, 2), "analysis_s": round(time.time() - t1, 2)},
    )
    return SpectrumResult(header=header, records=records, singular_values=svals)


def _header(
    run_dir: Path, ck, meta: dict, records: list[dict], energy: float, top_k: int, epsilon: float, timing: dict
) -> dict:
    method = meta.get("method") or {}
    lora_rank = int(method["rank"]) if ck.kind == "lora" and method.get("rank") else None
    return {
        "run": str(run_dir),
        "checkpoint": ck.path.name,
        "kind": ck.kind,
        "base": ck.base,
        "method": meta.get("method"),
        "lora_rank": lora_rank,
        "tokens": ck.tokens,
        "epoch": ck.epoch,
        "step": ck.step,
        "energy": energy,
        "top_k": top_k,
        "epsilon": epsilon,
        "matrices": len(records),
        "changed_matrices": sum(r["changed"] for r in records),
        "timing": timing,
    }


def compute_spectra_all(
    run_dir: str | Path,
    energy: float = 0.9,
    top_k: int = 10,
    epsilon: float = 0.5,
    method: str = "auto",
    progress: bool = True,
) -> Iterator[SpectrumResult]:
    """One SpectrumResult per checkpoint of a run, in training order; the base is loaded and decomposed once."""
    from ..models import list_checkpoints, load_base, load_checkpoint
    from .weights import resolve_checkpoint

    check_energy(energy)
    check_params(top_k, epsilon)
    run_dir, _, _ = resolve_checkpoint(str(run_dir))  # validates every checkpoint's metadata
    cks = list_checkpoints(run_dir)
    if len({c.base for c in cks}) > 1:
        raise LorascopeError(f"{run_dir}: checkpoints name different base models; analyse them one by one")
    base, _ = load_base(cks[0].base)
    base_cache: dict = {}
    for ck in cks:
        t0 = time.time()
        tuned, _ = load_checkpoint(ck, merge=True)
        t1 = time.time()
        records, svals = spectrum_of_models(base, tuned, energy, top_k, epsilon, method, progress, base_cache)
        meta = json.loads((ck.path / "lorascope.json").read_text())
        header = _header(
            run_dir,
            ck,
            meta,
            records,
            energy,
            top_k,
            epsilon,
            {"load_s": round(t1 - t0, 2), "analysis_s": round(time.time() - t1, 2)},
        )
        del tuned
        yield SpectrumResult(header=header, records=records, singular_values=svals)


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 3) if xs else None


def aggregate(records: list[dict], lora_rank: int | None = None) -> dict:
    """Means over CHANGED matrices, by module type and by layer; rank as a multiple of the LoRA rank."""
    groups: dict[str, dict] = {"by_module": defaultdict(list), "by_layer": defaultdict(list)}
    for r in records:
        if r["changed"]:
            groups["by_module"][r["module"]].append(r)
            groups["by_layer"][str(r["layer"]) if r["layer"] is not None else "none"].append(r)
    out: dict[str, dict] = {}
    for gname, g in groups.items():
        out[gname] = {}
        for key, rs in g.items():
            row = {"n": len(rs), "intruders_total": sum(r["intruders"] for r in rs)}
            for k in KINDS:
                row[f"{k}_rank_at_energy"] = _mean([r["rank_at_energy"][k] for r in rs])
            row["delta_rank_fraction"] = _mean([r["rank_fraction_delta"] for r in rs])
            row["delta_stable_rank"] = _mean([r["stable_rank"]["delta"] for r in rs])
            row["delta_effective_rank"] = _mean([r["effective_rank"]["delta"] for r in rs])
            row["gaussian_rank_at_energy"] = _mean([r["baseline_rank_at_energy"]["gaussian"] for r in rs])
            row["base_plus_noise_rank_at_energy"] = _mean([r["baseline_rank_at_energy"]["base_plus_noise"] for r in rs])
            row["intruders_mean"] = _mean([r["intruders"] for r in rs])
            if lora_rank:
                row["delta_rank_over_lora_rank"] = round(row["delta_rank_at_energy"] / lora_rank, 3)
            out[gname][key] = row
    return out


def write_spectrum(res: SpectrumResult, out: Path) -> Path:
    """out/singular_values.safetensors, then out/spectrum.json last (its presence marks completion)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # fp32, not fp16: singular values of a young LoRA dW sit near 1e-6, inside fp16's subnormal range.
    with atomic_path(out / "singular_values.safetensors") as tmp:
        save_file(res.singular_values, str(tmp), metadata={"energy": str(res.header["energy"])})
    doc = {**res.header, "aggregate": aggregate(res.records, res.header.get("lora_rank")), "records": res.records}
    atomic_write_text(out / "spectrum.json", json.dumps(doc, indent=1) + "\n")
    return out / "spectrum.json"


def analyse_spectrum(run: str, out: Path, energy: float, top_k: int, epsilon: float) -> Path:
    """Write OUT/spectrum.json (header, aggregate, one record per matrix) and OUT/singular_values.safetensors.

    'RUN:all' analyses every checkpoint into OUT/<checkpoint>/ and writes OUT/trajectory.json (per-checkpoint
    means by module type), the rank of dW tracked over training.
    """
    from ..models import split_spec

    check_energy(energy)
    check_params(top_k, epsilon)
    path, ck_name = split_spec(run)
    if ck_name == "all":
        return _spectrum_all(path, Path(out), energy, top_k, epsilon)
    res = compute_spectrum(run, energy=energy, top_k=top_k, epsilon=epsilon)
    path = write_spectrum(res, out)
    agg = aggregate(res.records, res.header.get("lora_rank"))["by_module"]
    pct = int(round(energy * 100))
    print(
        f"{res.header['changed_matrices']}/{res.header['matrices']} matrices changed; "
        f"mean rank@{pct}% of dW (gaussian baseline) by module:"
    )
    for mod, row in agg.items():
        extra = f"  = {row['delta_rank_over_lora_rank']} x r" if "delta_rank_over_lora_rank" in row else ""
        print(
            f"  {mod:14s} {row['delta_rank_at_energy']:>9} ({row['gaussian_rank_at_energy']})"
            f"  intruders {row['intruders_total']}{extra}"
        )
    print(str(path))
    return path


def _spectrum_all(run_dir: str, out: Path, energy: float, top_k: int, epsilon: float) -> Path:
    rows = []
    for res in compute_spectra_all(run_dir, energy, top_k, epsilon):
        write_spectrum(res, out / res.header["checkpoint"])
        agg = aggregate(res.records, res.header.get("lora_rank"))
        h = res.header
        rows.append(
            {k: h[k] for k in ("checkpoint", "tokens", "epoch", "step", "kind", "lora_rank")}
            | {"intruders_total": sum(r["intruders"] for r in res.records), "by_module": agg["by_module"]}
        )
        print(
            f"{h['checkpoint']}: tokens {h['tokens']}, mean rank@{energy:.0%} of dW "
            f"{_mean([r['rank_at_energy']['delta'] for r in res.records if r['changed']])}, "
            f"intruders {rows[-1]['intruders_total']}"
        )
    out.mkdir(parents=True, exist_ok=True)
    doc = {"run": str(run_dir), "energy": energy, "checkpoints": rows}
    atomic_write_text(out / "trajectory.json", json.dumps(doc, indent=1) + "\n")
    print(str(out / "trajectory.json"))
    return out / "trajectory.json"


def load_spectrum(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(spectrum.json as dict, singular values) from a directory written by analyse_spectrum."""
    from safetensors.torch import load_file

    out = Path(out)
    if not (out / "spectrum.json").exists():
        raise LorascopeError(f"{out}: no spectrum.json (run `lorascope spectrum` first)")
    return json.loads((out / "spectrum.json").read_text()), load_file(str(out / "singular_values.safetensors"))
