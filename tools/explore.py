#!/usr/bin/env python
"""Explore PaCa-ViT's clusters in a local web page (Gradio): pick a model and weights, drop an image,
see the prediction and every stage's clusters, click a patch to see what it attends to.

    python tools/explore.py                 # http://127.0.0.1:7860, printed when ready
    python tools/explore.py --port 0 --device cuda

The page computes nothing of its own: the prediction is ``tools/predict.py``'s (its model loading,
pre-processing and drawing) and the clusters are ``models.capture_maps``' records of that same
forward pass (``tools/cluster_explorer.py``).  A click on a patch only draws from those records.
"""
import argparse
import logging
import os
import socket
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves this machine

import gradio as gr
import torch

from tools import cluster_explorer as ce

_logger = logging.getLogger("explore")

DEFAULT_MODEL = "pacavit_tiny_p2cconv_100_0"
MAX_FILE_SIZE = "200mb"
PICTURE_HEIGHT = ce.DISPLAY_SIDE + 40  # the whole picture and the component's label above it
# system fonts: the default theme would make the browser fetch its fonts from the internet
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
WEIGHTS_HELP = "empty: random weights (seed below) · pretrained: the released file · a file path · a URL"


def error_text(message: str) -> str:
    return f"**Error:** {message}"


class Page:
    """The page's handlers, one per action; each returns the values of its outputs.  Bad input gives
    an error line in the status box and leaves the rest of the page as it was."""

    def __init__(self, explorer: ce.Explorer):
        self.explorer = explorer

    def on_task(self, task: str):
        choices = ce.model_choices(task)
        value = DEFAULT_MODEL if task == "classify" else next((c for c in choices if "tiny" in c), choices[0])
        return gr.update(choices=choices, value=value)

    def on_explain(self, task, model, weights, seed, upload, sample):
        """Run the model on the image (or take it from the cache); outputs: status, prediction, stage
        choice, hard map, soft clusters, attention picture, attended clusters, attention line, key."""
        unchanged = (gr.skip(),) * 8
        try:
            source = upload or sample
            if not source:
                raise ce.ExploreError("upload an image or pick a bundled photo")
            if not model:
                raise ce.ExploreError("choose a model (a zoo name, or a config for detect / segment)")
            key = ce.ModelKey(task, model.strip(), (weights or "").strip(), int(seed or 0), self.explorer.device)
            runs = self.explorer.forward_passes
            explanation = self.explorer.explain(key, source)
            label = ce.first_shown(explanation) if explanation.stages else None
            views = self.views(explanation, label) if label else None
        except ce.ExploreError as e:
            return (error_text(str(e)),) + unchanged
        except Exception as e:  # noqa: BLE001  (the page reports it and keeps serving)
            _logger.exception("explain failed")
            return (error_text(f"unexpected {type(e).__name__}: {e}"),) + unchanged
        how = (f"model ran in {explanation.seconds:.1f} s" if self.explorer.forward_passes > runs
               else "from the cache (no model run)")
        lines = [f"**{explanation.title}** · {how}"] + explanation.notes
        if not explanation.stages:
            lines.append("this model recorded no clusters")
            return ("  \n".join(lines), explanation.prediction, gr.update(choices=[], value=None), None, [], None,
                    None, "", explanation.key)
        return ("  \n".join(lines), explanation.prediction,
                gr.update(choices=list(explanation.stages), value=label)) + views + (explanation.key,)

    def views(self, explanation: ce.Explanation, label: str, cell=None):
        """hard map, soft clusters, attention picture, attended clusters, attention line of one stage."""
        stage = explanation.stages[label]
        if stage.view.attention is None:
            return (ce.hard_map(explanation, label), ce.soft_clusters(explanation, label), None, None,
                    "the segmentation head's clusters are the classes; it has no patch attention")
        cell = cell or ce.centre_cell(stage)
        picture, bars, summary = ce.patch_attention(explanation, label, cell)
        return (ce.hard_map(explanation, label, cell), ce.soft_clusters(explanation, label), picture, bars,
                summary + " · click a patch of the hard map to choose another")

    def on_stage(self, key, label):
        """Another stage or block; outputs: status, hard map, soft clusters, attention picture, bars, line."""
        try:
            explanation = self.explorer.explanation(key)
            if label not in explanation.stages:
                raise ce.ExploreError(f"no stage {label!r} in this model")
        except ce.ExploreError as e:
            return (error_text(str(e)),) + (gr.skip(),) * 5
        return (gr.skip(),) + self.views(explanation, label)

    def on_click(self, key, label, evt: gr.SelectData):
        """A click at pixel (x, y) of the hard map; outputs: status, hard map, attention picture, bars, line."""
        try:
            explanation = self.explorer.explanation(key)
            if label not in explanation.stages:
                raise ce.ExploreError("explain an image first, then click a patch of its hard map")
            cell = ce.cell_of(explanation.stages[label], explanation.picture, *evt.index)
            picture, bars, summary = ce.patch_attention(explanation, label, cell)
        except ce.ExploreError as e:
            return (error_text(str(e)),) + (gr.skip(),) * 4
        return gr.skip(), ce.hard_map(explanation, label, cell), picture, bars, summary


