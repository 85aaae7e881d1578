import shutil
import subprocess
import sys

import pytest

from components.params import ParamsError
from tests.test_dvc_pipeline import REPO, commit, run
from tools import sweep


def row(variant, head_val, finetune_val, head_test, finetune_test):
    return {
        "variant": variant,
        "head_val_accuracy": head_val,
        "finetune_val_accuracy": finetune_val,
        "head_test_accuracy": head_test,
        "finetune_test_accuracy": finetune_test,
    }


def test_variants_are_ranked_on_validation_never_on_test():
    rows = [
        row("best_on_test", 0.90, 0.91, 0.99, 0.99),
        row("best_on_val", 0.93, 0.96, 0.80, 0.81),
        row("tied_val_better_head", 0.95, 0.91, 0.70, 0.70),
        row("no_val", None, None, 1.0, 1.0),
    ]
    assert [r["variant"] for r in sweep.rank(rows)] == ["best_on_val", "tied_val_better_head", "best_on_test", "no_val"]


def test_leaderboard_rows_read_both_splits_of_the_evaluation():
    evaluation = {
        "head": {"val": {"accuracy": 0.8, "roc_auc": 0.85, "images": 10}, "test": {"accuracy": 0.7, "images": 12}},
        "finetune": {"val": {"accuracy": 0.9, "images": 10}, "test": {"accuracy": 0.6, "roc_auc": 0.65, "images": 12}},
    }
    exp = {
        "rev": "abc",
        "params": {
            "conv_base": {
                "name": "vgg16",
                "weights": "imagenet",
                "input_size": [150, 150],
                "pooling": "avg",
                "layer": None,
            }
        },
        "metrics": {
            sweep.EVALUATION_METRICS: evaluation,
            sweep.EXTRACT_METRICS: {"feature_size": 512, "images_per_s": 9.5},
        },
    }
    got = sweep.leaderboard_row("v", exp)
    assert (
        got["head_val_accuracy"],
        got["finetune_val_accuracy"],
        got["head_test_accuracy"],
        got["finetune_test_accuracy"],
    ) == (0.8, 0.9, 0.7, 0.6)
    assert (got["head_val_roc_auc"], got["finetune_test_roc_auc"], got["val_images"], got["test_images"]) == (
        0.85,
        0.65,
        10,
        12,
    )
    table = sweep.markdown([got], "s")
    assert (
        "Ranked on the validation split" in table
        and "| 1 | v | vgg16 (imagenet) | 150x150 | avg | 512 | 9.5 | 80.00% | 90.00% | 70.00% | 60.00% | 0.6500 |"
        in table
    )


def test_a_variant_without_val_figures_is_refused_not_ranked_last():
    sweep.check_scored([row("a", 0.9, 0.91, 0.9, 0.9)])
    with pytest.raises(RuntimeError, match=r"without val accuracies .*\['no_val'\]"):
        sweep.check_scored([row("a", 0.9, 0.91, 0.9, 0.9), row("no_val", None, None, 1.0, 1.0)])


def test_queued_running_and_failed_experiments_are_not_taken_as_done():
    found = {
        "s-ok": {"state": None, "error": None},
        "s-queue-ok": {"state": "success", "error": None},
        "s-queued": {"state": "queued", "error": None},
        "s-failed": {"state": "failed", "error": None},
        "s-broken": {"state": None, "error": "metrics unreadable"},
    }
    assert sweep.unusable(found, list(found) + ["s-missing"]) == [
        "s-queued (queued)",
        "s-failed (failed)",
        "s-broken (None: metrics unreadable)",
    ]


def test_an_experiment_run_with_other_params_than_its_variant_now_is_found():
    exp = {"params": {"finetune": {"learning_rate": 2e-05, "epochs": 3}, "conv_base": {"input_size": [96, 96]}}}
    same = {"finetune.learning_rate": 0.00002, "conv_base.input_size": [96, 96]}
    assert sweep.stale_params(exp, same) == {}
    edited = {"finetune.learning_rate": 0.0001, "conv_base.input_size": [96, 96], "train_head.epochs": 5}
    assert sweep.stale_params(exp, edited) == {
        "finetune.learning_rate": (2e-05, 0.0001),
        "train_head.epochs": (None, 5),
    }


