import numpy as np
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
