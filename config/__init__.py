"""Settings for comfy-worker: declarations (settings.py), value types (types.py), loading (loader.py)."""

from config.loader import (
    DEFAULT_CONFIG_PATH,
    MASK,
    Settings,
    SettingsError,
    Source,
    check_file,
    load_settings,
    render_example,
    render_settings_docs,
)
from config.settings import BY_NAME, SETTINGS, Setting

__all__ = [
    "BY_NAME", "DEFAULT_CONFIG_PATH", "MASK", "SETTINGS", "Setting", "Settings", "SettingsError",
    "Source", "check_file", "load_settings", "render_example",
    "render_settings_docs",
]
