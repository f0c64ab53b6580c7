"""`hqclip train`: the HQ-CLIP training loop, single process or ``torchrun`` data parallel.

    hqclip train --config run.yaml optim.lr=1e-4 data.batch_size=64
    torchrun --nproc_per_node 8 -m training.train --config run.yaml

AdamW with warmup + cosine, gradient clipping, bf16 autocast on GPU, LiT-style tower freezing, DDP (gloo on
CPU, nccl on GPU). Checkpoints are written atomically (last N kept) and hold everything an exact resume needs:
model, tag head, vocabulary, optimizer, scheduler, scaler, every rank's RNG states and data position. A run
stopped and resumed logs the same losses as one that never stopped. Metrics go to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from training.checkpoint import CHECKPOINT_FORMAT, latest_checkpoint, load_trained, save_checkpoint
from training.config import TrainConfig, dump_config, load_config
from training.data import SkipCounter, StreamState, TextChoice, TrainStream, expand_urls, iterate_tags, train_loader
from training.hqclip_model import HQCLIPModel, ModelBundle, freeze_towers, load_bundle
from training.losses import HQCLIPLoss
from training.tag_head import TagHead
from training.vocab import Vocabulary, build_vocabulary

# --- distributed, RNG, schedule ------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """torchrun's environment -> a process group (nccl on GPU, gloo on CPU); a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    env = Dist(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return env


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(warmup: int, total: int, floor: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine down to ``floor`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or any(k in name for k in ("bn", "ln", "bias", "logit_scale", "norm"))
        (no_decay if exclude else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


@dataclass
class TrainStep:
    """One optimisation step: forward under autocast, the HQ-CLIP loss, backward, clipping, AdamW, schedule."""

    model: nn.Module  # the HQCLIPModel, DDP-wrapped when distributed
    module: HQCLIPModel
    loss_fn: HQCLIPLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: object
    grad_clip: float | None
    frozen: list[nn.Module]
    device: torch.device
    lr: float = 0.0  # the learning rate the last step used

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        self.module.train()
        for m in self.frozen:
            m.eval()
        to = self.device
        negative = batch["negative"].to(to, non_blocking=True) if self.loss_fn.lambda_hni > 0 else None
        tags = batch["tags"].to(to, non_blocking=True) if self.module.tag_head is not None else None
        with self.autocast:
            out = self.model(batch["images"].to(to, non_blocking=True), batch["positive"].to(to, non_blocking=True),
                             negative)
            terms = self.loss_fn(out["image"], out["text"], out["logit_scale"], out["negative"], out["tag_logits"],
                                 tags)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], self.grad_clip)
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        with torch.no_grad():
            self.module.clip.logit_scale.clamp_(0, math.log(100))
        return terms | {"logit_scale": out["logit_scale"].detach()}


# --- the loop -------------------------------------------------------------------------------------------------


def _vocabulary(cfg: TrainConfig, urls: list[str], env: Dist) -> Vocabulary:
    """The configured vocabulary file, or the top tags of the training shards (counted on rank 0, broadcast)."""
    if cfg.data.vocab_path is not None:
        return Vocabulary.load(cfg.data.vocab_path)
    built = [None]
    if env.main:
        tags = iterate_tags(urls, SkipCounter(), cfg.data.vocab_max_samples)
        built = [build_vocabulary(tags, cfg.data.vocab_size, cfg.data.vocab_min_count).to_dict()]
    if env.world_size > 1:
        dist.broadcast_object_list(built, src=0)
    vocab = Vocabulary.from_dict(built[0])
    if not vocab.tags:
        raise ValueError(f"no tags found in {len(urls)} shard(s): the samples need a `tags` list in their JSON")
    return vocab


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.run.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.run.device)


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return nullcontext(), precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), precision


def train(cfg: TrainConfig, bundle: ModelBundle | None = None) -> dict:
    """Run (or resume) training; return the last logged metrics. ``bundle`` overrides ``cfg.model.name``."""
    device = _device(cfg)
    env = init_distributed(device.type)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env.local_rank)
    out = cfg.run.output_dir
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
    if env.world_size > 1:
        dist.barrier()
    urls = expand_urls(cfg.data.train_shards)

    resume = _resume_path(cfg)
    payload = torch.load(resume, map_location="cpu", weights_only=False) if resume is not None else None

    seed_everything(cfg.run.seed)
    start_head = start_vocab = None
    if cfg.model.init_from is not None and bundle is None:
        bundle, start_head, start_vocab = load_trained(cfg.model.init_from)
        start = torch.load(cfg.model.init_from, map_location="cpu", weights_only=False, mmap=True)["config"]["model"]
        # its architecture goes into this run's checkpoints, which evaluation and export load
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": start["name"],
                                                                           "pretrained": start["pretrained"]})})
    bundle = bundle or load_bundle(cfg.model.name, cfg.model.pretrained)
    clip = bundle.model
    frozen = freeze_towers(clip, cfg.model.freeze_image, cfg.model.freeze_text, cfg.model.train_projections)
    vocab = None
    if cfg.loss.lambda_stc > 0:
        vocab = (Vocabulary.from_dict(payload["vocab"]) if payload else start_vocab
                 or _vocabulary(cfg, urls, env))
    with torch.no_grad():
        embed_dim = clip.encode_text(bundle.tokenizer([""])).shape[-1]
    head = TagHead(embed_dim, len(vocab), vocab.frequencies()) if vocab is not None else None
    if head is not None and start_head is not None:  # the tags it was trained on, carried over
        head.load_state_dict(start_head.state_dict())
    module = HQCLIPModel(clip, head, cfg.loss.negative_text_grad).to(device)
    loss_fn = HQCLIPLoss(cfg.loss.lambda_hni, cfg.loss.lambda_stc, cfg.loss.hni_mode, cfg.loss.stc_reduction,
                         cfg.loss.gather_with_grad)
    optimizer = torch.optim.AdamW(param_groups(module, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.optim.warmup_steps, cfg.optim.steps, cfg.optim.min_lr_ratio))
    autocast, precision = _autocast(device, cfg.run.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    step, data_state = 0, StreamState(cfg.data.workers)
    if payload is not None:
        ranks = payload["ranks"]
        if len(ranks) != env.world_size or ranks[0]["data"]["workers"] != cfg.data.workers:
            raise ValueError(f"{resume} was written by {len(ranks)} process(es) x {ranks[0]['data']['workers']} "
                             f"data workers; resume with the same torchrun --nproc_per_node and data.workers")
        module.clip.load_state_dict(payload["model"])
        if head is not None:
            head.load_state_dict(payload["tag_head"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        scaler.load_state_dict(payload["scaler"])
        step = payload["step"]
        set_rng_state(ranks[env.rank]["rng"])
        data_state = StreamState(**ranks[env.rank]["data"])
        _truncate_metrics(out / "metrics.jsonl", step, env)
        del payload
    else:
        seed_everything(cfg.run.seed + env.rank)
    if env.main:
        (out / "config.yaml").write_text(dump_config(cfg))
        if vocab is not None:
            vocab.save(out / "vocab.json")

    ddp = module
    if env.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    stream = TrainStream(
        urls, bundle.train_transform if cfg.data.augment else bundle.val_transform, bundle.tokenizer,
        vocab or Vocabulary([]), cfg.data.batch_size, seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer,
        choice=TextChoice(cfg.data.p_desc, cfg.data.p_neg_desc), rank=env.rank, world_size=env.world_size,
        state=data_state)
    loader = iter(train_loader(stream, cfg.data.workers))
    step_fn = TrainStep(ddp, module, loss_fn, optimizer, scheduler, scaler, autocast, cfg.optim.grad_clip, frozen,
                        device)
    last_step = min(cfg.optim.steps, cfg.run.stop_at_step or cfg.optim.steps)
    metrics: dict = {}
    progress = _progress(env.main and cfg.run.progress, step, cfg.optim.steps)
    started, samples = time.perf_counter(), 0

    while step < last_step:
        batch = next(loader)
        data_state.update(batch)
        terms = step_fn(batch)
        step += 1
        samples += len(batch["images"]) * env.world_size
        progress.update(1)

        if step % cfg.run.log_every == 0 or step == last_step:
            metrics = _log(out, step, terms, step_fn.lr, data_state, env, samples / (time.perf_counter() - started))
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        if step % cfg.run.checkpoint_every == 0 or step == last_step:
            _checkpoint(cfg, step, module, vocab, optimizer, scheduler, scaler, data_state, metrics, env)
    progress.close()
    if env.world_size > 1:
        dist.barrier()
    return metrics


def _resume_path(cfg: TrainConfig) -> Path | None:
    if cfg.run.resume in (None, "", "none"):
        return None
    if cfg.run.resume == "auto":
        return latest_checkpoint(cfg.run.output_dir)
    path = Path(cfg.run.resume)
    if not path.is_file():
        raise FileNotFoundError(f"run.resume={path} does not exist: give a checkpoint-*.pt, 'auto' or null")
    return path


def _truncate_metrics(path: Path, step: int, env: Dist) -> None:
    """Drop metric lines past the checkpoint we resume from (they are about to be recomputed)."""
    if env.main and path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def _progress(enabled: bool, initial: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


def _log(out: Path, step: int, terms: dict, lr: float, data_state: StreamState, env: Dist, throughput: float) -> dict:
    """Average the loss terms over ranks and append one JSON line (rank 0)."""
    names = sorted(terms)  # the loss terms and the logit scale
    values = torch.stack([terms[n].detach().float() for n in names])
    if env.world_size > 1:
        dist.all_reduce(values)
        values /= env.world_size
    metrics = {"step": step, **{n: float(v) for n, v in zip(names, values.cpu())}}
    skipped = [data_state.skip_counts()]
    if env.world_size > 1:
        skipped = [None] * env.world_size
        dist.all_gather_object(skipped, data_state.skip_counts())
    metrics |= {"lr": lr, "samples_per_s": throughput, "skipped": dict(sum(map(Counter, skipped), Counter()))}
    if env.main:
        with open(out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
    return metrics


def _checkpoint(cfg, step, module, vocab, optimizer, scheduler, scaler, data_state, metrics, env) -> None:
    ranks = [{"rng": rng_state(), "data": data_state.to_dict()}]
    if env.world_size > 1:
        ranks = [None] * env.world_size
        dist.all_gather_object(ranks, {"rng": rng_state(), "data": data_state.to_dict()})
    if env.main:
        save_checkpoint(cfg.run.output_dir, step, {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "config": cfg.model_dump(mode="json"),
            "model": module.clip.state_dict(),
            "tag_head": module.tag_head.state_dict() if module.tag_head is not None else None,
            "vocab": vocab.to_dict() if vocab is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "ranks": ranks,
            "metrics": metrics,
        }, cfg.run.keep_checkpoints)
    if env.world_size > 1:
        dist.barrier()


def main(argv: list[str] | None = None) -> None:
    """``python -m training.train [--config FILE] [section.field=value ...]`` (what torchrun runs)."""
    import argparse

    parser = argparse.ArgumentParser(prog="hqclip train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None, help="YAML config (see training/configs/).")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    metrics = train(load_config(args.config, args.overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics), file=sys.stdout)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
