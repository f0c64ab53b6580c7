"""The request an LVLM gets per image: the paper's instruction, the image, and the alt text as a reference.

docs/refinement.md explains each line of the default prompt. A custom prompt (HQCLIP_REFINE__PROMPT) may use
``{alt_text}``; without it the alt text is not sent.
"""

from __future__ import annotations

import base64

DEFAULT_PROMPT = """\
Generate descriptions and tags, and negative descriptions and negative tags, for this image.

The alt text the image was found with is given as a reference. It may be noisy, incomplete or unrelated:
keep what the image confirms (names, places, brands, text in the image) and ignore the rest.
Alt text: "{alt_text}"

Answer in JSON with four fields:
- "desc": a detailed description of the image as a list of short clauses, most salient first: the objects, their
  attributes (colour, material, count, size), their positions and relations, the actions, the setting and the style.
- "neg_desc": the same clauses with one or two details changed in each (an attribute, a count, a relation, an
  object) so that the description is fluent and plausible but wrong for this image.
- "tags": short tags (one to three words) for the objects, attributes, scene and style in the image.
- "neg_tags": for each tag, in the same order, a similar tag that does not fit this image.
Describe only what is visible. Do not mention the alt text or these instructions."""

NO_ALT_TEXT = "(none)"


def render(prompt: str, alt_text: str | None) -> str:
    """The prompt with the alt text in place (``{alt_text}``); other braces are left as they are."""
    return prompt.replace("{alt_text}", (alt_text or "").strip() or NO_ALT_TEXT)


_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG", "image/png"), (b"GIF8", "image/gif"), (b"BM", "image/bmp"))


def image_mime(image: bytes) -> str:
    """The media type of an encoded image, from its first bytes; ValueError for anything else."""
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in _MAGIC:
        if image.startswith(magic):
            return mime
    raise ValueError("not a JPEG, PNG, WebP, GIF or BMP image")


def data_url(image: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


def messages(image: bytes, alt_text: str | None, prompt: str = DEFAULT_PROMPT) -> list[dict]:
    """OpenAI chat messages: one user turn with the image as a data URL, then the instruction."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image, image_mime(image))}},
                {"type": "text", "text": render(prompt, alt_text)},
            ],
        }
    ]
