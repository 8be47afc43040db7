"""The ``valueloss`` command line: ``valueloss inspect BATCH`` reports what clipping does to a saved batch.

``valueloss inspect DIR`` (a directory written by :class:`valueloss.record.Recorder`) reports each recorded step on
one line instead (:mod:`valueloss.batch.trend`), with the same options, limits and exit codes.

Exit codes: 0 success, 2 bad arguments, a file that is not a valid batch (or over the limits of
``--max-bytes``, ``--max-tokens``, ``--max-sequences``) or a figure that cannot be written (one line on
stderr says why; never a traceback). ``--json`` is strict JSON (non-finite numbers are null) and lists
the ``--top`` sequences only (``--top all``: every one). ``--plot`` draws with
:func:`valueloss.viz.batch_plot.plot_report`, imported only then: it needs matplotlib (the ``[notebooks]``
extra), which nothing else here does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..functional import AGGREGATION_MODES
from .io import MAX_BYTES, MAX_SEQUENCES, MAX_TOKENS, BatchError, load_batch
from .report import format_report, inspect_batch
from .trend import MAX_FILES

__all__ = ["PLOT_MAX_SEQUENCES", "build_parser", "main"]

PLOT_MAX_SEQUENCES = 2048
"""``--plot`` draws a bar per sequence: more than this many take minutes and gigabytes, so they are refused."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number; got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1]; got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1]; got {text!r}")
    return value


def _count(text: str) -> int | None:
    """``--top``: a whole number >= 0, or ``all`` (None)."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 or 'all'; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 or 'all'; got {text!r}")
    return value


def _limit(text: str) -> int:
    """A limit: a positive whole number, with an optional suffix K, M or G (powers of 1024)."""
    scale = {"k": 2**10, "m": 2**20, "g": 2**30}.get(text.strip()[-1:].lower(), 1)
    digits = text.strip()[:-1] if scale > 1 else text.strip()
    try:
        value = int(digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number (suffix K, M or G allowed); "
                                         f"got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``valueloss`` (sub-command ``inspect``)."""
    parser = argparse.ArgumentParser(prog="valueloss", description="PPO's clipped value-function loss, measured.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect",
        help="report what value clipping does to a saved batch",
        description="Load a batch (.pt via torch.load(weights_only=True), .npz, .safetensors) holding values, "
        "old_values, returns and optionally action_mask, and report loss, clip fraction, explained variance, "
        "the drift histogram, where gradients die, and a clip_eps range for a target clip fraction.",
    )
    inspect.add_argument(
        "batch", metavar="BATCH",
        help="path to the batch file, or to a directory recorded by valueloss.record.Recorder (one line per step)",
    )
    inspect.add_argument("--clip-eps", type=_positive_float, default=0.2, help="clip range (default: 0.2)")
    inspect.add_argument(
        "--mode", choices=AGGREGATION_MODES, default="token-mean", help="aggregation mode (default: token-mean)"
    )
    inspect.add_argument(
        "--target-clip-fraction",
        type=_fraction,
        nargs=2,
        default=(0.05, 0.15),
        metavar=("LOW", "HIGH"),
        help="clip fractions that bound the suggested clip_eps range (default: 0.05 0.15)",
    )
    inspect.add_argument("--top", type=_count, default=8,
                         help="sequences listed in the breakdown and the JSON, or 'all' (default: 8)")
    inspect.add_argument("--json", action="store_true",
                         help="print the report as strict JSON instead of text (NaN and infinity as null)")
    limits = inspect.add_argument_group("limits", "checked from the file's headers before its arrays are read")
    limits.add_argument("--max-bytes", type=_limit, default=MAX_BYTES, metavar="N",
                        help="bytes of the arrays read, decompressed (and of a .pt file); suffix K, M, G "
                        "(default: 256M)")
    limits.add_argument("--max-tokens", type=_limit, default=MAX_TOKENS, metavar="N",
                        help=f"elements of one array, B x T (default: {MAX_TOKENS})")
    limits.add_argument("--max-sequences", type=_limit, default=MAX_SEQUENCES, metavar="N",
                        help=f"sequences B (default: {MAX_SEQUENCES})")
    limits.add_argument("--max-files", type=_limit, default=MAX_FILES, metavar="N",
                        help=f"recorded files read from a directory (default: {MAX_FILES})")
    inspect.add_argument("--plot", metavar="OUT.png", help="also write a PNG figure of the report")
    return parser


