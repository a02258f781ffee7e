"""An OpenAI-compatible server for demos, tests and benchmarks.

Answers are deterministic echoes of the request ("Echo: " + last user message), so a test can
check that each answer reached the item that asked for it. Rate limits, injected errors, quota
exhaustion, latency and the Files/Batches API behave like OpenAI's, closely enough for the
`openai` SDK to parse every object and for Batchsite's backoff to be tested against real headers.

For tests:
- a model named "bad-model" gets 404 model_not_found; a prompt containing SIMULATE_400 or
  SIMULATE_500 gets that status (live and in batches), so single items can fail on purpose;
- SimConfig.bad_output_rate breaks that fraction of structured answers (JSON mode or a JSON schema, live
  and in batches), alternately invalid JSON (cut half-way; chat says finish_reason "length") and valid
  JSON off the schema; /_sim/stats counts them as `bad_outputs`;
- GET /_sim/stats, GET /_sim/log (?limit=N), GET|POST /_sim/config, POST /_sim/reset;
- every retry of a request answered 429 is audited: /_sim/stats counts `retries_checked` and lists
  `retry_after_violations` (a retry that arrived before the Retry-After it was given had passed,
  measured from the 429's answer to the retry's arrival; requests are told apart by a hash of
  their body, so identical bodies count as one request).

No Django here: the package runs standalone, in a thread for tests (`serve_in_thread`) or from the
`simulate_openai` management command (`run`).

Its modules: `config` (SimConfig), `server` (the app, its routes, stats and log, run and
serve_in_thread), `answers` (validating and answering inference requests), `errors` (OpenAI's error
body, injected errors), `ratelimit` (RPM/TPM buckets, their headers, the Retry-After audit), `files`
and `batches` (the Files and Batches APIs), `batch_input` (validating a batch input file).
"""

from simulator.config import SimConfig
from simulator.ratelimit import go_duration
from simulator.server import make_app, run, serve_in_thread

__all__ = ["SimConfig", "go_duration", "make_app", "run", "serve_in_thread"]
