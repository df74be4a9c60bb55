"""Evaluation text → token chunks, split into disjoint calibration and evaluation sets."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from cwa_dist.errors import UsageError

DEFAULT_TEXT = "default_eval.txt"


def load_texts(data_file: str | None, limit: int | None) -> list[str]:
    """One text per non-blank line of `data_file` (or of the bundled default), at most `limit`."""
    if data_file is None:
        raw = resources.files("cwa_dist").joinpath("resources", DEFAULT_TEXT).read_text(encoding="utf-8")
        source = "the bundled default text"
    else:
        raw = _read_text_file(Path(data_file))
        source = data_file
    texts = [line.strip() for line in raw.splitlines() if line.strip()]
    if not texts:
        raise UsageError(f"data file {source} holds no text (every line is blank); give a file with one text per line")
    return texts[:limit] if limit is not None else texts


def _read_text_file(path: Path) -> str:
    if not path.exists():
        raise UsageError(f"data file {path} does not exist; give --data-file a text file with one text per line")
    if not path.is_file():
        raise UsageError(f"data file {path} is not a regular file; give --data-file a text file with one text per line")
    data = path.read_bytes()
    if b"\x00" in data:
        raise UsageError(f"data file {path} looks binary (it holds NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def tokenize_chunks(tokenizer, texts: list[str], seq_len: int) -> list[torch.Tensor]:
    """Concatenate the texts (separated by EOS where the tokenizer has one) and cut the token
    stream into chunks of `seq_len`; a shorter last chunk is kept if it predicts a token."""
    stream: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    chunks = [torch.tensor(stream[i : i + seq_len], dtype=torch.long) for i in range(0, len(stream), seq_len)]
    return [c for c in chunks if c.numel() >= 2]


@dataclass(frozen=True, slots=True)
class Split:
    calibration: list[torch.Tensor]
    evaluation: list[torch.Tensor]
    calibration_ids: list[int]  # chunk positions, for the record
    evaluation_ids: list[int]


def split_chunks(chunks: list[torch.Tensor], calibration_fraction: float, seed: int) -> Split:
    """A seeded random split of the chunks into two disjoint, non-empty sets."""
    if len(chunks) < 2:
        raise UsageError(
            f"the texts give {len(chunks)} chunk(s), but calibration and evaluation need one each; "
            "add text, raise --eval-limit, or lower --seq-len"
        )
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed)).tolist()
    n_cal = min(len(chunks) - 1, max(1, round(calibration_fraction * len(chunks))))
    cal, ev = sorted(order[:n_cal]), sorted(order[n_cal:])
    return Split([chunks[i] for i in cal], [chunks[i] for i in ev], cal, ev)


def lockstep_batches(chunks: list[torch.Tensor], world_size: int, batch_size: int) -> list[list[list[torch.Tensor]]]:
    """steps[s][r]: the chunks rank r processes in step s (possibly none).

    Chunks go to ranks round-robin; every rank takes the same number of steps, because sharded
    forward and backward passes are collective: a rank out of data still joins with a dummy.
    """
    per_rank = [chunks[r::world_size] for r in range(world_size)]
    steps = max(-(-len(c) // batch_size) for c in per_rank) if chunks else 0
    return [[c[s * batch_size : (s + 1) * batch_size] for c in per_rank] for s in range(steps)]
