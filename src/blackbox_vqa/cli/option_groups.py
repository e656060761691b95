"""Groups of Typer options defined once and added to several commands.

:func:`option_group` returns a decorator that adds a group's parameters to a command's
signature (before ``--debug``) and hands the command their values as one object, built by
the group's ``build`` function, under one keyword (``model_settings``, ``method_options``).
Typer reads the decorated signature, so ``--help`` lists the options as usual.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, get_type_hints

__all__ = ["Parameter", "option_group"]

Parameter = tuple[str, Any, Any]
"""``(name, Annotated[type, typer.Option(...)], default)``."""

Command = Callable[..., None]


def option_group(
    parameters: Sequence[Parameter],
    keyword: str,
    build: Callable[[dict[str, Any]], Any],
    *,
    exclude: Sequence[str] = (),
) -> Callable[[Command], Command]:
    """A decorator: the command gains ``parameters`` (minus ``exclude``) and receives
    ``build({name: value})`` as ``keyword``."""
    def decorate(function: Command) -> Command:
        hints = get_type_hints(function, include_extras=True)
        signature = inspect.signature(function)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in signature.parameters.values() if p.name != keyword]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                   default=default)
                 for name, kind, default in parameters if name not in exclude]
        at = next((i for i, p in enumerate(own) if p.name == "debug"), len(own))
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                  for p in [*own[:at], *added, *own[at:]]]
        names = [p.name for p in added]

        @functools.wraps(function)
        def wrapper(**kwargs: Any) -> None:
            values = {name: kwargs.pop(name) for name in names}
            function(**kwargs, **{keyword: build(values)})

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate
