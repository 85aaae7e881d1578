import numpy as np
import pytest
from PIL import Image

from tools import tiny_dataset


def test_every_class_has_its_own_colour_whatever_its_name(tmp_path):
    classes = ("cats", "dogs", "a", "b", "c")
    tiny_dataset.make_class_folder(tmp_path, per_class=3, classes=classes)
    means = {
        name: tuple(
            np.round(
                np.mean([np.asarray(Image.open(p)).mean(axis=(0, 1)) for p in (tmp_path / name).iterdir()], axis=0)
            )
        )
        for name in classes
    }
    assert len(set(means.values())) == len(classes), means  # something to learn for any class names


def test_every_class_has_its_own_colour_and_names_may_not_repeat(tmp_path):
    """Past six other class names the colour table repeated (class 7 looked like class 1); `--classes cats cats`
    wrote one folder and reported six images."""
    names = ["cats", "dogs", "birds"] + [f"class{i}" for i in range(40)]
    colours = [tiny_dataset.class_color(position, name) for position, name in enumerate(names)]
    assert len(set(colours)) == len(names)
    assert colours[:3] == [tiny_dataset.CLASS_COLORS[n] for n in names[:3]]  # the tiny preset's images unchanged
    with pytest.raises(SystemExit):
        tiny_dataset.main(["--out", str(tmp_path / "t"), "--classes", "cats", "cats"])
    assert not (tmp_path / "t").exists()


def test_a_second_run_into_a_filled_folder_and_nonsense_counts_are_refused(tmp_path, capsys):
    """A second run with fewer images or other classes left the first run's beside them (the dataset then held
    classes the run never printed); `--per-class -3` reported -6 images (a review on 2026-12-07)."""
    assert tiny_dataset.main(["--out", str(tmp_path / "t"), "--per-class", "2"]) == 0
    before = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "t").rglob("*"))
    with pytest.raises(SystemExit):
        tiny_dataset.main(["--out", str(tmp_path / "t"), "--per-class", "1", "--classes", "a", "b"])
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "t").rglob("*")) == before
    for count in ("0", "-3"):
        with pytest.raises(SystemExit):
            tiny_dataset.main(["--out", str(tmp_path / f"n{count}"), "--per-class", count])
        assert "one image a class or more" in capsys.readouterr().err and not (tmp_path / f"n{count}").exists()
    (tmp_path / "empty").mkdir()
    assert tiny_dataset.main(["--out", str(tmp_path / "empty"), "--per-class", "1"]) == 0  # an empty folder is fine
