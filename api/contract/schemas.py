"""JSON Schemas (draft 2020-12, as OpenAPI 3.1 uses them) of what the API takes and answers.

Nothing here is a second copy of the rules. The request's schemas are built from the
declarations the validator itself reads (``api.contract.request``: the ``input`` keys, the ``s3`` and
``webhook`` fields and their kinds, the request id pattern), each modifier's schema from its
bindings (``api.contract.modifiers``, with bounds that name a setting resolved to today's value), and the
statuses from the enums of ``api.wrapper.jobs``. ``tests/test_openapi.py`` holds the validator and these
schemas to the same verdict on generated documents.

Every schema refers to the others as ``#/components/schemas/<name>``: `components()` is what an
OpenAPI document carries, and `standalone()` wraps one of them for a plain JSON Schema validator.
"""

from __future__ import annotations

from typing import Any, Callable

from api.contract.modifiers import Binding, Modifier
from api.contract.request import (
    INPUT_FIELDS,
    MAX_SECONDS,
    OBJECT,
    REQUEST_ID_PATTERN,
    S3_FIELDS,
    S3_OWN_ENDPOINT,
    S3_OWN_KEYS,
    SECONDS,
    STRING,
    URL,
    URL_PATTERN,
    WEBHOOK_FIELDS,
)
from api.contract.result import FailureKind, JobStatus

Schema = dict[str, Any]
Bound = Callable[[Any], Any]

#: Timing fields of a result, in the order `Job.timings()` gives them.
TIMINGS: dict[str, tuple[list[str] | str, str]] = {
    "queued_at_ms": ("integer", "When the wrapper accepted the request (Unix ms)."),
    "started_at_ms": (["integer", "null"], "When ComfyUI was handed the prompt (Unix ms)."),
    "queue_ms": ("integer", "Time spent waiting in the queue."),
    "preprocess_ms": ("integer", "Time spent fetching and uploading input images."),
    "model_download_ms": ("integer", "Time spent waiting for model URLs of the request "
                                     "(models.allow_request_urls); 0 without any."),
    "generation_ms": ("integer", "Time ComfyUI spent on the prompt."),
    "postprocess_ms": ("integer", "Time spent collecting, inlining and uploading outputs."),
    "completed_at_ms": (["integer", "null"], "When the request ended (Unix ms)."),
    "total_ms": ("integer", "From accepted to ended."),
    "steps": ("integer", "Sampler steps seen in ComfyUI's progress events."),
    "sampling_its": (["number", "null"], "Sampler iterations per second (first step excluded)."),
}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


