"""Service settings: environment variables with the prefix TRACIN_ (pydantic-settings).

    TRACIN_INDEX_DIR           index directory to serve (required; `tracin serve DIR` sets it)
    TRACIN_HOST / TRACIN_PORT  where `python -m service.server` listens (`tracin serve` flags win)
    TRACIN_API_KEY             optional bearer key; when set every route but /healthz and /readyz needs
                               `Authorization: Bearer <key>`
    TRACIN_CORS_ORIGINS        comma-separated (or JSON list) allowed origins; empty = CORS closed
    TRACIN_MAX_K               largest k for POST /influence (default 100)
    TRACIN_MAX_PAGE            largest k / limit for the listing routes (default 1000)
    TRACIN_MAX_SET             most members (examples + train_ids) of a set query, POST /influence with
                               `aggregate` (default 1000; more gets 413 naming the first member beyond)
    TRACIN_MAX_BATCH           most members of a batch query, POST /influence `examples` / `train_ids`
                               without `aggregate` (default 100; more gets 413)
    TRACIN_FAISS_PARAMS        JSON object of FAISS search parameters, e.g. {"nprobe": 32}; overrides
                               the manifest's index.search_params
    TRACIN_FAISS_THREADS       OpenMP threads FAISS may use per search (default: FAISS's own default)
    TRACIN_SEARCH              auto (default): an exact Flat index answers an unfiltered query with one
                               pass for proponents and opponents together; faiss: always two FAISS
                               searches (q and -q). Label filters and approximate indexes always use FAISS.
    TRACIN_SEARCH_THREADS      threads of one search: row blocks of a large Flat index, or the q and -q
                               FAISS searches at once (default: the CPUs; 1 = sequential)
    TRACIN_MMAP                open the FAISS index memory-mapped (default false)
    TRACIN_VERIFY_CHECKSUMS    verify every file's sha256 against the manifest at start (default true)
    TRACIN_VERIFY_ROWS         rows re-embedded at start at every checkpoint and compared with the stored
                               vectors, self-influence and label review, besides every row's id and label
                               against the task's training set (`indexer.store.consistency`; default 12,
                               0 = off)
    TRACIN_INDEX_KEY           a key: serve only an index signed with it (manifest.hmac, HMAC-SHA256 of
                               the manifest, written by `tracin index` when this variable is set there);
                               file checksums are then always verified
    TRACIN_TORCH_THREADS       torch intra-op threads (default: CPUs // TRACIN_COMPUTE_THREADS, at least 1)
    TRACIN_COMPUTE_THREADS     requests doing gradient / search work at once (default: min(4, CPUs))
    TRACIN_MAX_QUEUE           requests that may wait for a compute slot (default 64; 0 = none wait); beyond
                               it POST /influence and GET /label-review/export answer 503 with Retry-After
    TRACIN_MAX_BODY_BYTES      larger request bodies get 413 (default 1 MiB)
    TRACIN_BODY_TIMEOUT_S      a request body not complete this many seconds after the request started
                               gets 408 (slow clients; default 30)
    TRACIN_HEADER_TIMEOUT_S    a request line and headers not complete this many seconds after their first
                               byte (or after the connection opened) get 408 and the connection is closed
                               (slowloris; default 10; `tracin serve` / python -m service.server)
    TRACIN_MAX_URL_BYTES       longer request targets (path + query) get 414 JSON (default 16 KiB)
    TRACIN_MAX_HEADER_BYTES    larger request heads (request line + headers) get 431 JSON (default 64 KiB)
    TRACIN_DEVICE              torch device for query gradients (default cpu)
    TRACIN_FAISS_GPU           search a GPU copy of the FAISS index (needs faiss-gpu): auto (default: when
                               TRACIN_DEVICE is cuda and FAISS has GPU support), true, false
    TRACIN_RERANK              candidates per end that POST /influence re-scores by exact TracIn (K'; a
                               request's `rerank` field overrides it; 0 = off: scores from the index)
    TRACIN_MAX_RERANK          largest `rerank` a request may ask for (default 1000; 0 = re-ranking off:
                               the training set is then not loaded, unless TRACIN_VERIFY_ROWS needs it)
    TRACIN_RERANK_THREADS      checkpoints embedded / re-scored at once by one request (default: min(CPUs, 4))
    TRACIN_WARMUP              run one query at start so the first request is not slow (default true)
    TRACIN_LOG_LEVEL / TRACIN_ACCESS_LOG   uvicorn logging (default info / true)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


#: default K': candidates per end re-scored by exact TracIn (docs/benchmarks.md: recall@10 vs dim and K')
DEFAULT_RERANK = 50


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRACIN_", extra="ignore", validate_default=True)

    index_dir: Path | None = Field(None, description="index directory to serve")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="bearer key; unset = no authentication")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_k: int = Field(100, ge=1, le=100_000)
    default_k: int = Field(10, ge=1)
    max_page: int = Field(1000, ge=1, le=1_000_000)
    max_set: int = Field(1000, ge=1, le=1_000_000)
    max_batch: int = Field(100, ge=1, le=100_000)
    faiss_params: dict[str, int | float] = Field(default_factory=dict)
    faiss_threads: int | None = Field(None, ge=1)
    search: Literal["auto", "faiss"] = "auto"
    search_threads: int | None = Field(None, ge=1)
    mmap: bool = False
    verify_checksums: bool = True
    verify_rows: int = Field(12, ge=0, le=4096, description="rows re-embedded at start and compared with the index")
    index_key: SecretStr | None = Field(None, description="HMAC key an index must be signed with (manifest.hmac)")
    torch_threads: int | None = Field(None, ge=1)
    compute_threads: int | None = Field(None, ge=1)
    max_queue: int = Field(64, ge=0, le=1_000_000)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    max_url_bytes: int = Field(16 << 10, ge=1024, le=1 << 20)
    max_header_bytes: int = Field(64 << 10, ge=4096, le=16 << 20)
    device: str = "cpu"
    faiss_gpu: Literal["auto", "true", "false"] = "auto"
    max_rerank: int = Field(1000, ge=0, le=100_000)
    rerank: int = Field(DEFAULT_RERANK, ge=0)
    rerank_threads: int | None = Field(None, ge=1)
    warmup: bool = True
    log_level: str = "info"
    access_log: bool = True

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("api_key", "index_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("default_k")
    @classmethod
    def _default_k_fits(cls, value: int, info) -> int:
        max_k = info.data.get("max_k")
        return min(value, max_k) if max_k else value

    @field_validator("rerank")
    @classmethod
    def _rerank_fits(cls, value: int, info) -> int:
        limit = info.data.get("max_rerank")
        return min(value, limit) if limit is not None else value

    @property
    def effective_rerank_threads(self) -> int:
        return self.rerank_threads or min(available_cpus(), 4)

    @property
    def effective_torch_threads(self) -> int:
        """Default: the CPUs shared out among the requests computing at once. Parallelism comes from
        concurrent requests; an OpenMP team per request on oversubscribed cores spins at its barriers
        (measured: 5-checkpoint Fashion-MNIST CNN query 16 ms with 1 thread, 240 ms with 2, on 2 busy CPUs)."""
        return self.torch_threads or max(1, available_cpus() // self.effective_compute_threads)

    @property
    def effective_search_threads(self) -> int:
        return self.search_threads or available_cpus()

    @property
    def effective_compute_threads(self) -> int:
        return self.compute_threads or min(4, available_cpus())
