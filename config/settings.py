"""Every setting of comfy-worker, declared once.

A declaration names the TOML section and key, the type (with its validator), the default, the
environment variables that may set it (the first is the canonical one; later ones are aliases kept
for compatibility, e.g. the ai-dock wrapper's names) and a one-line doc. The loader, `config show`,
`config check` and `config/worker.example.toml` are all derived from this list.

Precedence, lowest first: default < TOML file < environment < request fields (the wrapper applies
the request's `s3` and `webhook` blocks on top of the `[s3]` and `[webhook]` settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from config.types import (
    Bool,
    Float,
    GpuSelection,
    Int,
    PathType,
    SettingType,
    Str,
    StrList,
    StrMap,
    TableList,
    Url,
    VersionOrAuto,
)


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    type: SettingType
    default: Any
    doc: str
    env: tuple[str, ...] = ()
    secret: bool = False

    @property
    def name(self) -> str:
        """Dotted name, as written in messages: ``worker.port``."""
        return f"{self.section}.{self.key}"


SECTION_DOCS: dict[str, str] = {
    "worker": "The public side of the daemon: port, auth, queue, state and log folders.",
    "metrics": "Who may read the Prometheus figures: a listener of its own, apart from the public port.",
    "supervisor": "How the children (ComfyUI and the wrapper) are watched and restarted.",
    "comfyui": "How ComfyUI is started and reached. It must listen on 127.0.0.1 only.",
    "wrapper": "The API wrapper child. An empty command runs this project's `comfy-worker api`.",
    "api": "The API wrapper's own settings (used by `comfy-worker api`).",
    "s3": "Where outputs are uploaded. A request's `input.s3` overrides these field by field.",
    "webhook": "Where results are posted. A request's `input.webhook` overrides these field by field.",
    "gpu": "GPU health through NVML and the thresholds that turn readings into verdicts.",
    "benchmark": "The start-up benchmark that flags a slow node.",
    "autoscaler": "The Vast.ai-style autoscaler; on when REPORT_ADDR is set.",
    "models": "Model files on the node: the start-up manifest, the download engine, and model "
              "URLs in requests.",
    "retention": "What the wrapper deletes from disk once no request needs it: outputs, input "
                 "images, ComfyUI's temp files (docs: disk). Result files follow api.result_ttl "
                 "and api.result_max, logs supervisor.log_max_bytes and log_backups.",
    "disk": "The disk guard: free space of the folders the worker writes to, sampled with the GPU "
            "(gpu.sample_interval); a warning frees what retention may, critical takes no work.",
}

_MIB = 1024 * 1024

SETTINGS: tuple[Setting, ...] = (
    # --- worker -------------------------------------------------------------------------------
    Setting("worker", "host", Str(), "0.0.0.0", "Address of the public server.", ("WORKER_HOST",)),
    Setting("worker", "port", Int(1, 65535), 3000, "Port of the public server.", ("WORKER_PORT",)),
    Setting("worker", "state_dir", PathType(), "/var/lib/comfy-worker",
            "Folder for the benchmark cache and history, result store and webhook spool.",
            ("WORKER_STATE_DIR", "STATE_DIRECTORY")),
    Setting("worker", "log_dir", PathType(), "/var/log/comfy-worker",
            "Folder for the children's rotating log files.", ("WORKER_LOG_DIR", "LOGS_DIRECTORY")),
    Setting("worker", "log_level", Str(("DEBUG", "INFO", "WARNING", "ERROR")), "INFO",
            "Log level of the daemon.", ("LOG_LEVEL",)),
    Setting("worker", "admin_socket", PathType(), "/run/comfy-worker/admin.sock",
            "Unix socket that `comfy-worker health` and friends talk to (mode 0660).",
            ("WORKER_ADMIN_SOCKET",)),
    Setting("worker", "queue_size", Int(1, 10_000), 32,
            "Requests that may wait for ComfyUI before new ones get 503.", ("WORKER_QUEUE_SIZE",)),
    Setting("worker", "drain_timeout", Float(0, 3600), 30.0,
            "Seconds a stopping worker lets queued work finish before stopping the children.",
            ("WORKER_DRAIN_TIMEOUT",)),
    Setting("worker", "auth_token", Str(), "",
            "Bearer token required on the public port when not behind the autoscaler.",
            ("WORKER_AUTH_TOKEN",), secret=True),
    Setting("worker", "unsecured", Bool(), False,
            "Serve without any authentication (logs a warning). Never silently open.", ("UNSECURED",)),
    Setting("worker", "use_ssl", Bool(), False, "Serve the public port over TLS.", ("USE_SSL",)),
    Setting("worker", "ssl_cert", PathType(), "",
            "TLS certificate (PEM) when use_ssl (behind the autoscaler, empty: "
            "autoscaler.instance_cert).", ("WORKER_SSL_CERT",)),
    Setting("worker", "ssl_key", PathType(), "",
            "TLS private key (PEM) when use_ssl (behind the autoscaler, empty: "
            "autoscaler.instance_key).", ("WORKER_SSL_KEY",)),
    Setting("worker", "max_body_bytes", Int(1024, 1024 * _MIB), 64 * _MIB,
            "Largest request body accepted on the public port (413 above).",
            ("WORKER_MAX_BODY_BYTES",)),
    Setting("worker", "max_json_depth", Int(4, 1000), 64,
            "Deepest JSON nesting accepted in a request body.", ("WORKER_MAX_JSON_DEPTH",)),
    Setting("worker", "docs_public", Bool(), False,
            "Serve /docs and /openapi.json on the public port without the token (they list "
            "the routes, the modifiers and their keys, nothing secret).",
            ("WORKER_DOCS_PUBLIC",)),
    # --- metrics --------------------------------------------------------------------------------
    Setting("metrics", "host", Str(), "127.0.0.1",
            "Address of the Prometheus /metrics listener (not the public port). Loopback by "
            "default; any other address needs metrics.token or metrics.unsecured.",
            ("METRICS_HOST",)),
    Setting("metrics", "port", Int(0, 65535), 9188,
            "Port of the /metrics listener; 0 turns it off.", ("METRICS_PORT",)),
    Setting("metrics", "token", Str(), "",
            "Bearer token Prometheus must send to read /metrics (empty: none asked).",
            ("METRICS_TOKEN",), secret=True),
    Setting("metrics", "unsecured", Bool(), False,
            "Serve /metrics on a non-loopback metrics.host without a token (a private network "
            "only).", ("METRICS_UNSECURED",)),
    # --- supervisor -----------------------------------------------------------------------------
    Setting("supervisor", "probe_interval", Float(0.1, 600), 2.0,
            "Seconds between health probes of each child.", ("SUPERVISOR_PROBE_INTERVAL",)),
    Setting("supervisor", "probe_timeout", Float(0.1, 600), 5.0,
            "Seconds a single probe may take.", ("SUPERVISOR_PROBE_TIMEOUT",)),
    Setting("supervisor", "hang_timeout", Float(1, 3600), 30.0,
            "Seconds of failing probes of a live child before it is killed and restarted.",
            ("SUPERVISOR_HANG_TIMEOUT",)),
    Setting("supervisor", "stall_timeout", Float(1, 86400), 300.0,
            "Seconds a running prompt may go without any progress before ComfyUI is restarted.",
            ("SUPERVISOR_STALL_TIMEOUT",)),
    Setting("supervisor", "backoff_initial", Float(0, 3600), 1.0,
            "First delay before restarting a crashed child; doubles each time.",
            ("SUPERVISOR_BACKOFF_INITIAL",)),
    Setting("supervisor", "backoff_max", Float(0, 3600), 60.0,
            "Longest delay between restarts.", ("SUPERVISOR_BACKOFF_MAX",)),
    Setting("supervisor", "crash_loop_count", Int(1, 1000), 5,
            "Exits within crash_loop_window that mark a child failed.",
            ("SUPERVISOR_CRASH_LOOP_COUNT",)),
    Setting("supervisor", "crash_loop_window", Float(1, 86400), 300.0,
            "Window, in seconds, for counting exits.", ("SUPERVISOR_CRASH_LOOP_WINDOW",)),
    Setting("supervisor", "failed_cooldown", Float(1, 86400), 600.0,
            "Seconds a failed child rests before the next attempt.",
            ("SUPERVISOR_FAILED_COOLDOWN",)),
    Setting("supervisor", "child_stop_timeout", Float(0.1, 600), 15.0,
            "Seconds between SIGTERM and SIGKILL when stopping a child.",
            ("SUPERVISOR_CHILD_STOP_TIMEOUT",)),
    Setting("supervisor", "log_max_bytes", Int(1024, 10 * 1024 * _MIB), 20 * _MIB,
            "Size of a child's log file before it rotates.", ("SUPERVISOR_LOG_MAX_BYTES",)),
    Setting("supervisor", "log_backups", Int(0, 100), 3,
            "Rotated log files kept per child.", ("SUPERVISOR_LOG_BACKUPS",)),
    # --- comfyui --------------------------------------------------------------------------------
    Setting("comfyui", "command", StrList(),
            ["/opt/ComfyUI/venv/bin/python", "main.py", "--listen", "127.0.0.1", "--port", "{port}",
             "--disable-auto-launch", "{instance_folders}"],
            "Command that starts ComfyUI; a template with placeholders such as {port} and "
            "{instance_folders} (docs/multi-gpu.md).", ("COMFYUI_COMMAND",)),
    Setting("comfyui", "gpus", GpuSelection(), "all",
            "GPUs that each get an instance (ComfyUI + wrapper): \"all\" (every GPU NVML "
            "reports), or a list of indexes, or of UUIDs. Instance i listens on the ports of "
            "comfyui.url and wrapper.url + i.", ("COMFYUI_GPUS",)),
    Setting("comfyui", "cwd", PathType(), "/opt/ComfyUI", "Working folder of ComfyUI.",
            ("COMFYUI_CWD",)),
    Setting("comfyui", "env", StrMap(), {}, "Extra environment for ComfyUI.", ("COMFYUI_ENV",)),
    Setting("comfyui", "url", Url(), "http://127.0.0.1:18188", "Where ComfyUI's API answers.",
            ("COMFYUI_URL", "COMFYUI_API_BASE")),
    Setting("comfyui", "install_path", PathType(), "/opt/ComfyUI",
            "ComfyUI's folder; its folders are under it unless ComfyUI's command line or the "
            "*_dir settings move them.", ("COMFYUI_INSTALL_PATH",)),
    Setting("comfyui", "output_dir", PathType(), "",
            "ComfyUI's output folder (default: from --output-directory or --base-directory in "
            "comfyui.command, else beside its main.py, else <install_path>/output).",
            ("COMFYUI_OUTPUT_DIR",)),
    Setting("comfyui", "input_dir", PathType(), "",
            "ComfyUI's input folder (default: found like output_dir, from --input-directory).",
            ("COMFYUI_INPUT_DIR",)),
    Setting("comfyui", "temp_dir", PathType(), "",
            "ComfyUI's temp folder (default: found like output_dir; --temp-directory X means X/temp).",
            ("COMFYUI_TEMP_DIR",)),
    Setting("comfyui", "models_dir", PathType(), "",
            "ComfyUI's models folder, where manifest paths and request-URL models go (default: "
            "models/ under --base-directory in comfyui.command, else under install_path).",
            ("COMFYUI_MODELS_DIR",)),
    Setting("comfyui", "startup_timeout", Float(1, 86400), 900.0,
            "Seconds ComfyUI may take to answer its first probe (custom nodes can take minutes).",
            ("COMFYUI_STARTUP_TIMEOUT",)),
    Setting("comfyui", "version", VersionOrAuto(), "auto",
            "Which ComfyUI runs, for the flags the worker may pass it: \"auto\" asks it before "
            "each start (comfyui.command with --help); a version (\"0.3.64\", \"0.38.1\") "
            "uses that version's flags without asking, for a start script that swallows "
            "--help. Where asking fails, 0.3.64's flags are assumed and /health says so.",
            ("COMFYUI_VERSION_OVERRIDE",)),
    Setting("comfyui", "assets", Str(("off", "on")), "off",
            "ComfyUI's assets database (newer ComfyUI, on by default there): \"off\" passes "
            "--disable-assets where this ComfyUI has that flag (no start-up scans, no walk of the "
            "output folder, no database lock); \"on\" leaves ComfyUI's default.",
            ("COMFYUI_ASSETS",)),
    Setting("comfyui", "allow_public_listen", Bool(), False,
            "Allow a ComfyUI command that listens on all interfaces (ComfyUI has no auth).",
            ("COMFYUI_ALLOW_PUBLIC_LISTEN",)),
    # --- wrapper --------------------------------------------------------------------------------
    Setting("wrapper", "command", StrList(), [],
            "Command that serves the wrapper contract; empty runs `comfy-worker api`.",
            ("WRAPPER_COMMAND",)),
    Setting("wrapper", "cwd", PathType(), "", "Working folder of the wrapper.", ("WRAPPER_CWD",)),
    Setting("wrapper", "env", StrMap(), {}, "Extra environment for the wrapper.", ("WRAPPER_ENV",)),
    Setting("wrapper", "url", Url(), "http://127.0.0.1:18288", "Where the wrapper answers.",
            ("WRAPPER_URL",)),
    Setting("wrapper", "startup_timeout", Float(1, 3600), 120.0,
            "Seconds the wrapper may take to answer /health.", ("WRAPPER_STARTUP_TIMEOUT",)),
    # --- api ------------------------------------------------------------------------------------
    Setting("api", "host", Str(), "127.0.0.1", "Address `comfy-worker api` listens on.",
            ("API_HOST",)),
    Setting("api", "port", Int(1, 65535), 18288, "Port `comfy-worker api` listens on.",
            ("API_PORT",)),
    Setting("api", "queue_size", Int(1, 10_000), 32,
            "Requests that may wait in the wrapper's queue before 503.", ("API_QUEUE_SIZE",)),
    Setting("api", "request_timeout", Float(1, 86400), 600.0,
            "Seconds one request may take in ComfyUI before it is interrupted (504).",
            ("API_REQUEST_TIMEOUT",)),
    Setting("api", "max_body_bytes", Int(1024, 1024 * _MIB), 64 * _MIB,
            "Largest request body the wrapper accepts (413 above).", ("API_MAX_BODY_BYTES",)),
    Setting("api", "max_dimension", Int(8, 65536), 8192,
            "Largest width or height a modifier accepts.", ("API_MAX_DIMENSION",)),
    Setting("api", "max_steps", Int(1, 100_000), 10_000,
            "Most sampler steps a modifier accepts.", ("API_MAX_STEPS",)),
    Setting("api", "modifiers_dir", PathType(), "",
            "Extra folder of operator modifier files (*.json); they may replace built-in ones.",
            ("API_MODIFIERS_DIR",)),
    Setting("api", "result_ttl", Float(1, 30 * 86400), 86400.0,
            "Seconds finished results stay readable at /result/{id}.", ("API_RESULT_TTL",)),
    Setting("api", "result_max", Int(1, 1_000_000), 10_000,
            "Most finished results kept.", ("API_RESULT_MAX",)),
    Setting("api", "base64_max_bytes", Int(0, 1024 * _MIB), 32 * _MIB,
            "Largest output inlined as base64; larger ones are reported, not truncated.",
            ("API_BASE64_MAX_BYTES",)),
    Setting("api", "input_max_bytes", Int(1, 1024 * _MIB), 50 * _MIB,
            "Largest input image accepted (URL download or base64).", ("API_INPUT_MAX_BYTES",)),
    Setting("api", "input_timeout", Float(0.1, 3600), 30.0,
            "Seconds to download an input image URL.", ("API_INPUT_TIMEOUT",)),
    Setting("api", "allow_private_inputs", Bool(), False,
            "Allow input image URLs that resolve to loopback, private or link-local addresses.",
            ("API_ALLOW_PRIVATE_INPUTS",)),
    Setting("api", "ws_idle_timeout", Float(0.1, 3600), 10.0,
            "Seconds without a WebSocket frame before the wrapper polls ComfyUI's history.",
            ("API_WS_IDLE_TIMEOUT",)),
    Setting("api", "submit_timeout", Float(0.1, 3600), 30.0,
            "Seconds the wrapper waits for ComfyUI's answer to POST /prompt; past it, one "
            "look-up by prompt id tells whether ComfyUI has the prompt (it is then followed, "
            "never sent twice).", ("API_SUBMIT_TIMEOUT",)),
    # --- s3 -------------------------------------------------------------------------------------
    Setting("s3", "access_key_id", Str(), "", "S3 access key id.", ("S3_ACCESS_KEY_ID",),
            secret=True),
    Setting("s3", "secret_access_key", Str(), "", "S3 secret access key.",
            ("S3_SECRET_ACCESS_KEY",), secret=True),
    Setting("s3", "bucket_name", Str(), "", "S3 bucket for outputs.", ("S3_BUCKET_NAME",)),
    Setting("s3", "endpoint_url", Url(), "", "S3 endpoint (empty: AWS).", ("S3_ENDPOINT_URL",)),
    Setting("s3", "region", Str(), "", "S3 region.", ("S3_REGION",)),
    Setting("s3", "presign_expiry", Int(1, 7 * 86400), 7 * 86400,
            "Seconds a presigned output URL stays valid (S3 allows at most 7 days).",
            ("S3_PRESIGN_EXPIRY",)),
    Setting("s3", "max_parallel", Int(1, 64), 4, "Uploads running at once.", ("S3_MAX_PARALLEL",)),
    Setting("s3", "retries", Int(0, 20), 3, "Retries of an upload on transient errors.",
            ("S3_RETRIES",)),
    # --- webhook --------------------------------------------------------------------------------
    Setting("webhook", "url", Url(), "", "Where every finished request is posted.",
            ("WEBHOOK_URL",)),
    Setting("webhook", "timeout", Float(0.1, 3600), 30.0, "Seconds one webhook POST may take.",
            ("WEBHOOK_TIMEOUT",)),
    Setting("webhook", "secret", Str(), "", "HMAC-SHA256 key for X-Webhook-Signature.",
            ("WEBHOOK_SECRET",), secret=True),
    Setting("webhook", "retries", Int(0, 100), 5,
            "Retries on connection errors, 5xx and 429.", ("WEBHOOK_RETRIES",)),
    Setting("webhook", "backoff_initial", Float(0.01, 3600), 1.0,
            "First retry delay in seconds; doubles each time.", ("WEBHOOK_BACKOFF_INITIAL",)),
    Setting("webhook", "backoff_max", Float(0.01, 86400), 300.0, "Longest retry delay.",
            ("WEBHOOK_BACKOFF_MAX",)),
    Setting("webhook", "spool_max_age", Float(1, 30 * 86400), 86400.0,
            "Seconds an undelivered webhook is kept and retried across restarts.",
            ("WEBHOOK_SPOOL_MAX_AGE",)),
    Setting("webhook", "spool_max_bytes", Int(1024, 1 << 40), 256 * _MIB,
            "Most bytes the webhook spool may hold; past it the oldest deliveries are dropped "
            "(each logged as an error and counted).", ("WEBHOOK_SPOOL_MAX_BYTES",)),
    Setting("webhook", "allow_private_targets", Bool(), False,
            "Let request-supplied webhook URLs reach loopback, private or link-local addresses.",
            ("WEBHOOK_ALLOW_PRIVATE_TARGETS",)),
    # --- gpu ------------------------------------------------------------------------------------
    Setting("gpu", "required", Bool(), True,
            "Without a usable NVIDIA GPU the node is unhealthy (false for demos and tests).",
            ("GPU_REQUIRED",)),
    Setting("gpu", "fake_source", PathType(), "",
            "Read GPUs from this JSON file instead of NVML (testing and demos).",
            ("GPU_FAKE_SOURCE",)),
    Setting("gpu", "sample_interval", Float(0.1, 3600), 5.0, "Seconds between GPU samples.",
            ("GPU_SAMPLE_INTERVAL",)),
    Setting("gpu", "history_size", Int(10, 1_000_000), 720, "GPU samples kept in memory.",
            ("GPU_HISTORY_SIZE",)),
    Setting("gpu", "temp_margin_c", Float(0, 50), 5.0,
            "Degraded when within this many °C of the slowdown temperature.",
            ("GPU_TEMP_MARGIN_C",)),
    Setting("gpu", "power_cap_ratio", Float(0, 1), 0.9,
            "Degraded when the enforced power limit is below this share of the default.",
            ("GPU_POWER_CAP_RATIO",)),
    Setting("gpu", "busy_utilization", Float(0, 100), 30.0,
            "Utilisation (%) above which a PCIe link below its maximum counts as down-trained.",
            ("GPU_BUSY_UTILIZATION",)),
    # --- benchmark ------------------------------------------------------------------------------
    Setting("benchmark", "enabled", Bool(), True, "Run the benchmark at start-up.",
            ("BENCHMARK_ENABLED",)),
    Setting("benchmark", "width", Int(8, 65536), 512, "Benchmark image width.",
            ("BENCHMARK_TEST_WIDTH",)),
    Setting("benchmark", "height", Int(8, 65536), 512, "Benchmark image height.",
            ("BENCHMARK_TEST_HEIGHT",)),
    Setting("benchmark", "steps", Int(1, 100_000), 20, "Benchmark sampler steps.",
            ("BENCHMARK_TEST_STEPS",)),
    Setting("benchmark", "checkpoint", Str(), "v1-5-pruned-emaonly.safetensors",
            "SD1.5 checkpoint the benchmark loads.", ("BENCHMARK_CHECKPOINT",)),
    Setting("benchmark", "runs", Int(1, 100), 2, "Measured runs after the warm-up.",
            ("BENCHMARK_RUNS",)),
    Setting("benchmark", "expected_seconds", Float(0, 86400), 0.0,
            "Expected seconds per run; 0 uses the reference table.", ("BENCHMARK_EXPECTED_SECONDS",)),
    Setting("benchmark", "slow_threshold", Float(0, 10), 0.20,
            "A run slower than expected × (1 + this) is slow.", ("BENCHMARK_SLOW_THRESHOLD",)),
    Setting("benchmark", "action", Str(("refuse", "report")), "refuse",
            "What a slow node does: refuse work (unhealthy) or report it (degraded).",
            ("BENCHMARK_ACTION",)),
    Setting("benchmark", "cache_max_age", Float(0, 365 * 86400), 7 * 86400.0,
            "Seconds a benchmark result is reused across restarts when nothing changed.",
            ("BENCHMARK_CACHE_MAX_AGE",)),
    Setting("benchmark", "run_timeout", Float(1, 86400), 1200.0,
            "Seconds one benchmark run may take.", ("BENCHMARK_RUN_TIMEOUT",)),
    Setting("benchmark", "sequential", Bool(), False,
            "Benchmark the instances of a multi-GPU host one after another instead of all at "
            "once (when they share a power or cooling budget that skews a concurrent run).",
            ("BENCHMARK_SEQUENTIAL",)),
    Setting("benchmark", "prompts_file", PathType(), "",
            "Prompt list, one a line (default: the list shipped in the benchmark package, "
            "benchmark/test_prompts.txt).", ("BENCHMARK_PROMPTS_FILE",)),
    # --- autoscaler -----------------------------------------------------------------------------
    Setting("autoscaler", "report_addr", Str(), "",
            "Autoscaler address(es), comma-separated; setting it turns the protocol on.",
            ("REPORT_ADDR",)),
    Setting("autoscaler", "container_id", Str(), "", "This worker's id at the autoscaler.",
            ("CONTAINER_ID",)),
    Setting("autoscaler", "master_token", Str(), "", "Token sent with every report.",
            ("MASTER_TOKEN",), secret=True),
    Setting("autoscaler", "public_ipaddr", Str(), "", "Public address the autoscaler routes to.",
            ("PUBLIC_IPADDR",)),
    Setting("autoscaler", "report_interval", Float(0.1, 3600), 10.0,
            "Seconds between status reports when nothing happens (sooner after request "
            "activity or a change of state).", ("AUTOSCALER_REPORT_INTERVAL",)),
    Setting("autoscaler", "workload", Float(0.001, 1e12), 100.0,
            "Workload of one request: the unit of every load field and of max_perf (requests "
            "per second x this). 100 as Vast's ComfyUI worker (the vastai SDK's default); the "
            "client's auth_data.cost is not used.", ("AUTOSCALER_WORKLOAD",)),
    Setting("autoscaler", "max_queue_time", Float(0, 86400), 10.0,
            "Refuse a request (429 with Retry-After, reported Rejected) when its estimated wait "
            "(the work ahead x the benchmark's seconds per request, less the running request's "
            "progress) is longer than this; 0 turns it off. 10 as Vast's ComfyUI worker.",
            ("AUTOSCALER_MAX_QUEUE_TIME",)),
    Setting("autoscaler", "max_sessions", Int(0, 1_000_000), 10,
            "Sessions open at once (/session/create answers 429 beyond); 0: no limit. 10 as "
            "the vastai SDK.", ("AUTOSCALER_MAX_SESSIONS",)),
    Setting("autoscaler", "instance_cert", PathType(), "/etc/instance.crt",
            "The TLS certificate Vast installs on the instance: served with USE_SSL behind the "
            "autoscaler unless worker.ssl_cert is set.", ("AUTOSCALER_INSTANCE_CERT",)),
    Setting("autoscaler", "instance_key", PathType(), "/etc/instance.key",
            "The private key of autoscaler.instance_cert.", ("AUTOSCALER_INSTANCE_KEY",)),
    Setting("autoscaler", "legacy_signatures", Bool(), False,
            "Also accept the older format that signs every auth_data field.",
            ("AUTOSCALER_LEGACY_SIGNATURES",)),
    Setting("autoscaler", "check_url", Bool(), True,
            "Refuse a signature made for another worker's URL (auth_data.url must be ours).",
            ("AUTOSCALER_CHECK_URL",)),
    Setting("autoscaler", "replay_window", Float(1, 86400), 600.0,
            "Seconds a used signature is remembered to refuse replays.",
            ("AUTOSCALER_REPLAY_WINDOW",)),
    # --- models -------------------------------------------------------------------------------
    Setting("models", "files", TableList(), [],
            "The manifest: [[models.files]] tables with url, path (under the models folder), "
            "sha256, when = before_ready | background, auth_env, auth_header; S3 entries may add "
            "endpoint_url, region, access_key_env, secret_key_env.", ("MODELS",)),
    Setting("models", "manifest", PathType(), "",
            "A separate manifest file of top-level [[models]] tables, added to models.files.",
            ("MODELS_MANIFEST",)),
    Setting("models", "parallel", Int(1, 32), 2, "Model files downloaded at once.",
            ("MODELS_PARALLEL",)),
    Setting("models", "retries", Int(0, 100), 4,
            "Retries (resuming where it stopped) of one download before it counts as failed.",
            ("MODELS_RETRIES",)),
    Setting("models", "backoff_initial", Float(0.01, 3600), 2.0,
            "First delay before retrying a download; doubles each time.",
            ("MODELS_BACKOFF_INITIAL",)),
    Setting("models", "backoff_max", Float(0.01, 86400), 300.0,
            "Longest delay between tries of a failing manifest download.",
            ("MODELS_BACKOFF_MAX",)),
    Setting("models", "read_timeout", Float(0.1, 3600), 60.0,
            "Seconds without a byte from the source before a download is cut and resumed.",
            ("MODELS_READ_TIMEOUT",)),
    Setting("models", "allow_request_urls", Bool(), False,
            "Let requests name a model by URL in a model-loading input (downloaded and cached).",
            ("MODELS_ALLOW_REQUEST_URLS",)),
    Setting("models", "allowed_hosts", StrList(), [],
            "Hosts that request model URLs may name (exact names, or '.example.com' for "
            "subdomains); empty refuses all.", ("MODELS_ALLOWED_HOSTS",)),
    Setting("models", "allow_private_hosts", Bool(), False,
            "Let request model URLs reach loopback, private or link-local addresses.",
            ("MODELS_ALLOW_PRIVATE_HOSTS",)),
    Setting("models", "cache_max_gb", Float(0.0001, 1_000_000), 100.0,
            "Size cap of the request-URL model cache; least recently used files go first.",
            ("MODELS_CACHE_MAX_GB",)),
    # --- retention ----------------------------------------------------------------------------
    Setting("retention", "enabled", Bool(), True,
            "Delete what requests leave on disk by the rules below; false keeps everything (the "
            "disk guard still takes a full node out of service).", ("RETENTION_ENABLED",)),
    Setting("retention", "outputs", Str(("expired", "uploaded", "keep")), "expired",
            "When a finished request's output files go: expired = once its result is no longer "
            "readable at /result/{id} (api.result_ttl, api.result_max); uploaded = as soon as "
            "every file is in S3 (the others when the result expires); keep = never.",
            ("RETENTION_OUTPUTS",)),
    Setting("retention", "outputs_max_gb", Float(0, 1_000_000), 10.0,
            "Size cap of the output folder (per instance); over it the files of the oldest "
            "finished requests go first. 0: no cap.", ("RETENTION_OUTPUTS_MAX_GB",)),
    Setting("retention", "inputs", Str(("finished", "keep")), "finished",
            "Input images uploaded to ComfyUI for a request: finished = deleted once the request "
            "finished; keep = never.", ("RETENTION_INPUTS",)),
    Setting("retention", "temp_max_age", Float(0, 30 * 86400), 3600.0,
            "Seconds a file may stay in ComfyUI's temp folder (previews); 0 keeps them. Keep it "
            "above the longest request.", ("RETENTION_TEMP_MAX_AGE",)),
    Setting("retention", "interval", Float(0.1, 86400), 60.0,
            "Seconds between retention passes (the disk guard's warning asks for one at once).",
            ("RETENTION_INTERVAL",)),
    Setting("retention", "batch_files", Int(1, 1_000_000), 500,
            "Files deleted in one step off the event loop; a pass takes as many steps as it needs.",
            ("RETENTION_BATCH_FILES",)),
    Setting("retention", "pressure_min_age", Float(0, 86400), 60.0,
            "Seconds a finished request's outputs are kept even when the disk guard asks for "
            "space.", ("RETENTION_PRESSURE_MIN_AGE",)),
    # --- disk -----------------------------------------------------------------------------------
    Setting("disk", "warning_percent", Float(0, 100), 90.0,
            "A filesystem the worker writes to this full (%) is a warning (degraded) and a "
            "retention pass runs at once.", ("DISK_WARNING_PERCENT",)),
    Setting("disk", "warning_free_gb", Float(0, 1_000_000), 5.0,
            "Less free space than this (GB) is a warning too.", ("DISK_WARNING_FREE_GB",)),
    Setting("disk", "critical_percent", Float(0, 100), 97.0,
            "This full (%), the worker takes no new work (unhealthy) until space returns.",
            ("DISK_CRITICAL_PERCENT",)),
    Setting("disk", "critical_free_gb", Float(0, 1_000_000), 1.0,
            "Less free space than this (GB) is critical too.", ("DISK_CRITICAL_FREE_GB",)),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
