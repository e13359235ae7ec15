"""A web role's site in `rolehost.toml`: `[roles.NAME.site]`.

A module of its own beside the model (which imports it): the site is one concept, and
the role's table only points at it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rolehost.definition.types import Duration, Text

# module:attribute, importable from the role's app folder (Django's `mysite.wsgi:application`).
APP_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"
# The class a role with a site and no `entry_point` runs: on_start, run and on_stop that
# do nothing of their own, so the site is the whole role.
SITE_ONLY_ENTRY_POINT = "rolehost.entrypoint:RoleEntryPoint"



class Site(BaseModel):
    """The role's web application, served by the host in uvicorn on the private port of
    one of the role's http endpoints. Start: the site starts, then on_start runs, then
    each `warmup` path is requested and must answer 2xx/3xx; only then is the instance
    ready (probes and status checks then gate rotation as for any endpoint). Stop: out of
    rotation and drained, the server stops accepting and finishes its requests in flight
    (within the endpoint's `drain_timeout`), the ASGI lifespan shuts down, then the
    `stopping` handlers and on_stop run, all within `stop_timeout`. The access log and
    errors go to the instance log."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              json_schema_extra={"oneOf": [{"required": ["asgi"]},
                                                           {"required": ["wsgi"]}]})

    asgi: Text | None = Field(
        default=None, pattern=APP_PATTERN,
        description="module:attribute of an ASGI application (FastAPI, Starlette, Django's "
        "`asgi.py`), run with the lifespan protocol if it speaks it")
    wsgi: Text | None = Field(
        default=None, pattern=APP_PATTERN,
        description="module:attribute of a WSGI application (Flask, Django's `wsgi.py`), "
        "served by uvicorn through a2wsgi's thread pool")
    endpoint: Text | None = Field(
        default=None, pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", max_length=63,
        description="the role's http input endpoint whose private port the site binds; "
        "default: the role's only endpoint")
    warmup: list[Annotated[Text, Field(pattern=r"^/")]] = Field(
        default_factory=list,
        description="paths requested (GET) after on_start, in order, before the instance "
        "is ready: each must answer 2xx or 3xx, or the boot fails")
    warmup_timeout: Duration = Field(
        default=30.0, gt=0, description="a warm-up request slower than this fails the boot")

    @model_validator(mode="after")
    def _one_application(self) -> Site:
        if (self.asgi is None) == (self.wsgi is None):
            raise ValueError("expected exactly one of `asgi` and `wsgi`")
        return self

    @property
    def interface(self) -> str:
        return "asgi" if self.asgi is not None else "wsgi"

    @property
    def application(self) -> str:
        return self.asgi or self.wsgi or ""


def site_endpoint(site: Site, endpoints: dict[str, Any]) -> str:
    """The endpoint the site binds; ValueError (of key `site.endpoint`) if none fits."""
    if site.endpoint is not None:
        if site.endpoint not in endpoints:
            raise ValueError(f"expected one of the role's endpoints "
                             f"({', '.join(endpoints) or 'it has none'}), got {site.endpoint!r}")
        name = site.endpoint
    elif len(endpoints) == 1:
        [name] = endpoints
    else:
        raise ValueError("the role has "
                         + (f"{len(endpoints)} endpoints: name the one the site binds"
                            if endpoints else "no endpoint: declare an http endpoint for "
                            "the site, [roles.NAME.endpoints.http]"))
    # Behind an https endpoint too: the balancer terminates TLS, the site serves http.
    if str(getattr(endpoints[name], "protocol", "http")) not in ("http", "https"):
        raise ValueError(f"expected an http endpoint, {name!r} is tcp")
    return name


def site_context(site: Site | None, endpoints: dict[str, Any]) -> dict[str, Any] | None:
    """What a host needs to serve a role's site (rolehost/site.py): the application, its
    endpoint's name, and that endpoint's drain and idle timeouts."""
    if site is None:
        return None
    name = site_endpoint(site, endpoints)
    endpoint = endpoints[name]
    return {"interface": site.interface, "application": site.application, "endpoint": name,
            "warmup": list(site.warmup), "warmup_timeout": site.warmup_timeout,
            "drain_timeout": endpoint.drain_timeout, "idle_timeout": endpoint.idle_timeout}
