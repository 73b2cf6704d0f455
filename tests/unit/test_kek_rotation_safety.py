"""What a KEK rotation must not leave behind or let through (``backends.kek_rotation``, ``backends.kek_guard``):
the new master key is on disk (file and directory synced, read back) before anything moves under it; the CA key
files of a data directory from before 0008 are gone once the CA is in the database, so nothing under the old KEK
survives a rotation; a server cannot start while a rotation is unfinished, and one that appears while it runs (a
process opening the SQLite database, a replica's heartbeat on PostgreSQL, judged by the database's clock) stops it,
resumably; ``kek status`` only reads; every wrong input is one line that quotes nothing secret."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from keybroker.audit.log import SYSTEM, AuditLog
from keybroker.auth.roles import RoleStore
from keybroker.backends import kek_rotation
from keybroker.backends.kek_records import FINISH, START, census
from keybroker.backends.local_kek import LocalKeyWrapper
from keybroker.ca import CA_KEY, PASSPHRASE_FILE, ServiceCA
from keybroker.cli.main import app
from keybroker.clock import FixedClock, SystemClock
from keybroker.config import load_settings
from keybroker.errors import BackendUnavailable, ConfigurationError, Conflict
from keybroker.services import build_services
from keybroker.storage.cluster import Replicas
from keybroker.storage.db import _MIGRATIONS, Database
from tests.conftest import NOW
from tests.unit.test_kek_rotation import World, _make, _opens_under, _refused

runner = CliRunner()
LEGACY_CONTEXT = b"keybroker/tls-passphrase/v1"


@pytest.fixture
def world(tmp_path: Path, database_settings: Callable[[Path], dict[str, Any]]) -> World:
    return _make(tmp_path, database_settings(tmp_path / "data"))


@pytest.fixture
def sqlite_world(tmp_path: Path) -> World:
    return _make(tmp_path, {})


def _rotations(world: World) -> list[str]:
    database = world.database()
    try:
        return [e["action"] for e in AuditLog(database, world.clock).entries() if e["target"] == "kek"]
    finally:
        database.close()


# --- 1. the new master key is on disk before anything is wrapped by it ------------------------------------------


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_the_new_master_key_and_its_directory_are_synced_before_the_rotation_begins(
    sqlite_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync, real_record = os.fsync, AuditLog.record
    at_start: list[list[str]] = []

    def fsync(fd: int) -> None:
        synced.append(_fd_path(fd))
        real_fsync(fd)

    def record(self: AuditLog, context: Any, event: Any) -> int:
        if event.action == START:
            at_start.append(list(synced))
        return real_record(self, context, event)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(AuditLog, "record", record)
    sqlite_world.rotate()
    data = sqlite_world.settings.data_dir
    assert str(data / "master-2.key") in at_start[0]
    assert str(data) in at_start[0][at_start[0].index(str(data / "master-2.key")) :]  # the directory after the file


def test_a_new_master_key_that_does_not_read_back_is_removed_and_nothing_moves(
    sqlite_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that loses what was written to the new key file: read back, it is not the key, and nothing moves."""
    real_fsync = os.fsync

    def losing_fsync(fd: int) -> None:
        real_fsync(fd)
        if _fd_path(fd).endswith("master-2.key"):
            os.ftruncate(fd, 0)

    monkeypatch.setattr(os, "fsync", losing_fsync)
    _refused(sqlite_world, ConfigurationError, "does not read back as written")
    assert not (sqlite_world.settings.data_dir / "master-2.key").exists()


# --- 2. the CA key files of a data directory from before 0008 -------------------------------------------------------


def _legacy_files(data: Path, wrapper: LocalKeyWrapper, key: Any, cert_pem: bytes | None = None) -> None:
    """The service CA as keybroker kept it before 0008: its key encrypted under a passphrase wrapped by the KEK."""
    passphrase = b"legacy-passphrase"
    record = {"kek_id": wrapper.kek_id, "wrapped": base64.b64encode(wrapper.wrap(passphrase, LEGACY_CONTEXT)).decode()}
    (data / PASSPHRASE_FILE).write_text(json.dumps(record))
    if cert_pem is not None:
        (data / "ca.pem").write_bytes(cert_pem)
    encryption = serialization.BestAvailableEncryption(passphrase)
    (data / CA_KEY).write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )


