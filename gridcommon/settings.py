"""Typed reading of environment variables with clear messages on bad values.

Each service declares its settings once, in its own ``config.py``, with these
helpers; a wrong value stops the service at start-up with a sentence that says
which variable is wrong and what it should look like.
"""
from __future__ import annotations

import math
from typing import Mapping
from urllib.parse import urlsplit

from gridcommon.log_sampling import DEFAULT_BURST_PER_SECOND, DEFAULT_SAMPLE_EVERY, LogSampling


class SettingsError(ValueError):
    """A setting in the environment has a value the service cannot use."""


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def env_float(
    env: Mapping[str, str],
    name: str,
    default: float,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number, got {raw!r}")
    _check_bounds(name, value, minimum, maximum)
    return value


def env_int(
    env: Mapping[str, str],
    name: str,
    default: int,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    _check_bounds(name, value, minimum, maximum)
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise SettingsError(f"{name} must be one of true/false/1/0/yes/no/on/off, got {raw!r}")


def env_list(env: Mapping[str, str], name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A comma-separated list; blanks between commas are ignored."""
    raw = env.get(name, "")
    if not raw.strip():
        return default
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def env_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(env, name, default)
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _check_bounds(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name} must be at most {maximum}, got {value}")


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def env_log_level(env: Mapping[str, str]) -> str:
    """LOG_LEVEL, shared with the server (gridcommon.serve passes the same level to granian)."""
    level = env_str(env, "LOG_LEVEL", "info").lower()
    if level not in LOG_LEVELS:
        raise SettingsError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}; got {level!r}")
    return level


def env_log_sampling(env: Mapping[str, str]) -> LogSampling:
    """ACCESS_LOG_BURST and ACCESS_LOG_SAMPLE: which requests' log lines are written (gridcommon.log_sampling)."""
    return LogSampling(
        burst_per_second=env_int(env, "ACCESS_LOG_BURST", DEFAULT_BURST_PER_SECOND, minimum=0),
        every=env_int(env, "ACCESS_LOG_SAMPLE", DEFAULT_SAMPLE_EVERY, minimum=0),
    )


def normalise_base_url(raw: object, example: str) -> str:
    """``http(s)://host[:port][/prefix]`` without a trailing slash; ``ValueError`` saying what is wrong.

    ``example`` completes the message, e.g. ``"http://127.0.0.1:5011"``.
    """
    hint = f"for example {example}"
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"a base URL must be a non-empty string, {hint}")
    text = raw.strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        raise ValueError(f"{text!r} is not a valid URL; use {hint}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} must start with http:// or https:// and name a host, {hint}")
    # Checked on the text, not only on the parts: "http://@host", "http://host?" and "http://host#"
    # have an empty user, query and fragment, which urlsplit reports as none at all.
    if "?" in text or "#" in text or "@" in parts.netloc:
        raise ValueError(f"{text!r} must be a plain base URL without credentials, query or fragment, {hint}")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def env_base_url(env: Mapping[str, str], name: str, default: str) -> str:
    try:
        return normalise_base_url(env_str(env, name, default), example=default)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def env_base_urls(env: Mapping[str, str], name: str, example: str) -> tuple[str, ...]:
    """A comma-separated list of base URLs, each normalised."""
    try:
        return tuple(normalise_base_url(url, example) for url in env_list(env, name))
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None
