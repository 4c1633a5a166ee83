"""What a run was asked to do, built once from the command line.

The terminal chat, one-prompt generation and the server all read this one
object: the generation defaults (sampling, length, system prompt) and, for
the server, where to listen and what to allow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .engine import GenerationRequest
from .openai_api import Defaults

MAX_BODY_BYTES = 1 << 20  # the largest request body the server takes by default


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None  # None: the API is open
    max_body_bytes: int = MAX_BODY_BYTES
    max_tokens_limit: int = 0  # the most tokens one request may generate (0: up to the context)
    pooling: str = "mean"  # of /v1/embeddings: mean, cls or last
    open_browser: bool = True
    parallel: int = 4  # slots: requests generated at once (runtime/slots.py)
    queue_limit: int = 64  # requests that may wait for a slot before more are refused (503)
    metrics: bool = False  # serve /metrics


@dataclass(frozen=True)
class RunOptions:
    request: GenerationRequest = field(default_factory=GenerationRequest)  # sampling and -n
    system_prompt: str | None = None
    server: ServerOptions = field(default_factory=ServerOptions)
    verbose: bool = False

    def request_defaults(self) -> Defaults:
        """What a server request gets for the fields it leaves out."""
        return Defaults(sampling=self.request.sampling, max_tokens=self.request.max_tokens,
                        system_prompt=self.system_prompt, max_tokens_limit=self.server.max_tokens_limit,
                        pooling=self.server.pooling, draft=self.request.draft)
