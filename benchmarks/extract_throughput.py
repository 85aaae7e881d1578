"""Extraction throughput, peak memory and head accuracy on real data, in one script.

    python -m benchmarks.extract_throughput ../shared/data/cats_vs_dogs_2000 \
        ../shared/models/efficientnet_lite0_imagenet_notop.keras [--size 160] [--work DIR]

Prepares download + convert of the folder (not timed), then times, on the same images:
  bare   the baseline: a `predict_on_batch` loop over the same images already decoded
         and resized in memory (pure inference, batches of 32), and the same loop on
         OpenVINO (each batch split over its inference streams);
  decode the stage's decode alone on the same records (a thread per core): with the bare loop's time it
         bounds what the stage can reach on these cores (stage_ceiling_over_bare);
  stage  the extract stage with each runtime (Beam, DirectRunner; decode, resize,
         batches of 32, the frozen base), wall time of a cold `extract.run` (empty
         feature cache) including model load, OpenVINO's conversion and Beam start;
         each trains the head (train_head stage, logistic head) on its own features
         and reports its val and test accuracy;
  cpu    the CPU seconds of the bare loop, the decode and the stage (`cpu_seconds`), and the ceilings they set on
         these cores (`cpu_ceiling_over_bare`): bare + decode CPU over the cores, and the stage's own CPU over them
  seed   the seed's loop: tf_keras `ImageDataGenerator().flow_from_directory(...)`
         over the same folder with `model.predict(batch)` per batch.
  shards with --shards, the stage with each runtime with one shard at a time and with `SHARDS_AT_ONCE` (a worker's
         shards at once), alternating, twice each, cold (OpenVINO converts in each run): the ratio of the two.
Then the extract stage's peak RSS in a fresh process at 500 and at 2,000 images, and
evaluate with each runtime (after a short TensorFlow fine-tune), cold (the models
converted in the run) and warm, with both models' accuracies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import stage_env, tracked_base

BATCH = 32


def prepare(folder: Path, work: Path, limit: int | None = None) -> Path:
    from components import convert, download

    dl_out = work / "download"
    if not dl_out.exists():
        preset = download.DownloadParams(
            fractions=download.Fractions(train=0.5, val=0.25, test=0.25)
        )  # presets/real_lite0.yaml
        download.run(
            download.Config(download.CommonParams(), download.DatasetParams(source="folder", dir=str(folder)), preset),
            dl_out,
        )
    if limit is None:
        target, src = work / "convert", dl_out
    else:
        src = work / f"download_{limit}"
        shutil.copytree(dl_out, src)
        rows = (src / "manifest.jsonl").read_text().splitlines()
        step = max(1, len(rows) // limit)  # every k-th row: all splits and classes
        (src / "manifest.jsonl").write_text("\n".join(rows[::step][:limit]) + "\n")
        target = work / f"convert_{limit}"
    convert.run(convert.Config(convert.ConvertParams()), src, target)
    return target


def bare_predict(model, convert_dir: Path, size) -> tuple[float, int]:
    import numpy as np

    from pipelines import records

    paths = sorted((convert_dir / "records").glob("*.tfrecord"))
    pixels = [p.numpy() for path in paths for p, _ in records.image_dataset([str(path)], size, BATCH, binary=False)]
    images = np.concatenate(pixels)
    model.predict_on_batch(images[:BATCH])  # warm-up (trace)
    started, cpu = time.perf_counter(), cpu_seconds()
    for i in range(0, len(images), BATCH):
        model.predict_on_batch(images[i : i + BATCH])
    CPU["bare"] = cpu_seconds() - cpu
    return time.perf_counter() - started, len(images)


CPU: dict[str, float] = {}  # CPU seconds (user + system, every thread) of each timed part, by name


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def decode_only(convert_dir: Path, size) -> tuple[float, int]:
    """The stage's decode alone (`records.record_decoder` on a thread per core, as extract's workers run it)
    over the same records: what the stage does on the same cores besides inference, which the bare loop
    does not. Both use every core, so the bare loop's time plus this bounds the stage from below."""
    import concurrent.futures

    from pipelines import records

    files = [str(p) for p in sorted((convert_dir / "records").glob("*.tfrecord"))]
    decode = records.record_decoder(size)
    n = 0
    started, cpu = time.perf_counter(), cpu_seconds()
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for ids, _, _ in records.decoded_batches(files, decode, BATCH, pool):
            n += len(ids)
    CPU["decode"] = cpu_seconds() - cpu
    return time.perf_counter() - started, n