def _pre_0008(tmp_path: Path) -> tuple[Path, LocalKeyWrapper, bytes]:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    LocalKeyWrapper.create_file(data / "master.key")
    wrapper = LocalKeyWrapper.from_file(data / "master.key")
    scratch = Database.from_url(f"sqlite:///{tmp_path / 'scratch.db'}")
    try:
        cert_pem, key = ServiceCA(scratch, wrapper, tmp_path)._new(NOW, "keybroker service CA")
    finally:
        scratch.close()
    _legacy_files(data, wrapper, key, cert_pem)
    return data, wrapper, cert_pem


def test_init_imports_the_legacy_ca_and_removes_its_key_files(tmp_path: Path) -> None:
    data, _, cert_pem = _pre_0008(tmp_path)
    done = runner.invoke(app, ["init", "--data-dir", str(data)])
    assert done.exit_code == 0, done.output
    assert not (data / CA_KEY).exists()
    assert not (data / PASSPHRASE_FILE).exists()
    services = build_services(load_settings(data_dir=data), FixedClock(NOW))
    try:
        assert services.ca.certificate_pem() == cert_pem  # the imported CA, now only in the database
        services.ca.check_kek()
    finally:
        services.close()


def _leftovers(data: Path) -> None:
    """Put back the files an earlier version left after importing (the CA key, its passphrase under the KEK)."""
    wrapper = LocalKeyWrapper.from_file(data / "master.key")
    database = Database.from_url(f"sqlite:///{data / 'keybroker.db'}")
    try:
        _, key = ServiceCA(database, wrapper, data)._load()
    finally:
        database.close()
    _legacy_files(data, wrapper, key)


def test_files_left_by_an_earlier_version_are_removed_at_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert runner.invoke(app, ["init", "--data-dir", str(data)]).exit_code == 0
    _leftovers(data)
    build_services(load_settings(data_dir=data), FixedClock(NOW)).close()
    assert not (data / CA_KEY).exists()
    assert not (data / PASSPHRASE_FILE).exists()


