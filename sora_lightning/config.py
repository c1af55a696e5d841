"""Where the Hydra configs live: the `sora_lightning.conf` package, not a folder of the checkout.

The top-level `conf/` folder is installed as the package `sora_lightning.conf` (see
`[tool.setuptools]` in pyproject.toml), so the entry points compose from whatever is installed:
a wheel in a venv outside the checkout works the same as an editable install (which sees edits
to `conf/` at once). A path relative to this file (`parents[2] / "conf"`) exists only in a
source tree. Users add their own YAMLs with `--config-dir DIR` or `hydra.searchpath=[file://DIR]`.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

CONFIG_MODULE = "sora_lightning.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
"""For `@hydra.main(config_path=CONFIG_PATH, ...)`."""


@cache
def conf_dir() -> Path:
    """The installed config folder as a path, for globbing and `OmegaConf.load` in tests/tools."""
    return Path(str(files(CONFIG_MODULE)))
