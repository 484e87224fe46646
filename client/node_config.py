"""What a device's node config and state directory hold: names shared by the ClientApp and the
`fedrec-client` CLI (kept here, free of heavy imports, so the CLI starts fast)."""

# node-config keys of a device (fedrec-client join writes them)
DATA_PATH = "data-path"
CATALOG_PATH = "catalog-path"
DATA_FORMAT = "data-format"
STATE_DIR = "state-dir"
BACKBONE = "backbone"
# inside the state directory
LEDGER_FILE = "privacy-ledger.json"
CACHE_DIR = "cache"
