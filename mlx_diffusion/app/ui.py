"""The web demo's page, in Gradio, over `service.Service`: a Generate tab (model picker, prompt, the settings the model
uses, per-step progress, the image with its timings, a PNG download with its settings, a gallery) and a Compare tab
(two models, one prompt and seed, side by side). Its named API endpoint "generate" serves `gradio_client` and scripts.

Every event goes through one queue slot (`concurrency_id`), so two browser tabs never run two generations at once;
the service's worker thread runs them in order anyway. A mistake is a message on the page, never a traceback.
"""

from __future__ import annotations

import os

import gradio as gr

from ..cli import one_line
from ..errors import Error
from ..pipelines import BUILTIN_NAME
from ..tour.prompts import showcase
from .service import ModelLimits, Service, summary

QUEUE = dict(concurrency_limit=1, concurrency_id="mlx_diffusion")
# small images (the built-in model's 64x64) fill the frame, pixels kept sharp
CSS = "#image img, #image_a img, #image_b img {width: 100%; height: 100%; object-fit: contain; " \
      "image-rendering: pixelated;}"


def _limits_text(lim: ModelLimits) -> str:
    most = f", at most {lim.max_size}" if lim.max_size and lim.max_size < 10**5 else ""
    return (f"Width and height: multiples of {lim.size_multiple}{most}; "
            f"default {lim.default_width}x{lim.default_height}, {lim.default_steps} steps.")


def _error(e: BaseException) -> str:
    return f"**Error:** {one_line(e)}"


