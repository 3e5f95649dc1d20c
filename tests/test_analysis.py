"""Weight-space analysis: spectrum statistics, intruder dimensions, mitigation and rank-r truncation.

Run dirs are built here from the tiny model: a "full" checkpoint (small full-rank change everywhere, one
planted intruder, a changed embedding) and a "lora" checkpoint (peft adapter with random nonzero B).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorascope.analysis import intruders as intr
from lorascope.analysis import spectrum as sp
from lorascope.analysis import svd
from lorascope.analysis import truncate as tr
from lorascope.analysis.weights import Matrix, iter_matrices, resolve_checkpoint
from lorascope.errors import LorascopeError

LORA_R = 4
LORA_TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]
PLANTED = "model.layers.0.self_attn.q_proj"


def _orthonormal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q


def _plant_intruder(w: torch.Tensor, strength: float = 3.0) -> torch.Tensor:
    """w + c * u v^T where u (v) mixes w's 9 weakest left (right) singular vectors equally: |cos| = 1/3 with each."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    u_new, v_new = u[:, -9:].sum(1) / 3, vh[-9:].sum(0) / 3
    return (w.double() + strength * float(s[0]) * torch.outer(u_new, v_new)).float()


def _write_meta(ck: Path, kind: str, base: str, method: dict) -> None:
    ck.joinpath("lorascope.json").write_text(
        json.dumps({"kind": kind, "base": base, "tokens": 8192, "epoch": 1, "step": 4, "method": method})
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(1)
    # full FT: relative 1e-3 Gaussian change on every block linear, an intruder planted in one, embeddings moved
    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                w = mod.weight
                w.add_(torch.randn_like(w) * 1e-3 * float(w.norm()) / w.numel() ** 0.5)
                if name == PLANTED:
                    w.copy_(_plant_intruder(w))
        emb = m.get_input_embeddings().weight
        emb.add_(torch.randn_like(emb) * 1e-3)
        m.model.norm.weight.mul_(1.5)  # a non-matrix parameter: must come from the tuned model
    full = root / "full"
    ck = full / "checkpoints" / "tok-000008192"
    m.save_pretrained(ck)
    _write_meta(ck, "full", str(tiny_model_dir), {"kind": "full"})
    # LoRA: random nonzero B so dW = scale * B A is a genuine rank-r update
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    pm = get_peft_model(base, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=LORA_TARGETS))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    lora = root / "lora"
    ck = lora / "checkpoints" / "tok-000008192"
    pm.save_pretrained(ck)
    _write_meta(ck, "lora", str(tiny_model_dir), {"kind": "lora", "rank": LORA_R, "targets": LORA_TARGETS})
    return {"full": full, "lora": lora, "base": tiny_model_dir}


# ---------------------------------------------------------------------------------------------------------
# statistics


def test_rank_at_energy_recovers_planted_rank():
    n, k = 120, 7
    u, v = _orthonormal(n, 0)[:, :k], _orthonormal(n, 1)[:, :k]
    w = (u * torch.linspace(2.0, 1.0, k, dtype=torch.float64)) @ v.T
    w = (w + 1e-4 * torch.randn(n, n, dtype=torch.float64)).float()
    s = svd.singular_values(w)
    assert svd.rank_at_energy(s, 0.5) < k
    assert svd.rank_at_energy(s, 0.999) == k
    # equal planted values: 90% needs all of them (k-1 of k give only 86%)
    w_eq = (u @ v.T + 1e-4 * torch.randn(n, n, dtype=torch.float64)).float()
    assert svd.rank_at_energy(svd.singular_values(w_eq), 0.9) == k
    assert svd.numerical_rank(svd.singular_values((u @ v.T).float()), (n, n)) == k


def test_gaussian_needs_about_half_of_its_spectrum():
    g = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(0))
    frac = svd.rank_at_energy(svd.singular_values(g), 0.9) / 1000
    assert 0.49 <= frac <= 0.53


