"""The offline top-k cache (akl_kernels.topk_cache) and its collator (akl_kernels.topk_collator),
on a tiny GPT-2 teacher, on CPU."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from akl_kernels import topk_cache  # noqa: E402
from akl_kernels import validation as checks  # noqa: E402
from akl_kernels.topk_cache import (  # noqa: E402
    load_topk_cache,
    topk_cache_bytes_per_token,
    write_topk_cache,
)
from akl_kernels.topk_collator import TopKCollator, topk_teacher_from_batch  # noqa: E402
from akl_kernels.topk_teacher import topk_teacher  # noqa: E402

VOCAB = 97
LENGTHS = (7, 3, 9, 1, 5)
INF = float("inf")


@pytest.fixture(scope="module")
def teacher():
    """A one-layer GPT-2, left in training mode: the writer must switch dropout off itself."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _examples(seed=1):
    """Sequences of different lengths; every other one has a 2-token prompt that is not scored."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for number, length in enumerate(LENGTHS):
        ids = torch.randint(0, VOCAB, (length,), generator=gen).tolist()
        labels = [-100 if number % 2 == 0 and i < 2 else t for i, t in enumerate(ids)]
        examples.append({"input_ids": ids, "labels": labels, "text": f"example {number}"})
    return examples


def _direct_topk(teacher, ids, k, temperature):
    """topk_teacher of the teacher's logits for one sequence alone, in eval mode."""
    teacher.eval()
    try:
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([ids])).logits[0]
    finally:
        teacher.train()
    return topk_teacher(logits, k, temperature)


