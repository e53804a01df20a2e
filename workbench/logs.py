"""Keep library chatter (progress bars per weight file, advisory warnings) out of the user's terminal."""
from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # transformers missing or changed: noise is not worth failing over
        pass
    logging.getLogger("httpx").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
