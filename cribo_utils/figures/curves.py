"""Figure 5, ``curves``: the training curves of a ``log.txt`` against the iteration.

:func:`read_training_curves` splits the records read by :func:`cribo_utils.runtime.logger.read_log` into
per-iteration and per-epoch series (:class:`TrainingCurves`); :func:`plot_curves` draws every loss term,
the schedules, the cluster count, the cycle-consistent fraction and the throughput.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cribo_utils.figures.drawing import CURVE_PANEL, DEFAULT_DPI, _new_grid, _save

#: Panels of the curves figure: title and the log.txt keys drawn in it.
CURVE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("losses", ("loss", "loss_img", "loss_obj", "loss_nn")),
    ("learning rate", ("lr",)),
    ("weight decay", ("wd",)),
    ("teacher momentum", ("momentum",)),
    ("valid clusters per image", ("clusters_per_image",)),
    ("cycle-consistent fraction", ("nn_fraction", "nn_fraction_2")),
    ("throughput (images/s)", ("images_per_s",)),
)


# Key prefixes of the per-epoch records: DINO's, and that of logs written by earlier versions.
_EPOCH_PREFIXES = ("train_", "epoch_")


@dataclass
class TrainingCurves:
    """Series read from a ``log.txt``.

    Attributes:
        steps: key -> (iterations, values) of the per-iteration records.
        epochs: key -> (iterations, values) of the per-epoch averages, keyed without their ``train_`` prefix
            (``epoch_`` in logs of earlier versions).
    """

    steps: dict[str, tuple[np.ndarray, np.ndarray]]
    epochs: dict[str, tuple[np.ndarray, np.ndarray]]


def read_training_curves(log_path: str | os.PathLike[str]) -> TrainingCurves:
    """Parse a training run's logs (``log.txt`` and the ``log_iterations.txt`` beside it, the JSON lines of
    :class:`cribo_utils.runtime.logger.MetricLogger`, read by
    :func:`cribo_utils.runtime.logger.read_training_log`) into series.

    A record with ``train_``-prefixed keys (DINO's epoch record: ``train_loss``, ``train_lr``, ``train_wd``,
    ..., and ``epoch``; ``epoch_``-prefixed in logs of earlier versions) is a per-epoch average; every other
    record with an ``iteration`` is a per-iteration record. Non-numeric values are skipped.

    Args:
        log_path: the ``log.txt`` file, or the training output folder holding it (any other file name is
            read alone).
    Raises:
        FileNotFoundError: no log file there.
        ValueError: a line is not JSON, or no record has an ``iteration``.
    """
    from cribo_utils.runtime.logger import EPOCH_LOG, read_log, read_training_log

    path = Path(log_path)
    if path.is_dir():
        path = path / EPOCH_LOG
    try:
        records = read_training_log(path) if path.name == EPOCH_LOG else read_log(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"--log {str(path)!r}: no such file; pass the log.txt of a training run (or its --output_dir)"
        ) from error
    except ValueError as error:
        raise ValueError(f"--log {error}") from error
    steps: dict[str, list[tuple[float, float]]] = {}
    epochs: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        if not isinstance(record, dict) or "iteration" not in record:
            continue
        prefix = next((p for p in _EPOCH_PREFIXES if any(key.startswith(p) for key in record)), None)
        for key, value in record.items():
            if (
                key in ("iteration", "epoch")
                or isinstance(value, bool)
                or not isinstance(value, (int, float))
            ):
                continue
            if prefix is not None:
                if key.startswith(prefix):
                    epochs.setdefault(key.removeprefix(prefix), []).append((record["iteration"], value))
            else:
                steps.setdefault(key, []).append((record["iteration"], value))
    if not steps and not epochs:
        raise ValueError(
            f"--log {str(path)!r}: no record with an 'iteration' key; is this a CrIBo training log?"
        )

    def as_arrays(series: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for key, points in series.items():
            array = np.asarray(points, dtype=np.float64)
            out[key] = (array[:, 0], array[:, 1])
        return out

    return TrainingCurves(steps=as_arrays(steps), epochs=as_arrays(epochs))


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values: ``out_t = mean(v_{max(0, t-w+1) .. t})``."""
    if window < 1:
        raise ValueError(f"moving_average: window must be >= 1, got {window}")
    cumulative = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[start]) / (index - start)


def plot_curves(
    log_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    smooth: int | None = None,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Figure 5: training curves from ``log.txt`` against the iteration.

    Panels (:data:`CURVE_PANELS`): every loss term, learning rate, weight decay, teacher momentum, valid
    clusters per image, cycle-consistent fraction of both directions and throughput. Per-iteration values
    are drawn as thin lines (with a trailing moving average of ``smooth`` records on top when there are
    many), per-epoch averages as markers. A panel whose keys were never logged says so.

    Args:
        log_path: ``log.txt`` or the training output folder.
        out_path: PNG to write.
        smooth: moving-average window; None picks ``len / 50`` for logs longer than 200 records.
        dpi: resolution (figure is ``4 * 4.0 * dpi`` by ``2 * 3.0 * dpi`` pixels).
    Returns:
        The path written.
    """
    curves = read_training_curves(log_path)
    rows, cols = 2, 4
    figure, axes = _new_grid(rows, cols, CURVE_PANEL, dpi)
    flat_axes = axes.flatten()
    for ax, (title, keys) in zip(flat_axes, CURVE_PANELS, strict=False):
        drawn = False
        for colour_index, key in enumerate(keys):
            colour = f"C{colour_index}"
            if key in curves.steps:
                x, y = curves.steps[key]
                window = smooth if smooth is not None else (max(1, len(y) // 50) if len(y) > 200 else 1)
                ax.plot(x, y, color=colour, linewidth=0.8, alpha=0.4 if window > 1 else 1.0, label=key)
                if window > 1:
                    ax.plot(x, moving_average(y, window), color=colour, linewidth=1.2)
                drawn = True
            if key in curves.epochs:
                x, y = curves.epochs[key]
                ax.plot(
                    x,
                    y,
                    "o",
                    color=colour,
                    markersize=4,
                    markeredgecolor="black",
                    markeredgewidth=0.5,
                    label=f"{key} (epoch mean)" if key not in curves.steps else None,
                )
                drawn = True
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.yaxis.get_offset_text().set_fontsize(7)
        ax.set_xlabel("iteration", fontsize=7)
        ax.grid(alpha=0.3)
        if drawn:
            if len(keys) > 1:
                ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, fontsize=9)
    for ax in flat_axes[len(CURVE_PANELS) :]:
        ax.axis("off")
    figure.suptitle(f"training curves: {log_path}", fontsize=9)
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.1, top=0.88, wspace=0.3, hspace=0.55)
    return _save(figure, out_path, dpi)
