"""Helpers beside the recipe (train_qlora_qwen3vl.py, next to this folder), each module named for what it holds:
records and data_files (a split read and checked), adapter_files and stage_folder (what a stage reads and writes),
base_model, answer_loss, trainer_callbacks, batch_size and speed (training), evaluation, scoring and plots (what
the model answers), faults, processes and errors (signals, resume, full disks, several processes, exit codes) and
typed_yaml (the config loader). Nothing here is an entry point, and nothing here imports the scripts back."""
