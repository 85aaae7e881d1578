"""Apply a preset (a YAML file of params overrides): run it as an experiment, or write it into params.yaml.

    python -m tools.preset presets/real_lite0.yaml --run            # dvc exp run -S ... (no shell)
    python -m tools.preset presets/real_lite0.yaml --run --queue    # dvc exp run --queue -S ...
    python -m tools.preset presets/tiny.yaml --write                # edit params.yaml in place
    python -m tools.preset presets/tiny.yaml                        # print the -S arguments

The merged params are validated with every stage's own config first, so a
preset with an unknown key or a bad value fails here, naming the key.

A preset may also name its inputs, ``inputs: {repo path: source}``: data or a
conv base from outside the repository (``../shared/...``). With ``--write`` or
``--run``, each one missing is brought in as a DVC-tracked import (`dvc
import-url`: a ``.dvc`` file to commit, the bytes in DVC's cache and remote),
and one whose ``.dvc`` file is committed but whose data is absent (a fresh
clone) is pulled, or fetched from its source again. A queued experiment is
built from git's committed state: once the ``.dvc`` files are committed, its
temporary copy has the inputs (``--queue`` refuses to run before that). The params point at the repo path, never outside the
repository. Printing the arguments changes nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from components import (
    base_weights,
    beam_options,
    conv_base,
    convert,
    download,
    evaluate,
    export,
    extract,
    finetune,
    quality,
    train_head,
)
from components.cli import dvc, run_main
from components.params import (
    ParamsError,
    dump_yaml,
    load_yaml,
    parse_section,
    read_params,
    write_params,
)
from pipelines import bases, classifier, runtimes, serving
from tools import outputs_in_git, retrain

# Mappings whose keys are the user's, not the params' schema (any Beam option): a key they lack is a new one
OPEN_MAPPINGS = frozenset({"beam.options"})


def merge(base: Mapping, overrides: Mapping, prefix: str = "") -> dict:
    """Deep-merge `overrides` into `base`; a key that `base` lacks is refused (but in `OPEN_MAPPINGS`)."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in merged and prefix[:-1] not in OPEN_MAPPINGS:
            raise ParamsError(f"{path}: unknown key; allowed keys: {', '.join(sorted(map(str, merged)))}")
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) and merged[key]:
            merged[key] = merge(merged[key], value, f"{path}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def leaves(overrides: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in overrides.items():
        if isinstance(value, Mapping) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# A string DVC's override grammar (Hydra) reads back as the same string when unquoted: a letter first, then
# letters, digits and _ . / -, and not a word it reads as null, a bool or a float ("1.0", "true", "NULL", "inf",
# "1_000" would come back as other types)
_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")
_READ_AS_OTHER = {"null", "true", "false", "inf", "nan"}


def has_key(params: Mapping, dotted: str) -> bool:
    """Whether `params` holds the dotted key (a mapping at every step before it)."""
    value: Any = params
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False
        value = value[part]
    return True


def check_carried(key: str, value: Any, in_file: bool = False) -> None:
    """Refuse what DVC's -S would change in a value: `${...}`, which it interpolates (`${oc.env:HOME}` became
    /root), and a backslash or a control character; `in_file`: a value written into params.yaml, where the next
    `dvc exp run -S` of any key interpolates `${...}` (DVC resolves the whole file) but keeps the others."""
    for text in _strings(value):  # a list's strings too (`beam.options.experiments`): DVC reads them the same way
        if not in_file and any(c == "\\" or ord(c) < 32 for c in text):
            raise ParamsError(f"{key}: {text!r}: a backslash or control character does not survive DVC's -S")
        if "${" in text:
            raise ParamsError(f"{key}: {text!r}: DVC's -S would interpolate ${{...}} instead of keeping it")


def read_yaml_file(path: Path) -> Any:
    """A preset's or sweep's YAML, read as the stages read params.yaml; a file that cannot be read or parsed is
    an error naming it, not a parser's traceback."""
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except ParamsError as exc:  # a key given twice
        raise ParamsError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:  # the file and the place (a review on 2026-12-07)
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None


def set_arg(key: str, value: Any, new: bool = False) -> list[str]:
    """``-S key=value`` for one dotted key; the value in JSON (a string quoted unless plain), which DVC reads as
    YAML. `new`: a key params.yaml does not have yet (an option under `beam.options: {}`), which DVC's -S
    sets only as ``+key=value`` (it refuses the plain form)."""
    check_carried(key, value)
    plain = isinstance(value, str) and _PLAIN.fullmatch(value) and value.lower() not in _READ_AS_OTHER
    text = value if plain else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return ["-S", f"{'+' if new else ''}{key}={text}"]


def _strings(value: Any) -> Iterator[str]:
    """Every string in a value, inside lists and mappings (their keys too)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def set_args(overrides: Mapping, base: Mapping | None = None) -> list[str]:
    """`set_arg` for every leaf of nested overrides; those `base` (the params they apply to) lacks are new keys."""
    return [
        arg
        for key, value in leaves(overrides)
        for arg in set_arg(key, value, new=base is not None and not has_key(base, key))
    ]


def dvc_file_of(target: str, repo: Path) -> str:
    """The .dvc file of an input's target, relative to the repository."""
    target_path = repo / target
    return target_path.with_name(target_path.name + ".dvc").relative_to(repo).as_posix()


def check_inputs(inputs: Mapping[str, str], preset_path: Path, repo: Path) -> None:
    """Each input has a source (a relative one is relative to the repository root: ``../shared/...`` is
    the folder beside it) or is already tracked in the repository."""
    for target, source in inputs.items():
        tracked = (repo / dvc_file_of(target, repo)).exists()
        if not tracked and "://" not in source and not (repo / source).exists():
            raise ParamsError(f"{preset_path}: inputs.{target}: {source} does not exist (relative to {repo})")
        if not tracked and (repo / target).exists():  # `dvc import-url` would import *into* it, mixing the two
            raise ParamsError(
                f"{preset_path}: inputs.{target}: {target} exists and is not a DVC import ({dvc_file_of(target, repo)} "
                "is missing): move it away and apply the preset again (or, to use that folder, drop the input from "
                "the preset, `dvc add` the folder and point the preset's params at it)"
            )


def import_inputs(inputs: Mapping[str, str], repo: Path) -> list[str]:
    """Bring each input into the repository as a DVC-tracked import; returns the .dvc files made.

    A new input is `dvc import-url`-ed. One whose .dvc file is committed but whose
    data is not here (a fresh clone) comes from DVC's cache or remote (`dvc pull`),
    or else from its source again (`dvc update`).
    """

    made = []
    for target, source in inputs.items():
        target_path = repo / target
        dvc_file = dvc_file_of(target, repo)
        source_path = str((repo / source).resolve()) if "://" not in source else source
        if (repo / dvc_file).exists():
            recorded = (yaml.safe_load((repo / dvc_file).read_text(encoding="utf-8")) or {}).get("deps")
            if not recorded:  # `dvc add`-ed: data of its own, from no source, which the preset would run on
                raise ParamsError(
                    f"{dvc_file} tracks {target} as added data (`dvc add`), not as an import of the preset's source "
                    f"{source}: move {target} (and {dvc_file}) away, or point the preset's params at it and drop the "
                    "input, and run it again"
                )
            # a URL is compared as given; a local path where it is on this machine (a clone elsewhere pulls what was
            # imported, from wherever the source lay)
            there = recorded[0].get("path")
            url = "://" in str(there)
            if there is not None and not url and not Path(there).is_absolute():  # DVC records it from the .dvc's folder
                there = str(((repo / dvc_file).parent / there).resolve())
            if there not in (None, source_path, source) and (url or Path(there).exists()):
                raise ParamsError(
                    f"{dvc_file} imports {there}, but the preset's source for {target} is {source}: "
                    f"`dvc remove {dvc_file}` (or point the preset at the imported source) and run it again"
                )
            if not target_path.exists() and dvc("pull", dvc_file, cwd=repo, check=False).returncode != 0:
                result = dvc("update", dvc_file, cwd=repo, check=False)
                if result.returncode != 0:
                    raise RuntimeError(f"dvc update {dvc_file} failed: {(result.stderr or result.stdout)[-2000:]}")
            continue
        target_path.parent.mkdir(parents=True, exist_ok=True)
        result = dvc("import-url", source_path, target, cwd=repo, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"dvc import-url {source_path} {target} failed: {(result.stderr or result.stdout)[-2000:]}"
            )
        made.append(dvc_file)
    return made


def committed(path: str, repo: Path) -> bool:
    """Whether `path` is in git's HEAD exactly as it is in the working tree."""
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=repo, capture_output=True)
    same = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path], cwd=repo, capture_output=True)
    return tracked.returncode == 0 and same.returncode == 0


