"""memlayers' training library: the model, memory parallelism, data, slot statistics, checkpoints,
export and sparse memory finetuning (the kernels are the `kernels` package; tools/ holds the
command-line entry points over both). docs/code-map.md ("Dive into the code") names the modules to read first."""
