"""Any lm-evaluation-harness task as a lorascope task: ``lm_eval:<task>[@learning|@forgetting]``.

lm-eval's own evaluator (``simple_evaluate``) runs the task on the model lorascope has already loaded (and
merged), wrapped in lm-eval's ``HFLM(pretrained=model, tokenizer=tok)``: no second load. lm-eval builds the
prompts, scores them and computes the per-item metrics; lorascope writes one sample line per item (its id, the
item's per-item metric values, its cluster and split), so the bootstrap, the LR choice and the verdicts read it
like a built-in task.

- **Which tasks**: lm-eval's bundled tasks, plus the task YAMLs in the directories named by
  ``LORASCOPE_LM_EVAL_INCLUDE`` (``os.pathsep``-separated; lm-eval's ``include_path``). The variable is read by
  every process that evaluates or reports, so set it where ``lorascope study`` / ``report`` run.
- **Which number**: the first metric of the task config's ``metric_list`` aggregated by ``mean`` (its per-item
  values are what a bootstrap resamples); which way is better: that entry's ``higher_is_better`` (lm-eval's
  registry default when absent); the filter: the first of ``filter_list`` (``none`` when there is none).
  Result keys are lm-eval's (``acc,none``).
- **Which role**: the suffix. ``lm_eval:mytask@forgetting`` is a forgetting metric (the source domain, e.g. a
  general benchmark), ``@learning`` a learning one (the target domain). Without a suffix the task is evaluated
  and stored but is no headline candidate (``catalog.spec`` returns None).
- **Clusters**: one item, one cluster, ``lm_eval:<task>/<id>`` with ``id`` the document's ``id`` field where it
  has one, else lm-eval's document index; the split is ``splits.split_of`` of the cluster, as everywhere.

Example::

    LORASCOPE_LM_EVAL_INCLUDE=my_tasks lorascope eval embedded --tasks lm_eval:mytask@learning --out ev/base
"""

from __future__ import annotations

from .lm_eval_spec import PREFIX, headline, parse, task_manager


def _loglikelihoods(resps) -> list[float] | None:
    """A scored item's log-likelihood per choice (lm-eval's (loglik, is_greedy) answers), else None."""
    if isinstance(resps, (list, tuple)) and resps and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in resps):
        return [float(r[0]) for r in resps]
    return None


class LmEvalTask:
    """One lm-eval task run by lm-eval's evaluator on the loaded model."""

    def __init__(self, arg: str):
        self.task, self.role = parse(arg)
        self.name = f"{PREFIX}{arg}"
        self.benchmark = f"{PREFIX}{self.task}"  # clusters (and so splits) do not depend on the role
        self.metric, self.filter, self.higher_is_better = headline(self.task)  # unknown task: fails before a load
        self.item_metrics: list[str] = []  # per-item metric fields of the sample lines, set by run

    def run(self, ctx):
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        from .base import TaskResult

        lm = HFLM(
            pretrained=ctx.model, tokenizer=ctx.tokenizer, batch_size=ctx.batch_size, device=str(ctx.model.device)
        )
        out = simple_evaluate(
            model=lm,
            tasks=[self.task],
            num_fewshot=ctx.shots,
            limit=ctx.limit,
            task_manager=task_manager(self.task),
            log_samples=True,
            bootstrap_iters=0,
            random_seed=ctx.seed,
            numpy_random_seed=ctx.seed,
            torch_random_seed=ctx.seed,
            fewshot_random_seed=ctx.seed,
            verbosity="ERROR",
        )
        samples = self._samples(out["samples"][self.task], ctx.excluded_ids.get(self.name, []))
        info = {
            "n": len(samples),
            "shots": out.get("n-shot", {}).get(self.task),
            "harness": "lm-evaluation-harness " + str(out.get("lm_eval_version", "")),
            "metric": f"{self.metric},{self.filter}",
            "higher_is_better": self.higher_is_better,
            "role": self.role,
            "harness_results": {k: v for k, v in out["results"][self.task].items() if "," in k},
        }
        return TaskResult(metrics=self.metrics_of(samples), samples=samples, info=info, metrics_of=self.metrics_of)

    def _samples(self, logged: list[dict], excluded) -> list[dict]:
        """lm-eval's logged samples of the headline filter -> lorascope sample lines, in document order."""
        skip = {str(e) for e in excluded}
        out = []
        for s in sorted((s for s in logged if s.get("filter", "none") == self.filter), key=lambda s: s["doc_id"]):
            doc = s.get("doc") if isinstance(s.get("doc"), dict) else {}
            item_id = doc.get("id", s["doc_id"])
            if str(item_id) in skip:
                continue
            rec = {"id": item_id, "doc_id": s["doc_id"], "target": str(s.get("target"))}
            lls = _loglikelihoods(s.get("filtered_resps"))
            if lls is not None:
                rec["loglikelihoods"] = lls
            rec.update({m: float(s[m]) for m in s.get("metrics", []) if isinstance(s.get(m), (int, float, bool))})
            out.append(rec)
        self.item_metrics = [m for m in out[0] if m not in ("id", "doc_id", "target", "loglikelihoods")] if out else []
        return out

    def metrics_of(self, samples: list[dict]) -> dict[str, float]:
        """Every per-item metric's mean and stderr (lm-eval's keys), from any subset of the sample lines."""
        from .results import mean_stderr

        metrics: dict[str, float] = {}
        for name in self.item_metrics:
            m, se = mean_stderr([s[name] for s in samples])
            metrics[f"{name},{self.filter}"] = m
            metrics[f"{name}_stderr,{self.filter}"] = se
        return metrics