def test_a_sweep_refuses_to_start_over_an_uncommitted_lock_or_metrics(tmp_path):
    """`git diff` alone saw only changes to committed files: over a dvc.lock never committed the sweep ran, and
    putting the baseline back at its end deleted that lock."""
    run(["git", "init", "-q"], tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / "sweeps" / "tiny.yaml", tmp_path / "tiny.yaml")
    commit(tmp_path, "baseline")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # a `dvc repro` not committed
    with pytest.raises(RuntimeError, match=r"uncommitted changes in .*\(dvc.lock\): commit them first"):
        sweep.run_sweep(tmp_path / "tiny.yaml", tmp_path / "out", tmp_path, tmp_path / "params.yaml", False)
    assert (tmp_path / "dvc.lock").exists()
    (tmp_path / "dvc.lock").unlink()
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "metrics.json").write_text("{}")
    commit(tmp_path, "metrics")
    (tmp_path / "evaluation" / "metrics.json").write_text('{"edited": 1}')  # a committed file changed
    with pytest.raises(RuntimeError, match=r"evaluation/metrics.json"):
        sweep.run_sweep(tmp_path / "tiny.yaml", tmp_path / "out", tmp_path, tmp_path / "params.yaml", False)
    assert subprocess.run(["git", "status", "--porcelain"], cwd=tmp_path, capture_output=True, text=True).stdout


def test_a_sweep_refuses_changed_dvc_tracked_data_and_its_end_restores_only_the_pipelines_outputs(tmp_path):
    """The end of a sweep ran `dvc checkout --force` on the whole project: photos added to a `dvc add`-ed folder
    (not yet added again) were deleted, and edited ones reverted; the variants had also run on that data."""
    run(["git", "init", "-q"], tmp_path)
    run([sys.executable, "-m", "dvc", "init", "-q"], tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / "sweeps" / "tiny.yaml", tmp_path / "tiny.yaml")
    (tmp_path / "photos" / "cats").mkdir(parents=True)
    (tmp_path / "photos" / "cats" / "a.jpg").write_text("a cat")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  count:\n    cmd: ls photos/cats | wc -l > n.txt\n    deps: [photos]\n    outs: [n.txt]\n"
    )
    run([sys.executable, "-m", "dvc", "add", "-q", "photos"], tmp_path)
    run([sys.executable, "-m", "dvc", "repro", "-q"], tmp_path)
    commit(tmp_path, "baseline")
    (tmp_path / "photos" / "cats" / "new.jpg").write_text("a new cat")  # new data, not yet `dvc add`-ed
    with pytest.raises(RuntimeError, match=r"data tracked by .dvc files differs from the commit \(photos\)"):
        sweep.run_sweep(tmp_path / "tiny.yaml", tmp_path / "out", tmp_path, tmp_path / "params.yaml", False)
    (tmp_path / "n.txt").write_text("an output edited by hand")
    sweep.restore_baseline(tmp_path)
    assert (tmp_path / "photos" / "cats" / "new.jpg").read_text() == "a new cat"  # the user's data is left alone
    assert (tmp_path / "n.txt").read_text().strip() == "1"  # the pipeline's output is back from the cache


def test_the_baseline_restored_holds_no_output_file_its_commit_lacks(tmp_path):
    """Found by a review on 2026-12-06: the last variant's Grad-CAM images (names holding its probabilities) stayed
    in evaluation/gradcam after a sweep, so evaluate's output differed from the lock and the next repro re-ran it."""
    run(["git", "init", "-q"], tmp_path)
    gradcam = tmp_path / "evaluation" / "gradcam"
    gradcam.mkdir(parents=True)
    (gradcam / "wrong_cat_as_dog_0.160_abc.png").write_bytes(b"baseline")
    (tmp_path / "evaluation" / ".gitignore").write_text("/cached.json\n")  # a DVC-cached output: DVC's to restore
    (tmp_path / "notes.txt").write_text("the user's")
    commit(tmp_path, "baseline")
    (gradcam / "wrong_cat_as_dog_0.160_abc.png").write_bytes(b"a variant's")
    (gradcam / "wrong_cat_as_dog_0.128_abc.png").write_bytes(b"a variant's")
    (tmp_path / "evaluation" / "cached.json").write_text("{}")
    (tmp_path / "scratch.txt").write_text("untracked, outside the outputs")
    sweep.restore_baseline(tmp_path)
    assert sorted(p.name for p in gradcam.iterdir()) == ["wrong_cat_as_dog_0.160_abc.png"]
    assert (gradcam / "wrong_cat_as_dog_0.160_abc.png").read_bytes() == b"baseline"
    assert (tmp_path / "evaluation" / "cached.json").exists() and (tmp_path / "scratch.txt").exists()


