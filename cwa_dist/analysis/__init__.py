"""The science, as pure torch: texts into windows, sensitivity metrics and their streaming
statistics, exact top-K, perturbation modes and the experiments' targets, perplexity (with replay
from the first changed block), zero-shot task scores (lm-evaluation-harness, imported only where
tasks are asked for), super weights and the single-weight ablation study. Nothing here imports Ray
or torch.distributed; the distributed layer calls into it."""
