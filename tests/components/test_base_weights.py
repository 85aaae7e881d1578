"""The base_weights stage: ImageNet weights as a versioned file that extract and finetune read, not Keras's cache."""

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from components import base_weights, conv_base
from components.params import ParamsError
from tests.conftest import REPO, keras_imagenet_file

IMAGENET = conv_base.ConvBaseParams(name="mobilenet_v2", weights="imagenet", input_size=(96, 96), pooling="avg")


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """Keras's download cache (~/.keras) moved to a fresh, empty folder."""
    from keras.src.backend import config

    home = tmp_path / "keras_home"
    monkeypatch.setattr(config, "_KERAS_DIR", str(home))
    return home


def digest_of(weights: str) -> str:
    from pipelines import bases

    return bases.weights_digest(bases.load_conv_base("mobilenet_v2", None, weights, (96, 96))[0])


def test_extract_and_finetune_read_the_stages_file_not_this_machines_keras_cache(keras_home, tmp_path):
    keras_imagenet_file(keras_home, 96, seed=1)
    from_keras = digest_of("imagenet")
    record = base_weights.run(base_weights.Config(IMAGENET), tmp_path / "a")
    written = (tmp_path / "a" / base_weights.WEIGHTS).read_bytes()
    assert record["file"] == base_weights.WEIGHTS and record["sha256"] == hashlib.sha256(written).hexdigest()
    assert json.loads((tmp_path / "a" / base_weights.RECORD).read_text()) == record
    base_weights.run(base_weights.Config(IMAGENET), tmp_path / "b")  # the same weights: the same bytes
    assert (tmp_path / "b" / base_weights.WEIGHTS).read_bytes() == written

    resolved = conv_base.imagenet_from(IMAGENET, tmp_path / "a")
    assert resolved.weights == (tmp_path / "a" / base_weights.WEIGHTS).as_posix()
    assert resolved.model_copy(update={"weights": "imagenet"}) == IMAGENET  # nothing else changed
    assert digest_of(resolved.weights) == from_keras
    # This machine's Keras cache now holds other weights: what the stages build from the versioned file is not moved.
    keras_imagenet_file(keras_home, 96, seed=2)
    assert digest_of("imagenet") != from_keras
    assert digest_of(resolved.weights) == from_keras
    assert conv_base.fingerprint(resolved)["weights_sha256"] == record["sha256"]  # the feature cache's key
    # The feature cache's garbage collection keeps the namespace extract wrote under: that of the stage's file.
    from components import extract
    from pipelines import feature_cache
    from tools import cache_gc

    params = tmp_path / "params.yaml"
    params.write_text(
        "conv_base: {name: mobilenet_v2, path: null, weights: imagenet, input_size: [96, 96], pooling: avg, "
        "layer: null}\nextract: {batch_size: 8, runtime: tensorflow}\n"
    )
    used = extract.cache_namespace(extract.Config(resolved, extract.ExtractParams(batch_size=8)))
    assert cache_gc.current_namespace(params, tmp_path / "a") == feature_cache.namespace_of(used)
    # The stage re-run (one of its modules changed) keeps the weights it holds rather than fetch this machine's
    # other file; a held file that lost its recorded hash is fetched again.
    assert base_weights.run(base_weights.Config(IMAGENET), tmp_path / "a") == record
    assert (tmp_path / "a" / base_weights.WEIGHTS).read_bytes() == written
    # weights another Keras release fetched are fetched again (here: the cache's other file)
    (tmp_path / "a" / base_weights.RECORD).write_text(json.dumps({**record, "keras": "2.0.0"}))
    assert base_weights.run(base_weights.Config(IMAGENET), tmp_path / "a")["sha256"] != record["sha256"]
    (tmp_path / "a" / base_weights.WEIGHTS).write_bytes(b"damaged")
    assert base_weights.run(base_weights.Config(IMAGENET), tmp_path / "a")["sha256"] not in (None, record["sha256"])


