"""The ``captioner`` command: dispatches to the sub-commands in ``captioner.commands``.

Commands that take ``--config`` (``fit``, ``validate``, ``test``, ``evaluate``, ``features
extract``) are parsed by one jsonargparse parser; the others are argparse programs. A user's
mistake ends any of them with one line on stderr and exit status 2 (``captioner -v ...``
shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading
from collections.abc import Iterator, Sequence

from captioner.commands import config_command, register_all
from captioner.commands.common import UsageError

# Lightning's advertising and hardware lines that say nothing about the run (the GPU line stays).
_LIGHTNING_NOISE = ("💡 Tip:", "TPU available:", "HPU available:",
                    "Loading `train_dataloader` to estimate number of stepping batches.")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("lightning") and str(record.msg).startswith(_LIGHTNING_NOISE))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="captioner",
        description="Image captioning with spatial attention (Show, Attend and Tell). "
        "Start with: captioner fit --config configs/shapes.yaml (each command has --help).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    register_all(sub)
    return p


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    handler.addFilter(_DropNoise())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_captioner", False)]:
        root.removeHandler(old)  # main() called again in one process (tests, notebooks)
    handler._captioner = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _user_error(err: BaseException) -> bool:
    """Errors that come from the user's files or settings, not from a bug."""
    from captioner.data.images import ImageLoadError
    from captioner.models.encoder import WeightsUnavailable

    return isinstance(err, (OSError, ValueError, ImageLoadError, WeightsUnavailable))


@contextlib.contextmanager
def _quiet_disk_full_threads() -> Iterator[None]:
    """A writer thread that dies of a full disk (TensorBoard's event writer) would print its
    traceback; the main thread meets the same error at its next write and says it in one line."""
    from captioner.files import find_disk_full

    previous = threading.excepthook

    def hook(args) -> None:
        if args.exc_value is None or find_disk_full(args.exc_value) is None:
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    while argv and argv[0] in ("-v", "--verbose"):
        verbose = True
        argv.pop(0)
    _setup_logging(verbose)
    target = config_command(argv)
    try:
        with _quiet_disk_full_threads():
            code = _run(argv, target, verbose)
        _destroy_process_group()
        return code
    except UsageError as err:
        if verbose:
            raise
        print(f"captioner: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a full disk, met by any command: one line, exit 2
        from captioner.files import find_disk_full

        full = find_disk_full(err)
        if verbose or full is None:
            raise
        print(f"captioner: error: {full}", file=sys.stderr)
        return 2


def _destroy_process_group() -> None:
    """End a finished multi-process run's process group while the interpreter is whole.

    Lightning registers this at exit for NCCL only. A gloo group left to the interpreter's
    shutdown can abort a process whose run succeeded (SIGABRT, "terminate called without an
    active exception"): its worker threads still hold work that refers to Python objects.
    Only after success: a failed rank's peers may still wait on it, and Lightning kills them.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(argv: list[str], target, verbose: bool) -> int:
    from captioner.files import find_disk_full

    if target is not None:
        words, run = target
        try:
            return int(run(argv[len(words):], prog="captioner " + " ".join(words)) or 0)
        except SystemExit as done:  # jsonargparse's --help and --print_config
            return done.code if isinstance(done.code, int) else 0
        except Exception as err:
            if verbose or isinstance(err, UsageError) or not _user_error(err) or find_disk_full(err):
                raise
            raise UsageError(f"{' '.join(str(err).split())} (captioner -v {words[0]} ... "
                             "shows the traceback)") from err
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    return int(a.func(a) or 0)


if __name__ == "__main__":
    sys.exit(main())
