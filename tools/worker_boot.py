#!/usr/bin/env python
"""A Beam SDK worker's boot, as a cluster's worker container runs it: the project's code comes from the job.

Beam's Python SDK container starts each worker with ``/opt/apache/beam/boot``: it asks the runner's
provision service for the job's options and staged artifacts, fetches them from the artifact service,
``pip install``s what the job staged (``--setup_file``'s source package, ``workflow.tar.gz``) and then
runs the SDK harness. Flink's and Spark's task managers, and Dataflow's VMs, start workers that way, so a
job reaches them with only what it staged. This is that boot for a worker pool without containers
(``python -m apache_beam.runners.worker.worker_pool_main --container_executable=BOOT``, where BOOT
runs this file), so the tests run convert and extract on workers whose code comes from
``--setup_file`` alone:

- the staged packages are installed, without their dependencies (the worker's environment has them, as
  a cluster's SDK image does) and without the network, into a folder of their own, first on
  ``sys.path``;
- an editable install of the project in the worker's environment (the ``pip install -e .`` of a
  developer's checkout) is switched off, so a job that staged nothing fails on its workers instead of
  quietly importing the launcher's checkout.

Run as a file (``python tools/worker_boot.py --id=... --provision_endpoint=... ...``, the arguments the
worker pool passes), never as ``-m``: that would put the working directory on the path. It imports
nothing from the project.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STAGED_PACKAGE = "workflow.tar.gz"  # what Beam's stager names --setup_file's source package
STAGING_TO_URN = "beam:artifact:role:staging_to:v1"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("id", "logging_endpoint", "artifact_endpoint", "provision_endpoint", "control_endpoint"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--semi_persistent_directory", default=None)
    return parser.parse_args(argv)


def fetch_artifacts(args: argparse.Namespace, folder: Path) -> tuple[dict, list[Path]]:
    """The job's pipeline options and its staged files, written under `folder`."""
    import grpc
    from apache_beam.portability.api import (
        beam_artifact_api_pb2,
        beam_artifact_api_pb2_grpc,
        beam_provision_api_pb2,
        beam_provision_api_pb2_grpc,
        beam_runner_api_pb2,
    )
    from google.protobuf import json_format

    metadata = [("worker_id", args.id)]
    with grpc.insecure_channel(args.provision_endpoint) as channel:
        info = (
            beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
            .GetProvisionInfo(beam_provision_api_pb2.GetProvisionInfoRequest(), metadata=metadata)
            .info
        )
    options = json_format.MessageToDict(info.pipeline_options)
    files = []
    with grpc.insecure_channel(args.artifact_endpoint) as channel:
        stub = beam_artifact_api_pb2_grpc.ArtifactRetrievalServiceStub(channel)
        for artifact in info.dependencies:
            if artifact.role_urn != STAGING_TO_URN:
                continue
            name = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(artifact.role_payload).staged_name
            path = folder / Path(name).name
            with open(path, "wb") as f:
                for chunk in stub.GetArtifact(
                    beam_artifact_api_pb2.GetArtifactRequest(artifact=artifact), metadata=metadata
                ):
                    f.write(chunk.data)
            files.append(path)
    return options, files


def install(package: Path, target: Path) -> None:
    """pip install a staged source package into `target`: no dependencies, no index, no build isolation."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation"]
        + ["--disable-pip-version-check", "--target", str(target), str(package)],
        check=True,
        stdout=sys.stderr,
    )


def without_editable_installs() -> None:
    """Drop setuptools' editable-install finders: the job's staged code, or nothing, is what workers import."""
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    work = Path(args.semi_persistent_directory or tempfile.mkdtemp(prefix=f"beam-worker-{args.id}-"))
    staged, site = work / "staged", work / "site-packages"
    staged.mkdir(parents=True, exist_ok=True)
    options, files = fetch_artifacts(args, staged)
    for path in files:
        if path.name == STAGED_PACKAGE:
            install(path, site)
    without_editable_installs()
    sys.path.insert(0, str(site))
    os.environ.update(
        {
            "WORKER_ID": args.id,
            "PIPELINE_OPTIONS": json.dumps(options),
            "SEMI_PERSISTENT_DIRECTORY": str(work),
            "LOGGING_API_SERVICE_DESCRIPTOR": f'url: "{args.logging_endpoint}"',
            "CONTROL_API_SERVICE_DESCRIPTOR": f'url: "{args.control_endpoint}"',
        }
    )
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
