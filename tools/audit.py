"""audit: the lineage of a revision's model (Markdown and JSON), checks, and a diff of two revisions.

Run: ``python -m tools.audit --rev HEAD [--against REV] --out audit``

For a git revision it reports the data quality (near-duplicates, suspected label errors, the ids
``download.exclude`` drops), the data source and its version (the download
stage's dependency hash in ``dvc.lock``), the manifest's hash and counts per
class and split, the label vocabulary, every stage's params, the code
revision, each stage's output hashes from ``dvc.lock``, the metrics, the pinned
library versions (``constraints.txt``) and the lineage record the serving model
carries (``serving/assets.extra/lineage.json``). DVC-tracked files are read
through the DVC API from the cache or the remote, so any committed revision
can be audited without checking it out.

With ``--rebuild`` it re-trains the revision's models (train_head, finetune,
evaluate, export: those of them the revision has) from its recorded inputs in a scratch git worktree and fails unless
every output comes back identical: byte for byte, except the serving
SavedModel, which is compared by what it computes (`saved_model_digest`: its
writer orders variables by memory address). Training is bit-reproducible on
the same machine type.

Checks (a failed check exits 1): every DVC-tracked file the audit reads is
readable (from the cache or a remote: an audit that cannot see the data fails,
naming the file and how to fetch it); no image (by its normalised pixels) in
two splits; no near-duplicate pair across splits (the quality stage's list, by
feature cosine: resized or re-encoded copies the pixel hash misses); ``dvc.lock`` is one
consistent run (every stage of ``dvc.yaml`` is in it, and every stage's recorded input, a file
inside another stage's output folder included, is what that stage recorded as its output); the
revision's own inputs are those ``dvc.lock`` recorded a run of (``dvc.yaml``'s commands, inputs,
outputs and params keys, the params' values, and the code and data no stage makes, as git and DVC
hold them; an input the revision does not version is listed, not checkable); every DVC-cached
output's data is in the local cache or the default remote (``dvc pull`` can restore it); every
output left to git (``cache: false``, folders included) is committed with the bytes the lock
records; a ``--rebuild`` re-trains at least one stage; the serving model's
lineage matches the revision's manifest and model; with ``--workspace``, the
workspace's outputs match ``dvc.lock``; with ``--against``, no image that both
revisions hold moved split and the label vocabulary kept its order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

import dvc.api as dvc_api
import tensorflow as tf
import yaml
from dvc.repo import Repo
from dvc_data.hashfile.hash_info import HashInfo
from dvc_data.hashfile.meta import Meta
from dvc_data.hashfile.tree import Tree
from tensorflow.core.protobuf import saved_model_pb2

from components import lineage, manifest
from components.cli import configure_logging, dvc, run_main, sh
from components.params import ParamsError, dump_yaml, load_yaml

log = logging.getLogger(__name__)

MANIFEST = "data/download/manifest.jsonl"
LABELS = "data/convert/labels.json"
LINEAGE = "data/export/serving/assets.extra/lineage.json"
MODEL = "data/finetune/model.keras"
METRICS = (
    "evaluation/metrics.json",
    "dvclive/train_head/metrics.json",
    "dvclive/finetune/metrics.json",
    "quality/metrics.json",
)
NEAR_DUPLICATES = "quality/near_duplicates.json"  # the quality stage's (DVC-cached)
LABEL_ISSUES = "quality/label_issues.json"


# ---- checks and diffs: pure functions ----------------------------------------------------------


def identity_key(*manifests: list[dict]) -> str:
    """The field that identifies an image across these manifests: the hash of its normalised pixels
    (the same photo in two file formats is one image) when every row has it, else the file's hash, as
    manifests written before download recorded pixel hashes have (never a mix of the two)."""
    return "pixels_sha256" if all("pixels_sha256" in row for rows in manifests for row in rows) else "sha256"


def split_conflicts(rows: list[dict]) -> list[str]:
    """Images (by normalised pixels) listed in more than one split."""
    key = identity_key(rows)
    splits: dict[str, set[str]] = {}
    for row in rows:
        splits.setdefault(row[key], set()).add(row["split"])
    return sorted(sha for sha, found in splits.items() if len(found) > 1)


def moved_splits(old: list[dict], new: list[dict]) -> list[dict]:
    """Images both manifests hold whose split changed (a leak between train and test across retrains)."""
    key = identity_key(old, new)
    before: dict[str, set[str]] = {}  # every split an image had: an old manifest may list one twice
    for row in old:
        before.setdefault(row[key], set()).add(row["split"])
    return sorted(
        (
            {"sha256": row[key], "from": ", ".join(sorted(before[row[key]])), "to": row["split"]}
            for row in new
            if row[key] in before and before[row[key]] != {row["split"]}
        ),
        key=lambda r: (r["sha256"], r["to"]),
    )


def label_order_changes(old: list[str], new: list[str]) -> list[str]:
    """Labels whose index changed or that disappeared: the old model's outputs would mean other classes."""
    problems = [
        f"{name!r}: index {i} -> {new.index(name)}"
        for i, name in enumerate(old)
        if name in new and new.index(name) != i
    ]
    problems += [f"{name!r}: removed" for name in old if name not in new]
    return problems


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; an empty dict is a leaf (`beam.options: {}` added, or removed, is a change,
    as DVC compares params: a review on 2026-12-07 found it invisible)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def diff_flat(old: dict, new: dict) -> dict[str, list]:
    """key -> [old, new] for every key whose value differs (None where absent); a key present on one side only
    differs, even where the other side's value is null."""
    a, b = flatten(old), flatten(new)

    def emptied(key: str, flat: dict, other: dict) -> bool:  # `{}` here where the other side has keys under it
        return flat.get(key) == {} and any(k.startswith(f"{key}.") for k in other)

    return {
        k: [a.get(k), b.get(k)]
        for k in sorted(set(a) | set(b))
        if ((k in a) != (k in b) or a.get(k) != b.get(k)) and not emptied(k, a, b) and not emptied(k, b, a)
    }


def near_duplicate_problems(pairs: list[dict]) -> list[str]:
    """A near-duplicate pair across splits fails the audit as an exact copy does: the test score is inflated."""
    return [
        f"near-duplicate across splits: {p['a_split']} {p['a_source']} and {p['b_split']} {p['b_source']} "
        f"(feature cosine {p['similarity']:.4f}; ids {p['a_id']}, {p['b_id']}: list one in download.exclude)"
        for p in pairs
    ]


def stage_outputs(lock: dict) -> dict[str, dict[str, str]]:
    return {
        stage: {out["path"]: out.get("md5") for out in entry.get("outs", [])}
        for stage, entry in lock.get("stages", {}).items()
    }