def test_a_weights_file_cut_short_in_keras_cache_is_a_clear_error_naming_the_folder(keras_home, tmp_path, monkeypatch):
    """Keras downloads to the file's final name: a download cut short stays in its cache and was read by every later
    run, which ended in h5py's traceback (found by a review on 2026-12-07)."""
    from keras.src.utils import file_utils

    path = keras_imagenet_file(keras_home, 96, seed=1)
    whole = path.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"\x00" * 5000):  # cut short; not an HDF5 file at all
        path.write_bytes(damaged)
        with pytest.raises(base_weights.UnreadableKerasCache) as caught:
            base_weights.run(base_weights.Config(IMAGENET), tmp_path / "out")
        message = str(caught.value)
        assert message.startswith("conv_base.weights: the ImageNet weights of mobilenet_v2") and "delete" in message
        assert f"({keras_home / 'models'})" in message and "dvc pull data/base_weights" in message
        assert not (tmp_path / "out").exists()
    # an OSError of the download itself is not the cache's file (Keras deletes its part-written file): passed on
    path.unlink()

    def reset(url, target, hook=None):
        Path(target).write_bytes(b"partial")
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(file_utils, "urlretrieve", reset)
    with pytest.raises(ConnectionResetError):
        base_weights.run(base_weights.Config(IMAGENET), tmp_path / "out")


