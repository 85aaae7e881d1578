"""Atomic stage outputs: build in a temporary sibling, then move into place.

A stage killed part-way leaves only a hidden ``.<name>.tmp-*`` folder, never a
half-written output that DVC (or the next stage) would accept.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `final` on success.

    Its name carries this process's id: a leftover of a killed run is removed by the next run, a folder of
    a run still going is not (`remove_stale`). The run's three names (`.tmp-`, `.old-`, `.trash-`) share
    one token. A run killed between moving the old output aside and the new one in leaves no `final` and
    its `.tmp-` in place: the next run puts the old one back first. The old output is renamed once more
    (`.trash-`) before it is deleted, so a folder named `.old-` is always whole.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not (final.exists() or final.is_symlink()):
        restore_interrupted(final)
    for kind in ("tmp", "old", "trash"):
        remove_stale(final.parent, f".{final.name}.{kind}-", legacy=STAGED_DIR_LEGACY)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, old, trash = (final.parent / f".{final.name}.{kind}-{token}" for kind in ("tmp", "old", "trash"))
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists() or final.is_symlink():
        try:
            os.replace(final, old)
        except BaseException:  # `final` cannot be moved (a mount point: EBUSY): the new output is not kept either
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        os.replace(tmp, final)
    except BaseException:
        if old.exists() or old.is_symlink():
            os.replace(old, final)  # the output as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.exists() or old.is_symlink():
        os.replace(old, trash)
        remove_entry(trash, ignore_errors=True)


def restore_interrupted(final: Path) -> None:
    """Put back the output a killed run moved aside where `final` is missing: its `.<name>.old-<token>`, the
    run's process gone, while its `.tmp-<token>` is still there (the run died between its two renames; a
    `.old-` without it is the output before one that was moved in: not put back, and swept). The newest such one
    where there are several. Older releases' `.old-` names, without a process id, are never restored."""
    prefix = f".{final.name}.old-"
    aside = final.parent.glob(f"{glob.escape(prefix)}*")
    dead = [
        entry
        for entry in aside
        if scratch_owner(token := entry.name[len(prefix) :]) == 0
        and (final.parent / f".{final.name}.tmp-{token}").exists()
    ]
    for entry in sorted(dead, key=lambda entry: (entry.lstat().st_mtime_ns, entry.name), reverse=True):
        try:
            os.replace(entry, final)
        except FileNotFoundError:  # another run restored it first
            continue
        log.warning("%s was missing (a run killed while replacing it): restored from %s", final, entry.name)
        return