def lock_inconsistencies(
    lock: dict, declared: Sequence[str], file_md5: Callable[[str], str | None] | None = None
) -> list[str]:
    """What makes a revision's dvc.lock not one consistent run: a stage `declared` in its dvc.yaml with no
    lock entry (never reproduced, e.g. quality after `dvc repro export`), and a stage whose recorded input
    is not what the stage producing it recorded as its output (a stale entry, made from other data).

    An input may be a file inside another stage's output folder (finetune's `data/train_head/head.keras`):
    `file_md5(path)` gives the md5 of that file as the producer's recorded output holds it (None where it
    cannot be read: the caller notes that as a problem of its own). Without `file_md5` such inputs would go
    unchecked, so it is required whenever the lock has one."""
    entries = lock.get("stages", {})
    problems = [
        f"stage {stage} is in dvc.yaml but not in dvc.lock: run `dvc repro` and commit"
        for stage in declared
        if stage not in entries and not any(name.startswith(f"{stage}@") for name in entries)
    ]
    produced = {path: (stage, md5) for stage, outs in stage_outputs(lock).items() for path, md5 in outs.items()}
    for stage, entry in entries.items():
        for dep in entry.get("deps", []):
            path = dep["path"]
            producer = produced.get(path)
            if producer is not None:
                recorded = producer[1]
            else:
                folder = enclosing(path, produced)
                if folder is None:
                    continue  # a source: no stage produces it
                if file_md5 is None:
                    raise ValueError(f"{stage} depends on {path}, inside {folder}: its check needs file_md5")
                producer = (produced[folder][0], None)
                recorded = file_md5(path)
                if recorded is None:
                    continue  # unreadable: reported by file_md5's caller, so the audit fails
            if recorded != dep.get("md5"):
                problems.append(
                    f"stage {stage} was run on {path} {dep.get('md5')}, but {producer[0]} recorded "
                    f"{recorded}: its outputs are stale; run `dvc repro` and commit"
                )
    return problems


def declared_stages(repo: Path, commit: str) -> tuple[list[str], set[str]]:
    """The stages the root dvc.yaml of a revision declares and the outputs it leaves to git (`cache: false`,
    metrics and plots included), as DVC itself resolves them: a `foreach` or `matrix` stage is one stage per
    item (`name@key`), `${...}` templating is filled in from `vars` and params, so none goes unchecked."""
    names, uncached, _ = declared(repo, commit)
    return names, uncached


def declared(repo: Path, commit: str) -> tuple[list[str], set[str], dict[str, dict]]:
    """`declared_stages`, and each stage's definition as DVC resolves it: its command, the paths of its
    inputs and outputs, and its params (file -> keys; a file whose keys are not listed: None)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.dvcfile import load_file
    from dvc.stage import PipelineStage

    with Repo(str(repo), rev=commit) as dvc_repo:
        root = dvc_repo.fs.join(dvc_repo.root_dir, "dvc.yaml")
        if not dvc_repo.fs.exists(root):  # its dvc.lock's stages would be checked against nothing
            raise FileNotFoundError("the revision has no dvc.yaml")
        stages = [s for s in load_file(dvc_repo, root).stages.values() if isinstance(s, PipelineStage)]
        definitions = {
            s.name: {
                "cmd": s.cmd,
                "deps": sorted(d.def_path for d in s.deps if not isinstance(d, ParamsDependency)),
                "outs": sorted(o.def_path for o in s.outs),
                "params": {d.def_path: sorted(d.params) or None for d in s.deps if isinstance(d, ParamsDependency)},
            }
            for s in stages
        }
        uncached = {out.def_path for s in stages for out in s.outs if not out.use_cache}
        return [s.name for s in stages], uncached, definitions


def definition_changes(lock: dict, definitions: dict[str, dict]) -> list[str]:
    """Stages whose definition in the revision's dvc.yaml (`declared`) is not the one dvc.lock recorded a run
    of: another command, inputs, outputs or params keys (dvc.yaml edited and committed without `dvc repro`)."""
    problems = []
    for stage, entry in lock.get("stages", {}).items():
        now = definitions.get(stage)
        if now is None:
            continue  # a stage dvc.yaml no longer declares: nothing claims its outputs
        recorded = {
            "cmd": entry.get("cmd"),
            "deps": sorted(d["path"] for d in entry.get("deps", [])),
            "outs": sorted(o["path"] for o in entry.get("outs", [])),
            "params": {file: sorted(values) for file, values in entry.get("params", {}).items()},
        }
        declared_params = {file: keys for file, keys in now["params"].items() if keys is not None}
        changed = [field for field in ("cmd", "deps", "outs") if now[field] != recorded[field]]
        # a params file in one and not the other: a file tracked whole (no keys listed) too, added to dvc.yaml since
        if any(recorded["params"].get(file) != keys for file, keys in declared_params.items()) or set(
            recorded["params"]
        ) ^ set(now["params"]):
            changed.append("params")
        if changed:
            problems.append(
                f"stage {stage}'s {', '.join(changed)} in dvc.yaml are not those dvc.lock recorded a run of: its "
                "outputs are stale; run `dvc repro` and commit"
            )
    return problems


def declared_only(lock: dict, names: Sequence[str]) -> dict:
    """A lock with only the entries of the stages dvc.yaml declares (`names`, as `declared` resolves them)."""
    kept = set(names)
    return {**lock, "stages": {stage: e for stage, e in lock.get("stages", {}).items() if stage in kept}}


def read_lock(text: str, rev: str) -> dict:
    """A revision's dvc.lock as DVC wrote it (YAML 1.2's numbers: `1e-05` is a float), or a clear error."""
    try:
        lock = load_yaml(text)
    except (yaml.YAMLError, ParamsError) as exc:
        raise SystemExit(f"audit: {rev}'s dvc.lock cannot be read as YAML ({first_line(exc)})") from exc
    if not isinstance(lock, dict) or not isinstance(lock.get("stages"), dict):
        raise SystemExit(f"audit: {rev}'s dvc.lock records no stages: it is not a lock DVC wrote after a run")
    return lock


def sources(lock: dict) -> list[str]:
    """The inputs of a lock's stages that no stage produces (code, params files aside, and the data the pipeline
    starts from), nor lie inside a stage's output folder."""
    produced = {path for outs in stage_outputs(lock).values() for path in outs}
    paths = {d["path"] for e in lock.get("stages", {}).values() for d in e.get("deps", [])}
    return sorted(p for p in paths if p not in produced and enclosing(p, produced) is None)


def enclosing(path: str, outputs: Iterable[str]) -> str | None:
    """The output folder `path` lies inside, or None."""
    return next((out for out in outputs if path.startswith(out + "/")), None)


def dropped_outputs(lock: dict, names: Sequence[str]) -> dict[str, str]:
    """{output path: stage} of the stages dvc.lock records and the revision's dvc.yaml no longer declares."""
    kept = set(names)
    return {path: stage for stage, outs in stage_outputs(lock).items() if stage not in kept for path in outs}


