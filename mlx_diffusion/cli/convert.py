"""`mlx-diffusion convert` (also `python tools/convert.py`): a checkpoint -> an MLX model folder, through
`convert.convert`.

    mlx-diffusion convert SOURCE -o weights/NAME [--transformer FILE] [--vae FILE] [--clip-l FILE] [--clip-g FILE]
                          [--t5 FILE] [-q {2,3,4,5,6,8,none}] [--group-size {32,64,128}]
                          [--dtype {float32,float16,bfloat16}] [--force]

SOURCE is a diffusers folder (FLUX.1 or SD3), or a single checkpoint file. `--transformer FILE` takes the
transformer from a single file instead: an original BFL / SAI safetensors file (or one in diffusers naming), or a
GGUF file, whose quantized tensors are repacked losslessly where MLX has the same format
(Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K; others are requantized at -q). `--vae`, `--clip-l`, `--clip-g` (SD3) and `--t5`
take those components from single files (BFL ae.safetensors, ComfyUI's clip_l / clip_g / t5xxl files, SAI's combined
file). With a folder, the folder gives the configs, tokenizers and scheduler; with single files only (SOURCE a file,
or no SOURCE and `--transformer FILE`), the family comes from the transformer's tensor names, the configs from the
tensor shapes, and the tokenizers and scheduler are the released models', shipped with mlx_diffusion:

    mlx-diffusion convert flux1-schnell.safetensors --vae ae.safetensors --clip-l clip_l.safetensors \
                          --t5 t5xxl_fp16.safetensors -o weights/flux-schnell
    mlx-diffusion convert sd3_medium_incl_clips_t5xxlfp16.safetensors -o weights/sd3-medium

`-q none --dtype float32` gives an exact float32 model (the parity path); the default is 4-bit weights with
bfloat16 for what stays unquantized.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..convert import BITS, DTYPES, GROUP_SIZES, MODELS, convert, resolve_model
from ..errors import Error
from . import lora_list, one_line, run


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(path_type=Path), required=False)
@click.option("--model", "model_name", type=click.Choice(list(MODELS)),
              help="Instead of SOURCE: a known model's diffusers repository, fetched or found in the Hugging Face "
                   "cache (HF_HUB_OFFLINE=1: cache only). Not generate's --model, which is a converted folder.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output MLX model folder.")
@click.option("--transformer", type=click.Path(path_type=Path),
              help="Single-file transformer (safetensors or GGUF): instead of the folder's, or with no SOURCE.")
@click.option("--vae", type=click.Path(path_type=Path), help="Single-file VAE (BFL ae.safetensors, SAI, diffusers).")
@click.option("--clip-l", type=click.Path(path_type=Path), help="Single-file CLIP-L text encoder.")
@click.option("--clip-g", type=click.Path(path_type=Path), help="Single-file CLIP-G text encoder (SD3).")
@click.option("--t5", type=click.Path(path_type=Path), help="Single-file T5 text encoder.")
@click.option("-q", "--bits", default="4", show_default=True, type=click.Choice([*map(str, BITS), "none"]),
              help="Quantization bits for Linear weights, or none.")
@click.option("--group-size", default="64", show_default=True, type=click.Choice(list(map(str, GROUP_SIZES))))
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(list(DTYPES)),
              help="dtype of everything not quantized.")
@click.option("--lora", "loras", multiple=True, callback=lora_list, metavar="FILE[:SCALE]",
              help="Bake a LoRA into the converted weights (before quantization) at SCALE [1.0]; repeatable.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(source, model_name, out, transformer, vae, clip_l, clip_g, t5, bits, group_size, dtype, loras, force, quiet):
    """Convert SOURCE (a diffusers FLUX.1 or SD3 folder, or a single checkpoint file) into an MLX model folder."""
    if source is not None and model_name is not None:
        raise click.UsageError("give either SOURCE or --model NAME")
    if source is None and model_name is None and transformer is None:
        raise click.UsageError("give SOURCE, --model NAME or --transformer FILE")
    try:
        if model_name:
            source = resolve_model(model_name)
        convert(source, out, transformer=transformer, vae=vae, clip_l=clip_l, clip_g=clip_g, t5=t5,
                bits=None if bits == "none" else int(bits), group_size=int(group_size), dtype=dtype, force=force,
                progress=not quiet, lora=loras)
    except Error as e:
        raise click.ClickException(one_line(e)) from None


if __name__ == "__main__":
    run(main)
