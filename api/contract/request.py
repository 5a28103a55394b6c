"""The request contract: turn a body into a `GenerateRequest`, or into a list of clear problems.

Every problem is reported at once, keyed by the field it concerns, so a client fixes its request in
one round trip: ``{"error": "invalid request", "errors": {"input.modifier": "..."}}``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)

# The declarations below are read both by the checks in this module and by `api.contract.schemas`, which
# builds the API document's schemas from them; a test holds the two to the same verdicts.

#: The keys of ``input``, each with what it is for.
INPUT_FIELDS: dict[str, str] = {
    "request_id": "Your id for the request (letters, digits, '.', '_', '-'; at most 128; it "
                  "names the output folder). A UUID4 is made when it is absent or empty.",
    "modifier": "The name of a modifier (a workflow template, see GET /modifiers); give "
                "either this or workflow_json.",
    "modifications": "Values for the modifier's keys; only together with modifier.",
    "workflow_json": "A whole ComfyUI workflow in API format (Workflow > Export (API)); give "
                     "either this or modifier.",
    "s3": "Upload the outputs to S3; each field overrides the operator's setting of the same "
          "name.",
    "webhook": "POST the result to this URL when the request ends; overrides the operator's "
               "webhook settings field by field.",
    "return_outputs_as_base64": "Inline each output file as base64 in its 'data' field.",
    "handler": "Accepted and ignored (sent by some clients of the ai-dock wrapper).",
}
#: Kinds a field of the ``s3`` and ``webhook`` blocks can have.
STRING, OBJECT, SECONDS, URL = "string", "object", "seconds", "url"
#: Most seconds a webhook attempt may be given.
MAX_SECONDS = 300.0
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
#: An absolute http(s) URL (a blank value means "not given"). Checked with re.search, as JSON
#: Schema's "pattern" is.
URL_PATTERN = (r"^\s*$|^\s*[Hh][Tt][Tt][Pp][Ss]?://([A-Za-z0-9._~%!$&'()*+,;=:-]*@)?"
               r"[A-Za-z0-9._~%!$&'()*+,;=-]+(:" + _PORT + r")?([/?#][\x21-\x7e]*)?\s*$")
S3_FIELDS: dict[str, tuple[str, str]] = {
    "access_key_id": (STRING, "Access key id."),
    "secret_access_key": (STRING, "Secret access key; never logged or returned."),
    "endpoint_url": (URL, "S3-compatible endpoint; a request that sets its own must also "
                             "bring its own keys."),
    "bucket_name": (STRING, "Bucket the outputs go to, as {request_id}/{filename}."),
    "region": (STRING, "Region of the bucket."),
}
WEBHOOK_FIELDS: dict[str, tuple[str, str]] = {
    "url": (URL, "Where the result is POSTed; must resolve to a public address unless the "
                    "operator allows private targets."),
    "extra_params": (OBJECT, "Sent back as 'extra' in the webhook's body."),
    "secret": (STRING, "HMAC-SHA256 key: the body's signature is sent as X-Webhook-Signature."),
    "timeout": (SECONDS, "Seconds each delivery attempt may take."),
}
#: A request that picks its own S3 endpoint must bring its own keys: the operator's keys never
#: sign uploads to an endpoint a client chose.
S3_OWN_ENDPOINT = "endpoint_url"
S3_OWN_KEYS = ("access_key_id", "secret_access_key")
_INPUT_KEYS = set(INPUT_FIELDS)

UI_FORMAT_HINT = (
    "workflow_json looks like a UI-format export (it has 'nodes' and 'links'); the API needs the "
    "API format: in ComfyUI use Workflow > Export (API) (older versions: enable dev mode in the "
    "settings, then 'Save (API Format)') and send that file's content")


class RequestInvalid(Exception):
    """A request that breaks the contract; `problems` maps a field to what is wrong with it."""

    def __init__(self, problems: dict[str, str], request_id: str | None = None):
        self.problems = problems
        self.request_id = request_id
        super().__init__("; ".join(f"{k}: {v}" for k, v in problems.items()))

    def body(self) -> dict[str, Any]:
        count = len(self.problems)
        body: dict[str, Any] = {
            "error": f"invalid request: {count} problem{'s' if count != 1 else ''}",
            "errors": self.problems,
            "status": "failed",
        }
        if self.request_id:
            body["id"] = self.request_id
        return body


@dataclass
class GenerateRequest:
    request_id: str
    modifier: str | None = None
    modifications: dict[str, Any] = field(default_factory=dict)
    workflow: dict[str, Any] | None = None
    s3: dict[str, Any] | None = None
    webhook: dict[str, Any] | None = None
    return_base64: bool = False
    include_comfyui_response: bool = False
    id_was_given: bool = False

    def to_record(self) -> dict[str, Any]:
        """What is persisted about the request (no credentials)."""
        return {"request_id": self.request_id, "modifier": self.modifier,
                "mode": "modifier" if self.modifier else "workflow_json"}


def json_depth(value: Any, limit: int) -> bool:
    """True when `value`, as json.loads makes it (dicts and lists, no subclasses), nests no
    deeper than `limit` (a scalar counts as a level inside its container). One level at a time,
    holding only the containers of the next: no recursion on hostile input, and a third of the
    time a stack of every value took on a large workflow (1.4 ms of CPU against 3.9 on a
    1000-node graph, on the event loop of the wrapper and of the public port)."""
    level = [value]
    depth = 1
    while True:
        if depth > limit:
            return False
        deeper: list[Any] = []
        more = False
        for item in level:
            kind = type(item)
            if kind is dict:
                children: Any = item.values()
            elif kind is list:
                children = item
            else:
                continue
            if children:
                more = True
                deeper += [c for c in children if type(c) is dict or type(c) is list]
        if not more:
            return True
        depth += 1
        level = deeper


class _NotJson(ValueError):
    pass


def _no_constant(name: str) -> Any:
    """Python's json reads NaN and Infinity, which JSON has not (and no bound can check)."""
    raise _NotJson(name)


