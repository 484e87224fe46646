"""The names of the files fedrec writes, each defined once (and free of heavy imports, so
command-line tools can use them without loading torch).

A run's output directory (the ServerApp and the runners):

    metrics.jsonl   one JSON row per round        pushes.jsonl   one row per model push
    models/         round-NNN/, best/, final/, LATEST
    run.log         the run's log (Flower's)      superlink.log  the SuperLink's log

A model directory (common/weights.py): fedrec.json, trainable.safetensors and, with LoRA,
peft's adapter_config.json + adapter_model.safetensors.
"""

METRICS_FILE = "metrics.jsonl"
PUSH_FILE = "pushes.jsonl"  # one row per model push: version, nodes, installed, failed
MODELS_DIR = "models"
FINAL_MODEL = "final"
RUN_LOG = "run.log"
SUPERLINK_LOG = "superlink.log"

METADATA = "fedrec.json"
TRAINABLE_WEIGHTS = "trainable.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
