"""Presets: validated overrides, inputs brought in as DVC-tracked imports, experiments run without a shell."""

from __future__ import annotations

import json
import shlex
import tempfile
from pathlib import Path

import pytest
import yaml

from components.params import ParamsError
from tests.test_dvc_pipeline import REPO, commit, dvc, run
from tools import preset

pytestmark = pytest.mark.integration


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    run(["git", "init", "-q"], root)
    dvc("init", "-q", cwd=root)
    for folder in ("models", "sources"):
        (root / folder).mkdir()
        (root / folder / ".gitignore").write_text((REPO / folder / ".gitignore").read_text())
    commit(root, "init")
    return root


def test_inputs_become_dvc_tracked_imports_and_params_point_inside_the_repo(project, tmp_path):
    shared = tmp_path / "shared"
    (shared / "photos" / "cats").mkdir(parents=True)
    (shared / "photos" / "cats" / "a.jpg").write_bytes(b"cat")
    saved_base(shared / "base.keras")
    base_bytes = (shared / "base.keras").read_bytes()
    spec = {
        "inputs": {"sources/photos": "../shared/photos", "models/base.keras": "../shared/base.keras"},
        "dataset": {"source": "folder", "dir": "sources/photos"},
        "conv_base": {"name": None, "path": "models/base.keras", "input_size": [32, 32]},
        "finetune": {"unfreeze_from": "conv_b"},  # a saved base has no registry default
    }
    (project / "my.yaml").write_text(yaml.safe_dump(spec))
    assert preset.main([str(project / "my.yaml"), "--params", str(project / "params.yaml"), "--write"]) == 0
    assert (project / "sources" / "photos" / "cats" / "a.jpg").read_bytes() == b"cat"
    assert (project / "models" / "base.keras").read_bytes() == base_bytes
    for made in ("sources/photos.dvc", "models/base.keras.dvc"):
        assert yaml.safe_load((project / made).read_text())["deps"][0]["path"].endswith(made[:-4].split("/")[1])
    untracked = run(["git", "status", "--porcelain"], project).stdout
    assert "sources/photos.dvc" in untracked and "models/base.keras.dvc" in untracked  # to commit: not ignored
    assert "sources/photos/" not in untracked and "models/base.keras\n" not in untracked  # the data is DVC's
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["dataset"]["dir"] == "sources/photos" and params["conv_base"]["path"] == "models/base.keras"
    # params.yaml is edited, not rewritten: its comments (the documentation of every key) are all still there.
    comments = [line for line in (REPO / "params.yaml").read_text().splitlines() if line.lstrip().startswith("#")]
    assert set(comments) <= set((project / "params.yaml").read_text().splitlines())
    # Applied again, nothing is imported twice.
    assert preset.main([str(project / "my.yaml"), "--params", str(project / "params.yaml"), "--write"]) == 0
    # A fresh clone has the .dvc files but not the data (no remote here): applying the preset fetches it again.
    run(["git", "add", "-A"], project)
    commit(project, "inputs")
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "sources" / "photos").exists()
    assert preset.main([str(clone / "my.yaml"), "--params", str(clone / "params.yaml"), "--write"]) == 0
    assert (clone / "sources" / "photos" / "cats" / "a.jpg").read_bytes() == b"cat"
    assert (clone / "models" / "base.keras").read_bytes() == base_bytes