def parse_json_body(raw: bytes, max_depth: int = 64) -> Any:
    """Decode a body, raising RequestInvalid with the position of a syntax error."""
    if not raw.strip():
        raise RequestInvalid({"body": "empty; expected a JSON object like {\"input\": {...}}"})
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except _NotJson as exc:
        raise RequestInvalid({"body": f"not valid JSON: {exc} is not a JSON value"}) from None
    except UnicodeDecodeError:
        raise RequestInvalid({"body": "not UTF-8 text"}) from None
    except json.JSONDecodeError as exc:
        raise RequestInvalid({"body": f"not valid JSON: {exc.msg} at line {exc.lineno} "
                                      f"column {exc.colno}"}) from None
    except RecursionError:
        raise RequestInvalid({"body": f"nested deeper than {max_depth} levels"}) from None
    if not json_depth(data, max_depth):
        raise RequestInvalid({"body": f"nested deeper than {max_depth} levels"})
    return data


def check_api_graph(workflow: Any, problems: dict[str, str], where: str = "input.workflow_json"
                    ) -> None:
    """An API-format graph is {node id: {"class_type": str, "inputs": {...}}}."""
    if not isinstance(workflow, dict):
        problems[where] = "expected an object (a ComfyUI API-format workflow)"
        return
    if isinstance(workflow.get("nodes"), list) or "links" in workflow or "last_node_id" in workflow:
        problems[where] = UI_FORMAT_HINT
        return
    if not workflow:
        problems[where] = "empty; expected a ComfyUI API-format workflow"
        return
    for node_id, node in workflow.items():
        if not isinstance(node, dict):
            problems[f"{where}.{node_id}"] = "expected a node object with class_type and inputs"
        elif not isinstance(node.get("class_type"), str) or not node.get("class_type"):
            problems[f"{where}.{node_id}.class_type"] = "missing; every node needs its class_type"
        elif "inputs" in node and not isinstance(node["inputs"], dict):
            problems[f"{where}.{node_id}.inputs"] = "expected an object"


def _kind_problem(kind: str, value: Any) -> str | None:
    if kind == OBJECT:
        return None if isinstance(value, dict) else "expected an object"
    if kind == SECONDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0 < value <= MAX_SECONDS:
            return f"expected a number of seconds, more than 0 and at most {MAX_SECONDS:g}"
        return None
    if kind == URL:
        if not isinstance(value, str):
            return "expected a string"
        if not re.search(URL_PATTERN, value):
            return "expected an absolute http(s) URL, like https://host:port/path"
        return None
    return None if isinstance(value, str) else "expected a string"


