"""Measured comparisons of rematc with PyTorch's own memory-saving tools (not tests).

Run ``python benchmarks/compare.py --quick`` (see the README's Benchmarks
section). Modules, one stage each:

    workloads.py   the models, batches and losses, with the blocks a user would checkpoint
    methods.py     one training step per method: plain autograd, checkpoint, SAC, torch.compile, rematc
    compare.py     the driver: build every method in one process, measure, write the report
    report.py      the Markdown table, the goal checks and the memory-vs-time plot
"""
