"""A rule-based stand-in for the LVLM: the four HQ-CLIP fields from a one-line caption, a category and pixels.

The paper has an LVLM look at each image and write a long description (``desc``), a minimally edited false
one (``neg_desc``), short tags (``tags``) and, aligned with them, one edit per tag (``neg_tags``). The demo
model cannot run an LVLM at build time, so these rules write the same four fields for clip art whose caption
names the object ("A sitting gnu.") and whose folder names its category ("animals/mammals/bovines"):

- what is shown: the caption's first noun phrase ("sitting gnu"; the file name when the caption is a
  sentence), its head noun ("gnu") and how many ("two flowers" -> 2);
- its colour: the most common colour name among the opaque pixels (:func:`dominant_colour`);
- ``desc`` = [what, colour, class, style] clauses, e.g. "a sitting gnu, mostly brown, a mammal, clip art on a
  white background";
- ``neg_desc`` = the same clauses with ONE edit, chosen per sample from the key: swap the object (with its
  class) for one from another category, swap the colour, or change the count;
- ``tags`` = head noun, noun phrase, colour, class, category words, style; ``neg_tags[i]`` edits ``tags[i]``
  (another object's noun or phrase, another colour, another class or category word, another style).

Every negative differs from its positive, so a model that scores negatives below positives must see the
object, its colour or its count. Rules live here, data in training/demo/data.py.
"""

from __future__ import annotations

import colorsys
import hashlib
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

COLOURS = ("black", "white", "gray", "red", "orange", "brown", "yellow", "green", "blue", "purple", "pink")
STYLES = ("clip art on a white background", "an emoji on a white background")
STYLE_TAGS = {"clip art on a white background": "clip art", "an emoji on a white background": "emoji"}
NEGATIVE_STYLE_TAGS = ("photograph", "painting", "sketch", "3d render")
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "some": 3, "many": 3, "several": 3}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_DETERMINERS = {"a", "an", "the", "this", "that", "big", "little"}
_CUT = re.compile(r"\s(?:called|with|that|which|who|where|when|on|in|at|for|from|and|is|are|has|to)\s|[,:;!?(—–-]")
EDIT_KINDS = ("object", "colour", "count")
EDIT_WEIGHTS = (0.5, 0.3, 0.2)


@dataclass(frozen=True)
class Subject:
    """What a caption says is shown: the noun phrase without determiner, its head noun, and how many."""

    phrase: str
    noun: str
    count: int

    def spoken(self) -> str:
        """'a sitting gnu', 'an apple', 'two flowers'."""
        if self.count == 1:
            return f"{'an' if self.phrase[0] in 'aeiou' else 'a'} {self.phrase}"
        return f"{COUNT_WORDS.get(self.count, 'several')} {self.phrase}"

    def with_count(self, count: int) -> Subject:
        """The same object, ``count`` of them (the head noun turned plural or singular as needed)."""
        if (count == 1) == (self.count == 1):
            return Subject(self.phrase, self.noun, count)
        noun = singular(self.noun) if count == 1 else plural(self.noun)
        words = self.phrase.split()
        words[words.index(self.noun)] = noun  # the head noun, wherever it stands ("spiders playing soccer")
        return Subject(" ".join(words), noun, count)

    def recounted(self) -> Subject:
        """The same object, another count: one becomes two, several become one."""
        return self.with_count(2 if self.count == 1 else 1)


def plural(noun: str) -> str:
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def singular(noun: str) -> str:
    if noun.endswith("ies") and len(noun) > 4:
        return noun[:-3] + "y"
    if noun.endswith(("ches", "shes", "xes", "sses")):
        return noun[:-2]
    if noun.endswith("s") and not noun.endswith("ss") and len(noun) > 3:
        return noun[:-1]
    return noun


def parse_subject(caption: str, fallback: str) -> Subject:
    """The first noun phrase of the caption's first sentence; ``fallback`` (a name) if it has none.

    The head noun is the phrase's last word before an "of" or an "and", or its first word when an -ing word
    follows it: "sign of the horns" -> "sign", "spider playing soccer" -> "spider" ("old sailing ship" -> "ship").
    """
    sentence = re.split(r"(?<=[.!?])\s", caption.strip())[0].rstrip(".!? ").lower()
    words = _CUT.split(f" {sentence} ")[0].split()
    count = 1
    if words and words[0] in NUMBERS:
        count = NUMBERS[words.pop(0)]
    elif words and words[0] in _DETERMINERS:
        words.pop(0)
    else:  # a sentence ("Tankers carry bulk liquids."): the name says what is shown
        words = [w for w in re.sub(r"[^a-z]+", " ", fallback.lower()).split() if len(w) > 2 or w == "ox"]
    words = [w for w in words if re.fullmatch(r"[a-z'&.$0-9]+", w)][-4:] or ["thing"]
    head = next((i for i, w in enumerate(words) if (i and w in ("of", "and")) or (i == 1 and w.endswith("ing"))),
                len(words))
    return Subject(" ".join(words), words[head - 1], count)


