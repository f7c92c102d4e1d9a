"""Random checkpoints in the files users download, at any size, written without torch and without a model hub.

Notebook 05 follows a downloaded FLUX.1 GGUF from file to image on a machine with no model hub:
`write_flux_files` writes a tiny FLUX.1 as users have it: a transformer in BFL's names as city96 publishes it (Q4_K
and Q8_0 blocks), BFL's `ae.safetensors`, ComfyUI's `clip_l.safetensors` and `t5xxl_fp16.safetensors`. The shape
functions give each file's names and shapes at any size (their defaults are the released models', which
`benchmarks/bench_memory.py` and `bench_convert.py` write at full size, one tensor at a time): FLUX's and SD3's
transformers, the VAE, CLIP and T5. They are spelled out from the code that wrote the released files (BFL's
`flux/model.py` and `autoencoder.py`, SAI's `mmdit.py`, transformers' CLIPTextModel and T5EncoderModel), not derived
from our converter's tables, so the converter reads them as it reads the real files: every config from the shapes.

gguf-py quantizes Q8_0 but has no Q4_K encoder, so `quantize_q4_k` is one: ggml's 256-value super-block with eight
32-value sub-blocks, each `d * sc * q - dmin * m` with 6-bit `sc` and `m`. It picks each sub-block's scale and
minimum from its range, simpler than llama.cpp's search (`make_qkx2_quants`) and a little less accurate; any valid
block decodes by the same formula, which is what a reader is tested on.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np

QK_K = 256
HEAD_DIM = 128  # FLUX's RoPE axes (16, 56, 56) fix its head width; the converter reads it from the norms


def _linear(s, prefix, out_dim, in_dim, bias=True):
    s[prefix + "weight"] = (out_dim, in_dim)
    if bias:
        s[prefix + "bias"] = (out_dim,)


def _norm(s, prefix, dim, bias=True, name="weight"):
    s[prefix + name] = (dim,)
    if bias:
        s[prefix + "bias"] = (dim,)


def flux_transformer(*, hidden=3072, double=19, single=38, mlp_ratio=4.0, context_dim=4096, pooled_dim=768,
                     guidance=False, in_channels=64) -> dict[str, tuple]:
    """Names -> shapes of BFL's FLUX.1 transformer (`flux/model.py` Flux); the defaults are FLUX.1-schnell's,
    `guidance=True` adds dev's guidance embedder. Heads are 128 wide."""
    if hidden % HEAD_DIM:
        raise ValueError(f"hidden size {hidden} is not a multiple of FLUX's {HEAD_DIM}-wide heads")
    mlp = int(hidden * mlp_ratio)
    s: dict[str, tuple] = {}
    _linear(s, "img_in.", hidden, in_channels)
    _linear(s, "txt_in.", hidden, context_dim)
    for name, in_dim in [("time_in", 256), ("vector_in", pooled_dim)] + ([("guidance_in", 256)] if guidance else []):
        _linear(s, f"{name}.in_layer.", hidden, in_dim)
        _linear(s, f"{name}.out_layer.", hidden, hidden)
    for i in range(double):
        for side in ("img", "txt"):
            b = f"double_blocks.{i}.{side}_"
            _linear(s, b + "mod.lin.", 6 * hidden, hidden)
            _linear(s, b + "attn.qkv.", 3 * hidden, hidden)
            _norm(s, b + "attn.norm.query_norm.", HEAD_DIM, bias=False, name="scale")
            _norm(s, b + "attn.norm.key_norm.", HEAD_DIM, bias=False, name="scale")
            _linear(s, b + "attn.proj.", hidden, hidden)
            _linear(s, b + "mlp.0.", mlp, hidden)
            _linear(s, b + "mlp.2.", hidden, mlp)
    for i in range(single):
        b = f"single_blocks.{i}."
        _linear(s, b + "linear1.", 3 * hidden + mlp, hidden)
        _linear(s, b + "linear2.", hidden, hidden + mlp)
        _norm(s, b + "norm.query_norm.", HEAD_DIM, bias=False, name="scale")
        _norm(s, b + "norm.key_norm.", HEAD_DIM, bias=False, name="scale")
        _linear(s, b + "modulation.lin.", 3 * hidden, hidden)
    _linear(s, "final_layer.linear.", in_channels, hidden)
    _linear(s, "final_layer.adaLN_modulation.1.", 2 * hidden, hidden)
    return s


