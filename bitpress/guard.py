"""Process-level guards of the ``bitpress`` command: SIGTERM turned into an exception (so
that atomic outputs remove their scratch folders, as they do on Ctrl-C), and a quiet exit
when stdout's reader goes away (``bitpress inspect ... | head``)."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (``kill PID``). A
    ``BaseException`` like ``KeyboardInterrupt``, so that only cleanup code catches it."""


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread; the previous
    handler is restored afterwards. Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    prev = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def broken_pipe_exit() -> int:
    """After a ``BrokenPipeError`` on stdout: point stdout at /dev/null so that the final
    flush at exit does not raise again, and return 141 (128 + SIGPIPE, what a command killed
    by SIGPIPE reports to the shell)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced (tests): nothing to do
        pass
    return 141
