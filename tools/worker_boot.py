#!/usr/bin/env python
"""A Beam SDK worker's boot, as a cluster's worker container runs it: the project's code comes from the job.

Beam's Python SDK container starts each worker with ``/opt/apache/beam/boot``: it asks the runner's
provision service for the job's options and staged artifacts, fetches them from the artifact service,
``pip install``s what the job staged and then runs the SDK harness. Flink's and Spark's task managers, and
Dataflow's VMs, start workers that way, so a job reaches them with only what it staged. This is that boot
for a worker pool without containers (``python -m apache_beam.runners.worker.worker_pool_main
--container_executable=tools/worker_boot.py``), so the tests run convert and extract on workers whose
code comes from ``--setup_file`` alone:

- every staged file is fetched into the worker's folder (``staged/``, where the harness also finds a
  pickled main session); installed from it, into a folder of the worker's own (``site-packages/``, first
  on ``sys.path``), without the network, in the order Beam's boot does: ``requirements.txt``
  (``--requirements_file``; what the worker's environment already satisfies is left out, as pip does in
  Beam's boot; the rest and its dependencies from the staged files only), then the packages
  ``extra_packages.txt`` names (``--extra_package``), then ``--setup_file``'s source package (``workflow.tar.gz``) without its dependencies (the
  worker's environment has them, as a cluster's SDK image does); other staged files are not installed
  (the SDK's own tarball or wheels: the worker runs its environment's Beam);
- an artifact in a role other than "stage to a name" stops the boot, naming the role;
- an editable install of the project in the worker's environment (the ``pip install -e .`` of a
  developer's checkout) is switched off, and this file's folder is taken off ``sys.path``, so a job that
  staged nothing fails on its workers instead of quietly importing the launcher's checkout;
- when fetching or installing fails, the error goes to stderr and the harness starts anyway: the job then
  fails with the import error, where a worker that never connects would leave it waiting forever.

Run as a file (``python tools/worker_boot.py --id=... --provision_endpoint=... ...``, the arguments the
worker pool passes; it is executable), never as ``-m``: that would put the working directory on the path.
It imports nothing from the project. Each worker's folder is removed when its harness returns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# What Beam's stager names the files it stages (apache_beam/runners/portability/stager.py).
STAGED_PACKAGE = "workflow.tar.gz"  # --setup_file's source package
REQUIREMENTS = "requirements.txt"  # --requirements_file
EXTRA_PACKAGES = "extra_packages.txt"  # --extra_package: one staged file name a line
STAGING_TO_URN = "beam:artifact:role:staging_to:v1"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("id", "logging_endpoint", "artifact_endpoint", "provision_endpoint", "control_endpoint"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--semi_persistent_directory", default=None)
    return parser.parse_args(argv)


def fetch_artifacts(args: argparse.Namespace, folder: Path):
    """The job's provision info, with its staged files written under `folder`."""
    import grpc
    from apache_beam.portability.api import (
        beam_artifact_api_pb2,
        beam_artifact_api_pb2_grpc,
        beam_provision_api_pb2,
        beam_provision_api_pb2_grpc,
        beam_runner_api_pb2,
    )

    metadata = [("worker_id", args.id)]
    with grpc.insecure_channel(args.provision_endpoint) as channel:
        info = (
            beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
            .GetProvisionInfo(beam_provision_api_pb2.GetProvisionInfoRequest(), metadata=metadata)
            .info
        )
    with grpc.insecure_channel(args.artifact_endpoint) as channel:
        stub = beam_artifact_api_pb2_grpc.ArtifactRetrievalServiceStub(channel)
        for artifact in info.dependencies:
            if artifact.role_urn != STAGING_TO_URN:
                raise RuntimeError(
                    f"worker_boot: a staged artifact in the role {artifact.role_urn!r}, which it cannot place"
                )
            name = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(artifact.role_payload).staged_name
            with open(folder / Path(name).name, "wb") as f:
                for chunk in stub.GetArtifact(
                    beam_artifact_api_pb2.GetArtifactRequest(artifact=artifact), metadata=metadata
                ):
                    f.write(chunk.data)
    return info