def build_page(explorer: ce.Explorer) -> gr.Blocks:
    page = Page(explorer)
    with gr.Blocks(title="PaCa-ViT cluster explorer") as demo:
        gr.Markdown("## PaCa-ViT cluster explorer\nPick a model and weights, then upload an image or pick a "
                    "bundled photo. Click a patch of the hard map to see its attention over the clusters.")
        with gr.Row():
            task = gr.Radio(list(ce.TASKS), value="classify", label="task")
            model = gr.Dropdown(ce.model_choices("classify"), value=DEFAULT_MODEL, label="model",
                                allow_custom_value=True, scale=3)
            weights = gr.Textbox(label="weights", placeholder=WEIGHTS_HELP, scale=3)
            seed = gr.Number(value=0, precision=0, label="seed (random weights)", minimum=0)
        with gr.Row():
            upload = gr.File(label="image", file_count="single", type="filepath", elem_id="upload")
            sample = gr.Dropdown(list(ce.SAMPLES), value=None, label="or a bundled photo (scikit-learn)")
            run = gr.Button("Explain", variant="primary")
        status = gr.Markdown(elem_id="status")
        key = gr.State(None)
        with gr.Row():
            prediction = gr.Image(label="prediction", interactive=False, height=PICTURE_HEIGHT, elem_id="prediction")
            with gr.Column():
                stage = gr.Dropdown([], label="stage / block", elem_id="stage")
                hard = gr.Image(label="hard assignment: each patch's argmax cluster (click a patch)",
                                interactive=False, height=PICTURE_HEIGHT, elem_id="hard")
        attention = gr.Image(label="clicked patch: its attention spread over the image | the regions of its most "
                                   "attended clusters", interactive=False, height=PICTURE_HEIGHT, elem_id="attention")
        attention_line = gr.Markdown(elem_id="attention-line")
        with gr.Row():
            bars = gr.Label(num_top_classes=ce.ATTENDED_SHOWN, show_heading=False,
                            label="most attended clusters (mean over heads)")
            soft = gr.Gallery(label=f"the {ce.SOFT_SHOWN} largest soft clusters", columns=4, elem_id="soft")

        explain_inputs = [task, model, weights, seed, upload, sample]
        explain_outputs = [status, prediction, stage, hard, soft, attention, bars, attention_line, key]
        task.change(page.on_task, task, model)
        run.click(page.on_explain, explain_inputs, explain_outputs)
        upload.upload(page.on_explain, explain_inputs, explain_outputs)
        sample.input(lambda: None, None, upload).then(page.on_explain, explain_inputs, explain_outputs)
        stage.input(page.on_stage, [key, stage], [status, hard, soft, attention, bars, attention_line])
        hard.select(page.on_click, [key, stage], [status, hard, attention, bars, attention_line])
    return demo


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda when available, else cpu")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    demo = build_page(ce.Explorer(args.device))
    port = args.port or free_port(args.host)
    try:
        demo.launch(server_name=args.host, server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                    theme=THEME, max_file_size=MAX_FILE_SIZE)
    except OSError as e:
        _logger.error("error: cannot serve on %s:%d (%s); pass another --port (0: any free port)", args.host, port, e)
        return 2
    print(f"PaCa-ViT cluster explorer on {args.device}: {demo.local_url}  (Ctrl+C stops it)", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