def sd3_transformer(*, depth=24, head_dim=64, context_dim=4096, pooled_dim=2048, pos_max=192, in_channels=16,
                    patch=2) -> dict[str, tuple]:
    """Names -> shapes of SAI's SD3 MMDiT (`mmdit.py`, as in `sd3_medium.safetensors` without its prefix); the defaults
    are SD3 Medium's: width 64 x depth, the last context block `pre_only` (no output projection, no MLP)."""
    h = head_dim * depth
    s: dict[str, tuple] = {"pos_embed": (1, pos_max * pos_max, h)}
    s["x_embedder.proj.weight"], s["x_embedder.proj.bias"] = (h, in_channels, patch, patch), (h,)
    _linear(s, "t_embedder.mlp.0.", h, 256)
    _linear(s, "t_embedder.mlp.2.", h, h)
    _linear(s, "y_embedder.mlp.0.", h, pooled_dim)
    _linear(s, "y_embedder.mlp.2.", h, h)
    _linear(s, "context_embedder.", h, context_dim)
    for i in range(depth):
        for side in ("x_block", "context_block"):
            b = f"joint_blocks.{i}.{side}."
            pre_only = side == "context_block" and i == depth - 1
            _linear(s, b + "adaLN_modulation.1.", (2 if pre_only else 6) * h, h)
            _linear(s, b + "attn.qkv.", 3 * h, h)
            if not pre_only:
                _linear(s, b + "attn.proj.", h, h)
                _linear(s, b + "mlp.fc1.", 4 * h, h)
                _linear(s, b + "mlp.fc2.", h, 4 * h)
    _linear(s, "final_layer.linear.", patch * patch * in_channels, h)
    _linear(s, "final_layer.adaLN_modulation.1.", 2 * h, h)
    return s


