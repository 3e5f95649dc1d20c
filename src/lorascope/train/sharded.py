"""Sharded training (FSDP2 through accelerate) on machines without a GPU, and what a sharded run saves.

``accelerate launch`` with an FSDP config sets ACCELERATE_USE_FSDP; on a CPU-only machine accelerate 1.15 then
sets up plain DDP over gloo instead (its FSDP branch is reserved for accelerator devices), although FSDP2
itself (``fully_shard``, DTensor, torch.distributed.checkpoint) runs on CPU over gloo. ``enable_cpu_fsdp``
switches the accelerator to FSDP the way accelerate does for GPUs, so the same code path and the same configs
(configs/accelerate/fsdp-*.yaml) are tested on CPU:

- parameters, gradients and optimizer state are sharded across processes (``acc.prepare(model, opt)``);
- ``acc.save_state`` / ``load_state`` write and read the sharded state (one DCP shard per process) for resume;
- a checkpoint is the full state dict, gathered by every process together (``acc.get_state_dict``) and written
  by process 0 as ordinary transformers / PEFT files (methods.save_checkpoint(state_dict=...)).
"""

from __future__ import annotations

import os

from lorascope.errors import LorascopeError
from lorascope.lifetime import die_with_parent


def die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a killed launcher (a killed study, a Ray task lost
    with its node) would leave the ranks training into the run directory a re-run then resumes. Tie each
    rank's life to the launcher's."""
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        die_with_parent()
        if os.getppid() == 1:  # the launcher died before the line above took effect
            os._exit(1)


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_plugin(precision: str):
    """The FSDP plugin for an FSDP launch (None otherwise): the launch config's FSDP_* settings, and for bf16
    the mixed-precision policy below instead of accelerate's.

    accelerate's bf16 policy also reduces gradients and casts the model's outputs to bf16: gradients summed
    over ranks lose precision as ranks grow, and the loss (computed in fp32 by transformers) comes back rounded
    to bf16's 2^-5 steps near a loss of 6. Here parameters compute in bf16, gradients are reduced in fp32
    (torchtitan's default) and outputs keep the dtype they were computed in."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    if not fsdp_requested():
        return None
    policy = None
    if precision == "bf16":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    plugin = FullyShardedDataParallelPlugin(mixed_precision_policy=policy)  # reads the FSDP_* variables
    if plugin.fsdp_version != 2:
        raise LorascopeError("fsdp_config.fsdp_version: lorascope shards with FSDP2 (fsdp_version: 2)")
    return plugin


def enable_cpu_fsdp(acc, plugin) -> None:
    """Turn a multi-process CPU accelerator that an FSDP launch config asked for into an FSDP2 one."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if plugin is None or acc.distributed_type != DistributedType.MULTI_CPU:
        return
    acc.state.fsdp_plugin = plugin
    # accelerate re-reads distributed_type from PartialState whenever an AcceleratorState is created, so set
    # both, as accelerate itself does at the end of AcceleratorState.__init__
    acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
