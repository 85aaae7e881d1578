"""extract stage: run a frozen conv base over the convert stage's TFRecords and store the features (Beam).

Inputs
    the convert stage's folder (``records/``, ``summary.json``);
    params.yaml sections ``conv_base`` (shared with finetune) and ``extract``.
Outputs (one folder, written atomically)
    ``features/<split>-NNNNN-of-MMMMM.tfrecord``  one shard per input shard, records
        in input order: ``id``, ``label`` and ``features`` (float32, flattened)
    ``features.json``  feature shape, records per split, the base's fingerprint
                       (registry entry and weights, or the saved file's SHA-256)
    ``params.json``    the resolved params
    Nothing in the folder depends on timing or on the cache: the same records and
    base give the same bytes, cold or warm.
Also written
    ``--metrics`` file  images, how many were computed and how many came from the
                        cache, seconds and images/s (a DVC metric, not cached)
    ``--cache`` folder  the content-keyed feature cache (`pipelines.feature_cache`):
                        only images it does not hold go through the base. Not a DVC
                        output; deleting it only makes the next run cold.

Run: ``python -m components.extract --convert data/convert --weights data/base_weights --out data/extract
[--cache .cache/extract] [--metrics metrics/extract.json] [beam args]``
The runner and its options come from params.yaml's ``beam`` section, then
``TRANSFER_BEAM_ARGS``, then Beam arguments on the command line
(``components/beam_options.py``); on a distributed runner give ``--cache`` a
bucket path the workers share. Record counts come from the outputs, so a runner
without Beam metrics (Dask) runs the stage too; the metrics file's
``computed`` is then null.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Literal, Sequence

import apache_beam as beam
import numpy as np
import pydantic
import tensorflow as tf
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import StandardOptions

from components import beam_options, conv_base, outputs
from components.cli import configure_logging, run_main
from components.manifest import SPLITS
from components.params import ParamsError, Section, log_resolved, read_params, section, write_resolved
from pipelines import cache_lock, feature_cache, runtimes
from pipelines import extract as graph

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
FEATURES_JSON = "features.json"
DECLARED_OUTPUTS = (FEATURES_DIR, FEATURES_JSON, "params.json")


class ExtractParams(Section):
    batch_size: int = pydantic.Field(32, ge=1, le=4096)
    runtime: Literal["tensorflow", "openvino"] = "tensorflow"  # what runs the frozen base (pipelines/runtimes.py)


@dataclasses.dataclass(frozen=True)
class Config:
    conv_base: conv_base.ConvBaseParams
    extract: ExtractParams

    def sections(self) -> dict[str, Section]:
        return {"conv_base": self.conv_base, "extract": self.extract}


def load_config(params_path: str | Path) -> Config:
    data = read_params(params_path)
    return Config(
        conv_base=section(data, conv_base.ConvBaseParams, "conv_base", params_path),
        extract=section(data, ExtractParams, "extract", params_path),
    )


def shard_jobs(records_dir: Path, out_dir: Path) -> list[tuple[str, str, str]]:
    """(split, input shard, output shard) for every convert shard."""
    jobs = []
    for split in SPLITS:
        for path in sorted(records_dir.glob(f"{split}-*.tfrecord")):
            jobs.append((split, str(path), str(out_dir / path.name)))
    return jobs


def base_on_runtime(
    params: conv_base.ConvBaseParams,
    runtime: str,
    cache_dir: str | None,
    imagenet_weights_sha256: str | None = None,
    launcher_fingerprint: dict | None = None,
):
    """The frozen feature extractor, as a Keras model or compiled by OpenVINO (converted once per base
    into `cache_dir`): what each Beam worker builds, checked against the launcher's ImageNet weights and
    (`launcher_fingerprint`) its saved base or weights file."""
    conv_base.check_same_files(params, launcher_fingerprint or {})
    extractor = conv_base.build_extractor(params, imagenet_weights_sha256)
    return extractor if runtime == "tensorflow" else runtimes.OpenVINOModel(extractor, cache_dir)


def check_base_files(params: conv_base.ConvBaseParams) -> None:
    """A saved base (`conv_base.path`) or weights file (`conv_base.weights`) that is not there: a bad param."""
    for name, value in conv_base.file_params(params).items():
        if not Path(value).is_file():
            raise ParamsError(
                f"conv_base.{name}: {value} is not a file here (paths are relative to the project; a base in models/ "
                "is `dvc add`-ed or imported: `dvc pull` or `dvc checkout` brings it)"
            )


def cache_namespace(config: Config, fingerprint: dict | None = None) -> dict:
    """The feature cache's namespace record of these params (`feature_cache.namespace_record`): what the stage
    reads and writes under, and what `tools.cache_gc` keeps."""
    fingerprint = conv_base.fingerprint(config.conv_base) if fingerprint is None else fingerprint
    return feature_cache.namespace_record(fingerprint, config.extract.batch_size, config.extract.runtime)


def run(
    config: Config,
    convert_dir: str | Path,
    out_dir: str | Path,
    beam_args: Sequence[str] = (),
    *,
    cache_root: str | None = None,
    metrics_path: str | Path | None = None,
    runner: beam_options.BeamParams = beam_options.DIRECT,
) -> dict:
    options = beam_options.pipeline_options("extract", runner, beam_args)
    runtimes.check_installed(config.extract.runtime)  # before any work (and before the namespace names its version)
    convert_dir, out_dir = Path(convert_dir).resolve(), Path(out_dir).resolve()  # workers elsewhere: absolute paths
    expected = json.loads((convert_dir / "summary.json").read_text())["records"]
    check_base_files(config.conv_base)  # the fingerprint hashes them: a missing one was a bare FileNotFoundError
    fingerprint = conv_base.fingerprint(config.conv_base)
    runtime = config.extract.runtime
    namespace = cache_namespace(config, fingerprint)
    if cache_root and "://" not in cache_root:
        cache_root = str(Path(cache_root).resolve())
    # A namespace in the cache was built from exactly these params; otherwise build
    # the base here: a bad layer, size or missing weights stops the stage before Beam starts.
    feature_shape = feature_cache.stored_feature_shape(cache_root, namespace) if cache_root else None
    if feature_shape is None:
        try:
            probe = conv_base.build_extractor(config.conv_base)
        except ValueError as exc:  # Keras's, deep in building a saved base: a fixed input of another size
            if not config.conv_base.path or isinstance(exc, ParamsError):
                raise
            plain = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # Keras's bold
            lines = [line.strip() for line in plain.splitlines() if line.strip()] or [type(exc).__name__]
            said = next((line for line in lines if "shape" in line or "size" in line), lines[0])
            raise ParamsError(
                f"conv_base.path: the saved base {config.conv_base.path} cannot take conv_base.input_size "
                f"{list(config.conv_base.input_size)} ({said[:300]}): set the size it was saved for, or save the "
                "base with a flexible input"
            ) from None
        feature_shape = [int(d) for d in probe.output_shape[1:]]
        del probe  # each worker builds its own on its first cache miss (~1 s for Lite0): nothing is shared
    factory = functools.partial(
        base_on_runtime,
        conv_base.for_workers(config.conv_base),
        runtime,
        runtimes.local_cache(cache_root),
        fingerprint.get("imagenet_weights_sha256"),
        fingerprint,
    )
    started = time.monotonic()
    with outputs.staged_dir(out_dir) as tmp:
        (tmp / FEATURES_DIR).mkdir()
        jobs = shard_jobs(convert_dir / "records", tmp / FEATURES_DIR)
        pipeline = beam.Pipeline(options=options)
        graph.extract(
            pipeline,
            jobs,
            factory,
            config.conv_base.input_size,
            config.extract.batch_size,
            cache_root=cache_root,
            namespace=namespace,
            feature_shape=feature_shape,
            shards_at_once=shards_at_once(options),
        )
        result = pipeline.run()
        result.wait_until_finish()

        computed = images_computed(result)
        # A worker killed mid-shard (OOM, pre-emption) leaves its private `.partial-` file; the runner's retry wrote
        # the shard. Only the shards the jobs name go into the output (DVC would hash any other file in it).
        expected_files = {Path(target).name for _, _, target in jobs}
        for stray in sorted(p for p in (tmp / FEATURES_DIR).iterdir() if p.name not in expected_files):
            log.warning("extract: %s is no shard of this run (a killed worker's partial write): removed", stray.name)
            stray.unlink()
        written = {split: count_records(tmp / FEATURES_DIR, split) for split in SPLITS}  # every runner has outputs
        if written != expected:
            raise RuntimeError(f"feature records {written} do not match the TFRecords {expected}")
        elapsed = time.monotonic() - started
        total = sum(written.values())
        record = {
            "feature_shape": feature_shape,
            "feature_size": math.prod(feature_shape),
            "records": written,
            "conv_base": fingerprint,
            "runtime": runtime,
        }  # no timings or cache counts in the output: the same records and base give byte-identical outputs
        (tmp / FEATURES_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        write_resolved(tmp, config.sections())
        outputs.require_outputs(tmp, DECLARED_OUTPUTS)
    run_metrics = {
        "images": total,
        "computed": computed,
        "from_cache": None if computed is None else total - computed,
        "seconds": round(elapsed, 2),
        "images_per_s": round(total / elapsed, 2),
        "feature_size": record["feature_size"],
        # the cache namespace these features came from (machine-dependent): what tools.cache_gc keeps
        "cache_namespace": feature_cache.namespace_of(namespace),
    }
    if metrics_path:  # whole or not at all: tools.cache_gc reads the namespace to keep from it
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(metrics_path).with_name(f".{Path(metrics_path).name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(run_metrics, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, metrics_path)
    log.info(
        "extract: %d images %s in %.1fs (%.1f images/s; %s computed, %s from the cache), features %s",
        total,
        written,
        elapsed,
        total / elapsed,
        computed,
        run_metrics["from_cache"],
        feature_shape,
    )
    return {**record, **run_metrics}


def count_records(folder: Path, split: str) -> int:
    """Records in a split's feature shards (0 without shards)."""
    files = sorted(str(p) for p in folder.glob(f"{split}-*.tfrecord"))
    return int(tf.data.TFRecordDataset(files).reduce(np.int64(0), lambda n, _: n + 1)) if files else 0


