"""What a run will need before anything starts: device and dtype, workers and actors, memory per
process against the cluster (the plan --dry-run prints), how many evaluation actors fit once the
gradients are done, and a run's identity and resume."""
