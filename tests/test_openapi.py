"""The API documents, in-process: they validate, they list every route the servers register and
every modifier, and the request validator and the documents' schemas agree on every body.

The agreement is checked on generated bodies (hypothesis): the odd documents of the fuzz test,
and bodies built near each modifier's bounds. For each one, "the schema accepts it" must equal
"the wrapper accepts it" (`parse_request`, then the modifier applied, as `/generate` does).
"""

from __future__ import annotations

import asyncio
import json
import string
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from api.contract.modifiers import BUILTIN_DIR, ModifierRegistry
from api.contract.openapi import public_document, wrapper_document
from api.contract.request import RequestInvalid, parse_json_body, parse_request
from api.contract.schemas import standalone
from api.wrapper.s3 import S3Settings
from api.wrapper.server import build_app, merge_blocks
from api.wrapper.service import build_graph
from api.wrapper.webhooks import WebhookSettings
from supervisor.autoscaler import REQUIRED_AUTH_FIELDS
from supervisor.autoscaler.env import AutoscalerEnv
from supervisor.autoscaler.link import AutoscalerLink
from supervisor.serving.gates import TokenGate
from supervisor.serving.public import PublicServer
from supervisor.state import Readiness, WorkerState
from tests.support.bodies import documents, odd_values

LIMITS = {"api.max_dimension": 256, "api.max_steps": 50}
# The shipped modifiers, plus one with the binding kinds they lack (choice, boolean, image).
TEST_MODIFIERS = Path(__file__).with_name("modifiers")
REGISTRY = ModifierRegistry([BUILTIN_DIR, TEST_MODIFIERS], limit=LIMITS.get)
WRAPPER = wrapper_document(REGISTRY)
SCHEMA = Draft202012Validator(standalone("GenerateRequest", WRAPPER["components"]["schemas"]))
AGREE = settings(max_examples=400, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
METHODS = {"get", "post", "put", "delete", "patch"}
MASTER = "master-token"


def public_documents():
    return {
        "token": public_document(REGISTRY, "token", docs_public=False),
        "token-docs-public": public_document(REGISTRY, "token", docs_public=True),
        "autoscaler": public_document(REGISTRY, "autoscaler", docs_public=False,
                                      required_auth_fields=REQUIRED_AUTH_FIELDS),
        "unsecured": public_document(REGISTRY, "unsecured", docs_public=False),
    }


# --- the documents ---------------------------------------------------------------------------------
def test_wrapper_document_is_valid_openapi_3_1():
    assert WRAPPER["openapi"] == "3.1.0"
    validate(WRAPPER)


@pytest.mark.parametrize("mode", list(public_documents()))
def test_public_documents_are_valid_openapi_3_1(mode):
    validate(public_documents()[mode])


def operations(document) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items()
            for method in item if method in METHODS}


def registered(app) -> set[tuple[str, str]]:
    """What the aiohttp app answers (HEAD comes with every GET and is not listed)."""
    found = set()
    for resource in app.router.resources():
        for route in resource:
            if route.method != "HEAD":
                found.add((route.method, resource.canonical))
    return found


def test_wrapper_document_lists_exactly_the_routes_the_wrapper_registers():
    app = build_app(SimpleNamespace(registry=REGISTRY), max_body_bytes=1024, max_json_depth=8)
    assert registered(app) == operations(WRAPPER)


def public_app(gate, routes=()):
    """The public port's app as the daemon builds it (listeners.PublicPort), for one gate."""
    server = PublicServer(tracker=None, gate=gate, metrics=None, max_waiting=1, max_json_depth=8,
                          request_timeout=1, liveness=lambda: (True, ""), snapshot=dict,
                          document=dict, routes=routes)
    return server.build_app(1024)


