"""convert and extract on Beam runners other than the in-process DirectRunner: the same bytes.

- the DirectRunner with SDK workers in other processes (``direct_running_mode: multi_processing``);
- Beam's ``DaskRunner`` on a ``dask.distributed.LocalCluster`` of two worker processes (extract; convert
  stops with a clear error: tf.Transform's analysis does not translate to Dask);
- the portable path Flink and Spark use: ``PortableRunner`` with an embedded job service and an
  ``EXTERNAL`` pool of SDK worker processes (``apache_beam.runners.worker.worker_pool_main``) that boot
  as a cluster's SDK containers do (``tools/worker_boot.py``): each installs the source package the job
  staged with ``setup_file`` and imports the project from it alone, in a folder that is not the checkout.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import apache_beam as beam
import pytest

from components import beam_options, convert, extract
from components.conv_base import ConvBaseParams
from components.params import ParamsError
from pipelines import feature_cache
from tests.conftest import make_converted, tree_bytes

BASE = ConvBaseParams(name="mobilenet_v2", weights="none", input_size=(32, 32), pooling="avg")
RELATIVE_BASE = BASE.model_copy(update={"weights": "models/base.weights.h5"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def worker_pool(tmp_path_factory):
    """A pool of SDK worker processes, as a Flink or Spark cluster runs beside its task managers: each
    worker boots as Beam's SDK container does (`tools/worker_boot.py`), from a folder that is not the
    checkout, and gets the project's code only from what the job staged."""
    folder = tmp_path_factory.mktemp("worker_pool")
    boot = folder / "boot"
    boot.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tools" / "worker_boot.py"}" "$@"\n')
    boot.chmod(0o755)
    port = free_port()
    log = open(folder / "pool.log", "wb")
    pool = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"]
        + [f"--container_executable={boot}"],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,  # the workers' boot and harness logs too: worker_pool*/pool.log
        env={**os.environ, "TMPDIR": str(folder), "PYTHONPATH": ""},  # workers' folders land in the pool's
        start_new_session=True,  # its own process group: the teardown stops the workers it started too
    )
    deadline = time.monotonic() + 60
    while not listening(port):
        assert time.monotonic() < deadline and pool.poll() is None, "the SDK worker pool did not start"
        time.sleep(0.2)
    yield f"localhost:{port}"
    os.killpg(pool.pid, signal.SIGTERM)
    pool.wait(timeout=30)
    log.close()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("localhost", port)) == 0


