"""PROTOCOL.md §3 through the API: keys released to the right workload in both modes, and every way a transfer
can be wrong refused with its code and reasons, audited, with no key bytes in the response."""

from __future__ import annotations

import base64
import threading
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keybroker.audit.log import SYSTEM
from tests.conftest import assert_problem
from tests.transfer.conftest import World, cached_workload_key, released_bytes, request_transfer, workload_key


def _last_transfer_audit(world: World) -> dict[str, Any]:
    entries = world.services.audit.entries(after_seq=0, limit=1000)
    return next(e for e in reversed(entries) if e["action"] == "key.transfer")


def _refused(world: World, response: Any, status: int, code: str, reason: str | None = None) -> dict[str, Any]:
    problem = assert_problem(response, status, code)
    assert "wrapped_key" not in response.text
    assert "wrapped_swk" not in response.text
    if reason is not None:
        assert reason in [r["code"] for r in problem.get("reasons", [])], problem
    entry = _last_transfer_audit(world)
    assert entry["outcome"] in ("denied", "failure")
    assert entry["details"]["status_code"] == code
    return problem


@pytest.mark.parametrize("mode", ["background", "passport"])
@pytest.mark.parametrize("tee", ["sgx", "tdx"])
def test_release_in_both_modes(world: World, tee: str, mode: str) -> None:
    policy = world.policy()
    raw = bytes(range(32))
    key_id = world.key(policy, algorithm="AES", key_length=256, key_string=base64.b64encode(raw).decode())
    nonce = world.api.post(f"/kbs/v1/keys/{key_id}/transfer", json={})
    assert nonce.headers["attestation-type"] == "SGX,TDX"
    response = request_transfer(world, key_id, world.evidence(tee), passport=mode == "passport")
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"wrapped_key", "wrapped_swk"}
    assert released_bytes(response) == raw
    entry = _last_transfer_audit(world)
    assert (entry["outcome"], entry["target"], entry["details"]["mode"]) == ("allowed", key_id, mode)
    assert entry["details"]["tee"] == tee.upper()
    assert entry["client"] == "testclient"
    assert raw.hex() not in str(entry)
    assert nonce.json()["val"] not in str(world.services.audit.entries(limit=1000))


def test_rsa_and_ec_keys_arrive_as_pkcs8(world: World) -> None:
    policy = world.policy()
    for info in ({"algorithm": "RSA", "key_length": 2048}, {"algorithm": "EC", "curve_type": "secp384r1"}):
        key_id = world.key(policy, **info)
        response = request_transfer(world, key_id, world.evidence("tdx"))
        assert response.status_code == 200, response.text
        private = serialization.load_der_private_key(released_bytes(response), password=None)
        stored = world.services.keys.load_material(world.services.keys.get(key_id)).secret
        assert (
            private.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            == stored
        )


POLICY_DENIALS: list[tuple[str, str, dict[str, Any], dict[str, Any], str]] = [
    ("wrong-mrenclave", "sgx", {}, {"mrenclave": b"\x99" * 32}, "mrenclave_mismatch"),
    ("wrong-mrsigner", "sgx", {}, {"mrsigner": b"\x99" * 32}, "mrsigner_mismatch"),
    ("wrong-isvprodid", "sgx", {}, {"isvprodid": 7}, "isvprodid_mismatch"),
    ("isvsvn-below-minimum", "sgx", {}, {"isvsvn": 1}, "isvsvn_below_minimum"),
    ("wrong-mrtd", "tdx", {}, {"mrtd": b"\x99" * 48}, "mrtd_mismatch"),
    ("wrong-rtmr", "tdx", {"tdx": {"attributes": {"mrtd": ["33" * 48], "rtmr1": "44" * 48}}}, {}, "rtmr1_mismatch"),
    (
        "seamsvn-below-minimum",
        "tdx",
        {"tdx": {"attributes": {"mrtd": ["33" * 48], "seamsvn": 9}}},
        {},
        "seamsvn_below_minimum",
    ),
    ("tcb-not-accepted", "sgx", {}, {"platform": "outdated"}, "tcb_status_not_accepted"),
    (
        "advisory-not-allowed",
        "sgx",
        {
            "sgx": {
                "attributes": {
                    "mrenclave": ["11" * 32],
                    "accepted_tcb_status": ["OutOfDate"],
                    "allowed_advisory_ids": [],
                }
            }
        },
        {"platform": "outdated"},
        "advisory_not_allowed",
    ),
    (
        "enforce-up-to-date",
        "tdx",
        {"tdx": {"attributes": {"mrtd": ["33" * 48], "enforce_tcb_upto_date": True}}},
        {"platform": "outdated"},
        "tcb_not_up_to_date",
    ),
    ("simulated-not-allowed", "sgx", {"allow_simulated": False}, {}, "simulated_evidence_not_allowed"),
    ("tee-type-not-in-policy", "tdx", {"attestation_type": ["SGX"], "tdx": None}, {}, "tee_type_not_allowed"),
]


