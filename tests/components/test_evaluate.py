import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from components import evaluate, export, extract, finetune, train_head  # noqa: E402
from components.conv_base import ConvBaseParams  # noqa: E402
from components.download import CommonParams  # noqa: E402
from tests.conftest import encode, image_array, tree_bytes  # noqa: E402

# ---- metrics against values computed by hand ---------------------------------------------------


def test_binary_metrics_by_hand():
    labels = np.array([0, 0, 1, 1])
    probs = evaluate.as_probabilities(np.array([[0.1], [0.4], [0.35], [0.8]]))  # p(class 1)
    m = evaluate.classification_metrics(labels, probs, ["cat", "dog"])
    # predicted: 0, 0, 0, 1 -> one dog missed
    assert m["confusion_matrix"] == [[2, 0], [1, 1]]
    assert m["accuracy"] == 0.75
    assert m["per_class"]["cat"] == {
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "support": 2,
    }
    assert m["per_class"]["dog"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    # positives score 0.35 and 0.8, negatives 0.1 and 0.4: 3 of the 4 pairs are ordered right
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["loss"] == pytest.approx(-(math.log(0.9) + math.log(0.6) + math.log(0.35) + math.log(0.8)) / 4)


def test_curves_by_hand_with_tied_scores():
    positive = np.array([1, 0, 1, 0, 1])
    scores = np.array([0.9, 0.9, 0.6, 0.3, 0.1])  # a tie at 0.9 is one threshold
    fpr, tpr, thresholds = evaluate.roc_curve(positive, scores)
    np.testing.assert_allclose(fpr, [0, 1 / 2, 1 / 2, 1, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(thresholds[1:], [0.9, 0.6, 0.3, 0.1])
    # pairs (positive, negative) ordered right: (.9,.3) (.6,.3) = 2, the tie (.9,.9) = 1/2, of 6 pairs
    assert evaluate.auc(fpr, tpr) == pytest.approx(2.5 / 6)
    precision, recall, _ = evaluate.precision_recall_curve(positive, scores)
    np.testing.assert_allclose(precision, [1 / 2, 2 / 3, 2 / 4, 3 / 5])
    np.testing.assert_allclose(recall, [1 / 3, 2 / 3, 2 / 3, 1])


def test_three_class_metrics_by_hand():
    labels = np.array([0, 1, 2, 2, 1, 0])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # 0 -> 0
            [0.1, 0.8, 0.1],  # 1 -> 1
            [0.2, 0.5, 0.3],  # 2 -> 1
            [0.1, 0.1, 0.8],  # 2 -> 2
            [0.6, 0.3, 0.1],  # 1 -> 0
            [0.5, 0.4, 0.1],  # 0 -> 0
        ]
    )
    m = evaluate.classification_metrics(labels, probs, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert m["confusion_classes"] == ["a", "b", "c"]  # the matrix's rows and columns, named (the README's promise)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: P 2/3 R 1 F1 .8; b: P 1/2 R 1/2 F1 .5; c: P 1 R 1/2 F1 2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # one-vs-rest, counting correctly ordered (positive, negative) pairs: a 7/8, b 6/8, c 8/8
    assert m["roc_auc"] == pytest.approx((7 / 8 + 6 / 8 + 1) / 3)
    roc, pr = evaluate.curve_rows(labels, probs)  # micro one-vs-rest: 6 positives, 12 negatives
    np.testing.assert_allclose([r["fpr"] for r in roc], [0, 0, 0, 1 / 12, 1 / 6, 1 / 4, 1 / 4, 5 / 12, 1])
    np.testing.assert_allclose([r["tpr"] for r in roc], [0, 1 / 3, 1 / 2, 1 / 2, 2 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_allclose([r["precision"] for r in pr], [1, 1, 3 / 4, 2 / 3, 4 / 7, 2 / 3, 6 / 11, 1 / 3])
    np.testing.assert_allclose([r["recall"] for r in pr], [1 / 3, 1 / 2, 1 / 2, 2 / 3, 2 / 3, 1, 1, 1])


def test_misclassified_and_gradcam_picks(tmp_path):
    """The mistakes' source files come from the manifest's rows of those images only: evaluate held the whole
    manifest (every split's rows, ~1 KB an image) for them, memory that grew with the dataset."""
    import tracemalloc

    ids = ["a", "b", "c", "d"]
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.45, 0.55]])
    manifest = tmp_path / "manifest.jsonl"
    other = {"split": "train", "label": "cat", "sha256": "0" * 64, "note": "x" * 900}
    with manifest.open("w") as handle:
        handle.write(json.dumps({"id": "b", "source": "dogs/b.jpg", **other}) + "\n")
        for k in range(20000):
            handle.write(json.dumps({"id": f"other{k}", "source": f"cats/{k}.jpg", **other}) + "\n")
    tracemalloc.start()
    try:
        wrong = evaluate.with_sources(evaluate.misclassified("finetune", ids, labels, probs, ["cat", "dog"]), manifest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5e6, peak  # the whole manifest, 20 MB on disk, took ~40 MB
    assert [(r["id"], r["actual"], r["predicted"], r["file"]) for r in wrong] == [
        ("b", "dog", "cat", "dogs/b.jpg"),
        ("d", "cat", "dog", None),
    ]
    assert evaluate.pick_gradcam(ids, labels, probs, correct=1, wrong=1) == [("a", True), ("b", False)]
    # one of each class's most confident right predictions, skipping those already picked
    many = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.45, 0.55], [0.95, 0.05], [0.2, 0.8]])
    more = ids + ["e", "f"]
    labels = np.array([0, 1, 1, 0, 0, 1])
    assert evaluate.pick_gradcam(more, labels, many, correct=1, wrong=0, per_class=1) == [
        ("a", True),
        ("e", True),
        ("f", True),
    ]
    assert evaluate.pick_gradcam(more, labels, many, correct=0, wrong=0, per_class=2) == [
        ("e", True),
        ("a", True),
        ("f", True),
        ("c", True),
    ]


