"""Model building blocks: tensor-parallel-aware linear layers, norms, rotary, attention."""
