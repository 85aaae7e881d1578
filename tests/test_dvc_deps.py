"""dvc.yaml's deps name every project file each stage's code imports, directly or transitively.

An import DVC does not know of is an edit that does not re-run the stage: `dvc status`
would say all is up to date while the stage's code changed. Imports are read from the
source (module level and inside functions), so a new import fails this test until
dvc.yaml lists the file. Likewise every params section a stage's code reads must be in
its `params:` (but `beam`, which never changes an output byte).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "pipelines")


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    path = REPO.joinpath(*parts).with_suffix(".py")
    if path.is_file():
        return path
    package = REPO.joinpath(*parts, "__init__.py")
    return package if package.is_file() else None


def imported_modules(path: Path) -> set[str]:
    """Project modules a file imports anywhere in it (`from pkg import mod` counts mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if module_file(name)}


def closure(module: str) -> set[Path]:
    seen, todo = set(), [module]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += imported_modules(path)
    return {p for p in seen if not docstring_only(p)}


def docstring_only(path: Path) -> bool:
    """A package's __init__ that holds only its docstring changes no behaviour."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return path.name == "__init__.py" and all(
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body
    )


def stage_module(cmd: str) -> str:
    match = re.search(r"python -m (components\.\w+)", cmd)
    assert match, cmd
    return match.group(1)


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_imported_project_file_is_a_dependency(stage):
    entry = STAGES[stage]
    deps = {d for d in entry["deps"] if not d.startswith("$")}
    needed = {p.relative_to(REPO).as_posix() for p in closure(stage_module(entry["cmd"]))}
    missing = sorted(n for n in needed if n not in deps)
    assert not missing, f"dvc.yaml stage {stage} imports {missing} but does not depend on them"


# Sections a stage reads that dvc.yaml leaves out on purpose: the Beam runner and its options change where a job
# runs, never an output byte (tests/test_runners.py), so choosing another runner must not re-run the stage.
UNLISTED_ON_PURPOSE = {"beam"}


def sections_read(path: Path) -> set[str]:
    """The params sections a module reads: the string arguments of its section() and load_section() calls."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
            "section",
            "load_section",
        ):
            found |= {
                a.value
                for a in node.args
                if isinstance(a, ast.Constant) and isinstance(a.value, str) and not a.value.endswith(".yaml")
            }
    return found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_params_section_a_stage_reads_is_listed(stage):
    """A section the code reads but dvc.yaml does not list is a param whose change leaves the stage's outputs
    standing, stale, with `dvc status` clean; deps above are checked from the imports, these from the reads."""
    entry = STAGES[stage]
    read = set().union(*(sections_read(p) for p in closure(stage_module(entry["cmd"]))))
    listed = {key.split(".")[0] for key in entry.get("params", [])}
    assert read, f"found no section read by stage {stage}: the reader is broken"
    unlisted = sorted(read - listed - UNLISTED_ON_PURPOSE)
    assert not unlisted, f"dvc.yaml stage {stage} reads the params sections {unlisted} but does not list them"


def test_the_sections_reader_finds_what_a_stage_reads():
    assert set().union(*(sections_read(p) for p in closure("components.finetune"))) == {
        "common",
        "conv_base",
        "finetune",
    }
    assert "beam" in set().union(*(sections_read(p) for p in closure("components.extract")))


def test_the_import_reader_follows_imports_inside_functions():
    # components/evaluate.py imports pipelines modules inside run(): they must be found
    assert "pipelines.serving" in imported_modules(REPO / "components" / "evaluate.py")
    assert REPO / "pipelines" / "image.py" in closure("components.download")


def test_stage_modules_are_leaves():
    """No stage imports another stage: what two stages share lives in a module named for what it holds."""
    stages = {stage_module(entry["cmd"]) for entry in STAGES.values()}
    for module in sorted(stages):
        others = {m for m in imported_modules(module_file(module)) if m in stages and m != module}
        assert not others, f"{module} imports the stage module(s) {sorted(others)}"


