# The web server `make run` starts (and the tests' live server). Each option can be overridden on
# the command line; WEB_CONCURRENCY (gunicorn's own variable) sets the number of processes.
import os

wsgi_app = "batchsite.wsgi:application"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = 8  # htmx polls every 2 s per open page; threads keep them cheap
timeout = 120  # a worker silent this long is restarted; gthread workers keep beating during long uploads
graceful_timeout = 10
accesslog = None  # progress polling would drown the log; LOG_LEVEL governs Batchsite's own
errorlog = "-"
loglevel = "warning"
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


def on_starting(server):
    """Refuse to serve beyond this machine with DEBUG on (Django's default here, for `make run`): its error
    pages show code, settings and requests to whoever can reach them. Checked before any socket is opened."""
    debug = os.environ.get("DEBUG", "1").strip().lower() not in ("0", "false", "no", "off")
    if not debug:
        return
    for address in server.cfg.bind:
        if address.startswith(("unix:", "fd://")):
            continue
        host = address.rsplit(":", 1)[0] if ":" in address else address
        if host not in LOOPBACK_HOSTS and not host.startswith("127."):
            raise SystemExit(
                f"Refusing to listen on {address} with DEBUG on: its error pages would show code and settings to "
                "the network. Set DEBUG=0 (with SECRET_KEY and ALLOWED_HOSTS), or bind 127.0.0.1."
            )


def post_worker_init(worker):
    """Load the tokenizers in the background as a worker starts: the first upload or batches.create
    would otherwise spend half a second loading them before it could answer."""
    import threading

    def warm():
        from jobs import tokens

        for model in ("gpt-4o-mini", "gpt-3.5-turbo"):  # o200k_base and cl100k_base
            tokens.encoding_for_model(model)

    threading.Thread(target=warm, name="warm-tokenizers", daemon=True).start()
