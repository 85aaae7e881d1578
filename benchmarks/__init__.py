import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tracked_base(work: Path, base: Path) -> str:
    """A saved base as a stage's command line must name it: inside `work`'s ``models/`` (a symlink to the
    file), the folder dvc.yaml declares (`components.conv_base.check_tracked`). Run the command with
    `stage_env()` in `work`."""
    (work / "models").mkdir(parents=True, exist_ok=True)
    link = work / "models" / base.name
    if not link.is_symlink():
        link.symlink_to(base.resolve())
    return f"models/{base.name}"


def stage_env() -> dict[str, str]:
    """The environment of a stage's command line run outside the checkout: the project importable."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
