"""export stage: the serving SavedModel the model registry promotes, with its lineage.

Inputs
    finetune's ``model.keras``, train_head's ``head.keras`` (its hash, for the
    lineage), the convert stage's folder (``labels.json``, test ``records/`` for the
    check), the extract stage's ``features.json`` (the conv base's identity),
    download's ``manifest.jsonl`` and evaluate's ``metrics.json`` (both recorded in
    the lineage); params.yaml section ``export``.
Outputs
    ``<out>/serving/``     the serving SavedModel (encoded image bytes in, probabilities
                           and class names out; `pipelines.serving`), with its lineage in
                           ``assets.extra/lineage.json``; the ``classifier`` artifact
    ``<out>/params.json``  the resolved params

Before the stage finishes, ``serving_check`` test images go through the written
SavedModel as encoded bytes; its probabilities must match the Keras model's.

Run: ``python -m components.export --model data/finetune/model.keras
--head data/train_head/head.keras --convert data/convert --features data/extract/features.json
--manifest data/download/manifest.jsonl --metrics evaluation/metrics.json --out data/export``
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import keras
import numpy as np
import pydantic
import tensorflow as tf

import pipelines.bases  # noqa: F401 - registers the preprocessing layer the saved model uses
from components import lineage, outputs
from components.cli import configure_logging, run_main
from components.manifest import iter_jsonl, split_counts
from components.params import Section, TtaParams, log_resolved, read_params, section, write_resolved
from pipelines import record_checks, records, serving
from pipelines.fingerprint import file_sha256
from pipelines.normalise import DEFAULT_MAX_PIXELS, PILLOW_HARD_LIMIT

log = logging.getLogger(__name__)

SERVING = "serving"
LINEAGE = "lineage.json"  # in serving/assets.extra/: what the model was made from
DECLARED_OUTPUTS = (SERVING, "params.json")


class ExportParams(Section):
    serving_check: int = pydantic.Field(16, ge=1)  # test images fed to the exported SavedModel and compared
    # the serving model refuses an image whose header declares more pixels (a GIF: every frame), before decoding it
    max_pixels: int = pydantic.Field(DEFAULT_MAX_PIXELS, ge=1, le=PILLOW_HARD_LIMIT)


@dataclasses.dataclass(frozen=True)
class Config:
    export: ExportParams
    tta: TtaParams = TtaParams()

    def sections(self) -> dict[str, Section]:
        return {"export": self.export, "tta": self.tta}


def load_config(params_path: str | Path) -> Config:
    data = read_params(params_path)
    return Config(
        export=section(data, ExportParams, "export", params_path), tta=section(data, TtaParams, "tta", params_path)
    )


def check_serving(
    path: Path,
    model,
    samples: list[tuple[bytes, np.ndarray]],
    names: list[str],
    flip: str = "none",
    quarter_turns: bool = False,
) -> float:
    """Feed encoded test images to the exported SavedModel; its probabilities must match the Keras model's
    (with the same test-time augmentation)."""
    loaded = tf.saved_model.load(str(path))
    result = loaded.signatures[serving.SIGNATURE](images=tf.constant([blob for blob, _ in samples]))
    score = serving.with_tta(lambda x: model(x, training=False), flip, quarter_turns)
    expected = serving.probabilities_of(score(np.stack([pixels for _, pixels in samples])))
    gap = float(np.max(np.abs(result["probabilities"].numpy() - expected.numpy())))
    # `not gap <= 1e-4`: a NaN on either side (a diverged model, a broken graph) makes the gap NaN, which no
    # comparison passes; `gap > 1e-4` let it through, and hid every other image's gap with it
    if not gap <= 1e-4 or [c.decode() for c in result["classes"].numpy()[0]] != names:
        raise RuntimeError(f"the serving model disagrees with the Keras model (max probability gap {gap:.2e})")
    return gap


def lineage_record(
    manifest_path,
    rows: Iterable[dict],
    model_path,
    head_path,
    features: dict,
    names: list[str],
    metrics: dict,
    tta_flip: str = "none",
    tta_quarter_turns: bool = False,
) -> dict:
    """The lineage the serving model carries: its data, base, models, labels, metrics and libraries."""
    return {
        "manifest_sha256": file_sha256(manifest_path),
        "images": split_counts(rows),
        "labels": names,
        "conv_base": features["conv_base"],
        "extract_runtime": features.get("runtime", "tensorflow"),  # what computed the features the head learned
        "model_sha256": file_sha256(model_path),
        "head_sha256": file_sha256(head_path),
        "tta_flip": tta_flip,  # test-time augmentation inside the serving function (tta.flip)
        "tta_quarter_turns": tta_quarter_turns,  # and tta.quarter_turns
        "val_accuracy": {name: (m["val"] or {}).get("accuracy") for name, m in metrics.items()},
        "test_accuracy": {name: m["test"]["accuracy"] for name, m in metrics.items()},
        # the runtime that scored those accuracies (evaluate.runtime); the serving model itself is TensorFlow's
        "evaluate_runtime": {name: m.get("runtime", "tensorflow") for name, m in metrics.items()},
        "libraries": lineage.library_versions(),
    }


def run(
    config: Config,
    model_path: str | Path,
    head_path: str | Path,
    convert_dir: str | Path,
    features_path: str | Path,
    manifest_path: str | Path,
    metrics_path: str | Path,
    out_dir: str | Path,
) -> dict:
    convert_dir = Path(convert_dir)
    names = json.loads((convert_dir / "labels.json").read_text(encoding="utf-8"))
    features = json.loads(Path(features_path).read_text(encoding="utf-8"))
    metrics = json.loads(Path(metrics_path).read_text(encoding="utf-8"))
    model = keras.saving.load_model(model_path, compile=False)
    serving.check_classes(model, names, "export")  # before any work
    size = tuple(int(s) for s in model.input_shape[1:3])
    serving.check_tta(size, config.tta.quarter_turns)  # before any work
    test_files = records.split_files(convert_dir / "records", "test")
    # the manifest a line at a time (memory flat in the dataset): the first test ids in order, then the counts
    test_ids = heapq.nsmallest(
        config.export.serving_check, (row["id"] for row in iter_jsonl(manifest_path) if row["split"] == "test")
    )
    with record_checks.damaged_named(test_files):  # a damaged shard named, not TensorFlow's DataLossError
        samples = records.encoded_by_id(test_files, set(test_ids), records.record_decoder(size))
    if len(samples) != len(test_ids):  # the check would run on fewer images without a word
        lost = sorted(set(test_ids) - set(samples))
        raise RuntimeError(
            f"export: {len(lost)} of the {len(test_ids)} test images the serving check takes are in the manifest but "
            f"in no test record (e.g. {lost[0]}): the records and the manifest are not one run's; re-run convert"
        )
    with outputs.staged_dir(out_dir) as tmp:
        tta = config.tta
        serving.export(model, names, size, tmp / SERVING, tta.flip, tta.quarter_turns, config.export.max_pixels)
        outputs.stabilise_saved_model(tmp / SERVING)
        record = lineage_record(
            manifest_path,
            iter_jsonl(manifest_path),
            model_path,
            head_path,
            features,
            names,
            metrics,
            tta.flip,
            tta.quarter_turns,
        )
        (tmp / SERVING / "assets.extra").mkdir(parents=True, exist_ok=True)
        (tmp / SERVING / "assets.extra" / LINEAGE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        gap = check_serving(
            tmp / SERVING, model, [samples[i] for i in sorted(samples)], names, tta.flip, tta.quarter_turns
        )
        write_resolved(tmp, config.sections())
        outputs.require_outputs(tmp, DECLARED_OUTPUTS)
    log.info(
        "export: the serving model agrees with the Keras model on %d test images (max gap %.1e)", len(samples), gap
    )
    return {"serving_gap": gap, "checked": len(samples), "lineage": record}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (section export)")
    parser.add_argument("--model", required=True, help="finetune's model.keras")
    parser.add_argument("--head", required=True, help="train_head's head.keras (hashed into the lineage)")
    parser.add_argument("--convert", required=True, help="the convert stage's output folder")
    parser.add_argument("--features", required=True, help="the extract stage's features.json")
    parser.add_argument("--manifest", required=True, help="download's manifest.jsonl")
    parser.add_argument("--metrics", required=True, help="evaluate's metrics.json")
    parser.add_argument("--out", required=True, help="output folder (declared in dvc.yaml)")
    args = parser.parse_args(argv)
    configure_logging()
    config = load_config(args.params)
    log_resolved("export", config.sections())
    run(config, args.model, args.head, args.convert, args.features, args.manifest, args.metrics, args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
