import collections
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from components import finetune, train_head, training  # noqa: E402
from components.conv_base import ConvBaseParams  # noqa: E402
from components.download import CommonParams  # noqa: E402
from components.params import ParamsError, parse_section  # noqa: E402
from pipelines import classifier  # noqa: E402
from tests.conftest import REPO, open_files_under, tree_bytes  # noqa: E402


@pytest.fixture
def base_params(tiny_base_weights):
    return ConvBaseParams(name="mobilenet_v2", weights=str(tiny_base_weights), input_size=(32, 32), pooling="avg")


@pytest.fixture
def head_path(tmp_path):
    keras.utils.set_random_seed(2)
    head = train_head.build_head(1280, 2, train_head.TrainHeadParams(hidden_units=0, dropout=0.0))
    path = tmp_path / "head.keras"
    head.save(path)
    return path


def layer_weights(model):
    return {layer.name: [w.numpy().copy() for w in layer.weights] for layer in classifier.find_base(model).layers}


def changed(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("train_batch_norm", [False, True])
def test_only_the_top_of_the_base_trains_and_batch_norm_statistics_stay(
    converted_tiny, base_params, head_path, tmp_path, train_batch_norm
):
    params = finetune.FinetuneParams(
        unfreeze_from="block_16_expand",
        train_batch_norm=train_batch_norm,
        optimizer="sgd",
        learning_rate=0.05,
        epochs=2,
        batch_size=4,
        patience=5,
        keep_better_start=False,
        class_weight="balanced" if train_batch_norm else "none",  # the same run checks the class weights
    )
    if params.class_weight == "balanced":
        # Classes that weigh differently: the tiny set is balanced, so its convert summary is made to say the
        # first class has three times the training images (finetune's weights come from those counts).
        converted_tiny = shutil.copytree(converted_tiny, tmp_path / "convert")
        summary = json.loads((converted_tiny / "summary.json").read_text())
        summary["per_class"]["train"][min(summary["per_class"]["train"])] *= 3
        (converted_tiny / "summary.json").write_text(json.dumps(summary))
    before = finetune.build_classifier(base_params, head_path)
    record = finetune.run(
        finetune.Config(CommonParams(seed=1), base_params, params),
        converted_tiny,
        head_path,
        tmp_path / "out",
        tmp_path / "live",
    )
    for name in finetune.DECLARED_OUTPUTS:
        assert (tmp_path / "out" / name).exists()
    assert record["unfrozen_layers"][0] == "block_16_expand"
    # Balanced class weights come from the training split's counts (convert's summary.json).
    summary = json.loads((converted_tiny / "summary.json").read_text())
    labels = json.loads((converted_tiny / "labels.json").read_text())
    expected = training.class_weights([summary["per_class"]["train"][name] for name in labels], params.class_weight)
    if expected is None:
        assert record["class_weight"] is None
    else:
        assert record["class_weight"] == {name: pytest.approx(expected[i]) for i, name in enumerate(labels)}
    after = keras.saving.load_model(tmp_path / "out" / finetune.MODEL)
    old, new = layer_weights(before), layer_weights(after)
    names = [layer.name for layer in classifier.find_base(after).layers]
    start = names.index("block_16_expand")
    for index, layer in enumerate(classifier.find_base(after).layers):
        if not layer.weights:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma_beta_moved = changed(old[layer.name][:2], new[layer.name][:2])
            assert not changed(old[layer.name][2:], new[layer.name][2:]), f"{layer.name}: moving statistics changed"
            assert gamma_beta_moved == (train_batch_norm and index >= start), layer.name
        elif index < start:
            assert not changed(old[layer.name], new[layer.name]), (
                f"{layer.name} is below the unfreeze point but changed"
            )
        else:
            assert changed(old[layer.name], new[layer.name]), f"{layer.name} is unfrozen but did not change"
    assert changed(
        [w.numpy() for w in before.get_layer("head").weights], [w.numpy() for w in after.get_layer("head").weights]
    )
    live = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert live["val_loss"] == pytest.approx(record["val_loss"])
    # The saved model takes raw pixels: its predictions on the val records are probabilities.
    from pipelines import records

    pixels, truth = next(
        iter(records.image_dataset(records.split_files(converted_tiny / "records", "val"), (32, 32), 999, binary=True))
    )
    out = after.predict_on_batch(pixels)
    assert out.shape == (len(pixels), 1) and ((out >= 0) & (out <= 1)).all()
    # The val loss the best epoch went by weighs each class as the training loss does.
    truth = truth.numpy().astype(int)
    weight = np.ones(len(truth)) if expected is None else np.array([expected[c] for c in truth])
    losses = keras.losses.binary_crossentropy(truth[:, None].astype("float32"), after(pixels)).numpy()  # by the logit
    assert record["val_loss"] == pytest.approx(np.mean(weight * losses), rel=1e-4, abs=1e-6)
    assert record.get("val_weighted", False) is (expected is not None)


def test_unfreeze_top_counts_layers_from_the_end(base_params, head_path):
    model = finetune.build_classifier(base_params, head_path)
    trainable = finetune.prepare_for_finetuning(model, base_params, finetune.FinetuneParams(unfreeze_top=3))
    base = classifier.find_base(model)
    assert [layer.name for layer in base.layers if layer.trainable] == [
        layer.name for layer in base.layers[-3:] if not isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert trainable == [
        "Conv_1"
    ]  # block_16_project_BN, Conv_1, Conv_1_bn, out_relu: only Conv_1 has weights and is not BN
    # The registry's default unfreeze point is the top block.
    model = finetune.build_classifier(base_params, head_path)
    assert finetune.prepare_for_finetuning(model, base_params, finetune.FinetuneParams())[0] == "block_16_expand"


def test_bad_unfreeze_points_are_clear_errors(base_params, head_path, tmp_path):
    model = finetune.build_classifier(base_params, head_path)
    with pytest.raises(
        ParamsError, match=r"finetune\.unfreeze_from: .* has no layer 'block_16_expnd' \(did you mean 'block_16_expand'"
    ):
        finetune.prepare_for_finetuning(model, base_params, finetune.FinetuneParams(unfreeze_from="block_16_expnd"))
    with pytest.raises(ParamsError, match=r"finetune\.unfreeze_top: the base has \d+ layers, got 100000"):
        finetune.prepare_for_finetuning(model, base_params, finetune.FinetuneParams(unfreeze_top=100000))
    with pytest.raises(ParamsError, match="at most one of unfreeze_from and unfreeze_top"):
        parse_section(finetune.FinetuneParams, "finetune", {"unfreeze_from": "x", "unfreeze_top": 2})
    with pytest.raises(ParamsError, match=r"finetune\.augment\.flip: "):
        parse_section(finetune.FinetuneParams, "finetune", {"augment": {"flip": "sideways"}})
    # A saved base has no registry default: the unfreeze point must be set.
    saved = tmp_path / "base.keras"
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3)).save(saved)
    saved_params = ConvBaseParams(name=None, path=str(saved), input_size=(32, 32), pooling="avg")
    model = finetune.build_classifier(saved_params, head_path)
    with pytest.raises(ParamsError, match=r"a saved base \(conv_base\.path\) has no registry default"):
        finetune.prepare_for_finetuning(model, saved_params, finetune.FinetuneParams())


