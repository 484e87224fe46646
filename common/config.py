"""The one typed, frozen configuration of a fedrec run."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Field names are the config keys with "-" spelled "_": `adapter_k` is `adapter-k` in
# pyproject's [tool.flwr.app.config], in scenario files and on `--run-config`.


STRATEGIES = (
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    # robust to a minority of bad clients (server/strategy.py); plain steps, no server optimizer
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "bulyan",
)
NORM_ACTIONS = ("clip", "reject")
LR_SCHEDULES = ("constant", "cosine")
CLIENT_SAMPLINGS = ("random", "shuffled")  # see server/sampling.py
SCHEDULED_STRATEGIES = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")  # have a server lr
ADAPTIVE_STRATEGIES = ("fedadam", "fedyogi", "fedadagrad")  # Flower's FedOpt: moments, tau
FAULT_KINDS = ("raise", "hang", "garbage", "scale", "sign-flip")  # see client/faults.py
WIRE_DTYPES = ("int8", "int8-down", "half", "float32")  # see common/wire.py
DP_MODES = ("off", "fedavg", "sgd")  # see common/privacy.py


def _doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class Config:
    """Federation-wide hyper-parameters; defaults equal pyproject's [tool.flwr.app.config]."""

    # --- data -----------------------------------------------------------------------
    dataset: str = field(default="ml-100k", metadata=_doc("'ml-100k' (bundled) or 'path'."))
    data_path: str = field(default="", metadata=_doc("Directory or file for dataset='path'."))
    data_format: str = field(
        default="auto",
        metadata=_doc("auto | atomic | ml-100k | ml-1m | ml-csv | csv (generic CSV pair)."),
    )
    cache_dir: str = field(default="", metadata=_doc("Cache directory ('' = ~/.cache/fedrec)."))
    output_dir: str = field(default="", metadata=_doc("Run output ('' = ./outputs/run)."))
    # --- item tower -----------------------------------------------------------------
    backbone: str = field(default="", metadata=_doc("Local BERT path or hub id ('' = bundled)."))
    max_tokens: int = field(
        default=64, metadata=_doc("Most tokens per item text (longer texts are cut).")
    )
    adapter_k: int = field(
        default=0, metadata=_doc("Transformer blocks with LoRA adapters (0 = pooled output only).")
    )
    lora_r: int = field(default=8, metadata=_doc("LoRA rank."))
    lora_alpha: int = field(default=16, metadata=_doc("LoRA alpha."))
    bottleneck_dim: int = field(default=64, metadata=_doc("Bottleneck adapter width."))
    model_dim: int = field(default=64, metadata=_doc("Width of item and user vectors."))
    item_id_embedding: bool = field(default=True, metadata=_doc("Add a learned id embedding."))
    item_text: bool = field(
        default=True,
        metadata=_doc("Read item texts (false = id embedding alone: the id-only baseline)."),
    )
    # --- user tower -----------------------------------------------------------------
    history_len: int = field(default=50, metadata=_doc("Most recent items the user tower sees."))
    window_stride: int = field(
        default=0,
        metadata=_doc(
            "Targets per training window; windows reach back history-len items, so a smaller "
            "stride gives every target a longer history (0 = history-len: no overlap)."
        ),
    )
    user_layers: int = field(default=2, metadata=_doc("Causal transformer layers."))
    user_heads: int = field(default=2, metadata=_doc("Attention heads per layer."))
    dropout: float = field(default=0.1, metadata=_doc("Dropout in the trainable layers."))
    # --- training -------------------------------------------------------------------
    num_negatives: int = field(
        default=0,
        metadata=_doc(
            "0 = softmax over the whole catalog; N = the batch's own items plus N uniform "
            "draws, sampling bias corrected."
        ),
    )
    num_server_rounds: int = field(default=10, metadata=_doc("Federated rounds."))
    fraction_train: float = field(default=1.0, metadata=_doc("Fraction of nodes per round."))
    fraction_train_final: float = field(
        default=0.0,
        metadata=_doc(
            "Fraction of nodes in the last round: the cohort grows (or shrinks) linearly from "
            "fraction-train in round 1 (0 = fraction-train throughout)."
        ),
    )
    client_sampling: str = field(
        default="random",
        metadata=_doc(
            "How a round's training cohort is drawn: random (Flower's draw, afresh every "
            "round) | shuffled (passes over the connected nodes in a reshuffled order, as "
            "epochs go over a dataset: every node trains once before any trains twice). In "
            "simulation both draw from the nodes ranked by partition id, so the seed fixes "
            "which users train each round."
        ),
    )
    fraction_evaluate: float = field(default=1.0, metadata=_doc("Fraction evaluated (0 = off)."))
    evaluate_every: int = field(default=1, metadata=_doc("Federated evaluation every N rounds."))
    partition: str = field(default="user", metadata=_doc("user (one per client) | iid."))
    num_partitions: int = field(default=0, metadata=_doc("Clients for partition=iid."))
    local_steps: int = field(
        default=4,
        metadata=_doc("Optimizer steps per client per round, whatever its data size."),
    )
    batch_size: int = field(
        default=32, metadata=_doc("Windows (records) per batch (expected size under DP).")
    )
    local_optimizer: str = field(default="adam", metadata=_doc("Client optimizer: adam | sgd."))
    learning_rate: float = field(default=0.001, metadata=_doc("Client learning rate."))
    adapter_refresh_steps: int = field(
        default=10,
        metadata=_doc(
            "adapter-k > 0: steps between LoRA updates; the adapted item table is recomputed "
            "after each."
        ),
    )
    adapter_rows: int = field(
        default=0,
        metadata=_doc(
            "adapter-k > 0: most table rows whose gradient goes back through the blocks per "
            "LoRA update (0 = all; else the batch's items and a uniform draw, unbiased)."
        ),
    )
    strategy: str = field(
        default="fedavg",
        metadata=_doc(
            "Aggregation: fedavg | fedavgm | fedadam | fedyogi | fedadagrad, or a robust rule: "
            "fedmedian | fedtrimmedavg | krum | bulyan."
        ),
    )
    server_learning_rate: float = field(
        default=0.01,
        metadata=_doc("Server learning rate (eta of fedadam/fedyogi/fedadagrad; fedavgm's lr)."),
    )
    server_lr_schedule: str = field(
        default="constant",
        metadata=_doc(
            "Server learning rate over the run: constant | cosine (round r of num-server-rounds "
            "R steps at server-learning-rate x (1 + cos(pi r / R)) / 2, down to 0)."
        ),
    )
    server_momentum: float = field(default=0.9, metadata=_doc("fedavgm's server momentum."))
    server_ema: float = field(
        default=0.0,
        metadata=_doc(
            "Decay per round of an exponential moving average of the global model that the "
            "server keeps; 0 = off. When on, the average is the model that is validated "
            "centrally, selected, tested, pushed and saved as final; clients train and evaluate "
            "(fed_* metrics) from the global model."
        ),
    )
    server_tau: float = field(
        default=1e-3, metadata=_doc("Adaptivity tau of fedadam / fedyogi / fedadagrad.")
    )
    server_beta2: float = field(
        default=0.99,
        metadata=_doc(
            "Decay of fedadam's / fedyogi's second moment: Flower's 0.99; torch's Adam, which "
            "central training uses, takes 0.999."
        ),
    )
    server_restart_every: int = field(
        default=0,
        metadata=_doc(
            "Rounds between restarts of fedadam's / fedyogi's / fedadagrad's state: moments "
            "zeroed and bias correction begun again, as central training starts a fresh Adam "
            "every epoch (0 = never)."
        ),
    )
    client_weighting: str = field(
        default="examples",
        metadata=_doc("Aggregation weights: examples (capped) | uniform."),
    )
    max_client_weight: float = field(
        default=100.0,
        metadata=_doc("Cap on a client's example-count weight (client-weighting=examples)."),
    )
    update_norm_limit: float = field(
        default=3.0,
        metadata=_doc(
            "An update whose L2 norm is over this multiple of the round's median update norm is "
            "clipped or rejected (update-norm-action); 0 = off. Not applied under dp-mode fedavg, "
            "which clips to dp-clip-norm."
        ),
    )
    update_norm_action: str = field(
        default="reject", metadata=_doc("reject | clip: what update-norm-limit does.")
    )
    trimmed_beta: float = field(
        default=0.2,
        metadata=_doc("fedtrimmedavg: share cut from each end of every coordinate, in [0, 0.5)."),
    )
    num_malicious_nodes: int = field(
        default=0, metadata=_doc("krum / bulyan: how many bad clients a round must survive.")
    )
    fault_share: float = field(
        default=0.0,
        metadata=_doc(
            "Simulation only: share of simulated clients that misbehave as fault-kind says "
            "(client/faults.py); 0 = none."
        ),
    )
    fault_kind: str = field(
        default="raise",
        metadata=_doc("raise | hang | garbage | scale | sign-flip (client/faults.py)."),
    )
    fault_scale: float = field(
        default=10.0, metadata=_doc("scale / sign-flip: the update times +-fault-scale.")
    )
    wire_dtype: str = field(
        default="int8",
        metadata=_doc(
            "Weights down / updates up: int8 = float16 / int8 rows, stochastically rounded; "
            "int8-down = int8 rows, rounded to nearest / bfloat16; half = float16 / bfloat16; "
            "float32 (common/wire.py)."
        ),
    )
    # --- privacy --------------------------------------------------------------------
    dp_mode: str = field(
        default="off",
        metadata=_doc(
            "Differential privacy, user-level: off | fedavg (DP-FedAvg: each client clips its "
            "whole update, the server adds Gaussian noise to the sum and accounts epsilon over "
            "rounds; for one user per client) | sgd (DP-SGD on each client with one user's "
            "sequence as the record, noise added on the device; for clients with many users)."
        ),
    )
    dp_noise_multiplier: float = field(
        default=0.0,
        metadata=_doc(
            "Noise multiplier; 0 = calibrated to dp-target-epsilon (fedavg: by the server over "
            "num-server-rounds; sgd: by each client once)."
        ),
    )
    dp_clip_norm: float = field(
        default=1.0,
        metadata=_doc(
            "Clipping norm: of a client's whole update (fedavg), of a user's gradient (sgd)."
        ),
    )
    dp_delta: float = field(
        default=1e-5, metadata=_doc("Delta of the DP guarantee (at most 1 / number of users).")
    )
    dp_target_epsilon: float = field(
        default=8.0,
        metadata=_doc(
            "Budget: of the whole federation over num-server-rounds (fedavg), of each client "
            "(sgd: a client declines a round that would exceed it)."
        ),
    )
    # --- evaluation and run control -------------------------------------------------
    central_eval: bool = field(
        default=True, metadata=_doc("Simulation: also score every user on the server.")
    )
    resume: bool = field(default=False, metadata=_doc("Continue from output-dir's checkpoint."))
    # --- deployment -----------------------------------------------------------------
    min_nodes: int = field(
        default=0,
        metadata=_doc("Connected nodes needed to start a round (0 = one per data partition)."),
    )
    push_model: bool = field(
        default=False,
        metadata=_doc("Send the final global model to every connected node to install."),
    )
    push_every: int = field(
        default=0,
        metadata=_doc("With push-model, also push every N rounds (0 = the final model only)."),
    )
    round_timeout_s: float = field(
        default=3600.0, metadata=_doc("Seconds to wait for replies in a round.")
    )
    max_in_flight: int = field(
        default=0,
        metadata=_doc(
            "Most messages of a round out at once, the next sent as a reply comes (0 = all at "
            "once). For simulation: Flower's engine checks every waiting message for each node."
        ),
    )
    reply_poll_s: float = field(
        default=0.05,
        metadata=_doc(
            "Longest pause between the server's pulls for a round's replies (pauses start at "
            "20 ms and double up to this): a round ends at most this long after its last reply."
        ),
    )
    seed: int = field(default=42, metadata=_doc("Seed for sampling and initialisation."))

    def __post_init__(self) -> None:
        positive = (
            "max_tokens",
            "model_dim",
            "bottleneck_dim",
            "history_len",
            "user_layers",
            "user_heads",
            "num_server_rounds",
            "evaluate_every",
            "local_steps",
            "adapter_refresh_steps",
            "batch_size",
            "lora_r",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{key_of(name)} must be at least 1, got {getattr(self, name)}.")
        for name in ("min_nodes", "push_every", "max_in_flight", "server_restart_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{key_of(name)} must be 0 or more, got {getattr(self, name)}.")
        if self.reply_poll_s <= 0:
            raise ValueError(f"reply-poll-s must be positive, got {self.reply_poll_s}.")
        if self.round_timeout_s <= 0:
            raise ValueError(f"round-timeout-s must be positive, got {self.round_timeout_s}.")
        if self.adapter_k < 0:
            raise ValueError(f"adapter-k must be 0 or more, got {self.adapter_k}.")
        if not self.item_text and (self.adapter_k or not self.item_id_embedding):
            raise ValueError(
                "item-text = false (the id-only model) needs item-id-embedding = true and "
                f"adapter-k = 0, got item-id-embedding = {str(self.item_id_embedding).lower()} "
                f"and adapter-k = {self.adapter_k}."
            )
        if self.model_dim % self.user_heads:
            raise ValueError(
                f"model-dim ({self.model_dim}) must be divisible by user-heads ({self.user_heads})."
            )
        for name in ("fraction_train", "fraction_train_final", "fraction_evaluate", "dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key_of(name)} must lie in [0, 1], got {value}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning-rate must be positive, got {self.learning_rate}.")
        if not 0 <= self.window_stride <= self.history_len:
            raise ValueError(
                f"window-stride must lie in [0, history-len = {self.history_len}], "
                f"got {self.window_stride}."
            )
        if self.adapter_rows < 0:
            raise ValueError(f"adapter-rows must be 0 or more, got {self.adapter_rows}.")
        if self.num_negatives < 0:
            raise ValueError(f"num-negatives must be 0 or more, got {self.num_negatives}.")
        choices = {
            "strategy": STRATEGIES,
            "local_optimizer": ("adam", "sgd"),
            "client_weighting": ("examples", "uniform"),
            "update_norm_action": NORM_ACTIONS,
            "fault_kind": FAULT_KINDS,
            "wire_dtype": WIRE_DTYPES,
            "server_lr_schedule": LR_SCHEDULES,
            "client_sampling": CLIENT_SAMPLINGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{key_of(name)} must be one of {', '.join(allowed)}, "
                    f"got {getattr(self, name)!r}."
                )
        if self.server_lr_schedule != "constant" and self.strategy not in SCHEDULED_STRATEGIES:
            raise ValueError(
                f"server-lr-schedule = {self.server_lr_schedule!r} needs a strategy with a server "
                f"learning rate ({', '.join(SCHEDULED_STRATEGIES)}); strategy is "
                f"{self.strategy!r}."
            )
        if self.server_restart_every and self.strategy not in ADAPTIVE_STRATEGIES:
            raise ValueError(
                f"server-restart-every restarts an adaptive server optimizer's state "
                f"({', '.join(ADAPTIVE_STRATEGIES)}); strategy is {self.strategy!r}."
            )
        for name in ("server_learning_rate", "server_tau", "max_client_weight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{key_of(name)} must be positive, got {getattr(self, name)}.")
        if not 0 < self.server_beta2 < 1:
            raise ValueError(f"server-beta2 must lie in (0, 1), got {self.server_beta2}.")
        if self.update_norm_limit != 0 and self.update_norm_limit < 1:
            raise ValueError(
                "update-norm-limit must be 0 (off) or at least 1 (a multiple of the median), "
                f"got {self.update_norm_limit}."
            )
        if not 0.0 <= self.fault_share <= 1.0:
            raise ValueError(f"fault-share must lie in [0, 1], got {self.fault_share}.")
        if not 0.0 <= self.trimmed_beta < 0.5:
            raise ValueError(f"trimmed-beta must lie in [0, 0.5), got {self.trimmed_beta}.")
        if self.num_malicious_nodes < 0:
            raise ValueError(
                f"num-malicious-nodes must be 0 or more, got {self.num_malicious_nodes}."
            )
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError(f"server-momentum must lie in [0, 1), got {self.server_momentum}.")
        if not 0.0 <= self.server_ema < 1.0:
            raise ValueError(f"server-ema must lie in [0, 1), got {self.server_ema}.")
        if self.partition not in ("user", "iid"):
            raise ValueError(f"partition must be 'user' or 'iid', got {self.partition!r}.")
        if self.partition == "iid" and self.num_partitions < 1:
            raise ValueError("partition='iid' needs num-partitions of at least 1.")
        if self.dataset not in ("ml-100k", "path"):
            raise ValueError(f"dataset must be 'ml-100k' or 'path', got {self.dataset!r}.")
        if self.dataset == "path" and not self.data_path:
            raise ValueError("dataset='path' needs data-path: the directory or file to read.")
        if self.dp_mode not in DP_MODES:
            raise ValueError(f"dp-mode must be one of {', '.join(DP_MODES)}, got {self.dp_mode!r}.")
        if self.dp_enabled:
            if self.dp_noise_multiplier < 0:
                raise ValueError("dp-noise-multiplier must be 0 (calibrate) or positive.")
            if self.dp_clip_norm <= 0:
                raise ValueError(f"dp-clip-norm must be positive, got {self.dp_clip_norm}.")
            if not 0 < self.dp_delta < 1:
                raise ValueError(f"dp-delta must lie in (0, 1), got {self.dp_delta}.")
            if self.dp_target_epsilon <= 0:
                raise ValueError(
                    f"dp-target-epsilon must be positive, got {self.dp_target_epsilon}."
                )
        if self.dp_enabled and self.fraction_evaluate > 0:
            raise ValueError(
                f"dp-mode={self.dp_mode!r} protects users only if nothing un-noised leaves "
                "their data: set fraction-evaluate = 0 (no per-client evaluation replies); "
                "simulations evaluate on the server (central-eval)."
            )
        if self.dp_mode == "fedavg" and self.client_sampling != "random":
            raise ValueError(
                "dp-mode = 'fedavg' Poisson-samples every node every round, as its accountant "
                "assumes: set client-sampling = 'random'."
            )
        if self.dp_mode == "fedavg" and self.fraction_train_final:
            raise ValueError(
                "dp-mode = 'fedavg' samples every round at the rate fraction-train, as its "
                "accountant assumes: set fraction-train-final = 0 (no cohort growth)."
            )
        if self.dp_mode == "fedavg" and self.partition != "user":
            raise ValueError(
                "dp-mode='fedavg' protects one client's whole update, which is one user only "
                "with partition = 'user'; for clients holding many users use dp-mode = 'sgd' "
                "(one record per user inside each client)."
            )
        if self.dp_mode == "sgd" and self.num_negatives == 0:
            raise ValueError(
                "dp-mode='sgd' needs num-negatives >= 1: DP-SGD computes the item vectors "
                "inside each record, and the whole catalog per record is too costly."
            )

    @property
    def dp_enabled(self) -> bool:
        """Whether any differential privacy is on."""
        return self.dp_mode != "off"

    # --- derived paths ---------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        """Where datasets and frozen-backbone caches live."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("FEDREC_CACHE", "~/.cache/fedrec")).expanduser()

    @property
    def output_path(self) -> Path:
        """Where a run writes its models and metrics."""
        return Path(self.output_dir or "outputs/run").expanduser()

    # --- construction ----------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Config:
        """Build from Flower's run_config (or any key -> scalar mapping); unknown keys fail."""
        known = {key_of(f.name): f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(
                f"Unknown config key(s): {', '.join(unknown)}. Known keys: {', '.join(known)}."
            )
        defaults = cls()  # each key's type is its default's
        kwargs = {}
        for key, value in values.items():
            f = known[key]
            kwargs[f.name] = _coerce(key, value, type(getattr(defaults, f.name)))
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | Path, table: str = "run") -> Config:
        """Build from a scenario TOML file's [run] table."""
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        return cls.from_mapping(data.get(table, {}))

    @classmethod
    def checked(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """`values` (some keys) validated as a whole config, defaults filled in, and returned
        coerced to the keys' types (an int given for a float key becomes a float); raises
        ValueError naming the key. The one validator of run configs: scenarios, deploy.toml,
        --run-config and the apps all come through here."""
        config = cls.from_mapping(values).to_mapping()
        return {key: config[key] for key in values}

    def merged(self, overrides: Mapping[str, Any]) -> Config:
        """This config with `overrides` (e.g. Flower's run_config) applied on top."""
        return Config.from_mapping({**self.to_mapping(), **overrides})

    def to_mapping(self) -> dict[str, Any]:
        """The config as key -> scalar, spelled as in pyproject."""
        return {key_of(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def reference_markdown() -> str:
    """docs/config.md: every key with its type, default and help, from Config itself
    (tests/test_config.py fails when the file differs; `python -m common.config > docs/config.md`
    rewrites it)."""
    hints = {f.name: f.type for f in fields(Config)}
    lines = [
        "# Configuration reference",
        "",
        "Every key of a run config: `[tool.flwr.app.config]` in `pyproject.toml` (the defaults),",
        'a scenario\'s `[run]` table, `--run-config "key=value ..."` and `server/deploy.toml`.',
        "Generated from `common/config.py` (`python -m common.config > docs/config.md`); a test",
        'keeps the two equal. Cross-field rules (for example `partition = "iid"` needs',
        "`num-partitions`) are checked when a run starts, with an error naming the keys.",
        "",
        "| key | type | default | what |",
        "| --- | --- | --- | --- |",
    ]
    for f in fields(Config):
        kind = str(hints[f.name]).replace("'", "")
        default = f.default if f.default is not dataclasses.MISSING else ""
        shown = f'`"{default}"`' if isinstance(default, str) else f"`{default}`"
        if isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        text = f.metadata.get("help", "").replace("|", "\\|")
        lines.append(f"| `{key_of(f.name)}` | {kind} | {shown} | {text} |")
    return "\n".join(lines) + "\n"


def key_of(field_name: str) -> str:
    """The config key of a Config field (``adapter_k`` -> ``adapter-k``)."""
    return field_name.replace("_", "-")


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{key} must be true or false, got {value!r}.")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise ValueError(f"{key} must be an integer, got {value!r}.")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number, got {value!r}.")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}.")
    return value


if __name__ == "__main__":
    print(reference_markdown(), end="")