def autoscaler_link(report_addr: str = "http://unused"):
    """The daemon's AutoscalerLink, from the settings and environment a Vast instance has."""
    from config import load_settings

    env = AutoscalerEnv(report_addrs=(report_addr,), container_id=42, master_token=MASTER,
                        public_ip="203.0.113.7", public_port=41234, worker_port=3000)
    settings = load_settings(None, environ={"REPORT_ADDR": report_addr, "CONTAINER_ID": "42",
                                            "PUBLIC_IPADDR": "203.0.113.7",
                                            "AUTOSCALER_REPORT_INTERVAL": "0.2"})
    return AutoscalerLink(env, settings)


def test_public_document_lists_exactly_the_routes_the_public_port_registers():
    app = public_app(TokenGate("t"))
    docs = public_documents()
    for mode in ("token", "token-docs-public", "unsecured"):
        assert registered(app) == operations(docs[mode]), mode
    # and nothing of the wrapper's own routes leaks into it
    assert ("POST", "/generate") not in operations(docs["token"])


def test_autoscaler_document_lists_exactly_the_routes_the_public_port_registers_then():
    """Behind the autoscaler the daemon adds the link's routes (sessions, update): each one
    the app answers is in the document, and the document lists nothing it does not answer."""
    link = autoscaler_link()
    app = public_app(link.gate(), link.routes())
    documented = operations(public_documents()["autoscaler"])
    assert registered(app) == documented
    assert {("POST", "/session/create"), ("POST", "/session/end"), ("POST", "/session/get"),
            ("POST", "/session/health"), ("POST", "/pyworker/update")} <= documented


def documented_answer(document, path: str, status: int):
    """A validator for the body the document gives `path` for `status` (KeyError: none)."""
    answer = document["paths"][path]["post"]["responses"][str(status)]
    schema = answer["content"]["application/json"]["schema"]
    return Draft202012Validator({**schema, "components": document["components"]})


async def test_the_autoscaler_routes_answer_as_documented(fake_autoscaler):
    """Each session and update answer of the real routes, signed by a stand-in autoscaler,
    has a status the document lists for that route and a body its schema accepts."""
    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer

    document = public_documents()["autoscaler"]
    link = autoscaler_link(fake_autoscaler.url)
    updates = []
    link.on_update = lambda: updates.append(True)
    await link.start(lambda: Readiness(WorkerState.READY, "ready", 0.5, time.time()))
    seen = []
    try:
        for _ in range(100):            # the public key, fetched from the stand-in
            if link.verifies:
                break
            await asyncio.sleep(0.05)
        assert link.verifies
        async with TestServer(public_app(link.gate(), link.routes())) as server, \
                ClientSession() as http:
            async def post(path, expected, body=None, **kwargs):
                async with http.post(server.make_url(path), json=body, **kwargs) as answer:
                    got = (answer.status, await answer.json())
                assert got[0] == expected, (path, got)
                errors = [e.message for e in documented_answer(document, path, got[0])
                          .iter_errors(got[1])]
                assert not errors, (path, got, errors)
                seen.append((path, got[0]))
                return got[1]

            auth = fake_autoscaler.make_auth_data(url=link.env.public_url, cost=100)
            options = {"lifetime": 30, "on_close_payload": {"bye": 1}}
            created = await post("/session/create", 201, {"auth_data": auth, "payload": options})
            await post("/session/create", 401, {"auth_data": {**auth, "signature": "AAAA"},
                                                "payload": options})
            await post("/session/create", 422, {"auth_data": auth, "payload": {"lifetime": 0}})
            named = {"session_id": created["session_id"], "session_auth": auth}
            view = await post("/session/get", 200, named)
            assert view["session_id"] == created["session_id"] and view["lifetime"] == 30
            assert (await post("/session/health", 200, named))["ok"] is True
            await post("/session/get", 401, {**named, "session_auth": {"other": 1}})
            await post("/session/get", 422, {"session_auth": auth})
            ended = await post("/session/end", 200, named)
            assert ended["removed_session"] == created["session_id"]
            await post("/session/end", 400, named)
            await post("/session/get", 400, named)
            assert (await post("/session/health", 200, named))["ok"] is False
            await post("/pyworker/update", 401, headers={"Authorization": "Bearer nope"})
            assert not updates
            await post("/pyworker/update", 200, headers={"Authorization": f"Bearer {MASTER}"})
            assert updates == [True]
    finally:
        await link.stop()
    assert {path for path, _ in seen} == {path for _, path in operations(document)
                                          if path.startswith(("/session/", "/pyworker/"))}


