"""Train the small built-in text-to-image model from scratch, in MLX, on the synthetic scenes of `synthetic`.

    python -m mlx_diffusion.tiny.train -o weights/tiny [--seed 0] [--vae-steps N] [--steps N] [--batch N] ...

The model is the SD3 architecture at a few million parameters, built from the same modules as the real one, and
it is written as an MLX model folder exactly like the converter writes (through `io.folder`), so `load_pipeline` and
`mlx-diffusion generate` run it through the ordinary SD3 pipeline:
- `vae/`: a 16-channel AutoencoderKL (factor 4: 64x64 images -> 16x16 latents; no mid-block attention), trained
  first (stage 1) as a plain autoencoder (squared error of the pixels and of their differences, a small penalty on
  the latents); its `scaling_factor` and `shift_factor` are then measured on training latents, as SD3's were
  (1 / std, mean);
- `text_encoder/`, `text_encoder_2/`: two small CLIP text encoders with projection (SD3 has CLIP-L and CLIP-G),
  reading the real CLIP BPE tokenizer cut to the tokens the captions use (`tokenizer/`: every caption word
  tokenizes exactly as with the full 49408-token vocabulary; other words fall back to characters). No T5: SD3 runs
  without it, and the model's `max_sequence_length` default is 0, so the context is the CLIP tokens only;
- `transformer/`: an SD3Transformer2DModel (joint attention, fixed sin-cos positions, adaLN-Zero), trained in
  stage 2 together with the text encoders on a pool of scenes encoded once (`--pool`): rectified flow (x_t =
  (1 - t) x0 + t noise, target noise - x0, t logit-normal as SD3, or a mixture of logit-normals moved towards
  noise: `--t-mean`), AdamW with warm-up and cosine decay, captions dropped 10% of the time for classifier-free
  guidance, an exponential moving average of the weights, which is what is saved.

Everything is drawn from `--seed` (data, initialisation, noise), so the same command gives the same weights on the
same machine. The folder is rewritten atomically every `--save-every` steps and at the end; `mlx_diffusion.json`
records the exact command line, the losses and the time.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import click
import numpy as np

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..backends import cpu, jit
from ..convert.converter import released_index
from ..convert.quantize import Policy
from ..io.folder import ComponentWriter, atomic_folder, load_component, read_json, write_info, write_json
from ..models import class_name
from ..models.clip import CLIPTextConfig, CLIPTextModel
from ..models.layers import float_parameters
from ..models.sd3 import SD3Config, SD3Transformer2DModel
from ..models.vae import AutoencoderKL, VAEConfig
from ..pipelines.sd3 import prompt_embeds
from ..pipelines.tokenizers import CLIPTokenizer
from . import synthetic

ASSETS = Path(__file__).parent.parent / "assets"
FULL_CLIP_TOKENIZER = ASSETS / "tokenizers" / "clip"
POOL = 32768  # scenes encoded once for stage 2 (--pool)
# the generation defaults written into the folder (with --image-size): 20 steps, SD3's guidance, no T5 tokens
DEFAULTS = {"steps": 20, "guidance": 7.0, "max_sequence_length": 0}


# --- tokenizer ---------------------------------------------------------------------------------------------------------


def _bpe_derivation(word: str, ranks: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """The pieces of one pre-tokenized word and the merges that made them (lowest rank first, as BPE does)."""
    parts, used = [*word[:-1], word[-1] + "</w>"], []
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == math.inf:
            break
        used.append((parts[i], parts[i + 1]))
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts, used


def small_clip_tokenizer(words, dst: Path, max_length: int, src: Path = FULL_CLIP_TOKENIZER) -> dict:
    """Write a CLIP tokenizer folder whose vocabulary is the full one cut to the byte alphabet, the special tokens
    and the pieces (with their merges, in their original order) that `words` need; returns the special token ids.

    A word tokenizes to the same pieces as with the full vocabulary, because every merge BPE would apply to it is
    kept and ranked as before; only the ids are renumbered (in the original order)."""
    full = CLIPTokenizer.from_folder(src)
    lines = (src / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    ranks = {pair: r for r, pair in enumerate(merges)}
    keep_tokens = {t for t, i in full.vocab.items() if i < 512}  # the 256 byte symbols, alone and ending a word
    keep_tokens |= {"<|startoftext|>", "<|endoftext|>"}
    keep_merges = set()
    for word in words:
        for piece in full.normalize(word).split():
            parts, used = _bpe_derivation(piece, ranks)
            keep_tokens.update(parts)
            keep_tokens.update(a + b for a, b in used)
            keep_merges.update(used)
    vocab = {t: i for i, t in enumerate(sorted(keep_tokens, key=full.vocab.__getitem__))}
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    kept = sorted(keep_merges, key=ranks.__getitem__)
    (dst / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept), encoding="utf-8")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["model_max_length"] = max_length
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"], "vocab_size": len(vocab)}


# --- configs and initialisation ---------------------------------------------------------------------------------------


def make_configs(opts: dict, special_ids: dict) -> dict:
    """Reference-style config.json contents of every component."""
    ch = tuple(opts["vae_channels"])
    vae = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
           "block_out_channels": list(ch), "layers_per_block": 1, "norm_num_groups": opts["vae_groups"],
           "down_block_types": ["DownEncoderBlock2D"] * len(ch), "up_block_types": ["UpDecoderBlock2D"] * len(ch),
           "act_fn": "silu", "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": False,
           "scaling_factor": 1.0, "shift_factor": 0.0, "sample_size": opts["image_size"]}
    tw = opts["text_width"]
    clip = {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "hidden_size": tw,
            "intermediate_size": 4 * tw, "projection_dim": tw, "num_hidden_layers": opts["text_layers"],
            "num_attention_heads": max(1, tw // 32), "max_position_embeddings": opts["max_tokens"],
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, **special_ids}
    factor = 2 ** (len(ch) - 1)
    grid = opts["image_size"] // factor
    heads = opts["width"] // opts["head_dim"]
    transformer = {"_class_name": "SD3Transformer2DModel", "sample_size": grid, "patch_size": 2, "in_channels": 16,
                   "out_channels": 16, "num_layers": opts["depth"], "attention_head_dim": opts["head_dim"],
                   "num_attention_heads": heads, "joint_attention_dim": 2 * tw, "caption_projection_dim": opts["width"],
                   "pooled_projection_dim": 2 * tw, "pos_embed_max_size": grid // 2}
    return {"vae": vae, "text_encoder": clip, "text_encoder_2": dict(clip), "transformer": transformer}


def init_params(model: nn.Module, key, zero=()):
    """Fresh weights: matrices and convs N(0, 1/fan_in), embedding tables N(0, 0.02), norm scales 1, biases 0, and
    the layers matching `zero` (adaLN-Zero modulations, the output projection) 0, so every block starts as the
    identity, as DiT and SD3 initialise them."""
    params = tree_flatten(model.parameters())
    keys = mx.random.split(key, len(params))
    out = []
    for (name, p), k in zip(params, keys):
        leaf = name.rsplit(".", 1)[-1]
        if any(z in name for z in zero) or leaf == "bias":
            v = mx.zeros_like(p)
        elif "embedding" in name and p.ndim == 2:
            v = 0.02 * mx.random.normal(p.shape, key=k)
        elif p.ndim == 1:  # LayerNorm / GroupNorm / RMSNorm scales
            v = mx.ones_like(p)
        else:
            fan_in = int(np.prod(p.shape[1:]))
            v = mx.random.normal(p.shape, key=k) / math.sqrt(fan_in)
        out.append((name, v))
    model.update(tree_unflatten(out))


# --- data ---------------------------------------------------------------------------------------------------------------


def to_model_images(images: np.ndarray) -> mx.array:
    """uint8 (B, H, W, 3) -> float32 in [-1, 1], NHWC (the VAE's layout)."""
    return mx.array(images.astype(np.float32) / 127.5 - 1.0)


class TextEncoders(nn.Module):
    """The two CLIP encoders as the SD3 pipeline uses them (`pipelines.sd3.prompt_embeds`), without T5 and with a T5
    length of 0, both reading the same token ids."""

    def __init__(self, c1: CLIPTextModel, c2: CLIPTextModel):
        super().__init__()
        self.encoders = [c1, c2]

    def __call__(self, ids):
        width = sum(e.config.hidden_size for e in self.encoders)
        return prompt_embeds(self.encoders, (ids, ids), t5_length=0, width=width)


class Trainable(nn.Module):
    def __init__(self, transformer, text):
        super().__init__()
        self.transformer, self.text = transformer, text

    def __call__(self, xt, ids, t):
        seq, pooled = self.text(ids)
        return self.transformer(xt, seq, pooled, t * 1000)


def cosine_lr(peak: float, steps: int, warmup: int):
    warm = optim.linear_schedule(peak / 100, peak, max(1, warmup))
    decay = optim.cosine_decay(peak, max(1, steps - warmup), peak / 50)
    return optim.join_schedules([warm, decay], [max(1, warmup)])


# --- saving ------------------------------------------------------------------------------------------------------------



def save_model(out: Path, models: dict, configs: dict, tokenizer_dir: Path, info: dict, bits=None, dtype="float32"):
    """Write the whole model folder under a temporary sibling name, then swap it in: the components through the
    converter's writer and quantization policy, the released SD3 model index without T5, our scheduler config."""
    with atomic_folder(out) as tmp:
        for c, model in models.items():
            policy = Policy.for_class(class_name(configs[c]), bits)
            writer = ComponentWriter(tmp / c, configs[c], getattr(mx, dtype))
            try:
                for name, a in tree_flatten(model.parameters()):
                    policy.write(writer, name, a)
                writer.close()
            except BaseException:
                writer.abort()
                raise
        for t in ("tokenizer", "tokenizer_2"):
            shutil.copytree(tokenizer_dir, tmp / t)
        (tmp / "scheduler").mkdir()
        write_json(tmp / "scheduler" / "scheduler_config.json", SCHEDULER)
        write_json(tmp / "model_index.json", released_index("sd3", with_t5=False))
        write_info(tmp, bits=bits, dtype=dtype, **info)


SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


# --- training -----------------------------------------------------------------------------------------------------------


def _compiled(state):
    """A training step traced once by `mx.compile` (model, optimiser and random state as its implicit inputs and
    outputs): ~20% faster per transformer step on a CPU; the plain function where MLX cannot fuse."""
    return cpu.compile(inputs=state, outputs=state)


def _bar(total, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def train_vae(vae, opts, rng, log, progress):
    """Stage 1: a plain autoencoder: mean squared reconstruction error of the (optionally noised) latent means, plus
    `vae_edge` x the squared error of its horizontal and vertical differences (edges are where a blurry decoder
    loses shapes, and plain MSE weighs them by their few pixels), plus a small penalty on the latents' mean square
    that keeps them bounded. (L1, or sampling the posterior with a KL term, left the objects faint and grey for the
    first thousands of images: L1's median is the background.)"""
    steps, batch = opts["vae_steps"], opts["vae_batch"]
    opt = optim.AdamW(cosine_lr(opts["vae_lr"], steps, steps // 20), weight_decay=0.0)
    edge, noise = opts.get("vae_edge", 0.0), opts["vae_noise"]

    def loss_fn(model, x):
        mean, logvar = model.encode(x)
        z = mean + noise * mx.random.normal(mean.shape) if noise else mean
        d = model.decode(z) - x
        rec = (d * d).mean()
        loss = rec + opts["vae_kl"] * (mean * mean).mean()
        if edge:
            loss = loss + edge * (((d[:, 1:] - d[:, :-1]) ** 2).mean() + ((d[:, :, 1:] - d[:, :, :-1]) ** 2).mean())
        return loss, rec

    step_fn = nn.value_and_grad(vae, loss_fn)
    state = [vae.state, opt.state, mx.random.state]

    @_compiled(state)
    def train_step(x):
        (loss, rec), grads = step_fn(vae, x)
        opt.update(vae, grads)
        return rec

    size, history = opts["image_size"], []
    with _bar(steps, "vae", progress) as bar:
        for i in range(steps):
            images, _, _ = synthetic.sample(rng, batch, size=size, split="train")
            rec = train_step(to_model_images(images))
            mx.eval(state, rec)
            history.append(float(rec))
            bar.update(1)
            bar.set_postfix(mse=f"{np.mean(history[-20:]):.4f}")
            if (i + 1) % opts["log_every"] == 0 or i + 1 == steps:
                log({"stage": "vae", "step": i + 1, "mse": round(float(np.mean(history[-opts["log_every"]:])), 5)})
    return history


def encode_pool(vae, tokenizer, opts, rng, shift, std, progress, batch=64):
    """Stage 2's data: `pool` training scenes drawn and encoded once (normalised latents NCHW, token ids), since
    encoding every batch afresh cost a fifth of a step; batches are then drawn from it with replacement."""
    n = opts["pool"]
    latents, ids = [], []
    with _bar(n, "encode", progress) as bar:
        for start in range(0, n, batch):
            m = min(batch, n - start)
            images, captions, _ = synthetic.sample(rng, m, size=opts["image_size"], split="train",
                                                   counts=opts.get("counts", synthetic.COUNT_WEIGHTS),
                                                   gap=opts.get("gap"), layout=opts.get("layout", "random"))
            mean, _ = vae.encode(to_model_images(images))
            latents.append(((mean - shift) / std).transpose(0, 3, 1, 2))
            mx.eval(latents[-1])
            ids.append(tokenizer(captions, max_length=opts["max_tokens"]))
            bar.update(m)
    return mx.concatenate(latents), np.concatenate(ids)


def latent_statistics(vae, rng, n=512, size=64, batch=64):
    """(mean, std) of the VAE's latent means over training images: SD3's shift_factor and 1 / scaling_factor."""
    zs = []
    for _ in range(n // batch):
        images, _, _ = synthetic.sample(rng, batch, size=size, split="train")
        mean, _ = vae.encode(to_model_images(images))
        mx.eval(mean)
        zs.append(np.array(mean))
    z = np.concatenate(zs)
    return float(z.mean()), float(z.std())


def _grow_blocks(params: dict, fresh: dict, old: int, new: int) -> dict:
    """A deeper transformer computing exactly what `params` (flat, `old` blocks) computes: blocks 0..old-2 keep
    their places, the last (text stream ends after attention) moves to new-1, and the blocks in between stay as
    `fresh` initialised them, adaLN-Zero with zero modulation, so the identity until training moves them."""
    out = dict(fresh)
    for name, v in params.items():
        parts = name.split(".")
        if parts[0] == "transformer_blocks" and int(parts[1]) == old - 1:
            parts[1] = str(new - 1)
        out[".".join(parts)] = v
    return out


def _load_init(folder: Path, configs: dict, models: dict):
    """Continue from a model folder this command wrote: its configs (the VAE's measured shift and scale included)
    and float weights replace the fresh ones. A transformer may be made deeper (`--depth` above the folder's)."""
    info = read_json(folder / "mlx_diffusion.json")
    if info.get("variant") != "tiny" or info.get("source") != "mlx_diffusion.train":
        raise click.ClickException(f"--init {folder}: not a model folder written by mlx_diffusion.train")
    for c, model in models.items():
        config = read_json(folder / c / "config.json")
        layers = config.get("num_layers", 0), configs[c].get("num_layers", 0)
        grow = c == "transformer" and layers[0] < layers[1] and not config.get("dual_attention_layers")
        free = {"shift_factor", "scaling_factor"} | ({"num_layers"} if grow else set())
        diff = sorted(k for k in config.keys() | configs[c].keys()
                      if k not in free and config.get(k) != configs[c].get(k))
        if diff:
            said = ", ".join(f"{k} {config.get(k)} there, {configs[c].get(k)} here" for k in diff)
            raise click.ClickException(f"--init {folder}: {c} differs from the options' architecture ({said})")
        configs[c] = {**config, "num_layers": layers[1]} if grow else config
        loaded = float_parameters(load_component(folder / c, dtype=mx.float32, tables_in_file=False))
        if grow:
            loaded = tree_unflatten(list(_grow_blocks(dict(tree_flatten(loaded)), dict(tree_flatten(model.parameters())),
                                                      *layers).items()))
        model.update(loaded)
    return info["training"]


def train(opts: dict, out: Path, command: str, progress=True, log=print):
    started = time.time()
    jit.prepare()
    mx.random.seed(opts["seed"])
    rng = np.random.default_rng(opts["seed"])
    key = mx.random.key(opts["seed"])
    k_vae, k_t1, k_t2, k_tr = mx.random.split(key, 4)

    tok_dir = out.parent / f".{out.name}.tokenizer-{os.getpid()}"
    shutil.rmtree(tok_dir, ignore_errors=True)
    try:
        ids = small_clip_tokenizer(synthetic.VOCABULARY, tok_dir, opts["max_tokens"])
        tokenizer = CLIPTokenizer.from_folder(tok_dir)
        configs = make_configs(opts, ids)
        vae = AutoencoderKL(VAEConfig.from_dict(configs["vae"]))
        init_params(vae, k_vae)
        clips = [CLIPTextModel(CLIPTextConfig.from_dict(configs[c])) for c in ("text_encoder", "text_encoder_2")]
        for clip, k in zip(clips, (k_t1, k_t2)):
            init_params(clip, k)
        transformer = SD3Transformer2DModel(SD3Config.from_dict(configs["transformer"]))
        pos = transformer.pos_embed.pos_embed
        init_params(transformer, k_tr, zero=("norm1.linear", "norm1_context.linear", "norm_out.linear", "proj_out"))
        transformer.pos_embed.pos_embed = pos  # the fixed sin-cos table
        transformer.pos_embed.freeze(recurse=False, keys=["pos_embed"])
        init = None
        if opts.get("init"):
            init = _load_init(Path(opts["init"]), configs, {"vae": vae, "text_encoder": clips[0],
                                                             "text_encoder_2": clips[1], "transformer": transformer})
        n_params = {c: sum(v.size for _, v in tree_flatten(m.parameters()))
                    for c, m in (("vae", vae), ("text_encoders", clips[0]), ("transformer", transformer))}
        n_params["text_encoders"] *= 2
        log("parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in n_params.items()))

        records = []

        def record(entry):
            entry["seconds"] = round(time.time() - started, 1)
            records.append(entry)
            if not progress:
                log(json.dumps(entry))

        # stage 1 (an --init folder's VAE is kept as it is unless --vae-steps asks for more)
        vae_history = train_vae(vae, opts, rng, record, progress) if opts["vae_steps"] else []
        vae.freeze()
        if init is None or opts["vae_steps"]:
            shift, std = latent_statistics(vae, rng, size=opts["image_size"])
            configs["vae"].update(shift_factor=shift, scaling_factor=1.0 / std)
        shift, std = configs["vae"]["shift_factor"], 1.0 / configs["vae"]["scaling_factor"]
        if vae_history:
            log(f"vae: mse {np.mean(vae_history[-100:]):.4f}; latent mean {shift:.4f}, std {std:.4f}")

        # stage 2
        model = Trainable(transformer, TextEncoders(*clips))
        steps, batch = opts["steps"], opts["batch"]
        opt = optim.AdamW(cosine_lr(opts["lr"], steps, opts["warmup"]), weight_decay=opts["weight_decay"])
        ema = tree_map(lambda p: p, model.trainable_parameters())

        def loss_fn(m, xt, ids, t, target):
            return ((m(xt, ids, t) - target) ** 2).mean()

        step_fn = nn.value_and_grad(model, loss_fn)
        # a mixture of logit-normal(m, 1) over the --t-mean locations, each sample one of them; SD3: m = 0 alone
        t_means = mx.array(np.atleast_1d(opts.get("t_mean", 0.0)).astype(np.float32))
        state = [model.state, opt.state, mx.random.state]

        @_compiled(state)
        def train_step(x0, ids):
            m = t_means[mx.random.randint(0, t_means.size, (x0.shape[0],))]
            t = mx.sigmoid(m + mx.random.normal((x0.shape[0],)))
            noise = mx.random.normal(x0.shape)
            tt = t[:, None, None, None]
            loss, grads = step_fn(model, (1 - tt) * x0 + tt * noise, ids, t, noise - x0)
            opt.update(model, grads)
            return loss

        empty = tokenizer([""], max_length=opts["max_tokens"])[0]
        history = []

        def save(step):
            size = opts["image_size"]
            info = {
                "family": "sd3", "variant": "tiny", "source": "mlx_diffusion.train", "group_size": 64,
                "defaults": {**DEFAULTS, "width": size, "height": size},
                "components": {c: {"class": class_name(configs[c])} for c in configs},
                "training": {"command": command, "options": opts, "step": step, "parameters": n_params,
                             "vae_mse": round(float(np.mean(vae_history[-100:])), 5) if vae_history else None,
                             **({"init": {"folder": str(opts["init"]), "training": init}} if init else {}),
                             "loss": round(float(np.mean(history[-100:])), 5) if history else None,
                             "seconds": round(time.time() - started, 1), "log": records},
            }
            live = tree_map(lambda p: p, model.trainable_parameters())
            model.update(ema)
            try:
                save_model(out, {"transformer": transformer, "vae": vae, "text_encoder": clips[0],
                                 "text_encoder_2": clips[1]}, configs, tok_dir, info, bits=opts["bits"], dtype=opts["dtype"])
            finally:
                model.update(live)

        opts.setdefault("pool", POOL)
        opts["pool"] = max(1, min(opts["pool"], steps * batch))
        if opts["save_every"]:
            save(0)  # the trained VAE can be inspected while the transformer trains
        pool, pool_ids = encode_pool(vae, tokenizer, opts, rng, shift, std, progress) if steps else (None, None)
        with _bar(steps, "transformer", progress) as bar:
            for i in range(steps):
                pick = rng.integers(len(pool_ids), size=batch)
                ids = pool_ids[pick]
                ids[rng.random(batch) < opts["caption_dropout"]] = empty
                loss = train_step(pool[mx.array(pick)], mx.array(ids))
                d = opts["ema"] if i >= opts["warmup"] else 0.0
                ema = tree_map(lambda e, p: d * e + (1 - d) * p, ema, model.trainable_parameters())
                mx.eval(state, ema, loss)
                history.append(float(loss))
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(history[-50:]):.4f}")
                if (i + 1) % opts["log_every"] == 0 or i + 1 == steps:
                    record({"stage": "transformer", "step": i + 1, "loss": round(float(np.mean(history[-opts["log_every"]:])), 5),
                            "lr": float(opt.learning_rate)})
                if opts["save_every"] and (i + 1) % opts["save_every"] == 0 and i + 1 < steps:
                    save(i + 1)
        save(steps)
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    loss = f" (final loss {np.mean(history[-100:]):.4f})" if history else ""
    log(f"wrote {out} in {time.time() - started:.0f} s{loss}")
    return out


def _list_of(kind, what):
    """A click callback reading a comma-separated option into a tuple of `kind`."""
    def parse(ctx, param, value):
        try:
            return tuple(kind(v) for v in value.split(","))
        except ValueError:
            raise click.BadParameter(f"a comma-separated list of {what}") from None
    return parse


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Model folder to write.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--vae-steps", type=int, default=2500, show_default=True)
@click.option("--vae-batch", type=int, default=8, show_default=True)
@click.option("--vae-lr", type=float, default=3e-3, show_default=True)
@click.option("--vae-kl", type=float, default=1e-4, show_default=True, help="Weight of the latents' mean square.")
@click.option("--vae-noise", type=float, default=0.0, show_default=True, help="Std of noise added to latents.")
@click.option("--vae-channels", default="16,32,64", callback=_list_of(int, "integers"), show_default=True,
              help="VAE block widths (each after the first halves the resolution).")
@click.option("--vae-groups", type=int, default=4, show_default=True)
@click.option("--vae-edge", type=float, default=1.0, show_default=True,
              help="Weight of the squared error of the reconstruction's pixel differences (edges).")
@click.option("--steps", type=int, default=6000, show_default=True, help="Transformer training steps.")
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--pool", type=int, default=POOL, show_default=True,
              help="Training scenes encoded once for the transformer stage (at most steps x batch).")
@click.option("--counts", default="0.5,0.25,0.25", callback=_list_of(float, "numbers"), show_default=True,
              help="Proportions of scenes with 1, 2 and 3 objects in the transformer's training pool.")
@click.option("--gap", type=click.FloatRange(min=0), default=synthetic.GAP, show_default=True,
              help="Least distance in pixels (at 64x64) between the objects of the transformer's training scenes.")
@click.option("--layout", type=click.Choice(["random", "tidy"]), default="random", show_default=True,
              help="How the transformer's training scenes place objects in their region: anywhere, or evenly in a row "
                   "(three in a triangle where a row does not fit) with a little jitter.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--t-mean", default="0", callback=_list_of(float, "numbers"), show_default=True,
              help="Location of the logit-normal noise levels (SD3: 0; > 0 trains high noise more); several, "
                   "comma-separated: an equal mixture.")
@click.option("--warmup", type=int, default=100, show_default=True)
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--ema", type=float, default=0.998, show_default=True)
@click.option("--caption-dropout", type=float, default=0.1, show_default=True)
@click.option("--width", type=int, default=128, show_default=True, help="Transformer width.")
@click.option("--depth", type=int, default=6, show_default=True)
@click.option("--head-dim", type=int, default=32, show_default=True)
@click.option("--text-width", type=int, default=64, show_default=True)
@click.option("--text-layers", type=int, default=3, show_default=True)
@click.option("--max-tokens", type=int, default=16, show_default=True)
@click.option("--image-size", type=int, default=64, show_default=True)
@click.option("--bits", type=click.Choice(["none", "8", "4"]), default="none", show_default=True,
              help="Store the transformer and text encoders quantized.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="How floating-point weights are stored (training is float32).")
@click.option("--init", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Continue from a model folder this command wrote (same architecture options, except a larger "
                   "--depth: new blocks start as identities before the last; --vae-steps 0 keeps its VAE; quantized "
                   "weights continue dequantized); its training record is kept in the new one.")
@click.option("--save-every", type=int, default=500, show_default=True)
@click.option("--log-every", type=int, default=50, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True)
def main(output, force, quiet, **opts):
    """Train the built-in tiny SD3-architecture model on synthetic scenes."""
    if output.exists() and not force:
        raise click.ClickException(f"{output} already exists (use --force to replace it)")
    opts["bits"] = None if opts["bits"] == "none" else int(opts["bits"])
    opts["init"] = str(opts["init"]) if opts["init"] else None
    try:
        synthetic.count_probabilities(opts["counts"])
    except ValueError as e:
        raise click.ClickException(f"--counts: {e}") from None
    if opts["width"] % opts["head_dim"] or opts["image_size"] % (2 ** len(opts["vae_channels"])):
        raise click.ClickException("--width must be a multiple of --head-dim, --image-size of 2 * the VAE factor")
    command = "python -m mlx_diffusion.train " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    train(opts, output, command, progress=not quiet, log=lambda m: click.echo(m, err=True))


if __name__ == "__main__":
    from ..cli import run

    run(main)
