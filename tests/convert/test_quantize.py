"""The quantization policy: what is stored quantized and what stays in high precision."""

import helpers  # noqa: F401
from mlx_diffusion.convert.quantize import Policy


def _quantizes(name, shape, keep, group_size):
    return Policy(4, group_size, keep).quantizes(name, shape)


def test_quantization_policy():
    keep = (r"^proj_out\.",)
    assert _quantizes("blocks.0.to_q.weight", (128, 64), keep, 64)
    assert not _quantizes("proj_out.weight", (128, 64), keep, 64)
    assert not _quantizes("blocks.0.to_q.bias", (128,), keep, 64)
    assert not _quantizes("blocks.0.to_q.weight", (128, 96), keep, 64)  # width does not fit the group
    assert not _quantizes("conv.weight", (8, 3, 3, 8), keep, 64)


def test_policy_per_component_class():
    vae = Policy.for_class("AutoencoderKL", 4)
    assert vae.bits is None and not vae.quantizes("decoder.mid_block.attentions.0.to_q.weight", (128, 128))
    dit = Policy.for_class("FluxTransformer2DModel", 8, 32)
    assert dit.quantizes("transformer_blocks.0.attn.to_q.weight", (64, 64))
    assert not dit.quantizes("x_embedder.weight", (64, 64)) and not dit.quantizes("proj_out.weight", (64, 64))
    clip = Policy.for_class("CLIPTextModelWithProjection", 4)
    assert not clip.quantizes("text_projection.weight", (64, 64))
    assert not Policy.for_class("T5EncoderModel", None).quantizes("encoder.block.0.layer.0.SelfAttention.q.weight",
                                                                    (64, 64))
