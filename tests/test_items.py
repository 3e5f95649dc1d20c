"""Item design of held-out evaluation: nested, cluster-balanced window selection; one library on one side of the
validation/test split; user data grouped by data.group_field; Kish's effective cluster count."""

from __future__ import annotations

import collections
import json
import math

import pytest

import lorascope.data as data
from lorascope.config import DataConfig
from lorascope.data.files import library_cluster
from lorascope.data.user import user_docs
from lorascope.errors import LorascopeError
from lorascope.evals.texts import heldout_windows
from lorascope.splits import cluster_key, effective_clusters, split_of, split_unit

SIZE = 200  # window characters: small documents give many windows


def _doc(tag: str, windows: int) -> str:
    line = f"x_{tag} = {tag!r}  # padding to a full line of code\n"
    return line * (windows * SIZE // len(line))


def _pool(monkeypatch, sizes: dict[str, list[int]]) -> None:
    """Held-out documents: per cluster group, documents of about the given numbers of windows."""
    docs, groups = [], []
    for group, wins in sizes.items():
        for i, n in enumerate(wins):
            docs.append(_doc(f"{group}{i}", n))
            groups.append(group)
    monkeypatch.setattr(data, "heldout_texts", lambda name, limit=None: docs)
    monkeypatch.setattr(data, "heldout_groups", lambda name: groups)


def _counts(wins: list[dict]) -> collections.Counter:
    return collections.Counter(w["cluster"] for w in wins)


# a big package crowding small ones, as sympy's subpackages did; groups split by library ("lib#sub")
PLANTED = {
    "sympy#solvers": [40, 40, 40, 40, 40],
    "sympy#core": [30, 30],
    **{f"stdlib/m{i}": [2 + i] for i in range(12)},
    "jinja2#runtime": [6],
}


def test_a_larger_limit_is_a_superset_on_both_splits(monkeypatch):
    _pool(monkeypatch, PLANTED)
    small, large = heldout_windows("d", 64, size=SIZE), heldout_windows("d", 128, size=SIZE)
    assert len(small) == 64 and len(large) == 128
    assert small == large[:64]  # the first 64 of the same order
    for split in ("validation", "test"):
        ids = [{w["id"] for w in ws if split_of(w["cluster"]) == split} for ws in (small, large)]
        assert ids[0] and ids[0] < ids[1]


@pytest.mark.parametrize("limit", [5, 16, 40, 64, 100])
def test_no_cluster_takes_more_while_another_of_its_split_has_room(monkeypatch, limit):
    _pool(monkeypatch, PLANTED)
    size = _counts(heldout_windows("d", size=SIZE))
    got = _counts(heldout_windows("d", limit, size=SIZE))
    by_split = {sp: [c for c in size if split_of(c) == sp] for sp in ("validation", "test")}
    assert all(by_split.values())  # the planted pool has clusters on both sides
    n = {sp: sum(got[c] for c in cs) for sp, cs in by_split.items()}
    full = {sp: n[sp] == sum(size[c] for c in cs) for sp, cs in by_split.items()}
    assert abs(n["validation"] - n["test"]) <= 1 or any(full.values())  # half a limit each, while both can
    for cs in by_split.values():
        room = [c for c in cs if got[c] < size[c]]  # clusters that could still give a window
        assert all(got[c] <= got[r] + 1 for c in cs for r in room)
        if all(size[c] >= math.ceil(limit / 2 / len(cs)) for c in cs) and not any(full.values()):
            assert max(got[c] for c in cs) <= math.ceil(limit / 2 / len(cs))


def test_a_limit_below_the_cluster_count_samples_both_splits(monkeypatch):
    """Records held out one by one: many one-window clusters. The order must not follow the split's own hash
    (sorting by it would fill a limit from one side)."""
    docs = [f"record_{i} = {i}\n" * 3 for i in range(400)]
    monkeypatch.setattr(data, "heldout_texts", lambda name, limit=None: docs)
    monkeypatch.setattr(data, "heldout_groups", lambda name: [None] * len(docs))
    splits = collections.Counter(split_of(w["cluster"]) for w in heldout_windows("d", 40))
    assert 10 <= splits["validation"] <= 30 and splits["validation"] + splits["test"] == 40


def test_windows_of_a_cluster_spread_over_its_documents(monkeypatch):
    _pool(monkeypatch, {"sympy#solvers": [40, 40, 40, 40, 40], "stdlib/a": [3]})
    wins = heldout_windows("d", 12, size=SIZE)
    solvers = [w["id"].split("@")[0] for w in wins if w["cluster"] == "heldout/sympy#solvers"]
    assert len(solvers) >= 8 and len(set(solvers[:5])) == 5  # one window of each file before a second of any


def test_balanced_selection_has_many_effective_clusters_where_the_pool_has_few(monkeypatch):
    _pool(monkeypatch, PLANTED)
    pool = _counts(heldout_windows("d", size=SIZE))
    assert effective_clusters(pool.values()) < 3  # two sympy subpackages hold most windows
    picked = _counts(heldout_windows("d", 48, size=SIZE))
    assert effective_clusters(picked.values()) > 0.9 * len(pool)  # 16 clusters, 3 windows each


def test_kish_effective_clusters():
    assert effective_clusters([19, 1, 1, 1, 1]) == pytest.approx(23**2 / 365)  # 1.4: one package dominates
    assert effective_clusters([4] * 7) == pytest.approx(7)
    assert effective_clusters([5, 5, 0]) == pytest.approx(2) and effective_clusters([]) == 0
    assert effective_clusters([10, 1]) < effective_clusters([6, 5]) < 2


def test_one_library_sits_on_one_side():
    subs = [library_cluster(f"sympy/{s}") for s in ("core", "solvers", "simplify", "core/basic.py", "this")]
    assert len(set(subs)) == len(subs)  # each subpackage (or file) its own cluster ...
    assert {split_of(f"heldout/{c}") for c in subs} == {split_of("heldout/sympy")}  # ... on the library's side
    # every stdlib top-level package is a library of its own: stdlib packages land on both sides
    stdlib = [library_cluster(f"stdlib/m{i}") for i in range(40)]
    assert stdlib == [f"stdlib/m{i}" for i in range(40)]
    assert {split_of(f"heldout/{c}") for c in stdlib} == {"validation", "test"}
    assert library_cluster("jinja2") == "jinja2" and split_unit("heldout/jinja2#runtime") == "heldout/jinja2"


def test_split_unit_is_the_key_before_the_separator():
    keys = [f"lib{i}" for i in range(40)]
    assert all(split_of(f"{k}#a") == split_of(f"{k}#b/c.py") == split_of(k) for k in keys)
    assert {split_of(k) for k in keys} == {"validation", "test"}
    # a user's group named with a '#' stays one unit of its own, not the unit before the '#'
    assert split_unit(cluster_key("team#1")) == cluster_key("team#1") != "team"
    assert cluster_key("sympy", "core") == "sympy#core" and cluster_key("x") == "x"


def _grouped_rows(n_groups: int = 30, per: int = 4) -> list[dict]:
    return [
        {"text": f"def f_{g}_{k}(x):\n    return x * {g} + {k}\n" * 3, "repo": f"org/repo-{g}"}
        for g in range(n_groups)
        for k in range(per)
    ]


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_group_field_holds_out_whole_groups(tmp_path):
    rows = _grouped_rows()
    dc = DataConfig(dataset=_jsonl(tmp_path / "g.jsonl", rows), group_field="repo")
    train, held, _, groups = user_docs(dc)
    repo = {r["text"]: r["repo"] for r in rows}
    held_repos = {repo[d] for d in held}
    assert len(held_repos) == 3 and len(held) == 12  # a tenth of 30 groups, all 4 records of each
    assert not held_repos & {repo[d] for d in train}
    assert groups == [repo[d] for d in held]
    # a dozen groups still hold one out (a hash threshold alone often holds out none)
    dozen = DataConfig(dataset=_jsonl(tmp_path / "d.jsonl", _grouped_rows(12)), group_field="repo")
    assert len({g for g in user_docs(dozen)[3]}) == 2


def test_group_field_clusters_and_splits_windows_by_group(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(data, "_REGISTERED", {})
    rows = _grouped_rows(60, 3)
    dc = DataConfig(dataset=_jsonl(tmp_path / "g.jsonl", rows), group_field="repo", max_docs=170)
    repo = {r["text"]: r["repo"] for r in rows}
    by_record = {w["cluster"] for w in heldout_windows(dc.dataset)}  # the name alone: records held out
    data.register([dc])  # what a study's eval job does with its settings
    wins = heldout_windows(dc.dataset)
    texts = data.heldout_texts(dc.dataset)
    assert len({repo[t] for t in texts}) == 6 and len(wins) == len(texts) == 18  # 6 whole groups, no cap
    assert {w["cluster"] for w in wins} == {f"heldout/{repo[t]}" for t in texts} != by_record
    assert {split_of(w["cluster"]) for w in wins} == {"validation", "test"}  # groups, not one block
    with pytest.raises(LorascopeError, match="^data: .*two configurations"):
        data.register([dc, dc.model_copy(update={"group_field": None})])


def test_without_group_field_each_record_is_its_own_cluster(tmp_path):
    rows = _grouped_rows()
    train, held, _, groups = user_docs(DataConfig(dataset=_jsonl(tmp_path / "g.jsonl", rows)))
    repo = {r["text"]: r["repo"] for r in rows}
    assert groups == [None] * len(held) and held
    # records are held out one by one, so a repository's records straddle the held-out split
    assert {repo[d] for d in held} & {repo[d] for d in train}
    assert data.clusters_of(DataConfig(dataset="g.jsonl")) == "record"
    assert data.clusters_of(DataConfig(dataset="g.jsonl", group_field="repo")) == "group"
    assert data.clusters_of(DataConfig(dataset="code-cpt")) == "source"


def test_a_record_without_the_group_field_is_a_one_line_error(tmp_path):
    rows = _grouped_rows(12)
    rows[5] = {"text": rows[5]["text"]}
    dc = DataConfig(dataset=_jsonl(tmp_path / "g.jsonl", rows), group_field="repo")
    with pytest.raises(LorascopeError, match=r"^data\.group_field: .*record 6 has no field 'repo'") as e:
        user_docs(dc)
    assert "\n" not in str(e.value)
    with pytest.raises(LorascopeError, match=r"^data\.group_field: 'code-cpt' groups its documents itself"):
        data.load_docs(DataConfig(dataset="code-cpt", group_field="repo"))


def test_manifest_records_how_items_are_clustered(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path / "cache")
    path = _jsonl(tmp_path / "g.jsonl", _grouped_rows())
    grouped = data.dataset_manifest(DataConfig(dataset=path, group_field="repo"), tokenizer)
    plain = data.dataset_manifest(DataConfig(dataset=path), tokenizer)
    assert (grouped["clusters"], grouped["group_field"]) == ("group", "repo")
    assert (plain["clusters"], plain["group_field"]) == ("record", None)
    assert grouped["documents"]["heldout"] == 12 != plain["documents"]["heldout"]  # one cache entry each


@pytest.mark.integration
def test_quick_test_split_has_8_effective_clusters():
    """The real code-cpt pool at quick's design (64 windows): Kish >= 8 on the test split, nested at 128."""
    small, large = heldout_windows("code-cpt", 64), heldout_windows("code-cpt", 128)
    assert small == large[:64]
    for wins in (small, large):
        test = _counts([w for w in wins if split_of(w["cluster"]) == "test"])
        assert effective_clusters(test.values()) >= 8
        units = collections.defaultdict(set)
        for w in wins:
            units[split_unit(w["cluster"])].add(split_of(w["cluster"]))
        assert units["heldout/sympy"] and all(len(s) == 1 for s in units.values())
