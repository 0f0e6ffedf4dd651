"""Helpers beside the recipe (train_qlora_qwen3vl.py, next to this folder), each module named for what it holds:
config (the config's types and each group of keys' checks) and typed_yaml (the loader), records and data_files (a
split read and checked), adapter_files, stage_folder, stage_record and lineage (what a stage reads and writes, and the
stages it continues), hashing, recipe_check (the static check, and what trained a stage), base_model, step and
answer_loss (what runs in a training step), batch_size, plan and speed (its size and speed), evaluation, scoring and
plots (what the model answers), forgetting (earlier stages watched, replayed), faults, processes and errors (signals,
resume, full disks, several processes, exit codes). Nothing here is an entry point, and nothing here imports the
scripts back."""
