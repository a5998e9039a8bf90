"""Multi-host data parallelism for real: 2 processes on a loopback jax.distributed cluster."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import SUBPROCESS_XLA_FLAGS

from jax_diffusion import cli, train

HERE = pathlib.Path(__file__).resolve().parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(command, **env_extra):
    """Runs command(process_id, port) as 2 processes of one loopback cluster (one CPU device
    each, the package on the path) and checks that both exit 0."""
    port = _free_port()
    path = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path, XLA_FLAGS=SUBPROCESS_XLA_FLAGS)
    # the suite's persistent compilation cache, for every program (as test_notebooks does): the
    # two tests' processes compile the same toy programs (measured alone: 33.6 -> 29.0 s)
    env.update(
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    env.update(env_extra)
    procs = [
        subprocess.Popen(
            command(i, port), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-3000:]


def test_two_processes_train_in_lockstep_and_match_one_process(tmp_path):
    def worker(i, port):
        args = [str(i), "2", str(port), str(tmp_path / "work"), str(tmp_path / f"p{i}.npz")]
        return [sys.executable, str(HERE / "multihost_worker.py"), *args]

    _run_two_processes(worker)
    p0, p1 = (np.load(tmp_path / f"p{i}.npz") for i in range(2))
    assert sorted(p0.files) == sorted(p1.files) and p0.files
    for k in p0.files:
        np.testing.assert_array_equal(p0[k], p1[k])  # lockstep: identical params everywhere
    # rerunning the finished run: every process returns the loss process 0 logged
    logged = json.loads((tmp_path / "work" / "metrics.jsonl").read_text().splitlines()[-1])
    for i in range(2):
        again = json.loads((tmp_path / f"p{i}.npz.json").read_text())
        assert again == {"start_step": 2, "final_step": 2, "final_loss": logged["loss"]}, i

    # the toy MLP: what is under test is the multi-process plumbing (jax.distributed, each
    # process's slice of the batch, the global arrays, checkpoints written by two processes),
    # which does not depend on the network; the digits UNet made this test ~100 s of compiling
    config = cli.load_config(
        str(HERE.parent / "experiments" / "configs" / "toy_2d.py") + ":smoke", []
    )
    single = train.train_and_evaluate(config, str(tmp_path / "single"))
    flat = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(single["state"].params))
    }
    assert sorted(flat) == sorted(p0.files)
    # as in test_train's data-parallel test: Adam divides by sqrt(v), so where a gradient is ~0
    # float32 reduction-order noise (here: 2 processes vs 1) moves a param by a fraction of one
    # lr-sized step (lr 1e-3): atol 1e-5 is 1% of it.
    for k in p0.files:
        np.testing.assert_allclose(p0[k], flat[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_the_train_command_joins_a_cluster_with_its_distributed_flags(tmp_path):
    """`jax-diffusion train` on every host, with the cluster's flags: one run of 2 processes
    (the batch split between them, one metrics.jsonl), not two runs of one each that write
    the same workdir (each on the full batch, each logging every step)."""
    config = str(HERE.parent / "experiments" / "configs" / "toy_2d.py") + ":smoke"

    def train_command(i, port):
        cluster = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
        return [sys.executable, "-m", "jax_diffusion.cli", "train", "--config", config] + [
            "--workdir", str(tmp_path / "work"), *cluster, "--process-id", str(i)
        ]  # fmt: skip

    _run_two_processes(train_command, JAX_PLATFORMS="cpu", JAX_DIFFUSION_TRACEBACK="1")
    lines = (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # process 0 alone logs
    single = train.train_and_evaluate(cli.load_config(config, []), str(tmp_path / "single"))
    np.testing.assert_allclose(json.loads(lines[-1])["loss"], single["final_loss"], rtol=1e-5)


def test_a_process_id_outside_the_cluster_is_a_usage_error_before_any_work(tmp_path, capsys):
    args = ["train", "--config", "x.py", "--workdir", str(tmp_path / "w")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--num-processes", "2", "--process-id", "2"])
    assert exit_info.value.code == 2
    assert "--process-id must lie in [0, --num-processes=2); got 2" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