def vae(*, channels=128, multipliers=(1, 2, 4, 4), res_blocks=2, latent_channels=16) -> dict[str, tuple]:
    """Names -> shapes of the LDM autoencoder of FLUX.1 and SD3 (BFL's `ae.safetensors`, SAI's `first_stage_model.`
    without the prefix; no quant convs); the defaults are the released ones. 32 norm groups: widths are multiples
    of 32."""
    s: dict[str, tuple] = {}

    def conv(prefix, c_out, c_in, k):
        s[prefix + "weight"], s[prefix + "bias"] = (c_out, c_in, k, k), (c_out,)

    def resnet(prefix, c_in, c_out):
        _norm(s, prefix + "norm1.", c_in)
        conv(prefix + "conv1.", c_out, c_in, 3)
        _norm(s, prefix + "norm2.", c_out)
        conv(prefix + "conv2.", c_out, c_out, 3)
        if c_in != c_out:
            conv(prefix + "nin_shortcut.", c_out, c_in, 1)

    def middle(prefix, c):
        resnet(prefix + "mid.block_1.", c, c)
        _norm(s, prefix + "mid.attn_1.norm.", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}mid.attn_1.{p}.", c, c, 1)
        resnet(prefix + "mid.block_2.", c, c)

    widths = [channels * m for m in multipliers]
    conv("encoder.conv_in.", channels, 3, 3)
    c = channels
    for i, out in enumerate(widths):
        for j in range(res_blocks):
            resnet(f"encoder.down.{i}.block.{j}.", c, out)
            c = out
        if i != len(widths) - 1:
            conv(f"encoder.down.{i}.downsample.conv.", c, c, 3)
    middle("encoder.", c)
    _norm(s, "encoder.norm_out.", c)
    conv("encoder.conv_out.", 2 * latent_channels, c, 3)
    c = widths[-1]
    conv("decoder.conv_in.", c, latent_channels, 3)
    middle("decoder.", c)
    for i in reversed(range(len(widths))):  # the decoder's stages are numbered from the image side
        for j in range(res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}.", c, widths[i])
            c = widths[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv.", c, c, 3)
    _norm(s, "decoder.norm_out.", c)
    conv("decoder.conv_out.", 3, c, 3)
    return s


def clip(*, hidden=768, layers=12, projection=False) -> dict[str, tuple]:
    """Names -> shapes of transformers' CLIPTextModel as ComfyUI's `clip_l.safetensors` / `clip_g.safetensors` hold
    it (the latter with `text_projection`): 49,408 tokens, 77 positions, MLP 4 x width. Defaults: CLIP-L."""
    t = "text_model."
    s: dict[str, tuple] = {t + "embeddings.token_embedding.weight": (49408, hidden),
                           t + "embeddings.position_embedding.weight": (77, hidden)}
    for i in range(layers):
        b = f"{t}encoder.layers.{i}."
        for p in ("q", "k", "v", "out"):
            _linear(s, f"{b}self_attn.{p}_proj.", hidden, hidden)
        _norm(s, b + "layer_norm1.", hidden)
        _linear(s, b + "mlp.fc1.", 4 * hidden, hidden)
        _linear(s, b + "mlp.fc2.", hidden, 4 * hidden)
        _norm(s, b + "layer_norm2.", hidden)
    _norm(s, t + "final_layer_norm.", hidden)
    if projection:
        s["text_projection.weight"] = (hidden, hidden)
    return s


def t5_encoder(*, d_model=4096, layers=24, heads=64, d_kv=64, d_ff=10240) -> dict[str, tuple]:
    """Names -> shapes of transformers' T5EncoderModel (v1.1, gated GELU) as `t5xxl_fp16.safetensors` holds it: 32,128
    tokens, the embedding as `encoder.embed_tokens`, relative position buckets in the first block. Defaults: T5-XXL."""
    inner = heads * d_kv
    s: dict[str, tuple] = {"encoder.embed_tokens.weight": (32128, d_model)}
    for i in range(layers):
        b = f"encoder.block.{i}.layer."
        for p in ("q", "k", "v"):
            _linear(s, f"{b}0.SelfAttention.{p}.", inner, d_model, bias=False)
        _linear(s, f"{b}0.SelfAttention.o.", d_model, inner, bias=False)
        if i == 0:
            s[b + "0.SelfAttention.relative_attention_bias.weight"] = (32, heads)
        _norm(s, b + "0.layer_norm.", d_model, bias=False)
        _linear(s, b + "1.DenseReluDense.wi_0.", d_ff, d_model, bias=False)
        _linear(s, b + "1.DenseReluDense.wi_1.", d_ff, d_model, bias=False)
        _linear(s, b + "1.DenseReluDense.wo.", d_model, d_ff, bias=False)
        _norm(s, b + "1.layer_norm.", d_model, bias=False)
    _norm(s, "encoder.final_layer_norm.", d_model, bias=False)
    return s


# ---------------------------------------------------------------------------------------------------------------
# random values


def random_tensor(name: str, shape: tuple, seed: int = 0) -> mx.array:
    """A float32 MLX array for one tensor, the same for the same name, shape and seed whatever else is written: norm
    scales 1 and their biases 0, other biases and embedding tables small, weights of unit gain (std 1/sqrt(fan in)).
    Values are uniform with that std: MLX draws uniform numbers ~5x faster than normal ones, which matters at 12 B."""
    key = mx.random.key((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 31))
    if len(shape) == 1 and ("norm" in name or name.endswith(".scale")):
        return (mx.zeros if name.endswith(".bias") else mx.ones)(shape, dtype=mx.float32)
    if "embed_tokens" in name:  # T5 normalises its input by RMS, so the table's scale washes out
        std = 1.0
    elif len(shape) == 1 or any(k in name for k in ("embedding", "pos_embed", "relative_attention_bias")):
        std = 0.02
    else:
        std = math.prod(shape[1:]) ** -0.5
    return mx.random.uniform(-std * 3 ** 0.5, std * 3 ** 0.5, shape, key=key)


def tensors(shapes: dict[str, tuple], seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of `shapes` as float32 numpy arrays (for small models; `save_safetensors` streams large ones)."""
    return {name: np.array(random_tensor(name, shape, seed)) for name, shape in shapes.items()}


def save_safetensors(path, shapes: dict[str, tuple], *, seed: int = 0, dtype: str = "float32", prefix: str = "",
                     writer=None) -> Path:
    """Write random tensors of `shapes` one at a time (any size fits in memory) as `dtype`, names behind `prefix`.
    `writer`: an open SafetensorsWriter to add to instead (combined files); the caller closes it."""
    from ..io.safetensors import SafetensorsWriter

    own = writer is None
    writer = SafetensorsWriter(path) if own else writer
    try:
        for name, shape in shapes.items():
            writer.add(prefix + name, random_tensor(name, shape, seed).astype(getattr(mx, dtype)))
    except BaseException:
        writer.abort()
        raise
    if own:
        writer.close()
    return writer.path


# ---------------------------------------------------------------------------------------------------------------
# GGUF


def quantize_q4_k(a: np.ndarray) -> np.ndarray:
    """float (rows, cols), cols a multiple of 256 -> (rows, cols / 256 * 144) uint8 Q4_K blocks, ggml's layout:
    fp16 d, fp16 dmin, 12 bytes of packed 6-bit (scale, min) pairs, 128 bytes of 4-bit codes."""
    a = np.asarray(a, np.float32)
    if a.ndim != 2 or a.shape[1] % QK_K:
        raise ValueError(f"Q4_K takes rows of whole 256-value super-blocks, not shape {a.shape}")
    x = a.reshape(-1, 8, 32)  # (super-blocks, sub-blocks, values)
    lo = np.minimum(x.min(-1), 0.0)
    step = (x.max(-1) - lo) / 15
    d = (step.max(-1) / 63).astype(np.float16)
    dmin = (-lo.min(-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(step, df, out=np.zeros_like(step), where=df > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(np.divide(-lo, dminf, out=np.zeros_like(lo), where=dminf > 0)), 0, 63).astype(np.uint8)
    scale, offset = (df * sc)[..., None], (dminf * mn)[..., None]
    q = np.clip(np.round(np.divide(x + offset, scale, out=np.zeros_like(x), where=scale > 0)), 0, 15).astype(np.uint8)

    packed = np.empty((x.shape[0], 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    pairs = q.reshape(-1, 4, 2, 32)  # sub-blocks 2p and 2p+1 share 32 bytes: low nibbles, then high
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), packed, qs], axis=1)
    return blocks.reshape(a.shape[0], -1)


def city96_type(name: str, a: np.ndarray, kind: str = "Q4_K") -> str:
    """The GGUF type a city96-style file gives a FLUX tensor: vectors stay F32, the blocks' matrices take `kind`
    where their rows are whole super-blocks, every other matrix Q8_0 where its rows are whole 32-value blocks."""
    if a.ndim != 2 or a.shape[1] % 32:
        return "F32"
    if kind != "Q8_0" and "blocks." in name and a.shape[1] % QK_K == 0:
        return kind
    return "Q8_0"


def write_gguf(path, arrays: dict[str, np.ndarray], *, arch="flux", types=city96_type) -> dict[str, str]:
    """Write `arrays` (original names) as a GGUF file, each as `types(name, array)` says (F32, Q8_0 or Q4_K);
    returns name -> type."""
    import gguf
    from gguf import GGMLQuantizationType as T

    path = Path(path)
    chosen = {}
    w = gguf.GGUFWriter(str(path), arch)
    for name, a in arrays.items():
        qtype = types(name, a)
        if qtype == "F32":
            w.add_tensor(name, np.asarray(a, np.float32))
        else:
            data = quantize_q4_k(a) if qtype == "Q4_K" else gguf.quants.quantize(np.asarray(a, np.float32), T[qtype])
            w.add_tensor(name, data, raw_dtype=T[qtype])
        chosen[name] = qtype
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return chosen


def write_flux_files(folder, *, hidden=256, double=1, single=1, guidance=False, seed=0) -> dict[str, Path]:
    """A tiny FLUX.1 as users download it, in `folder` (made if missing): {"transformer": a city96-style Q4_K / Q8_0
    GGUF, "vae": ae.safetensors, "clip_l": clip_l.safetensors, "t5": t5xxl_fp16.safetensors}; CLIP-L and T5 64
    wide, the VAE 32-64 channels. Other sizes: the shape functions above with `write_gguf` / `save_safetensors`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = 64
    files = {"transformer": folder / f"flux1-tiny-{'dev' if guidance else 'schnell'}-Q4_K.gguf"}
    write_gguf(files["transformer"], tensors(flux_transformer(hidden=hidden, double=double, single=single,
                                                              context_dim=width, pooled_dim=width,
                                                              guidance=guidance), seed))
    files["vae"] = save_safetensors(folder / "ae.safetensors", vae(channels=32, multipliers=(1, 2, 2, 2),
                                                                   res_blocks=1), seed=seed)
    files["clip_l"] = save_safetensors(folder / "clip_l.safetensors", clip(hidden=width, layers=2), seed=seed)
    files["t5"] = save_safetensors(folder / "t5xxl_fp16.safetensors",
                                   t5_encoder(d_model=width, layers=2, heads=2, d_kv=32, d_ff=128), seed=seed,
                                   dtype="float16")
    return files
