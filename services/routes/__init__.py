"""HTTP routes: each module translates HTTP to engine calls and nothing else."""
