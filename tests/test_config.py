import pytest

from lorascope.config import MethodConfig, RunConfig, apply_overrides, load_run_config, validate
from lorascope.errors import ConfigError


def test_overrides_parse_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method:\n  kind: lora\n  rank: 8\ntrain:\n  lr: 1e-4\n")
    cfg = load_run_config(
        p, ["method.rank=64", "train.lr=3e-4", "method.targets=[q_proj,v_proj]", "method.use_dora=true"]
    )
    assert cfg.method.rank == 64 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.method.target_modules == ["q_proj", "v_proj"] and cfg.method.use_dora is True


@pytest.mark.parametrize(
    "override,field",
    [
        ("method.rank=0", "method.rank"),
        ("train.lr=-1e-4", "train.lr"),
        ("method.targets=qkv", "method.targets"),
        ("method.colour=red", "method.colour"),
        ("train.checkpoints=[4096,2048]", "train.checkpoints"),
    ],
)
def test_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, [override])
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_alpha_rules_and_presets():
    m = MethodConfig(rank=16)
    assert m.lora_alpha == 32.0
    assert MethodConfig(rank=256, alpha=32).lora_alpha == 32.0
    assert "gate_proj" not in MethodConfig(targets="all-v1").target_modules
    assert len(MethodConfig(targets="all").target_modules) == 7
    assert MethodConfig(kind="full").label() == "full"
    assert MethodConfig(rank=64, init="pissa", use_dora=True).label() == "lora-r64-all-pissa-dora"


def test_regime_inferred():
    assert RunConfig(data={"dataset": "math-ift"}).data.regime == "ift"
    assert RunConfig(data={"dataset": "code-cpt"}).data.regime == "cpt"


def test_bad_override_syntax():
    with pytest.raises(ConfigError):
        apply_overrides({}, ["method.rank"])
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_run_config("nope.yaml")
    with pytest.raises(ConfigError, match="train"):
        validate(RunConfig, {"train": {"max_tokens": None, "epochs": None}})


def test_errors_name_the_file_and_the_field(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("method:\n  rank: 0\ntrain:\n  colour: red\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    assert str(e.value) == f"{p}: method.rank: must be >= 1 (got 0); train.colour: unknown field"


def test_overrides_walk_lists_by_index_and_star():
    d = {"a": [{"b": 1}, {"b": 2}], "c": {"d": 1}}
    apply_overrides(d, ["a.*.b=5", "a.0.e=x", "c.d=2", "f.g=[1, 2]"])
    assert d == {"a": [{"b": 5, "e": "x"}, {"b": 5}], "c": {"d": 2}, "f": {"g": [1, 2]}}
    with pytest.raises(ConfigError, match=r"a.2.b: '2' is not an index of a \(0..1 or \*\)"):
        apply_overrides(d, ["a.2.b=1"])
    with pytest.raises(ConfigError, match=r"c.d.e: 'd' is not a section"):
        apply_overrides(d, ["c.d.e=1"])


def test_every_study_preset_finds_its_lrs_or_says_why_it_pins_them():
    """A variant compared at someone else's LR is a comparison of LRs: presets search (`lrs: auto`) unless
    their header says why they pin LRs. Fails for a preset whose method carries a bare LR list."""
    from pathlib import Path

    import yaml

    from lorascope.study.config import AutoLR, load_study

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict) or "methods" not in raw:
            continue  # a run config, not a study
        if "# LRs pinned:" in path.read_text():
            continue
        study = load_study(path)
        pinned = [m.name for m in study.methods if not isinstance(m.lrs, AutoLR)]
        assert not pinned, f"{path.name}: {pinned} pin their LRs without a '# LRs pinned:' reason"
