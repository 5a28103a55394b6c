"""The OpenAPI 3.1 documents of the wrapper and of the public port, built when asked.

Each is built from the live parts: the modifiers loaded now (the operator's own included, with
bounds that name a setting resolved to today's value) and, for the public port, how it lets
requests in. The public port's document holds only the routes the public port serves.
``tests/test_openapi.py`` checks that every route a server registers is in its document.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any, Literal

from api.contract import schemas
from api.contract.modifiers import ModifierRegistry
from api.contract.schemas import ref

Document = dict[str, Any]
AuthMode = Literal["token", "autoscaler", "unsecured"]

_JSON = "application/json"


def _version() -> str:
    try:
        return metadata.version("comfy-worker")
    except metadata.PackageNotFoundError:
        return "0"


def _answer(description: str, *names: str, headers: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    schema = ref(names[0]) if len(names) == 1 else {"anyOf": [ref(n) for n in names]}
    answer: dict[str, Any] = {"description": description,
                              "content": {_JSON: {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.",
                                "schema": {"type": "string"}}}

# The status codes of a request that ran (or was meant to), as docs/api.md#status-codes has them.
_RAN = {
    "400": _answer("Invalid request: every problem at once, keyed by field; or ComfyUI refused "
                   "the workflow (its error and node_errors intact); or an input image could "
                   "not be used.", "Error", "Result"),
    "413": _answer("The body is over the size limit (the message names the setting).", "Error"),
    "415": _answer("The body came with a Content-Encoding: bodies are taken uncompressed.",
                   "Error"),
    "422": _answer("The workflow ran and a node raised (error.node_id, node_type, "
                   "exception_message). The request is at fault: do not retry it as it is.",
                   "Result", "Error"),
    "499": _answer("Cancelled.", "Result"),
    "500": _answer("A bug in the worker (logged with its traceback).", "Error", "Result"),
    "502": _answer("ComfyUI unreachable, or lost while running the prompt.", "Result", "Error"),
    "504": _answer("Timed out (api.request_timeout); the prompt was interrupted.", "Result"),
    "507": _answer("A disk the request needed is full (the message names the folder, its free "
                   "space and the retention settings); the worker stops taking work before "
                   "this, so another worker may serve it now.", "Result", "Error"),
}
_QUEUE_FULL = _answer("The queue is full; retry after Retry-After seconds.", "Error",
                      headers=_RETRY_AFTER)
_DUPLICATE = _answer("A request with this request_id is already queued or running.", "Error")

_BASE64_HEADERS = [
    {"name": "X-Return-Outputs-As-Base64", "in": "header", "required": False,
     "description": "1, true or yes: inline each output file as base64 (like "
                    "input.return_outputs_as_base64).",
     "schema": {"type": "string"}},
    {"name": "X-Include-ComfyUI-Response", "in": "header", "required": False,
     "description": "1, true or yes: add ComfyUI's history entry as comfyui_response.",
     "schema": {"type": "string"}},
]


def _body(*names: str) -> dict[str, Any]:
    schema = ref(names[0]) if len(names) == 1 else {"oneOf": [ref(n) for n in names]}
    return {"required": True, "content": {_JSON: {"schema": schema}}}


def _docs_paths(tag: str, security: list | None) -> dict[str, Any]:
    def op(summary: str, content_type: str, schema: dict[str, Any], operation_id: str
           ) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "tags": [tag], "summary": summary, "operationId": operation_id,
            "responses": {"200": {"description": summary,
                                  "content": {content_type: {"schema": schema}}}}}
        if security is not None:
            operation["security"] = security
            if security:
                operation["responses"]["401"] = _answer("Missing or wrong token.", "Error")
        return operation

    asset = op("A file of the documentation page (Swagger UI).", "text/javascript",
               {"type": "string"}, "docsAsset")
    asset["responses"]["200"]["content"].update(
        {kind: {"schema": {"type": "string"}} for kind in ("text/css", "image/png")})
    asset["parameters"] = [{"name": "asset", "in": "path", "required": True,
                            "schema": {"enum": list(DOC_ASSETS)}}]
    asset["responses"]["404"] = {"description": "No such file.",
                                 "content": {_JSON: {"schema": ref("Error")}}}
    return {
        "/openapi.json": {"get": op("This document.", _JSON, {"type": "object"}, "openapi")},
        "/docs": {"get": op("The API documentation page (Swagger UI).", "text/html",
                            {"type": "string"}, "docs")},
        "/docs/{asset}": {"get": asset},
    }


#: Swagger UI's files that the /docs page loads (from the swagger-ui-py package).
DOC_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "favicon-16x16.png")


def _components(registry: ModifierRegistry) -> dict[str, Any]:
    modifiers = [registry.modifiers[name] for name in registry.names()]
    return {**schemas.request_schemas(modifiers, registry.bound), **schemas.answer_schemas()}


def _info(title: str, description: str) -> dict[str, Any]:
    return {"title": title, "version": _version(), "description": description,
            "license": {"name": "MIT", "identifier": "MIT"}}


def _event(names: list[str], data: str) -> dict[str, Any]:
    return {"type": "object", "required": ["event", "data"],
            "properties": {"event": {"enum": names},
                           "data": {"type": "string", "contentMediaType": _JSON,
                                    "contentSchema": ref(data)}}}


# --- the wrapper ----------------------------------------------------------------------------------
def wrapper_document(registry: ModifierRegistry) -> Document:
    """The API wrapper (`comfy-worker api`, on loopback): no authentication of its own."""
    generate = {"requestBody": _body("GenerateRequest"), "parameters": _BASE64_HEADERS}
    sse = {
        "description": "Server-sent events: `queued` (queue_position), `status` on each change, "
                       "`progress` per sampler step (step, max, its), and last `final_result` "
                       "with the whole result. Each event's data is JSON: StreamStatus, or "
                       "StreamFinal for final_result.",
        # As OpenAPI 3.2 reads an event stream: the schema is one event's (event, data).
        "content": {"text/event-stream": {"schema": {"oneOf": [
            _event(["queued", "status", "progress"], "StreamStatus"),
            _event(["final_result"], "StreamFinal")]}}},
    }
    paths: dict[str, Any] = {
        "/generate/sync": {"post": {
            "tags": ["generate"], "operationId": "generateSync",
            "summary": "Run a request and answer its result.",
            "description": "Validated, queued (FIFO), run in ComfyUI, answered. A client that "
                           "hangs up cancels its request.",
            **generate,
            "responses": {"200": _answer("Completed.", "Result"), **_RAN,
                          "409": _DUPLICATE, "503": _QUEUE_FULL}}},
        "/generate": {"post": {
            "tags": ["generate"], "operationId": "generateAsync",
            "summary": "Queue a request; read its result later at /result/{request_id}.",
            **generate,
            "responses": {"202": {**_answer("Accepted: the request and its id.", "Result"),
                                  "links": _FOLLOW},
                          "400": _answer("Invalid request.", "Error"),
                          "409": _DUPLICATE,
                          "413": _RAN["413"], "415": _RAN["415"], "500": _RAN["500"],
                          "503": _QUEUE_FULL}}},
        "/generate/stream": {"post": {
            "tags": ["generate"], "operationId": "generateStream",
            "summary": "Run a request and follow it as server-sent events.",
            **generate,
            "responses": {"200": sse, "400": _answer("Invalid request.", "Error"),
                          "409": _DUPLICATE, "413": _RAN["413"], "415": _RAN["415"],
                          "500": _RAN["500"], "503": _QUEUE_FULL}}},
        "/result/{request_id}": {"get": {
            "tags": ["results"], "operationId": "getResult",
            "summary": "A request's result; 200 with its status while it runs.",
            "description": "A finished request answers with the status code it ended with "
                           "(e.g. 422 for a node that raised). Results stay readable for "
                           "api.result_ttl and survive a wrapper restart.",
            "parameters": [_ID_PARAMETER],
            "responses": {"200": _answer("Running, or completed.", "Result"),
                          "404": _answer("Unknown, or its result expired.", "Error"),
                          **{code: answer for code, answer in _RAN.items()
                             if code not in ("413", "415")}}}},
        "/cancel/{request_id}": {"post": {
            "tags": ["results"], "operationId": "cancel",
            "summary": "Cancel a request: drop it from the queue, or interrupt its prompt.",
            "parameters": [_ID_PARAMETER],
            "responses": {"200": _answer("The request, as it is now.", "Result"),
                          "404": _answer("Unknown request.", "Error")}}},
        "/health": {"get": {
            "tags": ["health"], "operationId": "health",
            "summary": "200 only while ComfyUI answers HTTP and WebSocket.",
            "responses": {"200": _answer("Healthy.", "WrapperHealth"),
                          "503": _answer("Unhealthy, with the reason.", "WrapperHealth")}}},
        "/queue-info": {"get": {
            "tags": ["health"], "operationId": "queueInfo", "summary": "The queue.",
            "responses": {"200": _answer("Waiting, running, and the queue's size.",
                                         "QueueInfo")}}},
        "/metrics": {"get": {
            "tags": ["health"], "operationId": "metrics",
            "summary": "The wrapper's Prometheus figures (stages, outcomes, uploads, webhooks); "
                       "the daemon serves them on with its own on the metrics listener.",
            "responses": {"200": {"description": "The text exposition format.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/modifiers": {"get": {
            "tags": ["generate"], "operationId": "modifiers",
            "summary": "The modifiers loaded, and their keys.",
            "responses": {"200": _answer("Each modifier's name, description and keys.",
                                         "ModifierList")}}},
        **_docs_paths("docs", None),
    }
    return {
        "openapi": "3.1.0",
        "info": _info("comfy-worker API wrapper",
                      "The wrapper in front of ComfyUI: the ai-dock comfyui-api-wrapper's "
                      "contract (modifiers, workflow_json, S3, webhooks), plus streaming, "
                      "cancellation and stored results. It listens on loopback; the public "
                      "port forwards /generate/sync to it."),
        "tags": [{"name": "generate"}, {"name": "results"}, {"name": "health"},
                 {"name": "docs"}],
        "paths": paths,
        "components": {"schemas": _components(registry)},
    }


#: What a client does next with an accepted request's id.
_FOLLOW = {
    "result": {"operationId": "getResult", "parameters": {"request_id": "$response.body#/id"},
               "description": "Poll the request's result."},
    "cancel": {"operationId": "cancel", "parameters": {"request_id": "$response.body#/id"},
               "description": "Cancel the request."},
}

_ID_PARAMETER = {"name": "request_id", "in": "path", "required": True,
                 "description": "The request's id (input.request_id, or the one made for it).",
                 "schema": {"type": "string"}}


# --- the public port ------------------------------------------------------------------------------
def _autoscaler_paths() -> dict[str, Any]:
    """What the public port serves besides the work behind the autoscaler: the vastai SDK's
    session routes (authenticated by the body: a signed auth_data, then the session's own as
    session_auth) and its update route (the MASTER_TOKEN as a bearer token)."""
    def op(operation_id: str, summary: str, description: str, body: str | None,
           responses: dict[str, Any], security: list) -> dict[str, Any]:
        operation: dict[str, Any] = {"tags": ["autoscaler"], "operationId": operation_id,
                                     "summary": summary, "description": description,
                                     "security": security}
        if body:
            operation["requestBody"] = _body(body)
        operation["responses"] = dict(sorted(responses.items()))
        return {"post": operation}

    malformed = _answer("Not a JSON object, or a field missing or of the wrong type (the "
                        "message names it).", "Error")
    unknown = _answer("No such session (never opened, or closed).", "Error")
    wrong_auth = _answer("session_auth is not the session's auth_data.", "Error")
    by_session = ("Names the session by session_id, with its auth_data as session_auth "
                  "(no signature of its own).")
    return {
        "/session/create": op(
            "sessionCreate", "Open a session: this worker kept for several requests.",
            "auth_data is what the autoscaler's /route/ answered and is checked as a "
            "request's (signature, URL, replay). The session holds one request's workload in "
            "the reports until it closes; requests that name its session_id run in it and "
            "extend it by one lifetime.", "SessionCreateRequest",
            {"201": _answer("Opened.", "SessionCreated"),
             "401": _answer("Missing, bad or replayed signature, or the autoscaler's key not "
                            "yet fetched.", "Error"),
             "413": _RAN["413"], "415": _RAN["415"], "422": malformed,
             "429": _answer("autoscaler.max_sessions are open already (reported Rejected).",
                            "Error")}, []),
        "/session/end": op(
            "sessionEnd", "Close a session.",
            by_session + " Its requests in flight are cancelled and on_close_payload is posted "
            "to on_close_route.", "SessionRequest",
            {"200": _answer("Closed.", "SessionEnded"), "400": unknown, "401": wrong_auth,
             "410": _answer("It closed meanwhile.", "Error"), "413": _RAN["413"],
             "415": _RAN["415"], "422": malformed}, []),
        "/session/get": op(
            "sessionGet", "A session as it is now.", by_session, "SessionRequest",
            {"200": _answer("The session.", "Session"), "400": unknown, "401": wrong_auth,
             "413": _RAN["413"], "415": _RAN["415"], "422": malformed}, []),
        "/session/health": op(
            "sessionHealth", "Whether a session is open.", by_session, "SessionRequest",
            {"200": _answer("ok: true while it is open, false for one that is not.",
                            "SessionHealth"),
             "401": wrong_auth, "413": _RAN["413"], "415": _RAN["415"], "422": malformed}, []),
        "/pyworker/update": op(
            "pyworkerUpdate", "Restart the worker to update it.",
            "The worker takes no new work, lets what is queued finish (worker.drain_timeout), "
            "stops its children and exits with status 75, for its service manager to start "
            "it again. Needs `Authorization: Bearer <MASTER_TOKEN>`; refused while "
            "MASTER_TOKEN is unset.", None,
            {"200": _answer("Accepted: the worker drains, then exits.", "UpdateAccepted"),
             "401": _answer("Missing or wrong MASTER_TOKEN.", "Error")},
            [{"masterToken": []}]),
    }


_AUTH_TEXT = {
    "token": "Send `Authorization: Bearer <WORKER_AUTH_TOKEN>` with every request except the "
             "probes (/health, /health/live).",
    "autoscaler": "Requests are routed by the autoscaler: send its signed auth_data with the "
                  "request as payload, `{\"auth_data\": {...}, \"payload\": {\"input\": ...}}`. "
                  "A missing or bad signature is a 401, a malformed envelope a 422.",
    "unsecured": "UNSECURED=true: requests are not checked.",
}


def public_document(registry: ModifierRegistry, auth: AuthMode, *, docs_public: bool,
                    required_auth_fields: tuple[str, ...] | None = None) -> Document:
    """The public port as its clients see it, for the way it lets requests in now.

    `required_auth_fields` are the autoscaler's (given in that mode only: elsewhere auth_data
    is not looked at)."""
    security: list | None = [{"bearer": []}] if auth == "token" else []
    body = {"token": ("GenerateRequest", "AutoscalerRequest"),
            "autoscaler": ("AutoscalerRequest",),
            "unsecured": ("GenerateRequest", "AutoscalerRequest")}[auth]
    refused = "Missing or wrong token." if auth == "token" else \
        "Missing, bad or replayed signature, or the autoscaler's key not yet fetched."
    responses: dict[str, Any] = {
        "200": _answer("Completed.", "Result"), **_RAN,
        "400": _RAN["400"],
        "409": _DUPLICATE,
        "422": _answer("A node raised while running (a Result), or a malformed autoscaler "
                       "envelope (an Error naming the missing fields).", "Result", "Error"),
        "503": _answer("Not ready (the state and the reason), or the queue is full.", "Error",
                       headers=_RETRY_AFTER),
    }
    if auth != "unsecured":
        responses["401"] = _answer(refused, "Error")
    if auth == "autoscaler":
        responses["410"] = _answer("The request names a session_id that is not open.", "Error")
        responses["429"] = _answer("The estimated wait is over autoscaler.max_queue_time; "
                                   "retry after Retry-After seconds (reported Rejected).",
                                   "Error", headers=_RETRY_AFTER)
    generate: dict[str, Any] = {
        "tags": ["generate"], "operationId": "generateSync",
        "summary": "Run a request and answer its result.",
        "description": "FIFO, one request in ComfyUI at a time; 503 with Retry-After while the "
                       "worker is not ready or its queue is full. " + _AUTH_TEXT[auth],
        "parameters": _BASE64_HEADERS, "requestBody": _body(*body),
        "responses": dict(sorted(responses.items())),
    }
    if security is not None:
        generate["security"] = security
    probe = {"security": []} if auth == "token" else {}
    paths: dict[str, Any] = {
        "/generate/sync": {"post": generate},
        "/health": {"get": {
            "tags": ["health"], "operationId": "health", **probe,
            "summary": "Readiness: 200 while the worker is ready or degraded.",
            "responses": {"200": _answer("Serving.", "WorkerHealth"),
                          "503": _answer("Not serving: the state and the reason.",
                                         "WorkerHealth", headers=_RETRY_AFTER)}}},
        "/health/live": {"get": {
            "tags": ["health"], "operationId": "live", **probe,
            "summary": "Liveness: 200 while the daemon's watch loop ticks.",
            "responses": {"200": _answer("Alive.", "Liveness"),
                          "503": _answer("The watch loop is stuck.", "Liveness")}}},
        **_docs_paths("docs", [] if docs_public or auth != "token" else security),
    }
    if auth == "autoscaler":
        paths.update(_autoscaler_paths())
    if auth == "autoscaler" and not docs_public:
        for path in ("/openapi.json", "/docs", "/docs/{asset}"):
            paths[path]["get"]["responses"]["401"] = _answer(
                "Behind the autoscaler the docs are served only with worker.docs_public.",
                "Error")
    components: dict[str, Any] = {"schemas": {
        **_components(registry), **schemas.autoscaler_schemas(required_auth_fields),
        **(schemas.session_schemas() if auth == "autoscaler" else {})}}
    # Every JSON answer the wrapper gives (a result, or its refusal) comes with served_by.
    for name in ("Result", "Error"):
        answer = components["schemas"][name]
        components["schemas"][name] = {**answer, "properties": {
            **answer["properties"], "served_by": schemas.SERVED_BY}}
    if auth == "token":
        components["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer", "description": _AUTH_TEXT["token"]}}
    if auth == "autoscaler":
        components["securitySchemes"] = {"masterToken": {
            "type": "http", "scheme": "bearer",
            "description": "The instance's MASTER_TOKEN (from Vast), for /pyworker/update."}}
    tags = [{"name": "generate"}, {"name": "health"}, {"name": "docs"}]
    if auth == "autoscaler":
        tags.append({"name": "autoscaler", "description": "The vastai SDK's session and "
                                                          "update routes."})
    document: Document = {
        "openapi": "3.1.0",
        "info": _info("comfy-worker",
                      "The public port of a ComfyUI worker: one generation route, guarded by "
                      "the worker's health, and its probes"
                      + (", and the autoscaler's session and update routes. "
                         if auth == "autoscaler" else ". ") + _AUTH_TEXT[auth]),
        "tags": tags,
        "paths": paths,
        "components": components,
    }
    if auth == "token":
        document["security"] = security
    return document