def test_a_preset_whose_input_another_source_was_imported_to_is_refused_before_any_change(project, tmp_path):
    for name, content in (("photos", b"cat"), ("other", b"not the same cat")):
        (tmp_path / "shared" / name / "cats").mkdir(parents=True)
        (tmp_path / "shared" / name / "cats" / "a.jpg").write_bytes(content)
    first = {"inputs": {"sources/photos": "../shared/photos"}, "dataset": {"source": "folder", "dir": "sources/photos"}}
    (project / "first.yaml").write_text(yaml.safe_dump(first))
    assert preset.main([str(project / "first.yaml"), "--params", str(project / "params.yaml"), "--write"]) == 0
    # The same source spelled another way is the same import: nothing to refuse, nothing imported again.
    first["inputs"]["sources/photos"] = "../shared/./photos/"
    (project / "same.yaml").write_text(yaml.safe_dump(first))
    assert preset.main([str(project / "same.yaml"), "--params", str(project / "params.yaml"), "--write"]) == 0
    dvc_file = (project / "sources" / "photos.dvc").read_text()
    params = (project / "params.yaml").read_text()
    # Another preset with another source for the same repo path: refused, naming both and what to do;
    # the import, its data and params.yaml are as they were.
    second = {"inputs": {"sources/photos": "../shared/other"}, "train_head": {"epochs": 2}}
    (project / "second.yaml").write_text(yaml.safe_dump(second))
    with pytest.raises(
        ParamsError,
        match=r"sources/photos\.dvc imports .*shared/photos, but the preset's source .* "
        r"is \.\./shared/other: `dvc remove sources/photos\.dvc`",
    ):
        preset.main([str(project / "second.yaml"), "--params", str(project / "params.yaml"), "--write"])
    assert (project / "sources" / "photos.dvc").read_text() == dvc_file
    assert (project / "params.yaml").read_text() == params
    assert (project / "sources" / "photos" / "cats" / "a.jpg").read_bytes() == b"cat"


def test_printing_the_arguments_changes_nothing(project, tmp_path):
    (tmp_path / "photos").mkdir()
    (project / "p.yaml").write_text(
        yaml.safe_dump({"inputs": {"sources/photos": "../photos"}, "train_head": {"epochs": 2}})
    )
    before = run(["git", "status", "--porcelain", "--ignored"], project).stdout
    assert preset.main([str(project / "p.yaml"), "--params", str(project / "params.yaml")]) == 0
    assert run(["git", "status", "--porcelain", "--ignored"], project).stdout == before
    assert not (project / "sources" / "photos.dvc").exists()


def test_a_missing_input_is_a_clear_error(project):
    (project / "bad.yaml").write_text(yaml.safe_dump({"inputs": {"sources/x": "../nowhere"}}))
    with pytest.raises(ParamsError, match=r"inputs\.sources/x: \.\./nowhere does not exist"):
        preset.main([str(project / "bad.yaml"), "--params", str(project / "params.yaml")])


def test_printed_arguments_survive_a_shell():
    overrides = {
        "conv_base": {"input_size": [224, 224], "path": "models/a base.keras"},
        "finetune": {"learning_rate": 1e-05},
    }
    printed = " ".join(shlex.quote(a) for a in preset.set_args(overrides))
    assert shlex.split(printed) == [
        "-S",
        "conv_base.input_size=[224,224]",
        "-S",
        'conv_base.path="models/a base.keras"',
        "-S",
        "finetune.learning_rate=1e-05",
    ]
    assert json.loads(shlex.split(printed)[3].split("=", 1)[1]) == "models/a base.keras"


def test_what_the_tool_prints_is_shell_quoted(tmp_path, capsys, monkeypatch):
    """The test above quotes the arguments itself; this one reads what `main` prints."""
    monkeypatch.delenv("TRANSFER_BEAM_ARGS", raising=False)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "models").mkdir()
    overrides = {"conv_base": {"name": None, "path": "models/a base.keras"}, "finetune": {"unfreeze_top": 2}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(overrides))
    monkeypatch.chdir(tmp_path)
    assert preset.main([str(tmp_path / "p.yaml"), "--params", str(tmp_path / "params.yaml")]) == 0
    printed = capsys.readouterr().out
    assert shlex.split(printed) == preset.set_args(overrides) and "'conv_base.path=\"models/a base.keras\"'" in printed


