"""fluxlab: a research workbench for FLUX LoRA training and inference.

Nothing heavy is imported here: `import fluxlab` must stay cheap so the CLI
and notebooks start fast. Import the submodules you need.
"""

__version__ = "0.1.0"