def shards_at_once(options) -> int | None:
    """The shards a worker runs at once: one on Beam's DaskRunner, which gathers a bundle's outputs before it calls
    `finish_bundle` (`apache_beam/runners/dask/transform_evaluator.py`), so the counts a worker running several
    emits there, the last shards', were lost; None (the graph's own number) elsewhere."""
    return 1 if "DaskRunner" in str(options.view_as(StandardOptions).runner) else None


def images_computed(result) -> int | None:
    """Images that went through the base (the rest came from the cache); None on a runner without metrics.

    Every shard's bundle counts (zero when all its images came from the cache), so no counter at all means the
    runner reported no metrics, not that nothing was computed. A runner that reports attempted values only
    (Spark's portable batch mode) is read through `result`, which falls back to them."""
    try:
        counters = result.metrics().query(MetricsFilter().with_name(graph.COMPUTED))["counters"]
    except Exception as exc:  # noqa: BLE001 - NotImplementedError (Dask), a job service without metrics (gRPC)
        log.warning("extract: the runner reports no metrics (%s: %s); computed is null", type(exc).__name__, exc)
        return None
    values = [c.result for c in counters]
    if not counters or any(v is None for v in values):
        return None
    return int(sum(values))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (sections conv_base, extract)")
    parser.add_argument("--convert", required=True, help="the convert stage's output folder")
    parser.add_argument(
        "--weights", help="the base_weights stage's folder: the file `conv_base.weights: imagenet` loads"
    )
    parser.add_argument("--out", required=True, help="output folder (declared in dvc.yaml)")
    parser.add_argument("--cache", help="feature cache folder or bucket path, kept between runs (not a DVC output)")
    parser.add_argument("--metrics", help="where to write this run's counts and timing (a DVC metric)")
    args, beam_args = parser.parse_known_args(argv)
    configure_logging()
    config = load_config(args.params)
    conv_base.check_tracked(config.conv_base)
    if args.weights:  # the versioned ImageNet weights, not Keras's download cache
        config = dataclasses.replace(config, conv_base=conv_base.imagenet_from(config.conv_base, args.weights))
    log_resolved("extract", config.sections())
    with cache_lock.held(args.cache):  # no garbage collection while this run reads and writes the cache
        run(
            config,
            args.convert,
            args.out,
            beam_args,
            cache_root=args.cache,
            metrics_path=args.metrics,
            runner=beam_options.load(args.params),
        )
    return 0


if __name__ == "__main__":
    run_main(main)
