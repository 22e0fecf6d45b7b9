"""Server settings: every option is a CLI flag and a `NEURONGUARD_*` environment variable.

Settings are built once by the `serve` command (or a test) and passed into `create_app`;
nothing here runs at import time. The defaults serve the built-in organism: the unaligned
twin (so the guard has something to stop), its shipped bundle, and the aligned twin as the
patch source.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from neuronguard.models.arguments import DEFAULT_DEVICE, DEFAULT_DTYPE
from neuronguard.models.organism import ORGANISM_DIR
from neuronguard.server.guard import GuardMode

DEFAULT_MODEL = str(ORGANISM_DIR / "unaligned")
DEFAULT_BUNDLE = str(ORGANISM_DIR / "bundle")
DEFAULT_PATCH_SOURCE = str(ORGANISM_DIR / "aligned")
_DISABLED = {"", "none", "off"}
LogLevel = Literal["debug", "info", "warning", "error"]
EngineKind = Literal["batched", "serial"]


def _split(value: Any) -> Any:
    """A list from repeated flags, or from one variable: comma-separated or a JSON list."""
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else text.split(",")
    if isinstance(value, (list, tuple)):
        return [str(v.get_secret_value() if isinstance(v, SecretStr) else v).strip() for v in value if str(v).strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEURONGUARD_", extra="ignore", protected_namespaces=())

    model: str = DEFAULT_MODEL
    # None ('none'): no guard at all, allowed only with guard mode 'off'.
    bundle: str | None = DEFAULT_BUNDLE
    # None ('none') disables live patching (then the patch guard modes are refused at start-up).
    patch_source: str | None = DEFAULT_PATCH_SOURCE
    # The first names the model in responses; with any given, a request's `model` must be one of them.
    served_model_name: Annotated[list[str], NoDecode] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Comma-separated or a JSON list in NEURONGUARD_API_KEYS; empty means no authentication.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    device: str = DEFAULT_DEVICE
    dtype: str = DEFAULT_DTYPE
    guard_mode: GuardMode = "block"
    patch_k: int | None = Field(None, ge=1)  # None: the bundle's default
    # 'batched': continuous batching on one GuardedBatchEngine; 'serial': one request at a time.
    engine: EngineKind = "batched"
    # Ranks the model is sharded over (transformers' tensor parallelism, one process per rank); needs the batched engine.
    tensor_parallel_size: int = Field(1, ge=1)
    # The batching engine's paged KV cache (blocks of 32 tokens, shared by every request) and step size.
    engine_kv_blocks: int = Field(256, ge=1)
    engine_max_batch_tokens: int = Field(256, ge=1)
    max_queue: int = Field(64, ge=1)
    max_tokens_default: int = Field(256, ge=1)
    log_prompts: bool = False
    allow_guard_override: bool = False
    # Serve a bundle whose recorded weights digest differs (a fine-tune of the same architecture).
    allow_weights_mismatch: bool = False
    max_body_bytes: int = Field(1_000_000, ge=1024)
    refusal_message: str = "I can't help with that request."
    graceful_shutdown_s: float = Field(30.0, ge=0)
    log_level: LogLevel = "info"

    @field_validator("api_keys", "served_model_name", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("bundle", "patch_source", mode="before")
    @classmethod
    def _disable(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in _DISABLED else value

    @field_validator("log_level", "engine", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    def key_values(self) -> list[bytes]:
        return [k.get_secret_value().encode() for k in self.api_keys]
