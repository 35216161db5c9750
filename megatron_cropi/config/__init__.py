"""Configuration: strict YAML loading (:mod:`.loader`) and the run's config tree (:mod:`.schema`)."""

from megatron_cropi.config.loader import ConfigError, from_dict, load_yaml, require, to_dict

__all__ = ["ConfigError", "from_dict", "load_yaml", "require", "to_dict"]
