"""Outputs DVC caches that git still tracks, and untracking them.

    python -m tools.outputs_in_git            # lists them; exit 1 if there are any
    python -m tools.outputs_in_git --untrack  # git rm -r --cached each (the files stay); then commit

An output committed to git while it was `cache: false` and cached since (on 2026-12-05 dvclive's curves,
quality's lists and evaluate's ROC data and records, so that DVC's run cache covers their stages) makes DVC
fail that stage with `OutputAlreadyTrackedError`, and only after the stage's command has run: a whole
training for nothing. tools.retrain, tools.sweep and tools.preset --run check first and stop with this
command's advice.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from components.cli import configure_logging, run_main, sh


def cached_outputs(repo: Path, tracked_only: bool = False) -> list[str]:
    """Every output DVC caches (dvc.yaml's and .dvc files'), as a path relative to the DVC root: those DVC refuses
    to save while git tracks them (`Output.ignore` and its `use_scm_ignore`); with `tracked_only`, those git tracks,
    asked as `Output.ignore` asks (`scm.is_tracked`)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return sorted(
            {
                Path(os.path.relpath(out.fs_path, dvc_repo.root_dir)).as_posix()
                for stage in dvc_repo.index.stages
                for out in stage.outs
                if out.use_scm_ignore and (not tracked_only or dvc_repo.scm.is_tracked(out.fspath))
            }
        )


def dvc_root(repo: Path) -> Path:
    """The DVC project `repo` is in (DVC looks upwards; the paths above are relative to it)."""
    from dvc.repo import Repo

    return Path(Repo.find_root(str(repo)))


def git_tracked_cached_outputs(repo: Path) -> list[str]:
    return cached_outputs(repo, tracked_only=True)


def advice(paths: Sequence[str]) -> str:
    return (
        f"git tracks outputs that DVC caches: {', '.join(paths)} (committed while they were "
        "`cache: false`); DVC would fail their stages after running them. Untrack them once (the files stay): "
        "`python -m tools.outputs_in_git --untrack && git commit -m 'outputs DVC caches'`"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="the project's git repository")
    parser.add_argument(
        "--untrack", action="store_true", help="git rm -r --cached each such output, and git-ignore it as DVC does"
    )
    args = parser.parse_args(argv)
    configure_logging()
    repo = Path(args.repo)
    found = git_tracked_cached_outputs(repo)
    if not found:
        print("no output that DVC caches is tracked by git")
        return 0
    if not args.untrack:
        print(advice(found), file=sys.stderr)
        return 1
    untrack(dvc_root(repo), found)
    for path in found:
        print(f"untracked {path}")
    print("now commit: git commit -m 'outputs DVC caches'")
    return 0


def untrack(repo: Path, paths: Sequence[str]) -> None:
    """git rm --cached, and each path into its folder's .gitignore as DVC writes it, staged, so that a later
    `git add -A` does not track the files again."""
    from scmrepo.git import Git

    sh("git", "--literal-pathspecs", "rm", "-r", "-q", "--cached", "--", *paths, cwd=repo)
    with Git(str(repo)) as scm:
        ignores = {scm.ignore(str(Path(repo).resolve() / path)) for path in paths} - {None}
    if ignores:
        sh("git", "add", "--", *sorted(ignores), cwd=repo)


if __name__ == "__main__":
    run_main(main)
