"""`python -m cnncli.cli.torchbench train --config C`: the PyTorch training script of `cnncli/bench/torchbench.py`
run as a whole process (for whole-process timings against `cnn train`); its command line is `torch_script` of
`cnncli/cli/bench.py`."""

from cnncli.cli.bench import torch_script

if __name__ == "__main__":
    torch_script(prog_name="python -m cnncli.cli.torchbench")
