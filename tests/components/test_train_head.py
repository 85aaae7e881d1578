import json
import shutil
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from components import train_head, training  # noqa: E402
from components.download import CommonParams  # noqa: E402
from pipelines import extract as graph  # noqa: E402
from tests.conftest import open_files_under  # noqa: E402

SIZE = 12


def write_features(folder, split, n, rng, centers, labels=None):
    folder.mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, len(centers), n) if labels is None else labels
    with tf.io.TFRecordWriter(str(folder / f"{split}-00000-of-00001.tfrecord")) as writer:
        for i, label in enumerate(labels):
            values = centers[label % len(centers)] + rng.normal(0, 1, SIZE)  # a bad label still gets features
            writer.write(graph.feature_example(f"{split}{i}".encode(), int(label), values))


def toy_extract(tmp_path, num_classes=2, labels_override=None):
    extract_dir = tmp_path / "extract"
    centers = np.random.default_rng(0).normal(0, 3.0, (num_classes, SIZE))  # one cluster per class
    for seed, (split, n) in enumerate((("train", 120), ("val", 40))):
        override = labels_override if split == "val" else None
        write_features(extract_dir / "features", split, n, np.random.default_rng(seed + 1), centers, override)
    (extract_dir / "features.json").write_text(json.dumps({"feature_size": SIZE, "feature_shape": [SIZE]}))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([f"class{i}" for i in range(num_classes)]))
    return extract_dir, labels


@pytest.mark.parametrize("num_classes", [2, 3])
def test_head_learns_a_separable_problem(tmp_path, num_classes):
    extract_dir, labels = toy_extract(tmp_path, num_classes)
    params = train_head.TrainHeadParams(hidden_units=8, dropout=0.0, epochs=40, learning_rate=0.01, patience=10)
    record = train_head.run(
        train_head.Config(CommonParams(seed=3), params), extract_dir, labels, tmp_path / "out", tmp_path / "live"
    )
    assert record["val_accuracy"] > 0.9  # chance is 1/num_classes
    assert json.loads((tmp_path / "out" / "history.json").read_text())["trained_on"] == training.trained_on()
    assert open_files_under(extract_dir) == []  # the feature files closed when training is done
    for name in train_head.DECLARED_OUTPUTS:
        assert (tmp_path / "out" / name).exists()
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert metrics["val_accuracy"] == pytest.approx(record["val_accuracy"])
    assert (tmp_path / "live" / "plots" / "metrics" / "val_loss.tsv").exists()
    import keras

    head = keras.saving.load_model(tmp_path / "out" / "head.keras")
    assert head.output_shape[-1] == (1 if num_classes == 2 else num_classes)
    # The reported val accuracy is the saved head's, recomputed here from the val feature records.
    import tensorflow as tf

    from pipelines import features as fk

    spec = fk.features_feature_spec(SIZE)
    rows = [
        tf.io.parse_single_example(r, spec)
        for r in tf.data.TFRecordDataset(sorted(str(p) for p in (extract_dir / "features").glob("val-*")))
    ]
    outputs = head.predict_on_batch(np.stack([r[fk.FEATURES].numpy() for r in rows]))
    predicted = (outputs[:, 0] > 0.5).astype(int) if num_classes == 2 else outputs.argmax(axis=1)
    assert record["val_accuracy"] == pytest.approx(np.mean(predicted == np.array([r[fk.LABEL].numpy() for r in rows])))


def test_the_saved_head_is_the_best_epochs_and_training_stops_early(tmp_path):
    """Early stopping with the best epoch's weights restored: with the callback gone (or restoring nothing) the
    learning tests above still passed, and history.json's best epoch named another head than the one saved."""
    extract_dir, labels = toy_extract(tmp_path, 2)
    noise = np.zeros((2, SIZE))  # features unrelated to the labels: the head learns train by heart, val loss rises
    for seed, (split, n) in enumerate((("train", 60), ("val", 40))):
        write_features(extract_dir / "features", split, n, np.random.default_rng(seed + 7), noise)
    params = train_head.TrainHeadParams(hidden_units=32, dropout=0.0, epochs=40, learning_rate=0.05, patience=3)
    record = train_head.run(
        train_head.Config(CommonParams(seed=3), params), extract_dir, labels, tmp_path / "out", tmp_path / "live"
    )
    val_losses = record["history"]["val_loss"]
    assert record["epochs_run"] < params.epochs
    assert record["best_epoch"] == int(np.argmin(val_losses)) + 1 < record["epochs_run"]
    assert record["val_loss"] == pytest.approx(min(val_losses), rel=1e-5)  # the saved head is the best epoch's
    assert record["val_loss"] < val_losses[-1]


