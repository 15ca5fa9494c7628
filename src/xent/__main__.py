"""``python -m xent``: the report of what xent finds on this machine (see ``_report``)."""

from __future__ import annotations

import argparse

from . import _report


def _size(text: str) -> tuple[int, int]:
    rows, sep, classes = text.lower().partition("x")
    if not (sep and rows.isdigit() and classes.isdigit() and int(rows) > 0 and int(classes) > 0):
        raise argparse.ArgumentTypeError(f"expected ROWSxCLASSES such as 4096x8192, got {text!r}")
    return int(rows), int(classes)


def _repeat(text: str) -> int:
    if not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(
            f"expected a whole number of runs, 1 or more, got {text!r}"
        )
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xent",
        description="Check and time xent on every array library and device it can import.",
    )
    parser.add_argument(
        "--size",
        type=_size,
        # A string, which argparse passes through `_size`, so that --help shows 4096x8192.
        default="{}x{}".format(*_report.DEFAULT_SIZE),
        metavar="ROWSxCLASSES",
        help="float32 logits to time on (default: %(default)s)",
    )
    parser.add_argument(
        "--repeat",
        type=_repeat,
        default=5,
        help="timed runs after the warm-up (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    return _report.run(args.size, args.repeat)


if __name__ == "__main__":
    raise SystemExit(main())
