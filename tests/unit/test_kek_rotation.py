"""KEK rotation in-process (``backends.kek_rotation``, ``backends.kek_records``): everything a KEK wraps moves under
the new one and opens there (key material, CA keys, the token signing key, the nonce key), the configuration that
names only the new KEK serves and the old one is refused with what to do; a rotation interrupted after any batch
leaves every record wholly under one KEK, start-up says which command finishes it, and running it again finishes
with nothing lost and nothing wrapped twice; every refusal names its reason and changes nothing. On SQLite and on
PostgreSQL. (Real processes, Transit, PKCS#11 and kill -9: tests/integration/test_kek_rotate.py.)"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import select, update
from typer.testing import CliRunner

from keybroker.audit.chain import verify_chain
from keybroker.audit.log import SYSTEM, AuditLog
from keybroker.backends import kek_rotation
from keybroker.backends.embedded import EmbeddedKeyStore
from keybroker.backends.kek_records import FINISH, START, census
from keybroker.backends.kek_rotation import Report, open_deployment, read_target, rotate
from keybroker.backends.local_kek import LocalKeyWrapper
from keybroker.cli.main import app
from keybroker.clock import FixedClock
from keybroker.config import Settings, load_settings
from keybroker.errors import BackendUnavailable, ConfigurationError, Conflict, StoredKeyCorrupt
from keybroker.ids import KeyId, PolicyId
from keybroker.keys.models import Algorithm, Curve, KeyMaterial, KeySpec
from keybroker.keys.service import NewKey
from keybroker.policy.model import TransferPolicyDocument
from keybroker.services import build_services, initialise
from keybroker.storage.db import Database
from keybroker.storage.tables import Base, EmbeddedMaterialRow
from tests.conftest import NOW, sgx_policy

runner = CliRunner()
NEW_SECTION = '[backends.embedded]\nwrapper = { type = "local", master_key_file = "master-2.key" }\n'
AES = KeySpec(Algorithm.AES, 256)


@dataclass
class World:
    """A deployment with keys, a token signing key, a nonce made before the rotation and a ``--to`` file."""

    settings: Settings
    clock: FixedClock
    keys: dict[str, bytes]
    nonce: Any
    to: Path
    overrides: dict[str, Any]

    def new_settings(self) -> Settings:
        """The configuration after the rotation: the section of the --to file in keybroker.toml."""
        (self.settings.data_dir / "keybroker.toml").write_text(self.to.read_text())
        return load_settings(data_dir=self.settings.data_dir, overrides=self.overrides)

    def database(self) -> Database:
        return open_deployment(self.settings)

    def rotate(self, progress: kek_rotation.Progress | None = None, settings: Settings | None = None) -> Report:
        database = self.database()
        try:
            return rotate(settings or self.settings, read_target(self.to), database, AuditLog(database, self.clock),
                          SYSTEM, self.clock, progress)  # fmt: skip
        finally:
            database.close()


def _make(tmp_path: Path, overrides: dict[str, Any], count: int = 5) -> World:
    settings = load_settings(data_dir=tmp_path / "data", overrides=overrides)
    clock = FixedClock(NOW)
    initialise(settings, clock)
    services = build_services(settings, clock)
    try:
        policy = services.policies.create(TransferPolicyDocument.model_validate(sgx_policy()), SYSTEM)
        keys: dict[str, bytes] = {}
        for n in range(count):
            secret = os.urandom(32)
            new = NewKey(AES, PolicyId(policy.id), label=f"k{n}")
            keys[services.keys.store(new, KeyMaterial(AES, secret), SYSTEM).id] = secret
        ec_new = NewKey(KeySpec(Algorithm.EC, 384, Curve.P384), PolicyId(policy.id))
        ec_material = services.keys.make_material(ec_new)
        keys[services.keys.store(ec_new, ec_material, SYSTEM).id] = ec_material.secret
        services.attestation.tokens.sign({"probe": True})  # the token signing key exists
        nonce = services.attestation.nonces.issue()
    finally:
        services.close()
    to = tmp_path / "new-kek.toml"
    to.write_text(NEW_SECTION)
    clock.advance(timedelta(minutes=1))
    return World(settings, clock, keys, nonce, to, overrides)


@pytest.fixture
def world(tmp_path: Path, database_settings: Callable[[Path], dict[str, Any]]) -> World:
    return _make(tmp_path, database_settings(tmp_path / "data"))


@pytest.fixture
def sqlite_world(tmp_path: Path) -> World:
    return _make(tmp_path, {})


def _everything(settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (a refused rotation changes none)."""
    database = open_deployment(settings)
    try:
        with database.transaction() as session:
            return {
                table.name: sorted(tuple(map(repr, row)) for row in session.execute(select(table)))
                for table in Base.metadata.sorted_tables
            }
    finally:
        database.close()


