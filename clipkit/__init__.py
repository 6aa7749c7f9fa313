"""clipkit: CLIP-style contrastive pretraining on WebDataset shards under Hugging Face Accelerate."""

__version__ = "0.1.0"
