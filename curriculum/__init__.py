"""Helpers beside the recipe (the training script next to this folder): the processes and the environment they
run in (processes), stop signals, resume and a full disk (faults), batch_size: auto (batch_size), speed patches of
library internals (speed) and the errors the recipe raises (errors). Nothing here is an entry point, and nothing
here imports the recipe back."""
