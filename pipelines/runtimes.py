"""Inference runtimes for a frozen Keras model: TensorFlow, or OpenVINO on the CPU.

extract (the conv base) and evaluate (the head and the fine-tuned model) run pure
inference, and OpenVINO runs a network faster than Keras's `predict_on_batch` on a
CPU (README, *Inference runtime*, has the measured figures). The OpenVINO model is
converted from the Keras model itself (its traced inference function, through
`openvino.convert_model`): there is no second source of weights. Converted models
are cached as IR folders keyed by `conversion_key` (the model's config and weights,
the OpenVINO, TensorFlow and Keras versions, the code the traced function runs and
the compile config), so a base converts once; each folder holds the SHA-256 of its
files, checked before it is compiled, so damaged bytes are converted again, never run.

OpenVINO is compiled with f32 inference precision: on CPUs with bf16 units its
default is bf16, whose features differ from TensorFlow's by ~0.5 on features of
~5; in f32 they differ in the last bits (~1e-5), which is why the runtime is part
of the feature cache's namespace. Fine-tuning, Grad-CAM and the serving
SavedModel stay on TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Callable, Literal

import keras
import numpy as np
import tensorflow as tf

from pipelines import fingerprint

Runtime = Literal["tensorflow", "openvino"]
RUNTIMES: tuple[str, ...] = ("tensorflow", "openvino")
OPENVINO_CONFIG = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"}
MODEL_XML = "model.xml"
MODEL_BIN = "model.bin"  # the weights OpenVINO saves beside the .xml
CHECKSUMS = "sha256.json"  # the SHA-256 of both, written by the conversion before the folder takes its key


def _checksums(folder: Path) -> dict[str, str]:
    return {name: fingerprint.file_sha256(folder / name) for name in (MODEL_XML, MODEL_BIN)}


def _complete(folder: Path) -> bool:
    """A converted model under its key, whole: both files, with the checksums its conversion recorded. A folder
    a killed deletion left half-emptied is not, nor one whose bytes changed after the conversion (a crash before
    they reached the disk, bit rot): OpenVINO compiles damaged weights without a word and computes other
    features."""
    try:
        return json.loads((folder / CHECKSUMS).read_text()) == _checksums(folder)
    except (OSError, ValueError):
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_aside(folder: Path) -> None:
    """Remove a damaged key folder: renamed to a private name first (atomic, so no other process ever sees it
    half-deleted under the key), then deleted; another process that set it aside first wins."""
    if _complete(folder):  # another process converted it again meanwhile: its fresh folder stays
        return
    aside = folder.with_name(f".{folder.name}.damaged-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


class RuntimeMissing(RuntimeError):
    """The chosen runtime's package is not installed."""

    user_facing = True  # components.cli.run_main: the message and exit 2, not a traceback


def _openvino():
    # Imported on use: openvino is an optional extra (`pip install -c constraints.txt -e ".[openvino]"`).
    try:
        import openvino
    except ImportError:
        raise RuntimeMissing(
            "runtime openvino: the openvino package is not installed; install the extra with "
            "pip install -c constraints.txt -e '.[openvino]', or set the runtime to tensorflow"
        ) from None
    return openvino


def check_installed(runtime: str) -> None:
    """A clear error now, not in a worker, when the runtime's package is missing."""
    if runtime == "openvino":
        _openvino()
    elif runtime != "tensorflow":
        raise ValueError(f"unknown runtime {runtime!r}; one of {', '.join(RUNTIMES)}")


def model_digest(model: keras.Model) -> str:
    """The SHA-256 of a model's architecture and weights: what decides what it computes.

    Not of the names Keras gives layers itself: it numbers them per process (InceptionV3's, Xception's and
    EfficientNet's `conv2d`, then `conv2d_4` in the next build), so the same base built twice had two keys and
    was converted again (a cold extract builds a probe first, an incremental one does not). A layer's name, where
    the config gives it (`name`) or refers to it (`keras_history`, `input_layers`, `output_layers`), is replaced by
    its place in the config; any other string stays (an activation called like a layer is still that activation),
    and the weights are hashed by their place, shape and dtype, not their path."""
    layers = {model.name} | {layer.name for layer in _all_layers(model)}
    places: dict[str, str] = {}

    def place(name):
        return places.setdefault(name, f"#{len(places)}") if isinstance(name, str) and name in layers else name

    def reference(entry):  # [layer name, node index, tensor index]
        return [place(entry[0]), *entry[1:]] if isinstance(entry, list) and entry else canonical(entry)

    def canonical(node):
        if isinstance(node, list):
            return [canonical(value) for value in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key == "name":
                out[key] = place(value)
            elif key == "keras_history":
                out[key] = reference(value)
            elif key in ("input_layers", "output_layers") and isinstance(value, list):
                one = bool(value) and isinstance(value[0], str)  # one reference, or a list of them
                out[key] = reference(value) if one else [reference(entry) for entry in value]
            else:
                out[key] = canonical(value)
        return out

    digest = hashlib.sha256(json.dumps(canonical(json.loads(model.to_json())), sort_keys=True).encode())
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.shape}:{value.dtype}:".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _all_layers(model):
    """Every layer inside `model`, those a wrapper holds as an attribute (`pipelines.bases.InferenceMode`) too."""
    return model._flatten_layers(include_self=False, recursive=True)