def _files(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def test_round_trip_equals_topk_teacher_of_the_logits(teacher, tmp_path):
    examples = _examples()
    written = write_topk_cache(teacher, examples, tmp_path / "cache", k=5, temperature=2.0,
                               batch_size=1, shard_tokens=8, progress=False)
    assert teacher.training, "the teacher's mode must be restored"
    cache = load_topk_cache(tmp_path / "cache")
    plain = datasets.load_from_disk(str(tmp_path / "cache"))
    assert len(cache) == len(plain) == len(written) == len(examples)
    assert cache.column_names == ["input_ids", "labels", "text", "target_token_ids",
                                  "target_logprobs", "target_mask"]
    schema = cache.data.schema
    for column, item in (("target_token_ids", "int32"), ("target_logprobs", "float"),
                         ("target_mask", "int8")):
        # Per sequence a list over positions of exactly k values: no offsets per position.
        assert str(schema.field(column).type) == f"list<item: fixed_size_list<item: {item}>[5]>"
    rows = cache.with_format("torch")
    for number, example in enumerate(examples):
        row = rows[number]
        assert plain[number] == cache[number]
        assert cache[number]["input_ids"] == example["input_ids"]
        assert cache[number]["text"] == example["text"]
        direct = _direct_topk(teacher, example["input_ids"], 5, 2.0)
        # Batches of one: the very computation, bit for bit.
        assert torch.equal(row["target_token_ids"].long(), direct.indices)
        assert torch.equal(row["target_logprobs"], direct.logprobs)
        # Position i is scored when token i + 1 exists and its label is not -100 (Axolotl).
        labels = example["labels"]
        scored = [i + 1 < len(labels) and labels[i + 1] != -100 for i in range(len(labels))]
        assert row["target_mask"].tolist() == [[int(s)] * 5 for s in scored]


def test_batched_writing_agrees_with_single_sequences(teacher, tmp_path):
    examples = _examples()
    cache = write_topk_cache(teacher, examples, tmp_path / "cache", k=3, batch_size=3,
                             progress=False).with_format("torch")
    for number, example in enumerate(examples):
        direct = _direct_topk(teacher, example["input_ids"], 3, 1.0)
        assert torch.equal(cache[number]["target_token_ids"].long(), direct.indices)
        torch.testing.assert_close(cache[number]["target_logprobs"], direct.logprobs,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("logprobs_dtype", ["float32", "float16"])
def test_size_on_disk_is_the_stated_bytes_per_token(teacher, tmp_path, logprobs_dtype):
    gen = torch.Generator().manual_seed(2)
    sequences = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (30, 20, 25)]
    k = 16
    cache = write_topk_cache(teacher, sequences, tmp_path / "cache", k=k, progress=False,
                             logprobs_dtype=logprobs_dtype)
    assert cache.features["target_logprobs"].feature.feature.dtype == logprobs_dtype
    tokens = sum(len(s) for s in sequences)
    size = sum(os.path.getsize(tmp_path / "cache" / name)
               for name in os.listdir(tmp_path / "cache") if name.endswith(".arrow"))
    expected = tokens * (topk_cache_bytes_per_token(k, logprobs_dtype) + 4)  # + int32 input ids
    assert topk_cache_bytes_per_token(k, logprobs_dtype) == k * (9 if logprobs_dtype ==
                                                                 "float32" else 7)
    assert expected <= size <= expected + 4096  # schema, offsets and framing


def test_resume_after_an_interruption_gives_the_uninterrupted_files(teacher, tmp_path,
                                                                    monkeypatch):
    options = dict(k=4, temperature=1.5, batch_size=2, shard_tokens=8, progress=False)
    examples = _examples()
    write_topk_cache(teacher, examples, tmp_path / "whole", **options)
    assert len(json.loads((tmp_path / "whole" / "topk_cache.json").read_text())
               ["settings"]["shards"]) == 3

    _crash_after_saving(monkeypatch, shards=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_topk_cache(teacher, examples, tmp_path / "resumed", **options)
    monkeypatch.undo()
    manifest = json.loads((tmp_path / "resumed" / "topk_cache.json").read_text())
    assert [shard["index"] for shard in manifest["shards_done"]] == [0]
    with pytest.raises(ValueError, match="unfinished top-k cache"):
        load_topk_cache(tmp_path / "resumed")
    with pytest.raises(FileNotFoundError):
        datasets.load_from_disk(str(tmp_path / "resumed"))

    calls = []
    hook = teacher.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        write_topk_cache(teacher, examples, tmp_path / "resumed", **options)
    finally:
        hook.remove()
    # Shards 1 (one example) and 2 (two examples) in batches of 2: two calls; shard 0 is kept.
    assert len(calls) == 2
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")
    # A finished cache with the same arguments is left as it is, the teacher not run.
    calls.clear()
    hook = teacher.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        write_topk_cache(teacher, examples, tmp_path / "resumed", **options)
    finally:
        hook.remove()
    assert calls == []


def _crash_after_saving(monkeypatch, shards):
    """Make the writer crash once it has saved ``shards`` shards, the last of them on disk but
    not in the manifest yet: the worst moment to stop."""
    real_save, saved = topk_cache._save_shard, []

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        saved.append(args[1])
        if len(saved) == shards:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(topk_cache, "_save_shard", save_then_crash)


def _interrupted_cache(teacher, path, monkeypatch, examples, options):
    """A cache at ``path`` whose manifest records its first shard only."""
    _crash_after_saving(monkeypatch, shards=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_topk_cache(teacher, examples, path, **options)
    monkeypatch.undo()


@pytest.mark.parametrize("change, message", [
    (dict(k=5), "differ in: k"),
    (dict(temperature=2.0), "differ in: temperature"),
    (dict(batch_size=1), "differ in: batch_size"),
    (dict(logprobs_dtype="float16"), "differ in: logprobs_dtype"),
    (dict(shard_tokens=9), "differ in: shard_tokens"),
])
def test_refuses_to_resume_with_other_arguments(teacher, tmp_path, monkeypatch, change,
                                                message):
    options = dict(k=4, batch_size=2, shard_tokens=8, progress=False)
    examples = _examples()
    _interrupted_cache(teacher, tmp_path / "cache", monkeypatch, examples, options)
    with pytest.raises(ValueError, match=message):
        write_topk_cache(teacher, examples, tmp_path / "cache", **(options | change))
    # resume=False starts over with the new arguments.
    cache = write_topk_cache(teacher, examples, tmp_path / "cache", resume=False,
                             **(options | change))
    assert len(cache) == len(examples)
    assert len(cache[0]["target_token_ids"][0]) == change.get("k", 4)


def test_refuses_to_resume_on_another_dataset(teacher, tmp_path, monkeypatch):
    options = dict(k=4, batch_size=2, shard_tokens=8, progress=False)
    examples = _examples()
    _interrupted_cache(teacher, tmp_path / "cache", monkeypatch, examples, options)
    changed = _examples()
    changed[0]["input_ids"][3] = (changed[0]["input_ids"][3] + 1) % VOCAB  # same lengths
    with pytest.raises(ValueError, match=r"dataset differs .*\(shard 0, "):
        write_topk_cache(teacher, changed, tmp_path / "cache", **options)


def test_never_writes_into_a_directory_that_is_not_a_cache(teacher, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    for resume in (True, False):
        with pytest.raises(FileExistsError, match="not a top-k cache"):
            write_topk_cache(teacher, _examples(), tmp_path / "other", k=2, resume=resume,
                             progress=False)
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


def test_a_run_that_failed_before_any_shard_can_be_rerun_with_other_arguments(teacher,
                                                                               tmp_path):
    with pytest.raises(ValueError, match=r"k must be an int in \[1, V = 97\]"):
        write_topk_cache(teacher, _examples(), tmp_path / "cache", k=VOCAB + 1, progress=False)
    cache = write_topk_cache(teacher, _examples(), tmp_path / "cache", k=3, progress=False)
    assert len(cache[0]["target_logprobs"][0]) == 3


def test_collator_pads_length_and_k():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7],
         "target_token_ids": [[1, 2], [3, 4], [5, 6]],
         "target_logprobs": [[-0.5, -1.5], [-0.25, -2.0], [-0.1, -3.0]],
         "target_mask": [[1, 1], [1, 1], [0, 0]]},
        {"input_ids": [8], "target_token_ids": [[9, 10, 11]],
         "target_logprobs": [[-1.0, -2.0, -3.0]]},
        # Teacher data for fewer positions than tokens, and positions with different k.
        {"input_ids": [1, 2, 3, 4], "attention_mask": [1, 1, 1, 0],
         "target_token_ids": [[7], [8, 9]], "target_logprobs": [[-0.75], [-1.25, -1.75]]},
    ]
    batch = TopKCollator(pad_token_id=50, pad_to_multiple_of=3)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "teacher_topk_indices",
                          "teacher_topk_logprobs"}
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["teacher_topk_indices"].dtype == torch.int64
    assert batch["teacher_topk_logprobs"].dtype == torch.float32
    assert batch["input_ids"].tolist() == [[5, 6, 7, 50, 50, 50], [8, 50, 50, 50, 50, 50],
                                           [1, 2, 3, 4, 50, 50]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0],
                                                [1, 1, 1, 0, 0, 0]]
    # The example's labels, else its ids (-100 where not attended); -100 on padding.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100, -100],
                                        [8, -100, -100, -100, -100, -100],
                                        [1, 2, 3, -100, -100, -100]]
    assert batch["teacher_topk_indices"].shape == (3, 6, 3)
    assert batch["teacher_topk_indices"].tolist() == [
        [[1, 2, 0], [3, 4, 0], [0, 0, 0]] + [[0, 0, 0]] * 3,
        [[9, 10, 11]] + [[0, 0, 0]] * 5,
        [[7, 0, 0], [8, 9, 0]] + [[0, 0, 0]] * 4,
    ]
    assert batch["teacher_topk_logprobs"].tolist() == [
        [[-0.5, -1.5, -INF], [-0.25, -2.0, -INF], [-INF] * 3] + [[-INF] * 3] * 3,
        [[-1.0, -2.0, -3.0]] + [[-INF] * 3] * 5,
        [[-0.75, -INF, -INF], [-1.25, -1.75, -INF]] + [[-INF] * 3] * 4,
    ]
    teacher = topk_teacher_from_batch(batch, tail="renormalize")
    assert teacher.tail == "renormalize" and teacher.shape == (3, 6) and teacher.k == 3
    assert teacher.indices is batch["teacher_topk_indices"]
    # The padding is what the losses accept: repeated index 0 only under -inf, mass <= 1.
    checks.check_topk_values(*teacher.reshape_rows(), vocab=VOCAB)