def pooled_sweep(project):
    """A git + DVC project with the baseline params committed, and a sweep file `s.yaml` of one variant, `pooled`."""
    import yaml

    run(["git", "init", "-q"], project)
    run([sys.executable, "-m", "dvc", "init", "-q"], project)
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    (project / "s.yaml").write_text(yaml.safe_dump({"variants": {"pooled": {"conv_base": {"pooling": "max"}}}}))
    commit(project, "baseline")


@pytest.mark.parametrize("collect", [False, True])
def test_an_override_removed_from_the_sweep_file_since_its_experiment_ran_stops_the_sweep(
    tmp_path, monkeypatch, collect
):
    """Only the keys some variant overrides now were compared: an experiment run with an override the sweep file
    no longer has (so the variant now runs with the baseline's value) was reused and ranked; `--collect` compared
    nothing and ranked any experiment of the variant's name."""
    import yaml

    pooled_sweep(tmp_path)
    baseline = yaml.safe_load((tmp_path / "params.yaml").read_text())
    ran = yaml.safe_load((tmp_path / "params.yaml").read_text())
    ran["conv_base"]["pooling"] = "max"
    ran["finetune"]["learning_rate"] = baseline["finetune"]["learning_rate"] * 2  # an override since removed
    done = {"s-pooled": {"rev": "abc", "state": None, "error": None, "params": ran, "metrics": {}}}
    monkeypatch.setattr(sweep, "experiments", lambda repo: done)
    with pytest.raises(RuntimeError, match=r"experiment s-pooled ran with other params .*finetune\.learning_rate"):
        sweep.run_sweep(tmp_path / "s.yaml", tmp_path / "out", tmp_path, tmp_path / "params.yaml", collect)
    # A key the baseline lacks that the experiment set (`+beam.options.x=`), no longer in the file: stale too.
    ran["finetune"]["learning_rate"] = baseline["finetune"]["learning_rate"]
    ran["beam"]["options"]["direct_num_workers"] = 2
    with pytest.raises(RuntimeError, match=r"ran with other params .*beam\.options\.direct_num_workers"):
        sweep.run_sweep(tmp_path / "s.yaml", tmp_path / "out", tmp_path, tmp_path / "params.yaml", collect)
    # The same params: reused, not run again, and on to the ranking (which refuses this stand-in's empty metrics).
    del ran["beam"]["options"]["direct_num_workers"]
    with pytest.raises(RuntimeError, match=r"variants without val accuracies"):
        sweep.run_sweep(tmp_path / "s.yaml", tmp_path / "out", tmp_path, tmp_path / "params.yaml", collect)
    # A variant that sets such a key itself, run with it: the same params, reused (the baseline's empty
    # `beam.options: {}` is not a value the experiment should have kept).
    (tmp_path / "s.yaml").write_text(
        yaml.safe_dump({"variants": {"pooled": {"conv_base": {"pooling": "max"}, "beam": {"options": {"x": 2}}}}})
    )
    commit(tmp_path, "a sweep file with a new key")
    ran["beam"]["options"]["x"] = 2
    monkeypatch.setattr(
        sweep, "validate_variants", lambda *args, **kwargs: None
    )  # `x` is no Beam option: only the comparison
    with pytest.raises(RuntimeError, match=r"variants without val accuracies"):
        sweep.run_sweep(tmp_path / "s.yaml", tmp_path / "out", tmp_path, tmp_path / "params.yaml", collect)