def test_a_saved_or_tapped_base_without_an_unfreeze_point_is_refused_with_the_params(tmp_path):
    """The rule is the params' alone, but it was checked only when finetune built the model, so `tools.preset` and
    `tools.sweep` (which validate through `load_config`) let it through to run download, convert, extract,
    train_head and quality first."""
    import yaml

    def params_with(conv_base, finetune_params):
        data = yaml.safe_load((REPO / "params.yaml").read_text())
        data["conv_base"].update(conv_base)
        data["finetune"].update(finetune_params)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    with pytest.raises(ParamsError, match=r"finetune\.unfreeze_from: the base is tapped at conv_base\.layer='block_13"):
        finetune.load_config(params_with({"layer": "block_13_expand_relu"}, {}))
    with pytest.raises(ParamsError, match=r"finetune\.unfreeze_from: a saved base \(conv_base\.path\) has no"):
        finetune.load_config(params_with({"name": None, "path": "models/base.keras"}, {}))
    assert finetune.load_config(params_with({"layer": "block_13_expand_relu"}, {"unfreeze_top": 5}))
    assert finetune.load_config(params_with({"name": None, "path": "models/base.keras"}, {"unfreeze_from": "x"}))
    assert finetune.load_config(params_with({}, {})).finetune.unfreeze_from is None  # the registry's default


