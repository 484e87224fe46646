"""fedrec-emulate: a one-step FedAdam federation of one-user clients as batched training.

With local-steps = 1, local-optimizer = sgd and learning-rate = 1, a client's update is minus
the gradient of its mean loss, so the server's weighted mean update is minus the gradient of
the cohort's loss with per-interaction weights w_u / (W n_u): w_u = min(n_u, max-client-weight)
the client's weight, W their sum, n_u its predicted interactions. A round is then one batched
backward pass over the cohort's windows and one FedAdam step with Flower's arithmetic (betas
0.9 / server-beta2, tau, the learning rate bias-corrected at server_round + 1,
server-lr-schedule, server-restart-every): several times faster than Flower's simulation on
this machine, for ablations over many rounds. The gradient is taken at the weights as the
wire-dtype delivers them (float16, or int8 rows for int8-down), as clients do. Left out: the
rounding of updates on the way up (bfloat16, or int8 stochastic rounding), the update-norm
bound (it clipped none of fed-k0's 14,100 updates) and the cohort's draw (numpy's, not
Flower's; client-sampling = shuffled uses the ServerApp's ShuffledPasses with numpy's shuffle).
Everything else is the project's own code: records, model, loss, evaluation; selection on
validation, the test split read once per run; with server-ema, the moving average of the global
model is what is validated, selected and tested, as in the ServerApp. tests/test_emulate.py
checks a round against the real ServerApp and ClientApp.

    fedrec-emulate --variants simulations/configs/emulate-schedule.toml
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from common.config import Config
from server.schedules import RestartClock, scheduled_fraction, scheduled_rate
from simulations import report
from simulations.report import CONFIGS, RESULTS

SEEDS = (42, 43, 44)
BETA1 = 0.9  # Flower's FedAdam default (server/strategy.py make_strategy keeps it)


def check_emulable(cfg: Config) -> None:
    """Raise ValueError naming the first setting the batched emulation cannot reproduce."""
    needs = {
        "partition": "user",
        "local_steps": 1,
        "local_optimizer": "sgd",
        "learning_rate": 1.0,
        "strategy": "fedadam",
        "adapter_k": 0,
        "dp_mode": "off",
        "num_negatives": 0,
        "client_weighting": "examples",
    }
    for name, value in needs.items():
        if getattr(cfg, name) != value:
            raise ValueError(
                f"fedrec-emulate reproduces one-step FedAdam of one-user clients only: "
                f"{name.replace('_', '-')} must be {value!r}, got {getattr(cfg, name)!r}."
            )


class Emulation:
    """The global model and FedAdam's state; `step(cohort, server_round)` is one round."""

    def __init__(self, cfg: Config, users: list, items, num_items: int, *, clients: str = "users"):
        import torch

        from common.records import build_records
        from common.task import build_model

        check_emulable(cfg)
        self.cfg, self.items, self.num_items = cfg, items, num_items
        self.model = build_model(cfg, num_items=num_items)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        every = cfg.server_restart_every  # FedAdam's restarts, as the strategy's
        self.restarts = RestartClock(every) if every else None
        seqs = [u.train for u in users]
        self.records = build_records(seqs, history_len=cfg.history_len, stride=cfg.window_stride)
        owner = self.records.user
        if clients == "windows":  # a diagnostic: every window its own client (central batches)
            self.windows = [np.array([i]) for i in range(len(owner))]
        elif clients == "users":
            self.windows = [np.flatnonzero(owner == u) for u in range(len(users))]
        else:
            raise ValueError(f"clients must be 'users' or 'windows', got {clients!r}.")
        has = self.records.targets >= 0
        self.targets = np.array([int(has[w].sum()) for w in self.windows])  # n_u, all windows
        self.rng = np.random.default_rng(cfg.seed)
        # server-ema: the moving average of the global model, from the initial weights
        self.average = [p.detach().clone() for p in self.params] if cfg.server_ema else None

    def gradient_step_windows(self, user: int) -> np.ndarray:
        """The windows of the user's one local step: all, or a batch-size draw (train())."""
        windows = self.windows[user]
        if len(windows) > self.cfg.batch_size:
            windows = np.sort(self.rng.choice(windows, self.cfg.batch_size, replace=False))
        return windows

    def step(self, cohort: np.ndarray, server_round: int, server_rate: float) -> float:
        """One round with these clients (user indices); returns the cohort's weighted loss."""
        import torch
        import torch.nn.functional as F

        from common.model import NEG_INF
        from common.train import seen_before, sequence_logits
        from common.wire import decode_weights, encode_weights

        cohort = np.array([u for u in cohort if self.targets[u] > 0])
        weights = np.minimum(self.targets[cohort], self.cfg.max_client_weight).astype(float)
        chosen = [self.gradient_step_windows(u) for u in cohort]
        rows = np.concatenate(chosen)
        inputs = torch.from_numpy(self.records.inputs[rows])
        targets = torch.from_numpy(self.records.targets[rows])
        has_target = targets >= 0
        # a client's loss is the mean over its step's targets: w_u / (W n_u) per target
        total = weights.sum()
        per_target = [
            np.full(len(w), wu / (total * (self.records.targets[w] >= 0).sum()))
            for w, wu in zip(chosen, weights, strict=True)
        ]
        row_weight = torch.from_numpy(np.concatenate(per_target)).float()  # (B,)
        kept = [p.detach().clone() for p in self.params]  # the server's float32 weights
        with torch.no_grad():  # the clients' gradient is taken where the wire puts them
            for p in self.params:
                sent = encode_weights({"w": p.numpy()}, self.cfg.wire_dtype)
                p.copy_(torch.from_numpy(decode_weights(sent)["w"]))
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        # over the whole catalog an item's column is its id
        logits = sequence_logits(self.model, inputs, self.items.states).masked_fill(
            seen_before(inputs, targets, self.num_items), NEG_INF
        )  # (B, L, N)
        losses = F.cross_entropy(logits[has_target], targets[has_target], reduction="none")
        loss = (losses * row_weight[:, None].expand_as(targets)[has_target]).sum()
        loss.backward()
        self.model.eval()
        b1, b2 = BETA1, self.cfg.server_beta2
        t = self._optimizer_round(server_round)
        eta = server_rate * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        with torch.no_grad():
            for p, m, v, w in zip(self.params, self.m, self.v, kept, strict=True):
                delta = -p.grad if p.grad is not None else torch.zeros_like(p)
                p.copy_(w)
                m.mul_(b1).add_(delta, alpha=1 - b1)
                v.mul_(b2).add_(delta * delta, alpha=1 - b2)
                p.add_(eta * m / (v.sqrt() + self.cfg.server_tau))
            if self.average is not None:
                decay = self.cfg.server_ema
                for a, p in zip(self.average, self.params, strict=True):
                    a.mul_(decay).add_(p, alpha=1 - decay)
        return float(loss.detach())

    def _optimizer_round(self, server_round: int) -> int:
        """FedAdam's round for bias correction; with server-restart-every, the steps since the
        moments were zeroed, zeroing them when a period begins (the strategy's RestartClock)."""
        if self.restarts is None:
            return server_round
        restart, steps = self.restarts.step(server_round)
        if restart:
            for m, v in zip(self.m, self.v, strict=True):
                m.zero_()
                v.zero_()
        return steps