def test_most_confused_pairs_and_intervals_by_hand():
    # 3 classes: 2 of "b" read as "c", 1 "a" as "b", 1 "c" as "b"
    matrix = np.array([[5, 1, 0], [0, 3, 2], [0, 1, 4]])
    pairs = evaluate.most_confused(matrix, ["a", "b", "c"], top=2)
    assert pairs == [
        {"actual": "b", "predicted": "c", "count": 2, "of_actual": 0.4},
        {"actual": "a", "predicted": "b", "count": 1, "of_actual": pytest.approx(1 / 6)},
    ]
    assert evaluate.most_confused(np.eye(3, dtype=int), ["a", "b", "c"], top=5) == []
    # Wilson, 95%: 8 of 10 -> (0.4902, 0.9433) (Wilson 1927; Newcombe 1998, table I style)
    low, high = evaluate.wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert evaluate.wilson_interval(10, 10)[1] == pytest.approx(1.0) and evaluate.wilson_interval(0, 10)[0] == 0.0
    # exactly, at every size: rounding left 1 - 1e-16 at n = 201 (an interval excluding a 100% beside it; a review)
    for n in range(1, 600):
        assert evaluate.wilson_interval(n, n)[1] == 1.0 and evaluate.wilson_interval(0, n)[0] == 0.0, n
    assert evaluate.macro_f1_of(matrix) == pytest.approx(np.mean([2 * 5 / (5 + 6), 2 * 3 / (5 + 5), 2 * 4 / (6 + 5)]))


def test_bootstrap_interval_is_fixed_and_covers_the_estimate():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, 300)
    predicted = np.where(rng.random(300) < 0.8, labels, rng.integers(0, 4, 300))
    first = evaluate.bootstrap_interval(labels, predicted, 4, 500)
    assert first == evaluate.bootstrap_interval(labels, predicted, 4, 500)  # the same bytes every run
    estimate = evaluate.macro_f1_of(evaluate.confusion_matrix(labels, predicted, 4))
    assert first[0] < estimate < first[1] and 0.03 < first[1] - first[0] < 0.2
    assert evaluate.bootstrap_interval(labels, predicted, 4, 0) is None
    # the interval narrows as the images grow: about 1/sqrt(n)
    big = np.tile(labels, 4), np.tile(predicted, 4)
    wide, narrow = first[1] - first[0], np.subtract(*evaluate.bootstrap_interval(*big, 4, 500)[::-1])
    assert 0.35 < narrow / wide < 0.65


# ---- the stage on tiny data, and its serving model ---------------------------------------------


def run_stages(root, converted, base, head_epochs: int, tune, serving_check: int):
    """extract, train_head, finetune, evaluate and export on `converted`, into `root`; extract's, finetune's,
    evaluate's and export's records."""
    features = extract.run(extract.Config(base, extract.ExtractParams(batch_size=8)), converted, root / "extract")
    head_params = train_head.TrainHeadParams(hidden_units=0, epochs=head_epochs, learning_rate=0.01)
    train_head.run(
        train_head.Config(CommonParams(seed=1), head_params),
        root / "extract",
        converted / "labels.json",
        root / "train_head",
        root / "live_head",
    )
    tuned = finetune.run(
        finetune.Config(CommonParams(seed=1), base, tune),
        converted,
        root / "train_head" / "head.keras",
        root / "finetune",
        root / "live_finetune",
    )
    params = evaluate.EvaluateParams(batch_size=4, gradcam_correct=2, gradcam_wrong=2)
    manifest = converted.parent / "download" / "manifest.jsonl"
    models = (root / "train_head" / "head.keras", root / "finetune" / "model.keras")
    result = evaluate.run(evaluate.Config(params), converted, root / "extract", *models, manifest, root / "report")
    exported = export.run(
        export.Config(export.ExportParams(serving_check=serving_check)),
        models[1],
        models[0],
        converted,
        root / "extract" / "features.json",
        manifest,
        root / "report" / "metrics.json",
        root / "out",
    )
    return features, tuned, {**result, **exported}


