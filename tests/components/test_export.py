"""export's own check: the SavedModel it writes must compute what the Keras model computes, or the stage fails."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from components import export
from pipelines import serving
from tests.conftest import encode, image_array

SIZE = (16, 16)


def tiny_model(seed: int) -> keras.Model:
    inputs = keras.Input((*SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(
        2, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(0, 3.0, seed=seed)
    )(x)
    return keras.Model(inputs, outputs)


def test_a_serving_model_that_disagrees_with_keras_fails_the_check(tmp_path):
    """Only the passing side was tested (evaluate's outputs): a check that always passed would have gone unseen."""
    model = tiny_model(1)
    serving.export(model, ["cats", "dogs"], SIZE, tmp_path / "serving")
    blobs = [encode(image_array(seed, size=SIZE)) for seed in range(4)]
    pixels = [tf.cast(tf.io.decode_jpeg(b, channels=3), tf.float32).numpy() for b in blobs]
    samples = list(zip(blobs, pixels))
    gap = export.check_serving(tmp_path / "serving", model, samples, ["cats", "dogs"])
    assert gap <= 1e-4
    with pytest.raises(RuntimeError, match="disagrees with the Keras model"):
        export.check_serving(tmp_path / "serving", tiny_model(2), samples, ["cats", "dogs"])  # other weights
    with pytest.raises(RuntimeError, match="disagrees with the Keras model"):
        export.check_serving(tmp_path / "serving", model, samples, ["dogs", "cats"])  # other class names
    assert np.isfinite(gap)


def test_the_lineage_names_the_runtimes_that_computed_the_features_and_scored_the_models(tmp_path):
    """`extract_runtime` and `evaluate_runtime` fall back on tensorflow where an older record lacks them: a lineage
    that always wrote tensorflow passed every test, as the tests ran on TensorFlow."""
    for name in ("manifest.jsonl", "model.keras", "head.keras"):
        (tmp_path / name).write_bytes(name.encode())
    scored = {"val": {"accuracy": 0.9}, "test": {"accuracy": 0.8}}
    metrics = {"head": {**scored, "runtime": "openvino"}, "finetune": {**scored, "runtime": "tensorflow"}}
    record = export.lineage_record(
        tmp_path / "manifest.jsonl",
        [{"split": "train", "label": "a"}, {"split": "test", "label": "b"}],
        tmp_path / "model.keras",
        tmp_path / "head.keras",
        {"conv_base": {"name": "b"}, "runtime": "openvino"},
        ["a", "b"],
        metrics,
    )
    assert record["extract_runtime"] == "openvino"
    assert record["evaluate_runtime"] == {"head": "openvino", "finetune": "tensorflow"}
    older = export.lineage_record(
        tmp_path / "manifest.jsonl", [], tmp_path / "model.keras", tmp_path / "head.keras", {"conv_base": {}}, [], {}
    )
    assert older["extract_runtime"] == "tensorflow" and older["evaluate_runtime"] == {}
