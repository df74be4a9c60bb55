"""The run's stages, in the order cwa_dist.pipeline calls them:

plan (from the model's config alone; all that --dry-run does) → start (header, run record) →
model → data → sensitivity → ranking → perturbation → export.

Each stage is a function of the Context (settings, console, plan) and what the stages before it
returned; the RunRecord is the only writer of manifest.json and experiment_summary.json.
"""
