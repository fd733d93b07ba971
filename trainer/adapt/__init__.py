"""Model adaptation: PEFT, pruning, upcycling, the Hugging Face bridge, the DeepSpeed engine."""