def test_stable_and_effective_rank_of_known_matrices():
    eye = torch.eye(50)
    assert svd.stable_rank(svd.singular_values(eye)) == pytest.approx(50)
    assert svd.effective_rank(svd.singular_values(eye)) == pytest.approx(50, rel=1e-6)
    one = torch.outer(torch.arange(1.0, 11), torch.ones(8))
    s1 = svd.singular_values(one)
    assert svd.stable_rank(s1) == pytest.approx(1.0, rel=1e-5)
    assert svd.effective_rank(s1) == pytest.approx(1.0, rel=1e-4)
    assert svd.numerical_rank(s1, (10, 8)) == 1
    s = svd.singular_values(torch.diag(torch.tensor([4.0, 3.0])))
    assert svd.stable_rank(s) == pytest.approx(25 / 16)
    p = torch.tensor([4 / 7, 3 / 7])
    assert svd.effective_rank(s) == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    zero = torch.zeros(5)
    assert svd.rank_at_energy(zero) == 0 and svd.stable_rank(zero) == 0 and svd.effective_rank(zero) == 0


def test_gram_path_matches_exact_svd():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(3))
    for x in (w, w.T.contiguous()):
        se, sg = svd.singular_values(x, "exact"), svd.singular_values(x, "gram")
        assert torch.allclose(se, sg, rtol=1e-4, atol=1e-5)
        assert svd.rank_at_energy(se, 0.9) == svd.rank_at_energy(sg, 0.9)
        ue, _ = svd.left_svd(x, "exact")
        ug, _ = svd.left_svd(x, "gram")
        assert ug.shape == ue.shape
        assert torch.allclose((ue[:, :10] * ug[:, :10]).sum(0).abs(), torch.ones(10), atol=1e-3)
    u, s, vh = svd.thin_svd(w.T)  # wide input goes through its transpose
    assert u.shape == (200, 200) and vh.shape == (200, 300)
    assert torch.allclose((u * s) @ vh, w.T, atol=1e-4)
    with pytest.raises(LorascopeError, match="svd method"):
        svd.singular_values(w, "fast")


# ---------------------------------------------------------------------------------------------------------
# intruders


def _planted_pair(n: int = 48):
    u, v = _orthonormal(n, 10), _orthonormal(n, 11)
    w0 = ((u * torch.linspace(10.0, 0.1, n, dtype=torch.float64)) @ v.T).float()
    return w0, _plant_intruder(w0)


def test_planted_intruder_is_found_and_small_noise_is_not():
    w0, wt = _planted_pair()
    ub, _ = svd.left_svd(w0)
    ut, _ = svd.left_svd(wt)
    idx, cos = intr.find_intruders(ub, ut, top_k=10, epsilon=0.5)
    assert idx == [0]
    assert float(cos[0]) == pytest.approx(1 / 3, abs=0.02) and float(cos[1:].min()) > 0.99
    noisy = w0 + 1e-3 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(5))
    assert intr.find_intruders(ub, svd.left_svd(noisy)[0], 10, 0.5)[0] == []
    rec, _ = sp.matrix_spectrum(Matrix("x.0.q_proj", 0, "q_proj", w0, wt), top_k=10, epsilon=0.5)
    assert rec["intruders"] == 1 and rec["intruder_indices"] == [0]


def test_mitigation_scales_exactly_the_intruder_components():
    w0, wt = _planted_pair()
    u, s, vh = torch.linalg.svd(wt, full_matrices=False)
    idx, _ = intr.find_intruders(svd.left_svd(w0)[0], u, 10, 0.5)
    w_mit = intr.scale_components(wt, u, s, vh, idx, 0.7)
    s_mit = torch.linalg.svdvals(w_mit)
    expected = s.clone()
    expected[0] *= 0.7
    assert torch.allclose(s_mit, expected.sort(descending=True).values, rtol=1e-4, atol=1e-4)
    assert torch.allclose(w_mit - wt, -0.3 * s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-4)
    assert torch.equal(intr.scale_components(wt, u, s, vh, [], 0.7), wt)