def build(service: Service) -> gr.Blocks:
    """The page for `service` (its models as they are now; restart the app to see new folders)."""
    models = service.models()
    choices = [(m.label, m.name) for m in models]
    lim = service.limits(BUILTIN_NAME)
    examples = [[p.text] for p in showcase("builtin")] + [[p.text] for p in showcase("real")]

    with gr.Blocks(title="mlx_diffusion", analytics_enabled=False) as demo:
        gr.Markdown("# mlx_diffusion\nFLUX.1 and Stable Diffusion 3 in MLX. The built-in model knows shapes, colours "
                    "and places (try an example); converted models in the models folder appear in the picker.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    model = gr.Dropdown(choices, value=BUILTIN_NAME, label="Model", elem_id="model")
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", visible=lim.uses_negative_prompt,
                                          elem_id="negative")
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=lim.default_steps, step=1, label="Steps", elem_id="steps")
                        guidance = gr.Slider(0.0, 20.0, value=lim.default_guidance or 0.0, step=0.1, label="Guidance",
                                             visible=lim.uses_guidance, elem_id="guidance")
                    with gr.Row():
                        width = gr.Number(lim.default_width, precision=0, label="Width", elem_id="width")
                        height = gr.Number(lim.default_height, precision=0, label="Height", elem_id="height")
                    limits = gr.Markdown(_limits_text(lim), elem_id="limits")
                    with gr.Row():
                        seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                        randomize = gr.Button("Random seed", elem_id="randomize")
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    gr.Examples(examples, inputs=[prompt], label="From the prompt bank")
                with gr.Column():
                    image = gr.Image(label="Image", type="filepath", format="png", interactive=False, height=320,
                                     elem_id="image")
                    status = gr.Markdown(elem_id="status")
                    download = gr.File(label="The PNG, with its settings", elem_id="download")
                    gallery = gr.Gallery(label="Made since the app started", columns=6, height=200,
                                         elem_id="gallery")

        with gr.Tab("Compare"):
            with gr.Row():
                model_a = gr.Dropdown(choices, value=BUILTIN_NAME, label="Model A", elem_id="model_a")
                usable = [m.name for m in models if not m.problem]
                model_b = gr.Dropdown(choices, value=usable[-1], label="Model B", elem_id="model_b")
            compare_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="compare_prompt")
            with gr.Row():
                compare_seed = gr.Number(0, precision=0, label="Seed", elem_id="compare_seed")
                compare_go = gr.Button("Compare", variant="primary", elem_id="compare")
            gr.Markdown("Each model draws with its own default steps, guidance and size; they are loaded one after "
                        "the other, so only one is in memory at a time.")
            with gr.Row():
                image_a = gr.Image(label="A", type="filepath", format="png", interactive=False, height=320,
                                   elem_id="image_a")
                image_b = gr.Image(label="B", type="filepath", format="png", interactive=False, height=320,
                                   elem_id="image_b")
            compare_status = gr.Markdown(elem_id="compare_status")

        # the named API: (prompt, negative_prompt, model, steps, guidance, width, height, seed) -> (PNG, dict)
        api_in = [gr.Textbox(visible=False), gr.Textbox(visible=False), gr.Textbox(visible=False),
                  gr.Number(visible=False), gr.Number(visible=False), gr.Number(visible=False),
                  gr.Number(visible=False), gr.Number(visible=False)]
        api_out = [gr.File(visible=False), gr.JSON(visible=False)]
        api_button = gr.Button(visible=False)

        def on_model(name):
            try:
                lim = service.limits(name)
            except Error as e:
                return (gr.update(),) * 6 + (_error(e),)
            return (gr.update(visible=lim.uses_negative_prompt),
                    gr.update(visible=lim.uses_guidance, value=lim.default_guidance or 0.0),
                    gr.update(value=lim.default_steps), gr.update(value=lim.default_width),
                    gr.update(value=lim.default_height), _limits_text(lim), "")

        def on_generate(name, text, negative_text, steps_, guidance_, width_, height_, seed_,
                        progress=gr.Progress()):
            if not (text or "").strip():
                return None, "**Error:** type a prompt first", gr.update(), gr.update()
            done = [0, steps_ or 1]

            def on_step(step, total):
                done[:] = [step, total]

            try:
                path, info = service.generate(text, negative_text, name, steps_, guidance_, width_, height_, seed_,
                                              on_step=on_step,
                                              on_wait=lambda: progress(tuple(done), desc="denoising"))
            except Error as e:
                return None, _error(e), gr.update(), gr.update()
            return path, summary(info), path, list(service.gallery)

        def on_compare(a, b, text, seed_, progress=gr.Progress()):
            if not (text or "").strip():
                return None, None, "**Error:** type a prompt first"
            out, lines = [], []
            for label, name in (("A", a), ("B", b)):
                try:
                    path, info = service.generate(text, None, name, seed=seed_,
                                                  on_wait=lambda label=label: progress(None, desc=f"model {label}"))
                except Error as e:
                    out.append(None)
                    lines.append(f"{label}: {_error(e)}")
                    continue
                out.append(path)
                lines.append(f"{label}: {summary(info)}")
            return out[0], out[1], "  \n".join(lines)

        def api_generate(text, negative_text, name, steps_, guidance_, width_, height_, seed_):
            try:
                if not (text or "").strip():
                    raise gr.Error("a prompt is needed")
                return service.generate(text, negative_text, name or BUILTIN_NAME, steps_, guidance_, width_,
                                        height_, seed_)
            except Error as e:
                raise gr.Error(one_line(e)) from None

        model.change(on_model, [model], [negative, guidance, steps, width, height, limits, status],
                     api_visibility="private", **QUEUE)
        go.click(on_generate, [model, prompt, negative, steps, guidance, width, height, seed],
                 [image, status, download, gallery], api_visibility="private", **QUEUE)
        randomize.click(lambda: int.from_bytes(os.urandom(4), "little"), None, [seed], api_visibility="private",
                        queue=False)
        compare_go.click(on_compare, [model_a, model_b, compare_prompt, compare_seed],
                         [image_a, image_b, compare_status], api_visibility="private", **QUEUE)
        api_button.click(api_generate, api_in, api_out, api_name="generate", **QUEUE)
    return demo
