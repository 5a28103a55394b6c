"""Schemathesis hooks for the contract tests (loaded through SCHEMATHESIS_HOOKS).

* Generated bodies may hold URLs (an input image in a workflow, a webhook, an S3 endpoint); the
  worker would fetch them. Each is pointed at a closed loopback port, so a run never sends
  anything off this machine and fails fast where it would have fetched.
* One check of our own: a body the document calls valid is never refused by the wrapper's own
  validation (a 400 "invalid request"). ComfyUI may still refuse the workflow (an unknown
  checkpoint name is valid as far as the document can know), and that 400 is allowed.
"""

from __future__ import annotations

import re
from typing import Any

import schemathesis
from schemathesis import GenerationMode

#: Nothing listens on port 9 (discard) here: a fetch is refused at once.
LOOPBACK = "http://127.0.0.1:9/x.png"
_URLISH = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.-]*:|//")


def _local(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _local(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_local(v) for v in value]
    if isinstance(value, str) and key != "request_id" and \
            (key in ("url", "endpoint_url") or _URLISH.search(value)):
        return LOOPBACK
    return value


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Every phase passes here just before sending (the coverage phase skips map_body)."""
    if case.body is not None and not isinstance(case.body, (str, bytes)):
        case.body = _local(case.body)


@schemathesis.check
def valid_bodies_pass_validation(ctx: Any, response: Any, case: Any) -> None:
    if case.meta is None or case.meta.generation.mode is not GenerationMode.POSITIVE:
        return
    if response.status_code != 400 or case.body is None:
        return
    try:
        answer = response.json()
    except ValueError:
        return
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, str) and error.startswith("invalid request"):
        raise AssertionError(f"the document calls this body valid, the wrapper refused it: "
                             f"{answer.get('errors')}")
