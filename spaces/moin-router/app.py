"""The MoIN router Space: route a query to its topic expert, compare it with the base model, browse experts.

Configured by environment only, so this same file runs on huggingface.co and against a local Hub:

    MOIN_REGISTRY     the registry dataset repo (default below, as in README.md's `datasets:`)
    HF_ENDPOINT       the Hub to read from (default huggingface.co; read by huggingface_hub)
    MOIN_BASE_MODEL   optional: serve the experts on this base model instead of the registry's
    MOIN_THRESHOLD    optional: score below which the base model answers (default: the registry's
                      calibrated threshold, else cosine 0.1)
    HF_TOKEN          optional secret for private repos (read by huggingface_hub, never printed)

Gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (set by Spaces); locally it serves 127.0.0.1:7860.
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # never phone home

from moin_hub.serving.space_app import build_app, env_threshold  # noqa: E402

DEFAULT_REGISTRY = "moin-demo/brown-experts"

app = build_app(
    os.environ.get("MOIN_REGISTRY") or DEFAULT_REGISTRY,
    endpoint=os.environ.get("HF_ENDPOINT") or None,
    base_model=os.environ.get("MOIN_BASE_MODEL") or None,
    threshold=env_threshold(os.environ.get("MOIN_THRESHOLD")),
)

if __name__ == "__main__":
    app.moin_engine.warm_up()  # the embedder and base model load before the first visitor arrives
    app.launch()
