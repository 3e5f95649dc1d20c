"""Simulated study directories with a planted truth, written in the files a real study leaves for the report.

The calibration bench (bench/calibration.py) and tests/test_calibration.py run many of these through the report's
own decision code and count how often its intervals hold the truth and how often its verdicts contradict it.

The model, per metric (learning: held-out BPB over the base, item-wise; forgetting: KL to the base, per English
text, token-weighted), for run r = (method, LR, seed) evaluated at checkpoint b on item i of cluster k::

    value(r, b, i) = base(i) + sign * [ truth(method, LR, b)          the planted effect
                                        + seed[s]                     data order / init shared by every method
                                        + run[r]                      training luck of this run (seed x method)
                                        + cluster[k, method]          how this method fares on this cluster
                                        + item[i, r, b] ]             evaluation noise of one item

Learning at a non-best LR is `lr_step` smaller per grid step away from the best (middle) LR; every point's true
forgetting lies on its family's line F = slope * L, so under equal slopes the frontiers of full FT and LoRA are
one curve (the equal-learning null), and a linear curve makes the frontier statistic's estimand exact.

The LR search is replayed as study/plan.py does it: the first seed trains the grid at `search_budget`, the best
LR on the validation split is chosen (the middle one is true best); when the search budget is the final budget
(`quick`), the chosen search run IS the first seed's main run, as in a real study. ``noiseless=True`` writes the
same study with every noise term zero: what the report computes on it is the estimand of each comparison.

Example::

    >>> d = simulate_study(Path("sim"), QUICK, Truth(), np.random.default_rng(0))
    >>> (d / "lr_search.json").exists(), sorted(p.name for p in (d / "evals").iterdir())[:1]
    (True, ['base'])
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from ..evals.results import mean_stderr, metrics_by_split, token_weighted_mean, write_json, write_samples
from ..fileio import atomic_write_json, atomic_write_text
from ..layout import CKPT_META, checkpoint_name, samples_filename

LEARN = "heldout_bpb:code-cpt"
FORGET = "kl_base"
SETTING = "code-cpt"
LORA16 = {"kind": "lora", "rank": 16, "targets": "all", "init": "gaussian", "use_dora": False}


@dataclass(frozen=True)
class Noise:
    """Standard deviations of one metric's noise terms (metric units)."""

    seed: float = 0.0
    run: float = 0.0
    cluster: float = 0.0
    item: float = 0.0


@dataclass(frozen=True)
class Design:
    """What a study trains and evaluates. Cluster sizes are items per cluster on each split."""

    name: str
    methods: tuple  # (name, method dict, trainable parameters); the first is full FT
    seeds: tuple = (0, 1)
    budgets: tuple = (4096,)  # checkpoint tokens of the main runs
    search_budget: int = 4096  # tokens of the LR-search runs; == budgets[-1]: the chosen search run is a main run
    lrs: dict = field(default_factory=dict)  # method -> 3-point grid (default: 1e-4 x 3.16^k for full, 1e-3 LoRA)
    test_clusters: tuple = (19, 1, 1, 1, 1)  # quick's held-out code test split
    val_clusters: tuple = (20, 14, 2, 2, 1, 1, 1)
    kl_texts: tuple = (75, 76)  # (validation, test) English texts, each its own cluster
    kl_tokens: tuple = (20, 130)  # tokens per text, uniform in this range

    def grid(self, method: str) -> list[float]:
        if method in self.lrs:
            return list(self.lrs[method])
        mid = 1e-4 if method == self.methods[0][0] else 1e-3
        return [round(mid / 3.16, 10), mid, round(mid * 3.16, 10)]


@dataclass(frozen=True)
class Truth:
    """The planted effects: learning per method and budget (BPB drop; a number applies at every budget, a tuple
    is per budget), each family's forgetting per unit of learning, and the noise of both metrics."""

    learning: dict = field(default_factory=lambda: {"full": 0.025, "lora-r16": 0.025})
    slope: dict = field(default_factory=lambda: {"full": 1.5, "lora": 1.5})  # family -> KL per bpb learned
    lr_step: float = 0.5  # share of learning lost per grid step away from the best LR
    # training noise (seed x method) dominant, as in an 8-step study; item noise sized like quick's samples
    learn_noise: Noise = Noise(seed=0.002, run=0.004, cluster=0.002, item=0.01)
    forget_noise: Noise = Noise(seed=0.001, run=0.003, cluster=0.001, item=0.01)

    def gain(self, method: str, k: int) -> float:
        g = self.learning[method]
        return float(g[k] if isinstance(g, (tuple, list)) else g)


def family(method: dict) -> str:
    return "full" if method.get("kind") == "full" else "lora"


