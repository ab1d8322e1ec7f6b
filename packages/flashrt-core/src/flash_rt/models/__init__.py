"""Model blocks shared by several model packages (SigLIP, Gemma, the PaliGemma tokenizer and
checkpoint formats). Model-agnostic; each model's own file composes them."""
