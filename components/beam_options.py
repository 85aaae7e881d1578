"""The `beam` params section: the runner the Beam stages (convert, extract) run on, and its options.

    beam:
      runner: DirectRunner          # or PortableRunner, FlinkRunner, SparkRunner, DataflowRunner, DaskRunner
      options: {direct_running_mode: multi_processing, direct_num_workers: 2}

Each option becomes ``--name=value`` for Beam's ``PipelineOptions`` (``true``:
``--name``; ``false``: ``--no_name`` where Beam has it, left out for a switch that is off by
default, an error otherwise), after ``--runner``. Then come, in this order,
the shell words of the environment variable ``TRANSFER_BEAM_ARGS`` (a
per-machine override that no versioned file holds) and the stage's own
command-line Beam arguments. Beam takes the last of a repeated single-valued
flag; list flags (``experiments``, ``environment_options``) add up.

The runner does not change what a stage computes: convert and extract write
byte-identical outputs on every runner the tests run them on. So `beam` is no
stage's DVC param (dvc.yaml lists none), its values never enter a stage's
``params.json``, and changing it re-runs nothing; ``dvc repro -f -s extract``
runs a stage again on the new runner. Unlike the hyper-parameter sections, a
missing `beam` section means the DirectRunner.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
from pathlib import Path
from typing import Literal, Sequence

import pydantic
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    _BeamArgumentParser,
    _CommaSeparatedListAction,  # Beam's `experiments`: its values add up
)
from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
from apache_beam.runners.direct import direct_runner

from components.params import ParamsError, Section, did_you_mean, read_params, section

log = logging.getLogger(__name__)

ENV = "TRANSFER_BEAM_ARGS"
Runner = Literal["DirectRunner", "PortableRunner", "FlinkRunner", "SparkRunner", "DataflowRunner", "DaskRunner"]
# What each stage cannot run on, and why: checked before any work.
UNSUPPORTED = {
    "convert": {
        # Tried (Beam 2.77, dask 2026.8): building the Dask graph of tf.Transform's analysis fails inside Beam
        # (dask/transform_evaluator.py: a window assignment gets no input bag).
        "DaskRunner": "Beam's DaskRunner cannot translate tf.Transform's analysis (the label vocabulary)",
    },
}
# Runners whose unknown options are errors (the others pass unknown options on to their service).
STRICT = ("DirectRunner", "DaskRunner")
# Runners Beam does not know by their short name, and the DirectRunner, which is this module's (below).
QUALIFIED = {
    "DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner",
    "DirectRunner": f"{__name__}.DirectRunner",
}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class RunnerUnsupported(ParamsError):
    """The stage cannot run on the chosen runner (`beam.runner`): a bad param, said in one line before any work."""


class BeamParams(Section):
    runner: Runner = "DirectRunner"
    options: dict[str, str | int | float | bool | list[str | int | float]] = {}  # a list: a list flag's values

    @pydantic.field_validator("options")
    @classmethod
    def _names(cls, options: dict) -> dict:
        for name in options:
            if not _NAME.match(name):
                raise ValueError(f"option {name!r}: a Beam option's name as in --name=value, without the dashes")
        return options


DIRECT = BeamParams()  # the default: the DirectRunner in this process


class SwitchingDirectRunner(direct_runner.SwitchingDirectRunner):
    """Beam's DirectRunner for batch pipelines, without its first try on the PrismRunner.

    Beam's DirectRunner first hands a pipeline to Prism, a Go binary it downloads from GitHub at run
    time, and falls back to its own FnApiRunner when that fails. So on a machine with network access
    the stages would run on a runner no test here covers (each run beginning with a download), and on
    one without they wait for the download to fail first: at once where there is no route, for the
    connection's time-out behind a firewall that drops packets. `beam.runner: DirectRunner` means this
    class: what Beam's runner falls back to, the FnApiRunner, given the pipeline options as Beam gives
    them (``direct_running_mode`` and ``direct_num_workers`` work as before), always.
    """

    def run_pipeline(self, pipeline, options):
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        from apache_beam.runners.portability.portable_runner import JobServiceHandle

        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        provision = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
        return fn_runner.FnApiRunner(provision_info=provision).run_pipeline(pipeline, options)


# Beam's Pipeline.run skips a round trip through the runner API only for a class named SwitchingDirectRunner
# (Beam's own DirectRunner is that name too): the class keeps the name, `beam.runner: DirectRunner` this alias.
DirectRunner = SwitchingDirectRunner


def _dask_runner():
    # Imported on use: dask and distributed are an extra (pip install -c constraints.txt -e ".[dask]").
    try:
        from apache_beam.runners.dask import dask_runner
    except ImportError:
        raise RunnerUnsupported(
            "beam.runner DaskRunner needs dask and distributed: pip install -c constraints.txt -e '.[dask]'"
        ) from None
    return dask_runner


def load(params_path: str | Path) -> BeamParams:
    data = read_params(params_path)
    return section(data, BeamParams, "beam", params_path) if "beam" in data else BeamParams()


def _option_parser() -> "_StrictParser":
    """A parser of every registered Beam option class, as PipelineOptions parses."""
    parser = _StrictParser(allow_abbrev=False, add_help=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    return parser


def _switched_off(name: str, parser: "_StrictParser") -> list[str]:
    """The arguments that set a switch option `name` to false: ``--no_name`` where Beam has it, nothing where the
    switch is off unless given; an error where false cannot be said (it would be dropped without a word)."""
    actions = parser._option_string_actions
    if f"--no_{name}" in actions:
        return [f"--no_{name}"]
    action = actions.get(f"--{name}")
    if action is not None and action.nargs == 0 and action.default is False:
        return []
    raise ParamsError(
        f"beam.options.{name}: false cannot be passed to Beam "
        + ("(no such option)" if action is None else "(it has no --no_ form and its default is not off)")
        + "; leave the option out, or give it a value"
    )


def _switched_on(name: str, parser: "_StrictParser") -> list[str]:
    """The arguments that set a switch option `name` to true: ``--name``, or nothing where Beam has only
    ``--no_name`` and true is its default (``pipeline_type_check``); unknown names go on to the unknown-option
    check as ``--name``."""
    actions = parser._option_string_actions
    negative = actions.get(f"--no_{name}")
    if f"--{name}" not in actions and negative is not None and negative.dest == name and negative.default is True:
        return []
    return [f"--{name}"]


def _listed(name: str, values: list, parser: "_StrictParser") -> list[str]:
    """A list flag's values (``experiments: [a, b]``), one ``--name=value`` each; refused for a single-valued flag,
    where only the last would count."""
    action = parser._option_string_actions.get(f"--{name}")
    adds_up = isinstance(action, (argparse._AppendAction, argparse._ExtendAction, _CommaSeparatedListAction))
    if action is not None and not adds_up:
        raise ParamsError(f"beam.options.{name}: a list, but --{name} takes one value")
    return [f"--{name}={value}" for value in values]


def beam_args(params: BeamParams, extra: Sequence[str] = (), environ: dict | None = None) -> list[str]:
    """The Beam command line: params first, then TRANSFER_BEAM_ARGS, then the stage's own arguments; the runner
    they name last (in any spelling Beam takes) as one ``--runner=`` first, under the name Beam finds it by."""
    args = []
    special = any(isinstance(value, (bool, list)) for value in params.options.values())
    parser = _option_parser() if special else None
    for name, value in sorted(params.options.items()):
        if value is True:
            args += _switched_on(name, parser)
        elif value is False:
            args += _switched_off(name, parser)
        elif isinstance(value, list):
            args += _listed(name, value, parser)
        else:
            args.append(f"--{name}={value}")
    words = (environ if environ is not None else os.environ).get(ENV, "")
    try:
        args += shlex.split(words)
    except ValueError as exc:
        raise ParamsError(f"{ENV}: {exc} in {words!r} (shell words, as on a command line)") from None
    args += list(extra)
    for arg in args:
        # Beam would print its help and exit 0, the stage having done nothing (`-hh` too: argparse's short flags)
        if arg.startswith("-h") or arg.partition("=")[0] == "--help":
            raise ParamsError(f"beam: {arg} is not a pipeline option (from {ENV} or the stage's command line)")
    runner, args = _take_runner(args, params.runner)
    return [f"--runner={QUALIFIED.get(runner, runner)}", *args]


# Every spelling Beam's create_runner takes for a runner (the class name in any case, with or without "Runner",
# or its full dotted name): Beam would run its own DirectRunner (which tries Prism first) for `direct` or
# `--runner DirectRunner`, and the unknown-option check would not know the runner.
_RUNNER_NAMES = {
    **{name.lower(): name for name in Runner.__args__},
    **{name.lower().removesuffix("runner"): name for name in Runner.__args__},
    "switchingdirectrunner": "DirectRunner",
    "switchingdirect": "DirectRunner",
}


def _runner_name(value: str) -> str:
    """The runner's name in `Runner`; a dotted name outside Beam and this module (a runner class of one's own)
    as given: Beam loads it, and the checks here do not know it."""
    if "." in value and not value.startswith(("apache_beam.", f"{__name__}.")):
        log.warning("beam: runner %s is not one the project knows: its options are not checked", value)
        return value
    name = _RUNNER_NAMES.get(value.rsplit(".", 1)[-1].lower())
    if name is None:
        raise ParamsError(f"beam: runner {value!r} is not one of {', '.join(Runner.__args__)} (or a dotted class name)")
    return name


def _take_runner(args: Sequence[str], default: str) -> tuple[str, list[str]]:
    """(the runner the arguments name last, else `default`; the arguments without any runner flag)."""
    runner, rest, words = default, [], iter(args)
    for arg in words:
        if arg == "--runner":
            value = next(words, None)
            if value is None or value.startswith("-"):
                raise ParamsError("beam: --runner without a runner name")
            runner = _runner_name(value)
        elif arg.startswith("--runner="):
            runner = _runner_name(arg.partition("=")[2])
        else:
            rest.append(arg)
    return runner, rest


def _value_of_unknown(word: str, args: Sequence[str], unknown: Sequence[str]) -> bool:
    """Whether `word` follows, in `args`, an unknown flag given without `=` (Beam takes the word as its value)."""
    return any(
        arg == word and i > 0 and args[i - 1].startswith("--") and "=" not in args[i - 1] and args[i - 1] in unknown
        for i, arg in enumerate(args)
    )


class _StrictParser(_BeamArgumentParser):
    def error(self, message):  # argparse would print its usage and exit
        raise ParamsError(f"beam: {message}")


def pipeline_options(stage: str, params: BeamParams, extra: Sequence[str] = ()) -> PipelineOptions:
    """PipelineOptions for `stage`; a bad option or a runner the stage cannot use is an error before any work.

    Unknown options are errors on the runners that run here (Direct, Dask); the others pass them on (Java
    options of a Flink or Spark job server, Dataflow's service options), so there they are only logged.
    """
    args = beam_args(params, extra)
    # `beam_args` puts the runner first; not Beam's parser, which prints its usage and exits on a bad value (the
    # strict parser below says which option)
    # the runner as `_runner_name` resolved it: one's own class stays its dotted name, unchecked, whatever its class
    # is called (`mypkg.runners.DaskRunner` was refused as Beam's DaskRunner; a review on 2026-12-07)
    given = args[0].partition("=")[2]
    runner = {qualified: name for name, qualified in QUALIFIED.items()}.get(given, given)
    why = UNSUPPORTED.get(stage, {}).get(runner)
    if why:  # first: installing what the runner needs would not help (a review on 2026-12-07)
        works = [r for r in Runner.__args__ if r not in UNSUPPORTED.get(stage, {})]
        raise RunnerUnsupported(f"{stage} cannot run on {runner}: {why}; the runners it runs on: {', '.join(works)}")
    if runner == "DaskRunner":
        _dask_runner()  # registers the Dask options
    parser = _option_parser()
    _, unknown = parser.parse_known_args(args)
    flags = [f.lstrip("-") for f in parser._option_string_actions if f.startswith("--")]
    for arg in unknown:
        # a stray word, or a single-dash one, which Beam drops with a log line: an error on every runner, but where
        # unknown options pass on, the value of an unknown `--name value` (Beam keeps such pairs)
        if not arg.startswith("--") and (runner in STRICT or not _value_of_unknown(arg, args, unknown)):
            raise ParamsError(f"beam: {arg!r} is not a Beam option (--name=value)")
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            message = (
                f"beam: unknown Beam option --{name}{did_you_mean(name, flags, n=3, cutoff=0.7)}; "
                "options are Beam's PipelineOptions flags without the dashes"
            )
            if runner in STRICT:
                raise ParamsError(message)
            log.warning("%s (not checked on %s: its job service takes or ignores it)", message, runner)
    options = PipelineOptions(args)
    direct = options.view_as(DirectOptions)
    if direct.direct_num_workers < 0:  # Beam's FnApiRunner fails deep in the job (IndexError)
        raise ParamsError(f"beam: direct_num_workers {direct.direct_num_workers}: 0 (one a core) or more")
    if direct.direct_runner_bundle_repeat:  # a profiling option: each bundle runs again, and the counts are wrong
        raise ParamsError("beam: direct_runner_bundle_repeat runs every bundle again (profiling): leave it out")
    if direct.direct_test_splits != {}:  # Beam's own tests' option: it sends split requests into the job (a review)
        raise ParamsError("beam: direct_test_splits is for Beam's own tests (it splits bundles): leave it out")
    # Beam's own checks of the options, which `beam.Pipeline` ran only once the stage was at work (a bad
    # --type_check_additional, environment options a LOOPBACK environment cannot take: a review on 2026-12-07);
    # on a copy, as they may fill in defaults. Without a runner object: a service's own checks (Dataflow's project
    # and buckets) still come when the job starts.
    errors = PipelineOptionsValidator(PipelineOptions(args), None).validate()
    if errors:
        raise ParamsError("beam: " + "; ".join(" ".join(str(error).split()) for error in errors))
    return options