def _check_block(block: Any, name: str, fields: dict[str, tuple[str, str]],
                 problems: dict[str, str]) -> None:
    if block is None:
        return
    if not isinstance(block, dict):
        problems[f"input.{name}"] = "expected an object"
        return
    for key, value in block.items():
        if key not in fields:
            problems[f"input.{name}.{key}"] = f"unknown key (known: {', '.join(sorted(fields))})"
            continue
        problem = _kind_problem(fields[key][0], value)
        if problem:
            problems[f"input.{name}.{key}"] = problem


def parse_request(data: Any, *, headers: dict[str, str] | None = None) -> GenerateRequest:
    """Validate a decoded body against the contract (structure only; modifiers are checked later)."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    if not isinstance(data, dict):
        raise RequestInvalid({"body": "expected a JSON object like {\"input\": {...}}"})
    if "input" not in data:
        hint = " (behind the autoscaler, send it as payload)" if "auth_data" in data else ""
        raise RequestInvalid({"input": "missing; the body must be {\"input\": {...}}" + hint})
    body = data["input"]
    if not isinstance(body, dict):
        raise RequestInvalid({"input": "expected an object"})

    problems: dict[str, str] = {}
    raw_id = body.get("request_id")
    request_id = ""
    if raw_id is None or raw_id == "":
        request_id = str(uuid.uuid4())
    elif not isinstance(raw_id, str):
        problems["input.request_id"] = "expected a string"
    elif not REQUEST_ID_RE.fullmatch(raw_id):  # fullmatch: "$" alone lets a final "\n" in
        problems["input.request_id"] = ("only letters, digits, '.', '_' and '-' (at most 128, "
                                        "not starting with '.', '_' or '-'): it names a folder")
    else:
        request_id = raw_id

    for key in body:
        if key not in _INPUT_KEYS:
            problems[f"input.{key}"] = "unknown key (known: " + ", ".join(
                sorted(_INPUT_KEYS - {"handler"})) + ")"

    modifier = body.get("modifier")
    workflow = body.get("workflow_json")
    modifications = body.get("modifications")
    has_modifier = modifier not in (None, "")
    has_workflow = workflow not in (None, {}, "")
    if has_modifier and has_workflow:
        problems["input"] = "give either modifier (with modifications) or workflow_json, not both"
    elif not has_modifier and not has_workflow:
        problems["input"] = "give either modifier (with modifications) or workflow_json"
    if has_modifier and not isinstance(modifier, str):
        problems["input.modifier"] = "expected the name of a modifier"
    if modifications not in (None, {}) and not has_modifier:
        problems["input.modifications"] = "only allowed together with modifier"
    if modifications is not None and not isinstance(modifications, dict):
        problems["input.modifications"] = "expected an object of key: value"
    if has_workflow and not has_modifier:
        check_api_graph(workflow, problems)

    _check_block(body.get("s3"), "s3", S3_FIELDS, problems)
    s3 = body.get("s3")
    if isinstance(s3, dict) and isinstance(s3.get(S3_OWN_ENDPOINT), str) and \
            s3[S3_OWN_ENDPOINT] and not all(isinstance(s3.get(k), str) and s3[k]
                                            for k in S3_OWN_KEYS):
        problems[f"input.s3.{S3_OWN_ENDPOINT}"] = (
            "a request that chooses its own S3 endpoint must also bring its own "
            + " and ".join(S3_OWN_KEYS))
    _check_block(body.get("webhook"), "webhook", WEBHOOK_FIELDS, problems)

    flag = body.get("return_outputs_as_base64", False)
    if not isinstance(flag, bool):
        problems["input.return_outputs_as_base64"] = "expected true or false"
        flag = False
    if headers.get("x-return-outputs-as-base64", "").strip().lower() in ("1", "true", "yes"):
        flag = True
    include = headers.get("x-include-comfyui-response", "").strip().lower() in ("1", "true", "yes")

    if problems:
        raise RequestInvalid(problems, request_id or None)
    return GenerateRequest(
        request_id=request_id,
        modifier=modifier if has_modifier else None,
        modifications=dict(modifications or {}),
        workflow=workflow if has_workflow else None,
        s3=body.get("s3"), webhook=body.get("webhook"),
        return_base64=flag, include_comfyui_response=include,
        id_was_given=bool(raw_id))