def test_head_for_another_base_is_a_clear_error(base_params, tmp_path):
    head = train_head.build_head(512, 2, train_head.TrainHeadParams(hidden_units=0))
    head.save(tmp_path / "head.keras")
    with pytest.raises(ValueError, match="the head takes 512 features but the conv base gives 1280"):
        finetune.build_classifier(base_params, tmp_path / "head.keras")


def test_augmentation_draws_new_variants_each_call_and_can_be_off():
    augment = finetune.build_augmentation(finetune.AugmentParams(rotation=0.1, zoom=0.2, translation=0.1), seed=3)
    pixels = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32"))
    ds = tf.data.Dataset.from_tensors(pixels).repeat(2).map(augment)  # as in the input pipeline, two epochs
    first, second = [batch.numpy() for batch in ds]
    assert first.shape == pixels.shape
    assert not np.allclose(first, pixels.numpy()) and not np.allclose(first, second)
    off = finetune.AugmentParams(flip="none", rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0)
    assert finetune.build_augmentation(off, seed=3) is None


@pytest.mark.parametrize(
    "flip, views",
    [
        ("both", {"kept", "mirrored", "upside down", "half turn"}),
        ("horizontal", {"kept", "mirrored"}),
        ("vertical", {"kept", "upside down"}),
    ],
)
def test_flips_draw_each_view_the_param_names(flip, views):
    """flip: both draws all four views tta.flip: both averages over, each about as often; Keras's
    "horizontal_and_vertical" drew one choice for both axes, so an image was kept or turned a half turn, never
    mirrored alone (found by a review on 2026-12-07)."""
    params = finetune.AugmentParams(flip=flip, rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0)
    augment = finetune.build_augmentation(params, seed=0)
    image = np.arange(4 * 4 * 3, dtype="float32").reshape(4, 4, 3)  # no symmetry: each view is another array
    named = {"kept": image, "mirrored": image[:, ::-1], "upside down": image[::-1], "half turn": image[::-1, ::-1]}
    seen = collections.Counter()
    for batch in tf.data.Dataset.from_tensors(np.stack([image] * 100)).repeat(4).map(augment):
        for out in batch.numpy():
            seen[next(name for name, view in named.items() if np.array_equal(out, view))] += 1
    assert set(seen) == views
    assert min(seen.values()) > 400 / len(views) * 0.7, seen


def test_head_with_another_class_count_is_a_clear_error(converted_tiny, base_params, tmp_path):
    head = train_head.build_head(1280, 3, train_head.TrainHeadParams(hidden_units=0))  # labels.json has 2 classes
    head.save(tmp_path / "head.keras")
    config = finetune.Config(CommonParams(), base_params, finetune.FinetuneParams(epochs=1))
    with pytest.raises(ValueError, match=r"does not fit the 2 labels of labels.json"):
        finetune.run(config, converted_tiny, tmp_path / "head.keras", tmp_path / "out", tmp_path / "live")
    assert not (tmp_path / "out").exists()