@pytest.mark.parametrize(
    ("tee", "policy_change", "evidence_change", "reason"),
    [c[1:] for c in POLICY_DENIALS],
    ids=[c[0] for c in POLICY_DENIALS],
)
def test_policy_denials(
    world: World, tee: str, policy_change: dict[str, Any], evidence_change: dict[str, Any], reason: str
) -> None:
    key_id = world.key(world.policy(**policy_change))
    evidence_change = dict(evidence_change)  # (the parameter is shared by every run of the test)
    platform = evidence_change.pop("platform", "default")
    response = request_transfer(world, key_id, world.evidence(tee, platform=platform, **evidence_change))
    problem = _refused(world, response, 403, "policy_denied", reason)
    entry = _last_transfer_audit(world)
    assert entry["details"]["reasons"] == problem["reasons"]
    assert entry["details"]["measurements"]


def test_all_failing_rules_are_reported(world: World) -> None:
    key_id = world.key(world.policy(allow_simulated=False))
    evidence = world.evidence("sgx", platform="outdated", mrenclave=b"\x99" * 32, isvsvn=0)
    problem = _refused(world, request_transfer(world, key_id, evidence), 403, "policy_denied")
    assert {r["code"] for r in problem["reasons"]} == {
        "mrenclave_mismatch",
        "isvsvn_below_minimum",
        "tcb_status_not_accepted",
        "simulated_evidence_not_allowed",
    }


def test_attestation_refusals(world: World) -> None:
    key_id = world.key(world.policy())
    _refused(
        world,
        request_transfer(world, key_id, world.evidence("sgx", platform="revoked")),
        401,
        "attestation_failed",
        "tcb_revoked",
    )
    _refused(
        world,
        request_transfer(world, key_id, world.evidence("sgx", debug=True)),
        401,
        "attestation_failed",
        "debug_enclave",
    )
    other_key = workload_key()[1]
    _refused(
        world,
        request_transfer(world, key_id, world.evidence("sgx"), bind_to=other_key),
        401,
        "attestation_failed",
        "report_data_mismatch",
    )
    _refused(
        world,
        request_transfer(world, key_id, world.evidence("sgx"), header="TDX"),
        401,
        "attestation_failed",
        "attestation_type_mismatch",
    )


def test_header_type_the_policy_does_not_allow(world: World) -> None:
    key_id = world.key(world.policy(attestation_type=["SGX"], tdx=None))
    problem = _refused(
        world,
        request_transfer(world, key_id, world.evidence("tdx"), header="TDX"),
        403,
        "policy_denied",
        "tee_type_not_allowed",
    )
    assert len(problem["reasons"]) == 1


