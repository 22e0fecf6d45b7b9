"""Server settings: every option is a CLI flag and a `NEURONGUARD_*` environment variable.

Settings are built once by the `serve` command (or a test) and passed into `create_app`;
nothing here runs at import time. The defaults serve the built-in organism: the unaligned
twin (so the guard has something to stop), its shipped bundle, and the aligned twin as the
patch source.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from neuronguard.models.organism import ORGANISM_DIR
from neuronguard.server.guard import GuardMode

DEFAULT_MODEL = str(ORGANISM_DIR / "unaligned")
DEFAULT_BUNDLE = str(ORGANISM_DIR / "bundle")
DEFAULT_PATCH_SOURCE = str(ORGANISM_DIR / "aligned")
_DISABLED = {"", "none", "off"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEURONGUARD_", extra="ignore", protected_namespaces=())

    model: str = DEFAULT_MODEL
    bundle: str = DEFAULT_BUNDLE
    # None disables live patching (then the patch guard modes are refused at start-up).
    patch_source: str | None = DEFAULT_PATCH_SOURCE
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Comma-separated or a JSON list in NEURONGUARD_API_KEYS; empty means no authentication.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    device: str = "auto"
    dtype: str = "auto"
    guard_mode: GuardMode = "block"
    patch_k: int | None = Field(None, ge=1)  # None: the bundle's default
    max_queue: int = Field(64, ge=1)
    max_tokens_default: int = Field(256, ge=1)
    log_prompts: bool = False
    allow_guard_override: bool = False
    max_body_bytes: int = Field(1_000_000, ge=1024)
    refusal_message: str = "I can't help with that request."
    graceful_shutdown_s: float = Field(30.0, ge=0)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        if isinstance(value, (list, tuple)):
            return [str(v.get_secret_value() if isinstance(v, SecretStr) else v).strip() for v in value if str(v).strip()]
        return value

    @field_validator("patch_source", mode="before")
    @classmethod
    def _disable_patch_source(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in _DISABLED else value

    def key_values(self) -> list[bytes]:
        return [k.get_secret_value().encode() for k in self.api_keys]
