"""A test that fails when learning breaks: a short CrIBo run must beat random initialisation.

The run and its score are :mod:`benchmarks.learning_check` (the preset's network on the easy synthetic
scenes, SHORT_RUN_FLAGS; a small dense-NN protocol on scenes that nothing trains or tunes on).

Margin. ``python benchmarks/learning_check.py --train_seeds 0 1 2 --init_seeds 0 1 2 TRAIN_FLAGS``
(``benchmarks/results/learning_check.json``) measured, on this protocol: MEASURED. The test asks the
trained network (training seed 0) to beat the mean of the three random initialisations by MARGIN mIoU
points: RATIONALE.
"""

import pytest

from benchmarks import learning_check

RANDOM_MEAN = None  # filled from the measurement
MARGIN = None


@pytest.mark.slow
def test_short_run_beats_random_init(tmp_path):
    random_scores = [learning_check.dense_score(learning_check.random_backbone(seed)) for seed in (0, 1)]
    trained = learning_check.dense_score(learning_check.trained_backbone(tmp_path, train_seed=0))
    assert trained >= max(random_scores) + MARGIN, (
        f"a short CrIBo run reads {trained:.2f} dense-NN mIoU against {random_scores} for random init: "
        f"learning is broken (it must beat random init by {MARGIN} points)"
    )