@pytest.mark.parametrize("path", sorted((REPO / "presets").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_validates_against_the_params(path, tmp_path):
    """Only tiny.yaml was ever applied by a test: a bad value in another preset (a misspelt monitor, a negative
    learning rate) passed the suite and stopped the preset's users."""
    from components.params import load_yaml, read_params

    spec = load_yaml(path.read_text())
    spec.pop("inputs", None)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())  # validate writes beside it
    preset.validate(preset.merge(read_params(tmp_path / "params.yaml"), spec), tmp_path / "params.yaml")


def test_a_runner_a_beam_stage_cannot_use_fails_the_preset_before_any_work(tmp_path):
    """Only extract's runner was checked: a preset on the DaskRunner passed, and convert (tf.Transform) stopped the
    experiment once it ran (found by a review on 2026-12-06)."""
    from components.params import ParamsError, read_params

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    merged = preset.merge(read_params(tmp_path / "params.yaml"), {"beam": {"runner": "DaskRunner"}})
    with pytest.raises(ParamsError, match="convert cannot run on DaskRunner"):
        preset.validate(merged, tmp_path / "params.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"conv_base": {"name": "efficientnet_b1"}}, r"conv_base.name: unknown base 'efficientnet_b1' \(did you mean"),
        ({"conv_base": {"name": "inception_v3", "input_size": [64, 64]}}, r"inception_v3 needs each side >= 75"),
        ({"export": {"max_pixels": 200}}, r"export.max_pixels 200 is below download.max_pixels"),
        # a second read: a tapped unknown base was a KeyError in finetune's params check, an empty path skipped it all
        (
            {"conv_base": {"name": "efficientnet_b1", "layer": "block6a_expand_activation"}},
            r"efficientnet_b1's default",
        ),
        ({"conv_base": {"name": "mobilenet_v2", "input_size": [16, 16], "path": ""}}, r"mobilenet_v2 needs each side"),
    ],
    ids=["unknown base", "too small for the base", "serving refuses what download keeps", "tapped", "empty path"],
)
def test_a_base_or_a_limit_that_cannot_work_fails_the_preset_before_any_work(overrides, message, tmp_path):
    """A review: a sweep's or preset's unknown base or input size too small for it stopped the experiment only when
    a stage built the base (a sweep's variant N after variants 1 to N-1 had run in full), and an export.max_pixels below
    download.max_pixels only at export's serving check, the last stage, inside a TensorFlow assertion."""
    from components.params import read_params

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    with pytest.raises(ParamsError, match=message):
        preset.validate(preset.merge(read_params(tmp_path / "params.yaml"), overrides), tmp_path / "params.yaml")


def test_unfreeze_top_is_bounded_by_the_graph_the_stages_build():
    """A second read: Keras builds EfficientNet with one more layer (a Rescaling) for ImageNet weights than without,
    so the weightless build refused an unfreeze_top finetune takes; with weights none it is the same graph."""
    from components.params import read_params

    params = read_params(REPO / "params.yaml")
    cases = [  # (base, weights, unfreeze_top, its layer count without ImageNet's extra one or None where accepted)
        ("efficientnet_b0", "imagenet", 237, None),
        ("efficientnet_b0", "models/imagenet.weights.h5", 237, None),  # the base_weights stage's file: the same
        ("efficientnet_b0", "none", 237, 237),
        ("efficientnet_b0", "models/my_b0.weights.h5", 237, 237),  # Keras builds a weights file's graph as none's
        ("mobilenet_v2", "imagenet", 154, 154),  # a second read: no other base gains a layer
    ]
    with tempfile.TemporaryDirectory() as where:
        for name, weights, top, layers in cases:
            base = {"name": name, "input_size": [32, 32], "layer": None, "weights": weights}
            merged = preset.merge(params, {"conv_base": base, "finetune": {"unfreeze_from": None, "unfreeze_top": top}})
            if layers is None:
                preset.validate(merged, Path(where) / "params.yaml")
                continue
            with pytest.raises(ParamsError, match=rf"finetune\.unfreeze_top: the base has {layers} layers, got {top}"):
                preset.validate(merged, Path(where) / "params.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"conv_base": {"layer": "block_13_expand_rel"}, "finetune": {"unfreeze_from": "block_12_add"}},
            r"conv_base\.layer: .* has no layer 'block_13_expand_rel'",
        ),
        (
            {"finetune": {"unfreeze_from": "block_16_projet"}},
            r"finetune\.unfreeze_from: .* has no layer 'block_16_proj",
        ),
        (
            {"finetune": {"unfreeze_from": None, "unfreeze_top": 500}},
            r"finetune\.unfreeze_top: the base has \d+ layers",
        ),
        (
            {"conv_base": {"layer": "out_relu", "pooling": "none"}, "finetune": {"unfreeze_from": "block_16_project"}},
            None,
        ),
    ],
    ids=["tapped layer", "unfreeze point", "unfreeze top", "both there"],
)
def test_a_layer_the_base_lacks_fails_the_preset_before_any_work(overrides, message, tmp_path):
    """A review: `conv_base.layer` and `finetune.unfreeze_from` were looked up only when extract, or finetune, built
    the base, after download and convert (and extract and train_head) had run on the whole dataset."""
    from components.params import read_params

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    merged = preset.merge(read_params(tmp_path / "params.yaml"), overrides)
    if message is None:
        preset.validate(merged, tmp_path / "params.yaml")
        return
    with pytest.raises(ParamsError, match=message):
        preset.validate(merged, tmp_path / "params.yaml")