def source_problems(
    lock: dict, versioned: Callable[[str], tuple[str | None, int] | None], dropped: Mapping[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """Inputs no stage produces (`sources`) whose versioned content at the revision is not what dvc.lock
    recorded: code, a base in models/ or source data changed and committed without `dvc repro`, so the commit's
    inputs did not make its outputs.

    `versioned(path)` gives the input's md5 as the revision holds it (git's bytes and DVC-tracked files' recorded
    md5s; a folder's `dir_md5`; None where the revision holds nothing there) and how many files the revision
    holds there (None for a DVC-tracked output, which the revision versions whole); None where it cannot be
    read (the caller notes that, so the audit fails). DVC hashed a folder input from everything in the
    workspace, files neither git nor DVC versions included (a tfds download, a base copied in by hand beside an
    imported one): a folder of which the revision holds fewer files than dvc.lock counted (`nfiles`), or
    nothing there at all, cannot be checked. It is returned in the second list,
    for the report, with the hash the lock recorded; the rebuild starts from the versioned outputs of the stage
    that read it. Where the revision holds as many files or more, or versions the input whole (a `dvc add`-ed or
    imported folder), any difference fails; files deleted from a folder git holds, beside files it does not,
    cannot be told from files never versioned, and are listed. A file input the revision does not hold at all
    fails: a stage's code or a base is a file the revision must carry. So does an input that is the output of a stage
    dvc.yaml no longer declares (`dropped`, from `dropped_outputs`): nothing rebuilds it and `dvc pull` does not
    restore it, so the revision cannot give it back (a review on 2026-12-07: it passed as a listed input)."""
    dropped = dropped or {}
    problems, unversioned = [], []
    found = {path: versioned(path) for path in sources(lock)}
    for stage, entry in lock.get("stages", {}).items():
        for dep in entry.get("deps", []):
            path, recorded = dep["path"], dep.get("md5")
            if found.get(path) is None:
                continue  # produced by a stage (checked by lock_inconsistencies), or unreadable (noted)
            md5, held = found[path]
            if md5 == recorded:
                continue
            counted = dep.get("nfiles")
            fewer = held is not None and counted is not None and held < counted
            folder = str(recorded).endswith(".dir")
            if md5 is None and not folder:  # code or a base the stage read, deleted from the commit
                problems.append(
                    f"stage {stage} was run on the file {path} {recorded}, which the revision does not hold (removed "
                    "without `dvc repro`, or never committed): commit it, or run `dvc repro` and commit"
                )
                continue
            if md5 is None or (folder and fewer):
                owner = dropped.get(path) or dropped.get(enclosing(path, dropped) or "")
                if owner:
                    problems.append(
                        f"stage {stage} was run on {path} {recorded}, which dvc.lock records as an output of stage "
                        f"{owner}, which dvc.yaml no longer declares: nothing rebuilds it and the revision does not "
                        f"version it; declare the stage again (or `dvc add {path}`), run `dvc repro` and commit"
                    )
                else:
                    unversioned.append(
                        f"{path} (stage {stage}: {recorded}, {counted} files; the revision holds {held})"
                    )
                continue
            problems.append(
                f"stage {stage} was run on {path} {recorded}, but the revision holds {md5} there: the committed "
                "input did not make its outputs (changed without `dvc repro`); run `dvc repro` and commit"
            )
    return problems, sorted(set(unversioned))


_MISSING = object()


def lookup(data: Any, key: str) -> Any:
    """A params value by DVC's dotted key (`a.b`), or `_MISSING`."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def params_changes(lock: dict, read: Callable[[str], str | None], whole: Collection[tuple[str, str]] = ()) -> list[str]:
    """Stages whose params as dvc.lock recorded them are not the revision's params files' (`read(file)`: the
    committed text, None where the commit lacks it): params edited and committed without `dvc repro`. `whole`:
    the (stage, file) pairs whose dvc.yaml tracks every key of the file (`params: [file:]`), where a key the
    lock does not record is new too."""
    problems = []
    for stage, entry in lock.get("stages", {}).items():
        for file, values in entry.get("params", {}).items():
            text = read(file)
            if text is None:
                problems.append(f"stage {stage} was run with params from {file}, which the revision does not hold")
                continue
            try:  # as DVC and the stages read it (YAML 1.2's numbers: `1e-05` is a float, as DVC writes it)
                data = load_yaml(text)
            except (yaml.YAMLError, ParamsError) as exc:  # ParamsError: a key given twice (DVC refuses the file)
                problems.append(f"stage {stage}'s params file {file} cannot be read as YAML ({first_line(exc)})")
                continue
            now = {key: lookup(data, key) for key in values}
            gone = sorted(key for key, value in now.items() if value is _MISSING)
            if (stage, file) in whole and isinstance(data, dict):  # DVC's status: `new: key`
                now.update({key: data[key] for key in data if key not in values})
            present = {k: v for k, v in now.items() if v is not _MISSING}
            changed = diff_flat(values, present)
            changed = {k: v for k, v in changed.items() if not any(k == g or k.startswith(g + ".") for g in gone)}
            if gone or changed:
                recorded, current = flatten(values), flatten(present)
                shown = lambda flat, key: repr(flat[key]) if key in flat else "(absent)"  # noqa: E731
                what = [f"{key} removed" for key in gone] + [
                    f"{key}: {shown(recorded, key)} -> {shown(current, key)}" for key in changed
                ]
                problems.append(
                    f"stage {stage} was run with other params than the revision's {file} ({'; '.join(what)}): its "
                    "outputs are stale; run `dvc repro` and commit"
                )
    return problems


def dir_md5(files: dict[str, str]) -> str:
    """DVC's hash of a folder from its files' md5s (relative posix path -> md5): `<md5>.dir`."""
    tree = Tree()
    for relpath, md5 in files.items():
        tree.add(tuple(relpath.split("/")), Meta(), HashInfo("md5", md5))
    tree.digest()
    return tree.hash_info.value


def git_tracked_mismatches(lock: dict, uncached: set[str], read: Any, read_tree: Any) -> list[str]:
    """Outputs DVC leaves to git (`uncached`: `cache: false`) whose committed bytes are not those dvc.lock
    recorded: a report committed from another run than the lock. `read(path)` gives a committed file's bytes,
    `read_tree(path)` a committed folder's files (relative posix path -> bytes); either gives None where the
    commit lacks it, which fails too: the revision does not hold what its lock says it produced."""
    problems = []
    for stage, entry in lock.get("stages", {}).items():
        for out in entry.get("outs", []):
            path, recorded = out["path"], out.get("md5")
            if path not in uncached:
                continue  # DVC-cached (not in git): read and checked through DVC where the audit uses it
            if recorded is None:
                problems.append(f"dvc.lock records no hash for {path}, an output of stage {stage}")
                continue
            if recorded.endswith(".dir"):
                files = read_tree(path) or {}
                found = dir_md5({k: hashlib.md5(v).hexdigest() for k, v in files.items()})
                if not files and found != recorded:
                    found = None  # an empty folder is all git can hold of a missing one
            else:
                blob = read(path)
                found = None if blob is None else hashlib.md5(blob).hexdigest()
            if found is None:
                problems.append(
                    f"{path} is not in the commit, but dvc.lock records it as an output of stage {stage} "
                    f"(md5 {recorded}): commit it with dvc.lock"
                )
            elif found != recorded:
                problems.append(
                    f"{path} as committed is not the {'folder' if recorded.endswith('.dir') else 'file'} dvc.lock "
                    f"records for stage {stage} (md5 {found} against {recorded}): commit it with dvc.lock"
                )
    return problems


def stage_params(lock: dict) -> dict[str, dict]:
    return {stage: entry.get("params", {}).get("params.yaml", {}) for stage, entry in lock.get("stages", {}).items()}


REBUILT = (
    "train_head",
    "quality",
    "finetune",
    "evaluate",
    "export",
)  # the training stages and what scores and exports their models


def rebuild_mismatches(recorded: dict[str, str], rebuilt: dict[str, str]) -> list[str]:
    """Every output (path -> content digest) whose digest after a rebuild differs from the recorded one,
    including files only one side has."""
    return [
        f"rebuild: {path} is {rebuilt.get(path)} after re-training, {recorded.get(path)} as recorded"
        for path in sorted(set(recorded) | set(rebuilt))
        if rebuilt.get(path) != recorded.get(path)
    ]


def saved_model_digest(folder: Path) -> str:
    """The SHA-256 of what a SavedModel computes, not of its byte order.

    TensorFlow's SavedModel writer lists variables in an order that follows
    object identity (memory addresses), so two exports of the same model in two
    processes differ in the variables' order alone: in the top-level graph (the
    variables and the save/restore plumbing), the object graph, the checkpoint
    and the two ``_traced_save``/``_traced_restore`` functions. This digest
    covers every other function (the serving computation; nodes sorted by
    name), the signatures, and every variable's name and value (sorted), so it
    is equal for equal models and differs when any op, signature or weight value
    does. Variables are keyed by name, not by their place in the graph: a swap
    of two same-named, same-shaped variables would go unseen.
    """
    digest = hashlib.sha256()
    model = saved_model_pb2.SavedModel()
    model.ParseFromString((folder / "saved_model.pb").read_bytes())
    for graph in model.meta_graphs:
        for function in sorted(graph.graph_def.library.function, key=lambda f: f.signature.name):
            if function.signature.name.startswith(("__inference__traced_save_", "__inference__traced_restore_")):
                continue
            nodes = sorted(function.node_def, key=lambda n: n.name)
            del function.node_def[:]
            function.node_def.extend(nodes)
            digest.update(function.SerializeToString(deterministic=True))
        for name in sorted(graph.signature_def):
            digest.update(name.encode() + graph.signature_def[name].SerializeToString(deterministic=True))
        for path, value in captured_constants(graph):
            digest.update(path.encode() + value)
    loaded = tf.saved_model.load(str(folder))
    for name, value in sorted((v.name, v.numpy().tobytes()) for v in loaded.variables):
        digest.update(name.encode() + value)
    return digest.hexdigest()


def captured_constants(graph: Any) -> list[tuple[str, bytes]]:
    """(path in the object graph, value) of every constant a SavedModel's functions capture (the serving model's
    class names among them): stored as top-level graph nodes, outside the functions the digest hashes. Keyed by
    the shortest, then first, path of attribute names from the root, which does not follow memory addresses."""
    nodes = graph.object_graph_def.nodes
    values = {n.name: n.attr["value"].SerializeToString(deterministic=True) for n in graph.graph_def.node}
    paths, queue = {0: ""}, [0]
    while queue:
        parent = queue.pop(0)
        for child in sorted(nodes[parent].children, key=lambda c: c.local_name):
            if child.node_id not in paths:
                paths[child.node_id] = f"{paths[parent]}/{child.local_name}"
                queue.append(child.node_id)
    return sorted(
        (paths.get(i, f"unreachable {i}"), values.get(node.constant.operation, b"missing"))
        for i, node in enumerate(nodes)
        if node.WhichOneof("kind") == "constant"
    )


# a SavedModel's files `saved_model_digest` covers; any other file in its folder is compared by its bytes
SAVED_MODEL_GRAPH = ("saved_model.pb", "fingerprint.pb", "variables")


def content_digests(root: Path, paths: Sequence[str]) -> dict[str, str]:
    """path -> digest of every file under the given outputs (a missing one is an error). A SavedModel's
    graph, variables and fingerprint count as one entry (`saved_model_digest`); every other file, its
    assets and assets.extra (the lineage record) and any other file in its folder included, by its bytes."""
    found = {}
    for path in paths:
        top = root / path
        if not top.exists():
            raise RuntimeError(f"audit --rebuild: the output {path} is not in {root}")
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        models = {p.parent for p in files if p.name == "saved_model.pb"}
        for model in sorted(models):
            found[model.relative_to(root).as_posix() + "/"] = saved_model_digest(model)
        for file in files:
            model = next((m for m in models if m in file.parents), None)
            in_graph = model is not None and file.relative_to(model).parts[0] in SAVED_MODEL_GRAPH
            if not in_graph:
                found[file.relative_to(root).as_posix()] = hashlib.sha256(without_machine(file)).hexdigest()
    return found


def without_machine(file: Path) -> bytes:
    """A file's bytes; a training history's without the machine it records (`trained_on`): that record explains a
    rebuild whose bits differ (`machine_differences`), and is no difference itself where the bits do not."""
    data = file.read_bytes()
    if file.name != "history.json":
        return data
    try:
        record = json.loads(data)
    except ValueError:
        return data
    if not isinstance(record, dict) or "trained_on" not in record:
        return data
    if (json.dumps(record, indent=2) + "\n").encode() != data:  # not as the stages write it: byte for byte, as is
        return data  # (a review on 2026-12-07: `0.1` against `1e-1`, a key given twice, compared equal)
    del record["trained_on"]
    return (json.dumps(record, indent=2) + "\n").encode()  # as the stages write it, less that key


def lineage_checks(lineage: dict | None, manifest_sha256: str | None, model_sha256: str | None) -> list[str]:
    if lineage is None:
        return ["the serving model carries no lineage record"]
    problems = []
    if lineage.get("manifest_sha256") != manifest_sha256:
        problems.append("the serving model's lineage names another manifest than the revision's")
    if lineage.get("model_sha256") != model_sha256:
        problems.append("the serving model's lineage names another fine-tuned model than the revision's")
    return problems


# ---- I/O --------------------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    return sh("git", *args, cwd=repo)


def git_blob(repo: Path, rev: str, path: str) -> bytes | None:
    result = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True)
    return result.stdout if result.returncode == 0 else None


def git_tree(repo: Path, rev: str, path: str) -> dict[str, bytes] | None:
    """A committed folder's files (path relative to it -> bytes), or None where the commit has none there."""
    names = git(repo, "ls-tree", "-r", "-z", "--name-only", rev, "--", path.rstrip("/") + "/").split("\0")
    files = {name[len(path.rstrip("/")) + 1 :]: git_blob(repo, rev, name) for name in names if name}
    return {name: blob for name, blob in files.items() if blob is not None} or None


