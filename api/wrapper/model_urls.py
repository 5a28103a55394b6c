"""Model URLs in requests: find them in a graph, judge them, fetch them through the cache.

Off unless `models.allow_request_urls` is on. A value that is an http(s) URL in a model-loading
input (the list is data: `api/wrapper/model_inputs.toml`) must name a host in `models.allowed_hosts`
(checked when the request arrives: 400) and resolve to public addresses unless
`models.allow_private_hosts` (checked before the download and again at connect time, as for
input images: the request fails with 400). The file is fetched through `api.modelstore.cache`, and
the input is rewritten to the cached file's stable name before the prompt is queued.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.host.netcheck import TargetError, check_url, parse_http_url, redact_url
from api.modelstore.cache import Lease, UrlCache
from api.modelstore.errors import DownloadError
from api.modelstore.sources import HttpSource
from api.wrapper.inputs import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_TABLE = Path(__file__).with_name("model_inputs.toml")


@dataclass(frozen=True)
class ModelInputs:
    """input name -> models/ subfolder, with per-node-type overrides."""

    by_input: dict[str, str]
    by_node: dict[str, dict[str, str]]

    @classmethod
    def load(cls, path: Path = _TABLE) -> "ModelInputs":
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return cls(dict(data.get("inputs", {})), {k: dict(v) for k, v in
                                                  data.get("nodes", {}).items()})

    def folder(self, class_type: str, name: str) -> str | None:
        return self.by_node.get(class_type, {}).get(name) or self.by_input.get(name)


@dataclass(frozen=True)
class ModelRef:
    node_id: str
    input: str
    url: str
    folder: str

    @property
    def field(self) -> str:
        return f"node {self.node_id} input '{self.input}'"


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def find_model_urls(graph: dict[str, Any], inputs: ModelInputs) -> list[ModelRef]:
    refs = []
    for node_id, node in graph.items():
        if not isinstance(node, dict):
            continue
        class_type = str(node.get("class_type", ""))
        for name, value in (node.get("inputs") or {}).items():
            if _is_url(value):
                folder = inputs.folder(class_type, name)
                if folder:
                    refs.append(ModelRef(str(node_id), name, value.strip(), folder))
    return refs


def host_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for rule in allowed:
        rule = rule.lower().strip()
        if rule.startswith(".") and (host.endswith(rule) or host == rule[1:]):
            return True
        if host == rule:
            return True
    return False


@dataclass(frozen=True)
class ModelUrlPolicy:
    allow: bool
    allowed_hosts: list[str]
    allow_private: bool

    def problems(self, refs: list[ModelRef]) -> dict[str, str]:
        """What is wrong with each URL before anything is fetched, keyed by field."""
        found: dict[str, str] = {}
        for ref in refs:
            shown = redact_url(ref.url)
            if not self.allow:
                found[ref.field] = (f"{shown} is a model URL, and model URLs in requests are "
                                    "off on this worker (models.allow_request_urls)")
                continue
            try:
                target = parse_http_url(ref.url)
            except TargetError as exc:
                found[ref.field] = f"{shown}: {exc}"
                continue
            if not host_allowed(target.host, self.allowed_hosts):
                found[ref.field] = (f"{shown}: host {target.host} is not allowed for model URLs "
                                    "(models.allowed_hosts)")
        return found


class ModelUrlResolver:
    """Fetches a job's model URLs through the cache and rewrites its graph to the cached names."""

    def __init__(self, cache: UrlCache, policy: ModelUrlPolicy, inputs: ModelInputs):
        self.cache = cache
        self.policy = policy
        self.inputs = inputs

    def find(self, graph: dict[str, Any]) -> list[ModelRef]:
        return find_model_urls(graph, self.inputs)

    async def resolve(self, graph: dict[str, Any], refs: list[ModelRef]) -> list[Lease]:
        """Fetch every ref (at once), rewrite the graph; on failure release what was taken."""
        async def one(ref: ModelRef) -> Lease:
            shown = redact_url(ref.url)
            try:
                await check_url(ref.url, self.policy.allow_private)
                return await self.cache.acquire(HttpSource(ref.url), ref.folder)
            except TargetError as exc:
                raise InputError(f"{ref.field}: {shown}: {exc}") from None
            except DownloadError as exc:
                raise InputError(f"{ref.field}: model download failed: {exc}") from None

        results = await asyncio.gather(*(one(ref) for ref in refs), return_exceptions=True)
        leases = [r for r in results if isinstance(r, Lease)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for lease in leases:
                self.cache.release(lease)
            raise errors[0]
        for ref, lease in zip(refs, leases):
            graph[ref.node_id]["inputs"][ref.input] = lease.name
        return leases

    def release(self, leases: list[Lease]) -> None:
        for lease in leases:
            self.cache.release(lease)


DEFAULT_MODEL_INPUTS = ModelInputs.load()
MODEL_URLS_OFF = ModelUrlPolicy(allow=False, allowed_hosts=[], allow_private=False)
