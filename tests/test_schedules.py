"""util.schedules: the lr and momentum schedules as pure functions of progress."""
import pytest

from util.schedules import poly_lr


def test_poly_lr_decays_linearly_to_min_lr_with_power_one():
    assert poly_lr(0, 1e-4, 1000) == pytest.approx(1e-4)
    assert poly_lr(250, 1e-4, 1000) == pytest.approx(0.75e-4)
    assert poly_lr(1000, 1e-4, 1000) == 0.0
    assert poly_lr(1500, 1e-4, 1000, min_lr=1e-6) == pytest.approx(1e-6)  # past the end: held at min_lr
    assert poly_lr(500, 1.0, 1000, power=2.0, min_lr=0.2) == pytest.approx(0.8 * 0.25 + 0.2)


def test_poly_warmup_multiplies_the_scheduled_lr_from_warmup_ratio_to_one():
    """mmcv's linear warmup: lr(it) = poly(it) x (1 - (1 - it / warmup) x (1 - ratio)), so it starts at ratio x lr
    and meets the poly decay (not the base lr) at the end of the warmup."""
    base, total, warmup, ratio = 1e-4, 160000, 1500, 1e-6
    assert poly_lr(0, base, total, warmup_iters=warmup, warmup_ratio=ratio) == pytest.approx(base * ratio)
    half = poly_lr(750, base, total, warmup_iters=warmup, warmup_ratio=ratio)
    assert half == pytest.approx(poly_lr(750, base, total) * (0.5 + 0.5 * ratio))
    assert poly_lr(warmup, base, total, warmup_iters=warmup, warmup_ratio=ratio) == poly_lr(warmup, base, total)
    values = [poly_lr(i, base, total, warmup_iters=warmup, warmup_ratio=ratio) for i in range(0, 3000, 100)]
    peak = values.index(max(values))
    assert values[:peak] == sorted(values[:peak]) and values[peak:] == sorted(values[peak:], reverse=True)
    assert peak * 100 == warmup
