"""The vastai SDK's own worker, set up the way Vast's ComfyUI worker sets it up, for
`tests.perf.vast_compare`: in front of an API wrapper on MODEL_SERVER_PORT, route
/generate/sync, one request at a time, max_queue_time 10 s, a benchmark of the same request the
traffic sends (8 runs after a warm-up, the SDK's defaults), no workload calculator (so 100 a
request), readiness from the BACKENDS_READY line in MODEL_LOG, health from the wrapper's /health.

    MODEL_SERVER_PORT=18288 MODEL_LOG=api-wrapper.log WORKER_PORT=... python -m tests.perf.vast_sdk_worker

The rest of the environment is the SDK's own (CONTAINER_ID, REPORT_ADDR, PUBLIC_IPADDR,
VAST_TCP_PORT_<WORKER_PORT>, MASTER_TOKEN, USE_SSL). BENCH_STEPS sets the benchmark's steps.
"""

from __future__ import annotations

import os
import random

from vastai import BenchmarkConfig, HandlerConfig, LogActionConfig, Worker, WorkerConfig


def benchmark_payload() -> dict:
    return {"input": {"request_id": f"bench-{random.randrange(10**6)}", "modifier": "Text2Image",
                      "modifications": {"prompt": "a lighthouse", "width": 64, "height": 64,
                                        "steps": int(os.environ.get("BENCH_STEPS", "10")),
                                        "seed": random.randrange(2**31)}}}


def main() -> None:
    Worker(WorkerConfig(
        model_server_url="http://127.0.0.1",
        model_server_port=int(os.environ["MODEL_SERVER_PORT"]),
        model_log_file=os.environ["MODEL_LOG"],
        model_healthcheck_url="/health",
        handlers=[HandlerConfig(route="/generate/sync", allow_parallel_requests=False,
                                max_queue_time=10.0,
                                benchmark_config=BenchmarkConfig(generator=benchmark_payload))],
        log_action_config=LogActionConfig(on_load=["BACKENDS_READY"],
                                          on_error=["BACKEND_UNRECOVERABLE"]),
    )).run()


if __name__ == "__main__":
    main()
