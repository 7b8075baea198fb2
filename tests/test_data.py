"""Prompt streaming: formats, grouping, rank split, shuffle, resume position, bad files."""

import json

import pytest

from guardrl.data import PromptDataModule, PromptStream, iter_prompt_file


def _take(stream, n):
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == n:
            return out


def test_txt_stream_repeats_each_prompt_group_size_times_and_wraps_to_a_new_epoch(prompt_file):
    batches = _take(PromptStream(prompt_file, group_size=3, prompts_per_batch=2), 4)
    # 6 prompts (the blank line is skipped), 2 per batch -> batch 3 is the second pass (epoch 1)
    assert batches[0].prompts == ["a red circle"] * 3 + ["a blue square"] * 3
    assert batches[0].group_size == 3  # sample i is in group i // 3
    assert batches[2].prompts[-1] == "a dog"  # the last prompt of the first pass
    assert batches[3].prompts[0] == "a red circle"  # the second pass starts over
    assert [b.stream_position for b in batches] == [2, 4, 6, 8]


def test_jsonl_stream_reads_the_configured_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["x y", "z"])) + "\n")
    assert list(iter_prompt_file(str(path), "text")) == ["x y", "z"]
    with pytest.raises(ValueError, match=r"line 1 has no string field 'prompt'.*data.prompt_field"):
        list(iter_prompt_file(str(path), "prompt"))


def test_ranks_get_disjoint_prompts_and_whole_groups(prompt_file):
    rank0 = _take(PromptStream(prompt_file, 2, 1, rank=0, world_size=2), 3)
    rank1 = _take(PromptStream(prompt_file, 2, 1, rank=1, world_size=2), 3)
    assert [b.prompts for b in rank0] == [["a red circle"] * 2, ["a green triangle"] * 2, ["a cat"] * 2]
    assert [b.prompts for b in rank1] == [["a blue square"] * 2, ["two yellow circles"] * 2, ["a dog"] * 2]


def test_shuffle_is_seeded_and_keeps_every_prompt(prompt_file):
    def order(seed):
        return [
            b.prompts[0] for b in _take(PromptStream(prompt_file, 2, 1, shuffle_buffer_size=4, seed=seed), 6)
        ]

    assert order(1) == order(1)
    assert sorted(order(1)) == sorted(list(iter_prompt_file(prompt_file)))
    assert order(1) != list(iter_prompt_file(prompt_file)) or order(2) != list(iter_prompt_file(prompt_file))


def test_start_position_skips_what_was_consumed(prompt_file):
    full = _take(PromptStream(prompt_file, 2, 2), 3)
    resumed = _take(PromptStream(prompt_file, 2, 2, start_position=2), 2)
    assert [b.prompts for b in resumed] == [b.prompts for b in full[1:]]
    assert [b.stream_position for b in resumed] == [4, 6]


def test_bad_prompt_files_name_the_option_and_the_problem(tmp_path):
    dm = PromptDataModule(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match=r"data.train_prompts=.*missing.txt.*no such file"):
        dm.setup("fit")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="contains no prompt"):
        PromptDataModule(str(empty)).setup("fit")
    wrong = tmp_path / "prompts.csv"
    wrong.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"must end in one of \('.txt', '.jsonl'\)"):
        PromptDataModule(str(wrong)).setup("fit")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="line 2 is not valid UTF-8"):
        list(iter_prompt_file(str(latin1)))


def test_group_size_and_batch_options_are_validated():
    with pytest.raises(ValueError, match="data.group_size must be an integer >= 2"):
        PromptDataModule("p.txt", group_size=1)
    with pytest.raises(ValueError, match="data.prompts_per_batch must be an integer >= 1"):
        PromptDataModule("p.txt", prompts_per_batch=0)


def test_more_ranks_than_prompts_is_refused(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("only one\n")
    with pytest.raises(ValueError, match="at least as many prompts as there are ranks"):
        _take(PromptStream(str(path), 2, 1, rank=1, world_size=2), 1)