@pytest.fixture(scope="module")
def dask_cluster():
    """A dask.distributed cluster of two worker processes."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


RUNNERS = ("multi_processing", "portable", "dask")


def runner_params(name: str, request) -> beam_options.BeamParams:
    if name == "portable":
        pool = request.getfixturevalue("worker_pool")
        return beam_options.BeamParams(
            runner="PortableRunner",
            options={
                "job_endpoint": "embed",
                "environment_type": "EXTERNAL",
                "environment_config": pool,
                "setup_file": str(REPO / "pyproject.toml"),  # as on a real cluster: the code travels with the job
            },
        )
    if name == "dask":
        address = request.getfixturevalue("dask_cluster")
        return beam_options.BeamParams(runner="DaskRunner", options={"dask_client_address": address})
    return beam_options.BeamParams(options={"direct_running_mode": "multi_processing", "direct_num_workers": 2})


@pytest.fixture(scope="module")
def on_direct(tmp_path_factory, tiny_base_weights):
    """What the in-process DirectRunner writes, once for every runner compared with it: convert's output, and
    extract's from a project whose weights file dvc.yaml's runs name relative to it (`models/base.weights.h5`)."""
    root = tmp_path_factory.mktemp("on_direct")
    reference = make_converted(root / "direct", per_class=4)  # download + convert on the DirectRunner
    (root / "project" / "models").mkdir(parents=True)
    shutil.copy(tiny_base_weights, root / "project" / "models" / "base.weights.h5")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root / "project")
        extracted = extract.run(
            extract.Config(RELATIVE_BASE, extract.ExtractParams(batch_size=4)), reference, root / "e1"
        )
    return reference, root / "project", root / "e1", extracted


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("name", RUNNERS)
def test_convert_and_extract_give_the_direct_runners_bytes(name, request, tmp_path, on_direct, monkeypatch):
    reference, project, extracted_on_direct, on_direct = on_direct
    runner = runner_params(name, request)
    config = convert.Config(convert.ConvertParams(shards=convert.Shards(train=2, val=1, test=1)))  # as make_converted
    if name == "dask":  # tf.Transform does not run on Dask: a clear error before any work
        with pytest.raises(beam_options.RunnerUnsupported, match="convert cannot run on DaskRunner"):
            convert.run(config, reference.parent / "download", tmp_path / "convert", runner=runner)
        assert not (tmp_path / "convert").exists()
    else:
        convert.run(config, reference.parent / "download", tmp_path / "convert", runner=runner)
        assert tree_bytes(tmp_path / "convert") == tree_bytes(reference)

    # The weights file as dvc.yaml's runs name it, relative to the project: the workers' own working directories
    # are elsewhere (the worker pool's, Dask's), so they must be given the file's absolute path.
    monkeypatch.chdir(project)
    config = extract.Config(RELATIVE_BASE, extract.ExtractParams(batch_size=4))
    cache = str(tmp_path / "cache")  # as dvc.yaml runs it: the workers check the namespace they write under
    # a launcher whose thread setting its runner's workers do not share (Dask's nanny gives them OMP_NUM_THREADS=1;
    # the worker pools here were started before): such workers key their own namespace, not stop
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    elsewhere = extract.run(config, reference, tmp_path / "e2", runner=runner, cache_root=cache)
    assert on_direct["records"] == elsewhere["records"] and sum(on_direct["records"].values()) == 8
    assert tree_bytes(tmp_path / "e2") == tree_bytes(extracted_on_direct)
    assert (
        json.loads((tmp_path / "e2" / "features.json").read_text())["conv_base"]["weights"] == "models/base.weights.h5"
    )
    # the workers of a runner whose pool was started before (portable, Dask) keyed a namespace of their own, which
    # names the launcher's (what cache_gc keeps); multi_processing's workers start with the launcher's settings
    notes = list(Path(cache).glob(f"*/derived_from-{elsewhere['cache_namespace']}.json"))
    assert len(notes) == (0 if name == "multi_processing" else 1), notes
    entries = {path: path.stat().st_ino for path in Path(cache).rglob(f"*{feature_cache.SUFFIX}")}
    extract.run(config, reference, tmp_path / "e3", runner=runner, cache_root=cache)  # warm: from the workers' cache
    assert tree_bytes(tmp_path / "e3") == tree_bytes(extracted_on_direct)
    # nothing computed again: no entry written anew (the portable runner reports no counter that stayed 0)
    assert {path: path.stat().st_ino for path in Path(cache).rglob(f"*{feature_cache.SUFFIX}")} == entries
    # Counts come from the outputs; Beam's DaskRunner has no metrics, so how many were computed is unknown.
    assert elsewhere["computed"] == (None if name == "dask" else 8)


def test_the_beam_section_becomes_pipeline_options_in_order(monkeypatch):
    params = beam_options.BeamParams(
        runner="PortableRunner", options={"job_endpoint": "embed", "save_main_session": True, "streaming": False}
    )
    monkeypatch.setenv(beam_options.ENV, "--job_endpoint=localhost:8099 --environment_type=LOOPBACK")
    args = beam_options.beam_args(params, ["--environment_type=DOCKER"])
    assert args == [
        "--runner=PortableRunner",
        "--job_endpoint=embed",
        "--save_main_session",
        "--job_endpoint=localhost:8099",
        "--environment_type=LOOPBACK",
        "--environment_type=DOCKER",
    ]
    options = beam_options.pipeline_options("extract", params, ["--environment_type=DOCKER"]).get_all_options()
    assert options["job_endpoint"] == "localhost:8099" and options["environment_type"] == "DOCKER"  # last wins


def test_false_options_are_said_to_beam_or_refused_never_dropped():
    def args(**options):
        return beam_options.beam_args(beam_options.BeamParams(runner="DirectRunner", options=options), environ={})[1:]

    # off by default unless given: nothing to pass; Beam's default None (on for some runners): --no_
    assert args(streaming=False) == []
    assert args(save_main_session=False, pipeline_type_check=False) == [
        "--no_pipeline_type_check",
        "--no_save_main_session",
    ]
    options = beam_options.pipeline_options(
        "extract", beam_options.BeamParams(options={"save_main_session": False})
    ).get_all_options()
    assert options["save_main_session"] is False  # not None: the runner's choice
    with pytest.raises(ParamsError, match=r"beam\.options\.save_main_sesion: false .*no such option"):
        args(save_main_sesion=False)  # misspelt: dropped, it would never reach the unknown-option check


def test_true_defaults_and_list_flags_are_said_to_beam():
    """`pipeline_type_check: true` (Beam's default, which has only --no_pipeline_type_check) was an unknown
    option, and a list flag's values could only be given as one comma-joined string."""
    options = {"pipeline_type_check": True, "experiments": ["a", "b"], "environment_options": ["x=1", "y=2"]}
    got = beam_options.pipeline_options("extract", beam_options.BeamParams(options=options)).get_all_options()
    assert got["pipeline_type_check"] is True and got["experiments"] == ["a", "b"]
    assert got["environment_options"] == ["x=1", "y=2"]
    with pytest.raises(ParamsError, match=r"beam\.options\.job_name: a list, but --job_name takes one value"):
        beam_options.pipeline_options("extract", beam_options.BeamParams(options={"job_name": ["a", "b"]}))


def test_a_bad_beam_section_stops_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv(beam_options.ENV, raising=False)
    with pytest.raises(ParamsError, match="unknown Beam option --direct_num_wokers.*did you mean 'direct_num_workers'"):
        beam_options.pipeline_options("extract", beam_options.BeamParams(options={"direct_num_wokers": 2}))
    with pytest.raises(ValueError, match="without the dashes"):
        beam_options.BeamParams(options={"--runner": "x"})
    with pytest.raises(ParamsError, match="beam: argument --direct_running_mode: invalid choice"):
        beam_options.pipeline_options(
            "extract", beam_options.BeamParams(options={"direct_running_mode": "multiprocessing"})
        )
    # A runner that passes unknown options on to its service (a Flink job server's Java options) only logs them.
    flink = beam_options.BeamParams(runner="FlinkRunner", options={"some_java_option": "x"})
    assert beam_options.pipeline_options("extract", flink).get_all_options()["runner"] == "FlinkRunner"
    # The short Dask name works from any source (Beam only knows the class's full name).
    monkeypatch.setenv(beam_options.ENV, "--runner=DaskRunner")
    assert beam_options.beam_args(beam_options.DIRECT)[-1] == "--runner=" + beam_options.QUALIFIED["DaskRunner"]
    monkeypatch.delenv(beam_options.ENV)
    params = tmp_path / "params.yaml"
    params.write_text("beam:\n  runner: SparkRuner\n  options: {}\n")
    with pytest.raises(ParamsError, match="beam.runner"):
        beam_options.load(params)
    params.write_text("convert: {}\n")
    assert beam_options.load(params) == beam_options.DIRECT  # no section: the DirectRunner
    dask = beam_options.BeamParams(runner="DaskRunner")
    # a bad param (the component's command says it in one line, exit 2), not a traceback (found by a review, 2026-12-06)
    with pytest.raises(ParamsError, match="convert cannot run on DaskRunner.*DirectRunner"):
        convert.run(convert.Config(convert.ConvertParams()), tmp_path / "nowhere", tmp_path / "out", runner=dask)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "words, runner",
    [
        ("--runner DirectRunner", "DirectRunner"),
        ("--runner=direct", "DirectRunner"),
        ("--runner=Direct", "DirectRunner"),
        ("--runner apache_beam.runners.direct.direct_runner.DirectRunner", "DirectRunner"),
        ("--runner dask", "DaskRunner"),
        ("--runner=flink", "FlinkRunner"),
        ("--runner mypkg.runners.DataflowRunner", "mypkg.runners.DataflowRunner"),  # one's own class: as given
        ("--runner mypkg.runners.DirectRunner", "mypkg.runners.DirectRunner"),  # named like a project runner
        ("--runner=mypkg.runners.DaskRunner", "mypkg.runners.DaskRunner"),
    ],
)
def test_every_spelling_of_a_runner_is_the_projects_runner_and_its_checks(monkeypatch, words, runner):
    """Only `--runner=DirectRunner` was rewritten: `--runner DirectRunner` or `direct` ran Beam's own DirectRunner
    (which tries Prism first), and its unknown options were only logged."""
    monkeypatch.setenv(beam_options.ENV, words + " --job_name=x")
    args = beam_options.beam_args(beam_options.DIRECT)
    assert args == [f"--runner={beam_options.QUALIFIED.get(runner, runner)}", "--job_name=x"]
    if runner in beam_options.STRICT:
        monkeypatch.setenv(beam_options.ENV, words + " --direct_num_wokers=2")
        with pytest.raises(ParamsError, match="unknown Beam option --direct_num_wokers"):
            beam_options.pipeline_options("extract", beam_options.DIRECT)
    if runner.startswith("mypkg."):  # not checked as the runner its class is named after (a review, 2026-12-07)
        monkeypatch.setenv(beam_options.ENV, words + " --my_option=1")
        for stage in ("convert", "extract"):
            beam_options.pipeline_options(stage, beam_options.DIRECT)


