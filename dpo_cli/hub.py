"""Hugging Face Hub reachability, checked once before anything is downloaded.

Without network, huggingface_hub retries each request with back-off for about half a minute
before it gives up. We check the endpoint once with a short timeout instead, so that an
offline run fails within seconds with a message that says how to point at local files.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


def offline_mode() -> bool:
    """True when the user told the Hugging Face libraries to stay offline."""
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the Hub endpoint (HF_ENDPOINT) opens within `timeout` s.

    Behind an HTTP(S) proxy a direct connection says nothing, so the Hub client is trusted.
    """
    if offline_mode():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id like `org/name`."""
    return name.startswith(("/", ".", "~")) or os.path.exists(name) or name.count("/") > 1
