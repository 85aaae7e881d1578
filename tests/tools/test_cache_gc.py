import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from components import extract
from pipelines import feature_cache
from tests.conftest import make_converted, repo_params
from tools import cache_gc


def test_only_other_namespaces_and_unused_entries_go(tmp_path):
    root = tmp_path / "cache"
    keep = feature_cache.FeatureCache(str(root), {"base": "current"}, [3])
    other = feature_cache.FeatureCache(str(root), {"base": "older"}, [3])
    for key in ("a" * 64, "b" * 64, "c" * 64):
        keep.put(key, np.ones(3))
        other.put(key, np.ones(3))
    keep.put_note("batch_plan", {"tail": 1})
    (root / "openvino").mkdir()  # converted models of another runtime: not a namespace, untouched
    leftover = root / keep.folder.split("/")[-1] / "aa" / f"{'a' * 64}.f32.tmp-123"
    leftover.write_bytes(b"half")  # a write a killed run left behind
    name = feature_cache.namespace_of({"base": "current"})
    dry = feature_cache.collect_garbage(str(root), name, {"a" * 64, "c" * 64}, dry_run=True)
    assert dry["entries_removed"] == 2 and dry["namespaces_removed"] == [feature_cache.namespace_of({"base": "older"})]
    assert keep.has("b" * 64) and other.has("a" * 64)  # a dry run deletes nothing
    report = feature_cache.collect_garbage(str(root), name, {"a" * 64, "c" * 64})
    assert report == {**dry, "entries_kept": 2}
    assert report["bytes_freed"] > 4 * 12  # three entries of the other namespace, one here, and the leftover
    assert keep.has("a" * 64) and keep.has("c" * 64) and not keep.has("b" * 64) and not leftover.exists()
    assert keep.get_note("batch_plan") == {"tail": 1} and keep.get_note("meta") is not None
    assert not (root / feature_cache.namespace_of({"base": "older"})).exists() and (root / "openvino").is_dir()
    with pytest.raises(ValueError, match="local cache folder"):
        feature_cache.collect_garbage("gs://bucket/cache", name, set())


