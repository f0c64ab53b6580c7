"""The offline demo model: the mapped ImageNet weights, frozen towers, the rule annotator, the data, the export.

Needs the Debian packages tuxpaint-stamps-default and fonts-noto-color-emoji (`make apt`) and the two wheels.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hqclip.repo.layout import onnx_path
from testkit.photos import photo
from testkit.vectors import cosines
from training.demo.annotate import COLOURS, STYLES, Item, RuleAnnotator, dominant_colour, parse_subject

CAT_CLASSES = {"tabby cat", "tiger cat", "Persian cat", "Siamese cat", "Egyptian Mau"}
COFFEE_CLASSES = {"espresso", "cup", "coffee mug"}


def _pixels(image: Image.Image, size: int = 224) -> torch.Tensor:
    """Shortest side to ``size``, centre crop, [-1, 1] (the wheel's normalisation), NCHW float."""
    scale = size / min(image.size)
    image = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                        Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    array = np.array(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    return (torch.from_numpy(array).permute(2, 0, 1)[None] - 0.5) / 0.5


# --- the mapped EfficientNet weights --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier():
    from training.demo.model import imagenet_classifier

    return imagenet_classifier()


@pytest.mark.parametrize("name, expected", [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)])
def test_mapped_efficientnet_names_real_photos(classifier, name, expected):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    with torch.no_grad():
        probabilities = classifier(_pixels(photo(name))).softmax(-1)[0]
    top5 = [IMAGENET_CLASSNAMES[i] for i in probabilities.topk(5).indices]
    assert top5[0] in expected, top5
    assert float(probabilities.topk(5).values.sum()) > 0.5


def test_plain_efficientnet_lite0_is_not_the_same_network(classifier):
    """Why the tf_ variant: the same keys load into timm's efficientnet_lite0, which computes something else."""
    import timm

    from training.demo.model import efficientnet_lite0_state_dict

    plain = timm.create_model("efficientnet_lite0", pretrained=False)
    plain.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    pixels = _pixels(photo("chelsea"))
    with torch.no_grad():
        ours, theirs = classifier(pixels).softmax(-1), plain.eval()(pixels).softmax(-1)
    assert (ours - theirs).abs().max() > 0.01


# --- the assembled open_clip model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model():
    from training.demo.model import build_demo_model

    return build_demo_model()


def test_towers_stay_frozen_in_train_mode(demo_model, classifier):
    """train() must not put batch norm back into batch statistics, and every ReLU6 must survive."""
    bn = demo_model.visual.trunk.bn1
    before = bn.running_mean.clone()
    demo_model.train()
    pixels = torch.cat([_pixels(photo("chelsea")), _pixels(photo("coffee"))])
    with torch.no_grad():
        demo_model.encode_image(pixels)
        store = {}
        hook = demo_model.visual.head.register_forward_hook(lambda m, args, out: store.setdefault("x", args[0]))
        demo_model.encode_image(pixels)
        hook.remove()
        reference = classifier.forward_head(classifier.forward_features(pixels), pre_logits=True)
    assert torch.equal(bn.running_mean, before)
    torch.testing.assert_close(store["x"], reference, rtol=1e-4, atol=1e-4)
    trainable = {n for n, p in demo_model.named_parameters() if p.requires_grad}
    assert trainable == {"visual.head.proj.weight", "text.proj.weight", "logit_scale"}


def test_text_tower_is_minilm_mean_pooled(demo_model):
    """The HF tower's pooled output equals sentence-transformers' recipe (mean over real tokens)."""
    from transformers import AutoModel, AutoTokenizer

    from training.demo.model import minilm_path, tokenizer

    texts = ["A yak.", "two red   apples &amp; a pear"]
    store = {}
    hook = demo_model.text.proj.register_forward_hook(lambda m, args, out: store.setdefault("x", args[0]))
    with torch.no_grad():
        demo_model.encode_text(tokenizer()(texts))
    hook.remove()
    hf_tok, bert = AutoTokenizer.from_pretrained(minilm_path()), AutoModel.from_pretrained(minilm_path()).eval()
    batch = hf_tok(["A yak.", "two red apples & a pear"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(store["x"], (hidden * mask).sum(1) / mask.sum(1), rtol=1e-4, atol=1e-4)


def test_trimmed_text_tower_gives_the_same_embeddings(demo_model):
    from training.demo.model import tokenizer
    from training.text_tower import encode_text

    long = "a photo of " + "two red apples & a pear on a wooden table, " * 8  # long and short: encoded apart
    tokens = tokenizer()(["A yak.", long, "two red apples & a pear on a wooden table", "", long + " at dusk"])
    with torch.no_grad():
        torch.testing.assert_close(encode_text(demo_model, tokens), demo_model.encode_text(tokens, normalize=True),
                                   rtol=1e-5, atol=1e-6)


# --- the rule annotator --------------------------------------------------------------------------------------


def _items() -> list[Item]:
    rows = [
        ("a-yak", "A yak.", "yak", ("animal", "mammal", "bovine"), "mammal", "brown"),
        ("a-lemon", "A lemon.", "lemon", ("food", "fruit"), "fruit", "yellow"),
        ("two-flowers", "Two flowers.", "flower2", ("plant", "flower"), "flower", "pink"),
        ("a-bus", "A school bus.", "bus", ("vehicle",), "vehicle", "yellow"),
        ("spider", "A spider playing soccer.", "spider-football", ("animal", "insect"), "insect", "black"),
        ("tanker", "Tankers carry bulk liquids.", "tanker", ("vehicle", "locomotive"), "vehicle", "gray"),
        ("robin", "A robin.", "robin", ("animal", "bird"), "bird", "red"),
        ("face", "Grinning face.", "Grinning face.", ("emoji",), None, "yellow"),
        ("cow", "Cow.", "Cow.", ("emoji",), None, "white"),
    ]
    items = [Item(key, caption, name, category, label, STYLES[1] if label is None else STYLES[0], colour)
             for key, caption, name, category, label, colour in rows]
    # more keys, so every kind of edit shows up
    items += [Item(f"yak-{i}", "A yak.", "yak", ("animal", "mammal"), "mammal", STYLES[0], "brown") for i in range(30)]
    return items


def test_subjects_from_captions():
    assert parse_subject("A sitting gnu.", "gnu-sitting") == parse_subject("a sitting gnu", "x")
    assert parse_subject("A sitting gnu.", "gnu-sitting").noun == "gnu"
    assert parse_subject("Two flowers.", "f").count == 2
    assert parse_subject("Two flowers.", "f").spoken() == "two flowers"
    assert parse_subject("A spider playing soccer.", "s").noun == "spider"
    assert parse_subject("Tankers carry bulk liquids.", "tanker").phrase == "tanker"
    assert parse_subject("An apple.", "a").spoken() == "an apple"
    assert parse_subject("A yak.", "y").recounted().spoken() == "two yaks"
    assert parse_subject("A spider playing soccer.", "s").recounted().spoken() == "two spiders playing soccer"


def test_annotations_have_aligned_distinct_negatives():
    items = _items()
    annotate = RuleAnnotator(items)
    kinds = set()
    for item in items:
        fields = annotate(item)
        desc, neg_desc, tags, neg_tags = fields["desc"], fields["neg_desc"], fields["tags"], fields["neg_tags"]
        assert len(desc) == len(neg_desc) and len(tags) == len(neg_tags) and tags
        changed = [i for i, (p, n) in enumerate(zip(desc, neg_desc)) if p != n]
        assert changed, f"{item.key}: the negative description equals the positive one"
        subject = parse_subject(item.caption, item.name)
        kinds.add("colour" if changed == [1] else "count" if neg_desc[0] == subject.recounted().spoken() else "object")
        assert all(n != p and n not in tags for p, n in zip(tags, neg_tags)), (tags, neg_tags)
        assert item.colour in tags and item.colour in desc[1]
        assert set(item.category) <= set(tags)
        if item.label:
            assert f"a kind of {item.label}" in desc
        # deterministic per key
        assert annotate(item) == fields
    assert kinds == {"colour", "count", "object"}


def test_object_swaps_take_another_object_and_class():
    items = _items()
    annotate = RuleAnnotator(items)
    swapped = 0
    for item in items:
        fields = annotate(item)
        subject = parse_subject(item.caption, item.name)
        if fields["neg_desc"][0] in (subject.spoken(), subject.recounted().spoken()):
            continue
        swapped += 1
        assert not set(subject.phrase.split()) & set(fields["neg_desc"][0].split()[1:])
        if item.label:
            assert fields["neg_desc"][2] != fields["desc"][2]
    assert swapped


def test_dominant_colour_reads_opaque_pixels():
    image = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    image.paste((30, 160, 40, 255), (30, 30, 70, 70))  # a green square on transparency
    assert dominant_colour(image) == "green"
    assert dominant_colour(Image.new("RGB", (10, 10), (220, 20, 30))) == "red"
    assert set(COLOURS) >= {dominant_colour(photo(n)) for n in ("chelsea", "coffee")}


# --- the data ------------------------------------------------------------------------------------------------


def test_sources_and_samples_in_the_training_format():
    from training.data import decode_sample
    from training.demo.data import SIZE, annotated_samples, emoji_sources, is_heldout, stamp_sources

    stamps, emoji = stamp_sources(), emoji_sources()
    assert len(stamps) > 700 and len(emoji) > 1000
    assert len({s.key for s in stamps + emoji}) == len(stamps) + len(emoji)
    chosen = [s for s in stamps if s.name in ("animals/mammals/bovines/yak", "food/fruit/lemon")] + emoji[:3]
    assert len(chosen) == 5
    for source, image, meta in annotated_samples(chosen):
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG")
        sample = decode_sample({"__key__": source.key, "jpg": buffer.getvalue(), "json": json.dumps(meta).encode()})
        assert sample.alt == source.caption and sample.desc and sample.neg_desc != sample.desc
    assert meta["source"] == "fonts-noto-color-emoji"
    # everything sharing a caption falls on the same side of the split
    letters = [s for s in stamps if s.caption == "The letter C."]
    assert len(letters) > 1 and len({is_heldout(s.caption) for s in letters}) == 1


# --- training on cached tower outputs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_shard(tmp_path_factory) -> Path:
    """Five annotated Tux Paint stamps as a webdataset shard in the training job's format."""
    import webdataset as wds

    from training.demo.data import annotated_samples, stamp_sources

    shard = tmp_path_factory.mktemp("demo-shard") / "train-000000.tar"
    with wds.TarWriter(str(shard)) as writer:
        for source, image, meta in annotated_samples(stamp_sources()[::150][:5]):
            writer.write({"__key__": source.key, "jpg": image, "json": meta})
    return shard


def test_cached_features_hold_every_row_to_a_direct_encode(demo_model, classifier, small_shard):
    """encode_features keeps each text's own pooled features, in order, though the text tower runs the batch in two
    parts (short and long texts apart); each image's row is the ImageNet network's pooled features."""
    from open_clip.transform import image_transform

    from training.data import SkipCounter, iterate_samples
    from training.demo.cached import encode_features
    from training.demo.model import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, tokenizer
    from training.text_tower import split

    transform, tok = image_transform(IMAGE_SIZE, is_train=False, mean=IMAGE_MEAN, std=IMAGE_STD), tokenizer()
    long = ["a photo of " + "two red apples & a pear on a wooden table, " * 6 + "at dusk", "A yak."]
    features = encode_features(demo_model, transform, tok, [str(small_shard)], extra_texts=long, progress=False)
    pad = demo_model.text.config.pad_token_id
    lengths = sorted(int((ids != pad).sum()) for ids in tok(features.texts))
    assert split(lengths) is not None  # the batch does run in two parts
    assert len(features.text) == len(features.texts) == len(set(features.texts))
    with torch.no_grad():
        for row, text in zip(features.text, features.texts):
            ids = tok([text])
            mask = (ids != pad).long()
            direct = demo_model.text.pooler(demo_model.text.transformer(input_ids=ids, attention_mask=mask), mask)
            torch.testing.assert_close(row, direct[0], rtol=1e-4, atol=1e-5, msg=text)
        samples = list(iterate_samples([str(small_shard)], SkipCounter()))
        pixels = torch.stack([transform(s.image) for s in samples])
        reference = classifier.forward_head(classifier.forward_features(pixels), pre_logits=True)
    torch.testing.assert_close(features.image, reference, rtol=1e-4, atol=1e-4)
    for name, rows in features.index.items():  # every sample's field points at its own text
        expected = [getattr(s, name) if name in ("alt", "desc", "neg_desc") else ", ".join(getattr(s, name) or ())
                    for s in samples]
        assert [features.texts[i] for i in rows] == expected


def test_cached_step_equals_the_training_loop_step(demo_model, small_shard):
    """training/demo/cached.py: loss terms and projection gradients equal training/train.py's on the full model."""
    from open_clip.transform import image_transform

    from training.data import SkipCounter, iterate_samples
    from training.demo.cached import Heads, encode_features, multi_hot
    from training.demo.model import EMBED_DIM, IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, tokenizer
    from training.hqclip_model import HQCLIPModel
    from training.losses import HQCLIPLoss
    from training.vocab import build_vocabulary

    transform, tok = image_transform(IMAGE_SIZE, is_train=False, mean=IMAGE_MEAN, std=IMAGE_STD), tokenizer()
    features = encode_features(demo_model, transform, tok, [str(small_shard)], progress=False)
    samples = list(iterate_samples([str(small_shard)], SkipCounter()))
    assert features.keys == [s.key for s in samples] and len(samples) == 5
    vocab = build_vocabulary(features.tags, 64)
    targets = multi_hot(features.tags, vocab)
    torch.manual_seed(0)
    heads = Heads(features.image.shape[1], features.text.shape[1], EMBED_DIM, vocab)
    demo_model.load_state_dict(heads.clip_state_dict(), strict=False)
    loss_fn = HQCLIPLoss(lambda_hni=1.0, lambda_stc=0.1)

    loop = HQCLIPModel(demo_model, heads.tag_head)
    loop.train()
    out = loop(torch.stack([transform(s.image) for s in samples]), tok([s.desc for s in samples]),
               tok([", ".join(s.neg_tags) for s in samples]))
    want = loss_fn(out["image"], out["text"], out["logit_scale"], out["negative"], out["tag_logits"], targets)

    image = heads.embed_images(features.image)
    got = loss_fn(image, heads.embed_texts(features.text[features.index["desc"]]), heads.logit_scale.exp(),
                  heads.embed_texts(features.text[features.index["neg_tags"]]), heads.tag_head(image), targets)
    assert set(got) == {"contrastive", "hni", "stc", "loss"}
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    want_grads = torch.autograd.grad(want["loss"], [demo_model.visual.head.proj.weight, demo_model.text.proj.weight])
    got_grads = torch.autograd.grad(got["loss"], [heads.image_proj.weight, heads.text_proj.weight])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_train_heads_learns_and_is_seeded(demo_model, small_shard):
    from open_clip.transform import image_transform

    from training.demo.build import demo_config
    from training.demo.cached import encode_features, train_heads
    from training.demo.model import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, tokenizer

    features = encode_features(demo_model, image_transform(IMAGE_SIZE, is_train=False, mean=IMAGE_MEAN,
                                                           std=IMAGE_STD), tokenizer(), [str(small_shard)],
                               progress=False)
    cfg = demo_config(["optim.steps=60", "optim.warmup_steps=5", "run.log_every=1", "data.vocab_min_count=1"])
    heads, vocab, log = train_heads(features, cfg, 32, progress=False)
    again, _, log_again = train_heads(features, cfg, 32, progress=False)
    assert log == log_again and torch.equal(heads.image_proj.weight, again.image_proj.weight)
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert vocab is not None and len(heads.tag_head.linear.bias) == len(vocab)


# --- the export ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_exported_demo_model_matches_torch(tmp_path):
    """Export the committed heads; the manifest validates and ONNX equals torch on real photos and texts."""
    import onnxruntime as ort

    from hqclip.repo.manifest import load_manifest
    from hqclip.repo.preprocess import ImagePreprocessor
    from hqclip.repo.tokenizer import load_tokenizer
    from testkit.photos import jpeg
    from training.demo.build import assemble, export
    from training.demo.model import tokenizer
    from training.onnx_towers import ImageTower, TagTower, TextTower

    repo = tmp_path / "repo"
    export(repo)
    manifest = load_manifest(repo, "demo", verify=True)
    model, head, vocab = assemble()
    assert manifest.tags is not None and manifest.tags.vocabulary == vocab.tags
    assert manifest.image.mean == (0.5, 0.5, 0.5) and manifest.text.tokenizer.kind == "hf"

    def session(spec):
        return ort.InferenceSession(str(onnx_path(repo, spec.model)), providers=["CPUExecutionProvider"])

    preprocess = ImagePreprocessor(manifest.image, 20 << 20, 40_000_000)
    pixels = np.stack([preprocess(jpeg(name)) for name in ("chelsea", "coffee", "astronaut", "rocket")])
    image_onnx = session(manifest.image).run(None, {manifest.image.input: pixels})[0]
    with torch.no_grad():
        image_torch = ImageTower(model, manifest.image.mean, manifest.image.std)(torch.from_numpy(pixels)).numpy()
    assert cosines(image_onnx, image_torch).min() >= 0.9999

    texts = ["A yak.", "a cat", "two red apples &amp; a   pear", "an emoji of a grinning face", ""]
    ids, truncated = load_tokenizer(manifest.text.tokenizer, repo)(texts)
    assert np.array_equal(ids, tokenizer()(texts).numpy()) and not any(truncated)
    text_onnx = session(manifest.text).run(None, {manifest.text.input: ids})[0]
    with torch.no_grad():
        text_torch = TextTower(model)(torch.from_numpy(ids)).numpy()
    assert cosines(text_onnx, text_torch).min() >= 0.9999

    tags_onnx = session(manifest.tags).run(None, {manifest.tags.input: image_onnx})[0]
    with torch.no_grad():
        tags_torch = TagTower(head)(torch.from_numpy(image_onnx)).numpy()
    np.testing.assert_allclose(tags_onnx, tags_torch, atol=1e-5)
    assert math.isclose(manifest.logit_scale, float(model.logit_scale.detach().exp()), rel_tol=1e-6)


# --- real photos and distillation from the ImageNet head -------------------------------------------------------


def test_photo_sets_load_and_stay_apart():
    from training.demo.photos import HELDOUT, TRAINING, crops, load

    assert not set(HELDOUT) & set(TRAINING)
    for name in [*HELDOUT, *TRAINING]:
        image = load(name)
        assert image.mode == "RGB" and min(image.size) >= 224, name  # the towers take 224 x 224
    image = load(TRAINING[0])
    first, again = crops(image, 4, "seed"), crops(image, 4, "seed")
    assert [c.size for c in first] == [c.size for c in again] and first[0].tobytes() == again[0].tobytes()
    assert all(c.width <= image.width and c.height <= image.height and c.width * c.height >= 0.05 * image.width
               * image.height for c in first)


def test_gcompris_photos_come_out_of_its_resource_files_with_captions():
    """The Qt resource reader finds GCompris's photographs (Debian gcompris-qt-data); each decodes, none is held
    out, each picture is there once, and captions come from the file names; the LFW faces join them."""
    from training.demo.gcompris import BY_HAND, RCC_DIR, caption_from_name, captioned_photos
    from training.demo.photos import HELDOUT, LFW_FACES, captioned, load
    from training.demo.qt_resources import read_rcc

    files = read_rcc(RCC_DIR / "categorization.rcc")
    hammer = files["gcompris/src/activities/categorization/resource/images/tools/hammer1.webp"]
    assert hammer[:4] == b"RIFF" and hammer[8:12] == b"WEBP"
    gcompris = captioned_photos()
    assert len(gcompris) > 250 and not set(captioned()) & set(HELDOUT)
    assert gcompris["gcompris:categorization/resource/images/tools/hammer1.webp"] == "a photo of a hammer."
    assert set(BY_HAND.values()) <= set(gcompris.values())
    assert caption_from_name("explore_monuments/resource/india/goldenTemple.webp") == "a photo of a golden temple."
    assert caption_from_name("categorization/resource/images/tools/measuringTape3.webp") == \
        "a photo of a measuring tape."
    images = [load(name) for name in list(gcompris)[::25]]
    assert all(image.mode == "RGB" and min(image.size) >= 100 for image in images)
    assert len({image.tobytes() for image in images}) == len(images)
    faces = {name: caption for name, caption in captioned().items() if name not in gcompris}
    assert len(faces) == LFW_FACES and set(faces.values()) == {"a photo of a person."}
    face = load(next(iter(faces)))
    assert face.mode == "RGB" and face.size == (25, 25)


def test_qt_resource_reader_refuses_other_files(tmp_path):
    from training.demo.qt_resources import read_rcc

    (tmp_path / "x.rcc").write_bytes(b"RIFF" + bytes(40))
    with pytest.raises(ValueError, match="not a Qt resource file"):
        read_rcc(tmp_path / "x.rcc")


def test_teacher_is_the_imagenet_head_on_trunk_features(demo_model, classifier):
    """The distillation teacher, applied to the cached trunk features, is the ImageNet classifier itself."""
    from training.demo.distill import teacher_head

    weight, bias = teacher_head()
    pixels = torch.cat([_pixels(photo("chelsea")), _pixels(photo("coffee"))])
    with torch.no_grad():
        torch.testing.assert_close(demo_model.visual.trunk(pixels) @ weight.T + bias, classifier(pixels),
                                   rtol=1e-4, atol=1e-4)


def test_photo_accuracy_in_problems_of_ten_classes():
    """evaluate_photos: top-1 among all classes, and the exact expected top-1 among the truth and 9 random others,
    overall and per held-out set."""
    from math import comb

    from hqclip.repo.prompts import DEFAULT_TEMPLATES
    from training.demo.cached import Heads
    from training.demo.distill import PhotoFeatures, evaluate_photos, heldout_prompts
    from training.demo.photos import HELDOUT, OPENCV_HELDOUT

    classes = sorted(set(HELDOUT.values()))
    heads = Heads(len(classes), len(classes), len(classes))
    with torch.no_grad():
        heads.image_proj.weight.copy_(torch.eye(len(classes)))
        heads.text_proj.weight.copy_(torch.eye(len(classes)))
    text = torch.eye(len(classes)).repeat_interleave(len(DEFAULT_TEMPLATES), 0)  # class-major, as the prompts
    names = [next(n for n, label in HELDOUT.items() if label == c) for c in classes]  # one right photo per class
    building = classes.index("building")
    assert names[building] not in OPENCV_HELDOUT  # ... and a second building, from opencv,
    names.append("opencv:data/home.jpg")  # that looks more like the next class: one class above the truth
    eye = torch.eye(len(classes))
    image = torch.cat([eye, eye[[building + 1]] + 0.5 * eye[[building]]])
    photos = PhotoFeatures(crops=torch.zeros(0, len(classes)), crop_sources=[], heldout=image,
                           heldout_names=names, heldout_labels=[*classes, "building"],
                           classes=[], texts=heldout_prompts(), text=text)
    got = evaluate_photos(heads, photos)
    n, one_above = len(image), comb(len(classes) - 2, 9) / comb(len(classes) - 1, 9)  # one class above the truth
    assert got["photos"] == n and got["photo_classes"] == len(classes) > 10
    assert got["photo_top1"] == pytest.approx((n - 1) / n)
    assert got["photo_top1_10way"] == pytest.approx((n - 1 + one_above) / n)
    from_opencv = sum(name in OPENCV_HELDOUT for name in names)
    assert 1 < from_opencv < n - 1
    assert got["photo_top1_10way_first"] == 1
    assert got["photo_top1_10way_opencv"] == pytest.approx((from_opencv - 1 + one_above) / from_opencv)


def test_imagenet_hypernyms_name_what_imagenet_lacks():
    """WordNet (Debian wordnet-base) gives the ImageNet leaves the everyday names above them, not the top nodes."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from training.demo.hypernyms import MAX_LEAVES, MIN_LEAVES, imagenet_hypernyms

    hypernyms = imagenet_hypernyms()
    names = {h.name: {IMAGENET_CLASSNAMES[c] for c in h.classes} for h in hypernyms}
    assert names["domestic cat"] == {"tabby cat", "tiger cat", "Persian cat", "Siamese cat", "Egyptian Mau"}
    assert names["person"] == {"baseball player", "bridegroom", "scuba diver"}
    assert {"church", "mosque", "palace", "barn"} <= names["building"]
    assert all(MIN_LEAVES <= len(h.classes) <= MAX_LEAVES for h in hypernyms)
    assert not {"entity", "artifact", "organism"} & set(names)


def test_distilled_class_texts_mix_in_their_hypernyms():
    """A class's text features: (1 - share) its own prompts' mean, share the mean of its ancestors' prompt means."""
    from hqclip.repo.prompts import DEFAULT_TEMPLATES
    from training.demo.distill import PhotoFeatures, hypernym_prompts, hypernyms_of, photo_prompts, with_hypernyms

    classes = [281, 0]  # tabby cat, tench
    texts = photo_prompts(classes)
    photos = PhotoFeatures(crops=torch.zeros(0, 4), crop_sources=[], heldout=torch.zeros(0, 4), heldout_names=[],
                           heldout_labels=[], classes=classes, texts=texts, text=torch.randn(len(texts), 4))
    own = torch.randn(2, 4)
    got = with_hypernyms(own, photos, 0.25)
    for row, cls in enumerate(classes):
        above = [h for h in hypernyms_of(classes) if cls in h.classes]
        assert {"cat", "domestic cat"} <= {h.name for h in above} if cls == 281 else "fish" in {h.name for h in above}
        means = photos.text_rows(hypernym_prompts(above)).view(len(above), len(DEFAULT_TEMPLATES), -1).mean(1)
        torch.testing.assert_close(got[row], 0.75 * own[row] + 0.25 * means.mean(0))


def test_captions_term_rewards_photos_near_their_own_caption():
    """The captioned-photo term: cross-entropy of each photo among the distinct captions; low when a photo's
    embedding sits on its own caption's, high when on another's; left out at weight 0."""
    from training.demo.build import demo_sections
    from training.demo.cached import Heads
    from training.demo.distill import Distillation, PhotoFeatures, photo_prompts

    captions = ["a photo of a hammer.", "a photo of a fish.", "a photo of the moon."]
    eye, prompts = torch.eye(3), photo_prompts([0])  # one ImageNet class (tench) for the teacher's side
    trunk = torch.eye(3, 1280)  # photo i: trunk features that the image projection below maps onto caption i
    right = PhotoFeatures(crops=torch.zeros(0, 1280), crop_sources=[], heldout=torch.zeros(0, 1280),
                          heldout_names=[], heldout_labels=[], classes=[0], texts=prompts + captions,
                          text=torch.cat([torch.randn(len(prompts), 3), eye]), captioned=trunk.repeat(2, 1),
                          captioned_sources=["a", "b", "c"] * 2, captions=captions * 2)
    wrong = PhotoFeatures(**{**right.__dict__, "captioned": trunk[[1, 2, 0]].repeat(2, 1)})
    heads = Heads(1280, 3, 3, text_projection="identity")
    with torch.no_grad():
        heads.image_proj.weight.copy_(torch.eye(3, 1280))
    config, _ = demo_sections(["distill.weight=0", "distill.captions=1", "distill.batch_size=64"])
    low = Distillation(config, right, None, 0).terms(heads)
    high = Distillation(config, wrong, None, 0).terms(heads)
    assert set(low) == {"captions"} and low["captions"][0] == 1
    assert low["captions"][1] < 0.01 and high["captions"][1] > 10
    off, _ = demo_sections(["distill.weight=0", "distill.captions=0"])
    assert Distillation(off, right, None, 0).terms(heads) == {}


@pytest.mark.parametrize("start", ["identity", "frozen_identity"])
def test_text_projection_can_start_at_the_identity(start):
    from training.demo.build import demo_sections
    from training.demo.cached import Heads

    distill, heads_cfg = demo_sections([f"heads.text_projection={start}", "distill.weight=2"])
    assert distill.weight == 2 and heads_cfg.text_projection == start
    heads = Heads(8, 4, 4, text_projection=heads_cfg.text_projection)
    assert torch.equal(heads.text_proj.weight, torch.eye(4))
    assert heads.text_proj.weight.requires_grad == (start == "identity") and heads.image_proj.weight.requires_grad


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    """A demo work folder (``build/demo``'s layout) from a 1-in-25 subset of the stamps and emoji, one crop per
    training photo and 20 ImageNet classes: the real steps, small enough to retrain in CI."""
    from training.demo.build import build_photo_features
    from training.demo.data import emoji_sources, stamp_sources, write_shards

    work = tmp_path_factory.mktemp("demo-work")
    counts = write_shards(work / "data", progress=False, sources=stamp_sources()[::25] + emoji_sources()[::25])
    assert counts["train"] and counts["heldout"]
    build_photo_features(work, crops_per_photo=1, classes=list(range(0, 1000, 50)), captioned_crops=0)
    return work


@pytest.mark.slow
def test_photo_features_rebuilt_when_the_photo_set_changes(small_demo, tmp_path):
    """A feature file of other crops is encoded again (its prompts' features reused); one that fits is kept."""
    import shutil

    from training.demo.build import build_photo_features
    from training.demo.distill import PhotoFeatures
    from training.demo.photos import TRAINING

    classes = list(range(0, 1000, 50))
    shutil.copy(small_demo / "features-photos.pt", tmp_path / "features-photos.pt")
    before = PhotoFeatures.load(tmp_path / "features-photos.pt")
    path = build_photo_features(tmp_path, crops_per_photo=2, classes=classes, captioned_crops=0)
    after = PhotoFeatures.load(path)
    assert after.fits(2, classes, 0) and not before.fits(2, classes, 0) and len(after.crops) == 2 * len(TRAINING)
    assert after.texts == before.texts and torch.equal(after.text, before.text)
    assert torch.equal(after.heldout, before.heldout) and torch.equal(after.captioned, before.captioned)
    stamp = path.stat().st_mtime_ns
    assert build_photo_features(tmp_path, crops_per_photo=2, classes=classes, captioned_crops=0) == path
    assert path.stat().st_mtime_ns == stamp


RETRAIN = ["optim.steps=5", "optim.warmup_steps=1", "data.batch_size=32", "data.vocab_min_count=1",
           "distill.weight=1", "distill.batch_size=32"]


@pytest.mark.slow
def test_demo_build_retrain_end_to_end(small_demo, tmp_path):
    """`hqclip demo build --retrain`'s path: features, heads trained with distillation, metrics, export."""
    from hqclip.repo.manifest import load_manifest
    from training.demo.build import HEADS_FILE, build

    weights = tmp_path / "weights"
    manifest = build(out=tmp_path / "repo", work=small_demo, retrain=True, overrides=RETRAIN, weights=weights)
    assert {p.name for p in weights.iterdir()} == {HEADS_FILE, "vocab.json", "metrics.json"}
    report = json.loads((weights / "metrics.json").read_text())
    assert report["final_loss"]["step"] == 5 and report["final_loss"]["distill"] > 0
    assert report["final_loss"]["captions"] > 0
    assert report["config"]["distill"]["batch_size"] == 32
    metrics = report["heldout"]
    assert metrics["samples"] > 0 and 0 <= metrics["photo_top1_10way"] <= 1 and metrics["photos"] >= 25
    assert load_manifest(manifest.parent, "demo", verify=True).tags is not None


@pytest.mark.slow
def test_ablation_runs_on_cached_features(small_demo, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ablation

    results = ablation.run(1, small_demo, RETRAIN, jobs=1)
    assert set(results["variants"]) == set(ablation.VARIANTS)
    for variant in results["variants"].values():
        assert len(variant["runs"]) == 1 and "photo_top1_10way" in variant["runs"][0]
    assert "| + HNI + STC (HQ-CLIP) |" in ablation.to_markdown(results)
