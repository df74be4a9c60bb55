"""Everything a run writes or prints: the run directory and its schemas, result rows and
summaries, where run directories live (local or object storage), the console, plots, report.html,
provenance and measured memory."""