def test_a_stale_or_missing_weights_output_is_a_clear_error(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    with pytest.raises(ParamsError, match="cannot be read.*run `dvc repro`"):
        conv_base.imagenet_from(IMAGENET, folder)
    record = {"name": "mobilenet_v2", "weights": "imagenet", "input_size": [224, 224], "file": base_weights.WEIGHTS}
    (folder / base_weights.WEIGHTS).write_bytes(b"not read")
    (folder / base_weights.RECORD).write_text(json.dumps(record))
    with pytest.raises(ParamsError, match=r"holds the weights of .*224.*not of .*96"):
        conv_base.imagenet_from(IMAGENET, folder)
    (folder / base_weights.RECORD).write_text(json.dumps({**record, "input_size": [96, 96]}))
    # A file whose bytes are not those the record names (swapped or damaged since): extract and finetune built
    # the base from it, and their records named its hash while weights.json named the other.
    with pytest.raises(ParamsError, match=r"imagenet.weights.h5 is not the file .*weights.json records"):
        conv_base.imagenet_from(IMAGENET, folder)
    recorded = {**record, "input_size": [96, 96], "sha256": hashlib.sha256(b"not read").hexdigest()}
    (folder / base_weights.RECORD).write_text(json.dumps(recorded))
    assert conv_base.imagenet_from(IMAGENET, folder).weights.endswith(base_weights.WEIGHTS)
    (folder / base_weights.WEIGHTS).write_bytes(b"not read either")
    with pytest.raises(ParamsError, match=r"is not the file .*`dvc checkout"):
        conv_base.imagenet_from(IMAGENET, folder)
    (folder / base_weights.WEIGHTS).unlink()
    with pytest.raises(ParamsError, match="imagenet.weights.h5, the ImageNet weights its record names, is missing"):
        conv_base.imagenet_from(IMAGENET, folder)
    # No ImageNet download: the params as they are, whatever the folder holds.
    for other in ({"weights": "none"}, {"name": None, "path": "models/base.keras"}):
        params = IMAGENET.model_copy(update=other)
        assert conv_base.imagenet_from(params, tmp_path / "absent") is params


def test_without_imagenet_weights_the_stage_writes_its_record_without_tensorflow(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "conv_base: {name: mobilenet_v2, path: null, weights: none, input_size: [32, 32], pooling: avg, layer: null}\n"
    )
    code = (
        "import sys; from components import base_weights; "
        f"base_weights.main(['--params', {str(params)!r}, '--out', {str(tmp_path / 'out')!r}]); "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, timeout=120)
    record = json.loads((tmp_path / "out" / base_weights.RECORD).read_text())
    assert record == {
        "name": "mobilenet_v2",
        "path": None,
        "weights": "none",
        "input_size": [32, 32],
        "keras": None,
        "file": None,
        "sha256": None,
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [base_weights.RECORD]


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_a_base_built_from_the_stages_file_is_the_base_keras_builds_with_imagenet_weights(name, tmp_path, monkeypatch):
    # Keras builds some bases' ImageNet variant as another graph: EfficientNet adds a rescaling layer only with
    # weights="imagenet", so the same weights loaded from a file into the default graph give other features.
    import keras
    import numpy as np
    from keras.src.utils import file_utils

    from pipelines import bases

    assert conv_base.IMAGENET_WEIGHTS == bases.IMAGENET_FILE
    params = IMAGENET.model_copy(update={"name": name, "input_size": (32, 32)})
    # Keras's download answered with seeded weights and calibrated batch-norm statistics (ImageNet's cannot be
    # downloaded here): the reference is the base keras.applications builds with weights="imagenet".
    donor, _ = bases.load_conv_base(name, None, "none", (32, 32))
    for layer in donor.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    pixels = np.random.default_rng(3).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    donor(bases.REGISTRY[name].preprocess_input(pixels.copy()), training=True)
    donor.save_weights(tmp_path / "download.weights.h5")
    with monkeypatch.context() as patched:
        patched.setattr(file_utils, "get_file", lambda *args, **kwargs: str(tmp_path / "download.weights.h5"))
        reference = conv_base.build_extractor(params)
        base_weights.run(base_weights.Config(params), tmp_path / "w")
    built = conv_base.build_extractor(conv_base.imagenet_from(params, tmp_path / "w"))  # Keras's fetch as it is
    expected = keras.ops.convert_to_numpy(reference(pixels))
    assert float(np.std(expected)) > 1e-3  # features that vary: a missing layer would show
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(built(pixels)), expected)


def test_a_keras_that_builds_the_base_without_fetching_through_get_file_is_an_error(tmp_path, monkeypatch):
    # The base is built from the stage's file by answering Keras's fetch: were the fetch made otherwise, Keras
    # would read its own cache (or download) and the file would be silently ignored.
    from pipelines import bases

    spec = bases.REGISTRY["mobilenet_v2"]
    fetching_otherwise = lambda **kwargs: spec.constructor(**{**kwargs, "weights": None})  # noqa: E731
    monkeypatch.setitem(bases.REGISTRY, "mobilenet_v2", dataclasses.replace(spec, constructor=fetching_otherwise))
    (tmp_path / base_weights.WEIGHTS).write_bytes(b"never read")
    with pytest.raises(RuntimeError, match="did not fetch its ImageNet weights through get_file"):
        bases.load_conv_base("mobilenet_v2", None, str(tmp_path / base_weights.WEIGHTS), (32, 32))


@pytest.mark.parametrize("stage", ["extract", "finetune"])
def test_extract_and_finetune_build_the_base_from_the_versioned_weights(tmp_path, monkeypatch, stage):
    """dvc.yaml passes the base_weights output to both stages that build the base, and each stage's main builds
    from it: without `--weights` (or with it ignored) finetune built from Keras's download cache, which no rebuild
    has, and no test failed (the offline rebuild test re-runs extract only)."""
    import importlib

    import yaml

    entry = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    assert "--weights data/base_weights" in " ".join(entry["cmd"].split()) and "data/base_weights" in entry["deps"]
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / base_weights.WEIGHTS).write_bytes(b"weights")
    record = {"name": "mobilenet_v2", "weights": "imagenet", "input_size": [96, 96], "file": base_weights.WEIGHTS}
    (folder / base_weights.RECORD).write_text(json.dumps({**record, "sha256": hashlib.sha256(b"weights").hexdigest()}))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["conv_base"].update(name="mobilenet_v2", path=None, weights="imagenet", input_size=[96, 96])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    module = importlib.import_module(f"components.{stage}")
    built = []
    monkeypatch.setattr(module, "run", lambda config, *args, **kwargs: built.append(config.conv_base) or {})
    monkeypatch.chdir(tmp_path)
    argv = ["--params", "params.yaml", "--convert", "c", "--weights", "w", "--out", "o"]
    argv += ["--head", "h.keras", "--live", "l"] if stage == "finetune" else ["--metrics", "m.json"]
    module.main(argv)
    assert [base.weights for base in built] == [str(Path("w") / base_weights.WEIGHTS)]
