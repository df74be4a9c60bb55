"""cwa_dist: critical-weight analysis for transformer language models, scaled out on Ray.

A run (cwa_dist/pipeline.py) is a list of stages (cwa_dist/stages/): plan → start → model → data →
sensitivity → ranking → perturbation → export.

Vocabulary (used the same way in every module, docstring and file):

- *weight*: one scalar element of a model parameter, addressed by (parameter name, flat index).
- *metric*: how a weight is scored (`grad_x_weight` = |g·w|, `grad_squared`, `fisher`, ...);
  a *score* is a metric's value for one weight, higher meaning more critical.
- *window*: a slice of at most `--seq-len` token ids from one text (never two); *calibration*
  windows feed gradients, the other texts' *evaluation* windows measure perplexity. (Older names
  in the code: *chunk*, the same thing; the LM head's row slices are *head chunks*.)
- *rank*: one process of the gradient group (torch.distributed's word); *worker*: the Ray actor
  that is that process. An *actor* without qualification is an evaluation actor, which holds one
  model replica and runs experiments.
- *shard*: the contiguous part of a parameter's flattened tensor that one rank owns (the whole
  tensor when one process runs the gradient stage).
- *candidate*: a weight a shard proposes for the global top-K, with its score; the merged,
  exact top-K is the *ranking* (`rankings.parquet`).
- *experiment* (a *spec* in code): one perturbation of a set of weights, measured and undone.
- *control*: an experiment on weights chosen without the metric (random, largest |W|), the
  baseline a metric's damage is compared with.
- *super weight*: a single weight whose removal destroys the model, found from activation
  outliers of the MLP down-projections, then zeroed alone.
"""

__version__ = "0.1.0"