def test_every_status_code_of_the_docs_table_is_documented():
    api_page = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    table = api_page.split("## Status codes", 1)[1].split("\n\n", 1)[1].split("\n\n", 1)[0]
    codes = {code for line in table.splitlines()[2:]
             for code in line.split("|")[1].replace("/", " ").split()}
    documented = {code for document in [WRAPPER, *public_documents().values()]
                  for item in document["paths"].values() for op in item.values()
                  for code in op["responses"]}
    assert codes and codes <= documented, codes - documented


def test_auth_schemes_follow_the_public_ports_mode():
    docs = public_documents()
    assert docs["token"]["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert docs["token"]["paths"]["/generate/sync"]["post"]["security"] == [{"bearer": []}]
    assert docs["token"]["paths"]["/health"]["get"]["security"] == []      # probes are open
    assert docs["token"]["paths"]["/docs"]["get"]["security"] == [{"bearer": []}]
    assert docs["token-docs-public"]["paths"]["/docs"]["get"]["security"] == []
    auto = docs["autoscaler"]
    body = auto["paths"]["/generate/sync"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/AutoscalerRequest"}
    assert auto["components"]["schemas"]["AuthData"]["required"] == list(REQUIRED_AUTH_FIELDS)
    assert "401" in auto["paths"]["/docs"]["get"]["responses"]
    # The work and the sessions carry their auth in the body (a signed auth_data, then the
    # session's own as session_auth); only the update takes a bearer token, the MASTER_TOKEN.
    assert set(auto["components"]["securitySchemes"]) == {"masterToken"}
    assert auto["paths"]["/pyworker/update"]["post"]["security"] == [{"masterToken": []}]
    for path in ("/generate/sync", "/session/create", "/session/end", "/session/get",
                 "/session/health"):
        assert auto["paths"][path]["post"]["security"] == [], path
    create = auto["components"]["schemas"]["SessionCreateRequest"]
    assert create["properties"]["auth_data"] == {"$ref": "#/components/schemas/AuthData"}
    assert auto["components"]["schemas"]["SessionRequest"]["required"] == ["session_id",
                                                                            "session_auth"]
    for mode in ("token", "unsecured"):
        assert not any(path.startswith(("/session/", "/pyworker/")) for path in docs[mode]["paths"])


# --- modifiers ---------------------------------------------------------------------------------------
def test_every_shipped_modifier_has_its_schema():
    components = WRAPPER["components"]["schemas"]
    shipped = {json.loads(p.read_text())["name"] for p in BUILTIN_DIR.glob("*.json")}
    assert shipped == {"Text2Image", "Image2Image", "RawWorkflow"}
    variants = {r["$ref"].rsplit("/", 1)[1] for r in components["Input"]["oneOf"]}
    for name in shipped:
        modifier = REGISTRY.get(name)
        assert f"ModifierInput_{name}" in variants
        schema = components[f"Modifications_{name}"]
        keys = set(modifier.bindings) | {a for b in modifier.bindings.values() for a in b.aliases}
        assert set(schema["properties"]) == keys
        assert schema["additionalProperties"] is False
    width = components["Modifications_Text2Image"]["properties"]["width"]
    # a bound that names a setting is today's value of that setting
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (16, 256, 8)
    assert components["Modifications_Text2Image"]["properties"]["cfg_scale"]["maximum"] == 100
    image = components["Modifications_Image2Image"]
    assert {"anyOf": [{"required": ["input_image"]}, {"required": ["image"]}]} in image["allOf"]
    assert components["ModifierInput_Image2Image"]["required"] == ["modifier", "modifications"]


def test_an_operators_modifier_appears_with_its_keys(tmp_path):
    (tmp_path / "Upscale.json").write_text(json.dumps({
        "name": "Upscale", "description": "Scale an image up.",
        "workflow": {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
                     "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0]}}},
        "bindings": {
            "image": {"targets": [["1", "image"]], "type": "image", "required": True},
            "method": {"targets": [["2", "upscale_method"]], "type": "choice",
                       "choices": ["nearest-exact", "bicubic"], "default": "bicubic"},
            "factor": {"targets": [["2", "scale_by"]], "type": "number", "minimum": 1,
                       "maximum": "api.max_dimension"}}}))
    registry = ModifierRegistry([BUILTIN_DIR, tmp_path], limit=LIMITS.get)
    document = wrapper_document(registry)
    validate(document)
    schema = document["components"]["schemas"]["Modifications_Upscale"]
    assert schema["properties"]["method"] == {"enum": ["nearest-exact", "bicubic"],
                                              "default": "bicubic"}
    assert schema["properties"]["factor"] == {"type": "number", "minimum": 1, "maximum": 256}
    validator = Draft202012Validator(standalone("GenerateRequest",
                                                document["components"]["schemas"]))
    assert validator.is_valid({"input": {"modifier": "Upscale",
                                         "modifications": {"image": "a", "factor": 2}}})
    assert not validator.is_valid({"input": {"modifier": "Upscale",
                                             "modifications": {"method": "lanczos"}}})


# --- the validator and the schema agree ------------------------------------------------------------
def wrapper_problems(document) -> dict[str, str]:
    """What the wrapper finds wrong with a body, as /generate does before queueing it (all but
    the DNS lookup of a webhook's host)."""
    try:
        parsed = parse_request(document)
        problems, _ = merge_blocks(parsed, S3Settings(), WebhookSettings())
        build_graph(REGISTRY, parsed)
    except RequestInvalid as exc:
        return exc.problems
    return problems


def wrapper_accepts(document) -> bool:
    return not wrapper_problems(document)


def check_agreement(document) -> None:
    try:  # as it arrives over HTTP: what json.dumps writes and the wrapper reads back
        document = parse_json_body(json.dumps(document).encode())
    except RequestInvalid:
        return  # NaN/Infinity: not JSON, refused before any schema applies
    by_schema = SCHEMA.is_valid(document)
    by_wrapper = wrapper_accepts(document)
    if by_schema != by_wrapper:
        why = [e.message for e in SCHEMA.iter_errors(document)][:3]
        why.append(f"wrapper: {wrapper_problems(document)}")
        raise AssertionError(f"schema {'accepts' if by_schema else 'refuses'}, wrapper "
                             f"{'accepts' if by_wrapper else 'refuses'}: {document!r} ({why})")


def near(binding) -> st.SearchStrategy:
    """Values around what a modifier key accepts: in and out of its bounds and type."""
    kind = binding.type
    if kind in ("integer", "number"):
        low = REGISTRY.bound(binding.minimum)
        high = REGISTRY.bound(binding.maximum)
        low = -20 if low is None else low
        high = 300 if high is None or high > 10**6 else high
        ints = st.integers(int(low) - 9, int(high) + 9)
        values = ints | ints.map(float) | st.sampled_from([-1, -1.0, 0, high, high + 1, 0.5])
        if kind == "number":
            values = values | st.floats(low - 1, high + 1)
        return values | st.sampled_from(["8", True, None])
    if kind == "image":
        return st.sampled_from(["", "data:image/png;base64,AAAA", "https://x.invalid/a.png", 5])
    if kind == "choice":
        return st.sampled_from([*binding.choices, "other", None, False, True, 0.0, 16777215.0])
    if kind == "boolean":
        return st.sampled_from([True, False, 0, 1, "true", None])
    return st.text(max_size=5) | st.sampled_from([5, None, True])


def modifications_near(name: str) -> st.SearchStrategy:
    modifier = REGISTRY.get(name)
    names = {key: binding for key, binding in modifier.bindings.items()}
    names.update({a: b for b in modifier.bindings.values() for a in b.aliases})
    return st.lists(st.sampled_from(sorted(names)), max_size=5, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: near(names[k]) for k in keys}))


request_ids = (st.text(alphabet=string.ascii_letters + string.digits + "._-/\n ", max_size=6)
               | st.integers(120, 132).map(lambda n: "a" * n)
               | st.sampled_from(["", None, "ok\n", "-x", "x.y", 7]))
urls = st.builds(lambda scheme, user, host, port, rest: f"{scheme}{user}{host}{port}{rest}",
                 st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "http:/", " http://"]),
                 st.sampled_from(["", "u:p@", "@", "u@"]),
                 st.sampled_from(["h", "127.0.0.1", "a.b-c", "", "[::1]", "h h", "\u00e9"]),
                 st.sampled_from(["", ":", ":80", ":65535", ":65536", ":99999", ":0", ":x"]),
                 st.sampled_from(["", "/", "/p?q=1#f", " ", "\n", "/a b"]))