def test_collator_batches_a_written_cache(teacher, tmp_path):
    examples = _examples()
    cache = write_topk_cache(teacher, examples, tmp_path / "cache", k=4, batch_size=1,
                             progress=False)
    batch = TopKCollator(pad_token_id=0)(list(cache.with_format("torch"))[:3])
    length = batch["input_ids"].shape[1]
    for b, example in enumerate(examples[:3]):
        n = len(example["input_ids"])
        direct = _direct_topk(teacher, example["input_ids"], 4, 1.0)
        scored = torch.tensor(cache[b]["target_mask"])[:, 0].bool()
        # Scored positions carry the teacher's top-k, aligned with the logits; the rest none.
        assert torch.equal(batch["teacher_topk_indices"][b, :n][scored], direct.indices[scored])
        assert torch.equal(batch["teacher_topk_logprobs"][b, :n][scored],
                           direct.logprobs[scored])
        unscored = ~torch.cat([scored, torch.zeros(length - n, dtype=torch.bool)])
        assert torch.isneginf(batch["teacher_topk_logprobs"][b][unscored]).all()
        assert batch["labels"][b, :n].tolist() == example["labels"]


def _axolotl_example():
    """An example as Axolotl's ChatTemplateStrategyWithKD.transform_logprobs leaves it
    (src/axolotl/integrations/kd/chat_template.py): teacher rows for the last 3 of 5 tokens,
    the first rows padding (-inf, ids range(top_k), mask 0), the mask 0 where the label is
    -100; plus a position padded in k as DataCollatorForKD pads (-1e9, id 0, mask 0)."""
    lp = [math.log(0.6), math.log(0.3)]
    return {
        "input_ids": [1, 10, 20, 30, 2], "labels": [-100, -100, 20, 30, 2],
        "attention_mask": [1, 1, 1, 1, 1],
        "target_token_ids": [[0, 1], [0, 1], [20, 21], [30, 31], [2, 0]],
        "target_logprobs": [[-INF, -INF], [-INF, -INF], lp, lp, [math.log(0.9), -1e9]],
        "target_mask": [[0, 0], [0, 0], [1, 1], [1, 1], [1, 0]],
    }


