"""base_weights stage: a registry base's ImageNet weights as a versioned file, read by extract and finetune.

With ``conv_base.weights: imagenet``, Keras fetches a registry base's weights into its own download cache
(``~/.keras/models``), a file no stage declares: replacing it would change the features and the fine-tuned
model while `dvc status` saw nothing, and an auditor's rebuild would use whatever that machine's cache holds.
This stage loads them once (Keras's download, or its cache offline) and writes them as a DVC output, cached,
pushed and pulled like any other: extract and finetune build the base from this file, so the weights a model
was made with are versioned with it.

Inputs
    params.yaml keys ``conv_base.name``, ``conv_base.path``, ``conv_base.weights``, ``conv_base.input_size``
    (only those: pooling or a tapped layer do not change the weights).
Outputs
    ``<out>/weights.json``          which base and weights this is, and the file's SHA-256 (null without one)
    ``<out>/imagenet.weights.h5``   the weights (Keras's ``save_weights``; the same bytes from the same weights),
                                    only with ``weights: imagenet`` on a registry base

A saved base (``conv_base.path``), ``weights: none`` or a weights file in ``models/`` needs nothing fetched:
the stage writes the record alone, without importing TensorFlow.

Run: ``python -m components.base_weights --params params.yaml --out data/base_weights``
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import os
import shutil
import traceback
from pathlib import Path
from typing import Sequence

from components import conv_base, outputs
from components.cli import EnvironmentProblem, configure_logging, run_main
from components.conv_base import ConvBaseParams
from components.params import Section, log_resolved, read_params, section
from pipelines.fingerprint import file_sha256

log = logging.getLogger(__name__)

RECORD, WEIGHTS = conv_base.WEIGHTS_RECORD, conv_base.IMAGENET_WEIGHTS


@dataclasses.dataclass(frozen=True)
class Config:
    conv_base: ConvBaseParams

    def sections(self) -> dict[str, Section]:
        return {"conv_base": self.conv_base}


def load_config(params_path: str | Path) -> Config:
    return Config(conv_base=section(read_params(params_path), ConvBaseParams, "conv_base", params_path))


class UnreadableKerasCache(EnvironmentProblem):
    """The weights file in Keras's download cache cannot be read (a download cut short, a damaged file)."""


def keras_models_folder() -> str:
    """Where `keras.utils.get_file` keeps the applications' weights (KERAS_HOME's or ~/.keras's `models`)."""
    from keras.src.backend import config

    return os.path.join(os.path.expanduser(config.keras_home()), "models")


def raised_by_h5py(exc: BaseException) -> bool:
    """Whether h5py raised `exc` (reading the weights file), not the download before it."""
    return any("/h5py/" in frame.filename.replace(os.sep, "/") for frame in traceback.extract_tb(exc.__traceback__))


def unreadable_cache_message(name: str, exc: OSError) -> str:
    return (
        f"conv_base.weights: the ImageNet weights of {name} in Keras's download cache ({keras_models_folder()}) "
        f"cannot be read ({exc}). Keras downloads straight to the file's final name, so a download cut short by a "
        f"killed run stays there and is read by every later run: delete {name}'s file in that folder "
        "and run again where the network is reachable, or `dvc pull data/base_weights` where a machine with "
        "network access ran and pushed this stage."
    )


def reusable(out_dir: str | Path, record: dict) -> str | None:
    """The SHA-256 of the weights file `out_dir` already holds, when its record is `record` (the same base, weights,
    size and Keras release) and the file still has the hash the record names; else None. The stage re-runs whenever one of its
    modules changes: it keeps what it fetched rather than fetch again, which needs the network or this machine's
    Keras cache (an auditor's clone has neither, only the pulled output) and could bring other bytes."""
    folder = Path(out_dir)
    try:
        held = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        if {**held, "sha256": None} == {**record, "file": WEIGHTS} and file_sha256(folder / WEIGHTS) == held["sha256"]:
            return held["sha256"]
    except (OSError, ValueError, TypeError, KeyError):
        pass
    return None


def run(config: Config, out_dir: str | Path) -> dict:
    params = config.conv_base
    fetches = conv_base.fetches_imagenet(params)
    record = {
        "name": params.name,
        "path": params.path,
        "weights": params.weights,
        "input_size": list(params.input_size),
        # what fetched the weights (a Keras release may point its applications at other files): kept weights must
        # come from the same one
        "keras": importlib.metadata.version("keras") if fetches else None,
        "file": None,
        "sha256": None,
    }
    held = reusable(out_dir, record) if fetches else None
    with outputs.staged_dir(out_dir) as tmp:
        if held:  # the weights this output already holds (dvc.yaml: persist): nothing fetched again
            shutil.copyfile(Path(out_dir) / WEIGHTS, tmp / WEIGHTS)
            record.update(file=WEIGHTS, sha256=held)
        elif fetches:
            from pipelines import bases  # TensorFlow: only when there are weights to write

            try:
                with conv_base.errors_named_by_param():
                    base, _ = bases.load_conv_base(
                        params.name, None, "imagenet", params.input_size, offline_error=conv_base.BaseWeightsOffline
                    )
            except OSError as exc:
                if not raised_by_h5py(exc):  # a download's own failure (Keras deletes its part-written file)
                    raise
                raise UnreadableKerasCache(unreadable_cache_message(params.name, exc)) from None
            base.save_weights(tmp / WEIGHTS)
            record.update(file=WEIGHTS, sha256=file_sha256(tmp / WEIGHTS))
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        outputs.require_outputs(tmp, [RECORD] + ([WEIGHTS] if record["file"] else []))
    if held:
        log.info(
            "base_weights: kept the ImageNet weights of %s already in %s (SHA-256 %s)", params.name, out_dir, held[:12]
        )
    elif record["file"]:
        log.info(
            "base_weights: ImageNet weights of %s at %s written (SHA-256 %s)",
            params.name,
            params.input_size,
            record["sha256"][:12],
        )
    else:
        log.info("base_weights: conv_base needs no ImageNet download; record only")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (section conv_base)")
    parser.add_argument("--out", required=True, help="output folder (declared in dvc.yaml)")
    args = parser.parse_args(argv)
    configure_logging()
    config = load_config(args.params)
    log_resolved("base_weights", config.sections())
    run(config, args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
