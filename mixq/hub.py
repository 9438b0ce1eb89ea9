"""Telling a user why a model or checkpoint could not be loaded from a local folder or the Hugging
Face Hub, and what to do about it: one message builder for the calibration CLI and load_quantized."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

MODEL_INDEX = "model_index.json"


def looks_like_local_path(text: str) -> bool:
    """'./x', '/x', '~/x', 'a/b/c' or an existing path: meant as a folder, not an 'owner/name' repo id."""
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or "\\" in text:
        return True
    return text.count("/") != 1


def hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint opens (checked only after a load failed)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def cached_on_disk(repo_id: str, filename: str = MODEL_INDEX) -> bool:
    """Whether the Hub cache already holds `filename` of `repo_id` (so a load can work without network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except (ImportError, ValueError):  # an id huggingface_hub refuses is not in its cache either
        return False


def local_folder_problem(path: str, required: str = MODEL_INDEX,
                         made_by: str = "pipe.save_pretrained(folder)") -> str | None:
    """Why `path` is not a usable local folder (None when it is, or when it is not meant as one)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if (folder / required).is_file():
            return None
        return (f"{path} is a folder but holds no {required}: it is not in diffusers layout; "
                f"pass the folder written by {made_by}")
    if folder.exists():
        return f"{path} is a file: pass the folder written by {made_by}"
    if looks_like_local_path(path):
        return f"there is no folder {path}: check the path, or pass a Hugging Face Hub id ('owner/name')"
    return None


def load_failure_message(source: str, error: BaseException, what: str = "the pipeline",
                         made_by: str = "pipe.save_pretrained(folder)", local_fix: str = "a local folder (--model PATH)",
                         required: str = MODEL_INDEX) -> str:
    """One message naming `source`, why loading it failed (local folder, offline mode, Hub reachable
    or not, access) and the fix."""
    local = local_folder_problem(source, required, made_by) if looks_like_local_path(source) else None
    if local:
        return f"cannot load {what} {source!r}: {local}"
    head = (f"cannot load {what} {source!r}: it is not a local folder, and downloading it from the Hugging Face "
            "Hub failed: ")
    if hub_offline():
        return (head + "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local cache. "
                f"Fix: pass {local_fix}, or download it once with network access and HF_HUB_OFFLINE=0.")
    if not hub_reachable():
        return (head + "the Hub could not be reached (no network connection to huggingface.co). "
                f"Fix: pass {local_fix}, or retry with network access.")
    return (head + f"the Hub refused or lacks it ({type(error).__name__}: {first_line(error)}). Fix: check the "
            "id and revision; for a private or gated repo run `huggingface-cli login` (or set HF_TOKEN).")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