def test_a_collection_killed_while_it_deletes_a_namespace_leaves_nothing_for_good(tmp_path, monkeypatch):
    """Found by a review on 2026-12-06: an unused namespace was deleted in place, and a collection killed after its
    meta.json went (entry 169 of 257 in the listing there) left a folder no later collection took for a namespace:
    its entries stayed on disk for good. It is renamed aside first, and a later collection deletes what is aside."""
    root = tmp_path / "cache"
    keep = feature_cache.FeatureCache(str(root), {"base": "current"}, [3])
    other = feature_cache.FeatureCache(str(root), {"base": "older"}, [3])
    for key in ("a" * 64, "b" * 64):
        keep.put(key, np.ones(3))
        other.put(key, np.ones(3))
    name = feature_cache.namespace_of({"base": "current"})
    real_rmtree = feature_cache.shutil.rmtree

    def killed(path):  # the deletion gets as far as meta.json, then the process dies
        (Path(path) / "meta.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(feature_cache.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        feature_cache.collect_garbage(str(root), name, {"a" * 64, "b" * 64})
    monkeypatch.setattr(feature_cache.shutil, "rmtree", real_rmtree)
    left = [p.name for p in root.iterdir() if p.name != name]
    assert len(left) == 1 and left[0].endswith(tuple("0123456789abcdef")) and ".gc-" in left[0], left
    report = feature_cache.collect_garbage(str(root), name, {"a" * 64, "b" * 64})
    assert report["namespaces_removed"] == left and report["bytes_freed"] >= 2 * 12
    assert [p.name for p in root.iterdir()] == [name] and keep.has("a" * 64) and keep.has("b" * 64)


def test_notes_a_killed_run_was_writing_and_converted_models_go(tmp_path):
    """Two leaks: a namespace's half-written notes (meta.json.tmp-...) were only looked for in sub-folders, and
    OpenVINO's converted models (one per base, size and version seen, and killed conversions' private folders)
    were never deleted, though the README said other runtimes' entries were."""
    root = tmp_path / "cache"
    keep = feature_cache.FeatureCache(str(root), {"base": "current"}, [3])
    keep.put("a" * 64, np.ones(3))
    note = root / keep.folder.split("/")[-1] / "batches-4.json.tmp-99-abc"
    note.write_text("{")
    converted = root / "openvino"
    for key in ("oldbase", ".newbase.0123456789ab"):  # an older base's IR, a conversion killed mid-write
        (converted / key).mkdir(parents=True)
        (converted / key / "model.bin").write_bytes(b"w" * 100)
    name = feature_cache.namespace_of({"base": "current"})
    report = feature_cache.collect_garbage(str(root), name, {"a" * 64})
    assert not note.exists() and report["entries_removed"] == 1 and keep.has("a" * 64)
    assert keep.get_note("meta") is not None
    dry = feature_cache.collect_converted(str(converted), dry_run=True)
    assert dry == {"converted_removed": 2, "bytes_freed": 200} and (converted / "oldbase").exists()
    assert feature_cache.collect_converted(str(converted)) == dry and list(converted.iterdir()) == []
    assert feature_cache.collect_converted(str(tmp_path / "none")) == {"converted_removed": 0, "bytes_freed": 0}


@pytest.mark.slow
def test_after_gc_the_next_extract_computes_nothing_and_removed_images_are_gone(tmp_path, monkeypatch):
    """The tool's namespace is the one extract writes, and its keys are the records' images."""
    base = {"name": "mobilenet_v2", "path": None, "weights": "none", "input_size": [32, 32], "pooling": "avg"}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(repo_params({"conv_base": base, "extract": {"batch_size": 4}})))
    config = extract.load_config(params)
    cache = str(tmp_path / "cache")
    old = make_converted(tmp_path / "old", per_class=5)  # images that later leave the dataset
    extract.run(config, old, tmp_path / "e0", cache_root=cache)
    current = make_converted(tmp_path / "new", per_class=4, start=50)
    extract.run(config, current, tmp_path / "e1", cache_root=cache)
    other = extract.Config(config.conv_base.model_copy(update={"input_size": (40, 40)}), config.extract)
    extract.run(other, current, tmp_path / "e2", cache_root=cache)  # another namespace
    monkeypatch.chdir(tmp_path)
    assert cache_gc.main(["--params", str(params), "--convert", str(current), "--cache", cache]) == 0
    namespaces = [p for p in (tmp_path / "cache").iterdir() if (p / "meta.json").exists()]
    assert len(namespaces) == 1
    entries = list(namespaces[0].glob("*/*.f32"))
    assert len(entries) == 8  # the current images only
    again = extract.run(config, current, tmp_path / "e3", cache_root=cache, metrics_path=tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["computed"] == 0 and again["from_cache"] == 8


def test_the_download_cache_keeps_the_files_at_the_source_under_the_current_limits(tmp_path, monkeypatch):
    from components import download
    from pipelines import normalise
    from tests.conftest import make_class_folder

    source = make_class_folder(tmp_path / "src", per_class=6)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(repo_params({"dataset": {"source": "folder", "dir": str(source)}})))
    config = download.load_config(params)
    cache = tmp_path / "cache"
    download.run(config, tmp_path / "d0", cache_root=cache)
    stricter = download.Config(config.common, config.dataset, config.download.model_copy(update={"min_side": 20}))
    download.run(stricter, tmp_path / "d1", cache_root=cache)  # another namespace
    (source / "cats" / "cats_0.jpg").unlink()  # a file that left the source
    dry = cache_gc.collect_download_cache(params, str(cache), dry_run=True)
    assert dry["files_at_source"] == 11 and dry["entries_removed"] == 1 and len(dry["namespaces_removed"]) == 1
    report = cache_gc.collect_download_cache(params, str(cache), dry_run=False)
    assert report == {**dry, "entries_kept": 11}
    assert len(list(cache.glob("*/*/*.json"))) == 11
    calls = []
    real = normalise.normalise_image
    monkeypatch.setattr(normalise, "normalise_image", lambda data, **kw: calls.append(1) or real(data, **kw))
    download.run(config, tmp_path / "d2", cache_root=cache)
    assert calls == []  # everything the next run reads is still there


