"""tools/worker_boot.py: what a worker installs from the files a job staged, and what it can import."""

import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import pytest

from tools import worker_boot


def sdist(path: Path, name: str, answer: int = 1) -> Path:
    """A minimal source package of one module `name` (returns `answer`), as Beam stages one."""
    files = {
        "pyproject.toml": (
            '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
            f'[project]\nname = "{name}"\nversion = "0.{answer}"\n[tool.setuptools]\npy-modules = ["{name}"]\n'
        ),
        f"{name}.py": f"def answer():\n    return {answer}\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for relative, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{name}-0.{answer}/{relative}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.slow
def test_the_staged_packages_are_installed_into_the_workers_folder(tmp_path):
    staged, site = tmp_path / "staged", tmp_path / "site"
    staged.mkdir()
    sdist(staged / worker_boot.STAGED_PACKAGE, "alpha")  # --setup_file's package
    sdist(staged / "beta-0.1.tar.gz", "beta")  # an --extra_package
    (staged / worker_boot.EXTRA_PACKAGES).write_text("beta-0.1.tar.gz\n")
    (staged / "pickled_main_session").write_bytes(b"not a package")  # staged, not installed
    worker_boot.install_staged(staged, site)
    assert (site / "alpha.py").exists() and (site / "beta.py").exists()
    assert not any(p.name.startswith("pickled") for p in site.iterdir())


def test_nothing_but_the_staged_files_is_installed(tmp_path):
    """No staged package, nothing installed; a requirement the staged files cannot satisfy fails (no index)."""
    staged, site = tmp_path / "staged", tmp_path / "site"
    staged.mkdir()
    worker_boot.install_staged(staged, site)
    assert not site.exists()
    (staged / worker_boot.REQUIREMENTS).write_text("surely-not-a-staged-package==1.0\n")
    with pytest.raises(Exception, match="returned non-zero exit status"):
        worker_boot.install_staged(staged, site)


def test_the_checkout_is_taken_off_the_import_path(monkeypatch):
    tools = str(Path(worker_boot.__file__).resolve().parent)

    class __editable___demo_finder:  # what setuptools' editable install puts on sys.meta_path
        pass

    monkeypatch.setattr(sys, "path", [tools, "/elsewhere"])
    monkeypatch.setattr(sys, "meta_path", [__editable___demo_finder(), "kept"])
    type(sys.meta_path[0]).__module__ = "__editable___transfer_pipeline_0_1_0_finder"
    worker_boot.without_the_checkout()
    assert sys.path == ["/elsewhere"] and sys.meta_path == ["kept"]


def test_requirements_the_workers_environment_satisfies_are_not_installed_again(tmp_path):
    """Beam's boot installs requirements into the worker's environment, where an installed package counts; this
    boot installs into a folder of its own, where pip found none of them (no index): `pyyaml` failed the worker."""
    from importlib import metadata

    version = metadata.version("pyyaml")
    text = (
        f"pyyaml\n# a comment\nPyYAML>={version}  # ok\npyyaml>99\nsurely-not-installed\nnumpy; python_version < '3'\n"
    )
    assert worker_boot.unsatisfied(text) == ["pyyaml>99", "surely-not-installed"]
    # `pkg[extra]`: what the extra adds must be installed too (a review, 2026-12-07); where it is, nothing is
    # installed (into the boot's own folder pip would find neither among the staged files)
    email_validator = importlib.util.find_spec("email_validator") is not None
    assert worker_boot.unsatisfied("pydantic[email]\n") == ([] if email_validator else ["pydantic[email]"])
    dask = all(importlib.util.find_spec(name) for name in ("dask", "distributed"))
    assert worker_boot.unsatisfied("apache-beam[dask]\n") == ([] if dask else ["apache-beam[dask]"])
    # an extra made of other extras (`dvc[all]` is `dvc[ssh,...]`): theirs count too
    ssh = importlib.util.find_spec("dvc_ssh") is not None
    assert worker_boot.unsatisfied("dvc[all]\n") == ([] if ssh else ["dvc[all]"])
    staged, site = tmp_path / "staged", tmp_path / "site"
    staged.mkdir()
    (staged / worker_boot.REQUIREMENTS).write_text("pyyaml\nnumpy\n")  # both in the worker's environment
    worker_boot.install_staged(staged, site)
    assert not site.exists()  # nothing to install, nothing failed


@pytest.mark.slow
def test_a_later_job_on_a_kept_semi_persistent_directory_gets_its_own_code(tmp_path):
    """Beam's boots are given a directory that outlives the worker: installed into the same site-packages with
    `pip install --target`, a second job's package left the first job's code there, and the worker imported it."""
    import subprocess

    kept = tmp_path / "semi_persistent"
    for answer in (1, 2):  # job 1's code, then job 2's, on workers given the same directory
        work = worker_boot.work_folder("1", str(kept))
        assert work.parent == kept
        (work / "staged").mkdir()
        sdist(work / "staged" / worker_boot.STAGED_PACKAGE, "alpha", answer)
        worker_boot.install_staged(work / "staged", work / "site-packages")
        imported = subprocess.run(
            [sys.executable, "-c", "import alpha; print(alpha.answer())"],
            env={"PYTHONPATH": str(work / "site-packages")},
            capture_output=True,
            text=True,
            check=True,
        )
        assert imported.stdout.strip() == str(answer)
    import shutil

    fresh = [worker_boot.work_folder("1", None) for _ in range(2)]  # no directory given: a new one each time
    assert fresh[0] != fresh[1] and all(folder.is_dir() for folder in fresh)
    for folder in fresh:
        shutil.rmtree(folder)