def _convert(model: keras.Model, folder: Path) -> None:
    """Keras model -> OpenVINO IR `folder/model.xml` (+ .bin), written into a private folder and renamed.

    OpenVINO converts the model's traced inference function (`training=False`) in memory: 3.3 s for Lite0
    here, against 9 s through a SavedModel on disk, with the same bits. Several workers may convert the
    same model at once: each writes its own folder, and the first rename wins (the others are dropped).
    """
    ov = _openvino()
    (spec,) = [tf.TensorSpec(tensor.shape, tensor.dtype) for tensor in model.inputs]
    traced = tf.function(lambda inputs: model(inputs, training=False)).get_concrete_function(spec)
    converted = ov.convert_model(traced)
    private = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:12]}")
    private.mkdir(parents=True)
    try:
        ov.save_model(converted, str(private / MODEL_XML), compress_to_fp16=False)
        (private / CHECKSUMS).write_text(json.dumps(_checksums(private), sort_keys=True))
        for name in (MODEL_XML, MODEL_BIN, CHECKSUMS):  # on the disk before the folder takes its key
            _fsync(private / name)
        try:
            os.rename(private, folder)  # atomic: a folder under the key holds a complete .xml and .bin
        except OSError:
            if not _complete(folder):
                raise
    finally:
        shutil.rmtree(private, ignore_errors=True)


# the code the traced function runs besides the model's config and weights (its custom layers' `call`)
TRACED_CODE = ("pipelines.bases", "pipelines.runtimes")


def conversion_key(model: keras.Model) -> str:
    """What decides a converted model: the Keras model, the OpenVINO, TensorFlow and Keras versions, the code
    the traced function runs (`TRACED_CODE`: an edit of a custom layer's `call` is another model), the config."""
    ov = _openvino()
    digest = hashlib.sha256(model_digest(model).encode())
    for version in (ov.__version__, tf.__version__, keras.__version__):
        digest.update(version.encode())
    digest.update(json.dumps(fingerprint.code_fingerprint(TRACED_CODE), sort_keys=True).encode())
    digest.update(json.dumps(OPENVINO_CONFIG, sort_keys=True).encode())
    return digest.hexdigest()[:32]


class OpenVINOModel:
    """A Keras model compiled by OpenVINO for the CPU; `predict` is safe to call from several threads."""

    def __init__(self, model: keras.Model, cache_dir: str | Path | None = None):
        ov = _openvino()
        self.key = conversion_key(model)
        scratch = None
        if cache_dir is None:
            scratch = tempfile.mkdtemp(prefix="openvino-")
            cache_dir = scratch
        folder = Path(cache_dir) / self.key
        try:
            if not _complete(folder):
                if folder.exists():  # damaged (a deletion killed half-way, bytes changed): converted again
                    logging.warning("runtime openvino: %s is damaged or incomplete; converting it again", folder)
                    _set_aside(folder)
                _convert(model, folder)
            try:
                self._compiled = ov.Core().compile_model(str(folder / MODEL_XML), "CPU", OPENVINO_CONFIG)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"runtime openvino: OpenVINO could not compile the converted model in {folder} "
                    f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                    "delete that folder to convert it again"
                ) from exc
        finally:
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        self._local = threading.local()
        self.streams = max(1, int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """One batch on one inference stream (callers run several threads to fill the others)."""
        request = getattr(self._local, "request", None)
        if request is None:  # one infer request per thread: two threads keep both streams busy
            request = self._local.request = self._compiled.create_infer_request()
        return np.array(request.infer({0: np.ascontiguousarray(inputs)})[0], copy=True)

    def predict_split(self, inputs: np.ndarray) -> np.ndarray:
        """One batch split over every inference stream, for a caller that runs one batch at a time.

        An image's outputs do not depend on the batch it shares here (tested), so the split changes no bit.
        """
        chunks = np.array_split(np.ascontiguousarray(inputs), min(self.streams, max(1, len(inputs))))
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = [self._compiled.create_infer_request() for _ in range(self.streams)]
        used = requests[: len(chunks)]
        errors = []
        for request, chunk in zip(used, chunks):
            request.start_async({0: chunk})
        for request in used:  # every one, even after an error in another: none is left busy
            try:
                request.wait()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the others finished
                errors.append(exc)
        if errors:
            raise errors[0]
        return np.concatenate([np.array(r.get_output_tensor(0).data, copy=True) for r in used])


def predictor(
    model: keras.Model, runtime: Runtime, cache_dir: str | Path | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """inputs -> outputs of `model` on the chosen runtime."""
    if runtime == "openvino":
        return OpenVINOModel(model, cache_dir).predict_split
    if runtime != "tensorflow":
        raise ValueError(f"unknown runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
    step = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return lambda inputs: step(tf.constant(inputs)).numpy()


def local_cache(root: str | None, name: str = "openvino") -> str | None:
    """A folder for converted models under a local cache root (None for a bucket or no root)."""
    if not root or "://" in root:
        return None
    return os.path.join(root, name)