def _error(message: str) -> int:
    """Print the one-line error of ``valueloss inspect`` and return its exit code, 2."""
    print(f"valueloss inspect: error: {' '.join(message.splitlines())}", file=sys.stderr)
    return 2


def _plot_report():
    """:func:`valueloss.viz.batch_plot.plot_report`, or None without matplotlib.

    The one place where the batch package reaches up into viz: a command line sits above both layers,
    and importing here (only for ``--plot``) keeps ``import valueloss.batch`` free of matplotlib.
    """
    try:
        from ..viz.batch_plot import plot_report
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "matplotlib":
            raise
        return None
    return plot_report


def _check_plot_path(path: str) -> str | None:
    """Why ``--plot path`` cannot be written (checked before the batch is read), or None."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        return f"--plot {shown}: the name is not valid UTF-8; choose a UTF-8 file name"
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return f"--plot could not write {path} (FileNotFoundError: no such folder {folder!r})"
    return None


def _plot_trend():
    """:func:`valueloss.viz.trend_plot.plot_trend` (``valueloss inspect DIR``'s figure), as :func:`_plot_report`."""
    try:
        from ..viz.trend_plot import plot_trend
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "matplotlib":
            raise
        return None
    return plot_trend


def _inspect(args: argparse.Namespace) -> int:
    if os.path.isdir(args.batch):  # a directory written by valueloss.record.Recorder: one line per recorded step
        from .trend import run_directory_command

        if args.plot and (problem := _check_plot_path(args.plot)):
            return _error(problem)
        return run_directory_command(args, _plot_trend() if args.plot else None)
    low, high = args.target_clip_fraction
    if low > high:
        return _error(f"--target-clip-fraction LOW must be <= HIGH; got {low} {high}")
    plot_report = _plot_report() if args.plot else None
    if args.plot and plot_report is None:
        return _error("--plot needs matplotlib; pip install 'valueloss[notebooks]' (or leave out --plot)")
    if args.plot and (problem := _check_plot_path(args.plot)):
        return _error(problem)
    try:
        batch = load_batch(args.batch, max_bytes=args.max_bytes, max_tokens=args.max_tokens,
                           max_sequences=args.max_sequences)
        if plot_report is not None and batch.values.shape[0] > PLOT_MAX_SEQUENCES:
            return _error(f"--plot draws a bar per sequence, at most {PLOT_MAX_SEQUENCES}; {batch.source} has "
                          f"{batch.values.shape[0]} sequences (leave out --plot)")
        report = inspect_batch(batch, clip_eps=args.clip_eps, mode=args.mode, target_clip_fraction=(low, high))
    except (BatchError, ValueError) as error:
        return _error(str(error))
    except MemoryError:
        return _error(f"ran out of memory analysing {os.fsencode(args.batch).decode('utf-8', 'backslashreplace')}; "
                      "lower --max-tokens or inspect a smaller batch")
    if plot_report is not None:
        try:
            plot_report(report, args.plot)
        except (OSError, ValueError) as error:  # no permission, a suffix matplotlib cannot write
            return _error(f"--plot could not write {args.plot} ({type(error).__name__}: {error})")
    if args.json:
        print(json.dumps(report.to_dict(top=args.top), indent=2, allow_nan=False))
    else:
        print(format_report(report, top=args.top))
    if args.plot and not args.json:
        print(f"\n  figure      written to {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (also used by ``python -m valueloss``)."""
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        return _inspect(args)
    raise AssertionError(f"unknown command {args.command!r}")  # argparse rejects unknown commands first


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
