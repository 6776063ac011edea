"""A config as `python -m pairuni_jax.main --config=FILE[:preset] --config.x=y ...` builds it."""

import os

from absl import flags
from ml_collections import config_flags

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(name: str, arg: str = "", *overrides: str):
    """`name`: a file in configs/ (e.g. "shapes.py"); `overrides`: "--config.field=value" flags."""
    path = os.path.join(CONFIGS, name)
    argv = [__file__, f"--config={path}" + (f":{arg}" if arg else ""), *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config
