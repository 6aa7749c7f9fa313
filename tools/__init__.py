"""Scripts that use clipkit (benchmarks, studies), run from the repository root as `python -m tools.<name>`."""