QUICK = Design("quick", (("full", {"kind": "full"}, 134_515_008), ("lora-r16", LORA16, 4_884_480)))
EVIDENCE = Design(
    "evidence",
    (
        ("full", {"kind": "full"}, 134_515_008),
        ("lora-r1", {**LORA16, "rank": 1}, 305_280),
        ("lora-r16", LORA16, 4_884_480),
        ("lora-r64", {**LORA16, "rank": 64}, 19_537_920),
        ("lora-r16-attn", {**LORA16, "targets": "attention"}, 1_843_200),
    ),
    seeds=(0, 1, 2),  # configs/evidence.yaml runs three
    budgets=(4096, 8192, 16384, 32768),
    search_budget=4096,
    test_clusters=(2,) * 12,  # as evidence's held-out windows are once balanced over clusters (quick has today's)
    val_clusters=(3,) * 13 + (2,),
)
# quick once its held-out windows are balanced over clusters: 24 test windows, 2 from each of 12 packages (Kish 12)
QUICK_BALANCED = replace(QUICK, name="quick-balanced", test_clusters=(2,) * 12, val_clusters=(3,) * 13 + (2,))
USER = replace(QUICK, name="user-groups", test_clusters=(9, 6, 4, 3, 2, 2, 1, 1, 1, 1), val_clusters=(8, 7, 5, 3, 3, 2))


@dataclass
class _World:
    """One draw of every random effect of a study (zeros when noiseless)."""

    rng: np.random.Generator
    scale: float
    items: dict  # metric -> (ids, clusters, splits, base values, weights)
    seed: dict = field(default_factory=dict)
    cluster: dict = field(default_factory=dict)

    def draw(self, sd: float, size=None):
        return self.scale * self.rng.normal(0.0, sd, size) if sd > 0 and self.scale else np.zeros(size or ())


def _items(design: Design, rng: np.random.Generator) -> dict:
    """The evaluation items of both metrics: ids, clusters, splits, base values and token weights."""
    out = {}
    sizes = [("validation", n) for n in design.val_clusters] + [("test", n) for n in design.test_clusters]
    ids, cl, sp = [], [], []
    for k, (split, n) in enumerate(sizes):
        for j in range(n):
            ids.append(f"w{k}-{j}")
            cl.append(f"heldout/pkg{k}")
            sp.append(split)
    out[LEARN] = (ids, cl, sp, rng.uniform(0.8, 1.2, len(ids)), np.ones(len(ids)))
    nv, nt = design.kl_texts
    n = nv + nt
    kl_ids = [f"t{j}" for j in range(n)]
    tokens = rng.integers(design.kl_tokens[0], design.kl_tokens[1] + 1, n).astype(float)
    out[FORGET] = (kl_ids, [f"english/{i}" for i in kl_ids], ["validation"] * nv + ["test"] * nt, np.zeros(n), tokens)
    return out


def _write_eval(d: Path, values: dict, items: dict) -> None:
    """results.json (metrics and by_split through the evals' own helpers) and samples/<task>.jsonl."""
    tasks = {}
    for task, v in values.items():
        ids, cl, sp, _, w = items[task]
        if task == FORGET:
            recs = [
                {"id": i, "cluster": c, "split": s, "kl_sum": float(x * t), "tokens": int(t), "kl": float(x)}
                for i, c, s, x, t in zip(ids, cl, sp, v, w)
            ]
            of = _kl_metrics
        else:
            recs = [{"id": i, "cluster": c, "split": s, "bpb": float(x)} for i, c, s, x in zip(ids, cl, sp, v)]
            of = _bpb_metrics
        write_samples(d / "samples" / samples_filename(task), recs)
        tasks[task] = {"metrics": of(recs), "by_split": metrics_by_split(recs, of), "n": len(recs)}
    write_json(d / "results.json", {"tasks": tasks, "complete": True})


def _bpb_metrics(recs: list[dict]) -> dict:
    m, se = mean_stderr([r["bpb"] for r in recs])
    return {"bpb": m, "bpb_stderr": se}


def _kl_metrics(recs: list[dict]) -> dict:
    """The KL a real kl_base reports: token-weighted over texts (evals.results, as evals/kl.py uses it)."""
    return {"kl": token_weighted_mean([r["kl_sum"] for r in recs], [r["tokens"] for r in recs])[0]}


def _values(w: _World, truth: Truth, method: str, fam: str, gain: float, seed: int, run_eff: dict) -> dict:
    """Per-item values of both metrics for one run at one checkpoint."""
    out = {}
    for task, eff, noise, sign in (
        (LEARN, gain, truth.learn_noise, -1.0),
        (FORGET, truth.slope[fam] * gain, truth.forget_noise, 1.0),
    ):
        ids, cl, _, base, wt = w.items[task]
        key = (task, method)
        if key not in w.cluster:
            uniq = sorted(set(cl))
            w.cluster[key] = dict(zip(uniq, w.draw(noise.cluster, len(uniq))))
        if (task, seed) not in w.seed:
            w.seed[(task, seed)] = float(w.draw(noise.seed))
        clus = np.array([w.cluster[key][c] for c in cl])
        item_sd = noise.item * np.sqrt(wt.mean() / wt)  # a short text's KL is noisier than a long one's
        shift = eff + w.seed[(task, seed)] + run_eff[task] + clus + w.draw(1.0, len(ids)) * item_sd
        out[task] = base + sign * shift
    return out