def test_same_seed_same_head(tmp_path):
    extract_dir, labels = toy_extract(tmp_path)
    params = train_head.TrainHeadParams(hidden_units=4, epochs=3)
    runs = [
        train_head.run(
            train_head.Config(CommonParams(seed=5), params), extract_dir, labels, tmp_path / f"o{i}", tmp_path / f"l{i}"
        )
        for i in range(2)
    ]
    assert runs[0]["history"] == runs[1]["history"]


def test_label_outside_vocabulary_is_a_clear_error(tmp_path):
    extract_dir, labels = toy_extract(tmp_path, labels_override=np.array([0, 1, 2, 1] * 10))
    with pytest.raises(ValueError, match=r"labels \[2\] are outside the vocabulary of 2 classes"):
        train_head.run(
            train_head.Config(CommonParams(), train_head.TrainHeadParams(epochs=1)),
            extract_dir,
            labels,
            tmp_path / "out",
            tmp_path / "live",
        )
    assert not (tmp_path / "out").exists()


def test_why_the_epoch_logger_is_ours_and_not_dvclives(tmp_path):
    """dvclive's DVCLiveCallback binds to tf.keras (tf_keras once tensorflow_transform set TF_USE_LEGACY_KERAS)
    and renames val_loss to eval/loss: components.training.live_callback keeps Keras 3 and Keras's names."""
    import os
    import subprocess
    import sys

    from dvclive.utils import standardize_metric_name

    assert standardize_metric_name("val_loss", "dvclive.keras") == "eval/loss"  # our plots are val_loss.tsv
    probe = (
        "import keras; from dvclive.keras import DVCLiveCallback; "
        "print(issubclass(DVCLiveCallback, keras.callbacks.Callback))"
    )
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"  # not a Keras 3 callback in a process that imported tf.Transform


def test_balanced_class_weights_by_hand():
    from components import training

    assert training.class_weights([100, 50, 50], "none") is None
    assert training.class_weights([100, 50, 50], "balanced") == pytest.approx({0: 2 / 3, 1: 4 / 3, 2: 4 / 3})
    with pytest.raises(ValueError, match=r"classes \[1\] have no training images"):
        training.class_weights([10, 0, 5], "balanced")


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [2, 3])
def test_balanced_class_weights_move_predictions_to_the_rare_classes(tmp_path, num_classes):
    """Overlapping classes, 90% of the training images in class 0: unweighted, the head mostly answers class 0;
    balanced, it answers the rare classes more often (the binary sigmoid head and the softmax one)."""
    rng = np.random.default_rng(5)
    centers = rng.normal(0, 0.6, (num_classes, SIZE))
    train_labels = np.array([0] * 108 + [1 + i % (num_classes - 1) for i in range(12)])
    write_features(tmp_path / "extract" / "features", "train", 120, rng, centers, train_labels)
    write_features(tmp_path / "extract" / "features", "val", 60, rng, centers, np.arange(60) % num_classes)
    (tmp_path / "extract" / "features.json").write_text(json.dumps({"feature_size": SIZE, "feature_shape": [SIZE]}))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([f"class{i}" for i in range(num_classes)]))
    import keras

    from components import training

    rare = {}
    for mode in ("none", "balanced"):
        params = train_head.TrainHeadParams(hidden_units=0, dropout=0.0, epochs=30, patience=30, class_weight=mode)
        out = tmp_path / mode
        record = train_head.run(
            train_head.Config(CommonParams(seed=3), params), tmp_path / "extract", labels, out, tmp_path / "live"
        )
        expected = training.class_weights(np.bincount(train_labels, minlength=num_classes), mode)
        assert record["class_weight"] == (None if expected is None else {f"class{i}": w for i, w in expected.items()})
        head = keras.saving.load_model(out / "head.keras")
        val = train_head.feature_dataset(
            [str(p) for p in sorted((tmp_path / "extract" / "features").glob("val-*"))], SIZE, num_classes, 60, None
        )
        probs = head.predict(val, verbose=0)
        predicted = (probs[:, 0] > 0.5).astype(int) if num_classes == 2 else probs.argmax(axis=1)
        rare[mode] = int(np.sum(predicted != 0))
        # The val loss and accuracy the best epoch went by weigh each class as the training loss does.
        truth = np.arange(60) % num_classes
        weight = np.ones(60) if expected is None else np.array([expected[c] for c in truth])
        p = np.clip(probs.astype("float64"), 1e-7, 1 - 1e-7)
        if num_classes == 2:
            losses = -(truth * np.log(p[:, 0]) + (1 - truth) * np.log(1 - p[:, 0]))
        else:
            losses = -np.log(p[np.arange(60), truth])
        assert record["val_loss"] == pytest.approx(np.mean(weight * losses), rel=1e-4)
        assert record["val_accuracy"] == pytest.approx(np.sum(weight * (predicted == truth)) / weight.sum(), rel=1e-5)
        assert record.get("val_weighted", False) is (mode == "balanced")
    assert rare["balanced"] > rare["none"] + 5, rare


