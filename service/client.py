"""Python client for the influence service (httpx), sync and async, with typed results.

    from service.client import InfluenceClient

    with InfluenceClient("http://127.0.0.1:8000", api_key=None) as client:
        result = client.influence({"pixels": [...64 numbers...]}, k=5)
        for hit in result.proponents:
            print(hit.id, hit.score, hit.label)
        page = client.self_influence_top(k=20, label=3)
        harmful = client.influence_set([...validation examples...], labels=[...], aggregate="sum", k=50).opponents
        answers = client.influence_batch([...examples...], k=5).results     # one answer per example

    async with AsyncInfluenceClient("http://127.0.0.1:8000") as client:
        result = await client.influence(train_id="train-17", k=5)

Results are the pydantic models of `service.schemas` (no torch import). Error responses raise
`InfluenceAPIError` with the status, the error code and the fields named by the server.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, TypeVar, Union
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from service.schemas import (
    BatchInfluenceResponse, ErrorItem, ExampleInfo, IndexInfo, InfluenceResponse, LabelReviewPage, QueryPage,
    SelfInfluencePage,
)

T = TypeVar("T", bound=BaseModel)
Example = Union[Mapping[str, Any], BaseModel]


class InfluenceAPIError(Exception):
    """A non-2xx answer. `fields` lists the request fields the server named (e.g. ["example.pixels"])."""

    def __init__(self, status: int, error: str, message: str, detail: list[ErrorItem]):
        super().__init__(f"{status} {error}: {message}")
        self.status, self.error, self.message, self.detail = status, error, message, detail

    @property
    def fields(self) -> list[str]:
        return [d.field for d in self.detail]


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
        detail = [ErrorItem.model_validate(d) for d in body.get("detail", []) if isinstance(d, dict)]
        raise InfluenceAPIError(response.status_code, str(body.get("error", "error")),
                                str(body.get("message", response.text[:200])), detail)
    except (ValueError, AttributeError, TypeError):
        raise InfluenceAPIError(response.status_code, "http_error", response.text[:200], []) from None


def _influence_body(example: Optional[Example], train_id: Optional[str], label: Optional[Union[int, str]], k: int,
                    filter_label: Optional[Union[int, str]], exclude_self: bool,
                    include_embedding: bool) -> dict[str, Any]:
    if (example is None) == (train_id is None):
        raise ValueError("give exactly one of example or train_id")
    body: dict[str, Any] = {"k": k}
    if example is not None:
        body["example"] = example.model_dump(mode="json") if isinstance(example, BaseModel) else dict(example)
    if train_id is not None:
        body["train_id"] = train_id
    if label is not None:
        body["label"] = label
    if filter_label is not None:
        body["filter_label"] = filter_label
    if exclude_self:
        body["exclude_self"] = True
    if include_embedding:
        body["include_embedding"] = True
    return body


def _members_body(examples: Optional[Sequence[Example]], train_ids: Optional[Sequence[str]],
                  labels: Optional[Sequence[Any]], k: int, options: dict[str, Any]) -> dict[str, Any]:
    """The body of a set or batch query: members, labels, k and the optional fields that are set."""
    if not examples and not train_ids:
        raise ValueError("give at least one member: examples and/or train_ids")
    body: dict[str, Any] = {"k": k}
    if examples:
        body["examples"] = [e.model_dump(mode="json") if isinstance(e, BaseModel) else dict(e) for e in examples]
    if train_ids:
        body["train_ids"] = list(train_ids)
    if labels is not None:
        body["labels"] = list(labels)
    body.update({name: value for name, value in options.items() if value is not None and value is not False})
    return body


def _members_query(examples, train_ids, labels, k: int, metric, normalize, rerank, exclude, exclude_self: bool,
                   filter_label, aggregate: Optional[str] = None, member_scores: bool = False) -> dict[str, Any]:
    """The body of a set query (`aggregate` given) or a batch (both clients)."""
    return _members_body(examples, train_ids, labels, k, {
        "aggregate": aggregate, "metric": metric, "normalize": normalize, "rerank": rerank,
        "member_scores": member_scores, "exclude": list(exclude) if exclude else None,
        "exclude_self": exclude_self, "filter_label": filter_label})


def _params(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _headers(api_key: Optional[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class InfluenceClient:
    """Synchronous client (one httpx.Client, keep-alive). Thread-safe like httpx.Client."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: Optional[str] = None,
                 timeout: float = 30.0, client: Optional[httpx.Client] = None):
        self._own = client is None
        self._http = client or httpx.Client(base_url=base_url, timeout=timeout, headers=_headers(api_key))

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> "InfluenceClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _get(self, path: str, model: type[T], **params: Any) -> T:
        response = self._http.get(path, params=_params(**params))
        _raise_for(response)
        return model.model_validate(response.json())

    def influence(self, example: Optional[Example] = None, *, train_id: Optional[str] = None,
                  label: Optional[Union[int, str]] = None, k: int = 10, filter_label: Optional[Union[int, str]] = None,
                  exclude_self: bool = False, include_embedding: bool = False) -> InfluenceResponse:
        body = _influence_body(example, train_id, label, k, filter_label, exclude_self, include_embedding)
        response = self._http.post("/influence", json=body)
        _raise_for(response)
        return InfluenceResponse.model_validate(response.json())

    def influence_set(self, examples: Optional[Sequence[Example]] = None, *, train_ids: Optional[Sequence[str]] = None,
                      labels: Optional[Sequence[Any]] = None, aggregate: str = "sum", k: int = 10,
                      metric: Optional[Union[str, Mapping[str, Any]]] = None, normalize: Optional[str] = None,
                      rerank: Optional[int] = None, member_scores: bool = False,
                      exclude: Optional[Sequence[str]] = None, exclude_self: bool = False,
                      filter_label: Optional[Union[int, str]] = None) -> InfluenceResponse:
        """One set query: the training examples ranked by their exact influence on the members' summed
        (`aggregate="mean"`: mean) metric. Members: `examples` (each with its `labels` entry, None = the
        prediction) and/or `train_ids`; `member_scores` gives each hit its score against every member;
        `exclude_self` leaves the set's training members out. The answer's `set` lists the members."""
        body = _members_query(examples, train_ids, labels, k, metric, normalize, rerank, exclude, exclude_self,
                              filter_label, aggregate, member_scores)
        response = self._http.post("/influence", json=body)
        _raise_for(response)
        return InfluenceResponse.model_validate(response.json())

    def influence_batch(self, examples: Optional[Sequence[Example]] = None, *,
                        train_ids: Optional[Sequence[str]] = None, labels: Optional[Sequence[Any]] = None,
                        k: int = 10, metric: Optional[Union[str, Mapping[str, Any]]] = None,
                        normalize: Optional[str] = None, rerank: Optional[int] = None,
                        exclude: Optional[Sequence[str]] = None, exclude_self: bool = False,
                        filter_label: Optional[Union[int, str]] = None) -> BatchInfluenceResponse:
        """Several queries in one request (`results`: one answer per member, examples then train_ids, each
        equal to the member's own single answer), computed together: one capture pass, candidates' gradients
        shared."""
        body = _members_query(examples, train_ids, labels, k, metric, normalize, rerank, exclude, exclude_self,
                              filter_label)
        response = self._http.post("/influence", json=body)
        _raise_for(response)
        return BatchInfluenceResponse.model_validate(response.json())

    def self_influence_top(self, k: int = 10, offset: int = 0,
                           label: Optional[Union[int, str]] = None) -> SelfInfluencePage:
        return self._get("/self-influence/top", SelfInfluencePage, k=k, offset=offset, label=label)

    def label_review(self, ranking: Optional[str] = None, k: int = 10, offset: int = 0,
                     label: Optional[Union[int, str]] = None) -> LabelReviewPage:
        """GET /label-review: the training set by `ranking` (None: the server's default), most suspicious first."""
        return self._get("/label-review", LabelReviewPage, ranking=ranking, k=k, offset=offset, label=label)

    def example(self, example_id: str) -> ExampleInfo:
        return self._get(f"/examples/{quote(example_id, safe='')}", ExampleInfo)

    def queries(self, offset: int = 0, limit: int = 100, predictions: bool = False) -> QueryPage:
        return self._get("/queries", QueryPage, offset=offset, limit=limit, predictions=predictions or None)

    def index_info(self) -> IndexInfo:
        return self._get("/index", IndexInfo)

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


