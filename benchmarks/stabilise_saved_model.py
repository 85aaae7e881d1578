"""stabilise_saved_model: the proto walk against the text-format round trip it replaced, same bytes required.

    python -m benchmarks.stabilise_saved_model [BASE.keras]

Exports serving models (a small generated classifier, with and without test-time augmentation, and, given a
saved base such as ../shared/models/efficientnet_lite0_imagenet_notop.keras, that base under a head) without
stabilising them, then runs `text_round_trip` (the implementation before 2026-12-05: the whole SavedModel
printed as text, names replaced by regular expressions, parsed back) and `components.outputs.
stabilise_saved_model` on copies of each, in this process, and prints their times, the ratio and whether the
two outputs are byte-identical (it stops if not).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path


def text_round_trip(saved_model_dir, scratch: str | None = None, scratch_name: str = "analysis_scratch") -> None:
    """The reference: `stabilise_saved_model` as it was, the rename done on the text format (slow: the parse
    is Python). The renames, the sorted write and the fingerprint are `components.outputs`' own."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    from components import outputs

    folder = Path(saved_model_dir)
    model_path = folder / "saved_model.pb"
    serialized = model_path.read_bytes()
    model = saved_model_pb2.SavedModel()
    model.ParseFromString(serialized)
    mapping = outputs.function_renames(model)
    text = original = text_format.MessageToString(model)
    scratch = str(scratch or "").rstrip("/")
    if scratch:
        text = text.replace(scratch + "/", scratch_name + "/")
    user_named = re.compile(r'(key: "_user_specified_name"\s*value \{\s*s: ")(\d+)(")')
    numbers = sorted({int(m.group(2)) for m in user_named.finditer(text)})
    counters = outputs.counter_ranks(serialized)
    if mapping or numbers or text != original or any(counters.values()):
        if mapping:
            token = re.compile(
                r"(?<![\w])(" + "|".join(map(re.escape, sorted(mapping, key=len, reverse=True))) + r")(?![\w])"
            )
            text = token.sub(lambda m: mapping[m.group(1)], text)
        rank = {n: i for i, n in enumerate(numbers)}
        text = user_named.sub(lambda m: f"{m.group(1)}{rank[int(m.group(2))]}{m.group(3)}", text)
        text = outputs.renumber_counters(text.encode(), counters).decode()  # the other counters, on the text too
        outputs.write_sorted(text_format.Parse(text, saved_model_pb2.SavedModel()), model_path)
    outputs.derive_fingerprint(folder)


def compare(raw: Path, work: Path, scratch: str | None = None) -> tuple[float, float, bool]:
    """(reference seconds, walk seconds, byte-identical) on copies of the unstabilised SavedModel `raw`."""
    from components import outputs

    old, new = work / f"{raw.name}_text", work / f"{raw.name}_walk"
    for copy in (old, new):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(raw, copy)
    started = time.perf_counter()
    text_round_trip(old, scratch)
    middle = time.perf_counter()
    outputs.stabilise_saved_model(new, scratch)
    ended = time.perf_counter()
    same = all((old / f).read_bytes() == (new / f).read_bytes() for f in ("saved_model.pb", "fingerprint.pb"))
    return middle - started, ended - middle, same


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", nargs="?", type=Path, help="a saved .keras conv base to export under a head")
    args = parser.parse_args(argv)
    import keras

    from pipelines import bases, serving

    work = Path(tempfile.mkdtemp(prefix="bench_stabilise_"))
    models = {}
    small, _ = bases.load_conv_base("mobilenet_v2", None, "none", (32, 32))
    inputs = keras.Input((32, 32, 3))
    outputs_ = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(small(inputs)))
    models["mobilenet_v2 32x32, 3 classes"] = (keras.Model(inputs, outputs_), (32, 32), ["a", "b", "c"], "none")
    models["the same, flip TTA"] = (*models["mobilenet_v2 32x32, 3 classes"][:3], "horizontal")
    if args.base:
        base = keras.saving.load_model(args.base, compile=False)
        size = tuple(int(s or 224) for s in base.input_shape[1:3])  # a base of any size runs at 224
        inputs = keras.Input((*size, 3))
        head = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(base(inputs)))
        models[f"{args.base.name} + head"] = (keras.Model(inputs, head), size, ["cat", "dog"], "none")
    for i, (label, (model, size, names, flip)) in enumerate(models.items()):
        raw = work / f"raw{i}"
        serving.export(model, names, size, raw, flip, False)
        old, new, same = compare(raw, work)
        print(
            f"{label}: saved_model.pb {(raw / 'saved_model.pb').stat().st_size / 1e6:.1f} MB; text round trip "
            f"{old:.2f} s, proto walk {new:.2f} s ({new / old:.2f}x); byte-identical: {same}",
            flush=True,
        )
        if not same:
            raise SystemExit(f"{label}: the two give different bytes")
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
