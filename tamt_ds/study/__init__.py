"""The paper's experiments as one command: masks of every method -> pre-training losses ->
fine-tuning -> table, correlations and figures (docs/study.md)."""