def _opens_under(settings: Settings, world: World) -> None:
    """Every key's material, the CA keys, the token signing key and the nonce key work under ``settings``."""
    services = build_services(settings, world.clock)
    try:
        for key_id, secret in world.keys.items():
            assert services.keys.load_material(services.keys.get(key_id)).secret == secret
        services.attestation.nonces.check(world.nonce)  # the nonce key is the same one
        assert services.attestation.tokens.verify(services.attestation.tokens.sign({"after": 1}))["after"] == 1
        services.ca.server_certificate(["localhost"], world.clock.now(), 30)
        assert services.workload_ca is not None
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w")])
        services.workload_ca.certify_key(ec.generate_private_key(ec.SECP256R1()).public_key(), name, [], NOW, 30)
    finally:
        services.close()


def _kek_of(settings: Settings) -> str:
    return LocalKeyWrapper.from_file(settings.resolve(Path("master.key"))).kek_id


def test_everything_moves_and_opens_under_the_new_kek_only(world: World) -> None:
    old_kek = _kek_of(world.settings)
    report = world.rotate()

    new_kek = LocalKeyWrapper.from_file(world.settings.data_dir / "master-2.key").kek_id
    assert (report.from_kek, report.to_kek) == (old_kek, new_kek)
    assert report.created_key_file == world.settings.data_dir / "master-2.key"
    assert (world.settings.data_dir / "master-2.key").stat().st_mode & 0o777 == 0o600
    own = 2 + 1 + 1  # two CA keys, the token signing key, the nonce key
    assert report.moved == report.total == len(world.keys) + own
    database = world.database()
    try:
        counted = census(database)
        assert counted.material_of("embedded") == {new_kek: len(world.keys)}
        assert counted.own_total() == {new_kek: own}
        entries = AuditLog(database, world.clock).entries()
    finally:
        database.close()
    rotations = [e for e in entries if e["target"] == "kek"]
    assert [e["action"] for e in rotations] == [START, FINISH]
    assert rotations[0]["details"] == {
        "backend": "embedded", "from": old_kek, "to": new_kek, "to_file": str(world.to), "records": report.total,
    }  # fmt: skip
    assert rotations[1]["details"]["moved"] == report.moved
    head = entries[-1]
    assert verify_chain(entries, head["seq"], head["hash"]).ok

    # The old configuration is refused, saying which KEK to configure instead.
    with pytest.raises(ConfigurationError, match=f"configure KEK {new_kek} on this replica"):
        build_services(world.settings, world.clock)
    # The new one opens everything, also once the old master key is gone.
    new = world.new_settings()
    (world.settings.data_dir / "master.key").unlink()
    _opens_under(new, world)


def test_running_it_again_after_it_finished_moves_nothing(sqlite_world: World) -> None:
    first = sqlite_world.rotate()
    before = _everything(sqlite_world.settings)
    again = sqlite_world.rotate()
    assert again.moved == 0
    assert again.total == first.total
    assert again.finished_before is not None
    assert _everything(sqlite_world.settings) == before  # not even an audit entry


