"""GPU and CPU benchmarks. Run them as modules from the checkout root, or through the CLI:

    python -m benchmarks.train ...      fluxlab bench train ...

Not as `python benchmarks/X.py`: that puts this folder first on sys.path, where `kernels.py`
shadows the `kernels` package transformers probes for, and importing diffusers then fails.
"""