def test_the_collection_never_downloads_a_dataset(tmp_path, monkeypatch):
    from components import download
    from pipelines import sources

    probes = []

    def spy(data_dir, cfg, network_probe):  # what download.source_items hands the tfds reader
        probes.append(network_probe)
        return iter(())

    monkeypatch.setattr(sources, "read_tfds", spy)
    config = download.Config(
        download.CommonParams(seed=1),
        download.DatasetParams(source="tfds", dir=str(tmp_path / "tfds")),
        download.DownloadParams(),
    )
    assert cache_gc.source_keys(config) == set()
    assert len(probes) == 1 and probes[0] is not sources.network_reachable  # not the real probe: offline
    assert probes[0]() is False  # whatever the network: it fetches nothing


def test_the_namespace_the_outputs_came_from_is_kept(tmp_path):
    root = tmp_path / "cache"
    for record in ({"base": "now"}, {"base": "outputs"}, {"base": "old"}):
        feature_cache.FeatureCache(str(root), record, [3]).put("a" * 64, np.ones(3))
    metrics = tmp_path / "extract.json"
    metrics.write_text(json.dumps({"cache_namespace": feature_cache.namespace_of({"base": "outputs"})}))
    kept = {feature_cache.namespace_of({"base": "now"}), cache_gc.recorded_namespace(metrics)}
    report = feature_cache.collect_garbage(str(root), kept, {"a" * 64})
    assert report["namespaces_removed"] == [feature_cache.namespace_of({"base": "old"})]
    assert report["entries_kept"] == 2
    assert cache_gc.recorded_namespace(tmp_path / "none.json") is None


def test_the_namespace_a_runners_workers_write_under_is_kept_with_the_launchers(tmp_path, monkeypatch):
    """A review: a worker whose runner settings differ from the launcher's (Dask's nanny sets OMP_NUM_THREADS=1)
    writes under a namespace of its own, and extract's metrics record only the launcher's, so cache_gc deleted every
    entry the outputs came from and the next run was cold. The worker's namespace names the launcher's in its meta,
    and the collection keeps it (its unused entries still go)."""
    from components.conv_base import ConvBaseParams
    from pipelines import extract as graph

    root = str(tmp_path / "cache")
    config = extract.Config(
        ConvBaseParams(name="mobilenet_v2", weights="none", input_size=(32, 32)), extract.ExtractParams(batch_size=4)
    )
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the launcher's shell (a CI's may set it)
    namespace = extract.cache_namespace(config)  # what the launcher hands its workers and records
    launcher = feature_cache.namespace_of(namespace)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a Dask worker
    worker = graph.ExtractShard(None, (32, 32), 4, root, namespace, [1280])
    worker.setup()
    try:
        used, unused = "ab" * 32, "cd" * 32
        worker._cache.put(used, np.ones(1280))
        worker._cache.put(unused, np.ones(1280))
        own = worker._cache.folder.rsplit("/", 1)[-1]
    finally:
        worker.teardown()
    assert own != launcher  # the worker's settings key its own namespace
    other = feature_cache.FeatureCache(root, {"base": "older"}, [3])  # not derived from a kept one: it goes
    report = feature_cache.collect_garbage(root, {launcher}, {used})
    assert report["namespaces_removed"] == [other.folder.rsplit("/", 1)[-1]]
    assert (report["entries_kept"], report["entries_removed"]) == (1, 1)
    kept = feature_cache.FeatureCache(root, {**namespace, "environment": worker._cache.record["environment"]}, [1280])
    assert kept.has(used) and not kept.has(unused)