def check_architecture(configs: Mapping, repo: Path, sources: Mapping[str, Path]) -> None:
    """The tapped layer, the pooling and finetune's unfreeze point, on the base's architecture (built without its
    weights): a layer name the base lacks stopped extract, or finetune, only after every stage before it had run
    (hours at scale; a sweep's variant N after variants 1 to N-1). A saved base is read from the repository, or from
    the preset's source for it (the file, or a folder holding it) before the preset imports it; one in neither place
    is left to the stages."""
    conv, file, tune = configs[extract].conv_base, None, configs[finetune].finetune
    if conv.path:
        file = repo / conv.path
        wanted = Path(os.path.normpath(conv.path))
        for target, source in sources.items():  # the input itself, or a folder input holding it
            if wanted == Path(target) or Path(target) in wanted.parents:
                file = Path(source) / wanted.relative_to(target)
        if not Path(file).is_file():
            return
        conv = conv.model_copy(update={"path": str(file)})
    # conv_base.build_extractor's steps, weights aside, with Keras's own errors named by the param too
    with conv_base.errors_named_by_param():
        try:
            base, preprocessing = bases.load_conv_base(conv.name, conv.path, "none", conv.input_size)
        except bases.BaseError:
            raise
        except Exception as exc:  # a file Keras cannot read as a model: extract would stop at its first load
            if not conv.path:
                raise
            raise ParamsError(f"conv_base.path: {file} is not a model Keras can load ({exc})") from None
        takes = tuple(base.inputs[0].shape[1:3]) if getattr(base, "inputs", None) else ()
        # a saved base made for another size: extract stopped inside Keras, naming no param
        if conv.path and len(takes) == 2 and None not in takes and takes != tuple(conv.input_size):
            raise ParamsError(
                f"conv_base.input_size: the saved base {file} takes {takes[0]}x{takes[1]} images, "
                f"got {list(conv.input_size)}"
            )
        base = bases.tap(base, conv.layer)
        extractor = bases.build_feature_extractor(base, preprocessing, conv.input_size, conv.pooling)
    imagenet = conv.weights == "imagenet" or Path(conv.weights).name == bases.IMAGENET_FILE  # as bases builds it
    if str(conv.name).startswith("efficientnet_b") and imagenet and tune.unfreeze_top is not None:
        # Keras builds EfficientNet with one more layer (a Rescaling) for ImageNet weights, and no other base: the
        # weightless graph here is one short, so its last layer's count is allowed too (finetune checks it exactly)
        layers = len(classifier.find_base(extractor).layers)
        if tune.unfreeze_top == layers:
            tune = tune.model_copy(update={"unfreeze_top": layers - 1})
    finetune.prepare_for_finetuning(extractor, configs[finetune].conv_base, tune)


