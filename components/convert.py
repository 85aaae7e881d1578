"""convert stage: manifest + images -> sharded TFRecords and the tf.Transform graph (Apache Beam).

Inputs
    the download stage's folder (``manifest.jsonl`` and ``images/``);
    params.yaml section ``convert``.
Outputs (one folder, written atomically)
    ``records/<split>-NNNNN-of-MMMMM.tfrecord``  tf.Examples with ``image`` (the
        encoded JPEG/PNG bytes as download stored them), ``label`` (index),
        ``label_name`` and ``id`` (see ``pipelines/features.py``)
    ``transform/``   the tf.Transform output (``transform_fn`` SavedModel with the
                     label vocabulary, analysed on the train split only)
    ``labels.json``  the label vocabulary in index order
    ``summary.json`` records per split and class, shard counts, sizes on disk
    ``params.json``  the resolved params

Run: ``python -m components.convert --download data/download --out data/convert [beam args]``
The runner and its options come from params.yaml's ``beam`` section, then
``TRANSFER_BEAM_ARGS``, then Beam arguments on the command line
(``components/beam_options.py``); the DirectRunner is the default. The outputs
are the same bytes on every runner.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
import pydantic
import tensorflow as tf
from apache_beam.options.pipeline_options import GoogleCloudOptions

from components import beam_options, outputs
from components.cli import EnvironmentProblem, configure_logging, run_main
from components.manifest import LINE_BREAKS, MANIFEST, SPLITS, expected_counts, iter_jsonl
from components.params import Section, load_section, log_resolved, write_resolved
from pipelines import convert as graph
from pipelines import features as fk

log = logging.getLogger(__name__)

RECORDS = "records"
TRANSFORM = "transform"
LABELS = "labels.json"
SUMMARY = "summary.json"
DECLARED_OUTPUTS = (RECORDS, TRANSFORM, LABELS, SUMMARY, "params.json")


class Shards(Section):
    train: int = pydantic.Field(4, ge=1, le=10_000)
    val: int = pydantic.Field(2, ge=1, le=10_000)
    test: int = pydantic.Field(2, ge=1, le=10_000)


class ConvertParams(Section):
    shards: Shards = Shards()


@dataclasses.dataclass(frozen=True)
class Config:
    convert: ConvertParams

    def sections(self) -> dict[str, Section]:
        return {"convert": self.convert}


def load_config(params_path: str | Path) -> Config:
    return Config(convert=load_section(params_path, ConvertParams, "convert"))


# --------------------------------------------------------------------------- pure


ID = re.compile(r"[0-9a-f]{12,}")  # what download writes (a content hash); shards are chosen by its first 12 digits


def row_problem(row) -> str | None:
    """What makes one manifest row unusable by the transform (a field missing or of the wrong kind, an id that is
    not download's hexadecimal hash, a class name that is empty, holds a line break or is not UTF-8), else None."""
    if not isinstance(row, dict):
        return f"a row is a JSON object, not {type(row).__name__}"
    missing = [key for key in ("id", "file", "label", "split") if not isinstance(row.get(key), str)]
    if missing:
        return f"fields {missing} are missing or not strings"
    if row["split"] not in SPLITS:
        return f"unknown splits [{row['split']!r}]; expected {list(SPLITS)}"
    if not ID.fullmatch(row["id"]):
        return f"id {row['id']!r} is not download's hexadecimal hash"
    label = row["label"]
    if not label:
        return "the class name is empty (an empty line of the label vocabulary)"
    if LINE_BREAKS.intersection(label):
        return f"class names [{label!r}] hold a line break, which the label vocabulary (a name a line) cannot"
    for value in (label, row["file"]):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{value!r} is not valid UTF-8 (a lone surrogate)"
    if not row["file"]:
        return "the file name is empty"
    return None


def checked_rows(manifest: Iterable[Mapping]) -> Iterator[Mapping]:
    """The manifest's rows, each refused with its number where the transform cannot take it (`row_problem`) or
    its id is repeated (memory holds the ids)."""
    seen: set[str] = set()
    for number, row in enumerate(manifest, 1):
        problem = row_problem(row)
        if problem is None and row["id"] in seen:
            problem = f"id {row['id']} is repeated (the records would depend on the rows' order)"
        if problem:
            raise ValueError(
                f"manifest row {number}: {problem}: rename the class folders or fix the row, and run download again"
            )
        seen.add(row["id"])
        yield row


def check_manifest(manifest: Iterable[Mapping]) -> dict[str, dict[str, int]]:
    """Refuse a manifest the transform cannot handle, before starting Beam, read a row at a time (`checked_rows`);
    returns its rows per split and class (`expected_counts`)."""
    counts = expected_counts(checked_rows(manifest))
    if not any(counts.values()):
        raise ValueError("the manifest is empty: the download stage kept no image")
    train = set(counts["train"])
    unseen = {split: sorted(set(counts[split]) - train) for split in SPLITS[1:]}
    unseen = {split: names for split, names in unseen.items() if names}
    if unseen:
        raise ValueError(
            f"classes {unseen} appear outside train but not in train; the label vocabulary "
            "is learned from train only, so they would have no index"
        )
    return counts


# --------------------------------------------------------------------------- run


def _temp_location(options) -> str | None:
    return options.view_as(GoogleCloudOptions).temp_location


def count_records(records_dir: Path, labels: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
    """Read every TFRecord back and count records per split and class; with `labels` (labels.json's list),
    every record's label index must name its class there (what training and serving report by)."""
    spec = {
        fk.LABEL_NAME: tf.io.FixedLenFeature([], tf.string),
        fk.LABEL: tf.io.FixedLenFeature([], tf.int64),
    }
    counts: dict[str, collections.Counter] = {}
    for split in SPLITS:
        files = sorted(str(p) for p in records_dir.glob(f"{split}-*.tfrecord"))
        counter: collections.Counter = collections.Counter()
        if files:
            # each record parsed alone, its image dropped before batching: a batch of whole records held 512 images
            dataset = tf.data.TFRecordDataset(files).map(lambda s: tf.io.parse_single_example(s, spec)).batch(512)
            for batch in dataset.as_numpy_iterator():
                names = [name.decode("utf-8") for name in batch[fk.LABEL_NAME]]
                if labels is not None:
                    for name, index in zip(names, batch[fk.LABEL].tolist()):
                        if not 0 <= index < len(labels) or labels[index] != name:
                            raise RuntimeError(
                                f"a {split} record of class {name!r} has label {index}, which labels.json "
                                f"({len(labels)} names) does not give that name"
                            )
                counter.update(names)
        counts[split] = dict(sorted(counter.items()))
    return counts


def vocabulary_labels(blob: bytes) -> list[str]:
    """The label vocabulary file's names, one a line as tf.Transform writes and reads it (split on "\\n" only:
    str.splitlines would also split a name at U+0085, U+2028 and other breaks, shifting every later name)."""
    if blob and not blob.endswith(b"\n"):
        raise RuntimeError("the label vocabulary file does not end in a newline")
    return [token.decode("utf-8") for token in blob.split(b"\n")[:-1]]


PATTERN_CHARACTERS = "*?["  # what opens a pattern for Beam's match (a lone `]` does not)
# ... and, in the output's and the analysis folder's paths, TensorFlow's escape character (its match read `\x` as
# `x`: the analysis failed on files "not found") and the quote stabilise_saved_model cannot rewrite (after the job)
OUTPUT_CHARACTERS = PATTERN_CHARACTERS + '\\"'


def check_no_pattern(*folders: Path | str, characters: str = PATTERN_CHARACTERS) -> None:
    """Beam reads the manifest's path, and TensorFlow the analysis' scratch folder beside the output, as glob
    patterns: under a folder named `proj [v2]` convert failed after download had worked, on a missing file (or read
    another copy's manifest that the pattern matched). A clear error before any work instead."""
    for folder in folders:
        if any(c in str(folder) for c in characters):
            raise EnvironmentProblem(
                f"convert: the path {folder} holds one of {' '.join(characters)}, which Beam and TensorFlow "
                "read as a file pattern or an escape: move the project (or data/) to a path without them"
            )


def run(
    config: Config,
    download_dir: str | Path,
    out_dir: str | Path,
    beam_args: Sequence[str] = (),
    runner: beam_options.BeamParams = beam_options.DIRECT,
) -> dict:
    """Run the Beam pipeline into a staging folder; verify counts; move into place."""
    started = time.monotonic()
    options = beam_options.pipeline_options("convert", runner, beam_args)  # a runner it cannot use: before any work
    download_dir = Path(download_dir).resolve()  # absolute: workers elsewhere resolve relative paths their own way
    check_no_pattern(download_dir)
    check_no_pattern(Path(out_dir).resolve(), characters=OUTPUT_CHARACTERS)
    expected = check_manifest(iter_jsonl(download_dir / MANIFEST))  # a row at a time
    shards = config.convert.shards.model_dump()
    # The analysis' scratch folder; tf.Transform writes its path into the transform graph, where
    # stabilise_saved_model replaces it (below), so the graph does not depend on where this ran.
    out_dir = Path(out_dir).resolve()
    # named for this run (a process id and a token): a second convert started on the same output, by hand, never
    # deletes a running one's analysis files; a killed run's are swept (the old fixed name too)
    outputs.remove_stale(out_dir.parent, f".{out_dir.name}.tft_tmp-")
    shutil.rmtree(out_dir.parent / f".{out_dir.name}.tft_tmp", ignore_errors=True)
    local_temp = out_dir.parent / f".{out_dir.name}.tft_tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with outputs.staged_dir(out_dir) as tmp:
        # a folder of this run's own under the runner's temp_location (a bucket on a cluster): two runs sharing one
        # never write the same analysis files, and its path is long enough for stabilise_saved_model to replace
        temp_location = _temp_location(options)
        temp_dir = f"{temp_location.rstrip('/')}/convert-tft-{uuid.uuid4().hex}" if temp_location else str(local_temp)
        check_no_pattern(temp_dir, characters=OUTPUT_CHARACTERS)
        pipeline = beam.Pipeline(options=options)
        graph.convert(
            pipeline,
            manifest_path=str(download_dir / MANIFEST),
            images_root=str(download_dir),
            records_dir=str(tmp / RECORDS),
            transform_dir=str(tmp / TRANSFORM),
            shards=shards,
            temp_dir=temp_dir,
        )
        # waited for explicitly: `with beam.Pipeline(...)` does not wait under `no_wait_until_finish`, and on an
        # asynchronous runner (portable, Flink, Spark, Dataflow) the outputs below would be read mid-job
        try:
            state = pipeline.run().wait_until_finish()
        finally:  # a failed job's too: under a temp_location (a bucket) nothing else ever removed them
            shutil.rmtree(local_temp, ignore_errors=True)  # a killed run's: swept by the next (its process is gone)
            if temp_location:
                try:
                    tf.io.gfile.rmtree(temp_dir)
                except tf.errors.NotFoundError:
                    pass
                except Exception as exc:  # noqa: BLE001 - never in place of the job's own error
                    log.warning("convert: could not remove the analysis folder %s: %s", temp_dir, exc)
        if state not in (None, beam.runners.runner.PipelineState.DONE):
            raise RuntimeError(f"convert: the Beam job ended {state}, not DONE")
        vocab_file = tmp / TRANSFORM / "transform_fn" / "assets" / fk.LABEL_VOCABULARY
        vocabulary = hashlib.sha256(vocab_file.read_bytes()).hexdigest()[:16]
        outputs.stabilise_saved_model(tmp / TRANSFORM / "transform_fn", temp_dir, f"label_vocabulary_{vocabulary}")
        labels = vocabulary_labels(vocab_file.read_bytes())
        written = count_records(tmp / RECORDS, labels)
        if written != expected:
            raise RuntimeError(f"records do not match the manifest: wrote {written}, manifest has {expected}")
        (tmp / LABELS).write_text(json.dumps(labels, ensure_ascii=False) + "\n", encoding="utf-8")
        elapsed = time.monotonic() - started
        summary = {
            "records": {split: sum(c.values()) for split, c in written.items()},
            "per_class": written,
            "labels": labels,
            "shards": shards,
            "bytes": {
                split: sum(p.stat().st_size for p in (tmp / RECORDS).glob(f"{split}-*.tfrecord")) for split in SPLITS
            },
            "source_image_bytes": sum(
                (download_dir / row["file"]).stat().st_size for row in iter_jsonl(download_dir / MANIFEST)
            ),
            "image_encoding": "encoded bytes as stored by download (JPEG as-is, PNG if normalised)",
        }
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        write_resolved(tmp, config.sections())
        outputs.require_outputs(tmp, DECLARED_OUTPUTS)
    total = sum(summary["records"].values())
    log.info("convert: %d records %s in %.1fs (%.1f images/s)", total, summary["records"], elapsed, total / elapsed)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (section convert)")
    parser.add_argument("--download", required=True, help="the download stage's output folder")
    parser.add_argument("--out", required=True, help="output folder (declared in dvc.yaml)")
    args, beam_args = parser.parse_known_args(argv)
    configure_logging()
    config = load_config(args.params)
    log_resolved("convert", config.sections())
    run(config, args.download, args.out, beam_args, beam_options.load(args.params))
    return 0


if __name__ == "__main__":
    run_main(main)