def test_a_workers_namespace_standing_in_for_two_launchers_is_kept_for_either(tmp_path):
    """Launchers whose runner settings differ from each other's map to the same worker namespace: its meta kept only
    the last one's name, so a collection keeping the first launcher's outputs deleted the features they came from."""
    root = str(tmp_path / "cache")
    record = {"base": "b", "environment": {"OMP_NUM_THREADS": "1"}}
    first, second = "a1" * 32, "b2" * 32
    feature_cache.FeatureCache(root, record, [3], derived_from=first)
    worker = feature_cache.FeatureCache(root, record, [3], derived_from=second)
    feature_cache.FeatureCache(root, record, [3])  # a later open without a launcher changes nothing
    used = "ab" * 32
    worker.put(used, np.ones(3))
    for kept in (first, second):
        report = feature_cache.collect_garbage(root, {kept}, {used}, dry_run=True)
        assert report["namespaces_removed"] == [] and report["entries_kept"] == 1, kept
    # two opened at once (a review: a list in the meta, read and written back, lost one of them): a note each
    import threading

    gate = threading.Barrier(2)
    reads = feature_cache.FeatureCache.get_note

    def read_together(self, name):
        found = reads(self, name)
        gate.wait(timeout=10)  # both have read before either writes
        return found

    third, fourth = "c3" * 32, "d4" * 32
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(feature_cache.FeatureCache, "get_note", read_together)
        opens = [
            threading.Thread(target=feature_cache.FeatureCache, args=(root, record, [3], n)) for n in (third, fourth)
        ]
        for thread in opens:
            thread.start()
        for thread in opens:
            thread.join()
    for kept in (first, second, third, fourth):
        assert feature_cache.collect_garbage(root, {kept}, {used}, dry_run=True)["namespaces_removed"] == [], kept
    # a meta written by the code before (one name in it) still names its launcher
    for note in Path(worker.folder).glob("derived_from-*.json"):
        note.unlink()
    meta = Path(worker.folder) / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "derived_from": first}))
    assert feature_cache.collect_garbage(root, {first}, {used}, dry_run=True)["namespaces_removed"] == []
    assert feature_cache.collect_garbage(root, {second}, {used}, dry_run=True)["namespaces_removed"] != []
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "derived_from": [first, second]}))  # or a list
    for kept in (first, second):
        assert feature_cache.collect_garbage(root, {kept}, {used}, dry_run=True)["namespaces_removed"] == [], kept


def test_no_garbage_collection_while_a_stage_uses_a_cache(tmp_path, monkeypatch):
    """download and extract hold their cache's lock for their run; the collection refuses to start meanwhile."""
    from components import download
    from pipelines import cache_lock

    seen = {}

    def collect_now(component, cache):
        def fake_run(*args, **kwargs):  # the stage's run, replaced: is a collection possible while it runs?
            try:
                with cache_lock.held(cache, exclusive=True):
                    seen[component] = "collected"
            except cache_lock.CacheBusy as busy:
                seen[component] = str(busy)

        return fake_run

    params = tmp_path / "params.yaml"
    base = {"name": "mobilenet_v2", "path": None, "weights": "none", "input_size": [32, 32], "pooling": "avg"}
    source = tmp_path / "src"
    params.write_text(
        yaml.safe_dump(repo_params({"dataset": {"source": "folder", "dir": str(source)}, "conv_base": base}))
    )
    monkeypatch.setattr(download, "run", collect_now("download", tmp_path / "dl"))
    assert download.main(["--params", str(params), "--out", str(tmp_path / "d"), "--cache", str(tmp_path / "dl")]) == 0
    monkeypatch.setattr(extract, "run", collect_now("extract", tmp_path / "fe"))
    args = ["--params", str(params), "--convert", str(tmp_path / "c"), "--out", str(tmp_path / "e")]
    assert extract.main([*args, "--cache", str(tmp_path / "fe")]) == 0
    for component in ("download", "extract"):
        assert seen[component].startswith(
            f"the cache {tmp_path / ('dl' if component == 'download' else 'fe')} is in use"
        )
    with cache_lock.held(tmp_path / "fe"):  # a stage runs: the tool stops before deleting anything
        with pytest.raises(cache_lock.CacheBusy, match="run the garbage collection when no stage runs"):
            cache_gc.main(
                ["--params", str(params), "--cache", str(tmp_path / "fe"), "--download-cache", str(tmp_path / "none")]
            )
    with cache_lock.held(tmp_path / "fe", exclusive=True):  # and after it, the lock is free again
        pass
    converted = tmp_path / "openvino"
    (converted / "somekey").mkdir(parents=True)
    with cache_lock.held(converted):  # evaluate converting and compiling (runtime: openvino)
        with pytest.raises(cache_lock.CacheBusy):
            cache_gc.main(
                [
                    "--params",
                    str(params),
                    "--cache",
                    str(tmp_path / "fe"),
                    "--download-cache",
                    str(tmp_path / "none"),
                    "--converted",
                    str(converted),
                ]
            )
    assert (converted / "somekey").is_dir()