@pytest.mark.parametrize("after_batches", [1, 2])
def test_an_interrupted_rotation_is_refused_at_start_then_finished_by_running_it_again(
    world: World, monkeypatch: pytest.MonkeyPatch, after_batches: int
) -> None:
    monkeypatch.setattr(kek_rotation, "BATCH", 2)  # 6 keys: three pages of data keys, then keybroker's own

    class Crash(Exception):
        pass

    def crash(moved: int, pending: int) -> None:
        if moved >= 2 * after_batches:
            raise Crash

    old_kek = _kek_of(world.settings)
    with pytest.raises(Crash):
        world.rotate(crash)
    new_kek = LocalKeyWrapper.from_file(world.settings.data_dir / "master-2.key").kek_id
    database = world.database()
    try:
        counted = census(database)
    finally:
        database.close()
    # Each record wholly under one KEK; keybroker's own keys (last, together) all still under the old one.
    assert counted.material_of("embedded") == {new_kek: 2 * after_batches, old_kek: len(world.keys) - 2 * after_batches}
    assert counted.own_total() == {old_kek: 4}

    finish = f"keybroker kek rotate --to {world.to}"
    with pytest.raises(ConfigurationError, match="has not finished") as old_config:
        build_services(world.settings, world.clock)
    assert finish in old_config.value.detail
    new = world.new_settings()
    with pytest.raises(ConfigurationError, match=f"Configure KEK {old_kek} again") as new_config:
        build_services(new, world.clock)
    assert finish in new_config.value.detail
    (world.settings.data_dir / "keybroker.toml").unlink()

    report = world.rotate()
    assert report.moved == len(world.keys) - 2 * after_batches + 4  # only what was left
    assert report.total == len(world.keys) + 4
    _opens_under(world.new_settings(), world)
    database = world.database()
    try:
        actions = [e["action"] for e in AuditLog(database, world.clock).entries() if e["target"] == "kek"]
    finally:
        database.close()
    assert actions == [START, START, FINISH]


