"""The one exception type that reaches the user as a message instead of a traceback, and stop signals as Ctrl-C."""

import signal


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
