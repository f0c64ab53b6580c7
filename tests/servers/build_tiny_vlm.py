"""Builds a tiny random LLaVA (CLIP vision tower + Llama) that vLLM serves in the refinement tests.

    build/venvs/vllm/bin/python tests/servers/build_tiny_vlm.py [build/tiny-vlm]    (a no-op when it is built)

Run it with the vLLM venv's python (tests/servers/setup_vllm.sh) so the files match the transformers vLLM reads.
Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a small built-in corpus, with the
special tokens LLaVA needs (``<image>``, ``</s>``), and a chat template that turns ``image_url`` parts into
``<image>``, which vLLM expands into the vision tower's 16 patch tokens.

Sizes: Llama with hidden 64, 2 layers, 2 heads of 32 (vLLM's CPU attention takes head sizes 32, 64, 80, ...);
a 2-layer CLIP vision tower on 56x56 images (4x4 patches of 14).

A random model under a JSON-schema grammar may write inside a string forever. So the output layer is shaped:
every token embedding carries a constant in dimension 0, which survives the final norm and lets column 0 of the
output layer act as a bias. The bias favours the closing quote and the end of text, disfavours punctuation,
and rules out whitespace, escapes and non-ASCII bytes; words are left to the random rest. Sampled at
temperature 1, strings are a few words, lists a few strings, and answers end well inside the token budget.
Deterministic (seeded): a rebuild gives the same model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# torch and transformers are imported where used, so a rerun on a built model returns at once


VERSION = "3"  # bump when the model changes, so existing builds are redone
VOCAB = 1024
SPECIAL = ["<pad>", "<s>", "</s>", "<image>"]
PAD, BOS, EOS, IMAGE = range(4)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '</s>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

CORPUS = """\
a photo of a dog running on green grass in a park with trees in the background
a red car parked on a city street next to a tall building at night
two people sitting at a wooden table with cups of coffee and a laptop
a close up of a cat with yellow eyes lying on a white blanket
a plate of food with rice vegetables and grilled chicken on a table
a mountain landscape with snow on the peaks and a blue lake below
a black and white portrait of an old man wearing a hat
a small boat on the sea under a cloudy sky at sunset
the astronaut floats in space above the earth holding a camera
a bowl of fresh fruit with apples oranges and bananas
a woman riding a bicycle along a river in the morning
a coffee cup on a saucer beside a newspaper and glasses
children playing football on a sandy beach near the water
a bird with bright feathers standing on a branch
an aerial view of a city with roads bridges and houses
a brown horse grazing in a field surrounded by a fence
a bedroom with a large bed white pillows and a lamp
a cartoon drawing of a smiling sun with orange rays
a red brick house with a wooden door and two windows
a chess board with pieces in the middle of a game
Generate descriptions and tags and negative descriptions and negative tags for this image
The alt text the image was found with is given as a reference it may be noisy incomplete or unrelated
keep what the image confirms names places brands text in the image and ignore the rest
Answer in JSON with four fields desc neg_desc tags neg_tags a detailed description of the image as a list
of short clauses most salient first the objects their attributes colour material count size positions
relations actions setting style the same clauses with one or two details changed in each so that the
description is fluent and plausible but wrong for this image short tags one to three words for each tag
in the same order a similar tag that does not fit this image describe only what is visible
"""


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=CHAT_TEMPLATE,
    )


def output_bias(tokenizer):
    """What each token's logit leans by: ends first, then words; never whitespace, escapes or non-ASCII."""
    import torch

    bias = torch.zeros(VOCAB)
    for token_id in range(VOCAB):
        text = tokenizer.decode([token_id])
        if token_id < len(SPECIAL) or not text.isascii() or "\\" in text or (text and text.isspace()):
            bias[token_id] = -30.0
        elif text.strip().isalpha():
            bias[token_id] = 0.0
        else:
            bias[token_id] = -3.0
    # Against the words' random logits (std about 0.8, log-sum-exp about 6.8) a string closes after each word with
    # probability about 0.4 at temperature 1. Brackets and commas stay unlikely inside strings; outside, the
    # grammar leaves nothing else, so lists end at random (about two items).
    bias[tokenizer.convert_tokens_to_ids('"')] = 6.5
    bias[EOS] = 30.0
    return bias


def build(out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(0)
    tokenizer = train_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=56, patch_size=14, projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, torch_dtype="float32",
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=16,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, 0] = 1.0  # the constant the final norm keeps, so lm_head[:, 0] works as a bias
        normed = 64 ** 0.5 * 1.0 / (1.0 + 63 * 0.02**2) ** 0.5  # dimension 0 after RMSNorm, about 7.8
        head = model.lm_head.weight
        head.normal_(0.0, 0.3)
        head[:, 0] = output_bias(tokenizer) / normed
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1,
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    # vLLM's CLIP tower names its weights like transformers 4 did (vision_tower.vision_model.*)
    weights = {
        key.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1): value.contiguous()
        for key, value in model.state_dict().items()
    }
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    model.generation_config.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "hqclip-tiny-vlm.json").write_text(json.dumps({"version": VERSION}))


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/tiny-vlm")
    stamp = out / "hqclip-tiny-vlm.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == VERSION:
        print(f"tiny VLM ready: {out}")
        return
    build(out)
    print(f"tiny VLM built: {out}")


if __name__ == "__main__":
    main()
