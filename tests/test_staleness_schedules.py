import math

import pytest
import torch

from fastagg import schedules, staleness
from fastagg.correction import Teacher


@pytest.mark.parametrize("s", [0, 1, 3, 4, 1000])
def test_staleness_functions_match_formulas(s):
    assert staleness.constant()(s) == 1.0
    assert staleness.polynomial(0.5)(s) == pytest.approx((1 + s) ** -0.5, rel=1e-15)
    assert staleness.polynomial(2.0)(s) == pytest.approx(1.0 / (1 + s) ** 2, rel=1e-15)
    a, b = 10.0, 3
    expected = 1.0 if s <= b else 1.0 / (a * (s - b) + 1.0)
    assert staleness.hinge(a, b)(s) == pytest.approx(expected, rel=1e-15)


def test_hinge_at_b_and_b_plus_one():
    h = staleness.hinge(a=4.0, b=5)
    assert h(5) == 1.0
    assert h(6) == pytest.approx(1 / 5)
    assert h(1000) == pytest.approx(1 / (4 * 995 + 1))


def test_staleness_resolve_and_bad_values():
    assert isinstance(staleness.resolve("hinge"), staleness.hinge)
    with pytest.raises(ValueError, match="unknown staleness"):
        staleness.resolve("linear")
    with pytest.raises(ValueError):
        staleness.polynomial(-1)


def _teacher(probs):
    C = probs.shape[-1]
    conf = float((probs.max(-1).values.mean() - 1 / C) / (1 - 1 / C))
    return Teacher(0, probs, conf, None)


def test_schedule_values_at_chosen_versions():
    assert schedules.constant(0.3)(123, None) == 0.3
    lw = schedules.linear_warmup(2.0, 50)
    assert [lw(t, None) for t in (0, 25, 50, 500)] == [0.0, 1.0, 2.0, 2.0]
    es = schedules.exp_saturation(1.5, 10.0)
    assert es(0, None) == 0.0
    assert es(10, None) == pytest.approx(1.5 * (1 - math.exp(-1)))
    sg = schedules.sigmoid(2.0, center=40, k=0.1)
    assert sg(40, None) == pytest.approx(1.0)
    assert sg(60, None) == pytest.approx(2.0 / (1 + math.exp(-2)))


def test_teacher_confidence_zero_for_uniform_and_grows_with_sharpness():
    sched = schedules.teacher_confidence(1.0)
    C = 7
    uniform = torch.full((11, C), 1.0 / C)
    assert sched(5, _teacher(uniform)) == pytest.approx(0.0, abs=1e-7)
    logits = torch.randn(11, C)
    values = [sched(5, _teacher(torch.softmax(logits * sharp, -1))) for sharp in (0.5, 2.0, 8.0, 100.0)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] > 0.95


def test_teacher_accuracy_needs_labels():
    t = Teacher(0, torch.full((3, 2), 0.5), 0.0, 0.75)
    assert schedules.teacher_accuracy(2.0)(0, t) == 1.5
    with pytest.raises(ValueError, match="proxy labels"):
        schedules.teacher_accuracy()(0, Teacher(0, t.probs, 0.0, None))