def seed_loop(model, folder: Path, size) -> tuple[float, int]:
    from tf_keras.preprocessing.image import ImageDataGenerator

    generator = ImageDataGenerator().flow_from_directory(
        str(folder), target_size=size, batch_size=BATCH, class_mode="binary", shuffle=False
    )
    started, count = time.perf_counter(), 0
    for i in range(len(generator)):
        inputs, _ = generator[i]
        model.predict(inputs, verbose=0)
        count += len(inputs)
    return time.perf_counter() - started, count


def peak_rss_mb(convert_dir: Path, out: Path, params: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "components.extract",
        "--params",
        str(params),
        "--convert",
        str(convert_dir),
        "--out",
        str(out),
    ]
    code = "import resource,subprocess,sys; r=subprocess.run(sys.argv[1:]); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
    result = subprocess.run(
        [sys.executable, "-c", code, *cmd], capture_output=True, text=True, cwd=params.parent, env=stage_env()
    )
    kb, rc = result.stdout.split()[-2:]
    if rc != "0":
        raise RuntimeError(result.stderr[-3000:])
    return int(kb) / 1024


def time_stage(extract, config, convert_dir: Path, out: Path, cache: Path) -> tuple[float, dict]:
    """Wall time of a cold extract stage (empty feature cache; OpenVINO converts the base once into it)."""
    shutil.rmtree(cache, ignore_errors=True)
    started, cpu = time.perf_counter(), cpu_seconds()
    record = extract.run(config, convert_dir, out, cache_root=str(cache))
    CPU[f"stage_{config.extract.runtime}"] = cpu_seconds() - cpu
    return time.perf_counter() - started, record


def bare_openvino(model, convert_dir: Path, size) -> tuple[float, int]:
    """The bare loop on OpenVINO: each batch of 32 split over the inference streams."""
    import numpy as np

    from pipelines import records, runtimes

    paths = sorted((convert_dir / "records").glob("*.tfrecord"))
    images = np.concatenate(
        [p.numpy() for path in paths for p, _ in records.image_dataset([str(path)], size, BATCH, binary=False)]
    )
    compiled = runtimes.OpenVINOModel(model)
    compiled.predict_split(images[:BATCH])
    started = time.perf_counter()
    for i in range(0, len(images), BATCH):
        compiled.predict_split(images[i : i + BATCH])
    return time.perf_counter() - started, len(images)