def test_collator_reads_an_axolotl_example():
    example = _axolotl_example()
    batch = TopKCollator(pad_token_id=0)([example])
    lp = example["target_logprobs"][2]
    logprobs = batch["teacher_topk_logprobs"][0]
    assert torch.isneginf(logprobs[:2]).all() and batch["teacher_topk_indices"][0, :2].eq(0).all()
    torch.testing.assert_close(logprobs[2:4], torch.tensor([lp, lp]))
    assert batch["teacher_topk_indices"][0, 2:].tolist() == [[20, 21], [30, 31], [2, 0]]
    # The k-padding under mask 0 becomes -inf, not -1e9.
    assert logprobs[4, 1].item() == -INF
    torch.testing.assert_close(logprobs[4, 0], torch.tensor(math.log(0.9)))
    assert batch["labels"][0].tolist() == example["labels"]

    # Stored by token ("tokens" alignment): each entry moves one position earlier.
    shifted = TopKCollator(pad_token_id=0, alignment="tokens")([example])
    assert torch.equal(shifted["teacher_topk_logprobs"][0, :4], logprobs[1:])
    assert torch.equal(shifted["teacher_topk_indices"][0, :4], batch["teacher_topk_indices"][0, 1:])
    assert torch.isneginf(shifted["teacher_topk_logprobs"][0, 4]).all()