# ---------------------------------------------------------------------------------------------------------
# run checkpoints


def test_lora_checkpoint_delta_has_rank_at_most_r(runs):
    res = sp.compute_spectrum(str(runs["lora"]), progress=False)
    assert res.header["kind"] == "lora" and res.header["lora_rank"] == LORA_R
    recs = {r["name"]: r for r in res.records}
    assert len(recs) == 2 * 7  # 2 blocks x 7 linears; embeddings unchanged so not listed
    for r in recs.values():
        if r["module"] in LORA_TARGETS:
            assert r["changed"]
            assert 1 <= r["numerical_rank"]["delta"] <= LORA_R
            assert r["rank_at_energy"]["delta"] <= LORA_R
            assert r["intruders"] >= 0 and len(r["intruder_max_cos"]) == 10
            # full-rank baselines need far more than r
            assert r["baseline_rank_at_energy"]["gaussian"] > 4 * LORA_R
        else:
            assert not r["changed"] and r["numerical_rank"]["delta"] == 0 and r["intruders"] == 0
    agg = sp.aggregate(res.records, LORA_R)
    assert set(agg["by_module"]) == set(LORA_TARGETS)
    q = agg["by_module"]["q_proj"]
    assert q["n"] == 2 and q["delta_rank_over_lora_rank"] == pytest.approx(q["delta_rank_at_energy"] / LORA_R, abs=1e-3)


def test_full_checkpoint_analyse_spectrum_writes_records_and_values(runs, tmp_path):
    out = tmp_path / "spec"
    sp.analyse_spectrum(str(runs["full"]), out=out, energy=0.9, top_k=10, epsilon=0.5)
    doc, sv = sp.load_spectrum(out)
    assert doc["kind"] == "full" and doc["tokens"] == 8192 and doc["energy"] == 0.9 and "timing" in doc
    recs = {r["name"]: r for r in doc["records"]}
    assert "model.embed_tokens" in recs and recs["model.embed_tokens"]["layer"] is None
    assert "lm_head" not in recs  # tied to embed_tokens
    assert recs[PLANTED]["intruders"] == 1
    assert sum(r["intruders"] for n, r in recs.items() if n != PLANTED) == 0
    down = recs["model.layers.1.mlp.down_proj"]
    assert down["numerical_rank"]["delta"] == min(down["shape"])  # Gaussian dW: full rank
    assert 0.4 < down["rank_fraction_delta"] < 0.75
    # stored singular values are those of the actual dW
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(runs["base"]), dtype=torch.float32)
    tuned = AutoModelForCausalLM.from_pretrained(str(runs["full"] / "checkpoints" / "tok-000008192"))
    name = "model.layers.1.mlp.down_proj"
    d = tuned.get_submodule(name).weight - base.get_submodule(name).weight
    assert torch.allclose(sv[f"{name}.delta"], torch.linalg.svdvals(d.detach()), rtol=1e-3, atol=1e-7)
    assert set(doc["aggregate"]["by_layer"]) == {"0", "1", "none"}


def test_spectrum_of_all_checkpoints_writes_a_trajectory(runs, tmp_path):
    import shutil

    run = tmp_path / "two"
    src = runs["full"] / "checkpoints" / "tok-000008192"
    for tokens in (8192, 4096):  # same weights twice: the second pass reuses the cached base SVDs
        ck = run / "checkpoints" / f"tok-{tokens:09d}"
        shutil.copytree(src, ck)
        meta = json.loads((ck / "lorascope.json").read_text()) | {"tokens": tokens}
        (ck / "lorascope.json").write_text(json.dumps(meta))
    sp.analyse_spectrum(f"{run}:all", out=tmp_path / "traj", energy=0.9, top_k=10, epsilon=0.5)
    traj = json.loads((tmp_path / "traj" / "trajectory.json").read_text())
    assert [c["tokens"] for c in traj["checkpoints"]] == [4096, 8192]
    assert [c["intruders_total"] for c in traj["checkpoints"]] == [1, 1]
    a, _ = sp.load_spectrum(tmp_path / "traj" / "tok-000004096")
    b, _ = sp.load_spectrum(tmp_path / "traj" / "tok-000008192")
    assert a["records"] == b["records"] and a["tokens"] == 4096


