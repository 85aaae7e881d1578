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