@contextmanager
def _holding(params: list, values: list | None):
    """The parameters hold `values` (the server's moving average) inside the block; None
    leaves them as they are."""
    import torch

    if values is None:
        yield
        return
    kept = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, k in zip(params, kept, strict=True):
                p.copy_(k)


def emulate(cfg: Config, *, progress: bool = True, clients: str = "users") -> dict[str, Any]:
    """A whole run: validation every evaluate-every rounds, the best round tested once.
    clients = "windows" makes every training window its own client, drawn at the same
    fraction: central training's batches of windows from many users, with the federation's
    arithmetic, to measure what one-user clients cost."""
    from common.task import eval_cases, item_states, load_data
    from common.train import evaluate
    from common.weights import load_trainable_state, trainable_state
    from server.sampling import ShuffledPasses

    start = time.perf_counter()
    dataset, splits = load_data(cfg)
    users = list(splits)
    items = item_states(cfg, dataset.catalog)
    run = Emulation(cfg, users, items, len(dataset.catalog), clients=clients)
    valid = eval_cases(users, "valid")
    curve, best, sizes = [], (-1.0, 0, None), []
    passes = None  # client-sampling = random: numpy's draw afresh every round
    if cfg.client_sampling == "shuffled":
        passes = ShuffledPasses(lambda nodes: run.rng.permutation(nodes).tolist())
    for r in range(1, cfg.num_server_rounds + 1):
        fraction = scheduled_fraction(
            cfg.fraction_train,
            cfg.fraction_train_final,
            server_round=r,
            num_rounds=cfg.num_server_rounds,
        )
        sizes.append(max(1, int(len(run.windows) * fraction)))  # as Flower's FedAvg draws it
        if passes is None:
            cohort = run.rng.choice(len(run.windows), sizes[-1], replace=False)
        else:
            cohort = np.array(passes.draw(range(len(run.windows)), sizes[-1]))
        rate = scheduled_rate(
            cfg.server_learning_rate,
            schedule=cfg.server_lr_schedule,
            server_round=r,
            num_rounds=cfg.num_server_rounds,
        )
        run.step(cohort, r, rate)
        if r % cfg.evaluate_every == 0 or r == cfg.num_server_rounds:
            with _holding(run.params, run.average):
                ndcg = evaluate(model=run.model, cfg=cfg, items=items, cases=valid)[0]["ndcg@10"]
                if ndcg > best[0]:
                    best = (ndcg, r, trainable_state(run.model))
            curve.append((r, ndcg))
            if progress:
                print(f"  round {r}: val NDCG@10 {ndcg:.4f}", file=sys.stderr, flush=True)
    load_trainable_state(run.model, best[2])
    test, _ = evaluate(model=run.model, cfg=cfg, items=items, cases=eval_cases(users, "test"))
    return {
        "seed": cfg.seed,
        "best_val_ndcg@10": best[0],
        "best_round": best[1],
        "test_ndcg@10": test["ndcg@10"],
        "test_hr@10": test["hr@10"],
        "curve": curve,
        "rounds": cfg.num_server_rounds,
        "cohort": sizes[0] if sizes[0] == sizes[-1] else f"{sizes[0]}-{sizes[-1]}",
        "client_updates": sum(sizes),
        "seconds": time.perf_counter() - start,
    }


