"""Configuration: :class:`ClientConfig` for the SDK and :class:`ExecutorConfig` for the service.

Both resolve, in order: explicit arguments, then ``CODEMODE_*`` environment variables, then a
YAML file (``from_yaml``), then the defaults in :mod:`codemode.config._defaults`.
"""

from codemode.config.client import ClientConfig, ConfigError
from codemode.config.executor import ExecutorConfig, LimitsConfig

__all__ = ["ClientConfig", "ConfigError", "ExecutorConfig", "LimitsConfig"]
