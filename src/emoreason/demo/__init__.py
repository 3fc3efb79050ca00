"""`emoreason demo`: the pipeline end to end on a CPU (cli), its stages, its report, and the machinery (context)."""
