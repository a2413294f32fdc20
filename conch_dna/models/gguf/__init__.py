"""GGUF files: the header read with every length checked, and the import into an mlx-lm model folder."""
