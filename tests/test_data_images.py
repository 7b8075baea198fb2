"""Prompt files with a conditioning image per prompt (data.image_field, editing models): paths resolved
against the .jsonl file, images read per batch (never all at once) and repeated group_size times like their
prompts, the stream position and shuffle unchanged, and bad lines refused naming the option, line and path."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from guardrl.data import PromptDataModule, PromptStream, iter_prompt_file, iter_prompt_records

# prompt -> the RGB colour its image is filled with (one byte per channel, so pixel / 255 is exact)
COLOURS = {
    "a red circle": (255, 0, 0),
    "a blue square": (0, 0, 255),
    "a cat": (0, 128, 255),
    "a dog": (51, 0, 0),
}


def _png(path, colour, size=(6, 4)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _jsonl(tmp_path, lines: list[dict], name: str = "edits.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


@pytest.fixture
def edit_file(tmp_path):
    """Four prompts, each with its own PNG under images/ (relative paths), one of them a (W=5, H=3) image."""
    lines = []
    for i, (prompt, colour) in enumerate(COLOURS.items()):
        _png(str(tmp_path / "images" / f"{i}.png"), colour, size=(5, 3) if i == 1 else (6, 4))
        lines.append({"prompt": prompt, "source": f"images/{i}.png", "id": i})
    return _jsonl(tmp_path, lines)


def _take(stream, n):
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == n:
            return out


def _colour_of(image: torch.Tensor) -> tuple[int, ...]:
    # every pixel holds the same colour: read it back in bytes
    pixels = (image * 255).round().to(torch.uint8)
    assert bool((pixels == pixels[:, :1, :1]).all())
    return tuple(int(c) for c in pixels[:, 0, 0])


def test_images_follow_their_prompts_repeated_per_group(edit_file):
    (first, second) = _take(PromptStream(edit_file, 3, 2, image_field="source"), 2)
    assert first.prompts == ["a red circle"] * 3 + ["a blue square"] * 3
    assert len(first.images) == len(first.prompts) == 6
    for prompt, image in zip(first.prompts + second.prompts, first.images + second.images):
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert _colour_of(image) == COLOURS[prompt]
    # (3, H, W): the 6 x 4 PNG is H=4, W=6; the 5 x 3 one H=3, W=5
    assert first.images[0].shape == (3, 4, 6) and first.images[3].shape == (3, 3, 5)
    # read once per prompt: the group shares one tensor
    assert first.images[0] is first.images[2] and first.images[0] is not first.images[3]
    # the byte / 255 in float32, exactly (128 / 255 is the float32 nearest 0.50196...)
    assert torch.equal(second.images[0][1, 0, 0], torch.tensor(128.0) / 255)
    assert [b.stream_position for b in (first, second)] == [2, 4]


def test_text_to_image_batches_carry_no_images(edit_file, prompt_file):
    assert _take(PromptStream(prompt_file, 2, 1), 1)[0].images is None
    assert _take(PromptStream(edit_file, 2, 1), 1)[0].images is None  # image_field null: paths ignored


def test_relative_paths_resolve_against_the_jsonl_directory_and_absolute_paths_stay(tmp_path, monkeypatch):
    _png(str(tmp_path / "data" / "img" / "a.png"), (0, 255, 0))
    _png(str(tmp_path / "elsewhere" / "b.png"), (255, 255, 255))
    absolute = str(tmp_path / "elsewhere" / "b.png")
    os.makedirs(tmp_path / "data", exist_ok=True)
    path = _jsonl(
        tmp_path / "data", [{"prompt": "x", "image": "img/a.png"}, {"prompt": "y", "image": absolute}]
    )
    monkeypatch.chdir(tmp_path)  # not the .jsonl's directory: relative paths must not depend on it
    records = list(iter_prompt_records(os.path.relpath(path), image_field="image"))
    assert [r.image_path for r in records] == [str(tmp_path / "data" / "img" / "a.png"), absolute]
    assert [r.line_number for r in records] == [1, 2]
    images = _take(PromptStream(os.path.relpath(path), 2, 2, image_field="image"), 1)[0].images
    assert [_colour_of(i) for i in images] == [(0, 255, 0)] * 2 + [(255, 255, 255)] * 2


def test_images_are_read_only_for_the_batch_being_built(tmp_path):
    # line 3's image does not exist: the first batch (lines 1-2) is built; the second fails naming line 3
    _png(str(tmp_path / "ok.png"), (1, 2, 3))
    lines = [{"prompt": "a", "image": "ok.png"}, {"prompt": "b", "image": "ok.png"}]
    path = _jsonl(
        tmp_path, lines + [{"prompt": "c", "image": "gone.png"}, {"prompt": "d", "image": "ok.png"}]
    )
    stream = iter(PromptStream(path, 2, 2, image_field="image"))
    assert len(next(stream).images) == 4
    with pytest.raises(
        ValueError, match=r"data\.image_field: line 3 of .*edits\.jsonl.*gone\.png.*no such file"
    ):
        next(stream)
    # resuming past line 3 never reads it
    resumed = _take(PromptStream(path, 2, 1, image_field="image", start_position=3), 1)[0]
    assert resumed.prompts == ["d", "d"] and _colour_of(resumed.images[0]) == (1, 2, 3)


def test_resume_and_shuffle_keep_images_with_their_prompts(edit_file):
    def stream(start=0):
        return PromptStream(
            edit_file, 2, 1, shuffle_buffer_size=3, seed=5, image_field="source", start_position=start
        )

    straight = _take(stream(), 6)
    resumed = _take(stream(start=2), 4)
    for a, b in zip(straight[2:], resumed):
        assert a.prompts == b.prompts and a.stream_position == b.stream_position
        assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))
    for batch in straight:
        assert _colour_of(batch.images[0]) == COLOURS[batch.prompts[0]]
    # the same order as the text-only stream of the same file: images do not change the shuffle
    text_only = _take(PromptStream(edit_file, 2, 1, shuffle_buffer_size=3, seed=5), 6)
    assert [b.prompts for b in text_only] == [b.prompts for b in straight]


def test_data_module_streams_images(edit_file):
    dm = PromptDataModule(edit_file, group_size=2, prompts_per_batch=2, image_field="source")
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.prompts == ["a red circle"] * 2 + ["a blue square"] * 2 and len(batch.images) == 4
    assert dm.image_field == "source"


# ---------------------------------------------------------------------------------------- bad inputs
def _setup(path, **kwargs):
    dm = PromptDataModule(path, **kwargs)
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0)
    dm.setup("fit")


def test_missing_image_is_refused_at_setup_naming_option_line_and_path(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "a cat", "image": "missing.png"}])
    with pytest.raises(
        ValueError,
        match=r"data\.image_field: line 1 of '.*edits\.jsonl' names the image '.*missing\.png': no such "
        r"file; it must be an existing image file",
    ):
        _setup(path, image_field="image")


def test_unreadable_image_is_refused(tmp_path):
    (tmp_path / "fake.png").write_text("not an image")
    path = _jsonl(tmp_path, [{"prompt": "a cat", "image": "fake.png"}])
    with pytest.raises(
        ValueError,
        match=r"data\.image_field: line 1 of .*names the image '.*fake\.png', which is not a readable image "
        r"\(UnidentifiedImageError.*PIL can open",
    ):
        _setup(path, image_field="image")


def test_directory_named_as_image_is_refused(tmp_path):
    (tmp_path / "d.png").mkdir()
    path = _jsonl(tmp_path, [{"prompt": "a cat", "image": "d.png"}])
    with pytest.raises(ValueError, match=r"data\.image_field: line 1 .*d\.png': a directory"):
        _setup(path, image_field="image")


def test_line_without_the_image_field_is_refused(tmp_path):
    _png(str(tmp_path / "a.png"), (0, 0, 0))
    path = _jsonl(tmp_path, [{"prompt": "a", "image": "a.png"}, {"prompt": "b", "img": "a.png"}])
    with pytest.raises(
        ValueError,
        match=r"data\.image_field='image': line 2 of '.*edits\.jsonl' has no image path \(found keys "
        r"\['img', 'prompt'\]\): with data\.image_field set, every line needs a non-empty string path",
    ):
        list(iter_prompt_records(path, image_field="image"))
    path = _jsonl(tmp_path, [{"prompt": "a", "image": 7}], name="seven.jsonl")
    with pytest.raises(
        ValueError, match=r"line 1 of .*seven\.jsonl' has no image path \(found 7 under 'image'\)"
    ):
        list(iter_prompt_records(path, image_field="image"))


def test_image_field_needs_a_jsonl_file_and_a_non_empty_name(tmp_path, prompt_file):
    with pytest.raises(
        ValueError,
        match=r"data\.image_field='image' needs a \.jsonl prompt file .*data\.train_prompts='.*prompts\.txt' "
        r"is not one",
    ):
        _setup(prompt_file, image_field="image")
    with pytest.raises(
        ValueError, match=r"data\.image_field must be null \(text-to-image\) or a non-empty string"
    ):
        PromptDataModule("p.jsonl", image_field="")
    with pytest.raises(ValueError, match=r"data\.image_field must be null .*got 3"):
        PromptDataModule("p.jsonl", image_field=3)


def test_text_prompts_still_read_as_before(edit_file):
    assert list(iter_prompt_file(edit_file)) == list(COLOURS)
