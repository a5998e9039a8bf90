"""Smoke tests of the experiment scripts: tiny model, a few steps and samples, in-process.

Each script's `--smoke` mode must train, sample, measure and write `<name>.json` with finite
numbers under the expected keys, and `<name>.png`. The four share one workdir, so the eps model
trained by the parameterization experiment is reused by the sampler and variance experiments,
as in the full runs.
"""

import json
import math
import os

import pytest

from experiments import (
    classifier_guidance,
    common,
    consistency,
    controlnet,
    distillation,
    flow_matching,
    guidance,
    inpainting,
    parameterization,
    sampler_sweep,
    tables,
    variance_loss,
)

# one worker runs the whole module (pyproject: --dist loadgroup), so the runs the scripts share
# (the eps model of test_parameterization) are trained once, in the module's workdir
pytestmark = pytest.mark.xdist_group("experiments")

QUALITY = ("fd_train", "fd_test", "precision", "recall", "inception_score")
BPD = ("bpd", "bpd_stderr", "bpd_prior", "bpd_kl", "bpd_decoder")


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield obj


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    return str(root / "runs"), str(root / "out")


def _run(module, dirs):
    workdir, out = dirs
    module.main(["--smoke", "--workdir", workdir, "--out", out])
    assert os.path.getsize(os.path.join(out, f"{module.NAME}.png")) > 0
    with open(os.path.join(out, f"{module.NAME}.json")) as f:
        results = json.load(f)
    assert all(math.isfinite(x) for x in _numbers(results))
    assert results["command"].startswith(f"python3 -m experiments.{module.__name__.split('.')[-1]}")
    return results


def test_parameterization(dirs):
    results = _run(parameterization, dirs)
    assert set(results["models"]) == {"eps", "x0", "v"}
    for m in results["models"].values():
        assert set(QUALITY + BPD) <= set(m)
        assert {"ode_bpd", "ode_bpd_stderr", "ode_bpd_examples"} <= set(m)
        buckets = m["loss_by_t"]
        assert len(buckets["bucket_edges"]) == 11
        for key in ("own_mse", "eps_mse", "x0_mse"):
            assert len(buckets[key]) == 10
    assert (
        results["models"]["eps"]["run"]["num_steps"] == results["models"]["v"]["run"]["num_steps"]
    )
    assert set(results["ode_bpd_paired"]) == {"eps - v", "x0 - v"}


def test_flow_matching(dirs):
    results = _run(flow_matching, dirs)
    assert set(results["models"]) == set(flow_matching.MODELS)
    assert results["models"]["flow_uniform"]["run"]["process"] == "flow"
    assert results["models"]["v"]["run"]["process"] == "ddpm"
    for label, m in results["models"].items():
        assert set(BPD) <= set(m)
        assert ("ode_bpd" in m) == (label != "v")
    seen = {(r["model"], r["method"], r["nfe"]) for r in results["rows"]}
    flow_methods = ("ddim", "dpm++", "euler", "heun")
    assert seen == {
        (model, method, nfe)
        for model in flow_matching.MODELS
        for method in (flow_methods if model != "v" else flow_methods[:2])
        for nfe in results["nfes"]
    }
    for row in results["rows"]:
        assert set(QUALITY) <= set(row)


def test_consistency(dirs):
    results = _run(consistency, dirs)
    rows = {(r["model"], r["steps"]) for r in results["rows"]}
    assert rows == {(m, n) for m in ("ddim", "untrained", "consistency") for n in (1, 2)}
    for row in results["rows"]:
        assert set(QUALITY) <= set(row)
    d = results["distillation"]
    assert d["grid"][0] == 0 and d["train_steps"] == 2 and d["loss_curve"][-1][0] == 2


def test_controlnet(dirs):
    results = _run(controlnet, dirs)
    rows = {(r["method"], r.get("strength", r.get("scale"))) for r in results["rows"]}
    assert rows == {("unconditional", None), ("sdedit", 0.8), ("controlnet", 1.0)}  # smoke
    for row in results["rows"]:
        assert set(QUALITY) | {"class_accuracy", "l2_layout"} <= set(row)
    t = results["training"]
    assert t["train_steps"] == 2 and t["loss_curve"][-1][0] == 2


def test_inpainting(dirs):
    results = _run(inpainting, dirs)
    methods = ("intact", "hidden_as_background", "replacement", "repaint_r4")
    rows = {(r["mask"], r["method"]): r for r in results["inpainting"]}
    assert set(rows) == {("right_half", k) for k in methods}  # smoke: one mask
    for (_, method), row in rows.items():
        assert set(QUALITY) | {"class_accuracy", "mse_hidden"} <= set(row)
        assert (row["mse_hidden"] == 0) == (method == "intact")
    assert (
        rows["right_half", "repaint_r4"]["model_calls"]
        > rows["right_half", "replacement"]["model_calls"]
        == results["sample_steps"]
    )
    assert [r["strength"] for r in results["sdedit"]] == [0.5, 1.0]  # smoke
    t0 = [r["t0"] for r in results["sdedit"]]
    assert t0 == sorted(t0) and t0[-1] == results["sample_steps"] - 1  # smoke: T = 50


