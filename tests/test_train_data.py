"""pemoe.train data: JSONL reading and bad lines, the synthetic multi-task set, batching, the resumable stream."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pemoe.train.data import (
    SYNTHETIC_TASKS,
    BadLineError,
    DataStream,
    encode_batch,
    load_dataset,
    read_jsonl,
    synthetic_multitask,
    write_synthetic,
)
from pemoe.train.tokenizer import ByteTokenizer

GOOD = {"task": "t", "input": "Is 3 odd?", "target": "yes", "choices": ["yes", "no"], "template": "t/0"}


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_jsonl_fields(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps(GOOD), "", json.dumps({"task": "u", "input": "a", "target": "b"})])
    ds = read_jsonl(path)
    assert [e.task for e in ds.examples] == ["t", "u"]
    assert ds.examples[0].choices == ("yes", "no") and ds.examples[0].template == "t/0"
    assert ds.examples[1].choices is None and ds.examples[1].template is None
    assert ds.examples[1].where == f"{path}:3"  # the blank line 2 is ignored, line numbers are the file's
    assert ds.skipped == []


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"task": "t", "input": "a"', "not valid JSON"),
        ('["task", "input", "target"]', "expected a JSON object"),
        ('{"task": "t", "input": "a"}', "missing field 'target'"),
        ('{"task": "t", "input": 3, "target": "b"}', "field 'input' must be a string"),
        ('{"task": "t", "input": "a", "target": "b", "choices": ["c", "d"]}', "not among the choices"),
        ('{"task": "t", "input": "a", "target": "b", "choices": []}', "non-empty list of strings"),
        ('{"task": "t", "input": "a", "target": "b", "choices": ["b", "b"]}', "lists a choice twice"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, reason):
    path = _write(tmp_path / "bad.jsonl", [json.dumps(GOOD), json.dumps(GOOD), line, json.dumps(GOOD)])
    with pytest.raises(BadLineError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(reason)):
        read_jsonl(path)
    ds = read_jsonl(path, skip_bad_lines=True)
    assert len(ds.examples) == 3
    assert len(ds.skipped) == 1 and ds.skipped[0].startswith(f"{path}:3: ") and reason in ds.skipped[0]


def test_only_bad_lines_is_an_error(tmp_path):
    path = _write(tmp_path / "bad.jsonl", ["nope", "{}"])
    with pytest.raises(BadLineError, match="no valid examples.*2 bad line"):
        read_jsonl(path, skip_bad_lines=True)


def test_synthetic_set_shape_and_split():
    data = synthetic_multitask(0, train_per_template=3, eval_per_template=2)
    train_tasks = {e.task for e in data["train"]}
    held = {e.task for e in data["heldout"]}
    assert len(SYNTHETIC_TASKS) >= 36 and len(train_tasks) >= 24 and len(held) >= 10  # dozens of tasks
    assert not train_tasks & held and {e.task for e in data["seen"]} == train_tasks
    for task in SYNTHETIC_TASKS:
        assert len(task.templates) >= 2, task.name
        split = "heldout" if task.held_out else "train"
        templates = {e.template for e in data[split] if e.task == task.name}
        assert len(templates) == len(task.templates)
    for split in data.values():
        for e in split:
            assert e.target in e.choices and len(set(e.choices)) == len(e.choices) >= 2, e
    again = synthetic_multitask(0, train_per_template=3, eval_per_template=2)
    assert [e.to_json() for e in again["heldout"]] == [e.to_json() for e in data["heldout"]]
    other = synthetic_multitask(1, train_per_template=3, eval_per_template=2)
    assert [e.input for e in other["train"]] != [e.input for e in data["train"]]


def test_synthetic_answers_are_right():
    """Recompute some answers from the prompt text alone (independently of the generators)."""
    data = synthetic_multitask(3, train_per_template=10, eval_per_template=10)
    checked = 0
    for e in data["train"] + data["heldout"]:
        if e.template == "is_even/t0":
            n = int(re.fullmatch(r"Is (\d+) even\?", e.input)[1])
            assert e.target == ("yes" if n % 2 == 0 else "no")
        elif e.template == "is_odd/t0":
            n = int(re.fullmatch(r"Is (\d+) odd\?", e.input)[1])
            assert e.target == ("yes" if n % 2 else "no")
        elif e.template == "add/t0":
            a, b = map(int, re.fullmatch(r"(\d+) \+ (\d+) =", e.input).groups())
            assert e.target == str(a + b)
        elif e.template == "reverse_word/t0":
            assert e.target == e.input.removeprefix("Reverse the word: ")[::-1]
        elif e.template == "min_of_three/t0":
            nums = re.fullmatch(r"Smallest of (\d+), (\d+), (\d+)\?", e.input).groups()
            assert e.target == min(nums, key=int)
        else:
            continue
        checked += 1
    assert checked >= 40


def test_write_and_load_synthetic(tmp_path):
    paths = write_synthetic(tmp_path, 0, train_per_template=2, eval_per_template=1)
    ds = read_jsonl(paths["heldout"])
    builtin = load_dataset("synthetic:heldout:seed=0,train=2,eval=1")
    assert [e.to_json() for e in ds.examples] == [e.to_json() for e in builtin.examples]
    with pytest.raises(ValueError, match="splits are train, seen, heldout, pretrain"):
        load_dataset("synthetic:test")
    with pytest.raises(ValueError, match="seed=S,train=N,eval=M"):
        load_dataset("synthetic:train:size=3")


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "Größe 3 + 4 = 7 ✓"
    ids = tok.encode(text)
    assert min(ids) >= 3 and max(ids) < tok.vocab_size == 259
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text


def test_encode_batch_padding_and_shift():
    tok = ByteTokenizer()
    b = encode_batch(tok, ["abcdef", "xy"], ["hello", "no"], max_input_len=5, max_target_len=8, decoder_start_id=0)
    assert b.input_ids.tolist() == [[100, 101, 102, 103, 1], [123, 124, 1, 0, 0]]  # truncated, then eos
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    h = [c + 3 for c in b"hello"]
    assert b.labels.tolist() == [h + [1], [ord("n") + 3, ord("o") + 3, 1, -100, -100, -100]]
    assert b.decoder_input_ids.tolist() == [[0] + h, [0, ord("n") + 3, ord("o") + 3, 1, 0, 0]]  # as T5 shifts
    assert b.decoder_attention_mask.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]  # start + shifted real tokens
    assert (b.num_input_tokens, b.num_target_tokens) == (8, 9)


def test_data_stream_epochs_and_resume():
    s = DataStream(10, 4, seed=5)
    seq = [s.next_indices() for _ in range(6)]  # 24 indices = 2.4 epochs
    flat = [i for b in seq for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # reshuffled each epoch
    a = DataStream(10, 4, seed=5)
    for _ in range(3):
        a.next_indices()
    state = json.loads(json.dumps(a.state_dict()))
    b = DataStream(10, 4, seed=5)
    b.load_state_dict(state)
    assert [b.next_indices() for _ in range(3)] == seq[3:]
    with pytest.raises(ValueError, match="num_examples=10, this run has num_examples=11"):
        DataStream(11, 4, seed=5).load_state_dict(state)
    assert torch.equal(torch.tensor(seq[0]), torch.tensor(DataStream(10, 4, seed=5).next_indices()))


def test_pretrain_corpus_is_task_free():
    data = synthetic_multitask(0, train_per_template=1, eval_per_template=1)
    prompts = [e.input for split in data.values() for e in split]
    corpus = load_dataset("synthetic:pretrain:train=1,eval=1").examples
    assert len(corpus) == len(prompts) and {e.task for e in corpus} == {"denoise"}
    for e, prompt in zip(corpus, prompts, strict=True):  # one span of the prompt blanked out, no answer
        assert e.input.count("_") == 1 and e.input.replace("_", e.target) == prompt
