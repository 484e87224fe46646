"""The recommender as an HTTP service (FastAPI): `fedrec-client serve`.

    GET  /health            liveness, items in the index, model version
    GET  /model             the loaded model's metadata (version, round, privacy spent, ...)
    POST /recommend         {"history": ["50", "172"], "k": 10, "exclude_seen": true}
    POST /recommend/batch   {"requests": [{"history": [...], "k": 10}, ...]}
    POST /items             {"items": [{"item_id": "new-1", "text": "..."}], "replace": false}
                            recommendable at once; kept in the state directory (token)
    POST /reload            load the newest installed model now (also done every --watch-s; token)

Reads are open; the two writes need `Authorization: Bearer <token>` with the token the service
was created with (`serve` takes it from --token-file or $FEDREC_SERVICE_TOKEN, or makes one at
start-up and writes it to <state-dir>/service.token, mode 0600). Inputs are validated with
limits (history length, k, batch size, text length, items per add, body size). Refusals:

    401  a write without the token, or with a wrong one (WWW-Authenticate: Bearer)
    403  a write to a service created without a token: writes are disabled
    409  POST /items names ids already in the index without "replace": true (nothing is added);
         POST /reload found a broken install (the current model keeps serving)
    413  a body over Limits.body_bytes, counting the bytes actually read (chunked or not), or
         more than Limits.items items in one POST /items
    422  invalid input (error locations and messages, never the input), or unknown item ids
    429  POST /items would take the added items past Limits.total_added_items (nothing is added)

The OpenAPI schema is at /openapi.json, docs at /docs.
"""

# No `from __future__ import annotations`: FastAPI must see the request models defined inside
# create_service (their limits are arguments) as classes, not as names to resolve later.
import asyncio
import contextlib
import hmac
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from client.recommender import (
    ExistingItems,
    LocalRecommender,
    Recommendation,
    TooManyAddedItems,
    UnknownItems,
    ids_text,
    write_private_file,
)
from common.asgi import BodyLimit

log = logging.getLogger(__name__)

TOKEN_ENV = "FEDREC_SERVICE_TOKEN"
TOKEN_FILE = "service.token"  # in the state directory, when `serve` makes the token
MIN_TOKEN_CHARS = 16
IDS_SHOWN = 100  # ids listed in an error body, at most
ERRORS_SHOWN = 20  # validation errors listed in a 422, at most
CLIP_CHARS = 100  # of each error location or message


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    history: int = 200  # items in a history (only the last history-len are used)
    k: int = 100
    batch: int = 64
    # items per POST /items: each costs a backbone pass (1,000 took 33-58 s of CPU, issue 10)
    items: int = 100
    total_added_items: int = 10_000  # added items kept by the service, in all
    item_id_chars: int = 128
    text_chars: int = 2000
    body_bytes: int = 1_000_000


def check_token(token: str, *, where: str) -> str:
    """The token, if it can be sent in a Bearer header and is long enough to guess at."""
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(
            f"The service token from {where} must be at least {MIN_TOKEN_CHARS} printable "
            "characters without spaces; make one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`."
        )
    return token


def service_token(
    *,
    token_file: Path | None,
    state_dir: Path | None,
    environ: Mapping[str, str] = os.environ,
) -> tuple[str, str | None]:
    """The write token, and where it is kept (a file or the variable; None: nowhere).

    From --token-file, else $FEDREC_SERVICE_TOKEN, else a new one written to
    <state-dir>/service.token (mode 0600); without a state directory a new one is not kept.
    """
    if token_file is not None:
        token_file = Path(token_file).expanduser()
        if not token_file.is_file():
            raise ValueError(f"--token-file {token_file} does not exist or is not a file.")
        if token_file.stat().st_mode & 0o077:
            log.warning("%s can be read by other users: chmod 600 it.", token_file)
        token = token_file.read_text(encoding="utf-8").strip()
        return check_token(token, where=str(token_file)), str(token_file)
    if environ.get(TOKEN_ENV):
        where = f"${TOKEN_ENV}"
        return check_token(environ[TOKEN_ENV].strip(), where=where), where
    token = secrets.token_urlsafe(32)
    if state_dir is None:
        return token, None
    path = Path(state_dir).expanduser() / TOKEN_FILE
    write_private_file(path, token + "\n")
    return token, str(path)


