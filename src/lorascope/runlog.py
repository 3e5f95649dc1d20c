"""The run record: resolved config, environment, loss curve and summary, written beside the checkpoints.

RUN/
  config.yaml          resolved RunConfig
  meta.json            versions, hardware, seed, command, data manifest hash
  data_manifest.json   the training data's manifest (sources, licences, counts, hash, excluded eval ids)
  loss.jsonl           one line per optimizer step: step, tokens, loss, lr, grad_norm, tokens_per_s, elapsed_s
  summary.json         tokens, tokens/s, peak memory, trainable/total parameters, checkpoint size, wall time
  checkpoints/<name>/  HF artifacts + lorascope.json
  state/               resumable training state (accelerate save_state + progress.json)
  COMPLETE             written last: the run finished
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path

import torch
import yaml


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def environment() -> dict:
    import accelerate
    import peft
    import transformers

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "accelerate": accelerate.__version__, "command": " ".join(sys.argv)}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def peak_memory_bytes() -> int:
    """Peak device memory on GPU, else peak RSS of this process (Linux reports ru_maxrss in KiB)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def write_config(path: Path, cfg_dict: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    tmp.replace(path)


def read_config(path: Path) -> dict | None:
    return yaml.safe_load(path.read_text()) if path.exists() else None


def read_loss(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def truncate_loss(path: Path, last_step: int) -> None:
    """Drop loss lines after the resumed step, so a resumed curve has no duplicates."""
    rows = [r for r in read_loss(path) if r["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