@pytest.mark.parametrize(
    "words, message",
    [
        ("--job_name='unclosed", r"TRANSFER_BEAM_ARGS: No closing quotation"),
        ("-h", r"-h is not a pipeline option"),
        # found by a review on 2026-12-06: Beam's own parser ran first, printed its help and exited 0 (the stage did
        # nothing) or printed its usage for a bad switch value, never naming the option; values Beam takes and then
        # fails on deep in the job (IndexError) or miscounts with
        ("-hh", r"-hh is not a pipeline option"),
        ("--help=x", r"--help=x is not a pipeline option"),
        ("--streaming=yes", r"beam: argument --streaming: ignored explicit argument 'yes'"),
        ("--direct_num_workers=-1", r"direct_num_workers -1: 0 \(one a core\) or more"),
        ("--direct_runner_bundle_repeat=1", r"direct_runner_bundle_repeat runs every bundle again"),
        # Beam's own option checks ran only at `beam.Pipeline`, once the stage was at work (a review, 2026-12-07)
        ("--direct_test_splits=[]", r"direct_test_splits is for Beam's own tests"),
        ("--type_check_additional=bogus", r"Unrecognized --type_check_additional feature: bogus"),
        (
            "--environment_type=LOOPBACK --environment_option=docker_container_image=x",
            r"not compatible with environment type LOOPBACK",
        ),
        ("--runner", r"--runner without a runner name"),
        ("--runner=Sprak", r"runner 'Sprak' is not one of DirectRunner, PortableRunner"),
        ("oops", r"'oops' is not a Beam option"),
        ("-direct_num_workers=2", r"'-direct_num_workers=2' is not a Beam option"),
    ],
)
def test_bad_beam_words_from_the_environment_are_clear_errors(monkeypatch, words, message):
    monkeypatch.setenv(beam_options.ENV, words)
    with pytest.raises(ParamsError, match=message):
        beam_options.pipeline_options("extract", beam_options.DIRECT)


