"""Shard reading, skip-and-count of bad samples, the tag vocabulary, the join, and the resumable stream."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from webdataset import TarWriter

from hqclip.jobs.join import join_annotations
from testkit.photos import encode, photo
from testkit.shards import SUBJECTS, annotation, crop, jpeg, write_shards
from training.data import (
    SkipCounter,
    StreamState,
    TextChoice,
    TrainStream,
    iterate_samples,
    train_loader,
)
from training.vocab import Vocabulary, build_vocabulary, normalize_tag


def _write(path: Path, samples: list[dict]) -> str:
    with TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("good"), shards=2, per_shard=12)


def test_reads_images_alt_text_and_joined_annotations(good):
    counter = SkipCounter()
    samples = list(iterate_samples(good, counter))
    assert len(samples) == 24 and not counter.counts
    first = samples[0]
    alt, desc, tags, neg_tags = SUBJECTS[first.label]
    assert first.image.size == (96, 96) and first.image.mode == "RGB"
    assert (first.alt, first.desc, first.tags, first.neg_tags) == (alt, ", ".join(desc), tags, neg_tags)
    assert first.neg_desc == ", ".join(annotation(first.label)["neg_desc"])


def test_bad_samples_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    image = jpeg(crop(photo("coffee"), rng))
    meta = annotation("coffee")
    bad = dict(meta, tags="coffee, cup")  # a string where a list belongs
    missing = {k: v for k, v in meta.items() if k != "neg_desc"}
    no_caption = {k: v for k, v in meta.items() if k != "caption"}
    shard = _write(tmp_path / "mixed.tar", [
        {"__key__": "ok1", "jpg": image, "json": json.dumps(meta).encode()},
        {"__key__": "badjson", "jpg": image, "json": b"{not json"},
        {"__key__": "missing", "jpg": image, "json": json.dumps(missing).encode()},
        {"__key__": "notimage", "jpg": b"\xff\xd8 this is not a jpeg", "json": json.dumps(meta).encode()},
        {"__key__": "malformed", "jpg": image, "json": json.dumps(bad).encode()},
        {"__key__": "noimage", "json": json.dumps(meta).encode()},
        {"__key__": "txtfile", "png": _png(), "txt": b"alt text from the .txt file",
         "json": json.dumps(no_caption).encode()},
        {"__key__": "ok2", "webp": _webp(), "json": json.dumps(meta).encode()},
    ])
    counter = SkipCounter()
    samples = list(iterate_samples([shard], counter))
    assert [s.key for s in samples] == ["ok1", "txtfile", "ok2"]
    assert samples[1].alt == "alt text from the .txt file"
    assert dict(counter.counts) == {"malformed:json": 1, "missing:neg_desc": 1, "bad_image": 1,
                                    "malformed:tags": 1, "missing:image": 1}

    # the training stream skips them too, and its batches carry the counts
    vocab = build_vocabulary([meta["tags"]], 10)
    stream = TrainStream([shard], _to_tensor, _tokens, vocab, batch_size=3, shuffle_buffer=1,
                         state=StreamState(0))
    batch = next(iter(train_loader(stream, 0)))
    assert batch["images"].shape == (3, 3, 8, 8)
    assert batch["skipped"] == dict(counter.counts)


def test_a_truncated_shard_is_counted_not_fatal(tmp_path, good):
    data = Path(good[0]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    counter = SkipCounter()
    samples = list(iterate_samples([str(cut), good[1]], counter))
    assert 12 < len(samples) < 24
    assert sum(counter.counts.values()) >= 1


def test_vocabulary_normalises_merges_and_keeps_the_top_k(tmp_path):
    assert normalize_tag("  “Red  Car.” ") == "red car"
    assert normalize_tag("Children’s T-Shirt!") == "children's t-shirt"
    vocab = build_vocabulary([["Cat", "sky"], ["cat.", "'SKY'", "tree"], ["\"cat\"", "Tree"], ["dog"]], size=2)
    assert vocab.tags == ["cat", "sky"] or vocab.tags == ["cat", "tree"]
    assert vocab.tags[0] == "cat" and vocab.counts == [3, 2] and vocab.samples == 4
    assert vocab.tags == ["cat", "sky"]  # ties break alphabetically
    assert vocab.encode(["CAT!", "dog", "Sky"]) == [0, 1]
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert (loaded.tags, loaded.counts, loaded.samples) == (vocab.tags, vocab.counts, vocab.samples)
    assert build_vocabulary([["a"], ["a"], ["b"]], 10, min_count=2).tags == ["a"]


def test_join_attaches_annotations_by_uid(tmp_path):
    rng = np.random.default_rng(1)
    image = jpeg(crop(photo("chelsea"), rng))
    # what img2dataset writes for DataComp: the caption and the uid in the json, no annotations
    shard = _write(tmp_path / "00000.tar", [
        {"__key__": f"00000000{i}", "jpg": image, "txt": b"Chelsea",
         "json": json.dumps({"uid": f"u{i}", "caption": "Chelsea", "status": "success"}).encode()}
        for i in range(3)
    ] + [{"__key__": "000000009", "jpg": image, "json": b"{}"}])
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    for i in (0, 2):
        fields = {k: annotation("chelsea")[k] for k in ("desc", "neg_desc", "tags", "neg_tags")}
        (annotations / f"u{i}.json").write_text(json.dumps(fields))
    out = tmp_path / "joined"
    counts = join_annotations([shard], annotations, out, progress=False)
    assert counts == {"joined": 2, "no_annotation": 1, "missing:uid": 1, "shards": 1}
    counter = SkipCounter()
    samples = list(iterate_samples([str(out / "00000.tar")], counter))
    assert [s.key for s in samples] == ["000000000", "000000002"] and not counter.counts
    assert samples[0].tags == SUBJECTS["chelsea"][2] and samples[0].alt == "Chelsea"
    with tarfile.open(out / "00000.tar") as tar:
        assert sorted(tar.getnames()) == sorted(f"00000000{i}.{e}" for i in (0, 2) for e in ("jpg", "txt", "json"))
    again = join_annotations([shard], annotations, out, progress=False)
    assert again == {"shards_already_done": 1}
    with pytest.raises(FileNotFoundError, match="annotation folder"):
        join_annotations([shard], tmp_path / "nowhere", out, progress=False)


def test_text_choice_probabilities(good):
    sample = next(iterate_samples(good, SkipCounter()))
    import random

    rng = random.Random(0)
    assert TextChoice(1.0, 1.0).draw(sample, rng) == (sample.desc, sample.neg_desc)
    assert TextChoice(0.0, 0.0).draw(sample, rng) == (sample.alt, ", ".join(sample.neg_tags))
    draws = [TextChoice(0.5, 0.5).draw(sample, rng) for _ in range(400)]
    assert 150 < sum(p == sample.desc for p, _ in draws) < 250
    assert 150 < sum(n == sample.neg_desc for _, n in draws) < 250


def _stream(urls, state, rank=0, world_size=1, batch_size=4):
    vocab = build_vocabulary([t for *_, t, _ in SUBJECTS.values()], 50)
    return TrainStream(urls, _to_tensor, _tokens, vocab, batch_size, seed=3, shuffle_buffer=5,
                       rank=rank, world_size=world_size, state=state)


def _take(stream, workers, n, state=None):
    loader = iter(train_loader(stream, workers))
    batches = []
    for _ in range(n):
        batch = next(loader)
        if state is not None:
            state.update(batch)
        batches.append(batch)
    return batches


def test_stream_resumes_exactly_from_its_state(good):
    """Stopped after 5 batches (odd, so the worker round-robin must rotate), restarted from the state;
    9 batches of 4 go past the end of the 24 samples, into the next epoch."""
    reference = _take(_stream(good, StreamState(2)), 2, 9)
    state = StreamState(2)
    _take(_stream(good, state), 2, 5, state)
    resumed = _take(_stream(good, StreamState(**state.to_dict())), 2, 4)
    for a, b in zip(reference[5:], resumed):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["positive"], b["positive"])
        assert torch.equal(a["negative"], b["negative"]) and torch.equal(a["tags"], b["tags"])


def test_ranks_read_disjoint_samples(good):
    """Within an epoch (12 samples per rank here) the two ranks see different samples."""
    seen = []
    for rank in range(2):
        stream = _stream(good, StreamState(0), rank=rank, world_size=2, batch_size=3)
        stream.shuffle_buffer = 1
        batches = _take(stream, 0, 3)
        seen.append({tuple(row.flatten()[:32].tolist()) for b in batches for row in b["images"]})
    assert len(seen[0]) == len(seen[1]) == 9
    assert not seen[0] & seen[1]


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def _tokens(texts: list[str]) -> torch.Tensor:
    out = torch.zeros(len(texts), 16, dtype=torch.long)
    for row, text in enumerate(texts):
        codes = [ord(c) for c in text[:16]]
        out[row, : len(codes)] = torch.tensor(codes)
    return out


def _png() -> bytes:
    return encode(crop(photo("rocket"), np.random.default_rng(2)), "PNG")


def _webp() -> bytes:
    return encode(crop(photo("astronaut"), np.random.default_rng(3)), "WEBP")