@pytest.fixture(scope="module")
def evaluated(converted_tiny, tiny_base_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    base = ConvBaseParams(name="mobilenet_v2", weights=str(tiny_base_weights), input_size=(32, 32), pooling="avg")
    tune = finetune.FinetuneParams(unfreeze_top=10, epochs=1, batch_size=4)
    explained = []  # the classes evaluate asks Grad-CAM to explain, in the order of its overlays
    real = evaluate.classifier.grad_cam
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            evaluate.classifier,
            "grad_cam",
            lambda model, pixels, classes=None: explained.append(classes) or real(model, pixels, classes),
        )
        _, _, result = run_stages(root, converted_tiny, base, head_epochs=5, tune=tune, serving_check=3)
    return root, {**result, "explained": explained}


@pytest.mark.slow
def test_evaluate_stage_outputs(evaluated, converted_tiny):
    root, result = evaluated
    report = root / "report"
    for name in evaluate.REPORT_OUTPUTS:
        assert (report / name).exists()
    for name in export.DECLARED_OUTPUTS:
        assert (root / "out" / name).exists()
    assert result["checked"] == 3 and result["serving_gap"] <= 1e-4
    lineage = json.loads((root / "out" / export.SERVING / "assets.extra" / export.LINEAGE).read_text())
    metrics_now = json.loads((report / "metrics.json").read_text())
    assert lineage["test_accuracy"] == {m: metrics_now[m]["test"]["accuracy"] for m in evaluate.MODELS}
    assert lineage["evaluate_runtime"] == {m: "tensorflow" for m in evaluate.MODELS}  # what scored those figures
    test_count = json.loads((converted_tiny / "summary.json").read_text())["records"]["test"]
    metrics = json.loads((report / "metrics.json").read_text())
    wrong = json.loads((report / "misclassified.json").read_text())
    val_count = json.loads((converted_tiny / "summary.json").read_text())["records"]["val"]
    for model in evaluate.MODELS:
        assert metrics[model]["val"]["images"] == val_count > 0  # what the sweep and the retrain gate choose on
        m = metrics[model]["test"]
        assert m["images"] == test_count == sum(map(sum, m["confusion_matrix"]))
        errors = sum(1 for row in wrong if row["model"] == model)
        assert m["accuracy"] == pytest.approx(1 - errors / test_count)  # the list holds every wrong prediction
        confusion = json.loads((report / "plots" / f"confusion_{model}.json").read_text())
        assert len(confusion) == test_count
        roc = json.loads((report / "plots" / f"roc_{model}.json").read_text())
        assert roc[0]["fpr"] == 0.0 and roc[-1]["tpr"] == 1.0
    pngs = sorted((report / "gradcam").glob("*.png"))
    assert 1 <= len(pngs) <= 4 and len(pngs) == result["gradcam"]
    # each overlay explains the class its file is named for (the reported, test-time-augmented prediction)
    names = json.loads((converted_tiny / "labels.json").read_text())
    (classes,) = result["explained"]
    assert sorted(names[c] for c in classes) == sorted(re.search(r"_as_(.+?)_[0-9.]+_", p.name)[1] for p in pngs)
    from PIL import Image

    assert Image.open(pngs[0]).size == (32, 32)


