"""Flags and start-up checks shared by the three evaluations (``eval_knn.py``, ``eval_linear.py``,
``eval_dense_nn.py``).

- **Spellings.** DINO's names where DINO has one (``--batch_size_per_gpu``, ``--num_workers``, ``--seed``,
  ``--output_dir``, ``--dist_url``, ``--nb_knn``, ``--num_labels``), ``main_cribo.py``'s otherwise
  (``--dataset_type``, ``--image_size``); older spellings stay as aliases (``--dataset``, ``--input_size``,
  ``--num_neighbours``, ``--no_train_aug``, ...). Booleans: :mod:`cribo_utils.runtime.flags`.
- **Seeds.** ``--seed`` seeds everything, the random initialisation of a network evaluated without weights
  included; ``--init_seed`` still overrides the latter alone (random baselines over several inits).
- **Results.** ``--output_dir`` (default: the folder of ``--pretrained_weights``, ``./output`` without
  weights) receives one file per evaluation, dataset and protocol (``eval_knn_<dataset>.json``,
  ``eval_dense_nn_voc.json``, ...); a file holding the result of other weights is never replaced
  (:func:`check_result_owner`), and ``--output_json`` names the file exactly. The folder must be writable:
  checked before any data is read (:func:`check_writable`).
- **Errors.** A bad flag, folder or layout stops the run with one line (:data:`EVAL_ERRORS`), before any
  network is built.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cribo_utils.runtime.flags import add_dist_url_flag
from cribo_utils.weights.checkpoint_formats import LOADING_ERRORS
from data.datasets import DatasetLayoutError, ImageReadError


class EvalConfigError(ValueError):
    """A flag combination or an output folder that cannot work; the one-line message names the fix."""


#: Errors the evaluation launchers report in one line, without a traceback.
EVAL_ERRORS: tuple[type[BaseException], ...] = (
    *LOADING_ERRORS,
    DatasetLayoutError,
    ImageReadError,
    EvalConfigError,
    MemoryError,
)


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every default shown (a None default is described by the help text itself); the
    description and epilog are printed as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "Default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_run_flags(
    parser: argparse.ArgumentParser, batch_size_per_gpu: int, result_name: str
) -> argparse._ArgumentGroup:
    """Add the run flags of every evaluation (batch, workers, seed, outputs, distributed set-up).

    Args:
        parser: parser to extend in place (it must already hold ``--init_seed``).
        batch_size_per_gpu: default images per process and batch.
        result_name: the result file's pattern, for the help text (e.g. ``eval_knn_<dataset>.json``).
    Returns:
        The "run" argument group.
    """
    group = parser.add_argument_group("run")
    group.add_argument(
        "--batch_size_per_gpu",
        default=batch_size_per_gpu,
        type=int,
        help="Images per forward pass, per process (GPU).",
    )
    group.add_argument("--num_workers", default=7, type=int, help="Data-loading workers per process.")
    group.add_argument(
        "--seed",
        default=0,
        type=int,
        help="Seed of the evaluation's randomness, and of the initialisation of a network evaluated "
        "without --pretrained_weights (unless --init_seed is given).",
    )
    group.add_argument(
        "--output_dir",
        default=None,
        type=str,
        help=f"Where the results go ({result_name}: one file per dataset and protocol, so runs never "
        "overwrite each other). Default: the folder of --pretrained_weights, or ./output without weights.",
    )
    group.add_argument(
        "--output_json",
        default=None,
        type=str,
        help=f"The result file itself, instead of --output_dir/{result_name}.",
    )
    add_dist_url_flag(group)
    group.add_argument("--local_rank", "--local-rank", default=0, type=int, help=argparse.SUPPRESS)
    parser.set_defaults(init_seed=None)
    for action in parser._actions:
        if action.dest == "init_seed":
            action.help = "Seed of the random initialisation of a network evaluated without weights alone. "
            action.help += "Default: --seed."
    return group


def resolve_seeds(args: argparse.Namespace) -> argparse.Namespace:
    """``--init_seed`` defaults to ``--seed`` (in place)."""
    if getattr(args, "init_seed", None) is None:
        args.init_seed = args.seed
    return args


def default_output_dir(pretrained_weights: str | None) -> Path:
    """The folder of the weights (``output/<name>`` for a released model's name or a URL, never the download
    cache), or ``./output`` for a randomly initialised network."""
    from cribo_utils.weights.remote_weights import results_directory

    if pretrained_weights:
        return results_directory(pretrained_weights).resolve()
    return Path("output").resolve()


def result_path(args: argparse.Namespace, file_name: str) -> Path:
    """``--output_json``, else ``--output_dir / file_name`` (``--output_dir`` by default: see module doc)."""
    if args.output_json:
        return Path(args.output_json)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.pretrained_weights)
    return output_dir / file_name


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Create ``path``'s folder and prove that a file can be written there, before any work.

    Raises:
        EvalConfigError: the folder cannot be created or written, naming it and the flags that move it.
    """
    path = Path(path)
    folder = path.parent
    probe = folder / f".write_test.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise EvalConfigError(
            f"cannot write the results to {folder} ({error.strerror or error}); choose a writable "
            "--output_dir (or --output_json)"
        ) from None
    return path


def _same_weights(recorded: str | None, requested: str | None) -> bool:
    if not recorded or not requested:
        return not recorded and not requested
    return Path(recorded).resolve() == Path(requested).resolve()


def check_result_owner(path: Path, pretrained_weights: str | None, checkpoint_key: str) -> None:
    """Refuse to overwrite a result file written for other weights (rerunning the same weights may).

    Results are named per evaluation, dataset and protocol, so two checkpoints of one folder would share a
    name; the second run stops before any work instead of replacing the first one's result.

    Raises:
        EvalConfigError: ``path`` holds the result of other weights or another ``--checkpoint_key``.
    """
    import json

    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # not a result of ours: replaced like any stale file
    if not isinstance(recorded, dict) or "pretrained_weights" not in recorded:
        return
    same_key = recorded.get("checkpoint_key", checkpoint_key) == checkpoint_key
    if not (_same_weights(recorded.get("pretrained_weights"), pretrained_weights) and same_key):
        raise EvalConfigError(
            f"{path} holds the result of --pretrained_weights {recorded.get('pretrained_weights')} "
            f"(--checkpoint_key {recorded.get('checkpoint_key')}); give this evaluation another --output_dir "
            "(or delete that file)"
        )


def run_launcher(script: str, main: Callable[[Sequence[str]], Any], cleanup: Callable[[], None]) -> None:
    """Run a launcher's ``main(sys.argv[1:])``: a bad flag, folder or file exits with one line, status 1."""
    try:
        main(sys.argv[1:])
    except EVAL_ERRORS as error:
        sys.exit(f"{script}: error: {error or type(error).__name__}")
    finally:
        cleanup()
