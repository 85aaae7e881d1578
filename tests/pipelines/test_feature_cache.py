import os
import types

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from pipelines import feature_cache  # noqa: E402

RECORD = {"conv_base": {"name": "tiny"}, "batch_size": 4, "code": {"pipelines.image": "abc"}}


@pytest.mark.parametrize("scheme", ["", "file://"], ids=["local folder", "through tf.io.gfile"])
def test_entries_notes_and_misses(tmp_path, scheme):
    root = scheme + str(tmp_path / "cache")
    cache = feature_cache.FeatureCache(root, RECORD, [2, 3])
    key = feature_cache.image_key(b"an image")
    assert not cache.has(key) and cache.get(key) is None
    cache.put(key, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert cache.has(key)
    np.testing.assert_array_equal(cache.get(key), np.arange(6, dtype=np.float32))
    with pytest.raises(ValueError, match="5 values for a 6-value namespace"):
        cache.put(key, np.zeros(5))
    cache.put_note("plan", {"tail": 1})
    assert cache.get_note("plan") == {"tail": 1} and cache.get_note("absent") is None
    assert feature_cache.stored_feature_shape(root, RECORD) == [2, 3]
    assert feature_cache.stored_feature_shape(root, {**RECORD, "batch_size": 8}) is None

    entry = next((tmp_path / "cache").rglob("*" + feature_cache.SUFFIX))
    assert not list(entry.parent.glob("*.tmp-*"))  # written under a temporary name, then renamed
    whole = entry.read_bytes()
    entry.write_bytes(whole[:-4])  # a truncated write is a miss
    assert not cache.has(key) and cache.get(key) is None
    # damaged in place, the size unchanged: present by its size, never read (its checksum)
    for damaged in (bytes(len(whole)), whole[:5] + bytes([whole[5] ^ 1]) + whole[6:]):
        entry.write_bytes(damaged)
        assert cache.has(key) and cache.get(key) is None
    other = feature_cache.image_key(b"another image")  # an entry under another key's name: its checksum fails too
    (entry.parent.parent / other[:2]).mkdir(exist_ok=True)
    (entry.parent.parent / other[:2] / f"{other}{feature_cache.SUFFIX}").write_bytes(whole)
    assert cache.get(other) is None
    cache.put(key, np.arange(6, dtype=np.float32))  # replaced by a good one
    np.testing.assert_array_equal(cache.get(key), np.arange(6, dtype=np.float32))


def test_a_damaged_note_is_a_missing_one_and_is_written_again(tmp_path):
    """A meta.json or batch-plan note cut short (a crash mid-write) raised JSONDecodeError in every later extract,
    until someone deleted the namespace by hand."""
    root = str(tmp_path / "cache")
    cache = feature_cache.FeatureCache(root, RECORD, [2, 3])
    key = feature_cache.image_key(b"an image")
    cache.put(key, np.arange(6, dtype=np.float32))
    cache.put_note("plan", {"tail": 1})
    meta = next((tmp_path / "cache").rglob("meta.json"))
    meta.write_text("{")
    (meta.parent / "plan.json").write_text("")
    assert feature_cache.stored_feature_shape(root, RECORD) is None and cache.get_note("plan") is None
    again = feature_cache.FeatureCache(root, RECORD, [2, 3])
    np.testing.assert_array_equal(again.get(key), np.arange(6, dtype=np.float32))  # the entries are kept
    assert feature_cache.stored_feature_shape(root, RECORD) == [2, 3]


def test_both_backends_share_one_layout(tmp_path):
    local = feature_cache.FeatureCache(str(tmp_path), RECORD, [4])
    remote = feature_cache.FeatureCache("file://" + str(tmp_path), RECORD, [4])
    local.put("ab" + "0" * 62, np.ones(4))
    np.testing.assert_array_equal(remote.get("ab" + "0" * 62), np.ones(4))


def test_the_namespace_tells_machines_apart_where_the_last_bits_can_differ(monkeypatch):
    from pipelines import fingerprint

    cpuinfo = "processor : 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f amx_tile\n"
    assert fingerprint.cpu_flags(cpuinfo) == ["sse4_2", "avx", "avx2", "fma", "avx512f", "amx_tile"]
    assert fingerprint.cpu_flags("no flags here") == []
    assert fingerprint.machine_record(cpuinfo) != fingerprint.machine_record(cpuinfo.replace(" amx_tile", ""))
    base = {"name": "mobilenet_v2", "weights": "imagenet"}
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    default = feature_cache.namespace_record(base, 32)
    assert default["cpu_flags"] == fingerprint.cpu_flags() and default["cpus"] == len(os.sched_getaffinity(0))
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")  # other kernels, other bits: other entries
    assert feature_cache.namespace_of(feature_cache.namespace_record(base, 32)) != feature_cache.namespace_of(default)


def test_the_namespace_counts_the_cores_a_process_may_use_and_arm_features(monkeypatch):
    """The record took `os.cpu_count()` (the machine's cores, whatever a taskset or a container's cpuset allows),
    not the TF_NUM_*_THREADS settings, and read x86's `flags` line only: an aarch64 CPU's SVE never counted."""
    from pipelines import fingerprint

    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    unpinned = fingerprint.machine_record("flags : avx2")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # pinned to one core: other thread pools
    pinned = fingerprint.machine_record("flags : avx2")
    assert pinned["cpus"] == 1 and (pinned != unpinned or os.cpu_count() == 1)
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "1")
    assert fingerprint.machine_record("flags : avx2") != pinned
    graviton2 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp\n"
    graviton3 = graviton2.replace("asimddp", "asimddp sve i8mm bf16")
    assert fingerprint.cpu_flags(graviton2) == ["asimd", "asimdhp", "asimddp", "fphp"]
    assert fingerprint.cpu_flags(graviton3) == ["asimd", "asimdhp", "asimddp", "fphp", "sve", "bf16", "i8mm"]


