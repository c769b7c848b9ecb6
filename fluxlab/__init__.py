"""fluxlab: a research workbench for FLUX LoRA training and inference.

Nothing heavy is imported here: `import fluxlab` must stay cheap so the CLI
and notebooks start fast. Import the submodules you need.
"""

__version__ = "0.1.0"

import logging as _logging

# Without torchvision, transformers warns at every FluxPipeline import that CLIP/Siglip image
# processors fall back to their PIL versions. FLUX never uses those processors (they serve
# IP-adapters), so the note is noise in every command and notebook; other warnings stay.
_logging.getLogger("transformers.utils.import_utils").setLevel(_logging.ERROR)
