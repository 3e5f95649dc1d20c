"""Python source files that every machine with this project has: the CPython stdlib and installed packages.

Files are listed in sorted order and grouped by top-level package; a stable hash of the group decides the
held-out split, so whole packages are held out (a module and its near-duplicate siblings never straddle the
split).

    files = code_files()                 # [(group, path), ...], e.g. ("stdlib/email", .../email/parser.py)
    heldout = is_heldout("stdlib/email")  # True for ~10% of groups, the same on every machine
    library_cluster("sympy/solvers")      # 'sympy#solvers': clustered by subpackage, split by library

Held-out documents are recorded with ``library_cluster(group)``: the validation/test split of held-out
evaluation (lorascope.splits) then keeps one library on one side (sympy's held-out subpackages all land where
"sympy" does), while each subpackage stays its own item cluster. Each stdlib top-level package is a library.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import sysconfig
from pathlib import Path

from ..splits import cluster_key

MIN_BYTES, MAX_BYTES = 400, 150_000  # tiny files are boilerplate; huge ones are generated tables
HELDOUT_PERCENT = 10
CODE_PACKAGES = ("sympy", "mpmath", "networkx", "jinja2")


def is_heldout(key: str) -> bool:
    """Stable (not Python's salted hash) assignment of a group key to the held-out split."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def library_cluster(group: str) -> str:
    """The cluster key of a file group "<library>/<sub>": "<library>#<sub>" (lorascope.splits.cluster_key), but
    "stdlib/<package>" as it is (each stdlib package is its own library); a group without a sub is itself."""
    lib, _, sub = group.partition("/")
    return group if lib == "stdlib" else cluster_key(lib, sub or None)


def assign(item, group: str, train: list, heldout: list, groups: list, cluster: str | None = None) -> None:
    """Put `item` on the held-out side when its group is held out, recording `cluster` (default: the group) so
    held-out evaluation can cluster and split by it; else on the training side."""
    if is_heldout(group):
        heldout.append(item)
        groups.append(cluster or group)
    else:
        train.append(item)


def _is_test_path(rel: Path) -> bool:
    return any(
        p in ("test", "tests", "testing", "idle_test", "__pycache__", "site-packages") or p.startswith("test_")
        for p in rel.parts
    )


def py_files(root: Path, prefix: str | None = None) -> list[tuple[str, Path]]:
    """(group, file) for .py files under root, without tests and outside MIN_BYTES..MAX_BYTES; sorted."""
    prefix = prefix or root.name
    out = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if _is_test_path(rel):
            continue
        try:
            size = f.stat().st_size
        except OSError:
            continue
        if MIN_BYTES <= size <= MAX_BYTES:
            top = rel.parts[0][:-3] if len(rel.parts) == 1 else rel.parts[0]
            out.append((f"{prefix}/{top}", f))
    return out


def read_text(f: Path) -> str | None:
    """File text, or None for files that are not UTF-8 (a few stdlib test fixtures are deliberately not)."""
    try:
        return f.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def package_roots(names: tuple[str, ...]) -> list[Path]:
    """Directories of the installed packages among names (found without importing them)."""
    roots = []
    for n in names:
        spec = importlib.util.find_spec(n)
        if spec and spec.submodule_search_locations:
            roots.append(Path(list(spec.submodule_search_locations)[0]))
    return roots


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_files() -> list[tuple[str, Path]]:
    """The code corpus: stdlib, then CODE_PACKAGES that are installed."""
    files = py_files(stdlib_root(), "stdlib")
    for root in package_roots(CODE_PACKAGES):
        files += py_files(root)
    return files


def code_sources() -> list[dict]:
    out = [{"name": "CPython standard library", "version": sysconfig.get_python_version(), "licence": "PSF-2.0"}]
    licences = {"sympy": "BSD-3-Clause", "mpmath": "BSD-3-Clause", "networkx": "BSD-3-Clause", "jinja2": "BSD-3-Clause"}
    for root in package_roots(CODE_PACKAGES):
        out.append({"name": root.name, "version": package_version(root.name), "licence": licences[root.name]})
    return out
