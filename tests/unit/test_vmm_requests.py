"""Control requests (kasou.vmm.requests): untrusted JSON in, a typed Request or ConfigError
out."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kasou.errors import ConfigError
from kasou.vmm.requests import Reply, Request, RequestKind, parse_request


@pytest.mark.parametrize("name", ["status", "pause", "resume", "stop"])
def test_plain_requests(name: str) -> None:
    assert parse_request({"request": name}) == Request(RequestKind(name))


def test_exec_with_defaults() -> None:
    request = parse_request({"request": "exec", "argv": ["uname", "-a"]})
    assert request == Request(RequestKind.EXEC, ("uname", "-a"), "", 60.0)


def test_exec_with_everything() -> None:
    message = {"request": "exec", "argv": ["cat"], "stdin": "hello\n", "timeout": 5}
    request = parse_request(message)
    assert request.argv == ("cat",)
    assert request.stdin == "hello\n"
    assert request.timeout == 5.0
    assert isinstance(request.timeout, float)


@pytest.mark.parametrize("timeout", [0.001, 1, 86400, 86400.0])
def test_exec_timeouts_in_range(timeout: float) -> None:
    request = parse_request({"request": "exec", "argv": ["true"], "timeout": timeout})
    assert request.timeout == timeout


def test_shutdown_replies_at_once_unless_asked_to_wait() -> None:
    assert parse_request({"request": "shutdown"}) == Request(RequestKind.SHUTDOWN, wait=0.0)
    request = parse_request({"request": "shutdown", "wait": 30})
    assert (request.wait, isinstance(request.wait, float)) == (30.0, True)


@pytest.mark.parametrize("wait", [-1, True, "60", None, 86401, math.inf, math.nan, [60]])
def test_shutdown_wait_bounds(wait: object) -> None:
    error = _refused({"request": "shutdown", "wait": wait})
    assert error.field == "wait"
    assert "0 to 86400" in str(error)


def test_shutdown_takes_no_exec_arguments() -> None:
    error = _refused({"request": "shutdown", "timeout": 5})
    assert "shutdown does not take timeout" in str(error)


def _refused(message: object) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_request(message)
    return caught.value


@pytest.mark.parametrize("name", ["reboot", "STATUS", "", "exec "])
def test_unknown_requests_list_the_known_ones(name: str) -> None:
    error = _refused({"request": name})
    assert error.field == "request"
    assert f"unknown request {name!r}" in str(error)
    assert "status, pause, resume, stop, exec" in str(error)


@pytest.mark.parametrize(
    "message", [None, 1, "status", ["status"], {}, {"request": 1}, {"req": "status"}]
)
def test_a_request_is_an_object_with_a_request_name(message: object) -> None:
    error = _refused(message)
    assert error.field == "request"
    assert '{"request": "status"}' in str(error)


@pytest.mark.parametrize(
    "message",
    [
        {"request": "status", "argv": ["ls"]},
        {"request": "stop", "force": True},
        {"request": "exec", "argv": ["ls"], "cwd": "/"},
    ],
)
def test_extra_fields_are_refused(message: dict[str, Any]) -> None:
    error = _refused(message)
    assert error.field == "request"
    assert "does not take" in str(error)
    extra = (set(message) - {"request", "argv", "stdin", "timeout"}) or {"argv"}
    for name in extra:
        assert name in str(error)


@pytest.mark.parametrize(
    "argv",
    [None, [], "ls -l", ["ls", 1], [["ls"]], ["ls", ""], [""], ["ls\0-l"], ["ls", "a\0"], [True]],
)
def test_exec_argv_must_be_non_empty_strings(argv: object) -> None:
    message: dict[str, object] = {"request": "exec"}
    if argv is not None:
        message["argv"] = argv
    error = _refused(message)
    assert error.field == "argv"
    assert "non-empty list of non-empty strings" in str(error)


@pytest.mark.parametrize("stdin", [b"bytes", 1, None, ["line"]])
def test_exec_stdin_must_be_text(stdin: object) -> None:
    error = _refused({"request": "exec", "argv": ["cat"], "stdin": stdin})
    assert error.field == "stdin"


@pytest.mark.parametrize(
    "timeout", [0, 0.0, -1, -0.5, True, False, 86400.5, 10**9, math.inf, math.nan, "5", None]
)
def test_exec_timeout_bounds(timeout: object) -> None:
    error = _refused({"request": "exec", "argv": ["true"], "timeout": timeout})
    assert error.field == "timeout"
    assert "above 0, at most 86400" in str(error)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)

request_like = st.fixed_dictionaries(
    {"request": st.sampled_from([kind.value for kind in RequestKind]) | st.text(max_size=8)},
    optional={
        "argv": st.lists(st.text(max_size=6), max_size=3) | json_values,
        "stdin": st.text(max_size=6) | json_values,
        "timeout": st.floats() | st.integers() | json_values,
        "wait": st.floats() | st.integers() | json_values,
    },
)


@given(json_values | request_like)
def test_any_json_value_gives_a_request_or_config_error(message: object) -> None:
    try:
        request = parse_request(message)
    except ConfigError:
        return
    assert isinstance(request, Request)
    assert 0 < request.timeout <= 86400
    assert 0 <= request.wait <= 86400


def test_replies_encode_as_the_protocol_says() -> None:
    assert Reply(True, {"state": "running"}).to_json() == {
        "ok": True,
        "result": {"state": "running"},
    }
    refused = Reply(False, error_type="LifecycleError", error="cannot pause: the VM is paused")
    assert json.loads(json.dumps(refused.to_json())) == {
        "ok": False,
        "error": {"type": "LifecycleError", "message": "cannot pause: the VM is paused"},
    }


def test_a_snapshot_copies_the_scratch_disks_unless_asked_for_all() -> None:
    plain = parse_request({"request": "snapshot", "path": "/s"})
    every = parse_request({"request": "snapshot", "path": "/s", "disks": "all"})
    assert plain.disks == "scratch" and every.disks == "all"


@pytest.mark.parametrize("value", ["some", "", True, None, ["all"]])
def test_a_snapshot_refuses_other_disk_choices(value: object) -> None:
    with pytest.raises(ConfigError, match="disks"):
        parse_request({"request": "snapshot", "path": "/s", "disks": value})