def test_a_diverged_epoch_is_never_the_recorded_best():
    nan = float("nan")
    assert train_head.best_epoch_of([nan, 0.5, 0.3, 0.3]) == 2  # was 0: nothing compares below a NaN
    assert train_head.best_epoch_of([0.5, nan, 0.4]) == 2
    assert train_head.best_epoch_of([0.2, 0.2]) == 0


def test_the_head_reads_its_features_from_the_files_every_epoch(tmp_path):
    """The README: memory flat in the dataset size, the features read from the files each epoch. An in-memory cache
    of the records (`.cache()`, as before 2026-12-04) passed every other test of the stage."""
    from pipelines import records

    extract_dir, _ = toy_extract(tmp_path)
    files = records.split_files(extract_dir / "features", "train")
    dataset = train_head.feature_dataset(files, SIZE, 2, 8, 1)
    graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())
    ops = {node.op for node in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    assert not [op for op in ops if "Cache" in op], ops
    cached = tf.compat.v1.GraphDef.FromString(dataset.cache()._as_serialized_graph().numpy())
    assert any("Cache" in node.op for node in cached.node)  # what the check looks for is there


def test_a_diverged_run_writes_nothing_and_names_the_learning_rate(tmp_path):
    """A review: one NaN feature value in one training record made every weight NaN, and the stage saved that head
    with exit 0, a bare NaN in history.json and dvclive's metrics.json (JSON forbids it), and the dvclive folder
    describing the failed run beside the previous run's head. Now nothing is written, the earlier outputs stay as
    they were, and the error says what to try."""
    from tests.conftest import tree_bytes

    extract_dir, labels = toy_extract(tmp_path)
    params = train_head.TrainHeadParams(hidden_units=4, dropout=0.0, epochs=3, patience=2)
    config = train_head.Config(CommonParams(seed=3), params)
    out, live = tmp_path / "out", tmp_path / "live"
    train_head.run(config, extract_dir, labels, out, live)
    before = tree_bytes(out), tree_bytes(live)
    centers = np.random.default_rng(0).normal(0, 3.0, (2, SIZE))
    write_features(extract_dir / "features", "train", 120, np.random.default_rng(1), centers)
    with tf.io.TFRecordWriter(str(extract_dir / "features" / "train-00000-of-00001.tfrecord")) as writer:
        for i in range(120):
            values = centers[i % 2] + np.random.default_rng(i).normal(0, 1, SIZE)
            values[0] = np.nan if i == 5 else values[0]
            writer.write(graph.feature_example(f"train{i}".encode(), i % 2, values))
    with pytest.raises(training.Diverged, match=r"train_head: training diverged: .*Lower train_head\.learning_rate"):
        train_head.run(config, extract_dir, labels, out, live)
    assert (tree_bytes(out), tree_bytes(live)) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_history_values_that_are_not_finite_are_json_null():
    assert training.finite_or_none([0.5, float("nan"), float("inf"), np.float32(0.25)]) == [0.5, None, None, 0.25]


def test_a_nan_first_epoch_is_never_the_best_one():
    """A review: Keras's EarlyStopping took a NaN first epoch as the best (nothing compares below NaN), stopped after
    `patience` epochs that were improving, and restored the NaN epoch's weights, while history.json named another
    epoch. The stage's early stopping never counts a NaN epoch as an improvement."""
    import keras

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    stop = train_head.FiniteEarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    stop.set_model(model)
    model.stop_training = False  # as fit sets it
    stop.on_train_begin()
    for epoch, loss in enumerate([float("nan"), 0.6, 0.5, 0.4, 0.3]):
        model.set_weights([np.full((1, 1), epoch, "float32"), np.zeros(1, "float32")])
        stop.on_epoch_end(epoch, {"val_loss": loss})
        assert not model.stop_training, epoch
    stop.on_train_end()
    assert model.get_weights()[0][0, 0] == 4  # the lowest loss's weights
    assert train_head.best_epoch_of([float("nan"), 0.6, 0.5, 0.4, 0.3]) == 4


def test_an_empty_val_split_is_refused_before_training(tmp_path):
    extract_dir, labels = toy_extract(tmp_path)
    write_features(extract_dir / "features", "val", 0, np.random.default_rng(2), np.zeros((2, SIZE)))
    params = train_head.TrainHeadParams(hidden_units=4, epochs=3)
    with pytest.raises(ValueError, match="the val split of .* has no records"):
        train_head.run(
            train_head.Config(CommonParams(seed=3), params), extract_dir, labels, tmp_path / "out", tmp_path / "live"
        )
    assert not (tmp_path / "out").exists()


def test_a_run_that_diverges_after_its_best_epoch_keeps_it_with_nulls_in_its_history(tmp_path, monkeypatch):
    """The best epoch's weights are kept (finite), the epochs after it are null in history.json (plain JSON), and the
    dvclive folder is this run's."""
    import keras

    real = training.live_callback

    def poisoned_after_the_second_epoch(live):
        inner = real(live)

        class Poison(keras.callbacks.Callback):
            def set_model(self, model):
                super().set_model(model)
                inner.set_model(model)

            def on_epoch_end(self, epoch, logs=None):
                inner.on_epoch_end(epoch, logs)
                if epoch == 1:
                    self.model.set_weights([np.full_like(w, np.nan) for w in self.model.get_weights()])

        return Poison()

    monkeypatch.setattr(training, "live_callback", poisoned_after_the_second_epoch)
    extract_dir, labels = toy_extract(tmp_path)
    params = train_head.TrainHeadParams(hidden_units=4, dropout=0.0, epochs=6, patience=2)
    record = train_head.run(
        train_head.Config(CommonParams(seed=3), params), extract_dir, labels, tmp_path / "out", tmp_path / "live"
    )
    text = (tmp_path / "out" / "history.json").read_text()
    history = json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert history["best_epoch"] == 2 and history["history"]["val_loss"][2:] == [None, None]
    assert record["val_loss"] == history["val_loss"] and np.isfinite(history["val_loss"])
    live = json.loads((tmp_path / "live" / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert live["best_epoch"] == 2 and live["val_loss"] == pytest.approx(history["val_loss"])


def test_the_live_folder_is_written_in_place_and_put_back_if_the_run_fails(tmp_path):
    final = tmp_path / "dvclive" / "stage"
    final.mkdir(parents=True)
    (final / "metrics.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with training.live_folder(final) as path:
            assert path == final and not final.exists()  # this run's epochs go where a user watches
            final.mkdir()
            (final / "metrics.json").write_text("partial")
            raise KeyboardInterrupt
    assert (final / "metrics.json").read_text() == "old"
    with training.live_folder(final) as path:
        path.mkdir()
        (path / "metrics.json").write_text("new")
    assert (final / "metrics.json").read_text() == "new" and sorted(p.name for p in final.parent.iterdir()) == ["stage"]


def test_a_killed_runs_metrics_give_way_to_the_previous_runs(tmp_path, live_pid):
    """A review: a killed run's moved-aside folder (the only copy of the kept model's metrics: metrics.json is not
    in DVC's cache) was swept by the next run, which then moved the killed run's half-written folder aside as the
    previous run's and, when it failed too, put that back. The next run now puts the previous run's back first."""
    from tests.components.test_outputs import dead_pid

    final = tmp_path / "dvclive" / "stage"
    final.mkdir(parents=True)
    (final / "metrics.json").write_text("killed, epoch 1")  # the killed run wrote in place ...
    aside = final.parent / f".stage.prev-{dead_pid()}-abcd1234"
    aside.mkdir()
    (aside / "metrics.json").write_text("old")  # ... after moving the kept model's metrics aside
    running = final.parent / f".stage.prev-{live_pid}-ef012345"  # another run's, still going: left alone
    running.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with training.live_folder(final) as path:
            path.mkdir()
            (path / "metrics.json").write_text("partial")
            raise KeyboardInterrupt
    assert (final / "metrics.json").read_text() == "old"
    assert sorted(p.name for p in final.parent.iterdir()) == sorted(["stage", running.name])
    # A killed first run (nothing before it): its folder goes, and so does the next run's if that one fails.
    running.rmdir()
    shutil.rmtree(final)
    killed = final.parent / f".stage.prev-{dead_pid()}-abcd1234"
    killed.mkdir()
    (killed / training.ABSENT).touch()
    final.mkdir()
    (final / "metrics.json").write_text("killed, epoch 1")
    with pytest.raises(KeyboardInterrupt):
        with training.live_folder(final) as path:
            assert not path.exists()
            path.mkdir()
            raise KeyboardInterrupt
    assert list(final.parent.iterdir()) == []
    with training.live_folder(final) as path:  # and a run that finishes leaves its own folder only
        path.mkdir()
        (path / "metrics.json").write_text("new")
    assert (final / "metrics.json").read_text() == "new" and [p.name for p in final.parent.iterdir()] == ["stage"]


def test_a_model_that_cannot_be_committed_keeps_the_previous_runs_metrics(tmp_path, monkeypatch):
    """A review: the dvclive folder was committed (the previous run's deleted) before the model, so a model folder
    that could not be moved in (EBUSY: a mount point) left the old head beside the new run's metrics."""
    from components import outputs
    from tests.conftest import tree_bytes

    extract_dir, labels = toy_extract(tmp_path)
    config = train_head.Config(CommonParams(seed=3), train_head.TrainHeadParams(hidden_units=0, epochs=2))
    out, live = tmp_path / "out", tmp_path / "live"
    train_head.run(config, extract_dir, labels, out, live)
    before = tree_bytes(out), tree_bytes(live)
    real = outputs.os.replace

    def busy(src, dst):
        if Path(src) == out:
            raise OSError(16, "Device or resource busy", str(src))
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", busy)
    other = train_head.Config(CommonParams(seed=4), train_head.TrainHeadParams(hidden_units=0, epochs=3))
    with pytest.raises(OSError, match="busy"):
        train_head.run(other, extract_dir, labels, out, live)
    assert (tree_bytes(out), tree_bytes(live)) == before


def test_the_machine_record_names_the_gpus_and_keras_settings(monkeypatch):
    """A history's `trained_on` is what a rebuild elsewhere explains its bits by (tools.audit): a GPU runs the
    kernels instead of the CPU, and `~/.keras/keras.json`'s float type changes every weight; neither was in it.
    Each is named where it is not the default, so a record of this CPU machine is what it was before."""
    import keras

    from pipelines import fingerprint

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])  # a machine without a GPU
    for name, value in fingerprint.KERAS_DEFAULTS.items():
        monkeypatch.setattr(keras.config, name, lambda value=value: value)
    assert training.trained_on() == fingerprint.machine_record()  # as recorded before
    monkeypatch.setattr(keras.config, "floatx", lambda: "float64")
    assert training.trained_on()["keras_config"]["floatx"] == "float64"
    monkeypatch.setattr(
        tf.config, "list_physical_devices", lambda kind=None: [tf.config.PhysicalDevice("/gpu:0", "GPU")]
    )
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda device: {"device_name": "NVIDIA H100"})
    gpus = training.trained_on()["gpus"]
    assert gpus == [{"name": "/gpu:0", "device_name": "NVIDIA H100"}]