def run_best_epoch(monitor, start, epochs):
    """BestEpoch over (val loss, val accuracy) per epoch; each epoch's weights are [epoch number]."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    model.set_weights([np.zeros((1, 1), "float32")])
    best = finetune.BestEpoch(monitor, start)
    best.set_model(model)
    best.on_train_begin()
    for epoch, (loss, accuracy) in enumerate(epochs):
        model.set_weights([np.full((1, 1), epoch + 1, "float32")])
        best.on_epoch_end(epoch, {"val_loss": loss, "val_accuracy": accuracy})
    return best.epoch, float(best.weights[0][0, 0])


@pytest.mark.parametrize(
    "monitor, start, expected",
    [
        ("val_loss", (0.30, 0.88), 0),  # no epoch's loss is below 0.30: the start
        ("val_loss", None, 4),  # the lowest trained loss
        ("val_accuracy", (0.30, 0.88), 2),  # 0.91 twice: the lower loss of the two
        ("val_accuracy", (0.30, 0.95), 0),  # nothing beats the start's accuracy
        ("val_accuracy", (0.37, 0.91), 2),  # ties the start's accuracy with a lower loss (0.36 < 0.37)
    ],
)
def test_the_best_epoch_follows_the_monitor(monitor, start, expected):
    epochs = [(0.40, 0.90), (0.36, 0.91), (0.38, 0.91), (0.32, 0.89)]
    epoch, weights = run_best_epoch(monitor, start, epochs)
    assert (epoch, weights) == (expected, float(expected))


def test_a_tie_with_the_start_goes_to_the_trained_epoch_and_earlier_epochs_win_ties():
    assert run_best_epoch("val_loss", (0.3, 0.9), [(0.3, 0.8), (0.3, 0.95)]) == (1, 1.0)
    assert run_best_epoch("val_accuracy", (0.3, 0.9), [(0.2, 0.9), (0.2, 0.9)]) == (1, 1.0)
    assert run_best_epoch("val_accuracy", (0.3, 0.9), [(0.4, 0.9)]) == (0, 0.0)  # same accuracy, worse loss


def test_a_diverged_epoch_is_never_the_best():
    """NaN compared False with everything, so a NaN first epoch (a learning rate that diverged) stayed the best."""
    nan = float("nan")
    assert run_best_epoch("val_loss", None, [(nan, 0.5), (0.4, 0.8), (0.3, 0.9)]) == (3, 3.0)
    assert run_best_epoch("val_accuracy", None, [(nan, nan), (0.4, 0.8), (0.5, 0.7)]) == (2, 2.0)
    assert run_best_epoch("val_loss", (0.5, 0.8), [(nan, 0.5), (nan, 0.5)]) == (0, 0.0)  # the start stays
    assert run_best_epoch("val_loss", (nan, 0.5), [(0.9, 0.5)]) == (1, 1.0)  # any number beats a NaN start


def stops_after(monitor, patience, epochs):
    """The epoch (1-based) after which BestEpoch stops training, or None."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    best = finetune.BestEpoch(monitor, None, patience)
    best.set_model(model)
    best.on_train_begin()
    for epoch, (loss, accuracy) in enumerate(epochs):
        model.stop_training = False
        best.on_epoch_end(epoch, {"val_loss": loss, "val_accuracy": accuracy})
        if model.stop_training:
            return epoch + 1
    return None


def keras_stops_after(monitor, mode, patience, epochs):
    """The epoch (1-based) after which Keras' EarlyStopping stops training, or None."""
    rule = keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience)
    rule.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    rule.on_train_begin()
    for epoch, (loss, accuracy) in enumerate(epochs):
        rule.model.stop_training = False
        rule.on_epoch_end(epoch, {"val_loss": loss, "val_accuracy": accuracy})
        if rule.model.stop_training:
            return epoch + 1
    return None


