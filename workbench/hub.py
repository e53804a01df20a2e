"""Hub access that never hangs: detect offline within seconds and fail with one clear line.

These machines (and many classrooms) have no route to the model hub. Hub libraries retry for
minutes in that case, so the workbench checks reachability once per process, with a short timeout,
and passes `local_files_only=True` when offline so cached models still load.
"""
from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path

from .errors import OfflineError

HUB_HOST = os.environ.get("WORKBENCH_HUB_HOST", "huggingface.co")
_TRUE = ("1", "true", "yes", "on")
_reachable: bool | None = None
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def looks_like_hub_id(name: str) -> bool:
    """'org/name' and not an existing local path."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


def _probe(host: str, timeout: float) -> bool:
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo ignores socket timeouts, so the whole probe runs in a thread we stop waiting for.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def is_offline(timeout: float = 2.0) -> bool:
    """True when the hub cannot be used: forced by environment, or not reachable within `timeout` s."""
    global _reachable
    if os.environ.get("WORKBENCH_OFFLINE", "").lower() in _TRUE or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        os.environ["HF_HUB_OFFLINE"] = "1"  # so library calls that bypass hub_kwargs do not retry either
        return True
    if os.environ.get("WORKBENCH_ONLINE", "").lower() in _TRUE:
        return False
    if _reachable is None:
        _reachable = _probe(HUB_HOST, timeout)
        if not _reachable:
            os.environ["HF_HUB_OFFLINE"] = "1"  # libraries imported later skip their own retries
    return not _reachable


def _is_cached(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, revision=revision, local_files_only=True)
        return True
    except Exception:
        return False


def hub_kwargs(repo_id: str, what: str, revision: str | None = None) -> dict:
    """Keyword arguments for a `from_pretrained(repo_id, …)` call, or OfflineError if it cannot work now."""
    if not is_offline():
        return {}
    if _is_cached(repo_id, revision):
        return {"local_files_only": True}
    raise OfflineError(offline_message(repo_id, what))


def offline_message(name: str, what: str) -> str:
    from .assets import embedded_names

    return (
        f"{what} '{name}' is not available offline (the model hub cannot be reached and it is not in the local cache). "
        f"Embedded offline {what.lower()}s: {', '.join(embedded_names(what)) or 'none'}."
    )
