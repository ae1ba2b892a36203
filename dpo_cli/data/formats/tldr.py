"""OpenAI's TL;DR summarization comparisons (Stiennon et al., 2020), the DPO paper's summarization task.

Hub `openai/summarize_from_feedback`, config `comparisons`. Each row compares two summaries of
one post: {"info": {"id", "post", "title", "subreddit", "site", "article"}, "summaries":
[{"text", "policy", "note"}, {"text", ...}], "choice": 0 or 1 (the index of the preferred
summary), "worker", "batch", "split", "extra"}.

The prompt is the template of OpenAI's summarize-from-feedback code, the one TRL's TL;DR
preprocessing (`examples/datasets/tldr_preference.py`) uses and the usual setup for the DPO
paper's TL;DR experiments:

    "SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:"

A few rows (CNN/Daily Mail batches, in the validation split) summarize a news article instead:
`info.post` is null and `info.article` holds the text. They get TRL's article template,
"Article:\\n{article}\\n\\nTL;DR:", because they have no subreddit to fill the first one.

The responses are " " + the summary with its surrounding white space stripped (the source texts
start with a space, some end with a newline), so that a prompt ending in "TL;DR:" reads as
"TL;DR: summary". Dropped, with the reason: rows whose two summaries are the same after
stripping (nothing to prefer), an empty summary, a `choice` other than 0 or 1, and rows with
neither post nor article text. A field of the wrong type is a RowError naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as option
from typing import Any, ClassVar

from dpo_cli.data.fields import RowError, field
from dpo_cli.data.formats.base import Format

POST_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
ARTICLE_TEMPLATE = "Article:\n{article}\n\nTL;DR:"

BAD_CHOICE = "choice is not 0 or 1"
NO_TEXT = "no post or article text (info.post and info.article are both null)"
EMPTY = "empty summary"
IDENTICAL = "identical summaries"


def prompt(info: Any, post_template: str = POST_TEMPLATE, article_template: str = ARTICLE_TEMPLATE) -> str | None:
    """The prompt for a row's `info` (its post, else its article, in the template), or None when
    it has neither post nor article text."""
    if not isinstance(info, dict):
        raise RowError("info", f"field 'info' must be an object with post, title and subreddit, got {_kind(info)}")
    post, article = info.get("post"), info.get("article")
    if post is not None:
        values = {"post": post, "title": info.get("title"), "subreddit": info.get("subreddit")}
        for name, value in values.items():
            if not isinstance(value, str):
                raise RowError("info", f"field 'info.{name}' must be a string for a post, got {_kind(value)}")
        return post_template.format(**values)
    if article is not None:
        if not isinstance(article, str):
            raise RowError("info", f"field 'info.article' must be a string, got {_kind(article)}")
        return article_template.format(article=article)
    return None


def _summaries(row: dict) -> tuple[str, str]:
    value = field(row, "summaries")
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(s, dict) and isinstance(s.get("text"), str) for s in value)
    ):
        raise RowError(
            "summaries", f"field 'summaries' must be a list of two objects with a string text, got {_shape(value)}"
        )
    return value[0]["text"], value[1]["text"]


def normalize(row: dict, templates: tuple[str, str] = (POST_TEMPLATE, ARTICLE_TEMPLATE)) -> dict[str, str] | str:
    """{prompt, chosen, rejected} from one comparison row, or the reason it is dropped;
    `templates`: the prompt of a post and of an article."""
    texts = _summaries(row)
    choice = field(row, "choice")
    if isinstance(choice, bool) or not isinstance(choice, int):
        raise RowError("choice", f"field 'choice' must be the integer 0 or 1, got {_kind(choice)}")
    text = prompt(field(row, "info"), *templates)
    if choice not in (0, 1):
        return BAD_CHOICE
    if text is None:
        return NO_TEXT
    chosen, rejected = texts[choice].strip(), texts[1 - choice].strip()
    if not chosen or not rejected:
        return EMPTY
    if chosen == rejected:
        return IDENTICAL
    return {"prompt": text, "chosen": " " + chosen, "rejected": " " + rejected}


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _shape(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}: {value!r}"[:120]
    return _kind(value)


@dataclass
class TLDR(Format):
    """OpenAI's TL;DR comparisons, with the summarize-from-feedback prompt templates."""

    # source column of a field, e.g. data.format.columns.choice=preferred (unset = the field's own name)
    columns: dict[str, str] = option(default_factory=dict)
    # the prompt of a Reddit post (fields subreddit, title, post), and of a news article (article)
    post_template: str = POST_TEMPLATE
    article_template: str = ARTICLE_TEMPLATE

    name: ClassVar[str] = "tldr"
    fields: ClassVar[tuple[str, ...]] = ("info", "summaries", "choice")
    hint: ClassVar[tuple[frozenset[str], str]] = (
        frozenset({"info", "summaries", "choice"}),
        "these rows look like TL;DR comparisons: use data=tldr",
    )

    def normalize(self, row: dict) -> dict[str, str] | str:
        return normalize(row, (self.post_template, self.article_template))

    def problems(self) -> list[str]:
        """The columns, and templates that fill only the placeholders a row has."""
        out = super().problems()
        for key, names in (("post_template", ("subreddit", "title", "post")), ("article_template", ("article",))):
            try:
                getattr(self, key).format(**dict.fromkeys(names, ""))
            except (KeyError, IndexError, ValueError) as e:
                out.append(
                    f"data.format.{key}={getattr(self, key)!r} cannot be filled ({type(e).__name__}: {e}); "
                    f"its placeholders are {', '.join('{' + n + '}' for n in names)}"
                )
        return out