def saved_base(path: Path) -> None:
    """A two-layer saved conv base (layers conv_a, conv_b) taking 32x32 RGB."""
    import keras

    inputs = keras.Input((32, 32, 3))
    hidden = keras.layers.Conv2D(4, 3, name="conv_a")(inputs)
    keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv_b")(hidden), name="saved").save(path)


def test_a_saved_bases_layers_are_checked_from_the_presets_source_before_it_is_imported(tmp_path, monkeypatch):
    """The preset validates before it imports its inputs: a saved base's unfreeze point is checked on the source file,
    and nothing is imported when the base lacks it, or when the file is no model."""
    import yaml

    saved_base(tmp_path / "base.keras")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    conv = {"name": None, "path": "models/base.keras", "input_size": [32, 32]}
    spec = {"inputs": {"models/base.keras": "base.keras"}, "conv_base": conv, "finetune": {"unfreeze_from": "conv_c"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(preset, "import_inputs", lambda *args: pytest.fail("imported"))
    with pytest.raises(ParamsError, match=r"finetune\.unfreeze_from: saved has no layer 'conv_c' \(did you mean"):
        preset.main([str(tmp_path / "p.yaml"), "--params", str(tmp_path / "params.yaml"), "--write"])
    spec["finetune"]["unfreeze_from"] = "conv_b"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    assert preset.main([str(tmp_path / "p.yaml"), "--params", str(tmp_path / "params.yaml")]) == 0  # prints the -S
    spec["conv_base"]["input_size"] = [64, 64]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ParamsError, match=r"conv_base\.input_size: the saved base .*base\.keras takes 32x32 images"):
        preset.main([str(tmp_path / "p.yaml"), "--params", str(tmp_path / "params.yaml"), "--write"])
    # the base inside a folder the preset imports (a second read: only an input that is the file itself was found)
    (tmp_path / "bases").mkdir()
    (tmp_path / "base.keras").rename(tmp_path / "bases" / "base.keras")
    spec["inputs"] = {"models/bases": "bases"}
    spec["conv_base"]["path"] = "models/bases/base.keras"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ParamsError, match=r"conv_base\.input_size: the saved base .*bases/base\.keras takes 32x32"):
        preset.main([str(tmp_path / "p.yaml"), "--params", str(tmp_path / "params.yaml"), "--write"])
    (tmp_path / "bases" / "base.keras").write_bytes(b"a base")
    with pytest.raises(ParamsError, match=r"conv_base\.path: .*base\.keras is not a model Keras can load"):
        preset.main([str(tmp_path / "p.yaml"), "--params", str(tmp_path / "params.yaml"), "--write"])


def test_every_value_comes_back_from_dvc_with_its_type(tmp_path):
    from dvc.utils.hydra import apply_overrides

    values = {
        "strings": {
            "a": "1.0",
            "b": "10",
            "c": "true",
            "d": "NULL",
            "e": "inf",
            "f": "1_000",
            "g": "mobilenet_v2",
            "h": "models/x.keras",
            "i": "../shared/y z.keras",
            "j": "a:b",
            "k": "",
            "m": "café/photos",
            "o": "yes",
            "p": "off",
            "q": "null",
            "r": "False",
        },
        "others": {"n": 10, "x": 1e-05, "t": True, "z": None, "l": [224, 224]},
    }
    blank = {section: {key: "placeholder" for key in fields} for section, fields in values.items()}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(blank))
    apply_overrides(str(params), [arg for arg in preset.set_args(values) if arg != "-S"])
    from components.params import load_yaml  # reads DVC's `1e-05` as the float it is (YAML 1.1 would not)

    assert load_yaml(params.read_text(encoding="utf-8")) == values  # read_params' parser (its sections are made up)


