"""One process of the multi-host test: joins a loopback jax.distributed cluster and trains.

Usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT.npz
"""

import json
import os
import sys

# one CPU device per process: XLA_FLAGS from the test holds only the suite's optimisation level
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

pid, nproc, port, workdir, out = sys.argv[1:6]
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=int(nproc), process_id=int(pid)
)
assert jax.process_count() == int(nproc) and jax.device_count() == int(nproc)

from jax_diffusion import cli, train  # noqa: E402

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
config = cli.load_config(
    os.path.join(root, "experiments", "configs", "toy_2d.py") + ":smoke",
    [],  # the toy MLP's smoke config as it is (2 steps), as the test's one-process run
)
summary = train.train_and_evaluate(config, workdir)
params = jax.tree.map(
    lambda x: np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True)),
    summary["state"].params,
)
flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
np.savez(out, **flat)
# the finished run again: nothing is trained or logged, the summary's loss is the logged one
again = train.train_and_evaluate(config, workdir)
with open(out + ".json", "w") as f:
    json.dump({k: again[k] for k in ("start_step", "final_step", "final_loss")}, f)
jax.distributed.shutdown()