def test_nonce_refusals(world: World) -> None:
    from keybroker.attestation.nonce import NonceService

    key_id = world.key(world.policy())
    path = f"/kbs/v1/keys/{key_id}/transfer"
    nonce = world.api.post(path, json={}).json()
    assert request_transfer(world, key_id, world.evidence("sgx"), nonce=nonce).status_code == 200
    _refused(world, request_transfer(world, key_id, world.evidence("sgx"), nonce=nonce), 409, "nonce_replayed")
    forged = {**world.api.post(path, json={}).json(), "signature": base64.b64encode(bytes(32)).decode()}
    _refused(world, request_transfer(world, key_id, world.evidence("sgx"), nonce=forged), 401, "nonce_invalid")
    foreign = (
        NonceService(
            b"another deployment".ljust(32, b"\0"), world.services.database, world.clock, timedelta(seconds=300)
        )
        .issue()
        .as_json()
    )
    _refused(world, request_transfer(world, key_id, world.evidence("sgx"), nonce=foreign), 401, "nonce_invalid")
    # The nonce is judged before the quote is even decoded: a forged nonce with a quote that is not base64 is 401.
    spki = base64.b64encode(cached_workload_key()[1]).decode()
    garbled = {"quote": "@@@", "nonce": forged, "user_data": spki}
    sent = world.api.post(path, json=garbled, headers={"Attestation-Type": "SGX", "Authorization": ""})
    _refused(world, sent, 401, "nonce_invalid")
    old = world.api.post(path, json={}).json()
    world.clock.advance(timedelta(seconds=301))
    _refused(world, request_transfer(world, key_id, world.evidence("sgx"), nonce=old), 401, "nonce_expired")
    sent = world.api.post(
        path, json={**garbled, "nonce": old}, headers={"Attestation-Type": "SGX", "Authorization": ""}
    )
    _refused(world, sent, 401, "nonce_expired")


def test_one_nonce_two_concurrent_transfers(world: World) -> None:
    key_id = world.key(world.policy())
    nonce = world.api.post(f"/kbs/v1/keys/{key_id}/transfer", json={}).json()
    statuses: list[int] = []
    barrier = threading.Barrier(2)

    def attempt() -> None:
        barrier.wait()
        statuses.append(request_transfer(world, key_id, world.evidence("tdx"), nonce=nonce).status_code)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200, 409]


def test_workload_key_refusals(world: World) -> None:
    key_id = world.key(world.policy())
    ec_key = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for user_data in (workload_key(2048)[1], ec_key, b"not a key"):
        response = request_transfer(world, key_id, world.evidence("sgx"), user_data=user_data)
        _refused(world, response, 400, "invalid_request")


def test_passport_refusals(world: World) -> None:
    key_id = world.key(world.policy(attestation_type=["TDX"], sgx=None))
    # A token for SGX evidence: the policy allows only TDX.
    problem = _refused(
        world,
        request_transfer(world, key_id, world.evidence("sgx"), passport=True),
        403,
        "policy_denied",
        "tee_type_not_allowed",
    )
    assert problem
    # An expired token.
    path = f"/kbs/v1/keys/{key_id}/transfer"
    user = cached_workload_key()[1]
    nonce = world.api.post(path, json={}).json()
    import hashlib

    quote = world.evidence("tdx").quote(
        hashlib.sha512(base64.b64decode(nonce["val"]) + base64.b64decode(nonce["iat"]) + user).digest()
    )
    token = world.api.post(
        "/appraisal/v1/attest",
        json={
            "quote": base64.b64encode(quote).decode(),
            "verifier_nonce": nonce,
            "runtime_data": base64.b64encode(user).decode(),
        },
    ).json()["token"]
    world.clock.advance(timedelta(seconds=301))
    _refused(world, world.api.post(path, json={"attestation_token": token}), 401, "attestation_failed", "token_expired")
    # A token signed by a key this service does not know, and one that binds no nonce.
    import jwt as pyjwt

    foreign = pyjwt.encode(
        {"attester_type": "TDX"}, ec.generate_private_key(ec.SECP384R1()), algorithm="ES384", headers={"kid": "f" * 32}
    )
    _refused(
        world, world.api.post(path, json={"attestation_token": foreign}), 401, "attestation_failed", "token_unknown_key"
    )
    unbound = world.services.attestation.tokens.sign({"attester_type": "TDX"})
    _refused(
        world, world.api.post(path, json={"attestation_token": unbound}), 401, "attestation_failed", "token_not_bound"
    )


