import math

import numpy as np

from cribo_utils.method.schedules import cosine_schedule, teacher_temperature


def test_cosine_schedule_matches_the_formula():
    base, final, epochs, iters, warmup = 2.0, 0.1, 5, 4, 2
    schedule = cosine_schedule(base, final, epochs, iters, warmup_epochs=warmup)
    assert schedule.shape == (epochs * iters,)
    warm = warmup * iters
    np.testing.assert_allclose(schedule[:warm], np.linspace(0, base, warm))
    assert schedule[warm - 1] == base  # the warm-up ends exactly at the peak
    n = epochs * iters - warm
    for t in range(n):
        expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / n))
        assert math.isclose(schedule[warm + t], expected, rel_tol=1e-12)
    assert schedule[-1] > final  # reference quirk: cos(pi (n-1)/n), never exactly final


def test_momentum_schedule_stays_below_one():
    schedule = cosine_schedule(0.996, 1.0, 3, 5)
    assert schedule[0] == 0.996 and np.all(schedule < 1.0) and np.all(np.diff(schedule) > 0)


def test_teacher_temperature_by_epoch():
    assert teacher_temperature(0.04, 0.07, 30, 0) == 0.04
    assert math.isclose(teacher_temperature(0.04, 0.07, 30, 29), 0.07)
    assert math.isclose(teacher_temperature(0.04, 0.07, 31, 15), 0.055)
    assert teacher_temperature(0.04, 0.07, 30, 100) == 0.07
    assert teacher_temperature(0.04, 0.07, 0, 0) == 0.07
