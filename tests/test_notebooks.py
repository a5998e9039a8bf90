"""The Colab notebooks run top to bottom in smoke mode on CPU and show what they claim.

Each notebook is executed with nbclient in a fresh kernel whose environment sets
JAX_DIFFUSION_SMOKE=1 (tiny shapes), JAX_PLATFORMS=cpu, and a temporary working directory and
TMPDIR, so nothing is written into the repository. The assertions read the executed outputs:
the printed numbers and the PNG images the cells display.
"""

import base64
import io
import os
import pathlib
import re
import subprocess
import sys

import jax
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = (
    "flow_matching.ipynb",
    "parameterizations.ipynb",
    "pretrained.ipynb",
    "quickstart.ipynb",
    "tpu_training.ipynb",
)


def execute(name, tmp_path, monkeypatch):
    """Runs colab/<name> in a new kernel (smoke mode, CPU, cwd tmp_path); returns the notebook."""
    monkeypatch.setenv("JAX_DIFFUSION_SMOKE", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # The suite's XLA_FLAGS (8 fake CPU devices) stay: on the same devices the notebooks' smoke
    # runs compile the programs of test_cli's and test_train's smoke runs, which the persistent
    # cache below then shares (whichever runs first compiles).
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' tempfile workdirs
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)  # the package and experiments/ without an install
    # the suite's persistent compilation cache, for every program: the kernels also share the
    # many small eager-op programs (~0.05 s each)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    nb = nbformat.read(COLAB / name, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    return nb


def stdout(nb) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "stream" and out.name == "stdout"
    )