# --- the request ---------------------------------------------------------------------------------
_KIND_SCHEMAS: dict[str, Schema] = {
    STRING: {"type": "string"},
    OBJECT: {"type": "object"},
    SECONDS: {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
    URL: {"type": "string", "pattern": URL_PATTERN},
}


def _block(fields: dict[str, tuple[str, str]], description: str) -> Schema:
    return {"type": "object", "description": description, "additionalProperties": False,
            "properties": {key: {**_KIND_SCHEMAS[kind], "description": doc}
                           for key, (kind, doc) in fields.items()}}


def binding_schema(binding: Binding, bound: Bound) -> Schema:
    """One modifier key: its type, bounds, choices and default."""
    kind = binding.type
    schema: Schema
    if kind in ("string", "image"):
        schema = {"type": "string"}
        if kind == "image":
            schema["minLength"] = 1
    elif kind == "boolean":
        schema = {"type": "boolean"}
    elif kind == "choice":
        schema = {"enum": list(binding.choices)}
    else:
        schema = {"type": kind}
        low, high = bound(binding.minimum), bound(binding.maximum)
        if low is not None:
            schema["minimum"] = low
        if high is not None:
            schema["maximum"] = high
        if binding.multiple_of:
            schema["multipleOf"] = binding.multiple_of
        if binding.random and not _accepts(schema, -1):
            schema = {"anyOf": [{"const": -1}, schema]}
    if binding.description:
        schema["description"] = binding.description
    if binding.random:
        schema["description"] = (schema.get("description", "") +
                                 " -1 or absent: a fresh random integer.").strip()
    if binding.default is not None:
        schema["default"] = binding.default
    return schema


def _accepts(schema: Schema, value: int) -> bool:
    low, high, step = schema.get("minimum"), schema.get("maximum"), schema.get("multipleOf")
    return ((low is None or value >= low) and (high is None or value <= high)
            and (not step or value % step == 0))


def modifications_schema(modifier: Modifier, bound: Bound) -> Schema:
    """The ``modifications`` a modifier takes: its keys and aliases, nothing else."""
    properties: Schema = {}
    rules: list[Schema] = []
    for key, binding in modifier.bindings.items():
        properties[key] = binding_schema(binding, bound)
        names = [key, *binding.aliases]
        for alias in binding.aliases:
            properties[alias] = {**binding_schema(binding, bound),
                                 "description": f"Another name for {key}."}
        # A key and its alias together are one value given twice.
        rules += [{"not": {"required": [a, b]}}
                  for i, a in enumerate(names) for b in names[i + 1:]]
        if binding.required and binding.default is None:
            rules.append({"anyOf": [{"required": [name]} for name in names]}
                         if len(names) > 1 else {"required": [key]})
    schema: Schema = {"type": "object", "additionalProperties": False, "properties": properties,
                      "description": modifier.description or f"The keys of {modifier.name}."}
    if rules:
        schema["allOf"] = rules
    return schema


def _needs_modifications(modifier: Modifier) -> bool:
    return any(b.required and b.default is None for b in modifier.bindings.values())


# (not `"const": {}`: client generators take only scalar constants)
_EMPTY_OBJECT: Schema = {"type": "object", "maxProperties": 0}


def _common_input() -> Schema:
    return {
        "request_id": {"type": ["string", "null"], "description": INPUT_FIELDS["request_id"],
                       # one pattern for ECMA and Python alike: Python's "$" also matches
                       # before a final newline, which a folder name must not have
                       "anyOf": [{"const": ""}, {"pattern": REQUEST_ID_PATTERN,
                                                 "not": {"pattern": "\n"}},
                                 {"type": "null"}]},
        "s3": _nullable(ref("S3")),
        "webhook": _nullable(ref("Webhook")),
        "return_outputs_as_base64": {"type": "boolean", "default": False,
                                     "description": INPUT_FIELDS["return_outputs_as_base64"]},
        "handler": {"description": INPUT_FIELDS["handler"]},
    }


def modifier_input_name(modifier: Modifier) -> str:
    return f"ModifierInput_{modifier.name}"


def modifier_input(modifier: Modifier) -> Schema:
    """``input`` for one modifier: its name, its modifications, no workflow."""
    modifications = ref(f"Modifications_{modifier.name}")
    required = ["modifier"]
    if _needs_modifications(modifier):
        required.append("modifications")
    else:
        modifications = {"anyOf": [modifications, {"type": "null"}]}
    return {
        "type": "object", "title": f"modifier {modifier.name}", "additionalProperties": False,
        "required": required,
        "description": modifier.description,
        "properties": {
            "modifier": {"const": modifier.name, "description": INPUT_FIELDS["modifier"]},
            "modifications": {**modifications, "description": INPUT_FIELDS["modifications"]},
            "workflow_json": {"anyOf": [{"type": "null"}, _EMPTY_OBJECT, {"const": ""}],
                              "description": "Absent with a modifier."},
            **_common_input(),
        },
    }


def workflow_input() -> Schema:
    return {
        "type": "object", "title": "workflow_json", "additionalProperties": False,
        "required": ["workflow_json"],
        "properties": {
            "workflow_json": ref("WorkflowGraph"),
            "modifier": {"anyOf": [{"type": "null"}, {"const": ""}],
                         "description": "Absent with workflow_json."},
            "modifications": {"anyOf": [{"type": "null"}, _EMPTY_OBJECT],
                              "description": "Absent with workflow_json."},
            **_common_input(),
        },
    }


def request_schemas(modifiers: list[Modifier], bound: Bound) -> dict[str, Schema]:
    schemas: dict[str, Schema] = {
        "GenerateRequest": {
            "type": "object", "required": ["input"],
            "description": "A generation request. Give either a modifier (with its "
                           "modifications) or a whole workflow_json.",
            "properties": {"input": ref("Input")},
        },
        "Input": {"oneOf": [ref(modifier_input_name(m)) for m in modifiers]
                  + [ref("WorkflowInput")]},
        "WorkflowInput": workflow_input(),
        "WorkflowGraph": {
            "type": "object", "minProperties": 1,
            "description": "A ComfyUI workflow in API format: {node id: {class_type, inputs}}. "
                           "An input value that is an http(s) URL or a data: URI is fetched and "
                           "uploaded to ComfyUI; a model input (ckpt_name, lora_name, …) given "
                           "as an http(s) URL is downloaded when the operator allows it "
                           "(models.allow_request_urls, models.allowed_hosts: else 400); "
                           "\"__RANDOM_INT__\" becomes a random integer.",
            # The UI format (what "Save" writes) has nodes and links: refused with a hint.
            "not": {"anyOf": [{"required": ["nodes"], "properties": {"nodes": {"type": "array"}}},
                              {"required": ["links"]}, {"required": ["last_node_id"]}]},
            "additionalProperties": ref("WorkflowNode"),
        },
        "WorkflowNode": {
            "type": "object", "required": ["class_type"],
            "properties": {"class_type": {"type": "string", "minLength": 1},
                           "inputs": {"type": "object"}},
        },
        "S3": {**_block(S3_FIELDS, INPUT_FIELDS["s3"]),
               "if": {"required": [S3_OWN_ENDPOINT],
                      "properties": {S3_OWN_ENDPOINT: {"minLength": 1}}},
               "then": {"required": list(S3_OWN_KEYS),
                        "properties": {k: {"minLength": 1} for k in S3_OWN_KEYS}}},
        "Webhook": _block(WEBHOOK_FIELDS, INPUT_FIELDS["webhook"]),
    }
    for modifier in modifiers:
        schemas[modifier_input_name(modifier)] = modifier_input(modifier)
        schemas[f"Modifications_{modifier.name}"] = modifications_schema(modifier, bound)
    return schemas


def autoscaler_schemas(required_auth_fields: tuple[str, ...] | None) -> dict[str, Schema]:
    """The autoscaler's envelope; without `required_auth_fields` (not behind the autoscaler)
    its auth_data is accepted and not looked at."""
    auth_data: Schema = {"type": ["object", "null"],
                         "description": "Not checked: this worker is not behind the autoscaler."}
    if required_auth_fields is not None:
        auth_data = {
            "type": "object", "required": list(required_auth_fields),
            "description": "What the autoscaler's /route/ answered. The signature (RSA PKCS#1 "
                           "v1.5, SHA-256, base64) covers json.dumps({\"url\": url}, indent=4, "
                           "sort_keys=True); url must be this worker's public URL; a repeated "
                           "(signature, reqnum) is refused as a replay.",
            "properties": {
                "cost": {"type": "number"}, "endpoint": {"type": "string"},
                "reqnum": {"type": "integer"}, "request_idx": {"type": "integer"},
                "signature": {"type": "string"}, "url": {"type": "string"},
            },
        }
    envelope: Schema = {"auth_data": ref("AuthData"), "payload": ref("GenerateRequest")}
    if required_auth_fields is not None:
        envelope["session_id"] = {
            "type": "string", "description": "Run it in this open session (/session/create): "
                                            "auth_data must then be the session's own; an id "
                                            "that is not open is a 410."}
    return {
        "AutoscalerRequest": {
            "type": "object", "required": ["auth_data", "payload"],
            "description": "A request routed by the autoscaler: its signed auth_data and the "
                           "request itself as payload. Only payload goes on to the wrapper.",
            "properties": envelope,
            "not": {"required": ["input"]},
        },
        "AuthData": auth_data,
    }


def session_schemas() -> dict[str, Schema]:
    """The bodies of the vastai SDK's session and update routes, as the worker serves them
    behind the autoscaler (supervisor/autoscaler/worker_routes.py)."""
    number = {"type": "number"}
    return {
        "SessionCreateRequest": {
            "type": "object", "required": ["auth_data", "payload"],
            "description": "Open a session with what the autoscaler's /route/ answered; its "
                           "signature is checked as a request's is.",
            "properties": {"auth_data": ref("AuthData"), "payload": ref("SessionOptions")},
        },
        "SessionOptions": {
            "type": "object",
            "properties": {
                "lifetime": {"type": "number", "exclusiveMinimum": 0, "default": 60,
                             "description": "Seconds it stays open; each request in it adds "
                                            "one lifetime."},
                "on_close_route": {"type": "string", "description": "A route of the model "
                                   "server (the first wrapper) posted to when it closes."},
                "on_close_payload": {"description": "What is posted there (any JSON; an "
                                                    "object gets session_id added)."},
            },
        },
        "SessionCreated": {
            "type": "object", "additionalProperties": False,
            "required": ["session_id", "expiration"],
            "properties": {"session_id": {"type": "string"},
                           "expiration": {**number, "description": "Unix time it closes."}},
        },
        "SessionRequest": {
            "type": "object", "required": ["session_id", "session_auth"],
            "properties": {
                "session_id": {"type": "string"},
                "session_auth": {"type": "object", "description": "The session's auth_data, "
                                 "exactly as /session/create got it."},
            },
        },
        "Session": {
            "type": "object", "additionalProperties": False,
            "required": ["session_id", "auth_data", "lifetime", "expiration", "created_at",
                         "on_close_route", "on_close_payload"],
            "properties": {
                "session_id": {"type": "string"}, "auth_data": {"type": "object"},
                "lifetime": number, "expiration": number, "created_at": number,
                "on_close_route": {"type": ["string", "null"]}, "on_close_payload": {},
            },
        },
        "SessionEnded": {
            "type": "object", "additionalProperties": False,
            "required": ["ended", "removed_session"],
            "properties": {"ended": {"const": True}, "removed_session": {"type": "string"}},
        },
        "SessionHealth": {
            "type": "object", "additionalProperties": False, "required": ["ok"],
            "properties": {"ok": {"type": "boolean", "description": "Whether the session is "
                                  "open (false for one that is not)."}},
        },
        "UpdateAccepted": {
            "type": "object", "additionalProperties": False, "required": ["ok", "message"],
            "properties": {"ok": {"const": True}, "message": {"type": "string"}},
        },
    }


# --- what comes back ------------------------------------------------------------------------------
#: Added to a Result by the public port only: which instance (one per GPU) ran it.
SERVED_BY: Schema = {
    "type": "object", "additionalProperties": False,
    "description": "The instance (one ComfyUI per GPU) and the GPU that ran the request.",
    "properties": {"instance": {"type": "integer"},
                   "gpu_index": {"type": ["integer", "null"]},
                   "gpu_uuid": {"type": ["string", "null"]},
                   "gpu_name": {"type": ["string", "null"]}}}


def answer_schemas() -> dict[str, Schema]:
    """What the API answers: results, health, and the stream's events."""
    return {**_result_schemas(), **_health_schemas(), **_stream_schemas()}


def _result_schemas() -> dict[str, Schema]:
    """A request's result, its outputs and timings."""
    return {
        "Result": {
            "type": "object", "additionalProperties": False,
            "required": ["id", "status", "message", "output", "timings", "comfyui_response"],
            "description": "A request's result, or its state while it runs.",
            "properties": {
                "id": {"type": "string"},
                "status": {"enum": [s.value for s in JobStatus]},
                "message": {"type": "string"},
                "output": {"type": "array", "items": ref("OutputFile")},
                "timings": ref("Timings"),
                "comfyui_response": {"type": "object", "description":
                                     "ComfyUI's history entry, with X-Include-ComfyUI-Response: 1"},
                "prompt_id": {"type": "string"},
                "failure": {"enum": [f.value for f in FailureKind],
                            "description": "Why it failed; each kind has one HTTP status."},
                "error": {"type": "object", "description": "ComfyUI's error: its validation "
                          "error, or the node that raised (node_id, node_type, exception_type, "
                          "exception_message)."},
                "node_errors": {"type": "object", "description": "ComfyUI's per-node validation "
                                                                 "errors, intact."},
                "errors": {"type": "object", "additionalProperties": {"type": "string"},
                           "description": "Problems with the inputs, by field."},
            },
        },
        "OutputFile": {
            "type": "object", "additionalProperties": False,
            "required": ["node_id", "output_type", "type"],
            "description": "One output of an output node: a file (hard-linked into "
                           "<output>/<request_id>/) or a text.",
            "properties": {
                "filename": {"type": "string"},
                "local_path": {"type": ["string", "null"]},
                "type": {"type": "string", "description": "output, or text"},
                "subfolder": {"type": "string"},
                "node_id": {"type": "string"},
                "output_type": {"type": "string",
                                "description": "images, gifs, videos, audio, latents, text…"},
                "mimetype": {"type": "string"},
                "url": {"type": "string", "description": "Presigned S3 URL, when uploaded."},
                "upload_error": {"type": "string", "description": "Why the upload failed."},
                "data": {"type": "string", "description": "Base64, when asked for."},
                "error": {"type": "string",
                          "description": "Why the file is missing, or was not inlined."},
                "text": {"type": "string", "description": "A text output."},
            },
        },
        "Timings": {
            "type": "object", "additionalProperties": False, "required": list(TIMINGS),
            "properties": {key: {"type": kind, "description": doc}
                           for key, (kind, doc) in TIMINGS.items()},
        },
    }


def _health_schemas() -> dict[str, Schema]:
    """Errors, the wrapper's and the worker's health, the queue, the modifiers."""
    return {
        "Error": {
            "type": "object", "additionalProperties": False, "required": ["error"],
            "description": "Why the request was refused, in words.",
            "properties": {
                "error": {"type": "string"},
                "errors": {"type": "object", "additionalProperties": {"type": "string"},
                           "description": "Every problem at once, keyed by field, e.g. "
                                          "{\"input.modifications.width\": \"500 is not a "
                                          "multiple of 8\"}."},
                "status": {"const": "failed"},
                "id": {"type": "string"},
                "state": {"type": "string", "description": "The worker's state (public port)."},
                "reason": {"type": "string", "description": "Why it is in that state."},
                "estimated_wait_s": {"type": "number", "description": "The wait a new request "
                                     "would have had (public port, behind the autoscaler: "
                                     "over autoscaler.max_queue_time)."},
            },
        },
        "WrapperHealth": {
            "type": "object", "required": ["status", "reason"],
            "properties": {
                "status": {"enum": ["healthy", "unhealthy"]},
                "reason": {"type": "string"},
                "queue_depth": {"type": "integer"},
                "running": {"type": ["string", "null"]},
                "prompt_id": {"type": ["string", "null"]},
                "seconds_since_progress": {"type": ["number", "null"]},
                "served": {"type": "object", "additionalProperties": {"type": "integer"}},
            },
        },
        "QueueInfo": {
            "type": "object", "additionalProperties": False,
            "required": ["queue_depth", "running", "queue_size"],
            "properties": {"queue_depth": {"type": "integer"},
                           "running": {"type": ["string", "null"]},
                           "queue_size": {"type": "integer"}},
        },
        "ModifierList": {
            "type": "object", "required": ["modifiers"],
            "properties": {"modifiers": {"type": "array", "items": {
                "type": "object", "required": ["name", "description", "keys"],
                "properties": {
                    "name": {"type": "string"}, "description": {"type": "string"},
                    "keys": {"type": "object", "additionalProperties": {
                        "type": "object", "required": ["type", "aliases"],
                        "properties": {"type": {"type": "string"},
                                       "aliases": {"type": "array",
                                                   "items": {"type": "string"}}}}},
                }}}},
        },
        "WorkerHealth": {
            "type": "object", "required": ["state", "reason"],
            "description": "The worker state (starting, benchmarking, ready, degraded, "
                           "unhealthy, stopping), why, and the state of its parts.",
            "properties": {"state": {"type": "string"}, "reason": {"type": "string"},
                           "since": {"type": "number"}, "children": {"type": "object"},
                           "gpu": {"type": "object"}, "benchmark": {"type": "object"},
                           "queue": {"type": "object"},
                           "instances": {"type": "array", "items": {"type": "object"},
                                         "description": "One per GPU: its state, reason, GPU, "
                                                        "children and benchmark."},
                           "max_perf": {"type": ["number", "null"], "description":
                                        "Requests per second of the serving instances."}},
        },
        "Liveness": {
            "type": "object", "additionalProperties": False, "required": ["alive", "reason"],
            "properties": {"alive": {"type": "boolean"}, "reason": {"type": "string"}},
        },
        # Server-sent events of /generate/stream: each `data:` line is one of these.
    }


def _stream_schemas() -> dict[str, Schema]:
    """The events of /generate/stream."""
    return {
        "StreamStatus": {
            "type": "object", "required": ["request_id", "status", "message", "timestamp",
                                           "elapsed_time", "queue_position"],
            "description": "The data of `queued`, `status` and `progress` events.",
            "properties": {
                "request_id": {"type": "string"},
                "status": {"enum": [s.value for s in JobStatus]},
                "message": {"type": "string"},
                "timestamp": {"type": "string"},
                "elapsed_time": {"type": "number", "description": "Seconds since accepted."},
                "queue_position": {"type": "object", "required": ["position", "queue_size"],
                                   "properties": {"position": {"type": "integer"},
                                                  "queue_size": {"type": "integer"}}},
                "progress": {"type": "object", "description": "`progress` events only.",
                             "required": ["step", "max"],
                             "properties": {"step": {"type": "integer"},
                                            "max": {"type": "integer"},
                                            "its": {"type": ["number", "null"]},
                                            "node": {"type": ["string", "null"]}}},
            },
        },
        "StreamFinal": {
            "type": "object", "required": ["request_id", "status", "result", "elapsed_time"],
            "description": "The data of the last event, `final_result`.",
            "properties": {"request_id": {"type": "string"}, "status": {"const": "final_result"},
                           "result": ref("Result"), "elapsed_time": {"type": "number"}},
        },
    }


def standalone(name: str, components: dict[str, Schema]) -> Schema:
    """One component as a JSON Schema of its own (for a plain validator)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$ref": ref(name)["$ref"],
            "components": {"schemas": components}}
