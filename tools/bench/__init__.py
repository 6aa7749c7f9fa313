"""clipkit against open_clip_train and CLIP_benchmark at equal settings: `python -m tools.bench.<script> --help`.

docs/benchmarks.md lists every figure with the command that reproduces it; raw results are in docs/bench/*.json.
"""
