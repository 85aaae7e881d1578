"""constraints.txt pins every package the project's extras bring in, however deep: an unpinned one is whatever
the registry holds on the day of the install, and a rebuild (README, *Versions*) could not get the same tree."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[normalised(name)] = version.strip()
    return pins


def required_tree(root: str) -> tuple[set[str], set[str]]:
    """(every distribution the root's requirements, with all its extras, bring in where installed, walked through
    installed distributions; those required but not installed here, which cannot be walked further)."""
    root_dist = metadata.distribution(root)
    extras = root_dist.metadata.get_all("Provides-Extra") or []
    seen, absent, todo = set(), set(), [(root_dist, tuple(extras))]
    while todo:
        dist, wanted = todo.pop()
        for text in dist.requires or []:
            requirement = Requirement(text)
            environments = [{"extra": extra} for extra in wanted] or [{"extra": ""}]
            if requirement.marker and not any(requirement.marker.evaluate(env) for env in environments):
                continue
            name = normalised(requirement.name)
            try:
                found = metadata.distribution(requirement.name)
            except metadata.PackageNotFoundError:
                absent.add(name)
                continue
            key = (name, tuple(sorted(requirement.extras)))
            if key not in seen:
                seen.add(key)
                todo.append((found, tuple(requirement.extras)))
    return {name for name, _ in seen}, absent


def test_every_package_the_extras_bring_in_is_pinned():
    installed, absent = required_tree("transfer-pipeline")
    pins = pinned()
    assert {"tensorflow", "apache-beam", "dvc", "pytest"} <= installed  # the walk reached the tree
    # every extra is installed by the dev extra, so the walk sees every tree: a package it could not walk (the
    # bucket remotes', before the dev extra installed them) has a tree whose pins nothing checks
    assert not absent, f"not installed, so their requirements were not walked: {sorted(absent)}"
    unpinned = sorted((installed | absent) - set(pins))
    assert not unpinned, f"constraints.txt does not pin {unpinned}"
    drifted = sorted(n for n in installed if metadata.version(n) != pins[n] and normalised(n) == n)
    assert not drifted, {n: (metadata.version(n), pins[n]) for n in drifted}


def test_the_dev_extra_installs_every_other_extras_packages():
    """So that the walk above, on a dev install (CI's), reaches every extra's tree."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    missing = {name: sorted(set(wanted) - set(extras["dev"])) for name, wanted in extras.items()}
    assert not {name: left for name, left in missing.items() if left}
