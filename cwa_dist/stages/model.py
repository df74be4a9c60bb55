"""The model stage: what the driver needs of the checkpoint, never its weights."""

from __future__ import annotations

from pathlib import Path

from cwa_dist.analysis.sensitivity import numel, select_parameters
from cwa_dist.errors import UsageError
from cwa_dist.modeling.loading import ModelRef, checkpoint_keys, empty_model, load_config, load_tokenizer
from cwa_dist.modeling.sources import Origin
from cwa_dist.stages.context import Context, LoadedModel


def load(ctx: Context, timings: dict[str, float], origin: Origin) -> LoadedModel:
    """Read what the driver needs of the checkpoint: config, tokenizer, and the parameters' names
    and shapes (from an empty model on the meta device, checked against the tensors' headers). No
    weight is read (or, from the Hub, downloaded) here: workers and actors read them on their nodes."""
    cfg, rep = ctx.cfg, ctx.rep
    with rep.stage("🤖 Loading Model", timings, "model"):
        dtype = ctx.plan.dtype
        rep.line(f"🔄 Loading {cfg.model.name} ...")
        path, ckpt = origin.directory, origin.checkpoint
        config = load_config(path, trust_remote_code=cfg.model.trust_remote_code)
        tokenizer = load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
        skeleton = empty_model(config, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
        checkpoint_keys(skeleton, ckpt)  # every parameter is in the files, in its size: refuse now, not in a worker
        params = dict(skeleton.named_parameters())
        scored = select_parameters(skeleton, include_bias=cfg.analysis.include_bias,
                                   include_norm=cfg.analysis.include_norm)
        shapes = {n: tuple(params[n].shape) for n in scored}
        n_params = sum(p.numel() for p in params.values())
        n_scored = sum(numel(s) for s in shapes.values())
        files = len(ckpt.files)
        rep.line(f"✅ Model: {type(skeleton).__name__} ({origin.kind}), dtype {str(dtype).removeprefix('torch.')}")
        at = f" at commit {origin.revision}" if origin.revision else ""
        rep.line(f"✅ Checkpoint: {path}{at} ({ckpt.nbytes() / 2**30:.2f} GiB in {files} safetensors file(s); "
                 "each worker reads its own part" + (", downloaded on its node" if origin.revision else "") + ")")
        rep.line(f"✅ Parameters: {n_params:,}")
        rep.line(f"✅ Scored: {len(scored)} tensors, {n_scored:,} weights")
        if cfg.analysis.max_k > n_scored:
            raise UsageError(
                f"--topk {cfg.analysis.max_k} is larger than the {n_scored:,} weights being scored; "
                "lower K or score more parameters (--include-bias, --include-norm)"
            )
        # Local sources travel as absolute paths: a worker's working directory may be another.
        where = cfg.model.name if origin.kind == "hub" else str(Path(cfg.model.name).expanduser().resolve())
        model = ModelRef(source=where, checkpoint_dir=str(path), dtype=str(dtype).removeprefix("torch."),
                         trust_remote_code=cfg.model.trust_remote_code, revision=origin.revision)
    return LoadedModel(model=model, tokenizer=tokenizer, scored=scored, shapes=shapes,
                       model_class=type(skeleton).__name__, num_parameters=n_params,
                       model_bytes=n_params * dtype.itemsize, origin=origin)
