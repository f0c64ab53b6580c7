"""The demo's image tower is an ImageNet classifier: its 1000-class head teaches the projections real photos.

The frozen EfficientNet-Lite0 trunk's pooled features are the input of two linear maps: the ImageNet head
(``classifier``, 1280 -> 1000, dropped from the served model) and the trained image projection (1280 -> 384). The
head knows photos; the projections, trained on clip art alone, do not. Distillation: for an image, the teacher is
the head's class distribution at temperature ``T`` (softmax(head(x) / T)); the student is the demo model's own
zero-shot classifier over the 1000 ImageNet class names (softmax of logit_scale * cosine between the image embedding
and each class's embedding from the prompts of :data:`hqclip.repo.prompts.DEFAULT_TEMPLATES`, the ensemble
``/v1/classify`` uses: see :class:`Distillation`); the loss is KL(teacher || student), added to the HQ-CLIP loss
with weight ``weight``. Both sides come from cached features (training/demo/cached.py): one 1,000 x 384 projection
per step.

Each class's text is mixed with its WordNet ancestors' names (training/demo/hypernyms.py: ``hypernyms``), so the
student also learns where "cat" lies, not only "Egyptian Mau". Distillation images: the demo's training images and
random crops of the real photos (training/demo/photos.py: TRAINING, and the captioned GCompris photos). The
held-out photos (photos.py: HELDOUT) are only ever evaluated: :func:`evaluate_photos`.

Beside it, the captioned photos (training/demo/gcompris.py) teach with their captions: each photo (whole or a crop)
is classified among the distinct captions by the same zero-shot rule, cross-entropy against its own (weight
``captions``): the teacher's blind spots (no ImageNet class is a person, a monument or a planet) get real labels.
Settings and results: docs/demo-model.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from hqclip.repo.prompts import DEFAULT_TEMPLATES
from training.demo.feature_file import CachedTensors, pooled_texts
from training.demo.hypernyms import Hypernym, imagenet_hypernyms
from training.demo.photos import (
    CAPTIONED_CROPS,
    CROPS_PER_PHOTO,
    HELDOUT,
    HELDOUT_SETS,
    PROBLEM_SIZE,
    TRAINING,
    captioned,
    captioned_views,
    crops,
    load,
)


class DistillConfig(BaseModel):
    """``distill.*`` overrides of ``hqclip demo build --retrain`` (``distill.weight=0`` turns it off).

    The defaults are the committed heads' recipe (docs/demo-model.md): weight 2 on photo crops only (distilling on
    the clip art too costs clip-art top-5 and tag mAP), T = 2, hypernyms 0.5, the captioned photos' term at weight
    1, with the text projection kept at the identity (``heads.text_projection``).
    """

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(2.0, ge=0, description="Weight of the distillation loss beside the HQ-CLIP loss; 0 = off.")
    temperature: float = Field(2.0, gt=0, description="Teacher temperature: softmax(ImageNet logits / T).")
    batch_size: int = Field(256, ge=1, description="Distillation images per step (drawn with replacement).")
    clip_art: bool = Field(False, description="Distil on the demo's training images too, not only photo crops.")
    hypernyms: float = Field(0.5, ge=0, le=1, description=(
        "Share of an ImageNet class's text taken from the names of its WordNet ancestors (training/demo/"
        "hypernyms.py: 'cat' for 'tabby'); 0 = its own name alone."))
    captions: float = Field(1.0, ge=0, description=(
        "Weight of the captioned-photo term (training/demo/gcompris.py): each captioned photo classified among "
        "the distinct captions, cross-entropy; 0 = off."))


@dataclass
class PhotoFeatures(CachedTensors):
    """Trunk features of the photo crops and held-out photos, text features of every prompt (one cache file)."""

    crops: torch.Tensor  # [C, 1280] crops of the TRAINING photos
    crop_sources: list[str]
    heldout: torch.Tensor  # [H, 1280] the HELDOUT photos, whole (resized, centre crop: as served)
    heldout_names: list[str]
    heldout_labels: list[str]
    classes: list[int]  # the ImageNet classes distilled (indices; all 1000 in the demo build)
    texts: list[str]  # their prompts (class-major) then the held-out classes' prompts
    text: torch.Tensor  # [T, 384] pooled text features
    # the captioned photos, whole and cropped (photos.py: captioned_views); None in a file written before them
    captioned: torch.Tensor | None = None  # [V, 1280]
    captioned_sources: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)  # per row of `captioned`

    def fits(self, crops_per_photo: int, classes: list[int], captioned_crops: int = CAPTIONED_CROPS) -> bool:
        """Whether these are the features of today's photo sets (photos.py, gcompris.py: captions included), crop
        counts and ImageNet classes."""
        captions = captioned()
        return (self.crop_sources == crop_sources(crops_per_photo) and self.heldout_names == list(HELDOUT)
                and self.captioned_sources == captioned_sources(captioned_crops)
                and self.captions == [captions[name] for name in self.captioned_sources]
                and self.classes == classes and set(photo_prompts(classes)) | set(self.captions) <= set(self.texts))


def crop_sources(crops_per_photo: int) -> list[str]:
    return [name for name in TRAINING for _ in range(crops_per_photo)]


def captioned_sources(captioned_crops: int) -> list[str]:
    return [name for name in captioned() for _ in range(1 + captioned_crops)]


def imagenet_prompts(classes: list[int]) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return [t.format(IMAGENET_CLASSNAMES[c]) for c in classes for t in DEFAULT_TEMPLATES]


def hypernyms_of(classes: list[int]) -> list[Hypernym]:
    """The WordNet ancestors (training/demo/hypernyms.py) of any of the ImageNet ``classes``."""
    wanted = set(classes)
    return [h for h in imagenet_hypernyms() if wanted.intersection(h.classes)]


def hypernym_prompts(hypernyms: list[Hypernym]) -> list[str]:
    return [t.format(h.name) for h in hypernyms for t in DEFAULT_TEMPLATES]


def photo_prompts(classes: list[int]) -> list[str]:
    """Every prompt a photo feature file holds: the ImageNet classes', their ancestors', the held-out classes'."""
    return list(dict.fromkeys(imagenet_prompts(classes) + hypernym_prompts(hypernyms_of(classes))
                              + heldout_prompts()))


