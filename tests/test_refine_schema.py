"""The VLM-150M answer schema, and what normalisation does to what models really write."""

from __future__ import annotations

import json

import jsonschema
import pytest

from services.refine import prompt
from services.refine.schema import (
    JSON_SCHEMA,
    MAX_CLAUSE_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    InvalidRefinement,
    normalise,
    parse,
)
from testkit.photos import encode, jpeg, photo

ANSWER = {
    "desc": ["  a tabby cat lying on a sofa ", "\"looking to the left\"", "a tabby cat lying on a sofa", ""],
    "neg_desc": ["a black dog lying on a sofa", "looking to the right"],
    "tags": ["cat", " 'tabby' ", "Cat", "", "sofa"],
    "neg_tags": ["dog", "black", "puppy", "chair", "bed"],
}


def test_normalise_trims_unquotes_and_drops_empty_and_duplicate_items():
    result = normalise(ANSWER)
    assert result.desc == ["a tabby cat lying on a sofa", "looking to the left"]
    assert result.neg_desc == ["a black dog lying on a sofa", "looking to the right"]
    # "Cat" repeats "cat" and "" is empty: their pairs go, so negatives stay aligned with their tags
    assert result.tags == ["cat", "tabby", "sofa"]
    assert result.neg_tags == ["dog", "black", "bed"]


def test_normalised_answer_satisfies_the_schema_sent_to_the_server():
    jsonschema.Draft202012Validator.check_schema(JSON_SCHEMA)
    jsonschema.validate(normalise(ANSWER).model_dump(), JSON_SCHEMA)


def test_tags_are_paired_by_position_and_extra_negatives_dropped():
    result = normalise({"desc": ["x"], "neg_desc": ["y"], "tags": ["red", "car"], "neg_tags": ["blue", "bus", "van"]})
    assert list(zip(result.tags, result.neg_tags)) == [("red", "blue"), ("car", "bus")]


def test_a_negative_tag_equal_to_its_tag_is_no_negative():
    result = normalise({"desc": ["x"], "neg_desc": ["y"], "tags": ["red", "car"], "neg_tags": ["Red", "bus"]})
    assert (result.tags, result.neg_tags) == (["car"], ["bus"])


def test_lengths_are_bounded_at_word_boundaries():
    long_clause = " ".join(["word"] * 200)
    long_tag = "a very long tag " * 10
    result = normalise({"desc": [long_clause], "neg_desc": ["y"], "tags": [long_tag] + [f"t{i}" for i in range(40)],
                        "neg_tags": ["another long tag " * 10] + [f"n{i}" for i in range(40)]})
    assert len(result.desc[0]) <= MAX_CLAUSE_CHARS and result.desc[0].endswith("word")
    assert len(result.tags[0]) <= MAX_TAG_CHARS and not result.tags[0].endswith(" ")
    assert long_tag.startswith(result.tags[0])
    assert len(result.tags) == len(result.neg_tags) == MAX_TAGS


def test_a_single_string_where_a_list_belongs_is_accepted():
    result = normalise({"desc": "one clause", "neg_desc": ["x"], "tags": "cat", "neg_tags": "dog"})
    assert (result.desc, result.tags, result.neg_tags) == (["one clause"], ["cat"], ["dog"])


@pytest.mark.parametrize("text, reason", [
    ('{"desc": ["a cat"], "neg_desc": ["a dog"], "tags": ["cat"], "neg_tags"', "not JSON"),
    ('["a cat"]', "not an object"),
    ('{"desc": ["a cat"], "neg_desc": ["a dog"], "tags": ["cat"]}', "'neg_tags' must be a list"),
    ('{"desc": [1], "neg_desc": ["a dog"], "tags": ["cat"], "neg_tags": ["dog"]}', "'desc' must be a list"),
    ('{"desc": [" "], "neg_desc": ["a dog"], "tags": ["cat"], "neg_tags": ["dog"]}', "nothing usable left in desc"),
    ('{"desc": ["a"], "neg_desc": ["b"], "tags": ["cat"], "neg_tags": ["cat"]}', "tags, neg_tags"),
])
def test_unusable_answers_are_refused_with_the_reason(text, reason):
    with pytest.raises(InvalidRefinement, match=reason):
        parse(text)


def test_an_answer_in_a_code_fence_is_read():
    body = json.dumps({"desc": ["a cat"], "neg_desc": ["a dog"], "tags": ["cat"], "neg_tags": ["dog"]})
    assert parse(f"```json\n{body}\n```").tags == ["cat"]


def test_the_request_carries_the_image_as_a_data_url_and_the_alt_text():
    image = jpeg("chelsea")
    [message] = prompt.messages(image, "  my cat Chelsea ")
    image_part, text_part = message["content"]
    assert image_part["image_url"]["url"] == prompt.data_url(image, "image/jpeg")
    assert 'Alt text: "my cat Chelsea"' in text_part["text"]
    assert "negative" in text_part["text"] and "{alt_text}" not in text_part["text"]
    [message] = prompt.messages(image, None, prompt="Describe. Reference: {alt_text}")
    assert message["content"][1]["text"] == f"Describe. Reference: {prompt.NO_ALT_TEXT}"


@pytest.mark.parametrize("fmt, mime", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"),
                                       ("GIF", "image/gif"), ("BMP", "image/bmp")])
def test_image_types_are_told_by_their_bytes(fmt, mime):
    assert prompt.image_mime(encode(photo("coffee").resize((32, 32)), fmt)) == mime


def test_bytes_that_are_no_image_are_refused():
    with pytest.raises(ValueError, match="not a JPEG"):
        prompt.image_mime(b"%PDF-1.7 not an image")


def test_control_characters_inside_strings_are_read_and_removed():
    result = parse('{"desc": ["a cat\x01on a\tsofa"], "neg_desc": ["a dog"], "tags": ["cat\x7f"], "neg_tags": ["dog"]}')
    assert (result.desc, result.tags) == (["a cat on a sofa"], ["cat"])
