"""The four texts an LVLM writes per image (the released VLM-150M shape), their JSON schema and normalisation.

``desc`` and ``neg_desc`` are lists of clauses describing the image and a plausible but wrong version of it;
``tags`` and ``neg_tags`` are aligned lists of short strings: ``neg_tags[i]`` is the hard negative of ``tags[i]``.
The schema goes to the server as ``response_format: {"type": "json_schema", ...}`` so decoding is constrained to
it; its length bounds also keep a model that rambles from running to ``max_tokens``. Whatever comes back is still
validated and normalised here, since a server may ignore the schema and a model may fill it with junk.
"""

from __future__ import annotations

import json
import re

from pydantic import BaseModel

MAX_CLAUSES = 8
MAX_CLAUSE_CHARS = 300
MAX_TAGS = 16
MAX_TAG_CHARS = 48

FIELDS = ("desc", "neg_desc", "tags", "neg_tags")


def _string_list(max_items: int, max_chars: int, description: str) -> dict:
    return {
        "type": "array",
        "description": description,
        "items": {"type": "string", "minLength": 1, "maxLength": max_chars},
        "minItems": 1,
        "maxItems": max_items,
    }


JSON_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "desc": _string_list(MAX_CLAUSES, MAX_CLAUSE_CHARS, "Clauses describing the image, most salient first."),
        "neg_desc": _string_list(
            MAX_CLAUSES, MAX_CLAUSE_CHARS, "The same clauses with a few details changed so they are wrong."
        ),
        "tags": _string_list(MAX_TAGS, MAX_TAG_CHARS, "Short tags for what the image shows."),
        "neg_tags": _string_list(MAX_TAGS, MAX_TAG_CHARS, "For each tag, a similar tag the image does not show."),
    },
    "required": list(FIELDS),
    "additionalProperties": False,
}

RESPONSE_FORMAT: dict = {"type": "json_schema", "json_schema": {"name": "refinement", "schema": JSON_SCHEMA}}


class Refinement(BaseModel):
    desc: list[str]
    neg_desc: list[str]
    tags: list[str]
    neg_tags: list[str]


class InvalidRefinement(ValueError):
    """The model's answer is not the four fields, or nothing usable is left after normalisation (worth a retry)."""


_QUOTES = "\"'`“”‘’«»"
_SPACE = re.compile(r"[\s\x00-\x1f\x7f]+")  # whitespace and control characters


def clean(text: str, max_chars: int) -> str:
    """One line without control characters, trimmed, without wrapping quotes, cut at a word boundary to at most
    ``max_chars``."""
    text = _SPACE.sub(" ", text).strip().strip(_QUOTES).strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        if " " in cut and text[max_chars] != " ":  # the cut falls inside a word: drop that word
            cut = cut.rsplit(" ", 1)[0]
        text = cut.rstrip(" ,;:")
    return text


def _clauses(values: list[str]) -> list[str]:
    out, seen = [], set()
    for value in values:
        text = clean(value, MAX_CLAUSE_CHARS)
        if text and text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out[:MAX_CLAUSES]


def _tag_pairs(tags: list[str], neg_tags: list[str]) -> tuple[list[str], list[str]]:
    """Pairs (tag, neg_tag) by position; a pair goes when either side is empty or the tag was seen already."""
    pos, neg, seen = [], [], set()
    for tag, neg_tag in zip(tags, neg_tags):
        tag, neg_tag = clean(tag, MAX_TAG_CHARS), clean(neg_tag, MAX_TAG_CHARS)
        if tag and neg_tag and tag.lower() not in seen and tag.lower() != neg_tag.lower():
            seen.add(tag.lower())
            pos.append(tag)
            neg.append(neg_tag)
    return pos[:MAX_TAGS], neg[:MAX_TAGS]


def normalise(raw: dict) -> Refinement:
    """The four fields of a decoded answer, cleaned; raises InvalidRefinement when one is missing or empty."""
    lists = {}
    for field in FIELDS:
        value = raw.get(field)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidRefinement(f"'{field}' must be a list of strings, got {type(value).__name__}")
        lists[field] = value
    tags, neg_tags = _tag_pairs(lists["tags"], lists["neg_tags"])
    result = Refinement(desc=_clauses(lists["desc"]), neg_desc=_clauses(lists["neg_desc"]), tags=tags,
                        neg_tags=neg_tags)
    empty = [field for field in FIELDS if not getattr(result, field)]
    if empty:
        raise InvalidRefinement(f"nothing usable left in {', '.join(empty)} after normalisation")
    return result


def parse(text: str) -> Refinement:
    """The model's answer (JSON text, possibly in a ``` fence) as a normalised Refinement."""
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        raw = json.loads(body, strict=False)  # control characters inside strings: clean() removes them
    except json.JSONDecodeError as exc:
        raise InvalidRefinement(f"the answer is not JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(raw, dict):
        raise InvalidRefinement(f"the answer is a JSON {type(raw).__name__}, not an object")
    return normalise(raw)
