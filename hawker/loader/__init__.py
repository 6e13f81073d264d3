"""Checkpoint loading: HF directories (safetensors) and GGUF files."""