def test_a_variant_may_set_a_key_the_baseline_lacks_and_the_others_run_without_it():
    """A variant with an option under `beam.options: {}` crashed the sweep (KeyError looking the baseline up for
    the other variants) and its `-S` was refused by DVC."""
    baseline = {"beam": {"runner": "DirectRunner", "options": {}}, "conv_base": {"pooling": "avg"}}
    file = sweep.SweepFile(
        variants={"two": {"beam": {"options": {"direct_num_workers": 2}}}, "max": {"conv_base": {"pooling": "max"}}}
    )
    values = sweep.variant_values(file, baseline)
    assert values == {
        "two": {"beam.options.direct_num_workers": 2, "conv_base.pooling": "avg"},
        "max": {"conv_base.pooling": "max"},
    }
    assert sweep.variant_args(values, baseline) == {
        "two": ["-S", "+beam.options.direct_num_workers=2", "-S", "conv_base.pooling=avg"],
        "max": ["-S", "conv_base.pooling=max"],
    }


def test_every_variant_runs_from_the_baseline_not_from_the_variant_run_before(tmp_path, monkeypatch):
    """`dvc exp run` leaves its `-S` edits in the workspace's params.yaml: a key the baseline lacks that one variant
    set (`+beam.options.direct_num_workers=2`) stayed for the next ones, which ran with it (`max` was timed on two
    workers) or failed when they set it again (Hydra refuses `+` for a key that exists)."""
    import yaml
    from dvc.utils.hydra import apply_overrides

    from tools import preset

    run(["git", "init", "-q"], tmp_path)
    run([sys.executable, "-m", "dvc", "init", "-q"], tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    variants = {
        "two": {"beam": {"options": {"direct_num_workers": 2}}},
        "max": {"conv_base": {"pooling": "max"}},
        "three": {"beam": {"options": {"direct_num_workers": 3}}},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"variants": variants}, sort_keys=False))
    commit(tmp_path, "baseline")
    baseline = yaml.safe_load((tmp_path / "params.yaml").read_text())
    ran = {}
    real_run = subprocess.run

    def dvc_exp_run(cmd, *args, **kwargs):  # what `dvc exp run -n NAME -S ...` does to the workspace's params
        if list(cmd[1:5]) != ["-m", "dvc", "exp", "run"]:
            return real_run(cmd, *args, **kwargs)
        apply_overrides(tmp_path / "params.yaml", list(cmd[8::2]))
        params = yaml.safe_load((tmp_path / "params.yaml").read_text())
        ran[cmd[6]] = {"rev": cmd[6], "state": None, "error": None, "params": params, "metrics": {}}
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", dvc_exp_run)
    monkeypatch.setattr(sweep, "experiments", lambda repo: dict(ran))
    with pytest.raises(RuntimeError, match=r"variants without val accuracies"):  # the stand-in has no metrics
        sweep.run_sweep(tmp_path / "s.yaml", tmp_path / "out", tmp_path, tmp_path / "params.yaml", False)
    assert set(ran) == {"s-two", "s-max", "s-three"}
    for variant, overrides in variants.items():
        assert ran[f"s-{variant}"]["params"] == preset.merge(baseline, overrides), variant
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == baseline  # and the baseline is back at the end


def test_a_variant_finetune_would_refuse_stops_the_sweep_before_any_run(tmp_path):
    """Each variant's params are validated as every stage loads them, finetune's unfreeze check included: a tapped
    base without an unfreeze point ran extract and train_head before finetune refused it."""
    import yaml

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "s.yaml").write_text(
        yaml.safe_dump({"variants": {"tapped": {"conv_base": {"layer": "block_13_expand_relu"}}}})
    )
    with pytest.raises(ParamsError, match=r"finetune\.unfreeze_from: the base is tapped"):
        sweep.validate_variants(sweep.load_sweep(tmp_path / "s.yaml"), tmp_path / "params.yaml")


