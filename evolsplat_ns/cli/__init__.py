"""Command-line tools (console scripts declared in pyproject.toml)."""

import warnings

# nerfstudio 1.1.5 scripts a few modules with torch.jit, which torch 2.14 deprecates loudly on every import.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
