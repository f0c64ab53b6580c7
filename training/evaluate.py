"""`hqclip eval`: zero-shot accuracy, image<->text retrieval, hard-negative accuracy and tag mAP.

    hqclip eval --checkpoint runs/x/checkpoint-000010000.pt --shards 'val/{00000..00009}.tar'
    hqclip eval --model ViT-B-32 --pretrained weights.pt --folder photos/   # photos/<class name>/*.jpg

On shards: retrieval R@1/5/10 both ways with the alt text and with the long description as the paired text,
hard-negative accuracy (an image scores its positive above its negative: long descriptions, and joined tags),
tag mAP of the tag head, and zero-shot accuracy when the samples carry a ``label`` class name. On a folder of
labelled images: zero-shot accuracy. Results are written as JSON and as a markdown table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hqclip.repo.prompts import DEFAULT_TEMPLATES
from hqclip.shards import is_image
from training.data import SkipCounter, expand_urls, iterate_samples
from training.text_tower import encode_text

RECALL_AT = (1, 5, 10)


class Encoder:
    """Batched, normalised embeddings of images and texts with one model."""

    def __init__(self, model: torch.nn.Module, transform: Callable, tokenizer: Callable, device: str = "cpu",
                 batch_size: int = 64) -> None:
        self.model, self.transform, self.tokenizer = model.eval().to(device), transform, tokenizer
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        out = [self.model.encode_image(torch.stack([self.transform(im) for im in images[i:i + self.batch_size]])
                                       .to(self.device), normalize=True).float().cpu()
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        out = [encode_text(self.model, self.tokenizer(texts[i:i + self.batch_size]).to(self.device)).float().cpu()
               for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out)


def zero_shot(encoder: Encoder, image_emb: torch.Tensor, labels: list[str], templates: Iterable[str] = DEFAULT_TEMPLATES
              ) -> dict[str, float]:
    """Top-1/top-5 accuracy against one classifier row per class (the mean of its template embeddings)."""
    classes = sorted(set(labels))
    templates = list(templates)
    rows = []
    for name in classes:
        emb = encoder.texts([t.format(name) for t in templates]).mean(0)
        rows.append(emb / emb.norm())
    scores = image_emb @ torch.stack(rows).T
    target = torch.tensor([classes.index(label) for label in labels])
    ranked = scores.topk(min(5, len(classes)), dim=1).indices
    return {
        "zeroshot_top1": float((ranked[:, 0] == target).float().mean()),
        "zeroshot_top5": float((ranked == target[:, None]).any(1).float().mean()),
        "zeroshot_classes": len(classes),
    }


def retrieval(image_emb: torch.Tensor, text_emb: torch.Tensor, prefix: str) -> dict[str, float]:
    """Recall@k for pairs (i, i): image->text (``i2t``) and text->image (``t2i``)."""
    scores = image_emb @ text_emb.T
    truth = torch.arange(len(scores))
    results = {}
    for direction, matrix in (("i2t", scores), ("t2i", scores.T)):
        # rank of the true partner = how many candidates score strictly higher
        rank = (matrix > matrix[truth, truth][:, None]).sum(1)
        for k in RECALL_AT:
            results[f"{prefix}_{direction}_R@{k}"] = float((rank < k).float().mean())
    return results


def hard_negative_accuracy(image_emb: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Fraction of images that score their positive text above their negative text."""
    return float(((image_emb * positive).sum(1) > (image_emb * negative).sum(1)).float().mean())


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over tags (with at least one positive) of average precision, ranking the samples by score."""
    aps = []
    for column in range(targets.shape[1]):
        truth = targets[:, column] > 0
        if not truth.any():
            continue
        order = np.argsort(-scores[:, column], kind="stable")
        hits = truth[order]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float(precision[hits].mean()))
    return float(np.mean(aps)) if aps else float("nan")


def evaluate_shards(encoder: Encoder, urls: list[str], tag_head=None, vocab=None,
                    templates: Iterable[str] = DEFAULT_TEMPLATES) -> dict:
    counter = SkipCounter()
    samples = list(iterate_samples(urls, counter, require=()))
    if not samples:
        raise ValueError(f"no usable samples in {len(urls)} shard(s); skipped: {dict(counter.counts)}")
    image_emb = encoder.images([s.image for s in samples])
    results: dict = {"samples": len(samples), "skipped": dict(counter.counts)}
    results |= retrieval(image_emb, encoder.texts([s.alt for s in samples]), "alt")
    with_desc = [i for i, s in enumerate(samples) if s.desc]
    if with_desc:
        results |= retrieval(image_emb[with_desc], encoder.texts([samples[i].desc for i in with_desc]), "desc")
    pairs = [i for i, s in enumerate(samples) if s.desc and s.neg_desc]
    if pairs:
        results["hardneg_acc_desc"] = hard_negative_accuracy(
            image_emb[pairs], encoder.texts([samples[i].desc for i in pairs]),
            encoder.texts([samples[i].neg_desc for i in pairs]))
    pairs = [i for i, s in enumerate(samples) if s.tags and s.neg_tags]
    if pairs:
        results["hardneg_acc_tags"] = hard_negative_accuracy(
            image_emb[pairs], encoder.texts([", ".join(samples[i].tags) for i in pairs]),
            encoder.texts([", ".join(samples[i].neg_tags) for i in pairs]))
    tagged = [i for i, s in enumerate(samples) if s.tags]
    if tag_head is not None and tagged:
        with torch.no_grad():
            scores = tag_head.eval()(image_emb[tagged]).numpy()
        targets = np.zeros(scores.shape, dtype=np.uint8)
        for row, i in enumerate(tagged):
            targets[row, vocab.encode(samples[i].tags)] = 1
        results["tag_mAP"] = mean_average_precision(scores, targets)
    labelled = [i for i, s in enumerate(samples) if s.label]
    if labelled:
        results |= zero_shot(encoder, image_emb[labelled], [samples[i].label for i in labelled], templates)
    return results


def read_folder(folder: Path) -> tuple[list[Image.Image], list[str]]:
    """Images under ``folder/<class name>/``; the class name is the folder's name with '_' as spaces."""
    images, labels = [], []
    for path in sorted(Path(folder).glob("*/*")):
        if is_image(path):
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
            labels.append(path.parent.name.replace("_", " "))
    if not images:
        raise ValueError(f"no images in {folder}/<class>/: expected one sub-folder per class name")
    return images, labels


