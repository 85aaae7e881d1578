"""Fingerprints of code and of namespace records, for the content-keyed caches (`feature_cache`, `download_cache`).

Nothing heavy is imported here, so a stage that only needs a namespace (download) does not load Keras.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform

# CPU features that decide which kernels oneDNN (TensorFlow) and OpenVINO run, and so a float's last bits
ISA_FLAGS = (
    "sse4_1",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
# ... and their counterparts on ARM (/proc/cpuinfo's `Features` line: NEON, dot product, SVE, bf16, int8)
ARM_ISA_FLAGS = ("asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2", "bf16", "i8mm", "sme")
# ... and the settings that switch them
# (XLA's auto-clustering, TF_XLA_FLAGS, runs other kernels: other bits, seen 2026-12-06)
ISA_ENVIRONMENT = (
    "TF_ENABLE_ONEDNN_OPTS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "OMP_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
    "TF_XLA_FLAGS",
)


def code_fingerprint(modules: tuple[str, ...]) -> dict[str, str]:
    """module -> SHA-256 of its source file."""
    fingerprint = {}
    for name in modules:
        spec = importlib.util.find_spec(name)
        with open(spec.origin, "rb") as handle:
            fingerprint[name] = hashlib.sha256(handle.read()).hexdigest()
    return fingerprint


def namespace_of(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The `ISA_FLAGS` (x86's `flags` line) or `ARM_ISA_FLAGS` (aarch64's `Features`) this CPU has (Linux's
    /proc/cpuinfo; none where it cannot be read)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        for label, known in (("flags", ISA_FLAGS), ("Features", ARM_ISA_FLAGS)):
            if line.startswith(label) and ":" in line:
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in known if flag in present]
    return []


def usable_cpus() -> int:
    """The cores this process may run on (its affinity: taskset, a container's cpuset), which TensorFlow sizes
    its thread pools by; `os.cpu_count()` counts the machine's, pinned or not."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def machine_record(cpuinfo: str | None = None) -> dict:
    """What about the machine decides a model's outputs to the last bit: the architecture, its instruction-set
    extensions, the cores it may use (the threads a kernel splits its sums over) and the settings above. Caches shared
    between machines (a bucket, a CI cache) keep each kind of machine's results apart by it."""
    return {
        "machine": platform.machine(),
        "cpu_flags": cpu_flags(cpuinfo),
        "cpus": usable_cpus(),
        "environment": {name: os.environ[name] for name in ISA_ENVIRONMENT if name in os.environ},
    }


def file_sha256(path: str | os.PathLike) -> str:
    """A file's SHA-256, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


KERAS_DEFAULTS = {"floatx": "float32", "backend": "tensorflow", "image_data_format": "channels_last"}


def keras_settings(floatx: str, backend: str, image_data_format: str) -> dict:
    """Keras's config (~/.keras/keras.json, KERAS_HOME) where it is not the default: float64 computes other
    features and trains other weights. Nothing where it is, so the feature cache's namespaces and the training
    histories' machine records made before this was recorded stay valid."""
    settings = {"floatx": floatx, "backend": backend, "image_data_format": image_data_format}
    return {} if settings == KERAS_DEFAULTS else {"keras_config": settings}


def compute_record() -> dict:
    """What of this process decides a TensorFlow computation's last bits: `machine_record`, with Keras's config and
    the GPUs where they are not the defaults (feature cache namespaces and training histories record it alike).
    Keras and TensorFlow are imported here, on use: download, which needs only `machine_record`, does not load them."""
    import keras
    import tensorflow as tf

    return {
        **machine_record(),
        **keras_settings(keras.config.floatx(), keras.config.backend(), keras.config.image_data_format()),
        **accelerators(tf.config.list_physical_devices("GPU")),
    }


def accelerators(gpus) -> dict:
    """The GPUs TensorFlow would run the base, or training, on (their kernels and TF32 give other bits than a
    CPU's), with TF32's setting; nothing on a machine without one (the records made before stay valid)."""
    if not gpus:
        return {}
    import tensorflow as tf  # only where there is a GPU: this module stays light

    details = []
    for gpu in gpus:
        try:
            found = tf.config.experimental.get_device_details(gpu)
        except Exception:  # noqa: BLE001 - a fake or odd device: its name still tells it apart
            found = {}
        details.append({"name": getattr(gpu, "name", str(gpu)), **{k: str(v) for k, v in sorted(found.items())}})
    return {
        "gpus": details,
        "tensor_float_32": bool(tf.config.experimental.tensor_float_32_execution_enabled()),
        "cuda": {k: str(v) for k, v in sorted(tf.sysconfig.get_build_info().items()) if "cuda" in k or "cudnn" in k},
    }