def heldout_prompts(classes: list[str] | None = None) -> list[str]:
    """The prompts of ``classes`` (default: every held-out photo's class), class-major."""
    return [t.format(c) for c in (sorted(set(HELDOUT.values())) if classes is None else classes)
            for t in DEFAULT_TEMPLATES]


@torch.no_grad()
def encode_photo_features(model, transform, tokenizer, crops_per_photo: int = CROPS_PER_PHOTO,
                          classes: list[int] | None = None, batch_size: int = 32, progress: bool = True,
                          known: PhotoFeatures | None = None, captioned_crops: int = CAPTIONED_CROPS
                          ) -> PhotoFeatures:
    """Run the frozen towers of the demo model over the photos' crops, the held-out photos, the captioned photos
    and the prompts of ``classes`` (ImageNet indices; default all 1000), of their WordNet ancestors, of the
    held-out classes, and the captions. What ``known`` (an earlier photo feature file) holds of the same photos and
    prompts is taken from it, not encoded again."""
    from tqdm import tqdm

    model.eval()
    classes = list(range(1000)) if classes is None else list(classes)
    captions = captioned()
    sources, views = crop_sources(crops_per_photo), 1 + captioned_crops
    texts = list(dict.fromkeys(photo_prompts(classes) + [captions[name] for name in captions]))
    reused = dict(zip(known.texts, known.text)) if known is not None else {}
    missing = [t for t in texts if t not in reused]
    keep_crops = known is not None and known.crop_sources == sources
    keep_heldout = known is not None and known.heldout_names == list(HELDOUT)
    known_views = _rows_by_source(known, views)
    bar = tqdm(total=(0 if keep_crops else len(sources)) + (0 if keep_heldout else len(HELDOUT))
               + views * len(set(captions) - set(known_views)) + len(missing), desc="photo features", unit="item",
               disable=not progress)

    def trunk(images: list) -> torch.Tensor:  # a batch at a time: a photo's crops as pixels take ~0.6 MB each
        rows = [model.visual.trunk(torch.stack([transform(i) for i in images[s:s + batch_size]])).float()
                for s in range(0, len(images), batch_size)]
        bar.update(len(images))
        return torch.cat(rows)

    crop_rows = known.crops if keep_crops else \
        torch.cat([trunk(crops(load(name), crops_per_photo, name)) for name in TRAINING])
    heldout = known.heldout if keep_heldout else trunk([load(name) for name in HELDOUT])
    captioned_rows = torch.cat([known_views[name] if name in known_views else
                                trunk(captioned_views(load(name), name, captioned_crops)) for name in captions])
    encoded = dict(zip(missing, torch.cat(pooled_texts(model, tokenizer, missing, batch_size * 4, bar)))) \
        if missing else {}
    bar.close()
    names = captioned_sources(captioned_crops)
    return PhotoFeatures(crops=crop_rows, crop_sources=sources, captioned=captioned_rows,
                         captioned_sources=names, captions=[captions[name] for name in names],
                         heldout=heldout, heldout_names=list(HELDOUT), heldout_labels=list(HELDOUT.values()),
                         classes=classes, texts=texts,
                         text=torch.stack([encoded[t] if t in encoded else reused[t] for t in texts]))


