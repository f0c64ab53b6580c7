"""The training loop: config, LiT freezing, DDP equivalence, exact resume, and the train/eval commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from hqclip.repo.layout import onnx_path
from hqclip.repo.manifest import load_manifest
from hqclip.repo.tokenizer import load_tokenizer
from testkit.shards import write_shards
from training.checkpoint import load_trained
from training.config import load_config
from training.hqclip_model import HQCLIPModel, freeze_towers, load_bundle
from training.losses import HQCLIPLoss
from training.tag_head import TagHead
from training.text_tower import encode_text, split, trim
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 6


def test_config_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 1e-3, "steps": 50}, "data": {"train_shards": ["a.tar"]}}))
    cfg = load_config(path, ["optim.lr=2e-4", "loss.hni_mode=pairwise", "data.train_shards=[b.tar, c.tar]",
                             "model.freeze_image=true", "optim.grad_clip=null"])
    assert (cfg.optim.lr, cfg.optim.steps, cfg.loss.hni_mode) == (2e-4, 50, "pairwise")
    assert cfg.data.train_shards == ["b.tar", "c.tar"] and cfg.model.freeze_image and cfg.optim.grad_clip is None
    with pytest.raises(ValueError, match="lamda_hni"):
        load_config(None, ["loss.lamda_hni=2"])
    with pytest.raises(ValueError, match=r"section\.field=value"):
        load_config(None, ["optim.lr"])


def test_trimmed_text_tower_gives_open_clip_embeddings(tiny_checkpoint):
    bundle = load_bundle(str(tiny_checkpoint))
    model, tokenizer = bundle.model.eval(), bundle.tokenizer
    long = " ".join(["word"] * 200)  # fills the whole context: nothing to trim
    mixed = ["a cat", long, "", "a long description of " + long, "two red apples"]  # split by length, rows put back
    for texts in (["a cat", "", "two red apples on a wooden table"], ["", ""], ["a cat", long], mixed):
        tokens = tokenizer(texts)
        assert trim(tokens, 0).shape[1] < tokens.shape[1] or any(long in t for t in texts)
        with torch.no_grad():
            torch.testing.assert_close(encode_text(model, tokens), model.encode_text(tokens, normalize=True),
                                       rtol=1e-5, atol=1e-6)
    assert trim(torch.zeros(2, 8, dtype=torch.long), 0).shape == (2, 1)


def test_texts_are_split_by_length_only_when_it_saves_padding():
    assert split([3, 3, 3, 70, 70, 70]) == 3  # alt texts beside long descriptions: 3*3 + 3*70 tokens, not 6*70
    assert split([2, 70]) == 1
    assert split([10, 11, 12, 12]) is None  # similar lengths: one call
    assert split([5, 60, 70, 77]) is None  # one short text among long ones saves under a quarter
    assert split([7]) is None
    assert split([0, 0]) is None  # rows of nothing but padding


def test_frozen_timm_tower_keeps_batch_norm_and_activations(tmp_path):
    """Frozen BN by eval mode: running stats stay, outputs equal the tower in eval mode, ReLU6 kept."""
    from testkit.tiny import write_tiny_checkpoint

    bundle = load_bundle(str(write_tiny_checkpoint(tmp_path, image_tower="timm")))
    model = bundle.model
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        before = model.encode_image(images)
    stats = {k: v.clone() for k, v in model.visual.state_dict().items() if "running" in k}
    frozen = freeze_towers(model, image=True, text=False)
    model.train()
    for m in frozen:
        m.eval()
    out = model.encode_image(images)
    out.sum().backward()
    assert torch.allclose(out, before, atol=1e-6)
    assert all(torch.equal(v, model.visual.state_dict()[k]) for k, v in stats.items())
    assert model.visual.trunk.conv_stem.weight.grad is None
    assert model.visual.head.proj.weight.grad is not None
    assert any(isinstance(m, torch.nn.ReLU6) for m in model.visual.modules())


def _global_batch(tokenizer):
    g = torch.Generator().manual_seed(5)
    images = torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=g)
    words = ["cat", "dog", "rocket", "coffee", "galaxy", "coin"]
    positive = tokenizer([f"a photo of a {w}" for w in words])
    negative = tokenizer([f"a photo of a {w}" for w in reversed(words)])
    tags = (torch.rand(GLOBAL_BATCH, 5, generator=g) > 0.5).to(torch.uint8)
    return images, positive, negative, tags


def _step(model, loss_fn, images, positive, negative, tags):
    out = model(images, positive, negative)
    terms = loss_fn(out["image"], out["text"], out["logit_scale"], out["negative"], out["tag_logits"], tags)
    terms["loss"].backward()
    return terms


def _model(checkpoint: str):
    torch.manual_seed(0)
    bundle = load_bundle(checkpoint)
    return HQCLIPModel(bundle.model, TagHead(64, 5)), bundle.tokenizer


def _ddp_worker(rank: int, world: int, checkpoint: str, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model, tokenizer = _model(checkpoint)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    batch = [t[part] for t in _global_batch(tokenizer)]
    terms = _step(ddp, HQCLIPLoss(1.0, 0.5), *batch)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"terms": {k: float(v.detach()) for k, v in terms.items()}, "grads": grads}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tiny_checkpoint, tmp_path):
    mp.start_processes(_ddp_worker, args=(2, str(tiny_checkpoint), str(tmp_path / "store"), str(tmp_path)),
                       nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, tokenizer = _model(str(tiny_checkpoint))
    single = _step(model, HQCLIPLoss(1.0, 0.5), *_global_batch(tokenizer))
    for rank in ranks:  # contrastive and HNI use the gathered global batch: the same on every rank
        assert rank["terms"]["contrastive"] == pytest.approx(single["contrastive"].item(), rel=1e-5)
        assert rank["terms"]["hni"] == pytest.approx(single["hni"].item(), rel=1e-5)
    # STC is per sample: the ranks' mean is the global mean, and so is the total
    assert sum(r["terms"]["stc"] for r in ranks) / 2 == pytest.approx(single["stc"].item(), rel=1e-5)
    assert sum(r["terms"]["loss"] for r in ranks) / 2 == pytest.approx(single["loss"].item(), rel=1e-5)
    # after DDP's all-reduce every rank holds the single-process gradient
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ranks[0]["grads"]) and len(grads) > 10
    for name, grad in grads.items():
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("train-shards"), shards=2, per_shard=12)


@pytest.fixture(scope="module")
def dropout_checkpoint(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny model with patch dropout, so the loss depends on the torch RNG state too."""
    folder = tmp_path_factory.mktemp("tiny-dropout")
    config = json.loads((tiny_checkpoint / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["patch_dropout"] = 0.5
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def _config(checkpoint, shards, out, *extra):
    return load_config(None, [
        f"model.name={checkpoint}", f"data.train_shards={json.dumps(shards)}", "data.batch_size=4",
        "data.workers=2", "data.shuffle_buffer=6", "optim.steps=8", "optim.warmup_steps=2", "optim.lr=1e-3",
        f"run.output_dir={out}", "run.log_every=1", "run.checkpoint_every=3", "run.progress=false", *extra])


def _losses(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k in ("step", "loss", "contrastive", "hni", "stc", "lr")} for m in lines]


@pytest.mark.slow
def test_interrupted_and_resumed_run_logs_the_same_losses(dropout_checkpoint, shards, tmp_path):
    straight = tmp_path / "straight"
    train(_config(dropout_checkpoint, shards, straight))
    # 8 steps > 24 samples / batch 4: the data stream goes into a second epoch
    interrupted = tmp_path / "interrupted"
    train(_config(dropout_checkpoint, shards, interrupted, "run.stop_at_step=5"))
    assert sorted(p.name for p in interrupted.glob("checkpoint-*.pt")) == [
        "checkpoint-000000003.pt", "checkpoint-000000005.pt"]
    # as if killed after step 5, before its checkpoint: resume from step 3, where the worker round-robin
    # is mid-cycle (3 batches from 2 workers), and steps 4-5 are recomputed
    (interrupted / "checkpoint-000000005.pt").unlink()
    train(_config(dropout_checkpoint, shards, interrupted))
    expected = _losses(straight)
    assert [m["step"] for m in expected] == list(range(1, 9))
    assert _losses(interrupted) == expected
    assert len({m["loss"] for m in expected}) == 8
    # the checkpoint holds what export and evaluation need
    payload = torch.load(sorted(interrupted.glob("checkpoint-*.pt"))[-1], weights_only=False)
    assert payload["step"] == 8 and len(payload["ranks"]) == 1
    assert payload["tag_head"]["linear.weight"].shape == (len(payload["vocab"]["tags"]), 64)
    # without the dropout the RNG would not matter; check it does: a different seed changes the losses
    other = tmp_path / "other-seed"
    train(_config(dropout_checkpoint, shards, other, "run.seed=1", "optim.steps=2"))
    assert _losses(other)[0]["loss"] != expected[0]["loss"]


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.slow
def test_torchrun_train_then_eval_commands(tiny_checkpoint, shards, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_checkpoint)},
        "data": {"train_shards": shards, "batch_size": 3, "workers": 1, "shuffle_buffer": 4},
        "optim": {"steps": 3, "warmup_steps": 1},
        "run": {"output_dir": str(out), "log_every": 1, "checkpoint_every": 2, "progress": False},
    }))
    hqclip = str(Path(sys.executable).with_name("hqclip"))
    result = _run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  hqclip, "train", "--config", str(config), "loss.hni_mode=pairwise")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {"contrastive", "hni", "stc", "loss", "samples_per_s"} <= set(metrics[-1])
    checkpoint = sorted(out.glob("checkpoint-*.pt"))[-1]
    payload = torch.load(checkpoint, weights_only=False)
    assert len(payload["ranks"]) == 2 and payload["config"]["loss"]["hni_mode"] == "pairwise"

    result = _run(hqclip, "eval", "--checkpoint", str(checkpoint), "--shards", shards[0], "--out",
                  str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["samples"] == 12
    for key in ("alt_i2t_R@1", "desc_t2i_R@10", "hardneg_acc_desc", "hardneg_acc_tags", "tag_mAP",
                "zeroshot_top1"):
        assert 0.0 <= results[key] <= 1.0, key
    assert "| tag_mAP |" in (tmp_path / "eval.md").read_text() and "| tag_mAP |" in result.stdout

    # train -> export: the checkpoint's weights, tag head and vocabulary reach the model repository
    result = _run(hqclip, "export", str(checkpoint), "--out", str(tmp_path / "repo"), "--name", "trained")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = load_manifest(tmp_path / "repo", "trained", verify=True)
    bundle, _head, vocab = load_trained(checkpoint)
    assert manifest.tags is not None and manifest.tags.vocabulary == vocab.tags
    assert manifest.weights.startswith(f"hqclip train checkpoint {checkpoint.name}")
    texts = ["a photo of a cat", "an astronaut"]
    ids, _ = load_tokenizer(manifest.text.tokenizer, tmp_path / "repo")(texts)
    session = onnxruntime.InferenceSession(str(onnx_path(tmp_path / "repo", "trained_text")))
    exported = session.run(None, {manifest.text.input: ids})[0]
    with torch.no_grad():
        trained = torch.nn.functional.normalize(bundle.model.encode_text(bundle.tokenizer(texts)), dim=-1).numpy()
    assert (exported * trained).sum(1).min() >= 0.9999


def test_eval_on_a_folder_of_labelled_images(tiny_checkpoint, tmp_path):
    from testkit.photos import photo
    from training.evaluate import run

    for name in ("astronaut", "coffee", "chelsea"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        photo(name).resize((80, 80)).save(tmp_path / "photos" / name / "1.png")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\nno placeholder here\n")
    results = run(model=str(tiny_checkpoint), folder=tmp_path / "photos", templates_file=tmp_path / "templates.txt",
                  out=tmp_path / "eval")
    assert results["samples"] == 3 and results["zeroshot_classes"] == 3
    assert results["zeroshot_top5"] == 1.0  # 3 classes: the right one is always in the top 5
    assert json.loads((tmp_path / "eval.json").read_text()) == results
    with pytest.raises(ValueError, match="either --shards or --folder"):
        run(model=str(tiny_checkpoint))


@pytest.mark.slow
def test_a_run_started_from_a_checkpoint_keeps_its_weights_tags_and_architecture(tiny_checkpoint, shards, tmp_path):
    """model.init_from (what `hqclip loop` trains the served model's checkpoint on new data with): the first step
    starts from its weights, tag head and vocabulary, and the run's checkpoints name its architecture."""
    base = tmp_path / "base"
    train(_config(tiny_checkpoint, shards, base, "optim.steps=2", "data.workers=0"))
    started = tmp_path / "started"
    train(_config("ViT-B-32", shards[:1], started, "optim.steps=1", "data.workers=0", "optim.lr=1e-12",
                  "optim.weight_decay=0", f"model.init_from={base / 'checkpoint-000000002.pt'}"))
    before = torch.load(base / "checkpoint-000000002.pt", weights_only=False)
    after = torch.load(started / "checkpoint-000000001.pt", weights_only=False)
    assert after["config"]["model"]["name"] == str(tiny_checkpoint) and after["vocab"] == before["vocab"]
    for part in ("model", "tag_head"):
        for name, tensor in before[part].items():
            torch.testing.assert_close(after[part][name], tensor, rtol=0, atol=1e-6, msg=name)
