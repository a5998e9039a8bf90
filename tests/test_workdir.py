"""The training workdir: every file goes through etils.epath, so gs:// works like a local path.

No network: the gs:// test swaps epath's backends (`epath.testing.mock_epath`, public API) for
the local file system under a temporary 'bucket' directory. Orbax and tensorboardX have their
own gs:// support (tensorstore, google-cloud-storage), so they are pointed at the same
directory; any file written with plain `open` / `os.makedirs` would instead appear as
`./gs:/...` under the current directory, which the tests assert stays empty.
"""

import json
import os
import pathlib

import pytest
import tensorboardX
from etils import epath
from etils.epath import gpath

from jax_diffusion import cli, train
from jax_diffusion.checkpoints import CheckpointManager

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = f"{ROOT / 'experiments' / 'configs' / 'default.py'}:smoke"


def smoke_config():
    # the smoke config of test_train / test_cli (persistent compile cache hits)
    return cli.load_config(SMOKE)


def run_files(workdir: pathlib.Path) -> set[str]:
    return {str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file()}


def assert_complete_run(workdir: pathlib.Path, config) -> None:
    """The files of a finished 2-step smoke run; config.json as `jax-diffusion train` wrote it."""
    files = run_files(workdir)
    assert {"config.json", "data_info.json", "metrics.jsonl", "samples/step_0000002.png"} <= files
    assert any(f.startswith("checkpoints/2/") for f in files)
    assert any(f.startswith("tensorboard/events") for f in files)
    assert (workdir / "config.json").read_text() == config.to_json(indent=2)
    assert json.loads((workdir / "data_info.json").read_text()) == {
        "shape": [8, 8, 1],
        "num_classes": 10,
    }
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_run_started_from_python_is_loadable_and_samples_from_the_cli(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    config = smoke_config()
    summary = train.train_and_evaluate(config, "run")  # relative: resolved against the cwd
    assert os.listdir(tmp_path) == ["run"]  # nothing written outside the workdir
    assert_complete_run(tmp_path / "run", config)
    assert summary["samples"] == os.path.join("run", "samples", "step_0000002.png")

    loaded, shape, _, _, step = train.load_run("run")
    assert loaded.to_json() == config.to_json() and shape == (8, 8, 1) and step == 2
    capsys.readouterr()
    assert cli.main(["sample", "--workdir", "run", "--num", "8", "--out", "run/grid.png"]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": "run/grid.png", "num": 8, "step": 2}
    assert (tmp_path / "run" / "grid.png").read_bytes().startswith(b"\x89PNG")
    assert os.listdir(tmp_path) == ["run"]

    # A resume whose checkpoints do not match the config (say model.base_channels=16: orbax
    # raises ValueError on the shapes) fails in the restore; config.json keeps describing the
    # checkpoints. The failure is forced here: a real failed orbax restore leaves hundreds of
    # unraisable asyncio errors behind.
    def incompatible(self, state, step=None):
        raise ValueError("stored shape (8,) is not compatible with (16,)")

    monkeypatch.setattr(CheckpointManager, "restore", incompatible)
    longer = cli.load_config(SMOKE, ["train.num_steps=4"])
    with pytest.raises(ValueError, match="not compatible"):
        train.train_and_evaluate(longer, "run")
    assert (tmp_path / "run" / "config.json").read_text() == config.to_json(indent=2)


def test_gs_workdir_writes_every_file_through_epath(tmp_path, monkeypatch, capsys):
    bucket = tmp_path / "fake_gcs"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def local(path) -> str:
        path = os.fspath(path)
        return str(bucket / path.removeprefix("gs://")) if path.startswith("gs://") else path

    def one_path(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two_paths(fn, src, dst, *args, **kwargs):
        return fn(local(src), local(dst), *args, **kwargs)

    fake = {name: one_path for name in ("open", "exists", "isdir", "listdir", "stat", "walk")}
    fake |= {name: one_path for name in ("makedirs", "mkdir", "remove", "rmtree")}
    fake |= {name: two_paths for name in ("rename", "replace", "copy")}
    # with TensorFlow installed epath sends gs:// to tf.io.gfile, around the mocked backends
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False, raising=False)
    monkeypatch.setattr(train, "CheckpointManager", lambda w, **k: CheckpointManager(local(w), **k))
    summary_writer = tensorboardX.SummaryWriter
    monkeypatch.setattr(tensorboardX, "SummaryWriter", lambda d, **k: summary_writer(local(d), **k))

    config = smoke_config()
    with epath.testing.mock_epath(**fake):
        summary = train.train_and_evaluate(config, "gs://bucket/run")
        assert summary["samples"] == "gs://bucket/run/samples/step_0000002.png"
        loaded, shape, _, _, step = train.load_run("gs://bucket/run")
        capsys.readouterr()
        out = "gs://bucket/run/grid.png"
        assert cli.main(["sample", "--workdir", "gs://bucket/run", "--num", "8", "--out", out]) == 0
        assert json.loads(capsys.readouterr().out)["out"] == out
    assert os.listdir(cwd) == []  # no ./gs:/bucket/run from a plain open or os.makedirs
    assert_complete_run(bucket / "bucket" / "run", config)
    assert (bucket / "bucket" / "run" / "grid.png").read_bytes().startswith(b"\x89PNG")
    assert loaded.to_json() == config.to_json() and shape == (8, 8, 1) and step == 2


def test_config_json_can_not_represent_fails_before_the_workdir_is_created(tmp_path):
    config = smoke_config()
    config.train.callback = object()  # what `load_run` could never read back
    with pytest.raises(TypeError, match="not JSON serializable"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_writer_keeps_the_lines_up_to_the_resumed_step_and_appends(tmp_path):
    lines = ['{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 2.0}', '{"step": 3, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    writer = train._Writer(tmp_path, start=2)
    writer.write(3, {"loss": 3.5})
    writer.close()
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3]
    # a last line a kill cut after its closing brace gets its newline back before the append
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:2]))
    writer = train._Writer(tmp_path, start=2)
    writer.write(3, {"loss": 3.5})
    writer.close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[1:] == [
        lines[1],
        '{"step": 3, "loss": 3.5}',
    ]


