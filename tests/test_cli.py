"""The `jax-diffusion` command line, end to end."""

import json
import os
import re
import sys
import types

import jax
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
    # the sixth, loading diffusers weights, runs in test_convert.py (it needs a model folder)
    assert len(blocks) == 8, (
        "README.md should hold the math, sampling, DDIM inversion, editing, ControlNet, "
        "diffusers, flow and latent diffusion examples"
    )
    import numpy as np

    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    np.testing.assert_allclose(namespace["x0_back"], namespace["x0"], atol=1e-5)
    assert np.isfinite(float(namespace["loss"]))
    assert np.all(np.isfinite(np.asarray(namespace["nll"].total_bpd)))
    exec(compile(blocks[1], "README.md", "exec"), namespace)  # continues from the first
    assert namespace["traj"].shape == (51, 8, 16, 16, 1)
    assert np.all(np.isfinite(np.asarray(namespace["x0"])))
    exec(compile(blocks[2], "README.md", "exec"), namespace)  # DDIM inversion, continues
    images = np.asarray(namespace["images"])
    assert np.abs(np.asarray(namespace["recon"]) - images).max() < 1e-4  # measured 1.7e-5
    # without fixed_point_iters the round trip is first order only (measured 0.099 off)
    jd, model_fn, schedule = namespace["jd"], namespace["model_fn"], namespace["schedule"]
    naive = jd.ddim_sample(model_fn, schedule, namespace["x_T"], num_steps=50, prediction="v")
    assert np.abs(np.asarray(naive) - images).max() > 0.01
    exec(compile(blocks[3], "README.md", "exec"), namespace)  # editing, continues
    filled, edited = np.asarray(namespace["filled"]), np.asarray(namespace["edited"])
    np.testing.assert_array_equal(filled[:, :, :8], images[:, :, :8])  # the known half, as is
    assert np.all(np.isfinite(filled)) and np.abs(filled[:, :, 8:] - images[:, :, 8:]).max() > 0.1
    assert edited.shape == images.shape and np.all(np.isfinite(edited))
    exec(compile(blocks[4], "README.md", "exec"), namespace)  # ControlNet, continues
    # the stand-in UNet is untrained: its zero-initialised conv_out makes these gradients 0
    grads, control_params = namespace["grads"], namespace["control_params"]
    assert jax.tree.structure(grads) == jax.tree.structure(control_params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    assert namespace["x0"].shape == (4, 8, 8, 1) and np.all(np.isfinite(namespace["x0"]))
    exec(compile(blocks[6], "README.md", "exec"), namespace)  # flow matching, continues
    assert np.isfinite(float(namespace["loss"]))
    assert namespace["log_p"].shape == (8,) and np.all(np.isfinite(namespace["log_p"]))
    assert namespace["x0"].shape == (8, 16, 16, 1)
    assert np.all(np.isfinite(np.asarray(namespace["x0"])))
    exec(compile(blocks[7], "README.md", "exec"), namespace)  # latent diffusion, continues
    assert jax.tree.structure(namespace["ae_grads"]) == jax.tree.structure(namespace["ae_params"])
    assert namespace["z"].shape == namespace["z0"].shape == (8, 8, 8, 2)
    assert abs(float(np.std(np.asarray(namespace["scale"] * namespace["z"]))) - 1) < 1e-5
    assert namespace["samples"].shape == (8, 16, 16, 1) and np.isfinite(float(namespace["loss"]))
    assert np.all(np.isfinite(np.asarray(namespace["samples"])))


def test_bad_values_and_missing_runs_end_as_argparse_errors(tmp_path, capsys, monkeypatch):
    """A library ValueError / FileNotFoundError / missing extra: a one-line message and status
    2, before work."""
    workdir = tmp_path / "run"
    train = ["train", "--config", f"{CONFIGS / 'default.py'}:smoke", "--workdir", str(workdir)]
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # the data extra missing
    cases = [
        ([*train, "--set", "train.grad_clip=-1"], "train.grad_clip"),
        ([*train, "--set", "train.max_loss=0"], "train.max_loss must be > 0 or None; got 0"),
        ([*train, "--set", "train.max_loss=inf"], "train.max_loss must be a finite number or"),
        ([*train, "--set", "model.nope=1"], "unknown config key 'model.nope'"),
        # 2**32 was PRNGKey(0) again; 2**64 an OverflowError
        ([*train, "--set", "seed=4294967296"], r"seed must be an int in [0, 4294967295]"),
        ([*train, "--set", "seed=18446744073709551616"], "seed must be an int in"),
        ([*train, "--set", "model.attention_resolutions=(3,)"], "model.attention_resolutions"),
        ([*train, "--set", "model.num_heads=3"], "error: model.num_heads must divide"),
        ([*train, "--set", "data.name='tfds:mnist'"], "pip install 'jax_diffusion[data]'"),
        # the network said only "x must have rank 2 ([B, D])", the loader "image_size must"
        ([*train, "--set", "model.name='mlp'"], "model.name='mlp' takes vectors [D]; data.name"),
        ([*train, "--set", "data.image_size=12"], "error: data.image_size must be one of 8, 16"),
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


def test_output_paths_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys):
    # these failed with an OSError traceback after sampling (evaluate: after hours of it)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    (tmp_path / "dir.png").mkdir()
    run = ["--workdir", str(tmp_path / "no_run")]
    for argv, named in [
        (["sample", *run, "--out", str(tmp_path / "dir.png")], "is a directory"),
        (["sample", *run, "--out", str(a_file / "x.png")], "on the way to .* is a file"),
        (["evaluate", *run, "--out", str(tmp_path)], "must be a file path; .* is a directory"),
        (["evaluate", *run, "--out", str(a_file / "sub" / "m.json")], "is a file"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--out" in err and re.search(named, err), err
    train = ["train", "--config", f"{CONFIGS / 'default.py'}:smoke", "--workdir", str(a_file)]
    with pytest.raises(SystemExit):
        cli.main(train)
    assert "error: workdir must be a directory (or a new path)" in capsys.readouterr().err


def test_an_output_in_a_directory_without_write_permission_is_refused(
    tmp_path, capsys, monkeypatch
):
    # the permission as the OS reports it (root may write anywhere, so it is stood in for)
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(
        cli.os, "access", lambda path, mode: not (mode == os.W_OK and path == str(locked))
    )
    argv = ["evaluate", "--workdir", str(tmp_path / "no_run")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--out", str(locked / "sub" / "m.json")])
    assert exit_info.value.code == 2
    assert re.search(r"--out.*no write permission in .*locked", capsys.readouterr().err)


def test_a_diverged_run_ends_with_its_message_and_status_1(tmp_path, capsys, monkeypatch):
    from jax_diffusion import train

    def diverge(config, workdir):  # what train_and_evaluate raises after max_bad_steps
        raise train.TrainingDiverged("3 consecutive steps had a non-finite loss")

    monkeypatch.setattr(train, "train_and_evaluate", diverge)
    argv = ["train", "--config", f"{CONFIGS / 'default.py'}:smoke", "--workdir", str(tmp_path)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err == "jax-diffusion train: 3 consecutive steps had a non-finite loss\n"


def _argparse_error(capsys, argv):
    """argparse's one-line error for argv (status 2), from the subcommand's parser."""
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv)
    assert exit_info.value.code == 2, argv
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_int_and_float_arguments_accept_their_whole_documented_range(capsys):
    parse = cli.build_parser().parse_args
    w = ["--workdir", "run"]
    args = parse(["sample", *w, "--num", "1", "--steps", "1", "--seed", "0", "--guidance", "-2"])
    assert (args.num, args.steps, args.seed, args.guidance) == (1, 1, 0, -2.0)
    assert parse(["sample", *w, "--seed", str(2**32 - 1)]).seed == 2**32 - 1
    assert parse(["sample", *w, "--sampler", "dpm++"]).sampler == "dpm++"
    assert parse(["sample", *w, "--out", "grid.PNG"]).out == "grid.PNG"
    assert parse(["sample", *w, "--out", "out/grid.jpg"]).out == "out/grid.jpg"
    args = parse(["evaluate", *w, "--num", "4", "--bpd-examples", "297", "--seed", "0"])
    assert (args.num, args.bpd_examples, args.seed) == (4, 297, 0)
    assert parse(["evaluate", *w, "--bpd-examples", "0", "--sampler", "dpm++"]).bpd_examples == 0
    assert parse(["demo", "--seed", "0", "--num-timesteps", "1", "--batch", "1"]).seed == 0


def test_sample_and_evaluate_flags_default_to_what_their_help_says():
    parse = cli.build_parser().parse_args
    w = ["--workdir", "run"]
    sampling = ("sampler", "steps", "spacing", "guidance")  # None: the run's config decides
    for command in ("sample", "evaluate"):
        args = parse([command, *w])
        assert [getattr(args, k) for k in sampling] == [None] * 4 and args.seed == 0
    sample, evaluate = parse(["sample", *w]), parse(["evaluate", *w])
    assert (sample.num, sample.out) == (None, "grid.png")  # None: the config's num_samples
    assert sample.batch_size == 256 and parse(["sample", *w, "--out", "s.NPZ"]).out == "s.NPZ"
    assert (evaluate.num, evaluate.bpd_examples, evaluate.out) == (1000, 0, None)
    assert evaluate.ode_bpd_examples == 0 and evaluate.ode_steps is None  # None: the default


def test_out_of_range_arguments_are_argparse_errors_naming_the_argument(capsys):
    w = ["--workdir", "run"]
    for argv, named in [
        (
            ["sample", *w, "--seed", str(2**32)],
            "argument --seed: must be an int in [0, 4294967295]",
        ),
        (["sample", *w, "--num", "1.5"], "argument --num: must be an int >= 1; got '1.5'"),
        (["sample", *w, "--steps", "0"], "argument --steps: must be an int >= 1; got '0'"),
        (["sample", *w, "--guidance", "inf"], "argument --guidance: must be a finite number"),
        (["sample", *w, "--guidance=-inf"], "argument --guidance: must be a finite number"),
        (["sample", *w, "--guidance", "x"], "argument --guidance: must be a finite number"),
        (["evaluate", *w, "--churn", "nan"], "argument --churn: must be a finite number"),
        (["sample", *w, "--out", "grid.txt"], "argument --out: must end in an image extension"),
        (["sample", *w, "--out", "grid.txt"], "or in .npz (the arrays); got 'grid.txt'"),
        (["sample", *w, "--batch-size", "0"], "argument --batch-size: must be an int >= 1"),
        (["evaluate", *w, "--num", "3"], "argument --num: must be an int >= 4"),
        (["evaluate", *w, "--bpd-examples", "298"], "argument --bpd-examples: must be an int in"),
        (["evaluate", *w, "--bpd-examples", "-1"], "argument --bpd-examples: must be an int in"),
        (
            ["evaluate", *w, "--ode-bpd-examples", "298"],
            "argument --ode-bpd-examples: must be an int in",
        ),
        (["evaluate", *w, "--ode-steps", "1"], "argument --ode-steps: must be an int >= 2"),
        (["demo", "--seed", "-1"], "argument --seed: must be an int in [0, 4294967295]"),
    ]:
        err = _argparse_error(capsys, argv)
        assert err.startswith(f"jax-diffusion {argv[0]}: error: "), err
        assert named in err, err
    assert "the following arguments are required: command" in _argparse_error(capsys, [])


def test_every_set_override_is_applied_with_literal_or_bare_string_values(
    tmp_path, capsys, monkeypatch
):
    from jax_diffusion import train

    got = {}

    def fake_train(config, workdir):
        got.update(config=config, workdir=workdir)
        return {"final_step": config.train.num_steps, "state": object()}

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    argv = ["train", "--config", f"{CONFIGS / 'default.py'}:smoke", "--workdir", str(tmp_path)]
    sets = [
        "train.num_steps=7",
        "train.learning_rate=0.5",
        "data.name=toy_2d:two_moons",  # not a Python literal: the bare string
        "sample.sampler='ddim'",
        "train.grad_clip=None",
    ]
    assert cli.main([*argv, *(a for s in sets for a in ("--set", s))]) == 0
    config = got["config"]
    assert got["workdir"] == str(tmp_path)
    assert (config.train.num_steps, config.train.learning_rate) == (7, 0.5)
    assert (config.data.name, config.sample.sampler) == ("toy_2d:two_moons", "ddim")
    assert config.train.grad_clip is None
    assert json.loads(capsys.readouterr().out) == {"final_step": 7}  # the state left out


def test_a_set_value_is_everything_after_the_first_equals_sign():
    config = cli.load_config(f"{CONFIGS / 'default.py'}:smoke", ["data.name='a=b'"])
    assert config.data.name == "a=b"
    with pytest.raises(ValueError, match=r"--set takes key=value; got 'train.num_steps'"):
        cli.load_config(f"{CONFIGS / 'default.py'}:smoke", ["train.num_steps"])


def test_a_config_without_a_variant_gets_none_and_non_py_files_are_rejected(tmp_path):
    text = (
        "import ml_collections\n\n"
        "def get_config(arg=None):\n"
        "    return ml_collections.ConfigDict({'variant': 'none' if arg is None else arg})\n"
    )
    (tmp_path / "conf.py").write_text(text)
    assert cli.load_config(str(tmp_path / "conf.py")).variant == "none"
    assert cli.load_config(f"{tmp_path / 'conf.py'}:small").variant == "small"
    (tmp_path / "conf.txt").write_text(text)
    with pytest.raises(ValueError, match="--config must name an existing .py file; got"):
        cli.load_config(str(tmp_path / "conf.txt"))


def test_an_error_is_printed_as_its_plain_message_even_with_traceback_0(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("JAX_DIFFUSION_TRACEBACK", "0")  # 0: off, as when unset
    argv = ["train", "--config", f"{CONFIGS / 'default.py'}:smoke", "--workdir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--set", "model.nope=1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "jax-diffusion train: error: --set model.nope=1: unknown config key 'model.nope'\n"
    )


def _run_config(monkeypatch, name="digits_cond.py"):
    """The config the sampling flags are checked against, in place of a workdir's config.json
    (the tests that fake train.load_run have no workdir)."""
    from jax_diffusion import train

    config = cli.load_config(f"{CONFIGS / name}:smoke")
    monkeypatch.setattr(train, "load_run_config", lambda workdir: config)
    return config


def test_sample_passes_its_arguments_on_and_reports_the_step(tmp_path, capsys, monkeypatch):
    import jax
    import numpy as np

    from jax_diffusion import train

    got = {}

    config = types.SimpleNamespace(
        diffusion="diffusion config", sample=types.SimpleNamespace(num_samples=12)
    )

    def fake_load_run(workdir):  # (config, shape, model, ema_params, step)
        got["workdir"] = workdir
        return config, (8, 8, 1), "model", "ema", 5

    monkeypatch.setattr(train, "load_run", fake_load_run)
    monkeypatch.setattr(train, "get_schedule", lambda diffusion: ("schedule of", diffusion))
    _run_config(monkeypatch)

    def fake_sample_in_batches(config, model, params, schedule, rng, **kwargs):
        got.update(args=(config, model, params, schedule), rng=rng, **kwargs)
        return np.zeros((kwargs["num"], *kwargs["shape"]), np.float32), None

    monkeypatch.setattr(train, "sample_in_batches", fake_sample_in_batches)
    out = str(tmp_path / "grid.png")
    argv = ["sample", "--workdir", "w", "--sampler", "ddim", "--steps", "3", "--num", "2"]
    argv += ["--spacing", "trailing", "--batch-size", "7"]
    argv += ["--guidance-rescale", "0.5"]  # into the restored run's config, which sample reads
    assert cli.main([*argv, "--guidance", "1.5", "--seed", "9", "--out", out]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": out, "num": 2, "step": 5}
    assert config.sample.guidance_rescale == 0.5
    assert got["workdir"] == "w"
    assert got["args"] == (config, "model", "ema", ("schedule of", "diffusion config"))
    assert (got["sampler"], got["num_steps"], got["num"], got["guidance"]) == ("ddim", 3, 2, 1.5)
    assert got["shape"] == (8, 8, 1) and got["spacing"] == "trailing"
    assert got["batch_size"] == 7
    assert got["mesh"].axis_names == ("data",) and got["mesh"].size == jax.device_count()
    np.testing.assert_array_equal(
        jax.random.key_data(got["rng"]), jax.random.key_data(jax.random.PRNGKey(9))
    )
    assert (tmp_path / "grid.png").read_bytes().startswith(b"\x89PNG")
    # without them: None, so that the config's sampler, steps and guidance apply
    assert cli.main(["sample", "--workdir", "w", "--out", out]) == 0
    # and the grid has the config's sample.num_samples (it had 64 whatever the config said)
    assert (got["sampler"], got["num_steps"], got["num"], got["guidance"]) == (None, None, 12, None)
    assert json.loads(capsys.readouterr().out)["num"] == 12
    assert got["spacing"] is None and got["batch_size"] == 256 and got["s_churn"] is None
    # --churn: EDM's stochastic heun; with another sampler an error named as the flag
    assert cli.main(["sample", "--workdir", "w", "--sampler", "heun", "--churn", "40"]) == 0
    assert (got["sampler"], got["s_churn"]) == ("heun", 40.0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sample", "--workdir", "w", "--sampler", "ddim", "--churn", "40"])
    assert exit_info.value.code == 2
    assert "error: --churn is EDM's churn, for sampler 'heun' on a" in capsys.readouterr().err
    # a .npz: the arrays an FID evaluator reads (zeros are mid-grey 128 = round(127.5))
    out = str(tmp_path / "arrays" / "s.npz")
    assert cli.main(["sample", "--workdir", "w", "--num", "3", "--out", out]) == 0
    with np.load(out) as arrays:
        assert arrays.files == ["arr_0"]  # no labels: the fake run has no classes
        assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (3, 8, 8, 1)
        assert (arrays["arr_0"] == 128).all()


def test_sample_writes_a_class_conditional_run_s_labels_to_a_npz_of_any_case(
    tmp_path, capsys, monkeypatch
):
    import numpy as np

    from jax_diffusion import train

    config = types.SimpleNamespace(
        diffusion="diffusion config", sample=types.SimpleNamespace(num_samples=12)
    )
    monkeypatch.setattr(train, "load_run", lambda workdir: (config, (4, 4, 1), "m", "ema", 3))
    monkeypatch.setattr(train, "get_schedule", lambda diffusion: "schedule")
    _run_config(monkeypatch)
    images = np.linspace(-1.0, 1.0, 5 * 16).reshape(5, 4, 4, 1).astype(np.float32)
    labels = np.array([3, 0, 9, 9, 1], np.int32)

    def fake_sample_in_batches(config, model, params, schedule, rng, **kwargs):
        return images, labels

    monkeypatch.setattr(train, "sample_in_batches", fake_sample_in_batches)
    out = str(tmp_path / "S.NPZ")
    assert cli.main(["sample", "--workdir", "w", "--num", "5", "--out", out]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": out, "num": 5, "step": 3}
    with np.load(out) as arrays:
        assert arrays.files == ["arr_0", "arr_1"]
        want = np.floor((images + 1.0) / 2.0 * 255.0 + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(arrays["arr_0"], want)
        np.testing.assert_array_equal(arrays["arr_1"], labels)


def test_samples_that_are_not_finite_end_sample_with_one_line_and_status_1(
    tmp_path, capsys, monkeypatch
):
    import numpy as np

    from jax_diffusion import train

    config = types.SimpleNamespace(diffusion=None)
    monkeypatch.setattr(train, "load_run", lambda workdir: (config, (4, 4, 1), "m", "p", 5))
    monkeypatch.setattr(train, "get_schedule", lambda diffusion: None)
    _run_config(monkeypatch)

    def diverged_sample(*args, num, shape, **kwargs):
        images = np.zeros((num, *shape), np.float32)
        images[1, 0, 0, 0] = np.nan
        images[3] = np.inf
        return images, None

    monkeypatch.setattr(train, "sample_in_batches", diverged_sample)
    out = tmp_path / "grid.png"
    argv = ["sample", "--workdir", "w", "--num", "4", "--out", str(out)]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err == "jax-diffusion sample: 2 of 4 samples are not finite\n"
    assert captured.out == "" and not out.exists()
    monkeypatch.setenv("JAX_DIFFUSION_TRACEBACK", "1")
    with pytest.raises(FloatingPointError, match="2 of 4 samples are not finite"):
        cli.main(argv)


def test_evaluate_passes_its_arguments_on_and_writes_the_json_into_new_directories(
    tmp_path, capsys, monkeypatch
):
    from jax_diffusion import evaluation

    got = {}

    def fake_evaluate(workdir, **kwargs):
        got.update(workdir=workdir, **kwargs)
        return {"fd_test": 1.25}

    monkeypatch.setattr(evaluation, "evaluate_workdir", fake_evaluate)
    _run_config(monkeypatch)
    out = tmp_path / "new" / "dir" / "metrics.json"
    argv = ["evaluate", "--workdir", "w", "--num", "16", "--sampler", "ddim", "--steps", "4"]
    argv += ["--guidance", "0.5", "--seed", "3", "--bpd-examples", "2", "--out", str(out)]
    argv += ["--spacing", "linspace", "--ode-bpd-examples", "5", "--ode-steps", "64"]
    argv += ["--guidance-rescale", "0.7"]
    assert cli.main(argv) == 0
    mesh = got.pop("mesh")  # each batch split over every device
    assert isinstance(mesh, jax.sharding.Mesh) and mesh.devices.size == jax.device_count() == 8
    assert got == dict(
        workdir="w",
        num_samples=16,
        sampler="ddim",
        num_steps=4,
        guidance=0.5,
        guidance_rescale=0.7,
        spacing="linspace",
        s_churn=None,  # None: the config's
        seed=3,
        bpd_examples=2,
        ode_bpd_examples=5,
        ode_steps=64,
    )
    printed = capsys.readouterr().out
    assert json.loads(printed) == {"fd_test": 1.25}
    assert out.read_text() == printed
    # printed before the file is written: a write that fails keeps the metrics on stdout
    out.unlink()

    def evaluate_then_lose_the_path(workdir, **kwargs):
        out.mkdir()  # the path taken while sampling, by another process
        return {"fd_test": 1.25}

    monkeypatch.setattr(evaluation, "evaluate_workdir", evaluate_then_lose_the_path)
    with pytest.raises(IsADirectoryError):
        cli.main(argv)
    assert json.loads(capsys.readouterr().out) == {"fd_test": 1.25}


def test_a_config_in_a_package_off_sys_path_can_import_its_siblings(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_config adds the package's root
    package = tmp_path / "root" / "jd_test_configs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text("LR = 0.25\n")
    (package / "conf.py").write_text(
        "import ml_collections\n\n"
        "from jd_test_configs import base\n\n"
        "def get_config(arg=None):\n"
        "    return ml_collections.ConfigDict({'lr': base.LR})\n"
    )
    try:
        assert cli.load_config(str(package / "conf.py")).lr == 0.25
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "jd_test_configs"]:
            del sys.modules[name]


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_sampling_flags_are_checked_against_the_run_as_flags_before_the_restore(
    tmp_path, capsys, command
):
    # a config.json and no checkpoint: reaching the restore would say "no checkpoint"; these
    # were reported after the restore (and the sampling progress bar), named num_steps and
    # guidance, with "(pass guidance=None)"
    config = cli.load_config(f"{CONFIGS / 'default.py'}:smoke")
    (tmp_path / "config.json").write_text(config.to_json())
    T = config.diffusion.num_timesteps
    for flags, message in [
        (
            ["--sampler", "dpm++", "--steps", str(T)],
            rf"--steps for sampler 'dpm\+\+' \(DPM-Solver\+\+ takes n \+ 1 distinct steps\) "
            rf"must be an int in \[1, {T - 1}\]; got {T}",
        ),
        (
            ["--sampler", "ddim", "--steps", str(T + 1)],
            rf"--steps for sampler 'ddim' must be an int in \[1, {T}\]; got {T + 1}",
        ),
        (
            ["--sampler", "dpm++", "--spacing", "trailing"],
            r"--spacing must be one of .* with sampler 'ddim' only; got spacing='trailing' with "
            r"sampler 'dpm\+\+'",
        ),
        (
            ["--guidance", "3"],
            r"--guidance needs a class-conditional model; this one has model.num_classes=None "
            r"\(omit --guidance\); got --guidance=3.0",
        ),
    ]:
        with pytest.raises(SystemExit) as err:
            cli.main([command, "--workdir", str(tmp_path), *flags])
        assert err.value.code == 2
        assert re.search(f"^jax-diffusion {command}: error: {message}$", capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


class _ScaledInput:
    """A stand-in network: eps_hat = 0.5 x (no labels); cheap to compile, and a denoiser."""

    def apply(self, variables, x, t, y=None, method=None):
        return 0.5 * x


def _edit_files(tmp_path):
    """Two 16x16 gray images (resized to the run's 8x8) and a mask filling the right half."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"in{i}.png"))
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(paths[-1])
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return paths, str(tmp_path / "mask.png")


@pytest.mark.parametrize("command", ["inpaint", "sdedit"])
def test_inpaint_and_sdedit_edit_image_files_as_generate_edit_does(
    command, tmp_path, capsys, monkeypatch
):
    import numpy as np

    from jax_diffusion import generate, train, visualize

    config = _run_config(monkeypatch, "default.py")  # unconditional, T = 50
    model = _ScaledInput()
    monkeypatch.setattr(train, "load_run", lambda workdir: (config, (8, 8, 1), model, {}, 7))
    images, mask = _edit_files(tmp_path)
    argv = [command, "--workdir", "w", "--image", *images, "--num", "2", "--steps", "6"]
    argv += ["--seed", "3"]
    if command == "inpaint":
        argv += ["--mask", mask, "--jump-length", "2", "--jump-n-sample", "2"]
        options = dict(mask=visualize.load_mask(mask, (8, 8, 1)), jump_length=2, jump_n_sample=2)
    else:
        argv += ["--strength", "0.5"]
        options = dict(strength=0.5)
    out = tmp_path / "edits.npz"
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(out), "num": 4, "step": 7}
    x = np.repeat(visualize.load_images(images, (8, 8, 1)), 2, axis=0)  # image-major
    want = generate.edit(
        config, model, {}, train.get_schedule(config.diffusion), jax.random.PRNGKey(3), x,
        method=command, num_steps=6, mesh=train.make_mesh(), **options,
    )  # fmt: skip
    with np.load(out) as f:
        assert list(f) == ["arr_0"]  # no labels: an unconditional run
        np.testing.assert_array_equal(f["arr_0"], visualize.to_uint8(want))
        edits = f["arr_0"]
    if command == "inpaint":  # the left half kept, the right half filled
        np.testing.assert_array_equal(edits[:, :, :4], visualize.to_uint8(x[:, :, :4]))
        assert np.abs(edits[:, :, 4:].astype(int) - visualize.to_uint8(x[:, :, 4:])).max() > 10
    # the grid: one row per image, its input then its 2 edits, each 8x8 scaled 8x, 4 px apart
    png = tmp_path / "edits.png"
    assert cli.main([*argv, "--out", str(png)]) == 0
    from PIL import Image

    assert np.asarray(Image.open(png)).shape == (2 * 68 + 4, 3 * 68 + 4)


def test_inpaint_and_sdedit_report_bad_flags_before_restoring_the_run(
    tmp_path, capsys, monkeypatch
):
    from jax_diffusion import train

    _run_config(monkeypatch, "default.py")  # no classes, T = 50

    def no_restore(workdir):
        raise AssertionError("the run was restored before the flags were checked")

    monkeypatch.setattr(train, "load_run", no_restore)
    images, mask = _edit_files(tmp_path)
    base = ["sdedit", "--workdir", "w", "--image", *images]
    for argv, named in [
        ([*base, "--label", "1"], "--label must be a label of the run (no classes); got 1"),
        ([*base, "--steps", "51"], r"--steps must be an int in [1, 50] (the run's steps); got 51"),
        ([*base, "--guidance", "2"], "--guidance needs a class-conditional model"),
        ([*base, "--guidance-rescale", "0.7"], "--guidance-rescale needs a class-conditional"),
        (["sample", "--workdir", "w", "--guidance-rescale", "0.7"], "--guidance-rescale needs"),
        ([*base, str(tmp_path / "nope.png")], "no image file"),
        (["inpaint", *base[1:], "--mask", str(tmp_path / "m.png")], "no image file"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"jax-diffusion {argv[0]}: error: ") and named in err, err
    _run_config(monkeypatch, "toy_2d.py")
    with pytest.raises(SystemExit):
        cli.main(base)
    assert (
        "sdedit edits images; this run's model.name='mlp' takes vectors" in capsys.readouterr().err
    )
    for argv, named in [
        ([*base, "--strength", "0"], "argument --strength: must be a number in (0, 1]; got '0'"),
        ([*base, "--strength", "nan"], "argument --strength: must be a number in (0, 1]"),
        ([*base, "--num", "0"], "argument --num: must be an int >= 1"),
        ([*base, "--guidance-rescale", "1.5"], "--guidance-rescale: must be a number in [0, 1]"),
        (["inpaint", *base[1:]], "the following arguments are required: --mask"),
        (["inpaint", *base[1:], "--mask", mask, "--jump-n-sample", "0"], "--jump-n-sample"),
    ]:
        assert named in _argparse_error(capsys, argv), argv


def test_sdedit_edits_a_class_conditional_run_towards_the_label_with_guidance(
    tmp_path, capsys, monkeypatch
):
    import numpy as np

    from jax_diffusion import generate, train, visualize

    class LabelScale:  # eps_hat = (0.5 + 0.05 y) x: the label reaches the output's std
        def apply(self, variables, x, t, y=None, method=None):
            return (0.5 + 0.05 * y[:, None, None, None].astype(x.dtype)) * x

    config = _run_config(monkeypatch, "digits_cond.py")  # 10 classes, the null label 10
    model = LabelScale()
    monkeypatch.setattr(train, "load_run", lambda workdir: (config, (8, 8, 1), model, {}, 3))
    images, _ = _edit_files(tmp_path)
    out = tmp_path / "e.npz"
    argv = ["sdedit", "--workdir", "w", "--image", images[0], "--num", "3", "--steps", "4"]
    guide = ["--label", "2", "--guidance", "3", "--guidance-rescale", "0.7"]
    assert cli.main([*argv, *guide, "--out", str(out)]) == 0
    assert config.sample.guidance_rescale == 0.7  # set in the restored run's config
    x = np.repeat(visualize.load_images(images[:1], (8, 8, 1)), 3, axis=0)
    schedule, key = train.get_schedule(config.diffusion), jax.random.PRNGKey(0)
    base = dict(method="sdedit", num_steps=4, strength=0.5, mesh=train.make_mesh())  # 0.5: default
    kw = dict(base, labels=np.full(3, 2), guidance=3.0)
    want = generate.edit(config, model, {}, schedule, key, x, **kw)
    plain = config.copy_and_resolve_references()
    plain.sample.guidance_rescale = 0.0
    unscaled = generate.edit(plain, model, {}, schedule, key, x, **kw)
    assert np.abs(visualize.to_uint8(unscaled).astype(int) - visualize.to_uint8(want)).max() > 0
    with np.load(out) as f:
        np.testing.assert_array_equal(f["arr_0"], visualize.to_uint8(want))
        np.testing.assert_array_equal(f["arr_1"], [2, 2, 2])
        edits = f["arr_0"]
    unguided = generate.edit(config, model, {}, schedule, key, x, **base)  # the null label
    assert np.abs(visualize.to_uint8(unguided).astype(int) - edits).max() > 0
    with pytest.raises(SystemExit):
        cli.main([*argv, "--label", "11"])
    assert (
        "--label must be a label of the run (labels in [0, 10]); got 11" in capsys.readouterr().err
    )
