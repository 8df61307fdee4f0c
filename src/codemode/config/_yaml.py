"""Reading a YAML mapping of settings, with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    YamlConfigSettingsSource,
)

T = TypeVar("T")


class ConfigError(ValueError):
    """Configuration is missing, unreadable or invalid; the message says which setting."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a mapping that names one key twice (PyYAML keeps the last,
    so a second ``api_keys`` entry of one id would silently replace the first)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        if not isinstance(key, str | int | float | bool):
            continue  # an unhashable key is the constructor's own error
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Return the top-level mapping of the YAML file at ``path``.

    Raises :class:`ConfigError` when the file is missing, is not YAML (a key given twice in
    one mapping included), or is not a mapping.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  # a SafeLoader subclass
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {file} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {file} must hold a mapping of settings, not {type(data).__name__}"
        )
    return data


def with_yaml_file(cls: type[T], path: str | Path) -> type[T]:
    """A subclass of the settings class ``cls`` that also reads the YAML file at ``path``.

    The file is checked first so that a missing or malformed file is a :class:`ConfigError`,
    not silently ignored; unknown keys are reported by the settings class itself.
    """
    load_yaml_mapping(path)
    config = {**cls.model_config, "yaml_file": str(path)}  # type: ignore[attr-defined]
    return type(cls.__name__, (cls,), {"model_config": config, "__module__": cls.__module__})


class YamlSettings(BaseSettings):
    """Settings read from explicit arguments, then ``CODEMODE_*`` variables, then a YAML file.

    The file is the one :func:`with_yaml_file` names; without it, only the first two apply.
    """

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)