def dominant_colour(image: Image.Image) -> str:
    """The most common basic colour name among the image's opaque pixels (alpha >= 128)."""
    rgba = np.asarray(image.convert("RGBA").resize((64, 64), Image.Resampling.NEAREST), dtype=np.float32) / 255
    pixels = rgba[rgba[..., 3] >= 0.5][:, :3]
    if len(pixels) == 0:
        return "white"
    votes = np.zeros(len(COLOURS), dtype=np.int64)
    for r, g, b in pixels[:: max(1, len(pixels) // 2048)]:
        votes[COLOURS.index(colour_name(r, g, b))] += 1
    return COLOURS[int(votes.argmax())]


def colour_name(r: float, g: float, b: float) -> str:
    """A basic colour name for one RGB value in [0, 1] (hue bands on HSV)."""
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if v < 0.2:
        return "black"
    if s < 0.15:
        return "white" if v > 0.85 else "gray"
    hue = h * 360
    if hue < 15 or hue >= 345:
        return "red" if v > 0.45 else "brown"
    if hue < 40:
        return "orange" if v > 0.65 else "brown"
    if hue < 70:
        return "yellow" if v > 0.5 else "brown"
    if hue < 165:
        return "green"
    if hue < 255:
        return "blue"
    if hue < 290:
        return "purple"
    return "pink"


@dataclass(frozen=True)
class Item:
    """What the annotator sees for one image."""

    key: str
    caption: str
    name: str  # file name or emoji name, the fallback for sentence captions
    category: tuple[str, ...]  # category words, most general first: ("animal", "mammal", "bovine")
    label: str | None  # the class, "a kind of mammal" (a zero-shot class; None: no class clause)
    style: str  # one of STYLES
    colour: str  # one of COLOURS


class RuleAnnotator:
    """Writes desc / neg_desc / tags / neg_tags for items; object swaps draw from the other items' subjects."""

    def __init__(self, items: list[Item]):
        self.pool = sorted({(parse_subject(i.caption, i.name), i.label) for i in items},
                           key=lambda p: (p[0].phrase, p[1] or ""))
        self.category_words = sorted({w for i in items for w in i.category} | {"animal", "tool", "toy"})

    def __call__(self, item: Item) -> dict[str, list[str]]:
        rng = random.Random(int(hashlib.sha256(item.key.encode()).hexdigest()[:16], 16))
        subject = parse_subject(item.caption, item.name)
        other, other_label = self._other_object(rng, subject, item.label)
        other_colour = rng.choice([c for c in COLOURS if c != item.colour])

        desc = [subject.spoken(), f"mostly {item.colour}", *([f"a kind of {item.label}"] if item.label else []),
                item.style]
        neg_desc = list(desc)
        kind = rng.choices(EDIT_KINDS, EDIT_WEIGHTS)[0]
        if kind == "object":
            neg_desc[0] = other.with_count(subject.count).spoken()
            if item.label:
                neg_desc[2] = f"a kind of {other_label}"
        elif kind == "colour":
            neg_desc[1] = f"mostly {other_colour}"
        else:
            neg_desc[0] = subject.recounted().spoken()

        pairs = [(subject.noun, other.noun), (subject.phrase, other.phrase), (item.colour, other_colour)]
        if item.label:
            pairs.append((item.label, other_label))
        pairs += [(word, self._other_word(rng, item.category)) for word in item.category]
        pairs.append((STYLE_TAGS[item.style], rng.choice(NEGATIVE_STYLE_TAGS)))
        # Drop repeated tags (phrase == noun) and negatives that are also true; the pairs stay aligned.
        positives = {tag for tag, _ in pairs}
        seen: set[str] = set()
        kept = []
        for tag, negative in pairs:
            if tag not in seen and negative not in positives:
                kept.append((tag, negative))
            seen.add(tag)
        return {
            "desc": desc,
            "neg_desc": neg_desc,
            "tags": [tag for tag, _ in kept],
            "neg_tags": [negative for _, negative in kept],
        }

    def _other_object(self, rng: random.Random, subject: Subject, label: str | None) -> tuple[Subject, str | None]:
        """An object sharing no word with this one: of another class, or unclassed like this one."""
        words = set(subject.phrase.split()) | {singular(subject.noun), plural(subject.noun)}
        candidates = [
            (s, lab) for s, lab in self.pool
            if (lab is not None and lab != label if label else lab is None) and not words & set(s.phrase.split())
        ]
        return rng.choice(candidates)

    def _other_word(self, rng: random.Random, category: tuple[str, ...]) -> str:
        return rng.choice([w for w in self.category_words if w not in category])