def pip_install(target: Path, staged: Path, *what: str, deps: bool = False) -> None:
    """pip install into `target` from the staged files only: no index, no build isolation."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-build-isolation"]
        + ["--disable-pip-version-check", "--find-links", str(staged), "--target", str(target)]
        + ([] if deps else ["--no-deps"])
        + list(what),
        check=True,
        stdout=sys.stderr,
    )


def unsatisfied(requirements: str) -> list[str]:
    """The requirement lines the worker's environment does not satisfy already. Beam's boot installs the
    requirements into the worker's environment, where pip counts an installed package as satisfied; this boot
    installs into a folder of its own (`--target`), where pip would look for every one among the staged files."""
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement

    wanted = []
    for line in requirements.splitlines():
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            requirement = Requirement(text)
            installed = metadata.version(requirement.name)
        except (InvalidRequirement, metadata.PackageNotFoundError):
            wanted.append(text)  # an option line (-e, --hash) or a package not here: pip decides
            continue
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        if not requirement.specifier.contains(installed, prereleases=True) or not extras_installed(requirement):
            wanted.append(text)
    return wanted


def extras_installed(requirement, seen: frozenset = frozenset()) -> bool:
    """Whether what `pkg[extra]` adds to `pkg` is installed too (its dependencies whose marker names the extra,
    at a version each takes, and their own extras': `dvc[all]` is `dvc[ssh,...]`): `pkg` alone counted as
    `pkg[extra]` (a review on 2026-12-07). Anything it cannot read is not installed: pip decides."""
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement

    seen = seen | {(requirement.name.lower(), frozenset(requirement.extras))}  # `dvc[all]` names dvc[ssh,...]
    try:
        for text in metadata.requires(requirement.name) or []:
            dependency = Requirement(text)
            if dependency.marker is None or not any(
                dependency.marker.evaluate({"extra": extra}) for extra in requirement.extras
            ):
                continue  # `pkg`'s own, or another extra's
            installed = metadata.version(dependency.name)
            if not dependency.specifier.contains(installed, prereleases=True):
                return False
            key = (dependency.name.lower(), frozenset(dependency.extras))
            if dependency.extras and key not in seen and not extras_installed(dependency, seen):
                return False
    except (InvalidRequirement, metadata.PackageNotFoundError):
        return False
    return True


def install_staged(staged: Path, target: Path) -> None:
    """What the job staged, in the order Beam's boot installs it (boot.go's installSetupPackages): the
    requirements, the extra packages, then the workflow's source package."""
    if (staged / REQUIREMENTS).exists():
        wanted = unsatisfied((staged / REQUIREMENTS).read_text())
        if wanted:
            listed = target.parent / f".{target.name}.requirements.txt"
            listed.write_text("\n".join(wanted) + "\n")
            pip_install(target, staged, "-r", str(listed), deps=True)
    extra = staged / EXTRA_PACKAGES
    if extra.exists():
        names = [line.strip() for line in extra.read_text().splitlines() if line.strip()]
        if names:
            pip_install(target, staged, *(str(staged / name) for name in names))
    if (staged / STAGED_PACKAGE).exists():
        pip_install(target, staged, str(staged / STAGED_PACKAGE))


def without_the_checkout() -> None:
    """Drop setuptools' editable-install finders and this file's folder (a checkout's tools/) from the
    import machinery: the job's staged code, or nothing, is what the worker imports."""
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != here]


def work_folder(worker_id: str, semi_persistent_directory: str | None) -> Path:
    """A new folder for this boot's staged files and installs, inside the semi-persistent directory when one is
    given: that directory outlives the worker, and `pip install --target` into a site-packages an earlier job
    filled keeps that job's code (a review on 2026-12-07), as its staged folder kept its files."""
    if semi_persistent_directory is not None:
        os.makedirs(semi_persistent_directory, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"beam-worker-{worker_id}-", dir=semi_persistent_directory))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    without_the_checkout()
    work = work_folder(args.id, args.semi_persistent_directory)
    staged, site = work / "staged", work / "site-packages"
    staged.mkdir(parents=True, exist_ok=True)
    environment = {
        "WORKER_ID": args.id,
        "SEMI_PERSISTENT_DIRECTORY": str(work),
        "LOGGING_API_SERVICE_DESCRIPTOR": f'url: "{args.logging_endpoint}"',
        "CONTROL_API_SERVICE_DESCRIPTOR": f'url: "{args.control_endpoint}"',
    }
    try:
        from google.protobuf import json_format

        info = fetch_artifacts(args, staged)
        environment["PIPELINE_OPTIONS"] = json.dumps(json_format.MessageToDict(info.pipeline_options))
        environment["RUNNER_CAPABILITIES"] = " ".join(info.runner_capabilities)
        if info.HasField("status_endpoint"):
            environment["STATUS_API_SERVICE_DESCRIPTOR"] = f'url: "{info.status_endpoint.url}"'
        install_staged(staged, site)
    except Exception:  # the harness still starts: the job fails on what is missing instead of waiting
        print(f"worker_boot: preparing worker {args.id} failed:\n{traceback.format_exc()}", file=sys.stderr)
    sys.path.insert(0, str(site))
    os.environ.update(environment)
    from apache_beam.runners.worker import sdk_worker_main

    try:
        sdk_worker_main.main([])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
