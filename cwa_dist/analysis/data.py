"""Evaluation text → token chunks, split into disjoint calibration and evaluation sets."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from cwa_dist.analysis.evaluate import Chunk, Window, predicted_tokens
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
        raise UsageError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                         "convert it to UTF-8") from None


def tokenize_documents(tokenizer, texts: list[str], seq_len: int, stride: int | None = None) -> list[list[Chunk]]:
    """Each text tokenised on its own and cut into windows of at most `seq_len` tokens.

    Texts stay documents: no token is inserted between them (an instruct model's EOS is an
    end-of-turn token it never sees between paragraphs) and no window spans two of them. The
    tokenizer's own special tokens are kept (a BOS where its convention prepends one), so only a
    text's first window starts with it. See `document_windows` for `stride`.
    """
    return [document_windows(tokenizer(text, add_special_tokens=True)["input_ids"], seq_len, stride)
            for text in texts]


def document_windows(ids: list[int], seq_len: int, stride: int | None = None) -> list[Chunk]:
    """One text's windows. Without `stride` (or with stride = seq_len) they do not overlap, and each
    predicts all its tokens but its first. With stride < seq_len (rolling context, as
    lm-evaluation-harness scores long texts), each next window ends `stride` tokens later, reads
    up to `seq_len` tokens, and predicts only the tokens no earlier window predicted: every token
    but the text's first is predicted exactly once, with up to seq_len - 1 tokens of context.
    A window that would predict nothing is dropped."""
    stride = seq_len if stride is None else stride
    windows: list[Chunk] = []
    done, end = 1, 0  # tokens [0, done) need no prediction (the first has no context)
    while done < len(ids):
        end = end + stride if end else seq_len  # where the window would end in a longer text
        start = max(0, end - seq_len)
        tokens = torch.tensor(ids[start:end], dtype=torch.long)
        context = done - start  # tokens read but predicted by an earlier window
        if tokens.numel() >= 2:
            windows.append(Window(tokens, context) if context > 1 else tokens)
        done = min(end, len(ids))
    return windows


def tokenize_chunks(tokenizer, texts: list[str], seq_len: int, stride: int | None = None) -> list[Chunk]:
    """All windows of all texts, in order (see `tokenize_documents`)."""
    return [w for doc in tokenize_documents(tokenizer, texts, seq_len, stride) for w in doc]


@dataclass(frozen=True, slots=True)
class Split:
    calibration: list[torch.Tensor]  # windows
    evaluation: list[torch.Tensor]
    calibration_texts: list[int]  # positions of the texts in each set, for the record
    evaluation_texts: list[int]
    calibration_sizes: tuple[int, ...] = ()  # windows of each calibration text, in order
    calibration_folds: tuple[tuple[int, ...], ...] = ()  # --stability-folds: window positions of each fold


def split_documents(documents: list[list[torch.Tensor]], calibration_fraction: float, seed: int) -> Split:
    """A seeded random split of the texts (each with all its windows) into two disjoint,
    non-empty sets, so the ranking is never judged on text it was computed from."""
    usable = [i for i, doc in enumerate(documents) if doc]
    if len(usable) < 2:
        raise UsageError(
            f"the texts give {len(usable)} text(s) with a window to predict, but calibration and evaluation need one "
            "each; add text, raise --eval-limit, or lower --seq-len"
        )
    order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed)).tolist()
    n_cal = min(len(usable) - 1, max(1, round(calibration_fraction * len(usable))))
    cal = sorted(usable[i] for i in order[:n_cal])
    ev = sorted(usable[i] for i in order[n_cal:])
    return Split([w for i in cal for w in documents[i]], [w for i in ev for w in documents[i]], cal, ev,
                 tuple(len(documents[i]) for i in cal))


def lockstep_batches(chunks: list[torch.Tensor], world_size: int, batch_size: int) -> list[list[list[torch.Tensor]]]:
    """steps[s][r]: the chunks rank r processes in step s (possibly none).

    Chunks go to ranks round-robin; every rank takes the same number of steps, because sharded
    forward and backward passes are collective: a rank out of data still joins with a dummy.
    """
    per_rank = [chunks[r::world_size] for r in range(world_size)]
    steps = max(-(-len(c) // batch_size) for c in per_rank) if chunks else 0
    return [[c[s * batch_size : (s + 1) * batch_size] for c in per_rank] for s in range(steps)]


def per_window_steps(chunks: list[torch.Tensor], world_size: int,
                     total_tokens: int) -> list[tuple[list[list[torch.Tensor]], float]]:
    """One step per window, for per-window gradients: (steps[r], N / n_c) with window c on rank
    c mod world_size and no window on the others; N / n_c turns the window's share of the mean
    NLL's gradient back into the gradient of its own mean NLL."""
    out = []
    for c, window in enumerate(chunks):
        step = [[window] if r == c % world_size else [] for r in range(world_size)]
        out.append((step, total_tokens / predicted_tokens([window])))
    return out
