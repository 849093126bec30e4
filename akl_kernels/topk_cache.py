"""An offline cache of a teacher's top-k log-probabilities (docs/topk_cache.md).

``write_topk_cache`` runs a teacher once over a tokenised dataset and writes, for every sequence
position, its ``k`` most probable tokens and their log-probabilities as a Hugging Face
``datasets`` dataset on disk: the input columns kept, plus Axolotl's knowledge-distillation
columns ``target_token_ids``, ``target_logprobs`` and ``target_mask``. ``load_topk_cache`` (or
plain ``datasets.load_from_disk``) reads it back, memory-mapped;
``akl_kernels.topk_collator.TopKCollator`` makes batches of it for the losses.

Entry ``i`` of a sequence is the teacher's output at position ``i``: its distribution of token
``i + 1``, compared with the student's logits at position ``i`` (Axolotl's trainer and this
library's both shift the labels, not the logits).

The writer goes shard by shard (consecutive sequences, about ``shard_tokens`` tokens each) and
records every finished shard in a manifest, so a run that was interrupted and is started again
with the same arguments goes on after the last finished shard and leaves the same files as a run
that never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from typing import TYPE_CHECKING

import numpy as np
import torch

from akl_kernels import validation as checks
from akl_kernels.topk_teacher import topk_teacher

if TYPE_CHECKING:  # datasets is imported where it is used: an optional dependency
    import datasets

# Axolotl's column names (src/axolotl/integrations/kd/chat_template.py, collator.py, trainer.py).
TARGET_TOKEN_IDS = "target_token_ids"
TARGET_LOGPROBS = "target_logprobs"
TARGET_MASK = "target_mask"
KD_COLUMNS = (TARGET_TOKEN_IDS, TARGET_LOGPROBS, TARGET_MASK)
LABELS = "labels"
ATTENTION_MASK = "attention_mask"
IGNORE_INDEX = -100  # the label of a token that is not scored (Hugging Face, Axolotl)

LOGPROBS_DTYPES = {"float32": 4, "float16": 2}  # bytes per log-probability
MANIFEST = "topk_cache.json"
FORMAT = "akl_kernels.topk_cache"
FORMAT_VERSION = 1
_PARTIAL = ".partial"  # shards being written, and the state.json template of the last one
_SHARD_FILE = re.compile(r"data-\d{5}-of-\d{5}\.arrow")
_READ_ROWS = 65536  # rows per Arrow batch when the lengths are read


def topk_cache_bytes_per_token(k: int, logprobs_dtype: str = "float32") -> int:
    """Bytes the three KD columns take per token: ``k`` int32 token ids, ``k`` log-probabilities
    (4 bytes each, 2 for float16) and ``k`` int8 mask entries. The input columns (e.g.
    ``input_ids``) come on top, and Arrow adds 4 bytes of offsets per sequence and column."""
    checks.check_positive_int("k", k)
    _check_logprobs_dtype(logprobs_dtype)
    return k * (4 + LOGPROBS_DTYPES[logprobs_dtype] + 1)


def write_topk_cache(teacher, dataset, path, *, k: int, temperature: float = 1.0,
                     batch_size: int = 8, input_column: str = "input_ids",
                     shard_tokens: int = 1 << 20, logprobs_dtype: str = "float32",
                     device=None, resume: bool = True,
                     progress: bool = True) -> datasets.Dataset:
    """Run ``teacher`` over ``dataset`` once and write its top-k at ``path``; returns the
    written dataset (``load_topk_cache(path)``).

    - ``teacher``: a causal LM, called as ``teacher(input_ids=..., attention_mask=...)`` on
      right-padded ``[B, L]`` batches under ``torch.no_grad`` (in eval mode, its mode restored
      afterwards), returning logits ``[B, L, V]`` as a tensor or as ``.logits`` (a
      ``transformers`` model, or any callable of that form).
    - ``dataset``: a ``datasets.Dataset`` with a column ``input_column`` of token-id lists, a
      list of such dicts, or a list of token-id sequences. Every column is kept. A ``labels``
      column (-100 where not scored) and an ``attention_mask`` column are honoured.
    - ``k``, ``temperature``: ``topk_teacher(logits, k, temperature)`` per position, i.e. the
      log-probabilities of the teacher's full distribution at that temperature (not
      renormalised over the k tokens).
    - ``shard_tokens``: the tokens per shard (the last sequence may overrun it); a shard is
      held in memory while it is written, ``shard_tokens * topk_cache_bytes_per_token(k)``
      bytes or so.
    - ``logprobs_dtype``: "float32" or "float16" for ``target_logprobs``.
    - ``device``: where the batches go; by default the device of the teacher's parameters.
    - ``resume``: continue an unfinished cache at ``path`` written with the same arguments
      (an error if the arguments differ); ``False`` deletes a cache at ``path`` and starts
      over. A ``path`` holding anything but a top-k cache is never written to.
    - ``progress``: a tqdm progress bar over tokens.
    """
    if not callable(teacher):
        raise TypeError(f"teacher must be callable (a causal LM), got {type(teacher).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    checks.check_positive_int("k", k)
    checks.check_temperature(temperature)
    checks.check_positive_int("batch_size", batch_size)
    checks.check_positive_int("shard_tokens", shard_tokens)
    _check_logprobs_dtype(logprobs_dtype)
    if not isinstance(input_column, str):
        raise TypeError(f"input_column must be a str, got {type(input_column).__name__}")
    checks.check_bool("resume", resume)
    checks.check_bool("progress", progress)
    from tqdm.auto import tqdm

    path = os.fspath(path)
    dataset = _as_dataset(dataset, input_column)
    lengths = _sequence_lengths(dataset, input_column)
    plan = _plan_shards(lengths, shard_tokens)
    settings = {  # what must match for a resume; through JSON, as the manifest stores it
        "k": k, "temperature": float(temperature), "logprobs_dtype": logprobs_dtype,
        "batch_size": batch_size, "input_column": input_column, "shard_tokens": shard_tokens,
        "num_examples": len(dataset), "num_tokens": int(lengths.sum()), "shards": plan,
        "input_features": dataset.features.to_dict(), "teacher": _teacher_signature(teacher),
    }
    settings = json.loads(json.dumps(settings))
    manifest = _start_or_resume(path, settings, resume)
    done = {shard["index"]: shard for shard in manifest["shards_done"]}
    for index, shard in done.items():
        start, stop = plan[index]
        if _inputs_digest(dataset.select(range(start, stop)), input_column) != shard["inputs"]:
            raise ValueError(f"dataset differs from the one {path} was written from (shard "
                             f"{index}, examples {start}..{stop - 1}); pass resume=False to "
                             "start over, or write to another path")
    features = _output_features(dataset, k, logprobs_dtype)
    if device is None:
        device = _teacher_device(teacher)
    done_tokens = sum(int(lengths[plan[i][0]:plan[i][1]].sum()) for i in done)
    with _teacher_in_eval(teacher), tqdm(total=settings["num_tokens"], initial=done_tokens,
                                         unit="tok", desc="teacher top-k",
                                         disable=not progress) as bar:
        for index, (start, stop) in enumerate(plan):
            if index in done:
                continue
            part = dataset.select(range(start, stop))
            table = part.with_format("arrow")[:]
            columns = _teacher_topk_columns(teacher, table, input_column=input_column, k=k,
                                            temperature=temperature, batch_size=batch_size,
                                            device=device, logprobs_dtype=logprobs_dtype,
                                            on_batch=bar.update)
            _save_shard(path, index, len(plan), table, columns, features, settings)
            manifest["shards_done"].append(
                {"index": index, "inputs": _inputs_digest(part, input_column)})
            _write_json(os.path.join(path, MANIFEST), manifest)
    _finish(path, manifest)
    return load_topk_cache(path)


def load_topk_cache(path) -> datasets.Dataset:
    """The finished cache at ``path`` as a memory-mapped ``datasets.Dataset`` (what
    ``datasets.load_from_disk(path)`` gives too). An unfinished one is an error that says how
    to finish it."""
    import datasets

    manifest = _read_manifest(os.fspath(path))
    if manifest is None:
        raise FileNotFoundError(f"{path} holds no top-k cache (no {MANIFEST})")
    if not manifest["complete"]:
        raise ValueError(f"{path} holds an unfinished top-k cache ({len(manifest['shards_done'])}"
                         f" of {len(manifest['settings']['shards'])} shards); run "
                         "write_topk_cache again with the same arguments to finish it")
    return datasets.load_from_disk(os.fspath(path))


def _check_logprobs_dtype(logprobs_dtype) -> None:
    if logprobs_dtype not in LOGPROBS_DTYPES:
        raise ValueError(f"logprobs_dtype must be one of {tuple(LOGPROBS_DTYPES)}, got "
                         f"{logprobs_dtype!r}")


def _as_dataset(dataset, input_column):
    """``dataset`` as a ``datasets.Dataset`` with a token-id list column ``input_column`` and
    no KD columns yet."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        pass
    elif isinstance(dataset, (list, tuple)) and dataset and all(
            isinstance(example, dict) for example in dataset):
        dataset = datasets.Dataset.from_list(list(dataset))
    elif isinstance(dataset, (list, tuple)) and dataset:
        dataset = datasets.Dataset.from_dict(
            {input_column: [torch.as_tensor(ids).tolist() for ids in dataset]})
    else:
        raise TypeError("dataset must be a datasets.Dataset, a non-empty list of dicts or a "
                        f"non-empty list of token-id sequences, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    if input_column not in dataset.column_names:
        raise ValueError(f"dataset has no column input_column={input_column!r} (columns: "
                         f"{dataset.column_names})")
    taken = [name for name in KD_COLUMNS if name in dataset.column_names]
    if taken:
        raise ValueError(f"dataset already has the column(s) {taken} that the cache writes")
    return dataset


def _sequence_lengths(dataset, input_column) -> np.ndarray:
    """The token count of every example (int64), read from Arrow without decoding rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths = []
    for batch in dataset.with_format("arrow").iter(batch_size=_READ_ROWS):
        column = batch.column(input_column)
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or \
                not pa.types.is_integer(column.type.value_type):
            raise TypeError(f"column {input_column!r} must hold lists of token ids (integers), "
                            f"got Arrow type {column.type}")
        if column.null_count:
            raise ValueError(f"column {input_column!r} has missing (null) sequences")
        lengths.append(pc.list_value_length(column).to_numpy().astype(np.int64))
    lengths = np.concatenate(lengths)
    if (lengths == 0).any():
        raise ValueError(f"example {int(np.flatnonzero(lengths == 0)[0])} has no tokens: the "
                         "teacher cannot run on an empty sequence")
    return lengths


def _plan_shards(lengths, shard_tokens) -> list[list[int]]:
    """``[start, stop)`` example ranges of about ``shard_tokens`` tokens each, in order."""
    ends = np.cumsum(lengths)
    plan, start, base = [], 0, 0
    while start < len(lengths):
        # The first example whose running total reaches the budget closes the shard.
        stop = int(np.searchsorted(ends, base + shard_tokens, side="left")) + 1
        stop = min(max(stop, start + 1), len(lengths))
        plan.append([start, stop])
        start, base = stop, int(ends[stop - 1])
    return plan


def _teacher_signature(teacher) -> dict:
    """What identifies the teacher without hashing its weights: class, checkpoint name,
    parameter count and dtype."""
    config = getattr(teacher, "config", None)
    signature = {"class": f"{type(teacher).__module__}.{type(teacher).__qualname__}",
                 "name_or_path": getattr(config, "_name_or_path", None) or None}
    if isinstance(teacher, torch.nn.Module):
        parameters = list(teacher.parameters())
        signature["parameters"] = sum(p.numel() for p in parameters)
        signature["dtype"] = str(parameters[0].dtype) if parameters else None
    return signature


def _teacher_device(teacher) -> torch.device:
    if isinstance(teacher, torch.nn.Module):
        for parameter in teacher.parameters():
            return parameter.device
    return torch.device("cpu")


@contextlib.contextmanager
def _teacher_in_eval(teacher):
    """Eval mode (no dropout: the cache must hold the teacher's distribution), then the mode
    the caller had."""
    training = isinstance(teacher, torch.nn.Module) and teacher.training
    if training:
        teacher.eval()
    try:
        yield
    finally:
        if training:
            teacher.train()


def _start_or_resume(path, settings, resume) -> dict:
    """The manifest to continue from: a new one, or that of an unfinished (or finished) cache
    written with the same settings. A cache without a finished shard is started over whatever
    its settings (a first run that failed early, e.g. on a bad ``k``, holds nothing to keep)."""
    manifest = _read_manifest(path)
    if manifest is not None and resume and manifest["shards_done"]:
        if manifest["format_version"] != FORMAT_VERSION:
            raise ValueError(f"{path} holds a top-k cache of format version "
                             f"{manifest['format_version']}, not {FORMAT_VERSION}; pass "
                             "resume=False to start over")
        differ = sorted(name for name in set(settings) | set(manifest["settings"])
                        if settings.get(name) != manifest["settings"].get(name))
        if differ:
            raise ValueError(f"{path} holds a top-k cache written with other arguments (they "
                             f"differ in: {', '.join(differ)}); pass the same arguments to "
                             "resume it, resume=False to start over, or another path")
        return manifest
    if manifest is not None:
        _remove_cache(path)
    elif os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path} exists and is not a top-k cache; write to a new or "
                              "empty directory")
    os.makedirs(path, exist_ok=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "settings": settings,
                "bytes_per_token": topk_cache_bytes_per_token(settings["k"],
                                                              settings["logprobs_dtype"]),
                "shards_done": [], "complete": False}
    _write_json(os.path.join(path, MANIFEST), manifest)
    return manifest


def _read_manifest(path) -> dict | None:
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as file:
            manifest = json.load(file)
    except FileNotFoundError:
        return None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{os.path.join(path, MANIFEST)} is not a top-k cache manifest")
    return manifest


def _remove_cache(path) -> None:
    """The files of the cache at ``path`` (and nothing else there)."""
    for name in os.listdir(path):
        if _SHARD_FILE.fullmatch(name) or name in ("state.json", "dataset_info.json", MANIFEST):
            os.remove(os.path.join(path, name))
    shutil.rmtree(os.path.join(path, _PARTIAL), ignore_errors=True)


def _write_json(file_path, content) -> None:
    """Written to a temporary file and renamed, so a crash leaves the old or the new file."""
    with open(file_path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(content, file, indent=1, sort_keys=True)
    os.replace(file_path + ".tmp", file_path)


def _inputs_digest(dataset, input_column) -> str:
    """SHA-256 of the token ids of ``dataset`` (one shard), to tell a changed dataset on resume."""
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    for batch in dataset.with_format("arrow").iter(batch_size=_READ_ROWS):
        column = batch.column(input_column)
        digest.update(pc.list_value_length(column).to_numpy().astype(np.int64).tobytes())
        digest.update(pc.list_flatten(column).to_numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


def _flat_column(table, name, lengths) -> np.ndarray | None:
    """Column ``name`` of ``table`` flattened to int64 (None if absent), one value per token."""
    import pyarrow.compute as pc

    if name not in table.column_names:
        return None
    column = table.column(name)
    column_lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if column.null_count or not np.array_equal(column_lengths, lengths):
        raise ValueError(f"column {name!r} must give every example one value per token")
    return pc.list_flatten(column).to_numpy().astype(np.int64)


def _teacher_topk_columns(teacher, table, *, input_column, k, temperature, batch_size, device,
                          logprobs_dtype, on_batch) -> dict:
    """The three KD columns of one shard (``table``) as Arrow arrays."""
    import pyarrow.compute as pc

    ids_column = table.column(input_column)
    lengths = pc.list_value_length(ids_column).to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    token_ids = pc.list_flatten(ids_column).to_numpy().astype(np.int64)
    attention = _flat_column(table, ATTENTION_MASK, lengths)
    labels = _flat_column(table, LABELS, lengths)
    out_ids = np.empty((len(token_ids), k), dtype=np.int32)
    out_logprobs = np.empty((len(token_ids), k), dtype=np.dtype(logprobs_dtype))
    # Longest first, so that a batch pads little; the order is fixed by the shard alone.
    order = np.argsort(-lengths, kind="stable")
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        width = int(lengths[rows].max())
        batch_ids = torch.zeros(len(rows), width, dtype=torch.long)
        batch_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, row in enumerate(rows):
            span = slice(offsets[row], offsets[row + 1])
            batch_ids[j, :lengths[row]] = torch.from_numpy(token_ids[span])
            batch_mask[j, :lengths[row]] = 1 if attention is None else torch.from_numpy(
                attention[span])
        with torch.no_grad():
            logits = _teacher_logits(teacher, batch_ids.to(device), batch_mask.to(device))
        top = topk_teacher(logits, k, temperature)
        top_ids, top_logprobs = top.indices.cpu().numpy(), top.logprobs.cpu().numpy()
        for j, row in enumerate(rows):
            span = slice(offsets[row], offsets[row + 1])
            out_ids[span] = top_ids[j, :lengths[row]]
            out_logprobs[span] = top_logprobs[j, :lengths[row]]
        on_batch(int(lengths[rows].sum()))
    scored = _scored_positions(lengths, labels, attention)
    mask = (scored[:, None] & (out_logprobs > -np.inf)).astype(np.int8)
    return {TARGET_TOKEN_IDS: _per_position_lists(out_ids, lengths),
            TARGET_LOGPROBS: _per_position_lists(out_logprobs, lengths),
            TARGET_MASK: _per_position_lists(mask, lengths)}


def _teacher_logits(teacher, input_ids, attention_mask) -> torch.Tensor:
    options = {}
    if getattr(getattr(teacher, "config", None), "use_cache", None) is not None:
        # A transformers model would keep every layer's keys and values for generation.
        options["use_cache"] = False
    output = teacher(input_ids=input_ids, attention_mask=attention_mask, **options)
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or \
            tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise TypeError("teacher must return logits [B, L, V] for input_ids [B, L] (a tensor or "
                        f"an output with .logits), got {type(output).__name__}"
                        + (f" of shape {tuple(logits.shape)}"
                           if isinstance(logits, torch.Tensor) else ""))
    return logits


def _scored_positions(lengths, labels, attention) -> np.ndarray:
    """Per token: does position i predict a scored token i + 1 of its sequence (not past the
    end, label not -100, attended to)? Axolotl's ``target_mask`` (collator_online_teacher.py)."""
    scored = np.ones(int(lengths.sum()), dtype=bool)
    scored[np.cumsum(lengths) - 1] = False  # the last position predicts no token
    # Shifting the flat arrays by one crosses into the next sequence only at last positions.
    if labels is not None:
        scored[:-1] &= labels[1:] != IGNORE_INDEX
    if attention is not None:
        scored[:-1] &= attention[1:] != 0
    return scored


def _per_position_lists(values, lengths):
    """``values`` [tokens, k] as an Arrow list (per example) of fixed-size lists (per position):
    ``k`` values per token and no offsets per position."""
    import pyarrow as pa

    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, inner)


def _output_features(dataset, k, logprobs_dtype):
    """The input columns' features and the KD columns': per example a list over positions of
    ``k`` values."""
    from datasets import Features, Sequence, Value

    return Features({**dataset.features,
                     TARGET_TOKEN_IDS: Sequence(Sequence(Value("int32"), length=k)),
                     TARGET_LOGPROBS: Sequence(Sequence(Value(logprobs_dtype), length=k)),
                     TARGET_MASK: Sequence(Sequence(Value("int8"), length=k))})


def _shard_file(index, count) -> str:
    """The name ``datasets.Dataset.save_to_disk`` gives shard ``index`` of ``count``."""
    return f"data-{index:05d}-of-{count:05d}.arrow"


@contextlib.contextmanager
def _datasets_progress_off():
    """Our bar counts tokens; datasets' own bar per shard would only interleave with it."""
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    enabled = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            enable_progress_bars()


def _save_shard(path, index, count, table, columns, features, settings) -> None:
    """Shard ``index`` as ``path/data-<index>-of-<count>.arrow``, written by ``datasets``
    itself (so ``load_from_disk`` reads it) and renamed into place once complete."""
    import datasets

    content = {name: table.column(name) for name in table.column_names} | columns
    description = json.dumps({"format": FORMAT, "k": settings["k"],
                              "temperature": settings["temperature"],
                              "input_column": settings["input_column"]}, sort_keys=True)
    shard = datasets.Dataset.from_dict(
        content, info=datasets.DatasetInfo(description=description, features=features))
    scratch = os.path.join(path, _PARTIAL, f"shard-{index:05d}")
    shutil.rmtree(scratch, ignore_errors=True)
    with _datasets_progress_off():
        shard.save_to_disk(scratch, num_shards=1)
    os.replace(os.path.join(scratch, _shard_file(0, 1)),
               os.path.join(path, _shard_file(index, count)))
    os.replace(os.path.join(scratch, "dataset_info.json"), os.path.join(path, "dataset_info.json"))
    os.replace(os.path.join(scratch, "state.json"), os.path.join(path, _PARTIAL, "state.json"))
    shutil.rmtree(scratch)


def _finish(path, manifest) -> None:
    """``state.json`` naming every shard (what makes ``datasets.load_from_disk`` see the cache),
    from the template the last shard's ``save_to_disk`` wrote; then the manifest says done."""
    if manifest["complete"]:
        return
    count = len(manifest["settings"]["shards"])
    with open(os.path.join(path, _PARTIAL, "state.json"), encoding="utf-8") as file:
        state = json.load(file)
    state["_data_files"] = [{"filename": _shard_file(i, count)} for i in range(count)]
    # A fingerprint of the content, so that equal caches get equal ones (datasets' is random).
    state["_fingerprint"] = hashlib.sha256(json.dumps(
        [manifest["settings"], manifest["shards_done"]], sort_keys=True).encode()).hexdigest()[:16]
    _write_json(os.path.join(path, "state.json"), state)
    manifest["complete"] = True
    _write_json(os.path.join(path, MANIFEST), manifest)
    shutil.rmtree(os.path.join(path, _PARTIAL), ignore_errors=True)
