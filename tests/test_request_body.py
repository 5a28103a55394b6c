"""How deep a request body may nest: the same rule at the public port and in the wrapper
(`parse_json_body`, `worker.max_json_depth`)."""

from __future__ import annotations

import json

import pytest

from api.contract.request import RequestInvalid, parse_json_body


def nested(levels: int, innermost: object) -> object:
    """`levels` containers, alternating lists and objects, around `innermost`."""
    value = innermost
    for level in range(levels):
        value = [value] if level % 2 else {"k": value}
    return value


@pytest.mark.parametrize("innermost", [1, "s", None, [], {}])
def test_the_limit_counts_each_container_and_what_the_last_holds(innermost):
    # Seven containers around a value are eight levels, whatever the value (an empty
    # container too): a limit of 8 takes them, one container more is refused.
    assert parse_json_body(json.dumps(nested(7, innermost)).encode(), 8) == nested(7, innermost)
    with pytest.raises(RequestInvalid) as refused:
        parse_json_body(json.dumps(nested(8, innermost)).encode(), 8)
    assert refused.value.body()["errors"] == {"body": "nested deeper than 8 levels"}


def test_a_wide_workflow_is_not_deep():
    graph = {str(i): {"class_type": "KSampler", "inputs": {"seed": i, "model": ["4", 0]}}
             for i in range(2000)}
    # 7 levels: the body, input, the graph, a node, its inputs, a link, the link's "4"
    body = {"input": {"workflow_json": graph}}
    assert parse_json_body(json.dumps(body).encode(), 7) == body
    with pytest.raises(RequestInvalid):
        parse_json_body(json.dumps(body).encode(), 6)


def test_a_hostile_depth_is_refused_without_recursing():
    raw = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RequestInvalid) as refused:
        parse_json_body(raw, 64)
    assert "nested deeper than 64 levels" in json.dumps(refused.value.body())
