"""Running networks: the training loop and its state, checkpoints, optimizers, evaluation, run folders, sweeps,
TensorBoard, plots, predict, ONNX export, the step-memory estimates and the Python API (`cnncli.fit`,
`cnncli.load`). Uses `nn`, `engine`, `data` and `config`; never the CLI."""
