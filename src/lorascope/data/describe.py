"""Build a dataset and describe it: the backend of a ``lorascope data`` command.

>>> m = data_cli("math-ift", model="embedded", seq_len=512)      # builds (or reads the cache), returns
>>> m["documents"], m["rows"]                                     # the manifest plus packed-row stats
({'train': 8474, 'heldout': 1004}, {'seq_len': 512, 'train': 5009, 'train_fill': 0.7779, ...})
"""

from __future__ import annotations

from ..config import DataConfig, validate


def data_config(dataset: str, regime: str | None = None, max_docs: int | None = None, fields: dict | None = None):
    """The DataConfig the command describes; ``fields``: other DataConfig fields given (text_field, ...)."""
    return validate(DataConfig, {"dataset": dataset, "regime": regime, "max_docs": max_docs, **(fields or {})}, "data")


def data_cli(
    dataset: str,
    model: str = "embedded",
    regime: str | None = None,
    max_docs: int | None = None,
    seq_len: int = 512,
    fields: dict | None = None,
) -> dict:
    """Manifest of ``dataset`` for ``model``'s tokenizer, plus how it packs into ``seq_len`` rows."""
    from ..models import load_tokenizer
    from . import dataset_manifest, load_dataset

    dcfg = data_config(dataset, regime, max_docs, fields)
    tok = load_tokenizer(model)
    m = dataset_manifest(dcfg, tok)
    rows = {"seq_len": seq_len}
    for split in ("train", "heldout"):
        ds = load_dataset(dcfg, tok, seq_len, split)
        rows[split] = len(ds)
        if split == "train" and len(ds):
            used = int(ds.attention_mask.sum())
            rows["train_fill"] = round(used / ds.attention_mask.size, 4)  # share of non-padding positions
            rows["train_supervised"] = round(int((ds.labels != -100).sum()) / used, 4)  # loss-bearing share
    m["rows"] = rows
    return m


# ---------------------------------------------------------------------------------------------------------
# lorascope data FILE --preview: what a study would train and evaluate on, before it runs

FEW_CLUSTERS = 5  # below this many effective test clusters a cluster bootstrap has little to resample


def _excerpt(doc, chars: int = 160) -> str:
    from . import doc_text

    text = " ".join(doc_text(doc).split())
    return text if len(text) <= chars else text[: chars - 3] + "..."


def _evaluation(dcfg: DataConfig, limit: int | None) -> dict:
    """The held-out windows ``heldout_bpb:<dataset>`` scores, per validation/test split: windows, clusters and
    Kish's effective number of clusters (what the bootstrap resamples)."""
    from collections import Counter

    # the windows come from the evaluation code itself, so the preview cannot drift from what a study scores
    from ..evals.texts import heldout_windows
    from ..splits import SPLITS, effective_clusters, split_of

    # read with the data's own fields, as a study reads it; without the cap: held-out documents are never trained on
    wins = heldout_windows(dcfg.model_copy(update={"max_docs": None}), limit=limit)
    out = {"task": f"heldout_bpb:{dcfg.dataset}", "windows": len(wins), "limit": limit}
    for split in SPLITS:
        sizes = Counter(w["cluster"] for w in wins if split_of(w["cluster"]) == split)
        out[split] = {
            "windows": sum(sizes.values()),
            "clusters": len(sizes),
            "effective_clusters": round(effective_clusters(sizes.values()), 1),
            "largest": [f"{c.removeprefix('heldout/')} ({n})" for c, n in sizes.most_common(3)],
        }
    return out


def preview(
    dataset: str,
    model: str = "embedded",
    regime: str | None = None,
    max_docs: int | None = None,
    eval_limit: int | None = None,
    examples: int = 2,
    fields: dict | None = None,
) -> dict:
    """Documents, tokens, a few examples, the held-out split and its groups, decontamination, and the held-out
    windows a study's ``heldout_bpb:<dataset>`` would evaluate, by validation/test split."""
    from collections import Counter

    from ..models import load_tokenizer
    from . import dataset_manifest, load_docs

    dcfg = data_config(dataset, regime, max_docs, fields)
    docs = load_docs(dcfg)
    m = dataset_manifest(dcfg, load_tokenizer(model))
    group_field = getattr(dcfg, "group_field", None)  # a field of DataConfig in newer versions
    groups = Counter(g for g in docs["heldout_groups"] if g is not None)
    return {
        "dataset": dataset,
        "regime": dcfg.regime,
        "documents": m["documents"],
        "tokens": m["tokens"],
        "model": model,
        "examples": {s: [_excerpt(d) for d in docs[s][:examples]] for s in ("train", "heldout")},
        "heldout_unit": (
            f"groups of '{group_field}'"
            if group_field
            else "groups (package, file or template)"
            if groups
            else "one record at a time (each held-out record is its own cluster)"
        ),
        "heldout_groups": {"count": len(groups), "largest": [f"{g} ({n})" for g, n in groups.most_common(3)]},
        "decontamination": m["decontamination"],
        "evaluation": _evaluation(dcfg, eval_limit) if dcfg.regime == "cpt" or docs["heldout"] else None,
    }


def format_preview(p: dict) -> str:
    d, t = p["documents"], p["tokens"]
    deco = p["decontamination"]
    dropped = {k: v for k, v in (deco.get("train", {}).get("dropped") or {}).items() if v}
    lines = [
        f"dataset       {p['dataset']} ({p['regime']}), tokens by the tokenizer of {p['model']}",
        f"documents     train {d['train']:,} ({t['train']:,} tokens); "
        f"held out {d['heldout']:,} ({t['heldout']:,} tokens)",
        f"held out by   {p['heldout_unit']}"
        + (
            f"; {p['heldout_groups']['count']} groups, largest {', '.join(p['heldout_groups']['largest'])}"
            if p["heldout_groups"]["count"]
            else ""
        ),
        f"decontam.     {deco.get('rule', '')}: "
        + (
            ", ".join(f"{k} {v}" for k, v in dropped.items()) + " training documents dropped"
            if dropped
            else "nothing dropped"
        ),
    ]
    for split in ("train", "heldout"):
        lines += [f"example       [{split}] {x}" for x in p["examples"][split]]
    ev = p["evaluation"]
    if ev:
        lim = f" (a study's limit of {ev['limit']}, evenly spread)" if ev["limit"] else ""
        lines.append(f"evaluated on  {ev['task']}: {ev['windows']:,} held-out windows{lim}")
        for split in ("validation", "test"):
            s = ev[split]
            note = (
                "  <- few: intervals will be wide" if split == "test" and s["effective_clusters"] < FEW_CLUSTERS else ""
            )
            lines.append(
                f"  {split:<11} {s['windows']:,} windows in {s['clusters']} clusters "
                f"(effective {s['effective_clusters']}); largest {', '.join(s['largest']) or '-'}{note}"
            )
        lines.append("  validation chooses learning rates and the recommendation; every headline number is test")
    return "\n".join(lines)