def _clip(value: Any, chars: int = CLIP_CHARS) -> Any:
    """A string cut to `chars`: error bodies never echo large input."""
    if isinstance(value, str) and len(value) > chars:
        return value[: chars - 1] + "…"
    return value


def create_service(
    recommender: LocalRecommender,
    *,
    limits: Limits | None = None,
    watch_s: float | None = None,
    token: str | None = None,
) -> FastAPI:
    """The FastAPI app over one recommender; with watch_s, new installs are picked up.

    POST /items and /reload need `Authorization: Bearer <token>`; without a token they are
    refused (403).
    """
    limits = limits or Limits()
    expected = None if token is None else check_token(token, where="token=").encode()
    ItemId = Annotated[
        str, StringConstraints(min_length=1, max_length=limits.item_id_chars, pattern=r"\S")
    ]

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        history: list[ItemId] = Field(
            default_factory=list,
            max_length=limits.history,
            description="Item ids the user interacted with, oldest first.",
        )
        k: int = Field(default=10, ge=1, le=limits.k, description="How many items to return.")
        exclude_seen: bool = Field(default=True, description="Leave out items in the history.")

    class BatchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        requests: list[RecommendRequest] = Field(min_length=1, max_length=limits.batch)

    class NewItem(BaseModel):
        model_config = ConfigDict(extra="forbid")
        item_id: ItemId
        text: Annotated[
            str,
            StringConstraints(min_length=1, max_length=limits.text_chars, pattern=r"\S"),
        ]

    class ItemsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        # more than limits.items is a 413 (checked in the route), not a 422
        items: list[NewItem] = Field(min_length=1, json_schema_extra={"maxItems": limits.items})
        replace: bool = Field(
            default=False, description="Replace the text of ids already in the index."
        )

    class Scored(BaseModel):
        item_id: str
        title: str
        score: float

    class RecommendResponse(BaseModel):
        model_version: str | None
        items: list[Scored]

    class BatchResponse(BaseModel):
        model_version: str | None
        results: list[list[Scored]]

    class ItemsResponse(BaseModel):
        added: int
        updated: int
        items: int

    class Health(BaseModel):
        status: str
        items: int
        model_version: str | None

    class InvalidField(BaseModel):
        loc: list[str | int]
        msg: str
        type: str

    class Problem(BaseModel):
        detail: str | list[InvalidField]
        unknown_items: list[str] | None = Field(default=None, max_length=IDS_SHOWN)
        existing_items: list[str] | None = Field(default=None, max_length=IDS_SHOWN)
        error_count: int | None = None

    errors = {
        413: {"model": Problem, "description": "Request body too large"},
        422: {"model": Problem, "description": "Invalid input, or unknown item ids"},
    }
    write_errors = {
        401: {"model": Problem, "description": "No token, or a wrong one"},
        403: {"model": Problem, "description": "Writes are disabled (no token configured)"},
    }
    items_errors = {
        **errors,
        **write_errors,
        409: {"model": Problem, "description": 'Ids already in the index, without "replace"'},
        413: {"model": Problem, "description": "Body too large, or too many items at once"},
        429: {"model": Problem, "description": "The cap on added items is reached"},
    }
    bearer = HTTPBearer(auto_error=False, description="The service token (see `serve --help`).")

    def writer(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        """Let a write through only with the service's token, compared in constant time."""
        if expected is None:
            raise HTTPException(
                403, "Writes are disabled: this service was started without a token."
            )
        given = b"" if credentials is None else credentials.credentials.encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(
                401,
                "POST /items and /reload need `Authorization: Bearer <token>` with the "
                "service's token (see `fedrec-client serve --help`).",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_watch(recommender, watch_s)) if watch_s else None
        yield
        if task is not None:
            task.cancel()

    app = FastAPI(
        title="fedrec on-device recommender",
        version="1",
        description=__doc__.split("\n\n")[0],
        lifespan=lifespan,
    )

    app.add_middleware(BodyLimit, max_bytes=limits.body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        found = exc.errors()  # each holds the offending "input": never sent back
        shown = [
            {"loc": [_clip(part) for part in e["loc"]], "msg": _clip(e["msg"]), "type": e["type"]}
            for e in found[:ERRORS_SHOWN]
        ]
        return JSONResponse(status_code=422, content={"detail": shown, "error_count": len(found)})

    @app.exception_handler(UnknownItems)
    async def unknown(request: Request, exc: UnknownItems) -> JSONResponse:
        content = {"detail": str(exc), "unknown_items": exc.ids[:IDS_SHOWN]}
        return JSONResponse(status_code=422, content=content)

    @app.exception_handler(ExistingItems)
    async def existing(request: Request, exc: ExistingItems) -> JSONResponse:
        detail = (
            f"Item id(s) already in the index: {ids_text(exc.ids)}. Nothing was added; send "
            '"replace": true to replace their text, or use new ids.'
        )
        content = {"detail": detail, "existing_items": exc.ids[:IDS_SHOWN]}
        return JSONResponse(status_code=409, content=content)

    @app.exception_handler(TooManyAddedItems)
    async def too_many(request: Request, exc: TooManyAddedItems) -> JSONResponse:
        detail = (
            f"{exc} The service keeps at most {exc.cap} added items; its operator can raise "
            "Limits.total_added_items or prune added_items.jsonl in the state directory."
        )
        return JSONResponse(status_code=429, content={"detail": detail})

    @app.exception_handler(ValueError)
    async def invalid(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": _clip(str(exc), 500)})

    def version() -> str | None:
        return recommender.metadata.get("version")

    def scored(recs: list[Recommendation]) -> list[Scored]:
        return [Scored(item_id=r.item_id, title=r.title, score=r.score) for r in recs]

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", items=recommender.num_items, model_version=version())

    @app.get("/model")
    def model() -> dict[str, Any]:
        meta = recommender.metadata
        keys = ("version", "round", "run_id", "backbone", "catalog_items", "dataset", "privacy")
        return {
            **{k: meta.get(k) for k in keys},
            "items": recommender.num_items,
            "added_items": recommender.num_added,
            "model_dir": str(recommender.model_dir),
            "quantize": recommender.quantize,
            "runtime": recommender.runtime,
            "device": str(recommender.device),
        }

    @app.post("/recommend", response_model=RecommendResponse, responses=errors)
    def recommend(body: RecommendRequest) -> RecommendResponse:
        recs = recommender.recommend(body.history, body.k, exclude_seen=body.exclude_seen)
        return RecommendResponse(model_version=version(), items=scored(recs))

    @app.post("/recommend/batch", response_model=BatchResponse, responses=errors)
    def recommend_batch(body: BatchRequest) -> BatchResponse:
        results: list[list[Recommendation]] = [[] for _ in body.requests]
        groups: dict[tuple[int, bool], list[int]] = {}
        for n, r in enumerate(body.requests):  # one user-tower pass per (k, exclude_seen)
            groups.setdefault((r.k, r.exclude_seen), []).append(n)
        for (k, exclude_seen), members in groups.items():
            histories = [body.requests[n].history for n in members]
            answers = recommender.recommend_batch(histories, k, exclude_seen=exclude_seen)
            for n, answer in zip(members, answers, strict=True):
                results[n] = answer
        return BatchResponse(model_version=version(), results=[scored(r) for r in results])

    @app.post(
        "/items",
        response_model=ItemsResponse,
        responses=items_errors,
        dependencies=[Depends(writer)],
    )
    def add_items(body: ItemsRequest) -> ItemsResponse:
        if len(body.items) > limits.items:  # each costs a backbone pass
            raise HTTPException(
                413,
                f"{len(body.items)} items in one request; send at most {limits.items} per "
                "POST /items.",
            )
        counts = recommender.add_items(
            {i.item_id: i.text for i in body.items},
            replace=body.replace,
            max_added=limits.total_added_items,
        )
        return ItemsResponse(**counts, items=recommender.num_items)

    @app.post(
        "/reload",
        response_model=Health,
        responses={409: {"model": Problem}, **write_errors},
        dependencies=[Depends(writer)],
    )
    def reload():
        if recommender.state_dir is not None:
            try:
                recommender.reload()
            except Exception as exc:  # a broken install: keep serving the current model
                log.exception("Reload failed")
                return JSONResponse(status_code=409, content={"detail": f"Reload failed: {exc}"})
        return health()

    return app


async def _watch(recommender: LocalRecommender, every_s: float) -> None:
    """Reload when a newer model is installed; requests keep being served meanwhile."""
    while True:
        await asyncio.sleep(every_s)
        try:
            if await asyncio.to_thread(recommender.reload):
                log.info("Loaded model %s", recommender.metadata.get("version"))
        except Exception:  # a broken install must not stop the service
            log.exception("Could not load the newly installed model; keeping the current one.")
