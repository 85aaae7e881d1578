import copy
import difflib
from pathlib import Path

import pytest
import yaml

from components import convert, download
from components.params import ParamsError, parse_section
from tests.conftest import repo_params

REPO = Path(__file__).resolve().parents[2]


def write_params(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_repo_params_file_is_valid_for_every_stage(tmp_path):
    cfg = download.load_config(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert cfg.dataset.source == raw["dataset"]["source"]
    assert cfg.download.fractions.model_dump() == raw["download"]["fractions"]
    assert convert.load_config(REPO / "params.yaml").convert.shards.model_dump() == raw["convert"]["shards"]
    from components import evaluate, export, extract, finetune, quality, train_head

    for stage in (extract, train_head, quality, finetune, evaluate, export):
        stage.load_config(REPO / "params.yaml")
    from components.params import load_yaml, read_params
    from tools import preset as presets

    for preset in sorted((REPO / "presets").glob("*.yaml")):  # validated only: nothing is imported here
        overrides = load_yaml(preset.read_text(encoding="utf-8"))
        inputs = overrides.pop("inputs", {})
        presets.validate(presets.merge(read_params(REPO / "params.yaml"), overrides), tmp_path / "params.yaml")
        assert all(not str(path).startswith(("/", "..")) for path in inputs)  # inputs land inside the repository


def test_exponent_floats_as_dvc_writes_them(tmp_path):
    # `dvc exp run -S finetune.learning_rate=0.00001` writes `learning_rate: 1e-05`,
    # which plain PyYAML (YAML 1.1) would read as a string.
    from components import finetune

    path = tmp_path / "params.yaml"
    text = yaml.safe_dump(repo_params({"finetune": {"learning_rate": "LR"}}), sort_keys=False)
    path.write_text(text.replace("learning_rate: LR", "learning_rate: 1e-05"), encoding="utf-8")
    assert finetune.load_config(path).finetune.learning_rate == 1e-05


def test_unknown_key_is_named_with_allowed_keys():
    with pytest.raises(ParamsError) as err:
        parse_section(download.DownloadParams, "download", {"min_sid": 3})
    message = str(err.value)
    assert "download.min_sid: unknown key" in message
    assert "max_pixels" in message and "min_side" in message


def test_nested_unknown_key_names_full_path():
    with pytest.raises(
        ParamsError, match=r"dataset\.tfds\.nam: unknown key; allowed keys: image_key, label_key, name, splits"
    ):
        parse_section(download.DatasetParams, "dataset", {"dir": "x", "tfds": {"nam": "mnist"}})


def test_wrong_type_is_named():
    with pytest.raises(ParamsError, match=r"common\.seed: .*integer.*got '42'"):
        parse_section(download.CommonParams, "common", {"seed": "42"})


@pytest.mark.parametrize(
    "fractions, fragment",
    [
        ({"train": 0.5, "val": 0.3, "test": 0.3}, "must sum to 1"),
        ({"train": -0.1, "val": 0.6, "test": 0.5}, "within [0, 1]"),
        ({"train": 0.0, "val": 0.5, "test": 0.5}, "train must be > 0"),
    ],
)
def test_impossible_fractions(fractions, fragment):
    with pytest.raises(ParamsError) as err:
        parse_section(download.DownloadParams, "download", {"fractions": fractions})
    assert "download.fractions" in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize("value", [0, -5])
def test_non_positive_sizes_are_refused(value):
    with pytest.raises(ParamsError, match=r"download\.min_side: .*greater than or equal to 1"):
        parse_section(download.DownloadParams, "download", {"min_side": value})
    with pytest.raises(ParamsError, match=r"convert\.shards\.train"):
        parse_section(convert.ConvertParams, "convert", {"shards": {"train": value}})


def test_unknown_source_lists_allowed_values():
    with pytest.raises(ParamsError, match=r"dataset\.source: Input should be 'tfds' or 'folder'"):
        parse_section(download.DatasetParams, "dataset", {"dir": "x", "source": "s3"})


def test_tfds_split_mapping_needs_all_three():
    with pytest.raises(ParamsError, match=r"dataset\.tfds\.splits.*train, val, test"):
        parse_section(download.DatasetParams, "dataset", {"dir": "x", "tfds": {"splits": {"train": "train"}}})


def test_missing_section_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="section 'convert' is missing"):
        convert.load_config(write_params(tmp_path, {"common": {"seed": 1}}))
    with pytest.raises(ParamsError, match="params file not found"):
        convert.load_config(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match=r"dataset\.dir: required key is missing"):
        params = repo_params({"dataset": {"source": "folder"}})
        del params["dataset"]["dir"]
        download.load_config(write_params(tmp_path, params))


def test_main_refuses_bad_params_before_any_work(tmp_path):
    raw = repo_params({"dataset": {"source": "folder", "dir": str(tmp_path)}})
    raw["download"]["shards"] = 3
    params = write_params(tmp_path, raw)
    out = tmp_path / "out"
    with pytest.raises(ParamsError, match=r"download\.shards: unknown key"):
        download.main(["--params", str(params), "--out", str(out)])
    assert not out.exists()


def test_a_missing_section_stops_the_stage_instead_of_using_defaults(tmp_path):
    from components import evaluate, export, extract, finetune, train_head

    path = tmp_path / "params.yaml"
    path.write_text("common: {seed: 1}\ntrain-head: {epochs: 3}\n", encoding="utf-8")  # misspelt
    with pytest.raises(ParamsError, match=r"unknown section 'train-head' \(did you mean 'train_head'\?\)"):
        train_head.load_config(path)
    path.write_text("common: {seed: 1}\n", encoding="utf-8")
    for stage, name in (
        (extract, "conv_base"),
        (finetune, "conv_base"),
        (evaluate, "evaluate"),
        (export, "export"),
        (download, "dataset"),
    ):
        with pytest.raises(ParamsError, match=f"section '{name}' is missing"):
            stage.load_config(path)


def test_a_missing_key_stops_the_stage_instead_of_using_a_code_default(tmp_path):
    from components import finetune

    raw = repo_params()
    del raw["finetune"]["deterministic"], raw["finetune"]["augment"]["zoom"]
    with pytest.raises(
        ParamsError, match=r"finetune\.deterministic, finetune\.augment\.zoom: missing; a stage takes every"
    ):
        finetune.load_config(write_params(tmp_path, raw))


def test_code_defaults_agree_with_params_yaml():
    """Where a params model has a default, it is params.yaml's value: the two cannot drift apart."""
    from components import beam_options, conv_base, evaluate, export, extract, finetune, quality, train_head
    from tools import retrain

    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    models = {
        "common": download.CommonParams,
        "dataset": download.DatasetParams,
        "download": download.DownloadParams,
        "beam": beam_options.BeamParams,
        "convert": convert.ConvertParams,
        "conv_base": conv_base.ConvBaseParams,
        "extract": extract.ExtractParams,
        "train_head": train_head.TrainHeadParams,
        "finetune": finetune.FinetuneParams,
        "quality": quality.QualityParams,
        "evaluate": evaluate.EvaluateParams,
        "tta": evaluate.TtaParams,
        "export": export.ExportParams,
        "retrain": retrain.RetrainParams,
    }

    def drift(model, values, prefix):
        found = []
        for name, field in model.model_fields.items():
            if name not in values:
                continue
            if field.is_required():
                continue
            default = field.get_default(call_default_factory=True)
            expected = values[name]
            if hasattr(default, "model_dump"):
                found += (
                    drift(type(default), expected, f"{prefix}{name}.")
                    if isinstance(expected, dict)
                    else [f"{prefix}{name}"]
                )
                found += (
                    [f"{prefix}{name}"]
                    if default.model_dump() != type(default).model_validate(expected).model_dump()
                    else []
                )
            elif (list(default) if isinstance(default, tuple) else default) != expected:
                found.append(f"{prefix}{name}: code {default!r}, params.yaml {expected!r}")
        return found

    problems = [
        p for section, model in models.items() if section in raw for p in drift(model, raw[section], f"{section}.")
    ]
    assert not problems, problems
    assert set(models) <= set(raw)  # every stage's section is in params.yaml


def test_a_saved_base_outside_models_is_refused_before_any_work(tmp_path, monkeypatch):
    from components import extract, finetune
    from components.conv_base import ConvBaseParams, check_tracked

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "b.keras").write_bytes(b"x")
    (tmp_path / "elsewhere.keras").write_bytes(b"x")
    (tmp_path / "models" / "linked.keras").symlink_to(tmp_path / "elsewhere.keras")  # tracked by its content
    for path in ("models/b.keras", str(tmp_path / "models" / "b.keras"), "models/linked.keras"):
        check_tracked(ConvBaseParams(name=None, path=path))
    for params in (
        ConvBaseParams(name=None, path="elsewhere.keras"),
        ConvBaseParams(name=None, path="models/../elsewhere.keras"),
        ConvBaseParams(name="mobilenet_v2", weights=str(tmp_path / "elsewhere.keras")),
    ):
        with pytest.raises(ParamsError, match=r"conv_base\.(path|weights): .* is outside models/"):
            check_tracked(params)
    check_tracked(ConvBaseParams(name="mobilenet_v2", weights="imagenet"))  # Keras' own, versioned by Keras
    data = repo_params({"conv_base": {"name": None, "path": "elsewhere.keras"}})
    data["finetune"]["unfreeze_from"] = "top_conv"  # a saved base has no registry default
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match="outside models/"):
        extract.main(["--params", "params.yaml", "--convert", "c", "--out", "o"])
    with pytest.raises(ParamsError, match="outside models/"):
        finetune.main(["--params", "params.yaml", "--convert", "c", "--head", "h", "--out", "o", "--live", "l"])