@pytest.mark.slow
def test_evaluate_on_openvino_scores_as_tensorflow_does(evaluated, converted_tiny, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    from pipelines import runtimes

    root, _ = evaluated
    params = evaluate.EvaluateParams(batch_size=4, gradcam_correct=2, gradcam_wrong=2, runtime="openvino")
    manifest = converted_tiny.parent / "download" / "manifest.jsonl"
    models = (root / "train_head" / "head.keras", root / "finetune" / "model.keras")
    cache = tmp_path / "cache" / "openvino"  # under the --cache root
    args = (converted_tiny, root / "extract", *models, manifest)
    evaluate.run(evaluate.Config(params), *args, tmp_path / "report", str(cache.parent))
    assert len(list(cache.glob("*/model.xml"))) == 2  # the head and the fine-tuned model, converted once
    monkeypatch.setattr(runtimes, "_convert", lambda model, folder: pytest.fail("converted a cached model again"))
    evaluate.run(evaluate.Config(params), *args, tmp_path / "again", str(cache.parent))
    for name in ("metrics.json", "misclassified.json", "plots"):
        assert tree_or_bytes(tmp_path / "again" / name) == tree_or_bytes(tmp_path / "report" / name)  # re-runs
    on_tf = json.loads((root / "report" / "metrics.json").read_text())
    on_ov = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert {on_tf[m]["runtime"] for m in evaluate.MODELS} == {"tensorflow"}  # each says what scored it
    assert {on_ov[m]["runtime"] for m in evaluate.MODELS} == {"openvino"}
    for model in evaluate.MODELS:
        for split in ("val", "test"):
            a, b = on_tf[model][split], on_ov[model][split]
            assert abs(a["accuracy"] - b["accuracy"]) * a["images"] <= 1  # within one image
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    on_tf_wrong = json.loads((root / "report" / "misclassified.json").read_text())
    on_ov_wrong = {
        (r["model"], r["id"]): r for r in json.loads((tmp_path / "report" / "misclassified.json").read_text())
    }
    for row in on_tf_wrong:
        if (row["model"], row["id"]) in on_ov_wrong:
            other = on_ov_wrong[(row["model"], row["id"])]["probabilities"]
            assert all(abs(p - other[c]) <= 1e-4 for c, p in row["probabilities"].items())


def tree_or_bytes(path):
    return tree_bytes(path) if path.is_dir() else path.read_bytes()


PLAIN_TF = r"""
import json, sys
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
serve = model.signatures["serving_default"]
blobs = [open(p, "rb").read() for p in sys.argv[2:]]
try:
    out = serve(images=tf.constant(blobs))
    result = {k: v.numpy().tolist() for k, v in out.items()}
    result = {k: [[c.decode() if isinstance(c, bytes) else c for c in row] if isinstance(row, list) else (row.decode() if isinstance(row, bytes) else row) for row in v] for k, v in result.items()}
except tf.errors.InvalidArgumentError as exc:
    result = {"error": exc.message}
project = [m for m in sys.modules if m.split(".")[0] in ("components", "pipelines", "keras", "tests")]
print(json.dumps({"result": result, "project_modules": project}))
"""


def serve_in_plain_tensorflow(saved_model, files, tmp_path):
    """Load and call the SavedModel in a fresh interpreter that has only TensorFlow (no project code on the path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run(
        [sys.executable, "-I", "-c", PLAIN_TF, str(saved_model), *map(str, files)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert payload["project_modules"] == []
    return payload["result"]


def served_and_keras(root, blobs: list[bytes], tmp_path):
    """The exported model's answer in plain TensorFlow for these files, and the Keras model's probabilities
    on the same files through the shared decode."""
    files = []
    for i, blob in enumerate(blobs):
        files.append(tmp_path / f"img{i}")
        files[-1].write_bytes(blob)
    served = serve_in_plain_tensorflow(root / "out" / export.SERVING, files, tmp_path)
    import pipelines.bases  # noqa: F401 - the custom layers of the saved Keras model
    from pipelines import image

    model = keras.saving.load_model(root / "finetune" / "model.keras")
    pixels = np.stack([image.decode_and_resize(tf.constant(b), (32, 32)).numpy() for b in blobs])
    return served, evaluate.as_probabilities(model.predict_on_batch(pixels))


@pytest.mark.slow
def test_serving_model_in_plain_tensorflow_matches_keras(evaluated, tmp_path):
    root, _ = evaluated
    blobs = [
        encode(image_array(1, (200, 60, 40), (40, 30)), "JPEG"),
        encode(image_array(2, (40, 60, 200), (20, 50)), "PNG"),
        encode(image_array(3, (90, 90, 90), (32, 32)), "PNG", mode="RGBA"),
    ]
    result, expected = served_and_keras(root, blobs, tmp_path)
    np.testing.assert_allclose(np.array(result["probabilities"]), expected, atol=1e-5)
    labels = ["cats", "dogs"]  # the tiny dataset's classes, in the vocabulary's (sorted) order
    assert result["classes"] == [labels] * 3
    assert result["predicted"] == [labels[i] for i in expected.argmax(axis=1)]


@pytest.mark.slow
def test_bad_images_in_a_serving_batch_are_clear_errors(evaluated, tmp_path):
    root, _ = evaluated
    good = encode(image_array(1, (200, 60, 40)), "JPEG")
    cases = {
        "text": b"hello, not an image",
        "empty": b"",
        "truncated": good[: len(good) // 3],
        "tiff": encode(image_array(2, (20, 90, 160)), "TIFF"),  # an image, in a format the decode does not read
    }
    paths = {}
    for name, blob in {"good": good, **cases}.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(blob)
    result = serve_in_plain_tensorflow(
        root / "out" / export.SERVING, [paths["good"], paths["text"], paths["empty"], paths["tiff"]], tmp_path
    )
    assert "not a JPEG, PNG, GIF, BMP, WEBP image" in result["error"] and "[1 2 3]" in result["error"]
    result = serve_in_plain_tensorflow(root / "out" / export.SERVING, [paths["good"], paths["truncated"]], tmp_path)
    assert "error" in result and "jpeg" in result["error"].lower()


# ---- three classes, a tapped mid-network layer, no pooling: finetune, evaluate, Grad-CAM, serving ----


@pytest.fixture(scope="module")
def three_class_tapped(tiny_base_weights, tmp_path_factory):
    from tests.conftest import make_converted

    root = tmp_path_factory.mktemp("three")
    converted = make_converted(root / "data", per_class=6, classes=("birds", "cats", "dogs"))
    base = ConvBaseParams(
        name="mobilenet_v2",
        weights=str(tiny_base_weights),
        input_size=(32, 32),
        pooling="none",
        layer="block_13_expand_relu",
    )
    tune = finetune.FinetuneParams(unfreeze_from="block_12_expand", epochs=1, batch_size=4)
    features, tuned, result = run_stages(root, converted, base, head_epochs=3, tune=tune, serving_check=4)
    # Without an unfreeze point, a tapped base is a clear error (the registry's default may lie above the tap).
    with pytest.raises(Exception, match=r"tapped at conv_base\.layer='block_13_expand_relu'"):
        finetune.run(
            finetune.Config(CommonParams(seed=1), base, finetune.FinetuneParams(epochs=1, batch_size=4)),
            converted,
            root / "train_head" / "head.keras",
            root / "unused",
            root / "unused_live",
        )
    return root, converted, features, tuned, result


@pytest.mark.slow
def test_three_classes_through_a_tapped_layer_without_pooling(three_class_tapped, tmp_path):
    root, converted, features, tuned, result = three_class_tapped
    assert features["feature_shape"] == [2, 2, 576]  # block_13_expand_relu at 32x32, not pooled
    assert tuned["unfrozen_layers"][0] == "block_12_expand"
    names = json.loads((converted / "labels.json").read_text())
    assert names == ["birds", "cats", "dogs"]
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    test_count = json.loads((converted / "summary.json").read_text())["records"]["test"]
    for model in evaluate.MODELS:
        m = metrics[model]["test"]
        assert np.array(m["confusion_matrix"]).shape == (3, 3) and np.sum(m["confusion_matrix"]) == test_count
        assert set(m["per_class"]) == set(names)
        bars = json.loads((root / "report" / "plots" / f"per_class_{model}.json").read_text())
        scored = [
            name
            for name in names
            if m["per_class"][name]["support"] or sum(np.array(m["confusion_matrix"])[:, names.index(name)])
        ]
        assert [row["class"] for row in bars] == scored and sum(row["support"] for row in bars) == test_count
        assert [row["f1"] for row in bars] == [m["per_class"][name]["f1"] for name in scored]
        assert all(m["per_class"][name]["f1"] is None for name in names if name not in scored)  # no evidence, no 0
    assert len(list((root / "report" / "gradcam").glob("*.png"))) == result["gradcam"] >= 1
    # The serving model answers with the three classes, as the Keras model does on the training pixels.
    blobs = [encode(image_array(s, color, (24, 32)), "JPEG") for s, color in ((1, (40, 180, 60)), (2, (200, 60, 40)))]
    served, expected = served_and_keras(root, blobs, tmp_path)
    assert np.array(served["probabilities"]).shape == (2, 3)
    np.testing.assert_allclose(np.array(served["probabilities"]), expected, atol=1e-5)
    assert served["classes"] == [names] * 2 and served["predicted"] == [names[i] for i in expected.argmax(axis=1)]


def test_flip_tta_averages_an_image_and_its_mirror():
    from pipelines import serving

    weights = np.arange(2 * 3 * 1, dtype=np.float32).reshape(1, 2, 3, 1)  # a score that sees left from right
    score = lambda x: np.sum(x * weights, axis=(1, 2, 3))[:, None]  # noqa: E731
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 2, 3, 1)).astype(np.float32)
    assert serving.with_tta(score, "none") is score
    flipped = serving.with_tta(score, "horizontal")(pixels)
    assert np.allclose(flipped, (score(pixels) + score(pixels[:, :, ::-1, :])) / 2)
    assert not np.allclose(flipped, score(pixels))
    with pytest.raises(ValueError, match=re.escape("'diagonal': none | horizontal | vertical | both")):
        serving.with_tta(score, "diagonal")


def test_tta_views_are_the_symmetries_of_a_square_each_once():
    """flip: both with quarter_turns: the 8 symmetries of a square (NumPy and TensorFlow alike), so a score
    that sees orientation gets the mean over all of them; fewer views are the subsets the params name."""
    import tensorflow as tf

    from pipelines import serving

    pixels = np.random.default_rng(1).uniform(0, 255, (2, 3, 3, 1)).astype(np.float32)
    symmetries = [np.rot90(pixels, k, axes=(1, 2)) for k in range(4)]
    symmetries += [np.rot90(pixels[:, :, ::-1, :], k, axes=(1, 2)) for k in range(4)]

    def key(batch):
        return np.asarray(batch).tobytes()

    expected = {
        ("none", False): 1,
        ("horizontal", False): 2,
        ("vertical", False): 2,
        ("both", False): 4,
        ("none", True): 2,
        ("horizontal", True): 4,
        ("both", True): 8,
    }
    for (flip, turns), count in expected.items():
        views = serving.tta_views(flip, turns)
        seen = [key(view(pixels)) for view in views]
        assert len(set(seen)) == len(views) == count and seen[0] == key(pixels)
        assert set(seen) <= {key(s) for s in symmetries}
        assert [key(view(tf.constant(pixels)).numpy()) for view in views] == seen  # the serving model's views
    assert {key(view(pixels)) for view in serving.tta_views("both", True)} == {key(s) for s in symmetries}
    weights = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)
    score = lambda x: np.sum(x * weights, axis=(1, 2, 3))[:, None]  # noqa: E731
    got = serving.with_tta(score, "both", True)(pixels)
    assert np.allclose(got, np.mean([score(s) for s in symmetries], axis=0))
    serving.check_tta((3, 3), True)
    with pytest.raises(ValueError, match="tta.quarter_turns needs a square input"):
        serving.check_tta((3, 4), True)


@pytest.mark.slow
def test_flip_tta_is_what_evaluate_scores_and_what_the_serving_model_serves(evaluated, converted_tiny, tmp_path):
    """tta (flip: both, quarter_turns) in evaluate and export: the served probabilities of an encoded image are
    the mean of the Keras model's on its decoded pixels under the 8 symmetries of a square."""
    import keras
    import tensorflow as tf

    from components.params import TtaParams
    from pipelines import image, serving

    root, _ = evaluated
    manifest = converted_tiny.parent / "download" / "manifest.jsonl"
    models = (root / "train_head" / "head.keras", root / "finetune" / "model.keras")
    params = evaluate.EvaluateParams(batch_size=4, gradcam_correct=0, gradcam_wrong=0, gradcam_per_class=0)
    tta = TtaParams(flip="both", quarter_turns=True)
    evaluate.run(evaluate.Config(params, tta), converted_tiny, root / "extract", *models, manifest, tmp_path / "r")
    plain = json.loads((root / "report" / "metrics.json").read_text())
    mirrored = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert mirrored["head"] == plain["head"]  # the head scores cached features: no TTA
    assert mirrored["finetune"]["test"]["loss"] != plain["finetune"]["test"]["loss"]
    exported = export.run(
        export.Config(export.ExportParams(serving_check=3), tta),
        models[1],
        models[0],
        converted_tiny,
        root / "extract" / "features.json",
        manifest,
        tmp_path / "r" / "metrics.json",
        tmp_path / "out",
    )
    lineage = exported["lineage"]
    assert lineage["tta_flip"] == "both" and lineage["tta_quarter_turns"] is True and exported["serving_gap"] <= 1e-4
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:3]
    blobs = [(converted_tiny.parent / "download" / row["file"]).read_bytes() for row in rows]
    pixels = np.stack([image.decode_and_resize(tf.constant(blob), (32, 32)).numpy() for blob in blobs])
    model = keras.saving.load_model(models[1], compile=False)
    one = serving.probabilities_of(model(pixels, training=False)).numpy()
    views = [np.rot90(p, k, axes=(1, 2)) for p in (pixels, pixels[:, :, ::-1, :]) for k in range(4)]
    each = [serving.probabilities_of(model(view.copy(), training=False)).numpy() for view in views]
    serve_tta = tf.saved_model.load(str(tmp_path / "out" / export.SERVING)).signatures[serving.SIGNATURE]
    got = serve_tta(images=tf.constant(blobs))["probabilities"].numpy()
    assert np.allclose(got, np.mean(each, axis=0), atol=1e-5)
    assert not np.allclose(got, one, rtol=1e-3, atol=0)  # the views changed the (saturated) probabilities


