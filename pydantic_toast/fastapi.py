"""FastAPI routes whose bodies and responses carry `External` fields as references.

``APIRouter(route_class=external_route(storage=URL))`` makes every route of the router:

* accept, in a request body, each `External` value or a reference to it, in any mix. The
  references are read before FastAPI validates the body (after the dependencies that do not
  take it, so a request that authentication refuses reads nothing), level by level, one
  batch per backend and class; a dangling or malformed one is a 422 naming its location,
  like any validation error;
* dump a returned model (through ``response_model`` or not) with each `External` value as
  its reference. The values are written in one batch per backend after FastAPI has
  serialized the response and before the response is sent, so a client never holds a
  reference to a record that is not written;
* leave OpenAPI as FastAPI generates it from the types, which is what the route now does:
  each `External` field is "value or reference", the reference a named component.

How it hooks in: FastAPI validates bodies and serializes responses through one
``TypeAdapter`` per parameter, with no Pydantic context. The route gives the adapters of its
body parameters (the endpoint's and its dependencies') and of its response the context of the
request's batched session, the same session `pydantic_toast.validate` and
`pydantic_toast.dump` use; user code in the handler is not affected (its own
``model_dump()`` stays inline). Pydantic's hooks are synchronous, so the I/O happens around
them: reads before validation, writes after serialization.
"""

from __future__ import annotations

import contextvars
import inspect
import weakref
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from functools import partial, wraps
from typing import Any, ClassVar

from pydantic import BaseModel

try:
    import anyio.from_thread
    import fastapi.routing
    from fastapi.dependencies.utils import get_dependant
    from fastapi.routing import APIRoute
    from starlette.requests import Request
    from starlette.responses import Response
except ImportError as exc:  # pragma: no cover - exercised without FastAPI installed
    missing = (exc.name or "fastapi").partition(".")[0]
    raise ImportError(
        f"pydantic_toast.fastapi needs FastAPI ({missing} is missing): "
        "pip install 'pydantic-toast[fastapi]'"
    ) from exc

from pydantic_toast._external import (
    Storage,
    _context,
    _mentions_external,
    _references_in,
    _Session,
)
from pydantic_toast._registry import backend_class_for
from pydantic_toast.backends.base import StorageBackend

__all__ = ["external_route"]


@dataclass(frozen=True, slots=True)
class _Request:
    """The request being handled: its storage, batched session and Pydantic context."""

    storage: Storage
    session: _Session
    context: dict[str, Any]


_current: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
    "pydantic_toast_request", default=None
)

# Endpoints already wrapped, so that building a handler twice does not wrap one twice.
_wrapped: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def external_route(*, storage: Storage) -> type[APIRoute]:
    """An `APIRoute` class whose routes read and write `External` values in ``storage``.

    ``storage`` is a storage URL or a connected `StorageBackend`; it serves every `External`
    value of the route's bodies and responses, except `ExternalBaseModel` values, which keep
    their own storage. Use it as ``APIRouter(route_class=external_route(storage=URL))`` or
    ``FastAPI().router.route_class = external_route(storage=URL)`` (before adding routes).
    """
    if isinstance(storage, str):
        backend_class_for(storage)  # an unknown scheme fails here, not at the first request
    elif not isinstance(storage, StorageBackend):
        raise TypeError(
            f"external_route: storage must be a URL or a StorageBackend, "
            f"not {type(storage).__name__}"
        )
    return type("ExternalRoute", (_ExternalRoute,), {"storage": storage})


class _ExternalRoute(APIRoute):
    storage: ClassVar[Storage]

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        state = _route_state(self)
        body_fields = [field for field in _body_fields(state.dependant) if _is_external(field)]
        for field in body_fields:
            _in_request_context(field)
        if body_fields:
            _read_references_before_the_body(state.dependant)
        response_field = state.response_field
        if response_field is None:
            _dump_what_returns(state.dependant, has_response_field=False)
        elif _is_external(response_field):
            _in_request_context(response_field)
            _dump_what_returns(state.dependant, has_response_field=True)
        handler = super().get_route_handler()
        storage = self.storage

        async def handle(request: Request) -> Response:
            session = _Session(None, batched=True)
            token = _current.set(_Request(storage, session, _context(storage, None, session)))
            try:
                response = await handler(request)
                await session.flush()
            finally:
                _current.reset(token)
            return response

        return handle


def _route_state(route: APIRoute) -> Any:
    """What FastAPI builds this handler from. Recent FastAPI versions rebuild the fields of
    a route for each router that includes it, and hold that state in a context variable
    while they call `get_route_handler`; in older ones, and for a route used where it was
    defined, it is the route itself."""
    building = getattr(fastapi.routing, "_effective_route_context_var", None)
    state = building.get() if building is not None else None
    if state is not None and getattr(state, "original_route", None) is route:
        return state
    return route