def test_an_empty_unfreeze_point_is_refused_not_read_as_the_default():
    from components import finetune

    with pytest.raises(ParamsError, match=r"finetune\.unfreeze_from"):
        parse_section(finetune.FinetuneParams, "finetune", {"unfreeze_from": ""})


def test_an_error_that_says_what_to_do_is_a_message_and_exit_2_not_a_traceback():
    import subprocess
    import sys

    code = (
        "from components.cli import run_main\n"
        "class Missing(RuntimeError):\n    user_facing = True\n"
        "def main():\n    raise Missing('pip install the runtime')\n"
        "run_main(main)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 2 and done.stderr.strip() == "error: pip install the runtime"
    bug = code.replace("    user_facing = True\n", "    pass\n")
    done = subprocess.run([sys.executable, "-c", bug], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 1 and "Traceback" in done.stderr


def test_only_true_and_false_are_bools_as_dvc_reads_them():
    from components.params import load_yaml

    loaded = load_yaml("a: yes\nb: on\nc: true\nd: No\ne: False\nf: 1e-05\ng: null\nh: 3\n")
    assert loaded == {"a": "yes", "b": "on", "c": True, "d": "No", "e": False, "f": 1e-05, "g": None, "h": 3}


def test_numbers_read_as_dvc_reads_them_and_a_key_given_twice_is_an_error(tmp_path):
    """YAML 1.1 read `010` as 8, `1:30` as 90 and `12:05` as 725 (base 60), where DVC (YAML 1.2) reads 10 and
    strings; `+.5` stayed a string; a key given twice silently took the last value, where DVC refuses the file."""
    from dvc.utils.serialize._yaml import parse_yaml

    from components.params import load_yaml, read_params

    cases = [
        "010",
        "0o10",
        "0x1A",
        "0b101",
        "1_000",
        "-7",
        "+1",
        "1:30",
        "12:05",
        "190:20:30.15",
        "+.5",
        "-.5e1",
        ".5e-1",
    ]
    text = "".join(f"k{i}: {case}\n" for i, case in enumerate(cases))
    ours, dvcs = load_yaml(text), parse_yaml(text, "params.yaml")
    assert [(type(v), v) for v in ours.values()] == [(type(v), v) for v in dvcs.values()]
    assert list(ours.values()) == [10, 8, 26, 5, 1000, -7, 1, "1:30", "12:05", "190:20:30.15", 0.5, "-.5e1", 0.05]
    for text in ("seed: 1\nseed: 2\n", "train_head:\n  epochs: 5\nfinetune: {}\ntrain_head:\n  epochs: 6\n"):
        with pytest.raises(ParamsError, match=r"duplicate key '(seed|train_head)' at line \d"):
            load_yaml(text)
    assert load_yaml("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n")["other"] == {"x": 1, "y": 3}  # a merge
    with pytest.raises(ParamsError, match=r"'0x_' at line 1: not a number"):
        load_yaml("k: 0x_\n")
    (tmp_path / "params.yaml").write_text("common:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: duplicate key 'seed'"):
        read_params(tmp_path / "params.yaml")


def test_params_written_by_the_tools_read_back_as_written_by_both_readers():
    """PyYAML's dumper quotes by YAML 1.1's rules: `0o10`, `0009`, `+.5` or an all-digit id (a `download.exclude`
    entry) went out unquoted and came back, here and in DVC, as numbers."""
    from dvc.utils.serialize._yaml import parse_yaml

    from components.params import dump_yaml, load_yaml

    values = {
        "octal": "0o10",
        "zeros": "0009",
        "signed": "+.5",
        "id": "01234567890123456789",
        "sexagesimal": "1:30",
        "word": "yes",
        "bool_text": "true",
        "underscored": "1_000",
        "rate": 1e-05,
        "size": [224, 224],
        "name": "café",
        "none": None,
        "flag": True,
    }
    text = dump_yaml(values)
    assert load_yaml(text) == values and parse_yaml(text, "params.yaml") == values


def test_tools_edit_params_in_place_keeping_comments_and_reading_back_as_written(tmp_path):
    """`tools.preset --write` and `tools.data_fixes --write` rewrote params.yaml whole with PyYAML: every comment that
    documents a key was gone after one preset. They now change only the values that differ (ruamel's round trip, as
    DVC's `-S` edits the file), and the file reads back as exactly the merged params, by this reader and DVC's."""
    from dvc.utils.serialize._yaml import parse_yaml

    from components.params import load_yaml, read_params, same
    from components.params import write_params as edit

    params = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    params.write_text(original)
    base = read_params(params)
    assert edit(params, base) and params.read_text() == original  # nothing to change: the same bytes
    merged = copy.deepcopy(base)
    merged["finetune"]["learning_rate"] = 2e-05
    merged["finetune"]["unfreeze_top"] = 10  # null before
    merged["finetune"]["augment"]["flip"] = "both"  # inside a flow-style mapping
    merged["conv_base"]["input_size"] = [96, 96]
    merged["train_head"]["epochs"] = float(base["train_head"]["epochs"])  # == the int in Python: still a change
    merged["download"]["exclude"] = ["0o10", "01234567890123456789", "yes"]  # strings YAML 1.2 would read otherwise
    merged["download"]["new_key"] = {"nested": None}
    del merged["tta"]
    assert edit(params, merged)
    text = params.read_text()
    assert same(load_yaml(text), merged) and parse_yaml(text, "params.yaml") == merged
    kept = [line for line in original.splitlines() if line.lstrip().startswith("#")]
    assert kept and all(line in text.splitlines() for line in kept)  # every comment line stays
    assert "# very low: the head has converged" in text  # a changed key keeps its own comment
    assert "unfreeze_from: null" in text  # an untouched null stays null
    changed = [line for line in difflib.ndiff(original.splitlines(), text.splitlines()) if line[:1] in "+-"]
    assert len(changed) < 30, changed  # only the edited keys' lines (and the removed section) differ
    # Where an edit in place cannot give the merged values (two keys sharing one anchored mapping, one of them
    # changed), the file is written whole: without comments, never with other values.
    params.write_text("a: &shared {seed: 1}  # a comment\nb: *shared\n")
    assert not edit(params, {"a": {"seed": 1}, "b": {"seed": 2}})
    assert load_yaml(params.read_text()) == {"a": {"seed": 1}, "b": {"seed": 2}}
    # Keys of another type are other keys (`1:` is not `true:`), and DVC's own writer in this process is unchanged
    # (the `null` kept here is written by a representer of our own).
    from dvc.utils.serialize._yaml import dumps_yaml

    # Items added after a list's kept ones (what `tools.data_fixes` does to `download.exclude`): the kept items keep
    # their comments (the list was replaced, and the notes of why each id was excluded went with it).
    params.write_text("exclude:\n  - aaaa  # a dog filed under cats\n  - bbbb  # a test copy of a train photo\n")
    assert edit(params, {"exclude": ["aaaa", "bbbb", "cccc"]})
    assert "# a dog filed under cats" in params.read_text() and "# a test copy of a train photo" in params.read_text()
    assert load_yaml(params.read_text()) == {"exclude": ["aaaa", "bbbb", "cccc"]}
    params.write_text("exclude: [aaaa]\n")  # flow style stays flow style
    assert edit(params, {"exclude": ["aaaa", "bbbb"]}) and params.read_text() == "exclude: [aaaa, bbbb]\n"
    params.write_text("a:\n  1: x\n")
    edit(params, {"a": {True: "x"}})
    assert same(load_yaml(params.read_text()), {"a": {True: "x"}})
    assert dumps_yaml({"a": None}) == "a:\n"


def test_a_params_file_that_is_not_yaml_is_a_params_error_naming_it(tmp_path):
    """A syntax error escaped as PyYAML's traceback (exit 1, "<unicode string>", 16 frames) from every stage and
    tool, not the clear error (exit 2) naming the file."""
    from components.params import read_params

    params = tmp_path / "params.yaml"
    params.write_text("download:\n  min_side: [16\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: not valid YAML: .*line 3"):
        read_params(params)


def test_an_unknown_section_is_refused_by_every_stage_naming_the_nearest(tmp_path):
    """A review: sections no stage reads were ignored, so `dvc exp run -S +train_heads.epochs=5` (the form DVC's own
    error suggests for a typo) trained with train_head's 30 epochs, and a stray `tta_:` left tta off, without a word."""
    from components import params as params_module

    assert set(repo_params()) == params_module.SECTIONS  # params.yaml's sections are the ones the stages know
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**repo_params(), "train_heads": {"epochs": 5}}))
    for stage in (download, convert):
        with pytest.raises(ParamsError, match=r"unknown section 'train_heads' \(did you mean 'train_head'\?\)"):
            stage.load_config(path)
