"""The README's table of config fields, generated from the pydantic models in
``polycats.config`` so that it cannot drift from them: every field with its default and its
``description``. ``python -m polycats.config_table README.md`` rewrites the table in place;
``tests/test_readme.py`` fails when it is out of date."""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from polycats.config import Config

BEGIN = "<!-- config table: generated from src/polycats/config.py by `python -m polycats.config_table README.md` -->"
END = "<!-- end of the config table -->"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    return f"`{json.dumps(field.get_default(call_default_factory=True), ensure_ascii=False)}`"


def meaning(field: FieldInfo) -> str:
    text = field.description or ""
    if typing.get_origin(field.annotation) is typing.Literal:
        text += f" (one of {', '.join(f'`{choice}`' for choice in typing.get_args(field.annotation))})"
    return text.strip()


def union_options(annotation: object) -> tuple[type[BaseModel], ...]:
    """The models of a discriminated union of sections (``balancer``), else ()."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return ()
    options = typing.get_args(annotation)
    return options if all(isinstance(option, type) and issubclass(option, BaseModel) for option in options) else ()


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(field, default, meaning) of every field of ``model``, nested sections expanded; a union of
    sections (``balancer``) gives its ``name`` and one row per choice listing its options and
    their defaults (their meanings are in docs/cats.md and docs/peers.md)."""
    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += rows(annotation, f"{prefix}{name}.")
        elif options := union_options(annotation):
            names = [option.model_fields["name"].default for option in options]
            chosen = default(type(field.default).model_fields["name"]) if isinstance(field.default, BaseModel) else "required"
            found.append((f"`{prefix}{name}.name`", chosen,
                          f"{field.description} (one of {', '.join(f'`{n}`' for n in names)}; their options below)"))
            for option, option_name in zip(options, names):
                listed = [f"`{key}` {default(value)}" for key, value in option.model_fields.items() if key != "name"]
                found.append((f"`{prefix}{name}.*` of `{option_name}`", "", ", ".join(listed) or "no options"))
        else:
            found.append((f"`{prefix}{name}`", default(field), meaning(field)))
    return found


def config_table() -> str:
    lines = ["| field | default | meaning |", "|---|---|---|"]
    lines += [f"| {cell(field)} | {cell(value)} | {cell(text)} |" for field, value, text in rows(Config)]
    return "\n".join(lines)


def with_table(document: str) -> str:
    """``document`` with the text between :data:`BEGIN` and :data:`END` replaced by the table."""
    start, end = document.index(BEGIN) + len(BEGIN), document.index(END)
    return f"{document[:start]}\n{config_table()}\n{document[end:]}"


if __name__ == "__main__":
    path = Path(sys.argv[1])
    path.write_text(with_table(path.read_text(encoding="utf-8")), encoding="utf-8")
