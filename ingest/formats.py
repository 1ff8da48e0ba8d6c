"""The forms an event leaves in (exports, sinks): `raw` (as served), `ocsf` or `ecs`; one JSON line each."""

from __future__ import annotations

from collections.abc import Callable

from ingest.model import dumps  # integers beyond 64 bits too

FORMATS = ("raw", "ocsf", "ecs")


def converter(fmt: str) -> Callable[[dict], dict]:
    if fmt == "ocsf":
        from ingest.ocsf import to_ocsf

        return to_ocsf
    if fmt == "ecs":
        from ingest.ecs import to_ecs

        return to_ecs
    return lambda event: event


def encoder(fmt: str) -> Callable[[dict], bytes]:
    """event -> its JSON in `fmt`, without a line end."""
    convert = converter(fmt)
    return lambda event: dumps(convert(event)).encode()
