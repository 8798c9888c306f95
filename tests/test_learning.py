"""A test that fails when learning breaks: a short CrIBo run must beat random initialisation.

The run and its score are :mod:`benchmarks.learning_check`: the preset's network (ViT-Tiny/16, 6 blocks,
96 px, batches of 4) trained for 6 epochs of 1,024 easy synthetic scenes (1,536 iterations, about 200 s),
scored by dense-NN retrieval (memory of 16,000 patches from 500 scenes, 200 queries, 128 px) on scenes that
nothing trains or tunes on.

Margin. ``python benchmarks/learning_check.py --train_seeds 0 1 2 --init_seeds 0 1 2`` (two threads,
``benchmarks/results/learning_check.json``; run with ``--train_flags "--synthetic_num_train 1024"``, the
schedule now built in) measured: random init 28.42 / 30.60 / 29.39 (half-range 1.09), trained 36.24 /
37.03 / 34.33 (half-range 1.35); the worst trained seed beats the best random seed by 3.73. The test asks
training seed 0 to beat the better of random seeds 0 and 1 by MARGIN = 2.5 points, which leaves 1.2 points
for a worse training seed than measured. That is 1.9 times the larger seed spread, not the 5 times we
aim for: this small protocol's random inits spread by ±1.1. A broken objective (the image-level loss alone
gains 4.5 points over random init in the README's protocol, against 13.7 for CrIBo) would not be
guaranteed to fail; a broken pipeline (no learning at all) fails by the whole margin.
"""

import pytest

from benchmarks import learning_check

MARGIN = 2.5  # worst measured gap 3.73 minus a 1.2-point allowance (see the docstring)


@pytest.mark.slow
def test_short_run_beats_random_init(tmp_path):
    random_scores = [learning_check.dense_score(learning_check.random_backbone(seed)) for seed in (0, 1)]
    trained = learning_check.dense_score(learning_check.trained_backbone(tmp_path, train_seed=0))
    assert trained >= max(random_scores) + MARGIN, (
        f"a short CrIBo run reads {trained:.2f} dense-NN mIoU against {random_scores} for random init: "
        f"learning is broken (it must beat random init by {MARGIN} points)"
    )