def test_a_rotation_that_died_after_its_last_record_is_closed_by_the_next_run(
    sqlite_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []
    real_record = AuditLog.record

    def die_before_finish(self: AuditLog, context: Any, event: Any) -> int:
        if event.action == FINISH:
            raise RuntimeError("killed")
        written.append(event.action)
        return real_record(self, context, event)

    monkeypatch.setattr(AuditLog, "record", die_before_finish)
    with pytest.raises(RuntimeError):
        sqlite_world.rotate()
    monkeypatch.undo()
    with pytest.raises(ConfigurationError, match="has not finished"):  # every record moved, but no finish entry
        build_services(sqlite_world.settings, sqlite_world.clock)
    report = sqlite_world.rotate()
    assert report.moved == 0
    assert report.finished_before is None
    _opens_under(sqlite_world.new_settings(), sqlite_world)


def test_two_runs_at_once_move_each_record_once(sqlite_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second run that moves everything while the first holds a page it has read: the first writes none of it
    (its updates are conditional on the row it read), and between them every record moved exactly once."""
    real_move = kek_rotation._move
    other: list[Report] = []

    def move_after_the_other_run(database: Database, records: Any, old: Any, new: Any) -> int:
        if not other:
            monkeypatch.setattr(kek_rotation, "_move", real_move)
            other.append(sqlite_world.rotate())
        return real_move(database, records, old, new)

    monkeypatch.setattr(kek_rotation, "_move", move_after_the_other_run)
    first = sqlite_world.rotate()
    assert other[0].moved == other[0].total == len(sqlite_world.keys) + 4
    assert first.moved == 0
    _opens_under(sqlite_world.new_settings(), sqlite_world)


def test_a_new_kek_that_does_not_give_back_what_it_wrapped_writes_nothing(
    sqlite_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(An HSM that ignored the IV it was given, say: the new blob is checked before it replaces the old one.)"""
    real_wrap = LocalKeyWrapper.wrap
    calls: list[int] = []

    def wrap(self: LocalKeyWrapper, data_key: bytes, context: bytes) -> bytes:
        calls.append(1)
        blob = real_wrap(self, data_key, context)
        return blob if context == b"keybroker/check" or len(calls) < 3 else real_wrap(self, os.urandom(32), context)

    monkeypatch.setattr(LocalKeyWrapper, "wrap", wrap)
    before = _everything(sqlite_world.settings)
    with pytest.raises(StoredKeyCorrupt, match="did not open again; not written"):
        sqlite_world.rotate()
    after = _everything(sqlite_world.settings)
    assert after["embedded_key_material"] == before["embedded_key_material"]
    assert after["certificate_authorities"] == before["certificate_authorities"]


def test_a_kek_holder_lost_half_way_says_to_run_it_again_and_that_finishes_it(
    sqlite_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kek_rotation, "BATCH", 2)
    real_wrap = LocalKeyWrapper.wrap
    calls: list[int] = []

    def wrap(self: LocalKeyWrapper, data_key: bytes, context: bytes) -> bytes:
        calls.append(1)
        if len(calls) == 4:  # the second batch: the holder goes away
            raise BackendUnavailable("the KEK holder is down")
        return real_wrap(self, data_key, context)

    monkeypatch.setattr(LocalKeyWrapper, "wrap", wrap)
    with pytest.raises(BackendUnavailable) as lost:
        sqlite_world.rotate()
    assert lost.value.detail.startswith("the batch from key ")
    assert lost.value.detail.endswith(
        "the KEK holder is down; what has moved stays moved: run the command again to finish"
    )
    monkeypatch.undo()
    assert sqlite_world.rotate().moved == len(sqlite_world.keys) + 4 - 2
    _opens_under(sqlite_world.new_settings(), sqlite_world)


# --- refusals: each names its reason and changes nothing ----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "no such file"),
        ("[backends.embedded\n", "not valid TOML"),
        ('[server]\nlisten = "x"\n' + NEW_SECTION, "holds server; it must hold only one [backends.<name>]"),
        ("", "holds 0 backend sections"),
        (NEW_SECTION + '[backends.other]\nwrapper = { type = "local" }\n', "holds 2 backend sections"),
        ('[backends.vault]\ntype = "vault"\nurl = "https://v:8200"\n', "is not an embedded backend"),
        ("[backends.embedded]\n", "gives no wrapper"),
        ('[backends.embedded]\nwrapper = { master_key = "' + "A" * 44 + '" }\n', "a master key does not go into"),
        ('[backends.embedded]\nwrapper = { type = "local", file = "x" }\n', "backends.embedded.wrapper.local.file"),
        ('[backends.embedded]\nwrapper = { type = "kms" }\n', "backends.embedded.wrapper"),
        ('[backends.embedded]\nwrapper = { type = "vault-transit", mount = "t" }\n', "url"),
    ],
)
def test_a_wrong_to_file_is_refused_with_its_reason(tmp_path: Path, content: str | None, reason: str) -> None:
    path = tmp_path / "to.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigurationError) as refused:
        read_target(path)
    assert reason in refused.value.detail
    assert f"--to {path}" in refused.value.detail


def _refused(world: World, error: type[Exception], reason: str, settings: Settings | None = None) -> None:
    before = _everything(world.settings)
    with pytest.raises(error) as refused:
        world.rotate(settings=settings)
    assert reason in str(refused.value), refused.value
    assert _everything(world.settings) == before


def test_a_backend_that_is_not_configured_is_refused(sqlite_world: World) -> None:
    sqlite_world.to.write_text(NEW_SECTION.replace("backends.embedded", "backends.elsewhere"))
    _refused(sqlite_world, ConfigurationError, "backend 'elsewhere' is not an embedded backend of this configuration")


