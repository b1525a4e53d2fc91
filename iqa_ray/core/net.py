"""Network reachability, checked before anything tries to download from a hub.

Offline machines must fail at once with a message naming the offline options, not hang in
retries: every hub download in iqa-ray asks :func:`hub_reachable` first.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse


def hub_reachable(
    host: str | None = None, port: int = 443, timeout_s: float = 3.0
) -> tuple[bool, str]:
    """Cheaply check whether the Hugging Face hub can be reached.

    ``HF_HUB_OFFLINE`` set to a true value counts as unreachable. Otherwise a TCP connection to
    ``host:port`` is attempted (default: the host of ``HF_ENDPOINT``, else ``huggingface.co``).
    The probe runs in a daemon thread so that a hanging DNS lookup, which the socket timeout does
    not cover, still cannot delay the answer beyond ``timeout_s``.

    Args:
        host: Host to probe; defaults to the hub's host.
        port: TCP port to probe.
        timeout_s: Longest time to wait for an answer.

    Returns:
        ``(reachable, reason)`` where ``reason`` says why it is not reachable (empty when it is).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    if host is None:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        host = urlparse(endpoint).hostname or "huggingface.co"
    outcome: list[str] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome.append("")
        except OSError as exc:
            outcome.append(f"connecting to {host}:{port} failed: {exc}")

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return False, f"no answer from {host}:{port} within {timeout_s:g} s"
    return outcome[0] == "", outcome[0]
