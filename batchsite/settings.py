"""Batchsite settings: everything comes from environment variables (see the README's table)."""

import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

from csp.constants import NONE, SELF, UNSAFE_INLINE
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def envbool(name: str, default: bool) -> bool:
    """NAME as on or off; any other value stops the start, so that DEBUG=ture cannot quietly mean off."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(
        f"Unexpected value {name}={os.environ[name]!r}: use 1/0, true/false, yes/no or on/off (any case)."
    )


def envint(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def envsecret(name: str) -> str | None:
    """NAME, or the contents of the file NAME_FILE points at (for Docker/systemd secrets)."""
    if os.environ.get(name):
        return os.environ[name]
    if os.environ.get(name + "_FILE"):
        return Path(os.environ[name + "_FILE"]).read_text().strip()
    return None


DATA_DIR = Path(os.environ.get("BATCHSITE_DATA_DIR") or BASE_DIR / "var").resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)

DEBUG = envbool("DEBUG", True)

SECRET_KEY = envsecret("SECRET_KEY") or ""
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off.")
    # A per-installation key kept in the data dir: stable across restarts (endpoint keys are
    # encrypted with it) and never a value that is public in the source code.
    from jobs.secretfile import read_or_create

    SECRET_KEY = read_or_create(DATA_DIR / "secret_key", lambda: secrets.token_urlsafe(50))

ALLOWED_HOSTS = [h.strip() for h in os.environ.get("ALLOWED_HOSTS", "").split(",") if h.strip()]
if DEBUG and not ALLOWED_HOSTS:
    ALLOWED_HOSTS = ["*"]
if not ALLOWED_HOSTS:  # else every request would get a bare 400 with nothing in the log to say why
    raise ImproperlyConfigured("ALLOWED_HOSTS must be set when DEBUG is off, e.g. ALLOWED_HOSTS=batchsite.example.com")
CSRF_TRUSTED_ORIGINS = [o.strip() for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "jobs",  # before django_q: its `qcluster` command (a graceful stop) is the one manage.py runs
    "django_q",
    "axes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "jobs.middleware.RejectNulBytes",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "jobs.middleware.LimitRequestBody",  # refuses big bodies before CSRF's process_view reads them
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "csp.middleware.CSPMiddleware",
    "axes.middleware.AxesMiddleware",  # last, as django-axes requires: turns a lockout into its page
]

ROOT_URLCONF = "batchsite.urls"
WSGI_APPLICATION = "batchsite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

if os.environ.get("DATABASE_URL"):
    import dj_database_url

    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=60)}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            # BATCHSITE_SQLITE_PATH lets the test suite point a real qcluster at its test database.
            "NAME": os.environ.get("BATCHSITE_SQLITE_PATH") or str(DATA_DIR / "batchsite.sqlite3"),
            "OPTIONS": {
                # Workers and the web write the same rows: wait for the lock instead of failing,
                # and take it at BEGIN so a read-then-write transaction cannot deadlock.
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=30000;",
            },
            "TEST": {"NAME": str(DATA_DIR / "test.sqlite3")},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
FORMS_URLFIELD_ASSUME_HTTPS = True  # Django 6 default, opted into now

REDIS_URL = os.environ.get("REDIS_URL") or None
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(DATA_DIR / "cache"),
        }
    }

Q_CLUSTER: dict[str, Any] = {
    "name": "batchsite",
    "workers": envint("BATCHSITE_WORKERS", 2),
    # Slices stop claiming after BATCHSITE_SLICE_SECONDS, then wait for requests in flight (up to
    # the request timeout); timeout is the hard stop, and retry (re-delivery of a task whose worker
    # died) must stay above it, see FACTS.md. Our sweeper, not re-delivery, is what recovers work.
    "timeout": 1200,
    "retry": 1500,
    "max_attempts": 1,
    "ack_failures": True,
    "catch_up": False,
    "save_limit": 250,
    "queue_limit": 50,
    "label": "Tasks",
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"
    Q_CLUSTER["poll"] = 0.1  # how soon a new slice starts (issue 9: first request <= 300 ms); one cheap query per poll

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Sign-in lockout (django-axes): after BATCHSITE_LOGIN_FAILURE_LIMIT failures for one username, or from one
# address, sign-in waits BATCHSITE_LOCKOUT_MINUTES after the last failure. Both, not their combination: a
# guesser spreading over many usernames is stopped by address, one spreading over many addresses by username.
# Wrong API tokens count against the address too (jobs/lockout.py).
# jobs.auth_backend: ModelBackend with a raw look-up of the session's user (cheaper polls); ModelBackend
# stays listed so that sessions made before it keep working.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "jobs.auth_backend.Backend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_ENABLED = True  # django-axes' default, named here for jobs/lockout.py
AXES_FAILURE_LIMIT = envint("BATCHSITE_LOGIN_FAILURE_LIMIT", 10)
AXES_COOLOFF_TIME = timedelta(minutes=envint("BATCHSITE_LOCKOUT_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = "jobs.lockout.lockout_parameters"
AXES_CLIENT_IP_CALLABLE = "jobs.lockout.client_ip"
AXES_LOCKOUT_CALLABLE = "jobs.lockout.locked_out"
AXES_RESET_ON_SUCCESS = False  # else signing in to one's own account would clear the address's count
# gunicorn's FORWARDED_ALLOW_IPS: the proxies whose X-Forwarded-For names the client (and is trusted for lockouts).
FORWARDED_ALLOW_IPS = [ip.strip() for ip in os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1").split(",") if ip.strip()]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"
# `manage.py ensure_demo_user` (run by `make run`) creates the demo login unless this is off.
BATCHSITE_DEMO_USER = envbool("BATCHSITE_DEMO_USER", True)

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]

# Uploads and /v1 files (jobs/storage.py): the data dir, or an S3-compatible bucket every node reads. Keys
# come the way boto3 finds them: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, or an instance role.
BATCHSITE_S3_BUCKET = os.environ.get("BATCHSITE_S3_BUCKET", "")
_uploads: dict = {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": DATA_DIR}}
if BATCHSITE_S3_BUCKET:
    # Without BATCHSITE_S3_PREFIX, files go under batchsite/<this installation's key>/ (jobs/bucket.py), so
    # installations that share a bucket never see, nor sweep away, each other's.
    _prefix = os.environ.get("BATCHSITE_S3_PREFIX", "").strip("/")
    _uploads = {
        "BACKEND": "storages.backends.s3.S3Storage" if _prefix else "jobs.bucket.InstallationS3Storage",
        "OPTIONS": {
            "bucket_name": BATCHSITE_S3_BUCKET,
            "endpoint_url": os.environ.get("BATCHSITE_S3_ENDPOINT_URL") or None,  # MinIO, R2, Ceph...
            "region_name": os.environ.get("BATCHSITE_S3_REGION") or None,
            "location": _prefix or "batchsite",
            "file_overwrite": True,  # names are unique folders already
            "default_acl": None,  # the bucket's own policy: private
            "querystring_auth": True,
        },
    }
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    "uploads": _uploads,
}

# Uploads: Django spools anything over 2.5 MB to disk, so a 200 MB file never sits in memory.
BATCHSITE_MAX_UPLOAD_MB = envint("BATCHSITE_MAX_UPLOAD_MB", 512)
BATCHSITE_MAX_LINES = envint("BATCHSITE_MAX_LINES", 1_000_000)
BATCHSITE_MAX_LINE_KB = envint("BATCHSITE_MAX_LINE_KB", 10_240)
# Per member (0: no limit): jobs in flight at once (validating, queued, running, cancelling), and the /v1 files
# they keep stored.
BATCHSITE_MAX_ACTIVE_JOBS = envint("BATCHSITE_MAX_ACTIVE_JOBS", 20)
BATCHSITE_MAX_STORED_MB = envint("BATCHSITE_MAX_STORED_MB", 10_240)
# POST /v1/batches checks a file up to this size at once; a bigger one is checked by a worker (the batch stays
# `validating` meanwhile), so the request answers in well under a second whatever the size.
BATCHSITE_INLINE_VALIDATION_BYTES = envint("BATCHSITE_INLINE_VALIDATION_BYTES", 4 * 1024 * 1024)
# Files uploaded through /v1/files without OpenAI's `expires_after` are removed after this many days (0: never).
BATCHSITE_FILE_EXPIRY_DAYS = envint("BATCHSITE_FILE_EXPIRY_DAYS", 30)
# The engine: how long a worker's claim on items lasts without a heartbeat, how long one slice
# task claims new work before handing over, and the upstream request timeout. Slices renew their
# leases every quarter of a lease and every worker sweeps as often, so a killed worker's or
# cluster's items run again about 15-20 s later; a live slice keeps them however long it takes.
BATCHSITE_LEASE_SECONDS = envint("BATCHSITE_LEASE_SECONDS", 15)
# Every write to a job's books compares its counters with a recount of its items (jobs/models/ledger.py):
# a debugging aid that the tests turn on; it costs a query over the job's items per write.
BATCHSITE_AUDIT_BOOKS = envbool("BATCHSITE_AUDIT_BOOKS", False)
BATCHSITE_SLICE_SECONDS = envint("BATCHSITE_SLICE_SECONDS", 60)
BATCHSITE_REQUEST_TIMEOUT = envint("BATCHSITE_REQUEST_TIMEOUT", 600)
# An upstream answer (live, or a result file's line) is read up to this size; a bigger one fails the request as
# answer_too_large without the rest being read.
BATCHSITE_MAX_ANSWER_MB = envint("BATCHSITE_MAX_ANSWER_MB", 16)
# Server errors, timeouts and lost connections are tried at least this often, whatever a job's max attempts.
BATCHSITE_TRANSIENT_ATTEMPTS = envint("BATCHSITE_TRANSIENT_ATTEMPTS", 10)
BATCHSITE_SLICES_PER_JOB = envint("BATCHSITE_SLICES_PER_JOB", envint("BATCHSITE_WORKERS", 2))
# On SIGTERM (or Ctrl-C) a worker's slices stop claiming and give back what they did not send at once; the
# requests in flight get this long to finish before they are handed back too (jobs/engine/shutdown.py).
BATCHSITE_SHUTDOWN_SECONDS = envint("BATCHSITE_SHUTDOWN_SECONDS", 10)
# The answer cache (jobs with use_cache): answers older than this are not reused; at most this many are kept.
BATCHSITE_CACHE_MAX_AGE_HOURS = envint("BATCHSITE_CACHE_MAX_AGE_HOURS", 24 * 7)
BATCHSITE_EVENT_RETENTION_DAYS = envint("BATCHSITE_EVENT_RETENTION_DAYS", 90)
BATCHSITE_CACHE_MAX_ENTRIES = envint("BATCHSITE_CACHE_MAX_ENTRIES", 200_000)
BATCHSITE_CACHE_MAX_MB = envint("BATCHSITE_CACHE_MAX_MB", 1024)

# Notifications (jobs/models/notify.py): email through Django's mail settings (the console without EMAIL_HOST),
# links to the jobs at BATCHSITE_BASE_URL.
EMAIL_HOST = os.environ.get("EMAIL_HOST", "")
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND") or (
    "django.core.mail.backends.smtp.EmailBackend" if EMAIL_HOST else "django.core.mail.backends.console.EmailBackend"
)
EMAIL_PORT = envint("EMAIL_PORT", 587)
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = envsecret("EMAIL_HOST_PASSWORD") or ""
EMAIL_USE_TLS = envbool("EMAIL_USE_TLS", True)
EMAIL_TIMEOUT = 20
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "Batchsite <batchsite@localhost>")
BATCHSITE_BASE_URL = os.environ.get("BATCHSITE_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
# Remote and hybrid jobs (the Batch API): how often each remote batch is looked at, how long one poller task
# keeps polling before the next takes over (the schedule starts one a minute), and the least safety margin
# a hybrid job keeps before its deadline.
BATCHSITE_REMOTE_POLL_SECONDS = envint("BATCHSITE_REMOTE_POLL_SECONDS", 5)
BATCHSITE_REMOTE_POLL_WINDOW = envint("BATCHSITE_REMOTE_POLL_WINDOW", 50)
# Delete a remote batch's input, output and error files at the endpoint once its results are in Batchsite.
BATCHSITE_REMOTE_DELETE_FILES = envbool("BATCHSITE_REMOTE_DELETE_FILES", True)
BATCHSITE_HYBRID_MARGIN_SECONDS = envint("BATCHSITE_HYBRID_MARGIN_SECONDS", 60)
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 2_621_440
FILE_UPLOAD_HANDLERS = [
    "jobs.middleware.BodyLimitHandler",  # first: stops a file at its limit while it streams in
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]

# Security headers; HTTPS-only cookies and HSTS when served over TLS (set SECURE_COOKIES=1).
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
# Sessions read through the cache: every open job page polls its progress every 2 s, and a session
# query is a good part of what a poll costs. Writes and logouts still go to the database.
SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = envbool("SECURE_COOKIES", False)
if SESSION_COOKIE_SECURE:  # served over TLS only: tell browsers never to try plain HTTP
    SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 31_536_000)
    SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", False)  # usually the proxy's job
if envbool("SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Content Security Policy (django-csp): scripts only from our own static files, never inline, so an
# injected <script> or onclick= would not run. Inline style *attributes* stay allowed (the progress bars'
# widths); they cannot run script. <style> elements must come from files too.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "style-src-attr": [UNSAFE_INLINE],
        "img-src": [SELF, "data:"],  # the admin's icons include data: URLs
        "object-src": [NONE],
        "base-uri": [NONE],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    }
}

# Endpoints may not point at link-local or cloud-metadata addresses (169.254.169.254 and friends) unless
# this says so; loopback and private networks are always allowed (self-hosted servers live there).
BATCHSITE_ALLOW_PRIVATE_ENDPOINTS = envbool("BATCHSITE_ALLOW_PRIVATE_ENDPOINTS", False)

# Operations (jobs/web/ops.py): /healthz answers 503 when no qcluster heartbeat is younger than this; /metrics
# is served to this machine only, or also to whoever sends `Authorization: Bearer <BATCHSITE_METRICS_TOKEN>`.
BATCHSITE_HEALTH_MAX_HEARTBEAT_AGE = envint("BATCHSITE_HEALTH_MAX_HEARTBEAT_AGE", 60)
BATCHSITE_METRICS_TOKEN = envsecret("BATCHSITE_METRICS_TOKEN")

# `text` for people, `json` (one object per line) for log collectors; read strictly, like the booleans.
BATCHSITE_LOG_FORMAT = os.environ.get("BATCHSITE_LOG_FORMAT", "").strip().lower() or "text"
if BATCHSITE_LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured(
        f"Unexpected value BATCHSITE_LOG_FORMAT={os.environ['BATCHSITE_LOG_FORMAT']!r}: use text or json."
    )

LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "json": {"()": "batchsite.jsonlog.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if BATCHSITE_LOG_FORMAT == "json" else "plain",
        }
    },
    "loggers": {
        "jobs": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
        # A 500's traceback: Django's default sends it only by mail to ADMINS, and there are none.
        "django.request": {"handlers": ["console"], "level": "ERROR", "propagate": False},
        # httpx2 logs every request at INFO with its URL (the OpenAI SDK's aiohttp transport goes through it
        # too); nothing secret, but far too chatty.
        "httpx2": {"level": "WARNING"},
    },
}
if BATCHSITE_LOG_FORMAT == "json":
    # django-q2 gives its logger a text handler of its own unless it has one: the cluster's lines would stay text.
    LOGGING["loggers"]["django-q"] = {"handlers": ["console"], "level": "INFO", "propagate": False}
