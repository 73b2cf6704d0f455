"""SoftHSM2 tokens in a temporary directory.

SoftHSM reads ``SOFTHSM2_CONF`` once, at ``C_Initialize``, and python-pkcs11 caches the library per path; so one
configuration (one token directory) serves the whole pytest process, and each test makes its own token by label.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)
SO_PIN = "87654321"


def module_path() -> str:
    for candidate in MODULE_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise RuntimeError("SoftHSM2 is not installed: run 'bash scripts/bootstrap.sh --test' (apt-get install softhsm2)")


@dataclass(frozen=True)
class Token:
    label: str
    pin: str
    module: str
    conf: Path  # the SOFTHSM2_CONF that finds it
    directory: Path | None = None  # SoftHSM's directory of this token (moving it away makes the token vanish)


class SoftHsm:
    """One token directory; ``token()`` initialises a fresh token in it with a unique label."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokendir = root / "tokens"
        self.tokendir.mkdir(parents=True, exist_ok=True)
        self.conf = root / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {self.tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n"
            "slots.removable = false\n"
        )
        self.module = module_path()
        os.environ["SOFTHSM2_CONF"] = str(self.conf)

    def token(self, label: str | None = None, pin: str = "1234") -> Token:
        label = label or f"kb-{uuid.uuid4().hex[:12]}"
        util = shutil.which("softhsm2-util") or "/usr/bin/softhsm2-util"
        before = set(self.tokendir.iterdir())
        subprocess.run(
            [util, "--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", pin],
            check=True,
            capture_output=True,
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            timeout=30,
        )
        made = set(self.tokendir.iterdir()) - before
        return Token(label, pin, self.module, self.conf, made.pop() if len(made) == 1 else None)
