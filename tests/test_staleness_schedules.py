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


def test_teacher_confidence_zero_for_uniform_and_grows_with_sharpness(rng):
    sched = schedules.teacher_confidence(1.0)
    C = 7
    uniform = torch.full((11, C), 1.0 / C)
    assert sched(5, _teacher(uniform)) == pytest.approx(0.0, abs=1e-7)
    # each row's top logit 0.5 above the next (a near tie would keep the sharpest teacher unsure)
    logits = torch.randn(11, C, generator=rng)
    logits[torch.arange(11), logits.argmax(-1)] += 0.5
    values = [sched(5, _teacher(torch.softmax(logits * sharp, -1))) for sharp in (0.5, 2.0, 8.0, 100.0)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] > 0.95


def test_teacher_accuracy_needs_labels():
    t = Teacher(0, torch.full((3, 2), 0.5), 0.0, 0.75)
    assert schedules.teacher_accuracy(2.0)(0, t) == 1.5
    with pytest.raises(ValueError, match="proxy labels"):
        schedules.teacher_accuracy()(0, Teacher(0, t.probs, 0.0, None))


def test_sigmoid_far_from_its_center_does_not_overflow():
    """exp(-k (t - center)) overflows a float a long way before the center (k = 1, center 1000:
    exp(1000)), which raised OverflowError in every merge before it; the two-sided form equals
    the plain formula in float64 wherever that does not overflow."""
    sg = schedules.sigmoid(2.0, center=1000, k=1.0)
    assert sg(0, None) == 0.0 and sg(1000, None) == 1.0 and sg(10**6, None) == 2.0
    for k, center in ((0.05, 100.0), (0.7, 3.0)):
        s = schedules.sigmoid(1.5, center=center, k=k)
        for t in range(0, 300, 7):
            assert s(t, None) == pytest.approx(1.5 / (1 + math.exp(-k * (t - center))), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("make", [
    lambda: schedules.constant(-0.5), lambda: schedules.constant(float("nan")),
    lambda: schedules.linear_warmup(1.0, 0), lambda: schedules.exp_saturation(1.0, 0.0),
    lambda: schedules.sigmoid(1.0, 10, float("inf")), lambda: schedules.teacher_confidence(-1.0),
    lambda: schedules.teacher_accuracy(float("nan")), lambda: staleness.polynomial(float("nan"))],
    ids=["constant<0", "constant nan", "warmup 0", "kappa 0", "k inf", "confidence<0", "accuracy nan", "poly nan"])
def test_schedule_settings_that_give_nan_or_a_negative_weight_are_refused(make):
    with pytest.raises(ValueError, match="finite"):
        make()


@pytest.mark.parametrize("kw", [dict(temperature=float("nan")), dict(rho=float("nan")), dict(rho=-1.0),
                                dict(eta=-0.1), dict(eta=float("inf")), dict(steps=1.5), dict(min_staleness=-1),
                                dict(min_staleness=0.5)],
                         ids=["T nan", "rho nan", "rho<0", "eta<0", "eta inf", "steps float", "min_s<0", "min_s float"])
def test_correction_settings_refused_where_given(kw):
    """rho = NaN made every corrected model NaN; a negative rho or eta stepped up the KD loss."""
    import fastagg

    with pytest.raises(ValueError, match=next(iter(kw))):
        fastagg.KDCorrection(torch.randn(4, 3), **kw)


def test_a_user_schedule_that_gives_nan_fails_the_merge_and_changes_nothing():
    """A callable schedule is the user's code: a NaN (or negative) lambda from it is refused in the
    merge, which then changes nothing (the submit that set it off is undone); fixed, the retry merges."""
    import fastagg

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    bad = [True]
    corr = fastagg.KDCorrection(torch.randn(8, 4), schedule=lambda v, t: float("nan") if bad[0] else 0.5, steps=1)
    agg = fastagg.Aggregator(model, fastagg.FedBuff(2), correction=corr)
    P = agg.spec.numel
    g = torch.Generator().manual_seed(1)
    d = [0.1 * torch.randn(P, generator=g) for _ in range(4)]
    agg.submit(d[0], base_version=0)
    agg.submit(d[1], base_version=0)  # version 1
    agg.submit(d[2], base_version=0)  # stale: corrected at the next merge
    before = (agg.params.clone(), agg.version, agg.stats()["buffered"])
    with pytest.raises(ValueError, match="lambda schedule"):
        agg.submit(d[3], base_version=0)
    assert torch.equal(agg.params, before[0]) and agg.version == 1 and agg.stats()["buffered"] == 1
    bad[0] = False
    assert agg.submit(d[3], base_version=0).status == "merged" and bool(torch.isfinite(agg.params).all())
    assert agg.stats()["corrected"] == 2


@pytest.mark.parametrize("where", ["merge weights", "correction factor"])
@pytest.mark.parametrize("value", [float("nan"), -0.5, 1.5])
def test_a_user_staleness_function_out_of_range_fails_the_merge_and_changes_nothing(where, value):
    """A callable staleness function that gives NaN, a negative weight or one over 1 (as the merge
    weight w(s), or as the correction's c(s) = 1 - w(s)): the merge raises and changes nothing;
    with the function fixed, the retry merges."""
    import fastagg

    torch.manual_seed(0)
    bad = [True]

    def w(s):
        return value if bad[0] and s > 0 else 1.0 / (1 + s)

    corr = fastagg.KDCorrection(torch.randn(8, 4), schedule=0.5, steps=1, staleness_factor="grows",
                                factor_staleness=w if where == "correction factor" else None)
    agg = fastagg.Aggregator(torch.nn.Linear(4, 3), fastagg.FedBuff(2), correction=corr,
                             staleness=w if where == "merge weights" else "polynomial")
    g = torch.Generator().manual_seed(1)
    d = [0.1 * torch.randn(agg.spec.numel, generator=g) for _ in range(4)]
    agg.submit(d[0], base_version=0)
    agg.submit(d[1], base_version=0)  # version 1, both fresh (s = 0)
    agg.submit(d[2], base_version=0)  # s = 1
    before = agg.params.clone()
    with pytest.raises(ValueError, match="staleness"):
        agg.submit(d[3], base_version=1)
    assert torch.equal(agg.params, before) and agg.version == 1 and agg.stats()["buffered"] == 1
    bad[0] = False
    assert agg.submit(d[3], base_version=1).status == "merged" and bool(torch.isfinite(agg.params).all())