def other_run_alive(pid: int) -> bool:
    """Whether `pid` is a running process other than this one. This process's own id in a scratch name is a
    killed run's id reused (a process runs one such job at a time); 0 and below name no single process."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's
        return True
    return True


SCRATCH_NAME = re.compile(r"(\d+)-[0-9a-z_]+")  # <pid>-<uuid hex, time in ns, or mkdtemp's letters>
STAGED_DIR_LEGACY = r"[0-9a-f]{8}"  # staged_dir's names before they carried a process id
MKDTEMP_LEGACY = r"[0-9a-z_]{8}"  # tempfile.mkdtemp(prefix=...)'s names, before they carried one


def scratch_owner(suffix: str, legacy: str | None = None) -> int | None:
    """For the part of a scratch name after its prefix: the id of the live run that owns it, 0 where its
    run is gone (or, matching the `legacy` pattern, it is an older release's name without a process id),
    None where it is not a scratch name (someone else's file)."""
    if match := SCRATCH_NAME.fullmatch(suffix):
        pid = int(match.group(1))
        return pid if other_run_alive(pid) else 0
    return 0 if legacy and re.fullmatch(legacy, suffix) else None


def stale_entries(folder: Path, prefix: str, *, legacy: str | None = None) -> list[Path]:
    """The entries of `folder` named `<prefix><pid>-<token>` whose process is gone (a killed run's), and those
    whose rest matches `legacy` (an older release's names, without a process id), in name order; not those of
    live runs nor any other name."""
    entries = sorted(folder.glob(f"{glob.escape(prefix)}*")) if folder.is_dir() else []
    return [entry for entry in entries if scratch_owner(entry.name[len(prefix) :], legacy) == 0]


def remove_stale(folder: Path, prefix: str, *, legacy: str | None = None) -> list[str]:
    """Remove a killed run's scratch (`stale_entries`); keep live runs' and any other name. Returns the names
    removed."""
    removed = []
    for entry in stale_entries(folder, prefix, legacy=legacy):
        remove_entry(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed


def remove_entry(path: Path, *, ignore_errors: bool = False) -> None:
    """Remove a file, a link (not what it points to) or a folder with what it holds; nothing if none.
    What cannot be removed raises, unless `ignore_errors` (a best-effort sweep of scratch)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            if not ignore_errors:
                raise


def require_outputs(root: str | Path, relative: Iterable[str]) -> None:
    """Raise if any promised output is missing (the executor's last check)."""
    root = Path(root)
    missing = [name for name in relative if not (root / name).exists()]
    if missing:
        raise RuntimeError(f"stage did not produce its declared outputs under {root}: {missing}")


SCRATCH = "analysis_scratch"  # what a graph's scratch path becomes
# Process-wide counters TensorFlow writes into a graph besides the function names: the number of a `while` loop's
# cond function inside the names of its redundant placeholders (`tf.map_fn`, as the serving function's), and the
# unique id of a custom gradient (`tf.nn.silu`, Keras' swish). Each is renumbered by rank, as the functions are.
COUNTERS = {
    b"redundant_placeholder": re.compile(rb"(_)(\d+)(___redundant_placeholder\d+)"),
    b"custom_gradient": re.compile(rb"(CustomGradient-)(\d+)((?!\d))"),
}


def counter_ranks(serialized: bytes) -> dict[bytes, dict[int, int]]:
    """Each of `COUNTERS`' numbers found in a serialised graph -> its rank among that counter's numbers."""
    return {
        name: {n: i for i, n in enumerate(sorted({int(m.group(2)) for m in pattern.finditer(serialized)}))}
        for name, pattern in COUNTERS.items()
    }


def renumber_counters(value: bytes, ranks: dict[bytes, dict[int, int]]) -> bytes:
    """`value` with each of `COUNTERS`' numbers replaced by its rank (`counter_ranks` of the whole graph)."""
    for name, ranked in ranks.items():
        if ranked:
            value = COUNTERS[name].sub(
                lambda m, ranked=ranked: m.group(1) + str(ranked[int(m.group(2))]).encode() + m.group(3), value
            )
    return value


class _StringRewrite:
    """Every string and bytes value of a proto (map keys too) with the function names of `mapping` replaced as
    whole tokens and ``<scratch>/`` replaced by ``<scratch_name>/``, in place; the `_user_specified_name`
    attributes that hold a number are collected in `user_named`. A walk of the message, which is what
    rewriting its text format and parsing it back did, without the parse (seconds for a model's graph)."""

    def __init__(
        self,
        mapping: dict[str, str],
        scratch: str,
        scratch_name: str,
        counters: dict[bytes, dict[int, int]] | None = None,
    ) -> None:
        from google.protobuf.descriptor import FieldDescriptor

        self.types = FieldDescriptor
        self.mapping = mapping
        # other process-wide counters the graph holds (`COUNTERS`): their numbers -> rank
        self.counters = counters if counters and any(counters.values()) else None
        self.scratch = (scratch + "/", scratch_name + "/") if scratch else None
        alternatives = "|".join(map(re.escape, sorted(mapping, key=len, reverse=True)))
        self.token = re.compile(r"(?<![\w])(" + alternatives + r")(?![\w])") if mapping else None
        self.token_bytes = re.compile(rb"(?<![\w])(" + alternatives.encode() + rb")(?![\w])") if mapping else None
        self.changed = False  # a scratch path was replaced (the renames are known from `mapping`)
        self.user_named: list = []

    def text(self, value: str) -> str:
        if self.counters:  # the counters' patterns are on bytes: the whole rewrite done on the UTF-8 bytes
            return self.data(value.encode()).decode()
        if self.scratch and self.scratch[0] in value:
            value, self.changed = value.replace(*self.scratch), True
        return self.token.sub(lambda m: self.mapping[m.group(1)], value) if self.token else value

    def data(self, value: bytes) -> bytes:
        if self.scratch and self.scratch[0].encode() in value:
            value, self.changed = value.replace(*(part.encode() for part in self.scratch)), True
        if self.token_bytes:
            value = self.token_bytes.sub(lambda m: self.mapping[m.group(1).decode()].encode(), value)
        return renumber_counters(value, self.counters) if self.counters else value

    def scalar(self, field, value):
        if field.type == self.types.TYPE_STRING:
            return self.text(value)
        return self.data(value) if field.type == self.types.TYPE_BYTES else value

    def message(self, message) -> None:
        types = self.types
        if message.DESCRIPTOR.full_name == "google.protobuf.Any":  # a packed message: walked as one, as text did
            self.packed(message)
            return
        for field, value in message.ListFields():
            if field.type != types.TYPE_MESSAGE:
                if field.type not in (types.TYPE_STRING, types.TYPE_BYTES):
                    continue
                if field.is_repeated:
                    new = [self.scalar(field, v) for v in value]
                    if new != list(value):
                        del value[:]
                        value.extend(new)
                else:
                    new = self.scalar(field, value)
                    if new != value:
                        setattr(message, field.name, new)
            elif field.message_type.GetOptions().map_entry:
                self.map(field, value)
            elif field.is_repeated:
                for item in value:
                    self.message(item)
            else:
                self.message(value)

    def packed(self, message) -> None:
        """An Any's message, unpacked, walked and packed again (its bytes are a serialised message whose lengths a
        rename would break); one of a type this process does not know is left as it is."""
        from google.protobuf import descriptor_pool, message_factory

        try:
            descriptor = descriptor_pool.Default().FindMessageTypeByName(message.TypeName())
        except KeyError:
            return
        inner = message_factory.GetMessageClass(descriptor)()
        inner.ParseFromString(message.value)
        before = inner.SerializeToString(deterministic=True)
        self.message(inner)
        after = inner.SerializeToString(deterministic=True)
        if after != before:
            message.value = after

    def map(self, field, value) -> None:
        key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        keys = list(value.keys())
        new_keys = [self.scalar(key_field, k) for k in keys]
        if value_field.type != self.types.TYPE_MESSAGE:
            items = [(k, self.scalar(value_field, value[old])) for k, old in zip(new_keys, keys)]
            if items != [(k, value[k]) for k in keys]:
                value.clear()
                value.update(items)
            return
        if new_keys != keys:
            entries = []
            for old, new in zip(keys, new_keys):
                copy = type(value[old])()
                copy.CopyFrom(value[old])
                entries.append((new, copy))
            value.clear()
            for new, copy in entries:
                value[new].CopyFrom(copy)
        for key in new_keys:
            item = value[key]
            if (
                key == "_user_specified_name"
                and item.DESCRIPTOR.full_name == "tensorflow.AttrValue"
                and item.s.isdigit()
            ):
                self.user_named.append(item)
            self.message(item)


def stabilise_saved_model(saved_model_dir: str | Path, scratch: str | None = None, scratch_name: str = SCRATCH) -> None:
    """Make a SavedModel's bytes a function of its content: canonical function names, a derived uuid.

    - `scratch`: a folder the graph names by its path (tf.Transform names the label
      vocabulary's lookup table after the analysis' scratch file): every
      ``<scratch>/`` in the graph's strings becomes ``<scratch_name>/``, so the graph
      does not depend on where the job ran (another checkout, an auditor's
      worktree, a runner's temp location). Only the table's resource name holds
      it (the vocabulary itself is read from `assets/`); give `scratch_name` from
      the content (the vocabulary's hash) so two graphs' tables keep distinct names.
    - TensorFlow names traced functions ``__inference_<name>_<n>`` with a
      process-wide counter, so the numbers depend on what else the process
      traced first (with tf.Transform's Beam workers, on thread timing: two
      runs of convert once differed in these numbers alone). They are
      renumbered here in the order of the original numbers, which keeps every
      reference consistent (and so are arguments named after the counter).
    - fingerprint.pb holds a fresh random uuid on every save; it is recomputed
      from the rewritten graph and its uuid derived from the checksum.
    """
    # TensorFlow's protos here only: a stage that writes no SavedModel does not import TensorFlow (seconds).
    from tensorflow.core.protobuf import saved_model_pb2

    folder = Path(saved_model_dir)
    model_path = folder / "saved_model.pb"
    serialized = model_path.read_bytes()
    model = saved_model_pb2.SavedModel()
    model.ParseFromString(serialized)
    mapping = function_renames(model)
    scratch = str(scratch or "").rstrip("/")
    if scratch and (len(scratch) < 8 or '"' in scratch or "\\" in scratch):
        raise ValueError(f"scratch path {scratch!r}: too short or not a plain path to replace safely")
    counters = counter_ranks(serialized)
    rewrite = _StringRewrite(mapping, scratch, scratch_name, counters)
    rewrite.message(model)
    # Arguments traced without a name get the counter's value as theirs: renumbered the same way.
    numbers = sorted({int(attr.s) for attr in rewrite.user_named})
    if mapping or numbers or rewrite.changed or any(counters.values()):
        rank = {n: i for i, n in enumerate(numbers)}
        for attr in rewrite.user_named:
            attr.s = str(rank[int(attr.s)]).encode()
        write_sorted(model, model_path)
    if scratch and (scratch + "/").encode() in model_path.read_bytes():
        log.warning("%s still names the scratch folder %s: its bytes depend on where it ran", model_path, scratch)
    derive_fingerprint(folder)


def function_renames(model) -> dict[str, str]:
    """Traced function name -> the name `stabilise_saved_model` gives it: the counter's numbers (``_<n>``)
    replaced by their rank, in the order of the original numbers."""
    numbered = re.compile(r"^(.*_)(\d+)$")
    names = {f.signature.name for graph in model.meta_graphs for f in graph.graph_def.library.function}
    order = sorted((int(m.group(2)), name) for name in names if (m := numbered.match(name)))
    return {name: f"{numbered.match(name).group(1)}{i}" for i, (_, name) in enumerate(order)}


def write_sorted(model, model_path: Path) -> None:
    """Write the SavedModel proto with each function library sorted by name (it was listed in the order of the
    old names) and maps in key order."""
    for graph in model.meta_graphs:
        functions = sorted(graph.graph_def.library.function, key=lambda f: f.signature.name)
        del graph.graph_def.library.function[:]
        graph.graph_def.library.function.extend(functions)
    model_path.write_bytes(model.SerializeToString(deterministic=True))


def derive_fingerprint(folder: Path) -> None:
    """fingerprint.pb recomputed from the (rewritten) graph, its uuid derived from the checksum, not random."""
    from tensorflow.core.protobuf import fingerprint_pb2
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    fingerprint_path = folder / "fingerprint.pb"
    if fingerprint_path.exists():
        fingerprint = fingerprint_pb2.FingerprintDef()
        fingerprint.ParseFromString(fingerprinting.CreateFingerprintDef(str(folder)))
        fingerprint.uuid = str(fingerprint.saved_model_checksum)
        fingerprint_path.write_bytes(fingerprint.SerializeToString(deterministic=True))


FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


def save_keras(model, path: str | Path) -> None:
    """`model.save(path)` with bytes that depend on the model alone.

    A `.keras` file is a zip whose entries carry the time of writing, whose
    metadata.json holds ``date_saved``, and whose config.json numbers objects
    shared between layers by their memory address (``shared_object_id``): two
    saves of the same weights in two processes differ by those alone. All three
    are fixed here (the ids renumbered in order of appearance, which keeps what
    is shared with what), so a re-trained identical model has the same DVC hash.
    """
    path = Path(path)
    raw = path.with_name(f".{path.name}.raw-{uuid.uuid4().hex[:8]}.keras")
    model.save(raw)
    try:
        with zipfile.ZipFile(raw) as source, zipfile.ZipFile(path, "w") as target:
            for info in source.infolist():
                data = source.read(info.filename)
                if info.filename == "metadata.json":
                    metadata = json.loads(data)
                    metadata["date_saved"] = "1980-01-01@00:00:00"
                    data = json.dumps(metadata, sort_keys=True).encode()
                elif info.filename == "config.json":
                    data = json.dumps(_renumber_shared_objects(json.loads(data))).encode()
                entry = zipfile.ZipInfo(info.filename, date_time=FIXED_ZIP_TIME)
                entry.compress_type, entry.external_attr = info.compress_type, info.external_attr
                target.writestr(entry, data)
    finally:
        raw.unlink(missing_ok=True)


def _renumber_shared_objects(config):
    """`shared_object_id` values (memory addresses) -> 1, 2, ... in order of first appearance."""
    numbers: dict[int, int] = {}

    def walk(node):
        if isinstance(node, dict):
            return {
                k: (numbers.setdefault(v, len(numbers) + 1) if k == "shared_object_id" else walk(v))
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(config)