def test_export_and_evaluate_refuse_a_model_whose_outputs_are_not_the_label_vocabulary():
    import keras

    from pipelines import serving

    def model(units):
        pixels = keras.Input((4,))
        return keras.Model(pixels, keras.layers.Dense(units, activation="sigmoid" if units == 1 else "softmax")(pixels))

    serving.check_classes(model(1), ["cats", "dogs"], "export")
    serving.check_classes(model(3), ["birds", "cats", "dogs"], "export")
    for units, names in ((1, ["birds", "cats", "dogs"]), (3, ["cats", "dogs"]), (2, ["cats", "dogs"]), (1, ["a", "a"])):
        with pytest.raises(ValueError, match="trained on another convert output"):
            serving.check_classes(model(units), names, "export")


@pytest.mark.slow
def test_evaluate_refuses_models_of_another_vocabulary_before_any_work(evaluated, converted_tiny, tmp_path):
    """A review: evaluate scored a one-unit (two-class) model against a labels.json of three names as a binary one,
    writing figures for classes it never knew; export refused it. Now both stop before any work."""
    from components.params import TtaParams

    root, _ = evaluated
    convert = tmp_path / "convert"
    shutil.copytree(converted_tiny, convert)
    names = json.loads((convert / "labels.json").read_text())
    (convert / "labels.json").write_text(json.dumps([*names, "zebras"]))
    params = evaluate.EvaluateParams(batch_size=4, gradcam_correct=0, gradcam_wrong=0, gradcam_per_class=0)
    models = (root / "train_head" / "head.keras", root / "finetune" / "model.keras")
    manifest = converted_tiny.parent / "download" / "manifest.jsonl"
    with pytest.raises(ValueError, match=r"evaluate: the model has 1 output unit\(s\), but labels.json names 3"):
        evaluate.run(evaluate.Config(params, TtaParams()), convert, root / "extract", *models, manifest, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_a_shard_missing_from_both_the_features_and_the_records_is_an_error(evaluated, converted_tiny, tmp_path):
    """A second read: evaluate checked that the features and the records hold the same images, never that they hold
    the images convert wrote, so a test shard gone from both was scored without it, silently."""
    root, _ = evaluated
    convert, extract_dir = tmp_path / "convert", tmp_path / "extract"
    shutil.copytree(converted_tiny, convert)
    shutil.copytree(root / "extract", extract_dir)
    summary = json.loads((convert / "summary.json").read_text())
    summary["records"]["test"] += 1  # as if a shard holding one more image had been lost from both
    (convert / "summary.json").write_text(json.dumps(summary))
    params = evaluate.EvaluateParams(batch_size=4, gradcam_correct=0, gradcam_wrong=0, gradcam_per_class=0)
    models = (root / "train_head" / "head.keras", root / "finetune" / "model.keras")
    manifest = converted_tiny.parent / "download" / "manifest.jsonl"
    expected = summary["records"]["test"]
    with pytest.raises(
        RuntimeError, match=rf"the head model scored {expected - 1} test images, convert wrote {expected}"
    ):
        evaluate.run(evaluate.Config(params), convert, extract_dir, *models, manifest, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_the_figures_of_the_same_predictions_do_not_depend_on_the_order_they_were_read_in():
    """A review on 2026-12-07: the macro F1 bootstrap drew images by position in the order read (the shard count
    sets it), so another convert.shards gave the same predictions another interval."""
    rng = np.random.default_rng(0)
    n, names = 201, ["a", "b", "c", "d", "e"]
    ids = [f"{i:04x}" for i in rng.permutation(n)]
    labels, probs = rng.integers(0, 5, n), rng.dirichlet(np.ones(5), n).astype("float32")

    def read_in(order):  # two batches, as predict_features collects them
        half = len(order) // 2
        return (
            [ids[i] for i in order],
            [labels[order[:half]], labels[order[half:]]],
            [probs[order[:half]], probs[order[half:]]],
        )

    first = evaluate.classification_metrics(*evaluate.as_scores(*read_in(np.arange(n)))[1:], names)
    again = evaluate.classification_metrics(*evaluate.as_scores(*read_in(rng.permutation(n)))[1:], names)
    assert first == again and first["macro_f1_low"] < first["macro_f1"] < first["macro_f1_high"]


@pytest.mark.slow
def test_export_names_a_damaged_test_shard_and_refuses_test_images_no_record_holds(evaluated, converted_tiny, tmp_path):
    """A review on 2026-12-07: export read the test records through tf.data, so a damaged shard was TensorFlow's
    DataLossError, naming no file; and a test image of the manifest that no record held was left out of the serving
    check without a word."""
    root, _ = evaluated
    convert = tmp_path / "convert"
    shutil.copytree(converted_tiny, convert)
    manifest = converted_tiny.parent / "download" / "manifest.jsonl"
    models = (root / "finetune" / "model.keras", root / "train_head" / "head.keras")
    config = export.Config(export.ExportParams(serving_check=3))

    def run_export(manifest_path):
        extract_json, metrics_json = root / "extract" / "features.json", root / "report" / "metrics.json"
        export.run(config, *models, convert, extract_json, manifest_path, metrics_json, tmp_path / "out")

    shard = sorted((convert / "records").glob("test-*.tfrecord"))[0]
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-7])
    with pytest.raises(ValueError, match=rf"{re.escape(str(shard))}: a damaged or truncated TFRecord"):
        run_export(manifest)
    shard.write_bytes(whole)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    stray = {**next(r for r in rows if r["split"] == "test"), "id": "0" * 64}  # sorts first: the check takes it
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [stray, *rows]))
    with pytest.raises(
        RuntimeError, match=r"export: 1 of the 3 test images the serving check takes .*\(e\.g\. 0{64}\)"
    ):
        run_export(tmp_path / "manifest.jsonl")
    assert not (tmp_path / "out").exists()