def test_the_same_kek_is_refused(sqlite_world: World) -> None:
    sqlite_world.to.write_text('[backends.embedded]\nwrapper = { type = "local", master_key_file = "master.key" }\n')
    _refused(sqlite_world, ConfigurationError, "which backend 'embedded' is configured with already: give another KEK")


def test_the_new_kek_named_in_the_configuration_too_early_is_refused_with_what_to_do(sqlite_world: World) -> None:
    LocalKeyWrapper.create_file(sqlite_world.settings.data_dir / "master-2.key")
    new = sqlite_world.new_settings()  # configured before anything moved: everything is under the old KEK still
    _refused(sqlite_world, ConfigurationError, "configure the KEK they are under again", settings=new)


def test_the_old_kek_missing_is_refused(sqlite_world: World) -> None:
    (sqlite_world.settings.data_dir / "master.key").unlink()
    _refused(sqlite_world, ConfigurationError, "the current KEK of backend 'embedded' cannot be used (master key file")
    assert not (sqlite_world.settings.data_dir / "master-2.key").exists()


def test_an_unreachable_new_kek_changes_nothing(sqlite_world: World) -> None:
    sqlite_world.to.write_text(
        '[backends.embedded]\nwrapper = { type = "vault-transit", url = "http://127.0.0.1:9", timeout_seconds = 1, '
        'auth = { method = "token", token = { env = "KB_TEST_NO_SUCH_TOKEN" } } }\n'
    )
    os.environ["KB_TEST_NO_SUCH_TOKEN"] = "s.nothing"
    try:
        _refused(sqlite_world, BackendUnavailable, "the new KEK of backend 'embedded' cannot be used")
    finally:
        del os.environ["KB_TEST_NO_SUCH_TOKEN"]


def test_a_new_key_file_that_cannot_be_written_is_refused(sqlite_world: World) -> None:
    sqlite_world.to.write_text(NEW_SECTION.replace("master-2.key", "no/such/dir/master-2.key"))
    _refused(sqlite_world, ConfigurationError, "cannot create the new master key file")


def _put(world: World, wrapper: LocalKeyWrapper, key_id: str) -> None:
    database = world.database()
    try:
        store = EmbeddedKeyStore("embedded", database, wrapper, world.clock)
        store.put(KeyId(key_id), KeyMaterial(AES, os.urandom(32)))
    finally:
        database.close()


def test_material_without_its_key_record_is_refused_with_the_reconcile_command(sqlite_world: World) -> None:
    _put(sqlite_world, LocalKeyWrapper.from_file(sqlite_world.settings.data_dir / "master.key"), "orphan")
    _refused(sqlite_world, Conflict, "run 'keybroker backends reconcile --older-than 0' first")


def test_records_under_a_third_kek_are_refused(sqlite_world: World) -> None:
    database = sqlite_world.database()
    try:
        with database.transaction(write=True) as session:
            ref = session.scalars(select(EmbeddedMaterialRow.ref)).first()
            session.execute(update(EmbeddedMaterialRow).where(EmbeddedMaterialRow.ref == ref).values(kek_id="local:0"))
    finally:
        database.close()
    _refused(sqlite_world, ConfigurationError, "1 record(s) under KEK local:0, neither the current KEK")
    assert not (sqlite_world.settings.data_dir / "master-2.key").exists()  # created for the check, removed again


def test_a_record_that_does_not_open_under_the_old_kek_stops_it_before_anything_moves(sqlite_world: World) -> None:
    database = sqlite_world.database()
    try:
        with database.transaction(write=True) as session:
            row = session.scalars(select(EmbeddedMaterialRow).order_by(EmbeddedMaterialRow.ref.desc())).first()
            assert row is not None
            row.wrapped_dek = bytes([row.wrapped_dek[0] ^ 1]) + row.wrapped_dek[1:]
            damaged = row.key_id
    finally:
        database.close()
    _refused(sqlite_world, StoredKeyCorrupt, f"key {damaged}: a wrapped data key failed authentication; nothing was")


# --- the commands -------------------------------------------------------------------------------------------------