def validate(params: Mapping, where: Path, sources: Mapping[str, Path] | None = None) -> None:
    """Every stage's config must load from the merged params, and the base must have the layers they name
    (`sources`: where inputs the preset has not imported yet are, by their path in the repository)."""
    tmp = where.with_name(f".{where.name}.preset-check.yaml")
    tmp.write_text(dump_yaml(dict(params)), encoding="utf-8")
    try:
        configs = {
            stage: stage.load_config(tmp)
            for stage in (download, convert, base_weights, extract, train_head, quality, finetune, evaluate, export)
        }
        for runtime in {configs[extract].extract.runtime, configs[evaluate].evaluate.runtime}:
            runtimes.check_installed(runtime)  # not only when evaluate starts, after every stage before it ran
        served, kept = configs[export].export.max_pixels, configs[download].download.max_pixels
        if served < kept:  # the serving model would refuse images download keeps: export's check, the last stage
            raise ParamsError(
                f"export.max_pixels {served} is below download.max_pixels {kept}: the serving model would refuse "
                "images the pipeline trained and tested on; raise export.max_pixels or lower download.max_pixels"
            )
        try:  # evaluate and export check it again on the model; here before fine-tuning, not after
            serving.check_tta(configs[extract].conv_base.input_size, configs[evaluate].tta.quarter_turns)
        except ValueError as exc:
            raise ParamsError(str(exc)) from None
        # the sections no stage's config holds: the Beam runner and the scheduled retrain's gate
        for stage in ("convert", "extract"):  # every Beam stage: a runner one of them cannot use fails here
            beam_options.pipeline_options(stage, beam_options.load(tmp), ())
        if "retrain" in params:
            parse_section(retrain.RetrainParams, "retrain", params["retrain"])
        # the base built as the stages build it (a registry base's name and size included: bases.load_conv_base's
        # own checks, where they failed at the base's first build, a sweep's variant N after variants 1 to N-1 ran)
        check_architecture(configs, where.resolve().parent, sources or {})
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", type=Path, help="a YAML file of overrides, e.g. presets/tiny.yaml")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--write", action="store_true", help="write the merged params into --params instead of printing -S args"
    )
    mode.add_argument(
        "--run", action="store_true", help="run it: dvc exp run -S ... (arguments passed as a list, no shell)"
    )
    parser.add_argument("--queue", action="store_true", help="with --run: queue the experiment (dvc exp run --queue)")
    parser.add_argument("--name", "-n", help="with --run: the experiment's name")
    args = parser.parse_args(argv)
    if (args.queue or args.name) and not args.run:
        parser.error("--queue and --name go with --run")
    loaded = read_yaml_file(args.preset) or {}
    if not isinstance(loaded, Mapping):
        raise ParamsError(f"{args.preset}: expected a mapping of params sections (and inputs) at top level")
    overrides = dict(loaded)
    inputs = overrides.pop("inputs", None) or {}
    if not isinstance(inputs, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in inputs.items()):
        raise ParamsError(f"{args.preset}: inputs: expected a mapping of repo path -> source (strings)")
    base = read_params(args.params)
    merged = merge(base, overrides)
    repo = args.params.resolve().parent
    sources = {os.path.normpath(target): repo / source for target, source in inputs.items() if "://" not in str(source)}
    validate(merged, args.params, sources)
    # before any import: what `-S` could not carry, or with --write what the next `dvc exp run -S` would change in
    # the file (a review on 2026-12-07)
    if args.write:
        arguments = []
        for key, value in leaves(overrides):
            check_carried(key, value, in_file=True)
    else:
        arguments = set_args(overrides, base)
    check_inputs(inputs, args.preset, repo)
    if args.write or args.run:  # printing the arguments changes nothing in the repository
        made = import_inputs(inputs, repo)
        dvc_files = [dvc_file_of(target, repo) for target in inputs]
        uncommitted = [f for f in dvc_files if f in made or not committed(f, repo)]
        if uncommitted and args.queue:  # a queued experiment is built from git's committed state, which lacks them
            raise ParamsError(
                f"imported {', '.join(uncommitted)}: commit them first (git add {' '.join(uncommitted)} && "
                "git commit), then queue"
            )
        if made:
            print(f"imported {', '.join(made)}: commit them (git add {' '.join(made)} && git commit)", file=sys.stderr)
    if args.write:
        write_params(args.params, merged)
    elif args.run:
        in_git = outputs_in_git.git_tracked_cached_outputs(repo)
        if in_git:  # DVC would fail their stages only after training them
            print(f"preset: {outputs_in_git.advice(in_git)}", file=sys.stderr)
            return 1
        command = [
            sys.executable,
            "-m",
            "dvc",
            "exp",
            "run",
            *(["--queue"] if args.queue else []),
            *(["-n", args.name] if args.name else []),
            *arguments,
        ]
        return subprocess.run(command, cwd=repo).returncode
    else:
        print(" ".join(shlex.quote(arg) for arg in arguments))
    return 0


if __name__ == "__main__":
    run_main(main)
