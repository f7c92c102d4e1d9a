"""Parity of the MLX CLIP and T5 text encoders with transformers (CLIPTextModel, CLIPTextModelWithProjection,
T5EncoderModel) on tiny random models fed real prompts tokenized as the pipelines do (CLIP padded to 77, T5 to 256).

Sizes are odd on purpose (3 heads, head dims 16 and 8) so that nothing hard-coded can pass. Loading goes through
`sanitize` from both a live state_dict and the files `save_pretrained` writes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from helpers import CLIP_TOKENIZER, T5_TOKENIZER, init_weights_, max_rel_err, mx, torch_to_mlx
from mlx_diffusion.models import clip, t5

TOL = 1e-4
PROMPTS = ["a photo of a cat", "an astronaut riding a green horse on the moon, 35mm film, highly detailed"]
OTHER = ["a photo of a dog", "an astronaut riding a green horse on the moon, 35mm film, highly detailed"]


@pytest.fixture(scope="module")
def clip_ids():
    tok = transformers.CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER))
    return [tok(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            for p in (PROMPTS, OTHER)]


@pytest.fixture(scope="module")
def t5_tokens():
    tok = transformers.AutoTokenizer.from_pretrained(str(T5_TOKENIZER))
    return [tok(p, padding="max_length", max_length=256, truncation=True, return_tensors="pt")
            for p in (PROMPTS, OTHER)]


def _mx_ids(ids: torch.Tensor) -> mx.array:
    return mx.array(ids.numpy().astype(np.int32))


def _load(model, state_dict: dict, sanitize) -> None:
    model.load_weights(list(sanitize(state_dict).items()), strict=True)


# ----------------------------------------------------------------------------------------------------------- CLIP

CLIP_CASES = {
    # CLIP-L-like: FLUX's pooled encoder (CLIPTextModel), quick_gelu, odd head count.
    "L-quick_gelu": dict(cls="CLIPTextModel", hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=3, hidden_act="quick_gelu"),
    # CLIP-G-like: SD3's second encoder, exact GELU, with projection.
    "G-gelu-proj": dict(cls="CLIPTextModelWithProjection", hidden_size=64, intermediate_size=96,
                        num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu", projection_dim=40),
    # Pre-2023 configs (openai/clip-vit-large-patch14) say eos_token_id 2: pooled at argmax(ids).
    "legacy-eos2-proj": dict(cls="CLIPTextModelWithProjection", hidden_size=48, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=3, hidden_act="quick_gelu", projection_dim=24,
                             eos_token_id=2, bos_token_id=0, pad_token_id=1),
    "gelu_new": dict(cls="CLIPTextModel", hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                     num_attention_heads=2, hidden_act="gelu_new"),
}


def _clip_pair(case: str):
    kw = dict(CLIP_CASES[case])
    cls = getattr(transformers, kw.pop("cls"))
    ref = init_weights_(cls(transformers.CLIPTextConfig(**kw)).eval())
    d = ref.config.to_dict() | {"architectures": [cls.__name__]}
    ours = clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(d))
    _load(ours, torch_to_mlx(ref.state_dict()), clip.sanitize)
    return ref, ours


def _clip_ref(ref, ids):
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        # CLIPTextModelWithProjection's output has no pooler_output; its inner CLIPTextModel has.
        inner = ref.text_model(ids) if hasattr(ref, "text_projection") else out
    return out, inner.pooler_output


@pytest.mark.parametrize("case", list(CLIP_CASES))
def test_clip_matches_transformers(case, clip_ids):
    ref, ours = _clip_pair(case)
    ids, other = clip_ids
    r, r_pooled = _clip_ref(ref, ids)
    o = ours(_mx_ids(ids), output_hidden_states=True)

    errs = {
        "last_hidden_state": max_rel_err(o.last_hidden_state, r.last_hidden_state),
        "pooler_output": max_rel_err(o.pooler_output, r_pooled),
        "hidden_states[-2]": max_rel_err(o.hidden_states[-2], r.hidden_states[-2]),
        "hidden_states(all)": max(max_rel_err(a, b) for a, b in zip(o.hidden_states, r.hidden_states, strict=True)),
    }
    if hasattr(ref, "text_projection"):
        errs["text_embeds"] = max_rel_err(o.text_embeds, r.text_embeds)
    else:
        assert o.text_embeds is None
    print(case, {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) < TOL, errs

    # Pooling really happens at each prompt's own EOS (not a padding EOS, not a fixed position).
    eos = (ids == 49407).int().argmax(-1)
    assert eos[0] != eos[1]
    np.testing.assert_array_equal(np.array(ours._eos_positions(_mx_ids(ids))), eos.numpy())

    # The reference is not degenerate: a one-word change moves the pooled output far beyond the tolerance.
    assert r.last_hidden_state.std() > 0.3
    _, r_pooled_other = _clip_ref(ref, other)
    assert max_rel_err(r_pooled_other[0], r_pooled[0]) > 100 * TOL
    assert max_rel_err(r_pooled_other[1], r_pooled[1]) < 1e-6  # the unchanged prompt is unaffected (no leakage)


def test_clip_shorter_sequence(clip_ids):
    """Unpadded / shorter inputs use only the first T position embeddings."""
    ref, ours = _clip_pair("L-quick_gelu")
    ids = clip_ids[0][:, :20]
    r, r_pooled = _clip_ref(ref, ids)
    o = ours(_mx_ids(ids))
    assert o.hidden_states is None
    assert max_rel_err(o.last_hidden_state, r.last_hidden_state) < TOL
    assert max_rel_err(o.pooler_output, r_pooled) < TOL


@pytest.mark.parametrize("case", ["L-quick_gelu", "G-gelu-proj"])
def test_clip_loads_saved_files(case, clip_ids, tmp_path):
    """What `save_pretrained` writes (transformers 5 drops the `text_model.` prefix of a plain CLIPTextModel), and
    the older layout (prefix plus a `position_ids` buffer), both load strictly after `sanitize`."""
    ref, _ = _clip_pair(case)
    ref.save_pretrained(tmp_path)
    saved = mx.load(str(tmp_path / "model.safetensors"))
    legacy = {("" if k.startswith("text_") else "text_model.") + k: v for k, v in saved.items()}
    legacy["text_model.embeddings.position_ids"] = mx.arange(77)[None].astype(mx.int64)

    ids = clip_ids[0]
    r, _ = _clip_ref(ref, ids)
    for weights in (saved, legacy):
        ours = clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(ref.config.to_dict()),
                                  with_projection=hasattr(ref, "text_projection"))
        _load(ours, weights, clip.sanitize)
        o = ours(_mx_ids(ids))
        assert max_rel_err(o.last_hidden_state, r.last_hidden_state) < TOL
        if o.text_embeds is not None:
            assert max_rel_err(o.text_embeds, r.text_embeds) < TOL


def test_clip_config_from_dict():
    d = {"hidden_size": 768, "num_hidden_layers": 12, "hidden_act": "quick_gelu", "eos_token_id": 2,
         "architectures": ["CLIPTextModelWithProjection"], "unknown_key": 1, "projection_dim": 768}
    c = clip.CLIPTextConfig.from_dict(d)
    assert (c.hidden_size, c.eos_token_id, c.with_projection, c.intermediate_size) == (768, 2, True, 2048)
    assert not clip.CLIPTextConfig.from_dict({"architectures": ["CLIPTextModel"]}).with_projection


# ------------------------------------------------------------------------------------------------------------- T5

T5_CASES = {
    # T5 v1.1 (FLUX / SD3): gated-gelu = gelu_new (tanh) gating.
    "v1.1-gated-gelu": dict(d_model=64, d_kv=16, d_ff=64, num_layers=3, num_heads=4, feed_forward_proj="gated-gelu"),
    # Original T5 feed-forward, odd heads, narrow heads, non-default bucket settings.
    "relu-odd": dict(d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=3, feed_forward_proj="relu",
                     relative_attention_num_buckets=16, relative_attention_max_distance=64),
}


def _t5_pair(case: str):
    ref = init_weights_(transformers.T5EncoderModel(transformers.T5Config(**T5_CASES[case])).eval())
    ours = t5.T5EncoderModel(t5.T5Config.from_dict(ref.config.to_dict()))
    _load(ours, torch_to_mlx(ref.state_dict()), t5.sanitize)
    return ref, ours


@pytest.mark.parametrize("case", list(T5_CASES))
def test_t5_matches_transformers(case, t5_tokens):
    ref, ours = _t5_pair(case)
    enc, other = t5_tokens
    with torch.no_grad():
        r = ref(enc.input_ids).last_hidden_state
        r_masked = ref(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        r_other = ref(other.input_ids).last_hidden_state
    o = ours(_mx_ids(enc.input_ids))
    o_masked = ours(_mx_ids(enc.input_ids), attention_mask=mx.array(enc.attention_mask.numpy()))
    errs = {"last_hidden_state": max_rel_err(o, r), "with attention_mask": max_rel_err(o_masked, r_masked)}
    print(case, {k: f"{v:.2e}" for k, v in errs.items()})
    assert o.shape == (2, 256, ref.config.d_model)
    assert max(errs.values()) < TOL, errs

    assert r.std() > 0.3
    assert max_rel_err(r_other[0], r[0]) > 100 * TOL
    assert max_rel_err(r_masked, r) > 100 * TOL  # the mask path is really exercised


def test_t5_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    pos = torch.arange(700)
    rel = pos[None, :] - pos[:, None]
    for num_buckets, max_distance in [(32, 128), (16, 64), (64, 256), (8, 20)]:
        ref = T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance).numpy()
        np.testing.assert_array_equal(t5._relative_position_buckets(700, num_buckets, max_distance), ref)


def test_t5_loads_saved_and_tied_layouts(t5_tokens, tmp_path):
    """save_pretrained writes only `shared.weight`; other files hold `encoder.embed_tokens.weight` too, or only it,
    or a whole encoder-decoder: all load strictly after `sanitize`."""
    ref, _ = _t5_pair("v1.1-gated-gelu")
    ref.save_pretrained(tmp_path)
    saved = mx.load(str(tmp_path / "model.safetensors"))
    assert "encoder.embed_tokens.weight" not in saved
    both = saved | {"encoder.embed_tokens.weight": saved["shared.weight"], "decoder.final_layer_norm.weight":
                    saved["encoder.final_layer_norm.weight"], "lm_head.weight": saved["shared.weight"]}
    only_tied = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in saved.items()}

    ids = t5_tokens[0].input_ids
    with torch.no_grad():
        r = ref(ids).last_hidden_state
    for weights in (saved, both, only_tied):
        ours = t5.T5EncoderModel(t5.T5Config.from_dict(ref.config.to_dict()))
        _load(ours, weights, t5.sanitize)
        assert max_rel_err(ours(_mx_ids(ids)), r) < TOL


def test_t5_config_from_dict():
    # FLUX's text_encoder_2/config.json spells the derived fields out too; they must agree with feed_forward_proj.
    c = t5.T5Config.from_dict({"d_model": 4096, "num_heads": 64, "feed_forward_proj": "gated-gelu",
                               "dense_act_fn": "gelu_new", "is_gated_act": True, "tie_word_embeddings": False})
    assert (c.d_model, c.num_heads, c.is_gated, c.dense_act_fn) == (4096, 64, True, "gelu_new")
    c = t5.T5Config.from_dict({"feed_forward_proj": "gated-silu"})
    assert (c.is_gated, c.dense_act_fn) == (True, "silu")
    c = t5.T5Config.from_dict({"feed_forward_proj": "relu"})
    assert (c.is_gated, c.dense_act_fn) == (False, "relu")


@pytest.mark.parametrize("name", ["gelu", "quick_gelu", "gelu_new", "gelu_pytorch_tanh", "silu"])
def test_activations_match_transformers(name):
    from transformers.activations import ACT2FN

    from mlx_diffusion.backends import cpu

    x = torch.cat([torch.linspace(-30, 30, 20001), torch.randn(100000) * 3, torch.tensor([0.0, 1e-30, -1e-30])])
    expected = ACT2FN[name](x.double()).numpy()
    from mlx_diffusion.models.layers import ACTIVATIONS  # CLIP's and T5's table

    got = np.asarray(ACTIVATIONS[name](mx.array(x.numpy())))
    assert got.dtype == np.float32  # SiLU: up to 2.2e-6 below x = -15, where it underflows to 0
    assert np.all(np.abs(got - expected) <= 2.5e-6 * np.maximum(1.0, np.abs(expected)))
    if cpu._fast(mx.array(x.numpy())):  # the CPU forms in use, not MLX's own
        assert ACTIVATIONS[name] in (cpu.gelu, cpu.quick_gelu, cpu.gelu_tanh, cpu.silu)