def git_links(repo: Path, rev: str, path: str) -> list[str]:
    """The symbolic links git holds at `path` or under it at `rev` (their paths)."""
    listed = subprocess.run(
        ["git", "ls-tree", "-r", "-z", rev, "--", path.rstrip("/"), path.rstrip("/") + "/"],
        cwd=repo,
        capture_output=True,
    )
    entries = (
        item.split("\t", 1) for item in listed.stdout.decode("utf-8", "surrogateescape").split("\0") if "\t" in item
    )
    return sorted({name for meta, name in entries if meta.split()[0] == "120000"})


def git_file(repo: Path, rev: str, path: str) -> str | None:
    blob = git_blob(repo, rev, path)
    return None if blob is None else blob.decode("utf-8")


DVC_FILES = (MANIFEST, LABELS, LINEAGE, MODEL)


def unrecorded_facts(lock: dict, declared: Sequence[str] | None = None) -> list[str]:
    """The files the report's facts come from (`DVC_FILES`: the manifest, the labels, the model, the serving
    lineage) that no stage of the lock recorded as (inside) one of its outputs: a revision with no pipeline in
    its dvc.lock, those files committed to git by hand, passed with every lock check vacuous. With `declared`
    (the stages the revision's dvc.yaml declares), only theirs count: a stage deleted from dvc.yaml by hand left
    its lock entry, which no other check reads, and vouched for files committed by hand after it."""
    produced = [
        path for stage, outs in stage_outputs(lock).items() if declared is None or stage in declared for path in outs
    ]
    return [
        f"{path} is no output of a stage in dvc.lock that dvc.yaml declares: the audit's facts must come from a "
        "recorded run (`dvc repro` and commit)"
        for path in DVC_FILES
        if path not in produced and enclosing(path, produced) is None
    ]


