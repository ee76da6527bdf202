"""Checks of the benchmark scripts' options, made before anything runs, in argparse's own error format."""

from __future__ import annotations

import argparse


def check_options(ap: argparse.ArgumentParser, args: argparse.Namespace, *, at_least_one: tuple[str, ...] = (),
                  positive: tuple[str, ...] = (), fraction: tuple[str, ...] = (), model: bool = False) -> None:
    """``ap.error`` (exit 2) for the first option out of range: ``at_least_one`` integers, ``positive``
    numbers, ``fraction`` in [0, 1), and ``--model`` when ``model`` is set. Unset options (None) pass."""
    for name in at_least_one:
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')}: must be at least 1 (got {v})")
    for name in positive:
        v = getattr(args, name)
        if v is not None and not v > 0:
            ap.error(f"--{name.replace('_', '-')}: must be a positive number (got {v})")
    for name in fraction:
        v = getattr(args, name)
        if v is not None and not 0 <= v < 1:
            ap.error(f"--{name.replace('_', '-')}: must be in [0, 1) (got {v})")
    if model:
        from fedslim import plugins

        if args.model not in plugins.MODELS:
            ap.error(f"--model: unknown model {args.model!r}; allowed: {', '.join(plugins.MODELS.names())}")
