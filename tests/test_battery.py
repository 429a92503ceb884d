"""Presets, TOML configuration and flag overrides build the battery users asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from robaudit.battery import PRESETS, build_battery, override, preset_specs, read_config
from robaudit.errors import RobauditError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name: str) -> None:
    runs = build_battery(preset_specs(name))
    labels = [r.label for r in runs]
    assert len(labels) == len(set(labels)), "labels must be unique: they key the report's attacks"


def test_standard_has_autoattack_components() -> None:
    names = [r.attack.name for r in build_battery(preset_specs("standard"))]
    for needed in ("apgd-ce", "apgd-t", "square"):
        assert needed in names
    kinds = {r.attack.kind for r in build_battery(preset_specs("standard"))}
    assert "minimal" in kinds


def test_overrides_steps_restarts_and_step_sizes() -> None:
    specs = override(preset_specs("standard"), steps=7, restarts=3, step_sizes=[0.1, 0.25])
    runs = build_battery(specs)
    by_label = {r.label: r for r in runs}
    assert by_label["apgd-ce"].attack.params()["steps"] == 7
    assert by_label["apgd-ce"].restarts == 3
    assert "pgd[step=0.1eps]" in by_label and "pgd[step=0.25eps]" in by_label
    assert by_label["pgd[step=0.25eps]"].attack.params()["step_size"] == 0.25


def test_toml_config(tmp_path: Path) -> None:
    path = tmp_path / "audit.toml"
    path.write_text(
        'threats = ["linf:8/255", "l2:0.5"]\n'
        "[[attacks]]\nattack = \"apgd-ce\"\nsteps = 20\nrestarts = 2\n"
        "[[attacks]]\nattack = \"square\"\nn_queries = 100\n"
    )
    raw = read_config(path)
    runs = build_battery(raw["attacks"])
    assert [r.label for r in runs] == ["apgd-ce", "square"]
    assert runs[0].restarts == 2 and runs[1].attack.params()["n_queries"] == 100


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[[attacks]]\nattack = \"nope\"\n", "unknown attack"),
        ("[[attacks]]\nattack = \"apgd-ce\"\nbogus = 1\n", "apgd-ce"),
        ("[[attacks]]\nattack = \"apgd-ce\"\nrestarts = 0\n", "restarts"),
        ("colour = 1\n", "unknown key"),
        ("threats = \"linf:0.1\"\n", "list of strings"),
        ("this is = not toml", "not valid TOML"),
        # hunt 14: each of these ran (a negative PGD step gave robust accuracy 0.94 where 0.0 is right) or crashed
        ("[[attacks]]\nattack = \"pgd\"\nstep_size = -1\n", "step_size must be a positive finite number"),
        ("[[attacks]]\nattack = \"pgd\"\nstep_size = nan\n", "step_size must be a positive finite number"),
        ("[[attacks]]\nattack = \"pgd\"\nstep_size = inf\n", "step_size must be a positive finite number"),
        ("[[attacks]]\nattack = \"apgd-ce\"\nsteps = 2.5\n", "steps must be a positive integer"),
        ("[[attacks]]\nattack = \"apgd-ce\"\nsteps = true\n", "steps must be a positive integer"),
        ("[[attacks]]\nattack = \"apgd-ce\"\nsteps = \"10\"\n", "steps must be a positive integer"),
        ("[[attacks]]\nattack = \"square\"\nn_queries = 10.5\n", "n_queries must be a positive integer"),
        ("[[attacks]]\nattack = \"pgd\"\nrandom_init = \"yes\"\n", "random_init must be true or false"),
        ("[[attacks]]\nattack = \"apgd-ce\"\nloss = \"dlr\"\n", "loss is fixed"),
        ("[[attacks]]\nattack = \"fgsm\"\nsteps = 3\n", "unknown parameter 'steps'"),
        ("[[attacks]]\nattack = \"apgd-ce\"\nparams = {steps = 3}\n", "unknown parameter 'params'"),
        ("[[attacks]]\nattack = [\"apgd-ce\"]\n", "unknown attack"),
        ("[[attacks]]\nattack = \"apgd-ce\"\nnear = nan\n", "near must be"),
        ("attacks = [\"fgsm\"]\n", "array of tables"),
        ("[preset]\nname = \"quick\"\n", "'preset' must be a string"),
        ("preset = \"fastest\"\n", "unknown preset"),
        ("threats = []\n", "non-empty list"),
        ("[[attacks]]\nattack = \"fab-t\"\nnorms = [\"l1\", \"l1\"]\n", "each once"),
        ("[[attacks]]\nattack = \"fab-t\"\nnorms = [\"linf\"]\n", "norms it supports"),
    ],
)
def test_bad_configs_are_clear_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RobauditError, match=fragment) as info:
        build_battery(read_config(path).get("attacks", []))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["quick", "standard", "thorough"])
def test_randomized_and_adaptive_batteries_build(name: str) -> None:
    """The batteries the trust checks switch to exist for every preset and use only known attacks."""
    from robaudit.battery import ADAPTIVE, RANDOMIZED

    rand = build_battery(RANDOMIZED[name]["attacks"])
    assert [r.attack.name for r in rand] == ["apgd-ce", "apgd-dlr"] and RANDOMIZED[name]["eot"] >= 5
    adaptive = [r.attack.name for r in build_battery(ADAPTIVE[name])]
    assert {"transfer", "square", "rays", "hsj"} <= set(adaptive)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1", "spatial"])
def test_thorough_runs_every_attack_standard_runs(norm: str) -> None:
    """docs/attacks.md: `thorough` holds every attack of `standard` (FAB-T under L1 was once missing)."""
    from robaudit.battery import PRESETS
    from robaudit.threats import Threat

    threat = Threat(norm=norm, eps=1.0)
    names = {p: {r.attack.name for r in build_battery(PRESETS[p]) if r.supports(threat)} for p in ("standard", "thorough")}
    assert names["standard"] <= names["thorough"]


def test_a_broken_attack_list_is_an_error_even_where_a_preset_flag_overrides_it(tmp_path: Path) -> None:
    """Hunt 14: with --preset, the file's [[attacks]] were never read, so a broken list passed without a word."""
    from conftest import assert_one_line_error, run_cli

    path = tmp_path / "audit.toml"
    path.write_text("[[attacks]]\nattack = \"pgd\"\nstep_size = -1\n")
    result = run_cli("scan", "robaudit/demo/digits_cnn.onnx", "--data", "digits", "--n", "4", "--preset", "quick",
                     "--config", path, "--no-certify", "--no-indicator")  # fmt: skip
    assert_one_line_error(result, "step_size must be a positive finite number")


@pytest.mark.parametrize("text", [
    "attack = \"deepfool\"\nsearch_steps = 0", "attack = \"fmn\"\ngamma_final = 0.0", "attack = \"fmn\"\ngamma_final = 0",
    "attack = \"hsj\"\ninit_tries = 0", "attack = \"hsj\"\nstart_candidates = 0", "attack = \"pgd\"\nstep_size = 1",
    "attack = \"apgd-ce\"\nrho = 1", "attack = \"deepfool\"\novershoot = 0",
])  # fmt: skip
def test_valid_edge_values_are_accepted(tmp_path: Path, text: str) -> None:
    """Hunt 17: the range check first refused zeros the attacks themselves allow."""
    path = tmp_path / "ok.toml"
    path.write_text(f"[[attacks]]\n{text}\n")
    assert len(build_battery(read_config(path)["attacks"])) == 1
