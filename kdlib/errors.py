"""The one exception type that reaches the user as a message instead of a traceback, and stop signals as Ctrl-C."""

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

STOPS = (signal.SIGINT, signal.SIGTERM)  # what stops a job: Ctrl-C, and kill or a scheduler under interrupt_on


class KDError(Exception):
    """Bad input or state the user can fix: the message names what is wrong, where, and what was expected."""


def hub_unreachable(verb: str = "loaded") -> str:
    """Why a hub name could not be used: offline mode, or the hub itself."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1) and it is not cached"
    return f"it could not be {verb} from the Hugging Face Hub"


def interrupt_on(*signals: signal.Signals) -> None:
    """Make ``signals`` raise KeyboardInterrupt, once: a job stopped by ``kill`` or a scheduler unwinds as from
    Ctrl-C (its MLflow runs end, the running trial fails and is retried on resume), and a second signal
    does not break off that unwinding half way. Call from the main thread."""

    def stop(signum: int, frame: object) -> None:
        for each in signals:
            signal.signal(each, signal.SIG_IGN)
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    for each in signals:
        signal.signal(each, stop)


@contextlib.contextmanager
def stops_held() -> Iterator[Callable[[], None]]:
    """Ctrl-C and SIGTERM wait while the block makes something that a stop must not leave half-made, such
    as an MLflow run already in the store but not yet where a ``finally`` can end it. They land, under the
    handlers they had, when the block calls the release it is given (inside the ``try`` that undoes the
    work), or when the block ends. Outside the main thread, where no handler runs, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    # A handler set outside Python (getsignal gives None) cannot be put back, so that signal is not held.
    handlers = {each: handler for each in STOPS if (handler := signal.getsignal(each)) is not None}
    caught: list[int] = []
    for each in handlers:
        signal.signal(each, lambda signum, frame: caught.append(signum))

    def release() -> None:
        while handlers:
            each, handler = handlers.popitem()
            signal.signal(each, handler)
        if caught:
            first = caught[0]
            caught.clear()  # once: a second stop while the first unwinds is the handler's to judge
            signal.raise_signal(first)  # its handler runs now, in this thread

    try:
        yield release
    finally:
        release()
