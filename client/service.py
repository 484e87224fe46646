"""The recommender as an HTTP service (FastAPI): `fedrec-client serve`.

    GET  /health            liveness, items in the index, model version
    GET  /model             the loaded model's metadata (version, round, privacy spent, ...)
    POST /recommend         {"history": ["50", "172"], "k": 10, "exclude_seen": true}
    POST /recommend/batch   {"requests": [{"history": [...], "k": 10}, ...]}
    POST /items             {"items": [{"item_id": "new-1", "text": "..."}]}: recommendable at once
    POST /reload            load the newest installed model now (also done every --watch-s)

Inputs are validated with limits (history length, k, batch size, text length, body size); an
unknown item id is a 422 that names it. The OpenAPI schema is at /openapi.json, docs at /docs.
"""

# No `from __future__ import annotations`: FastAPI must see the request models defined inside
# create_service (their limits are arguments) as classes, not as names to resolve later.
import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from client.recommender import LocalRecommender, Recommendation, UnknownItems

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    history: int = 200  # items in a history (only the last history-len are used)
    k: int = 100
    batch: int = 64
    items: int = 1000  # items per POST /items
    item_id_chars: int = 128
    text_chars: int = 2000
    body_bytes: int = 1_000_000


def create_service(
    recommender: LocalRecommender, *, limits: Limits | None = None, watch_s: float | None = None
) -> FastAPI:
    """The FastAPI app over one recommender; with watch_s, new installs are picked up."""
    limits = limits or Limits()
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
        items: list[NewItem] = Field(min_length=1, max_length=limits.items)

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

    class Problem(BaseModel):
        detail: str
        unknown_items: list[str] | None = None

    errors = {
        413: {"model": Problem, "description": "Request body too large"},
        422: {"model": Problem, "description": "Invalid input, or unknown item ids"},
    }

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

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.body_bytes):
            return JSONResponse(
                status_code=413,
                content={"detail": f"Request body over {limits.body_bytes} bytes."},
            )
        return await call_next(request)

    @app.exception_handler(UnknownItems)
    async def unknown(request: Request, exc: UnknownItems) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc), "unknown_items": exc.ids})

    @app.exception_handler(ValueError)
    async def invalid(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

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

    @app.post("/items", response_model=ItemsResponse, responses=errors)
    def add_items(body: ItemsRequest) -> ItemsResponse:
        counts = recommender.add_items({i.item_id: i.text for i in body.items})
        return ItemsResponse(**counts, items=recommender.num_items)

    @app.post("/reload", response_model=Health, responses={409: {"model": Problem}})
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
