"""The `jax-diffusion` command line, end to end."""

import json

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
