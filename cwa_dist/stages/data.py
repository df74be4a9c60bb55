"""The data stage: texts → windows → the calibration / evaluation split."""

from __future__ import annotations

from dataclasses import replace

from cwa_dist.analysis import stability
from cwa_dist.analysis.data import Split, split_documents, tokenize_documents
from cwa_dist.analysis.evaluate import predicted_tokens
from cwa_dist.stages.context import Context


def prepare(ctx: Context, texts: list[str], tokenizer) -> tuple[Split, dict]:
    """Texts → windows (never spanning two texts) → a split by text, and the facts the summary records."""
    rep, data = ctx.rep, ctx.cfg.data
    documents = tokenize_documents(tokenizer, texts, data.seq_len, data.stride)
    split = split_documents(documents, data.calibration_fraction, data.seed)
    windows = sum(len(d) for d in documents)
    rep.heading("📚 Evaluation Data")
    rolling = f", rolling with stride {data.stride}" if data.stride not in (None, data.seq_len) else ""
    rep.line(f"✅ {len(texts)} texts → {windows} windows of ≤{data.seq_len} tokens (none spans two texts{rolling})")
    facts = {"texts": len(texts), "windows": windows, "seq_len": data.seq_len, "stride": data.stride}
    for name, text_ids, part in (("calibration", split.calibration_texts, split.calibration),
                                 ("evaluation", split.evaluation_texts, split.evaluation)):
        tokens = predicted_tokens(part)
        rep.line(f"✅ {name.capitalize()}: {len(text_ids)} texts, {len(part)} windows ({tokens:,} predicted tokens)")
        facts[name] = {"texts": text_ids, "windows": len(part), "predicted_tokens": tokens}
    if ctx.cfg.analysis.stability_folds:
        split = _with_folds(ctx, split, facts)
    return split, facts


def _with_folds(ctx: Context, split: Split, facts: dict) -> Split:
    """--stability-folds: the calibration texts dealt into folds (refused here, before any gradient,
    when there are fewer texts than folds)."""
    folds, seed = ctx.cfg.analysis.stability_folds, ctx.cfg.data.seed
    texts = stability.text_folds(len(split.calibration_texts), folds, seed)
    windows = stability.window_folds(split.calibration_sizes, texts)
    facts["calibration"]["folds"] = [
        {"texts": [split.calibration_texts[t] for t in t_ids], "windows": len(w),
         "predicted_tokens": predicted_tokens([split.calibration[i] for i in w])}
        for t_ids, w in zip(texts, windows)]
    sizes = ", ".join(f"{f['predicted_tokens']:,}" for f in facts["calibration"]["folds"])
    ctx.rep.line(f"🧪 Stability: {folds} folds of the calibration texts ({sizes} predicted tokens), "
                 "each ranked beside the whole set")
    return replace(split, calibration_folds=tuple(tuple(w) for w in windows))
