"""Stage outputs whose bytes depend on their content alone."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tf = pytest.importorskip("tensorflow")

from components import outputs  # noqa: E402
from tests.test_dvc_pipeline import REPO, tool_env  # noqa: E402

# A SavedModel like tf.Transform's: a vocabulary table behind a traced function. With `warm`, the process
# first traces other functions, as Beam's workers may before tf.Transform exports its graph.
EXPORT = """
import sys
import tensorflow as tf
for i in range(int(sys.argv[2])):
    tf.function(lambda x: tf.nn.silu(x) + i).get_concrete_function(tf.TensorSpec([], tf.float32))

class Lookup(tf.Module):
    def __init__(self):
        vocabulary = tf.constant(sys.argv[3])  # a vocabulary file named by a tensor, as tf.Transform does
        init = tf.lookup.TextFileInitializer(vocabulary, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                                             tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER)
        self.table = tf.lookup.StaticHashTable(init, -1)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="names")])
    def serve(self, names):
        # a while loop (tf.map_fn: its cond's number is in its redundant placeholders' names) and a custom gradient
        # (tf.nn.silu, Keras' swish: a process-wide id), both numbered by counters as the functions are
        lengths = tf.map_fn(lambda n: tf.nn.silu(tf.cast(tf.strings.length(n), tf.float32)), names,
                            fn_output_signature=tf.float32)
        return {"label": self.table.lookup(names), "silu": lengths}

module = Lookup()
tf.saved_model.save(module, sys.argv[1], signatures={"serving_default": module.serve})
"""


@pytest.mark.slow
def test_a_graph_traced_after_other_functions_gets_the_same_bytes(tmp_path):
    (tmp_path / "vocabulary.txt").write_text("cats\ndogs\n")
    for name, warm in (("a", 0), ("b", 7)):
        subprocess.run(
            [sys.executable, "-c", EXPORT, str(tmp_path / name), str(warm), str(tmp_path / "vocabulary.txt")],
            cwd=REPO,
            env=tool_env(),
            check=True,
            capture_output=True,
        )
    raw = [(tmp_path / name / "saved_model.pb").read_bytes() for name in ("a", "b")]
    assert raw[0] != raw[1]  # the function numbers differ
    # The proto walk gives the bytes of the text-format round trip it replaced, the scratch path replaced too.
    from benchmarks.stabilise_saved_model import compare

    assert str(tmp_path).encode() in raw[1]  # the table's name holds the vocabulary's path
    _, _, same = compare(tmp_path / "b", tmp_path / "compared", scratch=str(tmp_path))
    assert same
    assert str(tmp_path).encode() not in (tmp_path / "compared" / "b_walk" / "saved_model.pb").read_bytes()
    for name in ("a", "b"):
        outputs.stabilise_saved_model(tmp_path / name)
    for file in ("saved_model.pb", "fingerprint.pb"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    served = tf.saved_model.load(str(tmp_path / "a")).signatures["serving_default"]
    assert served(names=tf.constant([b"dogs", b"cats", b"fox"]))["label"].numpy().tolist() == [1, 0, -1]


def test_stage_commands_find_this_interpreter_on_a_bare_path(monkeypatch, tmp_path):
    # A cron job runs .venv/bin/python without activating the virtualenv: the stages' bare `python` must be it.
    from pathlib import Path

    from components import cli

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    found = subprocess.run(["sh", "-c", "command -v python"], env=cli.venv_env(), capture_output=True, text=True)
    assert Path(found.stdout.strip()).parent == Path(sys.executable).parent


def dead_pid() -> int:
    """The id of a process that has ended."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(gone.stdout)


def test_scratch_of_killed_runs_is_removed_and_that_of_live_runs_kept(tmp_path, live_pid):
    import os

    dead = tmp_path / f"finetune-{dead_pid()}-abc"
    alive = tmp_path / f"finetune-{live_pid}-def"  # a live process's
    reused = tmp_path / f"finetune-{os.getpid()}-x_1"  # a killed run's id, now this process's: no run of its own
    no_process = [tmp_path / f"finetune-{pid}-abc" for pid in (0, 10**30)]  # kill(0) signals a group; overflow
    for folder in (dead, alive, reused, *no_process):
        folder.mkdir()
        (folder / "train.data").write_bytes(b"x")
    users = ["finetune-notes.txt", "finetune-abc", f"finetune-{dead_pid()}-abc.txt", "other"]  # not scratch names
    for name in users:
        (tmp_path / name).write_text("a user's")
    assert outputs.remove_stale(tmp_path, "finetune-") == sorted(p.name for p in (dead, reused, *no_process))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, *users])
    (tmp_path / "finetune-x0_1b2c3").mkdir()  # an older release's: mkdtemp's 8 letters, no process id
    assert outputs.remove_stale(tmp_path, "finetune-") == []
    assert outputs.remove_stale(tmp_path, "finetune-", legacy=outputs.MKDTEMP_LEGACY) == ["finetune-x0_1b2c3"]


