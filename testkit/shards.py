"""Webdataset shards of real photos (scikit-image's) with VLM-150M-style annotations, for the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter

from testkit.photos import encode, photo

# photo -> (alt text, clauses of the long description, tags, the negative edit of each)
SUBJECTS = {
    "astronaut": ("NASA portrait", ["an astronaut in a white suit", "an american flag behind"],
                  ["astronaut", "white suit", "flag"], ["diver", "black suit", "banner"]),
    "coffee": ("my morning", ["a cup of coffee", "on a saucer with a spoon"],
               ["coffee", "cup", "saucer"], ["tea", "glass", "plate"]),
    "chelsea": ("Chelsea", ["a tabby cat", "looking to the side"], ["cat", "tabby", "whiskers"],
                ["dog", "black", "collar"]),
    "rocket": ("launch day", ["a rocket on a launch pad", "against a blue sky"], ["rocket", "launch pad", "sky"],
               ["airplane", "runway", "sea"]),
    "coins": ("collection", ["old coins", "arranged in rows"], ["coins", "metal", "rows"],
              ["buttons", "wood", "piles"]),
    "immunohistochemistry": ("slide 4", ["a stained tissue sample", "under a microscope"],
                             ["tissue", "microscope", "stain"], ["rock", "telescope", "paint"]),
    "hubble_deep_field": ("deep field", ["many galaxies", "in the dark of space"], ["galaxies", "space", "stars"],
                          ["cells", "ocean", "lamps"]),
    "retina": ("scan", ["a retina", "with red blood vessels"], ["retina", "blood vessels", "eye"],
               ["leaf", "rivers", "ear"]),
}


def jpeg(image: Image.Image) -> bytes:
    return encode(image, "JPEG", quality=85)


def crop(image: Image.Image, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A random square crop (at least half the short side), resized: distinct images of one subject."""
    w, h = image.size
    side = int(rng.uniform(0.5, 1.0) * min(w, h))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return image.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)


def annotation(name: str) -> dict:
    alt, desc, tags, neg_tags = SUBJECTS[name]
    neg_desc = [desc[0].replace(tags[0], neg_tags[0]), *desc[1:]]
    return {"caption": alt, "desc": desc, "neg_desc": neg_desc, "tags": tags, "neg_tags": neg_tags, "label": name}


def write_shards(directory: Path, shards: int = 2, per_shard: int = 16, seed: int = 0) -> list[str]:
    """``shards`` tar files of ``per_shard`` good samples each, cycling over the subjects; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = {name: photo(name) for name in SUBJECTS}
    names = list(SUBJECTS)
    paths = []
    for s in range(shards):
        path = directory / f"shard-{s:05d}.tar"
        with TarWriter(str(path), encoder=False) as writer:
            for i in range(per_shard):
                index = s * per_shard + i
                name = names[index % len(names)]
                meta = annotation(name) | {"uid": f"uid{index:06d}"}
                writer.write({"__key__": f"{index:09d}", "jpg": jpeg(crop(photos[name], rng)),
                              "json": json.dumps(meta).encode()})
        paths.append(str(path))
    return paths
