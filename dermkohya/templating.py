"""jinja2, configured once: the files in dermkohya/templates/ (package data: what kohya and people
read) and the one-line caption/prompt templates users write. Always StrictUndefined: a misspelt
variable is an error, never ''."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jinja2

from dermkohya.names import slug
from dermkohya.paths import TEMPLATES_DIR


def file_environment(*, trim_blocks: bool = False, **filters: Callable[..., Any]) -> jinja2.Environment:
    """For dermkohya/templates/*.j2; `trim_blocks` for markdown, off where every byte is kohya's (TOML, shell)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=trim_blocks,
        lstrip_blocks=trim_blocks,
        autoescape=False,
    )
    env.filters.update(filters)
    return env


def text_template(text: str) -> jinja2.Template:
    """A caption or prompt template such as `… {{ diagnosis }}, Fitzpatrick skin type {{ fst }}`; the `slug`
    filter spells a learned token as the run file's token_template does (`<{{ diagnosis | slug }}>`)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["slug"] = slug
    return env.from_string(text)