def test_kek_status_shows_the_legacy_files_and_kek_rotate_leaves_nothing_under_the_old_kek(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert runner.invoke(app, ["init", "--data-dir", str(data)]).exit_code == 0
    _leftovers(data)
    old_kek = LocalKeyWrapper.from_file(data / "master.key").kek_id
    shown = runner.invoke(app, ["kek", "status", "--data-dir", str(data), "-o", "json"])
    assert shown.exit_code == 0, shown.output
    legacy = [row for row in json.loads(shown.stdout)["records"] if row["what"].startswith("legacy CA key files")]
    assert legacy == [{"what": legacy[0]["what"], "kek_id": old_kek, "records": 1}]
    to = tmp_path / "new.toml"
    to.write_text('[backends.embedded]\nwrapper = { type = "local", master_key_file = "master-2.key" }\n')
    moved = runner.invoke(app, ["kek", "rotate", "--to", str(to), "--data-dir", str(data)])
    assert moved.exit_code == 0, moved.output
    assert "removed the CA key files from before 0008" in moved.output
    old = LocalKeyWrapper.from_file(data / "master.key")
    for path in data.rglob("*"):  # no file beside the database names the old KEK (nothing is wrapped by it)
        if path.is_file() and not path.name.startswith(("keybroker.db", "master")):
            assert old.kek_id.encode() not in path.read_bytes(), path
    assert not (data / CA_KEY).exists()
    assert not (data / PASSPHRASE_FILE).exists()


def test_a_data_directory_whose_ca_was_never_imported_is_refused_by_kek_rotate(tmp_path: Path) -> None:
    data, _, _ = _pre_0008(tmp_path)
    database = Database.from_url(f"sqlite:///{data / 'keybroker.db'}")
    try:
        database.migrate()  # (its database, without the CAs: they were files before 0008)
    finally:
        database.close()
    to = tmp_path / "new.toml"
    to.write_text('[backends.embedded]\nwrapper = { type = "local", master_key_file = "master-2.key" }\n')
    refused = runner.invoke(app, ["kek", "rotate", "--to", str(to), "--data-dir", str(data)])
    assert refused.exit_code == 2, refused.output
    assert f"run 'keybroker init --data-dir {data}' once" in refused.output.replace("\n", " ")
    assert (data / PASSPHRASE_FILE).exists()
    assert not (data / "master-2.key").exists()


# --- 6. servers during a rotation ------------------------------------------------------------------------------------


def test_a_server_cannot_start_once_a_rotation_has_begun(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """(Just after the start entry nothing has moved yet: every record still opens under the old KEK.)"""
    real_record = AuditLog.record
    refusals: list[str] = []

    def record(self: AuditLog, context: Any, event: Any) -> int:
        seq = real_record(self, context, event)
        if event.action == START:
            with pytest.raises(ConfigurationError) as refused:
                build_services(world.settings, world.clock).close()
            refusals.append(refused.value.detail)
        return seq

    monkeypatch.setattr(AuditLog, "record", record)
    world.rotate()
    assert "has not finished" in refusals[0]
    assert f"keybroker kek rotate --to {world.to}" in refusals[0]
    _opens_under(world.new_settings(), world)


def _holds_the_database_open(path: str, opened: Any, release: Any) -> None:
    connection = sqlite3.connect(path)
    connection.execute("SELECT count(*) FROM keys").fetchone()
    opened.set()
    release.wait(60)
    connection.close()


def test_a_process_that_opens_the_sqlite_database_mid_rotation_stops_it_resumably(
    sqlite_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kek_rotation, "BATCH", 2)
    context = multiprocessing.get_context("spawn")  # (a forked child would share this process's SQLite state)
    opened, release = context.Event(), context.Event()
    child: list[Any] = []

    def open_it(moved: int, pending: int) -> None:
        if not child:  # after the first batch: a server starts (with the old configuration, it has the file open)
            database = str(sqlite_world.settings.data_dir / "keybroker.db")
            child.append(context.Process(target=_holds_the_database_open, args=(database, opened, release)))
            child[0].start()
            assert opened.wait(30)

    try:
        with pytest.raises(Conflict) as stopped:
            sqlite_world.rotate(open_it)
    finally:
        release.set()
        for process in child:
            process.join(30)
    assert stopped.value.instance_code == "replicas_running"
    assert "another process opened" in stopped.value.detail
    assert "run the command again to finish" in stopped.value.detail
    assert _rotations(sqlite_world) == [START]
    report = sqlite_world.rotate()  # it is gone: the rotation finishes, nothing twice
    assert report.total == len(sqlite_world.keys) + 4
    assert report.moved == report.total - 2
    _opens_under(sqlite_world.new_settings(), sqlite_world)


@pytest.mark.parametrize("database_kind", ["postgresql"])
def test_a_replica_that_starts_mid_rotation_stops_it_whatever_its_clock(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kek_rotation, "BATCH", 2)
    beats: list[int] = []

    def replica_starts(moved: int, pending: int) -> None:
        if not beats:  # a replica whose clock is a day behind: its heartbeat looks old, but it is new
            database = world.database()
            try:
                Replicas(database, FixedClock(datetime.now(UTC) - timedelta(days=1))).heartbeat(
                    "host:9", "https://kb-9:9443", "1", "0010"
                )
            finally:
                database.close()
            beats.append(1)

    with pytest.raises(Conflict) as stopped:
        world.rotate(replica_starts)
    assert stopped.value.instance_code == "replicas_running"
    assert "host:9 (https://kb-9:9443)" in stopped.value.detail
    assert _rotations(world) == [START]


@pytest.mark.parametrize("database_kind", ["postgresql"])
def test_running_replicas_are_judged_by_the_database_clock(world: World) -> None:
    """The rotating host's clock an hour ahead: a heartbeat the database got just now is still a running replica."""
    world.clock = FixedClock(datetime.now(UTC) + timedelta(hours=1))
    database = world.database()
    try:
        Replicas(database, SystemClock()).heartbeat("host:1", "https://kb-1:9443", "1", "0010")
    finally:
        database.close()
    _refused(world, Conflict, "replicas are running (last heartbeat: host:1 (https://kb-1:9443, 0 s ago")
    database = world.database()
    try:
        Replicas(database, FixedClock(datetime.now(UTC) - timedelta(seconds=31))).heartbeat(
            "host:1", "https://kb-1:9443", "1", "0010"
        )
    finally:
        database.close()
    assert world.rotate().moved > 0


# --- 8. kek status only reads ----------------------------------------------------------------------------------------


def test_kek_status_creates_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for data in (empty, tmp_path / "missing"):
        shown = runner.invoke(app, ["kek", "status", "--data-dir", str(data)])
        assert shown.exit_code == 2, shown.output
        assert f"{data} is not initialised" in shown.output
    assert list(empty.iterdir()) == []
    assert not (tmp_path / "missing").exists()


def test_kek_status_leaves_the_data_directory_as_it_was(sqlite_world: World) -> None:
    data = sqlite_world.settings.data_dir
    before = {path.name: path.read_bytes() for path in data.iterdir() if path.is_file()}
    shown = runner.invoke(app, ["kek", "status", "--data-dir", str(data)])
    assert shown.exit_code == 0, shown.output
    assert {path.name: path.read_bytes() for path in data.iterdir() if path.is_file()} == before


def _revision(path: Path) -> str:
    with sqlite3.connect(path) as connection:
        return str(connection.execute("SELECT version_num FROM alembic_version").fetchone()[0])


def test_kek_status_neither_migrates_nor_reads_a_schema_it_does_not_know(sqlite_world: World) -> None:
    data = sqlite_world.settings.data_dir
    database_file = data / "keybroker.db"
    database = Database.from_url(f"sqlite:///{database_file}")
    try:
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        with database.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0009")
    finally:
        database.close()
    older = runner.invoke(app, ["kek", "status", "--data-dir", str(data)])
    assert older.exit_code == 2, older.output
    assert "schema is revision 0009, older than this keybroker's" in older.output.replace("\n", " ")
    assert _revision(database_file) == "0009"  # not migrated
    with sqlite3.connect(database_file) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0099'")
    newer = runner.invoke(app, ["kek", "status", "--data-dir", str(data)])
    assert newer.exit_code == 2, newer.output
    assert "schema is revision 0099, newer than this keybroker knows" in newer.output.replace("\n", " ")
    assert _revision(database_file) == "0099"


# --- 9, 10. one line, nothing quoted ---------------------------------------------------------------------------------


def test_a_binary_to_file_is_refused_without_quoting_any_of_it(sqlite_world: World, tmp_path: Path) -> None:
    kek = b"\xed" + os.urandom(31)  # a master key file given as --to by mistake
    to = tmp_path / "master.key"
    to.write_bytes(kek)
    refused = runner.invoke(app, ["kek", "rotate", "--to", str(to), "--data-dir", str(sqlite_world.settings.data_dir)])
    assert refused.exit_code == 2, refused.output
    assert refused.output.replace("\n", " ").startswith(f"Configuration error: --to {to}: not a UTF-8 text file")
    said = refused.output.lower()
    assert "decode" not in said
    assert "position" not in said
    for byte in kek:
        assert f"0x{byte:02x}" not in said
        assert f"\\x{byte:02x}" not in said
    assert base64.b64encode(kek).decode().lower() not in said


def test_a_nul_byte_in_a_master_key_file_name_is_one_line(sqlite_world: World, tmp_path: Path) -> None:
    data = str(sqlite_world.settings.data_dir)
    to = tmp_path / "nul.toml"
    to.write_text('[backends.embedded]\nwrapper = { type = "local", master_key_file = "master\\u0000.key" }\n')
    new = runner.invoke(app, ["kek", "rotate", "--to", str(to), "--data-dir", data])
    assert new.exit_code == 2, new.output
    assert "master_key_file holds a NUL byte" in new.output
    (sqlite_world.settings.data_dir / "keybroker.toml").write_text(to.read_text())  # the current KEK's, this time
    current = runner.invoke(app, ["kek", "rotate", "--to", str(sqlite_world.to), "--data-dir", data])
    assert current.exit_code == 2, current.output
    assert "holds a NUL byte" in current.output
    assert "Traceback" not in current.output + new.output


def test_a_corrupt_database_is_one_line(sqlite_world: World) -> None:
    data = sqlite_world.settings.data_dir
    for name in ("keybroker.db-wal", "keybroker.db-shm"):
        (data / name).unlink(missing_ok=True)
    (data / "keybroker.db").write_bytes(b"this is not a database" * 300)
    for argv in (["kek", "status"], ["kek", "rotate", "--to", str(sqlite_world.to)]):
        result = runner.invoke(app, [*argv, "--data-dir", str(data)])
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"Configuration error: cannot open the database {data / 'keybroker.db'}")
        assert "Traceback" not in result.output


# --- 11. a role named kek ---------------------------------------------------------------------------------------------


def test_a_role_named_kek_does_not_hide_an_unfinished_rotation(
    sqlite_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kek_rotation, "BATCH", 1)

    def crash(moved: int, pending: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sqlite_world.rotate(crash)
    database = sqlite_world.database()
    try:
        audit = AuditLog(database, sqlite_world.clock)
        RoleStore(database, audit, sqlite_world.clock).put("kek", ["keys:search"], SYSTEM)  # audit target "kek" too
    finally:
        database.close()
    status = runner.invoke(app, ["kek", "status", "--data-dir", str(sqlite_world.settings.data_dir)])
    assert f"has not finished: keybroker kek rotate --to {sqlite_world.to}" in status.output
    with pytest.raises(ConfigurationError, match="has not finished") as refused:
        build_services(sqlite_world.settings, sqlite_world.clock)
    assert f"keybroker kek rotate --to {sqlite_world.to}" in refused.value.detail


# --- no secret in any output -----------------------------------------------------------------------------------------


def test_no_kek_and_no_data_key_appears_in_the_output(sqlite_world: World) -> None:
    data = sqlite_world.settings.data_dir
    done = runner.invoke(app, ["kek", "rotate", "--to", str(sqlite_world.to), "--data-dir", str(data)])
    assert done.exit_code == 0, done.output
    status = runner.invoke(app, ["kek", "status", "--data-dir", str(data), "-o", "json"])
    said = done.output + status.output
    secrets = [(data / "master.key").read_bytes(), (data / "master-2.key").read_bytes(), *sqlite_world.keys.values()]
    for secret in secrets:
        for shown in (secret.hex(), base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode()):
            assert shown not in said
            assert shown[:16] not in said
    assert _kek_ids(sqlite_world) == {LocalKeyWrapper.from_file(data / "master-2.key").kek_id}
    assert _rotations(sqlite_world) == [START, FINISH]


def _kek_ids(world: World) -> set[str]:
    database = world.database()
    try:
        counted = census(database)
        return set(counted.material_of("embedded")) | set(counted.own_total())
    finally:
        database.close()


def test_a_replica_that_checked_before_a_rotation_began_is_refused_when_it_joins(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve`` builds its services (the KEK check passes), a rotation begins, then it announces itself: refused,
    and its heartbeat is there for the rotation to see."""
    services = build_services(world.settings, world.clock)
    try:
        monkeypatch.setattr(kek_rotation, "BATCH", 1)

        def crash(moved: int, pending: int) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            world.rotate(crash)
        with pytest.raises(ConfigurationError, match="has not finished"):
            services.join()
        assert [replica.id for replica in services.replicas.all()] == [services.replica_id]
    finally:
        services.close()


def test_a_rotation_whose_new_kek_was_lost_before_anything_moved_is_finished_by_another(
    sqlite_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    def lost(*args: object) -> int:
        raise BackendUnavailable("the new KEK's holder is gone for good")

    monkeypatch.setattr(kek_rotation, "_move", lost)
    with pytest.raises(BackendUnavailable):
        sqlite_world.rotate()
    monkeypatch.undo()
    with pytest.raises(ConfigurationError, match="has not finished"):
        build_services(sqlite_world.settings, sqlite_world.clock)
    sqlite_world.to.write_text(sqlite_world.to.read_text().replace("master-2.key", "master-3.key"))
    report = sqlite_world.rotate()
    assert report.moved == report.total == len(sqlite_world.keys) + 4
    assert _rotations(sqlite_world) == [START, START, FINISH]
    _opens_under(sqlite_world.new_settings(), sqlite_world)