def test_early_stopping_follows_the_rule_that_picks_the_best_epoch():
    # the same accuracy with lower losses is progress for val_accuracy's rule: Keras' EarlyStopping (accuracy
    # alone, strictly; "auto" is "max" for it) stopped after epoch 3 while epochs 4 and 5 were each the best so far
    epochs = [(0.5, 0.8), (0.45, 0.8), (0.44, 0.8), (0.43, 0.8), (0.42, 0.8), (0.6, 0.8), (0.6, 0.8), (0.6, 0.8)]
    assert stops_after("val_accuracy", 2, epochs) == 7
    assert keras_stops_after("val_accuracy", "max", 2, epochs) == 3
    # val_loss: where EarlyStopping stops (a tie is no progress for either)
    losses = [(0.5, 0.0), (0.4, 0.0), (0.41, 0.0), (0.4, 0.0), (0.39, 0.0), (0.5, 0.0), (0.5, 0.0), (0.5, 0.0)]
    assert stops_after("val_loss", 2, losses) == keras_stops_after("val_loss", "min", 2, losses) == 4
    later = [(0.5, 0.0), (0.4, 0.0), (0.41, 0.0), (0.39, 0.0), (0.5, 0.0), (0.5, 0.0), (0.5, 0.0)]
    assert stops_after("val_loss", 2, later) == keras_stops_after("val_loss", "min", 2, later) == 6
    assert stops_after("val_loss", None, losses) is None


@pytest.mark.slow
def test_a_finetuning_worse_than_its_start_keeps_the_start(converted_tiny, base_params, head_path, tmp_path):
    # A learning rate that wrecks the weights: no epoch beats the starting point on val loss.
    params = finetune.FinetuneParams(
        unfreeze_top=10, optimizer="sgd", learning_rate=1.0, epochs=2, batch_size=4, patience=5
    )
    before = finetune.build_classifier(base_params, head_path)
    record = finetune.run(
        finetune.Config(CommonParams(seed=1), base_params, params),
        converted_tiny,
        head_path,
        tmp_path / "out",
        tmp_path / "live",
    )
    assert min(record["history"]["val_loss"]) > record["val_before"]["loss"]
    assert record["best_epoch"] == 0 and record["val_loss"] == pytest.approx(record["val_before"]["loss"], rel=1e-5)
    after = keras.saving.load_model(tmp_path / "out" / finetune.MODEL)
    for a, b in zip(before.weights, after.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.slow
def test_a_diverged_finetuning_writes_nothing_and_names_the_learning_rate(
    converted_tiny, base_params, head_path, tmp_path
):
    """A review: started from a head with NaN weights (a diverged train_head, before it refused them), a run kept its
    best (NaN) epoch, saved the model with exit 0 and wrote a bare NaN into history.json. Now nothing is written, the
    dvclive folder included."""
    head = keras.saving.load_model(head_path)
    head.set_weights([np.full_like(w, np.nan) for w in head.get_weights()])
    head.save(head_path)
    params = finetune.FinetuneParams(unfreeze_top=10, epochs=1, batch_size=4, keep_better_start=False)
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "metrics.json").write_text("{}")  # an earlier run's
    with pytest.raises(training.Diverged, match=r"finetune: training diverged: .*Lower finetune\.learning_rate"):
        finetune.run(
            finetune.Config(CommonParams(seed=1), base_params, params),
            converted_tiny,
            head_path,
            tmp_path / "out",
            tmp_path / "live",
        )
    assert not (tmp_path / "out").exists() and tree_bytes(tmp_path / "live") == {"metrics.json": b"{}"}