def test_client_permissions(world: World) -> None:
    key_id = world.key(world.policy(client_permissions_allof=["nginx", "USA"]))
    _refused(
        world, request_transfer(world, key_id, world.evidence("sgx")), 403, "policy_denied", "client_permission_missing"
    )
    year = timedelta(days=365)
    partial = world.services.tokens.issue("w1", ["workload"], ["nginx"], year, SYSTEM)[0]
    _refused(
        world,
        request_transfer(world, key_id, world.evidence("sgx"), token=partial),
        403,
        "policy_denied",
        "client_permission_missing",
    )
    no_transfer = world.services.tokens.issue("w2", ["auditor"], ["nginx", "USA"], year, SYSTEM)[0]
    _refused(
        world,
        request_transfer(world, key_id, world.evidence("sgx"), token=no_transfer),
        403,
        "policy_denied",
        "client_permission_missing",
    )
    _refused(
        world,
        request_transfer(world, key_id, world.evidence("sgx"), token="kb_000000000000_" + "x" * 43),
        401,
        "token_wrong_deployment",
    )
    full = world.services.tokens.issue("w3", ["workload"], ["nginx", "USA", "extra"], year, SYSTEM)[0]
    assert request_transfer(world, key_id, world.evidence("sgx"), token=full).status_code == 200