blocks = st.fixed_dictionaries({}, optional={
    "s3": st.none() | st.dictionaries(
        st.sampled_from(["bucket_name", "endpoint_url", "access_key_id", "secret_access_key",
                         "nope"]),
        st.sampled_from(["", " ", "k", "http://127.0.0.1:9", "HTTPS://h:65535/p?q", 1, None]),
        max_size=4),
    "webhook": st.none() | st.dictionaries(
        st.sampled_from(["url", "timeout", "extra_params", "secret"]),
        st.sampled_from([0, -1, 0.5, 30, 300, 300.5, True, "5", {}, {"a": 1}, "", "x"])
        | urls,
        max_size=2),
    "return_outputs_as_base64": st.sampled_from([True, False, None, 1]),
    "request_id": request_ids,
    "handler": odd_values,
})
workflow_alongside = st.sampled_from([{}, {"workflow_json": {}}, {"workflow_json": None},
                                      {"workflow_json": {"1": {"class_type": "X"}}}])


def modifier_body(name: str) -> st.SearchStrategy:
    return st.builds(lambda mods, extra, wf: {"input": {"modifier": name, "modifications": mods,
                                                        **extra, **wf}},
                     modifications_near(name) | st.none(), blocks, workflow_alongside)


workflow_bodies = st.builds(
    lambda extra, mods: {"input": {"workflow_json": {"1": {"class_type": "EmptyImage",
                                                           "inputs": {}}}, **extra, **mods}},
    blocks, st.sampled_from([{}, {"modifications": {}}, {"modifications": {"a": 1}},
                             {"modifier": ""}, {"modifier": None}]))
