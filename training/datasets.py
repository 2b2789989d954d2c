"""Fine-tuning datasets: JSONL rows -> chat messages -> token ids with completion-only labels.

Two row forms are accepted: instruction ({instruction, input, output}) and chat
({messages: [{role, content}, ...]}, last message from the assistant). Both are rendered with
the tokenizer's chat template; the loss covers only the final assistant turn.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import UserError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def read_rows(path: Path, form: str) -> list[list[dict]]:
    """Each row as a list of chat messages."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{number}: not valid JSON") from None
            rows.append(_to_messages(row, form, f"{path}:{number}"))
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def _to_messages(row: dict, form: str, where: str) -> list[dict]:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object")
    if form == "chat" or (form == "auto" and "messages" in row):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in {"system", "user", "assistant"}
            for m in messages
        ):
            raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        if messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's answer")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
        raise UserError(f"{where}: expected 'instruction' and 'output' strings (or 'messages')")
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def tokenize(messages: list[dict], tokenizer, max_len: int) -> Example:
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=True)
    prompt, full = _ids(prompt), _ids(full)
    if full[: len(prompt)] != prompt:
        raise UserError("the chat template renders the prompt differently inside the full conversation")
    labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt):]
    return Example(full[:max_len], labels[:max_len])


def _ids(rendered) -> list[int]:
    # transformers 5 returns a BatchEncoding-like mapping; older versions a plain list.
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def dataset_fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def collate(batch: list[Example], pad_id: int):
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
