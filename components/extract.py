"""extract stage: run a frozen conv base over the convert stage's TFRecords and store the features (Beam).

Inputs
    the convert stage's folder (``records/``, ``summary.json``);
    params.yaml sections ``conv_base`` (shared with finetune) and ``extract``.
Outputs (one folder, written atomically)
    ``features/<split>-NNNNN-of-MMMMM.tfrecord``  one shard per input shard, records
        in input order: ``id``, ``label`` and ``features`` (float32, flattened)
    ``features.json``  feature shape, records per split, the base's fingerprint
                       (registry entry and weights, or the saved file's SHA-256)
                       and throughput
    ``params.json``    the resolved params

Run: ``python -m components.extract --convert data/convert --out data/extract [beam args]``
Beam arguments pass through unchanged to ``PipelineOptions``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import logging
import time
from pathlib import Path
from typing import Sequence

import pydantic

from components.cli import configure_logging
from components import conv_base, outputs
from components.download import SPLITS
from components.params import Section, log_resolved, parse_section, read_params, write_resolved

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
FEATURES_JSON = "features.json"
DECLARED_OUTPUTS = (FEATURES_DIR, FEATURES_JSON, "params.json")


class ExtractParams(Section):
    batch_size: int = pydantic.Field(32, ge=1, le=4096)


@dataclasses.dataclass(frozen=True)
class Config:
    conv_base: conv_base.ConvBaseParams
    extract: ExtractParams

    def sections(self) -> dict[str, Section]:
        return {"conv_base": self.conv_base, "extract": self.extract}


def load_config(params_path: str | Path) -> Config:
    data = read_params(params_path)
    return Config(
        conv_base=parse_section(conv_base.ConvBaseParams, "conv_base", data.get("conv_base")),
        extract=parse_section(ExtractParams, "extract", data.get("extract")),
    )


def shard_jobs(records_dir: Path, out_dir: Path) -> list[tuple[str, str, str]]:
    """(split, input shard, output shard) for every convert shard."""
    jobs = []
    for split in SPLITS:
        for path in sorted(records_dir.glob(f"{split}-*.tfrecord")):
            jobs.append((split, str(path), str(out_dir / path.name)))
    return jobs


def run(config: Config, convert_dir: str | Path, out_dir: str | Path, beam_args: Sequence[str] = ()) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import extract as graph

    convert_dir = Path(convert_dir)
    expected = json.loads((convert_dir / "summary.json").read_text())["records"]
    # Build once here: a bad layer, size or missing weights stops the stage before Beam starts.
    probe = conv_base.cached_extractor(config.conv_base)
    feature_shape = [int(d) for d in probe.output_shape[1:]]
    fingerprint = conv_base.fingerprint(config.conv_base)
    factory = functools.partial(conv_base.cached_extractor, config.conv_base)
    started = time.monotonic()
    with outputs.staged_dir(out_dir) as tmp:
        (tmp / FEATURES_DIR).mkdir()
        jobs = shard_jobs(convert_dir / "records", tmp / FEATURES_DIR)
        with beam.Pipeline(options=PipelineOptions(list(beam_args))) as pipeline:
            graph.extract(pipeline, jobs, factory, config.conv_base.input_size, config.extract.batch_size)
        written = {split: _count(tmp / FEATURES_DIR, split) for split in SPLITS}
        if written != expected:
            raise RuntimeError(f"feature records {written} do not match the TFRecords {expected}")
        elapsed = time.monotonic() - started
        total = sum(written.values())
        record = {
            "feature_shape": feature_shape,
            "feature_size": math.prod(feature_shape),
            "records": written,
            "conv_base": fingerprint,
        }  # no timings in the output: the same records and base give byte-identical outputs
        (tmp / FEATURES_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        write_resolved(tmp, config.sections())
        outputs.require_outputs(tmp, DECLARED_OUTPUTS)
    log.info("extract: %d images %s in %.1fs (%.1f images/s), features %s", total, written, elapsed, total / elapsed, feature_shape)
    return {**record, "seconds": round(elapsed, 2), "images_per_s": round(total / elapsed, 2)}


def _count(features_dir: Path, split: str) -> int:
    import tensorflow as tf

    files = sorted(str(p) for p in features_dir.glob(f"{split}-*.tfrecord"))
    return int(sum(1 for _ in tf.data.TFRecordDataset(files))) if files else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (sections conv_base, extract)")
    parser.add_argument("--convert", required=True, help="the convert stage's output folder")
    parser.add_argument("--out", required=True, help="output folder (declared in dvc.yaml)")
    args, beam_args = parser.parse_known_args(argv)
    configure_logging()
    config = load_config(args.params)
    log_resolved("extract", config.sections())
    run(config, args.convert, args.out, beam_args)
    return 0


if __name__ == "__main__":
    from components.cli import run_main

    run_main(main)
