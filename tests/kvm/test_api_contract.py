"""Contract tests generated from kasoud's OpenAPI schema (schemathesis) against a live kasoud
on /dev/kvm: every documented operation, fed schema-valid requests, answers without a server
error, with a documented status and content type, and a body that matches the schema.

Bounded: a few examples per operation. Left out: the endless event stream, the console
WebSocket (not in the schema) and starting VMs (a spec without a kernel boots the default
guest, which is the nested host's business); files in and out run against VMs that are not
running, so they exercise the refusals only.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._kasoud import Kasoud, free_port, guest_spec, remove_tmp, short_tmp

pytestmark = pytest.mark.kvm

TOKEN = "contract-token-0123456789"
EXAMPLES = 12


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[Kasoud, str]]:
    root = short_tmp()
    (root / "token").write_text(TOKEN)
    port = free_port()
    daemon = Kasoud(root, "--tcp", f"127.0.0.1:{port}", "--token-file", str(root / "token"))
    try:
        # A VM that exists, so that some generated names hit one (schemathesis draws names
        # from the schema's pattern; these few letters are likely among them).
        for name in ("a", "b", "0"):
            assert daemon.api.post("/v1/vms", json=guest_spec(name)).status_code == 201
        yield daemon, f"http://127.0.0.1:{port}"
    finally:
        daemon.remove_all()
        status = daemon.terminate()
        remove_tmp(root)
    assert status == 0


def _operations(base_url: str) -> Iterator[object]:
    import schemathesis

    schema = schemathesis.openapi.from_url(
        f"{base_url}/openapi.json", headers={"authorization": f"Bearer {TOKEN}"}
    )
    schema = schema.exclude(path="/v1/events", method="GET")
    for result in schema.get_all_operations():
        yield result.ok()


def test_every_operation_keeps_its_contract(live: tuple[Kasoud, str]) -> None:
    from hypothesis import HealthCheck, assume, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    daemon, base_url = live
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    headers = {"authorization": f"Bearer {TOKEN}"}
    tested = []
    for operation in _operations(base_url):
        label = operation.label  # type: ignore[attr-defined]

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())  # type: ignore[attr-defined]
        def check(case: object) -> None:
            query = getattr(case, "query", None)
            if isinstance(query, dict) and "start" in query:
                query["start"] = False  # declared only: no default guest booted here
            path = getattr(case, "path_parameters", None) or {}
            assume(path.get("action") not in ("start", "restart", "resume"))
            case.call_and_validate(  # type: ignore[attr-defined]
                base_url=base_url, headers=headers, checks=checks, timeout=30
            )

        check()
        tested.append(label)
    assert "POST /v1/vms" in tested
    assert "GET /v1/vms/{name}" in tested
    assert len(tested) >= 12
    assert daemon.api.get("/v1/host").status_code == 200