def images(nb) -> list[np.ndarray]:
    """The PNG images the notebook displayed, decoded."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if out.output_type in ("display_data", "execute_result") and png:
                found.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))))
    return found


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the notebook output:\n{text[-3000:]}"
    return float(match.group(1))


def test_quickstart_trains_and_shows_ddim_samples(tmp_path, monkeypatch):
    nb = execute("quickstart.ipynb", tmp_path, monkeypatch)
    out = stdout(nb)
    assert "smoke mode" in out
    assert number(r"trained to step (\d+)", out) == 2  # the smoke variant's train.num_steps
    assert np.isfinite(number(r"final loss: (\S+)", out))
    match = re.search(r"samples: \((\d+), 8, 8, 1\), range \[(\S+), (\S+)\]", out)
    assert match, out[-2000:]
    assert int(match.group(1)) == 8
    assert -1.0 <= float(match.group(2)) <= float(match.group(3)) <= 1.0  # clip_denoised
    shown = images(nb)
    assert len(shown) == 3  # the data, the samples, the trajectory
    # 8 samples, 8x8 digits scaled 4x with 2-pixel padding: a 3x3 grid of 32-pixel tiles
    assert shown[1].shape == (3 * 34 + 2, 3 * 34 + 2)
    assert shown[1].std() > 0
    workdirs = list(tmp_path.glob("quickstart_*"))
    assert len(workdirs) == 1 and (workdirs[0] / "config.json").is_file()
    assert (workdirs[0] / "checkpoints" / "2").is_dir()


def test_pretrained_loads_the_diffusers_folder_and_samples(tmp_path, monkeypatch):
    nb = execute("pretrained.ipynb", tmp_path, monkeypatch)
    out = stdout(nb)
    assert "smoke mode" in out
    # the stand-in folder as the Hub lays it out, and every weight of the fixture loaded
    assert "'config.json', 'diffusion_pytorch_model.safetensors', 'scheduler_config.json'" in out
    fixture = np.load(ROOT / "tests" / "fixtures" / "diffusers_unet_cifar10.npz")
    want = sum(fixture[k].size for k in fixture.files if k.startswith("sd/"))
    assert number(r"parameters: ([\d,]+)\n", out.replace(",", "")) == want
    assert "'downsample_padding': 'same'" in out and "'time_freq_shift': 1.0" in out
    assert "'prediction': 'eps'" in out and "'clip_denoised': True" in out
    runs = re.findall(
        r"(DDIM-3|DPM-Solver\+\+\(2M\)-3): 8 images \(32, 32, 3\), .*range "
        r"\[(\S+), (\S+)\]",
        out,
    )
    assert [r[0] for r in runs] == ["DDIM-3", "DPM-Solver++(2M)-3"], out[-2000:]
    for _, low, high in runs:
        assert -1.0 <= float(low) < float(high) <= 1.0  # clip_sample=True
    shown = images(nb)
    # 8 samples in one row, 32x32 scaled 2x with 2-pixel padding
    assert [im.shape for im in shown] == [(66 + 2, 8 * 66 + 2, 3)] * 2
    assert all(im.std() > 0 for im in shown)


def test_flow_matching_trains_samples_and_measures_the_likelihood(tmp_path, monkeypatch):
    nb = execute("flow_matching.ipynb", tmp_path, monkeypatch)
    out = stdout(nb)
    assert "smoke mode" in out
    assert number(r"trained (\d+) steps", out) == 30
    assert np.isfinite(number(r"final loss: (\S+)", out))
    # the data's own row: the mean norm of 2-D N(0, 0.1^2 I) noise is 0.1 sqrt(pi / 2)
    assert abs(number(r"data: distance to centre ([\d.]+),", out) - 0.1 * np.sqrt(np.pi / 2)) < 0.01
    rows = re.findall(r"^ +(\d+) +(euler|heun) +(\d+) +(\S+) +(\S+)$", out, re.M)
    assert [(int(r[0]), r[1], int(r[2])) for r in rows] == [
        (n, m, n * (2 if m == "heun" else 1)) for n in (1, 2, 4, 8, 32) for m in ("euler", "heun")
    ]
    assert all(np.isfinite(float(r[3])) and 0 <= float(r[4]) <= 1 for r in rows)
    assert np.isfinite(number(r"model log-likelihood: (\S+) nats", out))
    # the mixture's own density at its test points: about -0.32 nats (entropy of the data)
    assert -0.5 < number(r"true log-likelihood: (\S+) nats", out) < -0.15
    assert re.search(r"DDIM-8: distance \S+, within 0.3 \S+; DPM-Solver\+\+-8: distance", out)
    shown = images(nb)
    assert len(shown) == 2 and all(im.std() > 0 for im in shown)


def test_parameterizations_conversions_round_trip(tmp_path, monkeypatch):
    nb = execute("parameterizations.ipynb", tmp_path, monkeypatch)
    out = stdout(nb)
    assert number(r"float32, v conversions, all t: (\S+)", out) < 1e-5
    assert number(r"float64, every conversion, all t: (\S+)", out) < 1e-10
    # float32 x0 = (x_t - sigma eps) / alpha loses digits where alpha_t ~ 5e-5
    assert number(r"x0_from_eps round-trip error, float32, t=999: (\S+)", out) > 1e-4
    rows = re.findall(
        r"^ *(\d+) +(eps|x0|v) +(\S+) \(theory +(\S+)\) +(\S+) \(theory +(\S+)\)$", out, re.M
    )
    assert len(rows) == 3 * 7  # every prediction at every t
    for t, p, fx0, fx0_theory, feps, feps_theory in rows:
        np.testing.assert_allclose(float(fx0), float(fx0_theory), rtol=1e-2, err_msg=f"{p} {t}")
        np.testing.assert_allclose(float(feps), float(feps_theory), rtol=1e-2, err_msg=f"{p} {t}")
    shown = images(nb)
    assert len(shown) == 2
    assert all(img.shape == (7 * 66 + 2, 5 * 66 + 2) for img in shown)  # 7 t's x 5 columns


def test_tpu_training_smoke_data_parallel_with_checkpoints(tmp_path, monkeypatch):
    nb = execute("tpu_training.ipynb", tmp_path, monkeypatch)
    out = stdout(nb)
    assert jax.device_count() > 1  # the suite's fake devices: the batch really is sharded
    assert number(r"devices: (\d+)", out) == jax.device_count()  # same XLA_FLAGS as the suite
    assert f"mesh: {{'data': {jax.device_count()}}}" in out
    assert "tfds:cifar_smoke prepared" in out
    assert re.search(r"steps 0 -> 2\b", out), out[-2000:]
    assert np.isfinite(number(r"final loss: (\S+)", out))
    assert number(r"latest checkpoint step: (\d+)", out) == 2
    directory = re.search(r"checkpoint directory: (\S+)", out).group(1)
    assert pathlib.Path(directory).is_relative_to(tmp_path)
    assert (pathlib.Path(directory) / "2").is_dir()
    shown = images(nb)
    assert len(shown) == 2  # a batch of the tfds data, the sample grid
    assert all(img.ndim == 3 and img.shape[-1] == 3 for img in shown)  # RGB


def test_every_notebook_is_tested_and_committed_without_outputs():
    assert sorted(p.name for p in COLAB.glob("*.ipynb")) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        nb = nbformat.read(COLAB / name, as_version=4)
        nbformat.validate(nb)
        assert nb.nbformat == 4
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert code, name
        for cell in code:
            assert cell.outputs == [] and cell.execution_count is None, (name, cell.id)
        assert "widgets" not in nb.metadata, name


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_install_cell_is_guarded(name):
    """Colab installs the package; where it is importable (CI, a checkout) nothing is installed."""
    nb = nbformat.read(COLAB / name, as_version=4)
    first_code = next(cell.source for cell in nb.cells if cell.cell_type == "code")
    guard = 'if importlib.util.find_spec("jax_diffusion") is None:'
    assert guard in first_code
    body = first_code.split(guard, 1)[1]
    assert "pip" in body and "git" in body
    assert "pip" not in first_code.split(guard, 1)[0]
    assert 'os.environ.get("JAX_DIFFUSION_SMOKE") == "1"' in first_code


def test_tpu_training_train_cell_reports_a_rerun_of_a_finished_run(tmp_path, capsys):
    """Re-running the notebook on a finished WORKDIR (what it tells you to do after a
    disconnect) takes the cell's 'restored' branch, not a 0 steps/s report of no training."""
    from jax_diffusion import cli, train

    nb = nbformat.read(COLAB / "tpu_training.ipynb", as_version=4)
    cell = next(c.source for c in nb.cells if "train.train_and_evaluate(" in c.source)
    # the toy MLP's smoke run: the cell's logic does not depend on the network
    config = cli.load_config(str(ROOT / "experiments" / "configs" / "toy_2d.py") + ":smoke", [])
    scope = {"train": train, "config": config, "WORKDIR": str(tmp_path / "work"), "jax": jax}
    exec(cell, dict(scope))
    first = capsys.readouterr().out
    assert "steps 0 -> 2" in first and "final loss:" in first and "restored" not in first
    exec(cell, dict(scope))
    again = capsys.readouterr().out
    assert "steps 2 -> 2" in again
    assert "restored the finished run" in again and "steps/s" not in again


@pytest.mark.parametrize(
    "xla_flags, devices",
    [
        (None, 2),
        ("--xla_backend_optimization_level=0", 2),  # flags without a count: 2 devices still
        ("--xla_force_host_platform_device_count=3", 3),
    ],
)
def test_tpu_training_smoke_mode_fakes_2_devices_unless_xla_flags_set_a_count(
    xla_flags, devices, tmp_path
):
    """What the notebook's first cell promises: '2, unless XLA_FLAGS already sets a count'."""
    nb = nbformat.read(COLAB / "tpu_training.ipynb", as_version=4)
    first_code = next(cell.source for cell in nb.cells if cell.cell_type == "code")
    script = tmp_path / "first_cell.py"
    script.write_text(first_code + "\nimport jax\nprint('devices:', jax.device_count())\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(JAX_DIFFUSION_SMOKE="1", JAX_PLATFORMS="cpu", PYTHONPATH=path)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"devices: {devices}\n" in out.stdout
