"""Model families: one file each (llama.py, and qwen2.py / qwen3.py on top of it), mapped from HF
architecture names in registry.py. A family file holds its decoder layer; base.py the stack of layers and
the LM head every family shares, weights.py the generic checkpoint loading."""
