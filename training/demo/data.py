"""The demo model's data: Debian's Tux Paint stamps and Noto emoji, annotated by rules, as webdataset shards.

Sources (both installed with apt-get, nothing downloaded at run time):
- ``tuxpaint-stamps-default``: clip art PNGs in category folders (``animals/mammals/bovines/gnu.png``), each
  with a one-line English caption in ``gnu.txt`` ("A gnu."). Stamps without a caption (mirror images) and
  SVG-only stamps are left out.
- ``fonts-noto-color-emoji``: every fully-qualified emoji without a skin-tone modifier, flag or keycap,
  rendered by Pillow; the caption is its CLDR name from the ``emoji`` package ("A grinning face.").

Each image is composited on white, padded to a square and resized to 224 x 224 (no crop cuts the object off).
The annotator (training/demo/annotate.py) adds the four HQ-CLIP fields. Samples whose caption (normalised) hashes
into the held-out fraction go to ``heldout-*.tar``, the rest to ``train-*.tar``: all the Tux Paint stamps
sharing a caption ("The letter C." in three alphabets) land on the same side, so nothing held out was seen in
training. Stamps in a category of :data:`ZERO_SHOT_CLASSES` carry that class as ``label`` (zero-shot
evaluation); the class is also the "a kind of ..." clause of their description.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from training.demo.annotate import STYLES, Item, RuleAnnotator, dominant_colour, singular

STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_FONT_SIZE = 109  # the only size the CBDT bitmap font renders at
SIZE = 224
HELDOUT_FRACTION = 0.2
SHARD_SIZE = 500
APT_PACKAGES = ("tuxpaint-stamps-default", "fonts-noto-color-emoji")

# Zero-shot classes: category folder prefix -> class name; the first matching prefix wins. Only clearly
# distinct, well-filled categories; stamps elsewhere have no label (still trained on and retrieved).
ZERO_SHOT_CLASSES = {
    "symbols/alphabets": "letter",
    "symbols/money": "coin",
    "symbols/math": "number",
    "symbols/music": "musical note",
    "symbols/chess": "chess piece",
    "animals/birds": "bird",
    "animals/insects": "insect",
    "animals/fish": "fish",
    "animals/mammals": "mammal",
    "animals/marsupials": "mammal",
    "food/fruit": "fruit",
    "food/vegetables": "vegetable",
    "plants/flowers": "flower",
    "plants/trees": "tree",
    "town/houses": "building",
    "town/monuments": "building",
    "town/roadsigns": "road sign",
    "clothes/hats": "hat",
    "clothes": "clothing",
    "vehicles": "vehicle",
    "military/vehicles": "vehicle",
    "hobbies/music": "musical instrument",
    "household/dishes": "kitchenware",
    "household/tools": "tool",
    "household/electronics": "electronic device",
    "people/body_parts": "body part",
    "space/planets": "planet",
}
ZERO_SHOT_TEMPLATES = ("a picture of a {}.", "a {}.", "clip art of a {}.", "a drawing of a {}.")
_SKIP_FOLDER_WORDS = {"cartoon", "filled", "outlined", "uppercase", "lowercase", "00_symbols", "us"}


@dataclass(frozen=True)
class Source:
    """One image before annotation."""

    key: str
    caption: str
    name: str
    category: str  # folder path, or "emoji"
    origin: str  # the Debian package it comes from

    def load(self) -> Image.Image:
        """The RGBA image as the package ships it (stamps) or as the font renders it (emoji)."""
        if self.origin == "fonts-noto-color-emoji":
            font = ImageFont.truetype(str(EMOJI_FONT), EMOJI_FONT_SIZE)
            left, top, right, bottom = font.getbbox(self.name)
            image = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
            ImageDraw.Draw(image).text((-left, -top), self.name, font=font, embedded_color=True)
            return image
        return Image.open(STAMPS_DIR / f"{self.name}.png").convert("RGBA")


def stamp_sources(root: Path = STAMPS_DIR) -> list[Source]:
    """Every captioned PNG stamp, with its caption (first line of the .txt) and category folder."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: apt-get install {' '.join(APT_PACKAGES)}")
    sources = []
    for png in sorted(root.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue
        caption = txt.read_text(encoding="utf-8", errors="replace").strip().splitlines()[0].strip()
        relative = png.relative_to(root).with_suffix("")
        key = "stamp-" + re.sub(r"[^A-Za-z0-9]+", "-", str(relative)).strip("-").lower()
        sources.append(Source(key, caption, str(relative), str(relative.parent), "tuxpaint-stamps-default"))
    return sources


def emoji_sources() -> list[Source]:
    """Emoji the font draws as one picture, named by CLDR: no skin tones, flags, keycaps or components."""
    import emoji

    if not EMOJI_FONT.is_file():
        raise FileNotFoundError(f"{EMOJI_FONT} is missing: apt-get install {' '.join(APT_PACKAGES)}")
    sources = []
    for char, data in sorted(emoji.EMOJI_DATA.items()):
        if data.get("status") != emoji.STATUS["fully_qualified"]:
            continue
        codes = [ord(c) for c in char]
        if any(0x1F3FB <= c <= 0x1F3FF or 0x1F1E6 <= c <= 0x1F1FF or 0xE0020 <= c <= 0xE007F or c == 0x20E3
               for c in codes):
            continue  # skin tones, flags (regional indicators, tag sequences), keycaps
        name = data["en"].strip(":").replace("_", " ")
        key = "emoji-" + "-".join(f"{c:x}" for c in codes if c != 0xFE0F)
        sources.append(Source(key, f"{name[0].upper()}{name[1:]}.", char, "emoji", "fonts-noto-color-emoji"))
    return sources


def zero_shot_class(category: str) -> str | None:
    for prefix, name in ZERO_SHOT_CLASSES.items():
        if category == prefix or category.startswith(prefix + "/"):
            return name
    return None


def category_words(category: str) -> tuple[str, ...]:
    """Folder words, singular, most general first: 'animals/mammals/bovines' -> ('animal', 'mammal', 'bovine')."""
    words = [w for w in category.split("/") if w not in _SKIP_FOLDER_WORDS and re.fullmatch(r"[a-z]+", w)]
    return tuple(dict.fromkeys(singular(w) for w in words))


def square(image: Image.Image, size: int = SIZE) -> Image.Image:
    """RGBA on white, padded to a centred square, resized to ``size``: RGB."""
    side = max(image.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def is_heldout(caption: str, fraction: float = HELDOUT_FRACTION) -> bool:
    digest = hashlib.sha256(" ".join(caption.lower().split()).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def annotated_samples(sources: list[Source]) -> Iterator[tuple[Source, Image.Image, dict]]:
    """(source, square RGB image, JSON metadata with the four HQ-CLIP fields) for every source.

    Two passes: the annotator needs every subject (to draw swaps from) before it writes the first sample.
    """
    items = []
    for source in sources:
        words = category_words(source.category)
        label = zero_shot_class(source.category)
        fallback = source.caption if source.category == "emoji" else Path(source.name).name
        style = STYLES[1] if source.category == "emoji" else STYLES[0]
        items.append(Item(source.key, source.caption, fallback, words, label, style, dominant_colour(source.load())))
    annotator = RuleAnnotator(items)
    for source, item in zip(sources, items):
        meta = {"caption": source.caption, **annotator(item), "category": source.category, "source": source.origin}
        if label := zero_shot_class(source.category):
            meta["label"] = label
        yield source, square(source.load()), meta


def write_shards(out_dir: Path, progress: bool = True, sources: list[Source] | None = None) -> dict[str, int]:
    """Write ``train-*.tar``, ``heldout-*.tar`` and ``classes.json`` into ``out_dir``; return sample counts.

    ``sources``: every stamp and emoji by default (a subset makes a small demo data set, as the tests do).
    Writes into a temporary folder and renames it at the end, so a folder that exists is complete.
    """
    import webdataset as wds
    from tqdm import tqdm

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    sources = stamp_sources() + emoji_sources() if sources is None else sources
    writers = {split: wds.ShardWriter(str(tmp / f"{split}-%06d.tar"), maxcount=SHARD_SIZE, verbose=0)
               for split in ("train", "heldout")}
    counts = {"train": 0, "heldout": 0}
    for source, image, meta in tqdm(annotated_samples(sources), total=len(sources), desc="demo data",
                                    unit="image", disable=not progress):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92)
        split = "heldout" if is_heldout(source.caption) else "train"
        writers[split].write({"__key__": source.key, "jpg": buffer.getvalue(), "txt": source.caption,
                              "json": json.dumps(meta, ensure_ascii=False)})
        counts[split] += 1
    for writer in writers.values():
        writer.close()
    classes = sorted(set(ZERO_SHOT_CLASSES.values()))
    (tmp / "classes.json").write_text(json.dumps({"classes": classes, "templates": list(ZERO_SHOT_TEMPLATES),
                                                  "counts": counts}, indent=1))
    tmp.rename(out_dir)
    return counts


def shard_paths(data_dir: Path, split: str) -> list[str]:
    found = sorted(str(p) for p in Path(data_dir).glob(f"{split}-*.tar"))
    if not found:
        raise FileNotFoundError(f"no {split}-*.tar in {data_dir}: run `hqclip demo build`")
    return found
