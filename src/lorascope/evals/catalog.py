"""Which number of each task the report reads, which way is better, and whether it measures learning or forgetting.

Learning = improvement on the target domain; forgetting = loss on the source domain (English, general
knowledge). Both are signed so that positive means "learned" / "forgot":

    learning   = value - base   (higher-is-better metric)   or   base - value   (lower-is-better, e.g. BPB)
    forgetting = base - value   (higher-is-better)          or   value - base   (lower-is-better)

Example::

    >>> spec("winogrande").metric, spec("winogrande").role, spec("kl_base:10000").weight_field
    ('acc,none', 'forgetting', 'tokens')
    >>> spec("heldout_bpb:code-cpt").role
    'learning'
    >>> learning_metric(["heldout_bpb:code-cpt", "english_bpb"], "code-cpt")
    'heldout_bpb:code-cpt'
"""

from __future__ import annotations

from dataclasses import dataclass

FORGETTING_TASKS = ("hellaswag", "arc_challenge", "winogrande")  # the paper's forgetting_mean


@dataclass(frozen=True)
class MetricSpec:
    task: str
    metric: str  # key in results.json
    higher_better: bool
    role: str  # "learning" | "forgetting"
    item_field: str | None  # per-item field in samples/<task>.jsonl whose mean is the metric
    weight_field: str | None = None  # per-item weight of that mean (KL is token-weighted: "tokens")


_FIXED = {
    "hellaswag": ("acc_norm,none", True, "forgetting", "acc_norm"),
    "arc_challenge": ("acc_norm,none", True, "forgetting", "acc_norm"),
    "arc_easy": ("acc_norm,none", True, "forgetting", "acc_norm"),
    "winogrande": ("acc,none", True, "forgetting", "acc"),
    "english_bpb": ("bpb", False, "forgetting", "bpb"),
    "kl_base": ("kl", False, "forgetting", "kl", "tokens"),
    "forgetting_mean": ("mean", True, "forgetting", None),
    "humaneval_bpb": ("bpb", False, "learning", "bpb"),
    "mbpp_bpb": ("bpb", False, "learning", "bpb"),
    "gsm8k_bpb": ("bpb", False, "learning", "bpb"),
    "math500_bpb": ("bpb", False, "learning", "bpb"),
    "humaneval": ("pass@1", True, "learning", "passed"),
    "mbpp": ("pass@1", True, "learning", "passed"),
    "gsm8k": ("exact_match,strict-match", True, "learning", "strict_correct"),
    "math500": ("exact_match,none", True, "learning", "correct"),
}


def spec(task: str) -> MetricSpec | None:
    """The headline metric of a task, or None for a task the report does not know (still in the parquet)."""
    if task.startswith("heldout_bpb:"):
        return MetricSpec(task, "bpb", False, "learning", "bpb")
    if task.startswith("lm_eval:"):  # metric and direction from lm-eval's task config, the role from the name
        from .lm_eval_task import catalog_entry

        entry = catalog_entry(task)
        return MetricSpec(task, *entry) if entry else None
    if task.startswith("kl_base:"):  # kl_base:<tokens>, a stated amount of text
        return MetricSpec(task, *_FIXED["kl_base"])
    if task not in _FIXED:
        return None
    return MetricSpec(task, *_FIXED[task])


def signed(s: MetricSpec, value: float, base: float) -> float:
    """Learning (role learning) or forgetting (role forgetting) of `value` against `base`, positive = more."""
    d = value - base if s.higher_better else base - value
    return d if s.role == "learning" else -d


def domain(dataset: str | None) -> str | None:
    name = (dataset or "").lower()
    return "code" if "code" in name else "math" if "math" in name else None


# the paper's benchmark first, then the held-out loss of the setting's own data, then gold-solution BPB
_LEARNING_ORDER = {
    "code": ["humaneval", "mbpp", "{heldout}", "humaneval_bpb", "mbpp_bpb"],
    "math": ["gsm8k", "math500", "{heldout}", "gsm8k_bpb", "math500_bpb"],
    None: ["{heldout}"],
}


def learning_metric(tasks: list[str], dataset: str | None) -> str | None:
    """The task whose metric is the setting's headline learning measure, among those evaluated."""
    heldout = f"heldout_bpb:{dataset}"
    for t in _LEARNING_ORDER[domain(dataset)]:
        t = heldout if t == "{heldout}" else t
        if t in tasks:
            return t
    rest = sorted(t for t in tasks if (s := spec(t)) and s.role == "learning")
    return rest[0] if rest else None


def forgetting_metric(tasks: list[str]) -> str | None:
    """The paper's forgetting_mean when all three tasks ran, else the most sensitive proxy evaluated: KL to the
    base (a CPT run on raw text can lower an instruct model's English BPB by format adaptation alone)."""
    kl = sorted(t for t in tasks if t.startswith("kl_base:")) or ["kl_base"]
    for t in ("forgetting_mean", kl[0], "english_bpb", *FORGETTING_TASKS, "arc_easy"):
        if t in tasks:
            return t
    return None


def describe(s: MetricSpec) -> str:
    what = (
        "mean(HellaSwag acc_norm, ARC-C acc_norm, WinoGrande acc)"
        if s.task == "forgetting_mean"
        else f"{s.task} {s.metric}"
    )
    return f"{what} ({'higher' if s.higher_better else 'lower'} is better)"