def test_every_stage_that_can_be_run_cached_is():
    """DVC saves and restores no run-cache entry for a stage with an output `cache: false` that is no metric or plot
    (`Stage.run`: `run_cache=... and not no_cache_outs`), nor for one with a `persist` output (`_can_hash`). Such a
    stage trains again where its inputs and params recur: the same params queued or run again as an experiment, a
    retrain whose data came back. Only download and base_weights persist (their own caches do that work)."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        no_run_cache = {
            stage.addressing
            for stage in repo.index.stages
            if any(out.persist or not (out.use_cache or out.is_metric or out.is_plot) for out in stage.outs)
        }
    assert no_run_cache == {"download", "base_weights"}, no_run_cache


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_lists_the_beam_section(stage):
    """The README promises that switching runners re-runs nothing: `beam` (or a key of it) among a stage's `params:`
    would make every runner change a new run of convert and extract."""
    listed = [key for key in STAGES[stage].get("params", []) if str(key).split(".")[0] in UNLISTED_ON_PURPOSE]
    assert not listed, f"dvc.yaml stage {stage} lists {listed}: choosing another runner would re-run it"


def test_no_output_has_a_remote_of_its_own():
    """The audit looks for every output's data in the default remote only (README, *audit*: an output with its own
    `remote:` is not covered, and this project's dvc.yaml has none): one would pass unchecked."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        own = [str(out) for stage in repo.index.stages for out in stage.outs if out.remote]
    assert not own, f"outputs with a remote of their own, which the audit does not check: {own}"


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(f"{folder.rstrip('/')}/")


def _declared_outputs(entry: dict) -> list[str]:
    return [
        next(iter(item)) if isinstance(item, dict) else item
        for kind in ("outs", "metrics", "plots")
        for item in entry.get(kind, [])
    ]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_path_a_stage_is_given_is_a_dependency_or_an_output(stage):
    """The imports and sections above miss files a stage reads by the path its command gives it: quality without
    `data/train_head/history.json` among its deps (it reads the best epoch there) passed every check (a review on
    2026-12-07). Each `--flag path` of the command is a dependency, or an output (a folder the stage writes its
    declared outputs under); `--params` is DVC's params and `--cache` a scratch folder no output holds."""
    import shlex

    entry = STAGES[stage]
    words = shlex.split(entry["cmd"])
    given = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}
    deps = [d for d in entry["deps"] if not d.startswith("$")]
    outputs = _declared_outputs(entry)
    assert outputs, f"stage {stage} declares no output"
    for flag, path in given.items():
        if flag in ("--params", "--cache"):
            continue
        read = any(_under(path, dep) for dep in deps)
        written = any(_under(out, path) or _under(path, out) for out in outputs)
        assert read or written, f"dvc.yaml stage {stage}: {flag} {path} is neither a dependency nor an output"
    for dep in deps:  # and no data dependency its command does not hand it, but the saved bases' folder (below)
        if not dep.endswith(".py") and dep != "models":
            assert any(_under(path, dep) or _under(dep, path) for path in given.values()), (stage, dep)


def test_the_stages_that_build_the_base_depend_on_the_folder_a_saved_base_must_be_in():
    """`conv_base.path` must name a file under `conv_base.TRACKED` (models/): only that folder among the deps of
    every stage that reads the conv_base section makes a new saved base re-run them."""
    from components import conv_base

    for stage, entry in STAGES.items():
        reads_base = any(str(key).split(".")[0] == "conv_base" for key in entry.get("params", []))
        builds = stage in ("extract", "finetune")
        assert not builds or reads_base, stage
        if builds:
            assert conv_base.TRACKED in entry["deps"], f"dvc.yaml stage {stage} does not depend on {conv_base.TRACKED}"


def test_imports_are_absolute_so_the_reader_sees_them():
    """`imported_modules` follows absolute imports only: a relative one (`from . import stats`) would be a
    dependency this file never checks."""
    relative = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for package in PACKAGES
        for path in sorted((REPO / package).glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert not relative, relative


def test_dvcignore_leaves_out_the_projects_byproducts_only_at_its_root():
    """`.cache/` (and `.venv/`, `*.egg-info/`) unanchored matched inside the stages' inputs too: a saved base at
    `models/.cache/base.keras` was read by extract and finetune while DVC hashed nothing of it (a review)."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:

        def ignored(path: str) -> bool:
            return repo.dvcignore.is_ignored(repo.fs, str(REPO / path))

        assert all(ignored(p) for p in (".cache/extract/x.f32", ".venv/bin/python", "transfer.egg-info/PKG-INFO"))
        assert not any(ignored(p) for p in ("models/.cache/base.keras", "photos/x.egg-info/a.jpg", "data/.venv/a"))