def test_sampler_sweep(dirs):
    results = _run(sampler_sweep, dirs)
    assert {r["sampler"] for r in results["rows"]} == set(sampler_sweep.SAMPLERS)
    for row in results["rows"]:
        assert set(QUALITY) <= set(row)
        assert row["steps"] >= 1


def test_variance_loss(dirs):
    results = _run(variance_loss, dirs)
    assert set(results["variance"]) == {"fixed_small", "fixed_large"}
    for entry in results["variance"].values():
        assert set(BPD) <= set(entry)
    assert set(results["models"]) == set(variance_loss.MODELS)
    for m in results["models"].values():
        assert set(BPD) <= set(m)
        assert set(QUALITY) <= set(m["ddim50"])


def test_guidance(dirs):
    results = _run(guidance, dirs)
    assert [r["guidance"] for r in results["rows"]] == [0.0, 3.0]
    assert [(r["guidance"], r["guidance_rescale"]) for r in results["rescaled_rows"]] == [(3, 0.7)]
    assert "| w | phi | class_accuracy |" in tables.guidance(results)  # the README's tables
    for row in results["rows"] + results["rescaled_rows"]:
        assert set(QUALITY + ("class_accuracy", "within_class_var")) <= set(row)
        assert 0.0 <= row["class_accuracy"] <= 1.0


def test_distillation(dirs):
    results = _run(distillation, dirs)
    # the teacher is the parameterization experiment's v model (same workdir, same config)
    assert results["run"]["prediction"] == "v"
    assert not results["distillation"]["student_clip_denoised"]
    assert results["distillation"]["teacher_grid"] == [49, 37, 24, 11]  # smoke: trailing, T = 50
    rows = [(r["model"], r["steps"]) for r in results["rows"]]
    assert rows == [("ddim", 4)] + [
        (model, n) for n in (2, 1) for model in ("distilled", "distilled_clipped", "ddim")
    ]
    for row in results["rows"]:
        assert set(QUALITY + ("sample_seconds",)) <= set(row)
    rounds = results["rounds"]
    assert [(r["teacher_steps"], r["student_steps"]) for r in rounds] == [(4, 2), (2, 1)]
    for r in rounds:
        assert r["steps"] == 2 and r["train_seconds"] > 0
        assert [k for k, _ in r["loss_curve"]] == [2]


def test_classifier_guidance(dirs):
    results = _run(classifier_guidance, dirs)
    # the base model is the parameterization experiment's v model (same workdir, same config)
    assert results["run"]["prediction"] == "v"
    assert [r["scale"] for r in results["rows"]] == [0.0, 4.0]
    for row in results["rows"]:
        assert set(QUALITY + ("class_accuracy", "within_class_var", "seconds")) <= set(row)
        assert 0.0 <= row["class_accuracy"] <= 1.0
    record = results["classifier"]
    assert record["steps"] == 20 and record["train_seconds"] > 0
    assert [k for k, _ in record["loss_curve"]] == [20]
    acc = record["accuracy_by_t"]
    assert acc["bucket_edges"] == [5 * b for b in range(11)]  # smoke: T = 50
    assert len(acc["accuracy"]) == len(acc["log_prob"]) == 10
    assert all(0.0 <= a <= 1.0 for a in acc["accuracy"])
    assert "within_class_var_train" in results["reference"]


def test_train_run_reuses_a_finished_workdir(dirs):
    workdir = common.run_dir(dirs[0], "param_eps", smoke=True)
    config = common.make_config({}, steps=2, smoke=True)
    info = common.train_run(workdir, config)
    assert info["reused"] and info["steps"] == 2
    # another config there would resume that run's checkpoint under new settings
    with pytest.raises(ValueError, match="holds a run of a different config"):
        common.train_run(workdir, common.make_config({}, steps=3, smoke=True))


@pytest.mark.parametrize(
    "module, flag",
    [
        (sampler_sweep, "--long-samples"),
        (variance_loss, "--long-samples"),
        (parameterization, "--num-samples"),
        (guidance, "--num-samples"),
        (distillation, "--num-samples"),
        (classifier_guidance, "--num-samples"),
    ],
)
@pytest.mark.parametrize("count", ["0", "3"])
def test_sample_counts_too_small_for_the_metrics_are_refused_before_training(
    module, flag, count, tmp_path, capsys, monkeypatch
):
    # they used to pass argparse and fail only after training and sampling: 0 with a
    # ZeroDivisionError, 1-3 in precision_recall (recall's 3-NN radii need 4 samples)
    def no_training(*args, **kwargs):
        raise AssertionError("the bad count was not refused before training")

    monkeypatch.setattr(common, "train_run", no_training)
    workdir, out = tmp_path / "runs", tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        module.main([flag, count, "--workdir", str(workdir), "--out", str(out)])
    assert err.value.code == 2
    assert f"argument {flag}: must be an int >= 4" in capsys.readouterr().err
    assert not workdir.exists() and not out.exists()