near_valid = st.one_of(*[modifier_body(name) for name in REGISTRY.names()], workflow_bodies)


@AGREE
@given(document=near_valid)
@example({"input": {"modifier": "Text2Image", "modifications": {"width": 512.0}}})
@example({"input": {"modifier": "Text2Image", "request_id": "abc\n"}})
@example({"input": {"modifier": "Text2Image", "modifications": {"cfg": 1, "cfg_scale": 2}}})
@example({"input": {"modifier": "Image2Image", "modifications": {"image": "x"}}})
@example({"input": {"modifier": "Image2Image"}})
@example({"input": {"modifier": "Choices", "modifications": {"colour": False}}})
@example({"input": {"modifier": "Text2Image", "s3": {"endpoint_url": "http://127.0.0.1:9",
                                                     "access_key_id": "k"}}})
@example({"input": {"workflow_json": {"nodes": [], "links": []}}})
def test_validator_and_schema_agree_near_the_modifiers_bounds(document):
    check_agreement(document)


@AGREE
@given(document=documents)
def test_validator_and_schema_agree_on_odd_documents(document):
    check_agreement(document)


def test_agreement_is_not_vacuous():
    """Both verdicts occur among the examples the agreement tests draw from."""
    assert wrapper_accepts({"input": {"modifier": "Text2Image",
                                      "modifications": {"width": 64, "seed": -1}}})
    assert SCHEMA.is_valid({"input": {"modifier": "Text2Image",
                                      "modifications": {"width": 64, "seed": -1}}})
    assert not SCHEMA.is_valid({"input": {"modifier": "Text2Image",
                                          "modifications": {"width": 60}}})
    assert not SCHEMA.is_valid({"input": {"modifier": "Nope"}})


