"""Hugging Face Hub reachability, checked once before anything is downloaded.

Without network, huggingface_hub retries each request with back-off for about half a minute
before it gives up. We check the endpoint once with a short timeout instead, so that an
offline run fails within seconds with a message that says how to point at local files.
`endpoint_reachable` does the same check for other services (Weights & Biases, in metrics).
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.request
from urllib.parse import urlparse


def offline_setting() -> str | None:
    """The variable by which the user told the Hugging Face libraries to stay offline (named in
    messages, which then do not suggest setting it), or None."""
    on = [
        v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v, "").lower() in ("1", "true", "yes")
    ]
    return on[0] if on else None


def offline_mode() -> bool:
    """True when the user told the Hugging Face libraries to stay offline."""
    return offline_setting() is not None


def endpoint_reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the host of URL `endpoint` opens within `timeout` s.

    Where an HTTP(S) proxy serves the endpoint (HTTPS_PROXY and friends, minus NO_PROXY), the
    proxy is what has to answer, so that is where the connection is tried.
    """
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname, proxy_url.port or 8080
    if not host:  # a URL without a scheme has no host; connecting to None would try localhost
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hub endpoint (HF_ENDPOINT) answers a TCP connection within `timeout` s
    (through the proxy that serves it, if any); False in offline mode. Asked once per process."""
    if offline_mode():
        return False
    return endpoint_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


# Local model directories the documentation names, with the command that creates each one.
FETCH_COMMANDS = {"models/smollm2-135m-instruct": "make smollm2"}


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id like `org/name`.

    `org/name` is ambiguous: it is read as a path when `org` is a local directory (as `models/`
    is once `make smollm2` has run), or when it is a directory the documentation names.
    """
    if name.startswith(("/", ".", "~")) or os.path.exists(name) or name.count("/") > 1:
        return True
    return "/" in name and (os.path.isdir(name.split("/", 1)[0]) or fetch_command(name) is not None)


def fetch_command(name: str) -> str | None:
    """The command that creates local model directory `name`, when it is one the docs name."""
    path = name.replace(os.sep, "/").rstrip("/")
    return next((cmd for rel, cmd in FETCH_COMMANDS.items() if path == rel or path.endswith("/" + rel)), None)
