"""The `jax-diffusion` command line, end to end."""

import json

import pytest
from conftest import CONFIGS

from jax_diffusion import cli


def test_demo_prints_losses_close_to_their_analytic_values(capsys):
    assert cli.main(["demo", "--num-timesteps", "100", "--batch", "512"]) == 0
    report = json.loads(capsys.readouterr().out)
    for p in ("eps", "x0", "v"):
        got, want = report[f"loss_{p}"], report[f"loss_{p}_analytic_at_sampled_t"]
        assert abs(got - want) < 0.1 * want, (p, got, want)
    parts = report["bits_per_dim_parts"]
    total = parts["prior"] + parts["kl"] + parts["decoder"]
    assert abs(report["bits_per_dim"] - total) < 1e-3
    assert 0 < report["bits_per_dim"] < 16


def test_readme_example_runs():
    """The 20-line example in README.md is real code: extract and execute it."""
    import pathlib
    import re

    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    assert len(blocks) == 2, "README.md should hold the math and the sampling examples"
    import numpy as np

    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    np.testing.assert_allclose(namespace["x0_back"], namespace["x0"], atol=1e-5)
    assert np.isfinite(float(namespace["loss"]))
    assert np.all(np.isfinite(np.asarray(namespace["nll"].total_bpd)))
    exec(compile(blocks[1], "README.md", "exec"), namespace)  # continues from the first
    assert namespace["traj"].shape == (51, 8, 16, 16, 1)
    assert np.all(np.isfinite(np.asarray(namespace["x0"])))


def test_bad_values_and_missing_runs_end_as_argparse_errors(tmp_path, capsys, monkeypatch):
    """A library ValueError / FileNotFoundError: a one-line message and status 2, before work."""
    workdir = tmp_path / "run"
    train = ["train", "--config", f"{CONFIGS / 'default.py'}:smoke", "--workdir", str(workdir)]
    cases = [
        ([*train, "--set", "train.grad_clip=-1"], "train.grad_clip"),
        ([*train, "--set", "model.nope=1"], "unknown config key 'model.nope'"),
        (["sample", "--workdir", str(workdir), "--out", "g.png"], "no training run"),
        (["evaluate", "--workdir", str(workdir)], "no training run"),
    ]
    for argv, named in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"jax-diffusion {argv[0]}: error: "), err
        assert named in err and "Traceback" not in err, err
    assert not workdir.exists()  # rejected before the run directory was made
    monkeypatch.setenv("JAX_DIFFUSION_TRACEBACK", "1")  # the traceback, for debugging
    with pytest.raises(ValueError, match="train.grad_clip"):
        cli.main(cases[0][0])


def test_a_diverged_run_ends_with_its_message_and_status_1(tmp_path, capsys, monkeypatch):
    from jax_diffusion import train

    def diverge(config, workdir):  # what train_and_evaluate raises after max_bad_steps
        raise train.TrainingDiverged("3 consecutive steps had a non-finite loss")

    monkeypatch.setattr(train, "train_and_evaluate", diverge)
    argv = ["train", "--config", f"{CONFIGS / 'default.py'}:smoke", "--workdir", str(tmp_path)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err == "jax-diffusion train: 3 consecutive steps had a non-finite loss\n"
