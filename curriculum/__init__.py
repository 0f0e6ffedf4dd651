"""Helpers beside the recipe (train_qlora_qwen3vl.py): speed patches of library internals and the errors the
recipe raises. Nothing here is an entry point, and nothing here imports the recipe back."""
