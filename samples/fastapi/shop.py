"""A FastAPI site: its lifespan loads the catalog once per instance, warm-up asks for it."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from rolehost import RoleEnvironment

catalog: dict[str, float] = {}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await asyncio.sleep(0.2)  # a database or a file would be read here
    catalog.update({"tea": 3.5, "cake": 4.0, "scone": 2.5})
    yield
    catalog.clear()  # the instance is stopping: its requests are all answered


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/catalog")
async def items() -> dict[str, object]:
    return {"currency": RoleEnvironment.get_setting("currency"), "items": catalog,
            "served_by": RoleEnvironment.current_instance.id}
