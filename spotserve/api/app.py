"""OpenAI-compatible HTTP API of a live service (FastAPI): completions (SSE streaming), models, health, metrics.

Every completion is admitted durably (StateStore) before it is answered; a streamed completion
sends each token once it is committed, so preemptions and worker kills behind it show up as a
pause, never as an error, a repeat or a gap. Admin endpoints drive availability by hand (notice,
acquire, kill) and force a parallel config (reconfigure). With an API key, every endpoint but
/health needs `Authorization: Bearer KEY`.
"""
from __future__ import annotations

import hmac
import json
import time
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from spotserve.api.tokenizer import load_tokenizer


class CompletionBody(BaseModel):
    """POST /v1/completions; unknown fields are refused so a client learns what is not supported."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: list[int] | str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = None


class AdminBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instance: str | None = None
    worker: str | None = None
    grace_s: float | None = Field(None, ge=0)


class ReconfigureBody(BaseModel):
    """POST /admin/reconfigure: the parallel config to move to now (ParallelConfig's fields)."""

    model_config = ConfigDict(extra="forbid")
    dp: int = Field(ge=1)
    pp: int = Field(ge=1)
    tp: int = Field(ge=1)
    batch: int = Field(ge=1)
    micro_batches: int = Field(1, ge=1)


def create_app(service, model_name: str | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI app over a started LiveService (same event loop)."""
    app = FastAPI(title="spotserve", version="1")
    name = model_name or Path(service.config.model_dir).name
    tokenizer = load_tokenizer(service.config.model_dir)

    def auth(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer KEY)")

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids) if tokenizer is not None else ""

    def chunk(rid: str, created: int, ids: list[int], finish: str | None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": decode(ids), "token_ids": ids, "logprobs": None,
                             "finish_reason": finish}]}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionBody):
        if body.model is not None and body.model != name:
            raise HTTPException(404, f"model {body.model!r} is not served here (serving {name!r})")
        if isinstance(body.prompt, str):
            if tokenizer is None:
                raise HTTPException(400, "this checkpoint has no tokenizer: send the prompt as token ids")
            prompt = tokenizer.encode(body.prompt)
        else:
            prompt = body.prompt
        seed = body.seed if body.seed is not None else int.from_bytes(__import__("os").urandom(7), "little")
        try:
            lr = service.submit(prompt, body.max_tokens, body.temperature, body.top_p, seed)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        rid, created = f"cmpl-{lr.rid}", int(time.time())
        if body.stream:
            async def events():
                n = 0
                async for tok in lr.stream():
                    n += 1
                    fin = "length" if n == lr.max_tokens else None
                    yield f"data: {json.dumps(chunk(rid, created, [tok], fin))}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        ids = await lr.wait()
        out = chunk(rid, created, ids, "length")
        out["usage"] = {"prompt_tokens": len(prompt), "completion_tokens": len(ids),
                        "total_tokens": len(prompt) + len(ids)}
        return out

    @app.get("/v1/requests/{rid}", dependencies=[Depends(auth)])
    async def request_status(rid: int):
        """spotserve extension: a request's committed tokens and state (survives controller restarts)."""
        try:
            sr = service.store.get(str(rid))
        except KeyError:
            raise HTTPException(404, f"unknown request {rid}") from None
        return {"id": rid, "status": sr.status, "tokens": sr.tokens, "prompt_tokens": len(sr.prompt)}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "spotserve",
                                            "max_model_len": service.spec.max_positions}]}

    @app.get("/health")
    async def health():
        plan = service.controller.plan
        body = {"status": "ok" if plan is not None else "no_config",
                "config": plan.config.short() if plan is not None else None,
                "phase": service.controller.phase, "queue": service.rm.queued,
                "running": service.rm.n_running,
                "workers": sum(1 for c in service.pool.conns.values() if c.alive)}
        return JSONResponse(body, status_code=200 if plan is not None else 503)

    @app.get("/metrics", dependencies=[Depends(auth)])
    async def metrics():
        service.refresh_metrics()
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/admin/notice", dependencies=[Depends(auth)])
    async def admin_notice(body: AdminBody):
        _known(service, body.instance)
        return {"instance": body.instance, "deadline": service.notice(body.instance, body.grace_s)}

    @app.post("/admin/acquire", dependencies=[Depends(auth)])
    async def admin_acquire(body: AdminBody):
        if not body.instance:
            raise HTTPException(400, "instance is required")
        try:
            await service.acquire(body.instance)
        except (ValueError, TimeoutError) as exc:
            raise HTTPException(409, str(exc)) from None
        return {"instance": body.instance}

    @app.post("/admin/kill", dependencies=[Depends(auth)])
    async def admin_kill(body: AdminBody):
        if body.worker is None or service.pool.alive(body.worker) is None:
            raise HTTPException(404, f"no live worker {body.worker!r}")
        return {"worker": body.worker, "pid": service.kill_worker(body.worker)}

    @app.post("/admin/reconfigure", dependencies=[Depends(auth)])
    async def admin_reconfigure(body: ReconfigureBody):
        """Move to the given config through the usual migration; 400 for an invalid config, 409 when
        the controller refuses it (not enough ready GPUs, a replica that does not fit)."""
        from spotserve.planner.types import ParallelConfig

        try:
            config = ParallelConfig(body.dp, body.pp, body.tp, body.batch, body.micro_batches)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        try:
            changed = service.reconfigure(config, reason="manual")
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"config": config.short(), "changed": changed}

    return app


def _known(service, instance: str | None) -> None:
    inst = service.controller.instances.instances.get(instance or "")
    if inst is None or inst.state not in ("ready", "noticed", "starting"):
        raise HTTPException(404, f"no live instance {instance!r}")