def test_a_stage_a_runner_cannot_run_says_so_before_asking_for_its_packages(monkeypatch):
    """Without the dask extra, convert on Dask said to install dask and distributed, and refused the stage after."""

    def not_installed():
        raise beam_options.RunnerUnsupported("beam.runner DaskRunner needs dask and distributed: pip install ...")

    monkeypatch.setattr(beam_options, "_dask_runner", not_installed)
    with pytest.raises(beam_options.RunnerUnsupported, match="convert cannot run on DaskRunner"):
        beam_options.pipeline_options("convert", beam_options.BeamParams(runner="DaskRunner"))
    with pytest.raises(beam_options.RunnerUnsupported, match="needs dask and distributed"):
        beam_options.pipeline_options("extract", beam_options.BeamParams(runner="DaskRunner"))


@pytest.mark.parametrize("runner", ["FlinkRunner", "PortableRunner", "DataflowRunner"])
def test_a_stray_word_is_an_error_where_unknown_options_pass_on_too(monkeypatch, runner):
    """Only the Direct and Dask runners refused a stray word: on the others Beam dropped it with a log line (a
    mistyped `-parallelism=8` for Flink ran with the default parallelism)."""
    params = beam_options.BeamParams(runner=runner)
    for words in ("oops", "-parallelism=8", "--job_name=x stray"):
        monkeypatch.setenv(beam_options.ENV, words)
        with pytest.raises(ParamsError, match=r"is not a Beam option \(--name=value\)"):
            beam_options.pipeline_options("convert", params)
    # an unknown option's value given as the next word is no stray word there: Beam passes the pair on
    monkeypatch.setenv(beam_options.ENV, "--a_job_server_option value")
    options = beam_options.pipeline_options("convert", params)
    assert options.get_all_options(retain_unknown_options=True)["a_job_server_option"] == "value"