def same_variant(previous: dict | None, overrides: dict, scenario: str) -> bool:
    """Whether a stored row was run from this scenario with these overrides."""
    return (
        previous is not None
        and previous.get("scenario") == scenario
        and previous.get("overrides") == overrides
    )


def kept_runs(previous: dict | None, overrides: dict, scenario: str, runs: list[dict]) -> list:
    """A variant's runs after `runs`: the stored runs of other seeds stay when the stored row
    is the same variant (same_variant); a seed run again replaces its stored run. Sorted by
    seed."""
    stored = previous["per_seed"] if same_variant(previous, overrides, scenario) else []
    return report.merged_seeds(stored, runs)


def summarise(name: str, overrides: dict, runs: list[dict], scenario: str = "") -> dict[str, Any]:
    row = {"name": name, "scenario": scenario, "overrides": overrides, "per_seed": runs}
    for key in ("best_val_ndcg@10", "test_ndcg@10", "test_hr@10"):
        values = [r[key] for r in runs]
        row[key], row[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    row["rounds"], row["cohort"] = runs[0]["rounds"], runs[0]["cohort"]
    return row


def mean_std(row: dict, key: str) -> str:
    """'mean ± std' over the row's seeds; one seed has no spread to show."""
    spread = f" ± {row[key + '_std']:.4f}" if len(row["per_seed"]) > 1 else ""
    return f"{row[key]:.4f}{spread}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| variant | changes from the scenario | rounds x cohort | seeds "
        "| best val NDCG@10 (mean ± std) | test NDCG@10 of the selected round |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        changes = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "—"
        seeds = ", ".join(str(s["seed"]) for s in r["per_seed"])
        lines.append(
            f"| {r['name']} | {changes} | {r['rounds']} x {r['cohort']} | {seeds} "
            f"| {mean_std(r, 'best_val_ndcg@10')} | {mean_std(r, 'test_ndcg@10')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrec-emulate",
        description=__doc__.split("\n\n")[0] + " Runs each variant of a variants file (TOML "
        'tables of run-config overrides; clients = "windows" makes every training window its own '
        "client, a diagnostic) over the scenario and writes simulations/results/"
        "<variants file>.json and .md: best validation NDCG@10 and the selected round's test "
        "NDCG@10, mean ± std over seeds. About 5 minutes a seed for 750 rounds of 18 clients "
        "on 2 cores.",
    )
    parser.add_argument("--variants", type=Path, required=True, help="variants file (TOML)")
    parser.add_argument(
        "--scenario", type=Path, default=CONFIGS / "bench-fed.toml", help="(bench-fed.toml)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="(42 43 44)")
    parser.add_argument(
        "--only",
        nargs="*",
        help="variant names to (re)run; the other variants are kept, and so are a rerun "
        "variant's stored seeds not in --seeds when scenario and overrides are unchanged",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--table-only", action="store_true", help="rewrite the markdown from the results file"
    )
    args = parser.parse_args(argv)
    variants = tomllib.loads(args.variants.read_text())
    base = tomllib.loads(args.scenario.read_text()).get("run", {})
    path = args.results / (args.variants.stem.replace("-", "_") + ".json")
    done = report.rows_by_name(path)
    if args.table_only:
        rows = [done[n] for n in variants if n in done]
        report.write_results(path, rows, markdown(rows))
        return 0
    for name, overrides in variants.items():
        if args.only is not None and name not in args.only:
            continue
        scenario = args.scenario.name
        stored = done.get(name)
        if stored and stored["per_seed"] and not same_variant(stored, overrides, scenario):
            print(
                f"{name}: the stored seeds were run from another scenario or other overrides "
                "(or before runs recorded their scenario); replacing them",
                file=sys.stderr,
                flush=True,
            )
        run_config = {k: v for k, v in overrides.items() if k != "clients"}
        for seed in args.seeds:
            cfg = Config().merged({**base, **run_config, "seed": seed})
            print(f"{name}, seed {seed}", file=sys.stderr, flush=True)
            run = emulate(cfg, clients=overrides.get("clients", "users"))
            print(
                f"{name}, seed {seed}: best val {run['best_val_ndcg@10']:.4f} "
                f"(round {run['best_round']}), test {run['test_ndcg@10']:.4f}",
                flush=True,
            )
            runs = kept_runs(done.get(name), overrides, scenario, [run])
            done[name] = summarise(name, overrides, runs, scenario)  # written seed by seed
            rows = [done[n] for n in variants if n in done]
            report.write_results(path, rows, markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
