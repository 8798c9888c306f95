"""Flag conventions shared by the four launchers (``main_cribo.py`` and the three evaluations).

One boolean style: ``--flag true|false`` (also on/off, 1/0), where a bare ``--flag`` means true, so both
``--use_fp16 false`` (DINO's ``utils.bool_flag``) and ``--evaluate`` (DINO's ``store_true``) work as typed.
Old negative spellings (``--no_train_aug``) stay as hidden aliases that store false.

``--dist_url`` has DINO's meaning: the rendezvous URL of the process group. ``env://`` (the default) reads
``MASTER_ADDR`` / ``MASTER_PORT`` as torchrun sets them (or derives them under SLURM); ``tcp://host:port``
names the rendezvous explicitly (:func:`cribo_utils.runtime.distributed.init_distributed`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

ArgumentContainer = argparse.ArgumentParser | argparse._ArgumentGroup

BOOL_METAVAR = "true|false"


def bool_flag(value: str) -> bool:
    """Parse a boolean flag written as on/off, true/false or 1/0 (any case)."""
    lowered = value.lower()
    if lowered in {"on", "true", "1"}:
        return True
    if lowered in {"off", "false", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {value!r} (use true/false)")


def bool_argument(default: bool | None) -> dict[str, Any]:
    """``add_argument`` keywords of a boolean flag: ``--flag``, ``--flag true`` and ``--flag false``."""
    return {"default": default, "type": bool_flag, "nargs": "?", "const": True, "metavar": BOOL_METAVAR}


def add_bool_flag(
    container: ArgumentContainer,
    name: str,
    default: bool | None,
    help: str,
    false_aliases: Sequence[str] = (),
) -> None:
    """Add ``name`` as a boolean flag, with hidden ``false_aliases`` (old spellings) that store false.

    Args:
        container: parser or argument group.
        name: the flag, e.g. ``"--train_aug"``.
        default: its default (None: decided later from other flags; the help text says how).
        help: help text (the aliases are appended to it).
        false_aliases: e.g. ``("--no_train_aug", "--no-train_aug")``.
    """
    dest = name.lstrip("-")
    if false_aliases:
        help = f"{help} ({' or '.join(false_aliases)}: the same as {name} false.)"
    container.add_argument(name, dest=dest, help=help, **bool_argument(default))
    for alias in false_aliases:
        container.add_argument(
            alias,
            dest=dest,
            action="store_const",
            const=False,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )


def parse_dist_url(dist_url: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``tcp://HOST:PORT``, None for ``env://`` (the launcher's rendezvous).

    Raises:
        ValueError: for any other form, naming the flag and the accepted ones.
    """
    if dist_url in ("", "env://"):
        return None
    match = re.fullmatch(r"tcp://(\[[^\]]+\]|[^:/\s\[\]]+):(\d+)/?", dist_url)
    if match is None:
        raise ValueError(
            f"--dist_url {dist_url}: expected env:// (torchrun / SLURM set the rendezvous) or tcp://HOST:PORT"
        )
    return match.group(1).strip("[]"), int(match.group(2))


def dist_url_value(dist_url: str) -> str:
    """argparse ``type`` of ``--dist_url``: the URL itself, checked at parse time (:func:`parse_dist_url`)."""
    try:
        parse_dist_url(dist_url)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix(f"--dist_url {dist_url}: ")) from None
    return dist_url


def add_dist_url_flag(container: ArgumentContainer) -> None:
    """DINO's ``--dist_url`` (accepted by every launcher; torchrun and SLURM set the rendezvous)."""
    container.add_argument(
        "--dist_url",
        default="env://",
        type=dist_url_value,
        help="Rendezvous of the process group, as in DINO: env:// reads MASTER_ADDR / MASTER_PORT (set by "
        "torchrun; derived from the node list under SLURM); tcp://HOST:PORT names it. Unused by a single "
        "process.",
    )