class Killed(BaseException):
    """A kill in the middle of a write (what KeyboardInterrupt or SIGKILL leave)."""


def kill_mid_write(monkeypatch, cls, name):
    """`cls.write_text` on a file called `name` (or a temporary one for it, `name` + a
    suffix) writes half its text, then raises Killed."""
    real = cls.write_text

    def write_text(self, text, *args, **kwargs):
        if self.name.startswith(name):
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise Killed
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(cls, "write_text", write_text)


def test_a_kill_while_the_writer_drops_a_killed_run_s_lines_keeps_the_logged_ones(
    tmp_path, monkeypatch
):
    lines = ['{"step": 1, "loss": 1.0}\n', '{"step": 2, "loss": 2.0}\n', '{"step": 3, "lo']
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    kill_mid_write(monkeypatch, pathlib.Path, "metrics.jsonl")
    with pytest.raises(Killed):
        train._Writer(tmp_path, start=2)
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text().startswith("".join(lines[:2]))
    writer = train._Writer(tmp_path, start=2)  # the next resume
    writer.close()
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:2])


def _tensorboard_events(directory):
    """The Event protos of the TFRecord files in `directory` (length, crc, data, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(directory.glob("events*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
            i += 12 + n + 4
    return events


def test_writer_purges_the_tensorboard_steps_after_the_resumed_one(tmp_path):
    from tensorboardX.proto import event_pb2

    writer = train._Writer(tmp_path, start=2)
    writer.write(3, {"loss": 3.5})
    writer.close()
    events = _tensorboard_events(tmp_path / "tensorboard")
    # TensorBoard drops the earlier events at steps >= a SessionLog.START's step: those a
    # killed run wrote after step 2, not step 2's own
    starts = [e.step for e in events if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [3]
    assert [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value] == [
        (3, "loss", 3.5)
    ]


def test_writer_sync_puts_every_event_written_so_far_in_its_file(tmp_path):
    # tensorboardX's flush() left queued events behind: a kill after the checkpoint that
    # followed lost them for good (the resumed run purges only what comes after it)
    writer = train._Writer(tmp_path, start=0)
    for step in (1, 2, 3):
        writer.write(step, {"loss": float(step)})
    writer.sync()
    on_disk = _tensorboard_events(tmp_path / "tensorboard")  # read before the writer closes
    assert [(e.step, v.simple_value) for e in on_disk for v in e.summary.value] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
    ]
    writer.write(4, {"loss": 4.0})  # into a new file, read after the first
    writer.close()
    events = _tensorboard_events(tmp_path / "tensorboard")
    assert [e.step for e in events for v in e.summary.value] == [1, 2, 3, 4]