def test_a_cache_a_stage_creates_while_the_collection_runs_is_left_alone(tmp_path, monkeypatch):
    """A cache folder absent when the collection takes its locks has no lock of the collection's: a stage that
    starts meanwhile creates it and holds its own lock, so the collection must not delete what it writes."""
    params = tmp_path / "params.yaml"
    base = {"name": "mobilenet_v2", "path": None, "weights": "none", "input_size": [32, 32], "pooling": "avg"}
    source = tmp_path / "src"
    source.mkdir()
    params.write_text(
        yaml.safe_dump(repo_params({"dataset": {"source": "folder", "dir": str(source)}, "conv_base": base}))
    )
    caches = {name: tmp_path / name for name in ("dl", "fe", "openvino")}
    written = []

    def stages_start(convert_dir):  # runs while the collection reads the records: the three caches appear
        for cache in caches.values():
            entry = cache / "another-namespace" / "ab" / "abc.npy"  # in no namespace the collection keeps
            entry.parent.mkdir(parents=True)
            (cache / "another-namespace" / "meta.json").write_text("{}")
            entry.write_bytes(b"features being written")
            written.append(entry)
        return set()

    monkeypatch.setattr(cache_gc, "used_keys", stages_start)
    assert not any(cache.exists() for cache in caches.values())
    cache_gc.main(
        [
            "--params",
            str(params),
            "--download-cache",
            str(caches["dl"]),
            "--cache",
            str(caches["fe"]),
            "--converted",
            str(caches["openvino"]),
            "--metrics",
            str(tmp_path / "none.json"),
        ]
    )
    assert len(written) == 3 and all(entry.is_file() for entry in written)


@pytest.mark.parametrize("flag", ["--cache", "--download-cache", "--converted"])
def test_a_cache_in_a_bucket_is_refused_not_skipped(flag, tmp_path):
    with pytest.raises(ValueError, match="gs://bucket/cache: garbage collection runs on a local cache folder"):
        cache_gc.main(["--params", str(tmp_path / "params.yaml"), flag, "gs://bucket/cache"])


def test_a_damaged_shard_stops_the_collection_naming_it(converted_tiny, tmp_path):
    """The keys in use were read through tf.data: a damaged shard stopped the collection (nothing deleted) with
    TensorFlow's DataLossError, naming no file (a review on 2026-12-07)."""
    import shutil

    convert = tmp_path / "convert"
    shutil.copytree(converted_tiny, convert)
    assert len(cache_gc.used_keys(convert)) == sum(
        json.loads((convert / "summary.json").read_text())["records"].values()
    )
    shard = sorted((convert / "records").glob("val-*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(ValueError, match=rf"{shard}: a damaged or truncated TFRecord"):
        cache_gc.used_keys(convert)
