"""The simulator's settings: one SimConfig, filled from `simulate_openai`'s options or by a test, and the
subset POST /_sim/config may change while it runs."""

from dataclasses import dataclass, field


@dataclass
class SimConfig:
    latency_ms: float = 0
    jitter_ms: float = 0
    rpm: int | None = None
    tpm: int | None = None
    # Rate-limit buckets are empty when the first request arrives, instead of full (as if another client
    # had just spent the budget): a client faster than its limit gets 429s from the first second, not
    # only once it has used up a whole minute's budget.
    start_empty: bool = False
    # How a request is charged against the TPM budget, besides its max tokens times n: "chars", a token per four
    # characters of its prompt, as OpenAI's limiter estimates (it does not tokenize); "tokenizer", the prompt's
    # exact count with o200k_base, as a server that tokenizes would.
    token_count: str = "chars"
    # status -> fraction of inference requests answered with that status instead
    error_rates: dict[int, float] = field(default_factory=dict)
    retry_after_ms: int = 1000  # advertised by injected 429s
    insufficient_quota: bool = False
    api_key: str | None = None
    batch_seconds: float = 2.0
    batch_fail_rate: float = 0.0  # fraction of batch lines answered 500 (error file)
    batch_client_error_rate: float = 0.0  # fraction of batch lines answered 400 invalid_request_error (error file)
    batch_expire: bool = False
    # Batches fail validation with line errors although their file is valid.
    batch_reject: bool = False
    # OpenAI's per-model enqueued token limit: a batch fails validation with token_limit_exceeded if its
    # tokens, plus those of the same model's batches still running, would pass it.
    batch_token_limit: int | None = None
    batch_cancel_seconds: float = 0.0  # how long a cancelled batch stays `cancelling`
    # Fraction of structured answers (JSON mode or a JSON schema; live and batch) broken on purpose, as by a
    # server without a strict mode: alternately cut half-way (invalid JSON) and valid JSON off the schema.
    bad_output_rate: float = 0.0
    # False: no Files or Batches API at all, as llama.cpp, vLLM and Ollama: /v1/files and /v1/batches are 404s.
    batch_api: bool = True
    seed: int = 0  # injected errors, jitter and batch failures repeat exactly for a given seed
    log_path: str | None = None


# Keys POST /_sim/config may change, with the type each value is coerced to (error_rates, a mapping,
# is handled on its own).
RUNTIME_KEYS = {
    "latency_ms": float,
    "jitter_ms": float,
    "rpm": int,
    "tpm": int,
    "start_empty": bool,
    "token_count": str,
    "retry_after_ms": int,
    "insufficient_quota": bool,
    "api_key": str,
    "batch_seconds": float,
    "batch_fail_rate": float,
    "batch_client_error_rate": float,
    "batch_expire": bool,
    "batch_reject": bool,
    "batch_token_limit": int,
    "batch_cancel_seconds": float,
    "bad_output_rate": float,
    "batch_api": bool,
}