def test_deleted_key_and_backend_down(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from keybroker.errors import BackendUnavailable

    key_id = world.key(world.policy())
    store = world.services.keys.backends["embedded"]

    def down(*_args: object) -> None:
        raise BackendUnavailable("the KMS is down")

    monkeypatch.setattr(store, "get", down)
    _refused(world, request_transfer(world, key_id, world.evidence("sgx")), 503, "backend_unavailable")
    monkeypatch.undo()
    assert request_transfer(world, key_id, world.evidence("sgx")).status_code == 200  # back without a restart
    assert world.api.delete(f"/kbs/v1/keys/{key_id}").status_code == 204
    assert_problem(world.api.post(f"/kbs/v1/keys/{key_id}/transfer", json={}), 404, "key_not_found")


def test_malformed_transfer_requests(world: World) -> None:
    key_id = world.key(world.policy())
    path = f"/kbs/v1/keys/{key_id}/transfer"
    assert_problem(
        world.api.post(path, json={"quote": "AA=="}, headers={"Attestation-Type": "SGX"}), 400, "invalid_request"
    )
    assert_problem(
        world.api.post(path, json={"quote": "AA==", "nonce": {}, "user_data": "AA=="}), 400, "invalid_request"
    )  # no Attestation-Type
    assert_problem(
        world.api.post(path, content=b"[1]", headers={"content-type": "application/json", "Attestation-Type": "SGX"}),
        400,
        "invalid_request",
    )
    assert_problem(
        world.api.post(path, content=b"{", headers={"content-type": "application/json"}), 400, "invalid_json"
    )


def test_audit_failure_releases_nothing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from keybroker.errors import BackendUnavailable

    key_id = world.key(world.policy())
    original = world.services.audit.append_transfer

    def failing(context: Any, event: Any, use: Any) -> int | None:  # the decision's one write (both databases)
        if event.action == "key.transfer" and event.outcome == "allowed":
            raise BackendUnavailable("audit down", code="audit_unavailable")
        return original(context, event, use)

    monkeypatch.setattr(world.services.audit, "append_transfer", failing)
    nonce = world.api.post(f"/kbs/v1/keys/{key_id}/transfer", json={}).json()
    response = request_transfer(world, key_id, world.evidence("sgx"), nonce=nonce)
    assert_problem(response, 503, "audit_unavailable")
    assert "wrapped" not in response.text
    monkeypatch.undo()
    # The failed write took the nonce's use with it: the same nonce still works once.
    assert request_transfer(world, key_id, world.evidence("sgx"), nonce=nonce).status_code == 200


def test_passport_token_replay_and_nonce_cross_use(world: World) -> None:
    import hashlib

    key_id = world.key(world.policy())
    path = f"/kbs/v1/keys/{key_id}/transfer"
    user = cached_workload_key()[1]

    def attest(nonce: dict[str, str]) -> Any:
        quote = world.evidence("tdx").quote(
            hashlib.sha512(base64.b64decode(nonce["val"]) + base64.b64decode(nonce["iat"]) + user).digest()
        )
        return world.api.post(
            "/appraisal/v1/attest",
            json={
                "quote": base64.b64encode(quote).decode(),
                "verifier_nonce": nonce,
                "runtime_data": base64.b64encode(user).decode(),
            },
        )

    nonce = world.api.post(path, json={}).json()
    token = attest(nonce).json()["token"]
    assert world.api.post(path, json={"attestation_token": token}).status_code == 200
    _refused(world, world.api.post(path, json={"attestation_token": token}), 409, "nonce_replayed")
    # A nonce used by a background transfer cannot be attested afterwards, and one attested cannot serve a
    # background transfer: each nonce gives at most one key.
    used = world.api.post(path, json={}).json()
    assert request_transfer(world, key_id, world.evidence("tdx"), nonce=used).status_code == 200
    assert_problem(attest(used), 409, "nonce_replayed")
    attested = world.api.post(path, json={}).json()
    assert attest(attested).status_code == 200
    _refused(world, request_transfer(world, key_id, world.evidence("tdx"), nonce=attested), 409, "nonce_replayed")


def test_a_token_attested_without_a_nonce_releases_nothing(world: World) -> None:
    import hashlib

    key_id = world.key(world.policy())
    user = cached_workload_key()[1]
    quote = world.evidence("tdx").quote(hashlib.sha512(user).digest())
    response = world.api.post(
        "/appraisal/v1/attest",
        json={"quote": base64.b64encode(quote).decode(), "runtime_data": base64.b64encode(user).decode()},
    )
    assert response.status_code == 200, response.text
    _refused(
        world,
        world.api.post(f"/kbs/v1/keys/{key_id}/transfer", json={"attestation_token": response.json()["token"]}),
        401,
        "attestation_failed",
        "token_not_bound",
    )


def test_user_data_of_an_unknown_algorithm_is_bad_input(world: World) -> None:
    key_id = world.key(world.policy())
    unknown = bytes.fromhex("300c300506032a0304030300" + "0102")
    _refused(world, request_transfer(world, key_id, world.evidence("sgx"), user_data=unknown), 400, "invalid_request")


def test_transfer_policy_with_appraisal_policies(world: World) -> None:
    rego = 'package policy\nimport rego.v1\ndefault allow := false\nallow if input.attester_tcb_status == "UpToDate"\n'
    appraisal = world.api.post("/appraisal/v1/policies", json={"name": "fresh", "policy": rego}).json()["id"]
    policy = world.policy(sgx={"attributes": {"mrenclave": ["11" * 32]}, "policy_ids": [appraisal]})
    key_id = world.key(policy)
    assert request_transfer(world, key_id, world.evidence("sgx")).status_code == 200
    _refused(
        world,
        request_transfer(world, key_id, world.evidence("sgx", platform="outdated")),
        403,
        "policy_denied",
        "appraisal_policy_unmatched",
    )
    # Attribute rules still apply when the appraisal policy matches.
    _refused(
        world,
        request_transfer(world, key_id, world.evidence("sgx", mrenclave=b"\x99" * 32)),
        403,
        "policy_denied",
        "mrenclave_mismatch",
    )


def test_a_changed_policy_applies_at_once_also_from_another_replica(world: World) -> None:
    from keybroker.config import load_settings
    from keybroker.policy.model import TransferPolicyDocument
    from keybroker.services import build_services

    policy = world.policy()
    key_id = world.key(policy)
    assert request_transfer(world, key_id, world.evidence("sgx")).status_code == 200  # now cached
    # Another replica (its own services on the same database) tightens the policy.
    settings = world.services.settings
    database = {"database": settings.database.model_dump(exclude_none=True)} if settings.database.url else {}
    replica = build_services(
        load_settings(
            data_dir=settings.data_dir,
            overrides={"attestation": {"simulated_root": str(world.sim / "root-ca.pem")}, **database},
        ),
        world.clock,
    )
    try:
        document = world.services.policies.get(policy).document.model_dump(mode="json", exclude_none=True)
        document["sgx"]["attributes"]["mrenclave"] = ["99" * 32]
        replica.policies.replace(policy, TransferPolicyDocument.model_validate(document), SYSTEM)
    finally:
        replica.close()
    _refused(world, request_transfer(world, key_id, world.evidence("sgx")), 403, "policy_denied", "mrenclave_mismatch")


def _added(world: World, head: int) -> list[dict[str, Any]]:
    return world.services.audit.entries(after_seq=head, limit=1000)


def test_every_transfer_request_is_exactly_one_audit_entry(world: World) -> None:
    """Red-team finding 6: a transfer refused for its bearer token wrote auth.refused and key.transfer. Whatever
    a transfer request about a key carries, it is one key.transfer entry (and nonce requests none)."""
    key_id = world.key(world.policy(client_permissions_allof=["nginx"]))
    path = f"/kbs/v1/keys/{key_id}/transfer"
    year = timedelta(days=365)
    lacking = world.services.tokens.issue("w", ["workload"], [], year, SYSTEM)[0]
    entitled = world.services.tokens.issue("n", ["workload"], ["nginx"], year, SYSTEM)[0]
    forged = entitled[:-4] + "AAAA"
    cases: list[tuple[str, Any, int, str, str | None]] = [
        (
            "forged token",
            lambda: request_transfer(world, key_id, world.evidence(), token=forged),
            401,
            "invalid_token",
            key_id,
        ),
        (
            "missing permission",
            lambda: request_transfer(world, key_id, world.evidence(), token=lacking),
            403,
            "policy_denied",
            key_id,
        ),
        (
            "not JSON",
            lambda: world.api.post(
                path, content=b"{nope", headers={"Authorization": "", "content-type": "application/json"}
            ),
            400,
            "invalid_json",
            key_id,
        ),
        ("released", lambda: request_transfer(world, key_id, world.evidence(), token=entitled), 200, "", key_id),
    ]
    for name, call, status, code, target in cases:
        nonce_head = world.services.audit.head()[0]
        world.api.post(path, json={}, headers={"Authorization": ""})
        assert _added(world, nonce_head) == [], name  # the nonce step writes nothing
        head = world.services.audit.head()[0]
        response = call()
        assert response.status_code == status, (name, response.text)
        added = _added(world, head)
        assert len(added) == 1, (name, added)
        (entry,) = added
        assert entry["action"] == "key.transfer", name
        assert entry["target"] == target, name
        assert entry["outcome"] == ("allowed" if status == 200 else "denied"), name
        if code:
            assert entry["details"]["status_code"] == code, name


@pytest.mark.parametrize("key_id", ["0b8ea4b5-5a0e-4a5e-9a43-6c7f0a3e2a11", "not-a-key-id"])
def test_transfers_of_unknown_keys_are_aggregated(world: World, key_id: str) -> None:
    """Not a decision about a key: counted in the anonymous aggregate, so that guessing ids cannot fill the log."""
    refusals = world.api.app.state.refusals
    head, pending = world.services.audit.head()[0], refusals.pending()
    response = world.api.post(f"/kbs/v1/keys/{key_id}/transfer", json={"quote": "x"}, headers={"Authorization": ""})
    assert_problem(response, 404, "key_not_found")
    assert _added(world, head) == []
    assert refusals.pending() == pending + 1


def test_refusals_before_the_evidence_are_charged_to_the_unauthenticated_limit(tmp_path: Any, sim_dir: Any) -> None:
    """An anonymous client posting garbage (or forged tokens) to a real key gets its entries only up to the
    unauthenticated limit; then 429, aggregated, and nothing more in the audit log."""
    from tests.transfer.conftest import open_world

    limits = {"limits": {"unauthenticated_rps": 0.001, "unauthenticated_burst": 3}}
    with open_world(tmp_path, sim_dir, **limits) as world:
        key_id = world.key(world.policy())
        head = world.services.audit.head()[0]
        statuses = [
            world.api.post(
                f"/kbs/v1/keys/{key_id}/transfer",
                content=b"{nope",
                headers={"Authorization": "", "content-type": "application/json"},
            ).status_code
            for _ in range(6)
        ]
        assert statuses == [400] * 3 + [429] * 3
        assert len([e for e in _added(world, head) if e["action"] == "key.transfer"]) == 3
        # A real transfer from the same address is not held up by that (its own, attested, bucket).
        assert request_transfer(world, key_id, world.evidence()).status_code == 200
