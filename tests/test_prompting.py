import pytest

from conftest import make_tokenizer
from workbench.data.prompting import IGNORE_INDEX, IMAGE_TOKEN_INDEX, PromptFormatter, with_image_placeholders
from workbench.errors import ConfigError


@pytest.fixture(scope="module")
def formatter():
    return PromptFormatter(make_tokenizer())


def _answer_text(formatter, enc):
    return formatter.tokenizer.decode([t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX])


def test_labels_cover_only_assistant_turns(formatter):
    conv = [{"role": "user", "content": "<image>\nwhat color is the shape?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "is there a circle?"},
            {"role": "assistant", "content": "yes"}]
    enc = formatter.encode(conv, num_images=1)
    assert enc.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert _answer_text(formatter, enc) == "red<|im_end|>yes<|im_end|>"
    assert len(enc.input_ids) == len(enc.labels)
    assert enc.labels[enc.input_ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX


def test_token_ids_match_whole_text_tokenization(formatter):
    conv = [{"role": "user", "content": "describe the image ."}, {"role": "assistant", "content": "a blue triangle"}]
    enc = formatter.encode(conv, num_images=0)
    assert enc.input_ids == formatter.tokenizer(enc.text, add_special_tokens=False)["input_ids"]


def test_llava_rows_and_several_images(formatter):
    conv = [{"from": "human", "value": "<image> and <image>: same shape?"}, {"from": "gpt", "value": "no"}]
    enc = formatter.encode(conv, num_images=2)
    assert enc.input_ids.count(IMAGE_TOKEN_INDEX) == 2


def test_placeholder_mismatch_is_a_clear_error(formatter):
    with pytest.raises(ConfigError, match=r"1 '<image>' placeholder\(s\) but 2 image\(s\)"):
        formatter.encode([{"role": "user", "content": "<image> hi"}], num_images=2)


def test_generation_prompt_has_no_labels(formatter):
    enc = formatter.encode([{"role": "user", "content": "hello"}], add_generation_prompt=True, num_images=0)
    assert set(enc.labels) == {IGNORE_INDEX}
    assert enc.text.endswith("<|im_start|>assistant\n")


def test_base_model_without_chat_template_uses_fallback():
    formatter = PromptFormatter(make_tokenizer(chat_template=None))
    enc = formatter.encode([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}])
    assert "User: hello" in enc.text
    assert _answer_text(formatter, enc).strip() == "world<|im_end|>"


@pytest.mark.parametrize("bad, fragment", [
    ([], "at least one message"),
    ([{"role": "robot", "content": "x"}], "unknown role"),
    ([{"role": "user", "content": 3}], "must be text"),
])
def test_malformed_messages(formatter, bad, fragment):
    with pytest.raises(ConfigError, match=fragment):
        formatter.encode(bad)


def test_placeholders_are_added_in_front_when_missing():
    assert with_image_placeholders("hi", 2) == "<image>\n<image>\nhi"
    assert with_image_placeholders("a <image> b", 1) == "a <image> b"


def test_system_prompt_is_added_only_when_missing():
    formatter = PromptFormatter(make_tokenizer(), system_prompt="Answer in one word.")
    enc = formatter.encode([{"role": "user", "content": "hi"}])
    assert enc.text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")
    own = formatter.encode([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}])
    assert "Answer in one word." not in own.text and "Be kind." in own.text
