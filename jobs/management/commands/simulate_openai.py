from django.core.management.base import BaseCommand, CommandError

from simulator import SimConfig, run


def _error_rate(value: str) -> tuple[int, float]:
    status, _, fraction = value.partition("=")
    try:
        return int(status), float(fraction)
    except ValueError:
        raise CommandError(f"--error-rate expects STATUS=FRACTION, e.g. 500=0.05, not {value!r}") from None


class Command(BaseCommand):
    help = "Run the built-in OpenAI-compatible simulator (deterministic echo answers, real rate-limit headers)."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8100)
        parser.add_argument("--latency-ms", type=float, default=0, help="added to every answer")
        parser.add_argument("--jitter-ms", type=float, default=0, help="uniform extra latency, 0..N ms")
        parser.add_argument("--rpm", type=int, help="requests per minute (token bucket)")
        parser.add_argument("--tpm", type=int, help="tokens per minute: prompt estimate + max_tokens")
        parser.add_argument(
            "--token-count",
            choices=["chars", "tokenizer"],
            default="chars",
            help="how --tpm charges a prompt: a token per 4 characters, as OpenAI's limiter estimates (the default), "
            "or its exact o200k_base count",
        )
        parser.add_argument(
            "--start-empty",
            action="store_true",
            help="rate-limit buckets are empty when the first request arrives, not full: a client "
            "faster than --rpm/--tpm gets 429s from the start, not after a minute's budget",
        )
        parser.add_argument(
            "--error-rate",
            action="append",
            default=[],
            metavar="STATUS=FRACTION",
            help="answer this fraction of requests with STATUS; repeatable",
        )
        parser.add_argument("--retry-after-ms", type=int, default=1000, help="retry-after of injected 429s")
        parser.add_argument(
            "--insufficient-quota", action="store_true", help="answer every request 429 insufficient_quota"
        )
        parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
        parser.add_argument("--batch-seconds", type=float, default=2.0, help="how long a batch takes")
        parser.add_argument("--batch-fail-rate", type=float, default=0.0, help="fraction of batch lines answered 500")
        parser.add_argument(
            "--batch-client-error-rate", type=float, default=0.0, help="fraction of batch lines answered 400"
        )
        parser.add_argument("--batch-expire", action="store_true", help="batches expire after half their lines")
        parser.add_argument(
            "--batch-reject",
            action="store_true",
            help="batches fail validation with errors on their first and last lines",
        )
        parser.add_argument(
            "--batch-token-limit",
            type=int,
            help="enqueued token limit per model: a batch that would pass it, with the model's running batches, fails",
        )
        parser.add_argument(
            "--batch-cancel-seconds", type=float, default=0.0, help="how long a cancelled batch stays 'cancelling'"
        )
        parser.add_argument(
            "--bad-output-rate",
            type=float,
            default=0.0,
            help="fraction of structured (JSON) answers broken: alternately invalid JSON and JSON off the schema",
        )
        parser.add_argument(
            "--no-batch-api", action="store_true", help="no Files or Batches API (404s), as llama.cpp, vLLM or Ollama"
        )
        parser.add_argument("--seed", type=int, default=0, help="seed for injected errors, jitter and batch failures")
        parser.add_argument("--log", help="append one JSON line per request to this file")

    def handle(self, *args, **options):
        config = SimConfig(
            latency_ms=options["latency_ms"],
            jitter_ms=options["jitter_ms"],
            rpm=options["rpm"],
            tpm=options["tpm"],
            start_empty=options["start_empty"],
            token_count=options["token_count"],
            error_rates=dict(_error_rate(v) for v in options["error_rate"]),
            retry_after_ms=options["retry_after_ms"],
            insufficient_quota=options["insufficient_quota"],
            api_key=options["api_key"],
            batch_seconds=options["batch_seconds"],
            batch_fail_rate=options["batch_fail_rate"],
            batch_client_error_rate=options["batch_client_error_rate"],
            batch_expire=options["batch_expire"],
            batch_reject=options["batch_reject"],
            batch_token_limit=options["batch_token_limit"],
            batch_cancel_seconds=options["batch_cancel_seconds"],
            bad_output_rate=options["bad_output_rate"],
            batch_api=not options["no_batch_api"],
            seed=options["seed"],
            log_path=options["log"],
        )
        self.stdout.write(f"OpenAI simulator on http://{options['host']}:{options['port']}/v1 (Ctrl-C to stop)")
        self.stdout.flush()
        run(config, options["host"], options["port"])