def _body_fields(dependant: Any) -> Iterator[Any]:
    """The body parameters of an endpoint and of every dependency it has."""
    stack = [dependant]
    while stack:
        current = stack.pop()
        yield from current.body_params
        stack.extend(current.dependencies)


def _is_external(field: Any) -> bool:
    """Whether a FastAPI field's type has an `External` field anywhere in it."""
    return _mentions_external(field._type_adapter.core_schema)


class _InRequestContext:
    """A FastAPI field's ``TypeAdapter`` that validates and dumps in the request's context."""

    def __init__(self, adapter: Any) -> None:
        self._adapter = adapter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)

    def validate_python(self, value: Any, **kwargs: Any) -> Any:
        return self._adapter.validate_python(value, context=_context_now(), **kwargs)

    def dump_python(self, value: Any, **kwargs: Any) -> Any:
        return self._adapter.dump_python(value, context=_context_now(), **kwargs)

    def dump_json(self, value: Any, **kwargs: Any) -> bytes:
        result: bytes = self._adapter.dump_json(value, context=_context_now(), **kwargs)
        return result


def _context_now() -> dict[str, Any] | None:
    request = _current.get()
    return None if request is None else request.context


def _in_request_context(field: Any) -> None:
    if not isinstance(field._type_adapter, _InRequestContext):
        field._type_adapter = _InRequestContext(field._type_adapter)


def _read_references_before_the_body(dependant: Any) -> None:
    """Make the reading of the body's references a dependency of the endpoint, solved after
    the dependencies before the first one that takes the body (authentication, say): a
    request they refuse costs no read."""
    subs = dependant.dependencies
    if any(sub.call is _read_body_references for sub in subs):
        return
    at = next((i for i, sub in enumerate(subs) if any(_body_fields(sub))), len(subs))
    subs.insert(at, get_dependant(path=dependant.path or "", call=_read_body_references))


async def _read_body_references(request: Request) -> None:
    """Read every reference in a JSON body, so that validation finds them all in the
    session. A body FastAPI would not parse as JSON is left to FastAPI, which reports it."""
    current = _current.get()
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    main, _, subtype = media_type.partition("/")
    if (
        current is None
        or main != "application"
        or not (subtype == "json" or subtype.endswith("+json"))
    ):
        return
    try:
        body = await request.json()
    except ValueError:
        return
    await current.session.prefetch(body, current.storage)


def _dump_what_returns(dependant: Any, *, has_response_field: bool) -> None:
    """Wrap the endpoint so that what it returns is ready for FastAPI's serialization.

    Without a response model FastAPI encodes a returned model with no context, so the
    wrapper dumps it (and a list of them) in the request's context. With one, FastAPI
    validates the return value before dumping it: references in a returned dict (say,
    ``await pydantic_toast.dump(order)``) are read first, in one batch. A `Response` and
    anything else pass through. Generators (streamed responses) are left as they are.
    """
    call = dependant.call
    if call in _wrapped or _is_generator(call):
        return
    if _is_async(call):

        @wraps(call)
        async def endpoint(*args: Any, **kwargs: Any) -> Any:
            result = await call(*args, **kwargs)
            request = _current.get()
            if request is None or isinstance(result, Response):
                return result
            if not has_response_field:
                return _dumped(result, request.context)
            if _holds_references(result):
                await request.session.prefetch(result, request.storage)
            return result

        dependant.call = endpoint
    else:

        @wraps(call)
        def sync_endpoint(*args: Any, **kwargs: Any) -> Any:
            result = call(*args, **kwargs)
            request = _current.get()
            if request is None or isinstance(result, Response):
                return result
            if not has_response_field:
                return _dumped(result, request.context)
            if _holds_references(result):  # in FastAPI's thread pool: read on the server's loop
                anyio.from_thread.run(request.session.prefetch, result, request.storage)
            return result

        dependant.call = sync_endpoint
    _wrapped.add(dependant.call)


def _unwrapped(call: Any) -> Any:
    while isinstance(call, partial):
        call = call.func
    return call


def _is_async(call: Any) -> bool:
    """As FastAPI decides it: an ``async def``, or an object whose ``__call__`` is one."""
    call = _unwrapped(call)
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(type(call).__call__)


def _is_generator(call: Any) -> bool:
    call = _unwrapped(call)
    return any(
        inspect.isgeneratorfunction(c) or inspect.isasyncgenfunction(c)
        for c in (call, type(call).__call__)
    )


def _holds_references(result: Any) -> bool:
    return not isinstance(result, BaseModel) and bool(_references_in(result))


def _dumped(result: Any, context: dict[str, Any]) -> Any:
    """A returned model (or list of models) dumped with references staged in the session."""
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json", by_alias=True, context=context)
    if (
        isinstance(result, list | tuple)
        and result
        and all(isinstance(item, BaseModel) for item in result)
    ):
        return [item.model_dump(mode="json", by_alias=True, context=context) for item in result]
    return result
