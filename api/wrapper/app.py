"""`comfy-worker api`: build the wrapper from settings and serve it until SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from api.comfy import ClientTimeouts, ComfyClient
from api.comfy import folders as comfy_folders
from api.comfy.folders import SUPERVISOR_PID_ENV, ComfyFolders, OutputFolderGuide
from api.contract.http import SERVER_OPTIONS
from api.contract.modifiers import registry_from_settings
from api.wrapper.background import Background
from api.wrapper.delivery import OutputDelivery
from api.wrapper.execution import ComfyGuard, PromptExecution, stop_prompt
from api.wrapper.finish import Finisher
from api.wrapper.inputs import InputFetcher
from api.wrapper.job_queue import JobQueue
from api.wrapper.metrics import WrapperMetrics
from api.wrapper.prefetch import Prefetcher
from api.wrapper.preparation import InputPreparer
from api.wrapper.retention import JobLifecycle, Retention, RetentionPolicy
from api.wrapper.s3 import S3Settings, S3Uploader
from api.wrapper.server import build_app
from api.wrapper.service import GenerationService, Parts, RequestDefaults
from api.wrapper.store import ResultStore
from api.wrapper.webhooks import WebhookDispatcher, WebhookSettings
from config import Settings

#: What the daemon sends this wrapper when ComfyUI dies.
COMFYUI_LOST_SIGNAL = signal.SIGUSR1

if TYPE_CHECKING:
    from api.wrapper.model_urls import ModelUrlResolver

logger = logging.getLogger(__name__)


def s3_defaults(settings: Settings) -> S3Settings:
    s = settings.s3
    return S3Settings(access_key_id=s.access_key_id, secret_access_key=s.secret_access_key,
                      bucket_name=s.bucket_name, endpoint_url=s.endpoint_url, region=s.region)


def webhook_defaults(settings: Settings) -> WebhookSettings:
    w = settings.webhook
    return WebhookSettings(url=w.url, timeout=w.timeout, secret=w.secret, extra_params={})


def comfy_owner_check(settings: Settings) -> Callable[[], Awaitable[bool]] | None:
    """When the daemon started this wrapper (it passes its pid), a check that the process on
    ComfyUI's port is one of the daemon's own: after ComfyUI was lost, nothing is submitted to a
    stranger that took the port meanwhile. None when run on its own."""
    supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
    if not supervisor.isdigit():
        return None
    # Only here: psutil is loaded when a daemon started this wrapper, not for a wrapper alone.
    from api.host.ports import held_within, local_port

    port = local_port(settings.comfyui.url)
    if port is None:
        return None

    async def check() -> bool:
        return await asyncio.to_thread(held_within, port, int(supervisor))

    return check


class WrapperRuntime:
    """Everything the wrapper owns, created in order and closed in reverse."""

    def __init__(self, settings: Settings, *, port: int | None = None, host: str | None = None):
        self.settings = settings
        self.host = host or settings.api.host
        self.port = port or settings.api.port
        self.runner: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None
        self.client: ComfyClient | None = None
        self.uploader: S3Uploader | None = None
        self.webhooks: WebhookDispatcher | None = None
        self.service: GenerationService | None = None
        self.retention: Retention | None = None
        self.model_session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        s = self.settings
        state = Path(s.worker.state_dir)
        folders = comfy_folders.from_settings(s)
        output = folders.output
        self.session = aiohttp.ClientSession()
        # Prompts' sockets close once their client is answered (Finisher: after_answer).
        self.client = ComfyClient(s.comfyui.url, output_dir=output.path,
                                  timeouts=ClientTimeouts(ws_idle=s.api.ws_idle_timeout,
                                                          submit=s.api.submit_timeout),
                                  defer_closes=True)
        self.uploader = S3Uploader(max_parallel=s.s3.max_parallel, retries=s.s3.retries,
                                   presign_expiry=s.s3.presign_expiry)
        self.metrics = WrapperMetrics()
        self.webhooks = WebhookDispatcher(
            spool_dir=state / "webhooks", retries=s.webhook.retries,
            backoff_initial=s.webhook.backoff_initial, backoff_max=s.webhook.backoff_max,
            max_age=s.webhook.spool_max_age, max_bytes=s.webhook.spool_max_bytes,
            allow_private_targets=s.webhook.allow_private_targets,
            trusted_urls={s.webhook.url} if s.webhook.url else set(),
            on_settled=lambda result: self.metrics.webhooks.labels(result.state.value).inc())
        await self.webhooks.start()
        model_urls = self._model_urls()
        if model_urls is not None:
            self.metrics.bind_model_cache(model_urls.cache)
        self.service = self._service(folders, model_urls)
        webhooks, service = self.webhooks, self.service
        self.metrics.bind(spool=lambda: webhooks.pending, queue=service.queue_depth)
        await self.service.start()
        assert self.retention is not None
        self.metrics.bind_retention(self.retention)
        await self.retention.start()  # after the store loaded: it knows the earlier requests
        app = build_app(self.service, metrics=self.metrics, max_body_bytes=s.api.max_body_bytes,
                        max_json_depth=s.worker.max_json_depth, retention=self.retention)
        # handler_cancellation: a client that hangs up on /generate/sync cancels its request.
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                    **SERVER_OPTIONS)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        logger.info("API wrapper listening on http://%s:%d (ComfyUI at %s)", self.host, self.port,
                    s.comfyui.url)

    def _service(self, folders: ComfyFolders, model_urls: "ModelUrlResolver | None"
                 ) -> GenerationService:
        """The generation service and its parts, wired from the settings."""
        s = self.settings
        assert self.client is not None and self.session is not None
        client = self.client
        store = ResultStore(Path(s.worker.state_dir) / "results", s.api.result_ttl,
                            s.api.result_max)
        defaults = RequestDefaults(s3_defaults(s), webhook_defaults(s),
                                   s.webhook.allow_private_targets)
        queue, background, active = JobQueue(), Background(), {}
        delivery = OutputDelivery(client, folders.output, base64_max_bytes=s.api.base64_max_bytes,
                                  s3_defaults=defaults.s3, uploader=self.uploader,
                                  guide=OutputFolderGuide(s, client), metrics=self.metrics)
        # Retention deletes what finished requests left, in the folder the delivery learned.
        retention = self.retention = Retention(
            RetentionPolicy.from_settings(s), JobLifecycle(active, store, self.webhooks),
            output_folder=lambda: delivery.folder.path, input_folder=folders.input.path,
            temp_folder=folders.temp.path)
        delivery.retention = retention
        fetcher = InputFetcher(self.session, s.api.input_max_bytes, s.api.input_timeout,
                               s.api.allow_private_inputs)
        prefetcher = Prefetcher(client, queue, functools.partial(stop_prompt, client))
        guard = ComfyGuard(comfy_owner_check(s))
        parts = Parts(
            client=client, registry=registry_from_settings(s), store=store, queue=queue,
            background=background, active=active, model_urls=model_urls,
            preparer=InputPreparer(client, fetcher, model_urls, retention=retention,
                                   input_folder=folders.input.path),
            prefetcher=prefetcher, guard=guard,
            execution=PromptExecution(client, prefetcher, guard, s.api.request_timeout),
            delivery=delivery,
            finisher=Finisher(store, background, active, webhooks=self.webhooks,
                              webhook_defaults=defaults.webhook, metrics=self.metrics,
                              model_urls=model_urls, retention=retention,
                              after_answer=client.close_deferred))
        return GenerationService(parts, queue_size=s.api.queue_size, defaults=defaults)

    def _model_urls(self) -> "ModelUrlResolver | None":
        """Model URLs in requests, when the operator turned them on (models.allow_request_urls)."""
        m = self.settings.models
        if not m.allow_request_urls:
            return None
        # The model store's parts are loaded only on a wrapper that lets requests name models.
        from api.host.netcheck import GuardedResolver, check_url
        from api.modelstore.cache import UrlCache
        from api.modelstore.download import READ_BUFSIZE, Downloader
        from api.modelstore.store import models_state_dir
        from api.wrapper.model_urls import (
            DEFAULT_MODEL_INPUTS,
            ModelUrlPolicy,
            ModelUrlResolver,
        )

        policy = ModelUrlPolicy(allow=True, allowed_hosts=list(m.allowed_hosts),
                                allow_private=m.allow_private_hosts)
        connector = None if m.allow_private_hosts else \
            aiohttp.TCPConnector(resolver=GuardedResolver())
        self.model_session = aiohttp.ClientSession(connector=connector, read_bufsize=READ_BUFSIZE,
                                                   auto_decompress=False)

        async def check_target(url: str) -> None:  # every redirect hop, too
            await check_url(url, m.allow_private_hosts)

        downloader = Downloader(retries=m.retries, backoff_initial=m.backoff_initial,
                                backoff_max=min(m.backoff_max, 30.0), read_timeout=m.read_timeout,
                                session=self.model_session, check_target=check_target)
        cache = UrlCache(models_state_dir(Path(self.settings.worker.state_dir)) / "cache",
                         comfy_folders.from_settings(self.settings).models.path, downloader,
                         int(m.cache_max_gb * 1e9), parallel=m.parallel)
        return ModelUrlResolver(cache, policy, DEFAULT_MODEL_INPUTS)

    async def close(self) -> None:
        if self.runner:
            await self.runner.cleanup()
        if self.retention:
            await self.retention.stop()
        if self.service:
            await self.service.stop()
        if self.model_session:
            await self.model_session.close()
        if self.webhooks:
            await self.webhooks.drain(timeout=5)
            await self.webhooks.close()
        if self.uploader:
            await self.uploader.close()
        if self.client:
            await self.client.close()
        if self.session:
            await self.session.close()


async def serve(settings: Settings, *, port: int | None = None, host: str | None = None) -> None:
    runtime = WrapperRuntime(settings, port=port, host=host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runtime.start()
        if runtime.service is not None:
            # The daemon that started us sends SIGUSR1 the moment ComfyUI dies: submit nothing
            # more until its port is ComfyUI's again (a stranger may take it meanwhile).
            loop.add_signal_handler(COMFYUI_LOST_SIGNAL, runtime.service.comfy_lost)
        await stop.wait()
        logger.info("API wrapper stopping")
    finally:
        await runtime.close()
