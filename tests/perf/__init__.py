"""Performance benchmarks of the request path (scripts that print figures, not tests).

    .venv/bin/python -m tests.perf.wrapper_latency [--n 200] [--json]
    .venv/bin/python -m tests.perf.stack_latency [--n 200] [--json]

Both run against the ComfyUI simulator on loopback; nothing needs a GPU.
"""
