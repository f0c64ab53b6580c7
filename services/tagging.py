"""The model's own tags for stored images: its short-tag head (HQ-CLIP's STC head, what /v1/tags answers) run on
the embeddings ingestion computed anyway, so a collection's images get tags to filter by without an LVLM.

Used where no LVLM refines an image (the LVLM's tags are better: it reads the picture and the alt text). Each tag
at or above ``HQCLIP_INDEX__AUTO_TAG_THRESHOLD``, at most ``HQCLIP_INDEX__AUTO_TAG_TOP_K`` (0 turns this off), joins
the item's own tags; ``attributes.model_tags`` keeps each one's probability and says where they came from.
"""

from __future__ import annotations

import numpy as np

from services.index.collection import Item
from services.settings import IndexSettings


async def add_model_tags(engine, settings: IndexSettings, items: list[Item], embeddings: dict[int, np.ndarray]) -> None:
    """Add the tag head's confident tags to ``items[i]`` for each image embedding ``embeddings[i]``; nothing when
    the model has no tag head or the setting turns it off."""
    if not embeddings or engine.manifest.tags is None or settings.auto_tag_top_k == 0:
        return
    indices = list(embeddings)
    probabilities = await engine.tag_probabilities(np.stack([embeddings[i] for i in indices]))
    vocabulary = engine.manifest.tags.vocabulary
    for i, row in zip(indices, probabilities):
        top = [j for j in np.argsort(-row)[: settings.auto_tag_top_k] if row[j] >= settings.auto_tag_threshold]
        if top:
            found = {vocabulary[j]: round(float(row[j]), 4) for j in top}
            item = items[i]
            item.tags = list(dict.fromkeys([*item.tags, *found]))
            item.attributes = {**item.attributes, "model_tags": found}
