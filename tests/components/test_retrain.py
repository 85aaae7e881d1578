import pytest

from components.params import ParamsError, parse_section
from components.retrain import RetrainParams, decide, metric_of

PARAMS = RetrainParams(threshold=0.9, tolerance=0.01)


@pytest.mark.parametrize(
    "candidate, promoted, expected, why",
    [
        (0.95, None, True, "nothing was promoted before"),
        (0.85, None, False, "below the threshold 0.9000"),
        (0.95, 0.955, True, "within 0.01"),  # a drop inside the tolerance
        (0.95, 0.97, False, "regresses beyond the tolerance 0.01 from the promoted 0.9700"),
        (0.99, 0.97, True, "above"),
        (0.89, 0.80, False, "below the threshold"),  # better than the promoted one, still not good enough
        (None, 0.9, False, "has no finetune val accuracy"),
    ],
)
def test_promotion_gate(candidate, promoted, expected, why):
    promote, reason = decide(candidate, promoted, PARAMS)
    assert promote is expected and why in reason


def test_the_gate_reads_the_validation_split_never_the_test_split():
    metrics = {"finetune": {"val": {"accuracy": 0.9}, "test": {"accuracy": 0.99}}}
    assert metric_of(metrics, PARAMS) == 0.9
    assert metric_of(metrics, PARAMS, "test") == 0.99  # reported beside the decision
    assert metric_of({"finetune": {"test": {"accuracy": 0.99}}}, PARAMS) is None  # no val: no decision from test
    assert metric_of({"head": {"val": {"accuracy": 0.9}}}, PARAMS) is None
    promote, reason = decide(metric_of(metrics, PARAMS), None, RetrainParams(threshold=0.95))
    assert not promote and "finetune val accuracy 0.9000 is below the threshold" in reason  # though test is 0.99


def test_metric_lookup_and_params():
    with pytest.raises(ParamsError, match=r"retrain\.metric"):
        parse_section(RetrainParams, "retrain", {"metric": "loss"})  # lower is better: not a gate metric
