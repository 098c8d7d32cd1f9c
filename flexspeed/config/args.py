"""Command-line flags that name the config, as DeepSpeed's ``add_config_arguments`` adds them."""

from __future__ import annotations

import argparse

__all__ = ["add_config_arguments"]


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the "DeepSpeed" argument group to ``parser``.

    Flags: ``--deepspeed`` (store_true), ``--deepspeed_config PATH``, and the hidden legacy
    spellings ``--deepscale`` / ``--deepscale_config PATH``. ``flexspeed.initialize(args=args)``
    reads ``args.deepspeed_config`` (and ``args.deepscale_config``).

    Args:
        parser: the script's parser.

    Returns:
        The same parser, so calls can be chained.
    """
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed-compatible configuration (flexspeed)")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="Enable the engine (accepted for DeepSpeed compatibility).")
    group.add_argument("--deepspeed_config", default=None, type=str, metavar="PATH",
                       help="Path to a DeepSpeed JSON (or HJSON) configuration file.")
    group.add_argument("--deepscale", default=False, action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--deepscale_config", default=None, type=str, help=argparse.SUPPRESS)
    return parser
