"""Joining a Ray cluster: what `--ray` extraction and Ray-served shards share."""
from __future__ import annotations

import logging

from .config import ConfigError

INSTALL_HINT = "pip install 'retrieval[ray]'"
# The object store of a `--ray local` cluster: results stream through it and are consumed
# at once, so it needs little, and the machine is usually shared.
LOCAL_OBJECT_STORE_BYTES = 1 << 30
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def require_ray():
    """The `ray` module, or ConfigError (a usage error) saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the extra installs both
    except ImportError as err:
        raise ConfigError(f"--ray needs Ray ({err}); install it with: {INSTALL_HINT}") from None
    return ray


def connect(address: str):
    """Join (or start, for "local") a Ray cluster unless this process already has one.

    `address` is "local" (a new single-machine cluster in this process), "auto" (the
    cluster `ray start` made on this machine, or $RAY_ADDRESS) or HOST:PORT / ray://...
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    # A cluster this process starts gets Ray's default token authentication; Ray then logs
    # that it did so, on every run. Only that notice is held back; it is restored after.
    notice = logging.getLogger(AUTH_NOTICE_LOGGER)
    level = notice.level
    try:
        if address == "local":
            notice.setLevel(logging.ERROR)
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(
            f"--ray {address}: cannot join a Ray cluster ({err}); start one with `ray start --head`, "
            "pass its address, or use --ray local"
        ) from None
    finally:
        notice.setLevel(level)
    return ray
