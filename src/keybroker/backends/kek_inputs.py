"""What a KEK rotation (``backends.kek_rotation``) starts from: the deployment's database (``open_deployment``,
also read-only for ``keybroker kek status``) and the ``--to`` file (``read_target``), each refused with its reason
in one line that quotes nothing of what it read (a ``--to`` that is a key file by mistake must not be shown)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from keybroker.ca import recorded_kek_id
from keybroker.config import EmbeddedBackendSettings, Settings, WrapperSettings
from keybroker.errors import ConfigurationError, Conflict
from keybroker.storage import migrations
from keybroker.storage.copy import sqlite_file, sqlite_in_use
from keybroker.storage.db import Database, database_reason, schema_head


@dataclass(frozen=True, slots=True)
class Target:
    """The ``--to`` file: the backend whose KEK changes and its new wrapper."""

    backend: str
    wrapper: WrapperSettings
    file: Path


def open_deployment(settings: Settings, exclusive: bool = False, read_only: bool = False) -> Database:
    """The deployment's database, migrated as ``serve`` would; ``ConfigurationError`` when there is none (nothing
    is created then). ``exclusive``: refused (``replicas_running``) while another process has a SQLite database
    open. ``read_only``: opened read-only and never migrated (a schema of another revision is refused, saying so)."""
    missing = ConfigurationError(f"{settings.data_dir} is not initialised; run 'keybroker init --data-dir DIR' first")
    if not settings.data_dir.is_dir():
        raise missing
    path = sqlite_file(settings.database_url)
    if path is not None and not path.is_file():  # (opening it would leave an empty database behind)
        raise missing
    if exclusive and path is not None and sqlite_in_use(path):  # (before this process opens it: see sqlite_in_use)
        raise Conflict(
            f"{path} is open in another process (a keybroker serve?): stop it first; nothing was changed",
            code="replicas_running",
        )
    url = settings.database_url
    if read_only and path is not None:
        # No -wal file: nobody has the database open and it is whole in its file, read as it is (immutable: without
        # the -wal and -shm files a read-only connection would otherwise leave behind). Else read-only, beside them.
        immutable = "&immutable=1" if not Path(f"{path}-wal").exists() else ""
        url = f"sqlite:///file:{path}?mode=ro{immutable}&uri=true"
    database = Database.from_url(
        url, settings.database.connect_timeout_seconds, settings.database.statement_timeout_seconds
    )
    try:
        try:
            if not database.is_migrated():
                raise missing
            if read_only:
                _refuse_another_schema(database, settings)
            else:
                database.migrate()
            known = recorded_kek_id(database, settings.data_dir)
        except SQLAlchemyError as exc:  # (unavailable databases are BackendUnavailable already: "unavailable")
            where = f" {path}" if path is not None else ""
            raise ConfigurationError(f"cannot open the database{where}: {database_reason(exc)}") from None
        if known is None:
            raise missing
    except BaseException:
        database.close()
        raise
    return database


def _refuse_another_schema(database: Database, settings: Settings) -> None:
    revision, head = database.schema_revision(), schema_head()
    if revision == head:
        return
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    if revision in known:
        raise ConfigurationError(
            f"the database's schema is revision {revision}, older than this keybroker's ({head}): 'keybroker init "
            f"--data-dir {settings.data_dir}' (or starting the server) upgrades it; this command only reads"
        )
    raise ConfigurationError(
        f"the database's schema is revision {revision}, newer than this keybroker knows (up to {head}): a later "
        "keybroker has upgraded it; run that version"
    )


def read_target(path: Path) -> Target:
    """Parse and validate ``--to FILE``. ``ConfigurationError`` naming the problem; reads no credential."""
    where = f"--to {path}"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"{where}: no such file") from None
    except OSError as exc:
        raise ConfigurationError(f"{where}: cannot read it: {exc.strerror}") from None
    try:  # (never with the decoder's or the parser's words: they quote the file, which may be a key)
        content = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"{where}: not a UTF-8 text file (a key file? give the TOML file with the backend's new section)"
        ) from None
    try:
        data = tomllib.loads(content)
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"\(at (line \d+, column \d+|end of document)\)$", str(exc))
        raise ConfigurationError(f"{where}: not valid TOML" + (f" (at {at.group(1)})" if at else "")) from None
    shape = "one [backends.<name>] section with the new wrapper, as it will be in keybroker.toml"
    other = sorted(set(data) - {"backends"})
    if other:
        raise ConfigurationError(f"{where}: holds {', '.join(other)}; it must hold only {shape}")
    sections = data.get("backends")
    if not isinstance(sections, dict) or len(sections) != 1:
        found = len(sections) if isinstance(sections, dict) else 0
        raise ConfigurationError(f"{where}: holds {found} backend sections; it must hold {shape}")
    ((name, section),) = sections.items()
    if not isinstance(section, dict) or section.get("type", "embedded") != "embedded":
        raise ConfigurationError(f"{where}: backends.{name} is not an embedded backend; only those have a KEK")
    if "wrapper" not in section:
        raise ConfigurationError(f"{where}: backends.{name} gives no wrapper = {{ type = ... }} (the new KEK)")
    if isinstance(section["wrapper"], dict) and "master_key" in section["wrapper"]:
        raise ConfigurationError(
            f"{where}: a master key does not go into a file of settings; give master_key_file (32 random bytes, "
            "mode 0600; created if it does not exist)"
        )
    for field_name, value in section["wrapper"].items() if isinstance(section["wrapper"], dict) else ():
        if isinstance(value, str) and "\0" in value:
            raise ConfigurationError(f"{where}: backends.{name}.wrapper.{field_name} holds a NUL byte")
    try:
        parsed = EmbeddedBackendSettings.model_validate(section)
    except ValidationError as exc:
        problems = [
            f"backends.{name}.{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        ]
        raise ConfigurationError(f"{where}: " + "; ".join(problems)) from None
    return Target(str(name), parsed.wrapper, path.resolve())
