"""Golden runs: a few training steps of every objective through the CLI, pinned to exact numbers.

These pin today's behaviour (per-step losses and a fingerprint of the final raw and EMA weights) so
that refactors of the loop, the objectives or the plumbing cannot change results silently. A value
here changes only with a stated reason in the commit that changes it.
"""

import json

import pytest
import torch

from onestep.cli import main

BASE = """
seed: 7
data: {data}
backbone: {backbone}
objective: {objective}
regularizers: {regularizers}
train:
  steps: 5
  batch_size: {batch}
  lr: 0.002
  ema_decay: 0.8
  log_every: 1
  checkpoint_every: 0
  grad_clip: 1.0
  num_preview: 4
"""

TOY = "{name: checkerboard}"
MLP = "{name: test_mlp}"
DIGITS = "{name: digits, conditional: true}"
DIT = "{name: test_dit}"

# name -> (data, backbone, objective, regularizers, batch, teacher?)
CASES = {
    "flow_matching": (TOY, MLP, "{name: flow_matching}", "[]", 32, False),
    "meanflow": (TOY, MLP, "{name: meanflow, ratio_r_neq_t: 0.5}", "[]", 32, False),
    "meanflow_posterior": (TOY, MLP, "{name: meanflow, velocity_estimate: batch_posterior}", "[]", 32, False),
    "meanflow_disp": (TOY, MLP, "{name: meanflow}", "[{name: dispersive, weight: 0.5, tau: 0.5}]", 32, False),
    "meanflow_cfg": (DIGITS, DIT, "{name: meanflow, cfg_omega: 1.0, cfg_kappa: 0.5}", "[]", 16, False),
    "meanflow_cfg_disp": (
        DIGITS,
        DIT,
        "{name: meanflow, cfg_omega: 0.5, cfg_kappa: 0.5, jvp_tangent: model}",
        "[{name: dispersive, weight: 0.25, blocks: [-1]}]",
        16,
        False,
    ),
    "ict": (TOY, MLP, "{name: consistency_training, total_steps: 5}", "[]", 32, False),
    "ct_ema": (TOY, MLP, "{name: consistency_training, total_steps: 5, schedule: ct, target: ema}", "[]", 32, False),
    "ect": (TOY, MLP, "{name: ect, stage_steps: 2}", "[]", 32, False),
    "cd": (TOY, MLP, "{name: consistency_distillation, teacher: TEACHER, target: ema}", "[]", 32, True),
    "meanflow_distill": (TOY, MLP, "{name: meanflow, teacher: TEACHER}", "[]", 32, True),
    "improved_meanflow": (DIGITS, "{name: test_imf_dit}", "{name: improved_meanflow}", "[]", 16, False),
    "improved_meanflow_boundary": (
        TOY,
        "{name: test_mlp, guidance_conditions: true}",
        "{name: improved_meanflow, tangent: boundary}",
        "[]",
        32,
        False,
    ),
    "scm_sct": (TOY, MLP, "{name: scm, mode: sct, tangent_warmup_steps: 3}", "[]", 32, False),
    "scm_sct_cfg": (
        DIGITS,
        DIT,
        "{name: scm, mode: sct, tangent_warmup_steps: 3, interval: t, class_dropout: 0.1}",
        "[]",
        16,
        False,
    ),
    "scm_scd": (TOY, MLP, "{name: scm, mode: scd, teacher: TEACHER, tangent_warmup_steps: 3}", "[]", 32, True),
}


def _fingerprint(weights):
    total = sum(float(v.double().sum()) for v in weights.values())
    absolute = sum(float(v.double().abs().sum()) for v in weights.values())
    return total, absolute


