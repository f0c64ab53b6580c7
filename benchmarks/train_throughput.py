"""Training throughput: the full HQ-CLIP objective vs the plain contrastive loss, same model, same batch.

    python benchmarks/train_throughput.py --model ViT-B-32 --batch-size 32 --steps 3 --rounds 3

Each variant runs the real training step (``training.train.TrainStep``: forward, loss, backward, clipping,
AdamW) on the same random-init model and the same synthetic batch (random pixels, real token ids); variants are
interleaved round by round so machine load hits them alike, and the median round counts. Samples per
CPU-second (process time) is reported too: on a shared machine it measures the compute cost when wall time is
noisy. Target: the full objective at >= 0.9x the plain contrastive samples/s. Prints a markdown table;
``--record`` appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import RESULTS, record
from training.config import DataConfig, LossConfig
from training.data import Sample, TextChoice
from training.hqclip_model import HQCLIPModel, freeze_towers, load_bundle
from training.losses import HQCLIPLoss
from training.tag_head import TagHead
from training.train import TrainStep, param_groups

VARIANTS = {
    "contrastive": LossConfig(lambda_hni=0.0, lambda_stc=0.0),
    "hq-clip": LossConfig(),
    "hq-clip, pairwise HNI": LossConfig(hni_mode="pairwise"),
    "hq-clip, negatives without text grad": LossConfig(negative_text_grad=False),
}


def synthetic_batch(tokenizer, batch_size: int, image_size: int, vocab: int, words: int, mixed: bool) -> dict:
    """Random pixels; captions of ``words`` real words (12: an alt text; 60: a long description that fills
    CLIP's 77 tokens), a negative per caption with its colour and animal swapped; a few tags per sample.
    ``mixed``: the texts the loop draws from VLM-150M-shaped samples instead (training.data.TextChoice at the
    DataConfig defaults): the positive is the ``words``-word description or a 12-word alt text, the negative the
    negative description or four joined negative tags, each drawn per sample."""
    g = torch.Generator().manual_seed(0)
    pool = ["a", "red", "car", "parked", "on", "a", "wet", "street", "next", "to", "a", "small", "dog", "under", "a",
            "blue", "sky", "with", "clouds"]

    def caption(i: int, n: int) -> str:
        return " ".join((pool * (n // len(pool) + 2))[i % 7:][:n])

    descs = [caption(i, words) for i in range(batch_size)]
    neg_descs = [t.replace("red", "green").replace("dog", "cat") for t in descs]
    texts, negatives = descs, neg_descs
    if mixed:
        defaults, rng = DataConfig(), random.Random(0)
        choice = TextChoice(defaults.p_desc, defaults.p_neg_desc)
        samples = [Sample(key=str(i), image=None, alt=caption(i, 12), desc=descs[i], neg_desc=neg_descs[i],
                          neg_tags=["green car", "wet road", "small cat", "grey sky"]) for i in range(batch_size)]
        texts, negatives = map(list, zip(*(choice.draw(sample, rng) for sample in samples)))
    return {
        "images": torch.randn(batch_size, 3, image_size, image_size, generator=g),
        "positive": tokenizer(texts),
        "negative": tokenizer(negatives),
        "tags": (torch.rand(batch_size, vocab, generator=g) < 8 / vocab).to(torch.uint8),
    }


def make_steps(bundle, vocab: int, freeze_text: bool, device: torch.device) -> dict[str, TrainStep]:
    """One TrainStep per variant on the same model. They share one AdamW (a variant without the tag head
    leaves it without gradients, which AdamW skips), so a ViT-B model needs one optimizer state, not four."""
    frozen = freeze_towers(bundle.model, image=False, text=freeze_text)
    embed_dim = bundle.model.encode_text(bundle.tokenizer([""])).shape[-1]
    head = TagHead(embed_dim, vocab).to(device)
    bundle.model.to(device)
    # the loop's precision: bf16 autocast on GPU, fp32 on CPU
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    optimizer = torch.optim.AdamW(param_groups(HQCLIPModel(bundle.model, head), 0.2), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    steps = {}
    for name, cfg in VARIANTS.items():
        module = HQCLIPModel(bundle.model, head if cfg.lambda_stc > 0 else None, cfg.negative_text_grad)
        loss = HQCLIPLoss(cfg.lambda_hni, cfg.lambda_stc, cfg.hni_mode, cfg.stc_reduction)
        steps[name] = TrainStep(module, module, loss, optimizer, scheduler,
                                torch.amp.GradScaler(device.type, enabled=False), autocast, 1.0, frozen, device)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--freeze-text", action="store_true", help="LiT-style: text tower frozen")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    parser.add_argument("--words", type=int, default=12, help="words per caption (12: alt text; 60: fills 77 tokens)")
    parser.add_argument("--mixed", action="store_true",
                        help="texts as the loop draws them: description (--words) or 12-word alt text; negative "
                        "description or joined negative tags, per sample")
    parser.add_argument("--record", nargs="?", const=RESULTS, type=Path, metavar="FILE",
                        help="append the table to benchmarks/RESULTS.md (or FILE)")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    bundle = load_bundle(args.model)
    image_size = bundle.model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    batch = synthetic_batch(bundle.tokenizer, args.batch_size, image_size, args.vocab, args.words, args.mixed)
    steps = make_steps(bundle, args.vocab, args.freeze_text, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():  # warm-up (allocator, AdamW state, kernels)
        step(batch)
    sync()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    cpu_rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(batch)
            sync()
            rates[name].append(args.batch_size * args.steps / (time.perf_counter() - started))
            cpu_rates[name].append(args.batch_size * args.steps / (time.process_time() - cpu_started))
    base = statistics.median(rates["contrastive"])
    cpu_base = statistics.median(cpu_rates["contrastive"])
    lengths = sorted(int(n) for n in torch.cat([batch["positive"], batch["negative"]]).ne(0).sum(1))
    texts = (f"texts drawn per sample (description of {args.words} words or alt text of 12; negative description "
             f"or joined negative tags): {lengths[0]}-{lengths[-1]} tokens" if args.mixed else
             f"captions of {args.words} words ({lengths[-1]} tokens)")
    runs_on = (f"{torch.cuda.get_device_name()}, bf16 autocast" if device.type == "cuda"
               else f"fp32 on {torch.get_num_threads()} CPU threads")
    setup = (f"{args.model} (random init), batch {args.batch_size}, {texts} of {batch['positive'].shape[1]}, "
             f"tag vocabulary {args.vocab}, "
             f"{'text tower frozen, ' if args.freeze_text else ''}"
             f"{runs_on}, "
             f"median of {args.rounds} interleaved rounds x {args.steps} steps")
    lines = [f"Setup: {setup}.", "",
             "| objective | samples/s (median) | rounds | vs contrastive | samples per CPU-second | vs contrastive |",
             "|---|---|---|---|---|---|"]
    for name, values in rates.items():
        median, cpu = statistics.median(values), statistics.median(cpu_rates[name])
        lines.append(f"| {name} | {median:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {median / base:.2f}x "
                     f"| {cpu:.2f} | {cpu / cpu_base:.2f}x |")
    command = " ".join(["python benchmarks/train_throughput.py", *sys.argv[1:]])
    table = f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n" + "\n".join(lines) + "\n"
    print(table)
    if args.record:
        record(table, args.record)


if __name__ == "__main__":
    main()
