"""Flower's runtime from Python, split by job.

- `config`: run-config text as Flower reads it (`--run-config`, flattened TOML);
- `outputs`: a run's output directory;
- `processes`: SuperLink and SuperNode processes, FLWR_HOME, stopping what they started;
- `cli`: the `flwr` CLI (submit, status, stop, logs, SuperNode registration);
- `follow`: following a run, and `launch_and_follow`, the one start-submit-follow-stop
  sequence of fedrec-simulate and fedrec-server.

fedrec-client runs a SuperNode with `processes`. Every process starts in its own process group,
so stopping it also stops what it started (SuperExec, ServerApp, ClientApps, Ray).
"""
