"""The one exception type that reaches the user as a message instead of a traceback."""


class KDError(Exception):
    """Bad input or state the user can fix: the message names what is wrong, where, and what was expected."""


def hub_unreachable(verb: str = "loaded") -> str:
    """Why a hub name could not be used: offline mode, or the hub itself."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1) and it is not cached"
    return f"it could not be {verb} from the Hugging Face Hub"