def test_collator_reads_an_axolotl_dataset(tmp_path):
    # Through datasets' own storage of Axolotl's columns (lists of lists, -inf kept).
    dataset = datasets.Dataset.from_list([_axolotl_example()] * 2)
    dataset.save_to_disk(str(tmp_path / "axolotl"))
    loaded = datasets.load_from_disk(str(tmp_path / "axolotl"))
    direct = TopKCollator(pad_token_id=0)([_axolotl_example()] * 2)
    for rows in (list(loaded), list(loaded.with_format("torch"))):
        batch = TopKCollator(pad_token_id=0)(rows)
        for key, value in direct.items():
            assert torch.equal(batch[key], value), key


@pytest.mark.parametrize("options, error, message", [
    (dict(k=0), ValueError, "k must be >= 1"),
    (dict(k=2.0), TypeError, "k must be a positive int"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(shard_tokens=0), ValueError, "shard_tokens must be >= 1"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(logprobs_dtype="bfloat16"), ValueError, "logprobs_dtype must be one of"),
    (dict(input_column="tokens"), ValueError, "no column input_column='tokens'"),
    (dict(resume="yes"), TypeError, "resume must be a bool"),
])
def test_writer_refuses_bad_arguments(teacher, tmp_path, options, error, message):
    with pytest.raises(error, match=message):
        write_topk_cache(teacher, _examples(), tmp_path / "cache", **({"k": 2} | options))


@pytest.mark.parametrize("dataset, error, message", [
    ([], TypeError, "dataset must be a datasets.Dataset"),
    ("not a dataset", TypeError, "dataset must be a datasets.Dataset"),
    ([[1, 2], []], ValueError, "example 1 has no tokens"),
    ([{"input_ids": [1, 2], "target_logprobs": [[0.0], [0.0]]}], ValueError,
     "already has the column"),
    ([{"input_ids": ["a", "b"]}], TypeError, "must hold lists of token ids"),
    ([{"input_ids": [1, 2], "labels": [1]}], ValueError, "'labels' must give every example"),
])
def test_writer_refuses_bad_datasets(teacher, tmp_path, dataset, error, message):
    with pytest.raises(error, match=message):
        write_topk_cache(teacher, dataset, tmp_path / "cache", k=2, progress=False)


def test_writer_refuses_a_teacher_without_logits(tmp_path):
    with pytest.raises(TypeError, match="teacher must be callable"):
        write_topk_cache("gpt2", [[1, 2]], tmp_path / "a", k=2)
    with pytest.raises(TypeError, match=r"teacher must return logits \[B, L, V\]"):
        write_topk_cache(lambda input_ids, attention_mask: input_ids.float(), [[1, 2]],
                         tmp_path / "b", k=1, progress=False)


@pytest.mark.parametrize("options, examples, error, message", [
    (dict(alignment="shifted"), None, ValueError, "alignment must be one of"),
    (dict(pad_to_multiple_of=0), None, ValueError, "pad_to_multiple_of must be None"),
    (dict(pad_token_id=None), None, TypeError, "pad_token_id must be an int"),
    ({}, [], ValueError, "non-empty list of dicts"),
    ({}, [{"input_ids": [1], "target_logprobs": [[0.0]]}], ValueError,
     "example 0 has no 'target_token_ids'"),
    ({}, [{"input_ids": [1], "target_token_ids": [[1, 2]], "target_logprobs": [[0.0]]}],
     ValueError, "differ in shape"),
    ({}, [{"input_ids": [1], "target_token_ids": [[1], [2]], "target_logprobs": [[0.0], [0.0]]}],
     ValueError, "teacher data for 2 positions but 1 tokens"),
    ({}, [{"input_ids": [1, 2], "labels": [1], "target_token_ids": [[1]],
           "target_logprobs": [[0.0]]}], ValueError, "labels has 1 entries for 2 tokens"),
])
def test_collator_refuses_bad_input(options, examples, error, message):
    with pytest.raises(error, match=message):
        TopKCollator(**({"pad_token_id": 0} | options))(examples)


def test_topk_teacher_from_batch_refuses_a_batch_without_teacher():
    with pytest.raises(ValueError, match="batch has no"):
        topk_teacher_from_batch({"input_ids": torch.zeros(1, 1)})
    with pytest.raises(ValueError, match="tail must be one of"):
        topk_teacher_from_batch({}, tail="drop")