@pytest.mark.slow
@pytest.mark.integration
def test_workers_have_only_the_code_the_job_stages(request, tmp_path, tiny_base_weights, on_direct):
    """The portable runs above prove something: a job that stages no package fails on those workers."""
    converted = on_direct[0]
    runner = runner_params("portable", request)
    runner = runner.model_copy(update={"options": {k: v for k, v in runner.options.items() if k != "setup_file"}})
    base = BASE.model_copy(update={"weights": str(tiny_base_weights)})
    with pytest.raises(Exception, match="No module named 'pipelines'"):
        extract.run(extract.Config(base, extract.ExtractParams(batch_size=4)), converted, tmp_path / "e", runner=runner)


def test_the_direct_runner_never_hands_a_stage_to_prism(monkeypatch, tmp_path):
    # Beam's own DirectRunner tries the PrismRunner first, a binary it downloads at run time: online, the stages
    # would run on a runner no test covers. Record any such try (Beam falls back on an exception, so a raise
    # could not fail this test).
    from apache_beam.runners.portability import prism_runner

    tried, round_trips = [], []
    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", lambda *args: tried.append(args) or 1 / 0)
    # Nor does the pipeline take the runner-API round trip Beam skips for its own DirectRunner (by class name).
    real = beam.Pipeline.from_runner_api
    monkeypatch.setattr(
        beam.Pipeline, "from_runner_api", staticmethod(lambda *a, **k: round_trips.append(1) or real(*a, **k))
    )
    monkeypatch.delenv(beam_options.ENV, raising=False)
    options = beam_options.pipeline_options("convert", beam_options.DIRECT)
    assert options.get_all_options()["runner"] == beam_options.QUALIFIED["DirectRunner"]
    with beam.Pipeline(options=options) as pipeline:
        _ = pipeline | beam.Create([1, 2, 3]) | beam.Map(lambda x: x * 2) | beam.io.WriteToText(str(tmp_path / "out"))
    assert sorted(int(line) for f in tmp_path.glob("out*") for line in f.read_text().split()) == [2, 4, 6]
    assert tried == [] and round_trips == []