class AsyncInfluenceClient:
    """asyncio client (one httpx.AsyncClient)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: Optional[str] = None,
                 timeout: float = 30.0, client: Optional[httpx.AsyncClient] = None):
        self._own = client is None
        self._http = client or httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=_headers(api_key))

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def __aenter__(self) -> "AsyncInfluenceClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _get(self, path: str, model: type[T], **params: Any) -> T:
        response = await self._http.get(path, params=_params(**params))
        _raise_for(response)
        return model.model_validate(response.json())

    async def influence(self, example: Optional[Example] = None, *, train_id: Optional[str] = None,
                        label: Optional[Union[int, str]] = None, k: int = 10,
                        filter_label: Optional[Union[int, str]] = None, exclude_self: bool = False,
                        include_embedding: bool = False) -> InfluenceResponse:
        body = _influence_body(example, train_id, label, k, filter_label, exclude_self, include_embedding)
        response = await self._http.post("/influence", json=body)
        _raise_for(response)
        return InfluenceResponse.model_validate(response.json())

    async def influence_set(self, examples: Optional[Sequence[Example]] = None, *,
                            train_ids: Optional[Sequence[str]] = None,
                            labels: Optional[Sequence[Any]] = None, aggregate: str = "sum", k: int = 10,
                            metric: Optional[Union[str, Mapping[str, Any]]] = None, normalize: Optional[str] = None,
                            rerank: Optional[int] = None, member_scores: bool = False,
                            exclude: Optional[Sequence[str]] = None, exclude_self: bool = False,
                            filter_label: Optional[Union[int, str]] = None) -> InfluenceResponse:
        """One set query: the training examples ranked by their exact influence on the members' summed
        (`aggregate="mean"`: mean) metric. Members: `examples` (each with its `labels` entry, None = the
        prediction) and/or `train_ids`; `member_scores` gives each hit its score against every member;
        `exclude_self` leaves the set's training members out. The answer's `set` lists the members."""
        body = _members_query(examples, train_ids, labels, k, metric, normalize, rerank, exclude, exclude_self,
                              filter_label, aggregate, member_scores)
        response = await self._http.post("/influence", json=body)
        _raise_for(response)
        return InfluenceResponse.model_validate(response.json())

    async def influence_batch(self, examples: Optional[Sequence[Example]] = None, *,
                              train_ids: Optional[Sequence[str]] = None, labels: Optional[Sequence[Any]] = None,
                              k: int = 10, metric: Optional[Union[str, Mapping[str, Any]]] = None,
                              normalize: Optional[str] = None, rerank: Optional[int] = None,
                              exclude: Optional[Sequence[str]] = None, exclude_self: bool = False,
                              filter_label: Optional[Union[int, str]] = None) -> BatchInfluenceResponse:
        """Several queries in one request (`results`: one answer per member, examples then train_ids, each
        equal to the member's own single answer), computed together: one capture pass, candidates' gradients
        shared."""
        body = _members_query(examples, train_ids, labels, k, metric, normalize, rerank, exclude, exclude_self,
                              filter_label)
        response = await self._http.post("/influence", json=body)
        _raise_for(response)
        return BatchInfluenceResponse.model_validate(response.json())

    async def self_influence_top(self, k: int = 10, offset: int = 0,
                                 label: Optional[Union[int, str]] = None) -> SelfInfluencePage:
        return await self._get("/self-influence/top", SelfInfluencePage, k=k, offset=offset, label=label)

    async def label_review(self, ranking: Optional[str] = None, k: int = 10, offset: int = 0,
                           label: Optional[Union[int, str]] = None) -> LabelReviewPage:
        return await self._get("/label-review", LabelReviewPage, ranking=ranking, k=k, offset=offset, label=label)

    async def example(self, example_id: str) -> ExampleInfo:
        return await self._get(f"/examples/{quote(example_id, safe='')}", ExampleInfo)

    async def queries(self, offset: int = 0, limit: int = 100, predictions: bool = False) -> QueryPage:
        return await self._get("/queries", QueryPage, offset=offset, limit=limit, predictions=predictions or None)

    async def index_info(self) -> IndexInfo:
        return await self._get("/index", IndexInfo)

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False
