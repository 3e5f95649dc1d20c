"""The ``lorascope`` command: subcommands only, each a thin call into the library.

User errors (LorascopeError) print one line ``error: ...`` and exit 2; nothing else is printed.
"""

from __future__ import annotations

import sys
from functools import wraps
from pathlib import Path

import typer

from lorascope.errors import LorascopeError

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="LoRA or full fine-tuning? Train, evaluate, analyse and report, the paper's way.",
)
model_app = typer.Typer(no_args_is_help=True, help="Inspect base models.")
app.add_typer(model_app, name="model")


def _user_errors(fn):
    @wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except LorascopeError as e:
            # one line, whatever the message quoted (a YAML parser's caret diagram, a library's traceback text)
            typer.echo("error: " + " ".join(part.strip() for part in str(e).splitlines() if part.strip()), err=True)
            raise typer.Exit(2) from None

    return wrapper


@model_app.command("info")
@_user_errors
def model_info_cmd(model: str = typer.Argument("embedded", help="embedded | hub id | local dir | .gguf | run dir")):
    """Parameter count, linear modules per block, tied embeddings, vocab size."""
    import json

    from lorascope.models import load_model, model_info

    m, _ = load_model(model)
    typer.echo(json.dumps(model_info(m), indent=2))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_user_errors
def train(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="run config YAML"),
    out: Path | None = typer.Option(
        None, "--out", help="run directory (resumed if it holds an unfinished run); required unless --dry-run"
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="print the plan (steps, tokens, checkpoints, "
        "parameters), a peak-memory estimate and a time estimate from 2 measured "
        "steps; train nothing",
    ),
    ignore_memory_estimate: bool = typer.Option(
        False, "--ignore-memory-estimate", help="train even if the estimated peak memory exceeds what is available"
    ),
):
    """Train one run: lorascope train CONFIG.yaml [dotted.key=value ...] --out RUN_DIR."""
    from lorascope.config import check_seq_len, load_run_config
    from lorascope.data import load_docs
    from lorascope.models import context_length
    from lorascope.train.estimate import check_memory, format_memory, memory_estimate

    cfg = load_run_config(config, ctx.args)
    if out is None and not dry_run:
        raise LorascopeError("--out: the run directory is required to train (or pass --dry-run)")
    load_docs(cfg.data)  # the data's errors before a model is loaded (built once, cached for the run)
    check_seq_len(cfg, context_length(cfg.model))  # before anything is loaded, allocated or written
    memory = memory_estimate(cfg)
    fits = True
    if not ignore_memory_estimate:
        try:
            check_memory(memory)
        except LorascopeError:
            if not dry_run:
                raise
            fits = False
    if dry_run:
        from lorascope.train.estimate import dry_run as plan_run
        from lorascope.train.estimate import format_dry_run

        # measuring steps that would not fit is what the estimate is there to prevent
        typer.echo(format_dry_run(plan_run(cfg) if fits else plan_run(cfg, measure_steps=0)))
        typer.echo(format_memory(memory) + ("" if fits else "; would be refused, so no step was measured"))
        return
    from lorascope.train.loop import train as run_train

    run_train(cfg, out)


@app.command()
@_user_errors
def data(
    dataset: str = typer.Argument(..., help="code-cpt | math-cpt | code-ift | math-ift | FILE | hf:ID"),
    model: str = typer.Option("embedded", "--model", help="whose tokenizer counts the tokens"),
    regime: str | None = typer.Option(None, "--regime", help="cpt | ift (user files; built-ins know)"),
    max_docs: int | None = typer.Option(None, "--max-docs", help="first N training documents"),
    seq_len: int = typer.Option(512, "--seq-len", help="packed row length for the row statistics"),
    preview: bool = typer.Option(
        False,
        "--preview",
        help="documents, examples, the held-out split and its groups, decontamination, and "
        "the held-out windows a study would evaluate on, by validation/test split",
    ),
    eval_limit: int | None = typer.Option(
        None, "--eval-limit", help="with --preview: the limit of the study's heldout_bpb eval group"
    ),
    text_field: str | None = typer.Option(None, "--text-field", help="data.text_field (CPT records)"),
    prompt_field: str | None = typer.Option(None, "--prompt-field", help="data.prompt_field (IFT records)"),
    response_field: str | None = typer.Option(None, "--response-field", help="data.response_field (IFT records)"),
    group_field: str | None = typer.Option(None, "--group-field", help="data.group_field: records held out together"),
):
    """Build (or read from the cache) a dataset and print its manifest and how it packs into rows."""
    import json

    from lorascope.data.describe import data_cli, format_preview
    from lorascope.data.describe import preview as data_preview

    given = {"text_field": text_field, "prompt_field": prompt_field, "response_field": response_field}
    fields = {k: v for k, v in {**given, "group_field": group_field}.items() if v is not None}
    if preview:
        if eval_limit is not None and eval_limit < 1:
            raise LorascopeError(f"--eval-limit: must be >= 1 (got {eval_limit})")
        typer.echo(format_preview(data_preview(dataset, model, regime, max_docs, eval_limit, fields=fields)))
        return
    out = data_cli(dataset, model=model, regime=regime, max_docs=max_docs, seq_len=seq_len, fields=fields)
    typer.echo(json.dumps(out, indent=2))


