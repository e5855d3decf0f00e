"""Command-line options made from a pydantic model's fields, so a job's fields are declared once
(adit_tasks.core.options) for the CLI, the flows and the UI forms.

`@model_options("options", TransferOptions)` replaces the command's parameter `options` by one
typer option per field of the model:

- named `--field-name`, or by the field's `json_schema_extra={"cli": "other-name"}`;
- its help is the field's description, its default the field's default;
- a `bool` field is a `--x/--no-x` flag, a `Literal` field a choice of its values (typer);
- the command receives one validated instance. Invalid values end the command before it runs
  with exit code 2 and one line naming the option, e.g.
  `error: --study-date: invalid study date 'soon': use YYYY-MM-DD, ...`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

F = TypeVar("F", bound=Callable[..., Any])


def option_name(field: str, info: FieldInfo) -> str:
    """The option's name without dashes: the field's `cli` extra, else the field name."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return str(extra.get("cli") or field.replace("_", "-"))


def _default(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return inspect.Parameter.empty if info.default is PydanticUndefined else info.default


def _annotation(info: FieldInfo, name: str) -> Any:
    """The typer annotation of one field's option."""
    kind = info.annotation
    help_text = info.description or ""
    if kind is bool:
        return Annotated[bool, typer.Option(f"--{name}/--no-{name}", help=help_text)]
    return Annotated[kind, typer.Option(f"--{name}", help=help_text)]


def model_options(param: str, model: type[BaseModel]) -> Callable[[F], F]:
    """Replace the command's parameter `param` by one option per field of `model`; the
    command gets the validated model instance as `param`."""

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        if param not in signature.parameters:
            raise TypeError(f"{func.__name__}() has no parameter '{param}'")
        names = {field: option_name(field, info) for field, info in model.model_fields.items()}
        clash = set(names) & (set(signature.parameters) - {param})
        if clash:
            raise TypeError(f"{func.__name__}(): parameters {sorted(clash)} clash with fields "
                            f"of {model.__name__}")
        parameters: list[inspect.Parameter] = []
        for existing in signature.parameters.values():
            if existing.name != param:
                parameters.append(existing.replace(kind=inspect.Parameter.KEYWORD_ONLY))
                continue
            parameters += [inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY,
                                             default=_default(info),
                                             annotation=_annotation(info, names[field]))
                           for field, info in model.model_fields.items()]

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {field: kwargs.pop(field) for field in names}
            kwargs[param] = validated(model, values, names)
            return func(**kwargs)

        command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command  # type: ignore[return-value]

    return decorate


def validated(model: type[BaseModel], values: dict[str, Any], names: dict[str, str]) -> Any:
    """The model made from the options' values, or exit code 2 with one line per run naming
    the option(s) at fault."""
    try:
        return model(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            where = f"--{names[field]}: " if field in names else ""
            problems.append(where + error["msg"].removeprefix("Value error, "))
    typer.echo("error: " + "; ".join(problems), err=True)
    raise typer.Exit(2)