def test_xla_keras_config_and_gpus_key_the_namespace_and_defaults_keep_it(monkeypatch):
    """XLA's auto-clustering (TF_XLA_FLAGS), Keras's floatx from keras.json and a GPU each give other features
    (the first two seen here), and went unrecorded: a warm run under them read entries made without them."""
    import keras

    base = {"name": "mobilenet_v2", "weights": "imagenet"}
    monkeypatch.delenv("TF_XLA_FLAGS", raising=False)
    default = feature_cache.namespace_record(base, 32)
    assert "keras_config" not in default and "gpus" not in default  # nothing new on the default machine
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit")
    assert feature_cache.namespace_of(feature_cache.namespace_record(base, 32)) != feature_cache.namespace_of(default)
    monkeypatch.delenv("TF_XLA_FLAGS")
    floatx = keras.config.floatx()
    keras.config.set_floatx("float64")
    try:
        assert feature_cache.namespace_record(base, 32)["keras_config"]["floatx"] == "float64"
        assert feature_cache.local_differences(default) == ["keras_config"]  # a Beam worker with it: refused
    finally:
        keras.config.set_floatx(floatx)
    assert feature_cache.namespace_record(base, 32) == default
    # a launcher's non-default setting that this (default) worker lacks: refused as well, not only the reverse
    launcher = {**default, "keras_config": {"floatx": "float64", "backend": "tensorflow"}, "gpus": [{"name": "g"}]}
    assert feature_cache.local_differences(launcher) == ["gpus", "keras_config"]
    gpu = types.SimpleNamespace(name="/physical_device:GPU:0", device_type="GPU")
    on_gpu = feature_cache.accelerators([gpu])
    assert on_gpu["gpus"][0]["name"] == "/physical_device:GPU:0" and "tensor_float_32" in on_gpu
    assert feature_cache.accelerators([]) == {}
