"""schemathesis against the real application, in process, with an admin token: every operation of /openapi.json
gets generated requests (valid and invalid ones), and every answer must be what the document says.

The run is bounded (``EXAMPLES`` per operation, derandomised so that CI sees the same requests every time) and
checks: no status >= 500; every status, content type, header and body documented (``x-problem-codes`` included:
a refusal's code must be one the document lists for that operation and status); problem+json on every error;
authentication not ignored; invalid data refused. The data directory is seeded (a policy, keys, a role, a token,
an appraisal policy, real collateral at a time it is valid) so that the listings have something to show, and a
second test sends requests about those objects, which generated ones rarely name.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckContext
from schemathesis.core.failures import Failure
from schemathesis.core.transport import Response
from schemathesis.generation.case import Case
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from keybroker import __version__
from keybroker.api.app import api_routes, create_app
from keybroker.api.errors import PROBLEM_CONTENT_TYPE
from keybroker.api.openapi import build_document
from keybroker.attestation.collateral import bundle_upload
from keybroker.audit.log import SYSTEM
from keybroker.clock import FixedClock
from keybroker.config import load_settings
from keybroker.services import Services, build_services, initialise
from tests.conftest import EXAMPLE_POLICY, REPO

EXAMPLES = 20
# Real collateral (tests/data/dcap/real), and a time at which all of it is valid: the PCCS reads answer it.
BUNDLES = ("sgx-v3-phala-00a067110000", "tdx-v4-phala-b0c06f000000")
COLLATERAL_VALID = datetime(2025, 6, 23, tzinfo=UTC)
REGO = 'package policy\nimport rego.v1\ndefault allow := false\nallow if input.attester_tcb_status == "UpToDate"\n'


class _World:
    def __init__(self, services: Services, app: FastAPI, token: str, seeded: dict[str, str]) -> None:
        self.services, self.app, self.token, self.seeded = services, app, token, seeded


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_World]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "data"
    clock = FixedClock(COLLATERAL_VALID)
    # Thousands of requests from one address, many without a token (the auth checks): no rate limit here.
    unlimited = {"limits": {"unauthenticated_rps": 1e6, "unauthenticated_burst": 10**6}}
    config = load_settings(data_dir=data_dir, overrides=unlimited)
    admin = initialise(config, clock).admin_token
    assert admin is not None
    services = build_services(config, clock)
    app = create_app(services)
    with TestClient(app) as client:  # the seed: something in every listing
        client.headers["Authorization"] = f"Bearer {admin}"
        policy = client.post("/kbs/v1/key-transfer-policies", json=copy.deepcopy(EXAMPLE_POLICY)).json()
        aes = {"algorithm": "AES", "key_length": 256}
        key = client.post("/kbs/v1/keys", json={"key_information": aes, "transfer_policy_id": policy["id"]}).json()
        p256 = {"algorithm": "EC", "curve_type": "secp256r1"}
        ec_key = client.post("/kbs/v1/keys", json={"key_information": p256, "transfer_policy_id": policy["id"]}).json()
        appraisal = client.post("/appraisal/v1/policies", json={"name": "uptodate", "policy": REGO}).json()
        assert client.put("/kbs/v1/roles/reader", json={"permissions": ["keys:search"]}).is_success
        for bundle in BUNDLES:
            items = {"items": bundle_upload(REPO / "tests" / "data" / "dcap" / "real" / bundle), "source": "fuzz"}
            assert client.post("/collateral/v1/items", json=items).is_success
    _, reader = services.tokens.issue("reader", ["reader"], [], timedelta(days=1), SYSTEM)
    seeded = {
        "policy": policy["id"],
        "key": key["id"],
        "ec_key": ec_key["id"],
        "appraisal": appraisal["id"],
        "token": reader.id,
    }
    yield _World(services, app, admin, seeded)
    asgi.shutdown_lifespans()
    services.close()


# The document /openapi.json serves (built from the routes alone: no services needed to collect the tests).
schema = schemathesis.openapi.from_dict(build_document("keybroker", __version__, api_routes()))


@schemathesis.check
def documented_problem_code(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """A refusal's ``code`` is one the document lists for this operation and status (``x-problem-codes``)."""
    problem = response.headers.get("content-type", [""])[0].startswith(PROBLEM_CONTENT_TYPE)
    if response.status_code < 400 or response.status_code == 405 or not problem:
        return None  # 405 is no operation's; a refusal that is not problem+json fails content_type_conformance
    declared = case.operation.definition.raw.get("responses", {}).get(str(response.status_code), {})
    codes = declared.get("x-problem-codes", [])
    code = response.json().get("code")
    if code not in codes:
        raise Failure(
            operation=case.operation.label,
            title="Undocumented problem code",
            message=f"{response.status_code} {code!r} is not in x-problem-codes {codes}",
        )
    return True


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_is_documented_and_none_is_a_server_error(case: Case[Any], world: _World) -> None:
    # Every request, those of the checks included, goes to the application in process.
    case.operation.app = case.operation.schema.app = world.app
    case.call_and_validate(
        headers={"Authorization": f"Bearer {world.token}"},
        additional_checks=[documented_problem_code],
        # Valid for the schema is not valid for keybroker: a policy's sections must match its attestation_type,
        # ids must exist, a CSR must parse. No JSON schema says that, so this check cannot hold here.
        excluded_checks=[positive_data_acceptance],
    )


