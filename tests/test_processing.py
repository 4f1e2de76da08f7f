"""Images, prompts, tokenization and the Processor (fast, offline)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from PIL import Image
from tokenizer_fixtures import make_tiny_tokenizer, tiny_tokenizer_dir
from transformers import AutoTokenizer, CLIPImageProcessorPil

from sparsevlm_jax.batch import Buckets
from sparsevlm_jax.config import LlavaConfig, TextConfig, VisionConfig
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.processing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Processor,
    build_prompt,
    expand2square,
    expanded_input_ids,
    load_image,
    pad_color,
    preprocess_image,
    split_prompt,
    tokenizer_image_token,
)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@pytest.fixture(scope="module")
def tok_placeholder():
    d = tiny_tokenizer_dir("placeholder")
    return AutoTokenizer.from_pretrained(d), -200


@pytest.fixture(scope="module")
def tok_expand():
    d = tiny_tokenizer_dir("expand")
    tok = AutoTokenizer.from_pretrained(d)
    return tok, tok.convert_tokens_to_ids("<image>")


def _rand_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------- prompts


def test_prompt_strings():
    q = "What is in the image?"
    assert build_prompt(q) == f"{VICUNA_SYSTEM} USER: <image>\n{q} ASSISTANT:"
    assert build_prompt(q, "vicuna_v1") == build_prompt(q, "v1") == build_prompt(q)
    assert build_prompt(q, "llava_v1") == f"{LLAVA_SYSTEM} USER: <image>\n{q} ASSISTANT:"
    assert build_prompt(q, "llava_hf") == f"USER: <image>\n{q} ASSISTANT:"


def test_prompt_moves_image_and_strips():
    want = "USER: <image>\nWhat is it? ASSISTANT:"
    assert build_prompt("  What is it?\n", "llava_hf") == want
    assert build_prompt("<image>\nWhat is it?", "llava_hf") == want
    assert build_prompt("What is it? <image>", "llava_hf") == want


@pytest.mark.parametrize("q", ["", "   \n", "<image>", " <image>\n "])
def test_empty_prompt(q):
    with pytest.raises(InputError, match="empty prompt"):
        build_prompt(q)


def test_unknown_template():
    with pytest.raises(InputError, match="vicuna_v1") as e:
        build_prompt("hi", "chatml")
    assert "llava_hf" in str(e.value) and "llava_v1" in str(e.value)


# --------------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_layout(tmp_path):
    t0 = time.perf_counter()
    tok, idx = make_tiny_tokenizer(tmp_path / "p", "placeholder")
    tok2, idx2 = make_tiny_tokenizer(tmp_path / "e", "expand", vocab_size=400)
    assert time.perf_counter() - t0 < 5
    assert idx == -200 and len(tok) == 500
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert "<image>" not in tok.get_vocab()
    assert sorted(os.listdir(tmp_path / "p")) == ["tokenizer.model", "tokenizer_config.json"]
    assert idx2 == 400 and len(tok2) == 402
    assert tok2.convert_tokens_to_ids("<pad>") == 401 and tok2.pad_token_id == 401
    # loads back the same, and training is deterministic
    again = AutoTokenizer.from_pretrained(tmp_path / "p")
    s = "Describe the image in detail. 42 zebras!"
    assert again(s).input_ids == tok(s).input_ids
    assert make_tiny_tokenizer(tmp_path / "p2")[0](s).input_ids == tok(s).input_ids
    # byte fallback: anything round-trips
    s = "Ünïcode ✓ text\twith tabs"
    assert tok.decode(tok(s).input_ids, skip_special_tokens=True) == s


def test_tokenizer_image_token_matches_llava(tok_placeholder):
    tok, idx = tok_placeholder
    prompt = build_prompt("What is the man holding?")
    ids = tokenizer_image_token(prompt, tok, idx)
    before, after = prompt.split("<image>")
    # LLaVA: chunk 0 with its BOS, the placeholder, chunk 1 without its BOS
    assert ids == tok(before).input_ids + [idx] + tok(after).input_ids[1:]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(idx) == 1


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "llava_hf"])
def test_split_placeholder(tok_placeholder, template):
    tok, idx = tok_placeholder
    prompt = build_prompt("How many dogs are there?", template)
    prefix, text = split_prompt(prompt, tok, idx)
    head = prompt.split("<image>")[0]
    # the image offset: BOS + system prompt + " USER: " (35 with LLaMA's tokenizer for vicuna_v1)
    assert prefix == tok(head).input_ids
    assert prefix[0] == tok.bos_token_id and tok.bos_token_id not in prefix[1:] + text
    assert idx not in prefix + text
    assert tok.decode(text).startswith("\nHow many dogs")
    assert tok.decode(text).endswith(" ASSISTANT:")
    assert text == tok("\nHow many dogs are there? ASSISTANT:").input_ids[1:]
    if template == "llava_hf":
        assert len(prefix) == len(tok("USER: ").input_ids)


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_hf"])
def test_split_expand(tok_expand, template):
    tok, idx = tok_expand
    prompt = build_prompt("Is there a cat on the table?", template)
    prefix, text = split_prompt(prompt, tok, idx)
    full = tok(prompt).input_ids
    assert full == prefix + [idx] + text
    assert prefix[0] == tok.bos_token_id and full.count(tok.bos_token_id) == 1
    assert prefix == tok(prompt.split("<image>")[0]).input_ids
    assert tok.decode(text).strip().startswith("Is there a cat")
    # llava-hf's processor expands "<image>" in the text before tokenizing: same ids
    n = 7
    expanded = expanded_input_ids(prefix, text, idx, n)
    assert expanded == tok(prompt.replace("<image>", "<image>" * n)).input_ids
    assert len(expanded) == len(prefix) + n + len(text) and expanded.count(idx) == n


@pytest.mark.parametrize("style", ["placeholder", "expand"])
def test_split_needs_exactly_one_image(request, style):
    tok, idx = request.getfixturevalue(f"tok_{style}")
    for prompt in ["USER: no image ASSISTANT:", "USER: <image> and <image> ASSISTANT:"]:
        with pytest.raises(InputError, match="exactly one"):
            split_prompt(prompt, tok, idx)


# ------------------------------------------------------------------------------------- images


def test_expand2square_pad_colour():
    assert pad_color(OPENAI_CLIP_MEAN) == (122, 116, 104)
    wide = Image.new("RGB", (40, 20), (10, 200, 30))
    sq = expand2square(wide, pad_color())
    assert sq.size == (40, 40)
    assert sq.getpixel((0, 0)) == (122, 116, 104) and sq.getpixel((39, 39)) == (122, 116, 104)
    assert sq.getpixel((0, 10)) == (10, 200, 30) and sq.getpixel((39, 29)) == (10, 200, 30)
    assert sq.getpixel((0, 9)) == (122, 116, 104) and sq.getpixel((0, 30)) == (122, 116, 104)
    tall = expand2square(Image.new("RGB", (21, 40), (1, 2, 3)), (9, 9, 9))
    assert tall.size == (40, 40) and tall.getpixel((8, 0)) == (9, 9, 9)
    assert tall.getpixel((9, 39)) == (1, 2, 3) and tall.getpixel((29, 0)) == (1, 2, 3)
    assert tall.getpixel((30, 0)) == (9, 9, 9)
    same = Image.new("RGB", (5, 5))
    assert expand2square(same, (0, 0, 0)) is same


def test_preprocess_pad_corner_is_normalised_mean_colour():
    px = preprocess_image(Image.new("RGB", (500, 200), (0, 255, 0)), mode="pad")
    assert px.shape == (336, 336, 3) and px.dtype == np.float32
    want = (np.array([122, 116, 104]) / 255 - np.array(OPENAI_CLIP_MEAN)) / OPENAI_CLIP_STD
    np.testing.assert_allclose(px[0, 0], want, atol=1e-5)
    np.testing.assert_allclose(px[-1, -1], want, atol=1e-5)
    green = (np.array([0, 255, 0]) / 255 - np.array(OPENAI_CLIP_MEAN)) / OPENAI_CLIP_STD
    np.testing.assert_allclose(px[168, 0], green, atol=1e-5)


@pytest.mark.parametrize("size", [336, 56])
def test_preprocess_matches_clip_processor(size):
    img = _rand_image(301, 170)
    kw = dict(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    proc = CLIPImageProcessorPil(**kw)

    def ref(im):
        return np.transpose(proc(im, return_tensors="np")["pixel_values"][0], (1, 2, 0))

    crop = preprocess_image(img, size, mode="crop")
    assert crop.shape == (size, size, 3)
    np.testing.assert_array_equal(crop, ref(img))
    pad = preprocess_image(img, size, mode="pad")
    np.testing.assert_array_equal(pad, ref(expand2square(img, (122, 116, 104))))
    assert not np.allclose(pad, crop)


def test_preprocess_custom_mean_pads_with_it():
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    px = preprocess_image(Image.new("RGB", (60, 20), (0, 0, 0)), 28, mean, std, mode="pad")
    np.testing.assert_allclose(px[0, 0], (127 / 255 - 0.5) / 0.5, atol=1e-6)


def test_preprocess_bad_mode():
    with pytest.raises(InputError, match="pad"):
        preprocess_image(Image.new("RGB", (4, 4)), mode="resize")


def test_load_image_modes(tmp_path):
    rgba = Image.new("RGBA", (8, 6), (10, 20, 30, 0))
    rgba.save(tmp_path / "rgba.png")
    Image.new("L", (8, 6), 77).save(tmp_path / "gray.png")
    Image.new("LA", (8, 6), (50, 128)).save(tmp_path / "la.png")
    Image.new("RGB", (8, 6), (51, 102, 153)).convert("P").save(tmp_path / "p.png")
    Image.new("CMYK", (8, 6), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    g16 = np.full((6, 8), 0x1234, np.uint16)
    g16[0, 0] = 0xFFFF
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(g16.astype(np.int32)).save(tmp_path / "i32.tif")
    Image.fromarray(np.full((6, 8), 300.0, np.float32)).save(tmp_path / "f.tif")

    def px(name, xy=(3, 3)):
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (8, 6)
        return img.getpixel(xy)

    assert px("rgba.png") == (10, 20, 30)  # LLaVA's .convert("RGB"): alpha dropped
    assert px("gray.png") == (77, 77, 77)
    assert px("la.png") == (50, 50, 50)
    assert px("p.png") == (51, 102, 153)
    assert px("cmyk.jpg") == (255, 255, 255)
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert px("g16.png") == (0x12, 0x12, 0x12)
    assert px("g16.png", (0, 0)) == (255, 255, 255)
    assert px("i32.tif") == (0x12, 0x12, 0x12)
    assert px("f.tif") == (255, 255, 255)
    # and the whole pipeline runs on them
    assert preprocess_image(load_image(tmp_path / "g16.png"), 28).shape == (28, 28, 3)


def _bad_images(tmp_path):
    good = _rand_image(64, 48)
    good.save(tmp_path / "good.png")
    good.save(tmp_path / "good.jpg", quality=90)
    png, jpg = (tmp_path / "good.png").read_bytes(), (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "trunc.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    corrupt = bytearray(png)
    corrupt[len(png) // 2 : len(png) // 2 + 64] = bytes(64)
    (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
    (tmp_path / "notes.txt").write_text("not an image\nsecond line\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "header_only.png").write_bytes(png[:40])
    (tmp_path / "adir").mkdir()
    return {
        "missing.png": "no such",
        "adir": "directory",
        "notes.txt": "not an image",
        "empty.png": "not an image",
        "trunc.png": "truncated or corrupt",
        "trunc.jpg": "truncated or corrupt",
        "corrupt.png": "truncated or corrupt",
        "header_only.png": "",
    }


def test_load_image_errors(tmp_path):
    for name, what in _bad_images(tmp_path).items():
        path = tmp_path / name
        with pytest.raises(InputError) as e:
            load_image(path)
        msg = str(e.value)
        assert str(path) in msg and what in msg, msg
        assert "\n" not in msg, msg
    assert load_image(tmp_path / "good.png").size == (64, 48)
    assert load_image(str(tmp_path / "good.jpg")).mode == "RGB"


# ---------------------------------------------------------------------------------- processor


def _tiny_config(image_token_index: int) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        text=TextConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2),
        image_token_index=image_token_index,
    )


@pytest.mark.parametrize("style", ["placeholder", "expand"])
def test_processor_call(request, tmp_path, style):
    tok, idx = request.getfixturevalue(f"tok_{style}")
    proc = Processor(tok, 28, image_token_index=idx, num_image_tokens=4)
    assert proc.style == style
    _rand_image(40, 30).save(tmp_path / "a.png")
    images = [tmp_path / "a.png", _rand_image(20, 50, seed=1), str(tmp_path / "a.png")]
    questions = ["What is this?", "Describe the image in detail.", "<image>\nHow many?"]
    batch, n = proc(images, questions)
    assert n == 3
    b, p, t = batch.shape_key
    assert (b, p, t) == (4, 48, 16)
    assert batch.pixel_values.shape == (4, 28, 28, 3)
    for i, q in enumerate(questions):
        prefix, text = proc.encode(q)
        assert batch.prefix_ids[i, p - len(prefix) :].tolist() == prefix
        assert batch.prefix_mask[i].sum() == len(prefix)
        assert batch.text_ids[i, : len(text)].tolist() == text
        assert batch.text_mask[i].sum() == len(text)
    np.testing.assert_array_equal(batch.pixel_values[0], batch.pixel_values[2])
    np.testing.assert_array_equal(batch.pixel_values[3], batch.pixel_values[2])  # repeat last
    np.testing.assert_array_equal(
        batch.pixel_values[1], preprocess_image(images[1], 28, mode="pad")
    )


def test_processor_errors(tok_placeholder, tok_expand, tmp_path):
    tok, idx = tok_placeholder
    proc = Processor(tok, 28, image_token_index=idx, num_image_tokens=4, buckets=Buckets())
    img = Image.new("RGB", (8, 8))
    with pytest.raises(InputError, match="empty prompt"):
        proc([img], ["  "])
    with pytest.raises(InputError, match=str(tmp_path / "nope.jpg")):
        proc([tmp_path / "nope.jpg"], ["hi"])
    with pytest.raises(InputError, match="does not fit"):
        proc([img], ["word " * 2000])
    with pytest.raises(InputError, match="same non-zero number"):
        proc([img, img], ["hi"])
    with pytest.raises(InputError, match="unknown conversation template"):
        Processor(tok, template="nope")
    etok, eidx = tok_expand
    with pytest.raises(InputError, match="image_token_index"):
        Processor(etok, image_token_index=eidx + 1)


def test_processor_decode(tok_expand):
    tok, idx = tok_expand
    proc = Processor(tok, 28, image_token_index=idx, num_image_tokens=4)
    ids = tok("The car is blue.", add_special_tokens=False).input_ids
    assert proc.decode([*ids, tok.eos_token_id]) == "The car is blue."
    assert proc.decode([idx, *ids, 99999, -200, tok.pad_token_id]) == "The car is blue."
    assert proc.decode(np.array([tok.bos_token_id, *ids])) == "The car is blue."


def test_from_pretrained(tmp_path):
    d = tmp_path / "ckpt"
    _, idx = make_tiny_tokenizer(d, "expand")
    cfg = _tiny_config(idx)
    proc = Processor.from_pretrained(d, cfg)
    assert proc.image_size == 28 and proc.num_image_tokens == 4 == cfg.num_image_tokens
    assert proc.image_mean == OPENAI_CLIP_MEAN and proc.image_std == OPENAI_CLIP_STD
    assert proc.image_mode == "pad" and proc.template.name == "vicuna_v1"
    assert proc.image_token_index == idx
    (d / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]})
    )
    proc = Processor.from_pretrained(d, cfg, template="llava_hf", image_mode="crop")
    assert proc.image_mean == (0.5,) * 3 and proc.image_std == (0.25,) * 3
    assert proc.template.name == "llava_hf" and proc.image_mode == "crop"
    batch, n = proc([Image.new("RGB", (30, 20))], ["What is this?"])
    assert n == 1 and batch.pixel_values.shape == (1, 28, 28, 3)
    # original LLaVA: config.json says image_aspect_ratio
    (d / "config.json").write_text(json.dumps({"image_aspect_ratio": "square"}))
    assert Processor.from_pretrained(d, cfg).image_mode == "crop"
    (d / "config.json").write_text(json.dumps({"image_aspect_ratio": "pad"}))
    assert Processor.from_pretrained(d, cfg).image_mode == "pad"


def test_from_pretrained_placeholder_and_missing(tmp_path):
    d = tmp_path / "orig"
    make_tiny_tokenizer(d, "placeholder")
    proc = Processor.from_pretrained(d, _tiny_config(-200))
    assert proc.style == "placeholder" and len(proc.tokenizer) == 500
    with pytest.raises(InputError, match="tokenizer"):
        Processor.from_pretrained(tmp_path / "empty_dir_that_is_missing", _tiny_config(-200))


# llava-hf's chat template (llava-1.5-7b-hf's chat_template.json, images first)
LLAVA_HF_CHAT = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_checkpoint_chat_template_is_the_default_prompt(tmp_path):
    """A checkpoint whose tokenizer ships a chat template gets its prompts from it unless a
    template is named; one without keeps LLaVA's vicuna_v1."""
    from sparsevlm_jax.prompts import ChatTemplate

    d = tmp_path / "ckpt"
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir("expand"))
    idx = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(image_token_index=idx)
    tok.save_pretrained(d)
    plain = Processor.from_pretrained(d, cfg)
    assert plain.template.name == "vicuna_v1"
    tok.chat_template = LLAVA_HF_CHAT
    tok.save_pretrained(d)
    proc = Processor.from_pretrained(d, cfg)
    assert isinstance(proc.template, ChatTemplate)
    assert proc.prompt("What is it?") == "USER: <image>\nWhat is it? ASSISTANT:"
    assert proc.prompt("What is it?") == build_prompt("What is it?", "llava_hf")
    prefix, text = proc.encode("What is it?")
    assert tok.decode(text).startswith("\nWhat is it?")
    named = Processor.from_pretrained(d, cfg, template="vicuna_v1")
    assert named.prompt("What is it?") == build_prompt("What is it?", "vicuna_v1")
    with pytest.raises(InputError, match="2 <image> markers for 1 image"):
        proc.encode_spans("<image> and <image>?", 1)