def first_line(exc: Exception) -> str:
    """An error's first line for a report, or its class where it has no message."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def folder_md5(repo: Path, rev: str, path: str, unreadable: list[str]) -> str | None:
    """DVC's hash (`<md5>.dir`) of a folder inside a DVC-tracked output at a revision, from the md5s the
    output's listing records for its files (no file is read); None, noted in `unreadable`, where the
    listing cannot be read."""
    try:
        with Repo(str(repo), rev=rev) as dvc_repo:
            fs = dvc_repo.dvcfs
            files = {}
            for found in fs.find(path):
                info = fs.info(found)
                # a DVC-tracked file: the md5 its output's listing records; a git-tracked one: its bytes' md5
                tracked = info.get("dvc_info")
                files[found[len(path.rstrip("/")) + 1 :]] = (
                    tracked["entry"].hash_info.value if tracked else hashlib.md5(fs.cat_file(found)).hexdigest()
                )
        return dir_md5(files)  # none found (gone, or empty): DVC's hash of an empty folder, checked as any other
    except Exception as exc:  # noqa: BLE001 - not tracked at that revision, or its listing in no cache or remote
        reason = first_line(exc)
        unreadable.append(
            f"cannot read the listing of {path} at {rev[:12]} ({reason}): fetch that revision's data with "
            f"`git checkout {rev[:12]} && dvc pull`, or reproduce it and `dvc push`"
        )
        return None


def versioned_inputs(repo: Path, rev: str, paths: Sequence[str], unreadable: list[str]) -> dict:
    """path -> (md5 as the revision holds it, how many files it holds there) for `source_problems`: a file's md5
    (git's bytes, or the md5 its .dvc file records), a folder's `dir_md5` over what git (the .dvc files
    included, as DVC hashes a folder) and DVC hold in it, (None, 0) where the revision holds nothing there;
    None, noted in `unreadable`, where it cannot be read (a DVC-tracked folder whose listing is in no cache or
    remote)."""
    found: dict[str, tuple[str | None, int | None] | None] = {}
    with Repo(str(repo), rev=rev) as dvc_repo:
        fs = dvc_repo.dvcfs
        for path in paths:
            links = git_links(repo, rev, path)
            if links:  # git holds the link's target path, DVC hashed the target's bytes: no comparison is right
                found[path] = None
                unreadable.append(
                    f"{path} at {rev[:12]}, an input of its dvc.lock, is or holds a symbolic link git versions as the "
                    f"path it points to ({links[0]}), not the bytes DVC hashed: the audit cannot check it; commit the "
                    "file itself, or `dvc add` it"
                )
                continue
            try:
                kind = subprocess.run(["git", "cat-file", "-t", f"{rev}:{path}"], cwd=repo, capture_output=True)
                blob = git_blob(repo, rev, path) if kind.stdout.strip() == b"blob" else None
                if blob is not None:  # a file git holds
                    found[path] = (hashlib.md5(blob).hexdigest(), 1)
                    continue
                if not fs.exists(path):
                    found[path] = (None, 0)
                    continue
                top = fs.info(path).get("dvc_info")
                entry = top.get("entry") if top else None
                if entry is not None and entry.hash_info:  # a DVC-tracked output itself, as its .dvc file records it
                    found[path] = (entry.hash_info.value, None)  # versioned whole: compared strictly
                    continue
                prefix = len(path.rstrip("/")) + 1
                files = {
                    name: hashlib.md5(data).hexdigest() for name, data in (git_tree(repo, rev, path) or {}).items()
                }
                for name in fs.find(path):
                    info = fs.info(name).get("dvc_info")
                    if info:  # inside a DVC-tracked output
                        files[name[prefix:]] = info["entry"].hash_info.value
                found[path] = (dir_md5(files), len(files))
            except Exception as exc:  # noqa: BLE001 - a listing in no cache or remote, whatever DVC raises
                found[path] = None
                unreadable.append(
                    f"cannot read {path} at {rev[:12]} ({first_line(exc)}), an input of its dvc.lock: fetch that "
                    f"revision's data with `git checkout {rev[:12]} && dvc pull`, or reproduce it and `dvc push`"
                )
    return found


def unavailable_outputs(repo: Path, rev: str, lock: dict, uncached: set[str], names: Sequence[str]) -> list[str]:
    """Every DVC-cached output of a revision whose data (a file, or a folder's listing or any file in it) is in
    neither the local cache nor the default remote: `dvc pull` of that revision fails, so its model cannot be
    restored from it (training data, the head, the serving model's variables: not only the files the audit
    reads). A folder is named once, with the number of its files that are missing."""
    from dvc.config import NoRemoteError
    from dvc.stage import PipelineStage
    from dvc_data.hashfile.status import compare_status

    with Repo(str(repo), rev=rev) as dvc_repo:
        used = dvc_repo.index.used_objs(force=True)
        objs = {obj for odb, found in used.items() if odb is None for obj in found}  # imports: DVC skips them too
        # every cached output's own hash too: DVC leaves out a folder whose listing it cannot find (DVC 3's md5
        # entries; DVC 2's are in its own collection; a stage dvc.yaml dropped has no known cache: false outputs)
        objs |= {
            HashInfo("md5", out["md5"])
            for stage, entry in lock.get("stages", {}).items()
            if stage in names
            for out in entry.get("outs", [])
            if out.get("md5") and out.get("hash") == "md5" and out["path"] not in uncached
        }
        # ... and of every `dvc add`-ed or `dvc import-url`-ed output (.dvc files: source data, a base in models/),
        # which DVC leaves out the same way: a source folder whose listing is gone could not be restored (`dvc pull`
        # fails on an import's too, its source unchanged or not), and the audit passed
        added_outs = [
            out
            for stage in dvc_repo.index.stages
            if not isinstance(stage, PipelineStage)
            for out in stage.outs
            if out.use_cache and out.hash_info and out.hash_info.name in ("md5", "md5-dos2unix") and out.hash_info.value
        ]
        added = {out.hash_info.value: out.def_path for out in added_outs}
        objs |= {out.hash_info for out in added_outs}  # by its own hash's name: DVC 2's (md5-dos2unix) too
        from dvc.data_cloud import _split_legacy_hash_infos

        missing = set()
        for group, legacy in zip(_split_legacy_hash_infos(objs), (True, False)):
            if not group:
                continue
            cache = dvc_repo.cache.legacy if legacy else dvc_repo.cache.local  # DVC 2's objects: its own folder
            try:
                odb = dvc_repo.cloud.get_remote_odb(None, "status", hash_name="md5-dos2unix" if legacy else "md5")
            except NoRemoteError:  # no remote: the local cache must hold all of it
                odb = cache
            # Not `cloud.status`: its index of the remote takes every file of a folder as there wherever the folder's
            # listing is, so a file gone from the remote and the cache passed (and `dvc pull` failed)
            missing |= compare_status(cache, odb, group, check_deleted=True, dest_index=None, cache_odb=cache).missing
        listings = {}
        for obj in objs:
            if obj.isdir:
                try:
                    listings[obj.value] = {h.value for _, _, h in load_tree(dvc_repo, obj)}
                except Exception:  # noqa: BLE001 - the listing itself is missing: reported as the folder's
                    listings[obj.value] = set()
    owners = {md5: path for outs in stage_outputs(lock).values() for path, md5 in outs.items() if md5}
    owners.update({md5: path for md5, path in added.items() if md5 not in owners})
    named: dict[str, int] = {}
    for obj in missing:
        folder = next((d for d, files in listings.items() if obj.value in files), None)
        key = owners.get(folder or obj.value, f"an output ({obj.value})")
        named[key] = named.get(key, 0) + 1
    return [
        f"the data of {path} at {rev[:12]} ({count} object{'s' if count > 1 else ''}) is in neither the local DVC "
        f"cache nor the default remote: `git checkout {rev[:12]} && dvc pull` cannot restore it; push it from a "
        "clone that has it, or reproduce that revision and `dvc push`"
        for path, count in sorted(named.items())
    ]


def load_tree(dvc_repo: Any, obj: HashInfo) -> Any:
    """A folder's listing from the local cache, else the default remote (DVC 2's, `md5-dos2unix`: their legacy
    collections)."""
    from dvc.cachemgr import LEGACY_HASH_NAMES
    from dvc_data.hashfile.tree import Tree

    legacy = obj.name in LEGACY_HASH_NAMES
    try:
        return Tree.load(dvc_repo.cache.legacy if legacy else dvc_repo.cache.local, obj)
    except Exception:  # noqa: BLE001 - not in the local cache
        return Tree.load(dvc_repo.cloud.get_remote_odb(None, "status", hash_name=obj.name if legacy else "md5"), obj)


def dvc_file(repo: Path, rev: str, path: str, unreadable: list[str]) -> bytes | None:
    """A DVC-tracked file at a revision, from the local cache or the remote.

    A file that cannot be read is noted in `unreadable` (the audit then fails):
    an audit never passes on data it did not see.
    """
    try:
        return dvc_api.read(path, repo=str(repo), rev=rev, mode="rb")
    except Exception as exc:  # noqa: BLE001 - not tracked at that revision, or in neither the cache nor a remote
        reason = first_line(exc)
        unreadable.append(
            f"cannot read {path} at {rev[:12]} ({reason}): its data is in neither the local DVC cache nor the "
            f"default remote. Fetch it with `git checkout {rev[:12]} && dvc pull` (or `dvc fetch --all-commits`) "
            "from a remote that holds it (`dvc remote list`), or reproduce that revision and `dvc push` it"
        )
        return None


def read_rows(blob: bytes | None) -> list[dict] | None:
    return None if blob is None else manifest.parse_jsonl(blob)


def collect(repo: Path, rev: str, check_lock: bool = True) -> dict:
    """Everything the report says about one revision; without `check_lock`, not whether its dvc.lock is one
    consistent run (a revision only compared against is audited on its own when it is the one audited)."""
    found = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=repo, capture_output=True, text=True
    )
    if found.returncode != 0:
        raise SystemExit(f"audit: {rev} is not a commit of {repo} (`git log` lists them; fetch it if it is elsewhere)")
    commit = found.stdout.strip()
    lock_text = git_file(repo, commit, "dvc.lock")
    if lock_text is None:
        raise SystemExit(f"audit: {rev} has no dvc.lock: nothing was reproduced and committed there")
    lock = read_lock(lock_text, rev)
    unreadable: list[str] = []
    blobs: dict[str, bytes | None] = {}  # each DVC-tracked file read once (a remote read each), failed ones too

    def read(path: str) -> bytes | None:
        if path not in blobs:
            blobs[path] = dvc_file(repo, commit, path, unreadable)
        return blobs[path]

    folders = {
        d["path"] for e in lock["stages"].values() for d in e.get("deps", []) if str(d.get("md5")).endswith(".dir")
    }

    def file_md5(path: str) -> str | None:
        if path in folders:  # a folder inside another stage's output: its hash from that output's listing
            return folder_md5(repo, commit, path, unreadable)
        blob = read(path)
        return None if blob is None else hashlib.md5(blob).hexdigest()

    lock_problems, unversioned = [], []
    if check_lock:
        try:
            names, uncached, definitions = declared(repo, commit)
        except Exception as exc:  # noqa: BLE001 - DVC's own parse errors, whatever their class: fail closed
            reason = first_line(exc)
            lock_problems.append(
                f"dvc.yaml at {commit[:12]} cannot be resolved by DVC ({reason}): its stages and git-tracked "
                "outputs cannot be checked"
            )
            names, uncached, definitions = [], set(), {}
        # a stage dvc.yaml no longer declares left its entry in dvc.lock: nothing vouches for what it recorded, so
        # what it "produced" is no stage's output (an input of a declared stage there is checked as a source) and
        # its entry is not checked itself
        dropped = dropped_outputs(lock, names)
        lock = declared_only(lock, names)
        lock_problems += lock_inconsistencies(lock, names, file_md5)
        lock_problems += git_tracked_mismatches(
            lock,
            uncached,
            lambda path: git_blob(repo, commit, path),
            lambda path: git_tree(repo, commit, path),
        )
        # the revision's own inputs: what dvc.yaml, the params files and the code and data no stage makes hold
        lock_problems += definition_changes(lock, definitions)
        whole = {
            (stage, file) for stage, d in definitions.items() for file, keys in d["params"].items() if keys is None
        }
        lock_problems += params_changes(lock, lambda path: git_file(repo, commit, path), whole)
        found = versioned_inputs(repo, commit, sources(lock), unreadable)
        stale, unversioned = source_problems(lock, found.get, dropped)
        lock_problems += stale
        try:
            unreadable += unavailable_outputs(repo, commit, lock, uncached, names)
        except Exception as exc:  # noqa: BLE001 - whatever DVC raises: an unchecked restore is no pass
            unreadable.append(
                f"cannot check that the data of {commit[:12]}'s outputs can be restored ({first_line(exc)}): fetch "
                f"it with `git checkout {commit[:12]} && dvc pull`"
            )
    manifest_blob, labels_blob, lineage_blob, model_blob = (read(path) for path in DVC_FILES)
    rows = read_rows(manifest_blob) or []
    download = lock["stages"].get("download", {})
    metrics = {}
    produced = {path for outs in stage_outputs(lock).values() for path in outs}
    for path in METRICS:
        text = git_file(repo, commit, path)
        if text is None:
            continue
        # git-tracked outputs are checked against the lock as declared stages'
        if check_lock and path not in produced and enclosing(path, produced) is None:
            lock_problems.append(
                f"{path} is in the revision but no stage its dvc.yaml declares outputs it: no recorded run vouches "
                "for its figures, so they are not reported"
            )
            continue
        metrics[path] = json.loads(text)
    constraints = git_file(repo, commit, "constraints.txt") or ""
    # a revision only compared against (not `check_lock`): its lists are not in the report, so not read
    # ... nor a stage dvc.yaml no longer declares, whose lock entry stayed: no run vouches for what git holds there
    quality = {"checked": check_lock and "quality" in lock["stages"]}  # checked: `lock` holds declared stages only
    if quality["checked"]:
        made = stage_outputs(lock)["quality"]
        for key, path in (("near_duplicates", NEAR_DUPLICATES), ("label_issues", LABEL_ISSUES)):
            if path not in made:  # a file git still holds from an earlier run would pass as the stage's list
                lock_problems.append(f"{path}: the quality stage in dvc.lock does not output it: no list to check")
                quality[key] = []
                continue
            blob = read(path)  # DVC-cached since the run cache covers quality; git-tracked in older revisions
            quality[key] = [] if blob is None else json.loads(blob)
    download_params = stage_params(lock).get("download", {}).get("download", {})
    quality["excluded"] = download_params.get("exclude", [])
    quality["kept_together"] = download_params.get("keep_together", [])
    return {
        "revision": commit,
        "subject": git(repo, "log", "-1", "--format=%s", commit).strip(),
        "date": git(repo, "log", "-1", "--format=%cI", commit).strip(),
        "data_source": {
            "params": stage_params(lock).get("download", {}).get("dataset"),
            "dependency": [d for d in download.get("deps", []) if not d["path"].endswith(".py")],
        },
        "manifest_sha256": hashlib.sha256(manifest_blob).hexdigest() if manifest_blob else None,
        "images": manifest.split_counts(rows),
        "labels": json.loads(labels_blob) if labels_blob else None,
        "params": stage_params(lock),
        "outputs": stage_outputs(lock),
        "metrics": metrics,
        "libraries": dict(
            line.split("==", 1) for line in constraints.splitlines() if "==" in line and not line.startswith("#")
        ),
        "serving_lineage": json.loads(lineage_blob) if lineage_blob else None,
        "model_sha256": hashlib.sha256(model_blob).hexdigest() if model_blob else None,
        "quality": quality,
        "unreadable": unreadable,
        "lock_problems": lock_problems,
        "unrecorded": unrecorded_facts(lock, names) if check_lock else [],
        "unversioned_inputs": unversioned,
        "_rows": rows,
    }


def rebuild(
    repo: Path, commit: str, stages: Sequence[str] = REBUILT
) -> tuple[list[str], dict[str, str], dict[str, str], dict[str, dict]]:
    """Re-run `stages` of a revision from its recorded inputs, in a scratch git worktree.

    The worktree shares this repository's DVC cache: the revision's outputs are
    checked out from the cache (or pulled from the default remote) and their
    content digests noted, then each stage runs again with `dvc repro --force
    --single-item`. Returns the stages re-run (those of `stages` the revision has) and the
    (recorded, rebuilt) digests of every output of them; training is bit-reproducible, so
    they must be equal. Last, the machines the training histories record, before and after (`trained_on`).
    """
    cache = dvc("cache", "dir", cwd=repo).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="audit-rebuild-") as scratch:
        tree = Path(scratch) / "tree"
        git(repo, "worktree", "add", "--detach", str(tree), commit)
        try:
            dvc("config", "--local", "cache.dir", str(Path(repo, cache).resolve()), cwd=tree)
            if (
                dvc("checkout", cwd=tree, check=False).returncode != 0
            ):  # not all in the local cache: a remote may have it
                dvc("pull", cwd=tree)
            lock = yaml.safe_load((tree / "dvc.lock").read_text(encoding="utf-8"))
            stages = [stage for stage in stages if stage in lock.get("stages", {})]  # older revisions had fewer
            outs = [path for stage in stages for path in stage_outputs(lock).get(stage, {})]
            recorded = content_digests(tree, outs)
            machines = {"recorded": trained_on(tree, outs)}
            thaw(tree / "dvc.yaml")  # the scratch worktree's only: DVC never runs a frozen stage
            for stage in stages:
                log.info("audit: re-running %s at %s", stage, commit[:12])
                ran = dvc("repro", "--force", "--single-item", stage, cwd=tree).stdout
                if f"Running stage '{stage}'" not in ran:
                    raise RuntimeError(f"rebuild: dvc repro did not run stage {stage} at {commit[:12]}: {ran[-1000:]}")
            machines["rebuilt"] = trained_on(tree, outs)
            return stages, recorded, content_digests(tree, outs), machines
        finally:  # never raises over the error that got here
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=repo, capture_output=True)
            subprocess.run(["git", "worktree", "prune"], cwd=repo, capture_output=True)


def trained_on(tree: Path, outs: Sequence[str]) -> dict[str, dict]:
    """The machine each training history among the outputs records (`history.json`'s `trained_on`), by its path."""
    found = {}
    for path in outs:
        history = tree / path / "history.json"
        try:
            machine = json.loads(history.read_text(encoding="utf-8")).get("trained_on") if history.is_file() else None
        except (OSError, ValueError, AttributeError):
            machine = None
        if isinstance(machine, dict):
            found[f"{path}/history.json"] = machine
    return found


def machine_differences(recorded: dict[str, dict], rebuilt: dict[str, dict]) -> list[str]:
    """Where a rebuild's outputs differ, what of the machine differs from the one the revision was trained on: the
    last bits of TensorFlow's kernels follow the instruction sets, the usable cores and the thread settings, so a
    rebuild elsewhere is no evidence against the revision (revisions from before the record: nothing to say)."""
    problems = []
    for path in sorted(set(recorded) & set(rebuilt)):
        before, after = recorded[path], rebuilt[path]
        differ = [
            f"{key} {before.get(key)!r} there, {after.get(key)!r} here"
            for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)
        ]
        if differ:
            problems.append(
                f"rebuild: {path} was trained on another machine type than this rebuild's ({'; '.join(differ)}): "
                "TensorFlow's last bits follow the machine, so rebuild on the one it names"
            )
    return problems


def thaw(dvc_yaml: Path) -> None:
    """Take `frozen: true` off every stage of a (scratch) dvc.yaml, `foreach`/`matrix` definitions included: DVC
    never runs a frozen stage, --force or not, so a rebuild compared its recorded outputs with themselves (and
    `dvc unfreeze` cannot write a templated stage back)."""
    spec = load_yaml(dvc_yaml.read_text(encoding="utf-8")) or {}
    thawed = False
    for definition in (spec.get("stages") or {}).values():
        for body in (definition, definition.get("do")):
            if isinstance(body, dict) and body.pop("frozen", None) is not None:
                thawed = True
    if thawed:
        dvc_yaml.write_text(dump_yaml(spec), encoding="utf-8")


def workspace_changes(repo: Path) -> dict:
    """Stages whose workspace outputs or dependencies differ from the workspace's dvc.lock (`dvc status`)."""
    with Repo(str(repo)) as dvc_repo:
        return dvc_repo.status()


def workspace_lock_changes(repo: Path, outputs: dict[str, dict[str, str]]) -> list[str]:
    """Stages whose outputs in the workspace's dvc.lock are not the audited revision's `outputs` (`stage_outputs`
    of its lock): the workspace holds another run's outputs (an uncommitted `dvc repro`), which `dvc status`
    cannot see."""
    path = repo / "dvc.lock"
    here = stage_outputs(yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else {})
    return [
        f"workspace: stage {stage}'s outputs in dvc.lock are not the audited revision's: {outs} against {here.get(stage)}"
        for stage, outs in outputs.items()
        if here.get(stage) != outs
    ]


def to_markdown(report: dict) -> str:
    r = report["revision_record"]
    lines = [
        f"# Audit of {r['revision'][:12]}",
        "",
        f"- commit: `{r['revision']}` ({r['date']}): {r['subject']}",
        f"- result: **{'PASS' if not report['problems'] else 'FAIL'}**",
        "",
    ]
    if report["problems"]:
        lines += ["## Problems", ""] + [f"- {p}" for p in report["problems"]] + [""]
    lines += ["## Data", "", f"- source: `{json.dumps(r['data_source']['params'])}`"]
    lines += [
        f"- source version: `{d['path']}` {d.get('md5')} ({d.get('nfiles', '?')} files)"
        for d in r["data_source"]["dependency"]
    ]
    lines += [
        f"- not versioned by the revision, so checked only by the hash dvc.lock recorded: `{item}`"
        for item in r.get("unversioned_inputs", [])
    ]
    lines += [
        f"- manifest sha256: `{r['manifest_sha256']}`",
        f"- labels: {r['labels']}",
        "",
        "| split | " + " | ".join(r["labels"] or []) + " |",
        "|---|" + "---|" * len(r["labels"] or []),
    ]
    for split, counts in r["images"].items():
        lines.append(f"| {split} | " + " | ".join(str(counts.get(label, 0)) for label in r["labels"] or []) + " |")
    q = r["quality"]
    lines += ["", "## Data quality (quality stage)", ""]
    if not q["checked"]:
        lines.append("- not checked: this revision has no quality stage")
    else:
        lines.append(f"- near-duplicate pairs across splits: {len(q['near_duplicates'])}")
        lines.append(f"- suspected label errors (train + val): {len(q['label_issues'])}")
        lines += [
            f"  - {i['split']} `{i['source']}` given {i['given']}, looks {i['suggested']} ({i['score']:.3f}), id `{i['id']}`"
            for i in q["label_issues"][:10]
        ]
    lines.append(f"- excluded by download.exclude: {len(q['excluded'])}" + "".join(f" `{i}`" for i in q["excluded"]))
    lines.append(
        f"- groups kept in one split by download.keep_together: {len(q['kept_together'])}"
        + "".join(f" `{' '.join(g)}`" for g in q["kept_together"])
    )
    lines += ["", "## Stages", "", "| stage | output | md5 |", "|---|---|---|"]
    for stage, outs in r["outputs"].items():
        lines += [f"| {stage} | `{path}` | `{md5}` |" for path, md5 in outs.items()]
    lines += [
        "",
        "## Params",
        "",
        "```json",
        json.dumps(r["params"], indent=2, sort_keys=True),
        "```",
        "",
        "## Metrics",
        "",
    ]
    for path, values in r["metrics"].items():
        flat = {
            k: v
            for k, v in flatten(values).items()
            if ".per_class." not in f".{k}." and not isinstance(v, list)  # (head.test.per_class.rose.f1)
        }
        lines += [
            f"- `{path}`: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in flat.items())
        ]
    lines += ["", "## Libraries (constraints.txt)", ""] + [
        f"- {k}=={r['libraries'][k]}" for k in lineage.LIBRARIES if k in r["libraries"]
    ]
    if report.get("workspace") is not None:
        lines += ["", "## Workspace against dvc.lock", "", f"- {report['workspace'] or 'all outputs match'}"]
    if report.get("diff"):
        d = report["diff"]
        lines += [
            "",
            f"## Against {d['against'][:12]}",
            "",
            f"- images: {d['images']}",
            f"- params changed: {json.dumps(d['params'])}",
            f"- metrics changed: {json.dumps(d['metrics'])}",
        ]
    return "\n".join(lines) + "\n"


def audit(repo: Path, rev: str, against: str | None = None, workspace: bool = False, rebuilt: bool = False) -> dict:
    record = collect(repo, rev)
    rows = record.pop("_rows")
    problems = list(record["unreadable"]) + list(record["lock_problems"]) + list(record["unrecorded"])
    problems += [f"image {sha[:12]} is in two splits" for sha in split_conflicts(rows)]
    problems += lineage_checks(record["serving_lineage"], record["manifest_sha256"], record["model_sha256"])
    problems += near_duplicate_problems(record["quality"].get("near_duplicates", []))
    report: dict[str, Any] = {"revision_record": record, "problems": problems}
    if rebuilt:
        try:
            stages, recorded, again, machines = rebuild(repo, record["revision"])
        except Exception as exc:  # noqa: BLE001 - a rebuild that could not restore or re-run the revision fails
            problems.append(
                f"rebuild: {record['revision'][:12]} could not be restored and re-run ({first_line(exc)}): nothing "
                "is shown to rebuild; fetch its data (`dvc pull`) and run the audit again"
            )
            report["rebuild"] = {"stages": [], "outputs": 0, "identical": False}
        else:
            mismatches = rebuild_mismatches(recorded, again)
            if mismatches:  # say why, where the machine is not the one the revision was trained on
                mismatches += machine_differences(machines["recorded"], machines["rebuilt"])
            if not stages:
                mismatches.append(
                    f"rebuild: {record['revision'][:12]} has none of the stages {', '.join(REBUILT)} in its "
                    "dvc.lock: nothing was re-trained, so nothing is shown to rebuild"
                )
            report["rebuild"] = {"stages": stages, "outputs": len(recorded), "identical": not mismatches}
            problems += mismatches
    if workspace:
        changes = workspace_changes(repo)
        report["workspace"] = changes
        problems += [f"workspace: stage {stage} differs from dvc.lock: {json.dumps(c)}" for stage, c in changes.items()]
        problems += workspace_lock_changes(repo, record["outputs"])
    if against:
        other = collect(repo, against, check_lock=False)
        other_rows = other.pop("_rows")
        problems += list(other["unreadable"])
        problems += [
            f"image {m['sha256'][:12]} moved from {m['from']} to {m['to']}" for m in moved_splits(other_rows, rows)
        ]
        problems += [
            f"label map changed: {p}" for p in label_order_changes(other["labels"] or [], record["labels"] or [])
        ]
        key = identity_key(other_rows, rows)
        old_ids, new_ids = {r[key] for r in other_rows}, {r[key] for r in rows}
        report["diff"] = {
            "against": other["revision"],
            "images": {
                "added": len(new_ids - old_ids),
                "removed": len(old_ids - new_ids),
                "kept": len(new_ids & old_ids),
            },
            "params": diff_flat(other["params"], record["params"]),
            "metrics": diff_flat(other["metrics"], record["metrics"]),
        }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the git revision to audit")
    parser.add_argument("--against", default=None, help="an earlier revision to diff and check against")
    parser.add_argument("--workspace", action="store_true", help="also check the workspace's outputs against dvc.lock")
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="re-train the revision's models from its recorded inputs and check every output hash",
    )
    parser.add_argument("--repo", default=".", help="the project's git repository")
    parser.add_argument("--out", default="audit", help="folder for audit.json and audit.md")
    args = parser.parse_args(argv)
    configure_logging()
    out = Path(args.out)
    for name in ("audit.json", "audit.md"):  # an audit that stops with an error leaves no earlier report behind
        (out / name).unlink(missing_ok=True)
    report = audit(Path(args.repo), args.rev, args.against, args.workspace, args.rebuild)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "audit.md").write_text(to_markdown(report), encoding="utf-8")
    for problem in report["problems"]:
        log.error("audit: %s", problem)
    log.info("audit: %s -> %s (%s)", args.rev, out, "FAIL" if report["problems"] else "PASS")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    run_main(main)