def _csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz.example")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_the_answers_about_real_objects_are_documented(world: _World) -> None:
    """Generated requests rarely name an object that exists: these do, so the success answers of the operations on
    one object (and the transfer's nonce step) are checked against the document too."""
    ids = world.seeded
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/kbs/v1/keys/{key_id}", {"path_parameters": {"key_id": ids["key"]}}),
        (
            "PUT",
            "/kbs/v1/keys/{key_id}",
            {"path_parameters": {"key_id": ids["key"]}, "body": {"transfer_policy_id": ids["policy"]}},
        ),
        ("POST", "/kbs/v1/keys/{key_id}/transfer", {"path_parameters": {"key_id": ids["key"]}, "body": {}}),
        (
            "POST",
            "/kbs/v1/keys/{key_id}/certificate",
            {
                "path_parameters": {"key_id": ids["ec_key"]},
                "body": {"subject": "CN=fuzz.example", "san": ["DNS:fuzz.example"]},
            },
        ),
        ("GET", "/kbs/v1/keys/{key_id}/certificate", {"path_parameters": {"key_id": ids["ec_key"]}}),
        ("GET", "/kbs/v1/key-transfer-policies/{policy_id}", {"path_parameters": {"policy_id": ids["policy"]}}),
        (
            "PUT",
            "/kbs/v1/key-transfer-policies/{policy_id}",
            {"path_parameters": {"policy_id": ids["policy"]}, "body": copy.deepcopy(EXAMPLE_POLICY)},
        ),
        ("GET", "/appraisal/v1/policies/{policy_id}", {"path_parameters": {"policy_id": ids["appraisal"]}}),
        (
            "PUT",
            "/appraisal/v1/policies/{policy_id}",
            {"path_parameters": {"policy_id": ids["appraisal"]}, "body": {"name": "again", "policy": REGO}},
        ),
        ("GET", "/kbs/v1/roles/{name}", {"path_parameters": {"name": "reader"}}),
        (
            "POST",
            "/kbs/v1/tokens",
            {"body": {"name": "ci", "roles": ["reader"], "context": ["nginx"], "ttl_seconds": 3600}},
        ),
        ("DELETE", "/kbs/v1/tokens/{token_id}", {"path_parameters": {"token_id": ids["token"]}}),
        ("POST", "/cms/v1/certificates", {"body": {"csr": _csr(), "days": 30}}),
        ("POST", "/appraisal/v1/keys/rotate", {}),
        ("GET", "/sgx/certification/v4/tcb", {"query": {"fmspc": "00A067110000"}}),
        ("GET", "/tdx/certification/v4/tcb", {"query": {"fmspc": "B0C06F000000", "update": "standard"}}),
        ("GET", "/sgx/certification/v4/qe/identity", {}),
        ("GET", "/tdx/certification/v4/qe/identity", {}),
        ("GET", "/sgx/certification/v4/pckcrl", {"query": {"ca": "processor"}}),
        ("GET", "/sgx/certification/v4/pckcrl", {"query": {"ca": "platform", "encoding": "der"}}),
        ("GET", "/sgx/certification/v4/rootcacrl", {}),
        ("DELETE", "/kbs/v1/keys/{key_id}", {"path_parameters": {"key_id": ids["key"]}}),
        ("DELETE", "/appraisal/v1/policies/{policy_id}", {"path_parameters": {"policy_id": ids["appraisal"]}}),
        (
            "PUT",
            "/kbs/v1/roles/{name}",
            {"path_parameters": {"name": "spare"}, "body": {"permissions": ["audit:read"]}},
        ),
        ("DELETE", "/kbs/v1/roles/{name}", {"path_parameters": {"name": "spare"}}),
    ]
    for method, path, fields in calls:
        case = schema[path][method].Case(**fields)
        case.operation.app = case.operation.schema.app = world.app
        response = case.call_and_validate(
            headers={"Authorization": f"Bearer {world.token}"}, additional_checks=[documented_problem_code]
        )
        assert 200 <= response.status_code < 300, (method, path, response.text)
