"""cwa_dist: critical-weight analysis for transformer language models, scaled out on Ray.

Glossary (used the same way in every module):

- *weight*: one scalar element of a model parameter, addressed by (parameter name, flat index).
- *score*: a metric's value for one weight (e.g. |g·w|); higher means more critical.
- *shard*: the contiguous slice of a parameter's flattened tensor that one rank owns
  (the whole tensor when the gradient stage runs in one process).
- *candidate*: a weight that a shard proposes for the global top-K, with its score.
- *chunk*: a fixed-length slice of token ids; *calibration* chunks feed gradients,
  disjoint *evaluation* chunks measure perplexity.
- *rank* is a process of the gradient worker group (torch.distributed vocabulary);
  an *actor* is a Ray actor, e.g. one evaluation actor holding one model replica.
- *spec*: one perturbation experiment (which weights, which mode) sent to an actor.
"""

__version__ = "0.1.0"
