"""Reading a configuration's files and credentials (what a backend gets instead of the whole settings)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from keybroker.config.sections import SecretSource
from keybroker.errors import ConfigurationError


@dataclass(frozen=True)
class SecretReader:
    """Files and credentials of the configuration: relative paths are taken from the data directory; a credential
    comes from an environment variable or a file of keybroker's user that nobody else may read."""

    data_dir: Path

    def resolve(self, path: Path) -> Path:
        """A configured path, relative ones taken from the data directory."""
        return path if path.is_absolute() else self.data_dir / path

    def read(self, source: SecretSource, what: str) -> str:
        """The credential ``source`` points at. Raises ``ConfigurationError`` naming ``what`` and where it looked,
        never the value; a file readable by group or others is refused."""
        if source.env is not None:
            value = os.environ.get(source.env)
            if not value:
                raise ConfigurationError(f"{what}: environment variable {source.env} is not set")
            return value
        assert source.file is not None
        path = self.resolve(source.file)
        try:
            # The mode and owner of the file actually read (fstat of the open file, not a stat before opening).
            with path.open("rb") as handle:
                status = os.fstat(handle.fileno())
                raw = handle.read(65536)
        except OSError as exc:
            raise ConfigurationError(f"{what}: cannot read {path}: {exc.strerror}") from None
        if status.st_mode & 0o077:
            raise ConfigurationError(f"{what}: {path} is readable by others; chmod 600 it")
        if status.st_uid not in {os.geteuid(), 0}:
            raise ConfigurationError(f"{what}: {path} belongs to another user; keybroker's user must own it")
        try:
            value = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigurationError(f"{what}: {path} is not UTF-8 text") from None
        if not value:
            raise ConfigurationError(f"{what}: {path} is empty")
        return value