def evaluate_folder(encoder: Encoder, folder: Path, templates: Iterable[str] = DEFAULT_TEMPLATES) -> dict:
    images, labels = read_folder(folder)
    return {"samples": len(images)} | zero_shot(encoder, encoder.images(images), labels, templates)


def to_markdown(results: dict, title: str = "Evaluation") -> str:
    lines = [f"### {title}", "", "| metric | value |", "|---|---|"]
    for key, value in results.items():
        if isinstance(value, float):
            lines.append(f"| {key} | {value:.4f} |")
        elif isinstance(value, int):
            lines.append(f"| {key} | {value} |")
        elif isinstance(value, dict) and value:
            lines.append(f"| {key} | {', '.join(f'{k}: {v}' for k, v in sorted(value.items()))} |")
    return "\n".join(lines) + "\n"


def run(*, checkpoint: Path | None = None, model: str | None = None, pretrained: str | None = None,
        shards: list[str] | None = None, folder: Path | None = None, templates_file: Path | None = None,
        out: Path | None = None, device: str = "auto", batch_size: int = 64) -> dict:
    """What `hqclip eval` does: load, evaluate, write ``<out>.json`` and ``<out>.md`` (if ``out``)."""
    from training.checkpoint import load_trained
    from training.hqclip_model import load_bundle

    if (checkpoint is None) == (model is None):
        raise ValueError("give either --checkpoint (an `hqclip train` checkpoint) or --model")
    if (shards is None) == (folder is None):
        raise ValueError("give either --shards or --folder")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    head = vocab = None
    if checkpoint is not None:
        bundle, head, vocab = load_trained(checkpoint)
    else:
        bundle = load_bundle(model, pretrained)
    templates = DEFAULT_TEMPLATES
    if templates_file is not None:
        templates = [t for t in Path(templates_file).read_text().splitlines() if "{}" in t]
        if not templates:
            raise ValueError(f"{templates_file}: no line with a {{}} placeholder for the class name")
    encoder = Encoder(bundle.model, bundle.val_transform, bundle.tokenizer, device, batch_size)
    if shards is not None:
        results = evaluate_shards(encoder, expand_urls(shards), head, vocab, templates)
    else:
        results = evaluate_folder(encoder, folder, templates)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        out.with_suffix(".md").write_text(to_markdown(results, f"Evaluation of {checkpoint or model}"))
    return results
