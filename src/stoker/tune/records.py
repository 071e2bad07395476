"""Instruction records for tuning, from JSONL: one record a line, either

    {"prompt": "...", "completion": "..."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

with an optional "task" (a name; multitask prompt tuning learns one prompt per task). A
messages record is rendered with the model's chat template; its last message, the
assistant's, is the completion. The loss counts completion tokens only: a prompt-completion
record's completion ends with the end-of-text token, so the model learns to stop.

Rows of seq_len + 1 tokens hold whole records: packed back to back (in file order, a new
row when the next record does not fit) when packing is on, one record a row otherwise; the rest of a row is end-of-text
padding that counts for nothing. A row's targets are its next tokens, -100 where no loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stoker.models.gpt import IGNORE_INDEX


class RecordError(ValueError):
    """A bad record or records file; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    ids: list[int]  # prompt then completion
    n_prompt: int  # the first n_prompt ids carry no loss
    task: int  # index into the file's task names (0 when records name none)


def _text(value, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or len(value) < 2:
        raise RecordError(f"{where}: messages must be a list of at least two messages (the last the assistant's)")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or not {"role", "content"} <= set(m):
            raise RecordError(f"{where}: messages[{k}] must be an object with a role and a content")
        if m["role"] not in ("system", "user", "assistant"):
            raise RecordError(f"{where}: messages[{k}].role must be system, user or assistant, got {m['role']!r}")
        out.append({"role": m["role"], "content": _text(m["content"], where, f"messages[{k}].content")})
    if out[-1]["role"] != "assistant":
        raise RecordError(f"{where}: the last message must be the assistant's: it is the completion to learn")
    return out


def read_records(path: str | Path, tok, max_tokens: int, tasks: list[str] | None = None) -> tuple[list[Example], list[str]]:
    """The examples of a JSONL file, tokenized, and the task names in order of first use (or
    `tasks` as given, extended by new names). RecordError, naming the file and line, for a
    record that is not valid JSON, lacks its fields, has an empty completion, or is longer
    than `max_tokens`."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: cannot read records ({e})") from None
    names = list(tasks or [])
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(rec, dict):
            raise RecordError(f"{where}: a record must be a JSON object")
        unknown = set(rec) - {"prompt", "completion", "messages", "task"}
        if unknown:
            raise RecordError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; a record has prompt and "
                              "completion, or messages, and optionally task")
        if "messages" in rec:
            if "prompt" in rec or "completion" in rec:
                raise RecordError(f"{where}: give messages, or prompt and completion, not both")
            msgs = _messages(rec["messages"], where)
            try:
                prompt = tok.chat_ids(msgs[:-1], add_generation_prompt=True)
                full = tok.chat_ids(msgs, add_generation_prompt=False)
            except ValueError as e:
                raise RecordError(f"{where}: {e}") from None
            if full[:len(prompt)] != prompt:
                raise RecordError(f"{where}: the chat template renders the conversation so that it does not start "
                                  "with its own prompt; the completion cannot be told apart")
            completion = full[len(prompt):]
        elif "prompt" in rec and "completion" in rec:
            prompt = tok.encode(_text(rec["prompt"], where, "prompt"))
            text = _text(rec["completion"], where, "completion")
            completion = tok.encode(text) + [tok.eot_id] if text else []
        else:
            raise RecordError(f"{where}: a record needs prompt and completion, or messages")
        if not completion:
            raise RecordError(f"{where}: the completion is empty: nothing to learn")
        ids = prompt + completion
        if len(ids) > max_tokens:
            raise RecordError(f"{where}: the record is {len(ids)} tokens; rows hold {max_tokens} "
                              "(train.seq_len + 1): raise train.seq_len or shorten the record")
        task = rec.get("task", "")
        _text(task, where, "task")
        if task not in names:
            names.append(task)
        out.append(Example(ids, len(prompt), names.index(task)))
    if not out:
        raise RecordError(f"{path}: no records")
    return out, names


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded `fraction` of the records, at least one, for validation."""
    if len(examples) < 2:
        raise RecordError(f"{len(examples)} record(s): a validation split needs at least 2 (or give tune.val_data)")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    val = set(order[:n_val].tolist())
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


class RecordRows:
    """Rows of seq_len + 1 tokens over examples, for stoker.data.loader.DataLoader: row i is a
    (2, seq_len + 1) array of tokens and of targets (the token, or -100 where no loss), and
    `task(i)` its task (rows hold one task's records)."""

    masked = True  # some targets are -100 (stoker.data.loader.DataLoader.target_count)

    def __init__(self, examples: list[Example], seq_len: int, pad_id: int, pack: bool):
        self.seq_len, self.pad_id = seq_len, pad_id
        L = seq_len + 1
        rows: list[list[Example]] = []
        open_row: dict[int, tuple[int, int]] = {}  # task -> (its row being filled, tokens left there)
        for e in examples:
            if len(e.ids) > L:
                raise RecordError(f"a record is {len(e.ids)} tokens; rows hold {L} (train.seq_len + 1)")
            r, left = open_row.get(e.task, (-1, 0))
            if pack and len(e.ids) <= left:  # next fit: the task's current row, else a new one
                rows[r].append(e)
                open_row[e.task] = (r, left - len(e.ids))
            else:
                rows.append([e])
                open_row[e.task] = (len(rows) - 1, L - len(e.ids))
        self._rows = rows
        self.tokens = sum(len(e.ids) for e in examples)

    def __len__(self) -> int:
        return len(self._rows)

    def task(self, i: int) -> int:
        return self._rows[i][0].task

    def __getitem__(self, i: int) -> np.ndarray:
        L = self.seq_len + 1
        out = np.full((2, L), self.pad_id, dtype=np.int64)
        out[1] = IGNORE_INDEX
        at = 0
        for e in self._rows[i]:
            n = len(e.ids)
            out[0, at:at + n] = e.ids
            out[1, at + e.n_prompt:at + n] = e.ids[e.n_prompt:]
            at += n
        return out