# --- who may read the public port's docs ------------------------------------------------------------
class _FakeAutoscalerGate:
    name = "autoscaler"


@pytest.mark.parametrize(("gate", "docs_public", "headers", "status"), [
    (TokenGate("t"), False, {}, 401),                                   # the default
    (TokenGate("t"), False, {"Authorization": "Bearer nope"}, 401),
    (TokenGate("t"), False, {"Authorization": "Bearer t"}, 200),
    (TokenGate("t"), True, {}, 200),                                    # worker.docs_public
    (_FakeAutoscalerGate(), False, {}, 401),
    (_FakeAutoscalerGate(), True, {}, 200),
], ids=["token-missing", "token-wrong", "token-given", "docs-public", "autoscaler",
        "autoscaler-docs-public"])
async def test_public_docs_need_the_token_unless_docs_public(gate, docs_public, headers, status):
    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer

    document = public_document(REGISTRY, gate.name, docs_public=docs_public)
    server = PublicServer(tracker=None, gate=gate, metrics=None,
                          max_waiting=1, max_json_depth=8, request_timeout=1,
                          liveness=lambda: (True, "ticking"), snapshot=dict,
                          document=lambda: document, docs_public=docs_public)
    async with TestServer(server.build_app(1024)) as test_server, ClientSession() as session:
        for path in ("/openapi.json", "/docs", "/docs/swagger-ui.css"):
            async with session.get(test_server.make_url(path), headers=headers) as answer:
                assert answer.status == status, (path, await answer.text())
                if status == 401:
                    error = (await answer.json())["error"]
                    assert "docs_public" in error       # names the setting that opens them
        async with session.get(test_server.make_url("/health/live")) as answer:
            assert answer.status == 200                 # the probes never need the token


def test_constants_are_scalars_so_client_generators_take_the_document():
    """openapi-python-client refuses an object or array as a const or enum value."""
    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "const":
                    assert not isinstance(value, (dict, list)), where
                elif key == "enum":
                    assert all(not isinstance(v, (dict, list)) for v in value), where
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    for document in [WRAPPER, *public_documents().values()]:
        walk(document, "#")


def test_result_schema_has_every_field_a_result_carries():
    """The answer schemas are strict (no other fields): a field added to results must be
    documented, or this fails (and so do the contract tests, on the wire)."""
    from api.contract.request import GenerateRequest
    from api.contract.result import FailureKind, JobStatus
    from api.contract.schemas import TIMINGS
    from api.wrapper.jobs import Job

    components = WRAPPER["components"]["schemas"]
    job = Job(GenerateRequest(request_id="r1"))
    assert list(job.timings()) == list(TIMINGS)
    job.status, job.failure, job.prompt_id = JobStatus.FAILED, FailureKind.EXECUTION, "p"
    job.detail = {"error": {"type": "execution_error"}, "node_errors": {}, "errors": {}}
    validator = Draft202012Validator(standalone("Result", components))
    assert not [e.message for e in validator.iter_errors(job.result())]
    assert set(job.result()) == set(components["Result"]["properties"])
    assert not validator.is_valid({**job.result(), "surprise": 1})