@app.command("eval")
@_user_errors
def eval_cmd(
    model: str = typer.Argument(..., help="embedded | hub id | local dir | run dir[:checkpoint]"),
    tasks: str = typer.Option(..., "--tasks", help="comma-separated task names"),
    out: Path = typer.Option(..., "--out"),
    limit: int | None = typer.Option(None, "--limit", help="items per task"),
    shots: int | None = typer.Option(None, "--shots", help="few-shot examples (task default if unset)"),
    samples: int | None = typer.Option(None, "--samples", help="samples per problem (code tasks)"),
    temperature: float | None = typer.Option(None, "--temperature"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(8, "--batch-size"),
    allow_code_execution: bool = typer.Option(
        False, "--allow-code-execution", help="run model-written code in the sandbox"
    ),
    reference: str | None = typer.Option(None, "--reference", help="reference model for KL (default: the base)"),
):
    """Evaluate learning and forgetting; writes OUT/results.json and OUT/samples/."""
    from lorascope.evals.api import evaluate_cli

    evaluate_cli(
        model=model,
        tasks=tasks,
        out=out,
        limit=limit,
        shots=shots,
        samples=samples,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        allow_code_execution=allow_code_execution,
        reference=reference,
    )


@app.command()
@_user_errors
def spectrum(
    run: str = typer.Argument(..., help="RUN_DIR[:CHECKPOINT], or RUN_DIR:all for every checkpoint"),
    out: Path = typer.Option(..., "--out"),
    energy: float = typer.Option(0.9, "--energy", help="spectral energy fraction in (0, 1)"),
    top_k: int = typer.Option(10, "--top-k", help="top singular vectors checked for intruders"),
    epsilon: float = typer.Option(0.5, "--epsilon", help="intruder cosine threshold"),
):
    """SVD of W_base, W_tuned and dW for every adapted matrix; writes OUT/spectrum.json."""
    from lorascope.analysis.spectrum import analyse_spectrum

    analyse_spectrum(run, out=out, energy=energy, top_k=top_k, epsilon=epsilon)


@app.command()
@_user_errors
def truncate(
    run: str = typer.Argument(..., help="RUN_DIR[:CHECKPOINT] of a full fine-tuning run"),
    ranks: str = typer.Option("16,64,256", "--ranks", help="comma-separated ranks; 'e90' = rank at 90% energy"),
    out: Path = typer.Option(..., "--out"),
):
    """Save W_base + best_rank_r(dW) models, one per rank, loadable like any model."""
    from lorascope.analysis.truncate import write_truncations

    write_truncations(run, ranks=ranks, out=out)


@app.command()
@_user_errors
def intruders(
    run: str = typer.Argument(..., help="RUN_DIR[:CHECKPOINT]"),
    out: Path = typer.Option(..., "--out"),
    scale: float = typer.Option(0.7, "--scale", help="factor applied to intruder components"),
    top_k: int = typer.Option(10, "--top-k"),
    epsilon: float = typer.Option(0.5, "--epsilon"),
):
    """Save a model whose intruder dimensions are scaled by --scale (Shuttleworth et al. mitigation)."""
    from lorascope.analysis.intruders import mitigate_cli

    mitigate_cli(run, out=out, scale=scale, top_k=top_k, epsilon=epsilon)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_user_errors
def study(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="study YAML (see configs/), or a study directory (its study.yaml)"),
    out: Path | None = typer.Option(None, "--out", help="study directory (resumed if it exists)"),
    jobs: int = typer.Option(1, "--jobs", help="runs in parallel"),
    executor: str = typer.Option("local", "--executor", help="local (subprocess per job) | ray | inline"),
    address: str | None = typer.Option(
        None, "--address", help="ray: the cluster's head (HOST:PORT); default RAY_ADDRESS, else Ray on this machine"
    ),
    resources: list[str] | None = typer.Option(
        None,
        "--resources",
        help="ray: KIND:cpus=N,gpus=N,memory=SIZE "
        "per job kind (train, eval, spectrum, truncate, eval-trunc, "
        "all); repeatable",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print runs, jobs, tokens and time; run nothing"),
    tokens_per_s: float = typer.Option(
        90.0,
        "--tokens-per-s",
        help="training speed (whole machine) the --dry-run estimate assumes (default: embedded model on 2 CPU cores)",
    ),
    eval_job_s: float = typer.Option(
        60.0, "--eval-job-s", help="seconds per evaluation job the --dry-run estimate assumes without --measure"
    ),
    measure: bool = typer.Option(
        False,
        "--measure",
        help="with --dry-run: measure the training pace of "
        "each setting x method and the eval groups' time on the base model, on "
        "this machine (loads the model; minutes)",
    ),
    resolve: bool = typer.Option(
        False,
        "--resolve",
        help="with a study directory: run the step that buys its unresolved verdicts the most precision per "
        "CPU-second (a seed, more items or more tokens), then report again; --dry-run prints the plan and cost",
    ),
    budget: str = typer.Option("2h", "--budget", help="with --resolve: the wall time the step may take at --jobs"),
):
    """Run a whole study grid: train, evaluate, analyse. Skips what is done, resumes what was interrupted."""
    config, out = _study_paths(config, out, resolve)
    if resolve:
        typer.echo(_resolve(out, budget, jobs, executor, dry_run, _executor_opts(executor, address, resources)))
        return
    if dry_run:
        from lorascope.study.config import load_study
        from lorascope.study.cost import dry_run as plan_text

        typer.echo(plan_text(load_study(config, ctx.args), tokens_per_s, eval_job_s, measure=measure, out=out))
        return
    if out is None:
        raise LorascopeError("--out: required (the study directory), unless --dry-run")
    from lorascope.study.scheduler import run_study

    opts = _executor_opts(executor, address, resources)
    run_study(config, ctx.args, out, jobs=jobs, executor=executor, executor_opts=opts)


def _study_paths(config: Path, out: Path | None, resolve: bool) -> tuple[Path, Path | None]:
    """(study file, study directory): a study directory given as CONFIG is its own output and holds its file."""
    if config.is_dir():
        if out is not None and out.resolve() != config.resolve():
            raise LorascopeError(f"--out: a study directory ({config}) is its own output")
        return config / "study.yaml", config
    if resolve:
        raise LorascopeError(f"--resolve: needs a study directory (got {config})")
    return config, out


def _resolve(d: Path, budget: str, jobs: int, executor: str, dry_run: bool, opts: dict | None) -> str:
    """--resolve: the report's planner and report writer, handed to the study's resolve (which never imports the
    report)."""
    from lorascope.report import write_report
    from lorascope.report.nextstep import load_comparisons, next_step
    from lorascope.study.resolve import parse_budget, resolve_study

    seconds = parse_budget(budget)

    def planner(d: Path, budget_s: float, jobs: int) -> dict:
        return next_step(d, load_comparisons(d), budget_s, jobs)

    return resolve_study(d, seconds, planner, write_report, jobs, executor, dry_run, opts)


def _executor_opts(executor: str, address: str | None, resources: list[str] | None) -> dict | None:
    if executor == "ray":
        from lorascope.study.raycluster import parse_resources

        return {"address": address, "resources": parse_resources(resources)}
    if address or resources:
        raise LorascopeError("--address/--resources: only with --executor ray")
    return None


@app.command()
@_user_errors
def report(study_dir: Path = typer.Argument(..., help="a study directory")):
    """Write STUDY_DIR/report.html and STUDY_DIR/results.parquet from stored results."""
    from lorascope.report import write_report

    path = write_report(study_dir)
    from lorascope.train.tracking import log_study

    log_study(study_dir)  # the study-level tracked run, when study.yaml has tracking
    typer.echo(str(path))


@app.command("export")
@_user_errors
def export_cmd(
    spec: str = typer.Argument(..., help="RUN[:CHECKPOINT] (default: the last checkpoint)"),
    out: Path = typer.Option(..., "--out", help="new directory: HF artifacts + README.md model card"),
    merged: bool = typer.Option(False, "--merged", help="LoRA merged into its base (default: the adapter)"),
):
    """An adapter or a merged model loadable by from_pretrained, with a model card; no machine-local paths."""
    from lorascope.export import export

    typer.echo(str(export(spec, out, merged=merged)))


def main() -> None:  # pragma: no cover - the console script; tests drive `app` in-process
    from lorascope.procenv import reexec_with_fast_malloc, restore_argv0

    reexec_with_fast_malloc(["-m", "lorascope.cli", *sys.argv[1:]])
    restore_argv0()
    app(prog_name="lorascope")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