def run_case(name, tmp_path):
    data, backbone, objective, regs, batch, teacher = CASES[name]
    if teacher:
        teacher_run = tmp_path / "teacher"
        recipe = tmp_path / "teacher.yaml"
        recipe.write_text(
            BASE.format(data=TOY, backbone=MLP, objective="{name: flow_matching}", regularizers="[]", batch=32)
        )
        assert main(["train", str(recipe), "--run-dir", str(teacher_run), "--no-progress"]) == 0
        objective = objective.replace("TEACHER", str(teacher_run))
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(BASE.format(data=data, backbone=backbone, objective=objective, regularizers=regs, batch=batch))
    run = tmp_path / name
    assert main(["train", str(recipe), "--run-dir", str(run), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    # The objective's own parameters (sCM's learned weight head) and their EMA, where there are any.
    head = (
        (_fingerprint(state["objective_params"]), _fingerprint(state["objective_params_ema"]))
        if "objective_params" in state
        else None
    )
    return [r["loss"] for r in rows], _fingerprint(state["model"]), _fingerprint(state["ema"]), head


GOLDEN = {
    "cd": {
        "losses": [0.091934, 0.077194, 0.063809, 0.060927, 0.062026],
        "model": (-5.713891290528409, 928.5532428169172),
        "ema": (-5.993593604824127, 928.9858157317321),
    },
    "ct_ema": {
        "losses": [3.248299, 0.066081, 0.064235, 0.061974, 0.040387],
        "model": (-6.921963670494733, 928.7947478359565),
        "ema": (-6.839959732569696, 929.1019570247809),
    },
    "ect": {
        "losses": [2.188437, 1.966001, 1.977963, 2.129475, 1.105144],
        "model": (-3.7314536997728283, 930.0247617526184),
        "ema": (-5.32491141346236, 929.2370712519923),
    },
    "flow_matching": {
        "losses": [13.349351, 10.87718, 11.007111, 11.874345, 13.247083],
        "model": (-4.565736221149564, 930.4696439722902),
        "ema": (-5.73932592024903, 929.5018102370104),
    },
    "ict": {
        "losses": [1.434778, 1.484692, 1.397332, 1.196768, 1.926446],
        "model": (-3.9878614992194343, 930.5334827317565),
        "ema": (-5.444541627502986, 929.4360587045758),
    },
    "improved_meanflow": {
        "losses": [1.999815, 1.999817, 1.999807, 1.999783, 1.9998],
        "model": (525.6630342824701, 5475.016299987552),
        "ema": (526.6710528735214, 5462.368403586088),
    },
    "improved_meanflow_boundary": {
        "losses": [0.997252, 0.997828, 0.993796, 0.997333, 0.997962],
        "model": (-4.562654875466251, 1149.7115193977806),
        "ema": (-5.665276226252018, 1140.695375489838),
    },
    "meanflow": {
        "losses": [0.997238, 0.997743, 0.994581, 0.997411, 0.997877],
        "model": (-4.429590179788647, 929.390477099194),
        "ema": (-5.617699687667368, 928.9264061676803),
    },
    "meanflow_cfg": {
        "losses": [0.999907, 0.999909, 0.999903, 0.999891, 0.999898],
        "model": (10.356706697622057, 2951.0034771165137),
        "ema": (8.950520289730596, 2912.407747044675),
    },
    "meanflow_cfg_disp": {
        "losses": [0.930156, 0.918009, 0.916275, 0.916094, 0.914958],
        "model": (8.775763199282597, 2981.9528618239856),
        "ema": (8.181258312309941, 2926.789123972521),
    },
    "meanflow_disp": {
        "losses": [0.457381, 0.433016, 0.414831, 0.441152, 0.471007],
        "model": (-5.002707123217988, 931.5848786358983),
        "ema": (-5.922493114761892, 929.9263728810038),
    },
    "meanflow_distill": {
        "losses": [0.693481, 0.490823, 0.354141, 0.334011, 0.216003],
        "model": (-5.268618119473103, 929.2129219908384),
        "ema": (-6.007913011124572, 929.310979079349),
    },
    "meanflow_posterior": {
        "losses": [0.978426, 0.99631, 0.993198, 0.984616, 0.995307],
        "model": (-4.60498384044331, 929.6384388638398),
        "ema": (-5.797611367672289, 929.0788675685744),
    },
    "scm_scd": {
        "losses": [0.106941, 0.063105, 0.029901, 0.033506, 0.042285],
        "model": (-5.177948917342292, 928.646098967547),
        "ema": (-5.832282233209753, 928.9581197860803),
        "head": (0.019696475443197414, 0.09147505878354423),
        "head_ema": (0.008848393335938454, 0.04627246444579214),
    },
    "scm_sct": {
        "losses": [0.556519, 0.672702, 0.735957, 0.765332, 0.81133],
        "model": (-3.6673853647953365, 930.2028302892286),
        "ema": (-5.231350807545823, 929.3098836733188),
        "head": (-0.007563487510196865, 0.0956545373192057),
        "head_ema": (-0.005583763544564135, 0.04933637361682486),
    },
    "scm_sct_cfg": {
        "losses": [0.838278, 0.869696, 0.904617, 0.915773, 0.938928],
        "model": (5.374849697687861, 2946.750727326504),
        "ema": (7.161773992996876, 2911.121568521539),
        "head": (0.001201263687107712, 0.07751135533908382),
        "head_ema": (0.0009302641892645624, 0.03911127790797764),
    },
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_run(name, tmp_path, one_thread):
    losses, model, ema, head = run_case(name, tmp_path)
    want = GOLDEN[name]
    assert losses == pytest.approx(want["losses"], rel=1e-4, abs=1e-6)
    assert model == pytest.approx(want["model"], rel=1e-5)
    assert ema == pytest.approx(want["ema"], rel=1e-5)
    assert (head is None) == ("head" not in want)
    if head is not None:
        assert head[0] == pytest.approx(want["head"], rel=1e-5, abs=1e-9)
        assert head[1] == pytest.approx(want["head_ema"], rel=1e-5, abs=1e-9)