def test_a_key_params_yaml_lacks_is_added_as_dvc_takes_it(tmp_path):
    """`-S beam.options.direct_num_workers=2` over `beam.options: {}` (params.yaml's own documented example) was
    refused by DVC ("Could not override ... use +"); the tool now writes `+key=value` for a key the params lack."""
    from dvc.utils.hydra import apply_overrides

    from components.params import read_params

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"beam": {"runner": "DirectRunner", "options": {}}, "train_head": {"epochs": 3}}))
    overrides = {
        "beam": {"options": {"direct_running_mode": "multi_processing", "direct_num_workers": 2}},
        "train_head": {"epochs": 5},
    }
    args = preset.set_args(overrides, read_params(params))
    assert args == [
        "-S",
        "+beam.options.direct_running_mode=multi_processing",
        "-S",
        "+beam.options.direct_num_workers=2",
        "-S",
        "train_head.epochs=5",
    ]
    apply_overrides(str(params), [arg for arg in args if arg != "-S"])
    assert read_params(params) == preset.merge(
        {"beam": {"runner": "DirectRunner", "options": {}}, "train_head": {"epochs": 3}}, overrides
    )


def test_queueing_before_the_imports_are_committed_is_refused(project, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    (project / "q.yaml").write_text(yaml.safe_dump({"inputs": {"sources/photos": "../photos"}}))
    with pytest.raises(ParamsError, match=r"imported sources/photos\.dvc: commit them first"):
        preset.main([str(project / "q.yaml"), "--params", str(project / "params.yaml"), "--run", "--queue"])
    assert (project / "sources" / "photos.dvc").exists()  # imported, waiting for its commit
    with pytest.raises(ParamsError, match=r"imported sources/photos\.dvc: commit them first"):  # still not committed
        preset.main([str(project / "q.yaml"), "--params", str(project / "params.yaml"), "--run", "--queue"])
    (tmp_path / "other").mkdir()
    (project / "q.yaml").write_text(yaml.safe_dump({"inputs": {"sources/photos": "../other"}}))
    with pytest.raises(
        ParamsError, match=r"sources/photos\.dvc imports .*photos, but the preset's source .* \.\./other"
    ):
        preset.main([str(project / "q.yaml"), "--params", str(project / "params.yaml"), "--write"])


def test_a_preset_with_an_unknown_key_fails_naming_it(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    spec = tmp_path / "p.yaml"
    spec.write_text(yaml.safe_dump({"finetune": {"learning_rte": 1e-4}}))
    with pytest.raises(ParamsError, match=r"finetune\.learning_rte"):
        preset.main([str(spec), "--params", str(params)])
    assert params.read_text() == (REPO / "params.yaml").read_text()


def test_a_beam_option_is_a_new_key_whether_or_not_beam_options_holds_others():
    """A new option was accepted under an empty `beam.options: {}` and refused as an unknown key once it held one."""
    base = {"beam": {"runner": "DirectRunner", "options": {}}, "conv_base": {"pooling": "avg"}}
    one = preset.merge(base, {"beam": {"options": {"direct_num_workers": 2}}})
    assert one["beam"]["options"] == {"direct_num_workers": 2}
    two = preset.merge(one, {"beam": {"options": {"direct_running_mode": "multi_processing"}}})
    assert two["beam"]["options"] == {"direct_num_workers": 2, "direct_running_mode": "multi_processing"}
    assert preset.merge(one, {"beam": {"options": {"x": {"a": 1}}}})["beam"]["options"]["x"] == {"a": 1}  # no KeyError
    with pytest.raises(ParamsError, match=r"beam\.runer: unknown key"):  # the schema's own keys stay checked
        preset.merge(one, {"beam": {"runer": "DaskRunner"}})
    with pytest.raises(ParamsError, match=r"conv_base\.pooling_: unknown key"):
        preset.merge(one, {"conv_base": {"pooling_": "max"}})


def test_a_value_dvc_would_change_is_refused():
    with pytest.raises(ParamsError, match=r"dataset\.dir: .*backslash"):
        preset.set_args({"dataset": {"dir": "C:\\\\photos"}})
    # inside a list too: DVC doubled the backslash and filled in HOME, and the run used what it made of them
    with pytest.raises(ParamsError, match=r"beam\.options\.experiments: .*backslash"):
        preset.set_args({"beam": {"options": {"experiments": ["ok", "a\\b"]}}})
    with pytest.raises(ParamsError, match=r"beam\.options\.experiments: .*interpolate"):
        preset.set_args({"beam": {"options": {"experiments": ["${oc.env:HOME}/x"]}}})
    for control in ("a\tb", "a\nb", "a\x00b"):  # a control character (below a space), as the README says
        with pytest.raises(ParamsError, match=r"dataset\.dir: .*control character"):
            preset.set_args({"dataset": {"dir": control}})
    assert preset.set_args({"beam": {"options": {"experiments": ["a", "b"]}}}) == [
        "-S",
        'beam.options.experiments=["a","b"]',
    ]


def test_an_input_tracked_as_added_data_or_imported_from_another_url_is_refused(tmp_path):
    """Only an import from another local source on this machine was refused: a folder the user had `dvc add`-ed
    (photos of their own, from no source) and an import from another URL were kept, and the preset ran on them."""
    (tmp_path / "sources" / "photos").mkdir(parents=True)
    dvc_file = tmp_path / "sources" / "photos.dvc"
    dvc_file.write_text(yaml.safe_dump({"outs": [{"md5": "0" * 32 + ".dir", "path": "photos"}]}))  # `dvc add`
    with pytest.raises(ParamsError, match=r"sources/photos\.dvc tracks sources/photos as added data"):
        preset.import_inputs({"sources/photos": "s3://bucket/photos-2026"}, tmp_path)
    dvc_file.write_text(yaml.safe_dump({"deps": [{"path": "s3://bucket/photos-2025"}], "outs": [{"path": "photos"}]}))
    with pytest.raises(ParamsError, match=r"imports s3://bucket/photos-2025, but the preset's source .* is s3://"):
        preset.import_inputs({"sources/photos": "s3://bucket/photos-2026"}, tmp_path)
    assert preset.import_inputs({"sources/photos": "s3://bucket/photos-2025"}, tmp_path) == []  # the same: kept


def test_a_source_dvc_recorded_relative_to_its_dvc_file_is_compared_from_there(tmp_path, monkeypatch):
    """`dvc import-url raw/photos sources/p2` records `../raw/photos` (from the .dvc file's folder): it was looked up
    from the working directory, so a re-run from another folder was refused and another source went unseen."""
    for name in ("photos", "other"):
        (tmp_path / "raw" / name).mkdir(parents=True)
    (tmp_path / "sources" / "p2").mkdir(parents=True)
    (tmp_path / "sources" / "p2.dvc").write_text(
        yaml.safe_dump({"deps": [{"path": "../raw/photos"}], "outs": [{"path": "p2"}]})
    )
    for cwd in (tmp_path, tmp_path / "sources"):
        monkeypatch.chdir(cwd)
        assert preset.import_inputs({"sources/p2": "raw/photos"}, tmp_path) == []  # the same source: kept
        with pytest.raises(ParamsError, match=r"imports .*raw/photos, but the preset's source .* is raw/other"):
            preset.import_inputs({"sources/p2": "raw/other"}, tmp_path)


def test_a_preset_target_that_exists_without_its_import_is_refused(project, tmp_path):
    """`dvc import-url SRC folder` over an existing folder imports *into* it: the user's photos and the preset's
    were mixed (a dog photo labelled by its folder, "other"), and the .dvc file named was not there."""
    (tmp_path / "shared" / "cats").mkdir(parents=True)
    (tmp_path / "shared" / "cats" / "a.jpg").write_bytes(b"cat")
    (project / "mydata" / "cats").mkdir(parents=True)
    (project / "mydata" / "cats" / "z.jpg").write_bytes(b"the user's cat")
    (project / "p.yaml").write_text(yaml.safe_dump({"inputs": {"mydata": "../shared"}}))
    with pytest.raises(ParamsError, match=r"inputs\.mydata: mydata exists and is not a DVC import"):
        preset.main([str(project / "p.yaml"), "--params", str(project / "params.yaml"), "--write"])
    assert sorted(p.name for p in (project / "mydata").rglob("*")) == ["cats", "z.jpg"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"beam": {"runner": "DirectRunner", "options": {"direct_num_wokers": 2}}}, "unknown Beam option"),
        ({"retrain": {"threshold": 5}}, r"retrain\.threshold"),
        ({"download": {"fractions": {"train": 0.75, "val": float("nan"), "test": 0.25}}}, "finite"),
        ({"common": {"seed": -1}}, r"common\.seed"),
        ({"dataset": {"source": "folder", "dir": "${oc.env:HOME}/photos"}}, "would interpolate"),
        # evaluate checked it on the fine-tuned model, after extract, train_head and finetune had run
        ({"tta": {"quarter_turns": True}, "conv_base": {"input_size": [160, 192]}}, "needs a square input"),
        # a tapped base has no default unfreeze point: finetune refused it only after extract and train_head ran
        ({"conv_base": {"layer": "block_13_expand_relu"}}, r"finetune\.unfreeze_from: the base is tapped"),
    ],
)
def test_every_section_is_validated_before_anything_runs(tmp_path, overrides, message, monkeypatch):
    monkeypatch.delenv("TRANSFER_BEAM_ARGS", raising=False)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(overrides))
    with pytest.raises(ParamsError, match=message):
        preset.main([str(tmp_path / "p.yaml"), "--params", str(tmp_path / "params.yaml")])