def _rows_by_source(known: PhotoFeatures | None, views: int) -> dict[str, torch.Tensor]:
    """An earlier feature file's rows of each captioned photo that has ``views`` of them (the same crops: seeded)."""
    if known is None or known.captioned is None:
        return {}
    out, start = {}, 0
    for name, group in groupby(known.captioned_sources):
        count = len(list(group))
        if count == views:
            out[name] = known.captioned[start:start + count]
        start += count
    return out


def teacher_head() -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet classifier's weight [1000, 1280] and bias [1000] (the wheel's, as timm names them)."""
    from training.demo.model import efficientnet_lite0_state_dict

    state = efficientnet_lite0_state_dict()
    return state["classifier.weight"].float(), state["classifier.bias"].float()


def class_embeddings(heads, text: torch.Tensor, templates: int) -> torch.Tensor:
    """[classes, D]: per class, the normalised mean of its ``templates`` prompts' embeddings (class-major rows)."""
    emb = heads.embed_texts(text)
    return F.normalize(emb.view(-1, templates, emb.shape[-1]).mean(1), dim=-1)


class Distillation:
    """The teacher, the distillation images and prompts, the captioned photos: :meth:`terms` are what
    ``train_heads`` adds to the HQ-CLIP loss.

    Each class's text side is the mean of its prompts' pooled features, projected and normalised: the projection
    is linear, so this is the served prompt ensemble up to the per-prompt normalisation, at 1/7 of the cost of
    projecting all 7,000 prompts at every step.
    """

    def __init__(self, cfg: DistillConfig, photos: PhotoFeatures, clip_art: torch.Tensor | None, seed: int) -> None:
        self.cfg = cfg
        self.captioned = photos.captioned if photos.captioned is not None else photos.crops[:0]
        self.image = torch.cat([photos.crops, self.captioned, *([clip_art] if cfg.clip_art and clip_art is not None
                                                                 else [])])
        captions = sorted(set(photos.captions))
        index = {caption: i for i, caption in enumerate(captions)}
        self.caption_of = torch.tensor([index[c] for c in photos.captions], dtype=torch.long)
        self.caption_text = photos.text_rows(captions)
        prompts = photos.text_rows(imagenet_prompts(photos.classes))
        self.classes = prompts.view(len(photos.classes), len(DEFAULT_TEMPLATES), -1).mean(1)
        if cfg.hypernyms > 0:
            self.classes = with_hypernyms(self.classes, photos, cfg.hypernyms)
        weight, bias = teacher_head()
        weight, bias = weight[photos.classes], bias[photos.classes]
        with torch.no_grad():
            self.target = F.softmax((self.image @ weight.T + bias) / cfg.temperature, dim=-1)
        self.generator = torch.Generator().manual_seed(seed)

    def terms(self, heads) -> dict[str, tuple[float, torch.Tensor]]:
        """{name: (weight, value)} of the terms with a weight above 0: ``distill``, KL(teacher || student) on a
        batch of distillation images; ``captions``, the captioned photos' cross-entropy among the captions. Each
        batch is drawn with replacement."""
        def logits(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:  # the served zero-shot rule
            return heads.logit_scale.exp() * heads.embed_images(image) @ heads.embed_texts(text).T

        out = {}
        if self.cfg.weight > 0:
            rows = torch.randint(len(self.image), (self.cfg.batch_size,), generator=self.generator)
            student = F.log_softmax(logits(self.image[rows], self.classes), dim=-1)
            out["distill"] = self.cfg.weight, F.kl_div(student, self.target[rows], reduction="batchmean")
        if self.cfg.captions > 0 and len(self.captioned):
            rows = torch.randint(len(self.captioned), (self.cfg.batch_size,), generator=self.generator)
            out["captions"] = self.cfg.captions, F.cross_entropy(logits(self.captioned[rows], self.caption_text),
                                                                 self.caption_of[rows])
        return out


def with_hypernyms(classes: torch.Tensor, photos: PhotoFeatures, share: float) -> torch.Tensor:
    """Each class's text features (the mean of its prompts'): ``1 - share`` its own, ``share`` the mean of its
    WordNet ancestors' (each the mean of its prompts'); classes without an ancestor keep their own."""
    hypernyms = hypernyms_of(photos.classes)
    text = photos.text_rows(hypernym_prompts(hypernyms)).view(len(hypernyms), len(DEFAULT_TEMPLATES), -1).mean(1)
    row = {c: i for i, c in enumerate(photos.classes)}
    below = torch.zeros(len(photos.classes), len(hypernyms))
    for j, hypernym in enumerate(hypernyms):
        below[[row[c] for c in hypernym.classes if c in row], j] = 1
    count = below.sum(1, keepdim=True)
    return torch.where(count > 0, (1 - share) * classes + share * (below @ text) / count.clamp(min=1), classes)


@torch.no_grad()
def evaluate_photos(heads, photos: PhotoFeatures, problem_size: int = PROBLEM_SIZE) -> dict[str, float]:
    """Zero-shot on the held-out photos: top-1 among all their classes, and the expected top-1 in a problem of
    ``problem_size`` classes (the true one and distractors drawn at random from the others: exact, not sampled);
    the latter also per held-out set (photos.py: HELDOUT_SETS), each among the same classes."""
    from math import comb

    classes = sorted(set(photos.heldout_labels))
    rows = class_embeddings(heads, photos.text_rows(heldout_prompts(classes)), len(DEFAULT_TEMPLATES))
    scores = heads.embed_images(photos.heldout) @ rows.T
    target = torch.tensor([classes.index(label) for label in photos.heldout_labels])
    above = (scores > scores[torch.arange(len(target)), target][:, None]).sum(1)  # classes ranked above the truth
    others, draws = len(classes) - 1, min(problem_size, len(classes)) - 1
    expected = [comb(others - int(a), draws) / comb(others, draws) for a in above]
    metrics = {"photos": len(target), "photo_classes": len(classes),
               "photo_top1": float((above == 0).float().mean()),
               f"photo_top1_{problem_size}way": sum(expected) / len(expected)}
    for name, members in HELDOUT_SETS.items():
        mine = [e for e, photo in zip(expected, photos.heldout_names) if photo in members]
        if mine:
            metrics[f"photo_top1_{problem_size}way_{name}"] = sum(mine) / len(mine)
    return metrics
