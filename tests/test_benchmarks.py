"""The benchmark scripts' command lines and tables (benchmarks/, never timed here): bad options
are usage errors (exit 2, one line) before anything is compiled, the default config is found
from the scripts' own location, and train_throughput prints the columns of BENCHMARKS.md."""

import argparse
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import cpu_breakdown  # noqa: E402
import sampler_speed  # noqa: E402
import sampling_throughput  # noqa: E402
import train_throughput  # noqa: E402


@pytest.fixture
def no_benchmark(monkeypatch):
    """Each script's main() prints machine() first, after its checks: a bad option that got
    past them fails the test at once instead of running the benchmark."""

    def ran_past_the_checks():
        raise AssertionError("the bad option was not refused before the benchmark started")

    for module in (cpu_breakdown, sampler_speed, sampling_throughput, train_throughput):
        monkeypatch.setattr(module, "machine", ran_past_the_checks)


@pytest.mark.parametrize("script", ["train_throughput", "sampler_speed"])
def test_config_path_is_absolute_and_exists(script):
    module = {"train_throughput": train_throughput, "sampler_speed": sampler_speed}[script]
    assert os.path.isabs(module.CONFIG)
    assert os.path.samefile(module.CONFIG, ROOT / "experiments" / "configs" / "default.py")


def _parse(configs, batches):
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="a,b")
    parser.add_argument("--batches", default="8")
    args = parser.parse_args(["--configs", configs, "--batches", batches])
    return common.parse_configs_batches(parser, args, ("a", "b"))


def test_parse_configs_batches():
    assert _parse("b,a", "8,32") == (["b", "a"], [8, 32])


@pytest.mark.parametrize(
    "configs, batches, message",
    [
        ("", "8", "--configs: one or more of a, b; got ''"),
        (",", "8", "--configs: one or more of a, b"),
        ("c", "8", "--configs: unknown config 'c'"),
        ("a", "0", "--batches: comma-separated positive ints; got '0'"),
        ("a", "8,x", "--batches: comma-separated positive ints"),
    ],
)
def test_bad_configs_or_batches(configs, batches, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(configs, batches)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("repeats", ["0", "-1"])
def test_sampler_speed_repeats_below_one(repeats, monkeypatch, capsys, no_benchmark):
    monkeypatch.setattr(sys, "argv", ["sampler_speed.py", "--repeats", repeats])
    with pytest.raises(SystemExit) as exit_info:
        sampler_speed.main()
    assert exit_info.value.code == 2
    assert f"--repeats must be >= 1; got {repeats}" in capsys.readouterr().err


def _counts(argv, batches):
    parser = argparse.ArgumentParser()
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=0)
    return train_throughput.microbatch_counts(parser, parser.parse_args(argv), batches)


@pytest.mark.parametrize(
    "argv, batches, expected",
    [
        ([], [32, 128], {32: 1, 128: 1}),
        (["--chunk-size", "8"], [32, 128], {32: 4, 128: 16}),
        (["--chunk-size", "32"], [32, 128], {32: 1, 128: 4}),
        (["--chunk-size", "64"], [32], {32: 1}),
        (["--microbatches", "4"], [32, 128], {32: 4, 128: 4}),
    ],
)
def test_microbatch_counts(argv, batches, expected):
    assert _counts(argv, batches) == expected


@pytest.mark.parametrize(
    "argv, batches, message",
    [
        (["--chunk-size", "5"], [32], "--chunk-size 5 must divide every batch size; got batch 32"),
        (["--chunk-size", "12"], [32], "--chunk-size 12 must divide"),
        (["--chunk-size", "-8"], [32], "--chunk-size must be >= 0"),
        (["--microbatches", "0"], [32], "--microbatches must be >= 1; got 0"),
        (["--microbatches", "3"], [32], "--microbatches 3 must divide every batch size"),
    ],
)
def test_bad_microbatches_are_usage_errors(argv, batches, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _counts(argv, batches)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["0", "-3", "1001", "5000"])
def test_steps_out_of_range(steps, monkeypatch, capsys, no_benchmark):
    argv = ["sampling_throughput.py", "--configs", "digits8", "--steps", steps]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        sampling_throughput.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"--steps must be in [1, 1000] (the digits8 config's diffusion.num_timesteps); got {steps}"
        in err
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--upsample", "--attention"],
        ["--skip-conv", "--upsample"],
        ["--attention", "--skip-conv"],
    ],
)
def test_table_options_are_exclusive(argv, monkeypatch, capsys, no_benchmark):
    monkeypatch.setattr(sys, "argv", ["cpu_breakdown.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cpu_breakdown.main()
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def _columns(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_train_table_header_matches_benchmarks_md():
    # the first (newest) full train-step table of BENCHMARKS.md
    lines = (ROOT / "BENCHMARKS.md").read_text().splitlines()
    documented = next(line for line in lines if line.startswith("| config | batch | mb | params"))
    assert _columns(train_throughput.table_header(with_torch=True)) == _columns(documented)


def test_train_table_header_without_torch_drops_only_the_diffusers_columns():
    full = _columns(train_throughput.table_header(with_torch=True))
    bare = _columns(train_throughput.table_header(with_torch=False))
    assert bare == [
        c for c in full if c not in ("diffusers params", "diffusers img/s", "ours/theirs")
    ]
