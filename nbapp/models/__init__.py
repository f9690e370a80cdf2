"""Models: the contract, config loading (empanada YAML, URL cache) and the shipped default."""

from nbapp.models.config import ModelConfig, cache_dir, fetch, read_config
from nbapp.models.loader import (Model, check_outputs, default_config_path, device_names,
                                 gpu_devices, load_model, resolve_device)

__all__ = [
    "Model",
    "ModelConfig",
    "cache_dir",
    "check_outputs",
    "default_config_path",
    "device_names",
    "fetch",
    "gpu_devices",
    "load_model",
    "read_config",
    "resolve_device",
]