def test_the_cli_rotates_reports_and_refuses_in_one_line(sqlite_world: World) -> None:
    data = str(sqlite_world.settings.data_dir)
    bad = runner.invoke(app, ["kek", "rotate", "--to", str(sqlite_world.to) + ".missing", "--data-dir", data])
    assert bad.exit_code == 2
    assert bad.output.startswith("Configuration error: --to ")
    assert "no such file" in bad.output
    done = runner.invoke(app, ["kek", "rotate", "--to", str(sqlite_world.to), "--data-dir", data])
    assert done.exit_code == 0, done.output
    assert "moved 10 records of backend 'embedded'" in done.output
    assert "Keep the old KEK as long as you keep backups from before the rotation" in done.output
    assert "Traceback" not in done.output
    status = runner.invoke(app, ["kek", "status", "--data-dir", data, "-o", "json"])
    assert status.exit_code == 0, status.output
    shown = json.loads(status.stdout)
    assert shown["last_rotation"]["finished"] is True
    assert {r["what"] for r in shown["records"]} == {
        "data keys of backend embedded", "CA keys", "token signing keys", "service secrets",
    }  # fmt: skip


def test_the_cli_says_an_unfinished_rotation_and_how_to_finish_it(
    sqlite_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kek_rotation, "BATCH", 1)

    def crash(moved: int, pending: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sqlite_world.rotate(crash)
    status = runner.invoke(app, ["kek", "status", "--data-dir", str(sqlite_world.settings.data_dir)])
    assert status.exit_code == 0, status.output
    assert f"has not finished: keybroker kek rotate --to {sqlite_world.to}" in status.output
    serve_like = runner.invoke(app, ["backends", "check", "--data-dir", str(sqlite_world.settings.data_dir)])
    assert serve_like.exit_code == 2
    assert f"Finish it: keybroker kek rotate --to {sqlite_world.to}" in serve_like.output


def test_without_a_master_key_file_start_up_says_where_keybrokers_own_keys_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The KEK from the environment (as on replicas): keybroker's own keys name a KEK no configured wrapper holds."""
    old_key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY", old_key)
    world = _make(tmp_path, {}, count=3)
    old_kek = LocalKeyWrapper.from_base64(old_key).kek_id
    monkeypatch.setattr(kek_rotation, "BATCH", 1)

    def crash(moved: int, pending: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        world.rotate(crash)
    monkeypatch.delenv("KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY")
    with pytest.raises(ConfigurationError) as unfinished:
        build_services(world.new_settings(), world.clock)
    assert unfinished.value.detail.startswith(
        f"keybroker's own keys (CA, token signing and nonce keys) are still wrapped by KEK {old_kek}"
    )
    assert f"run keybroker kek rotate --to {world.to}" in unfinished.value.detail
    (world.settings.data_dir / "keybroker.toml").unlink()

    world.rotate()  # (the settings loaded with the old KEK from the environment)
    new_kek = LocalKeyWrapper.from_file(world.settings.data_dir / "master-2.key").kek_id
    monkeypatch.setenv("KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY", old_key)  # a replica with the old KEK
    with pytest.raises(
        ConfigurationError, match=f"since 'keybroker kek rotate' moved them there .*: configure KEK {new_kek}"
    ):
        build_services(load_settings(data_dir=world.settings.data_dir), world.clock)


def test_the_master_key_from_the_environment_is_named_in_the_next_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY", key)
    world = _make(tmp_path, {}, count=1)
    done = runner.invoke(app, ["kek", "rotate", "--to", str(world.to), "--data-dir", str(world.settings.data_dir)])
    assert done.exit_code == 0, done.output
    assert "comes from KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY: unset it" in done.output
    new_key = (world.settings.data_dir / "master-2.key").read_bytes()
    for secret in (base64.b64decode(key), new_key, *world.keys.values()):  # both KEKs, every key's material
        for shown in (secret.hex(), base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode()):
            assert shown not in done.output