def test_a_mapping_one_variant_sets_whole_and_another_inside_stops_the_sweep_before_any_run(tmp_path):
    """Every variant sets every key any variant sets: one variant's `beam.options: {}` with another's
    `beam.options.direct_num_workers` gave the first `-S beam.options={} -S beam.options.direct_num_workers=2` (the
    baseline's), and its experiment ran with the option it had cleared."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["beam"]["options"] = {"direct_num_workers": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    variants = {"none": {"beam": {"options": {}}}, "four": {"beam": {"options": {"direct_num_workers": 4}}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"variants": variants}))
    with pytest.raises(
        ParamsError,
        match=r"beam\.options \(variant none\) and beam\.options\.direct_num_workers \(variant four\)",
    ):
        sweep.validate_variants(sweep.load_sweep(tmp_path / "s.yaml"), tmp_path / "params.yaml")
    sweep.validate_variants(sweep.load_sweep(tmp_path / "s.yaml"), tmp_path / "params.yaml", running=False)  # --collect
    # the same options key by key is a sweep
    variants["none"] = {"beam": {"options": {"direct_num_workers": 1}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"variants": variants}))
    sweep.validate_variants(sweep.load_sweep(tmp_path / "s.yaml"), tmp_path / "params.yaml")


def test_collect_compares_with_the_committed_params_not_an_edit_since(tmp_path, monkeypatch):
    """`--collect` compared the experiments with the working params.yaml: after `dvc exp apply` of the winner (or
    any uncommitted edit) it refused every experiment and told the user to remove them."""
    import yaml

    pooled_sweep(tmp_path)
    ran = yaml.safe_load((tmp_path / "params.yaml").read_text())
    ran["conv_base"]["pooling"] = "max"  # the variant on the committed baseline
    done = {"s-pooled": {"rev": "abc", "state": None, "error": None, "params": ran, "metrics": {}}}
    monkeypatch.setattr(sweep, "experiments", lambda repo: done)
    edited = yaml.safe_load((tmp_path / "params.yaml").read_text())
    edited["finetune"]["epochs"] += 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited))  # uncommitted
    with pytest.raises(RuntimeError, match="variants without val accuracies"):  # past the comparison, to the ranking
        sweep.run_sweep(tmp_path / "s.yaml", tmp_path / "out", tmp_path, tmp_path / "params.yaml", True)


def test_a_baseline_mapping_another_variant_sets_to_one_value_is_passed_key_by_key(tmp_path):
    """A variant that clears `beam.options: {}` gave the others the baseline's options as one
    `-S beam.options={"direct_num_workers":2}`, which DVC's -S refuses (quoted keys), after the variants before had
    run."""
    import yaml
    from dvc.utils.hydra import apply_overrides

    baseline = yaml.safe_load((REPO / "params.yaml").read_text())
    baseline["beam"]["options"] = {"direct_num_workers": 2, "direct_running_mode": "multi_threading"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(baseline, sort_keys=False))
    (tmp_path / "s.yaml").write_text(
        yaml.safe_dump({"variants": {"max": {"conv_base": {"pooling": "max"}}, "none": {"beam": {"options": {}}}}})
    )
    file = sweep.load_sweep(tmp_path / "s.yaml")
    sweep.validate_variants(file, tmp_path / "params.yaml")  # a sweep that runs
    values = sweep.variant_values(file, baseline)
    assert values["max"]["beam.options.direct_num_workers"] == 2 and "beam.options" not in values["max"]
    assert values["none"]["beam.options"] == {}
    args = sweep.variant_args(values, baseline)
    apply_overrides(tmp_path / "params.yaml", args["max"][1::2])  # what dvc exp run does with them
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["beam"]["options"] == baseline["beam"]["options"]


def test_variants_that_change_the_data_are_refused_they_would_be_ranked_on_other_val_images(tmp_path):
    import yaml

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for section, value in (
        ("download", {"fractions": {"train": 0.5, "val": 0.3, "test": 0.2}}),
        ("dataset", {}),
        ("common", {"seed": 7}),  # the seed draws the hash split
    ):
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({"variants": {"a": {}, "wide_val": {section: value}}}))
        with pytest.raises(ParamsError, match=rf"variants set wide_val: {section}: which images are in val"):
            sweep.validate_variants(sweep.load_sweep(tmp_path / "s.yaml"), tmp_path / "params.yaml")
    # experiments run before that refusal, scored on val splits of other sizes: not ranked
    rows = [{**row("a", 0.9, 0.9, 0.9, 0.9), "val_images": 20}, {**row("b", 0.9, 0.95, 0.9, 0.9), "val_images": 500}]
    with pytest.raises(sweep.SweepRefused, match=r"different val splits \(images: \{'a': 20, 'b': 500\}\)"):
        sweep.check_scored(rows)
    rows[1]["val_images"] = 20
    sweep.check_scored(rows)


def test_a_sweep_refuses_to_start_over_uncommitted_code_the_runs_would_use(tmp_path, monkeypatch):
    """`dvc exp run` commits the workspace's edits into each experiment: a variant run before an edit of the code
    or dvc.yaml was ranked beside one run after it, as runs of one commit."""
    import yaml

    pooled_sweep(tmp_path)
    (tmp_path / "train.py").write_text("print('v1')\n")
    (tmp_path / "README.md").write_text("notes\n")
    stage = {"cmd": "python train.py", "deps": ["train.py", "lib"], "outs": ["out"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "r\u00e9glages.py").write_text("A = 1\n")  # a name git quotes without -z
    commit(tmp_path, "code")
    monkeypatch.setattr(sweep, "experiments", lambda repo: {})
    for edit, name in (
        ("train.py", "train.py"),
        ("dvc.yaml", "dvc.yaml"),
        ("lib/r\u00e9glages.py", "lib/r\u00e9glages.py"),
    ):
        (tmp_path / edit).write_text((tmp_path / edit).read_text() + "\n")
        with pytest.raises(
            sweep.SweepRefused, match=rf"files the runs use that no commit holds as they are \({name}\)"
        ):
            sweep.run_sweep(tmp_path / "s.yaml", tmp_path / "out", tmp_path, tmp_path / "params.yaml", False)
        run(["git", "checkout", "-q", "--", edit], tmp_path)
    (tmp_path / "lib" / "new.py").write_text("B = 2\n")  # no commit holds it, and the stage reads its folder
    with pytest.raises(sweep.SweepRefused, match=r"\(lib/new.py\)"):
        sweep.run_sweep(tmp_path / "s.yaml", tmp_path / "out", tmp_path, tmp_path / "params.yaml", False)
    (tmp_path / "lib" / "new.py").unlink()
    (tmp_path / ".git" / "info" / "exclude").write_text("/lib/local.py\n")  # git ignores it, DVC does not hold it
    (tmp_path / "lib" / "local.py").write_text("C = 3\n")
    with pytest.raises(sweep.SweepRefused, match=r"\(lib/local.py\)"):
        sweep.run_sweep(tmp_path / "s.yaml", tmp_path / "out", tmp_path, tmp_path / "params.yaml", False)
    (tmp_path / "lib" / "local.py").unlink()
    # files no stage reads (notes, the sweep file, DVC's .gitignore edits) are not: past that check (to the runs,
    # which this stand-in refuses)
    (tmp_path / "README.md").write_text("more notes\n")
    (tmp_path / "s.yaml").write_text((tmp_path / "s.yaml").read_text() + "\n")
    monkeypatch.setattr(sweep, "variant_args", lambda *a: (_ for _ in ()).throw(KeyError("past the checks")))
    with pytest.raises(KeyError, match="past the checks"):
        sweep.run_sweep(tmp_path / "s.yaml", tmp_path / "out", tmp_path, tmp_path / "params.yaml", False)
    assert sweep.SweepRefused.user_facing  # a message and exit 2, not a traceback


def test_collect_reads_the_projects_committed_params_in_a_folder_of_a_larger_repository(tmp_path):
    """`git show HEAD:params.yaml` names a path from the git root: in a project folder it read the top-level
    repository's params.yaml (or fell back to the working file)."""
    import yaml

    run(["git", "init", "-q"], tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"common": {"seed": 42}}))
    project = tmp_path / "proj"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump({"common": {"seed": 1337}}))
    commit(tmp_path, "two params files")
    (project / "params.yaml").write_text(yaml.safe_dump({"common": {"seed": 7}}))  # an edit since
    assert sweep.committed_params(project, project / "params.yaml") == {"common": {"seed": 1337}}


def test_a_sweep_file_that_is_not_yaml_is_a_clear_error(tmp_path):
    (tmp_path / "s.yaml").write_text("variants: {a: [1, 2}\n")
    with pytest.raises(ParamsError, match=r"s.yaml: not valid YAML"):
        sweep.load_sweep(tmp_path / "s.yaml")
    with pytest.raises(ParamsError, match=r"missing.yaml: cannot read it"):
        sweep.load_sweep(tmp_path / "missing.yaml")
