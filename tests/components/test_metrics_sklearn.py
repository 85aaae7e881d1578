"""Every metric and curve evaluate writes, cross-checked against scikit-learn on random predictions.

evaluate computes them with NumPy (no scikit-learn at run time); these tests fail when one of
them stops agreeing with the reference implementation, ties and multi-class included.
"""

import json

import numpy as np
import pytest

sklearn_metrics = pytest.importorskip("sklearn.metrics")

scipy_stats = pytest.importorskip("scipy.stats")

from components import evaluate  # noqa: E402


def random_predictions(seed: int, n: int, classes: int, ties: bool):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    labels[:classes] = np.arange(classes)  # every class present
    logits = rng.normal(size=(n, classes)) + 1.5 * np.eye(classes)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if ties:
        probs = np.round(probs, 1) + 0.01  # many tied scores (none near 0: evaluate clips at 1e-7 as Keras does)
        probs /= probs.sum(axis=1, keepdims=True)
    return labels, probs


CASES = [(seed, classes, ties) for seed, classes, ties in ((0, 2, False), (1, 2, True), (2, 3, False), (3, 5, True))]


@pytest.mark.parametrize("seed,classes,ties", CASES)
def test_metrics_agree_with_scikit_learn(seed, classes, ties):
    labels, probs = random_predictions(seed, 200, classes, ties)
    names = [f"c{i}" for i in range(classes)]
    m = evaluate.classification_metrics(labels, probs, names)
    predicted = probs.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(labels, predicted))
    assert m["confusion_matrix"] == sklearn_metrics.confusion_matrix(labels, predicted, labels=range(classes)).tolist()
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        labels, predicted, labels=range(classes), zero_division=0
    )
    for i, name in enumerate(names):
        assert m["per_class"][name] == {
            "precision": pytest.approx(precision[i]),
            "recall": pytest.approx(recall[i]),
            "f1": pytest.approx(f1[i]),
            "support": int(support[i]),
        }
    assert m["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(labels, predicted, average="macro"))
    assert m["loss"] == pytest.approx(sklearn_metrics.log_loss(labels, probs, labels=range(classes)), rel=1e-6)
    expected_auc = (
        sklearn_metrics.roc_auc_score(labels, probs[:, 1])
        if classes == 2
        else sklearn_metrics.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    )
    assert m["roc_auc"] == pytest.approx(expected_auc)
    interval = scipy_stats.binomtest(int(np.sum(predicted == labels)), len(labels)).proportion_ci(method="wilson")
    assert (m["accuracy_low"], m["accuracy_high"]) == (pytest.approx(interval.low), pytest.approx(interval.high))
    assert m["macro_f1_low"] < m["macro_f1"] < m["macro_f1_high"]


def test_macro_f1_over_a_split_without_one_class_agrees_with_scikit_learn():
    # the vocabulary comes from train, so val or test may lack a class: it must not count as a class scored 0
    labels, probs = random_predictions(4, 120, 4, False)
    keep = labels != 2
    labels, probs = labels[keep], probs[keep]
    probs[:, 2] = 0.0  # never predicted either
    probs /= probs.sum(axis=1, keepdims=True)
    m = evaluate.classification_metrics(labels, probs, [f"c{i}" for i in range(4)])
    assert m["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(labels, probs.argmax(axis=1), average="macro"))
    assert m["per_class"]["c2"]["support"] == 0
    assert m["roc_auc"] is None  # the README: null where the split lacks a class (not the mean over the others)
    one_class = evaluate.classification_metrics(np.zeros(6, int), np.tile([0.7, 0.3], (6, 1)), ["a", "b"])
    assert one_class["roc_auc"] is None
    y = labels % 3  # classes 0 and 1 only: a perfect model on it, class 2 absent and never predicted
    assert evaluate.classification_metrics(y, np.eye(3)[y], ["a", "b", "c"])["macro_f1"] == 1.0


def test_the_macro_f1_interval_of_a_rare_class_does_not_collapse():
    # a perfect binary model, 97 to 3: resamples that drew none of the rare class used to score it 0 (F1 0.5)
    labels = np.array([0] * 97 + [1] * 3)
    m = evaluate.classification_metrics(labels, np.eye(2)[labels], ["common", "rare"])
    assert m["macro_f1"] == 1.0 and m["macro_f1_low"] == 1.0 and m["macro_f1_high"] == 1.0


def test_the_macro_f1_interval_scores_every_class_in_every_resample():
    """A review: 400 images of four classes read right and a 2-image fifth class the model always misses (macro F1
    0.79). Resampling the images regardless of class, 14% of resamples drew neither of the two, scored over four
    classes (0.99), and the interval's upper end was 0.995, a figure the model never reached. Stratified, each
    resample holds both, wrong: the interval stays at the model's figure."""
    labels = np.array([0, 1, 2, 3] * 100 + [4, 4])
    predicted = np.where(labels == 4, 0, labels)
    m = evaluate.classification_metrics(labels, np.eye(5)[predicted], [f"c{i}" for i in range(5)])
    assert m["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(labels, predicted, average="macro"))
    assert m["macro_f1_low"] <= m["macro_f1"] <= m["macro_f1_high"] < m["macro_f1"] + 0.01, m


def test_the_macro_f1_interval_keeps_a_class_only_predicted_in_every_resample():
    """A second review: one image of 400 predicted as a class the split lacks (F1 0) scores that class in the macro
    F1; resamples that drew no such image dropped it, and the interval's upper end was 1.0."""
    labels = np.array([0, 1, 2, 3] * 100)
    predicted = labels.copy()
    predicted[0] = 4
    m = evaluate.classification_metrics(labels, np.eye(5)[predicted], [f"c{i}" for i in range(5)])
    assert m["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(labels, predicted, average="macro"))
    assert m["macro_f1_low"] <= m["macro_f1"] <= m["macro_f1_high"] < m["macro_f1"] + 0.01, m


def test_a_class_the_split_lacks_and_no_model_predicts_has_no_figures_not_zeros():
    """A review: a perfect model on a split without tulips reported tulip precision, recall and F1 0 (a zero bar in
    the per-class plot, a drop to 0 in `dvc metrics diff`) beside a macro F1 of 1.0 that left tulips out."""
    labels = np.array([0, 1, 0, 1, 0])
    m = evaluate.classification_metrics(labels, np.eye(3)[labels], ["daisy", "rose", "tulip"])
    assert m["macro_f1"] == 1.0
    assert m["per_class"]["tulip"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert [row["class"] for row in evaluate.per_class_rows(m)] == ["daisy", "rose"]
    # predicted but not in the split: figures (precision 0, recall 0 as scikit-learn's zero_division=0), and a bar
    wrong = evaluate.classification_metrics(labels, np.eye(3)[[0, 1, 0, 1, 2]], ["daisy", "rose", "tulip"])
    assert wrong["per_class"]["tulip"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert [row["class"] for row in evaluate.per_class_rows(wrong)] == ["daisy", "rose", "tulip"]


def test_the_roc_files_first_point_has_no_threshold():
    """A review: the (0, 0) start of the ROC rows was written with threshold 1.0, beside a row of scores of exactly
    1.0 at another point, so a threshold picked from the file could land on (0, 0)."""
    labels = np.array([1, 1, 0, 0])
    probs = np.array([[0.0, 1.0], [0.2, 0.8], [0.0, 1.0], [0.9, 0.1]], dtype=np.float32)
    roc, _ = evaluate.curve_rows(labels, probs)
    assert roc[0] == {"fpr": 0.0, "tpr": 0.0, "threshold": None}
    assert roc[1]["threshold"] == 1.0 and (roc[1]["fpr"], roc[1]["tpr"]) == (0.5, 0.5)
    assert json.loads(json.dumps(roc)) == roc  # plain JSON (no Infinity)


def test_a_two_class_split_of_one_class_has_no_curves():
    """A review: a binary test split holding only one class got ROC and precision-recall rows, a line of zeros (a
    model finding no positives among images that hold none), where its AUC was rightly null; scikit-learn calls
    that ROC undefined. Its file is now empty (DVC draws no line), the AUC null as before; so is the
    precision-recall file without positives (recall 0 of 0), while with positives only it is defined (precision 1)."""
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=np.float32)
    for labels in (np.array([0, 0, 0]), np.array([1, 1, 1])):
        assert evaluate.classification_metrics(labels, probs, ["cat", "dog"])["roc_auc"] is None
    assert evaluate.curve_rows(np.array([0, 0, 0]), probs) == ([], [])
    roc, pr = evaluate.curve_rows(np.array([1, 1, 1]), probs)
    assert roc == [] and [row["precision"] for row in pr] == [1.0, 1.0, 1.0]
    assert [row["recall"] for row in pr] == pytest.approx([1 / 3, 2 / 3, 1.0])
    roc, pr = evaluate.curve_rows(np.array([0, 1, 0]), probs)  # both classes: curves
    assert len(roc) == 4 and len(pr) == 3


@pytest.mark.parametrize("seed,classes,ties", CASES)
def test_curves_agree_with_scikit_learn(seed, classes, ties):
    labels, probs = random_predictions(seed, 200, classes, ties)
    # two classes: the positive class's score; more: micro-averaged one-vs-rest, as evaluate plots them
    if classes == 2:
        positive, scores = labels == 1, probs[:, 1]
    else:
        positive, scores = (np.eye(classes)[labels] == 1).ravel(), probs.ravel()
    fpr, tpr, _ = evaluate.roc_curve(positive, scores)
    ref_fpr, ref_tpr, _ = sklearn_metrics.roc_curve(positive, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert evaluate.auc(fpr, tpr) == pytest.approx(sklearn_metrics.auc(ref_fpr, ref_tpr))
    precision, recall, _ = evaluate.precision_recall_curve(positive, scores)
    ref_precision, ref_recall, _ = sklearn_metrics.precision_recall_curve(positive, scores, drop_intermediate=False)
    # scikit-learn appends the (recall 0, precision 1) end point and orders by decreasing threshold
    np.testing.assert_allclose(precision, ref_precision[:-1][::-1])
    np.testing.assert_allclose(recall, ref_recall[:-1][::-1])
    roc_rows, pr_rows = evaluate.curve_rows(labels, probs)
    np.testing.assert_allclose([r["fpr"] for r in roc_rows], ref_fpr)
    np.testing.assert_allclose([r["precision"] for r in pr_rows], ref_precision[:-1][::-1])
