"""A stand-in for ComfyUI that speaks its HTTP and WebSocket API without models or a GPU.

Run it as ``python -m simulator --port N [options]``; see ``simulator.cli`` for the options
and ``simulator.testing.start_simulator`` for starting one from tests. It speaks ComfyUI
0.3.64's API by default, the newest read (0.38.1) with ``--api-version 0.38.1`` or
``SIM_API_VERSION=0.38.1`` (see ``simulator.api_version``).
"""

from simulator.api_version import DEFAULT_API_VERSION

# The default ComfyUI release whose API this simulator follows, marked as simulated.
COMFYUI_VERSION = DEFAULT_API_VERSION.label
