"""Config loading, overrides and one-line errors; every shipped recipe validates."""

import pytest

from onestep.config import REPO_RECIPES, apply_overrides, from_dict, load_config, load_yaml
from onestep.registry import BACKBONES, ConfigError, Registry

RECIPES = sorted(REPO_RECIPES.glob("*.yaml"))


def base():
    return {"data": {"name": "checkerboard"}, "backbone": {"name": "test_mlp"}, "objective": {"name": "meanflow"}}


def test_defaults_filled():
    cfg = from_dict(base())
    assert cfg.train.betas == (0.9, 0.95) and cfg.eval.nfe == [1] and cfg.seed == 0


def test_overrides_nested_and_lists():
    raw = {**base(), "regularizers": [{"name": "x", "weight": 1.0}]}
    out = apply_overrides(
        raw,
        [
            "train.steps=7",
            "objective.name=flow_matching",
            "regularizers.0.weight=0.5",
            "train.betas=[0.9, 0.99]",
            "train.grad_clip=null",
        ],
    )
    assert out["train"]["steps"] == 7 and out["objective"]["name"] == "flow_matching"
    assert out["regularizers"][0]["weight"] == 0.5 and out["train"]["betas"] == [0.9, 0.99]
    assert out["train"]["grad_clip"] is None
    assert raw["regularizers"][0]["weight"] == 1.0  # input untouched


@pytest.mark.parametrize(
    "raw, pattern",
    [
        ({"train": {"stepz": 3}}, r"train: unknown key 'stepz'; allowed: steps, batch_size"),
        ({"train": {"steps": "many"}}, r"train.steps must be int, got str"),
        ({"train": {"lr": -1.0}}, r"train.lr must be > 0"),
        ({"train": {"optimizer": "lion"}}, r"train.optimizer must be one of 'adam', 'adamw', 'sgd', got str 'lion'"),
        (
            {"backbone": {"name": "dit_xl_3"}},
            r"unknown backbone 'dit_xl_3' \(did you mean 'dit_xl_2'\?\); known: .*dit_b_2",
        ),
        ({"backbone": {"name": "test_mlp", "widht": 3}}, r"backbone 'test_mlp': unknown key 'widht'; allowed: "),
        (
            {"objective": {"name": "meanflow", "ratio_r_neq_t": "a"}},
            r"objective 'meanflow': key 'ratio_r_neq_t' must be float",
        ),
        ({"eval": {"metrics": ["fidd"]}}, r"unknown metric 'fidd'"),
        ({"extra": 1}, r"unknown section 'extra'; allowed: data, backbone"),
    ],
)
def test_errors_are_one_line_and_list_choices(raw, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        from_dict({**base(), **raw})
    assert "\n" not in str(info.value)


def test_override_errors():
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_overrides(base(), ["train.steps"])
    with pytest.raises(ConfigError, match="out of range; the list has 0 entries"):
        apply_overrides({**base(), "regularizers": []}, ["regularizers.0.weight=1"])


def test_registry_duplicates_and_unknown():
    reg = Registry("thing")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(lambda: 2)
    assert "dit_b_2" in BACKBONES.names()


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="recipe 'nope' not found"):
        load_config("nope")


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    for needed in [
        "toy_meanflow",
        "toy_flow_matching",
        "digits_meanflow",
        "meanflow_b2",
        "meanflow_b4",
        "meanflow_m2",
        "meanflow_l2",
        "meanflow_xl2",
    ]:
        assert needed in names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.train.steps >= 1


def test_lr_schedule():
    import math

    from onestep.train.loop import lr_at

    assert [lr_at(s, 1.0, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(4, 1.0, 4, "cosine", 104) == 1.0
    assert math.isclose(lr_at(54, 1.0, 4, "cosine", 104), 0.5)
    assert lr_at(104, 1.0, 4, "cosine", 104) == 0.0


def test_floats_the_way_people_write_them(tmp_path):
    """YAML 1.1 reads 1e-4 as a string; recipes and overrides read it as a float."""
    from onestep.config import apply_overrides, load_yaml

    path = tmp_path / "r.yaml"
    path.write_text(
        "data: {name: checkerboard}\nbackbone: {name: test_mlp}\nobjective: {name: flow_matching}\n"
        "train: {lr: 1e-4, weight_decay: 3E-5}\n"
    )
    raw = load_yaml(path)
    assert raw["train"]["lr"] == 1e-4 and raw["train"]["weight_decay"] == 3e-5
    raw = apply_overrides(raw, ["train.lr=1e30", "train.betas=[9e-1, .95]", "train.device=cpu"])
    cfg = from_dict(raw)
    assert cfg.train.lr == 1e30 and cfg.train.betas == (0.9, 0.95) and cfg.train.device == "cpu"


def test_strings_that_read_as_floats_survive_a_round_trip():
    """What onestep writes (config.yaml, exports) it reads back unchanged: a string that the YAML 1.2
    float pattern would take for a number (a git commit such as 8e70025, the text "1e-4") is quoted."""
    from onestep.utils import yamlio

    data = {"commit": "8e70025", "text": "1e-4", "upper": "1E5", "dot": ".5", "lr": 1e-4, "big": 1e30, "n": 5}
    text = yamlio.safe_dump(data)
    assert yamlio.safe_load(text) == data
    assert "'8e70025'" in text and "lr: 0.0001" in text


def test_validate_builds_components_so_range_errors_are_one_line(capsys):
    from onestep.cli import main

    assert main(["validate", "toy_meanflow", "objective.adaptive_p=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "objective 'meanflow': adaptive_p must be in [0, inf)" in err
    assert main(["validate", "toy_meanflow", "train.lr=1e-4"]) == 0
    assert main(["validate", "toy_meanflow", "regularizers=[{name: dispersive, tau: -1}]"]) == 2
    assert "tau" in capsys.readouterr().err
    assert main(["validate", "toy_meanflow", "backbone.width=0"]) == 2
    assert "backbone 'mlp_toy'" in capsys.readouterr().err
    assert main(["validate", "toy_meanflow", "eval.metrics=[{name: sliced_wasserstein, num_projections: 0}]"]) == 2
    assert "num_projections" in capsys.readouterr().err
    # Metric options from recipes reach the metric.
    assert main(["validate", "toy_meanflow", "eval.metrics=[energy_distance, {name: mmd_rbf, bandwidth: 0.5}]"]) == 0
