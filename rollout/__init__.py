"""Generation engines (vLLM, HF) behind one interface, and weight sync."""