def simulate_study(
    d: Path, design: Design, truth: Truth, rng: np.random.Generator, noiseless: bool = False, chosen: dict | None = None
) -> Path:
    """Write a study directory at d (base, runs, evaluations, runs.json, lr_search.json, study.yaml); chosen:
    method -> LR to record as the search's choice instead of choosing on validation (the noiseless twin)."""
    d = Path(d)
    w = _World(rng, 0.0 if noiseless else 1.0, _items(design, rng))
    _write_eval(d / "evals" / "base", {t: v[3] for t, v in w.items.items()}, w.items)
    runs, searches = [], {}
    for name, method, n_params in design.methods:
        grid = design.grid(name)
        best = len(grid) // 2
        rec = {"method": name, "method_dict": method, "params": n_params}
        # budget "final" (quick): the search runs are the first seed's main runs, all checkpoints included
        shared = design.search_budget == design.budgets[-1]
        search = {}
        for k, lr in enumerate(grid):
            at = design.budgets if shared else (design.search_budget,)
            rid = f"{SETTING}-{name}-{lr:g}-s{design.seeds[0]}-search"
            shifts = {b: _lr_gain(truth, name, design, b, abs(k - best)) for b in at}
            search[lr] = _run(d, w, truth, rec, lr, design.seeds[0], rid, shifts)
        pick = (chosen or {}).get(name)
        if pick is None:  # study/plan.py's rule: the most validation learning, ties to the lower LR
            pick = max(grid, key=lambda lr: (search[lr]["val"], -lr))
        searches[f"{SETTING}/{name}"] = _search_record(name, grid, pick, search)
        for lr in grid:
            role = "main" if shared and lr == pick else "lr-search"
            runs.append({**search[lr]["entry"], "role": role})
        for seed in design.seeds:
            if shared and seed == design.seeds[0]:
                continue  # the chosen search run is this seed's main run
            shifts = {b: _lr_gain(truth, name, design, b, abs(grid.index(pick) - best)) for b in design.budgets}
            rid = f"{SETTING}-{name}-{pick:g}-s{seed}"
            runs.append(_run(d, w, truth, rec, pick, seed, rid, shifts)["entry"])
    atomic_write_json(d / "runs.json", runs)
    atomic_write_json(d / "lr_search.json", searches)
    atomic_write_text(d / "study.yaml", yaml.safe_dump(_study_yaml(design)))
    return d


def _lr_gain(truth: Truth, name: str, design: Design, tokens: int, steps_off: int) -> float:
    k = design.budgets.index(tokens) if tokens in design.budgets else 0
    return truth.gain(name, k) * (1.0 - truth.lr_step) ** steps_off


def _run(d: Path, w: _World, truth: Truth, rec: dict, lr: float, seed: int, rid: str, shifts: dict) -> dict:
    """One run's checkpoints and evaluations; returns its runs.json entry and its validation learning."""
    fam = family(rec["method_dict"])
    run_eff = {LEARN: float(w.draw(truth.learn_noise.run)), FORGET: float(w.draw(truth.forget_noise.run))}
    val = 0.0
    for tokens, gain in shifts.items():
        ck = checkpoint_name("tokens", tokens)
        atomic_write_json(d / "runs" / rid / "checkpoints" / ck / CKPT_META, {"tokens": tokens})
        vals = _values(w, truth, rec["method"], fam, gain, seed, run_eff)
        _write_eval(d / "evals" / rid / ck, vals, w.items)
        ids, _, sp, base, _ = w.items[LEARN]
        is_val = np.array(sp) == "validation"
        val = float(np.mean(base[is_val] - vals[LEARN][is_val]))  # the last checkpoint's: what the search reads
    atomic_write_json(d / "runs" / rid / "summary.json", {"trainable_parameters": rec["params"]})
    atomic_write_text(d / "runs" / rid / "COMPLETE", "ok\n")
    entry = {
        "run_id": rid,
        "label": f"{SETTING}/{rec['method']}/lr{lr:g}/s{seed}",
        "setting": SETTING,
        "dataset": SETTING,
        "method_name": rec["method"],
        "method": rec["method_dict"],
        "lr": lr,
        "seed": seed,
        "role": "main",
    }
    return {"entry": entry, "val": val}


def _search_record(name: str, grid: list[float], pick: float, search: dict) -> dict:
    inside = grid[0] < pick < grid[-1]
    return {
        "setting": SETTING,
        "method": name,
        "metric": LEARN,
        "split": "validation",
        "grid": grid,
        "chosen": pick,
        "bracketed": inside,
        "status": "chosen" if inside else "unbracketed",
        "diverged": [],
        "extensions": 0,
        "points": [{"lr": lr, "run_id": s["entry"]["run_id"], "value": -s["val"]} for lr, s in search.items()],
    }


def _study_yaml(design: Design) -> dict:
    return {
        "name": f"simulated-{design.name}",
        "model": "embedded",
        "seeds": list(design.seeds),
        "report": {"forgetting": FORGET},
        "simulated": design.name,
    }
