"""The HTTP service that puts any model behind the wire protocol (``bbvqa serve``).

``create_app`` needs FastAPI (the ``serve`` extra); it is imported when first asked for, so
the HTTP adapter can use :mod:`blackbox_vqa.wire` without FastAPI installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blackbox_vqa.wire import PROTOCOL

if TYPE_CHECKING:
    from blackbox_vqa.server.app import create_app

__all__ = ["PROTOCOL", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from blackbox_vqa.server.app import create_app

        return create_app
    raise AttributeError(f"module 'blackbox_vqa.server' has no attribute {name!r}")
