"""Groups of Typer options defined once and added to several commands.

:func:`option_group` returns a decorator that adds a group's parameters to a command's
signature (before ``--debug``) and hands the command their values as one object, built by
the group's ``build`` function, under one keyword (``model_settings``, ``method_options``).
Typer reads the decorated signature, so ``--help`` lists the options as usual.

A group's parameters may be a function, read again by :func:`refresh_option_groups` (which
``main()`` calls before every run): the method options are built from the method registry,
so a method registered after this module was imported still gets its options.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, get_type_hints

__all__ = ["Parameter", "option_group", "refresh_option_groups"]

Parameter = tuple[str, Any, Any]
"""``(name, Annotated[type, typer.Option(...)], default)``."""

Command = Callable[..., None]
Parameters = Sequence[Parameter] | Callable[[], Sequence[Parameter]]

_REFRESHERS: list[Callable[[], None]] = []


def refresh_option_groups() -> None:
    """Rebuild the signature of every decorated command from its groups' parameters now."""
    for refresh in _REFRESHERS:
        refresh()


def option_group(
    parameters: Parameters,
    keyword: str,
    build: Callable[[dict[str, Any]], Any],
    *,
    exclude: Sequence[str] = (),
) -> Callable[[Command], Command]:
    """A decorator: the command gains ``parameters`` (minus ``exclude``; a function is
    called for them at every :func:`refresh_option_groups`) and receives
    ``build({name: value})`` as ``keyword``."""
    def current() -> Sequence[Parameter]:
        return parameters() if callable(parameters) else parameters

    def decorate(function: Command) -> Command:
        hints = get_type_hints(function, include_extras=True)
        names: list[str] = []

        @functools.wraps(function)
        def wrapper(**kwargs: Any) -> None:
            values = {name: kwargs.pop(name) for name in names if name in kwargs}
            function(**kwargs, **{keyword: build(values)})

        def refresh() -> None:
            # (an inner group's wrapper has a __signature__ of its own, refreshed first)
            own = [p.replace(annotation=hints.get(p.name, p.annotation)
                             if isinstance(p.annotation, str) else p.annotation)
                   for p in inspect.signature(function).parameters.values()
                   if p.name != keyword]
            added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                       annotation=kind, default=default)
                     for name, kind, default in current() if name not in exclude]
            at = next((i for i, p in enumerate(own) if p.name == "debug"), len(own))
            params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                      for p in [*own[:at], *added, *own[at:]]]
            names[:] = [p.name for p in added]
            wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
            wrapper.__annotations__ = {p.name: p.annotation for p in params}

        refresh()
        _REFRESHERS.append(refresh)
        return wrapper

    return decorate