def test_a_runtime_whose_package_is_missing_is_refused_before_any_stage(tmp_path, monkeypatch):
    import sys

    from pipelines import runtimes

    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"evaluate": {"runtime": "openvino"}}))
    with pytest.raises(runtimes.RuntimeMissing, match="openvino"):
        preset.main([str(tmp_path / "p.yaml"), "--params", str(tmp_path / "params.yaml")])


def test_every_preset_sets_every_key_another_preset_sets():
    """A preset sets only what it names: applied after another one's `--write`, it ran with that one's flips, test-time
    augmentation and monitor (real_lite0 after real_flowers), so its documented figures did not reproduce. Each
    preset now names every key any other names (the tfds slices only for a tfds dataset, the fractions only for a
    folder), so the order in which presets were written changes nothing."""
    from components.params import load_yaml, read_params

    specs = {}
    for path in sorted((REPO / "presets").glob("*.yaml")):
        spec = load_yaml(path.read_text())
        spec.pop("inputs", None)
        specs[path.name] = spec
    base = read_params(REPO / "params.yaml")
    for name, spec in specs.items():
        tfds = spec["dataset"]["source"] == "tfds"
        for other_name, other in specs.items():
            after = preset.merge(preset.merge(base, other), spec)
            alone = preset.merge(base, spec)
            if tfds:  # the folder-split fractions do not apply to a dataset whose three splits are tfds slices
                after["download"]["fractions"] = alone["download"]["fractions"]
            else:  # nor tfds settings to a folder
                after["dataset"]["tfds"] = alone["dataset"]["tfds"]
            assert after == alone, (name, "after", other_name)


