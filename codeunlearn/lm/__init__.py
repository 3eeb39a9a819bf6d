"""The language model as this project uses it: prompts, decoder blocks, generation and scoring, the fine-tuning loop."""
