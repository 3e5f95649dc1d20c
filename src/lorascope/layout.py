"""Names in the run and study directories: the contract between training, evaluation, analysis and the report.

    checkpoint_name("tokens", 4096)  -> 'tok-000000004096'
    checkpoint_name("epoch", 2)      -> 'epoch-002'
    samples_filename("heldout_bpb:code-cpt") -> 'heldout_bpb_code-cpt.jsonl'

Torch-free on purpose: the report reads these files on machines without torch.
"""

from __future__ import annotations

CKPT_META = "lorascope.json"
"""File in every checkpoint directory: kind (full/lora), base model spec, step, tokens, budget, method, lr, seed."""


def checkpoint_name(kind: str, value: int) -> str:
    """('tokens', 4096) -> 'tok-000000004096'; ('epoch', 2) -> 'epoch-002'."""
    if kind not in ("tokens", "epoch"):
        raise ValueError(f"checkpoint kind must be 'tokens' or 'epoch' (got {kind!r})")
    return f"tok-{value:012d}" if kind == "tokens" else f"epoch-{value:03d}"


def samples_filename(task: str) -> str:
    """samples/<task>.jsonl; ':' of parametric names (heldout_bpb:code) becomes '_'."""
    return task.replace(":", "_").replace("/", "_") + ".jsonl"


def job_log_path(study_dir, job_id: str):
    """STUDY/logs/<job>.log: a study job's output (':' of job ids such as 'train:1a2b' becomes '_')."""
    from pathlib import Path

    return Path(study_dir) / "logs" / (job_id.replace(":", "_") + ".log")