def test_a_value_dvc_would_change_is_refused_when_written_too(tmp_path):
    """Only printing and --run refused it: --write put `${oc.env:HOME}/photos` in params.yaml, and the next
    `dvc exp run -S` of any key (a sweep, a preset's --run) resolved it (DVC rewrites the whole file)."""
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    spec = tmp_path / "p.yaml"
    spec.write_text(yaml.safe_dump({"dataset": {"dir": "${oc.env:HOME}/photos"}}))
    with pytest.raises(ParamsError, match=r"oc\.env:HOME.*would interpolate"):
        preset.main([str(spec), "--params", str(params), "--write"])
    assert params.read_text() == (REPO / "params.yaml").read_text()
    # a backslash, which -S could not carry, is kept by DVC in the file: written (a second read, 2026-12-07)
    spec.write_text(yaml.safe_dump({"dataset": {"dir": "photos\\2024"}}))
    assert preset.main([str(spec), "--params", str(params), "--write"]) == 0
    assert yaml.safe_load(params.read_text())["dataset"]["dir"] == "photos\\2024"


@pytest.mark.parametrize(
    "text, message",
    [
        ("train_head: {epochs: [1}\n", r"p\.yaml: not valid YAML"),
        ("- train_head\n", r"p\.yaml: expected a mapping of params sections"),
        ("inputs: {sources/x: 3}\n", r"p\.yaml: inputs: expected a mapping of repo path -> source \(strings\)"),
        (None, r"p\.yaml: cannot read it"),
    ],
)
def test_a_preset_file_that_cannot_be_read_is_a_clear_error(tmp_path, text, message):
    """A syntax error, a list at top level, a source that is no string or a missing file was a traceback."""
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    if text is not None:
        (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ParamsError, match=message):
        preset.main([str(tmp_path / "p.yaml"), "--params", str(params)])