def evaluate_per_runtime(work: Path, convert_dir: Path, base, epochs: int) -> dict:
    """Fine-tune (TensorFlow, the preset's recipe for `epochs` epochs), then time evaluate with each runtime:
    cold (the models converted in the run, as after a new training) and warm (conversions cached)."""
    from components import evaluate, finetune
    from components.params import CommonParams

    tune = finetune.FinetuneParams(
        unfreeze_from="block11_expand_conv", optimizer="adam", learning_rate=5e-5, epochs=epochs, batch_size=32
    )
    finetune.run(
        finetune.Config(CommonParams(), base, tune),
        convert_dir,
        work / "head" / "head.keras",
        work / "finetune",
        work / "live_finetune",
    )
    manifest = work / "download" / "manifest.jsonl"

    def timed(runtime: str, name: str) -> float:
        config = evaluate.Config(evaluate.EvaluateParams(runtime=runtime))
        started = time.perf_counter()
        evaluate.run(
            config,
            convert_dir,
            work / "extract_tensorflow",
            work / "head" / "head.keras",
            work / "finetune" / "model.keras",
            manifest,
            work / f"report_{name}",
            str(work / f"evaluate_cache_{runtime}"),
        )
        return time.perf_counter() - started

    for runtime in ("tensorflow", "openvino"):
        shutil.rmtree(work / f"evaluate_cache_{runtime}", ignore_errors=True)
    # Untimed first: the first evaluate of a process pays one-off costs (imports, first traces) whatever its
    # runtime; timing TensorFlow first credited OpenVINO with them. TensorFlow has no conversion (cold and
    # warm are one run): timed before and after OpenVINO's runs, its mean is the baseline.
    timed("tensorflow", "warmup")
    tf_times = [timed("tensorflow", "tensorflow_1")]
    ov_times = [timed("openvino", "openvino_cold"), timed("openvino", "openvino_warm")]
    tf_times.append(timed("tensorflow", "tensorflow_2"))
    results = {}
    for runtime, report_name in (("tensorflow", "tensorflow_1"), ("openvino", "openvino_cold")):
        metrics = json.loads((work / f"report_{report_name}" / "metrics.json").read_text())
        results[runtime] = {
            "accuracy": {m: {s: metrics[m][s]["accuracy"] for s in ("val", "test")} for m in evaluate.MODELS},
            "test_images": metrics["finetune"]["test"]["images"],
        }
    results["tensorflow"]["runs_s"] = [round(t, 2) for t in tf_times]
    results["openvino"].update(cold_s=round(ov_times[0], 2), warm_s=round(ov_times[1], 2))
    tf_mean = sum(tf_times) / len(tf_times)
    tf_, ov = results["tensorflow"], results["openvino"]
    results["speedup_cold"] = round(tf_mean / ov["cold_s"], 3)
    results["speedup_warm"] = round(tf_mean / ov["warm_s"], 3)
    results["test_images_apart"] = {
        m: round(abs(tf_["accuracy"][m]["test"] - ov["accuracy"][m]["test"]) * tf_["test_images"], 2)
        for m in tf_["accuracy"]
    }
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("base", type=Path, help="a saved .keras conv base (raw RGB 0..255 in)")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--no-seed-loop", action="store_true", help="skip the seed's ImageDataGenerator loop")
    parser.add_argument(
        "--finetune-epochs", type=int, default=1, help="epochs of the model evaluate scores (0: skip evaluate)"
    )
    parser.add_argument(
        "--shards", action="store_true", help="also time the stage with one shard at a time against several at once"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    logging.basicConfig(level=logging.WARNING)
    import yaml

    from components import conv_base, extract, train_head
    from components.params import CommonParams

    work = (args.work or Path(tempfile.mkdtemp(prefix="bench_extract_"))).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = (args.size, args.size)
    convert_dir = prepare(args.folder, work)
    base = conv_base.ConvBaseParams(name=None, path=str(args.base.resolve()), input_size=size, pooling="avg")
    model = conv_base.build_extractor(base)
    bare_s, bare_n = bare_predict(model, convert_dir, size)  # the baseline every ratio is against
    report: dict = {"images": bare_n, "size": list(size), "bare_predict_images_per_s": round(bare_n / bare_s, 1)}
    decode_s, decode_n = decode_only(convert_dir, size)
    report["decode_only_images_per_s"] = round(decode_n / decode_s, 1)
    # The stage decodes and infers on the same cores: at best (no overhead, every core busy throughout) it
    # takes the bare loop's time plus the decode's, so its throughput over the bare loop's is at most this.
    report["stage_ceiling_over_bare"] = round(bare_s / (bare_s + decode_s), 3)
    ov_s, ov_n = bare_openvino(model, convert_dir, size)
    report["bare_openvino_images_per_s"] = round(ov_n / ov_s, 1)
    report["bare_openvino_over_bare"] = round(bare_s / ov_s, 3)

    head_params = train_head.TrainHeadParams(hidden_units=0, dropout=0.2, epochs=60, patience=8)  # the preset's head
    # Untimed first: the first extract of a process pays one-off costs (Beam's and the stage's first use)
    # whatever its runtime; timing TensorFlow first credited OpenVINO's stage with them.
    time_stage(
        extract,
        extract.Config(base, extract.ExtractParams(batch_size=BATCH)),
        convert_dir,
        work / "extract_warmup",
        work / "cache_warmup",
    )
    for runtime in ("tensorflow", "openvino"):
        config = extract.Config(base, extract.ExtractParams(batch_size=BATCH, runtime=runtime))
        stage_s, record = time_stage(extract, config, convert_dir, work / f"extract_{runtime}", work / "cache")
        if runtime == "openvino":
            report["stage_openvino_over_stage_tensorflow"] = round(report["stage_tensorflow"]["seconds"] / stage_s, 3)
        n = sum(record["records"].values())
        history = train_head.run(
            train_head.Config(CommonParams(), head_params),
            work / f"extract_{runtime}",
            convert_dir / "labels.json",
            work / ("head" if runtime == "tensorflow" else f"head_{runtime}"),
            work / f"live_{runtime}",
        )
        head_path = work / ("head" if runtime == "tensorflow" else f"head_{runtime}") / "head.keras"
        report[f"stage_{runtime}"] = {
            "seconds": round(stage_s, 2),
            "images_per_s": round(n / stage_s, 1),
            "over_bare": round((n / stage_s) / (bare_n / bare_s), 3),
            # of which: checking params and loading the base before Beam starts, then the Beam job itself
            "setup_s": round(stage_s - record["seconds"], 2),
            "beam_s": record["seconds"],
            "head_val_accuracy": round(history["val_accuracy"], 4),
            "head_test_accuracy": round(head_test_accuracy(head_path, work / f"extract_{runtime}"), 4),
        }
    # The nightly case: the base was converted by an earlier run (cached by its content), the features are new.
    for entry in (work / "cache").iterdir():
        if entry.name != "openvino":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    config = extract.Config(base, extract.ExtractParams(batch_size=BATCH, runtime="openvino"))
    started = time.perf_counter()
    record = extract.run(config, convert_dir, work / "extract_openvino_converted", cache_root=str(work / "cache"))
    stage_s = time.perf_counter() - started
    report["stage_openvino_base_converted_before"] = {
        "seconds": round(stage_s, 2),
        "images_per_s": round(bare_n / stage_s, 1),
        "over_bare": round(bare_s / stage_s, 3),
        "over_stage_tensorflow": round(report["stage_tensorflow"]["seconds"] / stage_s, 3),
    }
    # The CPU the parts used (this process, every thread): the stage does the bare loop's inference and the decode
    # and more (reading, hashing, the cache, Beam, loading the base) on the same cores, so at best, every core busy
    # throughout, it takes its own CPU seconds over the cores: its ceiling on this machine, whatever the overlap.
    cores = os.cpu_count() or 1
    report["cpu_seconds"] = {name: round(value, 2) for name, value in CPU.items() if not name.endswith("openvino")}
    report["cores"] = cores
    report["cpu_ceiling_over_bare"] = {
        "bare_plus_decode": round(bare_s / ((CPU["bare"] + CPU["decode"]) / cores), 3),
        "stage_tensorflow": round(bare_s / (CPU["stage_tensorflow"] / cores), 3),
    }
    report["features_max_abs_difference"] = max_feature_difference(
        work / "extract_tensorflow", work / "extract_openvino"
    )

    if args.shards:
        report["shards_at_once"] = shards_at_once(extract, base, convert_dir, work)
    if not args.no_seed_loop:
        seed_s, seed_n = seed_loop(model, args.folder, size)
        report["seed_loop_images_per_s"] = round(seed_n / seed_s, 1)
        report["stage_tensorflow_over_seed_loop"] = round(
            report["stage_tensorflow"]["images_per_s"] / report["seed_loop_images_per_s"], 3
        )
    if not args.no_rss:
        params = work / "params.yaml"
        params.write_text(
            yaml.safe_dump(
                {
                    "conv_base": {**json.loads(base.model_dump_json()), "path": tracked_base(work, args.base)},
                    "extract": extract.ExtractParams(batch_size=BATCH).model_dump(),
                }
            )
        )
        convert_500 = prepare(args.folder, work, limit=500)
        report["peak_rss_mb"] = {
            "500": round(peak_rss_mb(convert_500, work / "rss500", params), 1),
            str(bare_n): round(peak_rss_mb(convert_dir, work / "rss_all", params), 1),
        }
    if args.finetune_epochs:
        report["evaluate"] = evaluate_per_runtime(work, convert_dir, base, args.finetune_epochs)
    print(json.dumps(report, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def shards_at_once(extract, base, convert_dir: Path, work: Path) -> dict:
    """Cold stage runs of each runtime with a worker's shards one at a time (as before 2026-12-08) and
    `SHARDS_AT_ONCE` at once, alternating, twice each: their mean seconds and the speed-up; the outputs' bytes
    must be the same."""
    from pipelines import extract as graph

    results = {}
    at_once = graph.SHARDS_AT_ONCE
    for runtime in ("tensorflow", "openvino"):
        config = extract.Config(base, extract.ExtractParams(batch_size=BATCH, runtime=runtime))
        seconds: dict[int, list[float]] = {1: [], at_once: []}
        try:
            for attempt in range(2):
                for shards in (1, at_once):
                    graph.SHARDS_AT_ONCE = shards
                    out = work / f"shards_{runtime}_{shards}_{attempt}"
                    seconds[shards].append(time_stage(extract, config, convert_dir, out, work / "cache_shards")[0])
        finally:
            graph.SHARDS_AT_ONCE = at_once
        outputs = {tree_digest(work / f"shards_{runtime}_{n}_{a}") for n in seconds for a in range(2)}
        if len(outputs) != 1:
            raise SystemExit(f"shards at once: {runtime}: the outputs differ with the number of shards at once")
        one, many = (sum(seconds[n]) / len(seconds[n]) for n in (1, at_once))
        results[runtime] = {
            "one_at_a_time_s": [round(t, 2) for t in seconds[1]],
            f"{at_once}_at_once_s": [round(t, 2) for t in seconds[at_once]],
            "speedup": round(one / many, 3),
        }
    return results


def tree_digest(folder: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def max_feature_difference(a_dir: Path, b_dir: Path) -> dict:
    """The largest |a - b| between two extract outputs' features, and the largest |a|."""
    import numpy as np

    from pipelines import records

    size = json.loads((a_dir / "features.json").read_text())["feature_size"]
    diff = scale = 0.0
    for shard in sorted((a_dir / "features").glob("*.tfrecord")):
        a = {i: f for i, _, f in records.feature_records([str(shard)], size).as_numpy_iterator()}
        b = {
            i: f
            for i, _, f in records.feature_records([str(b_dir / "features" / shard.name)], size).as_numpy_iterator()
        }
        assert a.keys() == b.keys()
        for key in a:
            diff = max(diff, float(np.abs(a[key] - b[key]).max()))
            scale = max(scale, float(np.abs(a[key]).max()))
    return {"max_abs_difference": diff, "max_abs_feature": scale}


def head_test_accuracy(head_path: Path, extract_dir: Path) -> float:
    import keras
    import numpy as np

    from components.train_head import feature_dataset

    meta = json.loads((extract_dir / "features.json").read_text())
    files = sorted(str(p) for p in (extract_dir / "features").glob("test-*.tfrecord"))
    head = keras.saving.load_model(head_path)
    correct = total = 0
    for features, labels in feature_dataset(files, meta["feature_size"], 2, 256, None):
        predicted = (np.asarray(head.predict_on_batch(features)).ravel() > 0.5).astype(int)
        correct += int((predicted == labels.numpy().astype(int)).sum())
        total += len(predicted)
    return correct / total


if __name__ == "__main__":
    from components.cli import run_main

    run_main(main)