@pytest.mark.slow
def test_training_twice_gives_byte_identical_outputs(converted_tiny, base_params, tmp_path):
    """Bit-reproducible training: same inputs and params, same bytes (model, history, dvclive metrics and plots),
    whether the decoded images are cached in memory (a) or on disk (b, flat memory; the files go afterwards)."""
    head_params = train_head.TrainHeadParams(hidden_units=8, dropout=0.3, epochs=3)
    tune_params = finetune.FinetuneParams(unfreeze_top=12, epochs=2, batch_size=4, keep_better_start=False)
    features = tmp_path / "extract"
    from components import extract

    extract.run(extract.Config(base_params, extract.ExtractParams(batch_size=8)), converted_tiny, features)
    for run in ("a", "b"):
        # Another global random state before each run, as another process would have: the stages seed
        # everything themselves (a seed generator made before the stage's seeding differed per process).
        keras.utils.set_random_seed(100 if run == "a" else 200)
        train_head.run(
            train_head.Config(CommonParams(seed=7), head_params),
            features,
            converted_tiny / "labels.json",
            tmp_path / run / "head",
            tmp_path / run / "live_head",
        )
        keras.utils.set_random_seed(300 if run == "a" else 400)  # and before fine-tuning
        finetune.run(
            finetune.Config(CommonParams(seed=7), base_params, tune_params),
            converted_tiny,
            tmp_path / run / "head" / train_head.HEAD,
            tmp_path / run / "finetune",
            tmp_path / run / "live_finetune",
            cache_dir=None if run == "a" else tmp_path / "disk_cache",
        )

    assert list((tmp_path / "disk_cache").iterdir()) == []  # the run's cache files are removed
    assert open_files_under(tmp_path) == []  # and closed, so their disk space is freed now (no "(deleted)")
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert "finetune/model.keras" in a and "live_finetune/plots/metrics/val_loss.tsv" in a
    assert {name for name in a if a[name] != b.get(name)} == set()
    first = keras.saving.load_model(tmp_path / "a" / "finetune" / finetune.MODEL)
    before = finetune.build_classifier(base_params, tmp_path / "a" / "head" / train_head.HEAD)
    assert any(not np.array_equal(x, y) for x, y in zip(first.get_weights(), before.get_weights()))  # it did train
    assert "seconds" not in (tmp_path / "a" / "finetune" / finetune.HISTORY).read_text()  # no timings in outputs
    recorded = json.loads((tmp_path / "a" / "finetune" / finetune.HISTORY).read_text())["trained_on"]
    assert recorded == training.trained_on()  # what a rebuild elsewhere compares (tools.audit)


def test_records_whose_labels_labels_json_does_not_name_are_refused_before_training(
    converted_tiny, base_params, head_path, tmp_path
):
    """A review: finetune never checked the records' labels against labels.json (train_head did): a label past its
    names trained as a sigmoid target of 2 and kept the model, or crashed inside TensorFlow with class weights."""
    convert_dir = tmp_path / "convert"
    shutil.copytree(converted_tiny, convert_dir)
    labels = json.loads((convert_dir / "labels.json").read_text())
    (convert_dir / "labels.json").write_text(json.dumps(labels[:1]))
    config = finetune.Config(CommonParams(), base_params, finetune.FinetuneParams(epochs=1))
    with pytest.raises(ValueError, match=r"finetune: the train records: labels \[1\] are outside the vocabulary of 1"):
        finetune.run(config, convert_dir, head_path, tmp_path / "out", tmp_path / "live")
    assert not (tmp_path / "out").exists()


def test_the_command_line_never_caches_decoded_images_in_memory(monkeypatch, tmp_path):
    """A review: without --cache the stage kept every decoded image in memory (307 KB an image at 160), growing with
    the dataset; from the command line they go to files beside the output unless a folder is named."""
    seen = []

    def run(*args):
        seen.append(args[-1])
        with finetune.decoded_image_cache(True, args[-1]) as cache:
            assert all(Path(folder).parent.is_dir() for folder in cache.values())  # files, not memory

    monkeypatch.setattr(finetune, "run", run)
    common = ["--params", str(REPO / "params.yaml"), "--convert", "c", "--head", "h", "--live", "l"]
    # A second read: the default was the output's parent, where sweeping killed runs' scratch folders took a
    # user's finetune-<date> or finetune-baseline folder with it. It is a folder of its own now, gone after.
    data = tmp_path / "data"
    for name in ("finetune-20240601", "finetune-baseline", "finetune-1234567-v2"):
        (data / name).mkdir(parents=True)
    assert finetune.main([*common, "--out", str(data / "finetune")]) == 0
    assert finetune.main([*common, "--out", "o", "--cache", str(tmp_path / "named")]) == 0
    assert seen == [data / ".finetune.image_cache", tmp_path / "named"]
    assert sorted(p.name for p in data.iterdir()) == ["finetune-1234567-v2", "finetune-20240601", "finetune-baseline"]
