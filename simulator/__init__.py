"""A stand-in for ComfyUI that speaks its HTTP and WebSocket API without models or a GPU.

Run it as ``python -m simulator --port N [options]``; see ``simulator.cli`` for the options
and ``simulator.testing.start_simulator`` for starting one from tests.
"""

# The ComfyUI release whose API this simulator follows, marked as simulated.
COMFYUI_VERSION = "0.3.64-sim"