def test_mitigate_cli_saves_loadable_model_with_scaled_intruder(runs, tmp_path):
    from lorascope.models import load_model

    out = tmp_path / "mitigated"
    intr.mitigate_cli(str(runs["full"]), out=out, scale=0.5, top_k=10, epsilon=0.5)
    rep = intr.load_report(out)
    assert rep["intruders_total"] == 1 and rep["matrices"][PLANTED]["intruders"] == [0]
    model, _ = load_model(str(out))
    tuned, _ = load_model(str(runs["full"]))
    wt = tuned.get_submodule(PLANTED).weight.detach()
    u, s, vh = torch.linalg.svd(wt, full_matrices=False)
    assert torch.allclose(model.get_submodule(PLANTED).weight, wt - 0.5 * s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5)
    other = "model.layers.1.self_attn.q_proj"
    assert torch.equal(model.get_submodule(other).weight, tuned.get_submodule(other).weight)


def test_truncation_round_trip(runs, tmp_path, tiny_model_dir):
    from lorascope.models import load_model

    written = tr.write_truncations(str(runs["full"]), ranks="4,e90", out=tmp_path / "trunc")
    assert [p.name for p in written] == ["r4", "re90"]
    model, tok = load_model(str(tmp_path / "trunc" / "r4"))
    base, _ = load_model(str(tiny_model_dir))
    tuned, _ = load_model(str(runs["full"]))
    info = json.loads((tmp_path / "trunc" / "r4" / "truncation.json").read_text())["matrices"]
    for name in ("model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.k_proj", "model.embed_tokens"):
        wb = base.get_submodule(name).weight.detach()
        d = tuned.get_submodule(name).weight.detach() - wb
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        assert torch.allclose(model.get_submodule(name).weight, wb + (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)
        tail = float((s[4:] ** 2).sum() / (s**2).sum()) ** 0.5
        assert info[name]["rank"] == 4 and info[name]["rel_frobenius_error"] == pytest.approx(tail, abs=1e-4)
    assert torch.equal(model.model.norm.weight, tuned.model.norm.weight)  # non-matrix params: from tuned
    assert not torch.equal(model.model.norm.weight, base.model.norm.weight)
    ids = tok("def f(x):", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    e90 = json.loads((tmp_path / "trunc" / "re90" / "truncation.json").read_text())["matrices"]
    assert all(v["rel_frobenius_error"] <= 0.3163 for v in e90.values())  # sqrt(0.1)
    assert e90["model.layers.1.mlp.down_proj"]["rank"] > 4


def test_iter_matrices_lists_every_block_linear(runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    mats = list(iter_matrices(base, base))
    assert len(mats) == 14 and not any(m.changed for m in mats)
    assert {m.module for m in mats} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ---------------------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_problem(runs, tmp_path):
    with pytest.raises(LorascopeError, match="energy"):
        sp.analyse_spectrum(str(runs["lora"]), out=tmp_path / "x", energy=1.0, top_k=10, epsilon=0.5)
    with pytest.raises(LorascopeError, match="energy"):
        sp.compute_spectrum(str(runs["lora"]), energy=0.0)
    with pytest.raises(LorascopeError, match="epsilon"):
        intr.mitigate_cli(str(runs["lora"]), out=tmp_path / "x", scale=0.7, top_k=10, epsilon=1.5)
    with pytest.raises(LorascopeError, match="'nope' does not exist"):
        resolve_checkpoint(f"{runs['lora']}:nope")
    with pytest.raises(LorascopeError, match="not a run directory"):
        resolve_checkpoint(str(tmp_path))
    bad = tmp_path / "bad" / "checkpoints" / "c1"
    bad.mkdir(parents=True)
    (bad / "lorascope.json").write_text(json.dumps({"kind": "full"}))
    with pytest.raises(LorascopeError, match="no 'base'"):
        resolve_checkpoint(str(tmp_path / "bad"))
    (bad / "lorascope.json").write_text("{not json")
    with pytest.raises(LorascopeError, match="unreadable"):
        resolve_checkpoint(str(tmp_path / "bad"))
    for bad_ranks in ("0", "abc", "e100", ""):
        with pytest.raises(LorascopeError, match="ranks"):
            tr.parse_ranks(bad_ranks)
    assert tr.parse_ranks("16, 64,e90") == [16, 64, 0.9]


def test_cli_reports_user_error(runs, tmp_path):
    from typer.testing import CliRunner

    from lorascope.cli import app

    res = CliRunner().invoke(app, ["spectrum", f"{runs['lora']}:missing", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "error:" in res.output and "missing" in res.output
    res = CliRunner().invoke(app, ["truncate", str(runs["lora"]), "--ranks", "x", "--out", str(tmp_path / "t")])
    assert res.exit_code == 2 and "ranks" in res.output
    res = CliRunner().invoke(app, ["spectrum", str(runs["lora"]), "--out", str(tmp_path / "ok"), "--energy", "0.8"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ok" / "spectrum.json").read_text())["energy"] == 0.8
    assert "q_proj" in res.output and "x r" in res.output  # summary: rank as a multiple of the LoRA rank


# ---------------------------------------------------------------------------------------------------------
# integration: the real embedded model, 8,192 tokens of code CPT, full FT vs LoRA r=16


@pytest.mark.integration
def test_embedded_full_vs_lora_spectrum(tmp_path):
    from lorascope.config import RunConfig
    from lorascope.train.loop import train

    docs = {}
    for method, lr in (({"kind": "full"}, 2e-5), ({"kind": "lora", "rank": 16, "targets": "all"}, 2e-4)):
        cfg = RunConfig.model_validate(
            {
                "model": "embedded",
                "method": method,
                "data": {"dataset": "code-cpt"},
                "train": {"lr": lr, "max_tokens": 8192},
            }
        )
        run = tmp_path / method["kind"]
        train(cfg, run)
        sp.analyse_spectrum(str(run), out=tmp_path / f"spec-{method['kind']}", energy=0.9, top_k=10, epsilon=0.5)
        docs[method["kind"]], _ = sp.load_spectrum(tmp_path / f"spec-{method['kind']}")
    for kind, doc in docs.items():  # shown with -s: the numbers for the report
        print(f"\n{kind}: {doc['changed_matrices']}/{doc['matrices']} changed, timing {doc['timing']}")
        for group in ("by_module", "by_layer"):
            for key, row in doc["aggregate"][group].items():
                print(
                    f"  {group[3:]:6s} {key:14s} rank@90 dW {row['delta_rank_at_energy']:8.1f} "
                    f"(gaussian {row['gaussian_rank_at_energy']}, base+noise {row['base_plus_noise_rank_at_energy']},"
                    f" base {row['base_rank_at_energy']}) intruders {row['intruders_total']}"
                )
    lora = [r for r in docs["lora"]["records"] if r["changed"]]
    full = [r for r in docs["full"]["records"] if r["changed"]]
    assert len(lora) == 210 and all(r["numerical_rank"]["delta"] <= 16 for r in lora)
    assert len(full) >= 210
    mean_full = sum(r["rank_at_energy"]["delta"] for r in full) / len(full)
    assert mean_full > 16  # full-FT dW is far from LoRA's rank
