"""Model aliases, family module names, and loading (dtype, devices, the embedded model)."""

from rrome_cli.models.families import ModuleNames, UnknownArchitectureError, module_names
from rrome_cli.models.loading import LoadedModel, load_config, load_model, parse_devices

__all__ = [
    "LoadedModel",
    "ModuleNames",
    "UnknownArchitectureError",
    "load_config",
    "load_model",
    "module_names",
    "parse_devices",
]