def test_an_output_a_killed_run_moved_aside_is_put_back(tmp_path, live_pid):

    out = tmp_path / "out"
    live = tmp_path / f".out.old-{live_pid}-1234abcd"  # a concurrent run's, mid-swap: not touched
    live.mkdir()
    with pytest.raises(RuntimeError, match="fails"):
        with outputs.staged_dir(out):
            raise RuntimeError("fails")
    assert not out.exists() and live.is_dir()
    gone = dead_pid()
    aside = tmp_path / f".out.old-{gone}-1234abcd"  # killed between its two renames
    aside.mkdir()
    (aside / "a").write_text("the earlier output")
    (tmp_path / f".out.tmp-{gone}-1234abcd").mkdir()  # its new output, never moved in
    (tmp_path / ".out.old-0a1b2c3d").mkdir()  # an older release's, deleted in place: perhaps half gone
    (tmp_path / f".out.trash-{gone}-5678abcd").mkdir()  # another run, killed while deleting what it replaced
    (tmp_path / f".out.old-{gone}-5678abcd").mkdir()  # its output before the one it moved in: swept, not put back
    with pytest.raises(RuntimeError, match="fails"):
        with outputs.staged_dir(out):
            raise RuntimeError("fails")
    assert (out / "a").read_text() == "the earlier output"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])
    shutil.rmtree(out)
    (tmp_path / ".out.old-0a1b2c3d").mkdir()
    with outputs.staged_dir(out) as new:
        (new / "b").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])  # not restored: removed
    assert [p.name for p in out.iterdir()] == ["b"]
    # killed after moving the new output in: DVC deletes that output before the next run, and the one
    # before it, still aside, is not put back
    shutil.rmtree(out)
    (tmp_path / f".out.old-{gone}-9999abcd").mkdir()
    with pytest.raises(RuntimeError, match="fails"):
        with outputs.staged_dir(out):
            raise RuntimeError("fails")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_a_staged_output_leaves_a_concurrent_runs_folder_alone(tmp_path, live_pid):

    killed = tmp_path / f".out.tmp-{dead_pid()}-1234abcd"
    running = tmp_path / f".out.tmp-{live_pid}-1234abcd"  # a live process's
    for folder in (killed, running):
        folder.mkdir()
    with outputs.staged_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert (tmp_path / "out" / "a").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", running.name])


@pytest.mark.parametrize(
    "refused, error, message",
    [
        # the new output cannot be moved into place
        (lambda src, out: ".out.tmp-" in str(src), OSError("no room"), "no room"),
        # an output that is a mount point cannot be renamed (EBUSY): the new output, staged beside it (gigabytes
        # for extract), stayed on disk until a later run swept it
        (
            lambda src, out: Path(src) == out,
            OSError(errno.EBUSY, "Device or resource busy (mount point)"),
            "mount point",
        ),
    ],
    ids=["into_place", "aside"],
)
def test_a_failed_move_leaves_the_earlier_output_and_no_staging(tmp_path, monkeypatch, refused, error, message):
    import os

    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("the earlier output")
    replace = os.replace

    def refuse(src, dst):
        if refused(src, out):
            raise error
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match=message):
        with outputs.staged_dir(out) as new:
            (new / "b").write_text("new")
    assert [p.name for p in out.iterdir()] == ["a"] and (out / "a").read_text() == "the earlier output"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_packed_message_is_renamed_as_a_message_not_as_bytes():
    # An Any holds a serialised message: renaming inside its bytes would break their length prefixes.
    from google.protobuf import any_pb2
    from tensorflow.core.framework import function_pb2, op_def_pb2

    packed = any_pb2.Any()
    packed.Pack(function_pb2.FunctionDef(signature=op_def_pb2.OpDef(name="__inference_serve_123")))
    outputs._StringRewrite({"__inference_serve_123": "__inference_serve_0"}, "", outputs.SCRATCH).message(packed)
    unpacked = function_pb2.FunctionDef()
    assert packed.Unpack(unpacked) and unpacked.signature.name == "__inference_serve_0"