def reshard_reversed(folder: Path, split: str, empty: bool = False) -> None:
    """A split's records in one shard in the reverse order (as another `convert.shards` orders them), or none."""
    files = sorted(folder.glob(f"{split}-*.tfrecord"))
    serialized = [bytes(r.numpy()) for r in tf.data.TFRecordDataset([str(f) for f in files])]
    for f in files:
        f.unlink()
    with tf.io.TFRecordWriter(str(folder / f"{split}-00000-of-00001.tfrecord")) as writer:
        for record in [] if empty else serialized[::-1]:
            writer.write(record)


@pytest.mark.slow
def test_the_figures_do_not_depend_on_the_order_the_records_are_read_in(evaluated, converted_tiny, tmp_path):
    """A review on 2026-12-07: the macro F1 bootstrap drew images by their position in the order read, which the shard
    count sets, so the same predictions gave another interval after a change of convert.shards."""
    root, _ = evaluated
    convert, extract_dir = tmp_path / "convert", tmp_path / "extract"
    shutil.copytree(converted_tiny, convert)
    shutil.copytree(root / "extract", extract_dir)
    for split in ("val", "test"):
        reshard_reversed(convert / "records", split)
        reshard_reversed(extract_dir / "features", split)
    params = evaluate.EvaluateParams(batch_size=4, gradcam_correct=2, gradcam_wrong=2)
    models = (root / "train_head" / "head.keras", root / "finetune" / "model.keras")
    manifest = converted_tiny.parent / "download" / "manifest.jsonl"
    evaluate.run(evaluate.Config(params), convert, extract_dir, *models, manifest, tmp_path / "r")

    # The same figures, intervals included; the log loss to float rounding only (the head and the model score other
    # batches of the same images, and a batch's last positions take another oneDNN path: *extract*)
    def split_losses(metrics: dict) -> tuple[dict, list[float]]:
        losses = [metrics[m][s].pop("loss") for m in evaluate.MODELS for s in ("val", "test")]
        return metrics, losses

    now, now_losses = split_losses(json.loads((tmp_path / "r" / "metrics.json").read_text()))
    before, before_losses = split_losses(json.loads((root / "report" / "metrics.json").read_text()))
    assert now == before and now_losses == pytest.approx(before_losses, rel=1e-6)
    assert (tmp_path / "r" / "misclassified.json").read_bytes() == (root / "report" / "misclassified.json").read_bytes()
    # a split whose shards hold no record at all: the count check's error, not numpy's on an empty list
    for folder in (convert / "records", extract_dir / "features"):
        reshard_reversed(folder, "test", empty=True)
    expected = json.loads((convert / "summary.json").read_text())["records"]["test"]
    with pytest.raises(RuntimeError, match=rf"the head model scored 0 test images, convert wrote {expected}"):
        evaluate.run(evaluate.Config(params), convert, extract_dir, *models, manifest, tmp_path / "r2")


def test_an_empty_test_split_is_refused_before_any_model_is_loaded_or_split_scored(tmp_path):
    """A review: evaluate loaded both models and scored the whole val split before saying the test split was empty."""
    convert = tmp_path / "convert"
    convert.mkdir()
    (convert / "labels.json").write_text(json.dumps(["cats", "dogs"]))
    (convert / "summary.json").write_text(json.dumps({"records": {"train": 4, "val": 2, "test": 0}}))
    params = evaluate.EvaluateParams(batch_size=4, gradcam_correct=0, gradcam_wrong=0, gradcam_per_class=0)
    missing = tmp_path / "none"  # no extract output, no models, no manifest: none of them is read first
    with pytest.raises(RuntimeError, match="the test split has no images: nothing to evaluate"):
        evaluate.run(
            evaluate.Config(params), convert, missing, missing / "h.keras", missing / "m.keras", missing, tmp_path / "r"
        )
    assert not (tmp_path / "r").exists()
