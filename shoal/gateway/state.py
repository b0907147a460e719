"""What a gateway keeps on disk between runs: the route-token key central gave it, so that after a
restart it verifies devices' tokens at once, without waiting for central (which may be down).

The key is a secret: the file is created readable by its owner only (mode 0600) and replaced
atomically, so a crash never leaves half a key.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path


def default_state_dir() -> str:
    """``$XDG_STATE_HOME/shoal``, else ``~/.local/state/shoal``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "shoal")


class TokenKeyFile:
    def __init__(self, folder: str, cluster: str) -> None:
        self.path = Path(folder) / f"{cluster}.token-key"

    def load(self) -> bytes | None:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        try:
            key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except ValueError:
            return None
        return key or None

    def save(self, key: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, base64.urlsafe_b64encode(key) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
