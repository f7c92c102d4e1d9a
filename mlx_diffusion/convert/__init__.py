"""Conversion: diffusers folders, original single files and GGUF files -> MLX model folders (`io.folder`).

`converter` plans every component from the file headers and writes them one tensor at a time; `names` maps original
checkpoint names onto diffusers' as tables; `configs` derives configs from tensor shapes; `quantize` is the policy of
what is stored quantized. The command line is `python -m mlx_diffusion convert` (also `tools/convert.py`).
"""

from .converter import BITS, DTYPES, GROUP_SIZES, MODELS, convert, resolve_model

__all__ = ["BITS", "DTYPES", "GROUP_SIZES", "MODELS", "convert", "resolve_model"]
