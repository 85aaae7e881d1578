"""The command-line runner every component's ``__main__`` goes through.

Errors in params or environment (`ParamsError`, `OfflineError`) print one clear
line and exit 2; other failures print their traceback and exit 1.

The process then exits without interpreter finalisation: once a Beam or
tf.Transform pipeline has run, protobuf's upb extension (6.31 and newer, which
TensorFlow 2.21 requires) can segfault while garbage-collecting at shutdown
(protocolbuffers/protobuf#22067), turning a finished stage into exit code 139.
Every output is closed and moved into place before `main` returns, so nothing
is lost by skipping finalisation.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
from typing import Callable, NoReturn

from components.params import ParamsError


class EnvironmentProblem(RuntimeError):
    """Something outside the params stops the stage (no network, missing files); the message says what to do."""


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging() -> None:
    """The stages' log format, on stderr (DVC shows it as the stage runs)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def sh(*cmd: str, cwd) -> str:
    """Run a command (git, dvc, ...); its stdout, or a RuntimeError with the end of its output."""
    result = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr[-2000:] or result.stdout[-2000:]}"
        )
    return result.stdout


def venv_env() -> dict[str, str]:
    """This environment with this interpreter's folder first on PATH, so that the stages' bare `python` is this
    one (DVC runs a stage's command through the shell; cron's PATH has no virtualenv)."""
    return dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}")


def dvc(*args: str, cwd, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m dvc ARGS` with this interpreter, its virtualenv first on PATH (so the stages' `python`
    is this one); with `check`, a failure is a RuntimeError with the end of its output."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, env=venv_env(), capture_output=True, text=True
    )
    if check and result.returncode != 0:
        tail = (result.stderr or result.stdout)[-2000:]
        raise RuntimeError(f"dvc {' '.join(args)} failed ({result.returncode}) in {cwd}: {tail}")
    return result


def run_main(main: Callable[[], int | None]) -> NoReturn:
    try:
        code = main() or 0
    except SystemExit as exc:  # argparse, or SystemExit("message")
        if isinstance(exc.code, str):
            print(f"error: {exc.code}", file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except (ParamsError, EnvironmentProblem) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except BaseException as exc:  # noqa: BLE001 - report, then exit non-zero
        if getattr(exc, "user_facing", False):  # a lower layer's error that says what to do (pipelines.runtimes)
            print(f"error: {exc}", file=sys.stderr)
            code = 2
        else:
            traceback.print_exc()
            code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
